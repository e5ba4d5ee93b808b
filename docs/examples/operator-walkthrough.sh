#!/bin/sh
# The operator's path on one host, step by step (docs/operations.md §15): two nodes made
# by `backdoors node create`, keys, one config file, the agent and a monitor, a Python and
# a C service registering their Sensor Boxes, a memory hog, a fork bomb and a hang handled,
# `status` and `incidents`, and everything removed again.
#
#     sudo sh docs/examples/operator-walkthrough.sh STEP [ARGS...]
#
# Run the steps in this order, as root; the long-running ones (agent, monitor, the
# services, hog, bomb) stay in the foreground: give each its own terminal, stop it with
# Ctrl-C (on a real host they are systemd units, docs/operations.md §7):
#
#     nodes keys config check build-c      set up
#     agent | monitor                      the daemons (each in its own terminal)
#     python-service | c-service           the services (each in its own terminal)
#     status [--json]                      both nodes ok, each with its service's box
#     hog | bomb                           a fault; the monitor repairs it (watch `status`)
#     hang, then resume                    the Python service stopped: stalled, recorded
#     incidents [--json]                   what the monitor did
#     teardown                             (after stopping everything else) nodes deleted
#
# This file is the single place these commands live: tests/test_operator_path.py runs
# exactly these steps, so what the docs show is what is tested. Everything it makes is
# named by the variables below (the defaults shown); the files stay in $BD_DIR, not in
# /etc, so the walkthrough never touches a real installation.

set -eu

: "${BACKDOORS:=backdoors}"                   # the command (docs/operations.md §2)
: "${BD_PYTHON:=/opt/backdoors/bin/python3}"  # the Python that has the backdoors package
: "${BD_DIR:=/tmp/backdoors-walkthrough}"     # config, keys, logs and the agent's run_dir
: "${BD_HOST:=walkthrough}"                   # the agent's host name (its cgroup: bd-agent-HOST)
: "${BD_NODES:=demo0 demo1}"                  # two nodes: the Python service, the C service
: "${BD_CGROUP:=backdoors-walkthrough}"       # the nodes' cgroups: BD_CGROUP/NODE
: "${BD_USER:=nobody}"                        # the services' unprivileged user
: "${BD_LISTEN:=127.0.0.1:7700}"              # the agent's RPC (the private network's address)

CONFIG="$BD_DIR/backdoors.toml"
RUN_DIR="$BD_DIR/run"
STEP=${1:-help}
[ $# -gt 0 ] && shift
NODE_PY=${BD_NODES%% *}
NODE_C=${BD_NODES##* }

case "$STEP" in
nodes)
    # A cgroup + netns node each (§5.1): limits low enough that a hog and a bomb hit them.
    # Each prints its [[agent.nodes]] entry; we keep them for the config.
    install -d -m 0755 "$BD_DIR"
    : > "$BD_DIR/nodes.toml"
    for node in $BD_NODES; do
        $BACKDOORS node create "$node" --cgroup "$BD_CGROUP/$node" --memory 256M --pids 64 \
            --netns "$node" >> "$BD_DIR/nodes.toml"
    done
    ;;
keys)
    # §4: the monitor's key and the agent's, each printing its public entry.
    $BACKDOORS keys generate --id m1 "$BD_DIR/m1.key" > "$BD_DIR/monitors.pub"
    $BACKDOORS keys generate --id "$BD_HOST" "$BD_DIR/$BD_HOST.key"
    ;;
config)
    # §6: one file, [agent] and [monitor]; the nodes' entries as `node create` printed them.
    agent_key=$($BACKDOORS keys show "$BD_DIR/$BD_HOST.key" | cut -d'"' -f2)
    {
        cat <<EOF
[agent]
host = "$BD_HOST"
listen = "$BD_LISTEN"
run_dir = "$RUN_DIR"
audit_log = "$BD_DIR/audit.jsonl"
monitors = "$BD_DIR/monitors.pub"
key_file = "$BD_DIR/$BD_HOST.key"

EOF
        cat "$BD_DIR/nodes.toml"
        cat <<EOF

[monitor]
monitor_id = "m1"
key_file = "$BD_DIR/m1.key"
rulesets = ["default"]
incidents_dir = "$BD_DIR/incidents"

[[monitor.agents]]
host = "$BD_HOST"
address = "$BD_LISTEN"
public_key = "$agent_key"
EOF
    } > "$CONFIG"
    ;;
check)
    $BACKDOORS config show --config "$CONFIG"
    $BACKDOORS monitor --config "$CONFIG" --check
    ;;
build-c)
    # docs/sensor-box.md, "Registering from C": the worked example, shipped with the package.
    include=$($BACKDOORS config include-dir)
    cc -std=c11 -O2 -Wall -Wextra -I"$include" "$include/../examples/c/sensor_service.c" \
        -o "$BD_DIR/sensor_service" -lm
    ;;
agent)
    exec $BACKDOORS agent --config "$CONFIG" --sealed
    ;;
monitor)
    exec $BACKDOORS monitor --config "$CONFIG"
    ;;
python-service)
    # §5.1, running the service inside: as an unprivileged user, under a reaping init.
    exec $BACKDOORS node run "$NODE_PY" --user "$BD_USER" --init --run-dir "$RUN_DIR" -- \
        "$BD_PYTHON" -m backdoors.examples.sensor_service py-box
    ;;
c-service)
    exec $BACKDOORS node run "$NODE_C" --user "$BD_USER" --init --run-dir "$RUN_DIR" -- \
        "$BD_DIR/sensor_service" c-box
    ;;
status)
    exec $BACKDOORS status --config "$CONFIG" "$@"
    ;;
hog)
    # Memory grows 80 MB/s towards 400 MB in a node limited to 256 MB: the monitor kills
    # it at 80% of the limit (memory-hog rule), the service next to it lives on.
    exec $BACKDOORS node run "$NODE_PY" --user "$BD_USER" --init --run-dir "$RUN_DIR" -- \
        "$BD_PYTHON" -m backdoors.lab.hogs memory --rate-mb 80 --cap-mb 400
    ;;
bomb)
    # Forks without end against the pids limit (64): the monitor freezes the node, kills
    # the bomb's lineage and thaws it (fork-bomb rule); the C service lives on.
    exec $BACKDOORS node run "$NODE_C" --user "$BD_USER" --init --run-dir "$RUN_DIR" -- \
        "$BD_PYTHON" -m backdoors.lab.hogs forkbomb
    ;;
hang | resume)
    # SIGSTOP the Python service (not its catatonit, not `node run`): its progress sensor
    # stalls past its deadline; `status` shows it stalled, the hang rule records it.
    signal=STOP
    [ "$STEP" = resume ] && signal=CONT
    pid=$(pgrep -u "$BD_USER" -f '^[^ ]+ -m backdoors\.examples\.sensor_service py-box$')
    kill -s "$signal" "$pid"
    echo "$pid"
    ;;
incidents)
    exec $BACKDOORS incidents --config "$CONFIG" "$@"
    ;;
teardown)
    # Stop the agent first (§5.1: delete only nodes no agent serves), then:
    for node in $BD_NODES; do
        $BACKDOORS node delete "$node"
    done
    rm -rf "$BD_DIR"
    ;;
*)
    sed -n '2,/^$/s/^# \{0,1\}//p' "$0" >&2
    exit 2
    ;;
esac
