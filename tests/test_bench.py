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
from bnrs import bench, nn

THREADS = (1, 2)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """One smoke run at 1 and 2 threads with --profile: (stdout, the JSON it wrote)."""
    path = tmp_path_factory.mktemp("bench") / "bench.json"
    argv = ["--smoke", "--threads", *map(str, THREADS), "--json", str(path), "--profile"]
    output = io.StringIO()
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
        # The step profile's stages are the fused plan's, whatever the environment says.
        patch.setenv("BNRS_FUSE", "1")
        patch.setenv("BNRS_FUSED_STEP", "1")
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
    # The round trip between cores before and after each section of two threads and the
    # speed-ups (when the process may use two CPUs).
    two_cpus = result["machine"]["usable_cpus"] >= 2
    titles = [line for line in output.splitlines() if line.startswith("== ")
              and (": peak " in line or "speed-up over 1 thread" in line)]
    assert len(titles) == len(THREADS) + 1
    assert ["cache-line round trip between cores" in t for t in titles] == [
        two_cpus and not t.startswith("== 1 thread:") for t in titles]
    assert all(t.endswith(" ns after ==") for t in titles[1:]) or not two_cpus
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
    assert "-- profile: bnrs training step of LeNetBN as it runs (fused stages" in output
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
    # The cache-line round trip between cores: before each section of two threads or
    # more, and at the end (when the process may use two CPUs).
    two_cpus = machine["usable_cpus"] >= 2
    for section in result["sections"]:
        for key in ("core_round_trip_ns", "core_round_trip_ns_after"):
            if section["threads"] > 1 and two_cpus:
                assert section[key] > 0
            else:
                assert section[key] is None
    for round_trip in (*result["scaling_core_round_trip_ns"],
                       machine["core_round_trip_ns_end"]):
        assert (round_trip > 0) if two_cpus else (round_trip is None)
    for section in result["sections"]:
        for row in section["rows"]:
            assert row["unit"] in (bench.GFLOPS, bench.GBPS)
            assert row["amount"] > 0 and row["rate"] > 0 and row["peak_fraction"] > 0
            stats = row["bnrs_s"]
            assert stats["min"] <= stats["median"] <= stats["max"]
            assert len(stats["samples"]) >= 1
            assert row["torch_s"] is None and row["ratio"] is None
            # One run without PyTorch: its wait for idle threads and their CPU time.
            assert len(row["idle_wait_max_s"]) == len(row["not_idle"]) == 1
            assert len(row["bnrs_threads_cpu_s"]) == len(row["other_threads_cpu_s"]) == 1
            for target in row["targets"]:
                if target["kind"] == "speed ratio torch/bnrs":
                    assert target["measured"] is None and target["met"] is None
        profile = section["profile"]
        assert profile["torch"] is None
        assert len(profile["bnrs"]["layers"]) == len(bench.build_bnrs_network())
        assert set(profile["bnrs"]["stages_ms"]) == {
            "zero_grad", "forward", "loss fwd+bwd", "backward", "optimizer step"}
    step = result["step_profile"]
    assert step["network"] == "LeNetBN" and step["threads"] == list(THREADS)
    assert step["steps"] >= 1 and step["rounds"] >= 1
    assert [stage["stage"].split()[0] for stage in step["stages"]] == [
        "conv2d", "bn_block", "conv2d", "bn_block", "view", "linear", "bn_block", "linear"]
    assert step["stages"][4]["stage"] == "view 32x7x7 -> 1568"
    for stage in step["stages"]:
        times = stage["forward_ms"] + stage["backward_ms"]
        assert len(times) == 2 * len(THREADS) and min(times) >= 0
        if stage["stage"].startswith("view"):   # a reshape: no work, never timed
            assert max(times) == 0
        else:
            assert min(stage["forward_ms"]) > 0 and min(stage["backward_ms"]) > 0
    for key in ("loss_ms", "update_ms", "outside_ms", "step_ms"):
        assert len(step[key]) == len(THREADS) and min(step[key]) >= 0
    # Smoke mode measures the peak memory (in a fresh process) at the last thread count.
    memory = result["sections"][-1]["memory"]
    assert memory["bnrs"]["peak_kib"] >= memory["bnrs"]["baseline_kib"] > 0
    assert memory["bnrs"]["steps"] == 1
    assert "torch" not in memory and memory["ratio"] is None
    scaling_keys = {row["key"] for row in result["scaling"]}
    # Without PyTorch in the process bnrs's speed-ups are measured in it, no child needed.
    assert {row["bnrs_process"] for row in result["scaling"]} == {"bench"}
    assert "train_epoch" in scaling_keys
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
    timings = bench.measure(runs, runs, repeats=3, min_sample_seconds=0.0,
                            settle_seconds=0.0)
    samples, cores = timings.samples, timings.cores
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


