"""The admit decision: given the state of every counter a request touches, may it go, and
with how many completion tokens?

This is the one rule every store applies inside its atomic step (the memory and SQLite
stores call :func:`decide`; the Redis Lua script mirrors it line by line).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Hold:
    """What one limit asks of the counters for one request.

    The amount reserved is ``base + per_output * completion_tokens``: for a token limit
    base is the prompt and per_output 1; for credits, the prompt's cost and the output
    price per token; for requests, 1 and 0.
    """

    key: str
    read_keys: tuple[str, ...]
    limit: int | None
    base: int
    per_output: int
    expires_at: int | None = None


@dataclass(frozen=True)
class Decision:
    admitted: bool
    max_output: int
    amounts: tuple[int, ...]
    refused: int | None = None  # index of the hold that refused
    used: int = 0
    reserved: int = 0
    #: per hold, what its limit had left before this reservation (None: unlimited); lets a
    #: front door tell the client what remains without reading the counters again
    available: tuple[int | None, ...] = ()


def decide(
    holds: Sequence[Hold],
    states: Sequence[tuple[int, int]],
    want_output: int,
    *,
    strict: bool = True,
    min_output: int = 1,
) -> Decision:
    """Admit or refuse.

    `states[i]` is (used, reserved) summed over ``holds[i].read_keys``. Strict mode admits
    only if every limit fits the prompt plus at least `min_output` completion tokens and
    clamps the completion to what the tightest limit leaves. Optimistic mode admits while
    every limit has at least one unit left and reserves the full request.
    """
    output = want_output
    left: list[int | None] = []
    for index, (hold, (used, reserved)) in enumerate(zip(holds, states, strict=True)):
        if hold.limit is None:
            left.append(None)
            continue
        available = hold.limit - used - reserved
        left.append(available)
        if not strict:
            if available <= 0:
                return Decision(False, 0, (), index, used, reserved)
            continue
        if available < hold.base:
            return Decision(False, 0, (), index, used, reserved)
        if hold.per_output:
            output = min(output, (available - hold.base) // hold.per_output)
            if output < min(min_output, want_output):
                return Decision(False, 0, (), index, used, reserved)
    amounts = tuple(hold.base + hold.per_output * output for hold in holds)
    return Decision(True, output, amounts, available=tuple(left))
