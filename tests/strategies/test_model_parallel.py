"""EfficientModelParallelStrategy (FSDP2) driven by Lightning on 2 gloo processes: balancing and bf16/fp16 reduction.

Every 2-process run trains the small GPT, which shards its blocks with `fully_shard` in `configure_model`.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn

from lightning_eff.balancing import ThroughputBalancer
from lightning_eff.balancing.step_timer import StepTimer
from lightning_eff.compression import BF16, Auto, Int8, PowerSGD, TopK
from lightning_eff.compression.sharded import ShardedCommunication
from lightning_eff.strategies import EfficientModelParallelStrategy
from lightning_eff.validation import ConfigError
from tests.strategies import comm_worker, fsdp_worker
from tests.workers import run_worker

REFUSED = {
    "powersgd": "compression=powersgd: does not apply to FSDP2's sharded gradients (needs each whole gradient matrix "
    "and a full-size error-feedback residual on every rank); use bf16, fp16 or none",
    "topk": "compression=topk: does not apply to FSDP2's sharded gradients (selects within each whole gradient and "
    "keeps a full-size error-feedback residual on every rank); use bf16, fp16 or none",
    "int8": "compression=int8: does not apply to FSDP2's sharded gradients (agrees scales per whole parameter and sums "
    "integer levels, which a float reduce-scatter cannot); use bf16, fp16 or none",
    "auto": "compression=auto: does not apply to FSDP2's sharded gradients (probes PowerSGD, which needs each whole "
    "gradient matrix on every rank); use bf16, fp16 or none",
}


def run(
    tmp_path: Path, devices: int, sizes: str, compression: str = "none", steps: int = 6, ckpt: str = "-", mode: str = ""
) -> list[dict]:
    """`tests.strategies.fsdp_worker` on `devices` processes; what each rank recorded."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    args = [str(tmp_path), str(devices), sizes, compression, str(steps), ckpt, mode or "plain"]
    result = run_worker(fsdp_worker, args, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(devices)]


def max_difference(a: list[list[float]], b: list[list[float]]) -> float:
    return max(abs(x - y) for pa, pb in zip(a, b, strict=True) for x, y in zip(pa, pb, strict=True))


@pytest.mark.slow
def test_unequal_shares_under_fsdp2_train_like_one_process_on_the_global_batch(tmp_path: Path) -> None:
    sharded = run(tmp_path / "sharded", 2, "12,4")
    single = run(tmp_path / "single", 1, "16")
    unweighted = run(tmp_path / "unweighted", 2, "12,4", mode="unweighted")
    assert sharded[0]["strategy"] == "EfficientModelParallelStrategy" and sharded[0]["sharded"]
    assert sharded[0]["sizes"] == [12] * 6 and sharded[1]["sizes"] == [4] * 6
    assert sharded[0]["weight"] == 1.5 and sharded[1]["weight"] == 0.5  # b_i * world_size / sum(b)
    assert sharded[0]["params"] == sharded[1]["params"]
    # weighted before the reduce-scatter's mean, the sharded update is the one-process update on the whole batch
    # (AdamW turns float rounding into small steps, hence not 1e-6); without the weight it is far off
    weighted_gap = max_difference(sharded[0]["params"], single[0]["params"])
    unweighted_gap = max_difference(unweighted[0]["params"], single[0]["params"])
    assert weighted_gap < 2e-3 and unweighted_gap > 20 * weighted_gap


@pytest.mark.slow
def test_shares_resume_exactly_from_a_sharded_checkpoint(tmp_path: Path) -> None:
    full = run(tmp_path / "full", 2, "12,4", steps=6)
    checkpoint = tmp_path / "full" / "ckpt" / "step=4.ckpt"
    assert checkpoint.is_dir() and len(list(checkpoint.glob("*.distcp"))) == 2  # one shard file per rank
    resumed = run(tmp_path / "resumed", 2, "equal", steps=6, ckpt=str(checkpoint))
    assert resumed[0]["balancer"]["batch_sizes"] == [12, 4]  # not the equal plan the run started with
    assert resumed[0]["sizes"] == [12, 12] and resumed[1]["sizes"] == [4, 4]
    assert resumed[0]["losses"] == full[0]["losses"][4:] and resumed[1]["losses"] == full[1]["losses"][4:]
    assert resumed[0]["params"] == full[0]["params"]


@pytest.mark.slow
def test_slow_rank_gets_a_smaller_share_and_fsdp_waits_are_not_work(tmp_path: Path) -> None:
    ranks = run(tmp_path, 2, "equal", steps=13, mode="slow")
    state = ranks[0]["balancer"]
    assert ranks[1]["balancer"] == state  # both ranks planned from the same all-gathered numbers
    assert [entry["step"] for entry in state["history"]] == [4, 8, 12]
    # rank 0 waits in every block's all-gather and reduce-scatter for rank 1's 2 ms per sample: timed as
    # waiting, so it measures its own speed, several times rank 1's
    speeds, fixed = state["speeds"], state["fixed_seconds"]
    assert speeds[0] > 3 * speeds[1]
    assert fixed[1] >= 0.03 and fixed[0] < fixed[1]  # rank 1 sleeps 30 ms before its optimizer step
    assert state["batch_sizes"][0] > 2 * state["batch_sizes"][1] and sum(state["batch_sizes"]) == 16
    assert ranks[0]["sizes"][-1] == state["batch_sizes"][0]


