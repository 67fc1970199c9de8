"""How a user's allowance is combined from base, role, groups and override; multipliers;
pools (pure, from a policy snapshot)."""

from __future__ import annotations

import itertools
from decimal import Decimal

from quotagate.core.limits import Limit, Metric, Scope
from quotagate.core.policy import Policy, Pool, User
from quotagate.core.windows import parse_window

_ids = itertools.count(1)
DAY = parse_window("day")
HOUR = parse_window("hour")


def limit(
    scope: Scope,
    target: str,
    amount: int | None,
    metric: Metric = Metric.TOKENS,
    window: str = "day",
    per_user: bool = True,
) -> Limit:
    return Limit(next(_ids), scope, target, metric, parse_window(window), amount, per_user)


def allowances(policy: Policy, user: User) -> dict[tuple[str, str], tuple[int | None, str]]:
    return {(a.metric.value, a.window.spec): (a.amount, a.label) for a in policy.allowances(user)}


def test_roles_per_day_and_per_hour() -> None:
    policy = Policy(
        limits=[
            limit(Scope.ROLE, "user", 10_000),
            limit(Scope.ROLE, "user", 1_000, window="hour"),
            limit(Scope.ROLE, "premium", 50_000),
            limit(Scope.ROLE, "admin", None),
        ]
    )
    assert allowances(policy, User("u", "user")) == {
        ("tokens", "day"): (10_000, "role user"),
        ("tokens", "hour"): (1_000, "role user"),
    }
    assert allowances(policy, User("p", "premium")) == {("tokens", "day"): (50_000, "role premium")}
    assert allowances(policy, User("a", "admin")) == {("tokens", "day"): (None, "role admin")}
    assert allowances(policy, User("g", "guest")) == {}


def test_base_plus_every_group() -> None:
    policy = Policy(
        limits=[
            limit(Scope.EVERYONE, "*", 1_000),
            limit(Scope.GROUP, "A", 500),
            limit(Scope.GROUP, "B", 300),
            limit(Scope.GROUP, "B", 7, Metric.REQUESTS),
        ]
    )
    combined = allowances(policy, User("x", groups=("A", "B")))
    assert combined[("tokens", "day")] == (1_800, "base + group A + group B")
    # a group's grant on a metric the base does not limit stands alone
    assert combined[("requests", "day")] == (7, "group B")
    assert allowances(policy, User("y"))[("tokens", "day")] == (1_000, "base")


def test_a_role_replaces_the_base_and_groups_add_to_it() -> None:
    policy = Policy(
        limits=[
            limit(Scope.EVERYONE, "*", 1_000),
            limit(Scope.ROLE, "premium", 5_000),
            limit(Scope.GROUP, "A", 500),
        ]
    )
    assert allowances(policy, User("p", "premium", ("A",)))[("tokens", "day")] == (
        5_500,
        "role premium + group A",
    )


def test_an_unlimited_grant_makes_the_sum_unlimited() -> None:
    policy = Policy(limits=[limit(Scope.EVERYONE, "*", 1_000), limit(Scope.GROUP, "staff", None)])
    assert allowances(policy, User("s", groups=("staff",)))[("tokens", "day")][0] is None


def test_a_user_override_replaces_everything_on_its_metric_and_window() -> None:
    policy = Policy(
        limits=[
            limit(Scope.EVERYONE, "*", 1_000),
            limit(Scope.ROLE, "user", 2_000),
            limit(Scope.GROUP, "A", 500),
            limit(Scope.USER, "carol", 250),
            limit(Scope.ROLE, "user", 100, window="hour"),
        ]
    )
    carol = allowances(policy, User("carol", "user", ("A",)))
    assert carol[("tokens", "day")] == (250, "user carol override")
    # other windows keep their usual allowance
    assert carol[("tokens", "hour")] == (100, "role user")
    assert allowances(policy, User("dave", "user", ("A",)))[("tokens", "day")][0] == 2_500


def test_the_most_favourable_group_multiplier_applies() -> None:
    policy = Policy(multipliers={"students": Decimal("0.5"), "vip": Decimal("0.2")})
    assert policy.multiplier(User("s", groups=("students", "vip"))) == Decimal("0.2")
    assert policy.multiplier(User("n")) == Decimal(1)


def test_pools_by_name_and_by_model() -> None:
    research = Pool("research", models=("llama-70b",), groups=("lab",))
    policy = Policy(pools=[research, Pool("open")])
    assert policy.pool("research") == research
    assert policy.pool_for_model("llama-70b") == research
    assert policy.pool_for_model("gpt-4o") is None
    assert research.admits(User("l", groups=("lab",)))
    assert not research.admits(User("o"))
    assert Pool("open").admits(User("o"))


def test_limit_labels() -> None:
    assert limit(Scope.MODEL, "gpt-4o", 1).describe() == "model gpt-4o per user"
    assert limit(Scope.MODEL, "gpt-4o", 1, per_user=False).describe() == "model gpt-4o"
    assert limit(Scope.EVERYONE, "*", 1).describe() == "base allowance"
    assert limit(Scope.POOL, "research", 1, per_user=False).describe() == "pool research"
