"""The lab's backdoor agents: one daemon per lab host, on the private network.

Each agent serves the nodes placed on its host, listens in the host's namespace, runs in
its own cgroup `bd-<lab>-agent-<host>` (so the lab's reaper removes a killed one) and
authenticates the lab's monitors with Ed25519 keypairs generated into the lab's run
directory (`keys/<id>.key`, mode 0600): the monitors' private keys are the monitors' own,
an agent's config holds the monitors' and its peers' public keys and its own key file.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from ..agent.config import AgentConfig, NodeSpec, VmNodeSpec, validate
from ..agent.hardening import CPU_WEIGHT as AGENT_CPU_WEIGHT
from ..agent.keys import Identity, generate, load_identity
from ..common.configfile import dumps
from ..common.procs import read_line
from ..errors import BackdoorsError, LabError
from ..net.netns import set_sysctl
from ..nodes import Cgroup
from ..nodes.cgroups import top_level_names
from ..vm.machine import agent_qmp_path
from . import topology, vms

READY_TIMEOUT = 15.0


def keys_dir(plan: topology.Plan) -> Path:
    return plan.run_dir / "keys"


def key_path(plan: topology.Plan, id: str) -> Path:
    """The private key file of monitor or agent (host) `id`."""
    return keys_dir(plan) / f"{id}.key"


def write_keys(plan: topology.Plan, monitors: tuple[str, ...]) -> dict[str, Identity]:
    """Fresh keypairs for the lab's monitors and agents (private key files, mode 0600)."""
    keys_dir(plan).mkdir(mode=0o700, exist_ok=True)
    return {id: generate(str(key_path(plan, id)), id)
            for id in (*monitors, *(h.name for h in plan.hosts))}


def read_key(plan: topology.Plan, id: str) -> Identity:
    return load_identity(str(key_path(plan, id)), id)


def lab_monitors(plan: topology.Plan) -> list[str]:
    """The ids of the lab's monitors (every key that is not a host's)."""
    hosts = {h.name for h in plan.hosts}
    return sorted(p.stem for p in keys_dir(plan).glob("*.key") if p.stem not in hosts)


#: client sessions a lab node may hold (the agent's max_sessions_per_node)
LAB_SESSIONS = 16384


def agent_config(plan: topology.Plan, host: topology.HostPlan, quorum: int,
                 sample_period_s: float | None = None) -> AgentConfig:
    prefix = topology.SERVICE_PREFIXLEN
    nodes = [NodeSpec(n.name, n.cgroup, netns=n.netns, addresses=[f"{n.vip}/{prefix}"],
                      # a recovery may bring another node's sessions and address here
                      adopt_addresses=[f"{o.vip}/{prefix}" for o in plan.nodes if o is not n])
             for n in plan.nodes if n.host == host.name]
    # VM nodes: the agent reads each guest's kernel from its RAM and locks it through QMP
    nodes += [NodeSpec(v.name, v.cgroup, netns=v.netns,
                       vm=VmNodeSpec(guest=v.netns, qmp=str(agent_qmp_path(vms.run_dir(plan, v.name)))))
              for v in plan.vms if v.host == host.name]
    config = AgentConfig(
        host=host.name, listen=f"{host.address}:{topology.AGENT_PORT}", netns=host.netns,
        listen_interface="eth0",  # the host's private-network interface (lab._build_network)
        run_dir=str(plan.run_dir / "nodes"), audit_log=str(plan.run_dir / f"audit-{host.name}.jsonl"),
        monitors={m: read_key(plan, m).public_text() for m in lab_monitors(plan)},
        key_file=str(key_path(plan, host.name)), cgroup=host.agent_cgroup, quorum=quorum,
        nodes=nodes, peers={h.name: read_key(plan, h.name).public_text() for h in plan.hosts
                            if h.name != host.name},
        watch_peers={h.name: f"{h.address}:{topology.AGENT_PORT}"
                     for h in watched(plan, host)},
        # the lab moves up to 10,000 sessions of a node (bench recovery)
        max_sessions_per_node=LAB_SESSIONS, max_node_bytes=2 << 30,
        # the server-crash tests' short bound (agent.owners); the default otherwise
        orphan_timeout_s=float(os.environ.get("BACKDOORS_LAB_ORPHAN_TIMEOUT_S", "10")),
        # the evacuate cap's test; the default otherwise
        **({"max_evacuate_bytes": int(os.environ["BACKDOORS_LAB_MAX_EVACUATE_BYTES"])}
           if os.environ.get("BACKDOORS_LAB_MAX_EVACUATE_BYTES") else {}),
        # Lab(sample_period_s=): a large lab's or bench monitor's event mode samples
        # kernel state slowly; the default otherwise
        **({"sample_period_s": sample_period_s} if sample_period_s else {}))
    validate(config, f"lab {plan.lab} agent {host.name}")
    return config


