"""Threads and processes: no shared mutable state, no deadlock, a bounded pool, fork-safe.

``test_determinism`` already shows every kernel bit-identical at 1 and 2 threads and
``test_nn`` a training run; here:

- several Python threads calling bnrs at once (the kernels release the GIL and share one
  rayon pool) get exactly the single-threaded results, for kernels and whole training
  runs, also while another thread changes the number of threads;
- ``BNRS_NUM_THREADS`` and ``set_num_threads`` bound the pool: the threads named
  ``bnrs-*`` in /proc/self/task are as many as asked;
- after ``os.fork`` (what multiprocessing's and joblib's fork-based backends do) the child
  computes correctly without hanging, with ``os.fork`` directly and with multiprocessing's
  "fork" start method; every wait has a timeout;
- a fitted CNNClassifier predicts the same from several threads at once and in forked
  workers, and fits in threads with different ``n_threads`` agree bit for bit.
"""

from __future__ import annotations

import multiprocessing
import sys
import threading

import bnrs
import child
import longrun
import numpy as np
import pytest
from bnrs import functional as F
from bnrs import nn, optim

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="reads /proc and forks")


@pytest.fixture
def restore_threads():
    before = bnrs.get_num_threads()
    yield
    bnrs.set_num_threads(before)


def _workload(seed: int) -> dict:
    """A mix of kernels on inputs large enough to be split between pool threads."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((4, 8, 20, 20), dtype=np.float32)
    w = rng.standard_normal((8, 8, 3, 3), dtype=np.float32)
    y = F.conv2d(x, w, padding=1)
    grads = F.conv2d_backward(y, x, w, padding=1)
    pooled, indices = F.max_pool2d(F.relu(y), 2, return_indices=True)
    normed, _, invstd = F.native_batch_norm(pooled, training=True)
    flat = normed.reshape(4, -1)
    logits = F.linear(flat, rng.standard_normal((10, flat.shape[1]), dtype=np.float32))
    target = rng.integers(0, 10, 4)
    return {"conv": y, "grad_input": grads[0], "grad_weight": grads[1], "pooled": pooled,
            "indices": indices, "normed": normed, "invstd": invstd,
            "dropout": F.dropout(normed, 0.3, seed=seed),
            "loss": np.float64(F.cross_entropy(logits, target)),
            "grad_logits": F.cross_entropy_backward(logits, target)}


def _train(seed: int) -> tuple[list, dict]:
    rng = np.random.default_rng(seed)
    model = nn.from_spec("c6-bn-relu-mp2-sd0.1-fc12-bn-relu-d0.3", (2, 10, 10), 3,
                         random_state=seed)
    opt = optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    x = rng.standard_normal((16, 2, 10, 10), dtype=np.float32)
    target = rng.integers(0, 3, 16)
    losses = []
    for _ in range(3):
        opt.zero_grad()
        losses.append(loss_fn(model(x), target))
        model.backward(loss_fn.backward(), input_grad=False)
        opt.step()
    model.eval()
    return losses, {**model.state_dict(), "eval_logits": model(x)}


def _in_threads(function, seeds, repeats: int, extra=None) -> dict:
    """Run ``function(seed)`` ``repeats`` times for every seed, one Python thread per seed
    (plus ``extra``, a function run in its own thread until the others finish)."""
    results = {seed: [] for seed in seeds}
    failures = []
    done = threading.Event()

    def worker(seed):
        try:
            for _ in range(repeats):
                results[seed].append(function(seed))
        except BaseException as error:  # noqa: BLE001 - re-raised below, not lost
            failures.append(error)

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in seeds]
    helper = threading.Thread(target=extra, args=(done,)) if extra else None
    for thread in threads + ([helper] if helper else []):
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    done.set()
    if helper:
        helper.join(timeout=60)
    assert not any(t.is_alive() for t in threads + ([helper] if helper else [])), "deadlock"
    assert not failures, failures
    return results


def _assert_identical(actual, expected, what):
    if isinstance(expected, tuple):
        for got, want in zip(actual, expected):
            _assert_identical(got, want, what)
    elif isinstance(expected, dict):
        assert actual.keys() == expected.keys()
        for key in expected:
            _assert_identical(actual[key], expected[key], f"{what}: {key}")
    elif isinstance(expected, list):
        assert actual == expected, what
    else:
        assert np.array_equal(actual, expected), what


SEEDS = [0, 1, 2, 3]
_FORKED_CLF = _FORKED_X = None  # set before forking: what the workers predict with


def test_python_threads_calling_kernels_at_once_get_the_sequential_results():
    expected = {seed: _workload(seed) for seed in SEEDS}
    results = _in_threads(_workload, SEEDS, repeats=15)
    for seed in SEEDS:
        for result in results[seed]:
            _assert_identical(result, expected[seed], f"seed {seed}")


def test_python_threads_training_at_once_get_the_sequential_results():
    expected = {seed: _train(seed) for seed in SEEDS}
    results = _in_threads(_train, SEEDS, repeats=3)
    for seed in SEEDS:
        for result in results[seed]:
            _assert_identical(result, expected[seed], f"training run {seed}")


def test_threads_evaluating_with_shared_running_statistics():
    """Evaluation only reads the running statistics: threads sharing them must not fail
    (a model shared for inference); updating them concurrently is a race, refused."""
    rng = np.random.default_rng(3)
    running_mean = rng.standard_normal(6).astype(np.float32)
    running_var = rng.uniform(0.5, 2, 6).astype(np.float32)

    def evaluate(seed):
        x = np.random.default_rng(seed).standard_normal((8, 6, 5, 5)).astype(np.float32)
        return F.batch_norm(x, running_mean, running_var, training=False)

    expected = {seed: evaluate(seed) for seed in SEEDS}
    results = _in_threads(evaluate, SEEDS, repeats=50)
    for seed in SEEDS:
        for result in results[seed]:
            _assert_identical(result, expected[seed], f"seed {seed}")


def test_changing_the_thread_count_while_other_threads_compute(restore_threads):
    expected = {seed: _workload(seed) for seed in SEEDS[:3]}

    def switch(done):
        count = 0
        while not done.is_set():
            bnrs.set_num_threads(1 + count % 3)
            count += 1

    results = _in_threads(_workload, SEEDS[:3], repeats=10, extra=switch)
    for seed in SEEDS[:3]:
        for result in results[seed]:
            _assert_identical(result, expected[seed], f"seed {seed}")


# --------------------------------------------------------------------------- pool size

THREAD_COUNT_CHILD = """
    import os, time
    import numpy as np
    import bnrs
    from bnrs import functional as F

    def pool_threads():
        names = []
        for task in os.listdir("/proc/self/task"):
            try:
                with open(f"/proc/self/task/{task}/comm") as comm:
                    names.append(comm.read().strip())
            except (FileNotFoundError, ProcessLookupError):  # a thread that just exited
                pass
        return sum(name.startswith("bnrs-") for name in names)

    def settle(expected):
        # A replaced pool's threads exit on their own, "soon" (rayon has no synchronous
        # shutdown): wait for them, up to 30 s. With 5 s, a replaced one-thread pool's
        # worker was still there at the deadline in about one run in fifty, asleep in a
        # futex wait, and gone 50 ms later; with 30 s, never in 1,100 runs.
        deadline = time.monotonic() + 30
        while pool_threads() != expected and time.monotonic() < deadline:
            time.sleep(0.01)
        return pool_threads()

    x = np.ones((64, 64, 32, 32), np.float32)
    F.relu(x)
    print("START", bnrs.get_num_threads(), settle(bnrs.get_num_threads()))
    for n in (1, 3, 2):
        bnrs.set_num_threads(n)
        F.relu(x)
        print("SET", n, bnrs.get_num_threads(), settle(n))
