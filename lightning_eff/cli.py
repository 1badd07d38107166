"""The Hydra app behind `lightning-eff` and `python -m lightning_eff`.

Composes `conf/train.yaml` with the user's overrides, validates every value, builds the data, model,
callbacks, logger and Trainer, trains, tests, and writes the end-of-run report into the run directory.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.model_helpers import is_overridden
from omegaconf import DictConfig

from lightning_eff.capabilities import CAPABILITIES, SHARDED_STRATEGIES, ChecksModel, ChecksWorldSize, check_strategy
from lightning_eff.checkpoints import AtomicCheckpointIO, newest_whole_checkpoint
from lightning_eff.config import ConfigError, ValidatedConfig, validate
from lightning_eff.distributed import dead_ranks, destroy_process_group_at_exit
from lightning_eff.frontier import answer_repeat, frontier_callbacks, objectives_for_sweep
from lightning_eff.frontier.ranks import end_sweep_job, rank_argv, remember_sweep_job
from lightning_eff.hydra_config import config_dir
from lightning_eff.launch_checks import check_before_launch
from lightning_eff.loggers import build_logger
from lightning_eff.progress import EpochProgressLog
from lightning_eff.report import (
    ReportSection,
    contributed_sections,
    format_report,
    parameter_count,
    state_dict_bytes,
    write_report,
)
from lightning_eff.sharding import plain_class
from lightning_eff.sigterm import SynchronizedSigterm
from lightning_eff.slurm import JobRequeued, check_slurm_launch, requeue_job, slurm_plugins
from lightning_eff.strategies import EfficientDDPStrategy, EfficientModelParallelStrategy
from lightning_eff.throughput import ThroughputMeter
from lightning_eff.validation import check

SHARDED_PRECISIONS = ("32-true", "bf16-mixed", "bf16-true", "16-true")  # what ModelParallelStrategy accepts
RESUME_HINT = "Its checkpoints are written atomically: run it again with resume=auto to continue."


class RankDied(RuntimeError):
    """Another process of the run died; the message names it."""


def find_resume_checkpoint(resume: str | None, run_dir: Path) -> str | None:
    """The checkpoint to resume from: an explicit path, or for `auto` the newest whole `.ckpt` under run_dir.

    A requeued SLURM job (SLURM_RESTART_COUNT > 0) resumes as with `auto` unless told otherwise. A newest
    checkpoint cut short by a job that died mid-write (or otherwise corrupt) is skipped with one line each,
    and the newest whole one is used; if there are checkpoints but none is whole, that is an error listing them.
    """
    if resume is None and int(os.environ.get("SLURM_RESTART_COUNT", "0")) > 0:
        resume = "auto"
    if resume != "auto":
        return resume
    candidates = list(run_dir.rglob("*.ckpt"))
    if not candidates:
        rank_zero_info(f"resume=auto: no checkpoint in {run_dir} yet, starting fresh")
        return None
    skipped: list[str] = []

    def skip(path: Path, problem: str) -> None:
        skipped.append(f"{path} ({problem})")
        rank_zero_info(f"resume=auto: skipping {path}: not a whole checkpoint ({problem}); kept as {path.name}.broken")
        # Out of the way, not deleted: Lightning would otherwise save the next `last.ckpt` as `last-v1.ckpt`
        # beside it, and every later resume would read it again. Under srun every rank tries; one succeeds.
        with contextlib.suppress(OSError):
            path.rename(path.with_name(path.name + ".broken"))

    chosen = newest_whole_checkpoint(candidates, skip)
    if chosen is None:
        raise ConfigError("resume", "auto", f"no whole checkpoint in {run_dir}; tried: {'; '.join(skipped)}")
    rank_zero_info(f"resume=auto: resuming from {chosen}")
    return str(chosen)


def discard_consumed_requeue_checkpoints(trainer: L.Trainer, run_dir: Path) -> None:
    """Delete `hpc_ckpt_*.ckpt` once fit has finished past them.

    Under SLURM, Lightning's `test()` with no checkpoint path loads an HPC checkpoint if one exists, which
    would test the weights of the interrupted job instead of the finished model.
    """
    if trainer.is_global_zero:
        for path in run_dir.glob("hpc_ckpt_*.ckpt"):
            if path.is_dir():  # FSDP2's sharded checkpoints are directories
                shutil.rmtree(path)
            else:
                path.unlink()
    trainer.strategy.barrier("discard_consumed_requeue_checkpoints")


def instantiate_group(cfg: DictConfig, group: str) -> Any:
    """Instantiate one group's `_target_`, reporting a constructor's complaint as a config error."""
    try:
        return hydra.utils.instantiate(cfg[group], _convert_="all")
    except InstantiationException as error:
        cause = error.__cause__ or error
        if isinstance(cause, ConfigError):
            raise cause.under(group) from None
        message = str(cause).strip().splitlines()[-1]
        if "unexpected keyword argument" in message:  # the default member's keys reached the user's own class
            message += f"; for your own class start from {group}=custom, which has no keys of its own"
        raise ConfigError(f"{group}._target_", cfg[group]._target_, f"could not be built: {message}") from None


def check_shardable(settings: ValidatedConfig, model_target: str, model: L.LightningModule) -> None:
    """FSDP2 needs a model that shards itself in `configure_model` and a precision ModelParallelStrategy takes;
    refused here in one line rather than by a traceback from every rank."""
    precision = str(settings.trainer.precision)
    check(precision in SHARDED_PRECISIONS, "trainer.precision", precision,
          f"must be one of {', '.join(SHARDED_PRECISIONS)} under FSDP2 (ModelParallelStrategy)")  # fmt: skip
    check(is_overridden("configure_model", model), "model._target_", model_target,
          "has no configure_model that calls fully_shard, which FSDP2 needs (e.g. model=tiny_gpt)")  # fmt: skip


def build_strategy(
    strategy: str, strategy_kwargs: dict[str, Any]
) -> EfficientDDPStrategy | EfficientModelParallelStrategy:
    """The strategy that takes the chosen compressor and balancer: FSDP2's for ``fsdp2``, DDP's otherwise.

    A compressor that FSDP2's reduce-scatter cannot run (PowerSGD, TopK, Int8, Auto) is refused here, before fit.
    """
    for capability in CAPABILITIES:
        if capability.strategy_argument in strategy_kwargs:
            check_strategy(capability.group, strategy)
    if strategy in SHARDED_STRATEGIES:
        return EfficientModelParallelStrategy(**strategy_kwargs)
    return EfficientDDPStrategy(**strategy_kwargs)


def build_trainer(
    cfg: DictConfig, settings: ValidatedConfig, run_dir: Path, model: L.LightningModule
) -> tuple[L.Trainer, list[L.Callback]]:
    """The Trainer with the app's callbacks (checkpoints, throughput, progress) and each chosen capability.

    A capability that can check itself against the model (`ChecksModel`, e.g. pruning's include patterns) or
    the number of processes (`ChecksWorldSize`) does so here, so a mismatch is reported before training starts.
    """
    trainer_kwargs = settings.trainer.trainer_kwargs()
    if settings.trainer.strategy in SHARDED_STRATEGIES:
        check_shardable(settings, cfg.model._target_, model)
    plugins, slurm_callbacks = slurm_plugins()
    plugins.append(AtomicCheckpointIO())  # a job killed mid-save leaves the previous checkpoint whole
    # SynchronizedSigterm: on SIGTERM every rank stops at the same step (Lightning's own handler can hang DDP)
    callbacks: list[L.Callback] = [ThroughputMeter(), SynchronizedSigterm()]
    if settings.trainer.enable_checkpointing:
        callbacks.append(ModelCheckpoint(dirpath=run_dir / "checkpoints", save_last=True))
    if not trainer_kwargs["enable_progress_bar"]:
        callbacks.append(EpochProgressLog())
    strategy_kwargs: dict[str, Any] = {}
    world_size = settings.trainer.world_size()
    for capability in CAPABILITIES:
        if settings.groups[capability.group] is None:
            continue
        plugin = instantiate_group(cfg, capability.group)
        try:
            if isinstance(plugin, ChecksModel):
                plugin.check_model(model)
            if isinstance(plugin, ChecksWorldSize) and world_size is not None:
                plugin.check_world_size(world_size)
        except ConfigError as error:
            raise error.under(capability.group) from None
        if capability.strategy_argument is not None:
            strategy_kwargs[capability.strategy_argument] = plugin
        elif isinstance(plugin, L.Callback):
            callbacks.append(plugin)
    if strategy_kwargs:
        trainer_kwargs["strategy"] = build_strategy(settings.trainer.strategy, strategy_kwargs)
    callbacks += frontier_callbacks(cfg, run_dir)  # a frontier sweep's job: early stopping, exported bytes
    callbacks += slurm_callbacks  # last: its requeue checkpoint sees every plugin's state after the step
    trainer = L.Trainer(
        default_root_dir=run_dir,
        logger=build_logger(settings.run.logger, run_dir),
        callbacks=callbacks,
        plugins=plugins,
        **trainer_kwargs,
    )
    return trainer, callbacks


def run_section(
    trainer: L.Trainer,
    model: L.LightningModule,
    test_metrics: dict[str, float],
    meter: ThroughputMeter,
    wall_seconds: float,
) -> ReportSection:
    """The report's core: what was trained, how well, how big, how fast."""
    val_metrics = {key: float(value) for key, value in trainer.callback_metrics.items() if key.startswith("val_")}
    return ReportSection(
        name="run",
        summary={
            "model": plain_class(type(model)).__name__,  # not FSDP2's FSDP<Name> subclass
            "strategy": type(trainer.strategy).__name__,
            **{key: float(value) for key, value in test_metrics.items()},
            **val_metrics,
            "parameters": parameter_count(model),
            "model_size_bytes": state_dict_bytes(model),
            "train_samples_per_second": meter.samples_per_second,
            "train_samples": meter.samples,
            "train_step_seconds": meter.step_seconds,
            "fit_seconds": meter.fit_seconds,
            "wall_seconds": wall_seconds,
            "world_size": trainer.world_size,
            "global_step": trainer.global_step,
            "epochs": trainer.current_epoch,
        },
    )


def train(cfg: DictConfig, run_dir: Path) -> list[ReportSection] | None:
    """Validate, train, test and report; returns the report's sections on global rank 0."""
    started = time.perf_counter()
    settings = validate(cfg)
    check_slurm_launch(settings.trainer.devices, settings.trainer.num_nodes)
    L.seed_everything(settings.run.seed, workers=True, verbose=False)
    datamodule = instantiate_group(cfg, "data")
    check_before_launch(settings, datamodule)  # here, before fit starts the other ranks: reported once
    model = instantiate_group(cfg, "model")
    trainer, callbacks = build_trainer(cfg, settings, run_dir, model)
    ckpt_path = find_resume_checkpoint(settings.run.resume, run_dir)

    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    except JobRequeued as requeued:
        rank_zero_info(f"SLURM: {requeued}; the requeued job finishes the run and writes the report")
        if trainer.is_global_zero:
            requeue_job()
        return None
    except Exception as error:
        if dead := dead_ranks(trainer):
            raise RankDied(f"{'; '.join(dead)}; the run stopped ({type(error).__name__}). {RESUME_HINT}") from error
        raise
    discard_consumed_requeue_checkpoints(trainer, run_dir)
    test_metrics: dict[str, float] = {}
    if settings.run.test_after_fit:
        results = trainer.test(model, datamodule=datamodule, verbose=False)
        test_metrics = {key: float(value) for key, value in results[0].items()} if results else {}

    if not trainer.is_global_zero:
        return None
    meter = next(callback for callback in callbacks if isinstance(callback, ThroughputMeter))
    wall_seconds = time.perf_counter() - started
    sections = [run_section(trainer, model, test_metrics, meter, wall_seconds)]
    sections += contributed_sections(trainer, run_dir)
    path = write_report(sections, run_dir)
    print(format_report(sections))
    print(f"report: {path}")
    return sections


def run(cfg: DictConfig) -> list[float] | None:
    """Hydra's task function: one clear line and exit status 2 for a bad config, no traceback.

    In a frontier sweep (`hydra/sweeper=frontier`) it returns the trial's objectives to the Optuna sweeper.
    """
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    remember_sweep_job()  # the ranks Lightning starts run this job, not the sweep again
    destroy_process_group_at_exit()  # plain DDP too: a gloo run must not abort after it finished
    try:
        if (reused := answer_repeat(cfg, run_dir)) is not None:
            return reused  # a frontier trial that repeats a finished one's configuration
        train(cfg, run_dir)
        return objectives_for_sweep(cfg, run_dir)  # a ConfigError here too: frontier.quality names no figure
    except ConfigError as error:
        print(f"lightning-eff: error: {error}", file=sys.stderr)
        sys.exit(2)
    except RankDied as error:
        print(f"lightning-eff: error: {error}", file=sys.stderr)
        sys.exit(1)
    finally:
        end_sweep_job()  # the sweep's next job in this process starts its own ranks


def main() -> None:
    """Entry point of the `lightning-eff` console script."""
    sys.argv = rank_argv(sys.argv)  # a rank Lightning started inside a sweep's job runs that job
    hydra.main(config_path=str(config_dir()), config_name="train", version_base="1.3")(run)()


if __name__ == "__main__":
    main()
