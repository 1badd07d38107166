"""LocalSGD (post-local SGD) under Lightning on 2 gloo processes: ranks agree right after each averaging and
differ in between, the bytes per step are what the scheme defines, a resumed run continues exactly, and the app
runs it. Also this file's worker: `python -m tests.compression.test_local_sgd OUT MAX_STEPS CKPT`.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lightning_eff import EfficientDDPStrategy
from lightning_eff.compression import Auto, LocalSGD
from lightning_eff.compression.communication import CompressedCommunication
from lightning_eff.strategies.model_parallel import EfficientModelParallelStrategy
from lightning_eff.validation import ConfigError
from tests.conftest import read_report, run_cli
from tests.workers import run_worker

PERIOD, WARMUP, STEPS, SAVED_AT = 4, 3, 15, 6  # averages after steps 3, 7 and 11; saved mid-period, ranks apart
AVERAGED = [s for s in range(STEPS) if s >= WARMUP and (s - WARMUP) % PERIOD == 0]


def flat_parameters(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).clone() for p in module.parameters()])


class Record(Callback):
    """Each step's parameters (this rank's own) and bytes, and the parameters around every validation."""

    def __init__(self) -> None:
        self.parameters: list[torch.Tensor] = []
        self.traffic: list[tuple[int, int]] = []
        self.around_validation: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        self._before_validation: torch.Tensor | None = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self.parameters.append(flat_parameters(pl_module))
        last = trainer.strategy.compression_stats.last_step  # type: ignore[attr-defined]
        self.traffic.append((last.bytes_dense, last.bytes_sent))

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._before_validation = flat_parameters(pl_module)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        assert self._before_validation is not None
        self.around_validation.append((trainer.global_step, self._before_validation, flat_parameters(pl_module)))


def train(out: str, max_steps: int, ckpt: str) -> None:
    """The worker: DigitsMLP under LocalSGD for `max_steps`, checkpointed every SAVED_AT steps."""
    from lightning_eff.distributed import destroy_process_group_at_exit
    from lightning_eff.tasks import DigitsDataModule, DigitsMLP

    torch.set_num_threads(1)
    destroy_process_group_at_exit()
    L.seed_everything(0, verbose=False)
    record = Record()
    strategy = EfficientDDPStrategy(compression=LocalSGD(period=PERIOD, warmup_steps=WARMUP))
    saver = ModelCheckpoint(dirpath=out + "/ckpt", save_top_k=-1, every_n_train_steps=SAVED_AT, filename="{step}")
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        max_steps=max_steps,
        callbacks=[record, saver],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(
        DigitsMLP(hidden_sizes=[64, 64]), datamodule=DigitsDataModule(), ckpt_path=None if ckpt == "-" else ckpt
    )
    assert strategy.local_sgd is not None and strategy.local_sgd.run is not None
    result = {
        "parameters": record.parameters,
        "traffic": record.traffic,
        "around_validation": record.around_validation,
        "final": flat_parameters(trainer.lightning_module),
        "parameter_bytes": 4 * sum(p.numel() for p in trainer.lightning_module.parameters()),
        "averager_step": strategy.local_sgd.run.step,
        "hook_iter": strategy.local_sgd.run.state.iter,
        "stats_steps": strategy.compression_stats.steps,
        "report": strategy.local_sgd.report_section().summary,  # type: ignore[union-attr]
    }
    torch.save(result, f"{out}/rank{trainer.global_rank}.pt")


def run_pair(out: Path, max_steps: int, ckpt: str = "-") -> list[dict[str, Any]]:
    out.mkdir(parents=True, exist_ok=True)
    result = run_worker(sys.modules[__name__], [str(out), str(max_steps), ckpt], cwd=out, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in (0, 1)]


@pytest.fixture(scope="module")
def full(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict[str, Any]], Path]:
    out = tmp_path_factory.mktemp("local-sgd-full")
    return run_pair(out, STEPS), out


@pytest.mark.slow
def test_ranks_agree_right_after_each_averaging_and_drift_apart_in_between(
    full: tuple[list[dict[str, Any]], Path],
) -> None:
    ranks = full[0]
    for step in range(STEPS):
        same = torch.equal(ranks[0]["parameters"][step], ranks[1]["parameters"][step])
        assert same == (step < WARMUP or step in AVERAGED), step  # dense DDP in warm-up, then only at averages
    assert torch.equal(ranks[0]["final"], ranks[1]["final"])  # averaged once more at the end of training
    assert not torch.equal(ranks[0]["final"], ranks[0]["parameters"][-1])
    for rank in ranks:
        assert rank["averager_step"] == rank["stats_steps"] == STEPS  # once per optimizer step, never in validation
        assert rank["hook_iter"] == WARMUP  # torch's hook stops counting once local SGD starts
        assert rank["around_validation"], "no validation ran during training"
        for _, before, after in rank["around_validation"]:
            assert torch.equal(before, after)  # validation never averaged (the ranks differed at step 10)


@pytest.mark.slow
def test_bytes_per_step_are_dense_in_warm_up_then_one_parameter_average_per_period(
    full: tuple[list[dict[str, Any]], Path],
) -> None:
    rank = full[0][0]
    size = rank["parameter_bytes"]  # fp32 gradients and fp32 parameters: the same bytes
    expected = [size if step < WARMUP or step in AVERAGED else 0 for step in range(STEPS)]
    assert rank["traffic"] == [(size, sent) for sent in expected]
    report = rank["report"]
    assert report["compressed_from_step"] == report["local_sgd_from_step"] == WARMUP
    assert report["bytes_dense_per_step"] == size
    final_average = size  # the run ended after a local step, so it averaged once more
    assert report["bytes_sent_per_step"] == pytest.approx((sum(expected) + final_average) / STEPS)
    assert report["parameter_averages"] == len(AVERAGED) and report["averaged_at_end"] is True
    assert report["period"] == PERIOD


@pytest.mark.slow
def test_resumed_run_continues_exactly_with_every_ranks_own_replica(
    full: tuple[list[dict[str, Any]], Path], tmp_path: Path
) -> None:
    ranks, out = full
    checkpoint = out / "ckpt" / f"step={SAVED_AT}.ckpt"
    assert not torch.equal(ranks[0]["parameters"][SAVED_AT - 1], ranks[1]["parameters"][SAVED_AT - 1])
    resumed = run_pair(tmp_path / "resumed", STEPS, ckpt=str(checkpoint))
    for rank in (0, 1):
        assert len(resumed[rank]["parameters"]) == STEPS - SAVED_AT
        for done, expected in zip(resumed[rank]["parameters"], ranks[rank]["parameters"][SAVED_AT:], strict=True):
            assert torch.equal(done, expected)
        assert torch.equal(resumed[rank]["final"], ranks[rank]["final"])
        assert resumed[rank]["averager_step"] == resumed[rank]["stats_steps"] == STEPS
        untimed = [{k: v for k, v in run[rank]["report"].items() if "seconds" not in k} for run in (resumed, ranks)]
        assert untimed[0] == untimed[1]  # the bytes, steps and averages resumed too


def test_bad_arguments_name_the_key() -> None:
    with pytest.raises(ConfigError, match=r"^period=1: must be >= 2$"):
        LocalSGD(period=1)
    with pytest.raises(ConfigError, match=r"^warmup_steps=-1: must be >= 0$"):
        LocalSGD(warmup_steps=-1)
    with pytest.raises(ConfigError, match=r"^period=eight: must be an integer, not a string$"):
        LocalSGD(period="eight")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"^compression=local_sgd: does not apply to FSDP2 \(local SGD keeps"):
        EfficientModelParallelStrategy(compression="local_sgd")
    with pytest.raises(ConfigError, match=r"^compression=local_sgd: does not apply to FSDP2"):
        EfficientModelParallelStrategy(compression=LocalSGD())


def test_the_name_local_sgd_builds_a_fresh_one() -> None:
    first, second = EfficientDDPStrategy(compression="local_sgd"), EfficientDDPStrategy(compression="local_sgd")
    assert first.local_sgd is not None and isinstance(first.compressor, LocalSGD)
    assert (
        first.compressor is not second.compressor and repr(first.compressor) == "LocalSGD(period=8, warmup_steps=100)"
    )


def test_warm_up_that_covers_the_run_is_warned_with_its_own_argument() -> None:
    communication = CompressedCommunication(LocalSGD(period=8, warmup_steps=100))
    with pytest.warns(UserWarning, match="so it will never compress; lower warmup_steps \\(e.g. 2, 10% of the run"):
        communication.check_warmup(20)


@pytest.mark.slow
def test_app_runs_local_sgd_with_accumulation_and_a_balancer(tmp_path: Path) -> None:
    """20 batches per rank, 2 per optimizer step: 10 steps, dense until step 2, averaged after steps 2 and 6."""
    run_dir = tmp_path / "run"
    args = ["trainer=ddp_cpu", "compression=local_sgd", "compression.warmup_steps=2", "compression.period=4",
            "trainer.max_epochs=2", "trainer.accumulate_grad_batches=2", "balancing=throughput",
            "trainer.log_every_n_steps=1", f"run_dir={run_dir}"]  # fmt: skip
    result = run_cli(args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    section = read_report(run_dir)["communication"]["summary"]
    assert section["compressor"] == "LocalSGD(period=4, warmup_steps=2)"
    assert section["synchronizing_steps"] == 10 and section["local_sgd_from_step"] == 2
    assert section["parameter_averages"] == 2 and section["averaged_at_end"] is True
    assert section["bytes_sent_per_step"] == pytest.approx(section["bytes_dense_per_step"] * (2 + 2 + 1) / 10)
    with (run_dir / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [float(row["compression/started_at_step"]) for row in rows if row.get("compression/started_at_step")] == [2]
    assert any(row.get("compression/total_ratio") for row in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out")
    parser.add_argument("max_steps", type=int)
    parser.add_argument("ckpt", help="checkpoint to resume from, or -")
    args = parser.parse_args()
    train(args.out, args.max_steps, args.ckpt)


if __name__ == "__main__":
    main()


def test_auto_refuses_local_sgd_as_its_candidate() -> None:
    with pytest.raises(ConfigError, match=r"^candidate=.*must be a compressor other than Auto or LocalSGD"):
        Auto(candidate=LocalSGD())
