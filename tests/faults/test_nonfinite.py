"""NaN losses on one rank for several steps: every plugin's state stays finite; the loss is Lightning's business."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from tests.faults import nonfinite_worker
from tests.workers import run_worker

pytestmark = [pytest.mark.faults, pytest.mark.slow]


def finite(value: object) -> bool:
    if isinstance(value, torch.Tensor):
        return bool(torch.isfinite(value).all()) if value.is_floating_point() else True
    if isinstance(value, dict):
        return all(finite(item) for item in value.values())
    if isinstance(value, (list, tuple)):
        return all(finite(item) for item in value)
    if isinstance(value, float):
        return math.isfinite(value)
    return True


def test_nan_loss_on_one_rank_leaves_compressor_balancer_and_pruning_state_finite(tmp_path: Path) -> None:
    result = run_worker(nonfinite_worker, [str(tmp_path)], cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in (0, 1)]
    for rank in ranks:
        # DDP spread rank 1's NaN to both ranks; the module skipped those steps, as a GradScaler would
        assert rank["skipped_steps"] == list(nonfinite_worker.POISONED_STEPS)
        assert rank["weights_finite"]
        assert rank["nonfinite_buckets"] > 0 and rank["nonfinite_warnings"] >= 1  # sent dense, and said so
        residuals = rank["compressor_state"]["residuals"]
        assert residuals and finite(residuals) and finite(rank["compressor_state"]["q"])
        assert rank["replans"] >= 3 and finite(rank["balance"]) and all(s > 0 for s in rank["balance"]["speed"])
        assert rank["sparsity"] == pytest.approx(0.5, abs=0.01) and finite(rank["masks"])
    for name, mask in ranks[0]["masks"].items():
        assert torch.equal(mask, ranks[1]["masks"][name])  # masks still agree across ranks
