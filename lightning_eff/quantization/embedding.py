"""Fake-quantized `nn.Embedding`: lookups return rows rounded to the scheme's weight grid.

On small language models the token embedding (and the head tied to it) is most of the bytes, so QAT rounds
it too. A lookup has no activation to round, so every scheme is weight-only here: int8 with one scale per
row (token), or int4 with one scale per `group_size` columns. Weight scales are per row or per group within a
row, so rounding the looked-up rows gives exactly the rows of the rounded table: the forward rounds only the
rows a batch uses, never the whole table. A head tied to the embedding ([vocab, width] as a Linear's [out,
in]) rounds the same table the same way, so both convert to one set of integers.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from lightning_eff.quantization.fake_quant import fake_quantize_weight
from lightning_eff.quantization.schemes import QuantScheme


class FakeQuantizedEmbedding(nn.Embedding):
    """An `nn.Embedding` holding the same `weight` Parameter, whose looked-up rows are fake-quantized.

    With `fake_quantize` False it is exactly the float embedding (the callback trains in float until
    `start_step`). ``max_norm`` (which renormalizes the table in place on lookup) is not supported: such an
    embedding is skipped by the plan.
    """

    def __init__(
        self, num_embeddings: int, embedding_dim: int, scheme: QuantScheme, group_size: int, **kwargs: Any
    ) -> None:
        super().__init__(num_embeddings, embedding_dim, **kwargs)
        self.scheme = scheme
        self.group_size = scheme.weight_group_size(group_size)
        self.fake_quantize = True

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, scheme: QuantScheme, group_size: int) -> FakeQuantizedEmbedding:
        layer = cls(embedding.num_embeddings, embedding.embedding_dim, scheme, group_size,
                    padding_idx=embedding.padding_idx, scale_grad_by_freq=embedding.scale_grad_by_freq,
                    sparse=embedding.sparse, device="meta")  # fmt: skip
        layer.weight = embedding.weight
        layer.train(embedding.training)
        return layer

    @property
    def in_features(self) -> int:
        """The table's width: what a tied head multiplies, and what int4 groups run along."""
        return self.embedding_dim

    @property
    def out_features(self) -> int:
        return self.num_embeddings

    @property
    def bias(self) -> None:
        return None

    def linear_weight(self) -> Tensor:
        """The table as a tied head holds it, [vocab, width] = [out, in]."""
        return self.weight

    def forward(self, input: Tensor) -> Tensor:
        rows = F.embedding(input, self.weight, self.padding_idx, None, 2.0, self.scale_grad_by_freq, self.sparse)
        if not self.fake_quantize:
            return rows
        flat = rows.reshape(-1, self.embedding_dim)
        return fake_quantize_weight(flat, self.scheme.weight_bits, self.group_size).reshape(rows.shape)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, scheme={self.scheme.name} (weight-only), group_size={self.group_size}"
