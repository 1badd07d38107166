from __future__ import annotations

from lightning_eff.frontier.pareto import dominates, pareto_front
from lightning_eff.frontier.stopping import Progress, dominating_trial

MIN_MIN = ("minimize", "minimize")


def test_dominance_needs_no_worse_everywhere_and_better_somewhere() -> None:
    assert dominates((1.0, 10.0), (2.0, 10.0), MIN_MIN)
    assert not dominates((1.0, 10.0), (1.0, 10.0), MIN_MIN)  # equal: neither
    assert not dominates((1.0, 20.0), (2.0, 10.0), MIN_MIN)  # a trade-off
    assert dominates((0.9, 10.0), (0.8, 10.0), ("maximize", "minimize"))  # accuracy: higher is better


def test_pareto_front_keeps_trade_offs_and_ties_and_drops_dominated_points() -> None:
    # (loss, bytes): 0 and 2 trade off, 1 is beaten by 0 on both, 3 ties 2
    points = [(1.0, 100.0), (1.5, 200.0), (2.0, 25.0), (2.0, 25.0)]
    assert pareto_front(points, MIN_MIN) == [0, 2, 3]
    assert pareto_front(points, ("maximize", "minimize")) == [2, 3]  # higher quality and fewer bytes


def test_a_trial_is_stopped_only_by_a_better_one_at_the_same_step_with_no_more_bytes() -> None:
    me = Progress(step=100, quality=2.0, model_bytes=1000.0)
    better_and_smaller = {7: [Progress(50, 1.0, 10.0), Progress(100, 1.5, 800.0)]}
    assert dominating_trial(me, better_and_smaller, "minimize", min_delta=0.01) == 7
    better_but_bigger = {7: [Progress(100, 1.5, 1200.0)]}
    assert dominating_trial(me, better_but_bigger, "minimize", min_delta=0.01) is None
    other_step = {7: [Progress(200, 1.0, 10.0)]}
    assert dominating_trial(me, other_step, "minimize", min_delta=0.01) is None
    within_noise = {7: [Progress(100, 1.99, 10.0)]}  # 0.5% better, min_delta 1%
    assert dominating_trial(me, within_noise, "minimize", min_delta=0.01) is None
    accuracy = {7: [Progress(100, 2.5, 10.0)]}
    assert dominating_trial(me, accuracy, "maximize", min_delta=0.01) == 7
