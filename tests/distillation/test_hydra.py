"""Distillation through the `lightning-eff` app: the member, its validation, and a run with pruning."""

from __future__ import annotations

from pathlib import Path

import pytest

from lightning_eff.cli import instantiate_group
from lightning_eff.config import validate
from lightning_eff.distillation import KnowledgeDistillation
from lightning_eff.validation import ConfigError
from tests.conftest import compose_app_config, read_report, run_cli


def test_the_member_builds_a_callback_that_distils_from_the_initial_model() -> None:
    callback = instantiate_group(compose_app_config(["distillation=initial_kl"]), "distillation")
    assert isinstance(callback, KnowledgeDistillation)
    assert (callback.teacher_spec, callback.loss, callback.temperature, callback.weight) == ("initial", "kl", 2.0, 0.5)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["distillation.temperature=0"], "distillation.temperature=0: must be > 0"),
        (["distillation.loss=huber"], "distillation.loss=huber: must be one of"),
        (["distillation.teacher=bigger"], "distillation.teacher=bigger: must be a torch.nn.Module, or 'initial'"),
        (["+distillation.alpha=0.5"], "distillation.alpha=0.5: unknown key; distillation takes teacher"),
    ],
)
def test_bad_distillation_values_name_the_key(overrides: list[str], message: str) -> None:
    cfg = compose_app_config(["distillation=initial_kl", *overrides])
    with pytest.raises(ConfigError) as caught:
        validate(cfg)
        instantiate_group(cfg, "distillation")
    assert str(caught.value).startswith(message)


def test_cli_run_prunes_and_distils_from_the_initial_model(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = run_cli(["distillation=initial_kl", "pruning=gradual_magnitude", "trainer.max_epochs=3",
                      f"run_dir={run_dir}"], tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = read_report(run_dir)
    summary = report["distillation"]["summary"]
    assert summary["steps"] > 0 and summary["final_distillation_loss"] >= 0
    assert 0 <= summary["last_batch_agreement"] <= 1 and summary["teacher_parameters"] == summary["student_parameters"]
    assert report["pruning"]["summary"]["achieved_sparsity"] > 0.5  # the student pruned, the teacher not
    assert "== distillation ==" in result.stdout
