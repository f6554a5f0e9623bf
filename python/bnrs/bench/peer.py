"""``python -m bnrs.bench.peer``: bnrs against Keras or ONNX Runtime, in a process of their own.

PyTorch and TensorFlow abort when loaded into one process (both register LLVM options), so
each peer runs in a child: ``bnrs bench`` starts ``PYTHON -m bnrs.bench.peer --framework F
--threads N --name NAME --key KEY --architecture SPEC --input-shape D... --n-classes K
--batch-size B --inference-batch-size B`` (PYTHON from ``--peer-python F=PYTHON``, else
the bench's own interpreter), one child per peer, network and thread count. The child imports bnrs and
the peer, builds that network in both with the same weights, times both interleaved
(:func:`.timing.measure`) and prints one JSON line, the last of its standard output; the
ratios it reports come from that one process. Without the network options it times
LeNetBN. A child for a framework its interpreter cannot import prints ``{"framework": F,
"error": "one line"}`` and exits with :data:`MISSING_EXIT_CODE`.

The peers, the way a CPU user would run them:

- ``keras``: Keras 3 on TensorFlow, channels last (Keras takes channels_first on the CPU,
  but transposes to NHWC and back around each pooling op, TensorFlow's CPU pooling taking
  NHWC only), the network mirrored by :func:`.keras_mirror.build_keras_network`; the
  images are transposed once, outside the timer, and the weights with them. Training is
  ``model.fit`` of one epoch (the bench's batch size, Adam with PyTorch's epsilon 1e-8, sparse
  cross-entropy on logits, no shuffling; Keras's default, no XLA on a CPU-only machine),
  inference ``model.predict`` in batches of the bench's inference batch. Threads:
  ``tf.config.threading.set_intra_op_parallelism_threads(N)`` and
  ``set_inter_op_parallelism_threads(1)`` before any op (one op at a time, each on N
  threads: N threads in all, as bnrs and PyTorch use).
- ``onnxruntime``: the network exported by :func:`bnrs.onnx.export`, run by an
  ``InferenceSession`` with all graph optimisations (``ORT_ENABLE_ALL``),
  ``intra_op_num_threads = N``, ``inter_op_num_threads = 1``, sequential execution;
  inference only (the file is an inference graph).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Callable, Sequence

import numpy as np

import bnrs

from .. import nn
from .keras_mirror import build_keras_network
from .network import INPUT_SHAPE, LENET, Network, Trainer
from .timing import idle_summary, measure, spread
from .workloads import MODES, Mode, with_inference_batch

#: The exit code of a child whose interpreter cannot import the peer.
MISSING_EXIT_CODE = 3

#: The version of the child's JSON: 2 when each child timed the network it was given (and
#: said which), not always LeNetBN.
SCHEMA = 2

#: Samples of the peers' training epoch and inference pass in a full run (quick and smoke
#: runs keep their own sizes).
FULL_RUN_SAMPLES = 4000


@dataclasses.dataclass(frozen=True)
class PeerInfo:
    """What the parent needs to know of a peer without importing it."""

    modules: tuple[str, ...]  # importable in the peer's interpreter
    install: str              # how to get them, for the one-line message
    label: str


PEERS = {
    "keras": PeerInfo(("tensorflow", "keras"), "pip install tensorflow-cpu keras",
                      "Keras (TensorFlow)"),
    "onnxruntime": PeerInfo(("onnxruntime", "onnx"), "pip install onnxruntime onnx",
                            "ONNX Runtime"),
}


def missing_modules(framework: str) -> list[str]:
    """The peer's modules this interpreter cannot find (without importing them)."""
    return [name for name in PEERS[framework].modules
            if importlib.util.find_spec(name) is None]


def missing_message(framework: str, python: str, missing: Sequence[str]) -> str:
    """The one line said when ``python`` lacks a peer's packages."""
    return (f"{framework}: {', '.join(missing)} not importable by {python} "
            f"({PEERS[framework].install} in a separate virtual environment with bnrs, "
            f"and pass --peer-python {framework}=THAT_VENV/bin/python)")


