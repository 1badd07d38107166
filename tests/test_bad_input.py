"""A sweep of bad input: every bad value gives one `ConfigError` line that names its key, never a raw error.

Two tables: the Python API (a constructor, its keyword arguments, the message's start) and the app's overrides
(checked in-process as `cli.train` does before `fit`), and a few of the app's through the real command line.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from lightning_eff import EfficientDDPStrategy, GradualPruning, QuantizationAwareTraining
from lightning_eff.balancing import CostBalancer, ThroughputBalancer
from lightning_eff.cli import build_trainer, instantiate_group
from lightning_eff.compression import FP16, Auto, Int8, PowerSGD, TopK
from lightning_eff.config import validate
from lightning_eff.launch_checks import check_before_launch
from lightning_eff.tasks import DigitsMLP
from lightning_eff.validation import ConfigError
from tests.conftest import compose_app_config, run_cli

MLP_LAYERS = "layers: net.1, net.4, net.7"


def prune_mlp(**kwargs: Any) -> object:
    """`GradualPruning(**kwargs)` checked against the digits MLP, as the app does before training."""
    return GradualPruning(**kwargs).check_model(DigitsMLP(hidden_sizes=[64, 64]))


def quantize_mlp(**kwargs: Any) -> object:
    """`QuantizationAwareTraining(**kwargs)` checked against the digits MLP."""
    return QuantizationAwareTraining(**kwargs).check_model(DigitsMLP(hidden_sizes=[64, 64]))


def balancer_at_world_size_4(**kwargs: Any) -> None:
    ThroughputBalancer(**kwargs).check_world_size(4)


def a_comm_hook(state: object, bucket: object) -> None:
    """Stands in for a user's own DDP comm hook."""


