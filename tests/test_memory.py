"""Memory: resident memory stays flat over repeated calls, and a request too large to
allocate fails with MemoryError (or ValueError) before allocating, never by the OS
killing the process.

Resident memory is read from /proc/self/statm. Every kernel (and its error path) is
called ``longrun.REPEATED_CALLS`` times (1,000 by default, 10,000 in the long run) after
a warm-up, and may not grow the resident set by more than ``RSS_SLACK``; the growth of
each is printed at the end of the session. A leaked output buffer of the small shapes
used here would add ~1 kB to 40 kB per call, so 1,000 calls would show it.

Requests too large are tried in the test process when they exceed any machine's memory
(terabytes, overflowing sizes) and in a child under an address-space limit (RLIMIT_AS)
for sizes the OS could grant, so that nothing here can exhaust the machine.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import textwrap
import time

import child
import longrun
import numpy as np
import pytest
from bnrs import functional as F
from bnrs import nn, optim

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="reads /proc/self/statm")

RSS_SLACK = 4 * 2**20  # bytes
PAGE = os.sysconf("SC_PAGE_SIZE")


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * PAGE


def _calls() -> dict:
    """name -> a function making one call on small inputs (fresh outputs each time)."""
    rng = np.random.default_rng(0)

    def normal(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    x, w, b = normal(2, 3, 9, 9), normal(4, 3, 3, 3), normal(4)
    gy = normal(2, 4, 9, 9)
    pooled, indices = F.max_pool2d(x, 3, 2, 1, return_indices=True)
    gy_pool = normal(*pooled.shape)
    rows, weight, bias, gy_rows = normal(8, 20), normal(10, 20), normal(10), normal(8, 10)
    target = rng.integers(0, 10, 8)
    running_mean, running_var = np.zeros(3, np.float32), np.ones(3, np.float32)
    mean, invstd = np.zeros(3, np.float32), np.ones(3, np.float32)
    param, grad, buffer = normal(500), normal(500), np.zeros(500, np.float32)
    exp_avg, exp_avg_sq = np.zeros(500, np.float32), np.zeros(500, np.float32)
    x64 = x.astype(np.float64)  # the conversion path

    def error(call, exception=ValueError):
        def run():
            try:
                call()
            except exception:
                return
            raise AssertionError("expected an error")
        return run

    return {
        "conv2d": lambda: F.conv2d(x, w, b, padding=1),
        "conv2d_float64_input": lambda: F.conv2d(x64, w, b, padding=1),
        "conv2d_backward": lambda: F.conv2d_backward(gy, x, w, padding=1),
        "max_pool2d": lambda: F.max_pool2d(x, 3, 2, 1, return_indices=True),
        "max_pool2d_backward": lambda: F.max_pool2d_backward(gy_pool, indices, x.shape),
        "avg_pool2d": lambda: F.avg_pool2d(x, 3, 2, 1),
        "avg_pool2d_backward": lambda: F.avg_pool2d_backward(gy_pool, x.shape, 3, 2, 1),
        "batch_norm_train": lambda: F.native_batch_norm(x, b[:3], b[:3], running_mean,
                                                        running_var, True),
        "batch_norm_eval": lambda: F.batch_norm(x, running_mean, running_var),
        "batch_norm_backward": lambda: F.batch_norm_backward(x, x, None, mean, invstd),
        "dropout": lambda: F.dropout(x, 0.5, seed=1),
        "dropout2d_backward": lambda: F.dropout2d_backward(x, 0.5, 1),
        "dropout_mask": lambda: F.dropout_mask(1000, 0.5, 1),
        "linear": lambda: F.linear(rows, weight, bias),
        "linear_backward": lambda: F.linear_backward(gy_rows, rows, weight),
        "relu": lambda: F.relu(x),
        "leaky_relu_backward": lambda: F.leaky_relu_backward(x, x),
        "sigmoid": lambda: F.sigmoid(x),
        "tanh_backward": lambda: F.tanh_backward(x, x),
        "log_softmax": lambda: F.log_softmax(rows),
        "log_softmax_backward": lambda: F.log_softmax_backward(rows, rows),
        "cross_entropy": lambda: F.cross_entropy(rows, target),
        "cross_entropy_backward": lambda: F.cross_entropy_backward(rows, target),
        "sgd_step": lambda: F.sgd_step(param, grad, buffer, lr=1e-6, momentum=0.9),
        "adam_step": lambda: F.adam_step(param, grad, exp_avg, exp_avg_sq, 1, lr=1e-6),
        # Error paths: the error message, the released borrows and arrays.
        "error_conv2d_channels": error(lambda: F.conv2d(x, w[:, :2])),
        "error_sgd_grad_length": error(lambda: F.sgd_step(param, grad[:3], lr=0.1)),
        "error_adam_aliased": error(lambda: F.adam_step(param, grad, param, exp_avg_sq, 1)),
        "error_too_large": error(lambda: F.conv2d(x[:1, :1, :1, :1], w[:1, :1, :1, :1],
                                                  padding=10**9), MemoryError),
    }


CALLS = _calls()


def _growth(call, repeats: int) -> int:
    for _ in range(min(200, repeats)):  # warm-up: allocator pools, thread-local caches
        call()
    gc.collect()
    before = resident_bytes()
    for _ in range(repeats):
        call()
    gc.collect()
    return resident_bytes() - before


@pytest.mark.memory
@pytest.mark.parametrize("name", CALLS)
def test_resident_memory_stays_flat_over_repeated_calls(name):
    growth = _growth(CALLS[name], longrun.REPEATED_CALLS)
    longrun.FIGURES[f"RSS growth over {longrun.REPEATED_CALLS} calls of {name}"] = (
        f"{growth / 1024:+.0f} kB")
    assert growth < RSS_SLACK, f"{name}: resident memory grew by {growth / 2**20:.1f} MB"


def test_failed_in_place_calls_release_their_buffers():
    """A refused call must not leave its arrays borrowed: they stay usable in place."""
    param, grad = np.ones(5, np.float32), np.ones(5, np.float32)
    for _ in range(100):
        with pytest.raises(ValueError):
            F.adam_step(param, grad, param, np.zeros(5, np.float32), 1)
        with pytest.raises(ValueError):
            F.sgd_step(param, grad[:2], lr=0.1)
    F.sgd_step(param, grad, lr=0.5)
    np.testing.assert_array_equal(param, 0.5)
    param[0] = 3.0  # still writeable from Python


def _fit_once(seed: int):
    rng = np.random.default_rng(seed)
    model = nn.from_spec("c6-bn-relu-mp2-d0.2-fc16-bn-relu-d0.3", (1, 10, 10), 3,
                         random_state=seed)
    opt = optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()
    x = rng.standard_normal((16, 1, 10, 10), dtype=np.float32)
    target = rng.integers(0, 3, 16)
    for _ in range(3):
        opt.zero_grad()
        loss_fn(model(x), target)
        model.backward(loss_fn.backward(), input_grad=False)
        opt.step()
    model.eval()
    return model(x)


@pytest.mark.memory
def test_resident_memory_stays_flat_over_repeated_training_runs():
    runs = max(20, longrun.REPEATED_CALLS // 20)
    seeds = iter(range(10**6))
    growth = _growth(lambda: _fit_once(next(seeds)), runs)
    longrun.FIGURES[f"RSS growth over {runs} training runs (nn + optim)"] = (
        f"{growth / 1024:+.0f} kB")
    assert growth < RSS_SLACK, f"resident memory grew by {growth / 2**20:.1f} MB"


# --------------------------------------------------------------------------- too large

TERABYTES = np.broadcast_to(np.float64(1.0), (2**20, 2**20))  # 8 TiB, zero strides
ROW, WEIGHT = np.ones((1, 2**20), np.float32), np.ones((2, 2**20), np.float32)  # made once

#: name -> (call, the argument or output its error names). Calls that exceed any
#: machine's memory are tried in this process; each must fail at once.
TOO_LARGE = {
    "conv2d_padding_1e9": (lambda: F.conv2d(np.ones((1, 1, 1, 1)), np.ones((1, 1, 1, 1)),
                                            padding=10**9), "padding"),
    "conv2d_padding_2e5": (lambda: F.conv2d(np.ones((1, 1, 1, 1)), np.ones((1, 1, 1, 1)),
                                            padding=200_000), "padding"),
    "avg_pool2d_backward_input_shape": (
        lambda: F.avg_pool2d_backward(np.ones((1, 1, 1, 1)), (1, 1, 2**31, 2**31), 2**31),
        "input_shape"),
    "max_pool2d_backward_overflowing_shape": (
        lambda: F.max_pool2d_backward(np.ones((1, 1, 1, 1)), np.zeros((1, 1, 1, 1), int),
                                      (2**32, 2**32, 2**32, 2**32)), "input_shape"),
    "dropout_mask": (lambda: F.dropout_mask(2**62, 0.5, 1), "n"),
    "linear_broadcast_weight": (lambda: F.linear(ROW, TERABYTES), "weight"),
    "linear_broadcast_input": (lambda: F.linear(TERABYTES, WEIGHT), "input"),
    "relu_broadcast_input": (lambda: F.relu(TERABYTES), "input"),
    "Conv2d_channels": (lambda: nn.Conv2d(1, 2**40, 3), "out_channels"),
    "Linear_out_features": (lambda: nn.Linear(4, 10**12), "out_features"),
    "BatchNorm2d_features": (lambda: nn.BatchNorm2d(2**40), "num_features"),
    "from_spec_fc": (lambda: nn.from_spec("fc999999999999", (4,), 3), "out_features"),
}

@pytest.mark.parametrize("name", TOO_LARGE)
def test_a_request_too_large_fails_before_allocating(name):
    call, _ = TOO_LARGE[name]
    before, start = resident_bytes(), time.perf_counter()
    with pytest.raises((MemoryError, ValueError)):
        call()
    assert time.perf_counter() - start < 1.0, "it took long: it was computing, not refusing"
    assert resident_bytes() - before < RSS_SLACK


@pytest.mark.parametrize("name", TOO_LARGE)
def test_a_request_too_large_names_what_is_too_large(name):
    call, argument = TOO_LARGE[name]
    with pytest.raises((MemoryError, ValueError), match=rf"^{argument}:"):
        call()


LIMITED_CHILD = """
    import resource
    import numpy as np
    from bnrs import functional as F, nn

    with open("/proc/self/status") as status:
        used = next(int(l.split()[1]) * 1024 for l in status if l.startswith("VmSize"))
    # A ceiling 1 GiB above what the process already maps: every request below needs
    # more, and is one the OS could otherwise grant on this machine.
    resource.setrlimit(resource.RLIMIT_AS, (used + 2**30, resource.RLIM_INFINITY))
    one = np.ones((1, 1, 1, 1), np.float32)
    requests = {
        "conv2d output, 6.4 GB": lambda: F.conv2d(one, one, padding=20_000),
        "linear output, 4 GB": lambda: F.linear(np.ones((2**15, 1), np.float32),
                                                np.ones((2**15, 1), np.float32)),
        "avg_pool2d_backward, 4 GB": lambda: F.avg_pool2d_backward(one, (1, 1, 2**15, 2**15),
                                                                 2**15),
        "dropout_mask, 2 GB": lambda: F.dropout_mask(2**31, 0.5, 1),
        "float64 view converted, 2 GB": lambda: F.relu(np.broadcast_to(1.0, (2**29,))),
        "Linear, 4 GB": lambda: nn.Linear(2**14, 2**15),
    }
    for name, request in requests.items():
        try:
            request()
            print("ALLOCATED", name, flush=True)
        except (MemoryError, ValueError) as error:
            print("REFUSED", type(error).__name__, name, "|", str(error)[:120], flush=True)
    print("ALIVE", F.relu(np.array([-1.0, 1.0], np.float32)).tolist())
