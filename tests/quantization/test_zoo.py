"""QuantizationAwareTraining on the models people train (tests/zoo): layer kinds, the output head, fast paths.

Every zoo model is trained for a few steps with each scheme and converted: the quantized layers shrink as the
scheme promises, the converted model agrees with the fake-quantized one and runs in eval, under `no_grad` and
under `inference_mode`, and the report says what was skipped (an embedding tied to the float head). Convolutions take
int8 weights in every scheme, their BatchNorm folded in; `nn.MultiheadAttention` is quantized as one layer.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_eff import GradualPruning
from lightning_eff.pruning.sparse_format import load_sparse_into
from lightning_eff.quantization import QuantizationAwareTraining, QuantizedLinear
from lightning_eff.quantization.attention import QuantizedMultiheadAttention
from lightning_eff.quantization.convert import QUANTIZED, QuantizedConv, QuantizedEmbedding, convert, weight_bytes
from lightning_eff.quantization.embedding import FakeQuantizedEmbedding
from lightning_eff.quantization.fake_quant import fake_quantize_weight
from lightning_eff.quantization.prepare import (
    FAKE_QUANTIZED,
    FakeQuantizedConv1D,
    FakeQuantizedLinear,
    find_output_head,
    plan_layers,
    restore_float_modules,
    set_fake_quantize,
    swap_in_fake_quantized,
)
from lightning_eff.quantization.schemes import SCHEMES
from lightning_eff.validation import ConfigError
from tests.zoo.models import ZOO, ZOO_BY_NAME, ZooBatches, ZooTask, build, logits_of

QUIET: dict[str, Any] = {"accelerator": "cpu", "logger": False, "enable_progress_bar": False,
                         "enable_model_summary": False, "enable_checkpointing": False}  # fmt: skip
GROUP = 32  # divides every zoo layer's input width; 16 would put int4's scales over 1/6 of fp32 at width 32
SIZE_BOUND = {4: 1 / 6, 8: 1 / 3.5}

TIED_TABLE = "its weight is the output head"
# per zoo model: the output head, how many layers are quantized (embeddings among them), what the report must skip
EXPECTED: dict[str, tuple[str | None, int, tuple[str, ...]]] = {
    "gpt2": ("lm_head", 9, (f"transformer.wte: {TIED_TABLE}",)),  # 8 Conv1D and wpe; wte is the float head's
    "bert": (None, 15, ()),  # 12 Linear, word/position/token-type embeddings
    "bert_mlm": ("cls.predictions.decoder", 15, (f"word_embeddings: {TIED_TABLE}",)),
    "llama_tied": ("lm_head", 14, (f"embed_tokens: {TIED_TABLE}",)),
    "llama": ("lm_head", 15, ()),
    "resnet": ("fc", 10, ("fc: output head",)),  # 10 convs, each with its BatchNorm folded in
    "vit": ("head", 9, ()),  # the patch conv and 8 Linears
    "transformer_encoder": ("head", 7, ()),  # embedding, 2 attentions (packed in_proj and out_proj), 4 Linears
    "depthwise_cnn": ("classifier", 3, ()),
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def example(name: str, seed: int = 0, batch: int = 4) -> dict[str, Tensor]:
    return ZOO_BY_NAME[name].batch(seed, batch)[0]  # type: ignore[call-arg]  # the builders take a batch size


def fit(name: str, scheme: str, steps: int = 4) -> tuple[ZooTask, QuantizationAwareTraining, list[str]]:
    L.seed_everything(0, verbose=False)
    task = ZooTask(name)
    task.example_input_array = example(name)  # the head is found with one forward of it
    callback = QuantizationAwareTraining(scheme, group_size=GROUP)
    trainer = L.Trainer(callbacks=[callback], max_steps=steps, **QUIET)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(task, DataLoader(ZooBatches(name, count=steps), batch_size=None))
    return task, callback, [str(w.message) for w in caught if "QuantizationAwareTraining" in str(w.message)]


def outputs(model: nn.Module, inputs: dict[str, Tensor]) -> Tensor:
    return logits_of(model(**inputs)).float()


@pytest.mark.parametrize("entry", ZOO, ids=lambda entry: entry.name)
def test_the_head_is_the_layer_that_produces_the_output_with_or_without_an_example(entry: Any) -> None:
    model = build(entry.name)
    rng = torch.random.get_rng_state()
    assert find_output_head(model, ((), example(entry.name))) == EXPECTED[entry.name][0]
    assert torch.equal(torch.random.get_rng_state(), rng)  # the probing forward leaves the RNG alone
    assert find_output_head(model) == EXPECTED[entry.name][0]  # from the structure alone


@pytest.mark.parametrize("scheme", list(SCHEMES))
@pytest.mark.parametrize("entry", ZOO, ids=lambda entry: entry.name)
def test_every_zoo_model_trains_fake_quantized_and_converts(entry: Any, scheme: str) -> None:
    name = entry.name
    head, count, skipped_kinds = EXPECTED[name]
    task, callback, warned = fit(name, scheme)
    fake_layers = [m for m in task.model.modules() if isinstance(m, FAKE_QUANTIZED)]
    assert len(callback.layers) == len(fake_layers) == count
    assert callback.head == (None if head is None else f"model.{head}")  # ZooTask holds the zoo model as .model
    head = callback.head
    if name == "gpt2":
        assert sum(isinstance(m, FakeQuantizedConv1D) for m in fake_layers) == 8
    if count == 1:  # the head alone: said loudly at setup
        assert callback.layers == [head] and any("only layer" in w for w in warned)
    elif head is not None:
        assert head not in callback.layers and "output head" in callback.skipped_layers[head]
    reasons = " ".join(f"{layer}: {why}" for layer, why in callback.skipped_layers.items())
    assert all(kind in reasons for kind in skipped_kinds), reasons

    converted = callback.quantized_model
    assert isinstance(converted, ZooTask)
    inner = {id(c) for m in converted.modules() if isinstance(m, QuantizedMultiheadAttention) for c in m.children()}
    layers = [m for m in converted.modules() if isinstance(m, QUANTIZED) and id(m) not in inner]
    assert len(layers) == count
    stored, _ = weight_bytes(converted)
    holders = [m for m in converted.modules() if isinstance(m, (QuantizedLinear, QuantizedEmbedding, QuantizedConv))]
    unique = {id(m.qweight): m for m in holders}.values()  # a tied pair is stored once
    convs = [m for m in unique if isinstance(m, QuantizedConv)]
    others = [m for m in unique if not isinstance(m, QuantizedConv)]
    bound = SIZE_BOUND[SCHEMES[scheme].weight_bits]
    assert stored <= sum(bound * 4 * m.in_features * m.out_features for m in others) + sum(
        m.qweight.numel() + 4 * m.out_features
        for m in convs  # int8 in every scheme, one fp32 scale per channel
    )
    if convs and name != "depthwise_cnn":  # a 3x3 depthwise kernel has 9 weights per scale: 13/36 of fp32
        assert sum(m.qweight.numel() + 4 * m.out_features for m in convs) <= sum(
            SIZE_BOUND[8] * 4 * m.qweight.numel() for m in convs
        )
    folded = [m for m in task.model.modules() if getattr(m, "folded_norm", None) is not None]
    assert len(folded) == (10 if name == "resnet" else 3 if name == "depthwise_cnn" else 0)
    assert sum(isinstance(m, nn.Identity) for m in converted.modules()) == len(folded)  # BatchNorms folded in
    for first, second in entry.tied:  # a tied head excluded by default stays float and tied
        if head == f"model.{first.rpartition('.')[0]}":
            assert converted.model.get_parameter(first) is converted.model.get_parameter(second)

    inputs = example(name, seed=5, batch=32 if entry.kind != "classifier" else 256)  # >= 256 positions
    fake = task.model.eval()
    with torch.no_grad():
        expected = outputs(fake, inputs)
        got = outputs(converted.model, inputs)
    same = got.argmax(-1) == expected.argmax(-1)
    # >= 99% of positions agree; where a tiny random model's top two logits are closer than the conversion's own
    # error on that row (weight-only schemes multiply in bf16), a flip is a tie broken otherwise, not a failure
    top2 = expected.topk(2, dim=-1).values
    near_tie = (top2[..., 0] - top2[..., 1]) <= 2 * (got - expected).abs().amax(dim=-1)
    assert same.float().mean() >= 0.99 or bool((same | near_tie).all()), same.float().mean()
    assert (same | near_tie).float().mean() >= 0.99
    assert (got - expected).norm() <= 0.02 * expected.norm()
    with torch.inference_mode():
        assert torch.allclose(outputs(converted.model, inputs), got, atol=1e-5)
    assert torch.allclose(outputs(converted.model, inputs), got, atol=1e-5)  # eval, grad mode on

    section = callback.report_section(task.trainer, Path("unused"))
    assert section is not None and section.summary["skipped_layers"] == callback.skipped_layers


def test_transformer_encoder_validation_in_eval_measures_the_fake_quantized_model() -> None:
    model = build("transformer_encoder")
    plan = plan_layers(model, SCHEMES["int4_weight_only"], GROUP)
    swap_in_fake_quantized(model, plan.layers, SCHEMES["int4_weight_only"], GROUP)
    inputs = example("transformer_encoder")
    float_model = copy.deepcopy(model)
    set_fake_quantize(float_model, False)
    with torch.no_grad():  # eval + no_grad: where nn.TransformerEncoderLayer would take its fused fast path
        fake, plain = outputs(model.eval(), inputs), outputs(float_model.eval(), inputs)
    assert not torch.allclose(fake, plain, atol=1e-4)
    assert torch.allclose(fake, outputs(model, inputs).detach(), atol=1e-6)  # the same as with grad on
    converted = convert(model)
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            assert torch.allclose(outputs(converted, inputs), fake, rtol=0.02, atol=0.02)


def test_hf_conv1d_fake_quantizes_and_converts_as_a_linear_with_the_transposed_weight() -> None:
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv, x = Conv1D(48, 64), torch.randn(3, 5, 64)  # nf=48 outputs, nx=64 inputs: weight [64, 48]
    for scheme in SCHEMES.values():
        holder = nn.Sequential(conv)
        swap_in_fake_quantized(holder, ["0"], scheme, GROUP)
        fake = holder[0]
        assert isinstance(fake, FakeQuantizedConv1D) and fake.weight is conv.weight and fake.bias is conv.bias
        linear = nn.Linear(64, 48)
        linear.weight, linear.bias = nn.Parameter(conv.weight.detach().t().clone()), conv.bias
        twin = FakeQuantizedLinear.from_linear(linear, scheme, GROUP)
        assert torch.equal(fake(x), twin(x))  # per output channel / per group along the input dim, bit for bit
        assert torch.equal(convert(holder).get_submodule("0")(x), convert(nn.Sequential(twin)).get_submodule("0")(x))
        fake.fake_quantize = False
        assert torch.allclose(fake(x), conv(x), atol=1e-6)  # float until start_step: the Conv1D itself


def test_an_included_gpt2_head_and_its_embedding_are_quantized_once_and_stay_tied() -> None:
    model = build("gpt2")
    scheme = SCHEMES["int4_weight_only"]
    plan = plan_layers(model, scheme, GROUP, include=["*"])
    assert {"lm_head", "transformer.wte"} <= set(plan.layers) and plan.tied_to_float == {}
    swap_in_fake_quantized(model, plan.layers, scheme, GROUP)
    tokens = example("gpt2")["input_ids"]
    with torch.no_grad():
        fake = outputs(model.eval(), {"input_ids": tokens})
    converted = convert(model)
    head, table = converted.get_submodule("lm_head"), converted.get_submodule("transformer.wte")
    assert isinstance(head, QuantizedLinear) and isinstance(table, QuantizedEmbedding)
    assert head.qweight is table.qweight and head.scales is table.scales  # one set of integers, stored once
    with torch.no_grad():
        got = outputs(converted, {"input_ids": tokens})
    assert (got - fake).norm() <= 0.02 * fake.norm()
    stored, fp32 = weight_bytes(converted)
    assert stored <= fp32 / 6
    only_head = plan_layers(build("gpt2"), scheme, GROUP, include=["lm_head"])
    assert only_head.tied_to_float == {"lm_head": "transformer.wte"}  # the plan names the tie it breaks
    with pytest.raises(ConfigError, match=r"include=transformer.wte: cannot be quantized: its weight is the output"):
        plan_layers(build("gpt2"), scheme, GROUP, include=["transformer.wte"])


def test_an_embedding_fake_quantizes_its_rows_as_the_table_would_be_and_converts_exactly() -> None:
    torch.manual_seed(0)
    table = nn.Embedding(50, 64, padding_idx=0)
    ids = torch.randint(0, 50, (3, 7))
    for scheme in SCHEMES.values():
        holder = nn.Sequential(table)
        swap_in_fake_quantized(holder, ["0"], scheme, GROUP)
        fake = holder[0]
        assert isinstance(fake, FakeQuantizedEmbedding) and fake.weight is table.weight
        rounded = fake_quantize_weight(table.weight, scheme.weight_bits, scheme.weight_group_size(GROUP))
        assert torch.equal(fake(ids), rounded[ids])  # only the looked-up rows are rounded, to the same values
        fake(ids).sum().backward()  # straight-through: the gradient reaches the table
        assert table.weight.grad is not None and table.weight.grad.abs().sum() > 0
        table.weight.grad = None
        assert torch.equal(convert(holder)[0](ids), fake(ids).detach())
        restored = restore_float_modules(holder)[0]
        assert type(restored) is nn.Embedding and restored.weight is table.weight and restored.padding_idx == 0


def test_two_layers_sharing_one_weight_are_quantized_once_and_stay_tied() -> None:
    shared = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32))
    shared[2].weight = shared[0].weight
    scheme = SCHEMES["int4_weight_only"]
    swap_in_fake_quantized(shared, ["0", "2"], scheme, GROUP)
    converted = convert(shared)
    first, second = converted.get_submodule("0"), converted.get_submodule("2")
    assert isinstance(first, QuantizedLinear) and isinstance(second, QuantizedLinear)
    assert first.qweight is second.qweight and first.scales is second.scales
    stored, fp32 = weight_bytes(converted)
    assert (stored, fp32) == (32 * 16 + 4 * 32, 4 * 32 * 32)  # counted once, as saved


def test_a_converted_transformer_encoder_exports_and_loads(tmp_path: Path) -> None:
    from lightning_eff.quantization import load_quantized, save_quantized

    model = build("transformer_encoder")
    scheme = SCHEMES["int8_dynamic"]
    swap_in_fake_quantized(model, plan_layers(model, scheme, GROUP).layers, scheme, GROUP)
    converted = convert(model)
    tokens = example("transformer_encoder")["input_ids"]
    loaded = load_quantized(save_quantized(converted, tmp_path / "encoder.pt2", (tokens,)))
    with torch.no_grad():
        assert torch.allclose(loaded(tokens), converted(tokens), atol=1e-5)


class EncoderWithValidation(ZooTask):
    def __init__(self) -> None:
        super().__init__("transformer_encoder")
        self.seen: list[Tensor] = []

    def validation_step(self, batch: tuple[dict[str, Tensor], Tensor], batch_idx: int) -> None:
        self.seen.append(outputs(self.model, batch[0]))


def test_trainer_validation_of_a_transformer_encoder_measures_the_fake_quantized_model() -> None:
    L.seed_everything(0, verbose=False)
    task = EncoderWithValidation()
    loader = DataLoader(ZooBatches("transformer_encoder", count=2), batch_size=None)
    trainer = L.Trainer(callbacks=[QuantizationAwareTraining("int8_dynamic")], max_steps=2, limit_val_batches=1,
                        **QUIET)  # fmt: skip
    trainer.fit(task, loader, loader)
    assert len(task.seen) >= 1  # validation ran in eval under no_grad: where the fused path would be taken
    inputs = ZooBatches("transformer_encoder")[0][0]
    float_model = copy.deepcopy(task.model).eval()
    set_fake_quantize(float_model, False)
    with torch.no_grad():
        plain = outputs(float_model, inputs)
    fake = outputs(task.model.train(), inputs).detach()  # grad on, training: never the fused path
    assert not torch.allclose(task.seen[-1], plain, atol=1e-4)
    assert torch.allclose(task.seen[-1], fake, atol=1e-6)


@pytest.mark.parametrize("name", ["gpt2", "llama_tied"])
def test_converted_hf_language_models_generate_like_the_fake_quantized_ones(name: str) -> None:
    task, callback, _ = fit(name, "int8_dynamic_act_int4_weight")
    converted = callback.quantized_model
    assert isinstance(converted, ZooTask)
    prompt = example(name)["input_ids"][:2, :5]
    with torch.no_grad():
        fake = task.model.eval().generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
        got = converted.model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert got.shape == fake.shape == (2, 11)
    assert (got == fake).float().mean() >= 0.9  # greedy decoding: a near tie may flip a late token


def test_pruned_weights_stay_exactly_zero_through_qat_and_conversion(tmp_path: Path) -> None:
    L.seed_everything(0, verbose=False)
    task = ZooTask("gpt2")
    task.example_input_array = example("gpt2")
    pruning = GradualPruning(target_sparsity=0.5, update_every=2, end_step=4)
    qat = QuantizationAwareTraining("int4_weight_only", group_size=GROUP)
    trainer = L.Trainer(callbacks=[pruning, qat], max_steps=6, **QUIET)
    trainer.fit(task, DataLoader(ZooBatches("gpt2", count=6), batch_size=None))
    converted = qat.quantized_model
    assert isinstance(converted, ZooTask) and pruning.masks
    for name, mask in pruning.masks.items():  # True = pruned; HF Conv1D weights are [in, out]
        layer = converted.get_submodule(name.removesuffix(".weight"))
        assert isinstance(layer, QuantizedLinear)
        integers = layer.integer_weight().t()  # stored [out, in]: back to the Conv1D layout of the mask
        assert mask.any() and bool((integers[mask] == 0).all()), name


def test_a_pruned_model_exports_a_packed_copy_that_rebuilds_the_converted_weights(tmp_path: Path) -> None:
    L.seed_everything(0, verbose=False)
    task = ZooTask("llama")
    task.example_input_array = example("llama")
    pruning = GradualPruning(target_sparsity=0.9, scope="layer", update_every=1, end_step=2)
    qat = QuantizationAwareTraining("int4_weight_only", group_size=GROUP, export_path=str(tmp_path / "llama.pt2"))
    trainer = L.Trainer(callbacks=[pruning, qat], max_steps=3, **QUIET)
    trainer.fit(task, DataLoader(ZooBatches("llama", count=3), batch_size=None))
    packed = tmp_path / "llama.sparse.pt"
    assert (tmp_path / "llama.pt2").is_file() and packed.is_file()
    converted = qat.quantized_model
    assert converted is not None
    section = qat.report_section(trainer, tmp_path)
    assert (
        section is not None and section.summary["model_bytes_packed"] < 0.8 * section.summary["model_bytes_quantized"]
    )
    blank = convert(task)  # the same structure, rebuilt from the training model
    with torch.no_grad():
        for tensor in blank.state_dict().values():
            tensor.zero_()
    load_sparse_into(blank, packed)
    inputs = example("llama", seed=2)
    with torch.no_grad():
        assert torch.equal(outputs(blank.model, inputs), outputs(converted.model, inputs))


def test_a_dense_model_exports_no_packed_copy(tmp_path: Path) -> None:
    L.seed_everything(0, verbose=False)
    task = ZooTask("llama")
    task.example_input_array = example("llama")
    qat = QuantizationAwareTraining("int8_dynamic", export_path=str(tmp_path / "llama.pt2"))
    L.Trainer(callbacks=[qat], max_steps=2, **QUIET).fit(
        task, DataLoader(ZooBatches("llama", count=2), batch_size=None)
    )
    assert (tmp_path / "llama.pt2").is_file() and not (tmp_path / "llama.sparse.pt").exists()
