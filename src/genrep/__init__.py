"""genrep: hybrid generative-discriminative visual representation learning."""

__version__ = "0.1.0"
