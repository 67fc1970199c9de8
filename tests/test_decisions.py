"""The admit decision every store applies inside its atomic step (pure, no store)."""

from __future__ import annotations

from quotagate.core.decisions import Hold, decide


def hold(limit: int | None, base: int = 0, per_output: int = 1) -> Hold:
    return Hold("k", ("k",), limit, base, per_output)


def test_admits_the_whole_request_when_it_fits() -> None:
    decision = decide([hold(1_000, 100)], [(0, 0)], 500)
    assert (decision.admitted, decision.max_output, decision.amounts) == (True, 500, (600,))


def test_clamps_to_the_tightest_limit_and_reserves_on_all() -> None:
    holds = [hold(10_000, 100), hold(700, 100), hold(None, 100), hold(5, 1, 0)]
    decision = decide(holds, [(0, 0), (100, 100), (10**9, 0), (0, 0)], 1_000)
    assert decision.admitted
    assert decision.max_output == 400
    assert decision.amounts == (500, 500, 500, 1)


def test_credit_limits_clamp_through_the_output_rate() -> None:
    # 1,000,000 micro-credits; the prompt costs 250,000; output 10,000 per token
    decision = decide([hold(1_000_000, 250_000, 10_000)], [(0, 0)], 1_000)
    assert decision.max_output == 75
    assert decision.amounts == (1_000_000,)
    # a price that does not divide evenly is rounded down: never more than is left
    decision = decide([hold(1_000_000, 250_000, 7_000)], [(0, 0)], 1_000)
    assert decision.max_output == 107
    assert decision.amounts[0] <= 1_000_000


def test_refuses_when_the_prompt_does_not_fit_and_names_the_limit() -> None:
    decision = decide([hold(10_000, 50), hold(1_000, 50)], [(0, 0), (900, 60)], 10)
    assert not decision.admitted
    assert (decision.refused, decision.used, decision.reserved) == (1, 900, 60)
    assert decision.amounts == ()


def test_refuses_when_less_than_min_output_would_be_left() -> None:
    assert not decide([hold(100, 90)], [(0, 0)], 50, min_output=11).admitted
    assert decide([hold(100, 90)], [(0, 0)], 50, min_output=10).max_output == 10
    # a request that wants fewer than min_output is judged by what it wants
    assert decide([hold(100, 90)], [(0, 0)], 5, min_output=50).max_output == 5


def test_a_request_without_output_needs_only_its_base() -> None:
    decision = decide([hold(100, 100)], [(0, 0)], 0)
    assert (decision.admitted, decision.max_output, decision.amounts) == (True, 0, (100,))
    assert not decide([hold(100, 101)], [(0, 0)], 0).admitted


def test_a_limit_already_overspent_refuses() -> None:
    assert not decide([hold(100, 0)], [(120, 0)], 1).admitted
    assert not decide([hold(100, 0)], [(120, 0)], 1, strict=False).admitted


def test_optimistic_admits_while_one_unit_is_left_and_never_clamps() -> None:
    decision = decide([hold(100, 80), hold(None, 80)], [(99, 0), (0, 0)], 500, strict=False)
    assert (decision.admitted, decision.max_output, decision.amounts) == (True, 500, (580, 580))
    assert not decide([hold(100, 0)], [(99, 1)], 1, strict=False).admitted


def test_unlimited_holds_never_refuse() -> None:
    decision = decide([hold(None, 10**15)], [(10**15, 10**15)], 10**15)
    assert decision.admitted and decision.max_output == 10**15
