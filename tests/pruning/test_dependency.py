"""Channel groups discovered from the graph, masked and shrunk, on every zoo model and a few coupling corner cases.

The core promise: with a group's masks applied in place, the model computes exactly what the physically shrunk
copy computes, so the zoo tests compare the two at 50% of every group's units on one batch.
"""

from __future__ import annotations

import copy
import functools
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lightning_eff.pruning.dependency import Analysis, ChannelGroup, TraceError, analyze
from lightning_eff.pruning.masks import apply_masks
from lightning_eff.pruning.structured_shrink import (
    ShrinkError,
    group_importance,
    group_masks,
    pruned_units,
    shrink_groups,
    unit_masks,
)
from tests.zoo.models import ZOO, ZOO_BY_NAME, build, logits_of

BN = ("weight", "bias", "running_mean", "running_var")


@functools.cache
def zoo_analysis(name: str) -> Analysis:
    return analyze(build(name), ZOO_BY_NAME[name].batch(0)[0])


def keys(group: ChannelGroup) -> set[tuple[str, int]]:
    return group.dimensions()


def find(groups: list[ChannelGroup], name: str, dim: int) -> ChannelGroup:
    matches = [group for group in groups if (name, dim) in group.dimensions()]
    assert len(matches) == 1, f"{name}:{dim} in {len(matches)} groups"
    return matches[0]


def skipped_with(analysis: Analysis, name: str, dim: int) -> tuple[ChannelGroup, str]:
    for skipped in analysis.skipped:
        if (name, dim) in skipped.group.dimensions():
            return skipped.group, " ".join(skipped.reasons)
    raise AssertionError(f"{name}:{dim} is not in a skipped group")


def bn(prefix: str) -> set[tuple[str, int]]:
    return {(f"{prefix}.{leaf}", 0) for leaf in BN}


