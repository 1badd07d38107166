"""SIGTERM on one DDP or FSDP2 rank mid-step: with `SynchronizedSigterm` every rank stops after the same step,
promptly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.faults import sigterm_worker
from tests.workers import run_worker

pytestmark = [pytest.mark.faults, pytest.mark.slow]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_sigterm_on_rank_0_mid_step_stops_every_rank_after_the_same_step(tmp_path: Path, strategy: str) -> None:
    # rank 0 is signalled while rank 1 already waits in a collective of the step (DDP's allreduce, FSDP2's
    # all-gather or reduce-scatter): the case where Lightning's own handler (a broadcast inside the signal
    # handler) pairs with rank 1's collective and the job hangs
    result = run_worker(sigterm_worker, [str(tmp_path), "synchronized", strategy], cwd=tmp_path, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    # the step in which rank 0 was signalled is finished by both ranks, and both stop right after it
    assert ranks[0] == ranks[1] == {"stopped_after_step": sigterm_worker.SIGNAL_AT_STEP + 1, "how": "SIGTERMException"}
