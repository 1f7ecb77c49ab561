"""How every settings section is written and checked: one style for the whole config.

A section is a frozen dataclass (``pipeline/config.py``, ``pipeline/failover/settings.py``,
``pipeline/net/settings.py``, ``pipeline/disk/settings.py``). Each field is made with
:func:`setting`, which puts its documentation and its limits in the field's metadata
(``min``, ``max``, ``choices``, ``pattern``, and ``rule``: a limit no metadata can say,
in words). The section names its dotted place in the config file in ``SECTION`` and its
``__post_init__`` calls :func:`check` first: the one place where every field's type
and limits are checked. Rules between keys follow in the section's ``__post_init__``
and raise :class:`SettingError` with a literal dotted key.

Every error is a :class:`SettingError`: ``section.key: problem (expected ...)``, with
the key, the problem and the expectation kept as attributes, so the config loader adds
the file name without reading its own text back. ``docs/config.md`` is generated from
the same metadata (``scripts/gen_config_docs.py``).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re
import typing
from typing import Any, ClassVar

TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
              tuple[str, ...]: "a list of strings"}


class SettingError(ValueError):
    """A value a section cannot take. ``str()`` is ``key: problem (expected ...)``."""

    def __init__(self, key: str, problem: str, expected: str = "") -> None:
        self.key, self.problem, self.expected = key, problem, expected
        super().__init__(f"{key}: {problem}" + (f" (expected {expected})" if expected else ""))


class Section:
    """The base of every section: ``SECTION`` is its dotted place in the config file, and
    construction checks every field (subclasses with rules between keys call
    ``super().__post_init__()`` first)."""

    SECTION: ClassVar[str] = ""

    def __post_init__(self) -> None:
        check(self)


def setting(default: Any, doc: str, *, choices: tuple = (), min: float | None = None,
            max: float | None = None, pattern: str = "", pattern_doc: str = "",
            rule: str = "") -> Any:
    """A field of a section: its default, its documentation and its limits."""
    meta = {"doc": doc, "choices": choices, "min": min, "max": max, "pattern": pattern,
            "pattern_doc": pattern_doc, "rule": rule}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def section(cls: type, doc: str) -> Any:
    """A field that holds a sub-table."""
    return dataclasses.field(default_factory=cls, metadata={"doc": doc})


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def check(obj: Any) -> None:
    """Check every field of section ``obj`` against its type and the limits in its metadata;
    a list where a tuple of strings is wanted becomes the tuple, an integer where a number
    is wanted becomes a float. Raises SettingError naming ``SECTION.field``."""
    cls = type(obj)
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        typ = hints[f.name]
        if f.metadata.get("internal") or dataclasses.is_dataclass(typ):
            continue
        key, value, meta = f"{cls.SECTION}.{f.name}", getattr(obj, f.name), f.metadata
        expected = TYPE_NAMES.get(typ, str(typ))
        if typ is float and type(value) is int:
            value = float(value)
            object.__setattr__(obj, f.name, value)
        if typ == tuple[str, ...]:
            if isinstance(value, list):
                value = tuple(value)
                object.__setattr__(obj, f.name, value)
            if not isinstance(value, tuple) or not all(isinstance(v, str) for v in value):
                raise SettingError(key, f"{value!r} is not a list of strings", expected)
            continue
        if type(value) is not typ:
            raise SettingError(key, f"{value!r} is {type(value).__name__}", expected)
        if typ is float and not math.isfinite(value):
            raise SettingError(key, f"{value!r} is not a finite number", expected)
        pattern = meta.get("pattern")
        if pattern and not re.fullmatch(pattern, value):
            raise SettingError(key, f"{value!r} is not allowed", meta["pattern_doc"])
        if meta.get("choices") and value not in meta["choices"]:
            raise SettingError(key, f"{value!r} is not allowed",
                               "one of " + ", ".join(repr(c) for c in meta["choices"]))
        lo, hi = meta.get("min"), meta.get("max")
        if lo is not None and value < lo:
            raise SettingError(key, f"{value} is too small", f"{expected} >= {lo}")
        if hi is not None and value > hi:
            raise SettingError(key, f"{value} is too large", f"{expected} <= {hi}")