"""


@pytest.mark.parametrize("variable, expected", [("3", 3), ("1", 1)])
def test_bnrs_num_threads_and_set_num_threads_bound_the_pool(variable, expected):
    result = child.run(THREAD_COUNT_CHILD, env={"BNRS_NUM_THREADS": variable})
    lines = [line.split() for line in result.stdout.splitlines()]
    assert lines[0] == ["START", str(expected), str(expected)]
    assert lines[1:] == [["SET", str(n), str(n), str(n)] for n in (1, 3, 2)]


@pytest.mark.parametrize("variable", ["0", "-2", "many", "", "99999", "-1", "abc", "2.5"])
def test_an_invalid_bnrs_num_threads_falls_back_to_the_cores_with_a_warning(variable):
    # Once ignored without a word.
    result = child.run("""
        import os, warnings
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import bnrs
        print(bnrs.get_num_threads(), len(os.sched_getaffinity(0)))
        for warning in caught:
            print(warning.category.__name__, warning.filename, warning.message, sep="|")
    """, env={"BNRS_NUM_THREADS": variable})
    lines = result.stdout.splitlines()
    threads, cores = lines[0].split()
    assert threads == cores
    assert lines[1:] == [
        (f"RuntimeWarning|<string>|BNRS_NUM_THREADS: expected an int in [1, 1024], got "
         f"'{variable}'; ignored, using the default: {cores} (the number of cores)")]


def test_a_valid_bnrs_num_threads_gives_no_warning():
    result = child.run("""
        import warnings
        warnings.simplefilter("error")
        import bnrs
        print(bnrs.get_num_threads())
    """, env={"BNRS_NUM_THREADS": " 2 "})
    assert result.stdout.split() == ["2"]


@pytest.mark.parametrize("n", [0, -1])
def test_set_num_threads_rejects_non_positive_counts(restore_threads, n):
    with pytest.raises(ValueError, match="n_threads"):
        bnrs.set_num_threads(n)


@pytest.mark.parametrize("n", [2**64, -(2**64), 1025, 10**6])
def test_set_num_threads_rejects_counts_out_of_range_with_a_value_error(restore_threads, n):
    with pytest.raises(ValueError, match="n_threads"):
        bnrs.set_num_threads(n)


POOL_FAILURE_CHILD = """
    import resource
    import numpy as np
    import bnrs
    from bnrs import functional as F
    F.relu(np.ones(3, np.float32))
    before = bnrs.get_num_threads()
    with open("/proc/self/status") as status:
        used = next(int(l.split()[1]) * 1024 for l in status if l.startswith("VmSize"))
    # Too little address space for 200 thread stacks: the pool cannot start.
    resource.setrlimit(resource.RLIMIT_AS, (used + 64 * 2**20, resource.RLIM_INFINITY))
    try:
        bnrs.set_num_threads(200)
        print("STARTED")
    except Exception as error:
        print("EXCEPTION", type(error).__name__)
    except BaseException as error:
        print("BASE_EXCEPTION", type(error).__name__)
    resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    print("WORKS", F.relu(np.array([-1.0, 2.0], np.float32)).tolist(),
          bnrs.get_num_threads() == before)
