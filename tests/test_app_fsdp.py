"""The app under FSDP2: `trainer=fsdp_cpu` trains the small GPT sharded over 2 gloo processes, with or without
bf16 reduction and balancing; what FSDP2 cannot serve is refused in one line with exit status 2."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from tests.conftest import read_report, run_cli

TINY_GPT = [
    "experiment=text_gpt",
    "model.n_layer=1",
    "model.n_head=2",
    "model.d_model=32",
    "model.seq_len=32",
    "data.seq_len=32",
    "data.max_bytes=40000",
    "trainer.max_steps=8",
    "trainer.val_check_interval=4",
    "trainer.limit_val_batches=2",
    "trainer.limit_test_batches=2",
    "trainer.log_every_n_steps=2",
    "model.lr=0.01",
    "model.warmup_steps=1",
]


@pytest.mark.slow
def test_fsdp_cpu_trains_the_sharded_gpt_end_to_end(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = run_cli(["trainer=fsdp_cpu", *TINY_GPT, f"run_dir={run_dir}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = read_report(run_dir)["run"]["summary"]
    assert summary["world_size"] == 2 and summary["global_step"] == 8
    assert summary["model"] == "TinyGPT"  # the user's class, not the FSDPTinyGPT subclass fully_shard makes
    assert summary["strategy"] == "EfficientModelParallelStrategy"
    assert summary["test_loss"] < 5.6  # below the 5.55 of uniform bytes plus a margin: it learned something
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    assert checkpoint.is_dir() and len(list(checkpoint.glob("*.distcp"))) == 2  # a sharded checkpoint


@pytest.mark.slow
def test_fsdp_cpu_with_bf16_reduction_and_balancing_reports_both(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    args = ["trainer=fsdp_cpu", *TINY_GPT, "compression=bf16", "balancing=throughput", "balancing.replan_every=4"]
    result = run_cli([*args, f"run_dir={run_dir}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    report = read_report(run_dir)
    communication = report["communication"]["summary"]
    assert communication["synchronizing_steps"] == 8 and communication["compression_ratio"] == 0.5
    assert communication["bytes_dense_per_step"] == 4 * report["run"]["summary"]["parameters"]
    balance = report["balance"]
    assert balance["summary"]["replans"] >= 1 and balance["summary"]["global_batch"] == 64
    assert sum(row["batch_size"] for row in balance["rows"]) == 64
    assert all(row["speed_samples_per_s"] > 0 for row in balance["rows"])
    with (run_dir / "metrics.csv").open() as handle:
        logged = [float(row["compression/ratio"]) for row in csv.DictReader(handle) if row.get("compression/ratio")]
    assert logged and all(ratio == 0.5 for ratio in logged)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["compression=powersgd"],
            "compression=powersgd: does not apply to FSDP2's sharded gradients (needs each whole gradient matrix and "
            "a full-size error-feedback residual on every rank); use bf16, fp16 or none",
        ),
        (
            ["compression=int8"],
            "compression=int8: does not apply to FSDP2's sharded gradients (agrees scales per whole parameter and "
            "sums integer levels, which a float reduce-scatter cannot); use bf16, fp16 or none",
        ),
        (
            ["trainer.strategy=fsdp", "compression=bf16"],
            "trainer.strategy=fsdp: must be ddp (or auto), or fsdp2 for sharded training (trainer=fsdp_cpu, "
            "trainer=fsdp), when a compression group is chosen; Lightning's fsdp (FSDP1) has no place for it",
        ),
    ],
    ids=["powersgd", "int8", "fsdp1"],
)
def test_combinations_fsdp2_cannot_serve_are_refused_in_one_line(
    tmp_path: Path, overrides: list[str], message: str
) -> None:
    result = run_cli(["trainer=fsdp_cpu", *TINY_GPT, *overrides, f"run_dir={tmp_path}/run"], cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"lightning-eff: error: {message}"]
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before training started


@pytest.mark.skipif(not torch.cuda.is_available(), reason="trainer=fsdp needs a CUDA device")
@pytest.mark.slow
def test_fsdp_trains_the_sharded_gpt_on_a_gpu_in_bf16_mixed(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = run_cli(["trainer=fsdp", "trainer.devices=1", *TINY_GPT, f"run_dir={run_dir}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = read_report(run_dir)["run"]["summary"]
    assert summary["strategy"] == "EfficientModelParallelStrategy" and summary["global_step"] == 8
    assert summary["test_loss"] < 5.6


@pytest.mark.slow
def test_fsdp_cpu_cost_balanced_variable_length_batches(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    args = ["trainer=fsdp_cpu", *TINY_GPT, "data.min_seq_len=8", "balancing=cost"]
    result = run_cli([*args, f"run_dir={run_dir}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    report = read_report(run_dir)
    assert report["run"]["summary"]["global_step"] == 8
    rows = report["balance"]["rows"]
    assert sum(row["batch_size"] for row in rows) == 64 and report["balance"]["summary"]["replans"] == 0


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            [],  # the default model, the digits MLP, never calls fully_shard
            "model._target_=lightning_eff.tasks.DigitsMLP: has no configure_model that calls fully_shard, which FSDP2 "
            "needs (e.g. model=tiny_gpt)",
        ),
        (
            ["model=tiny_gpt", "data=text", "trainer.precision=16-mixed"],
            "trainer.precision=16-mixed: must be one of 32-true, bf16-mixed, bf16-true, 16-true under FSDP2 "
            "(ModelParallelStrategy)",
        ),
    ],
    ids=["unsharded-model", "16-mixed"],
)
def test_what_fsdp2_itself_cannot_run_is_refused_in_one_line(
    tmp_path: Path, overrides: list[str], message: str
) -> None:
    result = run_cli(["trainer=fsdp_cpu", *overrides, f"run_dir={tmp_path}/run"], cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"lightning-eff: error: {message}"]
