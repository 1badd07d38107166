"""EfficientDDPStrategy driven by Lightning on 2 gloo processes: hooks run on CPU, state resumes exactly."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import lightning as L
import pytest
import torch

from lightning_eff import EfficientDDPStrategy
from lightning_eff.compression import PowerSGD
from lightning_eff.validation import ConfigError
from tests.conftest import read_report, run_cli
from tests.strategies import ddp_worker
from tests.workers import run_worker


def run_ddp(
    tmp_path: Path, kind: str, max_steps: int, ckpt: str = "-", accumulate: int = 1, precision: str = "32-true"
) -> list[dict]:
    """Our 2-process DDP job (`tests.strategies.ddp_worker`) with this strategy; what each rank recorded."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    args = [str(tmp_path), kind, str(max_steps), ckpt, str(accumulate), precision]
    result = run_worker(ddp_worker, args, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]


@pytest.mark.slow
def test_hook_runs_on_gloo_where_lightnings_ddp_drops_it(tmp_path: Path) -> None:
    ours = run_ddp(tmp_path / "ours", "fp16", max_steps=12)
    assert ours[0]["steps"] == 12 and ours[1]["steps"] == 12  # the hook ran once per optimizer step on each rank
    assert ours[0]["ratio"] == pytest.approx(0.5)
    assert ours[0]["bytes_dense"] == 12 * 4 * sum(n for n in (64 * 64 + 64, 64 * 64 + 64, 64 * 10 + 10))
    assert ours[0]["weights"] == ours[1]["weights"]  # ranks stay in sync through the compressed allreduce
    plain = run_ddp(tmp_path / "plain", "ddp", max_steps=12)
    lightning = run_ddp(tmp_path / "lightning", "lightning_fp16_hook", max_steps=12)
    assert lightning[0]["losses"] == plain[0]["losses"]  # Lightning silently ignored the fp16 hook on CPU
    assert ours[0]["losses"] != plain[0]["losses"]  # ours really compressed
    assert ours[0]["losses"][-1] == pytest.approx(plain[0]["losses"][-1], rel=0.02)


@pytest.mark.slow
def test_bf16_mixed_precision_trains_with_fp32_gradients_compressed_once(tmp_path: Path) -> None:
    ranks = run_ddp(tmp_path, "fp16", max_steps=10, precision="bf16-mixed")
    # autocast leaves parameters and gradients in fp32: the hook casts them once, to fp16, for the wire
    assert ranks[0]["steps"] == 10 and ranks[0]["ratio"] == pytest.approx(0.5)
    assert ranks[0]["weights"] == ranks[1]["weights"]
    assert ranks[0]["losses"][-1] < ranks[0]["losses"][0]


@pytest.mark.slow
def test_gradient_accumulation_advances_counters_per_optimizer_step(tmp_path: Path) -> None:
    ranks = run_ddp(tmp_path, "fp16", max_steps=6, accumulate=3)
    assert ranks[0]["global_step"] == 6 and ranks[0]["steps"] == 6
    # 10 batches per epoch on each rank: steps after batches 3, 6, 9, 10 (the epoch's last), then 13 and 16
    assert len(ranks[0]["losses"]) == 16


@pytest.mark.slow
def test_resumed_powersgd_run_follows_the_uninterrupted_trajectory(tmp_path: Path) -> None:
    full = run_ddp(tmp_path / "full", "powersgd", max_steps=30)
    checkpoint = tmp_path / "full" / "ckpt" / "step=15.ckpt"
    assert checkpoint.is_file()
    resumed = run_ddp(tmp_path / "resumed", "powersgd", max_steps=30, ckpt=str(checkpoint))
    assert resumed[0]["global_step"] == 30
    assert resumed[0]["losses"] == pytest.approx(full[0]["losses"][15:], abs=1e-6)
    assert resumed[1]["losses"] == pytest.approx(full[1]["losses"][15:], abs=1e-6)
    assert resumed[0]["steps"] == 30  # the hook's step counter resumed too
    # Without the compressor's state (error feedback, warm-start Q) the trajectory departs: the test can fail.
    state = torch.load(checkpoint, weights_only=False)
    assert len(state["lightning_eff_compression"]) == 2  # one state per rank
    del state["lightning_eff_compression"]
    stripped = tmp_path / "stripped.ckpt"
    torch.save(state, stripped)
    cold = run_ddp(tmp_path / "cold", "powersgd", max_steps=30, ckpt=str(stripped))
    assert cold[0]["losses"] != pytest.approx(full[0]["losses"][15:], abs=1e-6)


