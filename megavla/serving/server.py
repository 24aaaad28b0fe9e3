"""Websocket policy server speaking openpi's protocol, with batching across clients.

Protocol (what ``openpi_client.WebsocketClientPolicy`` expects): on connect the server sends the
policy's metadata (msgpack); then each binary request (msgpack-numpy observation, see
megavla/serving/schema.py) gets one binary reply ``{"actions": float32 [H, D], "subtask"?: str,
"server_timing": {...}}``. A request that cannot be served gets one *text* frame with the reason
(openpi's client raises it as ``RuntimeError``), the connection stays open and the server logs it once
with the client's address. ``GET /healthz`` answers 200 without a websocket.

Batching: requests of all connections queue for one inference thread; a batch closes when it holds
``max_batch`` requests, when every *active* client has a request in it (openpi clients wait for
each reply, so nothing more can come; active: connected, or last answered, within
``max(1 s, batch_wait_ms)`` and not waiting on the running batch, so idle connections cost no
wait), or ``batch_wait_ms`` after its first request, whichever is first. While a batch runs, the
next one fills.

Isolation (one client's input or socket never costs another anything): a request is checked alone
before it joins a batch (schema, dtypes, shapes, finite values, the state within the range the model
was trained on: schema.py); should a batch still fail, each of its requests is run again alone, so
only the one that fails gets the error; actions that come out non-finite are an error for that
request, never sent. A connection that sends nothing for ``idle_timeout_s`` is closed; one that does
not read its replies for ``send_timeout_s`` is dropped (its handler, not the batcher, waits on it);
connection limits per server, address and API key with eviction of idle connections: admission.py.

Security: binds 127.0.0.1 unless told otherwise; with API keys, a connection without the header
``Authorization: Api-Key <key>`` (one of them) is refused with 401 before the websocket opens;
messages above ``max_message_bytes`` close the connection (1009); decoding never unpickles
(megavla/serving/wire.py).
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

import numpy as np
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode
from websockets.http11 import Request as HttpRequest, Response as HttpResponse
from websockets.protocol import State

from . import wire
from .admission import Admission, Client, ConnectionLimits
from .policy import LoadedPolicy, Request
from .schema import ObservationError

log = logging.getLogger(__name__)

LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass
class ServerOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    api_keys: tuple[str, ...] = ()  # more keys; each has its own max_clients_per_key
    max_batch: int = 8
    batch_wait_ms: float = 10.0
    max_message_bytes: int = 32 << 20
    max_clients: int = 16
    max_clients_per_address: int = 8
    max_clients_per_key: int = 8
    idle_timeout_s: float = 300.0   # no request for this long: closed
    evict_idle_s: float = 2.0       # silent this long: may be closed to admit another client
    send_timeout_s: float = 30.0    # a reply not taken by the client in this time: connection dropped
    limits: wire.Limits = wire.Limits()

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(k for k in (self.api_key, *self.api_keys) if k))


@dataclass
class _Pending:
    request: Request
    client: Client
    reply: asyncio.Future
    received: float  # time.monotonic() when the request arrived


class _ErrorLog:
    """One log line per failed request, with the client's address, up to ``burst`` lines per
    connection per ``window_s``; beyond that the errors are counted and summed up in one line (with
    the last one): a client looping on bad requests must not fill the server's disk."""

    def __init__(self, addr: str, burst: int = 50, window_s: float = 10.0):
        self.addr, self.burst, self.window_s = addr, burst, window_s
        self.window_start, self.lines, self.skipped, self.last = 0.0, 0, 0, ""

    def log(self, message: str) -> None:
        now = time.monotonic()
        if now - self.window_start >= self.window_s:
            self.flush()
            self.window_start, self.lines = now, 0
        self.last = message
        if self.lines < self.burst:
            self.lines += 1
            log.warning("%s: %s", self.addr, message)
        else:
            self.skipped += 1

    def flush(self) -> None:
        if self.skipped:
            log.warning("%s: %d more failed request(s) not logged one by one (over %d lines in %g s); the "
                        "last: %s", self.addr, self.skipped, self.burst, self.window_s, self.last[:200])
        self.skipped = 0


