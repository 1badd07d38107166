"""The functional core: the losses, pick_output and agreement."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F
from transformers.modeling_outputs import BaseModelOutput, CausalLMOutputWithCrossAttentions

from lightning_eff.distillation import (
    agreement,
    agreement_kind,
    agreement_totals,
    cosine_loss,
    kl_loss,
    make_loss,
    mse_loss,
    pick_output,
)


def pair(*shape: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(*shape, generator=generator), torch.randn(*shape, generator=generator)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_kl_is_hintons_soft_target_loss(temperature: float) -> None:
    student, teacher = pair(6, 10)
    expected = (
        F.kl_div(F.log_softmax(student / temperature, -1), F.softmax(teacher / temperature, -1), reduction="batchmean")
        * temperature**2
    )
    assert kl_loss(student, teacher, temperature) == pytest.approx(float(expected), rel=1e-5)
    assert make_loss("kl", temperature)(student, teacher) == pytest.approx(float(expected), rel=1e-5)


def test_kl_averages_over_every_position_of_a_sequence() -> None:
    student, teacher = pair(3, 5, 10)
    flat = kl_loss(student.reshape(15, 10), teacher.reshape(15, 10), 2.0)
    assert kl_loss(student, teacher, 2.0) == pytest.approx(float(flat), rel=1e-6)
    assert float(kl_loss(teacher, teacher, 2.0)) == pytest.approx(0.0, abs=1e-6)


def test_mse_cosine_and_a_callable() -> None:
    student, teacher = pair(4, 8)
    assert mse_loss(student, teacher) == pytest.approx(float(F.mse_loss(student, teacher)))
    expected = 1 - F.cosine_similarity(student, teacher, dim=-1).mean()
    assert cosine_loss(student, teacher) == pytest.approx(float(expected), rel=1e-6)
    assert float(cosine_loss(student, 3 * student)) == pytest.approx(0.0, abs=1e-6)
    l1 = make_loss(lambda s, t: (s - t).abs().mean())
    assert l1(student, teacher) == pytest.approx(float((student - teacher).abs().mean()))
    with pytest.raises(ValueError, match="unknown distillation loss 'kld'"):
        make_loss("kld")


def test_pick_output() -> None:
    logits, hidden = torch.randn(2, 3), torch.randn(2, 4)
    assert pick_output(logits) is logits
    assert pick_output((logits, hidden)) is logits
    assert pick_output((None, [logits])) is logits
    assert pick_output({"last_hidden_state": hidden, "logits": logits}) is logits
    assert pick_output({"last_hidden_state": hidden}) is hidden
    assert pick_output(CausalLMOutputWithCrossAttentions(logits=logits)) is logits
    assert pick_output(BaseModelOutput(last_hidden_state=hidden)) is hidden
    assert pick_output({"a": logits, "b": hidden}, "b") is hidden
    assert pick_output((logits, hidden), 1) is hidden
    assert (
        pick_output(BaseModelOutput(last_hidden_state=hidden, hidden_states=(logits, hidden)), "hidden_states")
        is logits
    )
    assert pick_output((logits, hidden), lambda out: out[1]) is hidden
    with pytest.raises(TypeError, match="cannot find a tensor in the model's output"):
        pick_output({"loss": 1.0})
    with pytest.raises(KeyError, match="has no 'scores'"):
        pick_output({"logits": logits}, "scores")


def test_agreement() -> None:
    student, teacher = pair(5, 7)
    assert float(agreement(student, student)) == 1.0
    assert float(agreement(student, teacher)) == pytest.approx(
        float((student.argmax(-1) == teacher.argmax(-1)).float().mean())
    )
    # embeddings: the mean over rows of each row's cosine; a row's length does not count
    rows = torch.randn(4, 3)
    flipped = torch.cat([rows[:1] * -2, rows[1:] * 3])  # one row reversed, three scaled
    assert float(agreement(rows, flipped, "cosine")) == pytest.approx(0.5)
    sums = agreement_totals(rows, flipped, "cosine") + agreement_totals(rows, rows, "cosine")
    assert sums.tolist() == pytest.approx([2.0 + 4.0, 8.0])  # batches add up as (sum, count)
    assert agreement_kind("kl") == "argmax" and agreement_kind("cosine") == agreement_kind(mse_loss) == "cosine"
    with pytest.raises(ValueError, match="unknown agreement 'top5'"):
        agreement(rows, rows, "top5")