#: Every bnrs layer kind the grammar builds except batch renorm, which the bench refuses.
EVERY_LAYER = ("c8k5s2p2-bnm0.05e1e-3-lrelu-ap3s1-gn4-sd0.1-c8-in-mp2-inc4_4_8_2_4_4"
               "-res16s2_postbn-res16_nobn-gap-fc32-ln-tanh-d0.3-fc16-bne1e-4-sigmoid")


@pytest.mark.parametrize("name", sorted(bench.NETWORKS))
def test_torch_mirror_matches_bnrs_on_named_networks(name):
    _assert_torch_matches(bench.NETWORKS[name])


def test_torch_mirror_matches_bnrs_on_every_layer_kind():
    _assert_torch_matches(bench.Network("custom", "custom_", EVERY_LAYER, (3, 20, 20), 7))


def _assert_torch_matches(network):
    """The same weights give the same outputs in bnrs and in the bench's PyTorch mirror:
    in evaluation mode, and in training mode with dropout off (each framework draws its
    own masks), where batch norm uses the batch statistics."""
    torch = pytest.importorskip("torch")
    model = network.build(seed=3)
    mirror = bench.build_torch_network(model, torch)
    assert list(mirror.state_dict()) == list(model.state_dict())
    images, _ = network.make_data(8, seed=1)
    model.eval()
    mirror.eval()
    with torch.no_grad():
        expected = mirror(torch.from_numpy(images)).numpy()
    np.testing.assert_allclose(model(images), expected, rtol=1e-4, atol=1e-4)
    model.train()
    nn.enable_dropout(model, False)
    mirror.train()
    for module in mirror.modules():
        if isinstance(module, (torch.nn.Dropout, torch.nn.Dropout2d)):
            module.eval()
    actual = model(images)
    with torch.no_grad():
        expected = mirror(torch.from_numpy(images)).numpy()
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4)


def test_torch_mirror_refuses_batch_renorm():
    torch = pytest.importorskip("torch")
    model = nn.from_spec("c4-brn-relu", (1, 6, 6), 3, random_state=0)
    with pytest.raises(ValueError, match="PyTorch has no batch renormalisation"):
        bench.build_torch_network(model, torch)
    # The interop doc's use keeps it: BatchNorm in its place, exact in evaluation mode.
    assert isinstance(bench.torch_mirror(model, torch)[1], torch.nn.BatchNorm2d)
    with pytest.raises(SystemExit) as error:
        bench.main(["--smoke", "--threads", "1", "--architecture", "c4-brn-relu",
                    "--input-shape", "1", "6", "6"])
    assert error.value.code == 2


def test_network_options_parse():
    args = bench.runner.parse_bench_args([
        "--architecture", "c32-bn-relu-mp2-c64-bn-relu-mp2-fc256-bn-relu-d0.5",
        "--input-shape", "3", "32", "32", "--n-classes", "10", "--batch-size", "128"])
    (network,) = args.networks
    assert network.architecture == "c32-bn-relu-mp2-c64-bn-relu-mp2-fc256-bn-relu-d0.5"
    assert network.input_shape == (3, 32, 32) and network.n_classes == 10
    assert network.min_ratio is None
    assert bench.run_mode(args).batch_size == 128
    assert bench.run_mode(bench.runner.parse_bench_args([])).batch_size == 64
    # The inference batch: the rows keep about the mode's number of samples.
    default = bench.run_mode(bench.runner.parse_bench_args([]))
    assert (default.infer_batches, default.infer_batch_size) == (10, 1000)
    small = bench.run_mode(bench.runner.parse_bench_args(["--inference-batch-size", "8"]))
    assert (small.infer_batches, small.infer_batch_size) == (1250, 8)
    large = bench.run_mode(bench.runner.parse_bench_args(["--inference-batch-size",
                                                          "20000"]))
    assert (large.infer_batches, large.infer_batch_size) == (1, 20000)
    # LeNetBN stays the default network; --quick and full runs add the other two.
    assert bench.runner.parse_bench_args(["--smoke"]).networks == [bench.LENET]
    names = [n.name for n in bench.runner.parse_bench_args(["--quick"]).networks]
    assert names == ["LeNetBN", "Inception", "ResNet"]
    args = bench.runner.parse_bench_args(["--network", "resnet", "lenet", "resnet"])
    assert [n.name for n in args.networks] == ["ResNet", "LeNetBN"]
    # Another input shape: the same architectures, without LeNetBN's speed targets.
    args = bench.runner.parse_bench_args(["--network", "lenet", "--input-shape", "3", "32",
                                          "32", "--n-classes", "4"])
    assert args.networks[0].input_shape == (3, 32, 32) and args.networks[0].n_classes == 4
    assert args.networks[0].min_ratio is None


