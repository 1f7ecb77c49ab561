"""Node configuration (pipeline/config.py) and ``colo-pipeline check-config``: defaults, the
example configs in config/, and every class of error with exit code 2 and a message
``FILE:KEY: problem (expected …)`` that names the file and the dotted key."""
from __future__ import annotations

import dataclasses
import glob
import os
import re

import pytest
from conftest import cli

from pipeline import config, sockets
from pipeline.cli import main as cli_main
from pipeline.config import ConfigError, Settings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(REPO, "config")
EXAMPLES = sorted(glob.glob(os.path.join(CONFIG_DIR, "*.toml")))
EXIT_USAGE = 2
PLAIN = {"security": {"mode": "plaintext"}}   # tests that are not about keys


@pytest.fixture(scope="module")
def examples(tmp_path_factory) -> str:
    """The example configs copied next to freshly made keys (CURVE configs name key files
    relative to themselves; secret keys are never committed)."""
    from pipeline.sockets import write_keypair
    d = str(tmp_path_factory.mktemp("examples"))
    for path in EXAMPLES:
        with open(path) as src, open(os.path.join(d, os.path.basename(path)), "w") as dst:
            dst.write(src.read())
    for name in ("primary", "secondary"):
        write_keypair(os.path.join(d, "keys"), name)
    return d


def write(tmp_path, text: str, name: str = "bad.toml") -> str:
    path = os.path.join(str(tmp_path), name)
    with open(path, "w") as fh:
        fh.write(text)
    return path


def assert_keyed_error(stderr: str, path: str, key: str, expected: str | None = None) -> None:
    """stderr holds ``FILE:KEY: problem (expected …)`` for this file and dotted key."""
    m = re.search(re.escape(f"{path}:{key}: ") + r"(.+) \(expected (.+)\)\s*$", stderr)
    assert m, f"no '{path}:{key}: ... (expected ...)' in stderr:\n{stderr}"
    if expected is not None:
        assert expected in m.group(2), f"{expected!r} not in the expectation {m.group(2)!r}"
    assert "Traceback" not in stderr


# -- defaults ------------------------------------------------------------------------
def test_defaults():
    s = config.from_dict(PLAIN)
    assert s == dataclasses.replace(Settings(), source="<dict>",
                                    security=config.SecuritySettings(mode="plaintext"))
    assert s.node.role == "primary" and s.node.name == "colo"
    assert s.guest.backend == "sim" and s.guest.page_count == 16384
    assert s.peer.address == "tcp://127.0.0.1:7400"
    assert s.run_dir == "/tmp/colo-pipeline/colo"
    assert sockets.peer_endpoints(s) == {"pages": "tcp://127.0.0.1:7400",
                                         "control": "tcp://127.0.0.1:7401",
                                         "inputs": "tcp://127.0.0.1:7402",
                                         "heartbeat": "tcp://127.0.0.1:7403"}
    w = s.guest.workload
    assert abs(w.mix_zero + w.mix_text + w.mix_random - 1.0) < 1e-9
    # the timer by net.release (max_interval_ms = 0): COLO's outputs decide, buffering's
    # replies wait for it
    assert s.checkpoint.max_interval_ms == 0 and s.net.release == "compare"
    assert s.checkpoint.timer_ms("compare") == config.COMPARE_TIMER_MS == 10_000
    assert s.checkpoint.timer_ms("commit") == config.COMMIT_TIMER_MS == 25
    assert s.checkpoint.min_interval_ms <= s.checkpoint.timer_ms("commit")
    # the sim guest's input log: 16384 inputs of 2 KiB (32 MiB) on each node
    assert s.guest.input_log_slots == 16384
    # 16 MiB of pages per ring in slots of 1024 pages, at least 4 slots
    assert s.pipeline.batch_pages == 1024
    assert s.ring_slots() == 4 and s.ring_slots(page_count=1024) == 4


def test_defaults_satisfy_their_own_constraints():
    def walk(obj, prefix=""):
        for f in dataclasses.fields(obj):
            if f.metadata.get("internal"):
                continue
            v = getattr(obj, f.name)
            if dataclasses.is_dataclass(v):
                yield from walk(v, prefix + f.name + ".")
                continue
            yield prefix + f.name, v, f.metadata

    seen = 0
    for key, value, meta in walk(Settings()):
        seen += 1
        assert meta.get("doc"), f"{key} has no doc"
        if meta.get("choices"):
            assert value in meta["choices"], key
        if meta.get("min") is not None:
            assert value >= meta["min"], key
        if meta.get("max") is not None:
            assert value <= meta["max"], key
    assert seen >= 20


