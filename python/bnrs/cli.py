"""The ``bnrs`` command: ``bnrs study ...`` and ``bnrs bench ...``, and their arguments.

The bench's arguments are parsed by :func:`parse_bench_args`, called from
:func:`bnrs.bench.main` so that ``python -m bnrs.bench`` takes the same ones.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import os
import signal
import sys
from collections.abc import Sequence

__all__ = ["bench_parser", "main", "parse_bench_args", "study_parser"]


N_QUESTIONS = 13   # bnrs.study.questions.QUESTIONS (not imported here: --help stays fast)


def study_parser() -> argparse.ArgumentParser:
    """The argument parser of ``bnrs study``."""
    parser = argparse.ArgumentParser(
        prog="bnrs study",
        description="Answer the batch-norm and dropout questions with evidence: train "
                    "every variant with several seeds, compare them paired by seed, and "
                    "write report.md, report.html, results.csv, claims.csv and "
                    "bn-cost.csv. Finished runs are "
                    "stored in OUT/results.sqlite at once: rerunning the same command "
                    "resumes an interrupted study.")
    parser.add_argument("--quick", action="store_true",
                        help=f"the quick budget: few seeds and epochs (minutes for all "
                             f"{N_QUESTIONS} questions on digits on 2 cores)")
    parser.add_argument("--questions", type=int, nargs="+", metavar="N",
                        help=f"question numbers to run (default: all, 1-{N_QUESTIONS})")
    parser.add_argument("--dataset", default="digits", metavar="NAME|PATH",
                        help="digits (default), fashion-mnist, a directory with the "
                             "Fashion-MNIST files, or a .npz file with X and y")
    parser.add_argument("--architectures", nargs="+", metavar="ARCH",
                        help="compare your own architecture strings instead of the "
                             "questions, each against the first, e.g. "
                             "c16-relu-mp2-fc64 c16-bn-relu-mp2-fc64")
    parser.add_argument("--seeds", type=_positive_int, metavar="N",
                        help="seeds per variant (default 10; --quick: 3 on digits, 2 on "
                             "Fashion-MNIST)")
    parser.add_argument("--epochs", type=_positive_int, metavar="N",
                        help="epochs per run (default: the dataset's budget)")
    parser.add_argument("--scale", type=_positive_float, default=1.0, metavar="X",
                        help="multiply the training-subset sizes (Fashion-MNIST: 4,000 "
                             "images by default; 14.5 uses all 58,000 outside the "
                             "validation split)")
    parser.add_argument("--out", default="study-out", metavar="DIR",
                        help="output directory (default: study-out)")
    parser.add_argument("--n-jobs", type=int, default=-1, metavar="N",
                        help="parallel jobs; each gets max(1, cores // N) kernel threads "
                             "(default -1: one job per core; with dask: as many as the "
                             "workers take)")
    parser.add_argument("--threads", type=_positive_int, metavar="N",
                        help="kernel threads per job (default: cores // n-jobs; 1 with "
                             "dask)")
    parser.add_argument("--backend", choices=("loky", "dask"),
                        help='loky (default): processes on this machine; dask: the '
                             'workers of a dask.distributed cluster (pip install '
                             '"bnrs[dask]")')
    parser.add_argument("--scheduler", metavar="ADDRESS",
                        help="the dask scheduler, e.g. tcp://host:8786 (default: a new "
                             "local cluster)")
    parser.add_argument("--report-only", action="store_true",
                        help="only rewrite the report of the study stored in OUT (with "
                             "the arguments saved in OUT/study.json, which it never "
                             "changes); takes only --out, --no-progress and --debug")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bar or summary on standard error")
    parser.add_argument("--debug", action="store_true",
                        help="on an error, show the Python traceback instead of one line")
    return parser


#: The options --report-only takes: where the study is, and how to show the report.
REPORT_ONLY_OPTIONS = ("report_only", "out", "no_progress", "debug")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text}")
    return value


def _given_options(parser: argparse.ArgumentParser, argv: Sequence[str]) -> list[str]:
    """The destinations of the options present in ``argv`` (abbreviations included)."""
    quiet = copy.deepcopy(parser)
    for action in quiet._actions:   # argparse has no public way to tell given from default
        action.default = argparse.SUPPRESS
    return list(vars(quiet.parse_args(list(argv))))


def study_main(argv: Sequence[str]) -> int:
    """Run ``bnrs study`` with the arguments ``argv``; returns the exit status.

    A failure prints one line naming the file or option at fault (``--debug``: the
    traceback) and returns 1 (2 for bad arguments and missing files; 130 on Ctrl-C, 143
    on SIGTERM).
    """
    parser = study_parser()
    args = parser.parse_args(list(argv))
    if args.n_jobs == 0 or args.n_jobs < -1:
        parser.error("--n-jobs: expected a positive integer or -1")
    if args.scheduler and args.backend != "dask":
        parser.error("--scheduler needs --backend dask")
    if args.report_only:
        others = [name for name in _given_options(parser, argv)
                  if name not in REPORT_ONLY_OPTIONS]
        if others:
            parser.error(f"--report-only reports the study stored in --out as it was run; "
                         f"it takes no {', '.join('--' + o.replace('_', '-') for o in others)}"
                         f" (run the study without --report-only to change it)")
    try:
        from .study import runner

        kwargs = {"questions": args.questions, "dataset": args.dataset, "quick": args.quick,
                  "seeds": args.seeds, "epochs": args.epochs, "scale": args.scale,
                  "architectures": args.architectures}
        if args.report_only:
            kwargs.update(runner.stored_arguments(args.out))
        with runner.terminate_on_sigterm():
            runner.run(out=args.out, n_jobs=args.n_jobs, backend=args.backend,
                       scheduler=args.scheduler, n_threads=args.threads,
                       report_only=args.report_only, progress=not args.no_progress,
                       **kwargs)
    except KeyboardInterrupt as interrupt:   # the runner said what it kept
        from .study.runner import TerminatedError

        return 128 + (signal.SIGTERM if isinstance(interrupt, TerminatedError)
                      else signal.SIGINT)
    except Exception as error:   # one line for the user; --debug for the traceback
        if args.debug:
            raise
        print(f"bnrs study: {_one_line(error)}", file=sys.stderr)
        return 2 if isinstance(error, (FileNotFoundError, ValueError)) else 1
    return 0


def _one_line(error: Exception) -> str:
    """The message of ``error``; its type too when the message alone would not say what
    went wrong (an error that bnrs did not word itself: rerun with --debug)."""
    text = str(error)
    if isinstance(error, (OSError, ValueError, ImportError, RuntimeError)) and text:
        return text
    return f"{type(error).__name__}: {text} (bnrs study --debug ... shows the traceback)"


def bench_parser() -> argparse.ArgumentParser:
    """The argument parser of ``bnrs bench``."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
    parser = argparse.ArgumentParser(
        prog="bnrs bench", description="Time bnrs against PyTorch (when importable): "
        "kernels, a training epoch and inference, at each thread count.")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true",
                      help="a shorter run: 2,000 training samples, 3 repeats")
    size.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, nargs="+", metavar="N",
                        default=sorted({1, usable}),
                        help="thread counts to run (default: 1 and the usable cores)")
    parser.add_argument("--repeats", type=int, metavar="R",
                        help="repeats per kernel (default 15, 3 with --quick)")
    parser.add_argument("--json", metavar="FILE", help="write every raw number here")
    parser.add_argument("--plot", metavar="FILE", help="draw the ratios (needs matplotlib)")
    parser.add_argument("--profile", action="store_true",
                        help="also time each layer of the bnrs training step, and PyTorch's "
                        "top ops")
    parser.add_argument("--no-torch", action="store_true",
                        help="run bnrs alone even if PyTorch is importable")
    network = parser.add_argument_group(
        "the network", "Which network the training and inference rows time (the peak memory "
        "and --profile are of the first).")
    which = network.add_mutually_exclusive_group()
    which.add_argument("--network", nargs="+", choices=("lenet", "inception", "resnet"),
                       metavar="NAME",
                       help="named networks: lenet (LeNetBN), inception, resnet (default: "
                       "all three; lenet alone with --smoke)")
    which.add_argument("--architecture", metavar="SPEC",
                       help="your own network as an architecture string, e.g. "
                       "c32-bn-relu-mp2-c64-bn-relu-mp2-fc256-bn-relu-d0.5 (see the README's "
                       "\"Architecture strings\"); the output layer is added")
    network.add_argument("--input-shape", type=int, nargs="+", metavar="D",
                         help="one sample's shape: C H W for images, F for features "
                         "(default 1 28 28)")
    network.add_argument("--n-classes", type=int, metavar="K",
                         help="classes, the width of the output layer (default 10)")
    network.add_argument("--batch-size", type=int, metavar="B",
                         help="training batch size (default 64)")
    network.add_argument("--inference-batch-size", type=int, metavar="B",
                         help="inference batch size, in bnrs and every peer (default 1000; "
                         "the inference rows keep about as many samples: 10,000 in a full "
                         "run, 4,000 in the peers' processes)")
    peers = parser.add_mutually_exclusive_group()
    peers.add_argument("--peers", nargs="+", choices=PEER_NAMES, metavar="NAME",
                        help="compare with these peers too on each network, in a process "
                        "of its own per peer, network and thread count: "
                        f"{', '.join(PEER_NAMES)} (default: those importable here)")
    parser.add_argument("--peer-python", action="append", default=[], metavar="NAME=PYTHON",
                        help="run peer NAME with this interpreter (a virtual environment "
                        "with the peer and bnrs); implies --peers NAME")
    peers.add_argument("--no-peers", action="store_true", help="compare with no peer")
    parser.add_argument("--rss-child", choices=("bnrs", "torch"), help=argparse.SUPPRESS)
    parser.add_argument("--scaling-child", action="store_true", help=argparse.SUPPRESS)
    return parser


