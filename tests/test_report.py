"""The report collects sections from any callback that implements ReportContributor."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L

from lightning_eff.report import ReportSection, contributed_sections, format_report, write_report
from lightning_eff.tasks import DigitsDataModule, DigitsMLP


class CountsSteps(L.Callback):
    def __init__(self) -> None:
        self.steps = 0

    def on_train_batch_end(self, *args: Any) -> None:
        self.steps += 1

    def report_section(self, trainer: L.Trainer, run_dir: Path) -> ReportSection:
        return ReportSection("counter", {"steps": self.steps}, rows=[{"layer": "a", "share": 0.5}], figures=["x.png"])


def test_contributed_section_reaches_json_and_text(tmp_path: Path, quiet_trainer_kwargs: dict[str, Any]) -> None:
    counter = CountsSteps()
    trainer = L.Trainer(max_steps=3, accelerator="cpu", callbacks=[counter], **quiet_trainer_kwargs)
    trainer.fit(DigitsMLP(hidden_sizes=[8]), datamodule=DigitsDataModule())
    sections = contributed_sections(trainer, tmp_path)
    assert [s.name for s in sections] == ["counter"]
    report = json.loads(write_report(sections, tmp_path).read_text())
    assert report == {
        "counter": {"summary": {"steps": 3}, "rows": [{"layer": "a", "share": 0.5}], "figures": ["x.png"]}
    }
    text = format_report(sections)
    assert "== counter ==" in text and "steps  3" in text and "figure: x.png" in text
    assert "layer  share" in text
