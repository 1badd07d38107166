"""GradualPruning under FSDP2 (Lightning's ModelParallelStrategy, gloo), every check in one 2-process launch.

`python -m tests.pruning.fsdp_worker OUT` writes `OUT.rank<N>`: one ``name value`` line per check, which the
test reads. Each later `fit` reuses the process group the first one made, so the checks cost one launch.
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.load import _load_distributed_checkpoint
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.tensor import DTensor

from lightning_eff import EfficientModelParallelStrategy, GradualPruning, QuantizationAwareTraining
from lightning_eff.checkpoints import checkpoint_problem
from lightning_eff.pruning.masks import compute_masks
from lightning_eff.pruning.report import pruning_section
from lightning_eff.pruning.sharded import MASK_DIR
from lightning_eff.pruning.sharded_select import ShardedSelector
from lightning_eff.sharding import full_tensor, fully_shard_blocks
from lightning_eff.tasks.gpt import TinyGPT
from lightning_eff.tasks.text import TextDataModule
from lightning_eff.validation import ConfigError
from tests.zoo.models import ZooBatches, ZooTask

# The model summary stays on: its forward leaves FSDP2's root unit gathered, which the callback must undo.
QUIET: dict[str, Any] = {"accelerator": "cpu", "devices": 2, "logger": False, "enable_progress_bar": False,
                         "limit_val_batches": 0}  # fmt: skip


def fsdp() -> ModelParallelStrategy:
    """Ours: Lightning's own cannot resume after the model summary's forward (see its load_checkpoint)."""
    return EfficientModelParallelStrategy()


def lightning_fsdp() -> ModelParallelStrategy:
    return ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)


def fit(callback: L.Callback | list[L.Callback], strategy: Any, max_steps: int, root: Path | None = None,
        ckpt_path: str | None = None) -> tuple[TinyGPT, L.Trainer]:  # fmt: skip
    L.seed_everything(0, verbose=False)
    model = TinyGPT(n_layer=2, n_head=2, d_model=32, seq_len=32, warmup_steps=1)
    saver = [ModelCheckpoint(dirpath=root, filename="{step}", save_top_k=-1, every_n_train_steps=2)] if root else []
    callbacks = callback if isinstance(callback, list) else [callback]
    trainer = L.Trainer(max_steps=max_steps, strategy=strategy, callbacks=[*callbacks, *saver],
                        enable_checkpointing=root is not None, **QUIET)  # fmt: skip
    trainer.fit(model, TextDataModule(seq_len=32, batch_size=4, max_bytes=40_000), ckpt_path=ckpt_path)
    return model, trainer


class ShardedGPT2(ZooTask):
    """The zoo's Hugging Face GPT-2 (Conv1D layers, tied head) as a user would shard it: one unit per block."""

    def __init__(self) -> None:
        super().__init__("gpt2")

    def configure_model(self) -> None:
        if self.device_mesh is not None:
            # the root unit is the HF model: training_step calls it, not this module's forward
            fully_shard_blocks(self.model, list(self.model.transformer.h), self.device_mesh["data_parallel"])


def fit_gpt2(callback: GradualPruning, strategy: Any) -> ShardedGPT2:
    L.seed_everything(0, verbose=False)
    model = ShardedGPT2()
    trainer = L.Trainer(max_steps=5, strategy=strategy, callbacks=[callback], enable_checkpointing=False, **QUIET)
    trainer.fit(model, torch.utils.data.DataLoader(ZooBatches("gpt2", count=8), batch_size=None))
    return model


