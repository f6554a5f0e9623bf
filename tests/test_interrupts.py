"""Ctrl-C and panics: a kernel never aborts the process, and SIGINT is honoured quickly.

- A Rust panic inside a kernel becomes a RuntimeError; the process survives and every
  kernel keeps working (also from other threads, and after many panics).
- SIGINT sent to a process busy with bnrs raises KeyboardInterrupt within 1 second, in a
  loop of many kernel calls and in a user's training loop (each kernel checks for Ctrl-C
  when it returns), and the process goes on working afterwards.
- During one long kernel call (a convolution of several seconds) SIGINT stops the kernel
  within 1 second too (long calls poll for Ctrl-C while they run); the main thread's wait
  for a call running in another thread is interrupted as quickly.
- An interrupt reaches only the work of the thread it was meant for: kernel calls and a
  whole ``fit`` running in another thread while the main thread's call is interrupted
  complete, with exactly the results of an undisturbed run.
- After an interrupted call, short and long calls give exactly the results of before.
- Only Python's main thread (the one that runs signal handlers, also in a child forked
  from another thread) watches its long calls for Ctrl-C; a call from another thread never
  takes the GIL while it runs, so it cannot touch an interpreter that finalised meanwhile
  (a daemon thread, or one ``Thread.join`` marked as stopped when Ctrl-C interrupted it).

- SIGINT during ``CNNClassifier.fit`` raises KeyboardInterrupt within 1 second, with the
  network exactly as after the last completed epoch; a grid search over the estimator
  stops with it (the process exits by KeyboardInterrupt, not with status 0).
- SIGINT to a ``bnrs study`` (its process group, as a terminal sends it) ends it with
  status 130 within about a second and keeps every finished run intact in the database
  (``test_study`` shows that the same command then resumes).

The latencies are measured with CLOCK_MONOTONIC, which parent and child share.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import child
import longrun
import numpy as np
import pytest
from bnrs import _core
from bnrs import functional as F

# --------------------------------------------------------------------------- panics


def test_a_panic_becomes_a_runtime_error_and_the_process_keeps_working():
    x = np.linspace(-1, 1, 7, dtype=np.float32)
    before = F.relu(x)
    for _ in range(20):
        with pytest.raises(RuntimeError, match="internal error in a bnrs kernel"):
            _core._panic_for_test()
    np.testing.assert_array_equal(F.relu(x), before)
    assert x[0] == -1.0  # untouched
    y = F.conv2d(np.ones((2, 3, 5, 5), np.float32), np.ones((4, 3, 3, 3), np.float32))
    assert y.shape == (2, 4, 3, 3) and np.all(y == 27)


def test_panics_in_several_threads_at_once_leave_the_pool_working():
    errors, results = [], []

    def worker():
        for _ in range(10):
            try:
                _core._panic_for_test()
            except RuntimeError as error:
                errors.append(error)
            results.append(float(F.linear(np.ones((3, 4), np.float32),
                                          np.ones((2, 4), np.float32)).sum()))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads), "a thread hangs after panics"
    assert len(errors) == 40 and all("forced panic" in str(e) for e in errors)
    assert results == [24.0] * 40


def test_a_panic_does_not_abort_a_fresh_process():
    result = child.run("""
        import numpy as np
        from bnrs import _core, functional as F
        try:
            _core._panic_for_test()
        except RuntimeError as error:
            print("RuntimeError:", error)
        print("still here", F.relu(np.array([-1.0, 2.0], np.float32)).tolist())
    """, env={"RUST_BACKTRACE": "0"})
    assert "RuntimeError: internal error in a bnrs kernel" in result.stdout
    assert "still here [0.0, 2.0]" in result.stdout


# --------------------------------------------------------------------------- SIGINT

#: The child prints READY, then runs ``body`` (which loops or makes one long call) until
#: KeyboardInterrupt; it prints when it caught it, then shows that bnrs still works.
SIGINT_CHILD = """
    import time
    import numpy as np
    import bnrs
    from bnrs import functional as F, nn, optim
    rng = np.random.default_rng(0)
    # A call long enough to take the kernels' interruptible path, computed before Ctrl-C:
    # after it the same call must give the same bits (no stale cancellation).
    check_x = rng.standard_normal((8, 64, 32, 32), dtype=np.float32)
    check_w = rng.standard_normal((64, 64, 3, 3), dtype=np.float32)
    check = F.conv2d(check_x, check_w, padding=1)
    {setup}
    print("READY", flush=True)
    started = time.monotonic()
    try:
        {body}
        print("FINISHED", time.monotonic() - started, flush=True)
    except KeyboardInterrupt:
        print("INTERRUPTED", time.monotonic(), flush=True)
    y = F.conv2d(np.ones((1, 2, 4, 4), np.float32), np.ones((3, 2, 3, 3), np.float32))
    same = all(np.array_equal(F.conv2d(check_x, check_w, padding=1), check) for _ in range(3))
    print("ALIVE", float(y.sum()), same, flush=True)
