"""A TCP proxy on 127.0.0.1 that breaks the network on command, for link tests.

Between the device uploader and the cloud server, it can:

* ``pass``      - forward bytes both ways (a healthy link);
* ``blackhole`` - accept connections but forward nothing, and stop forwarding on connections
  that are already open (a dead route, a NAT that forgot us): the client only notices through
  its own timeouts. A blackholed connection stays dead after the mode changes back, as a real
  one would once bytes have vanished;
* ``reset``     - answer every new connection, and every open one as soon as it moves a byte,
  with a TCP RST (SO_LINGER 0 then close): a crashed peer or a firewall rejecting us.
* ``lose_replies`` - forward requests to the server but let its replies vanish (an asymmetric
  route): the server acts, the client never hears back. The sharpest test of idempotency.

``cut()`` resets every open connection at once (a router reboot) without changing the mode.

Usage::

    async with TcpProxy("127.0.0.1", upstream_port) as proxy:
        url = f"http://127.0.0.1:{proxy.port}"
        proxy.mode = "blackhole"
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from dataclasses import dataclass, field
from typing import Literal

Mode = Literal["pass", "blackhole", "reset", "lose_replies"]


def _rst(writer: asyncio.StreamWriter) -> None:
    """Close with RST instead of FIN, so the peer sees ECONNRESET."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


@dataclass(eq=False)  # hashed by identity: kept in a set
class _Conn:
    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None
    dead: bool = False  # blackholed once: never forwards again
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def reset(self) -> None:
        _rst(self.client)
        if self.upstream is not None:
            _rst(self.upstream)


class TcpProxy:
    def __init__(self, upstream_host: str, upstream_port: int, *, mode: Mode = "pass") -> None:
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self.mode: Mode = mode
        self.port = 0
        self.accepted = 0
        self.resets = 0
        self.forwarded_bytes = 0
        self._server: asyncio.Server | None = None
        self._conns: set[_Conn] = set()
        self._handlers: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> TcpProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for conn in list(self._conns):
            conn.reset()
        for task in list(self._handlers):
            task.cancel()
        if self._handlers:
            await asyncio.gather(*self._handlers, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    def cut(self) -> int:
        """Reset every open connection now; returns how many were cut."""
        conns = list(self._conns)
        for conn in conns:
            conn.reset()
        self.resets += len(conns)
        return len(conns)

    @property
    def open_connections(self) -> int:
        return len(self._conns)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self.accepted += 1
        conn = _Conn(client=writer)
        self._conns.add(conn)
        try:
            if self.mode == "reset":
                self.resets += 1
                conn.reset()
                return
            if self.mode == "blackhole":
                conn.dead = True
                await self._swallow(reader)
                return
            try:
                up_reader, up_writer = await asyncio.open_connection(
                    self.upstream_host, self.upstream_port
                )
            except OSError:
                self.resets += 1
                conn.reset()
                return
            conn.upstream = up_writer
            await asyncio.gather(
                self._pump(conn, reader, up_writer, reply=False),
                self._pump(conn, up_reader, writer, reply=True),
                return_exceptions=True,
            )
        finally:
            self._conns.discard(conn)
            self._handlers.discard(task)
            for w in (conn.client, conn.upstream):
                if w is not None and not w.transport.is_closing():
                    w.transport.abort()

    async def _swallow(self, reader: asyncio.StreamReader) -> None:
        with contextlib.suppress(OSError):
            while await reader.read(65536):
                pass

    async def _pump(
        self, conn: _Conn, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
        *, reply: bool,
    ) -> None:
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    if conn.dead:
                        # The client gave up on a dead route: tear the server side down too,
                        # as the server's own keepalive eventually would.
                        conn.reset()
                    elif writer.can_write_eof():  # half-close: pass the FIN on
                        with contextlib.suppress(OSError):
                            writer.write_eof()
                    return
                if self.mode == "reset":
                    self.resets += 1
                    conn.reset()
                    return
                if (
                    self.mode == "blackhole"
                    or conn.dead
                    or (reply and self.mode == "lose_replies")
                ):
                    conn.dead = True
                    continue  # the bytes vanish
                writer.write(data)
                self.forwarded_bytes += len(data)
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            conn.reset()
