"""KnowledgeDistillation: train the LightningModule (the student) toward a frozen teacher's outputs."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from lightning_eff.distillation import projections
from lightning_eff.distillation.agreement import agreement, agreement_kind, agreement_totals
from lightning_eff.distillation.losses import LOSSES, LossFn, OutputKey, make_loss, pick_output
from lightning_eff.distillation.projections import PROJECTIONS, projected_output_hook, projection_key, projections_of
from lightning_eff.distillation.recording import Recorder, module_at
from lightning_eff.distillation.teacher import (
    INITIAL,
    PRECISIONS,
    check_same_teacher,
    fingerprint,
    initial_teacher,
    prepare_teacher,
    run_teacher,
)
from lightning_eff.loss_terms import attach_loss_terms, detach_loss_terms
from lightning_eff.report import ReportSection, parameter_count, state_dict_bytes
from lightning_eff.sharding import is_sharded
from lightning_eff.validation import check, check_number


class KnowledgeDistillation(L.Callback):
    r"""Knowledge distillation: adds ``weight * loss(student output, teacher output)`` to every training step.

    The teacher is held by this callback, not by the LightningModule, so DDP, FSDP2, pruning, quantization-aware
    training, checkpoints and optimizers never see it. In `setup` it is moved to the training device, frozen
    (``requires_grad=False``) and put in eval mode; it runs under ``torch.no_grad()`` on exactly the inputs the
    student's forward got in the training step (recorded with a forward hook), so ``training_step`` stays the
    user's. The term goes through `lightning_eff.loss_terms`, so it works with automatic and manual
    optimization (added to the step's first ``manual_backward``), gradient accumulation and DDP.

    FSDP2 (Lightning's `ModelParallelStrategy`, ``fully_shard`` in ``configure_model``): the student is sharded,
    the teacher is not: every rank holds the whole teacher (no gradients, no optimizer state: its weights alone,
    halved by ``teacher_precision="bf16"``). A sharded teacher is refused. ``teacher="initial"`` copies the
    student in `setup`, before ``configure_model`` shards it (a module already sharded by an earlier `fit` is
    gathered with `sharding.unsharded_copy`); `stripped_copy` exports a plain copy without the projections.

    Logged every step: ``distillation/loss`` (the unweighted distillation loss: the output loss plus the
    ``layers`` losses) and ``distillation/agreement`` (`agreement.agreement`: the share of equal argmaxes for
    ``loss="kl"``, the mean cosine similarity for every other loss). During `Trainer.test` the teacher also runs
    on every test batch the student's forward sees: the report's ``distillation`` section has the test set's
    agreement (over all ranks), beside the teacher's and student's sizes and the final loss.

    Args:
        teacher: the teacher model, called like the student's forward (same args and kwargs); or ``"initial"``:
            a frozen float copy of the student as it is when `setup` runs (its pretrained or loaded weights).
        loss: ``kl`` (Hinton et al., softened by `temperature`, scaled by T\ :sup:`2`), ``mse``, ``cosine``
            (``1 - cosine similarity``), or a callable ``loss(student, teacher) -> Tensor``.
        temperature: the softmax temperature of ``kl`` (> 0).
        weight: the factor of the distillation loss in the training loss (>= 0). The module's own loss is
            left as it is: for distillation alone, return a zero loss (``loss * 0``) from ``training_step``.
        student: attribute path of the submodule whose forward is distilled (``"model"`` for a module that
            calls ``self.model(...)`` in ``training_step``); default: the LightningModule's own forward.
        output: which tensor of the outputs to compare: None (`losses.pick_output`: a tensor, a tuple's first,
            ``logits`` then ``last_hidden_state``), a dict key / attribute name, a tuple position, or a callable.
        layers: ``{student_module: teacher_module}`` for intermediate-layer distillation: the (picked) outputs
            of each pair are compared with ``mse``, added to the output loss. When the widths (last dimension)
            differ, a learned ``nn.Linear`` maps the student's to the teacher's: the projections are registered
            in `setup` as the LightningModule's submodule ``lightning_eff_distillation_projections`` (a
            ``ModuleDict``), before ``configure_optimizers`` runs, so ``self.parameters()`` trains them, DDP
            syncs them and checkpoints hold them. Callbacks set up after this one (later in ``callbacks``) see
            them too: list `GradualPruning` / `QuantizationAwareTraining` before this callback, or exclude
            ``lightning_eff_distillation_projections.*``. `strip` removes them for export. Widths are read from
            the modules (``out_features``, HF ``Conv1D``'s ``nf``, ..., else the last such submodule's) and
            checked at the first step.
        teacher_precision: None (as given) or ``bf16``: the teacher is cast to bfloat16 (floating-point inputs
            too); its outputs are cast back to the student's dtype.

    Resume: the checkpoint stores a fingerprint of the teacher (parameter names, shapes and a few sums), not
    its weights; resuming with another teacher raises an error. Under FSDP2 this state is in rank 0's
    ``meta.pt`` of the sharded checkpoint directory, as every callback's is.

    Example::

        teacher = AutoModelForCausalLM.from_pretrained("gpt2-medium")
        trainer = L.Trainer(callbacks=[KnowledgeDistillation(teacher, loss="kl", temperature=2.0, student="model")])
    """

    def __init__(
        self,
        teacher: nn.Module | str,
        loss: str | LossFn = "kl",
        temperature: float = 2.0,
        weight: float = 0.5,
        student: str | None = None,
        output: OutputKey = None,
        layers: Mapping[str, str] | None = None,
        teacher_precision: str | None = None,
    ) -> None:
        check(isinstance(teacher, nn.Module) or teacher == INITIAL, "teacher",
              teacher if isinstance(teacher, str) else type(teacher).__name__,
              f"must be a torch.nn.Module, or '{INITIAL}' (the student as it is when training starts)")  # fmt: skip
        check(callable(loss) or loss in LOSSES, "loss", loss, f"must be one of {', '.join(LOSSES)} or a callable")
        check_number("temperature", temperature, "must be > 0", lambda v: v > 0 and math.isfinite(v))
        check_number("weight", weight, "must be >= 0", lambda v: v >= 0 and math.isfinite(v))
        check(student is None or (isinstance(student, str) and student != ""), "student", student,
              "must be a submodule's attribute path (e.g. model), or null for the module's forward")  # fmt: skip
        check(output is None or isinstance(output, (str, int)) or callable(output), "output", output,
              "must be null, an output key, a tuple position or a callable")  # fmt: skip
        if layers is not None:
            check(isinstance(layers, Mapping) and len(layers) > 0, "layers", layers,
                  "must be a non-empty mapping {student_module: teacher_module}")  # fmt: skip
            for key, value in layers.items():
                check(isinstance(key, str) and key != "" and isinstance(value, str) and value != "", "layers",
                      f"{key}:{value}", "each entry must map a student module path to a teacher one")  # fmt: skip
        check(teacher_precision is None or teacher_precision in PRECISIONS, "teacher_precision", teacher_precision,
              f"must be null or one of {', '.join(PRECISIONS)}")  # fmt: skip
        self.teacher_spec = teacher if isinstance(teacher, str) else None
        self.teacher: nn.Module = teacher if isinstance(teacher, nn.Module) else nn.Identity()  # set in setup
        self.loss = loss
        self.temperature = float(temperature)
        self.weight = float(weight)
        self.student = student
        self.output = output
        self.layers = dict(layers or {})
        self.teacher_precision = teacher_precision
        self.loss_fn = make_loss(loss, self.temperature)
        self.agreement_kind = agreement_kind(loss)

        self.steps = 0
        self.last_loss: Tensor | float | None = None
        self.last_agreement: Tensor | float | None = None
        self.test_agreement: float | None = None
        self.projected: dict[str, tuple[int, int]] = {}  # student layer -> (student width, teacher width)
        self._fingerprint: dict[str, Any] | None = None
        self._recorder: Recorder | None = None
        self._layer_outputs: dict[str, Tensor] = {}
        self._layer_handles: list[RemovableHandle] = []
        self._test_totals: Tensor | None = None  # [agreement sum, positions] of this rank's test batches

    # --- setup ---------------------------------------------------------------------------------------

    @property
    def student_name(self) -> str:
        return self.student or "the LightningModule's forward"

    def teacher_fingerprint(self) -> dict[str, Any]:
        """The teacher's `teacher.fingerprint`, taken once (before any cast)."""
        if self._fingerprint is None:
            self._fingerprint = fingerprint(self.teacher)
        return self._fingerprint

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.teacher_spec == INITIAL and self._fingerprint is None:
            self.teacher = initial_teacher(module_at(pl_module, self.student, "student"), drop=[PROJECTIONS])
        check(not is_sharded(self.teacher), "teacher", type(self.teacher).__name__,
              "is sharded (DTensor parameters): pass an unsharded teacher; under FSDP2 every rank keeps a whole "
              "copy of it")  # fmt: skip
        self.teacher_fingerprint()  # before any cast
        student_parameters = {id(p) for p in pl_module.parameters()}
        check(not any(id(p) in student_parameters for p in self.teacher.parameters()), "teacher",
              type(self.teacher).__name__, "shares parameters with the LightningModule: pass a separate model "
              "(e.g. copy.deepcopy(model)), not one of its submodules")  # fmt: skip
        module_at(pl_module, self.student, "student")
        for student_layer, teacher_layer in self.layers.items():
            module_at(pl_module, student_layer, "layers")
            module_at(self.teacher, teacher_layer, "layers", owner="teacher")
        prepare_teacher(self.teacher, trainer.strategy.root_device, self.teacher_precision)
        if self.layers:
            self._register_projections(pl_module)
        if stage == "fit":
            attach_loss_terms(trainer)

    def _register_projections(self, pl_module: L.LightningModule) -> None:
        """A learned student->teacher ``nn.Linear`` for each `layers` pair whose widths differ (see the class)."""
        built, self.projected = projections.build_projections(pl_module, self.teacher, self.layers)
        if len(built) and projections_of(pl_module) is None:
            pl_module.add_module(PROJECTIONS, built)
            rank_zero_info(
                f"KnowledgeDistillation: registered {parameter_count(built)} projection parameters as "
                f"{PROJECTIONS} ({', '.join(f'{k}: {s}->{t}' for k, (s, t) in self.projected.items())}); "
                "KnowledgeDistillation.strip(model) removes them"
            )

    @staticmethod
    def strip(model: nn.Module) -> nn.Module:
        """Remove the `layers` projections (``lightning_eff_distillation_projections``) from `model`, in place,
        for export or inference; returns `model`. For a model FSDP2 still shards, use `stripped_copy`."""
        return projections.strip(model)

    @staticmethod
    def stripped_copy(model: nn.Module) -> nn.Module:
        """A plain copy of `model` without the projections, for export; under FSDP2 gathered with
        `sharding.unsharded_copy` (a collective: call it on every rank)."""
        return projections.stripped_copy(model)

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        prepare_teacher(self.teacher, pl_module.device, self.teacher_precision)  # the strategy has moved the module

    # --- recording the student's step ----------------------------------------------------------------

    @override
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._remove_hooks()
        self._recorder = Recorder(module_at(pl_module, self.student, "student"))
        found = projections_of(pl_module)
        for student_layer in self.layers:
            module = pl_module.get_submodule(student_layer)
            key = projection_key(student_layer)
            projection = found[key] if found is not None and key in found else None
            width = self.projected[student_layer][0] if student_layer in self.projected else None
            hook = projected_output_hook(student_layer, self._layer_outputs, projection, width)
            self._layer_handles.append(module.register_forward_hook(hook))

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._remove_hooks()

    def _remove_hooks(self) -> None:
        if self._recorder is not None:
            self._recorder.remove()
            self._recorder = None
        for handle in self._layer_handles:
            handle.remove()
        self._layer_handles, self._layer_outputs = [], {}

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._remove_hooks()
        detach_loss_terms(trainer)

    # --- the loss term -------------------------------------------------------------------------------

    def loss_term(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> Tensor:
        call = self._recorder.take() if self._recorder is not None else None
        if call is None:
            raise RuntimeError(
                f"KnowledgeDistillation(student={self.student!r}): {self.student_name} was not called in this "
                "training step, so there is nothing to distill; set student= to the submodule that training_step "
                "calls (e.g. student='model' for self.model(...))"
            )
        args, kwargs, student_output = call
        student = pick_output(student_output, self.output)
        teacher, teacher_layers = run_teacher(
            self.teacher, args, kwargs, self.output, self.teacher_precision, self.layers.values()
        )
        teacher = teacher.to(student.dtype)
        _check_shapes("teacher", type(self.teacher).__name__, teacher, student, f"the student's ({self.student_name})")
        loss = self.loss_fn(student, teacher)
        if self.layers:
            layer_loss = torch.zeros((), device=loss.device)
            for student_layer, teacher_layer in self.layers.items():
                if student_layer not in self._layer_outputs:
                    raise RuntimeError(
                        f"KnowledgeDistillation: layers[{student_layer!r}] was not called in this training step"
                    )
                ours = self._layer_outputs.pop(student_layer)
                theirs = teacher_layers[teacher_layer].to(ours.dtype)
                _check_shapes("layers", f"{student_layer}:{teacher_layer}", theirs, ours, "the student layer's")
                layer_loss = layer_loss + nn.functional.mse_loss(ours.float(), theirs.float())
            pl_module.log("distillation/layer_loss", layer_loss.detach())
            loss = loss + layer_loss
        self.steps += 1
        self.last_loss = loss.detach()
        self.last_agreement = agreement(student.detach(), teacher, self.agreement_kind)
        pl_module.log("distillation/loss", self.last_loss)
        pl_module.log("distillation/agreement", self.last_agreement)
        return self.weight * loss

    # --- agreement on the test set -------------------------------------------------------------------

    @override
    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._test_totals = torch.zeros(2, dtype=torch.float64, device=pl_module.device)

    @override
    def on_test_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._remove_hooks()
        self._recorder = Recorder(module_at(pl_module, self.student, "student"))

    @override
    def on_test_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        call = self._recorder.take() if self._recorder is not None else None
        self._remove_hooks()
        if call is None or self._test_totals is None:
            return  # test_step did not call the student's forward
        args, kwargs, student_output = call
        student = pick_output(student_output, self.output).detach()
        teacher, _ = run_teacher(self.teacher, args, kwargs, self.output, self.teacher_precision)
        self._test_totals += agreement_totals(student, teacher.to(student.dtype), self.agreement_kind)

    @override
    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._test_totals is None:
            return
        totals = trainer.strategy.reduce(self._test_totals, reduce_op="sum")  # every rank's batches
        self.test_agreement = float(totals[0] / totals[1]) if float(totals[1]) > 0 else None
        self._test_totals = None

    # --- checkpointing -------------------------------------------------------------------------------

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "teacher_fingerprint": self.teacher_fingerprint(),
            "loss": self.loss if isinstance(self.loss, str) else getattr(self.loss, "__name__", "callable"),
            "temperature": self.temperature,
            "weight": self.weight,
            "steps": self.steps,
            "last_loss": _number(self.last_loss),
            "last_agreement": _number(self.last_agreement),
            "projected": {k: list(v) for k, v in self.projected.items()},
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        check_same_teacher(state_dict["teacher_fingerprint"], self.teacher_fingerprint())
        self.steps = state_dict["steps"]
        self.last_loss = state_dict["last_loss"]
        self.last_agreement = state_dict["last_agreement"]

    # --- report --------------------------------------------------------------------------------------

    def report_section(self, trainer: L.Trainer, run_dir: Path) -> ReportSection:
        """Teacher and student sizes, the final distillation loss, the last training batch's agreement and the
        test set's (None when no test ran)."""
        pl_module = trainer.lightning_module
        student = module_at(pl_module, self.student, "student")
        found = projections_of(pl_module)
        student_parameters, student_bytes = parameter_count(student), state_dict_bytes(student)
        if student is pl_module and found is not None:
            student_parameters -= parameter_count(found)
            student_bytes -= state_dict_bytes(found)
        summary: dict[str, Any] = {
            "loss": self.loss if isinstance(self.loss, str) else "callable",
            "temperature": self.temperature,
            "weight": self.weight,
            "student": self.student_name,
            "teacher_parameters": parameter_count(self.teacher),
            "teacher_bytes": state_dict_bytes(self.teacher),
            "teacher_precision": self.teacher_precision or str(next(self.teacher.parameters(), torch.empty(0)).dtype),
            "student_parameters": student_parameters,
            "student_bytes": student_bytes,
            "compression": parameter_count(self.teacher) / max(student_parameters, 1),
            "projection_parameters": parameter_count(found) if found is not None else 0,
            "steps": self.steps,
            "final_distillation_loss": _number(self.last_loss),
            "agreement": self.agreement_kind,
            "last_batch_agreement": _number(self.last_agreement),
            "test_agreement": self.test_agreement,
        }
        return ReportSection(name="distillation", summary=summary)


def _check_shapes(key: str, value: str, theirs: Tensor, ours: Tensor, whose: str) -> None:
    check(theirs.shape == ours.shape, key, value,
          f"its output shape {tuple(theirs.shape)} does not match {whose} {tuple(ours.shape)}: "
          "the teacher must produce the same shape (same vocabulary / classes; for layers, a width the projection "
          "can map)")  # fmt: skip


def _number(value: Tensor | float | None) -> float | None:
    return float(value) if value is not None else None
