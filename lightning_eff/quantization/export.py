"""Saving a converted model so it runs without the training code: a `torch.export` program, and its loader.

Which dimensions are dynamic was decided by exporting the zoo's converted GPT-2, BERT, Llama and
`nn.TransformerEncoder` (tests/zoo, torch 2.13) with ``input_ids`` and ``attention_mask`` as keyword inputs:

- ``torch.export.Dim.AUTO`` on the batch dimension of every input tensor and, when the model takes token ids
  (an integer or bool input of 2+ dims), on dim 1 (the sequence) of every 2+-dim input. AUTO lets torch work out
  the ranges and relations the model implies: BERT's learned positions bound the sequence to [2, 16] on its own,
  and ``input_ids`` and ``attention_mask`` came out sharing one sequence symbol. An explicit shared
  ``Dim("seq")`` made BERT's export fail ("Constraints violated (seq)! ... Suggested fixes: Dim('seq', max=16)")
  until its ``max`` was given by hand, and where a model fixes a dimension an explicit Dim is an error while
  AUTO keeps it static. AUTO does not bound what the model only indexes (GPT-2's 16 positions): a longer
  sequence fails at run time, as in eager mode.
- Images (float inputs only, e.g. [B, 3, H, W]) keep only the batch dynamic: serving one resolution is the
  norm, and H/W fix shapes downstream (a ViT's position embeddings match its patch count).
- The exported programs accepted batch and sequence sizes 1 as well (the range's lower bound of 2 is not
  checked against 1), but a dimension of size 1 *in the example* is fixed by torch (0/1 specialization), so an
  example batch of one is repeated to two before tracing.
- Hugging Face models return their key/value cache (a `DynamicCache`, which `torch.export` cannot output, and
  which an exported program could not take back in anyway): ``config.use_cache`` is off during the export.
"""

from __future__ import annotations

import importlib
import inspect
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_eff.checkpoints import atomic_path
from lightning_eff.quantization.convert import convert, quantized_layers
from lightning_eff.quantization.schemes import SCHEMES

FORMAT = "lightning_eff.quantized/1"


class NotExportableError(RuntimeError):
    """The converted model cannot be traced by `torch.export` with the given example input."""