"""


def sigint_latency(setup: str, body: str, delay: float, timeout: float = 60) -> float:
    """Seconds from SIGINT (sent ``delay`` s after READY) to the child's KeyboardInterrupt."""
    process = child.start(SIGINT_CHILD.format(setup=setup, body=body))
    child.expect_line(process, "READY")
    time.sleep(delay)
    sent = time.monotonic()
    process.send_signal(signal.SIGINT)
    stdout, stderr = child.finish(process, timeout=timeout)
    lines = dict(line.split(" ", 1) for line in stdout.splitlines() if " " in line)
    assert "INTERRUPTED" in lines, f"no KeyboardInterrupt in the child\n{stdout}\n{stderr}"
    assert lines.get("ALIVE") == "216.0 True", f"bnrs broken after Ctrl-C\n{stdout}\n{stderr}"
    assert process.returncode == 0, stderr
    return float(lines["INTERRUPTED"]) - sent


LOOP_SETUP = """
    x = rng.standard_normal((8, 16, 16, 16), dtype=np.float32)
    w = rng.standard_normal((16, 16, 3, 3), dtype=np.float32)
"""
LOOP_BODY = """
        while True:
            y = F.conv2d(x, w, padding=1)
            F.max_pool2d(F.relu(y), 2)
"""

TRAINING_SETUP = """
    model = nn.from_spec("c8-bn-relu-mp2-d0.2-fc16-bn-relu-d0.5", (1, 12, 12), 4,
                         random_state=0)
    opt = optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()
    x = rng.standard_normal((32, 1, 12, 12), dtype=np.float32)
    target = rng.integers(0, 4, 32)
"""
TRAINING_BODY = """
        while True:
            opt.zero_grad()
            loss_fn(model(x), target)
            model.backward(loss_fn.backward(), input_grad=False)
            opt.step()
"""


def test_sigint_during_a_loop_of_kernel_calls_is_honoured_within_a_second():
    latency = sigint_latency(LOOP_SETUP, LOOP_BODY, delay=0.5)
    assert latency < 1.0, f"SIGINT took {latency:.3f} s to be honoured"


def test_sigint_during_a_training_loop_is_honoured_within_a_second():
    latency = sigint_latency(TRAINING_SETUP, TRAINING_BODY, delay=0.5)
    assert latency < 1.0, f"SIGINT took {latency:.3f} s to be honoured"


#: A single conv2d call calibrated in the child to last about ``{seconds}`` seconds.
LONG_CALL_SETUP = """
    w = rng.standard_normal((128, 128, 3, 3), dtype=np.float32)
    probe = rng.standard_normal((4, 128, 32, 32), dtype=np.float32)
    F.conv2d(probe, w, padding=1)
    start = time.monotonic()
    F.conv2d(probe, w, padding=1)
    per_sample = (time.monotonic() - start) / 4
    x = rng.standard_normal((max(4, int({seconds} / per_sample)), 128, 32, 32),
                            dtype=np.float32)
"""
LONG_CALL_BODY = """
        F.conv2d(x, w, padding=1)
"""


def test_sigint_during_one_long_kernel_call_is_honoured_within_a_second():
    latency = sigint_latency(LONG_CALL_SETUP.format(seconds=3.0), LONG_CALL_BODY, delay=0.5)
    assert latency < 1.0, f"SIGINT took {latency:.3f} s to be honoured"


#: The long call runs in a worker thread; the main thread waits for it.
THREAD_BODY = """
        import threading
        worker = threading.Thread(target=F.conv2d, args=(x, w), kwargs={"padding": 1})
        worker.start()
        while worker.is_alive():
            worker.join(0.05)
"""


def test_sigint_while_another_thread_runs_a_long_kernel_call():
    latency = sigint_latency(LONG_CALL_SETUP.format(seconds=3.0), THREAD_BODY, delay=0.5)
    assert latency < 1.0, f"SIGINT took {latency:.3f} s to be honoured"


