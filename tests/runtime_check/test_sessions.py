"""Session creation: a provider that does not start is an error, never a quiet CPU run."""

from __future__ import annotations

import pytest

from onnx_shrink.errors import ShrinkError
from onnx_shrink.runtime_check import sessions

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