PYTHON_API: list[tuple[Callable[..., object], dict[str, Any], str]] = [
    # GradualPruning
    (GradualPruning, {"target_sparsity": "0.5"}, "target_sparsity=0.5: must be in [0, 1) (a number, not a string)"),
    (GradualPruning, {"target_sparsity": False}, "target_sparsity=False: must be in [0, 1) (a number, not a bool)"),
    (GradualPruning, {"target_sparsity": None}, "target_sparsity=None: must be in [0, 1) (a number, not null)"),
    (GradualPruning, {"target_sparsity": 1.0}, "target_sparsity=1.0: must be in [0, 1)"),
    (
        GradualPruning,
        {"initial_sparsity": "0"},
        "initial_sparsity=0: must be in [0, target_sparsity=0.9] (a number, not a string)",
    ),
    (GradualPruning, {"start_step": 1.5}, "start_step=1.5: must be an integer, not a float"),
    (GradualPruning, {"end_step": "100"}, "end_step=100: must be an integer, not a string"),
    (GradualPruning, {"update_every": True}, "update_every=True: must be an integer, not a bool"),
    (GradualPruning, {"schedule": "quadratic"}, "schedule=quadratic: must be one of cubic, linear"),
    (GradualPruning, {"granularity": None}, "granularity=None: must be one of unstructured, channels, n:m"),
    (
        GradualPruning,
        {"granularity": "n:m", "pattern": 24, "target_sparsity": 0.5},
        "pattern=24: must look like N:M, e.g. 2:4",
    ),
    (GradualPruning, {"include": 5}, "include=5: must be a module-name glob or a list of them"),
    (GradualPruning, {"include": [5]}, "include=[5]: must be a module-name glob or a list of them"),
    (GradualPruning, {"exclude": ""}, "exclude='': must be a module-name glob or a list of them"),
    (GradualPruning, {"make_permanent": "yes"}, "make_permanent=yes: must be true or false"),
    (prune_mlp, {"exclude": ["*"]}, f"exclude=[*]: leaves no layer to prune; {MLP_LAYERS}"),
    (prune_mlp, {"include": ["net.7"], "exclude": "net.7"}, f"exclude=[net.7]: leaves no layer to prune; {MLP_LAYERS}"),
    (
        prune_mlp,
        {"granularity": "channels", "exclude": ["net.1", "net.4"]},
        "exclude=[net.1,net.4]: leaves no channel group to prune (",
    ),
    (prune_mlp, {"include": "*query"}, f"include=*query: matches no prunable layer; {MLP_LAYERS}"),
    # QuantizationAwareTraining
    (QuantizationAwareTraining, {"scheme": "int3"}, "scheme=int3: must be one of int8_dynamic_act_int4_weight"),
    (QuantizationAwareTraining, {"group_size": "32"}, "group_size=32: must be an integer, not a string"),
    (QuantizationAwareTraining, {"group_size": 0}, "group_size=0: must be >= 1"),
    (QuantizationAwareTraining, {"start_step": -1}, "start_step=-1: must be >= 0"),
    (QuantizationAwareTraining, {"include": 3}, "include=3: must be a module-name glob or a list of them"),
    (QuantizationAwareTraining, {"exclude": ("head", 1)}, "exclude=[head,1]: must be a module-name glob"),
    (QuantizationAwareTraining, {"convert_on_fit_end": "no"}, "convert_on_fit_end=no: must be true or false"),
    (QuantizationAwareTraining, {"export_path": 5}, "export_path=5: must be a file path or null"),
    (
        QuantizationAwareTraining,
        {"export_path": "model.pt2", "convert_on_fit_end": False},
        "export_path=model.pt2: needs convert_on_fit_end=true",
    ),
    (quantize_mlp, {"exclude": ["*"]}, f"exclude=[*]: leaves no layer to quantize; {MLP_LAYERS}"),
    (quantize_mlp, {"include": "*query"}, f"include=*query: matches no quantizable layer; {MLP_LAYERS}"),
    (
        quantize_mlp,
        {"scheme": "int4_weight_only", "group_size": 48},
        "group_size=48: must divide the input width of every quantized layer; net.1 has 64",
    ),
    # EfficientDDPStrategy
    (EfficientDDPStrategy, {"compression": "zip"}, "compression=zip: must be one of dense, fp16, bf16, powersgd"),
    (EfficientDDPStrategy, {"compression": 3}, "compression=3: must be one of dense, fp16, bf16, powersgd"),
    (EfficientDDPStrategy, {"compression": PowerSGD}, "compression=PowerSGD: is a class; pass an instance"),
    (EfficientDDPStrategy, {"compression": FP16}, "compression=FP16: is a class; pass an instance, e.g. FP16()"),
    (
        EfficientDDPStrategy,
        {"balancer": "cost"},
        "balancer=cost: must be a ThroughputBalancer, a CostBalancer, throughput (a default one) or None",
    ),
    (EfficientDDPStrategy, {"balancer": ThroughputBalancer}, "balancer=ThroughputBalancer: is a class"),
    (
        EfficientDDPStrategy,
        {"compression": "powersgd", "ddp_comm_hook": a_comm_hook},
        "compression=powersgd: cannot be combined with ddp_comm_hook",
    ),
    # compressors
    (PowerSGD, {"rank": "4"}, "rank=4: must be an integer, not a string"),
    (PowerSGD, {"rank": True}, "rank=True: must be an integer, not a bool"),
    (PowerSGD, {"start_step": 1}, "start_step=1: must be >= 2 with error_feedback=true"),
    (PowerSGD, {"seed": -1}, "seed=-1: must be >= 0"),
    (PowerSGD, {"warm_start": 1}, "warm_start=1: must be true or false"),
    (TopK, {"ratio": "0.1"}, "ratio=0.1: must be in (0, 1] (a number, not a string)"),
    (TopK, {"ratio": True}, "ratio=True: must be in (0, 1] (a number, not a bool)"),
    (TopK, {"ratio": 0}, "ratio=0: must be in (0, 1]"),
    (TopK, {"error_feedback": None}, "error_feedback=None: must be true or false"),
    (Int8, {"seed": 1.5}, "seed=1.5: must be an integer, not a float"),
    (Int8, {"error_feedback": 0}, "error_feedback=0: must be true or false"),
    (Auto, {"margin": "0.1"}, "margin=0.1: must be in [0, 1) (a number, not a string)"),
    (Auto, {"margin": 1.0}, "margin=1.0: must be in [0, 1)"),
    (Auto, {"probe_steps": "20"}, "probe_steps=20: must be an integer, not a string"),
    (Auto, {"candidate": None}, "candidate=None: must be a compressor other than Auto"),
    # balancers
    (ThroughputBalancer, {"replan_every": 0}, "replan_every=0: must be >= 1"),
    (ThroughputBalancer, {"smoothing": "0.8"}, "smoothing=0.8: must be in [0, 1) (a number, not a string)"),
    (ThroughputBalancer, {"smoothing": 1.0}, "smoothing=1.0: must be in [0, 1)"),
    (ThroughputBalancer, {"min_share": None}, "min_share=None: must be in (0, 1) (a number, not null)"),
    (ThroughputBalancer, {"tolerance": True}, "tolerance=True: must be in [0, 1) (a number, not a bool)"),
    (ThroughputBalancer, {"warmup_steps": 2.0}, "warmup_steps=2.0: must be an integer, not a float"),
    (ThroughputBalancer, {"cost": "tokens"}, "cost=tokens: must be a CostBalancer or null"),
    (balancer_at_world_size_4, {"min_share": 0.3}, "min_share=0.3: must be < 1/world_size = 0.25"),
    (CostBalancer, {"cost": "words"}, "cost=words: must be one of tokens, samples or a function of a sample"),
    (CostBalancer, {"cost": 5}, "cost=5: must be one of tokens, samples or a function of a sample"),
    (CostBalancer, {"cost": None}, "cost=None: must be one of tokens, samples or a function of a sample"),
]


