"""The ONNX operator conformance cases, run on onnxruntime, and the list of those it cannot run.

``python -m tests.passes.conformance_cases`` regenerates ``ort_unsupported_cases.json``:

* ``onnxruntime_cannot_run``: cases whose *original* model onnxruntime (CPU) fails to load, to
  run, or to reproduce within the case's own tolerances. The sweep skips only these.
* ``load_rejects``: cases onnxruntime runs but ``io.load`` refuses by contract (today the three
  ``Not`` cases at opset 1; io.load accepts default-domain opsets from 7). They are not skipped:
  the sweep checks that ``io.load`` still rejects them with the recorded one-line reason.

Regenerate after upgrading onnx or onnxruntime; the tests flag names that no longer exist.
"""

from __future__ import annotations

import ctypes
import functools
import json
import re
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx.numpy_helper
import onnxruntime as ort
from onnx.backend.test.case.node import collect_testcases
from onnx.backend.test.case.test_case import TestCase

from onnx_shrink.compiler import io
from onnx_shrink.errors import BadModelError

DATA_FILE = Path(__file__).with_name("ort_unsupported_cases.json")
ORT_SECTION = "onnxruntime_cannot_run"
LOAD_SECTION = "load_rejects"


@functools.cache
def all_cases() -> dict[str, TestCase]:
    """Every node conformance case with a model, by name (collection takes a few seconds)."""
    # Building the expected outputs overflows casts and divides by zero on purpose.
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        cases = collect_testcases()
    return {case.name: case for case in cases if case.model is not None and case.data_sets}


@functools.cache
def _session_options() -> ort.SessionOptions:
    options = ort.SessionOptions()
    # One session per case: thread pools and warnings would cost more than the cases themselves.
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return options


def session(model: bytes | str | Path) -> ort.InferenceSession:
    """A CPU session for a serialized model or a model file."""
    source = str(model) if isinstance(model, Path) else model
    return ort.InferenceSession(source, _session_options(), providers=["CPUExecutionProvider"])


# numpy's first number for dtypes registered by other packages (ml_dtypes' bfloat16, float8...).
_NPY_USERDEF = 256
# Element types numpy holds natively; the others (bfloat16, float8, int4, float4, ...) are
# ml_dtypes arrays that onnxruntime's Python binding neither takes nor returns.
_NUMPY_NATIVE = re.compile(
    r"tensor\((float|double|float16|u?int(8|16|32|64)|bool|string|complex(64|128))\)"
)


def as_array(value: Any) -> Any:
    """A case's value as numpy: arrays, lists for sequences, None for an absent optional."""
    if isinstance(value, onnx.TensorProto):
        return onnx.numpy_helper.to_array(value)
    if isinstance(value, (list, tuple)):
        return [as_array(v) for v in value]
    if value is None or isinstance(value, np.ndarray):
        return value
    return np.asarray(value)  # numpy scalars (np.float32(...)) from a few cases


def _as_feed(value: Any) -> Any:
    value = as_array(value)
    if not isinstance(value, np.ndarray) or value.dtype.num < _NPY_USERDEF:
        return value
    # An ml_dtypes array: copy its ONNX encoding (packed for 4- and 2-bit types) into an
    # OrtValue of the ONNX element type.
    proto = onnx.numpy_helper.from_array(value)
    ort_value = ort.OrtValue.ortvalue_from_shape_and_type(list(value.shape), proto.data_type)
    ctypes.memmove(ort_value.data_ptr(), proto.raw_data, len(proto.raw_data))
    return ort_value


def _from_ort_value(value: ort.OrtValue) -> np.ndarray:
    """Decode a tensor OrtValue of any element type through its ONNX encoding."""
    proto = onnx.TensorProto(dims=value.shape(), data_type=value.element_type())
    proto.raw_data = ctypes.string_at(value.data_ptr(), value.tensor_size_in_bytes())
    return onnx.numpy_helper.to_array(proto)


def run_case(sess: ort.InferenceSession, inputs: Sequence[Any]) -> list[Any]:
    """Run a case's inputs; they are positional over the graph inputs (absent ones skipped)."""
    names = [i.name for i in sess.get_inputs()]
    feeds = {name: _as_feed(v) for name, v in zip(names, inputs, strict=False)}
    output_types = [o.type for o in sess.get_outputs()]
    if all(_NUMPY_NATIVE.fullmatch(t) or not t.startswith("tensor(") for t in output_types):
        return sess.run(None, feeds)
    # Outputs numpy cannot hold come back as OrtValues, which needs every feed as one too.
    feeds = {
        name: ort.OrtValue.ortvalue_from_numpy(v) if isinstance(v, np.ndarray) else v
        for name, v in feeds.items()
    }
    return [_from_ort_value(v) for v in sess.run_with_ort_values(None, feeds)]