"""


def test_a_pool_that_cannot_start_raises_an_ordinary_exception():
    result = child.run(POOL_FAILURE_CHILD, env={"RUST_BACKTRACE": "0"})
    lines = result.stdout.splitlines()
    assert lines[-1] == "WORKS [0.0, 2.0] True", result.stdout  # the old pool is kept
    assert lines[0] in ("STARTED", "EXCEPTION RuntimeError"), result.stdout


# --------------------------------------------------------------------------- fork

FORK_CHILD = """
    import os, signal
    import numpy as np
    import bnrs
    from bnrs import functional as F
    x = np.arange(2 * 3 * 8 * 8, dtype=np.float32).reshape(2, 3, 8, 8) / 100
    w = np.ones((4, 3, 3, 3), np.float32)
    expected = F.conv2d(x, w, padding=1)        # the pool exists before the fork
    for round in range(3):
        pid = os.fork()
        if pid == 0:
            signal.alarm(20)                     # a hang ends the child with SIGALRM
            ok = np.array_equal(F.conv2d(x, w, padding=1), expected)
            bnrs.set_num_threads(2)
            ok = ok and np.array_equal(F.conv2d(x, w, padding=1), expected)
            os._exit(0 if ok else 3)
        _, status = os.waitpid(pid, 0)
        print("CHILD", round, os.waitstatus_to_exitcode(status), flush=True)
    print("PARENT", np.array_equal(F.conv2d(x, w, padding=1), expected))
"""


def test_a_forked_child_keeps_the_thread_count_set_before_the_fork():
    result = child.run(THREAD_COUNT_CHILD.split("    x = np.ones")[0] + """
    import signal
    bnrs.set_num_threads(3)
    # Large enough to run in the pool (a call of a few elements runs on the calling
    # thread alone, and would not start it).
    pooled = np.ones(1 << 17, np.float32)
    F.relu(pooled)
    pid = os.fork()
    if pid == 0:
        signal.alarm(20)
        F.relu(pooled)
        os._exit(10 * bnrs.get_num_threads() + settle(3))
    _, status = os.waitpid(pid, 0)
    print("CHILD", os.waitstatus_to_exitcode(status))
