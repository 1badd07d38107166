"""The sparsity schedule: a pure function of the optimizer step."""

from __future__ import annotations

from itertools import pairwise

import pytest

from lightning_eff.pruning.schedule import SparsitySchedule


def test_cubic_follows_zhu_and_gupta() -> None:
    schedule = SparsitySchedule(
        target_sparsity=0.9, initial_sparsity=0.1, start_step=100, end_step=500, update_every=100
    )
    assert schedule.sparsity_at(99) == 0.0
    assert schedule.sparsity_at(100) == pytest.approx(0.1)
    # s_t = s_f + (s_i - s_f)(1 - (t - t0)/(n dt))^3 at t = 200: progress 1/4
    assert schedule.sparsity_at(200) == pytest.approx(0.9 + (0.1 - 0.9) * (1 - 0.25) ** 3)
    assert schedule.sparsity_at(299) == schedule.sparsity_at(200)  # only changes at update steps
    assert schedule.sparsity_at(500) == pytest.approx(0.9)
    assert schedule.sparsity_at(10_000) == pytest.approx(0.9)


@pytest.mark.parametrize("kind", ["cubic", "linear", "exponential"])
def test_schedules_rise_monotonically_from_initial_to_target(kind: str) -> None:
    schedule = SparsitySchedule(
        target_sparsity=0.8, initial_sparsity=0.2, start_step=10, end_step=110, update_every=7, kind=kind
    )
    values = [schedule.sparsity_at(step) for step in range(10, 130)]
    assert values[0] == pytest.approx(0.2) and values[-1] == pytest.approx(0.8)
    assert all(a <= b + 1e-12 for a, b in pairwise(values))
    changes = [step for step in range(11, 130) if schedule.sparsity_at(step) != schedule.sparsity_at(step - 1)]
    assert changes == [step for step in range(17, 111, 7)] + ([110] if 110 not in range(17, 111, 7) else [])


def test_cubic_prunes_faster_early_than_linear() -> None:
    args = {"target_sparsity": 0.9, "start_step": 0, "end_step": 100, "update_every": 10}
    cubic, linear = SparsitySchedule(**args, kind="cubic"), SparsitySchedule(**args, kind="linear")
    assert cubic.sparsity_at(20) > linear.sparsity_at(20)
    assert linear.sparsity_at(50) == pytest.approx(0.45)


def test_exponential_prunes_a_constant_share_of_the_remaining_weights() -> None:
    schedule = SparsitySchedule(target_sparsity=0.99, start_step=0, end_step=100, update_every=25, kind="exponential")
    densities = [1 - schedule.sparsity_at(step) for step in (0, 25, 50, 75, 100)]
    ratios = [b / a for a, b in pairwise(densities)]
    assert ratios == pytest.approx([ratios[0]] * 4)


def test_one_shot_jumps_at_start() -> None:
    schedule = SparsitySchedule(target_sparsity=0.5, start_step=30, end_step=31, kind="one_shot")
    assert schedule.sparsity_at(29) == 0 and schedule.sparsity_at(30) == 0.5 and schedule.sparsity_at(1000) == 0.5


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"target_sparsity": 1.0}, "target_sparsity < 1"),
        ({"target_sparsity": 0.5, "initial_sparsity": 0.6}, "initial_sparsity <= target_sparsity"),
        ({"target_sparsity": 0.5, "start_step": 10, "end_step": 10}, "end_step=10 must be > start_step=10"),
        ({"target_sparsity": 0.5, "kind": "quadratic"}, "schedule='quadratic'"),
        ({"target_sparsity": 0.5, "update_every": 0}, "update_every=0"),
    ],
)
def test_invalid_schedules_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        SparsitySchedule(**kwargs)
