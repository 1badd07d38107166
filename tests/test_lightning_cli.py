"""The suite from LightningCLI (examples/lightning_cli.py): callbacks and a registered strategy by name, and the
suite's config errors as one line."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

pytest.importorskip("jsonargparse")

EXAMPLE = str(REPO / "examples" / "lightning_cli.py")


def run_example(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, EXAMPLE, "fit", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)  # fmt: skip


@pytest.mark.slow
def test_callbacks_and_a_registered_strategy_from_the_command_line(tmp_path: Path) -> None:
    result = run_example(
        ["--trainer.max_epochs=2", "--trainer.log_every_n_steps=5", "--trainer.enable_progress_bar=false",
         "--trainer.callbacks+=lightning_eff.GradualPruning", "--trainer.callbacks.target_sparsity=0.5",
         "--trainer.callbacks.update_every=5",
         "--trainer.callbacks+=lightning_eff.QuantizationAwareTraining", "--trainer.callbacks.scheme=int8_dynamic",
         "--trainer.strategy=ddp_fp16", "--trainer.accelerator=cpu", "--trainer.devices=1",
         "--trainer.logger=CSVLogger", f"--trainer.logger.save_dir={tmp_path}"],
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    with open(tmp_path / "lightning_logs" / "version_0" / "metrics.csv") as file:
        rows = list(csv.DictReader(file))
    sparsity = [float(row["pruning/sparsity"]) for row in rows if row["pruning/sparsity"]]
    assert sparsity[-1] == pytest.approx(0.5)
    assert any(row["quantization/fake_quant"] == "1.0" for row in rows)
    assert any(row.get("compression/ratio") for row in rows), list(rows[0])  # EfficientDDPStrategy's fp16 hook


def test_a_suite_config_error_is_one_line_with_exit_status_2(tmp_path: Path) -> None:
    result = run_example(
        ["--trainer.callbacks+=lightning_eff.GradualPruning", "--trainer.callbacks.target_sparsity=1.5",
         "--trainer.logger=false"],
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert errors == ["lightning-eff: error: GradualPruning: target_sparsity=1.5: must be in [0, 1)"]
    assert "Traceback" not in result.stderr


def test_other_errors_are_left_to_lightning_cli(tmp_path: Path) -> None:
    result = run_example(["--trainer.max_epochs=not-a-number"], cwd=tmp_path)
    assert result.returncode != 0 and "lightning-eff: error" not in result.stderr
