"""``bnrs bench``'s peers (Keras, ONNX Runtime), each run in a child process of its own.

Neither peer is a test dependency: the options, the one-line message for an interpreter
without the peer and the child's JSON protocol are tested with a fake peer (a NumPy
forward registered in the child); the outputs of the real peers are compared with bnrs's
only where they are installed (docs/benchmark.md, "Peers").
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import stat
import subprocess
import sys
import textwrap

import bnrs
import numpy as np
import pytest
from bnrs import bench
from bnrs.bench import keras_mirror, peer
from bnrs.cli import parse_bench_args

# Registers a fake peer under the given name (an inference row whose peer run is a NumPy
# matmul), then runs the child's main with the rest of the arguments.
FAKE_CHILD = textwrap.dedent("""
    import sys
    import numpy as np
    from bnrs.bench import peer

    def fake_works(trainer, threads):
        flat = trainer.images.reshape(len(trainer.images), -1)
        weight = np.ones((flat.shape[1], trainer.network.n_classes), np.float32)
        run = lambda: flat @ weight
        work = peer.PeerWork("inference", "fake inference", len(trainer.images),
                             trainer.bnrs_inference, trainer.bnrs_inference, run, run)
        return [work], {"versions": {"fake": "0.1"}, "thread_settings": f"{threads} fake"}

    name = sys.argv[1]
    peer.BUILDERS[name] = fake_works
    peer.PEERS.pop(name, None)
    sys.exit(peer.main(sys.argv[2:]))
""")


def _parse_error(capsys, argv) -> str:
    """The last line bnrs bench printed for bad arguments (exit 2, no traceback)."""
    with pytest.raises(SystemExit) as error:
        parse_bench_args(argv)
    assert error.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


def test_peer_python_needs_name_and_path(capsys):
    line = _parse_error(capsys, ["--smoke", "--peer-python", "tensorflow=/usr/bin/python3"])
    assert line == ("bnrs bench: error: --peer-python: expected NAME=PYTHON with NAME one of "
                    "keras, onnxruntime, got 'tensorflow=/usr/bin/python3'")
    assert "expected NAME=PYTHON" in _parse_error(capsys, ["--peer-python", "keras"])


def test_peers_and_no_peers_exclude_each_other(capsys):
    line = _parse_error(capsys, ["--smoke", "--peers", "keras", "--no-peers"])
    assert line == "bnrs bench: error: argument --no-peers: not allowed with argument --peers"


def test_peer_python_that_does_not_exist(capsys, tmp_path):
    missing = tmp_path / "no-python"
    line = _parse_error(capsys, ["--peer-python", f"onnxruntime={missing}"])
    assert line == (f"bnrs bench: error: onnxruntime: cannot run {missing}: "
                    "No such file or directory")


@pytest.mark.parametrize("framework", ["keras", "onnxruntime"])
def test_interpreter_without_the_peer_says_so_in_one_line(capsys, framework):
    if not peer.missing_modules(framework):
        pytest.skip(f"{framework} is installed here")
    missing = ", ".join(peer.missing_modules(framework))
    line = _parse_error(capsys, ["--peers", framework])
    assert line == (f"bnrs bench: error: {framework}: {missing} not importable by "
                    f"{sys.executable} ({peer.PEERS[framework].install} in a separate "
                    f"virtual environment with bnrs, and pass --peer-python "
                    f"{framework}=THAT_VENV/bin/python)")


def test_peers_default_to_those_importable_here():
    args = parse_bench_args(["--smoke"])
    assert args.peer_pythons == {name: sys.executable for name in peer.PEERS
                                 if not peer.missing_modules(name)}
    assert parse_bench_args(["--smoke", "--no-peers"]).peer_pythons == {}


def test_child_prints_one_json_line(tmp_path):
    command = [sys.executable, "-c", FAKE_CHILD, "fake", "--framework", "fake",
               "--threads", "2", "--smoke"]
    done = subprocess.run(command, capture_output=True, text=True, check=True, timeout=300)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["framework"] == "fake" and result["threads"] == 2
    assert result["mode"] == "smoke" and result["schema"] == 2
    assert result["thread_settings"] == "2 fake"
    # Without the network options: LeNetBN, as before the other networks.
    assert result["network"] == "LeNetBN" and result["architecture"] == bench.ARCHITECTURE
    (row,) = result["rows"]
    assert row["key"] == "inference" and row["samples"] == 64  # the fake's own count
    assert row["name"] == "LeNetBN fake inference"
    assert len(row["bnrs_s"]["samples"]) == len(row["peer_s"]["samples"]) == 1
    assert row["ratio"] == pytest.approx(row["peer_s"]["median"] / row["bnrs_s"]["median"])
    assert len(row["cores"]) == 2
    lines = bench.format_peers({"fake": {"python": sys.executable, "runs": [result]}})
    assert any(line.startswith("fake") and "fake inference" in line for line in lines)
    assert lines[-1] == f"  fake (fake 0.1; {sys.executable}): 2 fake"


def test_child_times_the_network_it_is_given():
    network = bench.Network("Tiny", "tiny_", "c4-bn-relu-ap2-gap", (3, 10, 12), 5)
    command = [sys.executable, "-c", FAKE_CHILD, "fake", "--framework", "fake",
               "--threads", "1", "--smoke", *peer.network_options(network, 16, 8)]
    done = subprocess.run(command, capture_output=True, text=True, check=True, timeout=300)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert (result["network"], result["architecture"], result["input_shape"],
            result["n_classes"], result["batch_size"], result["inference_batch_size"]) == (
                "Tiny", "c4-bn-relu-ap2-gap", [3, 10, 12], 5, 16, 8)
    (row,) = result["rows"]
    assert row["key"] == "tiny_inference" and row["name"] == "Tiny fake inference"


def test_child_without_the_package_exits_with_its_message():
    if not peer.missing_modules("onnxruntime"):
        pytest.skip("onnxruntime is installed here")
    done = subprocess.run([sys.executable, "-m", "bnrs.bench.peer", "--framework",
                           "onnxruntime", "--threads", "1", "--smoke"],
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == peer.MISSING_EXIT_CODE
    assert json.loads(done.stdout) == {
        "framework": "onnxruntime",
        "error": peer.missing_message("onnxruntime", sys.executable,
                                      peer.missing_modules("onnxruntime"))}
    assert "Traceback" not in done.stderr


def _fake_python(directory, framework: str) -> str:
    """An executable standing in for a peer venv's python: runs the fake child as
    ``framework``."""
    child = directory / "fake_child.py"
    child.write_text(FAKE_CHILD)
    script = directory / f"python-{framework}"
    # Called as PYTHON -m bnrs.bench.peer ARGS: drop "-m bnrs.bench.peer".
    script.write_text(f'#!/bin/sh\nshift 2\nexec "{sys.executable}" "{child}" {framework} '
                      '"$@"\n')
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return str(script)


@pytest.fixture
def fake_interpreter(tmp_path):
    """A fake peer interpreter standing in for ``onnxruntime``'s."""
    return _fake_python(tmp_path, "onnxruntime")