#: A worker thread runs long calls while the main thread's own long calls are interrupted;
#: every call of the worker must give the bits of the same call made before, undisturbed.
OTHER_THREAD_SETUP = """
    import threading
    worker_x = x[: max(4, len(x) // 4)]
    worker_expected = F.conv2d(worker_x, w, padding=1)
    worker_results = []

    def worker():
        for _ in range(6):
            try:
                worker_results.append(np.array_equal(F.conv2d(worker_x, w, padding=1),
                                                      worker_expected))
            except BaseException as error:
                worker_results.append(type(error).__name__)

    worker_thread = threading.Thread(target=worker)
    worker_thread.start()
"""
OTHER_THREAD_BODY = """
        while True:
            F.conv2d(x, w, padding=1)
"""


def test_sigint_does_not_stop_kernel_calls_of_another_thread():
    code = SIGINT_CHILD.format(setup=LONG_CALL_SETUP.format(seconds=1.0)
                               + OTHER_THREAD_SETUP, body=OTHER_THREAD_BODY)
    code += """
    worker_thread.join(120)
    print("WORKER", worker_results, flush=True)
"""
    process = child.start(code)
    child.expect_line(process, "READY")
    time.sleep(0.5)
    sent = time.monotonic()
    process.send_signal(signal.SIGINT)
    stdout, stderr = child.finish(process, timeout=180)
    lines = dict(line.split(" ", 1) for line in stdout.splitlines() if " " in line)
    assert "INTERRUPTED" in lines, f"no KeyboardInterrupt in the child\n{stdout}\n{stderr}"
    assert float(lines["INTERRUPTED"]) - sent < 1.0
    assert lines["WORKER"] == str([True] * 6), stdout


def test_only_the_main_thread_watches_its_calls_for_ctrl_c():
    # Another thread's long call polling for Ctrl-C took the GIL every 50 ms: once the
    # interpreter had finalised under it, that crashed the process at exit.
    assert threading.current_thread() is threading.main_thread()
    assert _core._watches_ctrl_c()
    seen = []
    worker = threading.Thread(target=lambda: seen.append(_core._watches_ctrl_c()))
    worker.start()
    worker.join(30)
    assert seen == [False]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_the_child_of_a_fork_from_another_thread_watches_its_main_thread():
    # The forking thread is the child's main thread: the one its signal handlers run in.
    result = child.run("""
        import os, threading
        from bnrs import _core
        def fork_and_report():
            pid = os.fork()
            if pid == 0:
                os._exit(0 if _core._watches_ctrl_c() else 1)
            _, status = os.waitpid(pid, 0)
            print("CHILD", os.waitstatus_to_exitcode(status), flush=True)
        worker = threading.Thread(target=fork_and_report)
        worker.start()
        worker.join(30)
    """, timeout=60)
    assert "CHILD 0" in result.stdout, result.stdout + result.stderr


#: One image, 128 channels, 128 filters 3×3: a call is seconds of work on a single image,
#: so Ctrl-C must be checked within it (per tile of output rows), not between images.
LARGE_IMAGE_SETUP = """
    x = rng.standard_normal((1, 128, {size}, {size}), dtype=np.float32)
    w = rng.standard_normal((128, 128, 3, 3), dtype=np.float32)
"""
LARGE_IMAGE_BODY = """
        while True:
            F.conv2d(x, w, padding=1)
"""
#: One dense layer, 4096×16384 by 16384×4096: ~0.55 TFLOP in 16 row blocks, each a GEMM
#: long enough to need checks for Ctrl-C within it (per panel).
LARGE_LINEAR_SETUP = """
    x = rng.standard_normal((4096, 16384), dtype=np.float32)
    w = rng.standard_normal((4096, 16384), dtype=np.float32)
"""
LARGE_LINEAR_BODY = """
        while True:
            F.linear(x, w)
"""


def test_sigint_during_the_convolution_of_one_large_image_is_honoured_within_half_a_second():
    # 1x128x512x512: about 1-2 s a call, which used to run to its end after Ctrl-C.
    latency = sigint_latency(LARGE_IMAGE_SETUP.format(size=512), LARGE_IMAGE_BODY, delay=0.3)
    assert latency < 0.5, f"SIGINT took {latency:.3f} s to be honoured"


