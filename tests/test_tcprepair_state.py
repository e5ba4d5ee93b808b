"""TcpState as data: msgpack round trip, validation, the send-queue split. No kernel needed."""

from __future__ import annotations

import re
import socket

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from backdoors.errors import TcpRepairError
from backdoors.tcprepair import TcpOptions, TcpState, TcpWindow


def make_state(**changes) -> TcpState:
    fields = dict(
        family=socket.AF_INET,
        local_addr="10.0.0.5",
        local_port=80,
        remote_addr="10.0.0.9",
        remote_port=41000,
        snd_seq=0xFFFFFFF0,
        rcv_seq=12345,
        recv_queue=b"GET / HTTP/1.1\r\n",
        send_queue=bytes(range(256)) * 4,
        unsent=100,
        options=TcpOptions(
            mss=1448, sack=True, timestamps=True, wscale=True, snd_wscale=7, rcv_wscale=9
        ),
        window=TcpWindow(
            snd_wl1=12000, snd_wnd=64240, max_window=64240, rcv_wnd=65535, rcv_wup=12345
        ),
        timestamp=0x89ABCDEF,
        nodelay=True,
        handed=5000,
        read=700,
    )
    fields.update(changes)
    return TcpState(**fields)


def test_round_trip_keeps_every_field():
    state = make_state()
    blob = state.encode()
    assert isinstance(blob, bytes)
    assert TcpState.decode(blob) == state


@given(
    recv=st.binary(max_size=2000),
    send=st.binary(max_size=2000),
    seqs=st.tuples(*[st.integers(0, 0xFFFFFFFF)] * 3),
    data=st.data(),
)
def test_round_trip_of_any_queues_and_sequence_numbers(recv, send, seqs, data):
    unsent = data.draw(st.integers(0, len(send)))
    snd_seq, rcv_seq, timestamp = seqs
    state = make_state(
        recv_queue=recv,
        send_queue=send,
        unsent=unsent,
        snd_seq=snd_seq,
        rcv_seq=rcv_seq,
        timestamp=timestamp,
    )
    assert TcpState.decode(state.encode()) == state


def test_ipv6_state_round_trips_and_describes_itself():
    state = make_state(family=socket.AF_INET6, local_addr="fd00::5", remote_addr="fd00::9")
    assert TcpState.decode(state.encode()) == state
    assert state.describe() == "[fd00::5]:80 <-> [fd00::9]:41000"


def test_send_queue_splits_into_sent_and_never_sent():
    state = make_state()
    assert len(state.never_sent) == 100
    assert state.sent_unacked + state.never_sent == state.send_queue
    assert make_state(unsent=0).never_sent == b""


@pytest.mark.parametrize(
    "blob", [b"", b"\xc1", b"not msgpack at all", msgspec.msgpack.encode({"family": 2})]
)
def test_decode_of_something_else_raises(blob):
    with pytest.raises(TcpRepairError, match="not a TcpState"):
        TcpState.decode(blob)


@pytest.mark.parametrize(
    "changes, problem",
    [
        ({"unsent": 5000}, "invalid TcpState for 10.0.0.5:80 <-> .*: "
                           + re.escape("unsent 5000 outside send queue of 1024")),
        ({"snd_seq": 1 << 32}, re.escape("<= 4294967295 - at `$.snd_seq`")),
        ({"remote_port": 0}, re.escape(">= 1 - at `$.remote_port`")),
        ({"family": socket.AF_UNIX}, re.escape("at `$.family`")),
        ({"options": TcpOptions(mss=0)}, re.escape(">= 1 - at `$.options.mss`")),
        ({"local_addr": "10.0.0.300"}, "local_addr '10.0.0.300' is not an IP address"),
    ],
)
def test_decode_refuses_impossible_states(changes, problem):
    blob = make_state(**changes).encode()
    with pytest.raises(TcpRepairError, match=problem):
        TcpState.decode(blob)


# -- hostile input (issue 10, finding 13): every integer checked, the field named ---------

_HOSTILE = [
    ({"window": {"snd_wl1": 2**32}}, "window.snd_wl1"),
    ({"window": {"rcv_wnd": -1}}, "window.rcv_wnd"),
    ({"window": {"max_window": 2**63}}, "window.max_window"),
    ({"options": {"mss": 0}}, "options.mss"),
    ({"options": {"snd_wscale": 15}}, "options.snd_wscale"),
    ({"options": {"rcv_wscale": -1}}, "options.rcv_wscale"),
    ({"local_port": 70000}, "local_port"),
    ({"remote_port": 0}, "remote_port"),
    ({"snd_seq": 2**32}, "snd_seq"),
    ({"timestamp": -5}, "timestamp"),
    ({"family": 99}, "family"),
    ({"handed": -1}, "handed"),
    ({"read": -2}, "read"),
    ({"unsent": -1}, "unsent"),
    ({"local_addr": "not-an-address"}, "local_addr"),
    ({"remote_addr": "1" * 500}, "remote_addr"),
]


@pytest.mark.parametrize(("change", "field"), _HOSTILE, ids=[f for _, f in _HOSTILE])
def test_decode_refuses_out_of_range_fields_naming_them(change, field):
    """A hostile peer's TcpState fails at decode with TcpRepairError naming the field,
    never later as a struct.error inside restore (which leaked the restored sockets)."""
    raw = msgspec.msgpack.decode(make_state().encode())
    for key, value in change.items():
        if isinstance(value, dict):
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    with pytest.raises(TcpRepairError, match=re.escape(field)):
        TcpState.decode(msgspec.msgpack.encode(raw))
