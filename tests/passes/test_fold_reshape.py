"""fold's Reshape rule: shapes read from the reshaped tensor itself become constants."""

from __future__ import annotations

import numpy as np
import pytest

from onnx_shrink.compiler import io
from onnx_shrink.passes.fold import FoldPass
from onnx_shrink.passes.fold_reshape import ReshapeCopiedDimsPass
from tests.helpers import parse, run_ort

# torch's x.view(x.size(0), x.size(1), 2, 4): dims 0 and 1 of x, read back through Shape.
HEADS = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[B, S, 8] x, float[B, S, 8] other) => (float[B, S, 2, 4] y) {
  shape = Shape(SOURCE)
  i0 = Constant <value = int64 {INDEX0}> ()
  i1 = Constant <value = int64 {1}> ()
  axes = Constant <value = int64[1] {0}> ()
  d0 = Gather <axis = 0> (shape, i0)
  d1 = Gather <axis = 0> (shape, i1)
  u0 = Unsqueeze(d0, axes)
  u1 = Unsqueeze(d1, axes)
  rest = Constant <value = int64[2] {2, 4}> ()
  target = Concat <axis = 0> (u0, u1, rest)
  y = Reshape ALLOWZERO (x, target)
}
"""


def _heads(source: str = "x", index0: int = 0, allowzero: str = "") -> str:
    text = HEADS.replace("SOURCE", source).replace("INDEX0", str(index0))
    return text.replace("ALLOWZERO", allowzero)


def _rewritten_shape(text: str) -> np.ndarray | None:
    model = io.load(parse(text))
    if not ReshapeCopiedDimsPass()(model).modified:
        return None
    reshape = next(n for n in model.graph if n.op_type == "Reshape")
    return reshape.inputs[1].const_value.numpy()


def test_dims_read_from_the_input_at_their_own_position_become_zeros():
    np.testing.assert_array_equal(_rewritten_shape(_heads()), [0, 0, 2, 4])


def test_a_one_element_gather_without_unsqueeze_matches_too():
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[B, 8] x) => (float[B, 2, 4] y) {
      shape = Shape(x)
      i0 = Constant <value = int64[1] {0}> ()
      d0 = Gather <axis = 0> (shape, i0)
      rest = Constant <value = int64[2] {2, -1}> ()
      target = Concat <axis = 0> (d0, rest)
      y = Reshape(x, target)
    }
    """
    np.testing.assert_array_equal(_rewritten_shape(text), [0, 2, -1])


@pytest.mark.parametrize(
    ("source", "index0", "allowzero"),
    [
        ("other", 0, ""),  # another tensor's dims: equal only if shapes say so
        ("x", 1, ""),  # dim 1 at position 0 is no copy
        ("x", -3, ""),  # negative: its position depends on the rank
        ("x", 0, "<allowzero = 1>"),  # 0 would mean a zero-sized dim
    ],
)
def test_anything_else_is_left_alone(source, index0, allowzero):
    assert _rewritten_shape(_heads(source, index0, allowzero)) is None


def test_fold_drops_the_shape_chain_and_keeps_outputs_equal():
    original = io.load(parse(_heads()))
    folded = FoldPass()(original).model
    assert [n.op_type for n in folded.graph] == ["Reshape"]
    x = np.random.default_rng(0).standard_normal((3, 5, 8)).astype(np.float32)
    feed = {"x": x, "other": x}
    (expected,) = run_ort(io.to_bytes(original), feed)
    (got,) = run_ort(io.to_bytes(folded), feed)
    np.testing.assert_array_equal(got, expected)


# Paddle's flatten: Reshape(x, Concat(Shape(x)[0:2], [-1])).
FLATTEN = """
<ir_version: 7, opset_import: ["" : 12]>
g (float[N, 6, 1, 5] x) => (float[N, 6, 5] y) {
  shape = Shape(x)
  starts = Constant <value = int64[1] {START}> ()
  ends = Constant <value = int64[1] {END}> ()
  axes = Constant <value = int64[1] {0}> ()
  head = Slice(shape, starts, ends, axes)
  rest = Constant <value = int64[1] {-1}> ()
  target = Concat <axis = 0> (LEADING head, rest)
  y = Reshape(x, target)
}
"""


def _flatten(start: int = 0, end: int = 2, leading: str = "") -> str:
    text = FLATTEN.replace("START", str(start)).replace("END", str(end))
    return text.replace("LEADING ", leading)


