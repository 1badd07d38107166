"""lightning-eff on a real local SLURM cluster: sbatch, two nodes, requeue with resume, submitit, mismatch check."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
import torch
from lightning.fabric.utilities.load import _load_distributed_checkpoint

from tests.conftest import REPO

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
SBATCH = REPO / "examples" / "slurm" / "train.sbatch"
# The small GPT with pruning, QAT and distillation from its initial self: long enough (about a minute on 2 cores)
# to be signalled mid-training.
PRUNED_GPT = [
    "experiment=text_gpt",
    "trainer.max_steps=160",
    "trainer.val_check_interval=40",
    "trainer.limit_val_batches=4",
    "trainer.limit_test_batches=4",
    "model.d_model=64",
    "pruning=gradual_magnitude",
    "pruning.update_every=10",
    "quantization=int8_dynamic_act_int4_weight",
    "quantization.start_step=80",
    "distillation=initial_kl",
]


def _run(command: list[str], env: dict[str, str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def _report(run_dir: Path) -> dict:
    return json.loads((run_dir / "report.json").read_text())


def _job_state(job: str, env: dict[str, str], cwd: Path) -> str:
    out = _run(["scontrol", "show", "job", job], env, cwd, timeout=30).stdout
    return next((word.split("=")[1] for word in out.split() if word.startswith("JobState=")), "UNKNOWN")


def _wait_for_state(job: str, states: set[str], env: dict[str, str], cwd: Path, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = _job_state(job, env, cwd)
        if state in states:
            return state
        time.sleep(1)
    raise AssertionError(f"job {job} did not reach {states} in {timeout}s (last state {state})")


def _sbatch(args: list[str], env: dict[str, str], cwd: Path, run_dir: Path, trainer: str = "ddp_cpu") -> str:
    exports = f"--export=ALL,RUN_DIR={run_dir},TRAINER={trainer}"
    submitted = _run(["sbatch", "--parsable", "--nodes=1", exports, str(SBATCH), *args], env, cwd)
    assert submitted.returncode == 0, submitted.stderr
    return submitted.stdout.strip().split(";")[0]


def test_sbatch_one_node_two_tasks_trains_with_gloo_ddp(slurm_env: dict[str, str], tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    job = _sbatch(["trainer.max_epochs=3"], slurm_env, tmp_path, run_dir)
    assert _wait_for_state(job, {"COMPLETED", "FAILED", "CANCELLED"}, slurm_env, tmp_path, 300) == "COMPLETED"
    log = (tmp_path / f"slurm-{job}.out").read_text()
    assert "distributed_backend=gloo" in log
    summary = _report(run_dir)["run"]["summary"]
    assert summary["world_size"] == 2 and summary["global_step"] == 3 * 10
    assert sorted(p.name for p in run_dir.parent.iterdir()) == ["run", f"slurm-{job}.out"]


def test_srun_two_nodes_one_task_each(slurm_env: dict[str, str], tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    command = ["srun", "--nodes=2", "--ntasks-per-node=1", "lightning-eff", "trainer=ddp_cpu", "trainer.devices=1"]
    command += ["trainer.num_nodes=2", "trainer.max_epochs=2", f"run_dir={run_dir}"]
    result = _run(command, slurm_env, tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = _report(run_dir)["run"]["summary"]
    assert summary["world_size"] == 2 and summary["global_step"] == 2 * 10
    assert "[n1]" not in result.stdout  # one report, from global rank 0


def test_task_layout_mismatch_is_refused_with_one_line(slurm_env: dict[str, str], tmp_path: Path) -> None:
    command = ["srun", "--nodes=1", "--ntasks-per-node=2", "lightning-eff", "trainer=ddp_cpu", "trainer.devices=1"]
    result = _run([*command, f"run_dir={tmp_path / 'run'}"], slurm_env, tmp_path, timeout=120)
    assert result.returncode != 0
    message = (
        "lightning-eff: error: trainer.devices=1: must equal SLURM's --ntasks-per-node=2 "
        "(or submit with --ntasks-per-node=1)"
    )
    lines = [line for line in result.stderr.splitlines() if line.startswith("lightning-eff:")]
    assert lines == [message, message]  # one line from each task, nothing else from the app
    assert "Traceback" not in result.stderr


def _final_masks(run_dir: Path) -> dict[str, torch.Tensor]:
    last = run_dir / "checkpoints" / "last.ckpt"
    if last.is_dir():  # FSDP2: a sharded checkpoint, consolidated here
        state = _load_distributed_checkpoint(last)["state_dict"]
    else:
        state = torch.load(last, weights_only=False)["state_dict"]
    return {name: tensor == 0 for name, tensor in state.items() if name.endswith("weight") and tensor.dim() == 2}


@pytest.mark.parametrize("trainer", ["ddp_cpu", "fsdp_cpu"])
def test_requeued_job_resumes_every_plugin_and_matches_an_uninterrupted_run(
    slurm_env: dict[str, str], tmp_path: Path, trainer: str
) -> None:
    """DDP, and FSDP2 (sharded checkpoints: the model's and optimizer's shards, and GradualPruning's mask shards)."""
    uninterrupted = tmp_path / "uninterrupted"
    reference = _sbatch(PRUNED_GPT, slurm_env, tmp_path, uninterrupted, trainer)
    assert _wait_for_state(reference, {"COMPLETED", "FAILED"}, slurm_env, tmp_path, 400) == "COMPLETED"

    requeued = tmp_path / "requeued"
    job = _sbatch(PRUNED_GPT, slurm_env, tmp_path, requeued, trainer)
    deadline = time.monotonic() + 300
    while not (requeued / "metrics.csv").is_file() or len((requeued / "metrics.csv").read_text().splitlines()) < 3:
        assert time.monotonic() < deadline, "training never started"
        time.sleep(0.5)
    signalled = _run(["scancel", "--signal=USR1", job], slurm_env, tmp_path, timeout=30)
    assert signalled.returncode == 0, signalled.stderr
    assert _wait_for_state(job, {"COMPLETED", "FAILED"}, slurm_env, tmp_path, 400) == "COMPLETED"

    log = (tmp_path / f"slurm-{job}.out").read_text()
    assert f"job {job} restart 1" in log and "resume=auto: resuming from" in log and "hpc_ckpt_1.ckpt" in log
    saved_at = int(log.split("saved ")[1].split(" at step ")[1].split()[0])
    assert 0 < saved_at < 160  # interrupted mid-training
    ours, theirs = _report(requeued), _report(uninterrupted)
    assert ours["pruning"]["summary"]["achieved_sparsity"] == theirs["pruning"]["summary"]["achieved_sparsity"]
    assert ours["pruning"]["summary"]["mask_updates"] == theirs["pruning"]["summary"]["mask_updates"]
    assert ours["run"]["summary"]["test_loss"] == pytest.approx(theirs["run"]["summary"]["test_loss"], abs=1e-5)
    assert ours["run"]["summary"]["global_step"] == 160
    assert ours["quantization"]["summary"]["fake_quant_from_step"] == 80  # the QAT phase survived the requeue
    for mine, reference_row in zip(ours["quantization"]["rows"], theirs["quantization"]["rows"], strict=True):
        assert mine["metric"] == reference_row["metric"]
        assert mine["converted"] == pytest.approx(reference_row["converted"], abs=1e-5)
    distilled, reference = ours["distillation"]["summary"], theirs["distillation"]["summary"]
    assert distilled["final_distillation_loss"] == pytest.approx(reference["final_distillation_loss"], abs=1e-5)
    assert distilled["test_agreement"] == pytest.approx(reference["test_agreement"], abs=1e-6)
    masks, reference_masks = _final_masks(requeued), _final_masks(uninterrupted)
    assert masks.keys() == reference_masks.keys()
    assert all(torch.equal(masks[name], reference_masks[name]) for name in masks)


def test_submitit_launcher_submits_to_the_cluster(slurm_env: dict[str, str], tmp_path: Path) -> None:
    command = ["lightning-eff", "-m", "hydra/launcher=slurm", "trainer=ddp_cpu", "trainer.max_epochs=2"]
    command += [f"hydra.sweep.dir={tmp_path / 'sweep'}", "hydra.launcher.timeout_min=10"]
    result = _run(command, slurm_env, tmp_path, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = _report(tmp_path / "sweep" / "0")["run"]["summary"]
    assert summary["world_size"] == 2 and summary["global_step"] == 2 * 10
    assert list((tmp_path / "sweep" / ".submitit").iterdir())  # submitted through submitit, not run locally


def test_frontier_sweep_runs_its_trials_through_the_slurm_launcher(slurm_env: dict[str, str], tmp_path: Path) -> None:
    # The frontier sweep's trials as SLURM jobs (submitit): each job opens the study in the sweep directory's
    # SQLite file, a dominated trial stops early without ending the sweep, and a repeat is answered from the study.
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    optuna = pytest.importorskip("optuna")
    sweep_dir = tmp_path / "sweep"
    command = ["lightning-eff", "-m", "hydra/launcher=slurm", "hydra.launcher.timeout_min=10",
               "hydra/sweeper=frontier", "hydra.sweeper.n_trials=3", "hydra.sweeper.params=null",
               "model.lr=choice(0.00001,0.001,0.00002)", f"hydra.sweep.dir={sweep_dir}", "trainer.max_epochs=2",
               "trainer.limit_train_batches=6", "trainer.val_check_interval=3", "trainer.limit_val_batches=2",
               "trainer.limit_test_batches=3", "trainer.enable_checkpointing=false"]  # fmt: skip
    result = _run(command, slurm_env, tmp_path, timeout=500)
    assert result.returncode == 0, result.stderr[-3000:]
    assert list((sweep_dir / ".submitit").iterdir())  # submitted through submitit, not run locally
    study = optuna.load_study(study_name="frontier", storage=f"sqlite:///{sweep_dir}/optuna.db")
    trials = study.get_trials()
    assert [t.params["model.lr"] for t in trials] == [0.001, 2e-05, 2e-05]
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "FAIL"]
    assert trials[1].user_attrs["frontier_stopped"]["dominated_by_trial"] == 0
    assert json.loads((sweep_dir / "2" / "frontier_repeat.json").read_text())["repeat_of_trial"] == 1
    assert trials[0].values[1] == (sweep_dir / "0" / "model.sparse.pt").stat().st_size
    assert "3 trials (1 complete, 1 stopped early, 1 repeats not trained, 0 failed)" in result.stdout
