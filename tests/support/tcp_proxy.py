"""A TCP proxy the tests put between the service and PostgreSQL or Redis, to break the link.

It runs its own event loop in a thread, so it serves an app in the test's loop and a service
running as a process alike. Faults:

- ``reset()``: every open connection is closed with a TCP reset (the peer reads ECONNRESET), as
  when a server restarts or a NAT forgets a flow; new connections are accepted again at once;
- ``blackhole(True)``: nothing is forwarded any more, either way, on open or new connections —
  packets dropped, nobody answering, the worst case for timeouts; ``blackhole(False)`` ends it
  (connections opened during the black hole stay silent, as real ones would have timed out);
- ``refuse(True)``: new connections are refused (closed at once), open ones are reset.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class TcpProxy:
    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self._blackhole = False
        self._refuse = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._links: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._silenced: set[asyncio.StreamWriter] = set()

    # --- control (from any thread) --------------------------------------------------------------
    def start(self) -> TcpProxy:
        self._thread.start()
        self._run(self._listen())
        return self

    def stop(self) -> None:
        self._run(self._close_all())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)

    def reset(self) -> None:
        self._run(self._reset_all())

    def blackhole(self, on: bool) -> None:
        self._blackhole = on

    def refuse(self, on: bool) -> None:
        self._refuse = on
        if on:
            self.reset()

    @property
    def open_connections(self) -> int:
        return len(self._links)

    def _run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout=10)

    # --- the proxy (in its own loop) -------------------------------------------------------------
    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        if self._refuse:
            _abort(client_w)
            return
        try:
            server_r, server_w = await asyncio.open_connection(*self.target)
        except OSError:
            _abort(client_w)
            return
        link = (client_w, server_w)
        self._links.add(link)
        if self._blackhole:
            self._silenced.update(link)
        try:
            await asyncio.gather(
                self._pump(client_r, server_w, client_w), self._pump(server_r, client_w, server_w)
            )
        finally:
            self._links.discard(link)
            self._silenced.difference_update(link)
            for writer in link:
                writer.close()

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, own: asyncio.StreamWriter
    ) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while data := await reader.read(65536):
                if self._blackhole:
                    self._silenced.add(own)
                if own in self._silenced or writer in self._silenced:
                    continue  # swallowed: the other side never hears of it
                writer.write(data)
                await writer.drain()
        with contextlib.suppress(OSError):
            writer.close()

    async def _reset_all(self) -> None:
        for client_w, server_w in list(self._links):
            _abort(client_w)
            _abort(server_w)

    async def _close_all(self) -> None:
        await self._reset_all()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


def _abort(writer: asyncio.StreamWriter) -> None:
    """Close with RST rather than FIN: SO_LINGER on, timeout zero."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