def _child_command(python: str, framework: str, threads: int, *options: str) -> list[str]:
    return [python, "-m", "bnrs.bench.peer", "--framework", framework, "--threads",
            str(threads), *options]


def network_options(network: Network, batch_size: int,
                    inference_batch_size: int | None = None) -> list[str]:
    """The child's options that give it ``network``, the training batch size and, when
    given, the inference batch size."""
    options = ["--name", network.name, "--key", network.key, "--architecture",
               network.architecture, "--input-shape", *map(str, network.input_shape),
               "--n-classes", str(network.n_classes), "--batch-size", str(batch_size)]
    if inference_batch_size is not None:
        options += ["--inference-batch-size", str(inference_batch_size)]
    return options


def _last_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1] if lines else "no output"


def check_peer(framework: str, python: str) -> str | None:
    """Why ``python`` cannot run the peer (one line), or None if it can."""
    try:
        done = subprocess.run(_child_command(python, framework, 1, "--check"),
                              capture_output=True, text=True, timeout=120, check=False)
    except OSError as error:
        return f"{framework}: cannot run {python}: {error.strerror or error}"
    except subprocess.TimeoutExpired:
        return f"{framework}: {python} did not answer within 120 s"
    if done.returncode == 0:
        return None
    try:
        return json.loads(_last_line(done.stdout))["error"]
    except (ValueError, KeyError, TypeError):
        return (f"{framework}: {python} cannot run bnrs.bench.peer (is bnrs installed "
                f"there?): {_last_line(done.stderr)}")


def run_peer(framework: str, python: str, threads: int, mode_name: str,
             network: Network = LENET, batch_size: int | None = None,
             inference_batch_size: int | None = None) -> dict:
    """One child's JSON for ``network`` (a dict with ``error`` if it failed); the batch
    sizes are the mode's unless given."""
    options = [] if mode_name == "full" else [f"--{mode_name}"]
    batch_size = MODES[mode_name].batch_size if batch_size is None else batch_size
    command = _child_command(python, framework, threads, *options,
                             *network_options(network, batch_size, inference_batch_size))
    failed = {"framework": framework, "threads": threads, "network": network.name}
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=3600,
                              check=False)
    except (OSError, subprocess.TimeoutExpired) as error:
        return {**failed, "error": str(error)}
    try:
        result = json.loads(_last_line(done.stdout))
    except ValueError:
        result = None
    if done.returncode != 0 or not isinstance(result, dict):
        message = result.get("error") if isinstance(result, dict) else None
        return {**failed,
                "error": message or f"exit code {done.returncode}: {_last_line(done.stderr)}"}
    return result


