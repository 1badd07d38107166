"""The fault suite's two lengths: CI runs one kill point; `scripts/fault-suite` (LIGHTNING_EFF_FAULTS=long) more."""

from __future__ import annotations

import os
import random

LONG = os.environ.get("LIGHTNING_EFF_FAULTS") == "long"


def kill_points() -> list[tuple[int, float]]:
    """(epoch whose checkpoint must exist, extra delay in seconds) at which a rank is killed: a random step after it."""
    if not LONG:
        return [(2, 0.15)]
    rng = random.Random(int(os.environ.get("LIGHTNING_EFF_FAULTS_SEED", "0")))
    return [(rng.randint(1, 4), round(rng.uniform(0.0, 0.6), 2)) for _ in range(6)]
