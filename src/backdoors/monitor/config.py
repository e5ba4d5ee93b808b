"""The monitor's configuration file (TOML), decoded into a validated MonitorConfig.

    monitor_id = "m1"
    key_file = "/etc/backdoors/m1.key"      # our private key (backdoors keys generate), 0600
    period_ms = 50
    rulesets = ["default"]                  # packaged names or paths to TOML files
    incidents_dir = "/var/lib/backdoors/incidents"

    [[agents]]
    host = "h0"
    address = "10.99.0.1:7700"
    public_key = "ed25519:..."              # the agent's (backdoors keys show its key file)
    nodes = ["n0", "n1"]                    # leave out to discover them with nodes()

Relative paths are taken from the config file's folder. Each key is documented in its type
(`doc`); docs/monitor.md §2 lists them, checked against these classes by the tests.
`load_config(path)` reads a plain monitor file; the unified file's [monitor] table is
backdoors.config's to find, and `decode_table` decodes it.
"""

from __future__ import annotations

import math
import os
import re
from typing import Annotated

import msgspec

from ..agent.keys import check_mode, decode_publics, load_identity
from ..agent.listening import interface_problem
from ..common.configfile import Document, Invalid, convert, doc, parse_address
from ..errors import ConfigError

Pos = Annotated[float, msgspec.Meta(gt=0)]
NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


