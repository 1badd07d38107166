"""Recording the student's side of a step: the inputs and output of its forward, found by attribute path.

The callback never calls the student itself: it records the call ``training_step`` (or ``test_step``) makes, so
the teacher runs on exactly those inputs and the loss reaches the student through the user's own graph.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from lightning_eff.validation import ConfigError


class Recorder:
    """Forward hooks that keep the last (args, kwargs, output) of a module's calls.

    A call through Lightning's forward redirection (DDP calls the LightningModule with training_step's
    arguments, its ``forward`` patched to run ``training_step``) is not the module's forward and is skipped:
    the pre-hook sees the patched ``forward``; the stack pairs each pre-hook with its hook for nested calls.
    """

    def __init__(self, module: nn.Module) -> None:
        self.last: tuple[tuple[Any, ...], dict[str, Any], Any] | None = None
        self._redirected: list[bool] = []
        self._handles = [
            module.register_forward_pre_hook(self._before, with_kwargs=True),
            module.register_forward_hook(self._after, with_kwargs=True),
        ]

    def _before(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        forward = module.__dict__.get("forward")
        self._redirected.append(forward is not None and "_ForwardRedirection" in getattr(forward, "__qualname__", ""))

    def _after(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        if not (self._redirected.pop() if self._redirected else False):
            self.last = (args, kwargs, output)

    def take(self) -> tuple[tuple[Any, ...], dict[str, Any], Any] | None:
        """The last call's (args, kwargs, output), once: a second `take` before another call gives None."""
        last, self.last = self.last, None
        return last

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self.last = None


def module_at(root: nn.Module, path: str | None, key: str, owner: str = "LightningModule") -> nn.Module:
    """The submodule at `path` (the root for None), or a `ConfigError` for `key` listing the available names."""
    if path is None:
        return root
    try:
        return root.get_submodule(path)
    except AttributeError:
        names = [name for name, _ in root.named_modules() if name and name.count(".") <= 2]
        shown = ", ".join(names[:20]) + (f", ... ({len(names) - 20} more)" if len(names) > 20 else "")
        raise ConfigError(key, path, f"names no module of the {owner}; modules: {shown}") from None