def perturb(model: nn.Module, seed: int = 1) -> nn.Module:
    """Non-trivial biases, norm affines and running stats, so masking them all is really tested."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if not tensor.is_floating_point():
                continue
            noise = torch.rand(tensor.shape, generator=generator)
            if name.endswith("running_var"):
                tensor.copy_(0.5 + noise)
            elif name.endswith(("bias", "running_mean")) or tensor.dim() == 1:
                tensor.add_(0.2 * (noise - 0.5))
    return model


def params(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def masked_and_shrunk(
    model: nn.Module, groups: list[ChannelGroup], inputs: dict[str, Any], sparsity: float = 0.5
) -> tuple[nn.Module, nn.Module, Tensor, Tensor, dict[str, Any]]:
    masks = group_masks(model, groups, sparsity, scope="layer")
    masked = copy.deepcopy(model).eval()
    apply_masks(dict(masked.named_parameters()), masks)
    shrunk, summary = shrink_groups(model, groups, masks)
    shrunk.eval()
    with torch.no_grad():
        expected, got = logits_of(masked(**inputs)), logits_of(shrunk(**inputs))
    return masked, shrunk, expected, got, summary


# --- every zoo model ---------------------------------------------------------------------------------------

EXPECTED_LAYERS = {  # the modules shrink_groups must report, per zoo model (layer 0 / block 0 shown)
    "gpt2": {"transformer.h.0.attn", "transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj",
             "transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj"},
    "bert": {"encoder.layer.0.attention.self", "encoder.layer.0.attention.self.query",
             "encoder.layer.0.attention.self.key", "encoder.layer.0.attention.self.value",
             "encoder.layer.0.attention.output.dense", "encoder.layer.0.intermediate.dense",
             "encoder.layer.0.output.dense"},
    "bert_mlm": {"bert.encoder.layer.0.attention.self", "bert.encoder.layer.0.intermediate.dense"},
    "llama_tied": {"model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj",
                   "model.layers.0.self_attn.v_proj", "model.layers.0.self_attn.o_proj",
                   "model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj"},
    "llama": {"model.layers.1.self_attn.k_proj", "model.layers.1.mlp.down_proj"},
    "resnet": {"conv1", "bn1", "layer1.0.conv1", "layer1.0.bn1", "layer1.0.conv2", "layer1.0.bn2",
               "layer2.0.downsample.0", "layer2.0.downsample.1", "fc"},
    "vit": {"blocks.0.mlp.fc1", "blocks.0.mlp.fc2", "blocks.1.mlp.fc1", "blocks.1.mlp.fc2"},
    "transformer_encoder": {"encoder.layers.0.linear1", "encoder.layers.0.linear2"},
    "depthwise_cnn": {"stem.0", "stem.1", "depthwise.0", "depthwise.1", "pointwise.0", "pointwise.1",
                      "classifier"},
}  # fmt: skip


@pytest.mark.parametrize("name", [entry.name for entry in ZOO])
def test_masked_and_shrunk_models_agree_at_half_of_every_group(name: str) -> None:
    model = perturb(build(name))
    analysis = zoo_analysis(name)
    assert analysis.groups, f"{name}: no prunable group"
    inputs = ZOO_BY_NAME[name].batch(0)[0]
    with torch.no_grad():
        dense = logits_of(model(**inputs))
    _, shrunk, expected, got, summary = masked_and_shrunk(model, analysis.groups, inputs)
    assert params(shrunk) < params(model)
    assert got.shape == expected.shape == dense.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(expected, dense), "pruning half of every group should change the outputs"
    assert EXPECTED_LAYERS[name] <= set(summary), EXPECTED_LAYERS[name] - set(summary)
    for layer, change in summary.items():  # every reported layer is really smaller, or had its head count cut
        assert change.attributes, layer
        assert all(after <= before for before, after in change.attributes.values()), (layer, change)


@pytest.mark.parametrize("name", [entry.name for entry in ZOO])
def test_every_group_is_prunable_or_skipped_with_a_reason(name: str) -> None:
    analysis = zoo_analysis(name)
    for skipped in analysis.skipped:
        assert skipped.reasons and all(reason for reason in skipped.reasons), skipped.group
    covered = [key for group in analysis.groups for key in group.dimensions()]
    assert len(covered) == len(set(covered)), "a (tensor, dim) belongs to at most one prunable group"
    for group in analysis.groups:
        assert group.size >= 2
        for member in group.members:  # every unit owns the same number of entries, none shared
            flat = member.index.reshape(-1)
            assert flat.unique().numel() == flat.numel(), member


def test_resnet_inner_and_residual_groups() -> None:
    groups = zoo_analysis("resnet").groups
    inner = find(groups, "layer1.0.conv1.weight", 0)
    assert keys(inner) == {("layer1.0.conv1.weight", 0), ("layer1.0.conv2.weight", 1)} | bn("layer1.0.bn1")
    assert inner.kind == "channels" and inner.size == 16
    stage1 = find(groups, "conv1.weight", 0)
    assert keys(stage1) == (
        {("conv1.weight", 0), ("layer1.0.conv1.weight", 1), ("layer1.0.conv2.weight", 0)}
        | {("layer1.1.conv1.weight", 1), ("layer1.1.conv2.weight", 0)}
        | {("layer2.0.conv1.weight", 1), ("layer2.0.downsample.0.weight", 1)}
        | bn("bn1") | bn("layer1.0.bn2") | bn("layer1.1.bn2")
    )  # fmt: skip
    stage2 = find(groups, "layer2.0.downsample.0.weight", 0)
    assert keys(stage2) == (
        {("layer2.0.downsample.0.weight", 0), ("layer2.0.conv2.weight", 0), ("layer2.1.conv1.weight", 1)}
        | {("layer2.1.conv2.weight", 0), ("fc.weight", 1)}
        | bn("layer2.0.downsample.1") | bn("layer2.0.bn2") | bn("layer2.1.bn2")
    )  # fmt: skip
    assert len(groups) == 6  # two residual streams and the inner channel of each of the four blocks
    analysis = zoo_analysis("resnet")
    assert "model input" in skipped_with(analysis, "conv1.weight", 1)[1]
    assert "model output" in skipped_with(analysis, "fc.weight", 0)[1]


def test_depthwise_conv_is_coupled_to_its_input_channels() -> None:
    groups = zoo_analysis("depthwise_cnn").groups
    stem = find(groups, "stem.0.weight", 0)
    assert keys(stem) == (
        {("stem.0.weight", 0), ("depthwise.0.weight", 0), ("pointwise.0.weight", 1)} | bn("stem.1") | bn("depthwise.1")
    )
    assert torch.equal(stem.member("depthwise.0.weight", 0).index, stem.member("stem.0.weight", 0).index)


def test_vit_mlp_prunable_heads_found_but_skipped_because_its_forward_reads_the_input_width() -> None:
    analysis = zoo_analysis("vit")
    mlp = find(analysis.groups, "blocks.0.mlp.fc1.weight", 0)
    assert keys(mlp) == {("blocks.0.mlp.fc1.weight", 0), ("blocks.0.mlp.fc1.bias", 0), ("blocks.0.mlp.fc2.weight", 1)}
    heads, reason = skipped_with(analysis, "blocks.0.attn.qkv.weight", 0)
    assert heads.kind == "heads" and heads.size == 4
    assert keys(heads) == {
        ("blocks.0.attn.qkv.weight", 0),
        ("blocks.0.attn.qkv.bias", 0),
        ("blocks.0.attn.proj.weight", 1),
    }
    # packed qkv: head 1 owns rows 8..16 of q, of k (offset 32) and of v (offset 64)
    assert heads.member("blocks.0.attn.qkv.weight", 0).index[1].tolist() == [*range(8, 16), *range(40, 48),
                                                                             *range(72, 80)]  # fmt: skip
    assert heads.member("blocks.0.attn.proj.weight", 1).index[1].tolist() == list(range(8, 16))
    assert "does not run at the pruned sizes" in reason
    residual, why = skipped_with(analysis, "patch_embed.weight", 0)
    assert {("cls_token", 2), ("pos_embed", 2), ("blocks.0.norm1.weight", 0), ("head.weight", 1)} <= keys(residual)
    assert "LayerNorm" in why


def test_gpt2_packed_conv1d_heads_and_mlp() -> None:
    analysis = zoo_analysis("gpt2")
    heads = find(analysis.groups, "transformer.h.0.attn.c_attn.weight", 1)  # HF Conv1D: weight is [in, out]
    assert heads.kind == "heads" and heads.size == 4
    assert keys(heads) == {("transformer.h.0.attn.c_attn.weight", 1), ("transformer.h.0.attn.c_attn.bias", 0),
                           ("transformer.h.0.attn.c_proj.weight", 0)}  # fmt: skip
    assert heads.member("transformer.h.0.attn.c_attn.weight", 1).index[3].tolist() == [
        *range(24, 32), *range(56, 64), *range(88, 96)
    ]  # fmt: skip
    mlp = find(analysis.groups, "transformer.h.1.mlp.c_fc.weight", 1)
    assert keys(mlp) == {("transformer.h.1.mlp.c_fc.weight", 1), ("transformer.h.1.mlp.c_fc.bias", 0),
                         ("transformer.h.1.mlp.c_proj.weight", 0)}  # fmt: skip
    _, reason = skipped_with(analysis, "transformer.wte.weight", 1)
    assert "LayerNorm" in reason and "embedding" in reason


@pytest.mark.parametrize("name", ["llama", "llama_tied"])
def test_llama_gqa_heads_and_gated_mlp(name: str) -> None:
    analysis = zoo_analysis(name)
    heads = find(analysis.groups, "model.layers.0.self_attn.q_proj.weight", 0)
    prefix = "model.layers.0.self_attn"
    assert keys(heads) == {(f"{prefix}.q_proj.weight", 0), (f"{prefix}.k_proj.weight", 0),
                           (f"{prefix}.v_proj.weight", 0), (f"{prefix}.o_proj.weight", 1)}  # fmt: skip
    # 4 query heads share 2 kv heads: a unit is one kv head with its two query heads
    assert heads.kind == "heads" and heads.size == 2
    assert heads.member(f"{prefix}.q_proj.weight", 0).index[1].tolist() == list(range(16, 32))
    assert heads.member(f"{prefix}.k_proj.weight", 0).index[1].tolist() == list(range(8, 16))
    assert heads.member(f"{prefix}.o_proj.weight", 1).index[1].tolist() == list(range(16, 32))
    mlp = find(analysis.groups, "model.layers.1.mlp.gate_proj.weight", 0)
    assert keys(mlp) == {("model.layers.1.mlp.gate_proj.weight", 0), ("model.layers.1.mlp.up_proj.weight", 0),
                         ("model.layers.1.mlp.down_proj.weight", 1)}  # fmt: skip
    residual, reason = skipped_with(analysis, "model.embed_tokens.weight", 1)
    assert ("model.norm.weight", 0) in residual.dimensions() and "input_layernorm" in reason


@pytest.mark.parametrize("name, prefix", [("bert", ""), ("bert_mlm", "bert.")])
def test_bert_heads_and_intermediate(name: str, prefix: str) -> None:
    groups = zoo_analysis(name).groups
    layer = f"{prefix}encoder.layer.1"
    heads = find(groups, f"{layer}.attention.self.query.weight", 0)
    projections = {(f"{layer}.attention.self.{p}.{leaf}", 0) for p in ("query", "key", "value") for leaf in BN[:2]}
    assert keys(heads) == projections | {(f"{layer}.attention.output.dense.weight", 1)}
    assert heads.kind == "heads" and heads.size == 4
    mlp = find(groups, f"{layer}.intermediate.dense.weight", 0)
    assert keys(mlp) == {(f"{layer}.intermediate.dense.weight", 0), (f"{layer}.intermediate.dense.bias", 0),
                         (f"{layer}.output.dense.weight", 1)}  # fmt: skip


def test_transformer_encoder_prunes_its_feed_forward_and_says_why_not_its_heads() -> None:
    analysis = zoo_analysis("transformer_encoder")
    assert {frozenset(keys(group)) for group in analysis.groups} == {
        frozenset({(f"encoder.layers.{i}.linear1.weight", 0), (f"encoder.layers.{i}.linear1.bias", 0),
                   (f"encoder.layers.{i}.linear2.weight", 1)})
        for i in (0, 1)
    }  # fmt: skip
    _, reason = skipped_with(analysis, "encoder.layers.0.self_attn.in_proj_weight", 0)
    assert "embed_dim == num_heads * head_dim" in reason


def test_shrunk_hf_model_keeps_its_config_and_ties() -> None:
    model = build("gpt2")
    _, shrunk, _, _, summary = masked_and_shrunk(model, zoo_analysis("gpt2").groups, ZOO_BY_NAME["gpt2"].batch(0)[0])
    assert shrunk.lm_head.weight is shrunk.transformer.wte.weight
    assert summary["transformer.h.0.attn"].attributes == {"num_heads": (4, 2), "split_size": (32, 16)}
    assert shrunk.config.n_head == 4  # shared by every layer: left alone, each attention module carries its own


# --- coupling corner cases ---------------------------------------------------------------------------------


class ConcatNet(nn.Module):
    """Two branches concatenated along channels into one BatchNorm and conv, then a grouped conv and a Flatten."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 6, 1)
        self.bn = nn.BatchNorm2d(10)
        self.conv = nn.Conv2d(10, 8, 1)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=4)
        self.head = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv(F.relu(self.bn(torch.cat([F.relu(self.a(x)), self.b(x)], dim=1))))
        y = F.adaptive_avg_pool2d(F.relu(self.grouped(y)), 4)
        return self.head(torch.flatten(y, 1))


