"""The C registration client (backdoors/register.h) against a real agent, and the worked
example of docs/sensor-box.md compiled as an operator would: -I"$(backdoors config include-dir)"."""

import os
import signal
import shutil
import subprocess
from pathlib import Path

import msgspec
import pytest
from test_agent_support import agent_lab, prefix, read_line, wait_for
from test_nodes_support import PY

from backdoors.agent.local import LocalReply
from backdoors.common.runtime import AGENT_SOCKET_ENV
from backdoors.sensors import parse_box

from conftest import unavailable

__all__ = ["agent_lab", "prefix"]

ROOT = Path(__file__).resolve().parents[1]
FLAGS = ["-std=c11", "-O2", "-Wall", "-Wextra", "-Werror"]

# The pattern gcc 12 warned on ("box.hdr may be used uninitialized"): init, check, add, close;
# and a failed init leaves an empty box that adds nothing and closes as a no-op.
UNINIT = r"""
#include "backdoors/sensorbox.h"
#include "backdoors/register.h"
#include <stdio.h>
int main(void) {
    struct bd_sensorbox box;
    if (bd_sb_init(&box, "x", 0, NULL) != -EINVAL || bd_sb_progress(&box, "r", 1.0)) return 3;
    bd_sb_close(&box);
    int rc = bd_sb_init(&box, "x", 8, NULL);
    if (rc < 0) { fprintf(stderr, "init: %s\n", strerror(-rc)); return 1; }
    struct bd_sensor *r = bd_sb_progress(&box, "r", 1.0);
    if (r) bd_sb_tick(r);
    bd_sb_close(&box);
    bd_sb_close(&box);
    return r ? 0 : 2;
}
"""


def gcc(*args: str) -> None:
    done = subprocess.run(["gcc", *FLAGS, *args], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.fixture(scope="module")
def include_dir() -> str:
    if not shutil.which("gcc"):
        unavailable("gcc is needed to compile the C registration client")
    out = subprocess.run([PY, "-m", "backdoors", "config", "include-dir"], check=True,
                         capture_output=True, text=True).stdout.strip()
    assert Path(out, "backdoors", "register.h").is_file()
    return out


@pytest.fixture(scope="module")
def built(include_dir, tmp_path_factory) -> dict[str, str]:
    """The worked example and the test probe, built with -O2 -Wall -Wextra -Werror."""
    out = tmp_path_factory.mktemp("c")
    example = Path(include_dir).parent / "examples/c/sensor_service.c"
    gcc("-I", include_dir, str(example), "-o", str(out / "sensor_service"), "-lm")
    gcc("-I", include_dir, str(ROOT / "tests/c/register_probe.c"), "-o", str(out / "probe"))
    return {"service": str(out / "sensor_service"), "probe": str(out / "probe")}


def probe(programs, lab, node: str | None, *args: str,
          env: dict | None = None) -> list[tuple[int, str]]:
    """Run the probe in `node` (None: on the host), told node n0's socket unless `env` says
    otherwise; its result lines as (status, message)."""
    env = env if env is not None else dict(os.environ, **{AGENT_SOCKET_ENV: lab.socket_path("n0")})
    argv = [programs["probe"], *args]
    if node is None:
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=30)
        out, status = done.stdout, done.returncode
    else:
        proc = lab.nodes[node].run(argv, env=env, stdout=subprocess.PIPE)
        out, status = proc.communicate(timeout=30)[0].decode(), proc.returncode
    assert status == 0, f"the probe {args} ended with status {status} (a negative one: killed " \
                        f"by that signal, e.g. -13 SIGPIPE)"
    lines = [line.split(" ", 1) for line in out.splitlines()]
    return [(int(status), (rest or [""])[0]) for status, *rest in lines]


# ---- no agent needed -------------------------------------------------------------------


def test_the_headers_compile_clean_alone_in_either_order(include_dir, tmp_path):
    for order in (["sensorbox.h"], ["register.h"], ["sensorbox.h", "register.h"],
                  ["register.h", "sensorbox.h"]):
        src = tmp_path / "alone.c"
        src.write_text("".join(f'#include "backdoors/{h}"\n' for h in order))
        gcc("-Wpedantic", "-I", include_dir, "-c", str(src), "-o", str(tmp_path / "alone.o"))
    src = tmp_path / "uninit.c"
    src.write_text(UNINIT)
    gcc("-I", include_dir, str(src), "-o", str(tmp_path / "uninit"), "-lm")
    assert subprocess.run([str(tmp_path / "uninit")]).returncode == 0


