"""QuantizationAwareTraining: train with fake quantization, then convert to a real low-bit model."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import nn
from typing_extensions import override

from lightning_eff.distributed import destroy_process_group_at_exit
from lightning_eff.pruning.sparse_format import packed_state_bytes, save_sparse
from lightning_eff.quantization.conv import broadcast_folded_norm_statistics
from lightning_eff.quantization.convert import convert, weight_bytes
from lightning_eff.quantization.export import NotExportableError, check_exportable, save_quantized
from lightning_eff.quantization.measure import evaluate_test_set, inference_seconds
from lightning_eff.quantization.prepare import (
    FAKE_QUANTIZED,
    LayerPlan,
    plan_layers,
    set_fake_quantize,
    swap_in_fake_quantized,
)
from lightning_eff.quantization.schemes import SCHEMES
from lightning_eff.report import ReportSection, state_dict_bytes
from lightning_eff.sharding import is_sharded, unsharded_copy
from lightning_eff.validation import ConfigError, check, check_bool, check_choice, check_globs, check_int

FLOAT, FAKE_QUANT = "float", "fake_quant"


class QuantizationAwareTraining(L.Callback):
    r"""Quantization-aware training for the model's Linear layers, and conversion to integers at the end.

    In `setup` (before DDP wraps the model and optimizers are built) the chosen Linear layers become
    `FakeQuantizedLinear`\ s that hold the same Parameters, so checkpoints, optimizers and `GradualPruning`
    masks see the usual names. Until `start_step` they run in float; from then on their forward rounds
    weights (and, for dynamic schemes, activations) to the scheme's grid with straight-through gradients.
    After fit, rank 0 converts an unwrapped copy to `QuantizedLinear`\ s holding integers
    (`quantized_model`), after the last checkpoint was written; the training model stays fake-quantized, so
    ``Trainer.test(ckpt_path=...)`` and resuming work as before.

    Under FSDP2 (Lightning's `ModelParallelStrategy`, ``fully_shard`` in ``configure_model``) the swap happens
    in `setup`, which Lightning runs before ``configure_model``, so ``fully_shard`` shards the fake-quantized
    layers; their forward sees the gathered weight, so per-group scales are those of the whole row, as
    unsharded. There are no observers: activation ranges come from each batch; the one per-rank state, the running
    statistics of a BatchNorm folded into a conv, is broadcast from rank 0 before each batch, as DDP does. After
    fit every rank takes part in gathering the weights (`sharding.unsharded_copy`), and rank 0 converts,
    exports and reports from that plain CPU copy, which it keeps for the report. FSDP1 (`FSDPStrategy`) is
    refused at setup.

    Args:
        scheme: ``int8_dynamic_act_int4_weight``, ``int4_weight_only``, ``int8_weight_only`` or ``int8_dynamic``
            (see `quantization.schemes`).
        group_size: input columns per weight scale for the int4 schemes; must divide every quantized layer's
            input width.
        start_step: optimizer step at which fake quantization starts (train in float before).
        include: module-name globs of Linear (or HF Conv1D) layers to quantize; default: every one except the
            output head, whose rounding costs the most accuracy for the fewest bytes. The head is the layer whose
            output is the model's output: found with one forward of ``example_input_array`` when the module has
            one, else from the structure (`prepare.find_output_head`). A string is one glob.
        exclude: module-name globs to leave in float (a string is one glob).
        convert_on_fit_end: build `quantized_model` after fit.
        export_path: where rank 0 writes the converted model (`torch.export` format, batch and sequence
            dynamic) after fit; load it with `lightning_eff.quantization.load_quantized`, without the training
            code. Exportability is checked before training: at `setup` on ``example_input_array`` when the
            module has one, else right after the first training batch (before the second optimizer step); an
            unexportable forward raises `NotExportableError` with torch's reason.

    The fake quantizer is plain elementwise PyTorch with no graph breaks: compile the LightningModule
    (``torch.compile(model)``) to fuse it, which is where its cost nearly vanishes on a GPU.

    Example::

        trainer = L.Trainer(callbacks=[QuantizationAwareTraining("int8_dynamic_act_int4_weight", start_step=100)])
    """

    def __init__(
        self,
        scheme: str = "int8_dynamic_act_int4_weight",
        group_size: int = 32,
        start_step: int = 0,
        include: str | list[str] | None = None,
        exclude: str | list[str] | None = None,
        convert_on_fit_end: bool = True,
        export_path: str | None = None,
    ) -> None:
        check_choice("scheme", scheme, tuple(SCHEMES))
        check_int("group_size", group_size, 1)
        check_int("start_step", start_step, 0)
        check_bool("convert_on_fit_end", convert_on_fit_end)
        check(export_path is None or (isinstance(export_path, (str, os.PathLike)) and str(export_path) != ""),
              "export_path", export_path, "must be a file path or null")  # fmt: skip
        check(export_path is None or convert_on_fit_end, "export_path", export_path,
              "needs convert_on_fit_end=true: only a converted model is exported")  # fmt: skip
        self.scheme = SCHEMES[scheme]
        self.group_size = group_size
        self.start_step = start_step
        self.include = check_globs("include", include)
        self.exclude = check_globs("exclude", exclude)
        self.convert_on_fit_end = convert_on_fit_end
        self.export_path = export_path

        self.layers: list[str] = []
        self.head: str | None = None
        self.skipped_layers: dict[str, str] = {}
        self.phase = FLOAT
        self.phase_changed_at: int | None = None
        self.quantized_model: nn.Module | None = None
        self._gathered: L.LightningModule | None = None  # rank 0: a plain copy of a sharded model, for the report
        self._example: tuple[tuple[Any, ...], dict[str, Any]] | None = None
        self._sync_norms = False  # FSDP2 on several ranks: folded BatchNorm statistics come from rank 0
        self._capture: Any = None
        self._batch: Any = None
        self._batch_idx = -1
        self._float_bytes = 0
        self._export_checked = False

    # --- Lightning hooks -----------------------------------------------------------------------------

    def check_model(self, model: nn.Module) -> list[str]:
        """The layers this run quantizes; a bad include/exclude/group_size raises `ConfigError`."""
        return self.plan(model).layers

    def plan(self, model: nn.Module) -> LayerPlan:
        """The layers this run quantizes, the output head, and what is skipped and why."""
        return plan_layers(model, self.scheme, self.group_size, self.include, self.exclude, _example_of(model))

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if pl_module is self.quantized_model:
            return
        if isinstance(trainer.strategy, FSDPStrategy):
            raise ConfigError("strategy", type(trainer.strategy).__name__, FSDP1_REFUSAL)
        plan = self.plan(pl_module)
        self.layers, self.head, self.skipped_layers = plan.layers, plan.head, plan.skipped
        if plan.only_head:
            rank_zero_warn(
                f"QuantizationAwareTraining: the output head {plan.head} is the only layer this scheme can quantize "
                f"(skipped: {_reasons(plan.skipped)}); the converted model will barely be smaller"
            )
        for layer, embedding in plan.tied_to_float.items():
            rank_zero_warn(
                f"QuantizationAwareTraining: {layer} shares its weight with {embedding}, which stays float "
                "(include it to quantize both once): the converted model holds both, no longer one tensor"
            )
        swapped = all(isinstance(pl_module.get_submodule(name), FAKE_QUANTIZED) for name in plan.layers)
        if is_sharded(pl_module) and not swapped:
            raise RuntimeError(
                "QuantizationAwareTraining: the model is already sharded at setup, too late to swap in fake-quantized "
                "layers: call fully_shard in the LightningModule's configure_model (Lightning runs it after the "
                "callbacks' setup)"
            )
        self._float_bytes = state_dict_bytes(pl_module)
        swap_in_fake_quantized(pl_module, self.layers, self.scheme, self.group_size, plan.folded)
        set_fake_quantize(pl_module, self.phase == FAKE_QUANT)
        example = _example_of(pl_module)
        if stage == "fit" and example is not None:
            self._check_export(pl_module, example, "at setup, on example_input_array")
        if trainer.world_size > 1:
            destroy_process_group_at_exit()

    def _remember_input(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if len(args) >= 2 and args[0] is self._batch and args[1] == self._batch_idx:
            return  # DDP: Lightning calls the module with training_step's (batch, batch_idx) to redirect forward
        detach = lambda value: value.detach().cpu().clone() if isinstance(value, torch.Tensor) else value  # noqa: E731
        self._example = (tuple(detach(a) for a in args), {k: detach(v) for k, v in kwargs.items()})
        self._capture.remove()
        self._capture, self._batch = None, None

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # After a resume Lightning has restored global_step and this callback's phase by now.
        self._set_phase(trainer, pl_module, FAKE_QUANT if trainer.global_step >= self.start_step else FLOAT)
        self._sync_norms = trainer.world_size > 1 and is_sharded(pl_module)  # once, not on every batch

    @override
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.phase == FLOAT and trainer.global_step >= self.start_step:
            self._set_phase(trainer, pl_module, FAKE_QUANT)
        if self._sync_norms:
            broadcast_folded_norm_statistics(pl_module)  # as DDP's buffer broadcast: one rounding grid on every rank
        if self._example is None:
            # The first training batch's forward input (not the model summary's example_input_array): it times
            # inference before and after conversion and traces the export.
            self._batch, self._batch_idx = batch, batch_idx
            if self._capture is None:
                self._capture = pl_module.register_forward_pre_hook(self._remember_input, with_kwargs=True)

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._example is not None:
            self._check_export(pl_module, self._example, "after the first training batch")
        elif self.export_path is not None and not self._export_checked:
            raise RuntimeError(
                f"QuantizationAwareTraining(export_path={str(self.export_path)!r}) needs one forward call of the "
                "LightningModule to trace, and the first training batch made none (training_step calls a "
                "submodule?): call self(...) in training_step or set example_input_array"
            )

    def _check_export(
        self, pl_module: L.LightningModule, example: tuple[tuple[Any, ...], dict[str, Any]], when: str
    ) -> None:
        """With ``export_path``, export a converted copy once now, so an unexportable forward fails before training."""
        if self.export_path is None or self._export_checked:
            return
        self._export_checked = True
        try:
            check_exportable(pl_module, *example)
        except NotExportableError as error:
            raise NotExportableError(
                f"QuantizationAwareTraining(export_path={str(self.export_path)!r}), checked {when}: {error}"
            ) from error.__cause__

    @override
    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        set_fake_quantize(pl_module, self.phase == FAKE_QUANT)
        if trainer.world_size > 1 and is_sharded(pl_module):
            broadcast_folded_norm_statistics(pl_module)

    @override
    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if pl_module is not self.quantized_model:
            set_fake_quantize(pl_module, self.phase == FAKE_QUANT)

    def _set_phase(self, trainer: L.Trainer, pl_module: L.LightningModule, phase: str) -> None:
        set_fake_quantize(pl_module, phase == FAKE_QUANT)
        if phase == self.phase:
            return
        self.phase, self.phase_changed_at = phase, trainer.global_step
        rank_zero_info(f"QuantizationAwareTraining: {phase} from step {trainer.global_step} ({self.scheme.name})")
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics({"quantization/fake_quant": float(phase == FAKE_QUANT)}, step=trainer.global_step)

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # After the last checkpoint: ModelCheckpoint saves in batch/epoch/validation hooks, all before this one.
        if not self.convert_on_fit_end:
            return
        # FSDP2: every rank takes part in the gathers, one tensor at a time; only rank 0 keeps the copy.
        whole = unsharded_copy(pl_module, rank0_only=True) if is_sharded(pl_module) else pl_module
        if not trainer.is_global_zero:
            return
        assert whole is not None
        self._gathered = whole if whole is not pl_module else None
        self.quantized_model = convert(whole)
        after = state_dict_bytes(self.quantized_model)
        if self._float_bytes and after >= self._float_bytes:
            rank_zero_warn(
                f"QuantizationAwareTraining: the converted model holds {after} bytes of weights, not fewer than the "
                f"float model's {self._float_bytes} (skipped: {_reasons(self.skipped_layers)})"
            )
        if self.export_path is not None:
            example = self._example or _example_of(pl_module)
            if example is None:
                raise RuntimeError("export_path needs one forward call of the model to trace; none was seen")
            path = save_quantized(self.quantized_model.cpu(), self.export_path, *example)
            rank_zero_info(f"QuantizationAwareTraining: wrote the {self.scheme.name} model to {path}")
            state = self.quantized_model.state_dict()
            packed, dense = packed_state_bytes(state), sum(t.numel() * t.element_size() for t in state.values())
            if packed <= SPARSE_EXPORT_SHARE * dense:  # pruned: its zeros are worth a packed copy of the weights
                sparse = save_sparse(state, sparse_export_path(path))
                rank_zero_info(
                    f"QuantizationAwareTraining: the weights are sparse: also wrote {sparse} ({packed} bytes "
                    f"packed vs {dense}; load_sparse_into(convert(model), path) rebuilds them)"
                )

    # --- checkpointing -------------------------------------------------------------------------------

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "scheme": self.scheme.name,
            "group_size": self.group_size,
            "layers": list(self.layers),
            "phase": self.phase,
            "phase_changed_at": self.phase_changed_at,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict["scheme"] != self.scheme.name or state_dict["group_size"] != self.group_size:
            raise ValueError(
                f"the checkpoint was trained with scheme={state_dict['scheme']} group_size={state_dict['group_size']}, "
                f"this run uses scheme={self.scheme.name} group_size={self.group_size}"
            )
        if self.layers and list(state_dict["layers"]) != self.layers:
            raise ValueError(f"the checkpoint quantized layers {state_dict['layers']}, this run {self.layers}")
        self.phase = state_dict["phase"]
        self.phase_changed_at = state_dict["phase_changed_at"]

    # --- report --------------------------------------------------------------------------------------

    def float_model(self, pl_module: nn.Module) -> nn.Module:
        """A copy of `pl_module` running its quantized layers in float: the 'before' of the report."""
        copied = copy.deepcopy(pl_module).cpu().eval()
        set_fake_quantize(copied, False)
        return copied

    def report_section(self, trainer: L.Trainer, run_dir: Path) -> ReportSection | None:
        """Scheme, bytes, CPU inference time and the task's test metrics, before and after conversion."""
        if self.quantized_model is None:
            return None
        pl_module = self._gathered if self._gathered is not None else trainer.lightning_module
        converted = self.quantized_model.cpu()
        stored, fp32 = weight_bytes(converted)
        state = converted.state_dict()
        summary: dict[str, Any] = {
            "scheme": self.scheme.name,
            "group_size": self.scheme.weight_group_size(self.group_size),
            "quantized_layers": len(self.layers),
            "output_head": self.head,
            "skipped_layers": dict(self.skipped_layers),
            "fake_quant_from_step": self.phase_changed_at if self.phase == FAKE_QUANT else None,
            "weight_bytes_fp32": fp32,
            "weight_bytes_quantized": stored,
            "weight_size_ratio": stored / fp32,
            "model_bytes_fp32": self._float_bytes,
            "model_bytes_quantized": state_dict_bytes(converted),
            "model_bytes_packed": packed_state_bytes(state),  # pruned zeros as sparse_format stores them
        }
        if self._example is not None:
            args, kwargs = self._example
            before = inference_seconds(self.float_model(pl_module), args, kwargs)
            after = inference_seconds(converted, args, kwargs)
            summary.update(inference_ms_fp32=1e3 * before, inference_ms_quantized=1e3 * after,
                           inference_speedup=before / after)  # fmt: skip
        datamodule = getattr(trainer, "datamodule", None)
        rows: list[dict[str, Any]] = []
        if (
            isinstance(converted, L.LightningModule)
            and is_overridden("test_step", converted)
            and isinstance(datamodule, L.LightningDataModule)
            and is_overridden("test_dataloader", datamodule)
        ):
            fake = copy.deepcopy(pl_module)
            set_fake_quantize(fake, self.phase == FAKE_QUANT)
            limit = trainer.limit_test_batches if trainer.limit_test_batches is not None else 1.0
            before_metrics = evaluate_test_set(fake, datamodule, limit)
            after_metrics = evaluate_test_set(converted, datamodule, limit)
            rows = [{"metric": key, "fake_quantized": before_metrics[key], "converted": after_metrics.get(key)}
                    for key in before_metrics]  # fmt: skip
        return ReportSection(name="quantization", summary=summary, rows=rows)


FSDP1_REFUSAL = (
    "QuantizationAwareTraining does not support FSDP1 (its flat parameters hide the layers' weights from the "
    "swap and the conversion); use ModelParallelStrategy (FSDP2: fully_shard in configure_model) or DDP"
)

SPARSE_EXPORT_SHARE = 0.8
"""With ``export_path``, a packed copy of the converted weights is written too when it is at most this share."""


def sparse_export_path(path: Path) -> Path:
    """Where the packed (sparse_format) copy of an export goes: ``model.pt2`` -> ``model.sparse.pt``."""
    return path.with_suffix(".sparse.pt")


def _example_of(model: nn.Module) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
    """The module's ``example_input_array`` as forward (args, kwargs), as Lightning calls it; None without one."""
    example = getattr(model, "example_input_array", None) if isinstance(model, L.LightningModule) else None
    if example is None:
        return None
    if isinstance(example, dict):
        return (), dict(example)
    if isinstance(example, tuple):
        return example, {}
    return (example,), {}


def _reasons(skipped: dict[str, str]) -> str:
    """'3 layers: Conv2d not supported yet; 1 layer: ...', grouped by reason."""
    counts: dict[str, int] = {}
    for reason in skipped.values():
        counts[reason] = counts.get(reason, 0) + 1
    return "; ".join(f"{n} x {reason}" for reason, n in counts.items()) or "nothing"
