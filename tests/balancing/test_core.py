"""The balancing core: plans from speeds, batches that cover every sample once, cost-balanced splits."""

from __future__ import annotations

import statistics
from pathlib import Path

import pytest
import torch

from lightning_eff.balancing import (
    BalancedBatchSampler,
    BatchPlan,
    CostBalancer,
    ThroughputBalancer,
    agreed_by_windows,
    assign_by_cost,
    beyond_noise,
    equal_time_sizes,
    plan_batch_sizes,
    predicted_step_seconds,
    prefer_measured,
    split_by_weight,
)
from lightning_eff.balancing.balancers import follow_change
from lightning_eff.tasks.text import TextDataModule
from lightning_eff.validation import ConfigError


def test_split_by_weight_is_proportional_exact_and_respects_the_minimum() -> None:
    assert split_by_weight(128, [3.0, 1.0]) == [96, 32]
    assert sum(split_by_weight(101, [1.0, 2.0, 4.0])) == 101
    assert split_by_weight(100, [1000.0, 1.0], minimum=5) == [95, 5]


def test_plan_follows_speed_but_keeps_the_current_plan_within_tolerance() -> None:
    assert plan_batch_sizes(128, [200.0, 100.0], min_share=0.05) == [85, 43]
    assert plan_batch_sizes(128, [101.0, 100.0], min_share=0.05, current=[64, 64], tolerance=0.05) == [64, 64]
    assert plan_batch_sizes(128, [150.0, 100.0], min_share=0.05, current=[64, 64], tolerance=0.05) == [77, 51]
    assert plan_batch_sizes(100, [1.0, 0.0], min_share=0.1) == [90, 10]  # a stalled rank keeps a share


@pytest.mark.parametrize("dataset_size", [1258, 130, 129, 65, 64])
def test_every_sample_once_per_epoch_and_equal_step_counts_across_replans(dataset_size: int) -> None:
    plan = BatchPlan(batch_sizes=[32, 32])
    samplers = [BalancedBatchSampler(dataset_size, 64, rank, 2, plan, seed=3) for rank in range(2)]
    iterators = [iter(sampler) for sampler in samplers]
    seen: list[int] = []
    steps = 0
    while True:
        batches = [next(iterator, None) for iterator in iterators]
        if batches[0] is None:
            assert batches[1] is None  # the ranks run out together: no rank waits on a missing step
            break
        assert all(batch for batch in batches)  # never an empty batch
        seen += batches[0] + batches[1]  # type: ignore[operator]
        steps += 1
        plan.batch_sizes = [48, 16] if steps % 2 else [20, 44]  # re-plans between global batches
    assert sorted(seen) == list(range(dataset_size))
    assert steps == len(samplers[0]) == len(samplers[1])


def test_epochs_differ_and_repeat_with_the_seed() -> None:
    plan = BatchPlan(batch_sizes=[10, 10])
    sampler = BalancedBatchSampler(100, 20, 0, 2, plan, seed=1)
    first = list(sampler)
    sampler.set_epoch(1)
    assert list(sampler) != first
    sampler.set_epoch(0)
    assert list(sampler) == first


def test_assign_by_cost_equalises_cost_over_speed() -> None:
    costs = [float(c) for c in torch.randint(16, 129, (64,), generator=torch.Generator().manual_seed(0))]
    for speeds in ([1.0, 1.0], [2.0, 1.0]):
        parts = assign_by_cost(costs, speeds)
        assert sorted(p for part in parts for p in part) == list(range(64))
        times = [sum(costs[p] for p in part) / speed for part, speed in zip(parts, speeds, strict=True)]
        assert max(times) / min(times) < 1.05