def peer_mode(mode: Mode) -> Mode:
    """The sizes of the peer rows: a full run trains and infers on 4,000 samples."""
    if mode.name != "full":
        return mode
    return dataclasses.replace(mode, train_samples=FULL_RUN_SAMPLES,
                               infer_batches=FULL_RUN_SAMPLES // mode.infer_batch_size)


class PeerWork:
    """One row: a bnrs run and the peer's run of the same work, each with a warm-up.

    ``key`` and ``name`` say what is timed ("inference", "train_epoch"); the row's key
    and name put the network's before them (``resnet_inference``, "ResNet inference, ...").
    """

    def __init__(self, key: str, name: str, samples: int, run_bnrs, warm_bnrs, run_peer,
                 warm_peer):
        self.key, self.name, self.samples = key, name, samples
        self.run_bnrs, self.warm_bnrs = run_bnrs, warm_bnrs
        self.run_peer, self.warm_peer = run_peer, warm_peer


# --- Keras ---------------------------------------------------------------------------------

def import_keras(threads: int):
    """Keras on TensorFlow with ``threads`` intra-op threads (set before any op)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ["KERAS_BACKEND"] = "tensorflow"
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    import keras

    return tf, keras


def keras_works(trainer: Trainer, threads: int) -> tuple[list[PeerWork], dict]:
    tf, keras = import_keras(threads)
    input_shape = trainer.network.input_shape
    network = build_keras_network(trainer.model, keras, input_shape)
    network.compile(optimizer=keras.optimizers.Adam(learning_rate=1e-3, epsilon=1e-8),
                    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    mode = trainer.mode
    # Transposed once, outside the timer.
    images = (np.ascontiguousarray(trainer.images.transpose(0, 2, 3, 1))
              if trainer.images.ndim == 4 else trainer.images)
    labels = trainer.labels
    n_infer = trainer._inference_samples()
    n_train = len(images)
    batch = mode.batch_size
    # Five full batches and one of the epoch's last size: both shapes traced in the warm-up.
    n_warm = min(n_train, 5 * batch + n_train % batch)

    def fit(n: int) -> None:
        network.fit(images[:n], labels[:n], batch_size=batch, epochs=1, shuffle=False,
                    verbose=0)

    def predict(n: int) -> None:
        network.predict(images[:n], batch_size=mode.infer_batch_size, verbose=0)

    shape = "x".join(map(str, input_shape))
    works = [
        PeerWork("inference", f"inference, {n_infer} samples, batches of "
                 f"{mode.infer_batch_size}", n_infer, trainer.bnrs_inference,
                 lambda: trainer.bnrs_inference(1), lambda: predict(n_infer),
                 lambda: predict(min(n_infer, mode.infer_batch_size))),
        PeerWork("train_epoch", f"train epoch, {n_train} x {shape}, batch {batch}, Adam",
                 n_train, trainer.bnrs_epoch, lambda: trainer.bnrs_epoch(5),
                 lambda: fit(n_train), lambda: fit(n_warm)),
    ]
    settings = (f"tf.config.threading: intra_op_parallelism_threads={threads}, "
                "inter_op_parallelism_threads=1; channels last; no XLA (Keras's CPU default)")
    versions = {"tensorflow": tf.__version__, "keras": keras.__version__}
    return works, {"versions": versions, "thread_settings": settings}


# --- ONNX Runtime --------------------------------------------------------------------------

def onnxruntime_session(model: nn.Sequential, threads: int, input_shape=INPUT_SHAPE):
    """An ONNX Runtime session of ``model`` exported by :func:`bnrs.onnx.export`."""
    import onnxruntime as ort

    from ..onnx import export

    proto = export(model, None, input_shape)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(proto.SerializeToString(), options,
                                providers=["CPUExecutionProvider"])


def onnxruntime_works(trainer: Trainer, threads: int) -> tuple[list[PeerWork], dict]:
    import onnx
    import onnxruntime as ort

    session = onnxruntime_session(trainer.model, threads, trainer.network.input_shape)
    input_name = session.get_inputs()[0].name
    mode = trainer.mode
    n_infer = trainer._inference_samples()

    def infer(n: int) -> None:
        for start in range(0, n, mode.infer_batch_size):
            session.run(None, {input_name: trainer.images[start:start + mode.infer_batch_size]})

    works = [PeerWork("inference", f"inference, {n_infer} samples, batches of "
                      f"{mode.infer_batch_size}", n_infer, trainer.bnrs_inference,
                      lambda: trainer.bnrs_inference(1), lambda: infer(n_infer),
                      lambda: infer(min(n_infer, mode.infer_batch_size)))]
    settings = (f"SessionOptions: intra_op_num_threads={threads}, inter_op_num_threads=1, "
                "ORT_ENABLE_ALL, ORT_SEQUENTIAL, CPUExecutionProvider")
    versions = {"onnxruntime": ort.__version__, "onnx": onnx.__version__}
    return works, {"versions": versions, "thread_settings": settings}


#: framework -> (trainer, threads) -> (rows, {"versions", "thread_settings"}).
BUILDERS: dict[str, Callable[[Trainer, int], tuple[list[PeerWork], dict]]] = {
    "keras": keras_works,
    "onnxruntime": onnxruntime_works,
}


def measure_peer(framework: str, mode: Mode, threads: int, network: Network = LENET) -> dict:
    """Build ``network`` in bnrs and the peer, time each row interleaved; the result the
    child prints."""
    bnrs.set_num_threads(threads)
    trainer = Trainer(mode, None, network)
    works, about = BUILDERS[framework](trainer, threads)
    rows = []
    for work in works:
        name = f"{network.name} {work.name}"
        print(f"  {framework} {threads}t: {name}", file=sys.stderr, flush=True)
        gc.collect()
        timings = measure([work.run_bnrs, work.run_peer], [work.warm_bnrs, work.warm_peer],
                          mode.epoch_repeats, 0.0, mode.settle_seconds)
        samples = timings.samples
        bnrs_time, peer_time = spread(samples[0]), spread(samples[1])
        rows.append({"key": network.key + work.key, "name": name, "samples": work.samples,
                     "bnrs_s": bnrs_time, "peer_s": peer_time,
                     "ratio": peer_time["median"] / bnrs_time["median"],
                     "paired_ratio": spread([p / b for b, p in zip(*samples)]),
                     "cores": timings.cores, **idle_summary(timings)})
    return {"schema": SCHEMA, "framework": framework, "threads": threads, "mode": mode.name,
            "network": network.name, "architecture": network.architecture,
            "input_shape": list(network.input_shape), "n_classes": network.n_classes,
            "batch_size": mode.batch_size, "inference_batch_size": mode.infer_batch_size,
            "python": sys.executable, "bnrs": bnrs.__version__,
            "simd_backend": bnrs.simd_backend(), **about, "rows": rows}


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bnrs.bench.peer",
                                     description="bnrs against one peer, interleaved in "
                                     "this process; prints one JSON line")
    parser.add_argument("--framework", required=True, choices=sorted(BUILDERS))
    parser.add_argument("--threads", type=int, required=True)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true")
    size.add_argument("--smoke", action="store_true")
    parser.add_argument("--check", action="store_true",
                        help="only say whether the peer's packages are importable")
    network = parser.add_argument_group("the network (default: LeNetBN)")
    network.add_argument("--architecture", metavar="SPEC")
    network.add_argument("--input-shape", type=int, nargs="+", metavar="D")
    network.add_argument("--n-classes", type=int, metavar="K")
    network.add_argument("--name", help="the network's name in the rows")
    network.add_argument("--key", help="the prefix of the rows' keys")
    network.add_argument("--batch-size", type=int, metavar="B",
                         help="training batch size (default: the mode's)")
    network.add_argument("--inference-batch-size", type=int, metavar="B",
                         help="inference batch size (default: the mode's)")
    return parser


def parsed_network(args: argparse.Namespace) -> Network:
    """The network the child's options give: LeNetBN's fields where left out (an
    architecture without a name is "custom network", as in ``bnrs bench``)."""
    custom = args.architecture is not None
    fields = {"architecture": args.architecture, "n_classes": args.n_classes,
              "name": args.name or ("custom network" if custom else None),
              "key": args.key if args.key is not None else ("custom_" if custom else None),
              "input_shape": None if args.input_shape is None else tuple(args.input_shape)}
    return dataclasses.replace(LENET, min_ratio=None, **{
        field: value for field, value in fields.items() if value is not None})


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    missing = missing_modules(args.framework) if args.framework in PEERS else []
    if missing:
        print(json.dumps({"framework": args.framework,
                          "error": missing_message(args.framework, sys.executable, missing)}))
        return MISSING_EXIT_CODE
    if args.check:
        print(json.dumps({"framework": args.framework, "ok": True}))
        return 0
    mode = MODES["smoke" if args.smoke else "quick" if args.quick else "full"]
    if args.inference_batch_size is not None:
        mode = with_inference_batch(mode, args.inference_batch_size)
    mode = peer_mode(mode)
    if args.batch_size is not None:
        mode = dataclasses.replace(mode, batch_size=args.batch_size)
    result = measure_peer(args.framework, mode, args.threads, parsed_network(args))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