"""


def test_allocation_failures_under_a_memory_limit_are_exceptions():
    result = child.run(LIMITED_CHILD, timeout=120)
    lines = result.stdout.splitlines()
    assert lines[-1] == "ALIVE [0.0, 1.0]", result.stdout + result.stderr
    refused = [line for line in lines if line.startswith("REFUSED MemoryError")]
    assert len(refused) == 6, result.stdout


#: A convolution of one 8000x8000 image under a 5x5 kernel, forward and backward (stride 1:
#: input gradient as a convolution; stride 2: by col2im), under a 3 GiB address-space
#: limit: inputs and outputs need ~1 GiB, the whole image unfolded would need 6.4 GB.
LARGE_IMAGE_CHILD = """
    import resource
    import numpy as np
    resource.setrlimit(resource.RLIMIT_AS, (3 * 2**30, resource.RLIM_INFINITY))
    from bnrs import functional as F

    x = np.ones((1, 1, 8000, 8000), np.float32)
    w = np.full((1, 1, 5, 5), 0.04, np.float32)
    calls = {
        "forward": lambda: F.conv2d(x, w, padding=2)[0, 0, [0, 4000], [0, 4000]],
        "backward": lambda: F.conv2d_backward(
            np.ones((1, 1, 8000, 8000), np.float32), x, w, padding=2)[0][0, 0, [0, 4000],
                                                                        [0, 4000]],
        "strided backward": lambda: F.conv2d_backward(
            np.ones((1, 1, 4000, 4000), np.float32), x, w, stride=2,
            padding=2)[0][0, 0, [0, 4000], [0, 4000]],
    }
    for name in NAMES:
        call = calls[name]
        try:
            print("COMPUTED", name, call().tolist(), flush=True)
        except MemoryError as error:
            print("REFUSED", name, "|", error, flush=True)
    print("ALIVE", F.relu(np.array([-1.0, 1.0], np.float32)).tolist())
