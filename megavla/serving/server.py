"""Websocket policy server speaking openpi's protocol, with batching across clients.

Protocol (what ``openpi_client.WebsocketClientPolicy`` expects): on connect the server sends the
policy's metadata (msgpack); then each binary request (msgpack-numpy observation, see
megavla/serving/schema.py) gets one binary reply ``{"actions": float32 [H, D], "subtask"?: str,
"server_timing": {...}}``. A request that cannot be served gets one *text* frame with the reason
(openpi's client raises it as ``RuntimeError``), the connection stays open and the server logs it once
with the client's address. ``GET /healthz`` answers 200 without a websocket.

Batching: requests of all connections queue for one inference thread; a batch closes when it holds
``max_batch`` requests, when every connected client has a request in it (openpi clients wait for
each reply, so nothing more can come), or ``batch_wait_ms`` after its first request, whichever is
first. While a batch runs, the next one fills.

Security: binds 127.0.0.1 unless told otherwise; with an API key, a connection without the header
``Authorization: Api-Key <key>`` is refused with 401 before the websocket opens; messages above
``max_message_bytes`` close the connection (1009); decoding never unpickles (megavla/serving/wire.py).
"""
from __future__ import annotations

import asyncio
import hmac
import http
import logging
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode
from websockets.protocol import State

from . import wire
from .policy import LoadedPolicy, Request
from .schema import ObservationError

log = logging.getLogger(__name__)

LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass
class ServerOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_batch: int = 8
    batch_wait_ms: float = 10.0
    max_message_bytes: int = 32 << 20
    max_clients: int = 16
    limits: wire.Limits = wire.Limits()


@dataclass
class _Pending:
    request: Request
    connection: ServerConnection
    reply: asyncio.Future
    received: float  # time.monotonic() when the request arrived


def _address(ws: ServerConnection) -> str:
    addr = ws.remote_address
    return f"{addr[0]}:{addr[1]}" if isinstance(addr, tuple) and len(addr) >= 2 else str(addr)