def test_without_a_socket_or_with_a_bad_name_nothing_is_sent(built):
    env = {k: v for k, v in os.environ.items() if k != AGENT_SOCKET_ENV}
    assert probe(built, None, None, "sealed", "region", "r", env=env) == [
        (-2, f"no agent socket: pass socket_path or set {AGENT_SOCKET_ENV}")]
    env[AGENT_SOCKET_ENV] = "/nonexistent/agent.sock"
    assert probe(built, None, None, "sealed", "region", "r", env=env) == [
        (-2, "agent socket /nonexistent/agent.sock: No such file or directory")]
    assert probe(built, None, None, "sealed", "region", "x" * 65, env=env) == [
        (-1, f"region name '{'x' * 65}' must have 1 to 64 characters")]


def test_the_reply_decoder_reads_what_the_agent_encodes(built):
    def decode(payload: bytes) -> str:
        return subprocess.run([built["probe"], "reply"], input=payload, capture_output=True,
                              check=True).stdout.decode()

    encode = msgspec.msgpack.encode
    region = {"name": "svc", "kind": "sensorbox", "size": 1 << 40, "writable": False,
              "more": [1.5, -3, None, b"x" * 300, {"a": -(1 << 40)}, "y" * 7000]}
    assert decode(encode(LocalReply(True, region=region))) == "1\n"
    assert decode(encode(LocalReply(False, error="é" * 200))) == "0 " + "é" * 200 + "\n"
    assert decode(encode(LocalReply(False))) == "0 \n"
    good = encode(LocalReply(True))
    for bad in (b"", good[:-1], good + b"\x00", encode({"ok": 1}), encode({"error": "x"}),
                encode([True]), encode({"ok": True, "x": [[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]}),
                b"\x81\xa2ok\xc1", b"\xdf\xff\xff\xff\xff"):
        assert decode(bad) == "-1\n", bad


# ---- against a real agent ----------------------------------------------------------------


def test_the_worked_example_registers_and_its_sensors_move(agent_lab, built):
    lab = agent_lab()
    env = dict(os.environ, **{AGENT_SOCKET_ENV: lab.socket_path("n0")})
    proc = lab.nodes["n0"].run([built["service"], "c-svc"], env=env, stdout=subprocess.PIPE)
    lab.procs.append(proc)
    assert read_line(proc) == "registered c-svc\n"
    c = lab.client()
    info = {r.name: r for r in c.regions("n0")}["c-svc"]
    assert (info.kind, info.pid, info.writable) == ("sensorbox", proc.pid, False)

    def requests() -> float:
        box = parse_box(c.sensors("n0").boxes["c-svc"])
        assert box.owner_pid == proc.pid
        assert [s.name for s in box.sensors] == ["requests", "queue_depth"]
        return box.sensors[0].value

    first = requests()
    wait_for(lambda: requests() > first, what="the requests counter to move")
    proc.send_signal(signal.SIGTERM)  # the example unregisters its box and exits 0
    assert proc.wait(10) == 0
    assert [r.name for r in c.regions("n0")] == ["kernel"]


def test_a_refusal_prints_the_agents_reason_and_exits_non_zero(agent_lab, built):
    lab = agent_lab()
    env = dict(os.environ, **{AGENT_SOCKET_ENV: lab.socket_path("n0")})
    # The worked example run on the host, outside the node.
    done = subprocess.run([built["service"], "c-out"], env=env, capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.startswith("register: the agent refused register of 'c-out': a node "
                                  "registers only for itself: process ")
    assert "is not inside node n0" in done.stderr
    results = probe(built, lab, None, "sealed", "region", "out", "20")
    assert len(results) == 20
    assert all(s == -3 and "registers only for itself" in m for s, m in results), results
    # Refused at accept: a request sent after the agent closed meets EPIPE, and the refusal
    # queued before it is still read as the answer.
    [(status, message)] = probe(built, lab, None, "late", "late")
    assert status == -3 and "registers only for itself" in message
    # Inside the node: an unsealed memfd, and a memfd that is no Sensor Box.
    [(status, message)] = probe(built, lab, "n0", "unsealed", "region", "loose")
    assert status == -3 and message.startswith(
        "the agent refused register of 'loose': the memfd is not sealed against shrinking")
    [(status, message)] = probe(built, lab, "n0", "sealed", "sensorbox", "blank")
    assert status == -3 and "not a Sensor Box" in message
    assert [r.name for r in lab.client().regions("n0")] == ["kernel"]


def test_a_writable_region_and_unregister(agent_lab, built):
    lab = agent_lab()
    assert probe(built, lab, "n0", "sealed", "writable", "mailbox") == [(0, "")]
    assert {r.name: r.writable for r in lab.client().regions("n0")} == {
        "kernel": False, "mailbox": True}
    assert probe(built, lab, "n0", "unregister", "mailbox") == [(0, "")]
    [(status, message)] = probe(built, lab, "n0", "unregister", "mailbox")
    assert (status, message) == (-3, "the agent refused unregister of 'mailbox': node n0 has "
                                     "no region 'mailbox'")
    assert [r.name for r in lab.client().regions("n0")] == ["kernel"]
