"""The shipped reproduction specs: one YAML per paper table or figure, ``<paper>/<table>.yaml`` beside this file,
read and checked by :mod:`genrep.reproduce` (``genrep reproduce --list``)."""