class _SlowReader(Exception):
    """The client did not take a reply within send_timeout_s."""


def _address(ws: ServerConnection) -> tuple[str, str]:
    """(host, "host:port")."""
    addr = ws.remote_address
    if isinstance(addr, tuple) and len(addr) >= 2:
        return str(addr[0]), f"{addr[0]}:{addr[1]}"
    return str(addr), str(addr)


class PolicyServer:
    def __init__(self, policy: LoadedPolicy, options: ServerOptions = ServerOptions()):
        if options.max_batch < 1 or options.batch_wait_ms < 0:
            raise ValueError(f"max_batch={options.max_batch}, batch_wait_ms={options.batch_wait_ms}: "
                             "need >= 1, >= 0")
        if not (options.idle_timeout_s > 0 and options.send_timeout_s > 0):
            raise ValueError(f"idle_timeout_s={options.idle_timeout_s}, send_timeout_s={options.send_timeout_s}: "
                             "need > 0")
        self.policy, self.options = policy, options
        self.admission = Admission(ConnectionLimits(options.max_clients, options.max_clients_per_address,
                                                    options.max_clients_per_key, options.evict_idle_s))
        self.metadata = wire.packb(policy.metadata)
        self.pending: list[_Pending] = []
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="megavla-infer")
        self._tasks: set[asyncio.Task] = set()  # eviction closes in flight (a reference keeps them alive)

    # ------------------------------------------------------------------ admission
    def _key_index(self, request: HttpRequest) -> int | None:
        """Index of the API key the request carries; every key is compared (constant time each)."""
        sent, found = request.headers.get("Authorization", "").encode(), None
        for i, key in enumerate(self.options.keys):
            if hmac.compare_digest(sent, f"Api-Key {key}".encode()):
                found = i
        return found

    def _process_request(self, connection: ServerConnection, request: HttpRequest):
        if request.path == "/healthz":
            return connection.respond(http.HTTPStatus.OK, "OK\n")
        if self.options.keys and self._key_index(request) is None:
            sent = request.headers.get("Authorization", "")
            log.warning("%s: connection refused: %s API key", _address(connection)[1], "wrong" if sent else "no")
            return connection.respond(http.HTTPStatus.UNAUTHORIZED,
                                      "missing or wrong API key: send the header 'Authorization: "
                                      "Api-Key <key>' (openpi_client: api_key=...)\n")
        return None

    def _process_response(self, connection: ServerConnection, request: HttpRequest, response: HttpResponse):
        """Connection limits, checked once the handshake would succeed (a refused or failed handshake
        never takes a slot)."""
        if response.status_code != http.HTTPStatus.SWITCHING_PROTOCOLS:
            return None
        host, label = _address(connection)
        now = time.monotonic()
        key = self._key_index(request) if self.options.keys else None
        client = Client(connection, label, host, key, last_seen=now)
        victims, refusal = self.admission.admit(client, now)
        if refusal is not None:
            log.warning("%s: connection refused: %s", label, refusal.reason.strip())
            return connection.respond(refusal.status, refusal.reason)
        for v in victims:
            log.warning("%s: closed after %.1f s without a request, to admit %s (connection limits)",
                        v.label, now - v.last_seen, label)
            task = asyncio.get_running_loop().create_task(
                v.ws.close(CloseCode.TRY_AGAIN_LATER, "idle: closed to admit another client; reconnect when needed"))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return None

    # ------------------------------------------------------------------ connection level
    async def _send(self, ws: ServerConnection, message: bytes | str) -> None:
        # A client that does not read its replies blocks this send once the buffers fill; only its
        # own handler waits here, and only for send_timeout_s.
        try:
            await asyncio.wait_for(ws.send(message), self.options.send_timeout_s)
        except asyncio.TimeoutError:
            raise _SlowReader from None

    async def _handle(self, ws: ServerConnection) -> None:
        client = self.admission.get(ws)
        if client is None:  # admitted in _process_response; dropped only if it closed meanwhile
            return
        addr, opts = client.label, self.options
        log.info("%s: connected (%d clients)", addr, self.admission.count())
        generator = self.policy.new_generator()  # same noise stream per connection as in process
        loop = asyncio.get_running_loop()
        prev_total_ms = None
        errors = _ErrorLog(addr)
        try:
            await self._send(ws, self.metadata)
            while True:
                try:
                    data = await asyncio.wait_for(ws.recv(), opts.idle_timeout_s)
                except asyncio.TimeoutError:
                    log.warning("%s: no request for %g s (--idle-timeout-s); connection closed", addr,
                                opts.idle_timeout_s)
                    await ws.close(CloseCode.NORMAL_CLOSURE,
                                   f"no request for {opts.idle_timeout_s:g} s (server idle timeout); reconnect")
                    break
                received = time.monotonic()
                client.busy, client.last_seen = True, received
                try:
                    request = self.policy.request(wire.unpackb(data, opts.limits), generator)
                except (wire.WireError, ObservationError) as e:
                    errors.log(f"bad request: {e}")
                    client.last_request_ok = False
                    self._wakeup.set()  # a batch waiting for this client's request stops waiting
                    await self._send(ws, f"megavla serve: bad request: {e}")
                    client.busy, client.last_seen = False, time.monotonic()
                    continue
                client.last_request_ok = True
                pending = _Pending(request, client, loop.create_future(), received)
                self.pending.append(pending)
                self._wakeup.set()
                result = await pending.reply
                if isinstance(result, ConnectionError):  # it left while queued
                    log.info("%s: disconnected with a request queued", addr)
                    break
                if isinstance(result, Exception):
                    errors.log(f"request failed: {result}")
                    await self._send(ws, f"megavla serve: request failed: {result}")
                    client.busy, client.last_seen = False, time.monotonic()
                    continue
                timing = result.pop("policy_timing")
                timing["queue_ms"] = timing.pop("wait_ms")
                timing["infer_ms"] = timing["prepare_ms"] + timing["model_ms"]
                timing["total_ms"] = (time.monotonic() - received) * 1e3
                if prev_total_ms is not None:
                    timing["prev_total_ms"] = prev_total_ms
                result["server_timing"] = timing
                await self._send(ws, wire.packb(result))
                prev_total_ms = (time.monotonic() - received) * 1e3
                client.busy, client.last_seen = False, time.monotonic()
        except _SlowReader:
            log.warning("%s: did not read its replies for %g s; connection dropped", addr, opts.send_timeout_s)
            ws.transport.abort()
        except ConnectionClosed as e:
            code = e.sent.code if e.sent is not None else (e.rcvd.code if e.rcvd is not None else None)
            if code == CloseCode.MESSAGE_TOO_BIG:
                log.warning("%s: message over the %d-byte limit (--max-message-mb); connection closed",
                            addr, opts.max_message_bytes)
            elif not client.evicted:  # (an eviction was logged when it was decided)
                log.info("%s: disconnected (%s)", addr, "no close frame" if code is None else f"code {int(code)}")
        finally:
            errors.flush()
            self.admission.release(ws)
            self._wakeup.set()  # nor for a client that left

    # ------------------------------------------------------------------ batching
    def _expected(self) -> int:
        """Clients that may still add a request to the filling batch: those queued in it, and open
        ones that are not waiting on the running batch, not idle (nothing sent or answered within
        max(1 s, batch_wait_ms)) and whose last request was not refused: neither an idle connection
        nor one sending bad requests may make every batch wait for it."""
        now, window = time.monotonic(), max(1.0, self.options.batch_wait_ms / 1e3)
        queued = {id(p.client) for p in self.pending}
        return sum(1 for c in self.admission.clients.values()
                   if c.ws.state is State.OPEN and not c.evicted
                   and (id(c) in queued or (not c.busy and c.last_request_ok and now - c.last_seen <= window)))

    async def _batcher(self) -> None:
        loop = asyncio.get_running_loop()
        opts = self.options
        while True:
            while not self.pending:
                self._wakeup.clear()
                await self._wakeup.wait()
            deadline = loop.time() + opts.batch_wait_ms / 1e3
            while len(self.pending) < min(opts.max_batch, max(self._expected(), 1)):
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), max(0.0, deadline - loop.time()))
                except asyncio.TimeoutError:  # (not the builtin before Python 3.11)
                    break
            batch, self.pending = self.pending[: opts.max_batch], self.pending[opts.max_batch:]
            gone = [p for p in batch if p.client.ws.state is not State.OPEN]
            if gone:  # disconnected while queued: nobody to answer
                log.info("dropped %d queued request(s) of disconnected clients", len(gone))
                for p in gone:
                    p.reply.set_result(ConnectionError("client disconnected"))
                batch = [p for p in batch if p.client.ws.state is State.OPEN]
                if not batch:
                    continue
            started = time.monotonic()
            results = await loop.run_in_executor(self.executor, self._infer_isolated, [p.request for p in batch])
            for p, result in zip(batch, results):
                if isinstance(result, dict):
                    result["policy_timing"]["wait_ms"] = (started - p.received) * 1e3
                if not p.reply.done():
                    p.reply.set_result(result)

    def _infer_isolated(self, requests: list[Request]) -> list[dict | Exception]:
        """``infer_batch`` in the inference thread, one result per request. Requests are checked
        before they are queued; should a batch still fail (a value no check foresaw, OOM, a bug), each
        request is run again alone (same noise, so the same actions), so only the one that fails gets
        the error and nobody else's request fails because of it."""
        try:
            results = self.policy.infer_batch(requests)
        except Exception as e:  # noqa: BLE001  one failed forward must not stop the server
            if len(requests) == 1:
                log.exception("inference failed on a request")
                return [RuntimeError(f"inference failed: {type(e).__name__}: {e}")]
            log.warning("a batch of %d failed (%s: %s); answering each request alone", len(requests),
                        type(e).__name__, e)
            return [self._infer_isolated([r])[0] for r in requests]
        for i, result in enumerate(results):
            if isinstance(result, dict) and not np.isfinite(result["actions"]).all():
                results[i] = RuntimeError("the policy's actions for this observation came out NaN or inf "
                                          "(not sent); check the observation's values against the metadata's "
                                          "observation_schema")
        return results

    # ------------------------------------------------------------------ lifecycle
    async def serve(self, ready: Callable[[str, int], None] | None = None,
                    stop: asyncio.Event | None = None) -> None:
        """Serve until ``stop`` is set (or forever); ``ready(host, port)`` once listening."""
        opts = self.options
        if opts.host not in LOOPBACK and not opts.keys:
            log.warning("listening on %s without an API key: anyone who can reach this port can drive "
                        "the policy (set --api-key or MEGAVLA_API_KEY)", opts.host)
        # Our own lines name the client once per event; websockets' INFO lines would repeat them.
        logging.getLogger("websockets").setLevel(logging.WARNING)
        self._wakeup = asyncio.Event()
        batcher = asyncio.create_task(self._batcher())
        stop = stop or asyncio.Event()
        try:
            # max_queue=2: an openpi client has one request in flight; more frames wait in the
            # client's socket instead of this process's memory (each may be max_message_bytes).
            async with serve(self._handle, opts.host, opts.port, process_request=self._process_request,
                             process_response=self._process_response, max_size=opts.max_message_bytes,
                             max_queue=2, compression=None) as server:
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