def test_empty_file_asks_for_keys(tmp_path):
    """The default is CURVE: a config that names no keys is refused, naming the key."""
    path = write(tmp_path, "# nothing\n", "empty.toml")
    with pytest.raises(ConfigError) as exc_info:
        config.load(path)
    assert exc_info.value.key == "security.key_file"
    assert "keygen" in str(exc_info.value) and "plaintext" in str(exc_info.value)


def test_plaintext_file_loads_defaults(tmp_path):
    path = write(tmp_path, "[security]\nmode = 'plaintext'\n", "plain.toml")
    s = config.load(path)
    assert s.source == path
    assert dataclasses.replace(s, source="<defaults>") == dataclasses.replace(
        Settings(), security=config.SecuritySettings(mode="plaintext"))


def test_int_is_accepted_for_a_float_key():
    s = config.from_dict({"guest": {"workload": {"mix_zero": 1, "mix_text": 0, "mix_random": 0,
                                                 "input_rate_hz": 50}}, **PLAIN})
    w = s.guest.workload
    assert (w.mix_zero, w.mix_text, w.input_rate_hz) == (1.0, 0.0, 50.0)
    assert type(w.mix_zero) is float and type(w.input_rate_hz) is float


def test_explicit_ring_slots_and_run_dir():
    s = config.from_dict({"node": {"name": "n1", "run_dir": "/tmp/x"},
                          "pipeline": {"ring_slots": 7}, **PLAIN})
    assert s.ring_slots() == 7 and s.run_dir == "/tmp/x"


# -- the example configs -------------------------------------------------------------
def test_examples_exist():
    names = {os.path.basename(p) for p in EXAMPLES}
    assert {"primary.toml", "secondary.toml", "demo-primary.toml",
            "demo-secondary.toml"} <= names


@pytest.mark.parametrize("name", [os.path.basename(p) for p in EXAMPLES])
def test_example_loads_and_passes_check_config(examples, name):
    path = os.path.join(examples, name)
    s = config.load(path)
    expected_role = "secondary" if "secondary" in os.path.basename(path) else "primary"
    assert s.node.role == expected_role
    r = cli("check-config", path)
    assert r.returncode == 0, r.stderr
    assert f"{path}: ok ({expected_role} {s.node.name!r}" in r.stdout
    assert r.stderr == ""


@pytest.mark.parametrize("prefix", ["", "demo-"])
def test_example_pairs_match(examples, prefix):
    """The two halves of a pair run the same guest and talk over the same port."""
    p = config.load(os.path.join(examples, f"{prefix}primary.toml"))
    s = config.load(os.path.join(examples, f"{prefix}secondary.toml"))
    assert (p.node.role, s.node.role) == ("primary", "secondary")
    assert p.node.name != s.node.name       # both may run on one machine (shm names)
    assert p.guest == s.guest
    assert p.pipeline.batch_pages == s.pipeline.batch_pages
    assert p.peer.address.rsplit(":", 1)[1] == s.peer.address.rsplit(":", 1)[1]
    if prefix == "demo-":
        assert p.peer.address == s.peer.address == "tcp://127.0.0.1:7400"
        assert p.guest.backend == "sim" and p.guest.page_count <= 8192
        assert p.run_dir != s.run_dir


