"""LeNetBN inference against ONNX Runtime in CPU time, and bnrs's time per stage.

The network, data and ONNX Runtime session of ``python -m bnrs.bench.peer --framework
onnxruntime`` (4,000 images in batches of 1,000, evaluation mode), but timed in CPU time
of this process (``time.process_time``), bnrs and ONNX Runtime taking turns: on a loaded
machine the peer runner's wall-clock ratios swing with the load. ONNX Runtime's intra-op
threads do not spin (``session.intra_op.allow_spinning = 0``), so that at 2 threads its
CPU time is its work, not its waiting. ``--stages`` also prints bnrs's CPU time per step
of the fused plan on one batch (each stage repeated on its own input, so in cache; two
chained conv blocks are one step).

Needs onnxruntime and onnx beside bnrs (a separate virtual environment, as for the peer):

    python benches/bench_onnxruntime.py [--threads 1] [--rounds 15] [--stages]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import bnrs
import onnxruntime as ort
from bnrs.bench.network import LENET, make_data
from bnrs.nn import fusion
from bnrs.onnx import export
from bnrs.training import eval_logits

SAMPLES, BATCH = 4000, 1000


def session(model, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    proto = export(model, None, LENET.input_shape)
    return ort.InferenceSession(proto.SerializeToString(), options,
                                providers=["CPUExecutionProvider"])


def cpu_ms(run, repeats: int) -> float:
    """Median CPU milliseconds per call over five samples of ``repeats`` calls."""
    run()
    samples = []
    for _ in range(5):
        start = time.process_time()
        for _ in range(repeats):
            run()
        samples.append((time.process_time() - start) / repeats * 1e3)
    return statistics.median(samples)


def stages(model, images) -> None:
    batch = images[:BATCH]
    model.eval()
    print(f"bnrs per stage, one batch of {BATCH} (CPU ms):")
    print(f"  {'the whole forward':42s} {cpu_ms(lambda: model(batch), 20):7.3f}")
    # The steps the evaluation forward runs: blocks, two pooled conv blocks chained.
    steps = fusion.chain_blocks(
        fusion.fusion_plan(list(model), model._fusion_blocks, training=False))
    x = batch
    for step in steps:
        if isinstance(step, (fusion.FusedBlock, fusion.FusedChain)):
            blocks = [step] if isinstance(step, fusion.FusedBlock) else [step.first,
                                                                          step.second]
            name = " | ".join("+".join(type(m).__name__ for m in block.modules)
                              for block in blocks)
            run_step = fusion.run_block if isinstance(step, fusion.FusedBlock) else \
                fusion.run_chain
            run = functools.partial(run_step, step, x)
            lookups = sum(cpu_ms(block.folded, 200) for block in blocks)
            print(f"  {name:42s} {cpu_ms(run, 20):7.3f}"
                  f"  (staleness check and fold lookup {lookups:.3f})")
            x = run_step(step, x)
        else:
            print(f"  {type(step).__name__:42s} {cpu_ms(functools.partial(step, x), 200):7.3f}")
            x = step(x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--stages", action="store_true")
    args = parser.parse_args()
    bnrs.set_num_threads(args.threads)
    model = LENET.build(0)
    images, _ = make_data(SAMPLES)
    peer = session(model, args.threads)
    input_name = peer.get_inputs()[0].name

    def run_bnrs() -> None:
        for _ in eval_logits(model, images, BATCH):
            pass

    def run_peer() -> None:
        for start in range(0, SAMPLES, BATCH):
            peer.run(None, {input_name: images[start:start + BATCH]})

    run_bnrs()
    run_peer()
    times: dict = {run_bnrs: [], run_peer: []}
    for repeat in range(args.rounds):
        for run in (run_bnrs, run_peer) if repeat % 2 == 0 else (run_peer, run_bnrs):
            start = time.process_time()
            run()
            times[run].append(time.process_time() - start)
    ours, theirs = statistics.median(times[run_bnrs]), statistics.median(times[run_peer])
    paired = statistics.median(p / b for b, p in zip(times[run_bnrs], times[run_peer]))
    print(f"LeNetBN inference, {SAMPLES} images in batches of {BATCH}, {args.threads} "
          f"thread(s), SIMD {bnrs.simd_backend()}, onnxruntime {ort.__version__}, CPU time")
    print(f"bnrs {ours * 1e3:.1f} ms, ONNX Runtime {theirs * 1e3:.1f} ms: "
          f"ONNX Runtime / bnrs {theirs / ours:.3f} (paired median {paired:.3f})")
    if args.stages:
        stages(model, images)


if __name__ == "__main__":
    main()