def test_concatenation_offsets_grouped_conv_and_flatten() -> None:
    model = perturb(ConcatNet().eval())
    inputs = {"x": torch.randn(2, 3, 8, 8)}
    groups = analyze(model, inputs).groups
    first, second = find(groups, "a.weight", 0), find(groups, "b.weight", 0)
    assert keys(first) == {("a.weight", 0), ("a.bias", 0), ("conv.weight", 1)} | {("bn.weight", 0), ("bn.bias", 0),
                           ("bn.running_mean", 0), ("bn.running_var", 0)}  # fmt: skip
    assert first.member("bn.weight", 0).segment == (0, 4) and second.member("bn.weight", 0).segment == (4, 10)
    assert second.member("conv.weight", 1).index[0].tolist() == [4]
    # groups=4: a unit is one group of the grouped conv, 2 input and 2 output channels
    grouped = find(groups, "grouped.weight", 0)
    assert keys(grouped) == {("conv.weight", 0), ("conv.bias", 0), ("grouped.weight", 0), ("grouped.bias", 0),
                             ("head.weight", 1)}  # fmt: skip
    assert grouped.size == 4 and grouped.member("conv.weight", 0).index[1].tolist() == [2, 3]
    assert grouped.member("head.weight", 1).index.shape == (4, 2 * 16)  # Flatten: each channel is 16 columns
    _, _, expected, got, summary = masked_and_shrunk(model, groups, inputs)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert summary["grouped"].attributes == {"groups": (4, 2), "out_channels": (8, 4), "in_channels": (8, 4)}
    assert summary["bn"].attributes == {"num_features": (10, 2 + 3)}


