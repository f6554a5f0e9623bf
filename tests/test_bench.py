"""``bnrs bench`` in its tiny smoke mode: the tables, the JSON, --plot; no timing assertions.

PyTorch is not a test dependency: the bench is run with the ``torch`` import blocked, as in
an environment without it; the translation to a PyTorch network is checked only where
PyTorch happens to be installed.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from bnrs import bench

THREADS = (1, 2)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """One smoke run at 1 and 2 threads with --profile: (stdout, the JSON it wrote)."""
    path = tmp_path_factory.mktemp("bench") / "bench.json"
    argv = ["--smoke", "--threads", *map(str, THREADS), "--json", str(path), "--profile"]
    output = io.StringIO()
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
        with contextlib.redirect_stdout(output), contextlib.redirect_stderr(io.StringIO()):
            assert bench.main(argv) == 0
    return output.getvalue(), json.loads(path.read_text())


def test_without_torch_says_why(smoke_run):
    output, result = smoke_run
    assert bench.NO_TORCH_MESSAGE in output
    assert result["torch_available"] is False
    assert result["torch_missing"] == bench.NO_TORCH_MESSAGE
    assert result["machine"]["torch"] is None


def test_table_has_every_work_item_per_thread_count(smoke_run):
    output, result = smoke_run
    for threads in THREADS:
        plural = "s" if threads > 1 else ""
        assert f"== {threads} thread{plural}: peak" in output
    header = next(line for line in output.splitlines() if line.startswith("work "))
    for column in ("bnrs ms", "torch ms", "torch/bnrs", "bnrs rate", "% peak", "target",
                   "met?"):
        assert column in header
    names = [row["name"] for row in result["sections"][0]["rows"]]
    assert len(names) == 21
    for name in names:
        assert output.count(name) >= len(THREADS)
    assert "LeNetBN train epoch" in output and "samples/s" in output
    assert "steps) above the baseline: bnrs" in output
    assert "speed-up over 1 thread" in output
    assert "== targets:" in output


def test_json_structure(smoke_run):
    _, result = smoke_run
    machine = result["machine"]
    for key in ("cpu_model", "logical_cpus", "usable_cpus", "simd_backend", "bnrs", "numpy",
                "python", "date"):
        assert machine[key]
    assert result["peaks"]["fma_gflops_1t"] > 0
    assert set(result["peaks"]["copy_gbps"]) == {str(t) for t in THREADS}
    assert [s["threads"] for s in result["sections"]] == list(THREADS)
    for section in result["sections"]:
        for row in section["rows"]:
            assert row["unit"] in (bench.GFLOPS, bench.GBPS)
            assert row["amount"] > 0 and row["rate"] > 0 and row["peak_fraction"] > 0
            stats = row["bnrs_s"]
            assert stats["min"] <= stats["median"] <= stats["max"]
            assert len(stats["samples"]) >= 1
            assert row["torch_s"] is None and row["ratio"] is None
            for target in row["targets"]:
                if target["kind"] == "speed ratio torch/bnrs":
                    assert target["measured"] is None and target["met"] is None
        profile = section["profile"]
        assert profile["torch"] is None
        assert len(profile["bnrs"]["layers"]) == len(bench.build_bnrs_network())
        assert set(profile["bnrs"]["stages_ms"]) == {
            "zero_grad", "forward", "loss fwd+bwd", "backward", "optimizer step"}
    # Smoke mode measures the peak memory (in a fresh process) at the last thread count.
    memory = result["sections"][-1]["memory"]
    assert memory["bnrs"]["peak_kib"] >= memory["bnrs"]["baseline_kib"] > 0
    assert memory["bnrs"]["steps"] == 1
    assert "torch" not in memory and memory["ratio"] is None
    scaling_keys = {row["key"] for row in result["scaling"]}
    assert {"conv_large_fwd", "bn_train_fwd", "dropout_fwd", "maxpool_fwd"} <= scaling_keys
    kinds = {target["kind"] for target in result["targets"]}
    assert kinds == {"speed ratio torch/bnrs", "fraction of peak", "thread speed-up",
                     "peak RSS torch/bnrs"}


def test_plot_needs_matplotlib_or_draws(smoke_run, tmp_path, capsys):
    path = tmp_path / "ratios.png"
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        with pytest.raises(SystemExit) as error:
            bench.main(["--smoke", "--plot", str(path)])
        assert error.value.code == 2
        assert "--plot needs matplotlib" in capsys.readouterr().err
        assert not path.exists()
    else:
        bench.plot_results(smoke_run[1], str(path))
        assert path.stat().st_size > 0


@pytest.mark.parametrize("option", ["--json", "--plot"])
@pytest.mark.parametrize("where", ["missing directory", "a directory"])
def test_unwritable_output_stops_before_measuring(tmp_path, monkeypatch, capsys, option,
                                                  where):
    # Once found only after the whole run, as a traceback.
    if option == "--plot":
        pytest.importorskip("matplotlib")
    path = tmp_path / "missing" / "x.json" if where == "missing directory" else tmp_path
    monkeypatch.setattr(bench.runner, "run_benchmarks",
                        lambda args: pytest.fail("measured before checking the output"))
    with pytest.raises(SystemExit) as error:
        bench.main(["--smoke", option, str(path)])
    assert error.value.code == 2
    why = (f"no such directory {tmp_path / 'missing'}" if where == "missing directory"
           else "it is a directory")
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == (
        f"bnrs bench: error: {option}: cannot write {str(path)!r}: {why}")
    assert "Traceback" not in err


def test_repeats_interleave_after_warm_up():
    calls = []
    runs = [lambda: calls.append("bnrs"), lambda: calls.append("torch")]
    samples, cores = bench.measure(runs, runs, repeats=3, min_sample_seconds=0.0,
                                   settle_seconds=0.0)
    assert calls == ["bnrs", "torch",  # warm-ups
                     "bnrs", "torch", "torch", "bnrs", "bnrs", "torch"]
    assert [len(s) for s in samples] == [3, 3]
    assert len(cores) == 2


def test_network_flops_counts_conv_and_linear():
    conv1, conv2 = 2 * 16 * 28 * 28 * 1 * 9, 2 * 32 * 14 * 14 * 16 * 9
    fc1, fc2 = 2 * 1568 * 128, 2 * 128 * 10
    forward = conv1 + conv2 + fc1 + fc2
    # The first layer's input gradient is skipped in training.
    assert bench.network_flops(bench.build_bnrs_network()) == (
        forward, forward + conv1 + 2 * (conv2 + fc1 + fc2))


def test_bad_arguments():
    with pytest.raises(SystemExit):
        bench.main(["--threads", "0"])
    with pytest.raises(SystemExit):
        bench.main(["--quick", "--smoke"])


def test_torch_network_matches_bnrs():
    torch = pytest.importorskip("torch")
    model = bench.build_bnrs_network(seed=3).eval()
    network = bench.build_torch_network(model, torch).eval()
    images, _ = bench.make_data(8, seed=1)
    with torch.no_grad():
        expected = network(torch.from_numpy(images)).numpy()
    np.testing.assert_allclose(model(images), expected, rtol=1e-4, atol=1e-4)


def test_bnrs_bench_command_reaches_the_bench(capsys):
    from bnrs import cli

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench", "--help"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith("usage: bnrs bench")


DIGITS_BENCH = Path(__file__).parent.parent / "benches" / "bench_digits.py"


def _digits_bench():
    spec = importlib.util.spec_from_file_location("bench_digits", DIGITS_BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_digits_bench_runs_and_reports_accuracy():
    """benches/bench_digits.py, at its smallest, without PyTorch: it trains and reports."""
    result = subprocess.run([sys.executable, str(DIGITS_BENCH), "--seeds", "1", "--epochs", "2",
                             "--no-torch"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "PyTorch comparison disabled" in lines[0] and "2 epochs" in lines[0]
    accuracy = float(lines[1].split("test accuracy ")[1].split(",")[0])
    assert 0.5 < accuracy <= 1.0   # two epochs learn the digits well beyond chance (0.1)
    assert lines[-1].startswith("bnrs: test accuracy mean")


def test_digits_bench_replays_the_estimators_shuffles():
    """The PyTorch loop draws its weights and then each epoch's order from one generator,
    as CNNClassifier.fit does: after an epoch both generators are in the same state."""
    from bnrs import CNNClassifier, nn
    from bnrs.nn.module import as_generator

    digits = _digits_bench()
    X_train, y_train, _, _ = digits.digits()
    clf = CNNClassifier(digits.DEFAULT_ARCHITECTURE, max_epochs=1, random_state=5)
    clf.fit(X_train, y_train)
    rng = as_generator(5)
    model = nn.from_spec(digits.DEFAULT_ARCHITECTURE, (1, 8, 8), 10, random_state=rng)
    rng.permutation(len(X_train))                          # the first epoch's order
    np.testing.assert_array_equal(rng.permutation(len(X_train)),
                                  clf._rng.permutation(len(X_train)))
    fresh = nn.from_spec(digits.DEFAULT_ARCHITECTURE, (1, 8, 8), 10, random_state=5)
    for (name, a), (_, b) in zip(model.state_dict().items(), fresh.state_dict().items()):
        np.testing.assert_array_equal(a, b, err_msg=name)


def test_digits_bench_torch_loop_trains():
    torch = pytest.importorskip("torch")
    digits = _digits_bench()
    accuracy, seconds = digits.fit_torch(torch, 0, 2, *digits.digits())
    assert 0.5 < accuracy <= 1.0 and seconds > 0