def test_cost_balancer_gives_each_rank_about_the_same_tokens_per_step() -> None:
    data = TextDataModule(seq_len=128, min_seq_len=16, max_bytes=200_000)
    data.setup()
    assert data.train_set is not None
    cost = CostBalancer("tokens").cost_of(data.train_set)
    plan = BatchPlan(batch_sizes=[32, 32], speeds=[1.0, 1.0])
    samplers = [BalancedBatchSampler(len(data.train_set), 64, r, 2, plan, seed=0, cost_fn=cost) for r in range(2)]
    counted = [BalancedBatchSampler(len(data.train_set), 64, r, 2, plan, seed=0) for r in range(2)]
    for balanced, plain in ((samplers, "cost"), (counted, "count")):
        spreads = []
        for batch0, batch1 in zip(*balanced, strict=True):
            tokens = [sum(cost(i) for i in batch0), sum(cost(i) for i in batch1)]
            spreads.append(abs(tokens[0] - tokens[1]) / max(tokens))
        if plain == "cost":
            assert max(spreads) <= 0.10  # each rank's tokens per step within 10% of each other
        else:
            assert max(spreads) > 0.10  # equal sample counts are not equal work: the test can fail


def test_throughput_balancer_validation_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"^replan_every=0: must be >= 1"):
        ThroughputBalancer(replan_every=0)
    with pytest.raises(ConfigError, match=r"^tolerance=1.0: must be in \[0, 1\)"):
        ThroughputBalancer(tolerance=1.0)
    with pytest.raises(ConfigError, match=r"^warmup_steps=-1: must be >= 0"):
        ThroughputBalancer(warmup_steps=-1)
    with pytest.raises(ConfigError, match=r"^min_share=0.6: must be < 1/world_size = 0.5"):
        ThroughputBalancer(min_share=0.6).setup(128, 2)
    with pytest.raises(ConfigError, match=r"^cost=words"):
        CostBalancer("words")


def test_replan_moves_work_to_the_faster_rank_in_one_process() -> None:
    balancer = ThroughputBalancer(replan_every=2, smoothing=0.0, tolerance=0.0, warmup_steps=0)
    balancer.setup(global_batch_size=128, world_size=1)
    balancer.record(samples=128, busy_seconds=1.0)
    assert not balancer.maybe_replan(step=1, device=torch.device("cpu"))  # not due yet
    balancer.maybe_replan(step=2, device=torch.device("cpu"))
    assert balancer.speeds == [128.0] and balancer.plan.batch_sizes == [128]
    state = balancer.state_dict()
    restored = ThroughputBalancer()
    restored.load_state_dict(state)
    assert restored.plan.batch_sizes == [128] and restored.history == balancer.history


def test_equal_time_sizes_equalise_the_predicted_step_time() -> None:
    speeds, fixed = [160.0, 80.0], [0.005, 0.010]
    sizes = equal_time_sizes(32, speeds, fixed)
    times = [f + b / s for b, s, f in zip(sizes, speeds, fixed, strict=True)]
    assert sum(sizes) == pytest.approx(32) and times[0] == pytest.approx(times[1])
    assert sizes[0] == pytest.approx(21.6)
    # no fixed cost, or the same extra fixed cost on every rank: the split proportional to speed
    assert equal_time_sizes(32, speeds, [0.0, 0.0]) == pytest.approx([64 / 3, 32 / 3])
    assert equal_time_sizes(30, [1.0, 1.0, 1.0], [0.5, 0.5, 0.5]) == pytest.approx([10.0, 10.0, 10.0])
    # a rank whose fixed cost alone exceeds the others' step gets the minimum; a stalled one too
    assert equal_time_sizes(32, speeds, [0.0, 1.0], minimum=2) == pytest.approx([30.0, 2.0])
    assert equal_time_sizes(32, [100.0, 0.0, 100.0], [0.0, 0.0, 0.0], minimum=2) == pytest.approx([15, 2, 15])


def test_plan_with_fixed_costs_gives_the_slow_rank_fewer_samples_than_its_speed_share() -> None:
    # rank 1 is half as fast at everything, its optimizer step included
    assert plan_batch_sizes(32, [160.0, 80.0], min_share=0.05) == [21, 11]
    assert plan_batch_sizes(32, [160.0, 80.0], min_share=0.05, fixed_seconds=[0.005, 0.010]) == [22, 10]
    # the min_share and tolerance rules still hold
    assert plan_batch_sizes(100, [1.0, 1.0], min_share=0.1, fixed_seconds=[0.0, 1e3]) == [90, 10]
    kept = plan_batch_sizes(128, [101.0, 100.0], 0.05, current=[64, 64], tolerance=0.05, fixed_seconds=[0.0, 0.01])
    assert kept == [64, 64]


