"""What gradient compression saved and what it cost: bytes and seconds, per optimizer step and for the whole run.

`CompressionHook` fills these in; the strategy reads them to log and report. Bytes are payload bytes this rank
contributes to each collective (numel x element size), the same measure for a dense allreduce and for the
compressor, so `ratio` compares like with like.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any


@dataclass
class Traffic:
    """Bytes and seconds of gradient communication over some span of steps.

    Args:
        bytes_dense: what a plain dense allreduce of the same buckets would have sent.
        bytes_sent: what the compressor actually sent, every collective included (scales, flags, indices).
        compress_seconds: wall time running the compressor's own code (compressing, decompressing, error
            feedback), outside synchronous collectives; with an overlapped hook its stages run on whichever thread
            completed the previous collective, and this is the sum of their spans.
        communicate_seconds: time in collectives: a synchronous one's duration, an asynchronous one's span from
            its start to its completion, while the backward pass goes on. Overlapped, the two add up to more than
            the bucket cost the step: the step time measures what overlap saved.
        nonfinite_buckets: buckets sent dense because a rank had inf/NaN in them.
    """

    bytes_dense: int = 0
    bytes_sent: int = 0
    compress_seconds: float = 0.0
    communicate_seconds: float = 0.0
    nonfinite_buckets: int = 0

    @property
    def ratio(self) -> float:
        """bytes_sent / bytes_dense: 0.5 for fp16, about 0.25 for int8; 1.0 before any traffic."""
        return self.bytes_sent / self.bytes_dense if self.bytes_dense else 1.0

    def add(self, other: Traffic) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def as_dict(self) -> dict[str, float]:
        return {**asdict(self), "ratio": self.ratio}


@dataclass
class CompressionStats:
    """Gradient-compression traffic for the last completed optimizer step (`last_step`) and the run (`total`).

    Example::

        hook = CompressionHook(PowerSGD(rank=4))
        ...
        print(hook.stats.last_step.ratio, hook.stats.total.bytes_sent)
    """

    steps: int = 0
    first_compressed_step: int | None = None  # the first synchronizing step that sent fewer bytes than dense
    last_step: Traffic = field(default_factory=Traffic)
    total: Traffic = field(default_factory=Traffic)
    current: Traffic = field(default_factory=Traffic, repr=False)

    def record_bucket(self, bucket: Traffic) -> None:
        """Add one bucket's traffic to the step in progress."""
        self.current.add(bucket)

    def end_step(self) -> None:
        """Close the step in progress (called after the last bucket of a synchronizing backward)."""
        self.last_step = self.current
        if self.first_compressed_step is None and self.current.bytes_sent < self.current.bytes_dense:
            self.first_compressed_step = self.steps
        self.total.add(self.current)
        self.current = Traffic()
        self.steps += 1

    def as_dict(self) -> dict[str, float]:
        """Flat numbers for a logger: ``step/<field>`` for the last step, ``total/<field>`` for the run."""
        step = {f"step/{k}": v for k, v in self.last_step.as_dict().items()}
        total = {f"total/{k}": v for k, v in self.total.as_dict().items()}
        return {"steps": float(self.steps), **step, **total}

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "last_step": asdict(self.last_step), "total": asdict(self.total),
                "first_compressed_step": self.first_compressed_step}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = int(state["steps"])
        self.last_step = Traffic(**state["last_step"])
        self.total = Traffic(**state["total"])
        self.first_compressed_step = state.get("first_compressed_step")  # absent in older checkpoints
        self.current = Traffic()
