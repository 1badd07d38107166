"""KnowledgeDistillation: train the LightningModule (the student) toward a frozen teacher's outputs."""

from __future__ import annotations

import copy
import hashlib
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from lightning_eff.distillation.losses import LOSSES, LossFn, OutputKey, agreement, make_loss, pick_output
from lightning_eff.loss_terms import attach_loss_terms, detach_loss_terms
from lightning_eff.report import ReportSection, parameter_count, state_dict_bytes
from lightning_eff.validation import ConfigError, check, check_number

PROJECTIONS = "lightning_eff_distillation_projections"
"""The LightningModule attribute under which `layers` projections are registered (see `KnowledgeDistillation`)."""

PRECISIONS = ("bf16",)
INITIAL = "initial"
"""``teacher="initial"``: the student as it is at `setup` (its loaded or pretrained weights), copied and frozen."""
_WIDTH_ATTRIBUTES = ("out_features", "nf", "embedding_dim", "hidden_size", "embed_dim", "out_channels")


class KnowledgeDistillation(L.Callback):
    r"""Knowledge distillation: adds ``weight * loss(student output, teacher output)`` to every training step.

    The teacher is held by this callback, not by the LightningModule, so DDP, pruning, quantization-aware
    training, checkpoints and optimizers never see it. In `setup` it is moved to the training device, frozen
    (``requires_grad=False``) and put in eval mode; it runs under ``torch.no_grad()`` on exactly the inputs the
    student's forward got in the training step (recorded with a forward hook), so ``training_step`` stays the
    user's. The term goes through `lightning_eff.loss_terms`, so it works with automatic and manual
    optimization (added to the step's first ``manual_backward``), gradient accumulation and DDP.

    Logged every step: ``distillation/loss`` (the unweighted distillation loss: the output loss plus the
    ``layers`` losses) and ``distillation/agreement`` (see `losses.agreement`). The report's ``distillation``
    section has the teacher's and student's sizes, the final loss and the last batch's agreement.

    Args:
        teacher: the teacher model; it is called like the student's forward (same args and kwargs).
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
    its weights; resuming with another teacher raises an error.

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

        self.steps = 0
        self.last_loss: Tensor | float | None = None
        self.last_agreement: Tensor | float | None = None
        self.projected: dict[str, tuple[int, int]] = {}  # student layer -> (student width, teacher width)
        self._fingerprint: dict[str, Any] | None = None
        self._recorder: _Recorder | None = None
        self._layer_outputs: dict[str, Tensor] = {}
        self._layer_handles: list[RemovableHandle] = []

    # --- setup ---------------------------------------------------------------------------------------

    @property
    def student_name(self) -> str:
        return self.student or "the LightningModule's forward"

    def teacher_fingerprint(self) -> dict[str, Any]:
        """Parameter count, a hash of names and shapes, and sums of a few parameters (rounded to bfloat16 first,
        so the teacher cast by ``teacher_precision="bf16"`` has the same fingerprint)."""
        if self._fingerprint is None:
            named = list(self.teacher.named_parameters())
            shapes = "".join(f"{name}:{tuple(p.shape)};" for name, p in named)
            picked = sorted({round(i * (len(named) - 1) / 15) for i in range(16)}) if named else []
            with torch.no_grad():
                sums = [float(named[i][1].detach().to(torch.bfloat16).double().sum()) for i in picked]
            self._fingerprint = {
                "parameters": sum(p.numel() for _, p in named),
                "shapes": hashlib.sha1(shapes.encode()).hexdigest()[:16],
                "sums": sums,
            }
        return self._fingerprint

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.teacher_spec == INITIAL and self._fingerprint is None:
            self.teacher = initial_teacher(_module_at(pl_module, self.student, "student"))
        self.teacher_fingerprint()  # before any cast
        student_parameters = {id(p) for p in pl_module.parameters()}
        check(not any(id(p) in student_parameters for p in self.teacher.parameters()), "teacher",
              type(self.teacher).__name__, "shares parameters with the LightningModule: pass a separate model "
              "(e.g. copy.deepcopy(model)), not one of its submodules")  # fmt: skip
        _module_at(pl_module, self.student, "student")
        for student_layer, teacher_layer in self.layers.items():
            _module_at(pl_module, student_layer, "layers")
            _module_at(self.teacher, teacher_layer, "layers", owner="teacher")
        self._prepare_teacher(trainer.strategy.root_device)
        if self.layers:
            self._register_projections(pl_module)
        if stage == "fit":
            attach_loss_terms(trainer)

    def _prepare_teacher(self, device: torch.device) -> None:
        dtype = torch.bfloat16 if self.teacher_precision == "bf16" else None
        self.teacher.to(device=device, dtype=dtype)
        self.teacher.requires_grad_(False)
        self.teacher.eval()

    def _register_projections(self, pl_module: L.LightningModule) -> None:
        """A learned student->teacher ``nn.Linear`` for each `layers` pair whose widths differ (see the class)."""
        projections = getattr(pl_module, PROJECTIONS, None)
        if projections is None:
            projections = nn.ModuleDict()
        for student_layer, teacher_layer in self.layers.items():
            student_width = _output_width(pl_module.get_submodule(student_layer))
            teacher_width = _output_width(self.teacher.get_submodule(teacher_layer))
            if student_width is None or teacher_width is None or student_width == teacher_width:
                continue  # equal, or unknown until the first step (checked there)
            key = _projection_key(student_layer)
            existing = projections[key] if key in projections else None  # noqa: SIM401 (ModuleDict has no get)
            shape = (student_width, teacher_width)
            if not (isinstance(existing, nn.Linear) and (existing.in_features, existing.out_features) == shape):
                projections[key] = nn.Linear(student_width, teacher_width)
            self.projected[student_layer] = (student_width, teacher_width)
        if len(projections) and getattr(pl_module, PROJECTIONS, None) is None:
            pl_module.add_module(PROJECTIONS, projections)
            rank_zero_info(
                f"KnowledgeDistillation: registered {parameter_count(projections)} projection parameters as "
                f"{PROJECTIONS} ({', '.join(f'{k}: {s}->{t}' for k, (s, t) in self.projected.items())}); "
                "KnowledgeDistillation.strip(model) removes them"
            )

    @staticmethod
    def strip(model: nn.Module) -> nn.Module:
        """Remove the `layers` projections (``lightning_eff_distillation_projections``) from `model`, in place,
        for export or inference; returns `model`."""
        if PROJECTIONS in model._modules:
            del model._modules[PROJECTIONS]
        return model

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._prepare_teacher(pl_module.device)  # the strategy has moved the module by now

    # --- recording the student's step ----------------------------------------------------------------

    @override
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._remove_hooks()
        self._recorder = _Recorder(_module_at(pl_module, self.student, "student"))
        projections = getattr(pl_module, PROJECTIONS, None)
        for student_layer in self.layers:
            module = pl_module.get_submodule(student_layer)
            key = _projection_key(student_layer)
            projection = projections[key] if projections is not None and key in projections else None
            self._layer_handles.append(module.register_forward_hook(self._layer_hook(student_layer, projection)))

    def _layer_hook(self, name: str, projection: nn.Module | None) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            picked = pick_output(output)
            if projection is not None:
                if picked.shape[-1] != self.projected[name][0]:
                    raise ValueError(
                        f"KnowledgeDistillation: layers[{name!r}]'s output has last dimension {picked.shape[-1]}, "
                        f"not the {self.projected[name][0]} its projection was built for"
                    )
                picked = projection(picked)  # inside the module's forward: DDP sees the projection used
            self._layer_outputs[name] = picked

        return hook

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
        recorder = self._recorder
        if recorder is None or recorder.last is None:
            raise RuntimeError(
                f"KnowledgeDistillation(student={self.student!r}): {self.student_name} was not called in this "
                "training step, so there is nothing to distill; set student= to the submodule that training_step "
                "calls (e.g. student='model' for self.model(...))"
            )
        args, kwargs, student_output = recorder.last
        recorder.last = None
        student = pick_output(student_output, self.output)
        teacher_layers: dict[str, Tensor] = {}
        handles = [
            self.teacher.get_submodule(name).register_forward_hook(_store(teacher_layers, name))
            for name in set(self.layers.values())
        ]
        try:
            with torch.no_grad():
                teacher_dtype = next((p.dtype for p in self.teacher.parameters()), None)
                if self.teacher_precision == "bf16" and teacher_dtype is not None:
                    args, kwargs = _cast_floats((args, kwargs), teacher_dtype)
                teacher = pick_output(self.teacher(*args, **kwargs), self.output).to(student.dtype)
        finally:
            for handle in handles:
                handle.remove()
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
        self.last_agreement = agreement(student.detach(), teacher)
        pl_module.log("distillation/loss", self.last_loss)
        pl_module.log("distillation/agreement", self.last_agreement)
        return self.weight * loss

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
        theirs, ours = state_dict["teacher_fingerprint"], self.teacher_fingerprint()
        same = (
            theirs["parameters"] == ours["parameters"]
            and theirs["shapes"] == ours["shapes"]
            and len(theirs["sums"]) == len(ours["sums"])
            and all(
                math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-4)
                for a, b in zip(theirs["sums"], ours["sums"], strict=True)
            )
        )
        if not same:
            why = "another architecture" if theirs["shapes"] != ours["shapes"] else "the same shapes, other weights"
            raise ValueError(
                f"KnowledgeDistillation: the checkpoint was distilled from another teacher ({why}: "
                f"{theirs['parameters']} parameters, fingerprint {theirs['shapes']}; this run's teacher has "
                f"{ours['parameters']}, {ours['shapes']}); resume with the same teacher"
            )
        self.steps = state_dict["steps"]
        self.last_loss = state_dict["last_loss"]
        self.last_agreement = state_dict["last_agreement"]

    # --- report --------------------------------------------------------------------------------------

    def report_section(self, trainer: L.Trainer, run_dir: Path) -> ReportSection:
        """Teacher and student sizes, the final distillation loss and the last training batch's agreement."""
        pl_module = trainer.lightning_module
        student = _module_at(pl_module, self.student, "student")
        projections = getattr(pl_module, PROJECTIONS, None)
        student_parameters, student_bytes = parameter_count(student), state_dict_bytes(student)
        if student is pl_module and isinstance(projections, nn.Module):
            student_parameters -= parameter_count(projections)
            student_bytes -= state_dict_bytes(projections)
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
            "projection_parameters": parameter_count(projections) if isinstance(projections, nn.Module) else 0,
            "steps": self.steps,
            "final_distillation_loss": _number(self.last_loss),
            "last_batch_agreement": _number(self.last_agreement),
        }
        return ReportSection(name="distillation", summary=summary)


