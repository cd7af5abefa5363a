"""What the simulated worker's handler needs of a response, whichever HTTP server carries it.

The lean server's `httpserver.Responder` has this shape, and so does `sim.asgi.AsgiResponder`
over uvicorn + Starlette; the handler (`server.SimWorker`) and fault injection (`faults`) write
through it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from sglang_dp.httpserver import JSON, SSE


class Responder(Protocol):
    """One response as the handler writes it, whichever server carries it: the lean server's
    `httpserver.Responder`, or `sim.asgi.AsgiResponder` over uvicorn + Starlette."""

    done: bool  # the response is over (or broken)
    started: bool  # bytes of it were written
    streaming: bool
    on_disconnect: Callable[[], object] | None  # called when the client goes away first

    @property
    def closed(self) -> bool:
        """The client went away or the response is over: writing is pointless."""

    def send(
        self, code: int, body: bytes, content_type: bytes = JSON, headers: bytes = b""
    ) -> None:
        """The whole response at once."""

    def start_stream(
        self, code: int = 200, content_type: bytes = SSE, headers: bytes = b""
    ) -> None:
        """A streamed response begins (its head may wait for the first chunk)."""

    def write(self, data: bytes) -> None:
        """One chunk of a stream."""

    def end(self, data: bytes = b"") -> None:
        """The last chunk and the clean end of a stream."""

    def abort_stream(self, data: bytes = b"") -> None:
        """A broken response: `data`, then a close without the clean end."""

    # fault injection
    def write_unframed(self, data: bytes) -> None:
        """Bytes outside any framing (--garble-rate)."""

    def send_partial(self, code: int, body: bytes, sent: int, content_type: bytes = JSON) -> None:
        """A head declaring len(body) bytes, and only `sent` of them; then `abort_stream` or
        `reset` (--truncate-rate, --reset-rate)."""

    def reset(self) -> None:
        """Close with a TCP reset (--reset-rate)."""
