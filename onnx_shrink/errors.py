"""The project's exception hierarchy: every error a user can cause, with a one-line message.

The CLI turns any ``ShrinkError`` into that line and exit code 2 (``CheckFailed``: exit 1;
``CandidateFailedError``: exit 3, the result written but unchecked); anything else is a bug:
its traceback, and exit code 4.
"""

from __future__ import annotations


class ShrinkError(Exception):
    """Base of every error onnx-shrink raises on purpose. ``str(e)`` is the user's message."""

    exit_code = 2
    result: object | None = None
    """Raised by ``shrink``'s check of its saved result: that run's ``ShrinkResult`` (its
    ``unchecked`` says why), so that what was gained is still shown and reported."""


class BadModelError(ShrinkError):
    """The input model cannot be read, is invalid, or cannot be run by onnxruntime."""


class PipelineSpecError(ShrinkError):
    """A pass name, option name, option value or recipe file is wrong."""


class DataError(ShrinkError):
    """Input data (``--data``, ``--input-shape``) does not fit the model's signature."""


class RunFailedError(ShrinkError):
    """onnxruntime loaded a model but failed to run it on the given (or synthetic) inputs."""

    model: object | None = None
    """Raised by ``shrink``'s check of its result: that result (an ``onnx_ir.Model``)."""


class CandidateFailedError(RunFailedError):
    """onnxruntime cannot load or run the candidate where it runs the reference: what made the
    candidate broke it (``--verify-each`` rolls such a pass back), or the check's provider has
    no kernel for it (bfloat16 on the CPU). Not bad input: the result is written, unchecked."""

    exit_code = 3


class PassFailedError(ShrinkError):
    """A pass raised while rewriting the model; the message names the pass."""


class CheckFailed(ShrinkError):
    """Verification ran and the candidate broke a tolerance (exit code 1, report still written)."""

    exit_code = 1


class ToleranceStopError(PassFailedError, CheckFailed):
    """Under ``--verify-each --strict``, a pass broke the tolerances and the run stopped: a
    ``PassFailedError`` to callers of ``shrink``, exit code 1 (a broken tolerance, not bad
    input) on the command line; nothing is written."""