def test_prefer_measured_lets_the_measured_step_time_decide_between_plans_that_ran() -> None:
    measured = {(22, 10): 0.158, (21, 11): 0.171}
    assert prefer_measured([21, 11], measured) == [22, 10]  # the model returns to a plan that ran slower
    assert prefer_measured([22, 10], measured) == [22, 10]
    assert prefer_measured([20, 12], measured) == [20, 12]  # not run recently: tried
    assert prefer_measured([21, 11], {}) == [21, 11]
    assert prefer_measured([2, 2], {(3, 1): 0.1, (1, 3): 0.1, (2, 2): 0.2}) == [1, 3]  # ties: the same on every rank


def test_a_measured_plan_must_beat_the_proposal_by_more_than_its_step_times_spread() -> None:
    measured = {(22, 10): 0.158, (16, 16): 0.171}  # 13 ms faster
    steady = {(22, 10): 0.002, (16, 16): 0.003}  # standard errors of the windows' mean step times
    assert prefer_measured([16, 16], measured, steady) == [22, 10]
    swinging = {(22, 10): 0.006, (16, 16): 0.004}  # 2 x 7.2 ms > 13 ms: the luckiest window, not the best plan
    assert prefer_measured([16, 16], measured, swinging) == [16, 16]
    assert prefer_measured([16, 16], measured, swinging, z=1.0) == [22, 10]


def test_when_windows_of_one_plan_spread_widely_a_luckier_plan_does_not_replace_the_proposal() -> None:
    balancer = ThroughputBalancer()
    balancer._measured = {(16, 16): [(10, 0.25, 0.005), (30, 0.30, 0.005)], (20, 12): [(20, 0.22, 0.005)]}
    balancer.step_noise = 0.2  # load that comes and goes: windows of one plan differ by about 20%
    assert prefer_measured([16, 16], *balancer._measured_step_times(), z=2.0) == [16, 16]
    balancer.step_noise = 0.02  # steady: the 20% faster plan is real
    assert prefer_measured([16, 16], *balancer._measured_step_times(), z=2.0) == [20, 12]


def test_a_plans_step_time_is_the_mean_of_its_windows_on_the_batches_it_cut_and_its_spread_is_learned() -> None:
    balancer = ThroughputBalancer(replan_every=1, smoothing=0.0, tolerance=0.0, warmup_steps=0)
    balancer.setup(global_batch_size=32, world_size=1)
    balancer.plan.batch_sizes = [32]
    balancer._measured = {(32,): [(0, 0.1, 0.0)]}
    balancer.record(samples=32, busy_seconds=0.2, step_seconds=0.3)  # a plan that ran slower now
    balancer.maybe_replan(step=1, device=torch.device("cpu"))
    assert balancer.history[-1]["step_seconds"] == pytest.approx(0.3) and balancer._measured[(32,)][-1][1] == 0.3
    assert balancer.step_noise == pytest.approx(2.0 / 2**0.5)  # two windows of one plan, 0.1 and 0.3
    seconds, errors = balancer._measured_step_times()
    assert seconds == {(32,): pytest.approx(0.2)} and errors == {(32,): pytest.approx(0.2)}  # 1.41 x 0.2 / sqrt(2)
    balancer.record(samples=16, busy_seconds=0.1, step_seconds=9.0)  # a batch of another size (an old plan)
    balancer.maybe_replan(step=2, device=torch.device("cpu"))
    assert balancer.history[-1]["step_seconds"] is None and len(balancer._measured[(32,)]) == 2


