"""Export that serves: dynamic batch and sequence, keyword inputs, a fail-fast check, and save_pretrained refused.

The tiny zoo models (tests/zoo) are fake-quantized with `swap_in_fake_quantized`, converted, exported once at
batch 4 x sequence 16, reloaded, and called at other batch sizes and sequence lengths.
"""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from torch import Tensor, nn
from torch.export import Dim
from torch.utils.data import DataLoader

from lightning_eff.quantization import QuantizationAwareTraining, convert, load_quantized, save_quantized
from lightning_eff.quantization.export import NotExportableError, check_exportable, dynamic_shapes
from lightning_eff.quantization.prepare import plan_layers, swap_in_fake_quantized
from lightning_eff.quantization.pretrained import REFUSAL, guard_save_pretrained
from lightning_eff.quantization.schemes import SCHEMES
from tests.zoo.models import VOCAB, ZooBatches, ZooTask, build, logits_of

QUIET: dict[str, Any] = {"accelerator": "cpu", "logger": False, "enable_progress_bar": False,
                         "enable_model_summary": False, "enable_checkpointing": False}  # fmt: skip
GROUP = 32
HF = ("gpt2", "bert", "llama")


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def converted(name: str, scheme: str) -> nn.Module:
    """A zoo model with the layers the plan selects (embeddings, convs and attentions among them) converted."""
    model = build(name)
    plan = plan_layers(model, SCHEMES[scheme], GROUP)
    swap_in_fake_quantized(model, plan.layers, SCHEMES[scheme], GROUP, plan.folded)
    return convert(model)