def _python_id(case: tuple[Callable[..., object], dict[str, Any], str]) -> str:
    make, kwargs, _ = case
    return f"{getattr(make, '__name__', make)}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())})"


@pytest.mark.parametrize(("make", "kwargs", "message"), PYTHON_API, ids=[_python_id(case) for case in PYTHON_API])
def test_python_api_refuses_bad_value_with_one_line_naming_the_key(
    make: Callable[..., object], kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        make(**kwargs)
    assert str(caught.value).startswith(message)
    assert "\n" not in str(caught.value)
    assert caught.value.key == message.split("=", 1)[0]


def test_include_and_exclude_take_one_glob_as_a_string() -> None:
    assert GradualPruning(include="net.*", exclude="net.7").include == ["net.*"]
    assert GradualPruning(include="net.*", exclude="net.7").exclude == ["net.7"]
    assert [t.module for t in prune_mlp(include="net.*", exclude="net.7")] == ["net.1", "net.4"]  # type: ignore[attr-defined]
    assert QuantizationAwareTraining(include="net.1").include == ["net.1"]
    assert quantize_mlp(include="net.1", exclude="net.4") == ["net.1"]
    assert GradualPruning(include=[]).include is None  # an empty list is the default selection, as before


def build_as_the_cli_does(overrides: list[str], run_dir: Path) -> None:
    """What `cli.train` does before `trainer.fit`: validate, build the data, check the launch, build the rest."""
    cfg = compose_app_config(overrides)
    settings = validate(cfg)
    datamodule = instantiate_group(cfg, "data")
    check_before_launch(settings, datamodule)
    model = instantiate_group(cfg, "model")
    build_trainer(cfg, settings, run_dir, model)


DDP = "trainer=ddp_cpu"
GPT = ["model=tiny_gpt", "data=text"]
APP: list[tuple[list[str], str]] = [
    # pruning
    (
        ["pruning=gradual_magnitude", "pruning.target_sparsity=abc"],
        "pruning.target_sparsity=abc: must be of type float",
    ),
    (["pruning=gradual_magnitude", "pruning.target_sparsity=1.5"], "pruning.target_sparsity=1.5: must be in [0, 1)"),
    (["pruning=gradual_magnitude", "pruning.include=*query"], "pruning.include=*query: matches no prunable layer"),
    (
        ["pruning=gradual_magnitude", "pruning.exclude=[*]"],
        f"pruning.exclude=[*]: leaves no layer to prune; {MLP_LAYERS}",
    ),
    (["pruning=gradual_magnitude", "pruning.include=[1,2]"], "pruning.include=[1,2]: must be a module-name glob"),
    (
        ["pruning=gradual_magnitude", "pruning.make_permanent=maybe"],
        "pruning.make_permanent=maybe: must be of type bool",
    ),
    (["pruning=nm_2_4", "pruning.pattern=null"], "pruning.pattern=None: is required for granularity=n:m"),
    (["pruning=channels", "pruning.granularity=blocks"], "pruning.granularity=blocks: must be one of unstructured"),
    # quantization
    (["quantization=int4_weight_only", "quantization.group_size=48"], "quantization.group_size=48: must divide"),
    (["quantization=int8_dynamic", "quantization.scheme=int3"], "quantization.scheme=int3: must be one of"),
    (
        ["quantization=int8_dynamic", "quantization.exclude=[*]"],
        "quantization.exclude=[*]: leaves no layer to quantize",
    ),
    (
        ["quantization=int8_dynamic", "quantization.include=*query"],
        "quantization.include=*query: matches no quantizable layer",
    ),
    (
        ["quantization=int8_dynamic", "quantization.convert_on_fit_end=false", "quantization.export_path=m.pt2"],
        "quantization.export_path=m.pt2: needs convert_on_fit_end=true",
    ),
    # compression
    (["compression=powersgd"], "compression._target_=lightning_eff.compression.PowerSGD: compresses gradients between"),
    ([DDP, "compression=powersgd", "compression.rank=0"], "compression.rank=0: must be >= 1"),
    ([DDP, "compression=powersgd", "compression.rank=four"], "compression.rank=four: must be of type int"),
    ([DDP, "compression=powersgd", "compression.start_step=1"], "compression.start_step=1: must be >= 2 with"),
    ([DDP, "compression=topk", "compression.ratio=2"], "compression.ratio=2: must be in (0, 1]"),
    ([DDP, "compression=int8", "compression.error_feedback=maybe"], "compression.error_feedback=maybe: must be of"),
    ([DDP, "compression=auto", "compression.margin=1.5"], "compression.margin=1.5: must be in [0, 1)"),
    (
        [DDP, "compression=auto", "compression.candidate=powersgd"],
        "compression.candidate=powersgd: must be a compressor",
    ),
    (
        [DDP, "compression=fp16", "+compression.ratio=0.1"],
        "compression.ratio=0.1: unknown key; compression takes no keys",
    ),
    ([DDP, "compression=powersgd", "trainer.strategy=fsdp"], "trainer.strategy=fsdp: must be ddp (or auto)"),
    # balancing
    ([DDP, "balancing=throughput", "balancing.min_share=0.6"], "balancing.min_share=0.6: must be < 1/world_size = 0.5"),
    (
        [DDP, "trainer.devices=4", "balancing=throughput", "balancing.min_share=0.3"],
        "balancing.min_share=0.3: must be < 1/world_size = 0.25",
    ),
    ([DDP, "balancing=throughput", "balancing.smoothing=1"], "balancing.smoothing=1: must be in [0, 1)"),
    ([DDP, "balancing=throughput", "balancing.cost=tokens"], "balancing.cost=tokens: must be a CostBalancer or null"),
    ([DDP, "balancing=cost", "balancing.cost=words"], "balancing.cost=words: must be one of tokens, samples"),
    (["balancing=cost"], "balancing._target_=lightning_eff.balancing.CostBalancer: balances work between processes"),
    # batch limits and sizes that Lightning would refuse only inside fit, once per rank
    (["trainer.limit_train_batches=2.5"], "trainer.limit_train_batches=2.5: must be a fraction <= 1.0 or a whole"),
    (["trainer.val_check_interval=2.5"], "trainer.val_check_interval=2.5: must be a fraction <= 1.0 or a whole"),
    (["trainer.limit_test_batches=1.5"], "trainer.limit_test_batches=1.5: must be a fraction <= 1.0 or a whole"),
    (["data.batch_size=5000"], "data.batch_size=5000: must be <= 1258, the training samples per process"),
    ([DDP, "trainer.devices=8", "data.batch_size=200"], "data.batch_size=200: must be <= 158, the training samples"),
    (
        ["experiment=text_gpt", DDP, "trainer.devices=2"],
        "trainer.val_check_interval=100: must be <= 52, the training batches per process with 2 processes",
    ),
    (
        ["experiment=text_variable_length", "trainer.devices=4"],
        "trainer.val_check_interval=50: must be <= 26, the training batches per process with 4 processes",
    ),
    (
        ["experiment=text_gpt", "trainer.limit_train_batches=50"],
        "trainer.val_check_interval=100: must be <= 50, the training batches per process with 1 process",
    ),
    (
        ["experiment=text_gpt", DDP, "trainer.limit_train_batches=60", "trainer.val_check_interval=10"],
        "trainer.limit_train_batches=60: is more than the 52 training batches per process with 2 processes",
    ),
    (
        ["experiment=text_gpt", "trainer.limit_train_batches=0.001"],
        "trainer.limit_train_batches=0.001: leaves no training batch of the 103 per process",
    ),
    # the reference tasks' constructors
    ([*GPT, "model.n_head=3"], "model.n_head=3: must divide d_model=128"),
    ([*GPT, "model.vocab_size=1"], "model.vocab_size=1: must be >= 2"),
    ([*GPT, "data.seq_len=256"], "data.seq_len=256: must be <= model.seq_len=128"),
    ([*GPT, "data.min_seq_len=200"], "data.min_seq_len=200: must be <= seq_len=128"),
    (["data.batch_size=big"], "data.batch_size=big: must be of type int"),
    (["model.hidden_sizes=abc"], "model.hidden_sizes=abc: must be of type list[int]"),
    (["model.weight_decay=-1"], "model.weight_decay=-1.0: must be >= 0"),
    (["data=text"], "data._target_=lightning_eff.tasks.TextDataModule: model lightning_eff.tasks.DigitsMLP needs"),
]


@pytest.mark.parametrize(("overrides", "message"), APP, ids=[" ".join(o) for o, _ in APP])
def test_app_refuses_bad_value_before_launch_with_one_line_naming_the_key(
    overrides: list[str], message: str, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError) as caught:
        build_as_the_cli_does(overrides, tmp_path)
    assert str(caught.value).startswith(message)
    assert "\n" not in str(caught.value)


def test_app_accepts_one_glob_as_a_string(tmp_path: Path) -> None:
    build_as_the_cli_does(["pruning=gradual_magnitude", "pruning.include=net.*", "pruning.exclude=net.7"], tmp_path)
    build_as_the_cli_does(["quantization=int8_dynamic", "quantization.include=net.1"], tmp_path)


def test_app_accepts_the_edges_of_the_launch_checks(tmp_path: Path) -> None:
    build_as_the_cli_does(["experiment=text_gpt", DDP, "trainer.devices=2", "trainer.val_check_interval=52"], tmp_path)
    build_as_the_cli_does(["experiment=text_variable_length"], tmp_path)  # balanced: 52 batches per process >= 50
    build_as_the_cli_does([DDP, "trainer.devices=auto", "data.batch_size=5000"], tmp_path)  # world size unknown


CLI = [
    (["pruning=gradual_magnitude", "pruning.exclude=[*]"], "pruning.exclude=[*]: leaves no layer to prune"),
    (["trainer.limit_train_batches=2.5"], "trainer.limit_train_batches=2.5: must be a fraction <= 1.0"),
    (["data.batch_size=5000"], "data.batch_size=5000: must be <= 1258"),
    ([DDP, "balancing=throughput", "balancing.cost=tokens"], "balancing.cost=tokens: must be a CostBalancer"),
    ([DDP, "compression=topk", "compression.ratio=2"], "compression.ratio=2: must be in (0, 1]"),
]


@pytest.mark.slow
@pytest.mark.parametrize(("overrides", "message"), CLI, ids=[" ".join(o) for o, _ in CLI])
def test_cli_refuses_bad_value_with_one_line_and_exit_2(overrides: list[str], message: str, tmp_path: Path) -> None:
    result = run_cli([*overrides, f"run_dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"lightning-eff: error: {message}")
    assert "Traceback" not in result.stdout + result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()