#: how many hosts each lab agent pings (the next ones on a ring of the hosts): each agent is
#: watched by as many, and 8 hosts ping 16 times per check, not 56
PEERS_WATCHED = 2


def watched(plan: topology.Plan, host: topology.HostPlan) -> list[topology.HostPlan]:
    """The hosts whose agents `host`'s agent pings: the next PEERS_WATCHED on the ring
    (every other host in a lab of up to PEERS_WATCHED + 1)."""
    hosts = list(plan.hosts)
    at = hosts.index(host)
    return [hosts[(at + i) % len(hosts)] for i in range(1, min(PEERS_WATCHED, len(hosts) - 1) + 1)]


#: the keeper kills and restarts an agent that has not pinged its watchdog for this long:
#: within the 2 s a stuck agent may last, with room for a loaded machine to starve a
#: healthy agent's event loop for most of a second (800 ms killed healthy agents there)
WATCHDOG_MS = 1500.0
NOTIFY_QUEUE = 512  # messages the keeper's notify socket queues: systemd's minimum


def keeper_files(plan: topology.Plan, host: topology.HostPlan) -> tuple[Path, Path]:
    """(notify socket, pid file) of the keeper of `host`'s agent."""
    return plan.run_dir / f"agent-{host.name}.notify", plan.run_dir / f"agent-{host.name}.pid"


def start_agent(plan: topology.Plan, host: topology.HostPlan, quorum: int,
                sample_period_s: float | None = None) -> int:
    """Start the agent of `host` under its keeper (`lab.keeper`: the fd store that keeps
    its regions and sessions across a crash, its watchdog, its restarts) and wait until it
    serves; returns the keeper's pid (`agent_pid` tells the agent's)."""
    path = plan.run_dir / f"agent-{host.name}.toml"
    path.write_text(dumps(agent_config(plan, host, quorum, sample_period_s)))
    path.chmod(0o600)  # root's only, like the keys: nodes never read an agent's config
    log_path = plan.run_dir / f"agent-{host.name}.log"
    notify, pid_file = keeper_files(plan, host)
    # On a real host systemd raises net.unix.max_dgram_qlen to at least 512, so that its
    # notify socket queues that many messages (a thousand sessions held are two thousand);
    # the kernel's default is 10. The keeper makes its socket in the host's namespace,
    # the lab's own, raised so (the machine's own setting is left alone).
    set_sysctl(host.netns, "net/unix/max_dgram_qlen", NOTIFY_QUEUE)
    keeper_cgroup = Cgroup.create(f"{host.agent_cgroup}-keeper")  # reaped with the lab
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "backdoors.lab.keeper", "--notify", str(notify),
             "--pid-file", str(pid_file), "--watchdog-ms", str(WATCHDOG_MS),
             "--agent-config", str(path), "--sealed", "--netns", host.netns],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log)
    try:
        keeper_cgroup.attach(proc.pid)
    except BackdoorsError:
        pass  # it still works; only a crashed lab's reaper would miss it
    try:
        # The agent waits on its keeper (systemd's stand-in) once the notify socket's
        # queue is full. At a node's weight the keeper waited for the CPU behind the nodes
        # under load, and the agent (weight 10000) with it, in the middle of registering
        # sessions.
        keeper_cgroup.set_cpu_weight(AGENT_CPU_WEIGHT)
    except BackdoorsError:
        pass  # slower under load, not wrong
    line = read_line(proc, READY_TIMEOUT)
    proc.stdout.close()
    try:
        ready = json.loads(line).get("event") == "ready"
    except ValueError:
        ready = False
    if not ready:
        proc.kill()
        proc.wait()
        raise LabError(f"the agent of host {host.name} did not come up within {READY_TIMEOUT:g} s; "
                       f"see {log_path}")
    return proc.pid


def agent_pid(plan: topology.Plan, host: topology.HostPlan) -> int | None:
    """The pid of `host`'s agent now (its keeper restarts it), or None."""
    try:
        return int(json.loads(keeper_files(plan, host)[1].read_text())["pid"])
    except (OSError, ValueError, KeyError):
        return None


def stop_agents(plan: topology.Plan, pids: dict[str, int], timeout: float = 5.0) -> None:
    """SIGTERM each host's agent keeper of `pids` (it stops its agent, which thaws leased
    nodes and removes its sockets) and wait for it. A pid no longer in the keeper's cgroup
    is not the keeper any more (it exited and the pid went to another process) and is
    left alone."""
    import psutil
    keepers = []
    for host in plan.hosts:
        if (pid := pids.get(host.name)) is None:
            continue
        try:
            keeper = psutil.Process(pid)
            if f"{host.agent_cgroup}-keeper" in top_level_names(pid):
                keeper.send_signal(signal.SIGTERM)  # (psutil: the same process, by its start)
                keepers.append(keeper)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(keepers, timeout)