def mismatch(expected: Any, actual: Any, rtol: float, atol: float, where: str = "") -> str | None:
    """Why ``actual`` differs from ``expected`` (None if equal within tolerances).

    Sequences compare element by element and optionals by presence, as onnx's backend runner
    does; strings exactly; bfloat16 with at least two ulps of relative tolerance.
    """
    expected = as_array(expected)
    if isinstance(expected, list) or isinstance(actual, list):
        if not (isinstance(expected, list) and isinstance(actual, list)):
            return f"{where}: expected {type(expected).__name__}, got {type(actual).__name__}"
        if len(expected) != len(actual):
            return f"{where}: sequence of {len(actual)} items, expected {len(expected)}"
        for j, (e, a) in enumerate(zip(expected, actual, strict=True)):
            reason = mismatch(e, a, rtol, atol, f"{where}[{j}]")
            if reason:
                return reason
        return None
    if expected is None or actual is None:
        return None if expected is actual else f"{where}: optional presence differs"
    actual = np.asarray(actual)
    if actual.shape != expected.shape:
        return f"{where}: shape {actual.shape}, expected {expected.shape}"
    if expected.dtype == object or actual.dtype == object:
        return None if np.array_equal(actual, expected) else f"{where}: strings differ"
    if actual.dtype != expected.dtype:
        return f"{where}: dtype {actual.dtype}, expected {expected.dtype}"
    if expected.dtype.name == "bfloat16":
        rtol = max(rtol, 2**-6)
    if expected.dtype.kind not in "biufc":  # float8/float4/int4 from ml_dtypes
        expected, actual = expected.astype(np.float32), actual.astype(np.float32)
    try:
        with np.errstate(all="ignore"):  # inf and tiny expected values are compared on purpose
            np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol)
    except AssertionError as e:
        detail = "; ".join(
            line.strip()
            for line in str(e).splitlines()
            if line.startswith(("Mismatched elements", "Max absolute difference"))
        )
        return f"{where}: {detail or 'values differ'}"
    return None


def outputs_mismatch(
    case: TestCase, sess: ort.InferenceSession, reference: ort.InferenceSession | None = None
) -> str | None:
    """Run every data set of ``case`` on ``sess``; the first difference from the expected
    outputs, or from ``reference``'s outputs on the same inputs when one is given."""
    for inputs, recorded in case.data_sets or ():
        expected = recorded if reference is None else run_case(reference, inputs)
        actual = run_case(sess, inputs)
        if len(actual) != len(expected):
            return f"{len(actual)} outputs, expected {len(expected)}"
        for i, (e, a) in enumerate(zip(expected, actual, strict=True)):
            reason = mismatch(e, a, case.rtol, case.atol, f"output {i}")
            if reason:
                return reason
    return None


# onnxruntime's "[ONNXRuntimeError] : 9 : " prefix, and the source location and C++ signature
# (" /onnxruntime_src/x.h:53 onnxruntime::Op::Op(const Info&) ") it puts before a check's text.
_ORT_NOISE = re.compile(
    r"^\[ONNXRuntimeError\] : \d+ : "
    r"|/onnxruntime_src/\S+:\d+ (?:[\w:<>~]+ )*?[\w:<>~]+\([^()]*\)"
    r"(?: const)?(?:::<lambda\(\)>)?(?: \[with [^\]]*\])? "
)


def _first_line(error: BaseException) -> str:
    """The first line of an error, without the parts of onnxruntime's that only locate it."""
    text = str(error).strip() or type(error).__name__
    return _ORT_NOISE.sub("", text.splitlines()[0])[:200]


def ort_failure(case: TestCase) -> str | None:
    """Why onnxruntime cannot run the original ``case`` correctly (None if it can)."""
    try:
        sess = session(case.model.SerializeToString())
    except Exception as e:  # noqa: BLE001 - any failure is the recorded reason
        return f"load: {_first_line(e)}"
    try:
        reason = outputs_mismatch(case, sess)
    except Exception as e:  # noqa: BLE001
        return f"run: {_first_line(e)}"
    return f"output mismatch: {reason}" if reason else None


def load_rejection(case: TestCase) -> str | None:
    """``io.load``'s one-line reason for refusing ``case`` (None if it accepts it)."""
    try:
        io.load(case.model)
    except BadModelError as e:
        return str(e)
    return None


def read_data() -> dict[str, dict[str, str]]:
    return json.loads(DATA_FILE.read_text(encoding="utf-8"))


def regenerate() -> dict[str, dict[str, str]]:
    cannot_run: dict[str, str] = {}
    rejected: dict[str, str] = {}
    for name, case in sorted(all_cases().items()):
        reason = ort_failure(case)
        if reason:
            cannot_run[name] = reason
            continue
        reason = load_rejection(case)
        if reason:
            rejected[name] = reason
    return {ORT_SECTION: cannot_run, LOAD_SECTION: rejected}


def main() -> None:
    data = regenerate()
    DATA_FILE.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    print(
        f"{len(all_cases())} cases: {len(data[ORT_SECTION])} onnxruntime cannot run, "
        f"{len(data[LOAD_SECTION])} io.load rejects; wrote {DATA_FILE}",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
