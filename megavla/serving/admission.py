"""Who may hold a connection to ``megavla serve``: connection limits and idle eviction.

Three limits, checked when a websocket is about to open (after the API key): all connections
(``--max-clients``), connections from one IP address (``--max-clients-per-address``) and connections
with one API key (``--max-clients-per-key``; each ``--api-key`` is its own key). A connection over a
limit first makes room by closing the connection of that scope that has been silent the longest, if
one has been silent for ``--evict-idle-s`` or more with no request queued, running or being answered
(close code 1013 "try again later", with the reason); preferring the newcomer's own key, then its own
address, so a client that opens many connections evicts its own before anyone else's. Only when
every connection of the scope is busy or recently active is the newcomer refused: HTTP 429 for its
own key or address, 503 for a full server, with the flag to raise in the body.

So idle connections never lock anyone out, and a client that keeps many connections busy is capped
at its own limits while other keys and addresses are still admitted.
"""
from __future__ import annotations

import http
from dataclasses import dataclass

from websockets.asyncio.server import ServerConnection
from websockets.protocol import State


@dataclass(frozen=True)
class ConnectionLimits:
    max_clients: int = 16
    per_address: int = 8
    per_key: int = 8
    # Silence (no request, no reply) after which a connection may be closed to admit another one.
    # openpi clients send their next request right after a reply plus one control step (< 1 s).
    evict_idle_s: float = 2.0

    def validate(self) -> None:
        if min(self.max_clients, self.per_address, self.per_key) < 1 or self.evict_idle_s < 0:
            raise ValueError(f"max_clients={self.max_clients}, per_address={self.per_address}, "
                             f"per_key={self.per_key}, evict_idle_s={self.evict_idle_s}: need >= 1 and >= 0")


@dataclass(eq=False)
class Client:
    ws: ServerConnection
    label: str                 # "host:port" for the log
    host: str
    key: int | None            # index of the API key it presented (None: no keys configured)
    last_seen: float           # monotonic: connected, last request received or last reply sent
    busy: bool = False         # a request of it is queued, running or being answered
    last_request_ok: bool = True  # False after a refused request: batches do not wait for its next
    evicted: bool = False      # closing to make room: no longer holds a slot

    @property
    def holds_slot(self) -> bool:
        return not self.evicted and self.ws.state in (State.CONNECTING, State.OPEN)


@dataclass
class Refusal:
    status: http.HTTPStatus
    reason: str


class Admission:
    def __init__(self, limits: ConnectionLimits):
        limits.validate()
        self.limits = limits
        self.clients: dict[ServerConnection, Client] = {}

    def admit(self, client: Client, now: float) -> tuple[list[Client], Refusal | None]:
        """Register ``client`` and return the connections to close for it, or refuse it (nothing
        changes then). Entries of connections that closed without reaching their handler (a failed
        handshake) are dropped here."""
        self.clients = {ws: c for ws, c in self.clients.items() if ws.state is not State.CLOSED}
        holding = [c for c in self.clients.values() if c.holds_slot]
        lim = self.limits
        scopes = [("address", [c for c in holding if c.host == client.host], lim.per_address),
                  ("server", holding, lim.max_clients)]
        if client.key is not None:
            scopes.insert(0, ("key", [c for c in holding if c.key == client.key], lim.per_key))
        victims: list[Client] = []
        # The newcomer's own key, then address, then whoever has been silent longest.
        order = lambda c: (c.key != client.key or client.key is None, c.host != client.host, c.last_seen)  # noqa: E731
        for scope, members, limit in scopes:
            members = [c for c in members if c not in victims]
            excess = len(members) + 1 - limit
            if excess <= 0:
                continue
            idle = sorted((c for c in members if not c.busy and now - c.last_seen >= lim.evict_idle_s), key=order)
            if len(idle) < excess:
                return [], self._refusal(scope, client, len(members))
            victims += idle[:excess]
        for v in victims:
            v.evicted = True
        self.clients[client.ws] = client
        return victims, None

    def _refusal(self, scope: str, client: Client, count: int) -> Refusal:
        lim, busy = self.limits, (f"all active in the last {self.limits.evict_idle_s:g} s or busy; idle ones "
                                  "are closed to make room")
        if scope == "server":
            return Refusal(http.HTTPStatus.SERVICE_UNAVAILABLE,
                           f"server full: {count} clients connected, {busy} (--max-clients "
                           f"{lim.max_clients}); retry later\n")
        what, flag, limit = (("from address " + client.host, "--max-clients-per-address", lim.per_address)
                             if scope == "address" else
                             (f"with API key #{client.key + 1}", "--max-clients-per-key", lim.per_key))
        return Refusal(http.HTTPStatus.TOO_MANY_REQUESTS,
                       f"too many connections {what}: {count} open, {busy} ({flag} {limit}); close one of "
                       "yours or ask the operator to raise the limit\n")

    def release(self, ws: ServerConnection) -> None:
        self.clients.pop(ws, None)

    def get(self, ws: ServerConnection) -> Client | None:
        return self.clients.get(ws)

    def count(self) -> int:
        return sum(c.holds_slot for c in self.clients.values())
