"""The capabilities are declared once (`lightning_eff.capabilities`); everything else must follow that list."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from lightning_eff import GradualPruning, QuantizationAwareTraining
from lightning_eff.balancing import ThroughputBalancer
from lightning_eff.capabilities import CAPABILITIES, CAPABILITY_GROUPS, SHARED_GROUPS, ChecksModel, ChecksWorldSize
from lightning_eff.hydra_config import config_dir
from lightning_eff.validation import ConfigError
from tests.conftest import run_cli

APP_ONLY_GROUPS = {"experiment", "hydra"}  # the lightning-eff app's own, not offered to users' Hydra apps


def train_yaml_defaults() -> dict[str, str | None]:
    defaults = OmegaConf.to_container(OmegaConf.load(config_dir() / "train.yaml"))["defaults"]  # type: ignore[index]
    return {key: value for entry in defaults if isinstance(entry, dict) for key, value in entry.items()}


@pytest.mark.parametrize("group", CAPABILITY_GROUPS)
def test_every_capability_has_a_none_member_and_a_default(group: str) -> None:
    assert (config_dir() / group / "none.yaml").is_file()
    assert train_yaml_defaults().get(group) == "none"  # off unless chosen


def test_every_config_group_folder_is_declared() -> None:
    folders = {path.name for path in Path(config_dir()).iterdir() if path.is_dir()}
    assert folders - APP_ONLY_GROUPS == set(SHARED_GROUPS)
    assert set(SHARED_GROUPS) <= set(train_yaml_defaults())


def test_strategy_capabilities_name_real_strategy_arguments() -> None:
    import inspect

    from lightning_eff import EfficientDDPStrategy

    arguments = inspect.signature(EfficientDDPStrategy.__init__).parameters
    for capability in CAPABILITIES:
        if capability.strategy_argument is not None:
            assert capability.strategy_argument in arguments
            assert capability.across_ranks  # a strategy capability always works between processes


def test_capability_objects_declare_their_checks() -> None:
    assert isinstance(GradualPruning(), ChecksModel)
    assert isinstance(QuantizationAwareTraining("int8_dynamic"), ChecksModel)
    assert isinstance(ThroughputBalancer(), ChecksWorldSize)
    assert not isinstance(ThroughputBalancer(), ChecksModel)
    with pytest.raises(ConfigError, match=r"^min_share=0.4: must be < 1/world_size = 0.333"):
        ThroughputBalancer(min_share=0.4).check_world_size(3)


@pytest.mark.slow
def test_app_reports_a_world_size_rule_of_the_balancer_before_launch(tmp_path: Path) -> None:
    result = run_cli(
        ["trainer=ddp_cpu", "trainer.devices=2", "balancing=throughput", "balancing.min_share=0.6", "run_dir=run"],
        cwd=tmp_path,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "lightning-eff: error: balancing.min_share=0.6: must be < 1/world_size = 0.5" in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()  # nothing was launched