def test_bench_runs_a_peer_in_its_interpreter_and_reports_it(fake_interpreter, tmp_path):
    path = tmp_path / "bench.json"
    output = io.StringIO()
    architecture = "c4k3s2p1-bn-relu-sd0.1-ap2-fc8"
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "torch", None)
        with contextlib.redirect_stdout(output), contextlib.redirect_stderr(io.StringIO()):
            assert bench.main(["--smoke", "--threads", "1", "2", "--json", str(path),
                               "--architecture", architecture, "--input-shape", "2", "12",
                               "10", "--n-classes", "3", "--batch-size", "16",
                               "--peer-python", f"onnxruntime={fake_interpreter}"]) == 0
    result = json.loads(path.read_text())
    assert result["schema"] == 2
    runs = result["peers"]["onnxruntime"]["runs"]
    assert result["peers"]["onnxruntime"]["python"] == fake_interpreter
    assert [run["threads"] for run in runs] == [1, 2]
    # The peer times the bench's network, not LeNetBN.
    for run in runs:
        assert (run["network"], run["architecture"], run["input_shape"], run["n_classes"],
                run["batch_size"]) == ("custom network", architecture, [2, 12, 10], 3, 16)
        assert [row["key"] for row in run["rows"]] == ["custom_inference"]
    text = output.getvalue()
    assert "== peers: bnrs and each peer interleaved" in text
    table = [line for line in text.splitlines() if line.startswith("onnxruntime ")]
    assert len(table) == 2 and all("custom network fake inference" in line for line in table)