@pytest.mark.long
@pytest.mark.parametrize("case", ["conv 1x128x1024x1024", "linear 4096x16384 @ 16384x4096"])
def test_sigint_during_one_huge_kernel_call_is_honoured_within_half_a_second(case):
    setup, body = {
        "conv 1x128x1024x1024": (LARGE_IMAGE_SETUP.format(size=1024), LARGE_IMAGE_BODY),
        "linear 4096x16384 @ 16384x4096": (LARGE_LINEAR_SETUP, LARGE_LINEAR_BODY),
    }[case]
    latencies = [sigint_latency(setup, body, delay=1.0) for _ in range(3)]
    longrun.FIGURES[f"SIGINT latency, {case}"] = ", ".join(
        f"{value * 1000:.1f} ms" for value in latencies)
    assert max(latencies) < 0.5, f"SIGINT took {max(latencies):.3f} s to be honoured"


@pytest.mark.long
def test_sigint_latencies_figures():
    """The figures of the robustness report: (a) many calls, (b) one ~5 s call."""
    loop = [sigint_latency(LOOP_SETUP, LOOP_BODY, delay=1.0) for _ in range(3)]
    training = [sigint_latency(TRAINING_SETUP, TRAINING_BODY, delay=1.0) for _ in range(3)]
    long_call = [sigint_latency(LONG_CALL_SETUP.format(seconds=5.0), LONG_CALL_BODY,
                                delay=1.0) for _ in range(2)]
    for name, values in (("loop of kernel calls", loop), ("training loop", training),
                         ("one ~5 s kernel call, SIGINT after 1 s", long_call)):
        longrun.FIGURES[f"SIGINT latency, {name}"] = ", ".join(
            f"{value * 1000:.1f} ms" for value in values)
    assert max(loop + training + long_call) < 1.0


# --------------------------------------------------------------------------- fit and study

FIT_DATA = """
    import time, warnings
    import numpy as np
    import bnrs
    rng = np.random.default_rng(0)
    X = rng.standard_normal((600, 1, 12, 12)).astype(np.float32)
    y = (X[:, 0, :6].mean(axis=(1, 2)) > 0).astype(int) + 2 * (X[:, 0, :, :6].mean(
        axis=(1, 2)) > 0)
    params = dict(architecture="c8-bn-relu-mp2-d0.2-fc32-bn-relu-d0.3", batch_size=32,
                  n_iter_no_change=10**6, random_state=3)
"""

FIT_CHILD = FIT_DATA + """
    clf = bnrs.CNNClassifier(max_epochs=10**6, verbose=1, **params)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            clf.fit(X, y)                 # prints "epoch   1 ..." lines; SIGINT stops it
            print("FIT RETURNED", flush=True)
        except KeyboardInterrupt:
            print("RAISED", time.monotonic(), flush=True)
    print("WARNING", [w.category.__name__ for w in caught], flush=True)
    print("EPOCHS", clf.n_iter_, len(clf.loss_curve_), flush=True)
    # The network is exactly that of a fit of the completed epochs.
    again = bnrs.CNNClassifier(max_epochs=clf.n_iter_, **params).fit(X, y)
    same = all(np.array_equal(value, again.model_.state_dict()[key])
               for key, value in clf.model_.state_dict().items())
    print("SAME", same, np.array_equal(clf.predict_proba(X), again.predict_proba(X)))
"""


def test_sigint_during_fit_raises_and_keeps_the_last_completed_epoch():
    process = child.start(FIT_CHILD)
    child.expect_line(process, "epoch   1")
    child.expect_line(process, "epoch   2")
    time.sleep(0.2)  # inside epoch 3
    sent = time.monotonic()
    process.send_signal(signal.SIGINT)
    stdout, stderr = child.finish(process, timeout=120)
    lines = dict(line.split(" ", 1) for line in stdout.splitlines() if " " in line)
    assert process.returncode == 0, stderr
    assert "FIT" not in lines, stdout
    latency = float(lines["RAISED"]) - sent
    longrun.FIGURES["SIGINT latency, CNNClassifier.fit"] = f"{latency * 1000:.1f} ms"
    assert latency < 1.0, f"fit raised {latency:.3f} s after SIGINT"
    assert lines["WARNING"] == "[]"
    completed, curve = (int(v) for v in lines["EPOCHS"].split())
    assert completed == curve >= 2
    assert lines["SAME"] == "True True", stdout


SEARCH_CHILD = FIT_DATA + """
    from sklearn.model_selection import GridSearchCV
    search = GridSearchCV(bnrs.CNNClassifier(max_epochs=50, verbose=1, **params),
                          {"learning_rate": [1e-3, 3e-3, 1e-2]}, cv=3, n_jobs=1)
    search.fit(X, y)              # prints "epoch   1 ..." lines; SIGINT must stop it all
    print("SEARCH FINISHED", flush=True)
"""


