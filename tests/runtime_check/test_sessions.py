"""Session creation: a provider that does not start is an error, never a quiet CPU run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from models import digits
from onnx_shrink.compiler import io
from onnx_shrink.errors import ShrinkError
from onnx_shrink.runtime_check import data, sessions
from tests.helpers import (
    make_model,
    open_in_child,
    parse,
    transposed_attention,
    transposed_attention_feed,
)

# What onnxruntime-gpu 1.31 printed on an H100 for cuda:device_id=3 (then ran on CPU).
BANNER = (
    "EP Error [ONNXRuntimeError] : 1 : FAIL : Invalid device ID: 3, must be between 0 "
    "(inclusive) and 1 (exclusive). when using [('CUDAExecutionProvider', ...)]\n"
    "Falling back to ['CPUExecutionProvider'] and retrying.\n"
)


def test_the_requested_provider_running_first_passes():
    sessions.check_started(
        "CUDAExecutionProvider", ["CUDAExecutionProvider", "CPUExecutionProvider"]
    )


def test_a_fallback_to_cpu_names_the_reason_and_what_would_run():
    with pytest.raises(ShrinkError) as error:
        sessions.check_started("CUDAExecutionProvider", ["CPUExecutionProvider"], BANNER)
    message = str(error.value)
    assert (
        "CUDAExecutionProvider is available in this onnxruntime build but did not start" in message
    )
    assert "Invalid device ID: 3" in message
    assert "would run on CPUExecutionProvider" in message


def test_a_cpu_session_on_this_build_starts_as_asked():
    from models import digits

    session = sessions.create_session(digits.MODEL_PATH, provider="cpu")
    assert session.get_providers() == ["CPUExecutionProvider"]


def test_provider_options_onnxruntime_drops_are_named_once(caplog, monkeypatch):
    # onnxruntime's CPU provider takes no options and ignores any without a word.
    from models import digits

    monkeypatch.setattr(sessions, "_WARNED_OPTIONS", set())
    with caplog.at_level("WARNING", logger="onnx_shrink.runtime_check.sessions"):
        sessions.create_session(digits.MODEL_PATH, provider="cpu:bogus=1")
        sessions.create_session(digits.MODEL_PATH, provider="cpu:bogus=1")
    warnings = [r.getMessage() for r in caplog.records]
    assert warnings == [
        "onnxruntime ignored CPUExecutionProvider option(s) bogus (the options it takes: none)"
    ]


def test_a_provider_reporting_no_options_is_not_said_to_ignore_them(caplog, monkeypatch):
    # Found in review: some providers report no options back at all; nothing can be told.
    monkeypatch.setattr(sessions, "_WARNED_OPTIONS", set())
    with caplog.at_level("WARNING", logger="onnx_shrink.runtime_check.sessions"):
        sessions.warn_ignored_options("CoreMLExecutionProvider", {"flags": "1"}, {})
        sessions.warn_ignored_options(
            "CUDAExecutionProvider", {"devce_id": "0"}, {"device_id": "0"}
        )
    assert [r.getMessage() for r in caplog.records] == [
        "onnxruntime ignored CUDAExecutionProvider option(s) devce_id (the options it takes: "
        "device_id)"
    ]


def test_sessions_made_at_once_leave_stdout_as_it_was(monkeypatch):
    """shapes.observer makes a session in a thread beside the pipeline's: each swapped
    sys.stdout for the banner, and the last to finish restored the other's StringIO
    (stdout stayed captured after shrink() in 8 of 20 calls)."""
    import sys
    import threading
    import time

    from onnx_shrink.compiler import io
    from tests.helpers import parse

    made = sessions.ort.InferenceSession
    entered: list[int] = []
    both_in = threading.Barrier(2, timeout=5)

    def overlapping(*args, **kwargs):
        # Both creations inside at once, the first in leaving first: the order that left the
        # second's saved stdout (the first's StringIO) in place.
        entered.append(threading.get_ident())
        session = made(*args, **kwargs)
        try:
            both_in.wait()
        except threading.BrokenBarrierError:  # serialized (a lock): nothing to interleave
            return session
        if entered[0] != threading.get_ident():
            time.sleep(0.05)
        return session

    monkeypatch.setattr(sessions.ort, "InferenceSession", overlapping)
    model = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N] x) => (float[N] y) { y = Identity(x) }
    """
    source = io.to_bytes(io.load(parse(model)))
    real = sys.stdout
    threads = [threading.Thread(target=sessions.create_session, args=(source,)) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sys.stdout is real


SECOND_RUN_GROWTH = """
import sys
import numpy as np
from onnx_shrink.runtime_check import sessions

def resident():
    with open("/proc/self/status", encoding="ascii") as status:
        return int(next(line for line in status if line.startswith("VmRSS:")).split()[1]) * 1024

session = sessions.create_session(open(sys.argv[1], "rb").read())
feed = {"x": np.ones((1, 65536), np.float32)}
grown = []
for _ in range(2):
    out = sessions.run(session, feed, failed="toy", release_memory=sys.argv[2] == "release")
    assert float(out["y"]) == 256 * 65536
    del out  # a run's outputs alive through the next run keep its arena from doubling
    grown.append(resident())
print(grown[1] - grown[0])
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads Linux's VmRSS")
def test_a_releasing_run_leaves_the_arena_as_it_found_it_and_a_plain_one_grows_it(tmp_path):
    # A 64 MiB intermediate (the input tiled 256 times) reduced to one number. A plain second
    # run takes 64 MiB more (onnxruntime's memory pattern allocates the run's tensors as one
    # block beside the chunks the arena kept); a releasing one does not. Each in a fresh
    # process: memory another test freed would hide the growth.
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 65536])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [])
    nodes = [
        onnx.helper.make_node("Tile", ["x", "reps"], ["big"]),
        onnx.helper.make_node("ReduceSum", ["big"], ["y"], keepdims=0),
    ]
    path = tmp_path / "tile.onnx"
    onnx.save(make_model(nodes, [x], [y], {"reps": np.array([256, 1], np.int64)}), path)

    def growth(mode: str) -> int:
        child = [sys.executable, "-c", SECOND_RUN_GROWTH, str(path), mode]
        return int(subprocess.run(child, capture_output=True, text=True, check=True).stdout)

    assert growth("plain") > 48 * 2**20  # the premise
    assert growth("release") < 16 * 2**20


class _ArenaClaimed:
    """A session built without a CPU arena that says it has one, as on a build whose
    allocator has no arena (mimalloc): onnxruntime's own error comes from shrinking it."""

    def __init__(self, session: ort.InferenceSession) -> None:
        self._session = session
        self.runs_with_options = 0

    def get_session_options(self) -> ort.SessionOptions:
        options = ort.SessionOptions()
        options.enable_cpu_mem_arena = True
        return options

    def get_inputs(self):
        return self._session.get_inputs()

    def get_outputs(self):
        return self._session.get_outputs()

    def run(self, names, feed, options=None):
        self.runs_with_options += options is not None
        return self._session.run(names, feed, options)


def test_a_session_that_cannot_release_its_arena_runs_plainly_and_is_not_asked_again():
    model = digits.MODEL_PATH
    options = ort.SessionOptions()
    options.enable_cpu_mem_arena = False
    session = _ArenaClaimed(
        ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    )
    feed = {"image": np.zeros((2, 1, 8, 8), np.float32)}
    for _ in range(2):
        out = sessions.run(session, feed, failed="digits", release_memory=True)
        assert out["logits"].shape == (2, 10)
    assert session.runs_with_options == 1  # refused once, then plain runs


def test_sessions_that_take_turns_stop_spinning_when_a_run_returns():
    """An idle session's spinning threads take cores from the other one's timed run: two
    copies of one file, timed in turn on 2 cores, read 0.45x-2.02x. ``stop_spinning`` sets
    onnxruntime's option for it; other sessions keep its default."""

    def entry(session: ort.InferenceSession) -> str:
        return session.get_session_options().get_session_config_entry(sessions.STOP_SPINNING)

    assert entry(sessions.create_session(digits.MODEL_PATH, stop_spinning=True)) == "1"
    with pytest.raises(RuntimeError):  # not set: onnxruntime's default, spinning on
        entry(sessions.create_session(digits.MODEL_PATH))


def test_a_candidate_that_crashes_onnxruntime_fails_the_check_and_the_process_goes_on(tmp_path):
    from onnx_shrink.errors import CandidateFailedError
    from onnx_shrink.runtime_check import checker

    reference = tmp_path / "float.onnx"
    candidate = tmp_path / "half.onnx"
    onnx.save(transposed_attention(onnx.TensorProto.FLOAT), reference)
    onnx.save(transposed_attention(onnx.TensorProto.FLOAT16), candidate)
    if open_in_child(candidate) >= 0:
        pytest.skip(f"onnxruntime {ort.__version__} opens the candidate: no crash to catch")
    assert sessions.crash_on_open(candidate) == "SIGSEGV"
    assert sessions.crash_on_open(candidate.read_bytes()) == "SIGSEGV"
    feeds = iter([transposed_attention_feed(4)])

    class OneFeed:  # an onnxruntime CalibrationDataReader's interface: whole feeds
        def get_next(self):
            return next(feeds, None)

    with pytest.raises(CandidateFailedError, match=r"crashes \(SIGSEGV\) creating its session"):
        checker.check(reference, candidate, OneFeed(), latency_runs=0)


def test_a_model_that_opens_or_fails_with_an_error_is_no_crash(tmp_path):
    assert sessions.crash_on_open(digits.MODEL_PATH) is None
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    assert sessions.crash_on_open(tmp_path / "junk.onnx") is None  # the open here says why
    assert not sessions.computes_in_half(io.load(transposed_attention(onnx.TensorProto.FLOAT)))
    assert sessions.computes_in_half(io.load(transposed_attention(onnx.TensorProto.FLOAT16)))


NESTED_FAILURE = (
    "[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : Non-zero status code returned while running "
    "If node. Name:'If_0' Status Message: Non-zero status code returned while running If node. "
    "Name:'If_0_else/If_1' Status Message: Non-zero status code returned while running LSTM "
    "node. Name:'If_0_else/rnn/LSTM' Status Message: Input X must have 3 dimensions only. "
    "Actual:{1,1,1,128,2}\nmore lines"
)


def test_a_failure_inside_nested_bodies_leads_with_its_innermost_reason():
    """Silero VAD's reason came after three levels of If boilerplate, cut to 'LSTM node. Na.'"""
    reason = sessions.run_failure(RuntimeError(NESTED_FAILURE))
    assert reason == (
        "Input X must have 3 dimensions only. Actual:{1,1,1,128,2} (LSTM node "
        "'If_0_else/rnn/LSTM', inside 'If_0_else/If_1' < 'If_0')"
    )


def test_a_reason_leaves_out_onnxruntime_s_source_file_and_function():
    """A ViT failing on joined samples: the warning, cut at 200 characters, ended in
    'reshape_helpe' before onnxruntime's reason began."""
    failure = (
        "[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : Non-zero status code returned while running "
        "Reshape node. Name:'node_view' Status Message: /onnxruntime_src/onnxruntime/core/"
        "providers/cpu/tensor/reshape_helper.h:91 onnxruntime::ReshapeHelper::ReshapeHelper("
        "const onnxruntime::TensorShape&, onnxruntime::TensorShapeVector&, bool) "
        "input_shape_size == requested_shape_size was false. The input tensor cannot be "
        "reshaped to the requested shape. Input shape:{16,65,192}, requested shape:{1,65,3,64}"
    )
    assert sessions.run_failure(RuntimeError(failure)) == (
        "input_shape_size == requested_shape_size was false. The input tensor cannot be "
        "reshaped to the requested shape. Input shape:{16,65,192}, requested shape:{1,65,3,64} "
        "(Reshape node 'node_view')"
    )


def test_a_long_reason_is_cut_at_a_word():
    reason = sessions.run_failure(RuntimeError("word " * 100))
    assert len(reason) <= sessions.REASON_CHARACTERS + 4 and reason.endswith("word ...")


def test_synthetic_data_with_a_scalar_input_suggests_freezing_it():
    model = parse(
        """
<ir_version: 8, opset_import: ["" : 17]>
g (float[1, 4] x, int64 sr) => (float[1, 4] y) { y = Identity (x) }
"""
    )
    specs = data.specs_from_model(io.load(model))
    hint = data.unfit_hint(data.prepare(specs, None))
    assert hint.endswith(
        "a scalar input such as 'sr' may choose a branch: --set fold.freeze=sr=VALUE fixes it"
    )
