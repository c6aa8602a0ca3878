"""HTTP connections that cannot be held open forever by a client that stops sending.

uvicorn closes an idle keep-alive connection only after it has answered a request on it, and a
client that then sends part of a request line, or opens a connection and sends part of its headers,
holds the connection (and its memory) indefinitely. StalledConnectionTimeout is uvicorn's h11
protocol with one more timer: whenever the connection waits for a request's headers (fresh, after
a response, or with some header bytes received), it is closed if the headers are not complete
within `header_timeout_s`. A request whose body stalls is timed out by the app (ServerSettings.
body_timeout_s -> 408).
"""
from __future__ import annotations

import asyncio

from uvicorn.protocols.http.h11_impl import H11Protocol


def with_header_timeout(header_timeout_s: float) -> type[H11Protocol]:
    """An H11Protocol class that closes connections whose request headers stall (uvicorn.Config(http=...))."""

    class StalledConnectionTimeout(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self._waiting_for_headers():
                if self._header_timer is None:
                    self._arm()
            else:
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()  # arms uvicorn's keep-alive timer; data then cancels it
            self._arm()

        def _waiting_for_headers(self) -> bool:
            return self.cycle is None or self.cycle.response_complete

        def _arm(self) -> None:
            self._disarm()
            self._header_timer = self.loop.call_later(header_timeout_s, self._stalled)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _stalled(self) -> None:
            self._header_timer = None
            if self._waiting_for_headers() and not self.transport.is_closing():
                self.transport.close()

    return StalledConnectionTimeout