@pytest.mark.slow
def test_bf16_reduction_sends_half_the_bytes_of_every_reduce_scatter(tmp_path: Path) -> None:
    bf16 = run(tmp_path / "bf16", 2, "none", compression="bf16")
    plain = run(tmp_path / "plain", 2, "none")
    stats = bf16[0]["compression"]
    assert stats["steps"] == 6 and stats["ratio"] == 0.5
    # every parameter of the GPT has an even first dimension: no padding, so dense = 4 bytes x parameters x steps
    assert stats["bytes_dense"] == 4 * bf16[0]["parameter_count"] * 6
    assert bf16[0]["params"] == bf16[1]["params"]
    assert bf16[0]["losses"][1:] != plain[0]["losses"][1:]  # the gradients really went in bf16
    assert bf16[0]["losses"][-1] == pytest.approx(plain[0]["losses"][-1], rel=0.01)
    assert plain[0]["compression"]["steps"] == 0


def test_cast_reduce_scatter_averages_like_fsdp2_and_counts_half_the_bytes(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = run_worker(comm_worker, [str(tmp_path), str(port)], cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    summed = [100.0 + 2 * i for i in range(8)]  # (i) + (i + 100): every value exact in fp16 and bf16
    for name in ("fp16", "bf16", "dense"):
        for rank, shard in enumerate(ranks):
            # AVG is what FSDP2 asks for in float32: divided by the ranks before the cast, so the mean, not the sum
            assert shard[f"{name}/avg"] == [value / 2 for value in summed[4 * rank : 4 * rank + 4]]
            assert shard[f"{name}/sum"] == summed[4 * rank : 4 * rank + 4]
    assert ranks[0]["fp16/bytes"] == ranks[0]["bf16/bytes"] == [64, 32]  # two calls of 8 float32, sent in 2 bytes
    assert ranks[0]["dense/bytes"] == [64, 64]


@pytest.mark.slow
def test_fp16_reduction_composes_with_weighted_shares(tmp_path: Path) -> None:
    ranks = run(tmp_path, 2, "12,4", compression="fp16")
    assert ranks[0]["compression"]["ratio"] == 0.5 and ranks[0]["compression"]["steps"] == 6
    assert ranks[0]["weight"] == 1.5 and ranks[0]["params"] == ranks[1]["params"]
    assert ranks[0]["losses"][-1] < ranks[0]["losses"][0] - 0.5


@pytest.mark.parametrize("compressor", [PowerSGD(), TopK(), Int8(), Auto()], ids=lambda c: c.name)
def test_compressors_that_need_whole_gradients_are_refused_in_one_line(compressor: object) -> None:
    name = compressor.name  # type: ignore[attr-defined]
    with pytest.raises(ConfigError) as refused:
        EfficientModelParallelStrategy(compression=compressor)  # type: ignore[arg-type]
    assert str(refused.value) == REFUSED[name] and "\n" not in str(refused.value)
    with pytest.raises(ConfigError, match=f"^compression={name}: does not apply to FSDP2"):
        EfficientModelParallelStrategy(compression=name)


def test_balancer_with_tensor_parallel_ranks_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"^tensor_parallel_size=2: must be 1 with a balancer"):
        EfficientModelParallelStrategy(balancer=ThroughputBalancer(), tensor_parallel_size=2)


def test_compression_on_a_model_that_fully_shard_never_touched_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"^compression=bf16: found no module sharded by fully_shard"):
        ShardedCommunication(BF16()).register_sharded(nn.Linear(4, 4))


@pytest.mark.parametrize(
    ("name", "compressor", "balanced"),
    [
        ("fsdp2", None, False),
        ("fsdp2_bf16", "bf16", False),
        ("fsdp2_fp16", "fp16", False),
        ("fsdp2_balanced", None, True),
    ],
)
def test_registered_fsdp2_names_build_our_strategy(name: str, compressor: str | None, balanced: bool) -> None:
    first = L.Trainer(strategy=name, accelerator="cpu", devices=2, logger=False).strategy
    second = L.Trainer(strategy=name, accelerator="cpu", devices=2, logger=False).strategy
    assert isinstance(first, EfficientModelParallelStrategy) and isinstance(second, EfficientModelParallelStrategy)
    assert (first.compressor.name if first.compressor is not None else None) == compressor
    assert (first.balancer is not None) == balanced
    if compressor is not None:
        assert first.compressor is not second.compressor  # per-run state is never shared between Trainers


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="FSDP2 over NCCL needs 2 GPUs")
@pytest.mark.slow
def test_bf16_reduction_and_balancing_on_two_gpus(tmp_path: Path) -> None:
    """The same strategy over NCCL: the cast reduce-scatter runs on CUDA tensors and ranks stay in sync."""
    from tests.conftest import read_report, run_cli

    run_dir = tmp_path / "run"
    args = ["trainer=fsdp", "trainer.devices=2", "experiment=text_gpt", "trainer.max_steps=20"]
    args += ["trainer.val_check_interval=10", "compression=bf16", "balancing=throughput", "balancing.replan_every=5"]
    result = run_cli([*args, f"run_dir={run_dir}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    report = read_report(run_dir)
    assert report["communication"]["summary"]["compression_ratio"] == 0.5
    assert sum(row["batch_size"] for row in report["balance"]["rows"]) == 64


def test_time_blocked_in_fsdp2_collectives_is_not_counted_as_work() -> None:
    timer = StepTimer(cpu_device=False)
    timer.finish_step(0)
    with timer.training_step(8):
        time.sleep(0.02)  # forward's own work
        with timer.waiting():
            time.sleep(0.05)  # an all-gather waiting for a slow peer
    with timer.backward([]):
        time.sleep(0.02)
        with timer.waiting():
            time.sleep(0.05)  # a reduce-scatter waiting for it
    measurement = timer.finish_step(1)
    assert measurement is not None and measurement.samples == 8
    assert 0.04 <= measurement.busy_seconds < 0.09 and measurement.step_seconds >= 0.14
