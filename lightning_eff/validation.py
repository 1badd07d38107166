"""Config errors a user can act on: one line naming the key, the value and what is allowed.

Shared by the Hydra schemas (`config.py`) and the callbacks and strategies, which validate their own
arguments so that Python users get the same messages as command-line users.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from fnmatch import fnmatchcase
from typing import Any


class ConfigError(ValueError):
    """A config value that is not allowed; the message is the one line a user sees."""

    def __init__(self, key: str, value: Any, rule: str) -> None:
        self.key, self.value, self.rule = key, value, rule
        super().__init__(f"{key}={_show(value)}: {rule}")

    def under(self, prefix: str) -> ConfigError:
        """The same error with its key placed under `prefix` (a group name)."""
        return ConfigError(f"{prefix}.{self.key}" if prefix else self.key, self.value, self.rule)


def _show(value: Any) -> str:
    if isinstance(value, str):
        return value if value and " " not in value else repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_show(v) for v in value) + "]"
    return str(value)


def check(ok: bool, key: str, value: Any, rule: str) -> None:
    """Raise `ConfigError(key, value, rule)` unless `ok`."""
    if not ok:
        raise ConfigError(key, value, rule)


def _kind(value: Any) -> str:
    """What a value of the wrong type is, for a rule: ``"0.5"`` and ``0.5`` print alike in a message."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a bool"
    if isinstance(value, str):
        return "a string"
    return f"a {type(value).__name__}"


def is_number(value: Any) -> bool:
    """An int or a float; not a bool (``True > 0`` holds in Python), not a string such as ``"0.5"``."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_number(key: str, value: Any, rule: str, ok: Callable[[Any], bool] | None = None) -> None:
    """Refuse a `key` that is not a number (`is_number`), then one for which `ok(value)` is false.

    `rule` says what is allowed (``"must be in [0, 1)"``); a value of the wrong type gets the same rule with
    what it was, so a string never reaches a comparison as a raw TypeError.
    """
    check(is_number(value), key, value, f"{rule} (a number, not {_kind(value)})")
    if ok is not None:
        check(ok(value), key, value, rule)


def check_int(key: str, value: Any, minimum: int) -> None:
    check(isinstance(value, int) and not isinstance(value, bool), key, value, f"must be an integer, not {_kind(value)}")
    check(value >= minimum, key, value, f"must be >= {minimum}")


def check_bool(key: str, value: Any) -> None:
    """Refuse a `key` that is not a bool (a string such as ``"no"`` would be true)."""
    check(isinstance(value, bool), key, value, "must be true or false")


def check_fraction(key: str, value: float, low_open: bool = True, high_open: bool = True) -> None:
    interval = f"{'(' if low_open else '['}0, 1{')' if high_open else ']'}"
    check_number(key, value, f"must be in {interval}")
    low_ok = value > 0 if low_open else value >= 0
    high_ok = value < 1 if high_open else value <= 1
    check(low_ok and high_ok, key, value, f"must be in {interval}")


def check_choice(key: str, value: Any, choices: tuple[str, ...]) -> None:
    check(value in choices, key, value, f"must be one of {', '.join(choices)}")


def match_globs(names: Iterable[str], patterns: Iterable[str], key: str, kind: str) -> set[str]:
    """The `names` that match any of the glob `patterns`.

    A pattern that matches none is a `ConfigError` listing the names (`kind` says what they are, e.g.
    "prunable layer"), so a typo in include/exclude fails before training instead of doing nothing.
    """
    names = list(names)
    matched: set[str] = set()
    for pattern in patterns:
        hits = {name for name in names if fnmatchcase(name, pattern)}
        if not hits:
            raise ConfigError(key, pattern, f"matches no {kind}; layers: {', '.join(names)}")
        matched |= hits
    return matched


def check_globs(key: str, value: Any) -> list[str] | None:
    """`include`/`exclude`: None, one module-name glob, or a list of them; a list (None for none) or `ConfigError`.

    A plain string is one pattern (``include="*query"``), not a list of its characters.
    """
    if value is None:
        return None
    patterns = [value] if isinstance(value, str) else value
    check(
        isinstance(patterns, (list, tuple)) and all(isinstance(p, str) and p for p in patterns),
        key,
        value,
        "must be a module-name glob or a list of them, e.g. [encoder.*,head]",
    )
    return list(patterns) or None
