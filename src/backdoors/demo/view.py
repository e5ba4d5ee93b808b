"""The demo's live terminal view (rich), or plain lines when stdout is not a terminal.

Hosts and nodes with their state, each node's memory (a VM node's: the guest's
available memory, read from its kernel) and service progress as sparklines, each host's
agent (pid, restarts by its keeper), the client sessions and their
bytes, and the incident timeline as it happens (agent restarts included).
The view reads through its own agent clients, 4 times a second, on a thread of its own.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from datetime import datetime

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from ..common.text import printable
from ..errors import BackdoorsError
from ..lab.agents import keeper_files
from ..sensors import GUEST_BOX, KERNEL_BOX, parse_box

BARS = "▁▂▃▄▅▆▇█"
HISTORY = 32


def sparkline(values) -> str:
    vals = list(values)
    if not vals:
        return ""
    lo, hi = min(vals), max(vals)
    span = (hi - lo) or 1.0
    return "".join(BARS[min(7, int((v - lo) / span * 7.999))] for v in vals)


class View:
    def __init__(self, world, console: Console):
        self.world, self.console = world, console
        self.live_mode = console.is_terminal
        self.phase, self.next = "starting", ""
        self.events: deque[str] = deque(maxlen=10)
        self.verdicts: list[str] = []
        self.nodes = (*world.lab.plan.nodes, *world.lab.plan.vms)
        self._mem = {n.name: deque(maxlen=HISTORY) for n in self.nodes}
        self._rate = {n.name: deque(maxlen=HISTORY) for n in self.nodes}
        self._last_progress: dict[str, tuple[float, float]] = {}
        self._rows: dict[str, dict] = {}
        self._agents: dict[str, dict] = {}  # host -> the keeper's pid file {pid, restarts}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._live: Live | None = None

    # ---- what the runner tells -------------------------------------------------------

    def set_phase(self, phase: str, next_: str = "") -> None:
        self.phase, self.next = phase, next_
        if not self.live_mode:
            self.console.print(f"== {phase}" + (f"   (next: {next_})" if next_ else ""))

    def say(self, text: str) -> None:
        line = f"{datetime.now():%H:%M:%S.%f}"[:-3] + "  " + printable(text)
        self.events.append(line)
        if not self.live_mode:
            self.console.print(Text(line), highlight=False)

    def verdict(self, record: dict) -> None:
        mark = "[green]PASS[/]" if record["passed"] else "[red]FAIL[/]"
        line = f"{mark} {record['title']}: {record['verdict']}"
        self.verdicts.append(line)
        self.console.print(line, highlight=False) if not self.live_mode else None

    def on_incident(self, event: str, inc) -> None:
        if event == "opened":
            self.say(f"{inc.node}: {inc.rule} detected ({inc.onset_to_detect_ms:.0f} ms after onset)")
        elif event == "diagnosis" and inc.diagnosis is not None:
            self.say(f"{inc.node}: diagnosed: {inc.diagnosis.summary[:110]}")
        elif event == "action" and inc.actions:
            a = inc.actions[-1]
            what = {"recover": f"sessions moved to {a.detail.get('target')} "
                               f"({a.detail.get('moved')} sessions)"}.get(a.kind, a.kind)
            self.say(f"{inc.node}: {what}: {a.status} in {a.duration_ms:.0f} ms "
                     f"(+{a.started_ms + a.duration_ms:.0f} ms from detection)")

    # ---- the live part -------------------------------------------------------------------

    def start(self) -> None:
        if self.live_mode:
            self._live = Live(self._render(), console=self.console, refresh_per_second=4,
                              transient=False)
            self._live.start()
        self._thread = threading.Thread(target=self._run, name="bd-demo-view", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2)
        if self._live is not None:
            self._live.update(self._render())
            self._live.stop()

    def _run(self) -> None:
        lab = self.world.lab
        clients = {h.name: lab.agent_client(h.name) for h in lab.plan.hosts}
        try:
            while not self._stop.wait(0.25):
                for host, client in clients.items():
                    self._watch_agent(host)
                    self._poll(host, client)
                if self._live is not None:
                    self._live.update(self._render())
        finally:
            for c in clients.values():
                c.close()

    def _watch_agent(self, host: str) -> None:
        """The agent's pid and restarts from its keeper's pid file; a restart is an event."""
        lab = self.world.lab
        try:
            now = json.loads(keeper_files(lab.plan, lab.plan.host(host))[1].read_text())
        except (OSError, ValueError):
            return
        before = self._agents.get(host)
        if before is not None and now.get("pid") != before.get("pid"):
            self.say(f"{host}: agent restarted by its keeper (pid {before.get('pid')} -> "
                     f"{now.get('pid')}, restart {now.get('restarts')})")
        self._agents[host] = now

    def _poll(self, host: str, client) -> None:
        try:
            infos = {i.name: i for i in client.nodes()}
        except BackdoorsError as e:
            for n in self.nodes:
                if n.host == host:
                    self._rows[n.name] = {"state": f"agent unreachable: {e}"[:40]}
            return
        now = time.monotonic()
        for name, info in infos.items():
            row = {"state": "fenced" if info.fenced else "locked" if info.locked_by else
                   "frozen" if info.frozen else "ok"}
            try:
                boxes = client.sensors(name).boxes
                row["sessions"] = len(client.call("sessions", node=name))
            except BackdoorsError:
                boxes = None
            ticks = 0.0  # the progress of the node's services (the world's boxes), together
            for box, data in (boxes or {}).items():
                try:
                    img = parse_box(data)
                except BackdoorsError:
                    continue
                values = {s.name: s.value for s in img.sensors}
                if box == KERNEL_BOX:
                    self._mem[name].append(values.get("memory_mb", 0.0))
                    row["memory"] = values.get("memory_mb", 0.0)
                    row["pids"] = values.get("pids", 0.0)
                    row["link"] = values.get("link_up", 1.0)
                elif box == GUEST_BOX:
                    self._mem[name].append(values.get("available_mb", 0.0))
                    row["memory_text"] = f"{values.get('available_mb', 0.0):.0f} free"
                    row["pids"] = values.get("tasks", 0.0)
                elif box.startswith(self.world.progress_boxes):
                    ticks += values.get("progress", 0)
            prev = self._last_progress.get(name)
            if boxes is not None:
                self._last_progress[name] = (now, ticks)
            if prev and boxes is not None and now > prev[0]:
                self._rate[name].append(max(0.0, (ticks - prev[1]) / (now - prev[0])))
            if row["state"] == "ok" and (row.get("link", 1.0) < 0.5):
                row["state"] = "link down"
            self._rows[name] = row

    def _render(self):
        w = self.world
        t = Table(title=f"lab {w.lab.name}", expand=False)
        for col in ("node", "host", "state", "memory MB", "memory", "tasks", "service progress/s",
                    "sessions held"):
            t.add_column(col, justify="right" if col not in ("state", "memory", "service progress/s") else "left")
        for n in self.nodes:
            r = self._rows.get(n.name, {})
            state = r.get("state", "?")
            style = {"ok": "green", "fenced": "red", "locked": "yellow", "frozen": "red",
                     "link down": "red"}.get(state, "yellow")
            here = " ◀ sessions" if n.name == w.session_node else ""
            t.add_row(n.name, n.host, Text(state + here, style=style),
                      r.get("memory_text", f"{r.get('memory', 0):.0f}"),
                      sparkline(self._mem[n.name]),
                      f"{r.get('pids', 0):.0f}", sparkline(self._rate[n.name]),
                      str(r.get("sessions", "-")))
        sessions = Text(w.summary())
        agents = Text("agents: " + ", ".join(
            f"{h} pid {a.get('pid')}" + (f" (restarted {a['restarts']}x)" if a.get("restarts") else "")
            for h, a in sorted(self._agents.items())))
        head = Text(f"▶ {self.phase}" + (f"    next: {self.next}" if self.next else ""), style="bold")
        events = Text("\n".join(self.events) or "(no incident yet)")
        return Group(head, t, agents, sessions, Text("incident timeline", style="bold underline"), events,
                     *(Text.from_markup(v) for v in self.verdicts))
