"""docs/config.md is generated from the schema (scripts/gen_config_docs.py) and current."""
from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import tomllib
import typing

from pipeline import config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "gen_config_docs.py")
PAGE = os.path.join(ROOT, "docs", "config.md")


def _gen(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)


def _schema(cls: type = config.Settings, prefix: str = "") -> tuple[dict, list[str]]:
    """({dotted key: (field, default)}, [dotted table]) walked straight from the dataclasses."""
    keys, tables = {}, []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.metadata.get("internal"):
            continue
        if dataclasses.is_dataclass(hints[f.name]):
            tables.append(prefix + f.name)
            k, t = _schema(hints[f.name], prefix + f.name + ".")
            keys.update(k)
            tables += t
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            keys[prefix + f.name] = (f, default)
    return keys, tables


def test_page_is_current():
    r = _gen("--check")
    assert r.returncode == 0, ("docs/config.md is stale; run python3 scripts/gen_config_docs.py "
                               "and commit it\n" + r.stderr)


def test_every_table_and_key_is_documented():
    with open(PAGE, encoding="utf-8") as fh:
        page = fh.read()
    keys, tables = _schema()
    assert len(keys) > 20
    for table in tables:
        assert re.search(rf"^## {re.escape(table)}$", page, re.MULTILINE), f"no section for [{table}]"
    rows = {m.group(1): m.group(0) for m in re.finditer(r"^\| `([a-z0-9_.]+)` \|.*$", page, re.MULTILINE)}
    assert set(rows) == set(keys)
    for key, (f, _) in keys.items():
        doc = " ".join(f.metadata["doc"].split()).replace("|", "\\|")
        assert doc in rows[key], f"{key}: its doc text is not on the page"
        for choice in f.metadata.get("choices") or ():
            assert f'`"{choice}"`' in rows[key], f"{key}: choice {choice!r} missing"
    assert "exit code 2" in page and "(expected" in page


def test_defaults_block_is_toml_with_the_schema_defaults():
    with open(PAGE, encoding="utf-8") as fh:
        page = fh.read()
    block = page.split("## All defaults", 1)[1].split("```toml\n", 1)[1].split("```", 1)[0]
    data = tomllib.loads(block)
    keys, _ = _schema()
    flat = {}

    def walk(d: dict, prefix: str) -> None:
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, prefix + k + ".")
            else:
                flat[prefix + k] = v
    walk(data, "")
    def plain(v):         # TOML has arrays, not tuples
        return [plain(x) for x in v] if isinstance(v, (list, tuple)) else v
    assert flat == {k: plain(default) for k, (_, default) in keys.items()}


def test_check_fails_on_a_stale_or_missing_page(tmp_path):
    stale = tmp_path / "config.md"
    with open(PAGE, encoding="utf-8") as fh:
        stale.write_text(fh.read().replace("| `node.name` |", "| `node.nam` |"))
    r = _gen("--check", "--output", str(stale))
    assert r.returncode == 1
    assert "is not current" in r.stderr and "gen_config_docs.py" in r.stderr
    assert "node.nam" in r.stderr                        # the difference is shown
    r = _gen("--check", "--output", str(tmp_path / "none.md"))
    assert r.returncode == 1 and "missing" in r.stderr
    r = _gen("--output", str(stale))
    assert r.returncode == 0 and _gen("--check", "--output", str(stale)).returncode == 0


def test_every_number_key_shows_its_limits():
    """docs/config.md gives each integer and number key its range (metadata min/max)."""
    with open(PAGE, encoding="utf-8") as fh:
        page = fh.read()
    rows = {m.group(1): m.group(0)
            for m in re.finditer(r"^\| `([a-z0-9_.]+)` \|.*$", page, re.MULTILINE)}
    keys, _ = _schema()
    # the field types are strings (the schema modules use postponed annotations)
    numeric = [k for k, (f, _) in keys.items() if f.type in ("int", "float", int, float)]
    assert len(numeric) > 20
    for key in numeric:
        cells = [c.strip() for c in rows[key].split(" | ")]
        assert cells[3] not in ("any", ""), f"{key}: no limits on the page: {rows[key]}"
