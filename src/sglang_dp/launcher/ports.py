"""Which ports are free on this machine, now (shell: it binds sockets).

- `busy_ports(ports, host)`: the ports a server could not bind right now. A port is busy when a
  socket with SO_REUSEADDR, as servers use, cannot bind it (so one whose old connections linger
  in TIME_WAIT is free).
- `is_local_address(host)`: whether `host` is an address of this machine (binding it does not
  fail with EADDRNOTAVAIL), i.e. whether its ports can be checked from here.
- `free_port(host)`: one port nobody listens on, from the ephemeral range (for a single server).
- `free_port_band(size)`: `size` consecutive free ports below the ephemeral range (from 32768,
  Linux's default), scanned from 21000, or tried at random with an `rng` (tests side by side).
"""

from __future__ import annotations

import errno
import random
import socket
from collections.abc import Iterable

from sglang_dp.launcher.plan import WORKER_HOST

EPHEMERAL_START = 32768  # Linux's default ip_local_port_range starts here
BAND_SCAN_START = 21000
BAND_TRIES = 500


def free_port(host: str = WORKER_HOST) -> int:
    """A port nobody listens on right now (from the ephemeral range: for a single server)."""
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def free_port_band(size: int, rng: random.Random | None = None, host: str = WORKER_HOST) -> int:
    """The first of `size` consecutive free ports, below the ephemeral range.

    Worker port bands avoid the ephemeral range: on a busy machine outgoing connections take
    random local ports there, and a band of tens of ports would often collide with one. With
    `rng`, bases are tried at random (tests running side by side), else scanned from 21000.
    """
    low, high = BAND_SCAN_START, EPHEMERAL_START - size
    bases = (rng.randrange(low, high) for _ in range(BAND_TRIES)) if rng else range(low, high, size)
    for base in bases:
        if not busy_ports(range(base, base + size), host):
            return base
    raise RuntimeError(f"no {size} consecutive free ports below {EPHEMERAL_START}")


def busy_ports(ports: Iterable[int], host: str = WORKER_HOST) -> list[int]:
    """The ports among `ports` that a server could not bind on `host` right now."""
    return [port for port in ports if not _can_bind(host, port)]


def is_local_address(host: str) -> bool:
    """Whether `host` is an address of this machine (its ports can be checked from here)."""
    return not _bind_error_is(host, errno.EADDRNOTAVAIL)


def _bind_error_is(host: str, code: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, 0))
        except OSError as exc:
            return exc.errno == code
    return False


def _can_bind(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        # As servers do: a port whose old connections linger in TIME_WAIT is free to them.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True
