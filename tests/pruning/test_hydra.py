"""Pruning through the `lightning-eff` app: config members, overrides, validation, report."""

from __future__ import annotations

from pathlib import Path

import pytest

from lightning_eff.cli import instantiate_group
from lightning_eff.config import validate
from lightning_eff.pruning import GradualPruning
from lightning_eff.tasks import DigitsMLP
from lightning_eff.validation import ConfigError
from tests.conftest import compose_app_config, read_report, run_cli


@pytest.mark.parametrize(
    ("member", "granularity", "scope", "target"),
    [
        ("gradual_magnitude", "unstructured", "layer", 0.9),
        ("global_magnitude", "unstructured", "global", 0.9),
        ("channels", "channels", "layer", 0.5),
        ("nm_2_4", "n:m", "layer", 0.5),
    ],
)
def test_members_build_the_callback_they_name(member: str, granularity: str, scope: str, target: float) -> None:
    callback = instantiate_group(compose_app_config([f"pruning={member}"]), "pruning")
    assert isinstance(callback, GradualPruning)
    assert (callback.granularity, callback.scope, callback.target_sparsity) == (granularity, scope, target)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["pruning.target_sparsity=1.5"], "pruning.target_sparsity=1.5: must be in [0, 1)"),
        (["pruning.initial_sparsity=0.95"], "pruning.initial_sparsity=0.95: must be in [0, target_sparsity=0.9]"),
        (["pruning.start_step=10", "pruning.end_step=5"], "pruning.end_step=5: must be > start_step=10"),
        (["pruning.update_every=0"], "pruning.update_every=0: must be >= 1"),
        (["pruning.update_every=often"], "pruning.update_every=often: must be of type int"),
        (["+pruning.amount=0.5"], "pruning.amount=0.5: unknown key; pruning takes target_sparsity"),
    ],
)
def test_bad_pruning_values_name_the_key(overrides: list[str], message: str) -> None:
    cfg = compose_app_config(["pruning=gradual_magnitude", *overrides])
    with pytest.raises(ConfigError) as caught:
        validate(cfg)
        instantiate_group(cfg, "pruning")
    assert str(caught.value).startswith(message)


def test_nm_pattern_that_does_not_parse_is_refused() -> None:
    cfg = compose_app_config(["pruning=nm_2_4", "pruning.pattern=two-four"])
    with pytest.raises(ConfigError, match=r"^pruning\.pattern=two-four: must look like N:M"):
        instantiate_group(cfg, "pruning")


def test_cli_refuses_an_include_that_matches_nothing_before_training(tmp_path: Path) -> None:
    result = run_cli(["pruning=gradual_magnitude", "pruning.include=[encoder.*]", f"run_dir={tmp_path}/run"], tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "lightning-eff: error: pruning.include=encoder.*: matches no prunable layer; layers: net.1, net.4, net.7"
    )
    assert not (tmp_path / "run" / "checkpoints").exists()
    DigitsMLP()  # the names listed are the default model's layers


@pytest.mark.slow
def test_cli_pruning_run_reports_sparsity_and_writes_the_plot(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = run_cli(["pruning=gradual_magnitude", "pruning.target_sparsity=0.95", f"run_dir={run_dir}"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    report = read_report(run_dir)
    assert report["pruning"]["summary"]["achieved_sparsity"] == pytest.approx(0.95, abs=0.005)
    assert {row["layer"] for row in report["pruning"]["rows"]} == {"net.1.weight", "net.4.weight", "net.7.weight"}
    assert (run_dir / report["pruning"]["figures"][0]).is_file()
    assert report["run"]["summary"]["test_acc"] > 0.9
    assert "== pruning ==" in result.stdout