#: The peers of ``bnrs bench`` (bnrs.bench.peer.PEERS, named here to keep the parser's import
#: light).
PEER_NAMES = ("keras", "onnxruntime")


def parse_bench_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The arguments of ``bnrs bench`` (``sys.argv[1:]`` if None), checked; exits with the
    usage on an error, as argparse does."""
    parser = bench_parser()
    args = parser.parse_args(argv)
    if min(args.threads) < 1:
        parser.error(f"--threads: expected counts >= 1, got {args.threads}")
    if args.repeats is not None and args.repeats < 1:
        parser.error(f"--repeats: expected at least 1, got {args.repeats}")
    args.networks = _bench_networks(parser, args)
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            parser.error("--plot needs matplotlib, which is not installed "
                         "(pip install matplotlib), or leave out --plot")
    args.peer_pythons = _peer_pythons(parser, args)
    # Both are written after the whole run: a path that cannot be written must stop it
    # before anything is measured, not after.
    for option, path in (("--json", args.json), ("--plot", args.plot)):
        problem = path and _cannot_write(path)
        if problem:
            parser.error(f"{option}: cannot write {path!r}: {problem}")
    return args


def _bench_networks(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list:
    """The :class:`bnrs.bench.network.Network` list the arguments ask for, each checked by
    building it; an error exits with one line, as argparse does."""
    from .bench.network import INPUT_SHAPE, N_CLASSES, NETWORKS, Network
    from .nn import from_spec

    for option, value in (("--batch-size", args.batch_size),
                          ("--inference-batch-size", args.inference_batch_size)):
        if value is not None and value < 1:
            parser.error(f"{option}: expected at least 1, got {value}")
    if args.n_classes is not None and args.n_classes < 1:
        parser.error(f"--n-classes: expected at least 1, got {args.n_classes}")
    shape = INPUT_SHAPE if args.input_shape is None else tuple(args.input_shape)
    if len(shape) not in (1, 3) or min(shape) < 1:
        parser.error(f"--input-shape: expected C H W (images) or F (features), each at "
                     f"least 1, got {' '.join(map(str, shape))}")
    n_classes = N_CLASSES if args.n_classes is None else args.n_classes
    if args.architecture is not None:
        networks = [Network("custom network", "custom_", args.architecture, shape,
                            n_classes)]
    else:
        names = args.network or (["lenet"] if args.smoke else list(NETWORKS))
        networks = [NETWORKS[name] for name in dict.fromkeys(names)]
        if (shape, n_classes) != (INPUT_SHAPE, N_CLASSES):
            # The speed targets are for the named networks on their own inputs.
            networks = [dataclasses.replace(network, input_shape=shape, n_classes=n_classes,
                                            min_ratio=None) for network in networks]
    for network in networks:
        try:
            from_spec(network.architecture, network.input_shape, network.n_classes,
                      random_state=0)
        except ValueError as error:
            option = "--architecture" if args.architecture is not None else "--input-shape"
            # A SpecError's message goes on with the string and a caret under the token.
            parser.error(f"{option}: {str(error).splitlines()[0]} (input shape "
                         f"{' '.join(map(str, shape))})")
    return networks


def _peer_pythons(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict:
    """{peer: interpreter} to run; exits with one line for a peer its interpreter lacks."""
    from .bench.peer import check_peer, missing_modules

    pythons = {}
    for item in args.peer_python:
        name, equals, python = item.partition("=")
        if name not in PEER_NAMES or not equals or not python:
            parser.error(f"--peer-python: expected NAME=PYTHON with NAME one of "
                         f"{', '.join(PEER_NAMES)}, got {item!r}")
        pythons[name] = python
    if args.no_peers:
        return {}
    requested = list(dict.fromkeys([*(args.peers or []), *pythons]))
    if not requested:
        # Not asked for: those this interpreter has, as PyTorch when importable.
        return {name: sys.executable for name in PEER_NAMES if not missing_modules(name)}
    for name in requested:
        pythons.setdefault(name, sys.executable)
        problem = check_peer(name, pythons[name])
        if problem:
            parser.error(problem)
    return {name: pythons[name] for name in requested}


def _cannot_write(path: str) -> str | None:
    """Why the file ``path`` cannot be created or overwritten, or None if it can."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        return f"no such directory {directory}"
    if os.path.isdir(path):
        return "it is a directory"
    if not os.access(path if os.path.exists(path) else directory, os.W_OK):
        return "permission denied"
    return None


USAGE = """\
usage: bnrs <command> [options]

commands:
  study   answer the batch-norm and dropout questions on real data (bnrs study --help)
  bench   benchmark the kernels and training (bnrs bench --help)
"""


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``bnrs`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, end="")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "study":
        return study_main(rest)
    if command == "bench":
        from . import bench

        status = bench.main(rest)
        return 0 if status is None else int(status)
    if command in ("-V", "--version"):
        from . import __version__

        print(f"bnrs {__version__}")
        return 0
    print(f"bnrs: unknown command {command!r}\n\n{USAGE}", end="", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
