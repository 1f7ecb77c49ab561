"""`colo-pipeline xen-twin`: pairing Xen domains from the node configs. The real toolstack runs
in the Xen lab (scripts/xen-lab, opt-in); here a stand-in ``xl`` (a MOCK of Xen's toolstack,
named as such: there is no Xen host in CI) records the calls and keeps a table of domains."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from conftest import cli

FAKE_XL = r'''#!/bin/sh
# MOCK xl: domains are files in $XL_STATE/domains; each call is logged
echo "$*" >> "$XL_STATE/calls"
case "$1" in
  domid) [ -f "$XL_STATE/domains/$2" ] && cat "$XL_STATE/domains/$2" && exit 0
         echo "Can't get domid of domain name '$2', maybe this domain does not exist." >&2; exit 1 ;;
  save)  [ -n "$XL_FAIL_SAVE" ] && { echo "guest didn't acknowledge suspend" >&2; exit 1; }
         rm "$XL_STATE/domains/$2"; echo image-of-$2 > "$3" ;;
  restore) name=$(sed -n 's/^name *= *"\(.*\)"/\1/p' "$2"); n=$(ls "$XL_STATE/domains" | wc -l)
         echo $((n + 7)) > "$XL_STATE/domains/$name" ;;
esac
'''


@pytest.fixture()
def xl_host(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    (tmp_path / "domains").mkdir()
    bin_dir.mkdir()
    (bin_dir / "xl").write_text(FAKE_XL)
    (bin_dir / "xl").chmod(0o755)
    (tmp_path / "prim.cfg").write_text('name = "prim"\n')
    (tmp_path / "sec.cfg").write_text('name = "sec"\n')
    return tmp_path


def _config(tmp_path: Path, role: str, domain: str, cfg: str) -> Path:
    path = tmp_path / f"{role}.toml"
    path.write_text(f'[node]\nname = "t-{role}"\nrole = "{role}"\n[guest]\nbackend = "xen"\n'
                    f'domain = "{domain}"\nxen_image = "images/guest.img"\nxen_domain_config = "{cfg}"\n'
                    '[security]\nmode = "plaintext"\n')
    return path


def _run(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    environ = {**os.environ, "PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin", "XL_STATE": str(tmp_path), **env}
    return cli("--log-level", "error", "xen-twin", *args, env=environ, timeout=60)


def test_save_then_restore_makes_both_domains_from_one_image(xl_host):
    (xl_host / "domains" / "prim").write_text("3")
    prim = _config(xl_host, "primary", "prim", "prim.cfg")
    sec = _config(xl_host, "secondary", "sec", "sec.cfg")
    r = _run(xl_host, "save", "--config", str(prim))
    assert r.returncode == 0, r.stderr
    image = xl_host / "images" / "guest.img"           # relative to the config file
    assert image.read_text() == "image-of-prim\n"
    r = _run(xl_host, "restore", "--config", str(sec))
    assert r.returncode == 0, r.stderr
    assert "restored" in r.stdout and "as sec" in r.stdout
    calls = (xl_host / "calls").read_text().splitlines()
    assert [c for c in calls if not c.startswith("domid")] == [
        f"save prim {image}", f"restore {xl_host / 'prim.cfg'} {image}",
        f"restore {xl_host / 'sec.cfg'} {image}"]
    assert sorted(os.listdir(xl_host / "domains")) == ["prim", "sec"]


def test_restore_refuses_to_clobber_and_checks_the_name(xl_host):
    (xl_host / "images").mkdir()
    (xl_host / "images" / "guest.img").write_text("img")
    (xl_host / "domains" / "sec").write_text("5")
    sec = _config(xl_host, "secondary", "sec", "sec.cfg")
    r = _run(xl_host, "restore", "--config", str(sec))
    assert r.returncode == 1 and "a domain named 'sec' already exists" in r.stderr
    (xl_host / "domains" / "sec").unlink()
    wrong = _config(xl_host, "secondary", "sec", "prim.cfg")     # its xl config names another domain
    r = _run(xl_host, "restore", "--config", str(wrong))
    assert r.returncode == 1 and "made no domain named 'sec'" in r.stderr and 'name = "sec"' in r.stderr


def test_a_failing_save_names_the_command_and_what_xl_said(xl_host):
    (xl_host / "domains" / "prim").write_text("3")
    r = _run(xl_host, "save", "--config", str(_config(xl_host, "primary", "prim", "prim.cfg")), XL_FAIL_SAVE="1")
    assert r.returncode == 1
    assert "xl save prim" in r.stderr and "didn't acknowledge suspend" in r.stderr
    assert (xl_host / "domains" / "prim").exists(), "a failed save leaves the domain running"


def test_bad_configs_and_a_host_without_xl(xl_host, tmp_path):
    sim = tmp_path / "sim.toml"
    sim.write_text('[node]\nname = "s"\nrole = "primary"\n[security]\nmode = "plaintext"\n')
    r = _run(xl_host, "save", "--config", str(sim))
    assert r.returncode == 2 and "guest.backend: is 'sim'" in r.stderr
    no_image = tmp_path / "noimg.toml"
    no_image.write_text('[node]\nname = "s"\nrole = "primary"\n[guest]\nbackend = "xen"\ndomain = "prim"\n'
                        '[security]\nmode = "plaintext"\n')
    r = _run(xl_host, "save", "--config", str(no_image))
    assert r.returncode == 2 and "guest.xen_image: missing for xen-twin" in r.stderr
    (xl_host / "bin" / "xl").unlink()
    (xl_host / "images").mkdir()
    (xl_host / "images" / "guest.img").write_text("img")
    r = cli("xen-twin", "restore", "--config", str(_config(xl_host, "secondary", "sec", "sec.cfg")),
            env={**os.environ, "PATH": str(xl_host / "bin")}, timeout=60)
    if Path("/usr/sbin/xl").exists() or Path("/usr/lib/xen-4.17/bin/xl").exists():
        pytest.skip("this host has a real xl")
    assert r.returncode == 1 and "xl not found: this host has no Xen toolstack" in r.stderr
