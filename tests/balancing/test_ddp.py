"""Load-balanced DDP driven by Lightning on 2 gloo processes: exact gradients, no hang, resume, compression."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.balancing import ddp_worker
from tests.conftest import read_report, run_cli
from tests.workers import run_worker

pytestmark = pytest.mark.slow


def run(
    tmp_path: Path,
    devices: int,
    sizes: str,
    compression: str = "none",
    steps: int = 25,
    ckpt: str = "-",
    epoch_steps: int | None = None,
):
    """`tests.balancing.ddp_worker train` on `devices` processes; what each rank recorded."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    args = ["train", str(tmp_path), str(devices), sizes, compression, str(steps), ckpt]
    args += [f"--epoch-steps={epoch_steps}"] if epoch_steps is not None else []
    result = run_worker(ddp_worker, args, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(devices)]


def max_difference(a: list[list[float]], b: list[list[float]]) -> float:
    return max(abs(x - y) for pa, pb in zip(a, b, strict=True) for x, y in zip(pa, pb, strict=True))


def test_unequal_shares_give_the_same_parameters_as_one_process_on_the_global_batch(tmp_path: Path) -> None:
    ranks = run(tmp_path / "two", 2, "96,32")
    single = run(tmp_path / "one", 1, "128")
    assert ranks[0]["sizes"][:3] == [96, 96, 96] and ranks[1]["sizes"][:3] == [32, 32, 32]
    # every step's two batches make up the global batch; an epoch is every sample once (1258 = 9 x 128 + 106)
    steps_per_epoch = 10
    for rank0, rank1, whole in zip(ranks[0]["sizes"], ranks[1]["sizes"], single[0]["sizes"], strict=True):
        assert rank0 + rank1 == whole
    assert sum(ranks[0]["sizes"][:steps_per_epoch]) + sum(ranks[1]["sizes"][:steps_per_epoch]) == 1258
    assert len(ranks[0]["sizes"]) == len(ranks[1]["sizes"]) == 25  # same steps, the last partial batch included
    assert max_difference(ranks[0]["params"], single[0]["params"]) < 1e-5
    assert ranks[0]["weight"] != 1.0  # the weighting really scaled the gradients


def test_weighting_composes_with_powersgd(tmp_path: Path) -> None:
    ranks = run(tmp_path, 2, "96,32", compression="powersgd")
    assert ranks[0]["ratio"] < 0.5  # compressed
    assert ranks[0]["params"] == ranks[1]["params"]  # ranks agree after weighted, compressed steps
    assert ranks[0]["weight"] == pytest.approx(96 * 2 / 128, rel=0.2) and ranks[1]["weight"] < 1


def test_shares_are_restored_on_resume(tmp_path: Path) -> None:
    run(tmp_path / "first", 2, "96,32", steps=12)
    checkpoint = tmp_path / "first" / "ckpt" / "step=10.ckpt"
    resumed = run(tmp_path / "resumed", 2, "equal", steps=14, ckpt=str(checkpoint))
    assert resumed[0]["plan"] == [96, 32]
    assert resumed[0]["sizes"][:2] == [96, 96] and resumed[1]["sizes"][:2] == [32, 32]


def test_a_resume_from_an_epoch_end_trains_whole_epochs_when_epochs_are_cut(tmp_path: Path) -> None:
    # 10 global batches an epoch, cut to 8 (limit_train_batches); the checkpoint is the first epoch's last step.
    # The sampler must start the next epoch from its first batch, not skip the 8 batches the last one trained.
    run(tmp_path / "first", 2, "96,32", steps=8, epoch_steps=8)
    checkpoint = tmp_path / "first" / "ckpt" / "step=8.ckpt"
    resumed = run(tmp_path / "resumed", 2, "equal", steps=24, ckpt=str(checkpoint), epoch_steps=8)
    assert resumed[0]["epochs"] == [1] * 8 + [2] * 8
    assert resumed[0]["sizes"] == [96] * 16 and resumed[1]["sizes"] == [32] * 16


@pytest.mark.parametrize("compression", ["none", "fp16"])
def test_measured_work_excludes_waiting_for_the_slow_rank(tmp_path: Path, compression: str) -> None:
    # with a compressor, the comm hook's collectives run inside backward: their waiting must not count either
    result = run_worker(ddp_worker, ["measure", str(tmp_path), compression], cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    state = ranks[0]["state"]
    assert ranks[1]["state"] == state  # every rank computed the same plan from the same all-gathered numbers
    speeds, fixed = state["speeds"], state["fixed_seconds"]
    # rank 0 waits ~30 ms per step in the allreduce for rank 1's forward: not counted, so it measures faster
    # (and the measured step time confirms the plan the model proposes: fewer samples on rank 1 are faster)
    assert speeds[0] > 3 * speeds[1]
    # rank 1's 50 ms before the optimizer step is its fixed cost; rank 0 waits for it, which is not its own
    assert fixed[1] >= 0.05 and fixed[0] < 0.025
    assert [entry["step"] for entry in state["history"]] == [5, 10, 15]
    assert state["batch_sizes"][0] > state["batch_sizes"][1] and sum(state["batch_sizes"]) == 128
    assert ranks[0]["hooks"] == 0  # the gradient-timing hooks are removed at teardown


def test_a_plan_that_measures_slower_gives_way_to_the_faster_one_that_ran(tmp_path: Path) -> None:
    result = run_worker(ddp_worker, ["fallback", str(tmp_path)], cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    history = ranks[0]["state"]["history"]
    assert ranks[1]["state"]["history"] == history  # the same decision on every rank
    plans = [entry["batch_sizes"] for entry in history]
    # the model reads rank 1 as slow and would move work to rank 0, but not on the first window's word alone ...
    assert history[0]["proposed"][0] > 64 and plans[0] == [64, 64]
    # ... once two windows agree (the second, or a later one if the noise held it back), it is tried once
    tried = next(index for index, plan in enumerate(plans) if plan != [64, 64])
    assert plans[tried][0] > 64 and history[tried]["proposed"] == plans[tried] and tried + 2 < len(plans), plans
    # measured: the equal plan's window ran faster than the proposal's (rank 0's hidden 0.15 s a step) ...
    equal_seconds, proposed_seconds = history[tried]["step_seconds"], history[tried + 1]["step_seconds"]
    assert proposed_seconds > equal_seconds + 0.03
    # ... so at every later re-plan the model's proposal, which ran, gives way to the equal plan
    assert all(entry["proposed"][0] > 64 for entry in history[tried + 1 :])
    assert all(plan == [64, 64] for plan in plans[tried + 1 :]), plans


def test_app_balancing_run_reports_shares_and_a_plot(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    args = ["trainer=ddp_cpu", "balancing=throughput", "balancing.replan_every=5", "trainer.max_epochs=2"]
    result = run_cli([*args, f"run_dir={run_dir}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    section = read_report(run_dir)["balance"]
    assert section["summary"]["global_batch"] == 128 and section["summary"]["replans"] >= 3
    assert sum(row["batch_size"] for row in section["rows"]) == 128
    assert all(row["speed_samples_per_s"] > 0 and row["fixed_seconds_per_step"] > 0 for row in section["rows"])
    assert (run_dir / "balance.png").stat().st_size > 10_000
