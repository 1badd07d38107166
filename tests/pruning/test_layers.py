"""The prunable-layer registry, weight layouts in the masks, and tied weights in target selection."""

from __future__ import annotations

from collections.abc import Iterator

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader
from transformers.pytorch_utils import Conv1D

from lightning_eff import GradualPruning
from lightning_eff.pruning.layers import (
    PrunableKind,
    prunable_kind,
    prunable_kinds,
    register_prunable,
    unregister_prunable,
)
from lightning_eff.pruning.masks import compute_masks
from lightning_eff.pruning.targets import select, select_targets
from lightning_eff.validation import ConfigError


@pytest.fixture
def restore_registry() -> Iterator[None]:
    before = prunable_kinds()
    yield
    for module_type in set(prunable_kinds()) - set(before):
        unregister_prunable(module_type)
    for module_type, kind in before.items():
        register_prunable(module_type, kind.weight, kind.output_dim, kind.input_dim, kind.bias, kind.nm, kind.opt_in)


def test_the_registry_knows_linear_conv_attention_and_hf_conv1d() -> None:
    attention = nn.MultiheadAttention(16, 4)
    assert prunable_kind(nn.Linear(4, 8)) == PrunableKind()
    assert prunable_kind(attention.out_proj) == PrunableKind()  # NonDynamicallyQuantizableLinear is a Linear
    assert prunable_kind(attention) == PrunableKind(weight="in_proj_weight", bias="in_proj_bias")
    assert prunable_kind(nn.MultiheadAttention(16, 4, kdim=8, vdim=8)) is None  # no packed in_proj_weight
    assert prunable_kind(nn.Conv2d(3, 8, 3)) == PrunableKind(nm=False)
    assert prunable_kind(Conv1D(8, 4)) == PrunableKind(output_dim=1, input_dim=0)  # weight [in=4, out=8]
    assert prunable_kind(nn.Embedding(10, 4)) is None and prunable_kind(nn.LayerNorm(4)) is None
    embedding = PrunableKind(output_dim=1, input_dim=0, bias=None, nm=False, opt_in=True)
    assert prunable_kind(nn.Embedding(10, 4), opt_in=True) == embedding  # only where `include` may name it
    assert prunable_kind(nn.LazyLinear(4)) is None  # nothing to prune until its first forward


def test_register_prunable_refuses_what_it_cannot_use() -> None:
    with pytest.raises(TypeError, match=r"not an nn\.Module subclass"):
        register_prunable(int)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="output_dim and input_dim must differ"):
        register_prunable(nn.Bilinear, output_dim=1, input_dim=1)
    assert nn.Bilinear not in prunable_kinds()


def test_a_subclass_entry_overrides_its_base(restore_registry: None) -> None:
    class Transposed(nn.Linear):  # pretend it stores its weight [in, out]
        pass

    register_prunable(Transposed, output_dim=1, input_dim=0)
    assert prunable_kind(Transposed(4, 4)) == PrunableKind(output_dim=1, input_dim=0)
    assert prunable_kind(nn.Linear(4, 4)) == PrunableKind()


def test_masks_follow_a_transposed_layout() -> None:
    weight = torch.randn(16, 12, generator=torch.Generator().manual_seed(0))  # Conv1D: [in=16, out=12]
    layout = {"w": (1, 0)}
    nm = compute_masks({"w": weight}, 0.5, "n:m", "layer", (2, 4), layout)["w"]
    assert nm.shape == weight.shape
    assert torch.equal(nm, compute_masks({"w": weight.t()}, 0.5, "n:m", "layer", (2, 4))["w"].t())
    assert (nm.t().reshape(12, 4, 4).sum(dim=2) == 2).all()  # 2 of every 4 inputs: down each column
    channels = compute_masks({"w": weight}, 0.5, "channels", "layer", layouts=layout)["w"]
    assert channels.shape == (1, 12)  # whole columns: output channels of a Conv1D
    assert int(channels.sum()) == 6
    unstructured = compute_masks({"w": weight}, 0.5, "unstructured", "global", layouts=layout)["w"]
    assert torch.equal(unstructured, compute_masks({"w": weight}, 0.5, "unstructured", "global")["w"])


def test_a_conv_registered_for_n_m_groups_along_its_input_channels(restore_registry: None) -> None:
    model = nn.Sequential(nn.Conv2d(8, 4, 3), nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(ConfigError, match=r"include=0: cannot be pruned n:m with M=4: it is a Conv2d"):
        select_targets(model, "n:m", include=["0"], group_size=4)
    register_prunable(nn.Conv2d, nm=True)
    (target,) = select_targets(model, "n:m", include=["0"], group_size=4)
    mask = compute_masks({"w": model[0].weight}, 0.5, "n:m", "layer", (2, 4), {"w": target.layout})["w"]
    assert mask.shape == (4, 8, 3, 3)
    assert (mask.permute(0, 2, 3, 1).reshape(-1, 2, 4).sum(dim=2) == 2).all()  # [out, kh, kw, in]: along in


class TiedLinears(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.first = nn.Linear(8, 8)
        self.second = nn.Linear(8, 8)
        self.second.weight = self.first.weight
        self.head = nn.Linear(8, 10, bias=False)
        self.head.weight = self.embed.weight


def test_tied_weights_are_one_target_and_a_head_tied_to_an_embedding_stays_dense() -> None:
    model = TiedLinears()
    selection = select(model, "unstructured")
    assert [(t.module, t.weight, t.aliases) for t in selection.targets] == [
        ("first", "first.weight", ("second.weight",))
    ]
    assert "embed.weight (Embedding)" in selection.left_dense["head"]
    included = select(model, "unstructured", include=["head"])
    assert [(t.weight, t.aliases) for t in included.targets] == [("embed.weight", ("head.weight",))]
    assert included.ties == {"embed.weight": ("head.weight",)}
    with pytest.raises(ConfigError, match=r"leaves no layer to prune.*head left dense: its weight is tied"):
        select(model, "unstructured", exclude=["first", "second"])
    excluded = select(model, "unstructured", include=["first", "head"], exclude=["second"])
    assert [t.module for t in excluded.targets] == ["head"]  # first is second: excluding one keeps both dense
    assert "second" in excluded.left_dense["first"]


def test_conv1d_channels_zero_columns_and_their_bias_in_a_fit() -> None:
    class Task(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.proj = Conv1D(12, 8)  # weight [8 in, 12 out]
            self.head = nn.Linear(12, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.relu(self.proj(x)))

        def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
            return self(batch).pow(2).mean()  # the outermost call is traced: proj with head, its consumer

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.01)

    L.seed_everything(0, verbose=False)
    task = Task()
    callback = GradualPruning(
        target_sparsity=0.5, granularity="channels", scope="layer", include="proj", update_every=1
    )
    trainer = L.Trainer(max_steps=4, callbacks=[callback], accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(task, DataLoader([torch.randn(4, 8) for _ in range(4)], batch_size=None))
    pruned = (task.proj.weight == 0).all(dim=0)
    assert int(pruned.sum()) == 6 and (task.proj.bias[pruned] == 0).all()
    assert torch.equal(callback.masks["proj.bias"], pruned) and callback.masks["proj.weight"].shape == (1, 12)
    assert (task.head.weight[:, pruned] == 0).all()  # the consumer's columns go with the channel
    small, summary = callback.shrink(task)
    assert small.proj.weight.shape == (8, 6) and summary["proj"].attributes == {"nf": (12, 6)}
