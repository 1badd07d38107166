"""The loss extension point: a callback's term is added exactly as if the module had added it itself."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_eff.loss_terms import LossContributor, attach_loss_terms, detach_loss_terms
from tests.loss_terms import worker
from tests.workers import run_worker

PENALTY = 0.05


def penalty(module: nn.Module) -> Tensor:
    return PENALTY * sum((p.pow(2).sum() for p in module.parameters()), torch.zeros(()))


def loader() -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    features, labels = torch.randn(48, 6, generator=generator), torch.randint(0, 3, (48,), generator=generator)
    return DataLoader(TensorDataset(features, labels), batch_size=8)


class Tiny(L.LightningModule):
    """A linear classifier; `own_penalty` adds the L2 term in training_step, `output` picks the return shape."""

    def __init__(self, own_penalty: bool = False, output: str = "tensor", manual: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(6, 3)
        self.own_penalty, self.output = own_penalty, output
        self.automatic_optimization = not manual
        self.second_backward_grads: list[Tensor] = []

    def loss(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        features, labels = batch
        loss = nn.functional.cross_entropy(self.linear(features), labels)
        return loss + penalty(self) if self.own_penalty else loss

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Any:
        if not self.automatic_optimization:
            optimizer = self.optimizers()
            optimizer.zero_grad()
            self.manual_backward(self.loss(batch))
            optimizer.step()
            # a second backward in the same step gets no term (a GAN's other network, say)
            optimizer.zero_grad()
            self.manual_backward(nn.functional.cross_entropy(self.linear(batch[0]), batch[1]))
            self.second_backward_grads.append(self.linear.weight.grad.detach().clone())
            optimizer.zero_grad()
            return None
        loss = self.loss(batch)
        return {"loss": loss} if self.output == "dict" else loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.2)


class PenaltyTerm(L.Callback):
    def __init__(self) -> None:
        self.calls = 0

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        attach_loss_terms(trainer)

    def loss_term(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> Tensor:
        self.calls += 1
        term = penalty(pl_module)
        pl_module.log("penalty", term)
        return term

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        detach_loss_terms(trainer)


def fit(model: Tiny, callbacks: list[L.Callback], accumulate: int = 1) -> L.Trainer:
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=2,
        accumulate_grad_batches=accumulate,
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(model, train_dataloaders=loader())
    return trainer


def test_penalty_term_is_a_loss_contributor() -> None:
    assert isinstance(PenaltyTerm(), LossContributor)
    assert not isinstance(L.Callback(), LossContributor)


@pytest.mark.parametrize("output", ["tensor", "dict"])
@pytest.mark.parametrize("accumulate", [1, 3])
def test_callback_term_equals_the_module_adding_it(output: str, accumulate: int) -> None:
    own, plain, via_callback = Tiny(own_penalty=True, output=output), Tiny(output=output), Tiny(output=output)
    term = PenaltyTerm()
    fit(own, [], accumulate)
    fit(plain, [], accumulate)
    trainer = fit(via_callback, [term], accumulate)
    assert term.calls == 12  # once per training_step: 6 batches x 2 epochs, whatever the accumulation
    assert torch.equal(via_callback.linear.weight, own.linear.weight)  # bit for bit, so before the 1/accumulate
    assert not torch.allclose(via_callback.linear.weight, plain.linear.weight, atol=1e-3)  # the term did something
    assert "penalty" in trainer.callback_metrics  # loss_term may log
    assert "training_step" not in trainer.strategy.__dict__  # teardown restored the strategy


def test_manual_optimization_gets_the_term_once_per_step() -> None:
    own, via_callback = Tiny(own_penalty=True, manual=True), Tiny(manual=True)
    term = PenaltyTerm()
    fit(own, [])
    fit(via_callback, [term])
    assert term.calls == 12
    assert torch.equal(via_callback.linear.weight, own.linear.weight)
    # the second manual_backward of each step saw no term: same gradients as the module's own second backward
    for ours, theirs in zip(via_callback.second_backward_grads, own.second_backward_grads, strict=True):
        assert torch.equal(ours, theirs)


def test_a_deep_copy_of_the_module_carries_no_trainer() -> None:
    model, term = Tiny(), PenaltyTerm()
    trainer = L.Trainer(accelerator="cpu", max_steps=1, callbacks=[term], logger=False, enable_progress_bar=False)
    term.setup(trainer, model, "fit")
    copied = copy.deepcopy(model)  # QAT's conversion and exports copy the module mid-fit
    assert "training_step" not in copied.__dict__ and "training_step" in trainer.strategy.__dict__
    detach_loss_terms(trainer)
    detach_loss_terms(trainer)  # a no-op the second time
    assert "training_step" not in trainer.strategy.__dict__


def run_ddp(out: Path, variant: str, accumulate: int) -> list[dict[str, Any]]:
    out.mkdir(parents=True)
    result = run_worker(worker, [str(out), variant, str(accumulate)], cwd=out, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in (0, 1)]


@pytest.mark.slow
def test_under_ddp_the_term_comes_before_the_balancers_per_rank_weighting(tmp_path: Path) -> None:
    own = run_ddp(tmp_path / "module", "module", accumulate=2)
    ours = run_ddp(tmp_path / "callback", "callback", accumulate=2)
    assert ours[0]["sizes"] != ours[1]["sizes"]  # unequal shares: each rank's loss was weighted
    assert ours[0]["weights"] == ours[1]["weights"]  # ranks in sync
    assert ours[0]["weights"] == pytest.approx(own[0]["weights"], abs=1e-6)
