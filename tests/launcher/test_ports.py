"""Which ports are busy and which addresses are this machine's, on real sockets."""

from __future__ import annotations

import socket

from sglang_dp.launcher.ports import busy_ports, is_local_address


def test_busy_ports() -> None:
    with socket.socket() as taken, socket.socket() as bound_only:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        bound_only.bind(("127.0.0.1", 0))
        held = bound_only.getsockname()[1]
        free = next(p for p in range(busy + 1, 65535) if p != held and not busy_ports([p]))
        assert busy_ports([busy, free, held]) == [busy, held]
    assert busy_ports([]) == []


def test_is_local_address() -> None:
    assert is_local_address("127.0.0.1") and is_local_address("0.0.0.0")
    assert not is_local_address("192.0.2.1")  # TEST-NET-1: nobody's
