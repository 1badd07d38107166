"""GradualPruning: sparsity that grows on a schedule during training, with masks that survive resume and DDP."""

from __future__ import annotations

import weakref
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from lightning_eff.distributed import destroy_process_group_at_exit
from lightning_eff.pruning.export import shrink_with_groups
from lightning_eff.pruning.group_plan import GroupPlan, InputCapture, check_selection, discover
from lightning_eff.pruning.layers import prunable_kind
from lightning_eff.pruning.masks import GRANULARITIES, LOCAL, SCOPES, MaskApplier, Masks, compute_masks, parse_pattern
from lightning_eff.pruning.report import pruning_section
from lightning_eff.pruning.schedule import SCHEDULES, SparsitySchedule
from lightning_eff.pruning.sharded import (
    MASK_DIR,
    attach_mask_saving,
    check_nm_shards,
    count_zeros,
    full_masks,
    load_mask_shards,
    save_mask_shards,
    shard_full_masks,
    shard_group,
)
from lightning_eff.pruning.sharded_select import ShardedSelector
from lightning_eff.pruning.structured_shrink import LayerShrink, ShrinkError
from lightning_eff.pruning.targets import PruningTarget, check_no_opt_in_layer, select
from lightning_eff.report import ReportSection
from lightning_eff.sharding import local_shard, reshard
from lightning_eff.validation import (
    ConfigError,
    check,
    check_bool,
    check_choice,
    check_globs,
    check_int,
    check_number,
    match_globs,
)