# -- errors, through the command line (exit code 2, FILE:KEY: problem (expected …)) ------
KEYED_ERRORS = [
    # id, file text, dotted key, part of the expectation
    ("unknown-top-level", "colour = 1\n", "colour", "one of checkpoint, disk, failover, guest, heartbeat, metrics, net, node"),
    ("unknown-nested", "[node]\nnmae = 'x'\n", "node.nmae", "one of cpu_latency_us, listen, name, role, run_dir"),
    ("auto-without-listen", "[node]\nrole = 'auto'\n[failover]\nwitness = 'local'\n"
     "witness_key = '/colo/vm/active'\n", "node.listen", "this host's own address"),
    ("auto-listen-is-peer", "[node]\nrole = 'auto'\nlisten = 'tcp://10.0.0.1:7400'\n"
     "[peer]\naddress = 'tcp://10.0.0.1:7400'\n", "node.listen", "own address"),
    ("auto-without-witness", "[node]\nrole = 'auto'\nlisten = 'tcp://10.0.0.1:7400'\n",
     "failover.witness", "'etcd'"),
    ("auto-without-witness-key", "[node]\nrole = 'auto'\nlisten = 'tcp://10.0.0.1:7400'\n"
     "[failover]\nwitness = 'etcd'\n", "failover.witness_key", "the same on both hosts"),
    ("listen-bad", "[node]\nlisten = '10.0.0.1'\n", "node.listen", "tcp://HOST:PORT"),
    ("unknown-nested-2", "[guest.workload]\nmix_blue = 0.1\n", "guest.workload.mix_blue",
     "mix_random"),
    ("unknown-internal-field", "source = 'x'\n", "source", "one of"),
    ("wrong-type-str", "[guest]\npage_count = 'big'\n", "guest.page_count", "an integer"),
    ("wrong-type-bool", "[guest]\npage_count = true\n", "guest.page_count", "an integer"),
    ("wrong-type-float-for-int", "[pipeline]\nbatch_pages = 64.0\n", "pipeline.batch_pages",
     "an integer"),
    ("wrong-type-bool-for-float", "[guest.workload]\nnondeterminism = false\n",
     "guest.workload.nondeterminism", "a number"),
    ("wrong-type-int-for-str", "[node]\nname = 5\n", "node.name", "a string"),
    ("wrong-type-array", "[peer]\naddress = ['tcp://a:1']\n", "peer.address", "a string"),
    ("section-not-table", "guest = 5\n", "guest", "a table"),
    ("nested-section-not-table", "[guest]\nworkload = 'x'\n", "guest.workload", "a table"),
    ("below-min", "[checkpoint]\nepoch_timeout_ms = 0\n", "checkpoint.epoch_timeout_ms",
     "an integer >= 100"),
    ("input-log-too-small", "[guest]\ninput_log_slots = 8\n", "guest.input_log_slots",
     "an integer >= 16"),
    ("input-log-too-large", "[guest]\ninput_log_slots = 1048576\n", "guest.input_log_slots",
     "an integer <= 131072"),
    ("below-min-float", "[guest.workload]\ninput_rate_hz = -1.0\n",
     "guest.workload.input_rate_hz", "a number >= 0"),
    ("above-max", "[pipeline]\nbatch_pages = 1025\n", "pipeline.batch_pages",
     "an integer <= 1024"),
    ("above-max-float", "[guest.workload]\nnondeterminism = 1.5\n",
     "guest.workload.nondeterminism", "a number <= 1"),
    ("not-a-choice", "[guest]\nbackend = 'kvm'\n", "guest.backend", "one of 'sim', 'xen'"),
    ("not-a-choice-case", "[node]\nrole = 'Primary'\n", "node.role",
     "one of 'primary', 'secondary'"),
    ("mix-not-1", "[guest.workload]\nmix_zero = 0.5\n", "guest.workload.mix_*", "1.0"),
    ("mix-all-zero", "[guest.workload]\nmix_zero = 0\nmix_text = 0\nmix_random = 0\n",
     "guest.workload.mix_*", "1.0"),
    ("min-above-max", "[checkpoint]\nmin_interval_ms = 500\nmax_interval_ms = 100\n",
     "checkpoint.min_interval_ms", "min_interval_ms <= max_interval_ms"),
    ("address-scheme", "[peer]\naddress = 'udp://10.0.0.2:7400'\n", "peer.address",
     "tcp://HOST:PORT"),
    ("address-no-port", "[peer]\naddress = 'tcp://10.0.0.2'\n", "peer.address",
     "tcp://HOST:PORT"),
    ("address-port-not-numeric", "[peer]\naddress = 'tcp://host:http'\n", "peer.address",
     "tcp://HOST:PORT"),
    ("address-port-0", "[peer]\naddress = 'tcp://host:0'\n", "peer.address", "1 to 65532"),
    ("address-port-too-high", "[peer]\naddress = 'tcp://host:65534'\n", "peer.address",
     "1 to 65532"),
    ("xen-without-domain", "[guest]\nbackend = 'xen'\n", "guest.domain", "domain"),
]


# One case of each error class also runs as a real `colo-pipeline check-config` process; the
# rest call the same entry point (pipeline.cli.main) in this process, to keep the file fast.
SUBPROCESS_CASES = {"unknown-top-level", "unknown-nested", "wrong-type-str", "below-min",
                    "above-max", "not-a-choice", "mix-not-1", "min-above-max", "address-scheme",
                    "xen-without-domain"}


