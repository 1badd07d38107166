"""QAT for `nn.MultiheadAttention`'s packed weights: fake-quantized module, converted module, and the way back."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_eff.quantization.attention import (
    FakeQuantizedMultiheadAttention,
    QuantizedMultiheadAttention,
    restore_float_mha,
)
from lightning_eff.quantization.fake_quant import fake_quantize_activation, fake_quantize_weight
from lightning_eff.quantization.prepare import keep_off_fused_paths
from lightning_eff.quantization.schemes import SCHEMES, QuantScheme

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


EMBED, HEADS, GROUP = 64, 4, 32
Fake, Quantized = FakeQuantizedMultiheadAttention, QuantizedMultiheadAttention


def make_mha(batch_first: bool = True, **kwargs: Any) -> nn.MultiheadAttention:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(EMBED, HEADS, batch_first=batch_first, **kwargs)
    with torch.no_grad():  # non-zero biases, so a dropped bias would show
        for bias in (mha.in_proj_bias, mha.out_proj.bias):
            if bias is not None:
                bias.normal_(0, 0.1)
    return mha


def inputs(batch_first: bool, masked: bool) -> tuple[Tensor, Tensor | None]:
    torch.manual_seed(1)
    x = torch.randn(3, 7, EMBED) if batch_first else torch.randn(7, 3, EMBED)
    mask = None
    if masked:
        mask = torch.zeros(3, 7, dtype=torch.bool)
        mask[0, 5:] = True
        mask[2, 3:] = True
    return x, mask


def by_hand(mha: nn.MultiheadAttention, scheme: QuantScheme, x: Tensor, mask: Tensor | None) -> Tensor:
    """The reference: `F.multi_head_attention_forward` on fake-quantized weights (and q/k/v for dynamic schemes)."""
    assert mha.in_proj_weight is not None
    group = scheme.weight_group_size(GROUP)
    in_w = fake_quantize_weight(mha.in_proj_weight, scheme.weight_bits, group)
    out_w = fake_quantize_weight(mha.out_proj.weight, scheme.weight_bits, group)
    if scheme.activation_bits is not None:
        x = fake_quantize_activation(x, scheme.activation_bits)
    if mha.batch_first:
        x = x.transpose(0, 1)
    out, _ = F.multi_head_attention_forward(x, x, x, EMBED, HEADS, in_w, mha.in_proj_bias, None, None, False, 0.0,
                                            out_w, mha.out_proj.bias, training=mha.training, key_padding_mask=mask,
                                            need_weights=False)  # fmt: skip
    return out.transpose(0, 1) if mha.batch_first else out


@pytest.mark.parametrize("masked", [False, True], ids=["no_mask", "padding_mask"])
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_fake_module_is_float_when_off_matches_the_reference_when_on_and_converts(
    scheme: str, batch_first: bool, masked: bool
) -> None:
    mha = make_mha(batch_first)
    fake = FakeQuantizedMultiheadAttention.from_mha(mha, SCHEMES[scheme], GROUP)
    x, mask = inputs(batch_first, masked)

    fake.fake_quantize = False
    float_out, float_weights = mha(x, x, x, key_padding_mask=mask)
    off_out, off_weights = fake(x, x, x, key_padding_mask=mask)
    assert off_weights is not None and float_weights is not None
    assert torch.equal(off_out, float_out) and torch.equal(off_weights, float_weights)

    fake.fake_quantize = True
    on_out, _ = fake(x, x, x, key_padding_mask=mask, need_weights=False)
    torch.testing.assert_close(on_out, by_hand(mha, SCHEMES[scheme], x, mask), rtol=0, atol=1e-6)
    assert not torch.allclose(on_out, float_out, atol=1e-4)  # the rounding is really applied

    converted = QuantizedMultiheadAttention.from_fake_quantized(fake)
    fake.eval()
    with torch.no_grad():
        expected, expected_weights = fake(x, x, x, key_padding_mask=mask)
        got, got_weights = converted(x, x, x, key_padding_mask=mask)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(got_weights, expected_weights, rtol=0, atol=1e-5)


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_gradients_reach_the_original_parameters_straight_through(scheme: str) -> None:
    mha = make_mha()
    fake = FakeQuantizedMultiheadAttention.from_mha(mha, SCHEMES[scheme], GROUP)
    x, mask = inputs(True, True)
    fake(x, x, x, key_padding_mask=mask)[0].square().sum().backward()
    got = {name: p.grad.clone() for name, p in mha.named_parameters()}  # type: ignore[union-attr]
    mha.zero_grad()
    by_hand(mha, SCHEMES[scheme], x, mask).square().sum().backward()
    for name, parameter in mha.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
        torch.testing.assert_close(got[name], parameter.grad, rtol=1e-5, atol=1e-6)


def test_the_fake_module_holds_the_same_parameters_under_the_same_names() -> None:
    for kwargs in ({}, {"add_bias_kv": True}, {"bias": False}):
        mha = make_mha(**kwargs)
        fake = FakeQuantizedMultiheadAttention.from_mha(mha, SCHEMES["int4_weight_only"], GROUP)
        assert list(fake.state_dict()) == list(mha.state_dict())
        originals = dict(mha.named_parameters())
        assert {name: id(p) for name, p in fake.named_parameters()} == {n: id(p) for n, p in originals.items()}
        assert fake.group_size == GROUP and fake.fake_quantize
        assert FakeQuantizedMultiheadAttention.from_mha(mha, SCHEMES["int8_dynamic"], GROUP).group_size is None

        restored = restore_float_mha(fake)
        assert type(restored) is nn.MultiheadAttention
        assert {name: id(p) for name, p in restored.named_parameters()} == {n: id(p) for n, p in originals.items()}
        x, _ = inputs(mha.batch_first, False)
        assert torch.equal(restored(x, x, x)[0], mha(x, x, x)[0])


def test_separate_qkv_weights_and_bad_group_sizes_are_refused() -> None:
    with pytest.raises(ValueError, match="separate q/k/v"):
        Fake.from_mha(nn.MultiheadAttention(EMBED, HEADS, kdim=32), SCHEMES["int4_weight_only"], GROUP)
    with pytest.raises(ValueError, match="group_size"):
        Fake.from_mha(nn.MultiheadAttention(48, HEADS), SCHEMES["int4_weight_only"], GROUP)


@pytest.mark.parametrize("scheme", ["int8_dynamic_act_int4_weight", "int8_weight_only"])
def test_forward_options_match_the_float_module_and_the_converted_one(scheme: str) -> None:
    mha = make_mha(add_bias_kv=True, add_zero_attn=True)
    fake = FakeQuantizedMultiheadAttention.from_mha(mha, SCHEMES[scheme], GROUP).eval()
    converted = QuantizedMultiheadAttention.from_fake_quantized(fake)
    torch.manual_seed(2)
    query, memory = torch.randn(3, 5, EMBED), torch.randn(3, 7, EMBED)
    causal = nn.Transformer.generate_square_subsequent_mask(5)
    cases: list[tuple[tuple[Tensor, ...], dict[str, Any]]] = [
        ((query, memory, memory), {"average_attn_weights": False}),
        ((query, query, query), {"attn_mask": causal, "is_causal": True, "need_weights": False}),
        ((query, query, query), {"attn_mask": causal.isinf()}),
        ((query[0], memory[0], memory[0]), {}),  # unbatched
    ]
    for args, kwargs in cases:
        fake.fake_quantize = False
        for got, want in zip(fake(*args, **kwargs), mha(*args, **kwargs), strict=True):
            assert same(got, want, 0.0)
        fake.fake_quantize = True
        with torch.inference_mode():
            for got, want in zip(converted(*args, **kwargs), fake(*args, **kwargs), strict=True):
                assert same(got, want, 1e-5)


def same(got: Tensor | None, want: Tensor | None, atol: float) -> bool:
    if got is None or want is None:
        return got is None and want is None
    return torch.equal(got, want) if atol == 0 else torch.allclose(got, want, rtol=0, atol=atol)


def encoder_layer() -> nn.TransformerEncoderLayer:
    torch.manual_seed(3)
    return nn.TransformerEncoderLayer(EMBED, HEADS, dim_feedforward=128, dropout=0.0, batch_first=True).eval()


def test_inside_an_encoder_layer_the_fast_path_does_not_bypass_it_and_the_converted_layer_exports() -> None:
    layer = encoder_layer()
    fake = FakeQuantizedMultiheadAttention.from_mha(layer.self_attn, SCHEMES["int4_weight_only"], GROUP)
    layer.self_attn = fake
    x, mask = inputs(True, True)
    with torch.no_grad():
        fake.fake_quantize = False
        float_out = layer(x, src_key_padding_mask=mask)
        fake.fake_quantize = True
        bypassed = layer(x, src_key_padding_mask=mask)  # the fused path reads in_proj_weight: float numerics
        keep_off_fused_paths(layer, (FakeQuantizedMultiheadAttention,))
        fake_out = layer(x, src_key_padding_mask=mask)
    assert torch.allclose(bypassed, float_out, atol=1e-5)  # why keep_off_fused_paths is needed
    assert not torch.allclose(fake_out, float_out, atol=1e-4)
    fake.fake_quantize = False
    with torch.no_grad():
        torch.testing.assert_close(layer(x, src_key_padding_mask=mask), float_out, rtol=0, atol=1e-5)
    fake.fake_quantize = True

    converted = copy.deepcopy(layer)
    converted.self_attn = QuantizedMultiheadAttention.from_fake_quantized(fake)  # type: ignore[assignment]
    keep_off_fused_paths(converted, (QuantizedMultiheadAttention,))
    with torch.inference_mode():
        torch.testing.assert_close(converted(x, src_key_padding_mask=mask), fake_out, rtol=0, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(converted(x, src_key_padding_mask=mask), fake_out, rtol=0, atol=1e-5)
    program = torch.export.export(converted, (x,), {"src_key_padding_mask": mask})
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x, src_key_padding_mask=mask), fake_out, rtol=0, atol=1e-5)


def stored_bytes(module: nn.Module) -> int:
    stored = [t for name, t in module.state_dict().items() if name.endswith(("qweight", "scales"))]
    return sum(t.numel() * t.element_size() for t in stored)


BOUNDS = {
    "int8_weight_only": 0.27,
    "int8_dynamic": 0.27,
    "int4_weight_only": 1 / 6,
    "int8_dynamic_act_int4_weight": 1 / 6,
}


@pytest.mark.parametrize(("scheme", "bound"), BOUNDS.items())
def test_converted_weights_are_a_quarter_or_a_sixth_of_fp32(scheme: str, bound: float) -> None:
    fake = FakeQuantizedMultiheadAttention.from_mha(make_mha(), SCHEMES[scheme], GROUP)
    converted = QuantizedMultiheadAttention.from_fake_quantized(fake)
    fp32 = 4 * (3 * EMBED * EMBED + EMBED * EMBED)
    assert stored_bytes(converted) <= bound * fp32
    assert all(t.dtype in (torch.int8, torch.uint8) for n, t in converted.state_dict().items() if "qweight" in n)


def test_loading_another_state_dict_replaces_the_cached_weights() -> None:
    scheme = SCHEMES["int8_weight_only"]
    first = Quantized.from_fake_quantized(Fake.from_mha(make_mha(), scheme, GROUP))
    torch.manual_seed(9)
    other = Quantized.from_fake_quantized(
        Fake.from_mha(nn.MultiheadAttention(EMBED, HEADS, batch_first=True), scheme, GROUP)
    )
    x, _ = inputs(True, False)
    with torch.no_grad():
        first(x, x, x)  # fills the cache
        first.load_state_dict(other.state_dict())
        torch.testing.assert_close(first(x, x, x)[0], other(x, x, x)[0], rtol=0, atol=0)