"""


#: Corner and centre of each result, all ones in and 5x5 weights of 0.04: 9 and 25 of
#: them summed (strided backward: 4 and 9 windows reach the pixel).
LARGE_IMAGE_EXPECTED = {"forward": [0.36, 1.0], "backward": [0.36, 1.0],
                        "strided backward": [0.16, 0.36]}


@pytest.mark.parametrize("names", [
    ["forward"], pytest.param(["backward", "strided backward"], marks=pytest.mark.long)])
def test_a_large_image_is_convolved_in_bounded_scratch_under_a_memory_limit(names):
    # The scratch (im2col) is tiled: the calls fit in the limit instead of aborting the
    # process on a 6.4 GB request.
    result = child.run(f"NAMES = {names!r}\n" + textwrap.dedent(LARGE_IMAGE_CHILD),
                       timeout=300)
    lines = result.stdout.splitlines()
    assert lines[-1] == "ALIVE [0.0, 1.0]", result.stdout + result.stderr
    computed = {}
    for line in lines:
        if line.startswith("COMPUTED "):
            name, values = line.removeprefix("COMPUTED ").split(" [")
            computed[name] = json.loads("[" + values)
    assert set(computed) == set(names), result.stdout
    for name in names:
        np.testing.assert_allclose(computed[name], LARGE_IMAGE_EXPECTED[name], rtol=1e-6)


def test_scratch_that_cannot_be_tiled_away_is_a_memory_error_naming_it():
    # One output row of a 1x25 kernel over 64 channels unfolds to 1.9 GB: the tile cannot
    # be smaller, and the limit refuses it (this aborted the process before).
    result = child.run("""
        import resource
        import numpy as np
        resource.setrlimit(resource.RLIMIT_AS, (2**31, resource.RLIM_INFINITY))
        from bnrs import functional as F
        x = np.ones((1, 64, 1, 300_000), np.float32)
        try:
            F.conv2d(x, np.ones((1, 64, 1, 25), np.float32))
        except MemoryError as error:
            print("MemoryError:", error)
        print("ALIVE", F.relu(np.array([-1.0, 1.0], np.float32)).tolist())
    """)
    assert "MemoryError: conv2d: the unfolded input (im2col): scratch buffer" in result.stdout
    assert result.stdout.splitlines()[-1] == "ALIVE [0.0, 1.0]"


@pytest.mark.memory
def test_resident_memory_stays_flat_over_repeated_estimator_fits():
    import bnrs

    rng = np.random.default_rng(0)
    X = rng.standard_normal((40, 1, 8, 8)).astype(np.float32)
    y = np.arange(40) % 2
    fits = max(10, longrun.REPEATED_CALLS // 100)

    def fit():
        clf = bnrs.CNNClassifier("c4-bn-relu-mp2-d0.2-fc8", max_epochs=2, batch_size=8,
                                 random_state=0).fit(X, y)
        clf.predict_proba(X)

    growth = _growth(fit, fits)
    longrun.FIGURES[f"RSS growth over {fits} CNNClassifier fits"] = f"{growth / 1024:+.0f} kB"
    assert growth < RSS_SLACK, f"resident memory grew by {growth / 2**20:.1f} MB"