""", env={"BNRS_NUM_THREADS": "2"})
    assert result.stdout.split() == ["CHILD", "33"], result.stdout


def test_fork_after_use_child_computes_and_exits():
    result = child.run(FORK_CHILD, timeout=90)
    assert result.stdout.split("\n")[:4] == ["CHILD 0 0", "CHILD 1 0", "CHILD 2 0",
                                             "PARENT True"]


def _conv_sum(seed: int) -> float:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, 3, 9, 9), dtype=np.float32)
    w = rng.standard_normal((4, 3, 3, 3), dtype=np.float32)
    return float(F.conv2d(x, w, padding=1).astype(np.float64).sum())


def test_multiprocessing_fork_pool_computes_like_the_parent():
    expected = [_conv_sum(seed) for seed in range(8)]  # the parent's pool is running
    context = multiprocessing.get_context("fork")
    with context.Pool(2) as pool:
        result = pool.map_async(_conv_sum, range(8))
        assert result.get(timeout=60) == expected


FORK_RACE_CHILD = """
    import faulthandler, os, signal, sys, threading, time
    import numpy as np
    from bnrs import functional as F
    x = np.ones(64, np.float32)
    stop = False
    def hammer():
        while not stop:
            F.relu(x)
    def report_hang():
        # What each thread of a hung child waits in (its system call and kernel wait
        # channel), then its Python stacks: enough to tell a lock from a slow machine.
        for task in sorted(os.listdir("/proc/self/task")):
            def read(name):
                with open(f"/proc/self/task/{{task}}/{{name}}") as f:
                    return f.read().strip()
            print("thread", task, read("comm"), "wchan", read("wchan"),
                  "syscall", read("syscall").split()[0], file=sys.stderr)
        faulthandler.dump_traceback(all_threads=True)
        os._exit(3)
    threading.Thread(target=hammer, daemon=True).start()
    failures = []                                # how each failed child ended
    for _ in range({forks}):
        pid = os.fork()
        if pid == 0:
            # A deadlock never ends, so the limits can be generous: a child that merely
            # runs slowly on a loaded machine must not count as hung.
            threading.Timer(10, report_hang).start()  # needs the GIL to be free
            faulthandler.dump_traceback_later(12, exit=True)  # even if it is not
            signal.alarm(15)
            F.relu(x)
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        if os.WIFSIGNALED(status):
            failures.append(signal.Signals(os.WTERMSIG(status)).name)
        elif os.waitstatus_to_exitcode(status) != 0:
            failures.append(f"exit status {{os.waitstatus_to_exitcode(status)}} (hung)")
    stop = True
    print("FAILURES", ",".join(failures) or "-")
    print("HUNG", len(failures))
