"""The configs ship with the package: a non-editable install runs from any directory, and a user's own
Hydra app composes lightning_eff's groups."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, read_report


@pytest.fixture(scope="module")
def installed_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """lightning-eff built as a wheel and installed (not editable) into its own directory."""
    work = tmp_path_factory.mktemp("install")
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(work / "wheel"),
            str(REPO),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    wheel = next((work / "wheel").glob("lightning_eff-*.whl"))
    target = work / "site"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(target), str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert install.returncode == 0, install.stderr[-2000:]
    return target


def _env(site: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(site), "PYTHONWARNINGS": "ignore"}


def test_wheel_carries_the_configs(installed_copy: Path) -> None:
    assert (installed_copy / "lightning_eff" / "conf" / "train.yaml").is_file()
    assert (installed_copy / "lightning_eff" / "conf" / "model" / "tiny_gpt.yaml").is_file()
    assert (installed_copy / "hydra_plugins" / "lightning_eff_searchpath" / "__init__.py").is_file()


def test_installed_console_script_runs_from_any_directory(installed_copy: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "somewhere" / "else"
    elsewhere.mkdir(parents=True)
    result = subprocess.run(
        [str(installed_copy / "bin" / "lightning-eff"), "trainer.max_epochs=2", "run_dir=run"],
        cwd=elsewhere,
        env=_env(installed_copy),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    config = (elsewhere / "run" / ".hydra" / "hydra.yaml").read_text()
    assert str(installed_copy / "lightning_eff" / "conf") in config  # the installed configs, not the checkout's
    assert read_report(elsewhere / "run")["run"]["summary"]["global_step"] == 2 * 20


USER_APP = """
import hydra
from omegaconf import OmegaConf

@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg):
    print(OmegaConf.to_yaml(cfg))

main()
"""

USER_CONFIG = """
defaults:
  - lightning_eff/model@model: tiny_gpt
  - lightning_eff/data@data: text
  - lightning_eff/pruning@pruning: none
  - _self_
my_own_key: 1
"""


@pytest.mark.parametrize("where", ["checkout", "installed"])
def test_users_own_hydra_app_composes_our_groups(where: str, installed_copy: Path, tmp_path: Path) -> None:
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "config.yaml").write_text(USER_CONFIG)
    (tmp_path / "app.py").write_text(USER_APP)
    env = _env(installed_copy) if where == "installed" else {**os.environ}
    result = subprocess.run(
        [sys.executable, "app.py", "model.n_layer=3"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "_target_: lightning_eff.tasks.TinyGPT" in result.stdout
    assert "n_layer: 3" in result.stdout
    assert "_target_: lightning_eff.tasks.TextDataModule" in result.stdout
    assert "my_own_key: 1" in result.stdout