class AgentEntry(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """One agent to poll: its host name, "ADDR:PORT", its public key, optionally its nodes."""

    host: Annotated[str, doc("the agent's host name (as in its [agent] host): its id")]
    address: Annotated[str, doc("ADDR:PORT of the agent on the private network")]
    public_key: Annotated[str | list[str] | None, doc(
        'the agent\'s public key "ed25519:<hex>" (two during its key rotation): its replies '
        "and events must carry its signature; needed to talk to it")] = None
    nodes: Annotated[list[str] | None, doc(
        "its nodes; unset: discovered with nodes() every discover_s")] = None
    netns: Annotated[str | None, doc("make the connection from this network namespace")] = None


class ArmedEntry(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """A rule armed from the start: processes running this executable as this comm are
    killed on first sight (monitor/prearm.py)."""

    exe_sha256: Annotated[str, doc("sha256 (64 hex digits) of the executable (sha256sum FILE)")]
    comm: Annotated[str, doc("the comm it runs as (the hash alone would name every process "
                             "of an interpreter)")]
    kind: Annotated[str, doc('"fork-bomb" (the node is frozen while they are killed) or '
                             '"memory-hog"')] = "fork-bomb"
    cmdline: Annotated[list[str], doc(
        "only processes with exactly this command line (argv), for an executable others "
        "run too (an interpreter: python3, bash); empty: any")] = []


class WarningsConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """[monitor.warnings]: signed early warnings between clusters over NATS (DINA)."""

    nats: Annotated[list[str], doc(
        "URLs of this cluster's NATS server(s) (nats://ADDR:4222; with a user of the "
        "server: nats://USER:PASSWORD@ADDR:4222, shown without the password in logs); the "
        "clusters' servers are linked (leaf nodes): docs/operations.md, \"Warnings between "
        "clusters\"")]
    cluster: Annotated[str, doc(
        "this cluster's name: its warnings go to <subject>.<cluster>")]
    subject: Annotated[str, doc("the subject prefix of warnings")] = "backdoors.warnings"
    trusted_keys: Annotated[dict[str, str | list[str]], doc(
        'the other clusters\' monitors: id = "ed25519:..." (their monitor keys); a warning '
        "signed by any other key is rejected")] = msgspec.field(default_factory=dict)
    window_s: Annotated[Pos, doc(
        "a warning issued further than this from now (either way) is rejected; ids are "
        "remembered this long (replays are rejected)")] = 60.0
    ttl_s: Annotated[Pos, doc("how long the warnings this monitor publishes, and the "
                              "rules they arm, last")] = 3600.0
    publish: Annotated[bool, doc(
        "publish a warning when a fork bomb or memory hog is repaired")] = True
    arm: Annotated[bool, doc("arm a rule for each verified warning of another cluster")] = True
    scan_ms: Annotated[Pos, doc(
        "while a rule is armed, every watched node's process table is read this often")] = 20.0
    lease_s: Annotated[Pos, doc("the node lock held while a fork bomb's processes are "
                                "killed on sight")] = 2.0
    armed: Annotated[list[ArmedEntry], doc(
        "rules armed from the start: [[monitor.warnings.armed]] exe_sha256, comm, "
        "kind")] = msgspec.field(default_factory=list)
    netns: Annotated[str | None, doc(
        "make the connections to NATS from this network namespace")] = None


class MonitorConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """Everything a monitor needs."""

    monitor_id: Annotated[str, doc("this monitor's id at the agents (its key's id)")]
    agents: Annotated[list[AgentEntry], doc("the agents polled: [[monitor.agents]] tables")]
    key_file: Annotated[str | None, doc(
        "this monitor's private key file (id = monitor_id, mode 0600; backdoors keys "
        "generate)")] = None
    period_ms: Annotated[Pos, doc("poll period")] = 50.0
    events: Annotated[bool, doc(
        "subscribe to every agent's events (violations its watcher judged, server deaths) "
        "and act on them at once; false: detect by polling only")] = True
    timeout_ms: Annotated[Pos, doc(
        "per poll RPC; a slower agent counts as unreachable meanwhile")] = 500.0
    action_timeout_ms: Annotated[Pos, doc(
        "per RPC of a repair (lock, kill, process table)")] = 3000.0
    rulesets: Annotated[list[str], doc(
        "packaged names (default, heal) or paths of ruleset files")] = msgspec.field(
            default_factory=lambda: ["default"])
    incidents_dir: Annotated[str | None, doc(
        "folder of incidents.jsonl (unset: /var/lib/backdoors/incidents)")] = None
    history_s: Annotated[Pos, doc("sensor history kept per node, seconds")] = 5.0
    discover_s: Annotated[Pos, doc(
        "how often nodes() is asked when an agent's nodes are discovered")] = 2.0
    max_parallel_repairs: Annotated[int, msgspec.Meta(ge=1, le=64), doc(
        "repair workers (above 14, raise the agents' signer_in_flight to this + 2: each "
        "worker may wait on one agent at once)")] = 4
    settle_ms: Annotated[float, msgspec.Meta(ge=0), doc(
        "after a repair, no new incident on that node for this long")] = 250.0
    vote_window_s: Annotated[float, msgspec.Meta(ge=0), doc(
        "the agents' vote window when their quorum is above 1")] = 0.0
    metrics_listen: Annotated[str | None, doc(
        "ADDR:PORT of GET /metrics (Prometheus); unset: not served")] = None
    listen_interface: Annotated[str | None, doc(
        "the private network's interface (e.g. priv0): metrics_listen accepts only "
        "connections that arrive on it (SO_BINDTODEVICE), whatever the firewall; its "
        "address must be one of the interface's")] = None
    etcd: Annotated[list[str] | None, doc(
        "client URLs of the fleet's etcd (http://ADDR:2379): the monitors that name it share "
        "the nodes, each watching its own and sending fencing tokens (docs/operations.md, "
        "\"A fleet of monitors\"); unset: this monitor watches every node, without tokens")] = None
    fleet_prefix: Annotated[str, doc(
        "the fleet's keys in etcd: members/<monitor_id> and owners/<host>/<node> under "
        "it")] = "/backdoors/fleet/"
    lease_ttl_s: Annotated[int, msgspec.Meta(ge=1, le=60), doc(
        "this monitor's lease in the fleet, seconds: its nodes go to the others this long "
        "after it stops renewing it (etcd grants at least 1.5 election timeouts)")] = 1
    fleet_poll_ms: Annotated[Pos, doc(
        "how often the fleet's membership and ownership are read from etcd")] = 100.0
    fleet_reach_ms: Annotated[Pos | None, doc(
        "a monitor reaches an agent while the agent answered it within this long; the "
        "fleet gives each node to a monitor that reaches its agent (to any, when none "
        "does); unset: 2000, or twice the longer of period_ms and timeout_ms")] = None
    etcd_netns: Annotated[str | None, doc(
        "make the connections to etcd from this network namespace (the lab's monitor "
        "namespace)")] = None
    etcd_user: Annotated[str | None, doc(
        "the fleet's etcd user (etcd authentication enabled: anyone who can write to the "
        "fleet's keys can take nodes from every monitor); with etcd_password_file")] = None
    etcd_password_file: Annotated[str | None, doc(
        "a file holding etcd_user's password (its first line; mode 0600)")] = None
    etcd_ca: Annotated[str | None, doc(
        "the CA file that signed etcd's server certificate (https etcd URLs)")] = None
    etcd_cert: Annotated[str | None, doc(
        "this monitor's client certificate for etcd (with etcd_key)")] = None
    etcd_key: Annotated[str | None, doc(
        "the private key of etcd_cert (mode 0600)")] = None
    warnings: Annotated[WarningsConfig | None, doc(
        "[monitor.warnings]: warn other clusters of repaired attacks, and pre-arm against "
        "theirs (docs/monitor.md, \"Warnings from other clusters\"); unset: none")] = None


def _validate(c: MonitorConfig) -> None:
    if not NAME.fullmatch(c.monitor_id):
        raise Invalid(("monitor_id",), "must be 1-64 of A-Z a-z 0-9 _ . -")
    if not c.agents:
        raise Invalid(("agents",), "name at least one agent ([[agents]] host, address)")
    hosts, listed = set(), {}
    for i, a in enumerate(c.agents):
        if not NAME.fullmatch(a.host):
            raise Invalid(("agents", i, "host"), "must be 1-64 of A-Z a-z 0-9 _ . -")
        if a.host in hosts:
            raise Invalid(("agents", i, "host"), f"host {a.host!r} is listed twice")
        hosts.add(a.host)
        try:
            port = parse_address(a.address)[1]
        except ValueError:
            raise Invalid(("agents", i, "address"), f"{a.address!r} is not ADDR:PORT "
                          "(like 10.99.0.1:7700)") from None
        if port == 0:
            raise Invalid(("agents", i, "address"), f"{a.address!r}: port 0 is no agent's "
                          "(the agent's listen port, like 10.99.0.1:7700)")
        if a.public_key is not None:
            try:
                decode_publics({a.host: a.public_key}, "public_key")
            except ConfigError as e:
                raise Invalid(("agents", i, "public_key"), str(e).split(": ", 2)[-1]) from None
        if a.nodes is not None and len(set(a.nodes)) != len(a.nodes):
            raise Invalid(("agents", i, "nodes"), "a node is listed twice")
        for n in a.nodes or ():  # a monitor knows a node by its name: one per name
            if (other := listed.setdefault(n, a.host)) != a.host:
                raise Invalid(("agents", i, "nodes"), f"node {n!r} is listed for agent "
                              f"{other!r} too: node names are unique across a monitor's agents")
    if c.metrics_listen is not None:
        try:
            parse_address(c.metrics_listen)
        except ValueError:
            raise Invalid(("metrics_listen",), f"{c.metrics_listen!r} is not ADDR:PORT "
                          "(like 10.99.0.250:9465)") from None
    if c.listen_interface is not None:
        if (problem := interface_problem(c.listen_interface)) is not None:
            raise Invalid(("listen_interface",), problem)
    for i, url in enumerate(c.etcd or []):
        if not url.startswith(("http://", "https://")):
            raise Invalid(("etcd", i), f"{url!r} is not a URL (like http://10.99.0.250:2379)")
    if c.etcd is not None and not c.etcd:
        raise Invalid(("etcd",), "name at least one etcd URL, or leave the key out")
    if (c.etcd_user is None) != (c.etcd_password_file is None):
        raise Invalid(("etcd_user",), "etcd authentication needs both etcd_user and "
                      "etcd_password_file")
    if (c.etcd_cert is None) != (c.etcd_key is None):
        raise Invalid(("etcd_cert",), "an etcd client certificate needs both etcd_cert and "
                      "etcd_key")
    if c.warnings is not None:
        _validate_warnings(c.warnings)
    if not c.rulesets:
        raise Invalid(("rulesets",), "name at least one ruleset (\"default\")")
    if c.period_ms < 1:
        raise Invalid(("period_ms",), "must be at least 1 ms")
    for key in ("period_ms", "timeout_ms", "action_timeout_ms", "history_s", "fleet_poll_ms",
                "fleet_reach_ms"):
        if getattr(c, key) is not None and not math.isfinite(getattr(c, key)):
            raise Invalid((key,), "must be finite")
    if c.etcd and c.fleet_poll_ms > c.lease_ttl_s * 1000 / 3:
        raise Invalid(("fleet_poll_ms",), f"{c.fleet_poll_ms:g} ms: a fleet member renews its "
                      f"lease once a step, so a step must take at most a third of lease_ttl_s "
                      f"({c.lease_ttl_s} s), or the lease expires between steps")
    if c.etcd and reach_ms(c) < 2 * max(c.period_ms, c.timeout_ms):
        raise Invalid(("fleet_reach_ms",), f"{c.fleet_reach_ms:g} ms: an agent answers at "
                      f"most once a poll (period_ms {c.period_ms:g}), and one poll may wait "
                      f"timeout_ms ({c.timeout_ms:g}); below twice the longer, a reachable "
                      "agent would seem lost between answers, and its nodes would move")


def reach_ms(c: MonitorConfig) -> float:
    """How long an agent that answered counts as reached (fleet_reach_ms, or its
    default)."""
    if c.fleet_reach_ms is not None:
        return c.fleet_reach_ms
    return max(2000.0, 2 * max(c.period_ms, c.timeout_ms))


def _validate_warnings(w: WarningsConfig) -> None:
    if not w.nats:
        raise Invalid(("warnings", "nats"), "name at least one NATS URL (nats://ADDR:4222)")
    from ..fleet.bus import without_password
    for i, url in enumerate(w.nats):
        if not url.startswith(("nats://", "tls://")):
            raise Invalid(("warnings", "nats", i), f"{without_password(url)!r} is not a "
                          "NATS URL (like nats://10.99.0.250:4222)")
        if any(c in url.partition("://")[2].rpartition("@")[0] for c in "/?#"):
            raise Invalid(("warnings", "nats", i), f"{without_password(url)!r}: the user "
                          "or password holds / ? or #, which end a URL's address: use "
                          "letters and digits (openssl rand -hex 24)")
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", w.cluster):  # one token of the subject
        raise Invalid(("warnings", "cluster"), "must be 1-64 of A-Z a-z 0-9 _ - (no dot: "
                      "it is the last token of the warnings' subject, SUBJECT.CLUSTER, "
                      "which the other clusters subscribe to as SUBJECT.*)")
    if not re.fullmatch(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*", w.subject):
        raise Invalid(("warnings", "subject"), f"{w.subject!r} is not a NATS subject "
                      "(tokens of A-Z a-z 0-9 _ - joined by dots)")
    try:
        decode_publics(w.trusted_keys, "trusted_keys")
    except ConfigError as e:
        raise Invalid(("warnings", "trusted_keys"), str(e)) from None
    for i, a in enumerate(w.armed):
        if not re.fullmatch(r"[0-9a-f]{64}", a.exe_sha256):
            raise Invalid(("warnings", "armed", i, "exe_sha256"), "64 lowercase hex digits")
        if not a.comm:
            raise Invalid(("warnings", "armed", i, "comm"), "name the comm")
        if a.kind not in ("fork-bomb", "memory-hog"):
            raise Invalid(("warnings", "armed", i, "kind"), '"fork-bomb" or "memory-hog"')


def validate(config: MonitorConfig, source: str = "monitor config") -> MonitorConfig:
    """Check a config built in code; ConfigError naming the key."""
    try:
        _validate(config)
    except Invalid as e:
        raise e.error(source) from None
    return config


def parse_config(text: str, source: str = "<monitor config>", base: str | None = None) -> MonitorConfig:
    """Decode and check monitor config TOML; relative paths are resolved from `base`."""
    return Document(source, text).decode(lambda table: decode_table(table, base))


def decode_table(table: dict, base: str | None = None) -> MonitorConfig:
    """A MonitorConfig from a parsed TOML table; relative paths are resolved from `base`.
    Invalid names the key at fault (a path within `table`)."""
    c = convert(table, MonitorConfig)
    _validate(c)
    return _resolve(c, base)


def _resolve(c: MonitorConfig, base: str | None) -> MonitorConfig:
    """Relative paths taken from `base` (the config file's folder)."""
    if base is None:
        return c

    def absolute(p: str | None) -> str | None:
        return p if p is None or os.path.isabs(p) else os.path.join(base, p)
    rulesets = [r if not (os.sep in r or r.endswith(".toml")) else absolute(r)
                for r in c.rulesets]
    return msgspec.structs.replace(c, key_file=absolute(c.key_file),
                                   incidents_dir=absolute(c.incidents_dir), rulesets=rulesets,
                                   etcd_password_file=absolute(c.etcd_password_file),
                                   etcd_ca=absolute(c.etcd_ca), etcd_cert=absolute(c.etcd_cert),
                                   etcd_key=absolute(c.etcd_key))


def load_config(path: str) -> MonitorConfig:
    """Read and check the plain monitor config file at `path`."""
    document = Document.read(path, "monitor config")
    return document.decode(lambda table: decode_table(table, document.folder))


def load_monitor_key(config: MonitorConfig):
    """The monitor's signer (agent.keys.Identity), from its private key file."""
    if config.key_file is None:
        raise ConfigError(f"monitor {config.monitor_id}: no key_file in the config (its "
                          "private key file: backdoors keys generate --id "
                          f"{config.monitor_id} FILE)")
    return load_identity(config.key_file, config.monitor_id)


def etcd_client(config: MonitorConfig):
    """A client of the fleet's etcd (`config.etcd`), authenticated as the config says;
    ConfigError if its password or key file is missing or readable by others."""
    from ..fleet import EtcdClient, EtcdError
    password = None
    if config.etcd_password_file is not None:
        check_mode(config.etcd_password_file, "etcd password file")
        try:
            with open(config.etcd_password_file, encoding="utf-8") as f:
                password = f.readline().rstrip("\r\n")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"etcd password file {config.etcd_password_file}: {e}") from None
    if config.etcd_key is not None:
        check_mode(config.etcd_key, "etcd client key file")
    try:
        return EtcdClient(config.etcd, user=config.etcd_user, password=password,
                          ca=config.etcd_ca, cert=config.etcd_cert, key=config.etcd_key)
    except EtcdError as e:
        raise ConfigError(str(e)) from None


def agent_keys(entry: AgentEntry) -> tuple:
    """The public keys of the agent of `entry`; ConfigError if it has none."""
    if entry.public_key is None:
        raise ConfigError(f"agent {entry.host}: no public_key in its [[agents]] entry (the "
                          "agent's \"ed25519:...\" key: backdoors keys show on its key file)")
    return decode_publics({entry.host: entry.public_key}, f"agent {entry.host}")[entry.host]
