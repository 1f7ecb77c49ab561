#!/usr/bin/env python3
"""Generate docs/config.md, the config reference, from the schema in pipeline/config.py.

    python3 scripts/gen_config_docs.py           # (re)write docs/config.md
    python3 scripts/gen_config_docs.py --check   # exit 1 if docs/config.md is not current
    python3 scripts/gen_config_docs.py --stdout  # print the page

Everything on the page comes from the code: the tables and keys with their types,
defaults and limits from the dataclasses' field metadata (pipeline/schema.py), the
rules between keys from the ``SettingError`` calls of the settings modules and the
``ConfigError`` calls of pipeline/config.py, and the example error messages from
running the loader on bad input. Edit the schema, then run this.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import fnmatch
import inspect
import os
import sys
import typing
from collections.abc import Iterator
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from pipeline import config
from pipeline.disk import settings as disk_settings
from pipeline.failover import settings as failover_settings
from pipeline.net import settings as net_settings

#: every module that holds sections of the config (their rules between keys are listed)
SETTINGS_MODULES = (config, failover_settings, disk_settings, net_settings)

DEFAULT_OUTPUT = os.path.join(ROOT, "docs", "config.md")
EXIT_STALE = 1
_SCALAR_NAMES = {int: "integer", float: "number", str: "string", bool: "boolean"}


# -- walking the schema ----------------------------------------------------------------
@dataclasses.dataclass
class Key:
    table: str          # dotted table name, "" for the top level
    name: str
    type: Any
    default: Any
    meta: typing.Mapping[str, Any]

    @property
    def dotted(self) -> str:
        return f"{self.table}.{self.name}" if self.table else self.name


@dataclasses.dataclass
class Table:
    name: str           # dotted
    doc: str
    keys: list[Key]


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return dataclasses.MISSING


def tables(cls: type = config.Settings, name: str = "", doc: str = "") -> Iterator[Table]:
    """Every table of the schema, parents before their sub-tables, in schema order."""
    hints = typing.get_type_hints(cls)
    keys, subtables = [], []
    for f in dataclasses.fields(cls):
        if f.metadata.get("internal"):
            continue
        typ = hints[f.name]
        if dataclasses.is_dataclass(typ):
            sub = f"{name}.{f.name}" if name else f.name
            subtables.append((typ, sub, f.metadata.get("doc", "")))
        else:
            keys.append(Key(name, f.name, typ, _default(f), f.metadata))
    if keys or name:
        yield Table(name, doc, keys)
    for typ, sub, sub_doc in subtables:
        yield from tables(typ, sub, sub_doc)


def all_keys() -> list[str]:
    """Every dotted key a config file may set."""
    return [k.dotted for t in tables() for k in t.keys]


# -- rendering ----------------------------------------------------------------------------
def type_name(typ: Any) -> str:
    if typ in _SCALAR_NAMES:
        return _SCALAR_NAMES[typ]
    origin, args = typing.get_origin(typ), typing.get_args(typ)
    if origin in (list, tuple) and args:
        return f"array of {type_name(args[0])}"
    if origin is dict and len(args) == 2:
        return f"table of {type_name(args[1])}"
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " or ".join(type_name(a) for a in args if a is not type(None))
    return getattr(typ, "__name__", str(typ))


def toml_value(value: Any) -> str:
    if value is dataclasses.MISSING:
        return "(required)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + "}"
    return str(value)


def _number(value: Any) -> str:
    return repr(value) if isinstance(value, float) else str(value)


def allowed(key: Key, rule_keys: tuple[str, ...] = ()) -> str:
    m = key.meta
    parts = []
    if m.get("choices"):
        parts.append("one of " + ", ".join(f"`{toml_value(c)}`" for c in m["choices"]))
    lo, hi = m.get("min"), m.get("max")
    if lo is not None and hi is not None:
        parts.append(f"{_number(lo)} to {_number(hi)}")
    elif lo is not None:
        parts.append(f"≥ {_number(lo)}")
    elif hi is not None:
        parts.append(f"≤ {_number(hi)}")
    if m.get("pattern"):
        parts.append(m.get("pattern_doc") or f"matching `{m['pattern']}`")
    if m.get("rule"):
        parts.append(m["rule"])
    if any(fnmatch.fnmatchcase(key.dotted, pattern) for pattern in rule_keys):
        parts.append("see the [rules between keys](#rules-between-keys)")
    return "; ".join(parts) or ("true or false" if key.type is bool else "any")


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _code(text: str) -> str:
    return "`" + text.replace("|", "\\|") + "`"


def cross_key_rules() -> list[tuple[str, str]]:
    """The messages of the checks beyond one key's type and limits: every
    ``SettingError("<literal key>", problem, expected)`` of the settings modules and every
    ``ConfigError(path, "<literal key>", problem, expected)`` of pipeline/config.py, with
    the parts of the problem that depend on the values shown as ``…``."""
    rules: list[tuple[str, str]] = []

    def text(node: ast.AST) -> str | None:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return node.value
        if isinstance(node, ast.JoinedStr):
            return "".join(v.value if isinstance(v, ast.Constant) else "…" for v in node.values)
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
            left, right = text(node.left), text(node.right)
            return (left or "…") + (right or "…")
        return None

    calls = []
    for module in SETTINGS_MODULES:
        for node in ast.walk(ast.parse(inspect.getsource(module))):
            name = getattr(getattr(node, "func", None), "id", None)
            if isinstance(node, ast.Call) and name == "ConfigError" and len(node.args) >= 3:
                calls.append(node.args[1:])
            elif isinstance(node, ast.Call) and name == "SettingError" and len(node.args) >= 2:
                calls.append(node.args)
    for args in calls:
        key = args[0]
        if isinstance(key, ast.JoinedStr):     # f"security.{key}": any key of the table
            key_text = "".join(v.value if isinstance(v, ast.Constant) else "*"
                               for v in key.values)
        elif isinstance(key, ast.Constant) and isinstance(key.value, str):
            key_text = key.value
        else:
            continue      # the loader's per-key errors (a variable key): shown above
        if not key_text:
            continue      # errors about the whole file
        problem = text(args[1]) or "…"
        expected = text(args[2]) if len(args) > 2 else None
        line = f"`{key_text}`: {problem}" + (f" (expected {expected})" if expected else "")
        if (key_text, line) not in rules:
            rules.append((key_text, line))
    return rules


EXAMPLE_FILE = "/etc/colo-pipeline/primary.toml"


def _error(data: dict, path: str = EXAMPLE_FILE) -> str:
    try:
        config.from_dict(data, path)
    except config.ConfigError as exc:
        return str(exc)
    raise AssertionError(f"{data!r} was accepted; the generator needs an invalid example")


def example_errors() -> list[str]:
    """Real messages of the loader, one per kind of per-key error, for keys of the schema."""
    keys = [k for t in tables() for k in t.keys]

    def nest(dotted: str, value: Any) -> dict:
        out: dict = value
        for part in reversed(dotted.split(".")):
            out = {part: out}
        return out

    examples = []
    first_table = next(t.name for t in tables() if t.name)
    examples.append(_error({first_table: {"no_such_key": 1}}))
    typed = next((k for k in keys if k.type is int), None)
    if typed:
        examples.append(_error(nest(typed.dotted, "ten")))
    chosen = next((k for k in keys if k.meta.get("choices")), None)
    if chosen:
        examples.append(_error(nest(chosen.dotted, "none-of-these")))
    bounded = next((k for k in keys if k.meta.get("min") is not None and k.type is int), None)
    if bounded:
        examples.append(_error(nest(bounded.dotted, int(bounded.meta["min"]) - 1)))
    examples.append(_error({first_table: 5}))
    try:
        config.load("/etc/colo-pipeline/no-such-node.toml")
    except config.ConfigError as exc:
        examples.append(str(exc))
    return examples


def default_toml() -> str:
    out = []
    for t in tables():
        if not t.keys:
            continue
        if t.name:
            out += ["", f"[{t.name}]"]
        out += [f"{k.name} = {toml_value(k.default)}" for k in t.keys
                if k.default is not dataclasses.MISSING]
    return "\n".join(out).strip("\n")


def render() -> str:
    ts = list(tables())
    rules = cross_key_rules()
    # a rule whose key is computed ("net.*") is listed, not pointed to from every key
    rule_keys = tuple(dict.fromkeys(key for key, _ in rules if not key.endswith(".*")))
    lines = [
        "# Configuration reference",
        "",
        "<!-- Generated by scripts/gen_config_docs.py from pipeline/config.py; do not edit.",
        "     After changing the schema run: python3 scripts/gen_config_docs.py -->",
        "",
        "Each node (`colo-pipeline primary`, `colo-pipeline secondary`) reads one TOML file,",
        "given with `--config FILE`. The files in `config/` are worked examples: a primary",
        "and a secondary host, and a one-machine demo pair. A key left out takes the",
        "default shown (a few keys are needed in some setups: see the rules between keys);",
        "keys and tables the schema does not know are errors, so a typo cannot silently",
        "leave a default in place.",
        "",
        "Validate a file without starting anything (exit code 0 when it is good):",
        "",
        "```sh",
        f"colo-pipeline check-config {EXAMPLE_FILE}",
        "```",
        "",
        "## Errors",
        "",
        "A config that cannot be used stops `check-config`, `primary` and `secondary`",
        "before anything is started (no process, no shared memory, no socket), with",
        "**exit code 2** and one line on standard error:",
        "",
        "```",
        "colo-pipeline: FILE:KEY: PROBLEM (expected WHAT)",
        "```",
        "",
        "`KEY` is the dotted key (`checkpoint.min_interval_ms`); errors about the whole file",
        "(missing, unreadable, not TOML, not UTF-8) have no key. For example:",
        "",
        "```",
        *[f"colo-pipeline: {e}" for e in example_errors()],
        "```",
        "",
        "### Rules between keys",
        "",
        "Besides the type and range of each key below, these checks involve several keys",
        "or the form of a value; their messages (`…` stands for the values found):",
        "",
        *[f"- {line}" for _, line in rules],
        "",
        "## Tables",
        "",
        *[f"- [`[{t.name}]`](#{t.name.replace('.', '')}) — {t.doc}" for t in ts if t.name],
        "",
    ]
    for t in ts:
        lines += [f"## {t.name}" if t.name else "## Top level", ""]
        if t.doc:
            lines += [t.doc, ""]
        if not t.keys:
            lines += ["This table holds only sub-tables.", ""]
            continue
        lines += ["| key | type | default | allowed | description |",
                  "|---|---|---|---|---|"]
        for k in t.keys:
            lines.append(f"| {_code(k.dotted)} | {type_name(k.type)} | "
                         f"{_code(toml_value(k.default))} | {_cell(allowed(k, rule_keys))} | "
                         f"{_cell(k.meta.get('doc', ''))} |")
        lines.append("")
    lines += ["## All defaults", "",
              "The value of every key that a file leaves out:", "",
              "```toml", default_toml(), "```", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true",
                   help="exit 1 if the page differs from what the schema gives; write nothing")
    p.add_argument("--stdout", action="store_true", help="print the page instead of writing it")
    p.add_argument("--output", default=DEFAULT_OUTPUT, help="default: docs/config.md")
    args = p.parse_args(argv)
    page = render()
    if args.stdout:
        sys.stdout.write(page)
        return 0
    rel = os.path.relpath(args.output)
    if args.check:
        try:
            with open(args.output, encoding="utf-8") as fh:
                current = fh.read()
        except FileNotFoundError:
            print(f"{rel} is missing; generate it with: python3 scripts/gen_config_docs.py",
                  file=sys.stderr)
            return EXIT_STALE
        if current == page:
            print(f"{rel} is current")
            return 0
        diff = list(difflib.unified_diff(current.splitlines(), page.splitlines(),
                                         f"{rel} (checked in)", f"{rel} (from the schema)",
                                         lineterm="", n=1))
        print(f"{rel} is not current with pipeline/config.py; regenerate it with:\n"
              f"    python3 scripts/gen_config_docs.py\nand commit it. Difference:", file=sys.stderr)
        print("\n".join(diff[:60] + (["..."] if len(diff) > 60 else [])), file=sys.stderr)
        return EXIT_STALE
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as fh:
        fh.write(page)
    print(f"wrote {rel}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