def test_one_odd_window_is_smoothed_but_two_on_the_same_side_are_followed() -> None:
    balancer = ThroughputBalancer(replan_every=1, smoothing=0.8, tolerance=0.0, warmup_steps=0)
    balancer.setup(global_batch_size=32, world_size=1)

    def window(step: int, busy_seconds: float) -> float:
        balancer.record(samples=32, busy_seconds=busy_seconds, fixed_seconds=0.01)
        balancer.maybe_replan(step=step, device=torch.device("cpu"))
        return balancer.speeds[0]

    assert window(1, 0.2) == pytest.approx(160.0)
    assert window(2, 0.25) == pytest.approx(0.8 * 160 + 0.2 * 128)  # one slow window: noise until confirmed
    assert window(3, 0.2) == pytest.approx(0.8 * 153.6 + 0.2 * 160)  # back: it was noise
    assert window(4, 0.4) == pytest.approx(0.8 * 154.88 + 0.2 * 80)
    assert window(5, 0.4) == pytest.approx(80.0)  # the second slow window in a row: the rank turned slow
    assert window(6, 0.38) == pytest.approx(32 / 0.38)  # the window after a change settles it: taken as measured
    assert window(7, 0.21) == pytest.approx(0.8 * 32 / 0.38 + 0.2 * 32 / 0.21)  # one fast window: smoothed again
    assert window(8, 0.2) == pytest.approx((32 / 0.21 + 160) / 2)  # and recovered: followed at the second


def test_a_speed_change_that_the_plan_explains_is_only_averaged_in() -> None:
    # two windows 50% faster than the estimate of 100: a change, unless the rank's batch shrank meanwhile
    assert follow_change(100.0, 150.0, 148.0, 0.8, (16, 16, 16)) == (149.0, True)
    assert follow_change(100.0, 150.0, 148.0, 0.8, (10, 11, 12)) == (149.0, True)  # more work and faster: recovered
    assert follow_change(100.0, 150.0, 148.0, 0.8, (11, 10, 12)) == (149.0, True)  # faster with more samples too
    assert follow_change(100.0, 150.0, 148.0, 0.8, (16, 10, 10)) == (pytest.approx(110.0), False)  # fewer samples
    assert follow_change(100.0, 60.0, 62.0, 0.8, (10, 16, 16)) == (pytest.approx(92.0), False)  # more samples
    assert follow_change(100.0, 60.0, 62.0, 0.8, (16, 16, 16)) == (61.0, True)  # slower at the same batch
    assert follow_change(100.0, 150.0, 148.0, 0.8) == (pytest.approx(110.0), False)  # not yet three windows


def test_a_change_must_stand_out_of_the_noise() -> None:
    # two windows 30% slower: a change when speeds stray 10% (threshold 20%), noise when they stray 20% (40%)
    assert follow_change(100.0, 70.0, 70.0, 0.8, (16, 16, 16), threshold=0.2) == (70.0, True)
    assert follow_change(100.0, 70.0, 70.0, 0.8, (16, 16, 16), threshold=0.4) == (pytest.approx(94.0), False)
    assert follow_change(100.0, 50.0, 50.0, 0.8, (16, 16, 16), threshold=0.4) == (50.0, True)  # a real one

    def windows(noise: float, speeds: list[float]) -> bool:  # whether the balancer saw a change in them
        balancer = ThroughputBalancer(replan_every=1, smoothing=0.8, tolerance=0.0, warmup_steps=0)
        balancer.setup(global_batch_size=32, world_size=1)
        for step, speed in enumerate(speeds, start=1):
            balancer.speed_noise = noise  # the change bar is in units of speed
            balancer.record(samples=32, busy_seconds=32 / speed)
            balancer.maybe_replan(step=step, device=torch.device("cpu"))
        return balancer.speeds[0] == pytest.approx(sum(speeds[-2:]) / 2)

    assert windows(0.05, [100.0, 100.0, 70.0, 70.0])
    assert not windows(0.2, [100.0, 100.0, 70.0, 70.0])


