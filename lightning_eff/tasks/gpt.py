"""A small GPT: pre-norm transformer blocks with causal `scaled_dot_product_attention`."""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from torch import nn
from torch.nn import functional as F

from lightning_eff.sharding import fully_shard_blocks
from lightning_eff.tasks.text import VOCAB_SIZE


class CausalSelfAttention(nn.Module):
    """Multi-head attention over earlier positions only."""

    def __init__(self, d_model: int, n_head: int, dropout: float) -> None:
        super().__init__()
        self.n_head = n_head
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, width = x.shape
        q, k, v = self.qkv(x).split(width, dim=2)
        q, k, v = (t.view(batch, seq, self.n_head, width // self.n_head).transpose(1, 2) for t in (q, k, v))
        dropout = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(batch, seq, width))


class MLP(nn.Sequential):
    """Linear-GELU-Linear as a Sequential, so channel pruning finds the chain it can physically shrink."""

    def __init__(self, d_model: int, hidden: int, dropout: float) -> None:
        super().__init__(
            OrderedDict(
                fc=nn.Linear(d_model, hidden),
                act=nn.GELU(),
                proj=nn.Linear(hidden, d_model),
                dropout=nn.Dropout(dropout),
            )
        )


class Block(nn.Module):
    """Pre-norm residual block: attention, then MLP."""

    def __init__(self, d_model: int, n_head: int, dropout: float) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_head, dropout)
        self.ln_2 = nn.LayerNorm(d_model)
        self.mlp = MLP(d_model, 4 * d_model, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class TinyGPT(L.LightningModule):
    """A byte-level GPT for the text task; every size is configurable so benchmarks can scale it.

    Args:
        n_layer: transformer blocks.
        n_head: attention heads; must divide `d_model`.
        d_model: width of the residual stream.
        seq_len: longest context the position embedding covers.
        vocab_size: 256 for bytes.
    """

    def __init__(
        self,
        n_layer: int = 2,
        n_head: int = 4,
        d_model: int = 128,
        seq_len: int = 128,
        vocab_size: int = VOCAB_SIZE,
        dropout: float = 0.0,
        lr: float = 3e-3,
        weight_decay: float = 0.01,
        warmup_steps: int = 20,
    ) -> None:
        super().__init__()
        if d_model % n_head:
            raise ValueError(f"d_model={d_model} must be a multiple of n_head={n_head}")
        self.save_hyperparameters()
        self.seq_len = seq_len
        self.lr = lr
        self.weight_decay = weight_decay
        self.warmup_steps = warmup_steps
        self.token_embedding = nn.Embedding(vocab_size, d_model)
        self.position_embedding = nn.Embedding(seq_len, d_model)
        self.blocks = nn.ModuleList(Block(d_model, n_head, dropout) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        self.example_input_array = torch.zeros(2, min(seq_len, 16), dtype=torch.long)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.token_embedding(tokens) + self.position_embedding(positions)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))

    def configure_model(self) -> None:
        """Under Lightning's `ModelParallelStrategy`: FSDP2, each block sharded as its own unit."""
        mesh = self.device_mesh
        if mesh is not None:
            fully_shard_blocks(self, list(self.blocks), mesh["data_parallel"])

    def _loss(self, batch: Sequence[torch.Tensor]) -> torch.Tensor:
        tokens, targets = batch
        logits = self(tokens)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))

    def training_step(self, batch: Sequence[torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("train_loss", loss, prog_bar=True, on_step=True, on_epoch=False)
        return loss

    def validation_step(self, batch: Sequence[torch.Tensor], batch_idx: int) -> None:
        loss = self._loss(batch)
        self.log("val_loss", loss, prog_bar=True, on_epoch=True, sync_dist=True)
        self.log("val_bits_per_byte", loss / math.log(2), on_epoch=True, sync_dist=True)

    def test_step(self, batch: Sequence[torch.Tensor], batch_idx: int) -> None:
        loss = self._loss(batch)
        self.log("test_loss", loss, on_epoch=True, sync_dist=True)
        self.log("test_bits_per_byte", loss / math.log(2), on_epoch=True, sync_dist=True)

    def configure_optimizers(self) -> Any:
        decay = [p for p in self.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.parameters() if p.dim() < 2]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.lr,
        )
        warmup = max(1, self.warmup_steps)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
