"""The warnings a run logged, kept as text for its result and its reports.

A warning scrolls past on a console and is lost in a pipeline's log (a pass that changed
nothing, layers kept float, BatchNormalizations left between conversions); ``ShrinkResult``
and the ``--report`` file keep them, so a script can read what the run said without setting
up logging.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
from collections.abc import Callable, Iterator
from typing import Any, ParamSpec, TypeVar

P = ParamSpec("P")
R = TypeVar("R")

LOGGER = "onnx_shrink"  # the package's loggers all sit under it


class WarningRecords(logging.Handler):
    """The warnings (and errors) logged under ``onnx_shrink`` while attached, as
    ``"warning: <message>"`` lines in order. Records from every thread are kept: a run's
    calibration logs from its worker threads too (two runs in parallel threads of one
    process would see each other's). ``echo``: also hand each record to Python's
    last-resort handler (stderr), which logging skips once any handler is attached: a
    caller who set up no logging still sees the warnings."""

    def __init__(self, echo: bool = False) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []
        self.echo = echo

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.messages.append(f"{record.levelname.lower()}: {record.getMessage()}")
        except Exception:  # a message that cannot be formatted: logging's own report
            self.handleError(record)
            return
        if self.echo and logging.lastResort is not None:
            logging.lastResort.handle(record)


_said: set[str] = set()  # what warn_once said in this run


def warn_once(logger: logging.Logger, message: str, key: str | None = None) -> None:
    """Warn of ``message`` once a run (once a process outside ``shrink``): ``--verify-each``
    checks the same data after every pass, and said it once a pass. ``key``: what makes two
    messages the same fact (default: the message), where their details differ."""
    key = message if key is None else key
    if key not in _said:
        _said.add(key)
        logger.warning("%s", message)


def forget_said() -> None:
    """Start a new run for ``warn_once``: what an earlier run said is said again."""
    _said.clear()


@contextlib.contextmanager
def said_already() -> Iterator[None]:
    """A stretch of a run that repeats what it did earlier on the same input (the sensitivity
    report re-runs the passes before quant on a fresh load of the model): what it would warn
    of, the run said already, so no warning is logged in it. Errors still are."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def recorded(function: Callable[P, R]) -> Callable[P, R]:
    """``function``, whose result (a dataclass with a ``warnings`` field) gets the warnings
    logged during the call; so does the ``result`` an error it raises carries (``shrink``'s
    unchecked result)."""

    @functools.wraps(function)
    def call(*args: P.args, **kwargs: P.kwargs) -> R:
        logger = logging.getLogger(LOGGER)
        records = WarningRecords(echo=not logger.hasHandlers())
        logger.addHandler(records)
        forget_said()  # each run says what it finds, whatever an earlier one said
        try:
            return _with_warnings(function(*args, **kwargs), records)
        except BaseException as error:
            result = getattr(error, "result", None)
            if _has_warnings(result):
                error.result = _with_warnings(result, records)  # type: ignore[attr-defined]
            raise
        finally:
            logger.removeHandler(records)

    return call


def _has_warnings(result: object) -> bool:
    return dataclasses.is_dataclass(result) and any(
        field.name == "warnings" for field in dataclasses.fields(result)
    )


def _with_warnings(result: Any, records: WarningRecords) -> Any:
    return dataclasses.replace(result, warnings=tuple(records.messages))
