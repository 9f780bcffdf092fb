"""The warnings a run logged, kept as text for its result and its reports.

A warning scrolls past on a console and is lost in a pipeline's log (a pass that changed
nothing, layers kept float, BatchNormalizations left between conversions); ``ShrinkResult``
and the ``--report`` file keep them, so a script can read what the run said without setting
up logging.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
R = TypeVar("R")

LOGGER = "onnx_shrink"  # the package's loggers all sit under it


class WarningRecords(logging.Handler):
    """The warnings (and errors) logged under ``onnx_shrink`` while attached, as
    ``"warning: <message>"`` lines in order. Records from every thread are kept: a run's
    calibration logs from its worker threads too (two runs in parallel threads of one
    process would see each other's)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(f"{record.levelname.lower()}: {record.getMessage()}")


def recorded(function: Callable[P, R]) -> Callable[P, R]:
    """``function``, whose result (a dataclass with a ``warnings`` field) gets the warnings
    logged during the call; so does the ``result`` an error it raises carries (``shrink``'s
    unchecked result)."""

    @functools.wraps(function)
    def call(*args: P.args, **kwargs: P.kwargs) -> R:
        records = WarningRecords()
        logger = logging.getLogger(LOGGER)
        logger.addHandler(records)
        try:
            return _with_warnings(function(*args, **kwargs), records)
        except BaseException as error:
            result = getattr(error, "result", None)
            if result is not None:
                error.result = _with_warnings(result, records)  # type: ignore[attr-defined]
            raise
        finally:
            logger.removeHandler(records)

    return call


def _with_warnings(result, records: WarningRecords):
    return dataclasses.replace(result, warnings=tuple(records.messages))
