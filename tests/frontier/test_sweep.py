"""A 3-trial frontier sweep through Hydra's Optuna sweeper, as a user runs it: the objectives reach the study,
a dominated trial stops early through the shared storage, and the frontier report reproduces its trials."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import read_report, run_cli

optuna = pytest.importorskip("optuna")
pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")

pytestmark = pytest.mark.slow

# Two validations (steps 3 and 6) per trial on the digits MLP. With the sweeper's seed 0, NSGA-II's first three
# draws of model.lr are 1e-05, 0.001, 1e-05: trial 1 learns, so at step 3 it beats trial 2 (the same model, so
# the same bytes) by more than min_delta, and trial 2 is stopped there. Trial 2 repeats trial 0's configuration,
# so these sweeps train repeats (frontier.skip_repeats=false); test_a_repeated_configuration_... covers skipping.
TINY = [
    "trainer.max_epochs=2",
    "trainer.limit_train_batches=6",
    "trainer.val_check_interval=3",
    "trainer.limit_val_batches=2",
    "trainer.limit_test_batches=3",
    "trainer.enable_checkpointing=false",
]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    workdir = tmp_path_factory.mktemp("frontier")
    sweep_dir = workdir / "sweep"
    args = ["-m", "hydra/sweeper=frontier", "hydra.sweeper.n_trials=3", "hydra.sweeper.params=null",
            "model.lr=choice(0.001,0.00001)", f"hydra.sweep.dir={sweep_dir}", "frontier.skip_repeats=false",
            *TINY]  # fmt: skip
    result = run_cli(args, cwd=workdir, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return sweep_dir, result


def test_objectives_reach_the_study_and_a_dominated_trial_stops(
    sweep: tuple[Path, subprocess.CompletedProcess],
) -> None:
    sweep_dir, _ = sweep
    study = optuna.load_study(study_name="frontier", storage=f"sqlite:///{sweep_dir}/optuna.db")
    trials = study.get_trials()
    assert [t.params["model.lr"] for t in trials] == [1e-05, 0.001, 1e-05]
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE", "FAIL"]  # the sweeper's word for stopped
    for trial in trials[:2]:
        report = read_report(sweep_dir / str(trial.number))
        run, frontier = report["run"]["summary"], report["frontier"]["summary"]
        steps = run["global_step"] * run["world_size"]
        assert trial.values == pytest.approx(
            [run["test_loss"], frontier["model_bytes_on_disk"], run["train_step_seconds"] / steps]
        )
        assert frontier["model_bytes_on_disk"] == (sweep_dir / str(trial.number) / "model.sparse.pt").stat().st_size
    assert trials[1].values[0] < trials[0].values[0]  # lr 1e-3 learned, 1e-5 did not
    stopped = json.loads((sweep_dir / "2" / "frontier_stopped.json").read_text())
    assert stopped["step"] == 3 and stopped["dominated_by_trial"] == 1
    assert not (sweep_dir / "2" / "report.json").exists()
    assert sorted(trials[2].intermediate_values) == [3]  # stopped at its first validation


def test_frontier_report_lists_the_front_with_commands_that_reproduce_it(
    sweep: tuple[Path, subprocess.CompletedProcess], tmp_path: Path
) -> None:
    sweep_dir, result = sweep
    payload = json.loads((sweep_dir / "frontier.json").read_text())
    states = {t["job"]: t["state"] for t in payload["trials"]}
    assert states == {"0": "complete", "1": "complete", "2": "stopped"}
    assert payload["fronts"]["bytes"] == ["1"]  # same bytes, better loss: trial 1 dominates trial 0
    assert (sweep_dir / "frontier.png").stat().st_size > 10_000
    assert "Pareto front: test_loss vs model_bytes" in result.stdout

    best = next(t for t in payload["trials"] if t["job"] == "1")
    assert "model.lr=0.001" in best["overrides"] and not any(o.startswith("frontier.") for o in best["overrides"])
    rerun = run_cli([*best["overrides"], f"hydra.run.dir={tmp_path}"], cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert read_report(tmp_path)["run"]["summary"]["test_loss"] == pytest.approx(best["objectives"]["quality"])


def test_lightning_eff_frontier_prints_the_report_again(sweep: tuple[Path, subprocess.CompletedProcess]) -> None:
    sweep_dir, first = sweep
    again = subprocess.run([sys.executable, "-m", "lightning_eff.frontier", str(sweep_dir)],
                           capture_output=True, text=True, timeout=120)  # fmt: skip
    assert again.returncode == 0, again.stderr
    table = first.stdout[first.stdout.index("frontier: 3 trials") :].strip()
    assert again.stdout.strip() == table


def test_lightning_eff_frontier_refuses_a_directory_without_jobs(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "lightning_eff.frontier", str(tmp_path)],
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        == f"lightning-eff-frontier: error: {tmp_path} holds no sweep jobs (*/.hydra/overrides.yaml)"
    )


def test_two_process_trials_each_run_their_own_job_and_stop_together(tmp_path: Path) -> None:
    # Lightning starts rank 1 by running the command line again, which inside a sweep is the whole sweep: each
    # rank must run its job (no extra trials in the study), the next job must start its own ranks again, and a
    # stopped trial must end on both ranks without taking the sweep down.
    sweep_dir = tmp_path / "sweep"
    args = ["-m", "hydra/sweeper=frontier", "hydra.sweeper.n_trials=3", "hydra.sweeper.params=null",
            "trainer=ddp_cpu", "compression=fp16", "model.lr=choice(0.001,0.00001)", f"hydra.sweep.dir={sweep_dir}",
            "frontier.skip_repeats=false", *TINY]  # fmt: skip
    result = run_cli(args, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    study = optuna.load_study(study_name="frontier", storage=f"sqlite:///{sweep_dir}/optuna.db")
    assert [t.state.name for t in study.get_trials()] == ["COMPLETE", "COMPLETE", "FAIL"]
    for number in (0, 1):
        report = read_report(sweep_dir / str(number))
        assert report["run"]["summary"]["world_size"] == 2
        assert report["communication"]["summary"]["compressor"] == "FP16()"
    assert json.loads((sweep_dir / "2" / "frontier_stopped.json").read_text())["dominated_by_trial"] == 1


def test_a_repeated_configuration_reuses_the_earlier_trial_without_training(tmp_path: Path) -> None:
    # NSGA-II (seed 0) draws model.lr 0.001, 2e-05, 2e-05, 0.001 from these three: trial 1 is stopped at step 3 by
    # trial 0, trial 2 repeats the stopped trial 1 and trial 3 the complete trial 0; neither repeat trains.
    sweep_dir = tmp_path / "sweep"
    args = ["-m", "hydra/sweeper=frontier", "hydra.sweeper.n_trials=4", "hydra.sweeper.params=null",
            "model.lr=choice(0.00001,0.001,0.00002)", f"hydra.sweep.dir={sweep_dir}", *TINY]  # fmt: skip
    result = run_cli(args, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    study = optuna.load_study(study_name="frontier", storage=f"sqlite:///{sweep_dir}/optuna.db")
    trials = study.get_trials()
    assert [t.params["model.lr"] for t in trials] == [0.001, 2e-05, 2e-05, 0.001]
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "FAIL", "COMPLETE"]
    assert trials[3].values == trials[0].values
    assert trials[1].user_attrs["frontier_stopped"]["dominated_by_trial"] == 0
    for job, of in (("2", 1), ("3", 0)):
        repeat = json.loads((sweep_dir / job / "frontier_repeat.json").read_text())
        assert repeat["repeat_of_trial"] == of and repeat["job"] == str(of)
        assert not (sweep_dir / job / "report.json").exists() and not (sweep_dir / job / "metrics.csv").exists()
        assert trials[int(job)].intermediate_values == {}  # no validation ran
    assert "trial 3 repeats trial 0 (job 0)" in result.stdout
    payload = json.loads((sweep_dir / "frontier.json").read_text())
    assert [t["state"] for t in payload["trials"]] == ["complete", "stopped", "repeat", "repeat"]
    assert payload["fronts"]["bytes"] == ["0"]
    assert "4 trials (1 complete, 1 stopped early, 2 repeats not trained, 0 failed)" in result.stdout


def test_a_bad_frontier_setting_ends_the_sweep_with_one_line_naming_the_key(tmp_path: Path) -> None:
    args = ["-m", "hydra/sweeper=frontier", "hydra.sweeper.n_trials=2", "hydra.sweeper.params=null",
            f"hydra.sweep.dir={tmp_path / 'sweep'}", "frontier.monitor_direction=up", *TINY]  # fmt: skip
    result = run_cli(args, cwd=tmp_path, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "lightning-eff: error: frontier.monitor_direction=up: must be one of minimize, maximize"
    )
    assert not (tmp_path / "sweep" / "1").exists()  # the first trial's error ended the sweep
