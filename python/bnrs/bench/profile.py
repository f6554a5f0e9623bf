"""``--profile``: the time per layer and stage of the bnrs training step; PyTorch's top ops."""

from __future__ import annotations

import math
import time
from collections import defaultdict

import numpy as np

from .. import nn
from .network import Trainer


class LayerTimer:
    """Adds up the time of each layer's forward and backward in a bnrs Sequential.

    The layers' bound methods are shadowed by timing wrappers (instance attributes) until
    :meth:`remove`.
    """

    def __init__(self, model: nn.Sequential):
        self.model = model
        self.seconds: dict[tuple[int, str], float] = defaultdict(float)
        self.labels: dict[int, str] = {}
        for index, layer in enumerate(model):
            for method in ("forward", "backward"):
                setattr(layer, method, self._timed(index, layer, method))

    def _timed(self, index: int, layer, method: str):
        inner = getattr(layer, method)

        def timed(data, *args, **kwargs):
            if index not in self.labels:
                shape = "x".join(str(d) for d in np.shape(data))
                self.labels[index] = f"{index:2d} {type(layer).__name__} {shape}"
            start = time.perf_counter()
            result = inner(data, *args, **kwargs)
            self.seconds[index, method] += time.perf_counter() - start
            return result

        return timed

    def remove(self) -> None:
        for layer in self.model:
            del layer.forward, layer.backward


def profile_bnrs(trainer: Trainer) -> dict:
    """Per-layer and per-stage time of one bnrs training epoch, in ms per batch."""
    stages: dict[str, float] = defaultdict(float)
    clock = [0.0]

    def mark(stage: str) -> None:
        now = time.perf_counter()
        stages[stage] += now - clock[0]
        clock[0] = now

    timer = LayerTimer(trainer.model)
    # A fused block runs its layers in one kernel, so only unfused layers can be timed
    # one by one; the profile says so.
    fuse = trainer.model.fuse
    trainer.model.fuse = False
    try:
        trainer.bnrs_epoch(5)  # warm-up
        timer.seconds.clear()
        stages.clear()
        clock[0] = time.perf_counter()
        trainer.bnrs_epoch(mark=mark)
    finally:
        timer.remove()
        trainer.model.fuse = fuse
    n_batches = math.ceil(len(trainer.images) / trainer.mode.batch_size)
    per_batch = 1e3 / n_batches
    layers = [{"layer": timer.labels[index],
               "forward_ms": timer.seconds[index, "forward"] * per_batch,
               "backward_ms": timer.seconds[index, "backward"] * per_batch}
              for index in sorted(timer.labels)]
    return {"batches": n_batches, "layers": layers,
            "stages_ms": {stage: seconds * per_batch for stage, seconds in stages.items()}}


def profile_torch(trainer: Trainer, top: int = 15) -> dict:
    """PyTorch's profiler over some training steps: the ops with the most self CPU time."""
    torch = trainer.torch
    n_batches = min(trainer.mode.profile_batches,
                    math.ceil(len(trainer.images) / trainer.mode.batch_size))
    trainer.torch_epoch(5)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                record_shapes=True) as profiler:
        trainer.torch_epoch(n_batches)
    events = sorted(profiler.key_averages(group_by_input_shape=True),
                    key=lambda event: event.self_cpu_time_total, reverse=True)
    total_us = sum(event.self_cpu_time_total for event in events)
    ops = [{"op": event.key, "shapes": str(event.input_shapes)[:60],
            "self_ms": event.self_cpu_time_total / 1e3 / n_batches,
            "calls": event.count / n_batches} for event in events[:top]]
    return {"batches": n_batches, "self_ms_total": total_us / 1e3 / n_batches, "ops": ops}
