"""Check docs/interop.md's PyTorch round trip: run its code block, then compare bnrs and
its PyTorch mirror both ways through the state dict.

Needs bnrs and PyTorch importable in one interpreter (bnrs.nn needs only NumPy), e.g.::

    PYTHONPATH=python /path/to/venv-with-torch/bin/python docs/torch_roundtrip.py

Not part of pytest (the test suite never imports PyTorch). Exits non-zero on a mismatch.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import torch
from bnrs import nn

DOC = Path(__file__).with_name("interop.md")

#: (architecture, input shape, n_classes): every layer kind and the grammar's options.
NETWORKS = [
    (nn.DEFAULT_ARCHITECTURE, (1, 28, 28), 10),
    (("c8k5s2p2-bnm0.05e1e-3-lrelu-ap3s1-gn4-sd0.1-c8-in-mp2-brnr2d1-fc32-ln-tanh-d0.3"
      "-fc16-bne1e-4-sigmoid-gn4-relu"), (3, 16, 16), 7),
    ("fc32-bn-relu-fc16-brnm0.1-tanh-ln-d0.2", (20,), 3),
    ("c8-bn-relu-inc4_4_8_2_4_4-res16s2-res16_postbn-inc2_2_4_2_2_2_nobn-mp2-gap",
     (3, 12, 12), 5),
]
#: Training-mode checks: no dropout (each library draws its own masks) and no batch
#: renorm (PyTorch has none).
TRAIN_NETWORKS = [
    ("c8-bnm0.2-relu-mp2-c8k3s2-bne1e-3-relu-fc16-bn-relu", (2, 12, 12), 4),
    ("fc24-bn-tanh-fc12-bnm0.01-relu", (10,), 3),
    ("c8-bn-relu-inc4_4_8_2_4_4-res16s2-gap", (2, 10, 10), 4),
]


def doc_namespace() -> dict:
    """Run the interop doc's Python block as written; its names (torch_mirror, ...)."""
    (block,) = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.DOTALL)
    namespace: dict = {}
    exec(compile(block, str(DOC), "exec"), namespace)  # noqa: S102 (the doc's own code)
    return namespace


def max_difference(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


def check(label: str, difference: float, scale: float, failures: list) -> None:
    tolerance = 1e-5 * max(1.0, scale)   # float32 rounding in different summation orders
    ok = difference <= tolerance
    print(f"  {'ok ' if ok else 'BAD'} {label}: max |difference| {difference:.2e} "
          f"(tolerance {tolerance:.1e})")
    if not ok:
        failures.append(label)


def to_torch(state: dict) -> dict:
    return {key: torch.from_numpy(np.ascontiguousarray(value)) for key, value in state.items()}


def batches(input_shape, seed: int, count: int = 3, size: int = 16):
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((size, *input_shape)) * 1.5 + 0.3).astype(np.float32)
            for _ in range(count)]


def main() -> int:
    namespace = doc_namespace()
    torch_mirror = namespace["torch_mirror"]
    print(f"PyTorch {torch.__version__}, NumPy {np.__version__}; the doc's example printed "
          "its difference above")
    failures: list[str] = []
    torch.manual_seed(0)
    for spec, input_shape, n_classes in NETWORKS:
        print(f"{spec} on {input_shape}:")
        # bnrs -> PyTorch, after training forwards (running statistics moved).
        model = nn.from_spec(spec, input_shape, n_classes, random_state=0)
        for x in batches(input_shape, 1):
            model(x)
        net = torch_mirror(model)
        net.load_state_dict(to_torch(model.state_dict()))
        model.eval()
        net.eval()
        x = batches(input_shape, 2, count=1)[0]
        expected = model(x)
        with torch.no_grad():
            check("bnrs -> PyTorch, evaluation", max_difference(
                net(torch.from_numpy(x)).numpy(), expected), np.abs(expected).max(), failures)
        # PyTorch -> bnrs: PyTorch's own initialisation and running statistics.
        net = torch_mirror(model).train()
        with torch.no_grad():
            for batch in batches(input_shape, 3):
                net(torch.from_numpy(batch))
        net.eval()
        fresh = nn.from_spec(spec, input_shape, n_classes, random_state=1)
        fresh.load_state_dict({key: value.numpy() for key, value in net.state_dict().items()})
        fresh.eval()
        with torch.no_grad():
            expected = net(torch.from_numpy(x)).numpy()
        check("PyTorch -> bnrs, evaluation", max_difference(fresh(x), expected),
              np.abs(expected).max(), failures)
        keys = list(model.state_dict())
        if keys != list(net.state_dict()):
            failures.append(f"{spec}: state-dict keys differ")
    for spec, input_shape, n_classes in TRAIN_NETWORKS:
        print(f"{spec} on {input_shape}, training mode:")
        model = nn.from_spec(spec, input_shape, n_classes, random_state=0)
        net = torch_mirror(model)
        net.load_state_dict(to_torch(model.state_dict()))
        for x in batches(input_shape, 4):
            expected = model(x)
            with torch.no_grad():
                actual = net(torch.from_numpy(x)).numpy()
        check("outputs of the last batch", max_difference(actual, expected),
              np.abs(expected).max(), failures)
        ours, theirs = model.state_dict(), net.state_dict()
        for key in ours:
            if key.endswith(("running_mean", "running_var")):
                check(f"{key} after {len(batches(input_shape, 4))} batches",
                      max_difference(ours[key], theirs[key].numpy()),
                      np.abs(ours[key]).max(), failures)
            elif key.endswith("num_batches_tracked") and int(ours[key]) != int(theirs[key]):
                failures.append(key)
    print("all agree" if not failures else f"MISMATCH: {failures}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
