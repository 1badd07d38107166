"""StepTimer: one rank's own work in each optimizer step, none of it spent waiting for another rank.

The balancer plans from these measurements, so a rank that waits in a collective for a slow peer must not look
slow itself. Each phase of a step is timed by one context manager; `finish_step` returns the finished step's
measurement. Measured:

- the fixed part: the hooks between the batch reaching the device and `training_step`, zero_grad and the
  optimizer step, and on CPU the CPU time gloo's threads spend after the last gradient (see `finish_step`);
- the part that grows with the batch: forward, and backward up to this rank's last gradient (after it, DDP
  waits for the allreduce of the last buckets, which on a fast rank is mostly waiting for the slow one).
  A compression hook runs its collectives synchronously inside backward, for every bucket but the last before
  the last gradient; it reports them through `waiting`, and they are left out like FSDP2's.
  Under FSDP2 the collectives run inside forward and backward (each block's all-gather and reduce-scatter);
  their time, reported through `waiting`, is left out of both.

Not timed: the stretch from the end of the optimizer step to the next batch, which holds Lightning's per-step
sigterm broadcast (a collective) and the data fetch, and everything an accelerator does asynchronously.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch.utils.hooks import RemovableHandle


@dataclass(frozen=True)
class StepMeasurement:
    """One optimizer step of one rank.

    Args:
        samples: samples trained in the step.
        busy_seconds: forward and backward up to the last gradient (grows with the batch).
        fixed_seconds: hooks, zero_grad, the optimizer step, gloo's own CPU work (does not).
        step_seconds: wall time from this step's start to the next one's, waiting included.
    """

    samples: int
    busy_seconds: float
    fixed_seconds: float
    step_seconds: float


class StepTimer:
    """Times the phases of each training step on one rank; `finish_step` hands over one measurement per step.

    Args:
        cpu_device: the rank computes on the CPU, so gloo's threads share its cores (their CPU time is counted).
    """

    def __init__(self, cpu_device: bool) -> None:
        self.cpu_device = cpu_device
        self._samples = 0
        self._busy_seconds = 0.0  # forward and backward: grows with the batch
        self._fixed_seconds = 0.0  # hooks, zero_grad, optimizer step: does not
        self._busy_cpu = 0.0  # this thread's CPU time in forward and backward
        self._tail_cpu = 0.0  # this process's CPU time after the last gradient: gloo's own work
        self._batch_ready: float | None = None  # when the training batch reached the device
        self._collective_seconds = 0.0  # spent in collectives since then: waiting, not work
        self._closure_seconds = 0.0  # forward and backward wall time inside the running optimizer step
        self._grad_ready = 0.0  # when this rank's latest gradient was accumulated
        self._grad_ready_cpu = (0.0, 0.0)  # and this thread's and this process's CPU time then
        self._grad_ready_waited = 0.0  # and `_waited` then
        self._in_training_step = False
        self._nested = (0.0, 0.0, 0.0)  # wall, thread CPU and waiting of backward/optimizer steps in training_step
        self._waited = 0.0  # seconds blocked in collectives inside forward and backward (FSDP2's), ever
        self._step = -1
        self._step_started = 0.0
        self._grad_hooks: list[RemovableHandle] = []

    @property
    def watched_parameters(self) -> int:
        """Parameters whose gradient-timing hook is installed (0 before the first backward and after `close`)."""
        return len(self._grad_hooks)

    def batch_ready(self) -> None:
        """The training batch has reached the device: the hooks from here to training_step are this rank's work."""
        self._batch_ready, self._collective_seconds = time.perf_counter(), 0.0

    @contextmanager
    def collective(self) -> Iterator[None]:
        """Time spent in a collective of our own (the balancer's re-plan): waiting, not this step's work."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self._collective_seconds += time.perf_counter() - started

    @contextmanager
    def waiting(self) -> Iterator[None]:
        """A collective inside forward or backward (FSDP2's all-gathers and reduce-scatters): on a fast rank
        mostly waiting for a slow one, so it is left out of the busy seconds."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self._waited += time.perf_counter() - started

    @contextmanager
    def training_step(self, samples: int) -> Iterator[None]:
        """Forward holds no collective. With manual optimization, backward and the optimizer step run inside
        training_step and are measured on their own."""
        started, started_cpu = time.perf_counter(), time.thread_time()
        if self._batch_ready is not None:
            self._fixed_seconds += max(started - self._batch_ready - self._collective_seconds, 0.0)
            self._batch_ready = None
        self._in_training_step, self._nested, waited = True, (0.0, 0.0, 0.0), self._waited
        try:
            yield
        finally:
            self._in_training_step = False
        elapsed = time.perf_counter() - started
        self._busy_seconds += elapsed - self._nested[0] - (self._waited - waited - self._nested[2])
        self._busy_cpu += time.thread_time() - started_cpu - self._nested[1]
        self._closure_seconds += elapsed
        self._samples += samples

    @contextmanager
    def backward(self, parameters: Iterable[torch.Tensor]) -> Iterator[None]:
        """Backward's compute ends when this rank's last gradient is accumulated (hooks on `parameters`)."""
        self._watch_gradients(parameters)
        started = self._grad_ready = time.perf_counter()
        started_cpu, waited = time.thread_time(), self._waited
        yield
        ended, ended_cpu = time.perf_counter(), time.process_time()
        if self._grad_ready > started:  # a compression hook's collectives before the last gradient: waiting
            self._busy_seconds += self._grad_ready - started - (self._grad_ready_waited - waited)
            self._busy_cpu += self._grad_ready_cpu[0] - started_cpu
            self._tail_cpu += ended_cpu - self._grad_ready_cpu[1]
        else:
            self._busy_seconds += ended - started - (self._waited - waited)
        self._closure_seconds += ended - started
        self._note_nested(started, started_cpu, waited)

    @contextmanager
    def optimizer_step(self) -> Iterator[None]:
        """What is not forward or backward: zero_grad, clipping, the update. The closure's collectives (DDP's
        allreduce) are inside backward, so they are not counted here."""
        started, started_cpu, self._closure_seconds = time.perf_counter(), time.thread_time(), 0.0
        waited = self._waited
        yield
        self._fixed_seconds += max(time.perf_counter() - started - self._closure_seconds, 0.0)
        self._note_nested(started, started_cpu, waited)

    def finish_step(self, step: int) -> StepMeasurement | None:
        """At the start of optimizer step `step`: the previous step's measurement (None at the first).

        On CPU, what gloo's threads still do after the last gradient (on a rank that is not waiting for a peer,
        the tail of the allreduce) is fixed work that a wall-clock timer cannot tell from waiting, but CPU time
        can: a blocked wait uses none. It is converted to wall time at this rank's pace (forward and backward
        wall time per CPU second of the training thread: about 2 on a rank held to half a core), so a slowed
        rank pays it slowly too.
        """
        if step == self._step:
            return None
        now = time.perf_counter()
        measurement = None
        if self._step >= 0:
            fixed = self._fixed_seconds
            if self.cpu_device and self._busy_cpu > 0:
                fixed += self._tail_cpu * self._busy_seconds / self._busy_cpu
            measurement = StepMeasurement(
                self._samples, max(self._busy_seconds, 1e-9), fixed, step_seconds=now - self._step_started
            )
        self._samples, self._busy_seconds, self._fixed_seconds = 0, 0.0, 0.0
        self._busy_cpu, self._tail_cpu = 0.0, 0.0
        self._step, self._step_started = step, now
        return measurement

    def close(self) -> None:
        """Remove the gradient hooks."""
        for handle in self._grad_hooks:
            handle.remove()
        self._grad_hooks = []

    def _note_nested(self, started: float, started_cpu: float, waited: float) -> None:
        """Inside training_step (manual optimization), keep this call's time out of training_step's own."""
        if self._in_training_step:
            wall, cpu, waiting = self._nested
            self._nested = (
                wall + time.perf_counter() - started,
                cpu + time.thread_time() - started_cpu,
                waiting + self._waited - waited,
            )

    def _watch_gradients(self, parameters: Iterable[torch.Tensor]) -> None:
        """Note when each parameter's gradient is accumulated (once per run; removed by `close`)."""
        if self._grad_hooks:
            return

        def ready(_: torch.Tensor) -> None:
            self._grad_ready = time.perf_counter()
            self._grad_ready_cpu = (time.thread_time(), time.process_time())  # the autograd thread, on CPU
            self._grad_ready_waited = self._waited

        self._grad_hooks = [p.register_post_accumulate_grad_hook(ready) for p in parameters if p.requires_grad]
