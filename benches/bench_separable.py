"""Depthwise-separable convolutions against regular ones: kernels, networks, accuracy.

``--section kernels``: per shape (N, C, H, W), a regular 3x3 conv C -> C against its
depthwise-separable replacement, a depthwise 3x3 (groups = C) then a 1x1 C -> C; forward,
and backward with the input gradient. Prints CPU ms and GFLOP/s of each (2 FLOPs per
multiply-add of the forward; the backward counts twice the forward's).

``--section networks``: small ResNet- and Inception-like networks on 1x28x28 inputs, each
against the same network with the 3x3 (and 5x5) convs of its blocks depthwise-separable
(the grammar's ``_dsc``): parameters, FLOPs per image (inference and training step,
:func:`bnrs.bench.network.network_flops`), CPU time of training epochs (Adam, batches of
64, the input gradient of the first layer skipped) and of inference (batches of 512).

``--section profile``: of one training epoch of each network, the CPU time in the
depthwise convs (forward and backward), in the other convs, and in everything else.

``--section accuracy``: the same pairs trained on a Fashion-MNIST subset (``--train``
images, ``--epochs`` epochs, Adam 1e-3, batches of 64) for ``--seeds`` seeds each, test
accuracy on the first 2,000 test images.

Each repetition times the two variants one after the other, alternating which goes
first, so that a shared machine's load falls on both alike. Times are CPU time of this
process (``time.process_time``), at ``--threads`` threads (1 by default); ratios of the
medians are printed.

    python benches/bench_separable.py [--section kernels|networks|accuracy|all]
                                      [--repeats 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import bnrs
import numpy as np
from bnrs import _core, datasets, nn, optim
from bnrs import functional as F
from bnrs.bench.network import network_flops

KERNEL_SHAPES = [(64, 16, 28, 28), (64, 32, 14, 14), (64, 64, 7, 7)]

#: name: (regular, depthwise-separable)
NETWORKS = {
    "resnet": ("c16-bn-relu-res16-res32s2-res64s2-gap",
               "c16-bn-relu-res16_dsc-res32s2_dsc-res64s2_dsc-gap"),
    "inception": ("c16-bn-relu-mp2-inc8_8_16_4_8_8-mp2-inc16_16_32_8_16_16-gap",
                  "c16-bn-relu-mp2-inc8_8_16_4_8_8_dsc-mp2-inc16_16_32_8_16_16_dsc-gap"),
}


def cpu_time(run) -> float:
    start = time.process_time()
    run()
    return time.process_time() - start


def alternate(runs: dict, repeats: int) -> dict:
    """CPU seconds of each of ``runs`` per repetition, the order alternating, after an
    untimed call of each (buffers allocated, fusion plans built)."""
    for run in runs.values():
        run()
    times = {name: [] for name in runs}
    names = list(runs)
    for repeat in range(repeats):
        for name in names if repeat % 2 == 0 else names[::-1]:
            times[name].append(cpu_time(runs[name]))
    return times


def bench_kernels(args) -> None:
    print("kernels: regular 3x3 conv C->C vs depthwise 3x3 + pointwise 1x1 C->C "
          f"(CPU ms per call, median of {args.repeats}; GFLOP/s)")
    rng = np.random.default_rng(0)
    for shape in KERNEL_SHAPES:
        n, c, h, w = shape
        x = rng.standard_normal(shape, dtype=np.float32)
        weights = {"regular": rng.standard_normal((c, c, 3, 3), dtype=np.float32) * 0.1,
                   "depthwise": rng.standard_normal((c, 1, 3, 3), dtype=np.float32) * 0.3,
                   "pointwise": rng.standard_normal((c, c, 1, 1), dtype=np.float32) * 0.2}
        conv = {"regular": {"padding": 1}, "depthwise": {"padding": 1, "groups": c},
                "pointwise": {}}
        macs = {"regular": n * c * h * w * c * 9, "depthwise": n * c * h * w * 9,
                "pointwise": n * c * h * w * c}
        gy = rng.standard_normal(shape, dtype=np.float32)
        calls = 5
        runs = {}
        for name in weights:
            def forward(name=name):
                for _ in range(calls):
                    F.conv2d(x, weights[name], None, **conv[name])

            def backward(name=name):
                for _ in range(calls):
                    F.conv2d_backward(gy, x, weights[name], **conv[name], bias=False)
            runs[f"{name} forward"], runs[f"{name} backward"] = forward, backward
        times = alternate(runs, args.repeats)
        print(f"  {n}x{c}x{h}x{w}")
        medians = {name: statistics.median(t) / calls for name, t in times.items()}
        for name, seconds in medians.items():
            kind, direction = name.split()
            flops = 2 * macs[kind] * (2 if direction == "backward" else 1)
            print(f"    {name:20s} {seconds * 1e3:8.2f} ms  {flops / seconds / 1e9:6.1f} GFLOP/s")
        for direction in ("forward", "backward"):
            separable = medians[f"depthwise {direction}"] + medians[f"pointwise {direction}"]
            print(f"    {direction}: separable {separable * 1e3:.2f} ms, regular/separable "
                  f"{medians[f'regular {direction}'] / separable:.2f}x in time, "
                  f"{macs['regular'] / (macs['depthwise'] + macs['pointwise']):.2f}x in FLOPs")


def train_epoch(model, optimizer, images, targets, batch: int = 64) -> None:
    model.train()
    for i in range(0, len(images), batch):
        optimizer.zero_grad()
        logits = model(images[i:i + batch])
        model.backward(F.cross_entropy_backward(logits, targets[i:i + batch]),
                       input_grad=False)
        optimizer.step()


def infer(model, images, batch: int = 512) -> np.ndarray:
    model.eval()
    return np.concatenate([model(images[i:i + batch]) for i in range(0, len(images), batch)])


def bench_networks(args) -> None:
    rng = np.random.default_rng(0)
    images = rng.random((args.images, 1, 28, 28), dtype=np.float32)
    targets = rng.integers(0, 10, args.images)
    for name, specs in NETWORKS.items():
        models = {spec: nn.from_spec(spec, (1, 28, 28), 10, random_state=0) for spec in specs}
        optimizers = {spec: optim.Adam(m.parameters(), lr=1e-3) for spec, m in models.items()}
        print(f"{name} (train: {args.images} images per epoch; inference: {args.images} "
              f"images; CPU s, median of {args.repeats})")
        train = alternate({spec: lambda spec=spec: train_epoch(models[spec], optimizers[spec],
                                                               images, targets)
                           for spec in specs}, args.repeats)
        inference = alternate({spec: lambda spec=spec: infer(models[spec], images)
                               for spec in specs}, args.repeats)
        for spec in specs:
            summary = models[spec].summary((1, 28, 28))
            forward, step = network_flops(models[spec])
            print(f"  {spec}\n    params {summary.total_params:,}, MFLOPs per image: "
                  f"inference {forward / 1e6:.2f}, training step {step / 1e6:.2f}; train "
                  f"{statistics.median(train[spec]):.3f} s, inference "
                  f"{statistics.median(inference[spec]):.3f} s")
        regular, separable = specs
        print(f"  regular/separable: FLOPs {network_flops(models[regular])[1] / network_flops(models[separable])[1]:.2f}x, "
              f"training time {statistics.median(train[regular]) / statistics.median(train[separable]):.2f}x, "
              f"inference time {statistics.median(inference[regular]) / statistics.median(inference[separable]):.2f}x")


def bench_profile(args) -> None:
    rng = np.random.default_rng(0)
    images = rng.random((args.images, 1, 28, 28), dtype=np.float32)
    targets = rng.integers(0, 10, args.images)
    print(f"profile: CPU s of one training epoch ({args.images} images), median of "
          f"{args.repeats}")
    for specs in NETWORKS.values():
        for spec in specs:
            model = nn.from_spec(spec, (1, 28, 28), 10, random_state=0)
            optimizer = optim.Adam(model.parameters(), lr=1e-3)
            spent = {"depthwise conv": 0.0, "other conv": 0.0}

            def timed(method, kind):
                def run(*a, **k):
                    start = time.process_time()
                    result = method(*a, **k)
                    spent[kind] += time.process_time() - start
                    return result
                return run

            for module in model.modules():
                if isinstance(module, nn.Conv2d):
                    kind = "depthwise conv" if module.groups > 1 else "other conv"
                    module.forward = timed(module.forward, kind)
                    module.backward = timed(module.backward, kind)
            rows = []
            for _ in range(args.repeats):
                spent.update(dict.fromkeys(spent, 0.0))
                total = cpu_time(lambda: train_epoch(model, optimizer, images, targets))
                rows.append((total, spent["depthwise conv"], spent["other conv"]))
            total, depthwise, other = (statistics.median(column) for column in zip(*rows))
            print(f"  {spec}: total {total:.3f} s; depthwise conv {depthwise:.3f} s "
                  f"({depthwise / total:.0%}), other conv {other:.3f} s ({other / total:.0%}), "
                  f"the rest {total - depthwise - other:.3f} s "
                  f"({(total - depthwise - other) / total:.0%})")


def bench_accuracy(args) -> None:
    data = datasets.load_fashion_mnist()
    x_test, y_test = data.X_test[:2000], data.y_test[:2000]
    print(f"accuracy: Fashion-MNIST, {args.train} training images, {args.epochs} epochs, "
          f"{len(x_test)} test images, seeds 0..{args.seeds - 1}")
    for name, specs in NETWORKS.items():
        accuracies = {spec: [] for spec in specs}
        for seed in range(args.seeds):
            order = np.random.default_rng(seed).permutation(len(data.X_train))[:args.train]
            x_train, y_train = data.X_train[order], data.y_train[order]
            for spec in specs:
                model = nn.from_spec(spec, (1, 28, 28), 10, random_state=seed)
                optimizer = optim.Adam(model.parameters(), lr=1e-3)
                shuffle = np.random.default_rng(seed + 1000)
                for _ in range(args.epochs):
                    epoch_order = shuffle.permutation(len(x_train))
                    train_epoch(model, optimizer, x_train[epoch_order], y_train[epoch_order])
                predicted = infer(model, x_test).argmax(axis=1)
                accuracies[spec].append(float(np.mean(predicted == y_test)))
        for spec in specs:
            values = accuracies[spec]
            print(f"  {spec}: mean {np.mean(values):.4f} ({', '.join(f'{v:.4f}' for v in values)})")
        differences = np.subtract(*(accuracies[spec] for spec in specs))
        print(f"  {name}: regular - separable {differences.mean():+.4f} "
              f"(per seed {', '.join(f'{d:+.4f}' for d in differences)})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--section", default="all",
                        choices=["kernels", "networks", "profile", "accuracy", "all"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--train", type=int, default=5000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    _core.set_num_threads(args.threads)
    print(f"bnrs {bnrs.__version__}, SIMD {_core.simd_backend()}, {args.threads} thread(s)")
    if args.section in ("kernels", "all"):
        bench_kernels(args)
    if args.section in ("networks", "all"):
        bench_networks(args)
    if args.section in ("profile", "all"):
        bench_profile(args)
    if args.section in ("accuracy", "all"):
        bench_accuracy(args)


if __name__ == "__main__":
    main()
