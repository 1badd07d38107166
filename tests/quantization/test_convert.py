"""Conversion: integers that reproduce the fake-quantized model, the size bounds, export and reload."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_eff.quantization import SCHEMES, QuantizedLinear, convert, load_quantized, save_quantized
from lightning_eff.quantization.convert import pack_int4, unpack_int4, weight_bytes
from lightning_eff.quantization.prepare import select_layers, swap_in_fake_quantized
from lightning_eff.tasks import DigitsMLP, TinyGPT

# bf16 matmuls (weight-only and int4 schemes) round the output at ~3 significant digits; int8 x int8 is exact
# per layer, but a last-bit difference in a layer's input can move one activation to the next int8 level.
TOLERANCE = {
    "int8_dynamic": 1e-3,
    "int8_weight_only": 1e-2,
    "int4_weight_only": 1e-2,
    "int8_dynamic_act_int4_weight": 1e-2,
}
SIZE_BOUND = {4: 1 / 6, 8: 1 / 3.5}


def prepared(model: nn.Module, scheme: str, group_size: int = 32) -> nn.Module:
    names = select_layers(model, SCHEMES[scheme], group_size)
    swap_in_fake_quantized(model, names, SCHEMES[scheme], group_size)
    return model.eval()


def test_int4_packing_round_trips_every_value() -> None:
    values = torch.arange(-8, 8, dtype=torch.int8).repeat(3, 4)
    packed = pack_int4(values)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 32)
    assert torch.equal(unpack_int4(packed), values)


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_converted_gpt_matches_the_fake_quantized_one_and_meets_the_size_bound(scheme: str) -> None:
    torch.manual_seed(0)
    model = prepared(TinyGPT(), scheme)
    tokens = torch.randint(0, 256, (4, 64))
    converted = convert(model)
    layers = [m for m in converted.modules() if isinstance(m, QuantizedLinear)]
    assert len(layers) == 8  # every block Linear; the head stays float
    with torch.no_grad():
        expected, got = model(tokens), converted(tokens)
    assert float((got - expected).norm() / expected.norm()) < TOLERANCE[scheme]
    stored, fp32 = weight_bytes(converted)
    assert stored <= fp32 * SIZE_BOUND[SCHEMES[scheme].weight_bits]
    assert all(not p.requires_grad for p in converted.parameters())
    assert any(isinstance(m, nn.Linear) for m in model.modules())  # the original is left as it was


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_converted_digits_model_meets_the_size_bound(scheme: str) -> None:
    converted = convert(prepared(DigitsMLP(hidden_sizes=[256, 256]), scheme))
    stored, fp32 = weight_bytes(converted)
    assert stored <= fp32 * SIZE_BOUND[SCHEMES[scheme].weight_bits]


def test_saved_model_loads_and_runs_in_a_process_without_lightning_eff(tmp_path: Path) -> None:
    torch.manual_seed(0)
    converted = convert(prepared(TinyGPT(), "int8_dynamic_act_int4_weight"))
    path = save_quantized(converted, tmp_path / "gpt.pt2", (torch.randint(0, 256, (2, 64)),))
    tokens = torch.randint(0, 256, (3, 64))
    torch.save(tokens, tmp_path / "tokens.pt")
    with torch.no_grad():
        torch.save(converted(tokens), tmp_path / "expected.pt")
    script = f"""
import sys, torch
model = torch.export.load({str(path)!r}).module()
with torch.no_grad():
    out = model(torch.load({str(tmp_path / "tokens.pt")!r}))
assert not any(name.startswith("lightning_eff") for name in sys.modules), "lightning_eff was imported"
print("max_diff", float((out - torch.load({str(tmp_path / "expected.pt")!r})).abs().max()))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert float(result.stdout.split("max_diff")[1]) < 1e-2
    program = torch.export.load(str(path))
    saved = [t for t in [*program.state_dict.values(), *program.constants.values()] if isinstance(t, torch.Tensor)]
    # what the file holds is the converted state (integers, scales, float embeddings/head), no float copies
    assert sum(t.numel() * t.element_size() for t in saved) == sum(
        t.numel() * t.element_size() for t in converted.state_dict().values()
    )


def test_load_quantized_refuses_a_file_it_did_not_write(tmp_path: Path) -> None:
    program = torch.export.export(nn.Linear(4, 4), (torch.randn(2, 4),))
    torch.export.save(program, str(tmp_path / "other.pt2"))
    with pytest.raises(ValueError, match="not a lightning_eff quantized model"):
        load_quantized(tmp_path / "other.pt2")


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_loading_another_state_dict_replaces_the_weights_a_called_model_uses(scheme: str) -> None:
    torch.manual_seed(0)
    first = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
    second = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
    converted = [convert(prepared(model, scheme)) for model in (first, second)]
    inputs = torch.randn(5, 64)
    converted[0](inputs)  # builds any cache from the first model's integers
    converted[0].load_state_dict(converted[1].state_dict())
    assert torch.equal(converted[0](inputs), converted[1](inputs))


def test_a_model_first_called_under_inference_mode_still_runs_with_autograd() -> None:
    converted = convert(prepared(nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8)), "int4_weight_only"))
    with torch.inference_mode():
        converted(torch.randn(2, 64))
    inputs = torch.randn(2, 64, requires_grad=True)
    converted(inputs).sum().backward()
    assert inputs.grad is not None
