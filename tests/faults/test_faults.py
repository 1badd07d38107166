"""Faults injected into real multi-process runs of the app: a rank killed with SIGKILL mid-step and the newest
checkpoint cut short. Nothing may be lost: the resumed run must end exactly where the uninterrupted
one does, with every plugin's state (pruning masks, QAT phase, compressor state, balancer shares).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import read_report, run_cli
from tests.faults.conftest import kill_points

pytestmark = [pytest.mark.faults, pytest.mark.slow]

# Every capability at once, on 2 gloo processes; deterministic so that a resumed run can be compared bit for bit
# (the cost balancer's plan does not depend on timing, PowerSGD's does not either).
EVERYTHING = [
    "trainer=ddp_cpu",
    "trainer.devices=2",
    "trainer.max_epochs=6",
    "model.hidden_sizes=[256,256]",
    "pruning=gradual_magnitude",
    "pruning.update_every=5",
    "quantization=int8_dynamic",
    "quantization.start_step=25",
    "compression=powersgd",
    "compression.start_step=3",
    "balancing=cost",
    "test_after_fit=true",
]


def start_app(args: list[str], cwd: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen(
        [sys.executable, "-m", "lightning_eff", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def child_ranks(parent: int) -> list[int]:
    """PIDs of the processes Lightning launched for ranks >= 1 (children of the first process)."""
    children = Path(f"/proc/{parent}/task/{parent}/children")
    return [int(pid) for pid in children.read_text().split()] if children.exists() else []


def wait_for(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout} s for {what}")
        time.sleep(0.02)


def final_state(run_dir: Path) -> dict[str, Any]:
    """What must match between runs: weights, every plugin's checkpointed state, and the test loss."""
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    callbacks = checkpoint["callbacks"]
    pruning = next(state for key, state in callbacks.items() if key.startswith("GradualPruning"))
    qat = next(state for key, state in callbacks.items() if key.startswith("QuantizationAwareTraining"))
    return {
        "global_step": checkpoint["global_step"],
        "weights": checkpoint["state_dict"],
        "masks": pruning["masks"],
        "qat": (qat["phase"], qat["phase_changed_at"]),
        "compression": [
            {"step": rank["step"], "compressor": rank["compressor"]} for rank in checkpoint["lightning_eff_compression"]
        ],
        "shares": checkpoint["lightning_eff_balancing"]["batch_sizes"],
        "test_loss": read_report(run_dir)["run"]["summary"]["test_loss"],
    }


def assert_same(ours: Any, reference: Any, where: str = "") -> None:
    if isinstance(reference, torch.Tensor):
        assert torch.equal(ours, reference), where
    elif isinstance(reference, dict):
        assert ours.keys() == reference.keys(), where
        for key in reference:
            assert_same(ours[key], reference[key], f"{where}.{key}")
    elif isinstance(reference, (list, tuple)):
        assert len(ours) == len(reference), where
        for index, (a, b) in enumerate(zip(ours, reference, strict=True)):
            assert_same(a, b, f"{where}[{index}]")
    else:
        assert ours == reference, where


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    work = tmp_path_factory.mktemp("uninterrupted")
    result = run_cli([*EVERYTHING, f"run_dir={work / 'run'}"], cwd=work, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    state = final_state(work / "run")
    assert state["qat"][0] == "fake_quant" and state["compression"][0]["compressor"]["residuals"]
    return state


@pytest.mark.parametrize(("epoch", "delay"), kill_points())
def test_sigkill_of_a_rank_and_a_cut_checkpoint_then_resume_auto_ends_where_the_uninterrupted_run_does(
    uninterrupted: dict[str, Any], tmp_path: Path, epoch: int, delay: float
) -> None:
    run_dir = tmp_path / "run"
    app = start_app([*EVERYTHING, f"run_dir={run_dir}"], cwd=tmp_path)
    try:
        wait_for(lambda: any(run_dir.glob(f"checkpoints/epoch={epoch - 1}-*.ckpt")) or app.poll() is not None,
                 timeout=300, what=f"the checkpoint of epoch {epoch}")  # fmt: skip
        time.sleep(delay)
        ranks = child_ranks(app.pid)
        assert app.poll() is None and ranks, "the run ended before the fault could be injected"
        killed_at = time.monotonic()
        os.kill(ranks[0], signal.SIGKILL)  # rank 1, mid-step
        output, _ = app.communicate(timeout=60)
        ended_after = time.monotonic() - killed_at
    finally:
        if app.poll() is None:
            os.killpg(app.pid, signal.SIGKILL)
    assert app.returncode != 0
    assert ended_after < 30, f"the job took {ended_after:.1f} s to end after rank 1 was killed"
    errors = [line for line in output.splitlines() if line.startswith("lightning-eff: error:")]
    assert len(errors) == 1, output[-3000:]
    assert errors[0].startswith(f"lightning-eff: error: rank 1 (pid {ranks[0]}): killed by SIGKILL; the run stopped")
    assert not (run_dir / "report.json").exists()
    newest = max(run_dir.rglob("*.ckpt"), key=lambda path: path.stat().st_mtime)
    newest.write_bytes(newest.read_bytes()[:1000])  # and the newest checkpoint cut short, as a death mid-save leaves it
    resumed = run_cli([*EVERYTHING, f"run_dir={run_dir}", "resume=auto"], cwd=tmp_path, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resume=auto: skipping {newest}" in resumed.stdout + resumed.stderr
    assert "resume=auto: resuming from" in resumed.stdout + resumed.stderr
    assert newest.with_name(newest.name + ".broken").is_file()  # kept aside, so `last.ckpt` is written afresh
    assert_same(final_state(run_dir), uninterrupted)