def test_a_plan_must_promise_more_than_the_noise() -> None:
    speeds, fixed = [110.0, 100.0], [0.0, 0.0]  # rank 0 measured 10% faster
    predicted = predicted_step_seconds([17, 15], speeds, fixed)
    assert predicted == pytest.approx(17 / 110) and predicted_step_seconds([16, 16], speeds, fixed) == 0.16
    assert beyond_noise([16, 16], [17, 15], speeds, fixed, noise=0.02) == [17, 15]  # 3.4% gain, 2% noise: move
    assert beyond_noise([16, 16], [17, 15], speeds, fixed, noise=0.3) == [16, 16]  # within the noise: stay
    assert beyond_noise([16, 16], [22, 10], [200.0, 100.0], fixed, noise=0.3) == [22, 10]  # a real slow rank
    assert beyond_noise([32], [16, 16], speeds, fixed, noise=0.9) == [16, 16]  # nothing to compare with
    assert beyond_noise([18, 14], [17, 15], speeds, fixed, noise=0.9) == [17, 15]  # toward equal: no proof needed


def test_the_noise_is_learned_from_windows_that_stray_but_not_from_a_change() -> None:
    balancer = ThroughputBalancer(replan_every=1, smoothing=0.5, tolerance=0.0, warmup_steps=0)
    balancer.setup(global_batch_size=32, world_size=1)
    for step, busy_seconds in enumerate([0.2, 0.3, 0.2], start=1):  # 160, then 106.7 and 160 samples/s
        balancer.record(samples=32, busy_seconds=busy_seconds, step_seconds=0.3 + 0.03 * (step == 2))
        balancer.maybe_replan(step=step, device=torch.device("cpu"))
    # from the prior (10%), in speed: window 2 strays by 1/3, window 3 by 160 / 133.3 - 1
    estimate = 0.5 * 160 + 0.5 * 320 / 3
    assert balancer.speed_noise == pytest.approx(0.5 * (0.5 * 0.1 + 0.5 / 3) + 0.5 * (160 / estimate - 1))
    # in the predicted step (one rank, no fixed work: its time): window 2 took 1.5x the predicted time, window 3
    # 133.3 / 160 of it
    assert balancer.noise == pytest.approx(0.5 * (0.5 * 0.1 + 0.5 * 0.5) + 0.5 * (1 - estimate / 160))
    noise, speed_noise, step_noise = balancer.noise, balancer.speed_noise, balancer.step_noise
    assert step_noise == pytest.approx(0.5 * (0.03 / 0.3 + 0.03 / 0.33) / 2**0.5)  # windows of 0.3, 0.33, 0.3 s
    for step in (4, 5):  # a lasting change: followed, and not counted as noise
        balancer.record(samples=32, busy_seconds=0.8, step_seconds=0.9)
        balancer.maybe_replan(step=step, device=torch.device("cpu"))
    assert balancer.speeds == pytest.approx([40.0])
    assert balancer.history[-2]["noise"] > noise  # the change's first window looked like noise ...
    assert balancer.history[-2]["step_noise"] > 10 * step_noise  # its step time tripled: 0.74
    assert balancer.noise == noise and balancer.speed_noise == speed_noise  # ... until the second confirmed it
    assert balancer.step_noise == step_noise  # a plan's step time moved with the change: no spread of windows
    # the step times measured before the change no longer tell plans apart; the change's own windows do
    assert balancer._measured == {(32,): [(4, 0.9, 0.0), (5, 0.9, 0.0)]}
    state = balancer.state_dict()
    restored = ThroughputBalancer()
    restored.load_state_dict(state)
    assert (restored.noise, restored.speed_noise) == (balancer.noise, balancer.speed_noise)
    del state["speed_noise"]  # a checkpoint from before the two units: its one noise serves both
    restored.load_state_dict(state)
    assert restored.speed_noise == balancer.noise