def check_config_in_process(path: str, capsys) -> tuple[int, str, str]:
    code = cli_main(["check-config", path])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("text,key,expected", [c[1:] for c in KEYED_ERRORS],
                         ids=[c[0] for c in KEYED_ERRORS])
def test_check_config_error(tmp_path, capsys, text, key, expected):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as exc_info:
        config.load(path)
    assert (exc_info.value.path, exc_info.value.key) == (path, key)
    code, out, err = check_config_in_process(path, capsys)
    assert code == EXIT_USAGE, (code, err)
    assert out == ""
    assert_keyed_error(err, path, key, expected)


@pytest.mark.parametrize("text,key,expected",
                         [c[1:] for c in KEYED_ERRORS if c[0] in SUBPROCESS_CASES],
                         ids=[c[0] for c in KEYED_ERRORS if c[0] in SUBPROCESS_CASES])
def test_check_config_error_subprocess(tmp_path, text, key, expected):
    path = write(tmp_path, text)
    r = cli("check-config", path)
    assert r.returncode == EXIT_USAGE, (r.returncode, r.stderr)
    assert r.stdout == ""
    assert_keyed_error(r.stderr, path, key, expected)


def test_check_config_missing_file(tmp_path):
    path = os.path.join(str(tmp_path), "nope.toml")
    r = cli("check-config", path)
    assert r.returncode == EXIT_USAGE
    assert f"{path}: no such file" in r.stderr and "Traceback" not in r.stderr


def test_check_config_directory(tmp_path, capsys):
    code, _, err = check_config_in_process(str(tmp_path), capsys)
    assert code == EXIT_USAGE
    assert f"{tmp_path}: cannot read" in err


@pytest.mark.parametrize("text", ["[node\nname = 'x'\n", "name = \n",
                                  "[node]\nname = 'a'\nname = 'b'\n"],
                         ids=["bracket", "no-value", "duplicate"])
def test_check_config_invalid_toml(tmp_path, capsys, text):
    path = write(tmp_path, text)
    code, _, err = check_config_in_process(path, capsys)
    assert code == EXIT_USAGE
    assert f"{path}: not valid TOML" in err


def test_check_config_invalid_toml_subprocess(tmp_path):
    path = write(tmp_path, "[node\nname = 'x'\n")
    r = cli("check-config", path)
    assert r.returncode == EXIT_USAGE
    assert f"{path}: not valid TOML" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("command,example", [("primary", "demo-secondary.toml"),
                                             ("secondary", "demo-primary.toml"),
                                             ("primary", "secondary.toml")])
def test_node_command_refuses_the_other_roles_config(examples, command, example):
    path = os.path.join(examples, example)
    r = cli(command, "--config", path, timeout=60)
    assert r.returncode == EXIT_USAGE, (r.returncode, r.stderr)
    assert_keyed_error(r.stderr, path, "node.role", repr(command))


def _shm_entries(name: str) -> list[str]:
    try:
        return sorted(n for n in os.listdir("/dev/shm") if n.startswith(f"colo-{name}-"))
    except FileNotFoundError:
        return []


@pytest.mark.parametrize("node_extra,rest,key", [
    ("", "[guest]\npage_count = 64\nbogus = 1\n", "guest.bogus"),
    ("role = 'secondary'\n", "[guest]\npage_count = 64\n", "node.role"),
    ("", "[guest]\npage_count = 64\n[checkpoint]\nmin_interval_ms = 9\nmax_interval_ms = 1\n",
     "checkpoint.min_interval_ms"),
], ids=["unknown-key", "wrong-role", "cross-key"])
def test_bad_config_starts_nothing(tmp_path, request, node_extra, rest, key):
    """`colo-pipeline primary` with a bad config exits 2 at once and leaves nothing behind."""
    name = f"cfgtest{os.getpid()}-{request.node.callspec.id}"
    run_dir = os.path.join(str(tmp_path), "run")
    path = write(tmp_path, f"[node]\nname = '{name}'\nrun_dir = '{run_dir}'\n{node_extra}"
                 "[peer]\naddress = 'tcp://127.0.0.1:47391'\nconnect_timeout_ms = 100\n"
                 "[security]\nmode = 'plaintext'\n" + rest)
    r = cli("primary", "--config", path, timeout=60)
    assert r.returncode == EXIT_USAGE, (r.returncode, r.stderr)
    assert_keyed_error(r.stderr, path, key)
    assert _shm_entries(name) == []
    assert not os.path.exists(run_dir)
    assert not os.path.exists(os.path.join("/tmp/colo-pipeline", name))