@pytest.mark.parametrize(("end", "expected"), [(2, [0, 0, -1]), (9223372036854775807, None)])
def test_a_slice_of_the_inputs_own_shape_from_its_position_becomes_zeros(end, expected):
    # Ends past the rank copy every dim from the start: [0, 0, 0, 0, -1] is no flatten, but
    # still the same reshape. It is rewritten too; only the count of zeros differs.
    shape = _rewritten_shape(_flatten(end=end))
    np.testing.assert_array_equal(shape, expected if expected else [0, 0, 0, 0, -1])


@pytest.mark.parametrize(
    "text",
    [
        _flatten(start=1, end=3),  # dims 1..2 at positions 0..1: no copy
        _flatten(leading="rest, "),  # dims 0..1 at positions 1..2
        _flatten().replace("float[N, 6, 1, 5] x", "float x"),  # rank unknown: count unknown
    ],
    ids=["shifted", "after-a-part", "unknown-rank"],
)
def test_a_slice_that_is_no_copy_of_its_own_dims_is_left_alone(text):
    assert _rewritten_shape(text) is None


def test_fold_makes_a_paddle_flatten_constant_so_shape_inference_follows_it():
    """onnx infers nothing past the opset-12 flatten (its Slice has no data propagation), so
    the MACs of every MatMul after it counted one row (PP-OCRv4 rec)."""
    original = io.load(parse(_flatten()))
    folded = FoldPass()(original).model
    assert [n.op_type for n in folded.graph] == ["Reshape"]
    x = np.random.default_rng(0).standard_normal((3, 6, 1, 5)).astype(np.float32)
    (expected,) = run_ort(io.to_bytes(original), {"x": x})
    (got,) = run_ort(io.to_bytes(folded), {"x": x})
    np.testing.assert_array_equal(got, expected)
    assert list(folded.graph.outputs[0].shape)[1:] == [6, 5]


@pytest.mark.parametrize("opset", [12, 13])
def test_below_opset_14_fold_writes_no_reshape_attribute_onnxruntime_refuses(opset, monkeypatch):
    """onnxscript's MaterializeReshapeShape wrote Reshape(..., allowzero=1) into any model, an
    attribute of Reshape-14: onnxruntime refused the folded opset-12 model. fold leaves the
    rule out; and were a rule to write such a node, fold keeps the model as it was."""
    from onnx_shrink.passes import fold_rules

    text = _flatten().replace('"" : 12', f'"" : {opset}')
    folded = FoldPass()(io.load(parse(text))).model
    assert all("allowzero" not in n.attributes for n in folded.graph)
    run_ort(io.to_bytes(folded), {"x": np.zeros((2, 6, 1, 5), np.float32)})  # loads, runs

    unguarded = fold_rules.by_root_op(fold_rules.rewriter._DEFAULT_REWRITE_RULES)
    monkeypatch.setattr(fold_rules, "DEFAULT_RULES", unguarded)
    result = FoldPass()(io.load(parse(text)))
    assert not result.modified
    run_ort(io.to_bytes(result.model), {"x": np.zeros((2, 6, 1, 5), np.float32)})


def test_a_stale_output_annotation_never_decides_a_reshape():
    """A graph output's declared shape is the exporter's word: ddddocr's OCR model declares
    [1, N] for an output of (20, 1, 8210), and onnxscript's MaterializeReshapeShape made the
    Reshape's shape [1, -1] from it, so the folded model computed (1, 164200)."""
    text = """
    <ir_version: 8, opset_import: ["" : 14]>
    g (float[1, W, 8] x) => (float[1, N] y) {
      s = Shape(x)
      i1 = Constant <value = int64 {1}> ()
      ax0 = Constant <value = int64[1] {0}> ()
      d1 = Gather <axis = 0> (s, i1)
      d1u = Unsqueeze(d1, ax0)
      m1 = Constant <value = int64[1] {-1}> ()
      shape = Concat <axis = 0> (d1u, m1)
      y = Reshape(x, shape)
    }
    """
    original = io.load(parse(text))
    folded = FoldPass()(original).model
    x = np.random.default_rng(0).standard_normal((1, 5, 8)).astype(np.float32)
    (expected,) = run_ort(io.to_bytes(original), {"x": x})
    (got,) = run_ort(io.to_bytes(folded), {"x": x})
    assert expected.shape == (5, 8)
    np.testing.assert_array_equal(got, expected)