@pytest.mark.parametrize("argv, message", [
    (["--architecture", "c32-bn-relu-qq"],
     ("--architecture: bad token 'qq' (token 4, character 13) in architecture "
      "'c32-bn-relu-qq': unknown token")),
    (["--architecture", "c8-relu", "--input-shape", "20"],
     ("--architecture: bad token 'c8' (token 1, character 1) in architecture 'c8-relu': "
      "needs a (C, H, W) feature map")),
    (["--input-shape", "0", "28", "28"],
     "--input-shape: expected C H W (images) or F (features), each at least 1, got 0 28 28"),
    (["--input-shape", "28", "28"],
     "--input-shape: expected C H W (images) or F (features), each at least 1, got 28 28"),
    (["--input-shape", "1", "2", "2", "--network", "lenet"],
     "--input-shape: bad token 'mp2' (token 8, character 29)"),
    (["--input-shape", "1", "x"], "argument --input-shape: invalid int value: 'x'"),
    (["--batch-size", "0"], "--batch-size: expected at least 1, got 0"),
    (["--inference-batch-size", "-1"], "--inference-batch-size: expected at least 1, got -1"),
    (["--n-classes", "0"], "--n-classes: expected at least 1, got 0"),
    (["--network", "vgg"], "argument --network: invalid choice: 'vgg'"),
    (["--network", "lenet", "--architecture", "c8"],
     "argument --architecture: not allowed with argument --network"),
])
def test_bad_network_options_exit_2_with_one_line(argv, message):
    result = subprocess.run([sys.executable, "-m", "bnrs.bench", "--smoke", *argv],
                            check=False, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1].startswith(f"bnrs bench: error: {message}")


