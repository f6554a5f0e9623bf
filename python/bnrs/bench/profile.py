"""``--profile``: the time per layer and stage of the bnrs training step (layer by layer,
and the executor's fused stages at each thread count); PyTorch's top ops."""

from __future__ import annotations

import math
import time
from collections import defaultdict

import numpy as np

from .. import executor, nn
from ..training import num_threads
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


def profile_step(trainer: Trainer, thread_counts, rounds: int) -> dict | None:
    """The training step as it runs (the executor's plan: fused blocks, an epoch in one
    call), stage by stage, from its stage clock: ``rounds`` epochs at each of
    ``thread_counts`` in turn, per stage the median over the rounds of its ms per step.

    None when the steps did not run as the executor's plan (a network it does not plan,
    ``BNRS_FUSED_STEP=0``, or a plan made anew during the run): no stage times.
    """
    thread_counts = list(dict.fromkeys(thread_counts))   # each count once
    model = trainer.model
    with num_threads(thread_counts[0]):
        trainer.bnrs_epoch(5)   # warm-up; makes the plan
    if not executor.set_stage_clock(model, False):
        return None
    runs: dict[int, list[dict]] = {threads: [] for threads in thread_counts}
    try:
        for _ in range(rounds):
            for threads in thread_counts:
                with num_threads(threads):
                    executor.set_stage_clock(model, True)
                    start = time.perf_counter()
                    trainer.bnrs_epoch()
                    seconds = time.perf_counter() - start
                    times = executor.stage_times(model)
                if times is None or times["steps"] == 0:
                    return None   # planned anew mid-epoch: nothing consistent to show
                runs[threads].append({**times, "epoch_s": seconds})
    finally:
        executor.set_stage_clock(model, False)

    def per_step(threads: int, value) -> float:
        return float(np.median([value(run) * 1e3 / run["steps"] for run in runs[threads]]))

    def outside(run: dict) -> float:
        inside = run["loss_s"] + run["update_s"] + sum(
            stage["forward_s"] + stage["backward_s"] for stage in run["stages"])
        return run["epoch_s"] - inside

    def at_each(value) -> list[float]:
        """``value``'s ms per step at each thread count, in the order of ``threads``."""
        return [per_step(threads, value) for threads in thread_counts]

    first = runs[thread_counts[0]][0]
    stages = [{"stage": stage["stage"],
               "forward_ms": at_each(lambda r, i=i: r["stages"][i]["forward_s"]),
               "backward_ms": at_each(lambda r, i=i: r["stages"][i]["backward_s"])}
              for i, stage in enumerate(first["stages"])]
    return {"network": trainer.network.name, "rounds": rounds, "steps": first["steps"],
            "threads": list(thread_counts), "stages": stages,
            "loss_ms": at_each(lambda r: r["loss_s"]),
            "update_ms": at_each(lambda r: r["update_s"]),
            "outside_ms": at_each(outside),
            "step_ms": at_each(lambda r: r["epoch_s"])}


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