def tokens(name: str, batch: int, seq: int, seed: int = 0) -> dict[str, Tensor]:
    ids = torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))
    inputs = {"input_ids": ids}
    if name in HF:
        mask = torch.ones_like(ids)
        mask[0, : seq // 3] = 0  # a left-padded row: the mask really is used
        inputs["attention_mask"] = mask
    return inputs


@pytest.mark.parametrize(
    ("name", "scheme"),
    [("gpt2", "int8_dynamic_act_int4_weight"), ("bert", "int8_dynamic"), ("llama", "int4_weight_only"),
     ("transformer_encoder", "int8_weight_only")],
)  # fmt: skip
def test_the_exported_model_takes_other_batch_sizes_and_sequence_lengths(
    tmp_path: Path, name: str, scheme: str
) -> None:
    model = converted(name, scheme)
    path = save_quantized(model, tmp_path / f"{name}.pt2", (), tokens(name, 4, 16))  # keyword inputs, as HF is called
    loaded = load_quantized(path)
    for batch, seq in ((2, 7), (5, 12), (1, 16)):
        inputs = tokens(name, batch, seq, seed=batch)
        with torch.no_grad():
            expected = logits_of(model(**inputs)).float()
            got = logits_of(loaded(**inputs)).float()
        assert got.shape == expected.shape and got.shape[:2] == (batch, seq)
        assert (got.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.99
        assert (got - expected).norm() <= 0.02 * expected.norm()


@pytest.mark.parametrize(("name", "scheme"), [("resnet", "int8_dynamic"), ("vit", "int4_weight_only"),
                                            ("depthwise_cnn", "int8_dynamic_act_int4_weight")])  # fmt: skip
def test_an_exported_image_model_takes_other_batch_sizes(tmp_path: Path, name: str, scheme: str) -> None:
    model = converted(name, scheme)
    images = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    loaded = load_quantized(save_quantized(model, tmp_path / f"{name}.pt2", (images,)))
    for batch in (1, 7):
        other = torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            expected, got = model(other), loaded(other)
        assert got.shape == expected.shape == (batch, expected.shape[1])
        assert (got - expected).norm() <= 0.02 * expected.norm()


def test_a_hugging_face_export_loads_in_a_fresh_process_without_its_output_classes(tmp_path: Path) -> None:
    path = save_quantized(converted("bert", "int8_dynamic"), tmp_path / "bert.pt2", (), tokens("bert", 4, 16))
    script = (
        "import sys, torch\n"
        "from lightning_eff.quantization import load_quantized\n"
        "assert 'transformers.modeling_outputs' not in sys.modules\n"
        "ids = torch.zeros(3, 6, dtype=torch.long)\n"  # the keywords traced, at another batch and length
        f"out = load_quantized({str(path)!r})(input_ids=ids, attention_mask=torch.ones_like(ids))\n"
        "print(type(out).__name__, tuple(out.last_hidden_state.shape))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "BaseModelOutputWithPoolingAndCrossAttentions (3, 6, 32)"


def test_token_inputs_get_a_dynamic_sequence_and_images_only_a_dynamic_batch() -> None:
    class Images(nn.Module):
        def forward(self, x: Tensor, scale: float = 1.0) -> Tensor:
            return x * scale

    class Tokens(nn.Module):
        def forward(self, input_ids: Tensor, **extra: Tensor) -> Tensor:
            return input_ids

    auto = Dim.AUTO
    assert dynamic_shapes(Images(), (torch.zeros(2, 3, 8, 8),), {"scale": 2.0}) == {"x": {0: auto}, "scale": None}
    ids, embeds = torch.zeros(2, 5, dtype=torch.long), torch.zeros(2, 5, 4)
    assert dynamic_shapes(Tokens(), (ids,), {"inputs_embeds": embeds, "lengths": torch.tensor([5, 5])}) == {
        "input_ids": {0: auto, 1: auto},
        "extra": {"inputs_embeds": {0: auto, 1: auto}, "lengths": {0: auto}},
    }


def test_an_example_batch_of_one_still_exports_a_dynamic_batch(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    swap_in_fake_quantized(model, ["0"], SCHEMES["int8_dynamic"], GROUP)
    quantized = convert(model)
    loaded = load_quantized(save_quantized(quantized, tmp_path / "mlp.pt2", (torch.randn(1, 32),)))
    x = torch.randn(3, 32)
    with torch.no_grad():
        assert torch.allclose(loaded(x), quantized(x), atol=1e-5)


class CallsForward(ZooTask):
    """A zoo model whose training_step calls ``self(**inputs)``, as HF users do: forward gets keyword arguments."""

    def training_step(self, batch: tuple[dict[str, Tensor], Tensor], batch_idx: int) -> Tensor:
        inputs, targets = batch
        logits = logits_of(self(**inputs))
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        return loss


def test_a_hugging_face_model_called_with_keyword_arguments_exports_and_reloads(tmp_path: Path) -> None:
    L.seed_everything(0, verbose=False)
    task = CallsForward("gpt2")
    path = tmp_path / "gpt2.pt2"
    callback = QuantizationAwareTraining("int8_dynamic_act_int4_weight", group_size=GROUP, export_path=str(path))
    trainer = L.Trainer(callbacks=[callback], max_steps=2, **QUIET)
    trainer.fit(task, DataLoader(ZooBatches("gpt2", count=2), batch_size=None))
    assert callback._export_checked and path.is_file()
    loaded = load_quantized(path)
    assert callback.quantized_model is not None
    inputs = {"input_ids": tokens("gpt2", 3, 9)["input_ids"]}  # another batch size and sequence length
    with torch.no_grad():
        expected = logits_of(callback.quantized_model(**inputs))
        got = logits_of(loaded(**inputs))
    assert got.shape == (3, 9, VOCAB)
    assert (got - expected).norm() <= 0.02 * expected.norm()


class BranchesOnValues(L.LightningModule):
    """A forward that branches in Python on a tensor's value: trains fine, cannot be exported."""

    def __init__(self, example: bool) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
        if example:
            self.example_input_array = torch.zeros(2, 32)

    def forward(self, x: Tensor) -> Tensor:
        out = self.net(x)
        return out * 2 if out.sum().item() > 0 else out

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        return self(batch).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("example", [False, True], ids=["first_batch", "setup"])
def test_an_unexportable_forward_fails_before_training_naming_export_path(tmp_path: Path, example: bool) -> None:
    L.seed_everything(0, verbose=False)
    path = tmp_path / "never.pt2"
    callback = QuantizationAwareTraining("int8_dynamic", export_path=str(path))
    trainer = L.Trainer(callbacks=[callback], max_steps=50, **QUIET)
    with pytest.raises(NotExportableError, match="export_path") as raised:
        trainer.fit(BranchesOnValues(example), DataLoader(torch.randn(50 * 4, 32), batch_size=4))
    assert trainer.global_step == (0 if example else 1)  # at setup, or after the first optimizer step
    assert ("at setup" if example else "after the first training batch") in str(raised.value)
    assert "torch.export (GuardOnDataDependentSymNode: Could not guard on data-dependent" in str(raised.value)
    assert not path.exists() and callback.quantized_model is None


def test_check_exportable_passes_a_converted_copy_and_leaves_the_model_alone() -> None:
    model = build("transformer_encoder")
    swap_in_fake_quantized(model, ["encoder.layers.0.linear1"], SCHEMES["int8_dynamic"], GROUP)
    before = copy.deepcopy(model.state_dict())
    rng = torch.random.get_rng_state()
    check_exportable(model, (), tokens("transformer_encoder", 2, 8))
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert all(torch.equal(value, model.state_dict()[key]) for key, value in before.items())


def test_save_pretrained_of_a_converted_hugging_face_model_is_refused_with_what_to_do(tmp_path: Path) -> None:
    float_model = build("gpt2")
    model = guard_save_pretrained(converted("gpt2", "int8_dynamic"))
    for guarded in (model, model.transformer, copy.deepcopy(model)):  # the outer and inner HF models; copies too
        with pytest.raises(RuntimeError, match="save_pretrained is refused") as raised:
            guarded.save_pretrained(tmp_path / "hf")
        assert str(raised.value) == REFUSAL
    assert "save_quantized" in REFUSAL and "load_quantized" in REFUSAL and "restore_float_modules" in REFUSAL
    assert not (tmp_path / "hf").exists()
    float_model.save_pretrained(tmp_path / "float")  # an unconverted model keeps its method
    assert (tmp_path / "float" / "config.json").is_file()
