"""The unified configuration file: [agent] and [monitor] in one TOML file, the loaders and
entry points that accept it, its errors, and `config show`."""

import os
import re
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest

import backdoors.config as C
from backdoors.agent.config import AgentConfig, KernelSensorLimits, NodeSpec, VmNodeSpec
from backdoors.agent.keys import generate, new_identity
from backdoors.common.configfile import descriptions
from backdoors.config import load_agent_config as load_agent
from backdoors.config import load_monitor_config as load_monitor
from backdoors.errors import ConfigError
from backdoors.monitor.config import (
    AgentEntry, ArmedEntry, MonitorConfig, WarningsConfig, parse_config,
)

CONTRIB = Path(__file__).resolve().parents[1] / "contrib" / "backdoors.toml"

UNIFIED = """\
[agent]
host = "h0"
listen = "10.99.0.1:7700"
run_dir = "/run/backdoors"
audit_log = "/var/log/backdoors/audit.jsonl"
monitors = "monitors.pub"
key_file = "h0.key"
metrics_listen = "10.99.0.1:9464"

[[agent.nodes]]
name = "n0"
cgroup = "svc/n0"

[[agent.nodes]]
name = "n1"
cgroup = "svc/n1"

[agent.kernel_sensors]
forks_per_s = 100.0

[monitor]
monitor_id = "m1"
key_file = "m1.key"
incidents_dir = "incidents"
metrics_listen = "10.99.0.1:9465"

[[monitor.agents]]
host = "h0"
address = "10.99.0.1:7700"
"""


def keys_in(folder: Path, monitors=("m1", "m2"), agent="h0") -> None:
    """The monitors' private keys and public keys file, and the agent's key, in `folder`."""
    lines = [generate(str(folder / f"{m}.key"), m).public_text() for m in monitors]
    (folder / "monitors.pub").write_text("".join(f'{m} = "{t}"\n'
                                                 for m, t in zip(monitors, lines)))
    generate(str(folder / f"{agent}.key"), agent)


@pytest.fixture
def folder(tmp_path):
    keys_in(tmp_path)
    return tmp_path


def write(folder: Path, text: str, name: str = "backdoors.toml") -> str:
    path = folder / name
    path.write_text(text)
    return str(path)


def test_both_loaders_read_their_section_of_the_unified_file(folder):
    path = write(folder, UNIFIED)
    agent = load_agent(path)
    assert agent.host == "h0" and [n.name for n in agent.nodes] == ["n0", "n1"]
    assert agent.monitors == str(folder / "monitors.pub")  # relative to the file
    assert agent.key_file == str(folder / "h0.key")
    assert agent.kernel_sensors.forks_per_s == 100.0 and agent.metrics_listen == "10.99.0.1:9464"
    monitor = load_monitor(path)
    assert monitor.monitor_id == "m1" and monitor.agents[0].address == "10.99.0.1:7700"
    assert monitor.key_file == str(folder / "m1.key")
    assert monitor.incidents_dir == str(folder / "incidents")
    assert monitor.metrics_listen == "10.99.0.1:9465"
    assert C.load_agent_config(path) == agent and C.load_monitor_config(path) == monitor


def test_plain_files_still_load(folder):
    agent_part, monitor_part = UNIFIED.split("[monitor]\n")
    agent = write(folder, agent_part.replace("[agent]\n", "").replace("agent.", ""), "agent.toml")
    assert load_agent(agent).nodes[1].cgroup == "svc/n1"
    monitor = write(folder, monitor_part.replace("monitor.", ""), "monitor.toml")
    assert load_monitor(monitor).agents[0].host == "h0"
    # outside review: the other daemon's file said "unknown field 'host'"
    with pytest.raises(ConfigError, match=r"agent\.toml: this is an agent's config \(it has "
                       r"host and nodes\), not the monitor's"):
        load_monitor(agent)
    with pytest.raises(ConfigError, match=r"monitor\.toml: this is a monitor's config"):
        load_agent(monitor)