def test_sigint_during_a_grid_search_stops_the_search():
    process = child.start(SEARCH_CHILD)
    child.expect_line(process, "epoch   1")
    child.expect_line(process, "epoch   2")
    process.send_signal(signal.SIGINT)
    stdout, stderr = child.finish(process, timeout=120)
    assert "SEARCH FINISHED" not in stdout
    # An uncaught KeyboardInterrupt: Python prints the traceback, then ends by SIGINT
    # (status 130 in a shell).
    assert process.returncode in (-signal.SIGINT, 130), (process.returncode, stderr)
    assert "KeyboardInterrupt" in stderr, stderr


#: A worker thread fits again and again (printing the epochs) while the main thread loops
#: over long kernel calls, interrupted by each of several Ctrl-C; every fit of the worker
#: must go on to its last epoch and equal the same fit made alone, bit for bit. (Several
#: Ctrl-C: one that finds the worker between two kernel calls, rather than inside one,
#: could not disturb it even with one stop flag for all calls.)
THREAD_FIT_CHILD = FIT_DATA + """
    import sys
    import threading
    from bnrs import functional as F
    w = rng.standard_normal((64, 64, 3, 3), dtype=np.float32)
    # Calls of ~0.1 s or more: Ctrl-C arrives while one runs, which stops it.
    x = rng.standard_normal((128, 64, 32, 32), dtype=np.float32)
    # Images large enough that the fit spends most of its time inside kernel calls.
    X = rng.standard_normal((512, 3, 24, 24)).astype(np.float32)
    y = (X[:, 0, :12].mean(axis=(1, 2)) > 0).astype(int)
    params = dict(architecture="c16-bn-relu-mp2-c16-bn-relu-mp2-fc32-bn-relu",
                  batch_size=128, n_iter_no_change=10**6, random_state=3, max_epochs=3)
    fits, outcome, main_done = [], {}, threading.Event()

    def fit_in_thread():
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                while not main_done.is_set():
                    fits.append(bnrs.CNNClassifier(verbose=1, **params).fit(X, y))
            outcome["warnings"] = [w.category.__name__ for w in caught]
        except BaseException as error:
            outcome["error"] = repr(error)

    print("READY", flush=True)
    worker = threading.Thread(target=fit_in_thread)
    worker.start()
    interrupts = 0
    while interrupts < {interrupts}:
        try:
            while worker.is_alive():
                F.conv2d(x, w, padding=1)
            print("NOT INTERRUPTED", flush=True)
            break
        except KeyboardInterrupt:
            interrupts += 1
            # One write: print() writes its arguments one by one, and the worker's
            # epoch lines may come between them.
            sys.stdout.write("INTERRUPTED %d %s\\n" % (interrupts, worker.is_alive()))
            sys.stdout.flush()
    main_done.set()
    worker.join(300)
    print("ERROR", outcome.get("error"), flush=True)
    print("WARNINGS", outcome.get("warnings"), flush=True)
    alone = bnrs.CNNClassifier(**params).fit(X, y)
    print("EPOCHS", sorted({(clf.n_iter_, len(clf.loss_curve_)) for clf in fits}),
          flush=True)
    same = [clf.loss_curve_ == alone.loss_curve_ and all(
        np.array_equal(value, alone.model_.state_dict()[key])
        for key, value in clf.model_.state_dict().items()) and np.array_equal(
        clf.predict_proba(X), alone.predict_proba(X)) for clf in fits]
    print("SAME", len(same) > 0 and all(same), flush=True)
"""


def test_sigint_to_the_main_thread_leaves_fits_in_another_thread_whole():
    interrupts = 5
    process = child.start(THREAD_FIT_CHILD.replace("{interrupts}", str(interrupts)))
    child.expect_line(process, "READY")
    child.expect_line(process, "epoch   1")
    child.expect_line(process, "epoch   2")
    seen, read = [], []
    for count in range(1, interrupts + 1):
        time.sleep(0.3)
        process.send_signal(signal.SIGINT)
        # The next Ctrl-C only once this one was caught (the worker prints epoch lines).
        # The worker's epoch line may have been cut by it: "epoch ...INTERRUPTED 1 True".
        line = process.stdout.readline()
        while line and "INTERRUPTED" not in line:
            read.append(line)
            line = process.stdout.readline()
        seen.append(line[line.find("INTERRUPTED"):].strip())
        if seen[-1] != f"INTERRUPTED {count} True":
            break
    stdout, stderr = child.finish(process, timeout=300)
    stdout = "".join(read) + stdout
    # "INTERRUPTED n False": the worker had failed before the n-th Ctrl-C.
    assert seen == [f"INTERRUPTED {count} True" for count in range(1, interrupts + 1)], (
        f"{seen}\n{stdout}\n{stderr}")
    assert process.returncode == 0, stderr
    lines = dict(line.split(" ", 1) for line in stdout.splitlines() if " " in line)
    assert lines["ERROR"] == "None", stdout
    assert lines["WARNINGS"] == "[]", stdout
    assert lines["EPOCHS"] == "[(3, 3)]", stdout
    assert lines["SAME"] == "True", stdout


