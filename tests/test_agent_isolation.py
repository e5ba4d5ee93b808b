"""The agent refuses to serve a node that could reach it, unless the node is "trusted".

The nodes here are bare cgroups on the host (agent_lab) with a process that runs as root in
the host's PID namespace: exactly what the check is for. A node in a real container (the
lab's) passes it: tests/test_lab_isolation.py.
"""

import os
import subprocess

import pytest
from test_agent_support import PY, agent_lab, make_config, prefix, to_toml  # noqa: F401

from backdoors.agent import BackgroundAgent
from backdoors.agent.config import NodeSpec
from backdoors.agent.isolation import can_write, check_node, read_creds
from backdoors.errors import AgentError
from backdoors.net import netns as netns_mod

pytestmark = pytest.mark.root


def _checked(lab, **spec):
    """The lab's config with its node n0 checked (not trusted), and `spec` changes."""
    node = lab.config.nodes[0]
    fields = {f: getattr(node, f) for f in NodeSpec.__struct_fields__}
    fields.update({"isolation": "checked", **spec})
    lab.config.nodes = [NodeSpec(**fields)]
    return lab.config


def test_a_node_with_a_root_process_on_the_host_is_refused_with_what_to_change(agent_lab):
    lab = agent_lab(start=False)
    sleeper = lab.nodes["n0"].run(["sleep", "60"])
    try:
        config = _checked(lab)
        with pytest.raises(AgentError) as e:
            BackgroundAgent(config).start()
        msg = str(e.value)
        assert msg.startswith("node n0 could reach the agent: ")
        assert f"process {sleeper.pid} (sleep, uid 0) runs as root in the agent's PID " \
               "namespace" in msg
        assert "shares the host's network namespace" in msg
        assert 'isolation = "trusted"' in msg and "Node isolation" in msg
        # the daemon as a process: exit status 1, the same sentence on stderr
        path = os.path.join(lab.tmp, "agent.toml")
        with open(path, "w") as f:
            f.write(to_toml(config))
        out = subprocess.run([PY, "-m", "backdoors", "agent", "--config", path],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 1, out.stderr
        assert "node n0 could reach the agent" in out.stderr and "PID namespace" in out.stderr
        # the daemon has entered its own cgroup by then; the sleeper (host root) could write it
        assert "can write the agent's cgroup (/sys/fs/cgroup/" in out.stderr
        assert f"{lab.config.own_cgroup}/" in out.stderr
    finally:
        sleeper.kill()
        sleeper.wait()


def test_an_empty_node_on_the_host_network_is_refused(agent_lab):
    lab = agent_lab(start=False)
    with pytest.raises(AgentError, match=r"node n0 could reach the agent: it shares the "
                       r"host's network namespace \(no netns configured\)"):
        BackgroundAgent(_checked(lab)).start()


def test_a_node_in_its_own_netns_without_processes_passes(agent_lab, prefix):  # noqa: F811
    ns = f"{prefix}-iso"
    netns_mod.create(ns)
    try:
        lab = agent_lab(start=False)
        lab.agent = BackgroundAgent(_checked(lab, netns=ns)).start()
        lab.agent.stop()
    finally:
        netns_mod.remove(ns)


def test_trusted_is_accepted(agent_lab):
    lab = agent_lab(start=False)
    sleeper = lab.nodes["n0"].run(["sleep", "60"])
    try:
        assert check_node(lab.nodes["n0"], agent_cgroups=[], agent_netns=None)
        assert lab.config.nodes[0].isolation == "trusted"  # the agent_lab's default
        lab.agent = BackgroundAgent(lab.config).start()  # stopped by the fixture
        with lab.client() as c:
            assert c.ping().host == "h0"
    finally:
        sleeper.kill()
        sleeper.wait()


def test_the_write_model_follows_owner_group_other_and_dac_override():
    me = read_creds(os.getpid())
    assert me is not None and me.euid == 0
    host_userns = me.userns
    st = os.stat("/proc/self/status")  # owned by root, 0444

    class St:
        def __init__(self, uid, gid, mode):
            self.st_uid, self.st_gid, self.st_mode = uid, gid, mode

    assert can_write(me, St(0, 0, 0o100444), host_userns)  # DAC override in the host userns
    other = me.__class__(**{**me.__dict__, "euid": 5000, "egid": 5000, "groups": frozenset(),
                            "cap_eff": 0})
    assert not can_write(other, St(0, 0, 0o100644), host_userns)
    assert can_write(other, St(5000, 0, 0o100644), host_userns)
    assert can_write(other, St(0, 5000, 0o100664), host_userns)
    assert can_write(other, St(0, 0, 0o100666), host_userns)
    # root of another user namespace: DAC override only over inodes it maps
    inner = me.__class__(**{**me.__dict__, "euid": 1 << 30, "egid": 1 << 30,
                            "userns": "user:[1]", "uid_map": ((1 << 30, 65536),),
                            "gid_map": ((1 << 30, 65536),)})
    assert not can_write(inner, St(0, 0, 0o100644), host_userns)
    assert can_write(inner, St((1 << 30) + 5, 1 << 30, 0o100600), host_userns)
    assert st.st_uid == 0


def test_an_unknown_isolation_is_a_config_error(agent_lab):
    from backdoors.agent.config import validate
    from backdoors.errors import ConfigError

    lab = agent_lab(start=False)
    with pytest.raises(ConfigError, match=r"nodes\[0\]\.isolation: must be one of checked, "
                       "trusted"):
        validate(_checked(lab, isolation="maybe"))