def test_monitor_check_says_an_incidents_dir_it_cannot_make(folder):
    """Outside review: monitor --check passed incidents_dir = "/proc/nope/incidents",
    which the monitor then could not make. The check makes it as the monitor would, and
    removes what it made."""
    bad = write(folder, checkable(UNIFIED).replace('incidents_dir = "incidents"',
                                                   'incidents_dir = "/proc/nope/incidents"'))
    out = check_monitor(bad)
    assert out.returncode == 1, out
    assert "incidents_dir /proc/nope/incidents cannot be made" in out.stderr, out.stderr
    good = write(folder, checkable(UNIFIED).replace('incidents_dir = "incidents"',
                                                    'incidents_dir = "new/incidents"'))
    assert check_monitor(good).returncode == 0
    assert not (folder / "new").exists()  # made to check, then removed


@pytest.mark.parametrize("change, where", [
    (('cgroup = "svc/n1"', 'cgroup = "svc/n0/x"'),
     r":16: key agent\.nodes\[1\]\.cgroup: 'svc/n0/x' overlaps node n0's cgroup"),
    # outside review: a /sys/fs/cgroup path was taken as relative (and made under it)
    (('cgroup = "svc/n1"', 'cgroup = "/sys/fs/cgroup/svc/n1"'),
     r":16: key agent\.nodes\[1\]\.cgroup: '/sys/fs/cgroup/svc/n1' is not a relative "
     r"cgroup path \(the path inside each hierarchy"),
    (("[agent]\n", "[agent]\nquorum = 5\n"),
     r":2: key agent\.quorum: quorum = 5 needs 5 monitors that vote, and the 2 of monitors "
     r"\(.*monitors\.pub: m1, m2\) cannot reach it"),
    (('forks_per_s = 100.0', 'forks_per_s = "many"'),
     r":19: key agent\.kernel_sensors\.forks_per_s: Expected `float`, got `str`"),
    (('metrics_listen = "10.99.0.1:9464"', 'metrics_listen = "nowhere"'),
     r":8: key agent\.metrics_listen: 'nowhere' is not ADDR:PORT"),
    (('incidents_dir = "incidents"', 'incidents_dir = "incidents"\nperiod = 5'),
     r":25: key monitor\.period: Object contains unknown field `period`"),
    (('metrics_listen = "10.99.0.1:9465"', 'metrics_listen = ":"'),
     r":25: key monitor\.metrics_listen: ':' is not ADDR:PORT"),
    (('address = "10.99.0.1:7700"\n', 'address = "h0"\n'),
     r":29: key monitor\.agents\[0\]\.address: 'h0' is not ADDR:PORT"),
    # outside review: a poll that never comes, or comes after the lease expired, and a
    # cluster name the other clusters' subscriptions (SUBJECT.*) never match
    (('incidents_dir = "incidents"', 'incidents_dir = "incidents"\nfleet_poll_ms = inf'),
     r":25: key monitor\.fleet_poll_ms: must be a finite number, not inf"),
    (('incidents_dir = "incidents"', 'incidents_dir = "incidents"\nfleet_poll_ms = 2000\n'
      'etcd = ["http://10.99.0.250:2379"]'),
     r":25: key monitor\.fleet_poll_ms: 2000 ms: a fleet member renews its lease once a step"),
    (('incidents_dir = "incidents"', 'incidents_dir = "incidents"\nfleet_reach_ms = 100\n'
      'etcd = ["http://10.99.0.250:2379"]'),
     r":25: key monitor\.fleet_reach_ms: 100 ms: an agent answers at most once a poll"),
    (('address = "10.99.0.1:7700"\n', 'address = "10.99.0.1:0"\n'),
     r":29: key monitor\.agents\[0\]\.address: '10\.99\.0\.1:0': port 0 is no agent's"),
    (('address = "10.99.0.1:7700"\n', 'address = "10.99.0.1:7700"\n[monitor.warnings]\n'
      'nats = ["nats://10.99.0.250:4222"]\ncluster = "a.b"\n'),
     r":32: key monitor\.warnings\.cluster: must be 1-64 of A-Z a-z 0-9 _ - \(no dot"),
    # review: a password nats-py would cut at '/' (and log), shown without it
    (('address = "10.99.0.1:7700"\n', 'address = "10.99.0.1:7700"\n[monitor.warnings]\n'
      'nats = ["nats://mon:ab/cd@10.99.0.250:4222"]\ncluster = "a"\n'),
     r":31: key monitor\.warnings\.nats\[0\]: 'nats://mon:\*\*\*@10\.99\.0\.250:4222': "
     r"the user or password holds / \? or #"),
])
def test_errors_name_file_line_and_key(folder, change, where):
    path = write(folder, UNIFIED.replace(*change))
    section = "agent" if "key agent" in where else "monitor"
    load = load_agent if section == "agent" else load_monitor
    with pytest.raises(ConfigError) as err:
        load(path)
    assert re.search(re.escape(path) + where, str(err.value)), str(err.value)


