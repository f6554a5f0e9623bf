"""``bnrs bench``'s peers (Keras, ONNX Runtime), each run in a child process of its own.

Neither peer is a test dependency: the options, the one-line message for an interpreter
without the peer and the child's JSON protocol are tested with a fake peer (a NumPy
forward registered in the child); the outputs of the real peers are compared with bnrs's
only where they are installed (docs/benchmark.md, "Peers").
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import stat
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from bnrs import bench
from bnrs.bench import peer
from bnrs.cli import parse_bench_args

# Registers a fake peer under the given name (an inference row whose peer run is a NumPy
# matmul), then runs the child's main with the rest of the arguments.
FAKE_CHILD = textwrap.dedent("""
    import sys
    import numpy as np
    from bnrs.bench import peer

    def fake_works(trainer, threads):
        weight = np.ones((784, 10), np.float32)
        run = lambda: trainer.images.reshape(len(trainer.images), -1) @ weight
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
    assert result["mode"] == "smoke" and result["schema"] == 1
    assert result["thread_settings"] == "2 fake"
    (row,) = result["rows"]
    assert row["key"] == "inference" and row["samples"] == 64  # the fake's own count
    assert len(row["bnrs_s"]["samples"]) == len(row["peer_s"]["samples"]) == 1
    assert row["ratio"] == pytest.approx(row["peer_s"]["median"] / row["bnrs_s"]["median"])
    assert len(row["cores"]) == 2
    lines = bench.format_peers({"fake": {"python": sys.executable, "runs": [result]}})
    assert any(line.startswith("fake") and "fake inference" in line for line in lines)
    assert lines[-1] == f"  fake (fake 0.1; {sys.executable}): 2 fake"


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


@pytest.fixture
def fake_interpreter(tmp_path):
    """An executable standing in for a peer venv's python: runs the fake child as
    ``onnxruntime``."""
    child = tmp_path / "fake_child.py"
    child.write_text(FAKE_CHILD)
    script = tmp_path / "python"
    # Called as PYTHON -m bnrs.bench.peer ARGS: drop "-m bnrs.bench.peer".
    script.write_text(f'#!/bin/sh\nshift 2\nexec "{sys.executable}" "{child}" onnxruntime '
                      '"$@"\n')
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return str(script)


def test_bench_runs_a_peer_in_its_interpreter_and_reports_it(fake_interpreter, tmp_path):
    path = tmp_path / "bench.json"
    output = io.StringIO()
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "torch", None)
        with contextlib.redirect_stdout(output), contextlib.redirect_stderr(io.StringIO()):
            assert bench.main(["--smoke", "--threads", "1", "2", "--json", str(path),
                               "--peer-python", f"onnxruntime={fake_interpreter}"]) == 0
    result = json.loads(path.read_text())
    runs = result["peers"]["onnxruntime"]["runs"]
    assert result["peers"]["onnxruntime"]["python"] == fake_interpreter
    assert [run["threads"] for run in runs] == [1, 2]
    text = output.getvalue()
    assert "== peers: bnrs and each peer interleaved" in text
    table = [line for line in text.splitlines() if line.startswith("onnxruntime ")]
    assert len(table) == 2 and all("fake inference" in line for line in table)


def test_failed_child_is_one_line_in_the_table(tmp_path):
    script = tmp_path / "python"
    script.write_text("#!/bin/sh\necho 'Fatal: something broke' >&2\nexit 134\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    run = bench.run_peer("keras", str(script), 2, "smoke")
    assert run == {"framework": "keras", "threads": 2,
                   "error": "exit code 134: Fatal: something broke"}
    lines = bench.format_peers({"keras": {"python": str(script), "runs": [run]}})
    assert lines[-1].split() == ["keras", "2", "failed:", "exit", "code", "134:", "Fatal:",
                                 "something", "broke"]


# --- The real peers, where installed ---------------------------------------------------------

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


KERAS_CHILD = textwrap.dedent("""
    import json, sys
    import numpy as np
    from bnrs import bench
    from bnrs.bench import peer

    tf, keras = peer.import_keras(threads=2)
    model = bench.build_bnrs_network(seed=3).eval()
    images, _ = bench.make_data(64, seed=1)
    network = peer.build_keras_network(model, keras)
    logits = network.predict(images.transpose(0, 2, 3, 1), verbose=0)
    np.save(sys.argv[1], np.stack([model(images), logits]))
""")


def test_keras_matches_bnrs(tmp_path):
    # TensorFlow in a child: it aborts beside a PyTorch that another test may have loaded.
    if peer.missing_modules("keras"):
        pytest.skip("keras and tensorflow are not installed here")
    path = tmp_path / "logits.npy"
    subprocess.run([sys.executable, "-c", KERAS_CHILD, str(path)], check=True, timeout=600,
                   env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    expected, logits = np.load(path)
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)


def test_peer_mode_uses_4000_samples_in_a_full_run():
    mode = peer.peer_mode(bench.MODES["full"])
    assert mode.train_samples == 4000
    assert mode.infer_batches * mode.infer_batch_size == 4000
    assert peer.peer_mode(bench.MODES["quick"]) == bench.MODES["quick"]
