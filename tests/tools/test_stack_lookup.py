"""`stack status` and `stack down` find a server by the port it listens on, and only a
server of its kind: whatever else took the port is never stopped."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from riverflow.tools.stack import ServerProcess, free_ports, pid_listening_on


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