def _replay_windows(
    rank: int,
    world_size: int,
    workdir: str,
    scenarios: list[tuple[dict, float, list[tuple[float, float]], list[float]]],
    fixed_seconds: tuple[float, float] = (0.008, 0.012),
) -> list[list[list[int]]]:
    """Per scenario (state, step noise, both ranks' speeds per window, the steps' seconds): a balancer on each of
    2 gloo ranks, restored from the state, fed windows of one step; the plan after each re-plan."""
    runs = []
    for state, step_noise, speeds, step_seconds in scenarios:
        balancer = ThroughputBalancer(replan_every=1, smoothing=0.8, tolerance=0.0, warmup_steps=0)
        balancer.load_state_dict(state)
        balancer.setup(global_batch_size=sum(state["batch_sizes"]), world_size=world_size)
        balancer.step_noise = step_noise
        plans = []
        for step, (window_speeds, seconds) in enumerate(zip(speeds, step_seconds, strict=True), start=1):
            size = balancer.plan.batch_sizes[rank]
            busy_seconds = size / window_speeds[rank]
            balancer.record(size, busy_seconds, fixed_seconds=fixed_seconds[rank], step_seconds=seconds)
            balancer.maybe_replan(step=step, device=torch.device("cpu"))
            plans.append(list(balancer.plan.batch_sizes))
        runs.append(plans)
    return runs


def _replay_rank_1_windows(
    rank: int, world_size: int, workdir: str, scenarios: list[tuple[dict, float, list[float], list[float]]]
) -> list[list[list[int]]]:
    """`_replay_windows` with rank 0 at 140 samples/s and rank 1 at the given speeds."""
    both = [
        (state, noise, [(140.0, speed) for speed in speeds], seconds) for state, noise, speeds, seconds in scenarios
    ]
    return _replay_windows(rank, world_size, workdir, both)


def test_a_plan_cut_for_a_change_must_measure_faster_than_the_changes_windows(tmp_path: Path) -> None:
    from tests.compression.distributed import run_ranks

    slow_rank_1 = {"batch_sizes": [22, 10], "speeds": [140.0, 70.0], "fixed_seconds": [0.008, 0.012],
                   "history": [], "last_replan": 0, "noise": 0.2, "speed_noise": 0.2}  # fmt: skip
    # two windows read rank 1 at full speed (stalls that fell into its wait): a recovery, so the plan moves to
    # the equal split; its first window reads rank 1 slow again and measures the step 25% slower than the two
    # windows of the change did at 22/10 ...
    fluke = (slow_rank_1, 0.015, [70.0, 140.0, 140.0, 70.0], [0.2, 0.2, 0.2, 0.25])
    # ... or, had rank 1 recovered, faster (its first window there is slow for other reasons: a burst)
    recovered = (slow_rank_1, 0.015, [70.0, 140.0, 140.0, 70.0], [0.2, 0.2, 0.2, 0.15])
    ranks = run_ranks(_replay_rank_1_windows, tmp_path, scenarios=[fluke, recovered])
    assert ranks[0] == ranks[1]
    fluke_plans, recovered_plans = ranks[0]
    # (the one fast window already drifted the estimate to 20/12, which the change's second window ran)
    assert fluke_plans[:3] == recovered_plans[:3] == [[22, 10], [20, 12], [16, 16]]
    assert fluke_plans[3] == [20, 12]  # it gives way to the plan the change's windows measured
    assert recovered_plans[3] == [16, 16]  # it stays


def test_the_window_after_a_change_only_averages_in_a_speed_its_smaller_batch_explains(tmp_path: Path) -> None:
    from tests.compression.distributed import run_ranks

    steady = {"batch_sizes": [16, 16], "speeds": [140.0, 140.0], "fixed_seconds": [0.008, 0.012],
              "history": [], "last_replan": 0, "noise": 0.01, "speed_noise": 0.05}  # fmt: skip
    # rank 1 put at half its cpu quota: two windows at 16/16 read it at 64 samples/s, the plan moves to 22/10, and
    # there, with fewer samples, it runs at full speed for longer and reads 85 (the plan's doing, not a recovery)
    quota = (steady, 0.015, [140.0, 140.0, 64.0, 64.0, 85.0], [0.13, 0.13, 0.25, 0.25, 0.17])
    ranks = run_ranks(_replay_rank_1_windows, tmp_path, scenarios=[quota])
    assert ranks[0] == ranks[1]
    assert ranks[0][0][2:] == [[16, 16], [22, 10], [22, 10]]  # taken as measured, 85 asked for 20/12


