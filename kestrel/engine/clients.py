"""Who sent a request, and how much service each client has received (for fair scheduling and metrics)."""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

ANONYMOUS = "anonymous"  # the client of requests that name none


@dataclass(frozen=True)
class ServiceCost:
    """The service a step gives a client: weighted prompt tokens processed plus output tokens generated
    (VTC's linear cost function; output tokens cost more because each needs its own decode step)."""

    input_weight: float = 1.0
    output_weight: float = 2.0

    @staticmethod
    def from_config(config) -> "ServiceCost":
        return ServiceCost(config.vtc_input_weight, config.vtc_output_weight)

    def __call__(self, input_tokens: int, output_tokens: int) -> float:
        return self.input_weight * input_tokens + self.output_weight * output_tokens


@dataclass
class ClientUsage:
    service: float = 0.0  # weighted tokens actually processed for this client
    input_tokens: int = 0  # prompt tokens processed (cache hits are not processed, so not counted)
    output_tokens: int = 0
    waiting: int = 0  # sequences in the waiting queue now

    def snapshot(self) -> tuple[float, int, int, int]:
        return (self.service, self.input_tokens, self.output_tokens, self.waiting)


class ClientLedger:
    """Per-client totals kept by the scheduler whatever the policy.

    `take_changed` hands out what each client received since the last call (so reporting costs nothing
    for idle clients and a forgotten client's last increments are still reported). A client with no
    sequence in the scheduler is idle; idle clients are forgotten after `idle_timeout` seconds, or
    sooner when more than `max_idle` are idle (least recently active first), so a stream of distinct
    client names cannot grow memory without bound."""

    def __init__(self, cost: ServiceCost, idle_timeout: float = 300.0, max_idle: int = 4096):
        self.cost = cost
        self.idle_timeout = idle_timeout
        self.max_idle = max_idle
        self.usage: dict[str, ClientUsage] = {}
        self._live: dict[str, int] = {}  # sequences in the scheduler (waiting or running) per client
        self._idle: OrderedDict[str, float] = OrderedDict()  # client -> when it became idle, oldest first
        self._unreported: dict[str, list] = {}  # client -> [service, input tokens, output tokens] not yet taken

    def get(self, client: str) -> ClientUsage:
        u = self.usage.get(client)
        if u is None:
            u = self.usage[client] = ClientUsage()
        return u

    def arrived(self, client: str) -> None:
        """A sequence of this client entered the scheduler."""
        self._live[client] = self._live.get(client, 0) + 1
        self._idle.pop(client, None)
        self.get(client)

    def left(self, client: str, now: float) -> None:
        """A sequence of this client finished."""
        n = self._live.get(client, 0) - 1
        if n > 0:
            self._live[client] = n
            return
        self._live.pop(client, None)
        self._idle[client] = now
        self._idle.move_to_end(client)

    def served_elsewhere(self, client: str, now: float) -> None:
        """The client was served on another instance of the deployment: unless it has work here, it counts as
        idle from now, so what the policy keeps for it is forgotten on the same terms as for local clients."""
        if client not in self._live:
            self._idle[client] = now
            self._idle.move_to_end(client)

    def forget_idle(self, now: float) -> list[str]:
        """Forget clients idle for longer than idle_timeout, and the oldest idle ones beyond max_idle."""
        gone = []
        while self._idle:
            client, since = next(iter(self._idle.items()))
            if now - since < self.idle_timeout and len(self._idle) <= self.max_idle:
                break
            del self._idle[client]
            self.usage.pop(client, None)
            gone.append(client)
        return gone

    def charge(self, client: str, input_tokens: int, output_tokens: int) -> None:
        u = self.get(client)
        service = self.cost(input_tokens, output_tokens)
        u.service += service
        u.input_tokens += input_tokens
        u.output_tokens += output_tokens
        pending = self._unreported.setdefault(client, [0.0, 0, 0])
        pending[0] += service
        pending[1] += input_tokens
        pending[2] += output_tokens

    def queued(self, client: str, delta: int) -> None:
        self.get(client).waiting += delta
        self._unreported.setdefault(client, [0.0, 0, 0])

    def take_changed(self) -> dict[str, tuple[float, int, int, int]]:
        """Per client changed since the last call: (service, prompt tokens, output tokens) received since
        then, and the sequences waiting now."""
        out = {}
        for c, (service, prompt, output) in self._unreported.items():
            u = self.usage.get(c)
            out[c] = (service, prompt, output, u.waiting if u is not None else 0)
        self._unreported = {}
        return out


class ServiceShare:
    """Deployment-wide fairness behind one router: each instance reports the service its clients received
    (`ClientLedger.take_changed`); what a client received on one instance is owed to every other instance's
    policy (`Scheduler.credit`) until that instance's next command batch takes it. Thread-safe: reports come in
    on one thread per instance, and each instance's sender takes its own."""

    def __init__(self):
        self._owed: dict[str, dict[str, float]] = {}
        self._lock = threading.Lock()

    def reported(self, source: str, changes: dict, destinations: list[str]) -> list[str]:
        """Record `source`'s per-client changes; returns the destinations that had nothing owed until now
        (their sender must be woken; the others' is already due)."""
        served = {c: v[0] for c, v in changes.items() if v[0] > 0}
        if not served:
            return []
        woken = []
        with self._lock:
            for d in destinations:
                if d == source:
                    continue
                owed = self._owed.setdefault(d, {})
                if not owed:
                    woken.append(d)
                for c, service in served.items():
                    owed[c] = owed.get(c, 0.0) + service
        return woken

    def take(self, destination: str) -> dict[str, float]:
        with self._lock:
            return self._owed.pop(destination, {})