class GradualPruning(L.Callback):
    r"""Prunes the model's Linear and Conv weights gradually, by optimizer step, to `target_sparsity`.

    Masks are recomputed whenever the schedule's sparsity changes (every `update_every` steps between
    `start_step` and `end_step`) and applied in place after every optimizer step. There are no forward
    hooks and no `weight_orig`, so training costs no extra forward work and a pruned checkpoint loads
    strictly into the plain model. Masks are broadcast from rank 0 under DDP and saved in the checkpoint,
    so a resumed run continues the schedule from its step with the same masks.

    Layers: every kind in the registry of `lightning_eff.pruning.layers` (Linear, Conv1d/2d/3d,
    MultiheadAttention's packed ``in_proj_weight``, Hugging Face's transposed ``Conv1D``;
    `register_prunable` adds others). A tied weight (GPT-2's ``lm_head`` and ``wte``) is pruned once, with
    one mask under its canonical name and the other names as aliases; a layer tied to an embedding is left
    dense unless `include` names it (pruning it prunes the embedding). `left_dense` says which and why.

    Several fits: a callback used for another ``fit`` of the same model *continues*. It keeps its masks and
    goes on applying them, and builds the schedule for the new run (``end_step=None``: 75% of that run's
    optimizer steps) starting from the sparsity already reached, so a second fit after reaching the target
    stays at the target, and one after a run that stopped early resumes pruning toward it. Given another
    model, it starts over. A run that resumes from a checkpoint follows the checkpoint's schedule instead.

    A run that ends before `end_step` (``max_steps``, EarlyStopping, an `end_step` past the run's steps) does
    not reach `target_sparsity`: that is warned when the schedule is built, if `end_step` lies beyond the
    planned steps (``trainer.estimated_stepping_batches``), and again at the end of fit with the achieved and
    target sparsity; the report has ``end_step``, ``planned_steps`` and ``reached_target``.

    Args:
        target_sparsity: share of the targeted weights that are zero at `end_step`, in [0, 1).
        initial_sparsity: sparsity at `start_step`.
        start_step: optimizer step at which pruning starts.
        end_step: step at which `target_sparsity` is reached; None for 75% of the run's optimizer steps.
        update_every: steps between mask updates.
        schedule: ``cubic`` (Zhu & Gupta), ``linear``, ``exponential`` or ``one_shot``.
        granularity: ``unstructured``, ``n:m`` (with `pattern`, e.g. ``"2:4"``: N zeros in every M input weights)
            or ``channels``: the coupled channel groups of the model's graph (`group_plan`), every member masked
            so `shrink` is exact; sparsity is the share of each group's units pruned (global scope: ranked across
            groups after dividing each group's scores by their mean).
        pattern: the N:M pattern for ``n:m``; `target_sparsity` must then be at least N/M.
        scope: ``global`` (one threshold over all targeted weights) or ``layer`` (each tensor reaches the
            schedule's sparsity).
        include: module-name globs of layers to prune (default: all Linear/Conv, see `select_targets`); a
            string is one glob. For ``channels`` a group is selected when one of its producer layers matches
            and none matches `exclude`.
        exclude: module-name globs of layers to leave dense, e.g. ``["head"]``; a string is one glob.
        make_permanent: at the end of fit, stop masking (the zeros stay in the weights, so the model is a
            plain model); the callback keeps the masks, and a later fit with it applies them again. With
            False, masking stays on after fit (nothing trains between fits, so the two differ only in
            `state_dict`'s ``active``).

    Example::

        trainer = L.Trainer(callbacks=[GradualPruning(target_sparsity=0.9, update_every=50)])
    """

    def __init__(
        self,
        target_sparsity: float = 0.9,
        initial_sparsity: float = 0.0,
        start_step: int = 0,
        end_step: int | None = None,
        update_every: int = 100,
        schedule: str = "cubic",
        granularity: str = "unstructured",
        pattern: str | None = None,
        scope: str = "global",
        include: str | list[str] | None = None,
        exclude: str | list[str] | None = None,
        make_permanent: bool = True,
    ) -> None:
        check_number("target_sparsity", target_sparsity, "must be in [0, 1)", lambda v: 0 <= v < 1)
        check_number("initial_sparsity", initial_sparsity, f"must be in [0, target_sparsity={target_sparsity}]",
                     lambda v: 0 <= v <= target_sparsity)  # fmt: skip
        check_int("start_step", start_step, 0)
        if end_step is not None:
            check_int("end_step", end_step, 1)
            check(end_step > start_step, "end_step", end_step, f"must be > start_step={start_step}")
        check_int("update_every", update_every, 1)
        check_choice("schedule", schedule, SCHEDULES)
        check_choice("granularity", granularity, GRANULARITIES)
        check_choice("scope", scope, SCOPES)
        self.pattern: tuple[int, int] | None = None
        if granularity == "n:m":
            check(pattern is not None, "pattern", pattern, "is required for granularity=n:m, e.g. 2:4")
            try:
                self.pattern = parse_pattern(str(pattern))
            except ValueError as error:
                raise ConfigError("pattern", pattern, str(error).split(": ", 1)[1]) from None
            n, m = self.pattern
            check(target_sparsity >= n / m, "target_sparsity", target_sparsity,
                  f"must be >= {n / m:g} (N/M) for pattern {pattern}")  # fmt: skip
        else:
            check(pattern is None, "pattern", pattern, "is only used with granularity=n:m")
        self.target_sparsity = target_sparsity
        self.initial_sparsity = initial_sparsity
        self.start_step = start_step
        self.end_step = end_step
        self.update_every = update_every
        self.schedule_kind = schedule
        self.granularity = granularity
        self.scope = scope
        self.include = check_globs("include", include)
        self.exclude = check_globs("exclude", exclude)
        check_bool("make_permanent", make_permanent)
        self.make_permanent = make_permanent

        self.targets: list[PruningTarget] = []
        self.left_dense: dict[str, str] = {}
        self.masks: Masks = {}
        self.history: list[dict[str, float]] = []
        self._schedule: SparsitySchedule | None = None
        self._mask_sparsity = 0.0
        self._last_step = -1
        self._parameters: dict[str, torch.Tensor] = {}
        # FSDP2: the parameters are DTensors; masks and the applier work on `_local` (this rank's shards), and
        # zeros are counted with a collective at each mask update and at the end of fit (`_zeros`).
        self._local: dict[str, torch.Tensor] = {}
        self._group: torch.distributed.ProcessGroup | None = None
        self._sharded = False
        self._zeros: dict[str, int] = {}
        self._sharded_save = False
        self._mask_dir: str | None = None  # a restored sharded checkpoint's mask directory, read at train start
        self._apply = MaskApplier({}, {})
        self._active = True
        # Lifecycle: where this fit's schedule starts (step and sparsity carried from an earlier fit), how many
        # optimizer steps the run planned, whether a checkpoint was restored, and which model the masks are for.
        self._run_start = 0
        self._carried = 0.0
        self._planned_steps: int | None = None
        self._restored = False
        self._model: weakref.ref[L.LightningModule] | None = None
        self.plan: GroupPlan | None = None  # granularity="channels": the groups, found at the first training step
        self._capture: InputCapture | None = None
        self.shrink_summary: dict[str, LayerShrink] = {}

    def __getstate__(self) -> dict[str, Any]:
        # A weak reference does not pickle (ddp_spawn pickles the trainer's callbacks); a copy forgets the model.
        return {**self.__dict__, "_model": None, "_capture": None}

    # --- what a user reads ---------------------------------------------------------------------------

    @property
    def layer_sparsity(self) -> dict[str, float]:
        """Achieved sparsity of each targeted weight, by parameter name (measured zeros, not masks).

        Under FSDP2, as measured at the last mask update or the end of fit (counting is a collective there).
        """
        return {name: zeros / self._parameters[name].numel() for name, zeros in self.zero_counts().items()}

    def zero_counts(self) -> dict[str, int]:
        """Exact zeros of each targeted weight (under FSDP2: at the last mask update or the end of fit)."""
        if self._sharded:
            return dict(self._zeros)
        return {t.weight: int((self._parameters[t.weight] == 0).sum()) for t in self._live_targets()}

    def _count_sharded_zeros(self) -> None:
        if self._sharded:
            self._zeros = count_zeros({t.weight: self._local[t.weight] for t in self._live_targets()}, self._group)

    @property
    def sparsity(self) -> float:
        """Achieved sparsity over all targeted weights now (exact zeros counted in the weights)."""
        return self._overall(self.layer_sparsity)

    def _overall(self, layer_sparsity: dict[str, float]) -> float:
        sizes = {name: self._parameters[name].numel() for name in layer_sparsity}
        total = sum(sizes.values())
        return sum(layer_sparsity[name] * sizes[name] for name in sizes) / total if total else 0.0

    @property
    def schedule(self) -> SparsitySchedule:
        if self._schedule is None:
            raise RuntimeError("the schedule is known once training starts (end_step may depend on the run's length)")
        return self._schedule

    def _live_targets(self) -> list[PruningTarget]:
        return [t for t in self.targets if t.weight in self._parameters]

    # --- Lightning hooks -----------------------------------------------------------------------------

    @property
    def reached_target(self) -> bool:
        """Whether the masks were last computed at `target_sparsity` (the schedule got to its end)."""
        return self._mask_sparsity >= self.target_sparsity - 1e-9

    def check_model(self, model: torch.nn.Module) -> list[PruningTarget]:
        """Resolve include/exclude against `model`; a pattern that matches nothing raises `ConfigError`."""
        if self.granularity == "channels":  # groups come from the graph, traced at the first training step
            layers = [name for name, module in model.named_modules() if prunable_kind(module) is not None]
            for key, patterns in (("include", self.include), ("exclude", self.exclude)):
                if patterns:
                    check_no_opt_in_layer(model, key, patterns)
                    match_globs(layers, patterns, key, "prunable layer")
            if isinstance(model, L.LightningModule):
                check_selection(model, self.include, self.exclude)  # now, where example_input_array allows
            return []
        group_size = self.pattern[1] if self.pattern else None
        selection = select(model, self.granularity, self.include, self.exclude, group_size)
        self.left_dense = selection.left_dense
        return selection.targets

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Before DDP wraps the model and optimizers are built: only names are resolved here, nothing is swapped.
        if isinstance(trainer.strategy, FSDPStrategy):
            raise ConfigError("strategy", "fsdp", "GradualPruning needs FSDP2 (ModelParallelStrategy): FSDP1 flattens "
                              "the weights it masks")  # fmt: skip
        if isinstance(trainer.strategy, ModelParallelStrategy) and self.granularity == "channels":
            raise ConfigError("granularity", "channels", "is not available under FSDP2 (ModelParallelStrategy): "
                              "a channel group spans rows and columns of sharded weights; use unstructured or "
                              "n:m")  # fmt: skip
        if stage == "fit" or not self.targets:
            self.targets = self.check_model(pl_module)
            reasons: dict[str, list[str]] = {}
            for layer, why in self.left_dense.items():
                reasons.setdefault(why, []).append(layer)
            for why, layers in reasons.items():
                rank_zero_info(f"GradualPruning: left dense: {', '.join(layers)}: {why}")
        if trainer.world_size > 1:
            destroy_process_group_at_exit()
        self._parameters = self._target_parameters(pl_module)

    def _target_parameters(self, pl_module: L.LightningModule) -> dict[str, torch.Tensor]:
        """The targeted parameters; also sets the local shards and the shard group (FSDP2 after configure_model)."""
        reshard(pl_module)  # FSDP2: after the model summary's forward the root unit's weights are still gathered
        # remove_duplicate=False: a tied weight's canonical name may be one that named_parameters() would drop
        parameters: dict[str, torch.Tensor] = dict(pl_module.named_parameters(remove_duplicate=False))
        if self.granularity != "channels":
            names = [name for t in self.targets for name in (t.weight, *t.coupled)]
            parameters = {name: parameters[name] for name in names}
        self._group = shard_group(parameters)
        self._sharded = self._group is not None
        self._local = {name: local_shard(parameter) for name, parameter in parameters.items()}
        return parameters

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Not on_fit_start: Lightning restores global_step from a checkpoint only after on_fit_start.
        self._parameters = self._target_parameters(pl_module)
        self._start_run(trainer, pl_module)
        self._schedule = self._build_schedule(trainer)
        self._active = True
        self._last_step = trainer.global_step
        masks = self._sharded_setup(trainer) if self._sharded else self.masks
        device = next(iter(self._local.values())).device
        self._set_masks({name: mask.to(device) for name, mask in masks.items()})
        self._apply()  # a resumed or continued run goes on with the masks it has
        if self.granularity == "channels" and self.plan is None:
            self._capture = InputCapture(pl_module)
        self._update(trainer)

    def _sharded_setup(self, trainer: L.Trainer) -> Masks:
        """FSDP2: this rank's mask shards (from a sharded or a one-file checkpoint), and saving them beside it."""
        if self.pattern is not None:
            check_nm_shards(self._parameters, {t.weight: t.layout for t in self.targets}, self.pattern[1])
        masks = self.masks
        if self._mask_dir is not None:
            masks = load_mask_shards(Path(str(trainer.ckpt_path)) / self._mask_dir, list(masks), self._parameters)
            self._mask_dir = None
        elif any(mask.shape != self._local[name].shape for name, mask in masks.items()):
            masks = shard_full_masks(masks, self._parameters)  # from a checkpoint saved as one file
        self._sharded_save = bool(getattr(trainer.strategy, "_save_distributed_checkpoint", False))
        if self._sharded_save:
            attach_mask_saving(trainer.strategy, lambda directory: save_mask_shards(directory, self.masks,
                                                                                  self._parameters))  # fmt: skip
        return masks

    def _start_run(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Decide what this fit continues: a checkpoint, an earlier fit of the same model, or nothing."""
        same_model = self._model is not None and self._model() is pl_module
        self._model = weakref.ref(pl_module)
        if self._restored:  # load_state_dict ran (Lightning's resume calls it after setup): follow the checkpoint
            self._restored = False
            return
        self._run_start = trainer.global_step
        if self.masks and same_model and (set(self.masks) == set(self._parameters) or self.plan is not None):
            self._carried = self._mask_sparsity
            rank_zero_info(
                f"GradualPruning: continuing from sparsity {self._carried:.4g} with the previous fit's masks; "
                "this run's schedule starts there"
            )
            return
        if self.masks:
            rank_zero_info("GradualPruning: another model (or other targets) than the previous fit's: starting over")
        self.masks, self._mask_sparsity, self._carried, self.history = {}, 0.0, 0.0, []
        self.plan = None

    def _build_schedule(self, trainer: L.Trainer) -> SparsitySchedule:
        total = trainer.estimated_stepping_batches
        last_step = int(total) if 0 < total < float("inf") else None
        self._planned_steps = None if last_step is None else last_step - self._run_start
        end_step = self.end_step
        if end_step is None:
            if self._planned_steps is None:
                raise ConfigError("end_step", None, "must be set when the run has no max_steps or max_epochs")
            end_step = max(self.start_step + 1, self._run_start + int(0.75 * self._planned_steps))
            rank_zero_info(
                f"GradualPruning: end_step=None -> {end_step} (75% of {self._planned_steps} optimizer steps)"
            )
        schedule = SparsitySchedule(
            target_sparsity=self.target_sparsity,
            initial_sparsity=min(max(self.initial_sparsity, self._carried), self.target_sparsity),
            start_step=self.start_step,
            end_step=end_step,
            update_every=self.update_every,
            kind=self.schedule_kind,
        )
        reaches_at = schedule.start_step if schedule.kind == "one_shot" else schedule.end_step
        if last_step is not None and reaches_at > last_step and not self.reached_target:
            ends_at = max(self._mask_sparsity, schedule.sparsity_at(last_step))
            rank_zero_warn(
                f"GradualPruning: end_step={reaches_at} is past this run's last optimizer step ({last_step}): "
                f"it will end at sparsity {ends_at:.4g}, not target_sparsity={self.target_sparsity:g}. Set "
                "end_step <= the run's steps or train longer (another fit with this callback continues)."
            )
        return schedule

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._capture is not None:  # channels: find the groups once, before the first mask update
            self._capture.remove()
            self.plan = discover(trainer, pl_module, self._capture.call, self.include, self.exclude)
            self._capture = None
            self.targets = self.plan.targets(dict(pl_module.named_parameters(remove_duplicate=False)))
        if trainer.global_step == self._last_step or not self._active:
            return  # accumulating gradients: no optimizer step happened
        self._last_step = trainer.global_step
        self._update(trainer)
        self._apply()

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._capture is not None:  # no training step ran
            self._capture.remove()
            self._capture = None
        self._apply()
        self._count_sharded_zeros()
        if self.make_permanent:
            self._active = False
            self._apply = MaskApplier({}, {})  # masking stops; the masks are kept for a later fit
        if self._schedule is not None and not self.reached_target:
            rank_zero_warn(
                f"GradualPruning: training ended at step {trainer.global_step}, before the schedule reached "
                f"target_sparsity={self.target_sparsity:g} at step {self._schedule.end_step}: sparsity "
                f"{self.sparsity:.4g} (scheduled {self._mask_sparsity:.4g}). Another fit with this callback "
                "continues from these masks."
            )

    def _set_masks(self, masks: Masks) -> None:
        self.masks = masks
        self._apply = MaskApplier(self._local, masks)

    def _update(self, trainer: L.Trainer) -> None:
        """Recompute the masks when the schedule's sparsity has changed since they were computed."""
        # Masks only grow: before start_step a continued fit's schedule says 0, and a run resumed with more steps
        # than the checkpoint's run planned has a later end_step, so a lower sparsity at the same step.
        target = self.schedule.sparsity_at(trainer.global_step)
        if target <= self._mask_sparsity or (self.granularity == "channels" and self.plan is None):
            return
        if self.plan is not None:
            masks = self.plan.masks(trainer.lightning_module, target, self.scope)
        else:
            weights = {t.weight: self._local[t.weight] for t in self.targets}
            layouts = {t.weight: t.layout for t in self.targets}
            selector = ShardedSelector(self._group) if self._sharded else LOCAL
            masks = compute_masks(weights, target, self.granularity, self.scope, self.pattern, layouts, selector)
            for t in self.targets:  # a pruned channel takes its bias (and following BatchNorm) entries with it
                masks.update({name: masks[t.weight].movedim(t.output_dim, 0).reshape(-1) for name in t.coupled})
        if not self._sharded:  # identical weights give identical masks on every rank; rank 0's makes it a guarantee
            masks = trainer.strategy.broadcast({name: mask.cpu() for name, mask in masks.items()}, src=0)
        device = next(iter(self._local.values())).device
        self._set_masks({name: mask.to(device) for name, mask in masks.items()})
        self._mask_sparsity = target
        self._apply()
        self._count_sharded_zeros()
        layers = self.layer_sparsity
        achieved = self._overall(layers)
        self.history.append({"step": trainer.global_step, "target": target, "achieved": achieved})
        metrics = {"pruning/target_sparsity": target, "pruning/sparsity": achieved}
        metrics.update({f"pruning/layer/{name}": value for name, value in layers.items()})
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)

    # --- checkpointing -------------------------------------------------------------------------------

    @override
    def state_dict(self) -> dict[str, Any]:
        # FSDP2: a distributed checkpoint gets the mask shards from `attach_mask_saving`, into MASK_DIR beside
        # the model's; a one-file checkpoint gets whole masks (gathered: every rank calls state_dict).
        masks = {name: mask.cpu() for name, mask in self.masks.items()}
        if self._sharded and self.masks:
            masks = {name: torch.empty(0, dtype=torch.bool) for name in masks} if self._sharded_save else (
                full_masks(self.masks, self._parameters))  # fmt: skip
        return {
            "masks": masks,
            "mask_dir": MASK_DIR if self._sharded and self._sharded_save else None,
            "mask_sparsity": self._mask_sparsity,
            "history": list(self.history),
            "targets": [t.weight for t in self.targets],
            "active": self._active,
            "run_start": self._run_start,
            "carried": self._carried,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.masks = dict(state_dict["masks"])
        self._mask_dir = state_dict.get("mask_dir")
        self._mask_sparsity = float(state_dict["mask_sparsity"])
        self.history = list(state_dict["history"])
        self._active = bool(state_dict.get("active", True))
        self._run_start = int(state_dict.get("run_start", 0))
        self._carried = float(state_dict.get("carried", 0.0))
        self._restored = True
        saved = set(state_dict["targets"])
        if self.targets and saved != {t.weight for t in self.targets}:
            raise ValueError(f"the checkpoint's pruning targets {sorted(saved)} differ from this run's")

    # --- report --------------------------------------------------------------------------------------

    def report_section(self, trainer: L.Trainer, run_dir: Path) -> ReportSection:
        """Per-layer sparsity table and a plot of target vs achieved sparsity over steps (see `report.py`)."""
        return pruning_section(self, run_dir)

    # --- channels: the smaller model -----------------------------------------------------------------

    @property
    def group_sparsity(self) -> dict[str, float]:
        """granularity="channels": the share of each selected group's units that the masks prune."""
        return {} if self.plan is None else self.plan.unit_sparsity(self.masks, self._parameters)

    def shrink(self, model: torch.nn.Module) -> tuple[torch.nn.Module, dict[str, LayerShrink]]:
        """`model` (the LightningModule, or the traced module in it) without the pruned units, and what changed
        per layer, or `ShrinkError` saying why not. After QAT the copy is float (`restore_float_modules`)."""
        if self.granularity != "channels" or self.plan is None:
            why = "has not found its channel groups yet (a fit does)" if self.granularity == "channels" else (
                f"prunes granularity={self.granularity!r}, which leaves nothing to remove")  # fmt: skip
            raise ShrinkError(f"GradualPruning.shrink: this callback {why}; shrink needs granularity='channels'")
        groups = self.plan.groups_for(model)
        cut = len(self.plan.prefix) + 1 if groups is not self.plan.groups else 0
        masks = {name[cut:]: mask for name, mask in self.masks.items()}
        shrunk, self.shrink_summary = shrink_with_groups(model, groups, masks)
        return shrunk, self.shrink_summary
