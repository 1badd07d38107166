"""A compact file format for sparse weights: a bitmap of the nonzero elements plus their values.

Unstructured and N:M pruning leave zeros where `shrink` cannot remove anything, so a dense checkpoint of a 90%
sparse model is as big as the dense model. Here each tensor that is sparse enough is stored as a bitmap (one
bit per element: 1/32 of fp32, 1/8 of int8) and its nonzero values; the rest stay dense. The format works on
any state_dict, so the quantization's converted models (int8 weights, or int4 packed two to a byte, where a
pruned weight stays exactly zero) are packed the same way. `load_sparse` rebuilds the dense state_dict, which
loads strictly into the plain (or converted) module.

File: a `torch.save` archive ``{"format": FORMAT, "tensors": {name: entry}}`` where an entry is
``{"dense": tensor}`` or ``{"shape", "dtype", "bitmap" (uint8, little bit order), "values"}``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_eff.checkpoints import atomic_path

FORMAT = "lightning_eff.sparse/1"
_BIT_WEIGHTS = torch.tensor([1 << bit for bit in range(8)], dtype=torch.uint8)


def pack_bits(mask: Tensor) -> Tensor:
    """A flat bool tensor as uint8 bytes, eight elements a byte, lowest bit first."""
    flat = mask.reshape(-1).to(torch.uint8)
    padded = torch.nn.functional.pad(flat, (0, -flat.numel() % 8)).reshape(-1, 8)
    return (padded * _BIT_WEIGHTS).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: Tensor, count: int) -> Tensor:
    """The inverse of `pack_bits`: the first `count` bits as a flat bool tensor."""
    bits = packed.reshape(-1, 1).bitwise_and(_BIT_WEIGHTS).ne(0)
    return bits.reshape(-1)[:count]


def packed_entry_bytes(numel: int, nonzero: int, element_size: int) -> int:
    """Bytes of a packed tensor's payload: the bitmap and the nonzero values."""
    return math.ceil(numel / 8) + nonzero * element_size


def stored_bytes(tensor: Tensor) -> int:
    """Payload bytes of `tensor` as `save_sparse` stores it: packed or dense, whichever is smaller."""
    dense = tensor.numel() * tensor.element_size()
    if tensor.is_complex() or tensor.numel() == 0:
        return dense
    return min(dense, packed_entry_bytes(tensor.numel(), int(tensor.count_nonzero()), tensor.element_size()))


def packed_state_bytes(state: Mapping[str, Tensor]) -> int:
    """Payload bytes of `state` as `save_sparse` stores it (`stored_bytes` of each tensor)."""
    return sum(stored_bytes(tensor) for tensor in state.values())


def pack_tensor(tensor: Tensor) -> dict[str, Any]:
    """A tensor as a bitmap and its nonzero values when that is smaller, else as itself."""
    tensor = tensor.detach().cpu()
    if tensor.numel() == 0 or tensor.is_complex():
        return {"dense": tensor.clone()}
    nonzero = tensor.reshape(-1) != 0
    count = int(nonzero.sum())
    if packed_entry_bytes(tensor.numel(), count, tensor.element_size()) >= tensor.numel() * tensor.element_size():
        return {"dense": tensor.clone()}
    return {
        "shape": tuple(tensor.shape),
        "dtype": tensor.dtype,
        "bitmap": pack_bits(nonzero),
        "values": tensor.reshape(-1)[nonzero].clone(),
    }


def unpack_tensor(entry: Mapping[str, Any]) -> Tensor:
    """The dense tensor an entry of `pack_tensor` stands for."""
    if "dense" in entry:
        return entry["dense"]
    shape, dtype = tuple(entry["shape"]), entry["dtype"]
    numel = math.prod(shape)
    dense = torch.zeros(numel, dtype=dtype)
    dense[unpack_bits(entry["bitmap"], numel)] = entry["values"]
    return dense.reshape(shape)


def save_sparse(model_or_state: nn.Module | Mapping[str, Tensor], path: str | Path) -> Path:
    """Write a state_dict (or a module's) in the packed format, atomically; returns the path."""
    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    payload = {
        "format": FORMAT,
        "tensors": {name: pack_tensor(tensor) for name, tensor in state.items() if isinstance(tensor, Tensor)},
    }
    with atomic_path(path) as temporary:
        torch.save(payload, temporary)
    return Path(path)


def load_sparse(path: str | Path) -> dict[str, Tensor]:
    """The dense state_dict of a file written by `save_sparse`."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path} is not a {FORMAT} file")
    return {name: unpack_tensor(entry) for name, entry in payload["tensors"].items()}


def load_sparse_into(module: nn.Module, path: str | Path) -> nn.Module:
    """Load a packed file strictly into `module` (the same architecture it was saved from) and return it."""
    module.load_state_dict(load_sparse(path), strict=True)
    return module
