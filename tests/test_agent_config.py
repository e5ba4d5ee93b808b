"""Agent configuration and keys: defaults, and errors that name the file, key and line."""

import os
import stat

import pytest

from backdoors.agent import generate, load_config, load_identity, load_publics, new_identity
from backdoors.agent.config import AgentConfig, validate
from backdoors.agent.keys import raw_public
from backdoors.errors import ConfigError

M1, M2 = new_identity("m1"), new_identity("m2")
KEY, KEY2 = M1.public_text(), M2.public_text()

GOOD = f"""
host = "h0"
listen = "10.0.0.1:7700"
run_dir = "/run/backdoors/h0"
audit_log = "/var/log/backdoors/h0.jsonl"
key_file = "/etc/backdoors/h0.key"

[monitors]
m1 = "{KEY}"
m2 = "{KEY2}"

[[nodes]]
name = "n0"
cgroup = "bd-lab/n0"
netns = "bd-lab-n0"

[[nodes]]
name = "n1"
cgroup = "bd-lab/n1"
protected_comms = ["sshd"]
"""


def _write(tmp_path, text, name="agent.toml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_a_good_config_with_defaults(tmp_path):
    c = load_config(_write(tmp_path, GOOD))
    assert c.listen_address() == ("10.0.0.1", 7700)
    assert [n.name for n in c.nodes] == ["n0", "n1"] and c.nodes[1].protected_comms == ["sshd"]
    assert c.own_cgroup == "bd-agent-h0" and c.quorum == 1 and c.vote_window_s == 2.0
    assert (c.op_deadline_s, c.sample_period_s) == (1.0, 0.05)
    assert (c.max_regions_per_node, c.max_region_bytes, c.max_node_bytes) == (
        64, 16 << 20, 384 << 20)
    assert c.max_procs_sampled == 2048 and c.kernel_sensors.memory_high_pct == 80
    keys = c.monitor_keys()
    assert {m: [raw_public(k) for k in ks] for m, ks in keys.items()} == {
        "m1": [raw_public(M1.public)], "m2": [raw_public(M2.public)]}


def test_keys_from_files_next_to_the_config(tmp_path):
    me = generate(str(tmp_path / "h0.key"), "h0")
    assert stat.S_IMODE(os.stat(tmp_path / "h0.key").st_mode) == 0o600
    assert raw_public(load_identity(str(tmp_path / "h0.key"), "h0").public) == raw_public(me.public)
    pub = tmp_path / "monitors.toml"
    pub.write_text(f'm1 = "{KEY}"\nm2 = ["{KEY2}", "{new_identity("m2").public_text()}"]\n')
    assert len(load_publics(str(pub))["m2"]) == 2  # two keys during a rotation
    head, tail = GOOD.split("[monitors]")[0], GOOD.split('m2 = "' + KEY2 + '"')[1]
    text = (head.replace('key_file = "/etc/backdoors/h0.key"', 'key_file = "h0.key"')
            + 'monitors = "monitors.toml"\n' + tail)
    c = load_config(_write(tmp_path, text))
    assert c.monitors == str(pub) and c.key_file == str(tmp_path / "h0.key")
    assert c.identity().id == "h0" and set(c.monitor_keys()) == {"m1", "m2"}
    with pytest.raises(ConfigError, match="exists"):
        generate(str(tmp_path / "h0.key"), "h0")
    with pytest.raises(ConfigError, match="is the key of 'h0', not of 'h9'"):
        load_identity(str(tmp_path / "h0.key"), "h9")
    pub.chmod(0o666)
    with pytest.raises(ConfigError, match=r"writable by group or others.*chmod go-w"):
        load_config(_write(tmp_path, text))


@pytest.mark.parametrize("change, match", [
    (('quorum = 1', 'quorum = "two"'), r":3: key quorum: Expected `int`, got `str`"),
    (('quorum = 1', 'quorum = 1\nlisten_interface = "priv 0"'),
     r":4: key listen_interface: 'priv 0' is not an interface name \(1-15 characters"),
    (('quorum = 1', 'quorum = 3'), r":3: key quorum: quorum = 3 needs 3 monitors that vote, and the 2 of monitors "
     r"\(the monitors table: m1, m2\) cannot reach it.*or set quorum = 2"),
    (('quorum = 1', 'qorum = 2'), r":3: key qorum: Object contains unknown field `qorum`"),
    (('listen = "10.0.0.1:7700"', 'listen = "10.0.0.1"'), r":4: key listen: .* ADDR:PORT"),
    (('cgroup = "bd-lab/n1"', 'cgroup = 5'), r":20: key nodes\[1\]\.cgroup: Expected `str`"),
    (('cgroup = "bd-lab/n1"', 'cgroup = "bd-lab/n0/x"'),
     r":20: key nodes\[1\]\.cgroup: .* overlaps node n0's cgroup"),
    (('name = "n1"', 'name = "n0"'), r":19: key nodes\[1\]\.name: node 'n0' is listed twice"),
    (('m2 = "' + KEY2 + '"', 'm2 = "abcd"'), r":11: key monitors\.m2: expected a public key"),
    (('m2 = "' + KEY2 + '"', 'm2 = "' + KEY + '"'),
     r":11: key monitors.m2: has the same public key as m1"),
    (('m2 = "' + KEY2 + '"', 'm2 = "ed25519:abcd"'), r"key monitors\.m2: .*not an Ed25519"),
    (('run_dir = "/run/backdoors/h0"', 'run_dir = "run"'), r":5: key run_dir: .*absolute"),
    (('quorum = 1', 'op_deadline_s = 0'), r"key op_deadline_s: must be within"),
    (('quorum = 1', 'cgroup = "agent"'), r"key cgroup: .*starting with 'bd'"),
    (('quorum = 1', 'cgroup = "bd-lab"'),
     r":15: key nodes\[0\]\.cgroup: .*overlaps the agent's"),
    (('quorum = 1', 'quorum = '), r"not valid TOML: .*line 3"),
])
def test_errors_name_file_key_and_line(tmp_path, change, match):
    text = GOOD.replace('host = "h0"', 'host = "h0"\nquorum = 1', 1)
    old, new = change
    assert old in text
    path = _write(tmp_path, text.replace(old, new, 1))
    with pytest.raises(ConfigError, match=match) as err:
        load_config(path)
    assert str(err.value).startswith(path)


def test_a_missing_file_and_a_missing_key(tmp_path):
    with pytest.raises(ConfigError, match="cannot read agent config .*nope.toml"):
        load_config(str(tmp_path / "nope.toml"))
    with pytest.raises(ConfigError, match="missing required field `listen`"):
        load_config(_write(tmp_path, GOOD.replace('listen = "10.0.0.1:7700"', "")))


def test_validate_checks_a_config_built_in_code():
    c = AgentConfig(host="h0", listen="[::1]:0", run_dir="/r", audit_log="/a",
                    monitors={"m1": KEY}, key_file="/k", quorum=2)
    with pytest.raises(ConfigError, match="key quorum: quorum = 2 needs 2 monitors that vote"):
        validate(c)
    c.quorum = 1
    validate(c)
    assert c.listen_address() == ("::1", 0)
    # outside review: "::1:7700" was taken as [::1]:7700 (but which colon is the port's?)
    c.listen = "::1:7700"
    with pytest.raises(ConfigError, match=r"'::1:7700' is not ADDR:PORT .*\[V6ADDR\]:PORT"):
        validate(c)


@pytest.mark.parametrize("table, match", [
    ('psi_triggers = ["disk"]', r"key kernel_sensors\.psi_triggers: 'disk' is not one of memory"),
    ('psi_triggers = ["cpu"]\npsi_cpu_some = 100',
     r"key kernel_sensors\.psi_cpu_some: must be below 100 for a PSI trigger"),
    ("psi_window_s = 20", r"key kernel_sensors\.psi_window_s: must be within 0\.5\.\.10 s"),
])
def test_psi_trigger_settings_are_checked(tmp_path, table, match):
    with pytest.raises(ConfigError, match=match):
        load_config(_write(tmp_path, GOOD + "\n[kernel_sensors]\n" + table + "\n"))
    ok = load_config(_write(tmp_path, GOOD + '\n[kernel_sensors]\npsi_triggers = ["memory", "io"]\n'))
    assert ok.kernel_sensors.psi_triggers == ("memory", "io")


@pytest.mark.parametrize("table, match", [
    ('guest = "g"\nqmp = "q.sock"', r"key nodes\[1\]\.vm\.qmp: must be an absolute path"),
    ('guest = "a b"\nqmp = "/q"', r"key nodes\[1\]\.vm\.guest: 'a b' must be 1-64"),
    ('guest = "g"\nqmp = "/q"\njiffies_deadline_s = 0.01',
     r"key nodes\[1\]\.vm\.jiffies_deadline_s: must be within 0\.05\.\.600 s"),
    ('guest = "g"\nqmp = "/q"\nsample_period_s = 2', r"key nodes\[1\]\.vm\.sample_period_s: "
     "must be below jiffies_deadline_s"),
    ('qmp = "/q"', r"key nodes\[1\]\.vm: .*missing required field `guest`"),
])
def test_a_vm_node_is_checked(tmp_path, table, match):
    with pytest.raises(ConfigError, match=match):
        load_config(_write(tmp_path, GOOD + "\n[nodes.vm]\n" + table + "\n"))
    twice = GOOD.replace('cgroup = "bd-lab/n0"', 'cgroup = "bd-lab/n0"\nvm = { guest = "g", qmp = "/q" }')
    with pytest.raises(ConfigError, match=r"key nodes\[1\]\.vm\.guest: 'g' is another node's too"):
        load_config(_write(tmp_path, twice + '\n[nodes.vm]\nguest = "g"\nqmp = "/q2"\n'))
    ok = load_config(_write(tmp_path, GOOD + '\n[nodes.vm]\nguest = "bd-lab-v0"\nqmp = "/run/q"\n'))
    assert ok.nodes[0].vm is None and ok.nodes[1].vm.guest == "bd-lab-v0"
    assert (ok.nodes[1].vm.jiffies_deadline_s, ok.nodes[1].vm.sample_period_s) == (1.0, 0.05)