def test_layout_errors(folder):
    path = write(folder, UNIFIED.replace("[monitor]", "[monitors]"))
    with pytest.raises(ConfigError, match=r"backdoors\.toml:21: key monitors: unknown top-level"):
        load_agent(path)
    path = write(folder, UNIFIED.split("[monitor]")[0])
    with pytest.raises(ConfigError, match=r"has no \[monitor\] section \(it has: \[agent\]\)"):
        load_monitor(path)
    path = write(folder, UNIFIED.replace('monitors = "monitors.pub"', 'monitors = "nokeys.toml"'))
    with pytest.raises(ConfigError, match=r"backdoors\.toml: \[agent\]: cannot read public keys file"):
        load_agent(path)
    path = write(folder, UNIFIED.replace("[agent]\n", "[agent\n"))
    with pytest.raises(ConfigError, match=r"not valid TOML.*line 1"):
        C.load_agent_config(path)


def test_the_daemons_entry_points_take_the_unified_file(folder):
    path = write(folder, checkable(UNIFIED))
    check = subprocess.run([sys.executable, "-m", "backdoors", "monitor", "--config", path,
                            "--check"], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0 and f"{path}: ok (1 agents" in check.stdout
    bad = write(folder, UNIFIED.replace('host = "h0"\nlisten', 'host = "h 0"\nlisten'))
    out = subprocess.run([sys.executable, "-m", "backdoors", "agent", "--config", bad],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert f"{bad}:2: key agent.host: must be 1-32 of" in out.stderr


def check_monitor(path: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "backdoors", "monitor", "--config", path,
                           "--check"], capture_output=True, text=True, timeout=60)


def checkable(text: str) -> str:
    """UNIFIED (or a variant) with its agent's public key, which a monitor needs to start."""
    return text.replace('address = "10.99.0.1:7700"\n', 'address = "10.99.0.1:7700"\npublic_key = '
                        f'"{new_identity("h0").public_text()}"\n')


def contrib_in(folder: Path, monitors=("m1",)) -> str:
    """The shipped example, its /etc/backdoors files in `folder` (keys of `monitors`)."""
    keys_in(folder, monitors, "web-a")
    return write(folder, CONTRIB.read_text().replace("/etc/backdoors/", f"{folder}/"))


def test_the_contrib_example_works_as_shipped_for_one_monitor(tmp_path):
    path = contrib_in(tmp_path)
    assert "quorum = 1" in C.config_show(path)
    check = check_monitor(path)
    assert check.returncode == 0 and f"{path}: ok (2 agents" in check.stdout, check
    assert "warning" not in check.stderr  # web-a lists two nodes: heal can move sessions


def test_a_quorum_beyond_the_monitors_that_vote_is_refused_where_it_is_set(tmp_path):
    """quorum = 2 with one monitor's key: every repair would be refused; config show and
    monitor --check (on the unified file: the agents' quorum is there) say so, naming the
    file, the key and the fix. Peers are no voters."""
    path = contrib_in(tmp_path)
    text = Path(path).read_text().replace("quorum = 1", "quorum = 2")
    assert "quorum = 2" in text
    path = write(tmp_path, text)
    line = next(i for i, ln in enumerate(text.splitlines(), 1) if ln.startswith("quorum = "))
    with pytest.raises(ConfigError) as err:
        C.config_show(path)
    message = str(err.value)
    assert message.startswith(f"{path}:{line}: key agent.quorum: quorum = 2 needs 2 monitors")
    assert f"{tmp_path}/monitors.pub: m1" in message and "peers (web-b) never vote" in message
    assert "set quorum = 1" in message
    check = check_monitor(path)
    assert check.returncode == 1 and message in check.stderr, check


def test_monitor_check_warns_when_heal_has_nowhere_to_recover_to(folder):
    one = checkable(UNIFIED).replace('incidents_dir = "incidents"',
                          'incidents_dir = "incidents"\nrulesets = ["heal"]')
    one = one.replace('address = "10.99.0.1:7700"\n', 'address = "10.99.0.1:7700"\nnodes = ["n0"]\n')
    check = check_monitor(write(folder, one))
    assert check.returncode == 0 and ": ok (1 agents" in check.stdout, check
    assert "warning: rules memory-hog, hang, network-failure, server-died recover sessions " \
        "to another node" in check.stderr  # the heal ruleset's
    assert "lists one node (n0 on h0)" in check.stderr
    two = one.replace('nodes = ["n0"]', 'nodes = ["n0", "n1"]')
    check = check_monitor(write(folder, two))
    assert check.returncode == 0 and "warning" not in check.stderr, check


# -- config show ----------------------------------------------------------------------------


def test_every_key_is_documented():
    for struct in (AgentConfig, NodeSpec, VmNodeSpec, KernelSensorLimits, MonitorConfig, AgentEntry,
                   WarningsConfig, ArmedEntry):
        assert set(descriptions(struct)) == set(struct.__struct_fields__), struct.__name__


def test_show_the_contrib_example_round_trips(tmp_path):
    folder = tmp_path
    keys_in(folder, ("m1", "m2", "m3"), "web-a")
    text = CONTRIB.read_text().replace("/etc/backdoors/", f"{folder}/")
    path = write(folder, text)
    shown = C.config_show(path)
    again = write(folder, shown, "shown.toml")
    assert load_agent(again) == load_agent(path)
    assert load_monitor(again) == load_monitor(path)
    lines = shown.splitlines()
    for section, struct in (("agent", AgentConfig), ("monitor", MonitorConfig)):
        assert f"[{section}]" in lines
    for key in (*AgentConfig.__struct_fields__, *MonitorConfig.__struct_fields__,
                *NodeSpec.__struct_fields__, *KernelSensorLimits.__struct_fields__):
        assert any(re.match(rf"(# )?{key} = ", ln) for ln in lines) or f"[agent.{key}]" in \
            lines or f"[[agent.{key}]]" in lines or f"[[monitor.{key}]]" in lines, key
    for i, line in enumerate(lines):  # a comment above every key
        if re.match(r"(# )?[a-z_]+ = ", line):
            assert lines[i - 1].startswith("# ") and not re.match(r"# [a-z_]+ = ", lines[i - 1])
    assert 'cgroup = "bd-agent-web-a"' in lines
    assert "# netns = (unset)" in lines  # the agent's own: not set
    assert "max_connections = 64" in lines  # a default, filled in
    idx = lines.index("max_connections = 64")
    assert lines[idx - 1].endswith("(default)")


def test_show_fills_effective_defaults_and_shows_public_keys(folder):
    m1 = new_identity("m1").public_text()
    plain = write(folder, f"""\
host = "h0"
listen = "10.99.0.1:7700"
run_dir = "/run/backdoors"
audit_log = "/var/log/backdoors/audit.jsonl"
key_file = "/etc/backdoors/h0.key"
[monitors]
m1 = "{m1}"
""", "agent.toml")
    shown = C.config_show(plain)
    assert f'm1 = "{m1}"' in shown  # public: nothing to hide
    assert 'cgroup = "bd-agent-h0"' in shown and "\n[monitor]" not in shown
    mon = write(folder, 'monitor_id = "m9"\n[[agents]]\nhost = "h0"\naddress = "10.0.0.1:1"\n',
                "monitor.toml")
    shown = C.config_show(mon)
    assert 'incidents_dir = "/var/lib/backdoors/incidents"' in shown and "\n[agent]" not in shown
    with pytest.raises(ConfigError, match="neither a unified config"):
        C.config_show(write(folder, "x = 1\n", "other.toml"))


def test_show_without_a_file_prints_the_defaults(monkeypatch, tmp_path):
    monkeypatch.setattr(C, "DEFAULT_PATH", str(tmp_path / "absent.toml"))
    shown = C.config_show(None)
    assert "quorum = 1" in shown and "period_ms = 50.0" in shown
    assert "# host =" in shown and "(required)" in shown
    defaults = msgspec.toml.decode(shown.encode())  # valid TOML
    assert defaults["agent"]["kernel_sensors"]["memory_high_pct"] == 80.0


# -- the docs against the classes (each key is documented once, in its type) ---------------

DOCS = Path(__file__).resolve().parents[1] / "docs"
LAYOUT = {"agent": AgentConfig, "monitor": MonitorConfig}
TABLES = {AgentConfig: {"nodes": NodeSpec, "kernel_sensors": KernelSensorLimits},
          NodeSpec: {"vm": VmNodeSpec},
          MonitorConfig: {"agents": AgentEntry, "warnings": WarningsConfig},
          WarningsConfig: {"armed": ArmedEntry}}


def section(doc: str, heading: str) -> str:
    text = (DOCS / doc).read_text()
    start = text.index(f"\n{heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def toml_blocks(text: str) -> list[dict]:
    import tomllib
    return [tomllib.loads(b) for b in re.findall(r"```toml\n(.*?)```", text, re.S)]


def unknown_keys(table: dict, struct: type, prefix: str = "") -> list[str]:
    """Keys of a documented TOML table that `struct` (and its sub-tables) does not have."""
    out = []
    for key, value in table.items():
        if key not in struct.__struct_fields__:
            out.append(prefix + key)
            continue
        sub = TABLES.get(struct, {}).get(key)
        for entry in (value if isinstance(value, list) else [value]) if sub else ():
            out += unknown_keys(entry, sub, f"{prefix}{key}.")
    return out


def test_the_agent_docs_list_exactly_the_keys_of_its_classes():
    text = section("agent-protocol.md", "## 2. Configuration")
    tables = re.findall(r"((?:^\| `[a-z_]+` \|.*\n)+)", text, re.M)
    assert len(tables) == 2
    for table, struct in zip(tables, (AgentConfig, NodeSpec)):
        keys = re.findall(r"^\| `([a-z_]+)` \|", table, re.M)
        assert sorted(keys) == sorted(struct.__struct_fields__), struct.__name__
    kernel = re.search(r"^`\[kernel_sensors\]`:(.*?)\n\n", text, re.M | re.S).group(1)
    assert sorted(re.findall(r"`([a-z_0-9]+)` (?:[0-9.]+|`\[)", kernel)) == sorted(
        KernelSensorLimits.__struct_fields__)
    for example in toml_blocks(text):
        assert unknown_keys(example, AgentConfig) == []


def test_the_monitor_docs_list_exactly_the_keys_of_its_classes():
    example, = toml_blocks(section("monitor.md", "## 2. Configuration"))
    assert sorted(example) == sorted(MonitorConfig.__struct_fields__)
    assert sorted(example["agents"][0]) == sorted(AgentEntry.__struct_fields__)
    assert sorted(example["warnings"]) == sorted(WarningsConfig.__struct_fields__)
    assert sorted(example["warnings"]["armed"][0]) == sorted(ArmedEntry.__struct_fields__)
    parse_config(msgspec.toml.encode({**example, "warnings": {
        **example["warnings"], "trusted_keys": {"w1": new_identity("w1").public_text()}},
        "agents": [{**example["agents"][0], "public_key": new_identity("h0").public_text()}]}
    ).decode())  # the example is a valid config


def test_the_operations_guide_names_only_existing_keys():
    text = (DOCS / "operations.md").read_text()
    blocks = toml_blocks(text)
    assert blocks
    for block in blocks:
        for name, table in block.items():
            assert unknown_keys(table, LAYOUT[name], f"{name}.") == []
    named = re.findall(r"`\[(agent|monitor)\] ([a-z_]+)", text)
    assert named
    for name, key in named:
        assert key in LAYOUT[name].__struct_fields__, f"[{name}] {key}"


def test_monitor_check_refuses_what_the_monitor_would(folder):
    """Outside review: `--check` (the units' ExecStartPre) passed a key file open to
    others, another monitor's key and an incidents_dir that is a file; the monitor then
    refused to start."""
    import shutil
    path = write(folder, checkable(UNIFIED))
    assert check_monitor(path).returncode == 0
    os.chmod(folder / "m1.key", 0o644)
    check = check_monitor(path)
    assert check.returncode == 1 and "readable by group or others" in check.stderr, check
    os.chmod(folder / "m1.key", 0o600)
    shutil.copy(folder / "h0.key", folder / "m1.key")
    check = check_monitor(path)
    assert check.returncode == 1 and "is the key of 'h0', not of 'm1'" in check.stderr, check
    (folder / "m1.key").unlink()
    generate(str(folder / "m1.key"), "m1")
    (folder / "incidents").write_text("")
    check = check_monitor(path)
    assert check.returncode == 1 and "incidents is not a directory" in check.stderr, check


def test_config_show_prints_a_warnings_section_with_its_passwords_left_out(folder):
    """Outside review: an unset member of an inline table (the bus's netns) stopped `config
    show` with a TypeError, and a NATS password in the bus's URL was shown as written."""
    trusted = new_identity("e1").public_text()
    warnings = ('\n[monitor.warnings]\nnats = ["nats://west-mon:s3cr3t@10.98.0.251:4222"]\n'
                f'cluster = "west"\ntrusted_keys = {{ e1 = "{trusted}" }}\n')
    for extra in ("", 'netns = "mon"\n'):
        shown = C.config_show(write(folder, UNIFIED + warnings + extra))
        assert "nats://west-mon:***@10.98.0.251:4222" in shown
        assert "s3cr3t" not in shown and trusted in shown
        assert ("netns" in shown.split("warnings = ")[1].splitlines()[0]) == bool(extra)


def test_monitor_check_checks_what_the_monitor_started_so_would_refuse(folder):
    """Outside review: --check said ok for an --etcd the monitor refuses, an agent with no
    public key, and a refresh hook the command line cannot register."""
    path = write(folder, checkable(UNIFIED).replace('incidents_dir = "incidents"',
                                                    'incidents_dir = "incidents"\nfleet_poll_ms = 500'))
    assert check_monitor(path).returncode == 0  # no etcd: the fleet keys wait unused
    check = subprocess.run([sys.executable, "-m", "backdoors", "monitor", "--config", path,
                            "--check", "--etcd", "http://127.0.0.1:2379"],
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 1 and "--etcd: key fleet_poll_ms" in check.stderr, check
    check = check_monitor(write(folder, UNIFIED))
    assert check.returncode == 1 and "agent h0: no public_key" in check.stderr, check
    demo = checkable(UNIFIED).replace('incidents_dir = "incidents"',
                                      'incidents_dir = "incidents"\nrulesets = ["demo"]')
    check = check_monitor(write(folder, demo))
    assert check.returncode == 1 and "hook 'restart-service' is not registered" in check.stderr, check


def _agent_check(path: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "backdoors", "agent", "--config", path,
                           "--check"], capture_output=True, text=True, timeout=60)


@pytest.mark.root
def test_agent_check_says_what_the_agent_would_refuse_at_start(tmp_path):
    """Outside review: nothing checked an agent's config as the agent starts with it
    (`config show` and `monitor --check` passed a key of another host, which the agent
    then refused, restarting 10 times a second under its unit). `agent --check` runs the
    agent's own start checks, without starting it: the unit's ExecStartPre."""
    text = CONTRIB.read_text().replace("/etc/backdoors/", f"{tmp_path}/").replace(
        "/var/log/backdoors/", f"{tmp_path}/")
    keys_in(tmp_path, ("m1", "m2"), "web-a")
    good = write(tmp_path, text)
    ok = _agent_check(good)
    assert ok.returncode == 0 and f"{good}: ok (agent web-a" in ok.stdout, ok
    wrong_key = write(tmp_path, text.replace(f"{tmp_path}/web-a.key", f"{tmp_path}/m2.key"),
                      "wrong-key.toml")
    out = _agent_check(wrong_key)
    assert out.returncode == 2 and "is the key of 'm2', not of 'web-a'" in out.stderr, out
    no_folder = write(tmp_path, text.replace(f"{tmp_path}/audit.jsonl",
                                             f"{tmp_path}/none/audit.jsonl"), "no-folder.toml")
    out = _agent_check(no_folder)
    assert out.returncode == 2 and "its folder does not exist" in out.stderr, out
    assert not (tmp_path / "audit.jsonl").exists()  # a check starts nothing, writes nothing
