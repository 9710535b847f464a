"""Config fields that declare their valid values next to their default.

``setting(default, choices=..., min=..., ...)`` is a dataclass field whose metadata says what is valid;
:func:`check_fields` reads it when :func:`genrep.config.build_dataclass` builds a section from YAML or the
command line, so a bad value fails there, once, naming its dotted key. Code that receives a built
config trusts it. A list field's rule applies to each item. Every numeric value, declared or not, must be
finite and an integer must fit in int64: no key of genrep means anything at inf, NaN or 2**70.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from .errors import GenrepError


INT64 = (-(2 ** 63), 2 ** 63 - 1)


class Pool(str):
    """The type of a pooling key: a name ('mean', 'cls', 'map') or a size p ('2': p x p average pool), which YAML
    and the command line read as a number; the config reads either as the text."""
SHOW_CHARS = 80  # a value quoted in an error message is cut to this many characters


def show(value: Any, limit: int = SHOW_CHARS) -> str:
    """``repr(value)`` for a one-line error message: escaped (a newline in a string stays ``\\n``), and cut
    to ``limit`` characters, so a 10k-character value or a 5000-digit integer keeps the message readable."""
    try:
        text = repr(value)
    except ValueError:  # an int beyond Python's int-to-text digit limit, or a list holding one
        text = (f"<a {value.bit_length()}-bit integer>" if isinstance(value, int)
                else f"<a {type(value).__name__} holding a huge integer>")
    except RecursionError:
        text = f"<a deeply nested {type(value).__name__}>"
    if len(text) > limit:
        text = f"{text[:limit]}... ({len(text)} characters)"
    return " ".join(text.split()) if not text.isprintable() else text


def one_line(text: str, limit: int = 300) -> str:
    """``text`` (e.g. a parser's multi-line message) as one stripped line of at most ``limit`` characters."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else f"{text[:limit]}..."


def setting(default: Any = dataclasses.MISSING, *, choices: tuple | None = None, min: float | None = None,
            above: float | None = None, max: float | None = None, below: float | None = None,
            nonempty: bool = False, unique: bool = False, hint: str = "", only_if: dict | None = None) -> Any:
    """A dataclass field with its valid values: ``choices``, ``min`` (>=), ``above`` (>), ``max`` (<=),
    ``below`` (<); a list may be required ``nonempty`` or without repeats (``unique``); ``hint`` ends the
    error message. ``only_if`` ({other field: value or tuple of values}) declares that the key is read only
    while those fields hold those values (DARL's Beta keys: ``{"decoder": "diffusion"}``), see :func:`inert_fields`."""
    when = {k: tuple(v) if isinstance(v, (tuple, list)) else (v,) for k, v in (only_if or {}).items()}
    meta = {k: v for k, v in dict(choices=choices, min=min, above=above, max=max, below=below,
                                  nonempty=nonempty or None, unique=unique or None,
                                  hint=hint or None, only_if=when or None).items() if v is not None}
    if isinstance(default, list):
        items = list(default)
        return dataclasses.field(default_factory=lambda: list(items), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _valid(meta: dict) -> str:
    if "choices" in meta:
        return "choose " + ", ".join(str(c) for c in meta["choices"])
    lo = f"at least {meta['min']:g}" if "min" in meta else f"above {meta['above']:g}" if "above" in meta else ""
    hi = f"at most {meta['max']:g}" if "max" in meta else f"below {meta['below']:g}" if "below" in meta else ""
    return " and ".join(p for p in (lo, hi) if p)


def _check_number(key: str, value: Any) -> None:
    if isinstance(value, bool):
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise GenrepError(f"{key} must be a finite number, got {show(value)}")
    if isinstance(value, int) and not INT64[0] <= value <= INT64[1]:
        raise GenrepError(f"{key} must be an integer from -2**63 to 2**63-1, got {show(value)}")


def _check_item(key: str, value: Any, meta: dict) -> None:
    if value is None:
        return
    _check_number(key, value)
    ok = True
    if "choices" in meta:
        ok = value in meta["choices"]
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        ok = math.isfinite(value) and (("min" not in meta or value >= meta["min"])
                                       and ("above" not in meta or value > meta["above"])
                                       and ("max" not in meta or value <= meta["max"])
                                       and ("below" not in meta or value < meta["below"]))
    if not ok:
        hint = f" ({meta['hint']})" if "hint" in meta else ""
        if "choices" in meta:
            raise GenrepError(f"{key} {show(value)} is unknown; {_valid(meta)}{hint}")
        raise GenrepError(f"{key} must be {_valid(meta)}, got {show(value)}{hint}")


def check_fields(obj: Any, section: str) -> None:
    """Check every field of the dataclass instance ``obj`` against its declared valid values, then its own
    ``validate(section)`` (rules across fields), if it has one."""
    for f in dataclasses.fields(obj):
        meta = f.metadata
        key = f"{section}.{f.name}" if section else f.name
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            continue  # a nested section, checked when it was built
        if isinstance(value, list):
            if meta.get("nonempty") and not value:
                what = f"; {_valid(meta)}" if _valid(meta) else ""
                raise GenrepError(f"{key} is empty; list one or more values{what}")
            if meta.get("unique") and len(set(value)) != len(value):
                raise GenrepError(f"{key} repeats a value ({show(value)}); list each value once")
            for i, v in enumerate(value):
                _check_item(f"{key}[{i}]", v, meta)
        else:
            _check_item(key, value, meta)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate(section)


def inert_fields(obj: Any, section: str) -> dict[str, str]:
    """The fields of the dataclass instance ``obj`` that its other fields leave unread (their ``only_if`` does not
    hold): name -> why, e.g. ``{"beta_a": "model.beta_a is read only with model.decoder diffusion, not mse"}``."""
    out = {}
    for f in dataclasses.fields(obj):
        for other, values in f.metadata.get("only_if", {}).items():
            now = getattr(obj, other)
            if now not in values:
                wanted = " or ".join(str(v) for v in values)
                out[f.name] = f"{section}.{f.name} is read only with {section}.{other} {wanted}, not {now}"
                break
    return out