class _Recorder:
    """Forward hooks that keep the last (args, kwargs, output) of a module's calls.

    A call through Lightning's forward redirection (DDP calls the LightningModule with training_step's
    arguments, its ``forward`` patched to run ``training_step``) is not the module's forward and is skipped:
    the pre-hook sees the patched ``forward``; the stack pairs each pre-hook with its hook for nested calls.
    """

    def __init__(self, module: nn.Module) -> None:
        self.last: tuple[tuple[Any, ...], dict[str, Any], Any] | None = None
        self._redirected: list[bool] = []
        self._handles = [
            module.register_forward_pre_hook(self._before, with_kwargs=True),
            module.register_forward_hook(self._after, with_kwargs=True),
        ]

    def _before(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        forward = module.__dict__.get("forward")
        self._redirected.append(forward is not None and "_ForwardRedirection" in getattr(forward, "__qualname__", ""))

    def _after(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        if not (self._redirected.pop() if self._redirected else False):
            self.last = (args, kwargs, output)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self.last = None


def _store(outputs: dict[str, Tensor], name: str) -> Callable[..., None]:
    def hook(module: nn.Module, args: Any, output: Any) -> None:
        outputs[name] = pick_output(output)

    return hook


def initial_teacher(student: nn.Module) -> nn.Module:
    """A frozen float copy of `student` as it is now: what ``teacher="initial"`` distils from.

    Taken in `setup`, before any optimizer step (so before pruning's first masks); layers that quantization-aware
    training already swapped in are turned back into float ones in the copy (`restore_float_modules`).
    """
    from lightning_eff.quantization import restore_float_modules  # the student's QAT layers, back to float

    teacher = restore_float_modules(copy.deepcopy(student))
    for name in [n for n, _ in teacher.named_children() if n == PROJECTIONS]:
        delattr(teacher, name)  # a resumed student's projections are not the teacher's
    return teacher


def _module_at(root: nn.Module, path: str | None, key: str, owner: str = "LightningModule") -> nn.Module:
    """The submodule at `path` (the root for None), or a `ConfigError` for `key` listing the available names."""
    if path is None:
        return root
    try:
        return root.get_submodule(path)
    except AttributeError:
        names = [name for name, _ in root.named_modules() if name and name.count(".") <= 2]
        shown = ", ".join(names[:20]) + (f", ... ({len(names) - 20} more)" if len(names) > 20 else "")
        raise ConfigError(key, path, f"names no module of the {owner}; modules: {shown}") from None


def _output_width(module: nn.Module) -> int | None:
    """The width of the module's output (its last dimension) as its structure says: the module's own
    ``out_features`` (``nf``, ``embedding_dim``, ...), else that of its last submodule that has one."""
    for candidate in [module, *reversed(list(module.modules())[1:])]:
        for attribute in _WIDTH_ATTRIBUTES:
            value = getattr(candidate, attribute, None)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
        if isinstance(candidate, nn.LayerNorm) and candidate.normalized_shape:
            return int(candidate.normalized_shape[-1])
        weight = getattr(candidate, "weight", None)
        if type(candidate).__name__.endswith("Norm") and isinstance(weight, Tensor) and weight.dim() == 1:
            return int(weight.shape[0])  # RMSNorm and friends
    return None


def _projection_key(student_layer: str) -> str:
    return student_layer.replace(".", "__")


def _check_shapes(key: str, value: str, theirs: Tensor, ours: Tensor, whose: str) -> None:
    check(theirs.shape == ours.shape, key, value,
          f"its output shape {tuple(theirs.shape)} does not match {whose} {tuple(ours.shape)}: "
          "the teacher must produce the same shape (same vocabulary / classes; for layers, a width the projection "
          "can map)")  # fmt: skip


def _cast_floats(value: Any, dtype: torch.dtype) -> Any:
    if isinstance(value, Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, tuple):
        return tuple(_cast_floats(v, dtype) for v in value)
    if isinstance(value, list):
        return [_cast_floats(v, dtype) for v in value]
    if isinstance(value, dict):
        return {k: _cast_floats(v, dtype) for k, v in value.items()}
    return value


def _number(value: Tensor | float | None) -> float | None:
    return float(value) if value is not None else None
