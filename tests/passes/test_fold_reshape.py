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