class PolicyServer:
    def __init__(self, policy: LoadedPolicy, options: ServerOptions = ServerOptions()):
        if options.max_batch < 1 or options.batch_wait_ms < 0 or options.max_clients < 1:
            raise ValueError(f"max_batch={options.max_batch}, batch_wait_ms={options.batch_wait_ms}, "
                             f"max_clients={options.max_clients}: need >= 1, >= 0, >= 1")
        self.policy, self.options = policy, options
        self.metadata = wire.packb(policy.metadata)
        self.connections: set[ServerConnection] = set()
        self.pending: list[_Pending] = []
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="megavla-infer")

    # ------------------------------------------------------------------ connection level
    def _process_request(self, connection: ServerConnection, request):
        if request.path == "/healthz":
            return connection.respond(http.HTTPStatus.OK, "OK\n")
        addr = _address(connection)
        key = self.options.api_key
        if key:
            sent = request.headers.get("Authorization", "")
            if not hmac.compare_digest(sent.encode(), f"Api-Key {key}".encode()):
                log.warning("%s: connection refused: %s API key", addr, "wrong" if sent else "no")
                return connection.respond(http.HTTPStatus.UNAUTHORIZED,
                                          "missing or wrong API key: send the header 'Authorization: "
                                          "Api-Key <key>' (openpi_client: api_key=...)\n")
        if len(self.connections) >= self.options.max_clients:
            log.warning("%s: connection refused: %d clients connected (--max-clients)", addr,
                        len(self.connections))
            return connection.respond(http.HTTPStatus.SERVICE_UNAVAILABLE, "server full, retry later\n")
        return None

    async def _handle(self, ws: ServerConnection) -> None:
        addr = _address(ws)
        self.connections.add(ws)
        log.info("%s: connected (%d clients)", addr, len(self.connections))
        generator = self.policy.new_generator()  # same noise stream per connection as in process
        loop = asyncio.get_running_loop()
        prev_total_ms = None
        try:
            await ws.send(self.metadata)
            while True:
                data = await ws.recv()
                received = time.monotonic()
                try:
                    request = self.policy.request(wire.unpackb(data, self.options.limits), generator)
                except (wire.WireError, ObservationError) as e:
                    log.warning("%s: bad request: %s", addr, e)
                    await ws.send(f"megavla serve: bad request: {e}")
                    continue
                pending = _Pending(request, ws, loop.create_future(), received)
                self.pending.append(pending)
                self._wakeup.set()
                result = await pending.reply
                if isinstance(result, ConnectionError):  # it left while queued
                    log.info("%s: disconnected with a request queued", addr)
                    break
                if isinstance(result, Exception):
                    log.warning("%s: request failed: %s", addr, result)
                    await ws.send(f"megavla serve: request failed: {result}")
                    continue
                timing = result.pop("policy_timing")
                timing["queue_ms"] = timing.pop("wait_ms")
                timing["infer_ms"] = timing["prepare_ms"] + timing["model_ms"]
                timing["total_ms"] = (time.monotonic() - received) * 1e3
                if prev_total_ms is not None:
                    timing["prev_total_ms"] = prev_total_ms
                result["server_timing"] = timing
                await ws.send(wire.packb(result))
                prev_total_ms = (time.monotonic() - received) * 1e3
        except ConnectionClosed as e:
            code = e.sent.code if e.sent is not None else (e.rcvd.code if e.rcvd is not None else None)
            if code == CloseCode.MESSAGE_TOO_BIG:
                log.warning("%s: message over the %d-byte limit (--max-message-mb); connection closed",
                            addr, self.options.max_message_bytes)
            else:
                log.info("%s: disconnected (%s)", addr, "no close frame" if code is None else f"code {int(code)}")
        finally:
            self.connections.discard(ws)

    # ------------------------------------------------------------------ batching
    async def _batcher(self) -> None:
        loop = asyncio.get_running_loop()
        opts = self.options
        while True:
            while not self.pending:
                self._wakeup.clear()
                await self._wakeup.wait()
            deadline = loop.time() + opts.batch_wait_ms / 1e3
            while len(self.pending) < min(opts.max_batch, max(self._open_connections(), 1)):
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), max(0.0, deadline - loop.time()))
                except asyncio.TimeoutError:  # (not the builtin before Python 3.11)
                    break
            batch, self.pending = self.pending[: opts.max_batch], self.pending[opts.max_batch:]
            gone = [p for p in batch if p.connection.state is not State.OPEN]
            if gone:  # disconnected while queued: nobody to answer
                log.info("dropped %d queued request(s) of disconnected clients", len(gone))
                for p in gone:
                    p.reply.set_result(ConnectionError("client disconnected"))
                batch = [p for p in batch if p.connection.state is State.OPEN]
                if not batch:
                    continue
            started = time.monotonic()
            try:
                results = await loop.run_in_executor(self.executor, self.policy.infer_batch,
                                                     [p.request for p in batch])
            except Exception as e:  # noqa: BLE001  one failed forward (OOM, a bug) must not stop the server
                log.exception("inference failed on a batch of %d", len(batch))
                results = [RuntimeError(f"inference failed: {type(e).__name__}: {e}")] * len(batch)
            for p, result in zip(batch, results):
                if isinstance(result, dict):
                    result["policy_timing"]["wait_ms"] = (started - p.received) * 1e3
                if not p.reply.done():
                    p.reply.set_result(result)

    def _open_connections(self) -> int:
        """Clients that can still send (a closed one stays in the set until its handler returns)."""
        return sum(ws.state is State.OPEN for ws in self.connections)

    # ------------------------------------------------------------------ lifecycle
    async def serve(self, ready: Callable[[str, int], None] | None = None,
                    stop: asyncio.Event | None = None) -> None:
        """Serve until ``stop`` is set (or forever); ``ready(host, port)`` once listening."""
        opts = self.options
        if opts.host not in LOOPBACK and not opts.api_key:
            log.warning("listening on %s without an API key: anyone who can reach this port can drive "
                        "the policy (set --api-key or MEGAVLA_API_KEY)", opts.host)
        # Our own lines name the client once per event; websockets' INFO lines would repeat them.
        logging.getLogger("websockets").setLevel(logging.WARNING)
        self._wakeup = asyncio.Event()
        batcher = asyncio.create_task(self._batcher())
        stop = stop or asyncio.Event()
        try:
            async with serve(self._handle, opts.host, opts.port, process_request=self._process_request,
                             max_size=opts.max_message_bytes, compression=None) as server:
                port = server.sockets[0].getsockname()[1]
                if ready is not None:
                    ready(opts.host, port)
                await stop.wait()
                # Queued requests will not be served: release their handlers so that the server's
                # close (which waits for every handler) cannot hang on them.
                for p in self.pending:
                    if not p.reply.done():
                        p.reply.set_result(ConnectionError("server shutting down"))
                self.pending = []
        finally:
            batcher.cancel()
            self.executor.shutdown(wait=False, cancel_futures=True)

    def run(self, ready: Callable[[str, int], None] | None = None) -> None:
        """Blocking; SIGINT / SIGTERM stop it cleanly."""
        async def main() -> None:
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            await self.serve(ready, stop)
        asyncio.run(main())
