"""Peak resident memory of a training epoch, measured in a fresh process per framework."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

from .. import nn, optim
from ..training import batch_bounds, num_threads, train_epoch
from .network import LENET, Network
from .timing import check_target
from .torch_mirror import build_torch_network, import_torch, torch_train_epoch
from .workloads import Mode


def _reset_peak_rss() -> bool:
    """Reset this process's peak RSS to its current RSS (Linux >= 4.0); False if unable."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def _peak_rss_kib() -> int:
    """This process's peak resident set size in KiB.

    ``VmHWM`` where /proc has it: unlike ``ru_maxrss``, which after fork + exec starts from
    the parent's peak (a bench process holding PyTorch is over 1 GB), it covers only this
    process's own address space, and :func:`_reset_peak_rss` resets it.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def rss_child(framework: str, mode: Mode, threads: int, network: Network = LENET) -> dict:
    """Peak RSS of one training epoch of ``network`` in this (fresh) process, above the
    baseline after the imports and the data; printed as JSON by ``--rss-child``."""
    with num_threads(threads):
        images, labels = network.make_data(mode.train_samples)
        torch, torch_missing = import_torch(disabled=framework != "torch")
        if framework == "torch":
            if torch is None:
                raise SystemExit(torch_missing)
            torch.set_num_threads(threads)
        # After a reset the baseline is the current RSS, not the high-water mark of the
        # imports.
        reset = _reset_peak_rss()
        baseline_kib = _peak_rss_kib()
        bounds = batch_bounds(len(images), mode.batch_size, last="keep")[:mode.memory_batches]
        model = network.build()
        if torch is None:
            optimizer = optim.Adam(model.parameters(), lr=1e-3)
            train_epoch(model, nn.CrossEntropyLoss(), optimizer, images, labels, bounds)
        else:
            torch_model = build_torch_network(model, torch)
            del model
            optimizer = torch.optim.Adam(torch_model.parameters(), lr=1e-3)
            torch_train_epoch(torch_model, optimizer, torch.from_numpy(images),
                              torch.from_numpy(labels), bounds, torch)
        peak_kib = _peak_rss_kib()
    return {"framework": framework, "threads": threads, "steps": len(bounds),
            "baseline_kib": baseline_kib,
            "peak_kib": peak_kib, "epoch_kib": peak_kib - baseline_kib,
            "baseline_is_current_rss": reset}


def measure_memory(frameworks: Sequence[str], mode: Mode, threads: int,
                   network: Network = LENET) -> dict:
    """Run :func:`rss_child` for each framework in a fresh interpreter."""
    result: dict[str, Any] = {"network": network.name}
    for framework in frameworks:
        command = [sys.executable, "-m", "bnrs.bench", "--rss-child", framework,
                   "--threads", str(threads), "--architecture", network.architecture,
                   "--input-shape", *map(str, network.input_shape),
                   "--n-classes", str(network.n_classes), "--batch-size", str(mode.batch_size)]
        command += [] if mode.name == "full" else [f"--{mode.name}"]
        done = subprocess.run(command, check=False, capture_output=True, text=True,
                              timeout=1800)
        lines = done.stdout.strip().splitlines()
        if done.returncode != 0 or not lines:
            result[framework] = {"error": (done.stderr.strip().splitlines() or ["no output"])[-1]}
        else:
            result[framework] = json.loads(lines[-1])
    bnrs_kib = result["bnrs"].get("epoch_kib")
    torch_kib = result.get("torch", {}).get("epoch_kib")
    ratio = torch_kib / bnrs_kib if bnrs_kib and torch_kib is not None else None
    result["ratio"] = ratio
    result["targets"] = [check_target("peak RSS torch/bnrs", 1.0, ratio)]
    return result