def test_custom_architecture_smoke_run(tmp_path):
    """The user's network, end to end without PyTorch: its rows, samples/s, its peak memory
    (in fresh processes, which rebuild it from the options) and its profile."""
    path = tmp_path / "bench.json"
    spec = "c8-bn-relu-mp2-inc4_4_8_2_4_4-res16s2-gap-fc16-bn-relu-d0.5"
    result = subprocess.run(
        [sys.executable, "-m", "bnrs.bench", "--smoke", "--no-torch", "--threads", "1",
         "--architecture", spec, "--input-shape", "3", "16", "16", "--n-classes", "5",
         "--batch-size", "16", "--profile", "--json", str(path)],
        check=False, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    output, data = result.stdout, json.loads(path.read_text())
    assert f"network custom network: {spec} on 3x16x16, 5 classes, batch 16" in output
    assert "custom network train epoch, 64 x 3x16x16, batch 16, Adam: bnrs" in output
    assert "peak RSS of custom network training (4 steps) above the baseline: bnrs" in output
    assert "-- profile: bnrs training step of custom network" in output
    # Branches: the step executor does not plan the network, so it has no stages to time.
    assert data["step_profile"] is None
    assert ("-- profile: no stage times for custom network: its steps did not run as the "
            "step executor's plan") in output
    assert data["architecture"] == spec
    assert data["networks"] == [{"name": "custom network", "key": "custom_",
                                 "architecture": spec, "input_shape": [3, 16, 16],
                                 "n_classes": 5, "min_ratio": None}]
    (section,) = data["sections"]
    rows = {row["key"]: row for row in section["rows"]}
    assert rows["custom_train_epoch"]["samples"] == 64
    assert rows["custom_inference"]["samples"] == 32
    assert rows["custom_train_epoch"]["targets"] == []
    assert section["memory"]["network"] == "custom network"
    assert section["memory"]["bnrs"]["steps"] == 4
    model = nn.from_spec(spec, (3, 16, 16), 5)
    assert len(section["profile"]["bnrs"]["layers"]) == len(model)


def test_network_flops_counts_every_branch():
    # A residual block on a 4x6x6 input: two 3x3 convs 4 -> 4, then the output layer.
    model = nn.from_spec("res4_nobn-gap", (4, 6, 6), 3)
    conv, fc = 2 * 4 * 6 * 6 * 4 * 9, 2 * 4 * 3
    # The block's first conv sees the input: no input gradient in training.
    assert bench.network_flops(model, (4, 6, 6)) == (2 * conv + fc,
                                                      2 * conv + fc + conv + 2 * (conv + fc))
    # An Inception block: every branch counts.
    model = nn.from_spec("inc1_1_1_1_1_1_nobn", (2, 5, 5), 2)
    branches = 2 * 25 * (2 * 1 + 2 * 1 + 1 * 1 * 9 + 2 * 1 + 1 * 1 * 25 + 2 * 1)
    fc = 2 * (4 * 25) * 2
    forward = branches + fc
    assert bench.network_flops(model, (2, 5, 5))[0] == forward


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


# --- Waiting for idle threads before each sample --------------------------------------------

def test_thread_state_is_the_letter_after_the_name():
    # The name is in brackets and may itself hold brackets and spaces.
    assert bench.timing.thread_state("42 (python) S 1 42 42 0") == "S"
    assert bench.timing.thread_state("43 (a) R (b)) R 1 43") == "R"


def test_other_threads_running_counts_running_threads_but_the_callers(tmp_path):
    import threading

    states = {threading.get_native_id(): "R", 2: "R", 3: "S", 4: "R", 5: "D"}
    for tid, state in states.items():
        (tmp_path / str(tid)).mkdir()
        (tmp_path / str(tid) / "stat").write_text(f"{tid} (pool worker) {state} 1 2 3\n")
    (tmp_path / "6").mkdir()  # a thread that ended between the listing and the read
    assert bench.other_threads_running(str(tmp_path)) == 2
    assert bench.other_threads_running(str(tmp_path / "missing")) is None


def test_threads_cpu_seconds_splits_bnrs_pool_from_the_others(tmp_path):
    import threading

    threads = {threading.get_native_id(): ("python", 9), 2: ("bnrs-0", 1), 3: ("bnrs-1", 2),
               4: ("python", 4), 5: ("onnxruntime", 8)}
    for tid, (name, seconds) in threads.items():
        (tmp_path / str(tid)).mkdir()
        (tmp_path / str(tid) / "comm").write_text(name + "\n")
        (tmp_path / str(tid) / "schedstat").write_text(f"{seconds * 10**9} 0 1\n")
    assert bench.timing.threads_cpu_seconds(str(tmp_path)) == (3.0, 12.0)
    assert bench.timing.threads_cpu_seconds(str(tmp_path / "missing")) is None


class FakeClock:
    """A clock that only ``sleep`` advances, for waits without real time."""

    def __init__(self):
        self.now, self.sleeps = 0.0, []

    def sleep(self, seconds):
        self.sleeps.append(seconds)
        self.now += seconds

    def __call__(self):
        return self.now


def test_wait_until_idle_needs_consecutive_idle_readings():
    clock = FakeClock()
    readings = iter([2, 0, 0, 1, 0, 0, 0, 5])
    waited, idle = bench.wait_until_idle(0.002, running=lambda: next(readings),
                                         sleep=clock.sleep, clock=clock)
    assert idle
    # The minimum first, then a poll after each reading but the last of the three idle ones.
    assert clock.sleeps == [0.002] + [bench.timing.IDLE_POLL_SECONDS] * 6
    assert waited == pytest.approx(clock.now)
    assert next(readings) == 5


def test_wait_until_idle_gives_up_at_the_timeout_or_without_proc():
    clock = FakeClock()
    waited, idle = bench.wait_until_idle(0.0, timeout=0.01, running=lambda: 1,
                                         sleep=clock.sleep, clock=clock)
    assert not idle and 0.01 <= waited < 0.01 + 2 * bench.timing.IDLE_POLL_SECONDS
    clock = FakeClock()
    waited, idle = bench.wait_until_idle(0.002, running=lambda: None, sleep=clock.sleep,
                                         clock=clock)
    assert not idle and waited == pytest.approx(0.002)


def test_measure_waits_before_every_sample():
    runs = [lambda: None, lambda: None]
    timings = bench.measure(runs, runs, repeats=3, min_sample_seconds=0.0,
                            settle_seconds=0.0)
    assert [len(waits) for waits in timings.idle_waits] == [3, 3]
    assert all(wait >= 0 for waits in timings.idle_waits for wait in waits)
    assert len(timings.not_idle) == 2
    assert len(timings.threads_cpu) == 2


# --- bnrs's speed-up, measured apart from PyTorch -------------------------------------------

def test_scaling_child_prints_bnrs_speedups(capsys):
    assert bench.main(["--smoke", "--scaling-child", "--no-peers", "--threads", "1", "2"]) == 0
    rows = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    keys = {row["key"] for row in rows}
    # LeNetBN's training epoch has the scaling target, beside the kernels.
    assert {"conv_large_fwd", "bn_train_fwd", "train_epoch"} <= keys
    assert "inference" not in keys
    for row in rows:
        assert row["threads"] == 2 and row["process"] == "child"
        assert row["speedup"] > 0 and len(row["cores"]) == 2


def test_scaling_child_command_repeats_the_runs_sizes_and_networks():
    from bnrs.bench.runner import scaling_child_command
    from bnrs.cli import parse_bench_args

    argv = ["--quick", "--threads", "1", "2", "--no-peers", "--architecture", "c8-relu-mp2",
            "--input-shape", "1", "12", "12", "--n-classes", "3", "--batch-size", "16",
            "--inference-batch-size", "4"]
    args = parse_bench_args(argv)
    command = scaling_child_command(args, bench.run_mode(args))
    assert command[1:4] == ["-m", "bnrs.bench", "--scaling-child"]
    child = parse_bench_args(command[3:])
    assert child.scaling_child and child.quick and child.threads == [1, 2]
    assert child.networks == args.networks and child.batch_size == 16
    assert bench.run_mode(child) == bench.run_mode(args)
    assert child.repeats == bench.MODES["quick"].kernel_repeats


def test_measure_scaling_takes_bnrs_speedup_from_elsewhere():
    def never():
        pytest.fail("bnrs timed in the process of the other framework")

    work = bench.Work("k", "k", 1.0, bench.GFLOPS, never, None, scaling=True)
    given = {"1t_s": bench.spread([2.0]), "nt_s": bench.spread([1.0]), "speedup": 2.0,
             "cores": [1.0, 1.9], "idle_wait_max_s": [0.0, 0.0], "not_idle": [0, 0],
             "bnrs_threads_cpu_s": [1.0, 2.0], "other_threads_cpu_s": [0.0, 0.0],
             "process": "child"}
    row = bench.measure_scaling(work, 2, bench.MODES["smoke"], None, given)
    assert row["bnrs_speedup"] == 2.0 and row["bnrs_process"] == "child"
    assert row["torch_speedup"] is None and row["cores"] == [1.0, 1.9]
    assert row["targets"][0]["met"] is True


def test_with_torch_bnrs_speedups_come_from_the_scaling_child():
    torch = pytest.importorskip("torch")
    from bnrs.bench.runner import measure_all_scaling
    from bnrs.cli import parse_bench_args

    args = parse_bench_args(["--smoke", "--threads", "1", "2", "--no-peers"])
    mode = bench.run_mode(args)
    works = [work for work in bench.kernel_works(mode, torch) if work.key == "bn_train_fwd"]
    rows = measure_all_scaling(works, mode, torch, args)
    assert [(row["key"], row["bnrs_process"]) for row in rows] == [("bn_train_fwd", "child")]
    assert rows[0]["torch_speedup"] > 0 and len(rows[0]["cores"]) == 4


EPOCH_BENCH = Path(__file__).parent.parent / "benches" / "bench_epoch.py"


def test_epoch_bench_reports_each_thread_count_against_the_peak():
    """benches/bench_epoch.py, at its smallest: one round per count, each count's times and
    shares of the peak, the shares matching the epoch's FLOPs over its times."""
    result = subprocess.run([sys.executable, str(EPOCH_BENCH), "--rounds", "2", "--threads",
                             "1", "2", "--samples", "130"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    header, *lines = result.stdout.splitlines()
    rows = [line for line in lines if " thread(s): " in line]
    assert header.startswith("LeNetBN training epoch, 130 images, batch 64, Adam: ")
    gflop = float(header.split("Adam: ")[1].split(" GFLOP")[0])
    peak = float(header.split("FMA peak ")[1].split(" GFLOP/s")[0])
    assert gflop > 0 and peak > 0
    assert [row.split(" thread(s)")[0].strip() for row in rows] == ["1", "2"]
    for threads, row in zip((1, 2), rows):
        times = [float(t) for t in row.split(": ")[1].split(" ms;")[0].split(", ")]
        assert len(times) == 2 and all(t > 0 for t in times)
        fastest = float(row.split("fastest ")[1].split(" ms")[0])
        share = float(row.split(" ms = ")[-1].rstrip("%")) / 100
        assert fastest == min(times)
        # Rounded as printed: the times to the ms, the share to 0.1%.
        assert share == pytest.approx(gflop / (fastest / 1e3) / (peak * threads), rel=0.2)
    # At two threads, the round trip between cores before each round, on a line of its
    # own right after the count's.
    trips_line = lines[lines.index(rows[1]) + 1]
    assert trips_line.startswith("  2 thread(s), cache-line round trip between cores before "
                                 "each round: ")
    trips = [float(t) for t in trips_line.split(": ")[1].split(" ns")[0].split(", ")]
    assert len(trips) == 2 and all(t > 0 for t in trips)
    assert len(lines) == 3


def test_epoch_bench_compares_the_epoch_in_one_call_with_its_steps():
    result = subprocess.run([sys.executable, str(EPOCH_BENCH), "--rounds", "1", "--threads",
                             "2", "--samples", "1280", "--step-by-step"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    _, row, _, compared = result.stdout.splitlines()
    assert row.startswith("  2 thread(s): ")
    assert compared.startswith("  2 thread(s), step by step: ")
    epoch = float(row.split(": ")[1].split(" ms;")[0])
    steps = float(compared.split(": ")[1].split(" ms;")[0])
    ratio = float(compared.split("one call ")[1].split("x faster")[0])
    # One round: the ratio of the two times, printed rounded to the ms (20 steps: tens of ms).
    assert ratio == pytest.approx(steps / epoch, rel=0.05)


def test_epoch_bench_times_single_thread_epochs_in_processes_at_once():
    """--concurrent: as many single-thread processes as the largest count, each taking an
    epoch at the same moment, against the single-thread epoch alone."""
    result = subprocess.run([sys.executable, str(EPOCH_BENCH), "--rounds", "2", "--threads",
                             "1", "2", "--samples", "130", "--concurrent"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    single = next(line for line in lines if line.startswith("  1 thread(s): "))
    together = lines[-1]
    assert together.startswith("  2 processes at once, 1 thread each: ")
    alone = [float(t) for t in single.split(": ")[1].split(" ms;")[0].split(", ")]
    at_once = [float(t) for t in together.split(": ")[1].split(" ms (")[0].split(", ")]
    assert len(at_once) == 2 and all(t > 0 for t in at_once)
    slower = float(together.split("processes); ")[1].split("x the single")[0])
    # Medians of two rounds, each printed rounded to the ms (a few ms an epoch).
    ratio = (sum(at_once) / 2) / (sum(alone) / 2)
    assert slower == pytest.approx(ratio, rel=0.25)
    bound = float(together.split("at best ")[1].split(" ms")[0])
    assert bound == pytest.approx(sum(alone) / 2 * slower / 2, rel=0.25, abs=1)


def test_core_round_trip_is_measured_and_its_duration_checked():
    from bnrs import _core

    assert 0 < _core.core_round_trip_ns(0.01) < 1e9
    for seconds in (0.0, -1.0, float("nan"), float("inf"), 61.0):
        with pytest.raises(ValueError, match=r"seconds: expected a number in \(0, 60\]"):
            _core.core_round_trip_ns(seconds)


def test_a_part_run_with_the_cores_far_apart_is_noted():
    from bnrs.bench.report import FAR_APART_NS, far_apart_note, format_scaling

    assert far_apart_note(None, None) == []
    assert far_apart_note(48.0, FAR_APART_NS) == []
    note = far_apart_note(47.0, 433.0)
    assert len(note) == 1 and "round trip up to 433 ns" in note[0]
    assert far_apart_note(512.0, 46.0)[0].startswith("note: the cores were far apart")
    row = {"name": "LeNetBN train epoch", "threads": 2, "bnrs_1t_s": {"median": 0.5},
           "bnrs_s": {"median": 0.3}, "cores": [1.0, 1.9], "bnrs_speedup": 1.7,
           "torch_speedup": None, "targets": [{"target": 1.8, "met": False}]}
    lines = format_scaling([row], (40.0, 450.0))
    assert lines[0].endswith("cache-line round trip between cores 40 ns before, 450 ns after ==")
    assert lines[1] == far_apart_note(40.0, 450.0)[0]
