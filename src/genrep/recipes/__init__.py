"""The shipped recipes: the YAML files beside this one, read by ``genrep.config``; ``genrep.recipes()`` lists them."""

from ..callable_package import make_callable


def names() -> list[str]:
    """The shipped recipes' names (``genrep pretrain --recipe NAME``)."""
    from ..config import recipe_names

    return list(recipe_names())


make_callable(__name__, names)