def save_quantized(
    model: nn.Module, path: str | Path, example_args: tuple[Any, ...], example_kwargs: dict[str, Any] | None = None
) -> Path:
    """Write `model` as a `torch.export` program (no Python class needed to load it), batch and sequence dynamic.

    `example_args` and `example_kwargs` are one forward call's inputs; keyword inputs stay keyword inputs, so the
    loaded model is called like the original (``load_quantized(path)(**batch)``), with the same keywords (the
    program was traced with those; non-tensor ones are fixed to their example value). See the module docstring
    for which dimensions are dynamic and why.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    program = export_program(model, example_args, example_kwargs or {})
    with atomic_path(path) as temporary:  # a job killed mid-write leaves the previous file, not half of one
        extra = {"format": FORMAT, "scheme": _scheme_names(model), "imports": ",".join(_output_modules(program))}
        torch.export.save(program, str(temporary), extra_files=extra)
    return path


def export_program(
    model: nn.Module, example_args: tuple[Any, ...], example_kwargs: dict[str, Any]
) -> torch.export.ExportedProgram:
    """`torch.export` of `model` in eval mode with the dynamic dimensions of `dynamic_shapes`."""
    args, kwargs = _batch_of_two(example_args, example_kwargs)
    traced = _named_keywords(model.eval(), args, kwargs)
    shapes = dynamic_shapes(traced, args, kwargs)
    with _without_kv_cache(model):
        return torch.export.export(traced, args, kwargs, dynamic_shapes=shapes)


def _named_keywords(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> nn.Module:
    """`model`, or for a ``forward(self, **inputs)`` called with keywords a wrapper naming each keyword.

    torch.export (2.13) cannot match dynamic shapes to a ``**inputs`` parameter (it counts the keywords twice,
    "Must provide a tree_name when there might be a mismatch"); a signature with one keyword-only parameter
    per example keyword avoids that, and the loaded program is still called as ``model(**inputs)``.
    """
    signature = inspect.signature(model.forward)
    parameters = list(signature.parameters.values())
    catch_all = [p.name for p in parameters if p.kind is inspect.Parameter.VAR_KEYWORD]
    extra = signature.bind(*args, **kwargs).arguments.get(catch_all[0], {}) if catch_all else {}
    if not extra:
        return model
    named = [p for p in parameters if p.kind is not inspect.Parameter.VAR_KEYWORD]
    named += [inspect.Parameter(key, inspect.Parameter.KEYWORD_ONLY) for key in extra]

    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        return self.get_submodule("model")(*args, **kwargs)

    forward.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD), *named]
    )
    wrapper = type(type(model).__name__, (nn.Module,), {"forward": forward})()
    wrapper.model = model
    return wrapper.eval()


def dynamic_shapes(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """Dim.AUTO on dim 0 of every input tensor, and on dim 1 of 2+-dim ones when the model takes token ids.

    Keyed by forward's parameter names, as `torch.export` matches them (``**inputs`` gets a dict, ``*args`` a tuple).
    """
    tensors = [value for value in (*args, *kwargs.values()) if isinstance(value, Tensor)]
    tokens = any(t.dim() >= 2 and not (t.is_floating_point() or t.is_complex()) for t in tensors)

    def dims(value: Any) -> dict[int, Any] | None:
        if not isinstance(value, Tensor) or value.dim() == 0:
            return None
        marked = {0: torch.export.Dim.AUTO}
        if tokens and value.dim() >= 2:
            marked[1] = torch.export.Dim.AUTO
        return marked

    signature = inspect.signature(model.forward)
    shapes: dict[str, Any] = {}
    for name, value in signature.bind(*args, **kwargs).arguments.items():
        kind = signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_POSITIONAL:
            shapes[name] = tuple(dims(v) for v in value)
        elif kind is inspect.Parameter.VAR_KEYWORD:
            shapes[name] = {k: dims(v) for k, v in value.items()}
        else:
            shapes[name] = dims(value)
    return shapes


def check_exportable(
    model: nn.Module, example_args: tuple[Any, ...], example_kwargs: dict[str, Any] | None = None
) -> None:
    """Convert a copy of the fake-quantized `model` and export it as `save_quantized` would; raise if it fails.

    Run before training (`QuantizationAwareTraining` does, when ``export_path`` is set) so an unexportable
    forward fails in seconds with torch's reason, not after the whole run. The copy is converted on the model's
    device, then moved to the CPU with the example; `model` and the random number generators are left as they
    were, so training goes on exactly as without the check.
    """
    with torch.random.fork_rng(devices=[]):
        converted = convert(model).cpu()
        try:
            export_program(converted, example_args, example_kwargs or {})
        except Exception as error:
            lines = str(error).strip().splitlines()
            reason = f"{type(error).__name__}: {lines[0] if lines else ''}"
            raise NotExportableError(
                f"export_path: the converted model cannot be exported with torch.export ({reason}). The forward "
                "must be traceable: no Python branching on tensor values, no .item(), tensors, tuples, dicts or "
                "Hugging Face outputs as outputs. Fix the forward, or drop export_path and save `quantized_model` "
                "yourself"
            ) from error


@contextmanager
def _without_kv_cache(model: nn.Module) -> Iterator[None]:
    """Hugging Face ``config.use_cache`` off during the export: the cache is an output torch.export cannot write."""
    configs: dict[int, Any] = {}
    for module in model.modules():
        config = getattr(module, "config", None)
        if getattr(config, "use_cache", None) is True:
            configs[id(config)] = config
    for config in configs.values():
        config.use_cache = False
    try:
        yield
    finally:
        for config in configs.values():
            config.use_cache = True


def _batch_of_two(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """An example whose every tensor has batch 1, repeated to batch 2: torch would fix a batch of 1 in the graph."""
    tensors = [value for value in (*args, *kwargs.values()) if isinstance(value, Tensor)]
    if not tensors or any(t.dim() == 0 or t.shape[0] != 1 for t in tensors):
        return args, kwargs
    double = lambda value: torch.cat([value, value]) if isinstance(value, Tensor) else value  # noqa: E731
    return tuple(double(a) for a in args), {k: double(v) for k, v in kwargs.items()}


def _output_modules(program: torch.export.ExportedProgram) -> list[str]:
    """Modules defining the output's container types (HF's `ModelOutput`s), which must be imported to load it.

    torch.export stores such a type by name; loading finds it only once its module registered it with pytree.
    """
    found: set[str] = set()
    specs = [program.call_spec.out_spec]
    while specs:
        spec = specs.pop()
        if spec is None or spec.is_leaf():
            continue
        module = getattr(spec.type, "__module__", "builtins")
        if module not in ("builtins", "collections") and not module.startswith("torch"):
            found.add(module)
        specs.extend(spec.children())
    return sorted(found)


def _scheme_names(model: nn.Module) -> str:
    return ",".join(sorted({layer.scheme.name for layer in quantized_layers(model).values()}))


def load_quantized(path: str | Path) -> nn.Module:
    """The model `save_quantized` (or `QuantizationAwareTraining(export_path=...)`) wrote, ready to call.

    A model returning Hugging Face outputs needs transformers installed: their module is imported first.
    """
    extra = {"format": "", "scheme": "", "imports": ""}
    with zipfile.ZipFile(path) as archive:  # read first: the output types must be importable before the program loads
        for name in archive.namelist():
            if name.endswith("extra/imports"):
                extra["imports"] = archive.read(name).decode()
    for module in filter(None, extra["imports"].split(",")):
        if module.split(".")[0] != "transformers":  # a file names what to import: only Hugging Face's outputs
            raise ValueError(f"{path} asks to import {module!r}; only transformers' output types are imported")
        try:
            importlib.import_module(module)
        except ImportError as error:
            raise ImportError(f"{path} returns types from {module}, which cannot be imported here: {error}") from error
    program = torch.export.load(str(path), extra_files=extra)
    if extra["format"] != FORMAT:
        raise ValueError(f"{path} is not a lightning_eff quantized model (format {extra['format']!r})")
    unknown = [name for name in extra["scheme"].split(",") if name and name not in SCHEMES]
    if unknown:
        raise ValueError(f"{path} uses schemes this version does not know: {unknown}")
    return program.module()
