"""The packed sparse format: exact round trip, and bytes on disk that shrink with sparsity."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_eff.pruning.masks import unstructured_masks
from lightning_eff.pruning.sparse_format import (
    LEGACY_FORMAT,
    load_sparse,
    load_sparse_into,
    pack_bits,
    pack_tensor,
    packed_state_bytes,
    save_sparse,
    unpack_bits,
)
from lightning_eff.quantization import SCHEMES, convert
from lightning_eff.quantization.prepare import swap_in_fake_quantized


def test_bits_round_trip_for_any_length() -> None:
    for count in (1, 7, 8, 9, 1000):
        mask = torch.rand(count, generator=torch.Generator().manual_seed(count)) > 0.5
        assert torch.equal(unpack_bits(pack_bits(mask), count), mask)
        assert pack_bits(mask).numel() == -(-count // 8)


def pruned_mlp(sparsity: float) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 256))
    weights = {name: p for name, p in model.named_parameters() if name.endswith("weight")}
    masks = unstructured_masks(weights, sparsity, "global")
    with torch.no_grad():
        for name, weight in weights.items():
            weight.masked_fill_(masks[name], 0.0)
    return model


@pytest.mark.parametrize("sparsity", [0.5, 0.8, 0.9])
def test_packed_file_round_trips_and_is_smaller(tmp_path: Path, sparsity: float) -> None:
    model = pruned_mlp(sparsity)
    dense_path, packed_path = tmp_path / "dense.pt", tmp_path / "packed.pt"
    torch.save(model.state_dict(), dense_path)
    save_sparse(model, packed_path)
    restored = load_sparse_into(pruned_mlp(0.0), packed_path)
    for name, tensor in model.state_dict().items():
        assert torch.equal(restored.state_dict()[name], tensor), name
    ratio = packed_path.stat().st_size / dense_path.stat().st_size
    # bitmap (1/32 of fp32) + surviving values; the biases stay dense
    assert ratio < (1 - sparsity) + 1 / 32 + 0.02, ratio


def test_integer_and_dense_tensors_pass_through(tmp_path: Path) -> None:
    state = {
        "int8": torch.tensor([[0, 3, 0, 0], [0, 0, -2, 0]] * 8, dtype=torch.int8),
        "dense": torch.randn(16),
        "empty": torch.zeros(0),
    }
    save_sparse(state, tmp_path / "x.pt")
    loaded = load_sparse(tmp_path / "x.pt")
    assert all(torch.equal(loaded[name], tensor) for name, tensor in state.items())
    assert loaded["int8"].dtype == torch.int8


def test_a_file_of_another_format_is_refused(tmp_path: Path) -> None:
    torch.save({"weights": torch.ones(2)}, tmp_path / "plain.pt")
    expected = r"is not a lightning_eff\.sparse/2 file \(nor a lightning_eff\.sparse/1 one\)"
    with pytest.raises(ValueError, match=expected):
        load_sparse(tmp_path / "plain.pt")


def test_a_small_model_pays_a_header_not_an_archive(tmp_path: Path) -> None:
    """A small CNN's int8 weights are a few kB: the file adds one short header, not ~250 bytes of zip records
    per tensor as a `torch.save` archive does."""
    state = {f"layer{i}.{kind}": torch.randn(32, 16, 3, 3) if kind == "weight" else torch.randn(32)
             for i in range(8) for kind in ("weight", "bias")}  # fmt: skip
    path = save_sparse(state, tmp_path / "small.pt")
    overhead = path.stat().st_size - packed_state_bytes(state)
    assert 0 < overhead <= 64 + 64 * len(state), overhead  # magic, length, and one JSON row of each tensor
    torch.save(state, tmp_path / "archive.pt")
    assert (tmp_path / "archive.pt").stat().st_size - packed_state_bytes(state) > 3 * overhead


def test_files_of_the_first_format_still_load(tmp_path: Path) -> None:
    model = pruned_mlp(0.8)
    state = model.state_dict()
    payload = {"format": LEGACY_FORMAT, "tensors": {name: pack_tensor(t) for name, t in state.items()}}
    torch.save(payload, tmp_path / "v1.pt")
    loaded = load_sparse(tmp_path / "v1.pt")
    assert list(loaded) == list(state) and all(torch.equal(loaded[n], t) for n, t in state.items())


def test_a_damaged_file_is_refused(tmp_path: Path) -> None:
    path = save_sparse(pruned_mlp(0.5), tmp_path / "x.pt")
    path.write_bytes(path.read_bytes() + b"extra")
    with pytest.raises(ValueError, match="bytes after the last tensor"):
        load_sparse(path)


def test_a_90_percent_sparse_int4_model_is_stored_at_under_half_its_dense_int4_bytes(tmp_path: Path) -> None:
    """int4 weights are packed two to a byte; a pruned weight is the nibble 0, so a byte is zero when both of its
    weights are: at 90% sparsity about 81% of the bytes, and the bitmap costs 1/8 of them."""
    model = pruned_mlp(0.9)
    swap_in_fake_quantized(model, ["0", "2"], SCHEMES["int4_weight_only"], 32)
    quantized = convert(model)
    state = quantized.state_dict()
    assert state["0.qweight"].dtype == torch.uint8 and state["0.qweight"].shape == (512, 128)  # two per byte
    torch.save(state, tmp_path / "dense.pt")
    save_sparse(quantized, tmp_path / "packed.pt")
    loaded = load_sparse(tmp_path / "packed.pt")
    assert all(torch.equal(loaded[name], tensor) for name, tensor in state.items())
    x = torch.randn(4, 256)
    with torch.no_grad():
        assert torch.equal(load_sparse_into(convert_copy(quantized), tmp_path / "packed.pt")(x), quantized(x))
    ratio = (tmp_path / "packed.pt").stat().st_size / (tmp_path / "dense.pt").stat().st_size
    assert ratio < 0.5, ratio  # measured 0.47 (seeded; the scales stay dense)


def convert_copy(model: nn.Module) -> nn.Module:
    """A converted model of the same shapes with its integers wiped, to load a packed file into."""
    blank = copy.deepcopy(model)
    with torch.no_grad():
        for tensor in blank.state_dict().values():
            tensor.zero_()
    return blank
