"""Host networking helpers shared by the launchers, the trainer's tests and the benchmarks."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A TCP port that is free on this host right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