"""


def _forks_that_hang(forks: int, processes: int) -> int:
    """Forked children that did not exit cleanly (killed by a signal, or stopped by the
    hang report after 10 s), printed with how they ended and with what the hung ones
    were waiting in, so that a failure says why."""
    started = [child.start(FORK_RACE_CHILD.format(forks=forks)) for _ in range(processes)]
    outputs = [child.finish(process, timeout=60 + 16 * forks) for process in started]
    failures = [line for out, _ in outputs for line in out.splitlines()
                if line.startswith("FAILURES") and line != "FAILURES -"]
    if failures:
        print("forked children that failed:", "; ".join(failures))
        for _, err in outputs:
            print(err)
    return sum(int(out.split()[-1]) for out, _ in outputs)


def test_fork_while_another_thread_calls_bnrs_does_not_hang(capsys):
    hung = _forks_that_hang(forks=1, processes=4)
    assert hung == 0, capsys.readouterr().out


@pytest.mark.long
def test_many_forks_while_another_thread_calls_bnrs():
    hung = _forks_that_hang(forks=300, processes=2)
    longrun.FIGURES["fork race"] = f"{hung} of 600 forked children hung"
    assert hung == 0


# --------------------------------------------------------------------------- estimator


def _small_fitted(seed=0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((60, 1, 8, 8)).astype(np.float32)
    y = (X[:, 0, :4].mean(axis=(1, 2)) > 0).astype(int)
    clf = bnrs.CNNClassifier("c4-bn-relu-mp2-d0.2-fc8-bn-relu", max_epochs=2, batch_size=16,
                             random_state=seed).fit(X, y)
    return clf, X


def test_threads_predicting_with_one_fitted_estimator_get_the_sequential_results():
    clf, X = _small_fitted()
    expected = clf.predict_proba(X)
    results = _in_threads(lambda seed: clf.predict_proba(X), SEEDS, repeats=5)
    for seed in SEEDS:
        for result in results[seed]:
            _assert_identical(result, expected, "concurrent predict_proba")


def test_fits_in_threads_with_different_n_threads_agree(restore_threads):
    """n_threads sets the fitting thread's pool size; results do not depend on it."""
    rng = np.random.default_rng(1)
    X = rng.standard_normal((48, 1, 8, 8)).astype(np.float32)
    y = np.arange(48) % 3

    def fit(n_threads):
        clf = bnrs.CNNClassifier("c4-bn-relu-mp2-fc8", max_epochs=2, batch_size=16,
                                 random_state=5, n_threads=n_threads)
        return clf.fit(X, y).predict_proba(X)

    expected = fit(1)
    results = _in_threads(fit, [1, 2, 3], repeats=2)
    for n_threads, runs in results.items():
        for result in runs:
            _assert_identical(result, expected, f"n_threads={n_threads}")


def test_overlapping_fits_keep_their_own_thread_counts(monkeypatch):
    """n_threads is the fitting thread's own: two fits with different counts that overlap
    (the second starts inside the first and ends after it) each use their count
    throughout, and the process default is what it was before, whatever order they end
    in."""
    rng = np.random.default_rng(1)
    X = rng.standard_normal((48, 1, 8, 8)).astype(np.float32)
    y = np.arange(48) % 3
    epochs = {1: 20, 3: 40}

    def fit(n_threads):
        return bnrs.CNNClassifier("c4-bn-relu-mp2-fc8", max_epochs=epochs[n_threads],
                                  batch_size=16, random_state=5,
                                  n_threads=n_threads).fit(X, y)

    alone = {n: fit(n) for n in epochs}
    before = bnrs.get_num_threads()
    seen = {n: set() for n in epochs}
    first_started = threading.Event()
    forward = nn.CrossEntropyLoss.forward

    def recording_forward(self, input, target):
        name = threading.current_thread().name
        if name in ("fit-1", "fit-3"):
            seen[int(name[-1])].add(bnrs.get_num_threads())
            first_started.set()
        return forward(self, input, target)

    monkeypatch.setattr(nn.CrossEntropyLoss, "forward", recording_forward)
    fitted, failures = {}, []

    def run(n_threads):
        try:
            fitted[n_threads] = fit(n_threads)
        except BaseException as error:  # noqa: BLE001 - reported below
            failures.append(error)

    first = threading.Thread(target=run, args=(1,), name="fit-1")
    second = threading.Thread(target=run, args=(3,), name="fit-3")
    first.start()
    assert first_started.wait(60)
    second.start()
    for thread in (first, second):
        thread.join(120)
    assert not failures, failures
    assert bnrs.get_num_threads() == before
    assert seen == {1: {1}, 3: {3}}
    for n_threads, clf in fitted.items():
        expected = alone[n_threads]
        assert clf.loss_curve_ == expected.loss_curve_
        _assert_identical(clf.model_.state_dict(), expected.model_.state_dict(),
                          f"n_threads={n_threads}")


def _predict_chunk(index: int):
    return _FORKED_CLF.predict_proba(_FORKED_X[index::4])


def test_a_fitted_estimator_predicts_in_forked_workers():
    global _FORKED_CLF, _FORKED_X
    _FORKED_CLF, _FORKED_X = _small_fitted(2)
    expected = [_FORKED_CLF.predict_proba(_FORKED_X[i::4]) for i in range(4)]
    with multiprocessing.get_context("fork").Pool(2) as pool:
        results = pool.map_async(_predict_chunk, range(4)).get(timeout=60)
    for got, want in zip(results, expected):
        assert np.array_equal(got, want)
