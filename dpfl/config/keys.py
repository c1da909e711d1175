"""Names and values of config keys: spelling (``key_of``), coercion of command-line strings,
type checks, closest-name suggestions, the ``[task-options]`` table, and the registry of the
recipes' own tables (``[asr]``...) with the flat names they replace."""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any


@dataclass(frozen=True)
class Table:
    """A recipe's own config table: ``[name]`` in TOML, ``name.KEY`` elsewhere.

    ``options`` is a frozen dataclass of the table's keys (defaults, a ``doc`` in each field's
    metadata, and an optional ``check()`` raising ValueError); ``aliases`` maps flat key names
    from before the table existed (``asr-size``) to the table's (``size``): documented aliases.
    """

    name: str
    options: type
    aliases: Mapping[str, str] = field(default_factory=dict)

    def build(self, given: Mapping[str, Any], base: Any = None) -> Any:
        """The options ``base`` (default: the defaults) updated with ``given``."""
        known = {key_of(f.name): f for f in fields(self.options)}
        values = {f.name: getattr(base, f.name) for f in fields(base)} if base else {}
        for key, value in given.items():
            f = known.get(key)
            if f is None:
                raise ValueError(
                    f"unknown config key {self.name}.{key}{suggestion(key, known)} (the "
                    f"[{self.name}] table has {', '.join(known)})"
                )
            values[f.name] = _coerce(f"{self.name}.{key}", f.type, value)
        options = self.options(**values)
        _check_types(options, f"{self.name}.")
        check = getattr(options, "check", None)
        if check is not None:
            check()
        return options


TABLES: dict[str, Table] = {}
"""The registered recipes' tables (filled by :mod:`dpfl.recipes` on import)."""
ALIASES: dict[str, str] = {}
"""Flat key names of before the tables -> ``table.key`` (documented aliases)."""


def register_table(table: Table) -> Table:
    TABLES[table.name] = table
    ALIASES.update({old: f"{table.name}.{new}" for old, new in table.aliases.items()})
    return table


def _check_types(obj: Any, prefix: str = "") -> None:
    """ValueError naming the first field of a dataclass whose value has the wrong type."""
    for f in fields(obj):
        value = getattr(obj, f.name)
        key = prefix + key_of(f.name)
        if f.type == "bool" and not isinstance(value, bool):
            raise ValueError(f"config key {key} = {value!r}: expected true or false")
        if f.type == "int" and (isinstance(value, bool) or not isinstance(value, int)):
            raise ValueError(f"config key {key} = {value!r}: expected an integer")
        if f.type == "float":
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"config key {key} = {value!r}: expected a number")
            if not math.isfinite(value):
                raise ValueError(f"config key {key} = {value!r}: expected a finite number")


OPTIONS = "task-options"
"""The table of keyword arguments for a task and data factory given by import path."""

_IMPORT_PATH = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*")


def _check_options(options: Any) -> None:
    if not isinstance(options, dict):
        raise ValueError(
            f"config table {OPTIONS}: expected a table of name = value, got {options!r}"
        )
    for name, value in options.items():
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(
                f"config key {OPTIONS}.{name}: option names are keyword-argument names"
            )
        if not isinstance(value, (str, int, float, bool)):
            raise ValueError(
                f"config key {OPTIONS}.{name} = {value!r}: expected a string, number or boolean "
                "(Flower's run config holds scalars only)"
            )


def not_one_of(value: Any, choices: Iterable[str]) -> str | None:
    """None when ``value`` is one of ``choices``; otherwise what a key accepts ("one of a, b",
    '' shown as ''), with the nearest spelling when one is close."""
    choices = tuple(choices)
    if value in choices:
        return None
    shown = ", ".join(repr(c) if c == "" else c for c in choices)
    return "one of " + shown + suggestion(value, choices)


def suggestion(word: str, choices: Iterable[str]) -> str:
    """'; did you mean X?' for the closest names to a mistyped one, or ''."""
    close = difflib.get_close_matches(str(word), list(choices), n=3, cutoff=0.6)
    if not close:
        return ""
    return "; did you mean " + _one_of([repr(c) for c in close]) + "?"


def _one_of(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def key_of(field_name: str) -> str:
    return field_name.replace("_", "-")


def _coerce(key: str, type_name: str, value: Any) -> Any:
    """Strings from the command line become the field's type; other values are checked later."""
    if not isinstance(value, str) or type_name == "str":
        if type_name == "float" and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        return value
    text = value.strip()
    try:
        if type_name == "int":
            return int(text.replace("_", "").replace(",", ""))
        if type_name == "float":
            return float(text)
        if type_name == "bool":
            lowered = text.lower()
            if lowered in ("true", "1", "yes", "on"):
                return True
            if lowered in ("false", "0", "no", "off"):
                return False
            raise ValueError
    except ValueError:
        accepted = {"int": "an integer", "float": "a number", "bool": "true or false"}[type_name]
        raise ValueError(f"config key {key} = {value!r}: expected {accepted}") from None
    return value


def merge_values(known: dict[str, Any], current: dict[str, Any], values: Mapping[str, Any]) -> dict:
    """RunConfig's fields (``current``: field name to value) updated with ``values`` (hyphenated
    keys, aliases, tables as mappings or ``TABLE.KEY``); ``known``: key to dataclass field."""
    options = dict(current.get("task_options", {}))
    raw: dict[str, dict[str, Any]] = {name: {} for name in TABLES}
    for key, value in values.items():
        key = ALIASES.get(key, key)
        if key in TABLES:
            if not isinstance(value, Mapping):
                raise ValueError(
                    f"config key {key} is a table ([{key}] in TOML), got {value!r}"
                )
            raw[key].update({str(k): v for k, v in value.items()})
            continue
        table, dot, sub = key.partition(".")
        if dot and table in TABLES:
            raw[table][sub] = value
            continue
        if key == OPTIONS:
            if not isinstance(value, Mapping):
                raise ValueError(
                    f"config key {OPTIONS} is a table ([{OPTIONS}] in TOML, "
                    f"{OPTIONS}.KEY = value elsewhere), got {value!r}"
                )
            options.update({str(k): v for k, v in value.items()})
            continue
        if key.startswith(OPTIONS + "."):
            name = key[len(OPTIONS) + 1 :]
            if not name:
                raise ValueError(f"config key {key!r}: expected {OPTIONS}.NAME")
            options[name] = value
            continue
        f = known.get(key)
        if f is None:
            raise ValueError(
                f"unknown config key {key!r}{suggestion(key, known)} "
                "(dpfl simulate --help lists every key)"
            )
        current[f.name] = _coerce(key, f.type, value)
    current["task_options"] = options
    tables = dict(current.get("tables", {}))
    for name, given in raw.items():
        if given or name not in tables:
            tables[name] = TABLES[name].build(given, tables.get(name))
    current["tables"] = tables
    return current
