"""Tensors in, numbers out: probes, ECE, OOD metrics and scores, CKA, Frechet distance, PGD."""
