"""GradualPruning(granularity="channels") on the zoo: coupled groups from the graph, masks, an exact shrink.

Every zoo model is channel-pruned to 50% of each selected group's units in a short fit; the masked model and the
model `GradualPruning.shrink` returns compute the same outputs (fp32, eval, 1e-5), with fewer parameters.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader

from lightning_eff import GradualPruning
from lightning_eff.pruning.export import shrink
from lightning_eff.pruning.report import pruning_section
from lightning_eff.pruning.structured_shrink import ShrinkError
from lightning_eff.quantization import FakeQuantizedLinear, QuantizationAwareTraining, restore_float_modules
from lightning_eff.validation import ConfigError
from tests.pruning import zoo_ddp_worker
from tests.workers import run_worker
from tests.zoo.models import ZOO, ZOO_BY_NAME, ZooBatches, ZooTask, logits_of

QUIET: dict[str, Any] = {"accelerator": "cpu", "logger": False, "enable_progress_bar": False,
                         "enable_model_summary": False}  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def fit(name: str, callback: GradualPruning, root: Path, max_steps: int = 6, ckpt_path: str | None = None,
        extra: list[L.Callback] | None = None) -> tuple[ZooTask, L.Trainer]:  # fmt: skip
    """One batch trained on at every step (a resumed run then sees the same data), checkpoints every 2 steps."""
    L.seed_everything(0, verbose=False)
    task = ZooTask(name)
    saver = ModelCheckpoint(dirpath=root, filename="{step}", save_top_k=-1, every_n_train_steps=2)
    trainer = L.Trainer(max_steps=max_steps, callbacks=[callback, saver, *(extra or [])], default_root_dir=root,
                        **QUIET)  # fmt: skip
    trainer.fit(task, DataLoader(ZooBatches(name, count=1), batch_size=None), ckpt_path=ckpt_path)
    return task, trainer


def channels(**kwargs: Any) -> GradualPruning:
    options = {"target_sparsity": 0.5, "update_every": 2, "end_step": 4, "scope": "layer", **kwargs}
    return GradualPruning(granularity="channels", **options)


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def assert_shrunk_equals_masked(task: ZooTask, small: nn.Module, name: str) -> None:
    inputs, _ = ZOO_BY_NAME[name].batch(123)
    with torch.no_grad():
        masked = logits_of(task.model.eval()(**inputs))
        shrunk = logits_of(small.eval()(**inputs))
    assert shrunk.shape == masked.shape
    assert torch.allclose(shrunk, masked, rtol=0, atol=1e-5), (shrunk - masked).abs().max()


@pytest.mark.parametrize("name", [entry.name for entry in ZOO])
def test_every_zoo_model_is_channel_pruned_per_group_and_shrinks_exactly(name: str, tmp_path: Path) -> None:
    callback = channels()
    task, trainer = fit(name, callback, tmp_path)
    plan = callback.plan
    assert plan is not None and plan.groups and callback.reached_target
    for group in plan.groups:  # layer scope: half the units of every group, one kept at least
        expected = min(round(0.5 * group.size), group.size - 1) / group.size
        assert callback.group_sparsity[group.name] == pytest.approx(expected), group
    small, summary = callback.shrink(task.model)
    assert count(small) < count(task.model)
    assert summary and all(layer in dict(task.model.named_modules()) for layer in summary)
    assert_shrunk_equals_masked(task, small, name)
    section = callback.report_section(trainer, tmp_path)
    assert {row["layer"] for row in section.summary["shrink"]} == set(summary)
    assert set(section.summary["groups"]) == {g.name for g in plan.groups}
    assert all(reasons for reasons in section.summary["skipped_groups"].values())


def test_global_scope_prunes_the_target_share_of_all_units_and_shrinks_the_lightning_module(tmp_path: Path) -> None:
    callback = channels(scope="global")
    task, _ = fit("resnet", callback, tmp_path)
    assert callback.plan is not None
    sizes = {g.name: g.size for g in callback.plan.groups}
    pruned = sum(callback.group_sparsity[name] * size for name, size in sizes.items())
    assert pruned == round(0.5 * sum(sizes.values()))
    bn = [name for g in callback.plan.groups for m in g.members if "bn" in (name := m.name)]
    assert bn, "a ResNet's BatchNorm is coupled to its conv"
    small, summary = callback.shrink(task)  # the LightningModule itself: names with the "model." prefix
    assert all(layer.startswith("model.") for layer in summary)
    assert_shrunk_equals_masked(task, small.model, "resnet")  # type: ignore[arg-type]


def test_resuming_mid_schedule_gives_the_same_masks_as_the_uninterrupted_run(tmp_path: Path) -> None:
    full = channels(end_step=6)
    fit("resnet", full, tmp_path / "full", max_steps=8)
    resumed = channels(end_step=6)
    fit("resnet", resumed, tmp_path / "more", max_steps=8, ckpt_path=str(tmp_path / "full" / "step=4.ckpt"))
    assert resumed.plan is not None and set(resumed.masks) == set(full.masks)
    for key, mask in full.masks.items():
        assert torch.equal(resumed.masks[key], mask), key
    assert resumed.history == full.history


def test_include_and_exclude_select_groups_by_their_producer_layers(tmp_path: Path) -> None:
    callback = channels(include="*mlp*", exclude="*blocks.1.*")
    fit("vit", callback, tmp_path, max_steps=4)
    assert callback.plan is not None
    assert [g.name for g in callback.plan.groups] == ["model.blocks.0.mlp.fc1.weight:0"]
    with pytest.raises(ConfigError, match="include=nothing_like_this: matches no prunable layer"):
        fit("vit", channels(include="nothing_like_this"), tmp_path / "bad", max_steps=2)


def test_shrink_says_why_it_cannot_instead_of_returning_the_model(tmp_path: Path) -> None:
    model = ZooTask("depthwise_cnn").model.eval()
    inputs = ZOO_BY_NAME["depthwise_cnn"].batch(0)[0]
    with pytest.raises(ShrinkError, match="needs example_kwargs"):
        shrink(model)
    with pytest.raises(ShrinkError, match="no zeroed channel in any prunable group of DepthwiseCNN"):
        shrink(model, inputs)
    with torch.no_grad():  # zero two pointwise filters and their BatchNorm entries: found and removed
        model.pointwise[0].weight[[3, 7]] = 0
        model.pointwise[1].weight[[3, 7]] = 0
        model.pointwise[1].bias[[3, 7]] = 0
    small, summary = shrink(model, inputs)
    assert summary["pointwise.0"].shapes["weight"] == ((32, 16, 1, 1), (30, 16, 1, 1))
    assert summary["classifier"].parameters == (330, 310)
    with torch.no_grad():
        assert torch.allclose(small(**inputs), model(**inputs), atol=1e-5)
    with pytest.raises(ShrinkError, match="has not found its channel groups yet"):
        channels().shrink(model)
    with pytest.raises(ShrinkError, match="prunes granularity='unstructured'"):
        GradualPruning().shrink(model)


def test_shrink_after_quantization_aware_training_restores_float_layers(tmp_path: Path) -> None:
    callback = channels()
    qat = QuantizationAwareTraining()
    task, _ = fit("vit", callback, tmp_path, extra=[qat])
    assert any(isinstance(m, FakeQuantizedLinear) for m in task.model.modules())
    small, summary = callback.shrink(task.model)
    assert summary and not any(isinstance(m, FakeQuantizedLinear) for m in small.modules())
    assert any(isinstance(m, FakeQuantizedLinear) for m in task.model.modules())  # the trained model is untouched
    fc1 = task.model.blocks[0].mlp.fc1
    weight = fc1.weight
    assert isinstance(fc1, FakeQuantizedLinear)
    assert restore_float_modules(task.model) is task.model  # the way back: plain Linear, the very Parameters
    assert type(task.model.blocks[0].mlp.fc1) is nn.Linear and task.model.blocks[0].mlp.fc1.weight is weight
    assert_shrunk_equals_masked(task, small, "vit")  # the masked float model computes what the shrunk one does


def test_two_ddp_ranks_find_the_same_groups_and_masks_on_every_zoo_model(tmp_path: Path) -> None:
    """Every zoo model, channels, unstructured and 2:4, on 2 gloo ranks that train on other batches."""
    result = run_worker(zoo_ddp_worker, [str(tmp_path / "out")], cwd=tmp_path, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [(tmp_path / f"out.rank{rank}").read_text().splitlines() for rank in (0, 1)]
    cases = [(model, granularity) for model in ZOO_BY_NAME for granularity in zoo_ddp_worker.GRANULARITIES]
    assert [tuple(line.split()[:2]) for line in ranks[0]] == cases
    assert ranks[0] == ranks[1]  # rank 0's broadcast made them agree
    for line in ranks[0]:
        _, granularity, _, groups, pruned, masks = line.split()
        assert int(pruned) > 0 and int(masks) > 0, line
        assert groups != "0" or granularity != "channels", line


def test_report_gives_the_pruned_weights_bytes_dense_and_packed(tmp_path: Path) -> None:
    callback = GradualPruning(target_sparsity=0.9, scope="layer", update_every=1, end_step=2)
    fit("gpt2", callback, tmp_path, max_steps=3)
    summary = pruning_section(callback, tmp_path).summary
    dense, packed = summary["targeted_bytes_dense"], summary["targeted_bytes_packed"]
    assert dense == sum(4 * callback._parameters[name].numel() for name in callback.layer_sparsity) > 0
    assert packed < 0.15 * dense  # 10% of the fp32 values plus a bitmap of 1/32