@pytest.mark.slow
def test_registered_name_builds_our_strategy(tmp_path: Path) -> None:
    ranks = run_ddp(tmp_path, "ddp_powersgd", max_steps=4)
    assert ranks[0]["strategy"] == "EfficientDDPStrategy" and ranks[0]["compressor"].startswith("PowerSGD(")


@pytest.mark.parametrize(
    "name", ["ddp_fp16", "ddp_bf16", "ddp_powersgd", "ddp_topk", "ddp_int8", "ddp_auto", "ddp_local_sgd"]
)
def test_every_registered_name_makes_a_fresh_compressor(name: str) -> None:
    first = L.Trainer(strategy=name, accelerator="cpu", devices=2, logger=False).strategy
    second = L.Trainer(strategy=name, accelerator="cpu", devices=2, logger=False).strategy
    assert isinstance(first, EfficientDDPStrategy) and isinstance(second, EfficientDDPStrategy)
    assert type(first.compressor).name == name.removeprefix("ddp_")
    assert first.compressor is not second.compressor


def test_bad_compression_arguments_name_the_key() -> None:
    with pytest.raises(ConfigError, match=r"^compression=zip: must be one of"):
        EfficientDDPStrategy(compression="zip")
    with pytest.raises(ConfigError, match="cannot be combined with ddp_comm_hook"):
        EfficientDDPStrategy(compression=PowerSGD(), ddp_comm_hook=lambda state, bucket: None)
    with pytest.raises(ConfigError, match=r"^rank=0: must be >= 1"):
        PowerSGD(rank=0)


@pytest.mark.slow
def test_app_compression_run_logs_and_reports_bytes(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    args = ["trainer=ddp_cpu", "compression=powersgd", "compression.start_step=5", "trainer.max_epochs=2"]
    result = run_cli([*args, "trainer.log_every_n_steps=5", f"run_dir={run_dir}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    section = read_report(run_dir)["communication"]["summary"]
    assert section["synchronizing_steps"] == 20 and 0 < section["compression_ratio"] < 0.5
    assert section["bytes_sent_per_step"] < section["bytes_dense_per_step"]
    assert section["compressed_from_step"] == 5  # start_step: steps 0-4 went dense
    with (run_dir / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    logged = [float(row["compression/ratio"]) for row in rows if row.get("compression/ratio")]
    assert logged and all(0 < ratio <= 1 for ratio in logged) and min(logged) < 0.5
    assert [float(row["compression/started_at_step"]) for row in rows if row.get("compression/started_at_step")] == [5]
    assert "will never compress" not in result.stderr


@pytest.mark.slow
def test_app_warns_when_the_warm_up_covers_the_whole_run(tmp_path: Path) -> None:
    """PowerSGD's default start_step=100 on a 20-step run: said at the start, and the report says it never did."""
    run_dir = tmp_path / "run"
    result = run_cli(["trainer=ddp_cpu", "compression=powersgd", "trainer.max_epochs=2", f"run_dir={run_dir}"],
                     cwd=tmp_path, env={"PYTHONWARNINGS": "default"})  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    warning = "until step 100, but this run plans 20 optimizer steps, so it will never compress; lower start_step"
    assert " ".join(result.stderr.split()).count(warning) == 1  # once, from rank 0
    section = read_report(run_dir)["communication"]["summary"]
    assert section["compressed_from_step"] is None and section["compression_ratio"] == 1.0


def test_app_refuses_compression_with_one_process(tmp_path: Path) -> None:
    result = run_cli(["compression=fp16", f"run_dir={tmp_path}/run"], cwd=tmp_path)
    assert result.returncode == 2
    assert (
        "compression._target_=lightning_eff.compression.FP16: compresses gradients between processes" in result.stderr
    )


def test_compression_overlap_is_opt_in_and_validated() -> None:
    # Overlap costs bit-reproducibility on the CPU under load (CompressionHook's docstring), so it is off unless asked.
    assert EfficientDDPStrategy(compression="powersgd").communication.overlap is False  # type: ignore[union-attr]
    overlapped = EfficientDDPStrategy(compression="powersgd", compression_overlap=True)
    assert overlapped.communication.overlap is True  # type: ignore[union-attr]
    with pytest.raises(ConfigError, match=r"^compression_overlap=yes: must be"):
        EfficientDDPStrategy(compression="powersgd", compression_overlap="yes")  # type: ignore[arg-type]
