"""Load-balanced DDP: per-rank batch shares from measured speed, cost-balanced batches, sample-weighted gradients."""

from lightning_eff.balancing.balancers import CostBalancer, ThroughputBalancer
from lightning_eff.balancing.planner import (
    agreed_by_windows,
    beyond_noise,
    equal_time_sizes,
    plan_batch_sizes,
    predicted_step_seconds,
    prefer_measured,
    split_by_weight,
)
from lightning_eff.balancing.sampler import BalancedBatchSampler, BatchPlan, assign_by_cost
from lightning_eff.balancing.weighting import sample_weight

__all__ = [
    "BalancedBatchSampler",
    "BatchPlan",
    "CostBalancer",
    "ThroughputBalancer",
    "agreed_by_windows",
    "assign_by_cost",
    "beyond_noise",
    "equal_time_sizes",
    "plan_batch_sizes",
    "predicted_step_seconds",
    "prefer_measured",
    "sample_weight",
    "split_by_weight",
]