def test_a_fast_ranks_speed_swing_keeps_the_step_times_that_plans_measured(tmp_path: Path) -> None:
    from tests.compression.distributed import run_ranks

    # rank 0: 64 samples in 3.2 ms; rank 1: 64 in 35 ms plus 58 ms of fixed work. The model asks to move work to
    # rank 0, whose plan measures 75% slower (a cost the timer cannot see), so the equal split comes back ...
    equal = {"batch_sizes": [64, 64], "speeds": [20000.0, 1850.0], "fixed_seconds": [0.003, 0.058],
             "history": [], "last_replan": 0, "noise": 0.08, "speed_noise": 0.1}  # fmt: skip
    speeds = [(20000.0, 1850.0)] * 3 + [(10000.0, 1850.0)] * 2 + [(20000.0, 1850.0)]
    seconds = [0.09, 0.09, 0.16, 0.09, 0.09, 0.09]
    # ... and then rank 0 reads half as fast for two windows: a change of its speed, which moves the step by 3%
    ranks = run_ranks(
        _replay_windows, tmp_path, scenarios=[(equal, 0.015, speeds, seconds)], fixed_seconds=(0.003, 0.058)
    )
    assert ranks[0] == ranks[1]
    plans = ranks[0][0]
    assert plans[0] == [64, 64] and plans[1][0] > 100 and plans[2] == [64, 64]  # tried once, measured slower
    assert plans[3:] == [[64, 64]] * 3  # its measured step time is not forgotten: it is not tried again


def test_the_plan_noise_counts_a_rank_by_its_share_of_the_step() -> None:
    from lightning_eff.balancing.balancers import _step_deviations

    # rank 0: 64 samples in 3.2 ms; rank 1: 64 samples in 35.6 ms plus 50 ms of fixed work, an 85.6 ms step
    estimated, fixed = [20000.0, 1800.0], [0.001, 0.05]
    jitter = _step_deviations([64, 64], estimated, fixed, [40000.0, 1800.0])  # rank 0 twice as fast for a window
    assert jitter[0] == pytest.approx(0.0016 / (0.05 + 64 / 1800)) and jitter[0] < 0.02 and jitter[1] == 0.0
    slower = _step_deviations([64, 64], estimated, fixed, [20000.0, 1500.0])  # the rank that sets the step: 20%
    assert slower[1] == pytest.approx((64 / 1500 - 64 / 1800) / (0.05 + 64 / 1800))
    assert _step_deviations([64, 64], estimated, fixed, [0.0, 1800.0]) == []  # nothing measured: no deviation


def test_steps_far_slower_than_the_window_median_do_not_count() -> None:
    from lightning_eff.balancing.balancers import _step_time_summary

    mean, error = _step_time_summary([0.1, 0.1, 0.12, 2.0])  # validation ran in one
    assert mean == pytest.approx(0.32 / 3) and error == pytest.approx(statistics.stdev([0.1, 0.1, 0.12]) / 3**0.5)
    assert _step_time_summary([]) == (0.0, 0.0) and _step_time_summary([0.2]) == (0.2, 0.0)


def test_warmup_steps_are_left_out_and_fixed_costs_are_measured_per_step() -> None:
    balancer = ThroughputBalancer(replan_every=5, smoothing=0.0, tolerance=0.0, warmup_steps=2)
    balancer.setup(global_batch_size=32, world_size=1)
    balancer.record(samples=32, busy_seconds=5.0, fixed_seconds=2.0)  # step 0: allocations, a slow first step
    balancer.record(samples=32, busy_seconds=0.5, fixed_seconds=0.1)  # step 1: DDP rebuilds its buckets
    for _ in range(3):
        balancer.record(samples=32, busy_seconds=0.2, fixed_seconds=0.01)
    balancer.maybe_replan(step=5, device=torch.device("cpu"))
    assert balancer.speeds == pytest.approx([160.0]) and balancer.fixed_seconds == pytest.approx([0.01])
    assert balancer.stats()["fixed_seconds"] == pytest.approx([0.01])
    for _ in range(5):  # later windows count every step
        balancer.record(samples=32, busy_seconds=0.4, fixed_seconds=0.02)
    balancer.maybe_replan(step=10, device=torch.device("cpu"))
    assert balancer.speeds == pytest.approx([80.0]) and balancer.fixed_seconds == pytest.approx([0.02])
    assert balancer.history[-1]["busy_seconds"] == pytest.approx([0.42])  # per step, fixed part included