def full_weights(model: torch.nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    parameters = dict(model.named_parameters())
    return {name: full_tensor(parameters[name]).detach().clone() for name in names}


def gathered_masks(callback: GradualPruning) -> dict[str, torch.Tensor]:
    """The whole masks, gathered only here, for the comparison (the callback never holds them)."""
    out = {}
    for name, mask in callback.masks.items():
        parameter = callback._parameters[name]
        if isinstance(parameter, DTensor):
            mask = DTensor.from_local(mask, parameter.device_mesh, parameter.placements, shape=parameter.shape,
                                      stride=parameter.stride()).full_tensor()  # fmt: skip
        out[name] = mask.cpu()
    return out


def selector_checks(lines: list[str]) -> None:
    """The sharded threshold picks what a whole-tensor top-k picks, where no score ties at the threshold."""
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    generator = torch.Generator().manual_seed(0)
    equal = cases = 0
    for _ in range(10):
        weights = {f"w{i}": torch.randn(int(torch.randint(1, 40, (1,), generator=generator)), 16, generator=generator)
                   for i in range(4)}  # fmt: skip
        for granularity, pattern in (("unstructured", None), ("n:m", (2, 4))):
            for scope in ("global", "layer"):
                sparsity = 0.3 + 0.6 * float(torch.rand(1, generator=generator))
                sparsity = max(sparsity, 0.5) if pattern else sparsity
                whole = compute_masks(weights, sparsity, granularity, scope, pattern)
                shards = {name: w.tensor_split(world)[rank] for name, w in weights.items()}
                sharded = compute_masks(shards, sparsity, granularity, scope, pattern, selector=ShardedSelector())
                cases += 1
                equal += all(torch.equal(sharded[n], whole[n].tensor_split(world)[rank]) for n in weights)
    lines.append(f"selector_equal {equal} {cases}")


def run(out: Path) -> None:
    # One thread: the FSDP2 and DDP runs then compute bit-equal weights (several threads differ by ~1e-8, which
    # could move a weight across the threshold and make the mask comparison a matter of chance).
    torch.set_num_threads(1)
    lines: list[str] = []
    root = out.parent

    # 1. global unstructured on the small GPT under FSDP2, checkpoints every 2 steps
    callback = GradualPruning(target_sparsity=0.5, update_every=2, end_step=4)
    model, _ = fit(callback, lightning_fsdp(), 6, root / "fsdp")
    selector_checks(lines)  # now that the first fit made the process group
    names = list(callback.masks)
    local_is_shard = all(callback.masks[n].shape == callback._local[n].shape != callback._parameters[n].shape
                         or callback._parameters[n].shape[0] < 2 for n in names)  # fmt: skip
    lines.append(f"masks_are_shards {int(local_is_shard)}")
    weights = full_weights(model, names)
    zeros = sum(int((w == 0).sum()) for w in weights.values())
    lines.append(f"global_sparsity {zeros / sum(w.numel() for w in weights.values()):.6f}")
    lines.append(f"reported_sparsity {callback.sparsity:.6f}")
    if torch.distributed.get_rank() == 0:  # the report runs on rank 0 alone: no collective may happen there
        summary = pruning_section(callback, root).summary
        lines.append(f"report {summary['achieved_sparsity']:.6f} {summary['nonzero_targeted_weights']} {zeros}")
    fsdp_masks = gathered_masks(callback)
    lines.append(f"masks_zero_weights {int(all(bool((weights[n][fsdp_masks[n]] == 0).all()) for n in names))}")

    # 2. the same seed and data under DDP (whole tensors, top-k): the same masks and weights
    ddp_callback = GradualPruning(target_sparsity=0.5, update_every=2, end_step=4)
    ddp_model, _ = fit(ddp_callback, "ddp", 6)
    lines.append(f"ddp_masks_equal {int(all(torch.equal(fsdp_masks[n], ddp_callback.masks[n].cpu()) for n in names))}")
    ddp_weights = dict(ddp_model.named_parameters())
    max_diff = max(float((weights[n] - ddp_weights[n].detach()).abs().max()) for n in names)
    lines.append(f"ddp_weights_max_diff {max_diff:.3g}")

    # 3. resume from the sharded checkpoint at step 2 (a directory, masks beside the model): the same end
    step2 = root / "fsdp" / "step=2.ckpt"
    lines.append(f"sharded_checkpoint {int(step2.is_dir() and (step2 / MASK_DIR / '.metadata').is_file())}")
    resumed_callback = GradualPruning(target_sparsity=0.5, update_every=2, end_step=4)
    resumed, _ = fit(resumed_callback, fsdp(), 6, root / "resumed", ckpt_path=str(step2))
    resumed_masks = gathered_masks(resumed_callback)
    lines.append(f"resume_masks_equal {int(all(torch.equal(fsdp_masks[n], resumed_masks[n]) for n in names))}")
    again = full_weights(resumed, names)
    lines.append(f"resume_weights_equal {int(all(torch.equal(weights[n], again[n]) for n in names))}")

    # 4. the consolidated checkpoint loads strictly into the plain model, with the pruned zeros; a sharded
    # checkpoint whose mask shards were cut short is not whole (resume=auto skips it)
    if torch.distributed.get_rank() == 0:
        cut = root / "cut.ckpt"
        shutil.copytree(step2, cut)
        (cut / MASK_DIR / ".metadata").unlink()
        lines.append(f"whole_check {checkpoint_problem(step2)} | {checkpoint_problem(cut)}")
        state = _load_distributed_checkpoint(root / "fsdp" / "step=6.ckpt")["state_dict"]
        plain = TinyGPT(n_layer=2, n_head=2, d_model=32, seq_len=32)
        plain.load_state_dict(state, strict=True)
        loaded = dict(plain.named_parameters())
        lines.append(f"consolidated_equal {int(all(torch.equal(loaded[n], weights[n]) for n in names))}")

    # 5. layer scope: every tensor exactly at the target; 6. 2:4 on the gathered weights
    layer = GradualPruning(target_sparsity=0.5, update_every=2, end_step=4, scope="layer")
    model, _ = fit(layer, fsdp(), 5)
    exact = all(int((w == 0).sum()) == round(0.5 * w.numel()) for w in full_weights(model, list(layer.masks)).values())
    lines.append(f"layer_exact {int(exact)}")
    nm = GradualPruning(granularity="n:m", pattern="2:4", target_sparsity=0.5, update_every=2, end_step=4)
    model, _ = fit(nm, fsdp(), 5)
    groups = [w.reshape(w.shape[0], -1, 4) for w in full_weights(model, list(nm.masks)).values()]
    lines.append(f"nm_2_4 {int(all(bool(((g == 0).sum(-1) >= 2).all()) for g in groups))}")

    # 7. a checkpoint saved as one file holds whole masks; resuming from it cuts them into shards again
    one_file = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1, save_distributed_checkpoint=False)
    fit(GradualPruning(target_sparsity=0.5, update_every=2, end_step=4), one_file, 2, root / "one_file")
    from_file = GradualPruning(target_sparsity=0.5, update_every=2, end_step=4)
    fit(from_file, fsdp(), 6, ckpt_path=str(root / "one_file" / "step=2.ckpt"))
    lines.append(
        f"one_file_resume_equal {int(all(torch.equal(fsdp_masks[n], gathered_masks(from_file)[n]) for n in names))}"
    )

    # 8. Hugging Face GPT-2 (Conv1D [in, out] sharded along its input dimension): the same masks as DDP's
    sharded_gpt2 = GradualPruning(target_sparsity=0.6, update_every=2, end_step=4)
    fit_gpt2(sharded_gpt2, fsdp())
    ddp_gpt2 = GradualPruning(target_sparsity=0.6, update_every=2, end_step=4)
    fit_gpt2(ddp_gpt2, "ddp")
    gpt2_masks = gathered_masks(sharded_gpt2)
    same = set(gpt2_masks) == set(ddp_gpt2.masks) and all(
        torch.equal(gpt2_masks[n], ddp_gpt2.masks[n]) for n in gpt2_masks
    )
    lines.append(f"gpt2_ddp_masks_equal {int(same)} {len(gpt2_masks)}")
    nm_gpt2 = GradualPruning(granularity="n:m", pattern="2:4", target_sparsity=0.5, update_every=2, end_step=4)
    fit_gpt2(nm_gpt2, fsdp())
    ok = all(bool(((m.movedim(t.output_dim, 0).reshape(m.shape[t.output_dim], -1, 4)).sum(-1) >= 2).all())
             for t in nm_gpt2.targets for m in [gathered_masks(nm_gpt2)[t.weight]])  # fmt: skip
    lines.append(f"gpt2_nm_2_4 {int(ok)} {len(nm_gpt2.targets)}")

    # 9. pruning + QAT together: the converted (rank 0) model's integers are zero where the masks prune
    pruning = GradualPruning(target_sparsity=0.75, update_every=2, end_step=4, scope="layer")
    qat = QuantizationAwareTraining("int8_dynamic_act_int4_weight", start_step=2)
    model, _ = fit([pruning, qat], fsdp(), 6)
    weights = full_weights(model, list(pruning.masks))
    if torch.distributed.get_rank() == 0:
        assert qat.quantized_model is not None
        checked = 0
        pruned_layers = [name for name in qat.layers if f"{name}.weight" in weights]  # embeddings stay dense
        for name in pruned_layers:
            pruned = weights[f"{name}.weight"] == 0
            converted = qat.quantized_model.get_submodule(name)
            ok = float(pruned.float().mean()) == 0.75 and bool((converted.integer_weight()[pruned] == 0).all())
            checked += int(ok)
        lines.append(f"pruning_qat {checked} {len(pruned_layers)}")

    # 10. channels are refused in one line, before training
    try:
        fit(GradualPruning(granularity="channels", target_sparsity=0.5, end_step=4), fsdp(), 2)
        lines.append("channels_refused none")
    except ConfigError as error:
        lines.append(f"channels_refused {error}")
    out.with_name(f"{out.name}.rank{os.environ.get('LOCAL_RANK', '0')}").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    run(parser.parse_args().out)
