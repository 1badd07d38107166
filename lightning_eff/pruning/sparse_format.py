"""A compact file format for sparse weights: a bitmap of the nonzero elements plus their values.

Unstructured and N:M pruning leave zeros where `shrink` cannot remove anything, so a dense checkpoint of a 90%
sparse model is as big as the dense model. Here each tensor that is sparse enough is stored as a bitmap (one
bit per element: 1/32 of fp32, 1/8 of int8) and its nonzero values; the rest stay dense. The format works on
any state_dict, so the quantization's converted models (int8 weights, or int4 packed two to a byte, where a
pruned weight stays exactly zero) are packed the same way. `load_sparse` rebuilds the dense state_dict, which
loads strictly into the plain (or converted) module.

File (format 2): ``MAGIC``, the header's length (8 bytes, little-endian), a JSON header
``{"format": FORMAT, "tensors": [[name, dtype, shape, nonzero], ...]}`` and then every tensor's bytes, one after
another in header order: the raw little-endian elements of a dense tensor (``nonzero`` is -1), else the bitmap
(uint8, lowest bit first, ``ceil(numel / 8)`` bytes) followed by the ``nonzero`` values. One header and one blob,
not a `torch.save` archive: a zip archive costs about 250 bytes of records per tensor (a quarter of a small CNN's
int8 weights), and reading needs no pickle. Files of format 1 (a `torch.save` archive of
``{"format", "tensors": {name: {"dense": t} | {"shape", "dtype", "bitmap", "values"}}}``) still load.
"""

from __future__ import annotations

import json
import math
import struct
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_eff.checkpoints import atomic_path

FORMAT = "lightning_eff.sparse/2"
LEGACY_FORMAT = "lightning_eff.sparse/1"
MAGIC = b"LEFFSPARSE\x00\x02"
_LENGTH = struct.Struct("<Q")
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
    """Payload bytes of `state` as `save_sparse` stores it (`stored_bytes` of each tensor; the header aside)."""
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


def _raw_bytes(tensor: Tensor) -> bytes:
    """The elements of `tensor` as little-endian bytes."""
    if sys.byteorder != "little":
        raise RuntimeError("save_sparse writes little-endian files and runs on little-endian machines only")
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _from_raw(data: bytes | memoryview, dtype: torch.dtype, numel: int) -> Tensor:
    if numel == 0:
        return torch.zeros(0, dtype=dtype)
    return torch.frombuffer(bytearray(data), dtype=dtype, count=numel)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def save_sparse(model_or_state: nn.Module | Mapping[str, Tensor], path: str | Path) -> Path:
    """Write a state_dict (or a module's) in the packed format, atomically; returns the path."""
    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    rows: list[list[Any]] = []
    chunks: list[bytes] = []
    for name, tensor in state.items():
        if not isinstance(tensor, Tensor):
            continue
        if tensor.is_complex():
            raise ValueError(f"save_sparse: {name} is complex; the format stores real and integer tensors")
        entry = pack_tensor(tensor)
        dtype, shape = tensor.dtype, list(tensor.shape)
        if "dense" in entry:
            rows.append([name, _dtype_name(dtype), shape, -1])
            chunks.append(_raw_bytes(entry["dense"]))
        else:
            rows.append([name, _dtype_name(dtype), shape, entry["values"].numel()])
            chunks += [_raw_bytes(entry["bitmap"]), _raw_bytes(entry["values"])]
    header = json.dumps({"format": FORMAT, "tensors": rows}, separators=(",", ":")).encode()
    with atomic_path(path) as temporary, open(temporary, "wb") as file:
        file.write(MAGIC + _LENGTH.pack(len(header)) + header)
        for chunk in chunks:
            file.write(chunk)
    return Path(path)


def load_sparse(path: str | Path) -> dict[str, Tensor]:
    """The dense state_dict of a file written by `save_sparse`."""
    data = Path(path).read_bytes()
    if not data.startswith(MAGIC):
        return _load_legacy(path)
    start = len(MAGIC) + _LENGTH.size
    (length,) = _LENGTH.unpack_from(data, len(MAGIC))
    header = json.loads(data[start : start + length])
    view, offset = memoryview(data), start + length
    state: dict[str, Tensor] = {}
    for name, dtype_name, shape, nonzero in header["tensors"]:
        dtype, numel = getattr(torch, str(dtype_name), None), math.prod(shape)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"{path}: {name} has an unknown dtype {dtype_name!r}")
        size = torch.empty(0, dtype=dtype).element_size()
        if nonzero < 0:
            state[name] = _from_raw(view[offset : offset + numel * size], dtype, numel).reshape(shape)
            offset += numel * size
            continue
        bitmap_bytes = math.ceil(numel / 8)
        bitmap = _from_raw(view[offset : offset + bitmap_bytes], torch.uint8, bitmap_bytes)
        offset += bitmap_bytes
        values = _from_raw(view[offset : offset + nonzero * size], dtype, nonzero)
        offset += nonzero * size
        entry = {"shape": shape, "dtype": dtype, "bitmap": bitmap, "values": values}
        state[name] = unpack_tensor(entry)
    if offset != len(data):
        raise ValueError(f"{path}: {len(data) - offset} bytes after the last tensor; the file is damaged")
    return state


def _load_legacy(path: str | Path) -> dict[str, Tensor]:
    """A format-1 file (a `torch.save` archive), as earlier versions wrote it."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # not a torch archive either
        raise ValueError(f"{path} is not a {FORMAT} file ({error.__class__.__name__})") from error
    if not isinstance(payload, dict) or payload.get("format") != LEGACY_FORMAT:
        raise ValueError(f"{path} is not a {FORMAT} file (nor a {LEGACY_FORMAT} one)")
    return {name: unpack_tensor(entry) for name, entry in payload["tensors"].items()}


def load_sparse_into(module: nn.Module, path: str | Path) -> nn.Module:
    """Load a packed file strictly into `module` (the same architecture it was saved from) and return it."""
    module.load_state_dict(load_sparse(path), strict=True)
    return module