def test_measure_peers_runs_one_child_per_network_and_thread_count(monkeypatch):
    calls = []

    def fake_run_peer(framework, python, threads, mode_name, network, batch_size,
                      inference_batch_size):
        calls.append((framework, network.name, threads, mode_name, batch_size,
                      inference_batch_size))
        return {"framework": framework, "threads": threads, "network": network.name}

    monkeypatch.setattr(bench.runner, "run_peer", fake_run_peer)
    networks = [bench.LENET, bench.NETWORKS["resnet"]]
    mode = dataclasses.replace(bench.MODES["smoke"], batch_size=16, infer_batch_size=8)
    with contextlib.redirect_stderr(io.StringIO()):
        peers = bench.measure_peers({"keras": "k", "onnxruntime": "o"}, [1, 2], mode,
                                    networks)
    assert calls == [(framework, name, threads, "smoke", 16, 8)
                     for framework in ("keras", "onnxruntime")
                     for name in ("LeNetBN", "ResNet") for threads in (1, 2)]
    assert [run["network"] for run in peers["onnxruntime"]["runs"]] == [
        "LeNetBN", "LeNetBN", "ResNet", "ResNet"]


def test_failed_child_is_one_line_in_the_table(tmp_path):
    script = tmp_path / "python"
    script.write_text("#!/bin/sh\necho 'Fatal: something broke' >&2\nexit 134\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    run = bench.run_peer("keras", str(script), 2, "smoke", bench.NETWORKS["resnet"])
    assert run == {"framework": "keras", "threads": 2, "network": "ResNet",
                   "error": "exit code 134: Fatal: something broke"}
    lines = bench.format_peers({"keras": {"python": str(script), "runs": [run]}})
    assert lines[-1].split() == ["keras", "2", "ResNet", "failed:", "exit", "code", "134:",
                                 "Fatal:", "something", "broke"]


# --- The Keras mirror's plan (NumPy only) ---------------------------------------------------

def _plan_layers(nodes):
    """The Keras layer names of a plan, in order, blocks flattened depth first."""
    names = []
    for node in nodes:
        if isinstance(node, keras_mirror.KerasConcat):
            names += ["Concatenate", *(n for b in node.branches for n in _plan_layers(b))]
        elif isinstance(node, keras_mirror.KerasResidual):
            names += ["Add", *_plan_layers(node.body), *_plan_layers(node.shortcut or []),
                      *_plan_layers(node.activation)]
        else:
            names.append(node.name)
    return names


def test_keras_plan_pads_as_pytorch_where_same_differs():
    model = bnrs.nn.from_spec("c4k3s2p1-c4k3s2p1-c4k5-mp3s1-sd0.5-ap2-fc3",
                              (1, 20, 20), 2, random_state=0)
    nodes = bench.keras_plan(model, (1, 20, 20))
    convs = [node for node in nodes if node.name == "Conv2D"]
    # 20x20 at stride 2: TensorFlow's "same" pads (0, 1), PyTorch (1, 1); 10x10 likewise;
    # a 5x5 at stride 1 pads (2, 2) either way.
    assert [c.kwargs["padding"] for c in convs] == ["valid", "valid", "same"]
    assert [node.name for node in nodes] == [
        "ZeroPadding2D", "Conv2D", "ZeroPadding2D", "Conv2D", "Conv2D", "MaxPooling2D",
        "SpatialDropout2D", "AveragePooling2D", "Flatten", "Dense", "Dense"]
    assert nodes[0].kwargs == {"padding": ((1, 1), (1, 1))}
    odd = bench.keras_plan(bnrs.nn.from_spec("c4k3s2p1", (1, 13, 13), 2), (1, 13, 13))
    assert [node.name for node in odd][:1] == ["Conv2D"]
    assert odd[0].kwargs["padding"] == "same"


def test_keras_plan_of_the_named_networks():
    inception = _plan_layers(bench.keras_plan(bench.NETWORKS["inception"].build(),
                                              bench.INPUT_SHAPE))
    assert inception.count("Concatenate") == 2 and inception[-3:] == [
        "GlobalAveragePooling2D", "Flatten", "Dense"]
    resnet = _plan_layers(bench.keras_plan(bench.NETWORKS["resnet"].build(),
                                           bench.INPUT_SHAPE))
    assert resnet.count("Add") == 3 and resnet.count("ReLU") == 1 + 3 * 2


def test_keras_plan_permutes_the_dense_layer_after_a_flatten():
    model = bnrs.nn.Sequential(bnrs.nn.Flatten(), bnrs.nn.Linear(2 * 4 * 6, 5, random_state=1))
    images = np.random.default_rng(0).standard_normal((3, 2, 4, 6), dtype=np.float32)
    flatten, dense = bench.keras_plan(model, (2, 4, 6))
    assert (flatten.name, dense.name) == ("Flatten", "Dense")
    kernel, bias = dense.weights
    # Keras flattens (H, W, C); the kernel must read that order as bnrs reads (C, H, W).
    channels_last = images.transpose(0, 2, 3, 1).reshape(3, -1)
    np.testing.assert_allclose(channels_last @ kernel + bias, model(images), rtol=1e-5,
                               atol=1e-6)


@pytest.mark.parametrize("model, input_shape, named", [
    (bnrs.nn.from_spec("c4-brn-relu", (1, 8, 8), 2), (1, 8, 8), "BatchRenorm2d"),
    (bnrs.nn.Sequential(bnrs.nn.MaxPool2d(3, 2, 1)), (1, 8, 8), "MaxPool2d"),
    (bnrs.nn.Sequential(bnrs.nn.Conv2d(1, 2, 3, 2, dilation=2)), (1, 9, 9), "Conv2d"),
    (bnrs.nn.Sequential(bnrs.nn.BatchNorm2d(1, momentum=None)), (1, 4, 4), "BatchNorm2d"),
    (bnrs.nn.Sequential(bnrs.nn.Conv2d(4, 4, 3, groups=2)), (4, 6, 6), "Conv2d"),
])
def test_keras_problem_names_the_layer(model, input_shape, named):
    problem = bench.keras_problem(model, input_shape)
    assert problem.startswith(f"Keras has no exact counterpart of {named}(")
    assert "\n" not in problem
    with pytest.raises(bench.NoKerasCounterpart, match=named):
        bench.keras_plan(model, input_shape)


def test_bench_refuses_a_network_keras_cannot_mirror_before_measuring(tmp_path, capsys):
    keras_python = _fake_python(tmp_path, "keras")
    with pytest.raises(SystemExit) as error:
        bench.main(["--smoke", "--no-torch", "--architecture", "c4-brn-relu",
                    "--peer-python", f"keras={keras_python}"])
    assert error.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""   # nothing measured, not even the header
    (line,) = captured.err.strip().splitlines()
    assert line.startswith("bnrs bench: error: --architecture: Keras has no exact "
                           "counterpart of BatchRenorm2d(")
    assert line.endswith("the keras peer cannot time custom network: leave keras out "
                         "(--peers NAME ... or --no-peers)")


# --- The real peers, where installed ---------------------------------------------------------

#: (architecture, input shape): the named networks with the branching blocks, and custom
#: ones with stride-2 convs (padded as PyTorch where TensorFlow's "same" differs, on an
#: even size), average pooling, spatial dropout, the other norms and a flat input.
PEER_NETWORKS = {
    "inception": (bench.NETWORKS["inception"].architecture, bench.INPUT_SHAPE),
    "resnet": (bench.NETWORKS["resnet"].architecture, bench.INPUT_SHAPE),
    "custom": ("c8k3s2p1-bn-relu-sd0.2-ap2-c16k5s2p2-lrelu-c16k3s2-ap2s1-fc12-bn-tanh-d0.3",
               (3, 36, 30)),
    "norms": ("c8-gn4-sigmoid-c8k3s2p1-in-mp3s2-c8-ln-relu-gap-fc6-ln", (2, 13, 15)),
    "flat": ("fc16-bn-relu-d0.1-fc8-gn2-tanh", (12,)),
    "separable": ("c8-bn-relu-dsc16s2-relu-res16_dsc-inc4_4_8_2_4_4_dsc-gap", (1, 16, 14)),
}


def _model_and_inputs(name):
    """A network in evaluation mode with every weight and running statistic moved off
    its initial value (so that the batch norms are not the identity), and 64 inputs."""
    architecture, input_shape = PEER_NETWORKS[name]
    model = bnrs.nn.from_spec(architecture, input_shape, 5, random_state=3)
    rng = np.random.default_rng(4)
    state = model.state_dict()
    for key, value in state.items():
        if value.dtype == np.float32:
            moved = (rng.uniform(0.5, 2.0, value.shape) if key.endswith("running_var")
                     else value + rng.normal(0.0, 0.2, value.shape))
            state[key] = moved.astype(np.float32)
    model.load_state_dict(state)
    images = np.random.default_rng(1).standard_normal((64, *input_shape), dtype=np.float32)
    return model.eval(), images, input_shape


def _assert_same_outputs(peer_output, expected):
    """Equal within float32 rounding: relative to the largest output, as a long sum's
    rounding grows with its terms' size rather than the result's."""
    scale = float(np.abs(expected).max())
    np.testing.assert_allclose(peer_output, expected, rtol=1e-5, atol=2e-6 * scale)


def _bnrs_model_and_images():
    model = bench.build_bnrs_network(seed=3).eval()
    images, _ = bench.make_data(64, seed=1)
    return model, images


def test_onnxruntime_matches_bnrs():
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    model, images = _bnrs_model_and_images()
    session = peer.onnxruntime_session(model, threads=2)
    (output,) = session.run(None, {session.get_inputs()[0].name: images})
    np.testing.assert_allclose(output, model(images), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(PEER_NETWORKS))
def test_onnxruntime_matches_bnrs_on_other_networks(name):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    model, images, input_shape = _model_and_inputs(name)
    session = peer.onnxruntime_session(model, 2, input_shape)
    (output,) = session.run(None, {session.get_inputs()[0].name: images})
    _assert_same_outputs(output, model(images))


KERAS_CHILD = textwrap.dedent("""
    import json, sys
    import numpy as np
    from bnrs import bench
    from bnrs.bench import peer

    tf, keras = peer.import_keras(threads=2)
    model = bench.build_bnrs_network(seed=3).eval()
    images, _ = bench.make_data(64, seed=1)
    network = bench.build_keras_network(model, keras, bench.INPUT_SHAPE)
    logits = network.predict(images.transpose(0, 2, 3, 1), verbose=0)
    np.save(sys.argv[1], np.stack([model(images), logits]))
""")

#: The networks of PEER_NETWORKS in Keras: imports this file for them.
KERAS_NETWORKS_CHILD = textwrap.dedent("""
    import sys
    import numpy as np
    sys.path.insert(0, sys.argv[1])
    import test_bench_peers as here
    from bnrs import bench
    from bnrs.bench import peer

    tf, keras = peer.import_keras(threads=2)
    outputs = {}
    for name in here.PEER_NETWORKS:
        model, images, input_shape = here._model_and_inputs(name)
        network = bench.build_keras_network(model, keras, input_shape)
        keras_images = images.transpose(0, 2, 3, 1) if images.ndim == 4 else images
        outputs[name] = network.predict(keras_images, verbose=0)
        outputs[name + ".bnrs"] = model(images)
    np.savez(sys.argv[2], **outputs)
""")


def _run_keras_child(source, *arguments):
    # TensorFlow in a child: it aborts beside a PyTorch that another test may have loaded.
    if peer.missing_modules("keras"):
        pytest.skip("keras and tensorflow are not installed here")
    subprocess.run([sys.executable, "-c", source, *map(str, arguments)], check=True,
                   timeout=600, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})


def test_keras_matches_bnrs(tmp_path):
    path = tmp_path / "logits.npy"
    _run_keras_child(KERAS_CHILD, path)
    expected, logits = np.load(path)
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)


def test_keras_matches_bnrs_on_other_networks(tmp_path):
    path = tmp_path / "outputs.npz"
    _run_keras_child(KERAS_NETWORKS_CHILD, os.path.dirname(__file__), path)
    outputs = np.load(path)
    for name in PEER_NETWORKS:
        _assert_same_outputs(outputs[name], outputs[name + ".bnrs"])


def test_peer_mode_uses_4000_samples_in_a_full_run():
    mode = peer.peer_mode(bench.MODES["full"])
    assert mode.train_samples == 4000
    assert mode.infer_batches * mode.infer_batch_size == 4000
    assert peer.peer_mode(bench.MODES["quick"]) == bench.MODES["quick"]
    # Smaller inference batches: as many of them as make the same 4,000 samples.
    small = peer.peer_mode(bench.workloads.with_inference_batch(bench.MODES["full"], 8))
    assert (small.infer_batches, small.infer_batch_size) == (500, 8)