#: Question 1 has 2 variants: 20 runs of about half a second each. The SIGINT goes out
#: once the first is stored, so the study must still have seconds of work left: with
#: fewer runs a loaded machine could finish them all (and exit 0) before it arrives.
STUDY_SEEDS = 10
STUDY_RUNS = 2 * STUDY_SEEDS
STUDY_COMMAND = [sys.executable, "-m", "bnrs.cli", "study", "--questions", "1",
                 "--dataset", "digits", "--quick", "--seeds", str(STUDY_SEEDS),
                 "--epochs", "1", "--no-progress"]


def _stored_runs(out) -> int:
    from bnrs.study import storage

    return len(storage.ResultStore(out)) if (out / storage.DB_NAME).exists() else 0


@pytest.mark.parametrize("n_jobs", [1, pytest.param(2, marks=pytest.mark.long)])
def test_sigint_during_a_study_loses_no_finished_run(tmp_path, n_jobs):
    """Ctrl-C in a terminal signals the whole process group: the study and its workers."""
    from bnrs.study import storage

    command = STUDY_COMMAND + ["--out", str(tmp_path), "--n-jobs", str(n_jobs)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True,
                               preexec_fn=child.default_sigint)
    deadline = time.monotonic() + 180
    try:
        while _stored_runs(tmp_path) < 1:
            assert process.poll() is None, "the study ended before Ctrl-C"
            assert time.monotonic() < deadline, "no run finished in 180 s"
            time.sleep(0.05)
        finished = _stored_runs(tmp_path)
        sent = time.monotonic()
        os.killpg(process.pid, signal.SIGINT)
        process.communicate(timeout=60)
        latency = time.monotonic() - sent
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    longrun.FIGURES[f"SIGINT latency, bnrs study --n-jobs {n_jobs} (until exit)"] = (
        f"{latency * 1000:.0f} ms")
    stored = storage.ResultStore(tmp_path)
    assert len(stored) < STUDY_RUNS, "the study finished before SIGINT: make it longer"
    assert process.returncode == 130
    assert latency < 1.0 + 0.5 * (n_jobs > 1), f"the study exited {latency:.2f} s after SIGINT"
    assert len(stored) >= finished, "a finished run was lost"
    with sqlite3.connect(tmp_path / storage.DB_NAME) as connection:
        assert connection.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    for run in stored.get().values():  # whole rows (test_study checks that it resumes)
        assert run["curves"]["epoch"] == [1] and run["metrics"]["test_acc"] >= 0


class _InterruptedAfterCommit:
    """A connection that raises KeyboardInterrupt just after COMMIT has run, as a Ctrl-C
    does when it arrives during the commit (Python checks signals when execute returns)."""

    def __init__(self, connection):
        self._connection = connection

    def execute(self, sql, *args):
        cursor = self._connection.execute(sql, *args)
        if sql == "COMMIT":
            raise KeyboardInterrupt
        return cursor

    def __getattr__(self, name):
        return getattr(self._connection, name)


def test_ctrl_c_as_a_run_is_committed_stays_a_keyboard_interrupt(tmp_path, monkeypatch):
    import contextlib

    from bnrs.study import storage

    store = storage.ResultStore(tmp_path)
    connect = store._connect

    @contextlib.contextmanager
    def interrupted_connect():
        with connect() as connection:
            yield _InterruptedAfterCommit(connection)

    monkeypatch.setattr(store, "_connect", interrupted_connect)
    result = {"status": "ok", "metrics": {"test_acc": 0.5}, "curves": {"epoch": [1]}}
    try:
        with pytest.raises(KeyboardInterrupt):
            store.put("key", {"dataset": "digits"}, 0, result, "0")
    finally:
        monkeypatch.undo()
        assert len(storage.ResultStore(tmp_path)) == 1, "the committed run must be kept"
