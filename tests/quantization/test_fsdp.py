"""QuantizationAwareTraining under FSDP2 (Lightning's `ModelParallelStrategy`), against DDP, on 2 gloo ranks.

One launch of `fsdp_worker` trains the small GPT, the zoo's Hugging Face GPT-2 and its ResNet (BatchNorms
folded into the quantized convs) under both strategies on the same per-rank batches: gradients average alike,
so the weights, and so the integers and scales of the conversion, must be the same bits. It also resumes the
GPT from a sharded checkpoint and exports from rank 0's unsharded copy. FSDP1 is refused at setup.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from lightning.pytorch.strategies import FSDPStrategy

from lightning_eff.quantization import QuantizationAwareTraining, convert, load_quantized
from lightning_eff.quantization.callback import FSDP1_REFUSAL
from lightning_eff.tasks.gpt import TinyGPT
from lightning_eff.validation import ConfigError
from tests.quantization import fsdp_worker
from tests.workers import run_worker
from tests.zoo.models import logits_of

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RUNS = ("gpt", "gpt2", "resnet")  # gpt: int4 per group of 32 with int8 activations; gpt2: int8 per row; resnet: convs


@pytest.fixture(scope="module")
def launched(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict[str, Any], list[dict[str, Any]]]]:
    """The worker's output directory, rank 0's converted models and each rank's summaries."""
    out = tmp_path_factory.mktemp("fsdp")
    result = run_worker(fsdp_worker, [str(out)], cwd=out, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    converted = torch.load(out / "results.pt", weights_only=False)
    ranks = [json.loads((out / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    yield out, converted, ranks


def assert_same_bits(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> None:
    assert first.keys() == second.keys()
    different = [
        key for key in first if first[key].dtype != second[key].dtype or not torch.equal(first[key], second[key])
    ]
    assert not different, different


@pytest.mark.parametrize("run", RUNS)
def test_the_fsdp2_conversion_is_the_ddp_one_bit_for_bit(launched: Any, run: str) -> None:
    _, converted, _ = launched
    fsdp2, ddp = converted[f"{run}_fsdp2"]["state"], converted[f"{run}_ddp"]["state"]
    integers = [key for key, value in fsdp2.items() if value.dtype in (torch.int8, torch.uint8)]  # uint8: int4 pairs
    assert len(integers) >= 8  # a real conversion: integer weights
    assert_same_bits(fsdp2, ddp)


@pytest.mark.parametrize("run", RUNS)
def test_fake_quantized_layers_see_the_gathered_weight_and_ranks_keep_ddps_buffers(launched: Any, run: str) -> None:
    _, _, ranks = launched
    for rank in ranks:
        fsdp2, ddp = rank[f"{run}_fsdp2"], rank[f"{run}_ddp"]
        assert fsdp2["sharded"] and not ddp["sharded"]  # stored as shards between steps under FSDP2
        assert fsdp2["seen"] == ddp["seen"]  # inside forward: the whole weight, a plain Parameter
        assert fsdp2["seen"][0] == "Parameter"
        assert fsdp2["buffers"] == ddp["buffers"]  # folded BatchNorm statistics: rank 0's, as DDP broadcasts them
        assert fsdp2["phase"] == ddp["phase"]
    if run == "resnet":  # the last batch updated each rank's statistics with its own data
        assert ranks[0]["resnet_fsdp2"]["buffers"] != ranks[1]["resnet_fsdp2"]["buffers"]


def test_resuming_from_a_sharded_checkpoint_continues_the_uninterrupted_run(launched: Any) -> None:
    out, converted, ranks = launched
    checkpoint = next((out / "ckpt").glob("epoch=0-*"))
    assert checkpoint.is_dir()  # torch.distributed.checkpoint: one shard file per rank, callback state in meta.pt
    meta = torch.load(checkpoint / "meta.pt", weights_only=False)
    state = next(value for key, value in meta["callbacks"].items() if key.startswith("QuantizationAwareTraining"))
    assert state["phase"] == "fake_quant" and state["phase_changed_at"] == 2
    assert_same_bits(converted["gpt_fsdp2_resumed"]["state"], converted["gpt_fsdp2"]["state"])
    for rank in ranks:
        assert rank["gpt_fsdp2_resumed"]["phase"] == ["fake_quant", 2]  # restored from meta.pt, not re-decided at 3


@pytest.mark.parametrize("run", ["gpt", "gpt2"])
def test_rank_zero_exports_the_unsharded_conversion(launched: Any, run: str) -> None:
    """gpt2's export was also checked after the first batch, by converting the sharded model on every rank."""
    _, converted, _ = launched
    result = converted[f"{run}_fsdp2"]
    args, kwargs = result["example"]
    exported = load_quantized(result["export"])
    torch.testing.assert_close(logits_of(exported(*args, **kwargs)), result["output"])


def test_after_fit_and_test_the_report_measures_the_unsharded_copy(launched: Any) -> None:
    """The app's order: fit, `Trainer.test` (setup again, on the sharded model), then rank 0's report."""
    _, converted, ranks = launched
    assert all(rank["gpt_fsdp2"]["same_layers"] for rank in ranks)
    report = converted["gpt_fsdp2"]["report"]
    assert report["model_bytes_fp32"] > 0 and report["weight_size_ratio"] < 0.2  # int4 weights, one scale per 32
    assert report["inference_ms_fp32"] > 0 and report["inference_ms_quantized"] > 0
    rows = {row["metric"]: row for row in converted["gpt_fsdp2"]["rows"]}
    loss = rows["test_loss"]
    assert loss["converted"] == pytest.approx(loss["fake_quantized"], rel=1e-3)  # the integers compute what QAT trained


def test_fsdp1_is_refused_at_setup_with_one_line() -> None:
    callback = QuantizationAwareTraining()
    trainer = SimpleNamespace(strategy=FSDPStrategy(), world_size=1)
    with pytest.raises(ConfigError) as raised:
        callback.setup(trainer, TinyGPT(n_layer=1, d_model=32), "fit")  # type: ignore[arg-type]
    assert str(raised.value) == f"strategy=FSDPStrategy: {FSDP1_REFUSAL}"
    assert "\n" not in str(raised.value)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Lightning's FSDPStrategy (FSDP1) needs a GPU")
def test_fsdp1_trainer_on_a_gpu_is_refused_before_training(tmp_path: Path) -> None:
    import lightning as L

    from lightning_eff.tasks.text import TextDataModule

    trainer = L.Trainer(accelerator="cuda", devices=1, strategy="fsdp", max_steps=2, logger=False,
                        enable_checkpointing=False, default_root_dir=tmp_path,
                        callbacks=[QuantizationAwareTraining()])  # fmt: skip
    with pytest.raises(ConfigError, match="does not support FSDP1"):
        trainer.fit(TinyGPT(n_layer=1, d_model=32), datamodule=TextDataModule(seq_len=16, batch_size=2, max_bytes=4096))
    assert trainer.global_step == 0


@pytest.fixture
def one_rank_group(tmp_path: Path) -> Iterator[Any]:
    """A 1-rank gloo process group and its device mesh, for `fully_shard` in this process."""
    from torch.distributed.device_mesh import init_device_mesh

    store = torch.distributed.FileStore(str(tmp_path / "store"), 1)
    torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield init_device_mesh("cpu", (1,))
    torch.distributed.destroy_process_group()


def test_a_model_sharded_before_setup_is_refused(one_rank_group: Any) -> None:
    from torch.distributed.fsdp import fully_shard

    model = TinyGPT(n_layer=1, d_model=32)
    fully_shard(model, mesh=one_rank_group)
    trainer = SimpleNamespace(strategy=None, world_size=1)
    with pytest.raises(RuntimeError, match="call fully_shard in the LightningModule's configure_model"):
        QuantizationAwareTraining(start_step=1).setup(trainer, model, "fit")  # type: ignore[arg-type]
    assert not any(type(module).__name__.startswith("FakeQuantized") for module in model.modules())


def test_convert_gathers_a_sharded_model_into_the_same_bits(one_rank_group: Any) -> None:
    """Also after a forward without backward, which leaves FSDP2's root parameters unsharded (plain tensors)."""
    from torch.distributed.fsdp import fully_shard

    model = TinyGPT(n_layer=1, d_model=32)
    QuantizationAwareTraining().setup(SimpleNamespace(strategy=None, world_size=1), model, "fit")  # type: ignore[arg-type]
    before = convert(model).state_dict()
    fully_shard(model, mesh=one_rank_group)  # one unit: after a forward no parameter is a DTensor
    assert_same_bits(convert(model).state_dict(), before)
    with torch.no_grad():
        model(model.example_input_array)
    assert_same_bits(convert(model).state_dict(), before)