def test_a_window_of_warmup_steps_only_keeps_the_plan() -> None:
    balancer = ThroughputBalancer(replan_every=1, warmup_steps=1)
    balancer.setup(global_batch_size=32, world_size=1)
    balancer.record(samples=32, busy_seconds=1.0)
    assert not balancer.maybe_replan(step=1, device=torch.device("cpu"))
    assert balancer.speeds == [] and balancer.history == []


def test_state_round_trip_and_checkpoints_from_before_the_fixed_cost_model() -> None:
    balancer = ThroughputBalancer(replan_every=1, smoothing=0.5, tolerance=0.0, warmup_steps=0)
    balancer.setup(global_batch_size=32, world_size=1)
    balancer.record(samples=32, busy_seconds=0.2, fixed_seconds=0.01)
    balancer.maybe_replan(step=1, device=torch.device("cpu"))
    restored = ThroughputBalancer()
    restored.load_state_dict(balancer.state_dict())
    assert restored.speeds == balancer.speeds and restored.fixed_seconds == balancer.fixed_seconds
    # an old checkpoint: speeds of forward time alone; its plan is restored, its speeds are not averaged on
    old = ThroughputBalancer(smoothing=0.5, replan_every=1, warmup_steps=0)
    old.load_state_dict({"batch_sizes": [20, 12], "speeds": [600.0, 300.0], "history": [], "last_replan": 10})
    assert old.plan.batch_sizes == [20, 12] and old.plan.speeds == [600.0, 300.0] and old.speeds == []
    assert old.setup(32, 2).batch_sizes == [20, 12]


def test_ddp_balanced_is_a_registered_strategy_name() -> None:
    import lightning as L

    from lightning_eff import EfficientDDPStrategy

    strategy = L.Trainer(strategy="ddp_balanced", accelerator="cpu", devices=2, logger=False).strategy
    assert isinstance(strategy, EfficientDDPStrategy) and isinstance(strategy.balancer, ThroughputBalancer)


def test_global_size_and_sample_weight_make_the_sample_mean() -> None:
    from lightning_eff.balancing import sample_weight

    sampler = BalancedBatchSampler(129, 64, 0, 2, BatchPlan(batch_sizes=[48, 16]))
    assert [sampler.global_size(i) for i in range(len(sampler))] == [64, 65]  # 1 left over joins the last
    weights = [sample_weight(48, 64, 2), sample_weight(16, 64, 2)]
    assert weights == [1.5, 0.5] and sum(weights) / 2 == 1.0  # DDP's mean of weighted losses = sample mean


def test_a_move_away_from_the_equal_split_needs_two_windows_that_each_ask_for_it() -> None:
    slow_rank_1 = ([200.0, 100.0], [0.0, 0.0])  # one window's measured speeds and fixed seconds
    even = ([150.0, 150.0], [0.0, 0.0])
    assert agreed_by_windows([16, 16], [21, 11], [slow_rank_1], noise=0.2) == [16, 16]  # the first re-plan
    assert agreed_by_windows([16, 16], [21, 11], [even, slow_rank_1], noise=0.2) == [16, 16]  # a burst
    assert agreed_by_windows([16, 16], [21, 11], [slow_rank_1, slow_rank_1], noise=0.2) == [21, 11]  # it lasts
    assert agreed_by_windows([16, 16], [21, 11], [slow_rank_1, slow_rank_1], noise=0.5) == [16, 16]  # in the noise
    assert agreed_by_windows([21, 11], [17, 15], [], noise=0.9) == [17, 15]  # back toward equal: no proof needed
    assert agreed_by_windows([16, 16], [16, 16], [], noise=0.0) == [16, 16]
