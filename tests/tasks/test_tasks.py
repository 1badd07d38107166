"""The reference tasks: real data, deterministic splits, and each model trains for a step."""

from __future__ import annotations

from typing import Any

import lightning as L
import pytest
import torch

from lightning_eff.tasks import DigitsCNN, DigitsDataModule, DigitsMLP, TextDataModule, TinyGPT
from lightning_eff.tasks.text import corpus_bytes


def test_digits_split_is_deterministic_disjoint_and_complete() -> None:
    first, second = DigitsDataModule(split_seed=3), DigitsDataModule(split_seed=3)
    first.setup()
    second.setup()
    assert first.train_set is not None and second.train_set is not None
    assert torch.equal(first.train_set.tensors[0], second.train_set.tensors[0])
    sizes = [len(s) for s in (first.train_set, first.val_set, first.test_set)]  # type: ignore[arg-type]
    assert sum(sizes) == 1797 and sizes[2] == round(1797 * 0.2)
    images = torch.cat([s.tensors[0] for s in (first.train_set, first.val_set, first.test_set)])  # type: ignore[union-attr]
    assert images.shape == (1797, 1, 8, 8) and images.min() >= 0 and images.max() <= 1
    other = DigitsDataModule(split_seed=4)
    other.setup()
    assert not torch.equal(first.train_set.tensors[1][:50], other.train_set.tensors[1][:50])  # type: ignore[union-attr]


def test_text_windows_are_shifted_bytes_of_the_corpus() -> None:
    data = TextDataModule(seq_len=16, batch_size=4)
    data.setup()
    assert data.train_set is not None and data.val_set is not None and data.test_set is not None
    tokens, targets = data.train_set[3]
    corpus = corpus_bytes()
    assert torch.equal(tokens, corpus[48:64].long()) and torch.equal(targets, corpus[49:65].long())
    total = len(corpus)
    assert len(data.train_set) == (round(total * 0.9) - 1) // 16 or len(data.train_set) > 0.85 * total / 16
    assert len(data.val_set) > 0 and len(data.test_set) > 0
    assert len(corpus) > 400_000  # real English prose, not a stub


def test_text_max_bytes_limits_the_corpus() -> None:
    data = TextDataModule(seq_len=32, max_bytes=20_000)
    data.setup()
    assert data.train_set is not None
    assert len(data.train_set) == (18_000 - 1) // 32


@pytest.mark.parametrize(
    ("model", "datamodule"),
    [
        (DigitsMLP(hidden_sizes=[32]), DigitsDataModule(batch_size=16)),
        (DigitsCNN(channels=[4, 8]), DigitsDataModule(batch_size=16)),
        (TinyGPT(n_layer=1, n_head=2, d_model=32, seq_len=32), TextDataModule(seq_len=32, batch_size=4)),
    ],
    ids=["digits_mlp", "digits_cnn", "tiny_gpt"],
)
def test_fast_dev_run_changes_weights(
    model: L.LightningModule, datamodule: L.LightningDataModule, quiet_trainer_kwargs: dict[str, Any]
) -> None:
    before = [p.detach().clone() for p in model.parameters()]
    trainer = L.Trainer(fast_dev_run=True, accelerator="cpu", **quiet_trainer_kwargs)
    trainer.fit(model, datamodule=datamodule)
    trainer.test(model, datamodule=datamodule, verbose=False)
    assert trainer.global_step == 1
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))
    assert any(key.startswith("test_") for key in trainer.callback_metrics)


def test_gpt_attention_is_causal() -> None:
    model = TinyGPT(n_layer=2, n_head=2, d_model=32, seq_len=16).eval()
    tokens = torch.randint(0, 256, (1, 16))
    changed = tokens.clone()
    changed[0, 10] = (changed[0, 10] + 1) % 256
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    assert torch.allclose(a[0, :10], b[0, :10], atol=1e-6)
    assert not torch.allclose(a[0, 10:], b[0, 10:])


def test_gpt_refuses_heads_that_do_not_divide_width() -> None:
    with pytest.raises(ValueError, match="d_model=30 must be a multiple of n_head=4"):
        TinyGPT(d_model=30, n_head=4)
