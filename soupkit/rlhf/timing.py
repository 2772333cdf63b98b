"""Wall seconds per stage of a PPO step, for ``metrics.jsonl`` and the progress line.

A step's time splits into named stages (``STAGES``); whatever no stage covers (gathering metrics,
Python between stages) is reported as ``time_other``, so the stages plus ``time_other`` add up to
the step's ``seconds`` exactly and a large ``time_other`` shows unaccounted work instead of hiding
it. On a GPU each stage boundary synchronises the device, so kernels queued by one stage are not
billed to the next (a few microseconds a boundary).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch

STAGES = ("generate", "logprobs", "reference", "watch", "values", "reward", "advantages", "optimise",
          "checkpoint")
"""In step order. ``checkpoint`` is the save after the previous step (the line of step N is
written before step N's checkpoint, so a crash in the save cannot leave a step logged twice)."""


class StageClock:
    """Accumulates seconds per stage: ``with clock("generate"): ...``; ``lap()`` closes a step."""

    def __init__(self, device: torch.device | None = None):
        self.sync = device is not None and device.type == "cuda"
        self.seconds = dict.fromkeys(STAGES, 0.0)
        self.started = time.perf_counter()

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        if stage not in self.seconds:
            raise KeyError(f"unknown PPO stage {stage!r}; known: {', '.join(STAGES)}")
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.seconds[stage] += time.perf_counter() - start

    def lap(self) -> dict[str, float]:
        """``seconds`` since the last lap and ``time_<stage>`` for every stage (``time_other`` the
        rest); the clock starts again from zero."""
        now = time.perf_counter()
        total = now - self.started
        out = {f"time_{name}": value for name, value in self.seconds.items()}
        out["time_other"] = total - sum(self.seconds.values())
        out["seconds"] = total
        self.seconds = dict.fromkeys(STAGES, 0.0)
        self.started = now
        return out

    def _sync(self) -> None:
        if self.sync:
            torch.cuda.synchronize()


def slowest(metrics: dict[str, float]) -> tuple[str, float] | None:
    """The stage that took longest in a metrics line, as ``(name, share of the step)``."""
    times = {k[5:]: v for k, v in metrics.items() if k.startswith("time_") and k != "time_other"}
    if not times or not metrics.get("seconds"):
        return None
    name = max(times, key=times.get)
    return name, times[name] / metrics["seconds"]
