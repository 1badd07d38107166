"""The app with the user's own LightningModule and DataModule (`model=custom`, `data=custom`), as the README shows."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.conftest import REPO, read_report, run_cli

pytestmark = pytest.mark.slow

# `my_pkg` (tests/own_classes_pkg/my_pkg) stands for the user's installed package.
ON_PATH = {"PYTHONPATH": os.pathsep.join([str(REPO / "tests" / "own_classes_pkg"), os.environ.get("PYTHONPATH", "")])}
OWN = ["model=custom", "model._target_=my_pkg.MyModule", "data=custom", "data._target_=my_pkg.MyData"]


def test_readme_example_trains_the_users_classes_with_their_own_arguments_and_a_capability(tmp_path: Path) -> None:
    args = [*OWN, "+model.hidden_size=32", "+data.batch_size=16", "trainer.max_epochs=4",
            "pruning=gradual_magnitude", "pruning.target_sparsity=0.5", f"hydra.run.dir={tmp_path}"]  # fmt: skip
    result = run_cli(args, cwd=tmp_path, env=ON_PATH)
    assert result.returncode == 0, result.stderr[-3000:]
    report = read_report(tmp_path)
    run = report["run"]["summary"]
    assert run["model"] == "MyModule"
    assert run["parameters"] == 16 * 32 + 32 + 32 * 4 + 4  # hidden_size=32 reached the constructor
    assert run["test_acc"] > 0.7  # learned (4 balanced-ish classes: chance is about 0.25)
    assert run["global_step"] == 4 * 16  # 256 training samples in batches of 16 (batch_size reached MyData)
    assert report["pruning"]["summary"]["achieved_sparsity"] == pytest.approx(0.5)


def test_a_default_members_keys_passed_to_the_users_class_name_the_custom_member(tmp_path: Path) -> None:
    result = run_cli(["model._target_=my_pkg.MyModule", "data._target_=my_pkg.MyData"], cwd=tmp_path, env=ON_PATH)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "lightning-eff: error: data._target_=my_pkg.MyData: could not be built: MyData.__init__() got an unexpected "
        "keyword argument 'val_fraction'; for your own class start from data=custom, which has no keys of its own"
    )


def test_custom_without_a_target_is_one_line(tmp_path: Path) -> None:
    result = run_cli(["model=custom"], cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == "lightning-eff: error: model._target_=None: must name a class to instantiate"
