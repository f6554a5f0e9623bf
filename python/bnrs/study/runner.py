"""Plan a study, run its missing runs in parallel with joblib, store each one at once.

:func:`run` is what ``bnrs study`` calls:

1. load the dataset (for its fingerprint and sizes) and pick the budget
   (:func:`bnrs.study.questions.settings_for`);
2. build the questions, turn every (question, variant, seed) into a run configuration
   and a key; identical configurations share one run;
3. skip the keys already in ``OUT/results.sqlite``, and dispatch the others as
   independent joblib jobs, the most expensive first (``n_jobs`` processes with
   ``max(1, cores // n_jobs)`` kernel threads each; with ``backend="dask"`` the same
   jobs go to the workers of a dask cluster);
4. store every result in the database as soon as it arrives (the parent process is
   the only writer, so workers on other machines need no access to the output
   directory, only to the dataset), with a progress bar and the estimated time left;
5. write ``report.md``, ``report.html``, ``results.csv`` and the plots.

Ctrl-C (or SIGTERM, with :func:`terminate_on_sigterm`) stops the workers; the finished
runs are kept, and the same command resumes. A worker process whose study was killed
(SIGKILL) exits within a second (:func:`_watch_parent`).
A job that raises (a bug, not a divergence) is reported and not stored, so that a
rerun retries it.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .. import __version__, nn, simd_backend
from .. import datasets as bnrs_datasets
from .questions import (
    Question,
    Settings,
    build_questions,
    custom_question,
    settings_for,
    variant_seeds,
)
from .report import write_report
from .results import ResultTable, build_table
from .storage import DB_NAME, ResultStore, ResultStoreError, run_key
from .train import RunConfig, train_run

__all__ = ["DASK_TIMEOUT", "Job", "TerminatedError", "plan", "run", "stored_arguments",
           "terminate_on_sigterm", "threads_per_job"]

STUDY_FILE = "study.json"


def _joblib_return_as() -> str:
    """Results as each job finishes (joblib >= 1.4), else in order (joblib 1.3)."""
    import joblib

    major, minor = (int(part) for part in joblib.__version__.split(".")[:2])
    return "generator_unordered" if (major, minor) >= (1, 4) else "generator"


_RETURN_AS = _joblib_return_as()


@dataclass(frozen=True)
class Job:
    """One run to do: its key, configuration, seed and estimated relative cost."""

    key: str
    config: RunConfig
    seed: int
    cost: float


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def threads_per_job(n_jobs: int, backend: str | None = None, n_threads: int | None = None,
                    cores: int | None = None) -> int:
    """Kernel threads per job so that jobs x threads never exceed the cores.

    ``n_threads`` if given; 1 on a cluster (dask: each worker thread is a job); otherwise
    ``max(1, cores // n_jobs)`` (``n_jobs=-1`` means one job per core).
    """
    if n_threads is not None:
        return n_threads
    if backend == "dask":
        return 1
    cores = cores or _cores()
    workers = cores if n_jobs < 0 else n_jobs
    return max(1, cores // max(1, workers))


def _cost(config: RunConfig) -> float:
    """Relative cost of a run: per-step overhead makes small batches dear (measured)."""
    per_epoch = (config.n_train * (1.0 + 10.8 / config.batch_size)
                 + 0.45 * (config.n_val + config.n_train_eval + config.n_test_curve))
    return config.epochs * per_epoch + 0.45 * 10_000 * (1 + config.mc_samples)


def _dataset_kind(data: bnrs_datasets.Dataset) -> str:
    return "fashion-mnist" if data.name == "fashion-mnist" else "small"


def plan(questions: Sequence[Question], settings: Settings, data: bnrs_datasets.Dataset,
         dataset: str):
    """The entries ``(question, variant, seed, key)`` and the unique jobs by key."""
    entries, jobs = [], {}
    for q in questions:
        for variant in q.variants:
            regime = variant.regime or "short"
            n_train, epochs = ((q.n_train, q.epochs) if regime == "short"
                               else settings.budget(regime))
            # MC dropout is measured where dropout can pay: the overfitting regime.
            mc_samples = (settings.mc_samples if regime == "overfit"
                          and _has_dropout(variant.architecture) else 0)
            config = RunConfig(
                dataset=dataset, data_fingerprint=data.fingerprint, n_train=n_train,
                n_val=settings.n_val, architecture=variant.architecture,
                optimizer=variant.optimizer or settings.optimizer,
                lr=variant.lr if variant.lr is not None else settings.lr,
                batch_size=variant.batch_size or settings.batch_size, epochs=epochs,
                init_scale=variant.init_scale, init=variant.init,
                n_train_eval=min(settings.n_train_eval, n_train),
                n_test_curve=min(settings.n_test_curve, len(data.y_test)),
                target_accuracy=settings.target(regime), mc_samples=mc_samples)
            for seed in range(variant_seeds(q, variant, settings.seeds)):
                key = run_key(config.to_dict(), seed)
                entries.append((q, variant, seed, key))
                jobs.setdefault(key, Job(key, config, seed, _cost(config)))
    return entries, jobs


def _has_dropout(architecture: str) -> bool:
    return any(token.kind in ("dropout", "spatial_dropout")
               for token in nn.parse(architecture))


_PARENT_POLL_SECONDS = 0.5
_watched_parent: int | None = None


def _watch_parent(parent_pid: int) -> None:
    """In a worker process started by the study: exit as soon as the study is gone.

    A study killed with SIGKILL cannot stop its loky workers, and loky keeps an idle
    worker for 5 minutes (a busy one until its run ends). The check is the parent pid,
    which changes when the parent dies (the orphan is adopted); it is polled by a daemon
    thread, which runs while the kernels have released the GIL. Runs in this process,
    or on a cluster's workers started by something else, are not watched.
    """
    global _watched_parent
    if _watched_parent == parent_pid or os.getpid() == parent_pid \
            or os.getppid() != parent_pid:
        return
    _watched_parent = parent_pid

    def watch():
        while os.getppid() == parent_pid:
            time.sleep(_PARENT_POLL_SECONDS)
        os._exit(1)   # the results go nowhere now; the parent was the only writer

    threading.Thread(target=watch, name="bnrs-study-parent-watch", daemon=True).start()


def _execute(config: RunConfig, seed: int, n_threads: int, key: str,
             parent_pid: int | None = None):
    """A job: train one run; an exception comes back as text (not stored)."""
    if parent_pid is not None:
        _watch_parent(parent_pid)
    started = time.perf_counter()
    try:
        result = train_run(config, seed, n_threads)
    except Exception:   # noqa: BLE001 - reported by the parent, and retried next time
        return key, None, traceback.format_exc()
    result["metrics"]["wall_seconds"] = time.perf_counter() - started
    # Where it trained (a dask worker may be another machine): stored with the run.
    result.update(host=socket.gethostname(), simd=simd_backend())
    return key, result, None


class Progress:
    """A progress bar over all runs with the time left, on standard error.

    On a terminal it redraws one line; otherwise (a log file) it prints a line at most
    every 30 seconds. The time left is the elapsed time scaled by the estimated cost
    still to do over the cost done.
    """

    def __init__(self, jobs: Sequence[Job], reused: int, enabled: bool = True,
                 stream=None):
        self.total = len(jobs) + reused
        self.done = reused
        self.failed = self.diverged = 0
        self.cost_total = sum(job.cost for job in jobs)
        self.cost_done = 0.0
        self.start = time.perf_counter()
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = getattr(self.stream, "isatty", lambda: False)()
        self.last_print = -math.inf
        if enabled and reused:
            print(f"{reused} of {self.total} runs already in the database: skipped",
                  file=self.stream, flush=True)

    @staticmethod
    def _clock(seconds: float) -> str:
        if not math.isfinite(seconds):
            return "?"
        seconds = round(seconds)
        return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"

    def line(self) -> str:
        elapsed = time.perf_counter() - self.start
        fraction = self.cost_done / self.cost_total if self.cost_total else 1.0
        left = elapsed * (1 - fraction) / fraction if fraction > 0 else math.inf
        width = 30
        filled = round(width * self.done / self.total) if self.total else width
        extra = "".join([f", {self.diverged} diverged" if self.diverged else "",
                         f", {self.failed} FAILED" if self.failed else ""])
        return (f"[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} runs"
                f"{extra}  elapsed {self._clock(elapsed)}  left ~{self._clock(left)}")

    def update(self, job: Job, status: str) -> None:
        self.done += 1
        self.cost_done += job.cost
        self.failed += status == "failed"
        self.diverged += status == "diverged"
        if not self.enabled:
            return
        now = time.perf_counter()
        finished = self.done == self.total
        if self.tty:
            print("\r" + self.line(), end="\n" if finished else "", file=self.stream,
                  flush=True)
        elif finished or now - self.last_print >= 30:
            print(self.line(), file=self.stream, flush=True)
            self.last_print = now

    def close(self) -> None:
        if self.enabled and self.tty and self.done != self.total:
            print(file=self.stream, flush=True)


#: Seconds to wait for a dask scheduler to answer and for a first worker to join it.
DASK_TIMEOUT = 60.0


class TerminatedError(KeyboardInterrupt):
    """SIGTERM, raised in the study's main thread by :func:`terminate_on_sigterm`: the
    study stops as on Ctrl-C (its workers are killed, the finished runs kept)."""


@contextmanager
def terminate_on_sigterm():
    """Within it, SIGTERM raises :class:`TerminatedError` in the main thread (``bnrs
    study`` runs in it); the previous handler is restored on exit.

    Without it SIGTERM ends the process at once and its loky workers, which do not get
    the signal, run on until their parent-watch (:func:`_watch_parent`) notices.
    """
    if threading.current_thread() is not threading.main_thread():
        yield   # only the main thread may set handlers
        return

    def handler(signum, frame):
        raise TerminatedError(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _dask_client(scheduler: str | None):
    """A dask client of ``scheduler`` (or of a new local cluster) with a worker ready."""
    try:
        from dask.distributed import Client
    except ImportError:
        raise ImportError('--backend dask needs dask.distributed, which is not installed: '
                          'pip install "bnrs[dask]"') from None
    if scheduler is None:
        return Client(processes=True, dashboard_address=None)
    try:
        client = Client(scheduler, timeout=DASK_TIMEOUT)
    except (OSError, TimeoutError) as error:
        raise RuntimeError(f"--scheduler {scheduler}: cannot reach the dask scheduler "
                           f"within {DASK_TIMEOUT:g} s ({error})") from None
    try:
        client.wait_for_workers(1, timeout=DASK_TIMEOUT)
    except (OSError, TimeoutError):
        client.close()
        raise RuntimeError(f"--scheduler {scheduler}: no dask worker joined the scheduler "
                           f"within {DASK_TIMEOUT:g} s (start some: dask worker "
                           f"{scheduler})") from None
    return client


def _dask_results(jobs: list[Job], n_jobs: int, n_threads: int, scheduler: str | None):
    """Run ``jobs`` on a dask cluster, ``(key, result, error)`` as each one finishes.

    The jobs are submitted to the client directly, not through joblib: joblib's dask
    backend counts the cluster's threads, and with one it ran every job in the client.
    At most ``n_jobs`` are in flight (-1: all, the most expensive first by priority).
    """
    client = _dask_client(scheduler)   # first: it explains a missing dask
    from dask.distributed import as_completed

    pending = iter(enumerate(jobs))
    in_flight = {}

    def submit_next() -> None:
        index, job = next(pending, (None, None))
        if job is not None:
            future = client.submit(_execute, job.config, job.seed, n_threads, job.key,
                                   os.getpid(), pure=False, priority=len(jobs) - index)
            in_flight[future] = job
            finished.add(future)

    finished = as_completed()
    try:
        for _ in range(len(jobs) if n_jobs < 0 else n_jobs):
            submit_next()
        for future in finished:
            job = in_flight.pop(future)
            try:
                yield future.result()
            except Exception:   # noqa: BLE001 - a lost worker: reported, retried next time
                yield job.key, None, traceback.format_exc()
            submit_next()
    finally:
        for future in in_flight:
            future.cancel()
        client.close()


def _joblib_results(jobs: list[Job], n_jobs: int, n_threads: int, backend: str | None):
    """Run ``jobs`` with joblib (loky processes by default), ``(key, result, error)``."""
    from joblib import Parallel, delayed, parallel_config

    # Never more workers than jobs: an idle loky worker would not watch its parent.
    n_jobs = min(len(jobs), _cores() if n_jobs < 0 else n_jobs)
    with parallel_config(backend=backend or "loky"):
        results = Parallel(n_jobs=n_jobs, return_as=_RETURN_AS, pre_dispatch="2*n_jobs")(
            delayed(_execute)(job.config, job.seed, n_threads, job.key, os.getpid())
            for job in jobs)
        try:
            yield from results
        finally:
            # An exception in the caller (SIGTERM, Ctrl-C, a failed insert) closes the
            # generator here: joblib then kills the workers instead of finishing the runs.
            results.close()


_LOCAL_BACKENDS = ("loky", "threading", "multiprocessing")


def _execute_jobs(jobs: list[Job], store: ResultStore, n_jobs: int, n_threads: int,
                  backend: str | None, scheduler: str | None, progress: Progress) -> list:
    """Run ``jobs``, storing each result as it arrives; returns the failures."""
    if backend == "dask":
        results = _dask_results(jobs, n_jobs, n_threads, scheduler)
    elif backend is None or backend in _LOCAL_BACKENDS:
        results = _joblib_results(jobs, n_jobs, n_threads, backend)
    else:
        raise ValueError(f"backend: expected one of {', '.join(_LOCAL_BACKENDS)} or 'dask', "
                         f"got {backend!r}")
    by_key = {job.key: job for job in jobs}
    failures = []
    try:
        for key, result, error in results:
            job = by_key[key]
            if error is not None:
                failures.append((job, error))
                progress.update(job, "failed")
                print(f"\nrun failed ({job.config.architecture}, seed {job.seed}):\n"
                      f"{error}", file=sys.stderr, flush=True)
                continue
            store.put(key, job.config.to_dict(), job.seed, result, __version__)
            progress.update(job, result["status"])
    finally:
        results.close()
        progress.close()
    return failures


#: The arguments saved in ``OUT/study.json``: those that decide which runs a study has.
STUDY_ARGUMENTS = ("questions", "dataset", "quick", "seeds", "epochs", "scale",
                   "architectures")


def stored_arguments(out) -> dict:
    """The arguments of the study in ``out``, as saved in ``OUT/study.json`` by the last
    study that ran there (``--report-only`` reports on exactly that study)."""
    path = Path(out) / STUDY_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no study here to report on (run bnrs study "
                                f"--out {out} first)")
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError) as error:   # JSONDecodeError is a ValueError
        stored = error
    if not isinstance(stored, dict):
        reason = stored if isinstance(stored, Exception) else f"a JSON {type(stored).__name__}"
        # A ValueError: the file's content is wrong, not the type of an argument.
        raise ValueError(  # noqa: TRY004
            f"{path}: not a study file written by bnrs study ({reason})")
    return {name: stored[name] for name in STUDY_ARGUMENTS if name in stored}


def _study_args(**kwargs) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in kwargs.items()}


def run(questions: Sequence[int] | None = None, dataset: str = "digits", *,
        quick: bool = False, seeds: int | None = None, epochs: int | None = None,
        scale: float = 1.0, out="study-out", n_jobs: int = -1, backend: str | None = None,
        scheduler: str | None = None, architectures: Sequence[str] | None = None,
        report: bool = True, report_only: bool = False, progress: bool = True,
        n_threads: int | None = None) -> ResultTable:
    """Run (or resume) a study and write its report; returns the results table.

    Parameters
    ----------
    questions : list of int, optional
        Question numbers (default: all; see :data:`bnrs.study.questions.QUESTIONS`).
        Ignored with ``architectures``.
    dataset : str
        ``"digits"``, ``"fashion-mnist"``, a directory with the Fashion-MNIST files, or
        a .npz file (see :mod:`bnrs.datasets`).
    quick : bool
        The quick budget: few seeds (3 on digits, 2 on Fashion-MNIST) and epochs.
    seeds, epochs : int, optional
        Override the budget's number of seeds (0 .. seeds-1) and epochs.
    scale : float
        Multiply the training-subset sizes (Fashion-MNIST: 4,000 images by default;
        14.5 uses all 58,000 outside the validation split).
    out : path
        Output directory: results.sqlite, study.json, report.md/html, results.csv, plots.
    n_jobs : int, default -1
        Parallel jobs (processes); each uses ``max(1, cores // n_jobs)`` kernel threads
        unless ``n_threads`` is given. -1: one job per core (with a cluster backend: all
        workers). 1 runs in this process.
    backend : {"loky", "threading", "multiprocessing", "dask"}, optional
        Where the jobs run: a joblib backend on this machine (default loky: processes),
        or ``"dask"``: a dask.distributed cluster, at the address ``scheduler`` (or a new
        local one), every job on its workers.
    architectures : list of str, optional
        Your own comparison instead of the questions: every architecture against the
        first (on the same budget as the questions).
    report, report_only : bool
        Write the report at the end; only write it from the runs of these arguments
        already stored (nothing is trained and ``study.json`` is left as it is: see
        :func:`stored_arguments` for the arguments of the study stored in ``out``).
    progress : bool
        Show the progress bar.
    """
    out = Path(out)
    if report_only and not (out / DB_NAME).is_file():
        raise FileNotFoundError(f"{out / DB_NAME}: no stored runs to report on")
    data = bnrs_datasets.load_dataset(dataset)
    dataset_key = dataset if dataset in ("digits", "fashion-mnist") else str(
        Path(dataset).resolve())
    side = data.input_shape[-1] if len(data.input_shape) == 3 else None
    settings = settings_for(dataset_key, _dataset_kind(data), quick, len(data.y_train),
                            seeds=seeds, epochs=epochs, scale=scale, input_side=side)
    if architectures:
        question_list = [custom_question(settings, architectures)]
        for architecture in architectures:   # a bad string fails here, not in every job
            nn.from_spec(architecture, data.input_shape, data.n_classes)
    elif len(data.input_shape) != 3:
        raise ValueError(f"{data.name} has flat samples {data.input_shape}; the questions "
                         "need images (N, C, H, W): give your own dense-only networks "
                         "with architectures=[...] (--architectures)")
    else:
        question_list = build_questions(settings, questions)
    entries, jobs = plan(question_list, settings, data, dataset_key)

    store = ResultStore(out)
    if not report_only:   # a report changes nothing of the study it reports on
        try:
            (out / STUDY_FILE).write_text(json.dumps(_study_args(
                questions=questions, dataset=dataset, quick=quick, seeds=seeds,
                epochs=epochs, scale=scale, architectures=architectures), indent=2) + "\n")
        except OSError as error:
            reason = error.strerror or error
            raise ResultStoreError(f"{out / STUDY_FILE}: cannot write ({reason})") from None
    finished = store.finished_keys(jobs)
    todo = sorted((job for key, job in jobs.items() if key not in finished),
                  key=lambda job: -job.cost)
    failures: list = []
    interrupted: KeyboardInterrupt | None = None
    if not report_only and todo:
        if n_jobs == 0:
            raise ValueError("n_jobs: expected a positive int or -1")
        threads = threads_per_job(n_jobs, backend, n_threads)
        if progress:
            print(f"bnrs study: {len(entries)} (question, variant, seed) entries, "
                  f"{len(jobs)} distinct runs, {len(todo)} to do on {data.name} with "
                  f"{'one job per core' if n_jobs < 0 else f'{n_jobs} job(s)'} x "
                  f"{threads} thread(s); results in "
                  f"{store.path}", file=sys.stderr, flush=True)
        bar = Progress(todo, len(jobs) - len(todo), enabled=progress)
        try:
            failures = _execute_jobs(todo, store, n_jobs, threads, backend, scheduler, bar)
        except KeyboardInterrupt as interrupt:   # incl. TerminatedError (SIGTERM)
            interrupted = interrupt
            print(f"\ninterrupted: {len(store.finished_keys(jobs))} of {len(jobs)} runs "
                  "are stored; run the same command again to resume", file=sys.stderr)
    runs = store.get(jobs)
    table = build_table(entries, runs, question_list, out)
    if report and interrupted is None:
        write_report(out, question_list, settings, data, entries, runs, table,
                     progress=progress)
    if failures:
        raise RuntimeError(f"{len(failures)} run(s) failed (see the tracebacks above); "
                           "the others are stored, and a rerun retries the failed ones")
    if interrupted is not None:
        raise interrupted
    return table
