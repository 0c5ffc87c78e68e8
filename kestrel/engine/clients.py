"""Who sent a request, and how much service each client has received (for fair scheduling and metrics)."""
from __future__ import annotations

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
    """Per-client totals kept by the scheduler whatever the policy. `take_changed` hands out only the
    clients touched since the last call, so reporting costs nothing for idle clients."""

    def __init__(self, cost: ServiceCost):
        self.cost = cost
        self.usage: dict[str, ClientUsage] = {}
        self._changed: set[str] = set()

    def get(self, client: str) -> ClientUsage:
        u = self.usage.get(client)
        if u is None:
            u = self.usage[client] = ClientUsage()
        return u

    def charge(self, client: str, input_tokens: int, output_tokens: int) -> None:
        u = self.get(client)
        u.service += self.cost(input_tokens, output_tokens)
        u.input_tokens += input_tokens
        u.output_tokens += output_tokens
        self._changed.add(client)

    def queued(self, client: str, delta: int) -> None:
        self.get(client).waiting += delta
        self._changed.add(client)

    def take_changed(self) -> dict[str, tuple[float, int, int, int]]:
        out = {c: self.usage[c].snapshot() for c in self._changed}
        self._changed.clear()
        return out
