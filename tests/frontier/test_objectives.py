from __future__ import annotations

import pytest

from lightning_eff.frontier.objectives import objectives_from_report
from lightning_eff.validation import ConfigError

RUN = {"test_loss": 0.5, "test_acc": 0.9, "model_size_bytes": 4000, "train_step_seconds": 6.0, "global_step": 10,
       "world_size": 2}  # fmt: skip


def test_objectives_are_quality_exported_bytes_and_time_per_step_of_one_process() -> None:
    report = {"run": {"summary": RUN}, "frontier": {"summary": {"model_bytes_on_disk": 900}}}
    objectives = objectives_from_report(report, "test_acc")
    assert objectives.as_list() == [0.9, 900.0, 0.3]  # 6 s summed over 2 ranks, 10 steps


def test_without_an_export_the_float_weights_count() -> None:
    assert objectives_from_report({"run": {"summary": RUN}}, "test_loss").model_bytes == 4000


def test_an_unknown_quality_names_what_the_report_has() -> None:
    expected = r"frontier\.quality=val_f1: not in the report's run section; it has .*test_acc"
    with pytest.raises(ConfigError, match=expected):
        objectives_from_report({"run": {"summary": RUN}}, "val_f1")