class ConcatOnly(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(6, 4), nn.Linear(6, 3)
        self.out = nn.Linear(7, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.cat([torch.tanh(self.a(x)), torch.sigmoid(self.b(x))], dim=-1))


def test_concatenation_gives_each_branch_its_slice_of_the_consumer() -> None:
    model = perturb(ConcatOnly().eval())
    inputs = {"x": torch.randn(3, 6)}
    groups = analyze(model, inputs).groups
    first, second = find(groups, "a.weight", 0), find(groups, "b.weight", 0)
    assert first.member("out.weight", 1).segment == (0, 4) and second.member("out.weight", 1).segment == (4, 7)
    _, shrunk, expected, got, _ = masked_and_shrunk(model, groups, inputs)
    assert shrunk.out.in_features == 2 + 1  # half of 4, and round(1.5) = 2 of 3 pruned
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


class TimmAttention(nn.Module):
    """timm's Attention as it is in timm: it reads num_heads and head_dim, so its heads can be removed."""

    def __init__(self, dim: int = 24, num_heads: int = 3) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        batch, tokens, _ = x.shape
        qkv = self.qkv(self.norm(x)).reshape(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return x + self.proj(out.transpose(1, 2).reshape(batch, tokens, -1))


def test_packed_qkv_heads_shrink_when_the_forward_reads_num_heads() -> None:
    model = perturb(TimmAttention().eval())
    inputs = {"x": torch.randn(2, 5, 24)}
    heads = find(analyze(model, inputs).groups, "qkv.weight", 0)
    assert heads.kind == "heads" and heads.size == 3
    masks = unit_masks(model, [(heads, torch.tensor([False, True, False]))])
    assert masks["qkv.weight"].shape == (72, 1) and masks["proj.weight"].shape == (1, 24)
    assert masks["qkv.weight"].sum() == 3 * 8 and masks["qkv.bias"].sum() == 3 * 8
    masked = copy.deepcopy(model)
    apply_masks(dict(masked.named_parameters()), masks)
    shrunk, summary = shrink_groups(model, [heads], masks)
    assert summary[""].attributes == {"num_heads": (3, 2)} and shrunk.qkv.out_features == 48
    with torch.no_grad():
        torch.testing.assert_close(shrunk(**inputs), masked(**inputs), rtol=1e-5, atol=1e-5)


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x) if x.sum() > 0 else -self.fc(x)


def test_a_model_the_tracer_cannot_handle_is_named_with_the_reason() -> None:
    with pytest.raises(TraceError, match=r"cannot trace DataDependent with torch.export: .+"):
        analyze(DataDependent(), {"x": torch.randn(2, 4)})


# --- importance, masks, refusals ---------------------------------------------------------------------------


def test_importance_sums_every_coupled_slice_and_masks_keep_one_unit() -> None:
    model = perturb(build("resnet"))
    group = find(zoo_analysis("resnet").groups, "layer1.0.conv1.weight", 0)
    with torch.no_grad():
        model.layer1[0].conv1.weight[3].zero_()
        model.layer1[0].bn1.weight[3] = 0.0
        model.layer1[0].bn1.bias[3] = 0.0
    score = group_importance(model, group)
    column = model.layer1[0].conv2.weight[:, 3].detach().double().pow(2).sum()
    torch.testing.assert_close(score[3], column)  # only the consumer's column is left
    masks = group_masks(model, [group], 0.99)
    assert int(masks["layer1.0.conv1.weight"].sum()) == group.size - 1
    assert masks["layer1.0.bn1.bias"].shape == (16,) and masks["layer1.0.conv2.weight"].shape == (1, 16, 1, 1)
    groups = zoo_analysis("resnet").groups
    shares = group_masks(model, groups, 0.5, scope="global")
    parameters = dict(model.named_parameters())
    pruned = [int(pruned_units(g, shares, parameters).sum()) for g in groups]
    assert sum(pruned) == round(0.5 * sum(g.size for g in groups))
    assert all(count < g.size for count, g in zip(pruned, groups, strict=True)) and len(set(pruned)) > 1


def test_shrink_refuses_inconsistent_empty_and_impossible_requests() -> None:
    model = build("resnet")
    group = find(zoo_analysis("resnet").groups, "layer1.0.conv1.weight", 0)
    masks = group_masks(model, [group], 0.5)
    with pytest.raises(ShrinkError, match=r"pruned in .* but not in .*layer1\.0\.conv2\.weight"):
        shrink_groups(model, [group], {k: v for k, v in masks.items() if k != "layer1.0.conv2.weight"})
    with pytest.raises(ShrinkError, match="nothing to remove"):
        shrink_groups(model, [group], group_masks(model, [group], 0.0))
    with pytest.raises(ShrinkError, match="every unit is pruned"):
        shrink_groups(model, [group], unit_masks(model, [(group, torch.ones(group.size, dtype=torch.bool))]))
    encoder = build("transformer_encoder")
    mha, _ = skipped_with(zoo_analysis("transformer_encoder"), "encoder.layers.0.self_attn.in_proj_weight", 0)
    with pytest.raises(ShrinkError, match=r"cannot shrink .*MultiheadAttention encoder\.layers\.0\.self_attn"):
        shrink_groups(encoder, [mha], {})
