"""The ground floor: what several packages share, importing none of them.

- `configfile`: reading a TOML file into typed msgspec Structs, errors at `file:line: key`;
- `runtime`: the node-side runtime contract (environment variables, socket paths, the
  registration client a service uses to hand regions and sessions to its agent);
- `ipc`: length-framed msgpack over Unix sockets with descriptor passing (SCM_RIGHTS), and
  the one rule for a stale socket file;
- `procs`: process identity (alive, the same process as before by its start time);
- `logs`: the end of a child's log, quoted in an error;
- `preamble`: the check of the magic, version and sizes a shared-memory region starts with;
- `fdstore`: systemd's notify protocol, both sides (READY, WATCHDOG, the fd store and
  LISTEN_FDS), spoken by the agent and by the lab's keeper.

Only `backdoors.errors` sits beside it; everything else in the package is above it.
"""
