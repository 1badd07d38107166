"""The balancing core: plans from speeds, batches that cover every sample once, cost-balanced splits."""

from __future__ import annotations

import pytest
import torch

from lightning_eff.balancing import (
    BalancedBatchSampler,
    BatchPlan,
    CostBalancer,
    ThroughputBalancer,
    assign_by_cost,
    plan_batch_sizes,
    split_by_weight,
)
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
    with pytest.raises(ConfigError, match=r"^min_share=0.6: must be < 1/world_size = 0.5"):
        ThroughputBalancer(min_share=0.6).setup(128, 2)
    with pytest.raises(ConfigError, match=r"^cost=words"):
        CostBalancer("words")


def test_replan_moves_work_to_the_faster_rank_in_one_process() -> None:
    balancer = ThroughputBalancer(replan_every=2, smoothing=0.0, tolerance=0.0)
    balancer.setup(global_batch_size=128, world_size=1)
    balancer.record(samples=128, busy_seconds=1.0)
    assert not balancer.maybe_replan(step=1, device=torch.device("cpu"))  # not due yet
    balancer.maybe_replan(step=2, device=torch.device("cpu"))
    assert balancer.speeds == [128.0] and balancer.plan.batch_sizes == [128]
    state = balancer.state_dict()
    restored = ThroughputBalancer()
    restored.load_state_dict(state)
    assert restored.plan.batch_sizes == [128] and restored.history == balancer.history


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
