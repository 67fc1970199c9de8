"""Which channel serves a request, in which order to try the others, and which are resting.

Among the channels that serve the model, the highest priority goes first; channels of
equal priority are ordered by a weighted random draw, so traffic splits by weight. A
channel that refused on its own cap a moment ago is tried last (its cap resets at its
window; until then a retry would only cost an admit), and a channel that failed
``failures`` times in a row rests for ``cooldown`` seconds, then comes back by itself:
the next request may use it again, and one more failure sends it back to rest.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from quotagate.core.text import shown
from quotagate.gateway.channels import Channel
from quotagate.gateway.errors import ApiError

#: how long a channel that refused on its cap is put last (capped by its window's reset)
FULL_RECHECK_SECONDS = 2.0


@dataclass
class Health:
    failures: int = 0
    resting_until: float = 0.0
    full_until: float = 0.0


class Router:
    def __init__(
        self,
        channels: Iterable[Channel] = (),
        *,
        failures: int = 3,
        cooldown: float = 30.0,
        rng: random.Random | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.failures = failures
        self.cooldown = cooldown
        self.rng = rng or random.Random()
        self.monotonic = monotonic
        self.health: dict[str, Health] = {}
        self.channels: dict[str, Channel] = {}
        self._by_model: dict[str, list[Channel]] = {}
        self.set_channels(channels)

    def set_channels(self, channels: Iterable[Channel]) -> None:
        self.channels = {c.name: c for c in channels}
        by_model: dict[str, list[Channel]] = {}
        for channel in self.channels.values():
            for model in channel.models:
                by_model.setdefault(model, []).append(channel)
        for serving in by_model.values():
            serving.sort(key=lambda c: -c.priority)
        self._by_model = by_model
        self.health = {name: self.health.get(name, Health()) for name in self.channels}

    def models(self) -> list[str]:
        return sorted(self._by_model)

    def serves(self, model: str) -> bool:
        return model in self._by_model

    def plan(self, model: str, pinned: str | None = None, at: float = 0.0) -> list[Channel]:
        """Channels to try for `model`, in order. 404 if none serves it, 503 if all rest.

        `at` is the quota clock (epoch seconds), against which "full" marks are kept.
        """
        if pinned is not None:
            channel = self.channels.get(pinned)
            if channel is None:
                raise ApiError(
                    404,
                    f"There is no channel named `{shown(pinned)}`.",
                    "invalid_request_error",
                    "channel_not_found",
                )
            if model not in channel.models:
                raise ApiError(
                    404,
                    f"The channel `{pinned}` does not serve the model `{shown(model)}`.",
                    "invalid_request_error",
                    "model_not_found",
                    "model",
                )
            serving = [channel]
        else:
            serving = self._by_model.get(model, [])
        now = self.monotonic()
        ready = [c for c in serving if self.health[c.name].resting_until <= now]
        if not ready:
            wait = min(self.health[c.name].resting_until for c in serving) - now
            raise ApiError(
                503,
                f"Every upstream channel serving `{model}` is failing; retry shortly.",
                "server_error",
                "upstream_unavailable",
                headers=[(b"retry-after", b"%d" % max(1, round(wait + 0.5)))],
                reason="cooldown",
            )
        if len(ready) == 1:
            return ready
        ordered: list[Channel] = []
        index = 0
        while index < len(ready):
            end = index
            while end < len(ready) and ready[end].priority == ready[index].priority:
                end += 1
            ordered.extend(self._weighted(ready[index:end]))
            index = end
        full = [c for c in ordered if self.health[c.name].full_until > at]
        if full:
            ordered = [c for c in ordered if c not in full] + full
        return ordered

    def _weighted(self, group: list[Channel]) -> list[Channel]:
        if len(group) == 1:
            return group
        left = list(group)
        out = []
        while left:
            total = sum(c.weight for c in left)
            pick = self.rng.uniform(0, total)
            for position, channel in enumerate(left):
                pick -= channel.weight
                if pick <= 0 or position == len(left) - 1:
                    out.append(left.pop(position))
                    break
        return out

    # -- outcomes --------------------------------------------------------------------------
    def succeeded(self, channel: Channel) -> None:
        health = self.health.get(channel.name)
        if health is not None and health.failures:
            health.failures = 0

    def failed(self, channel: Channel) -> bool:
        """Count a failure; True if the channel now rests."""
        health = self.health.get(channel.name)
        if health is None:
            return False
        health.failures += 1
        if health.failures >= self.failures:
            health.resting_until = self.monotonic() + self.cooldown
            return True
        return False

    def full(self, channel: Channel, at: float, resets_at: float | None) -> None:
        """The channel refused on its own cap at `at` (quota clock): try it last for a
        little while, and never past the moment its cap resets."""
        health = self.health.get(channel.name)
        if health is None:
            return
        until = at + FULL_RECHECK_SECONDS
        health.full_until = until if resets_at is None else min(until, resets_at)

    def resting(self) -> dict[str, float]:
        """Channels resting now, with the seconds left."""
        now = self.monotonic()
        return {
            name: h.resting_until - now for name, h in self.health.items() if h.resting_until > now
        }
