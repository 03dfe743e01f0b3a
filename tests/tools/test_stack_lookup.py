"""`stack status` and `stack down` find a server by the port it listens on, and only a
server of its kind: whatever else took the port is never stopped."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from pytest import MonkeyPatch

from riverflow.tools import stack
from riverflow.tools.stack import (
    PICK_FROM,
    ServerProcess,
    ephemeral_ports,
    free_ports,
    pid_listening_on,
)


def test_a_port_taken_by_another_program_is_not_taken_for_our_server() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert pid_listening_on(port) == os.getpid()  # found by the port ...
        saved = ServerProcess("redis", 2**22 + 7, f"redis://127.0.0.1:{port}/0", Path("log"))
        # ... but this process is no redis-server: the saved one stands (shown dead)
        assert saved.found() is saved


def test_free_ports_are_distinct_and_avoid_the_ports_taken() -> None:
    # one at a time the kernel may hand out the same port twice: seen in CI as a
    # broker refusing two listeners on one port
    taken = free_ports(5)
    ports = free_ports(50, taken=taken)
    assert len(set(ports)) == 50 and not set(ports) & set(taken)


def test_free_ports_are_below_the_range_outgoing_connections_take_theirs_from() -> None:
    # a port from that range, once let go, can become the local port of any client's
    # connection before our server binds it: seen in CI as a stage exiting with
    # EADDRINUSE on the metrics port picked for it
    low, _ = ephemeral_ports()
    ports = free_ports(50)
    assert all(PICK_FROM <= p < low for p in ports), ports
    for port in ports:  # and nothing holds them
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def test_a_port_something_listens_on_is_never_picked(monkeypatch: MonkeyPatch) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", PICK_FROM))
        s.listen()
        # the only candidate, at first, is the port taken: it is passed over
        picks = iter([PICK_FROM, PICK_FROM, PICK_FROM + 1])
        monkeypatch.setattr(stack._PICK, "randrange", lambda a, b: next(picks))
        assert free_ports(1) == [PICK_FROM + 1]