# -- bugs: configs that check-config accepts but a node cannot use ------------------------
def test_check_config_not_utf8(tmp_path, capsys):
    path = os.path.join(str(tmp_path), "latin1.toml")
    with open(path, "wb") as fh:
        fh.write(b"[node]\nname = \"n\xe9ud\"\n")
    code, _, err = check_config_in_process(path, capsys)   # today: UnicodeDecodeError
    assert code == EXIT_USAGE
    assert path in err


@pytest.mark.parametrize("text,key", [
    ("[guest.workload]\nnondeterminism = nan\n", "guest.workload.nondeterminism"),
    ("[guest.workload]\ninput_rate_hz = nan\n", "guest.workload.input_rate_hz"),
    ("[guest.workload]\nmix_zero = nan\n", "guest.workload.mix_zero"),
])
def test_check_config_nan(tmp_path, text, key):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as exc_info:
        config.load(path)
    assert exc_info.value.key == key


@pytest.mark.parametrize("name", ["", "a/b", ".."])
def test_check_config_node_name_unusable_for_shm(name):
    with pytest.raises(ConfigError) as exc_info:
        config.from_dict({"node": {"name": name}}, "x.toml")
    assert exc_info.value.key == "node.name"


def test_check_config_address_without_host():
    with pytest.raises(ConfigError) as exc_info:
        config.from_dict({"peer": {"address": "tcp://:7400"}}, "x.toml")
    assert exc_info.value.key == "peer.address"


def test_every_section_reports_key_problem_and_expectation_apart(tmp_path):
    """One settings style (pipeline/schema.py): every section raises SettingError with the
    key, the problem and the expectation as attributes, and the loader passes them on as
    they are (file:key: problem (expected ...)), without reading its own text back."""
    from pipeline.disk.settings import DiskSettings
    from pipeline.failover.settings import FailoverSettings, HeartbeatSettings
    from pipeline.net.settings import NetSettings
    from pipeline.schema import SettingError
    cases = [
        (lambda: DiskSettings(image="d.img", export_size=1000), "disk.export_size",
         {"disk": {"image": "d.img", "export_size": 1000}}),
        (lambda: DiskSettings(image="d.img", export_size=4096, forward_window=0),
         "disk.forward_window", {"disk": {"image": "d.img", "export_size": 4096,
                                          "forward_window": 0}}),
        (lambda: NetSettings(compare_timeout_ms=0), "net.compare_timeout_ms",
         {"net": {"compare_timeout_ms": 0}}),
        (lambda: HeartbeatSettings(interval_ms=5), "heartbeat.interval_ms",
         {"heartbeat": {"interval_ms": 5}}),
        (lambda: FailoverSettings(witness="etcd", etcd_endpoints=[]), "failover.etcd_endpoints",
         {"failover": {"witness": "etcd", "etcd_endpoints": []}}),
        (lambda: config.CheckpointSettings(min_interval_ms=9, max_interval_ms=5),
         "checkpoint.min_interval_ms", {"checkpoint": {"min_interval_ms": 9,
                                                        "max_interval_ms": 5}}),
    ]
    for make, key, table in cases:
        with pytest.raises(SettingError) as err:
            make()
        e = err.value
        assert e.key == key and e.problem and e.expected, (key, str(e))
        assert str(e) == f"{key}: {e.problem} (expected {e.expected})"
        with pytest.raises(ConfigError) as loaded:
            config.from_dict({**table, "security": {"mode": "plaintext"}}, "n.toml")
        c = loaded.value
        assert (c.path, c.key, c.problem, c.expected) == ("n.toml", key, e.problem, e.expected)


def test_the_checkpoint_timer_follows_the_release_policy_unless_set():
    # an explicit max_interval_ms is the timer whatever the policy
    cp = config.CheckpointSettings(max_interval_ms=600)
    assert cp.timer_ms("compare") == cp.timer_ms("commit") == 600
    # 0 (the default): by policy, never below min_interval_ms, which no 0 can be under
    cp = config.CheckpointSettings(min_interval_ms=40)
    assert cp.timer_ms("compare") == config.COMPARE_TIMER_MS
    assert cp.timer_ms("commit") == 40
    s = config.from_dict({"checkpoint": {"min_interval_ms": 500}, "net": {"release": "commit"},
                          "security": {"mode": "plaintext"}})
    assert s.checkpoint.timer_ms(s.net.release) == 500
