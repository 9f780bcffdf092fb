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
