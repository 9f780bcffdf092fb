"""Default rewrite rules tried only where their root op can match: the same rewrites."""

from __future__ import annotations

import copy

import pytest
from onnxscript import rewriter

from models.fetch import fetch
from onnx_shrink.compiler import io
from onnx_shrink.passes import fold_rules
from tests.helpers import parse

RULES = rewriter._DEFAULT_REWRITE_RULES

SMALL = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 4] x) => (float[N, 4] y) {
  a = Relu(x)
  b = Relu(a)
  t = Transpose <perm = [1, 0]> (b)
  u = Transpose <perm = [1, 0]> (t)
  c = Cast <to = 1> (u)
  y = Identity(c)
}
"""


SLICED = """
<ir_version: 8, opset_import: ["" : 18]>
g (float[4, 6] x) => (float[4, 3] a, float[4, 3] b)
<int64[1] s0 = {0}, int64[1] s3 = {3}, int64[1] s6 = {6}, int64[1] ax = {1}> {
  a0 = Slice(x, s0, s3, ax)
  b0 = Slice(x, s3, s6, ax)
  a = Relu(a0)
  b = Relu(b0)
}
"""


def _rewritten(model, rules):
    for _ in range(3):
        rewriter.RewritePass(rules)(model)
    return io.to_bytes(model)


def test_most_rules_get_a_root_op_and_the_shared_rules_stay_untouched():
    filtered = fold_rules.by_root_op(RULES)
    assert len(filtered) == len(RULES)
    assert sum(f is not r for f, r in zip(filtered, RULES, strict=True)) >= len(RULES) - 4
    assert all("try_rewrite" not in vars(r) for r in RULES)


def test_a_pattern_with_two_output_nodes_is_tried_only_at_its_first_nodes_op():
    # Unfiltered, SlicesSplit's matcher walks the whole graph at every node it is tried at.
    (rule,) = [r for r in RULES if getattr(r, "name", None) == "SlicesSplit"]
    assert len(rule._target_pattern.output_nodes) == 2
    assert fold_rules._root_op(rule) == ("", "Slice")
    tried = []
    spy = copy.copy(rule)  # the shared rule stays untouched
    spy.try_rewrite = lambda model, graph, node, **kwargs: tried.append(node.op_type)
    model = io.load(parse(SLICED))
    filtered = fold_rules.by_root_op([spy])[0]
    for node in model.graph:
        filtered.try_rewrite(model, model.graph, node)
    assert tried == ["Slice", "Slice"]
    filtered_model = _rewritten(io.load(parse(SLICED)), fold_rules.by_root_op([rule]))
    assert filtered_model == _rewritten(io.load(parse(SLICED)), [rule])


def test_filtered_rules_rewrite_a_small_graph_as_the_rules_do():
    filtered = _rewritten(io.load(parse(SMALL)), fold_rules.by_root_op(RULES))
    assert filtered == _rewritten(io.load(parse(SMALL)), RULES)
    assert filtered != io.to_bytes(io.load(parse(SMALL)))  # there was something to rewrite


@pytest.mark.network
@pytest.mark.parametrize("name", ["ppocr-rec", "minilm"])
def test_filtered_rules_rewrite_real_models_byte_for_byte_as_the_rules_do(name):
    path = fetch(name)
    assert _rewritten(io.load(path), fold_rules.by_root_op(RULES)) == _rewritten(
        io.load(path), RULES
    )


NO_OPS = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[2, 3] x) => (float[2, 3] y)
<float one = {1.0}, float zero = {0.0}, float tiny = {TINY}, float near_one = {1.000001},
 float minus_zero = {-0.0}> {
  a = Mul(x, one)
  b = Add(minus_zero, a)
  c = Sub(b, zero)
  d = Div(c, one)
  e = Add(d, tiny)
  f = Mul(near_one, e)
  g = Add(f, zero)
  y = Sub(g, minus_zero)
}
"""


@pytest.mark.parametrize("tiny", ["1e-10", "1e-12"])
def test_no_op_rules_drop_only_exact_zeros_and_ones(tiny):
    """onnxscript's own no-op rules match within rel_tol 1e-5 and abs_tol 1e-8: they dropped
    basic-pitch's Log(x * x + 1e-10) epsilon, so its folded model gave NaN on silence. The
    rules left drop only bit-exact identities."""
    model = io.load(parse(NO_OPS.replace("TINY", tiny)))
    for _ in range(2):
        rewriter.RewritePass(fold_rules.DEFAULT_RULES)(model)
    kept = [(n.op_type, [v.name for v in n.inputs]) for n in model.graph if n.op_type != "Identity"]
    # x + (+0.0) and x - (-0.0) turn -0.0 into +0.0: not the identity, bit for bit.
    assert [op for op, _ in kept] == ["Add", "Mul", "Add", "Sub"]
    assert [names[-1] if op != "Mul" else names[0] for op, names in kept] == [
        "tiny",
        "near_one",
        "zero",
        "minus_zero",
    ]


def test_fold_keeps_a_log_epsilon_so_silence_stays_finite():
    import numpy as np

    from onnx_shrink.passes.fold import FoldPass
    from tests.helpers import run_ort

    proto = parse(
        """
        <ir_version: 8, opset_import: ["" : 15]>
        g (float[1, 4] x) => (float[1, 4] y) <float eps = {1e-10}> {
          sq = Mul(x, x)
          s = Add(sq, eps)
          y = Log(s)
        }
        """
    )
    folded = io.serialize_proto(FoldPass()(io.load(proto)).model)
    x = {"x": np.array([[0.0, 1e-6, 0.5, 1.0]], np.float32)}
    got = run_ort(folded.SerializeToString(), x)[0]
    assert np.isfinite(got).all()
    np.testing.assert_array_equal(got, run_ort(proto.SerializeToString(), x)[0])


@pytest.mark.parametrize("opset", [17, 18])
def test_fold_keeps_its_work_where_the_second_half_slice_comes_first(opset):
    """onnxscript's SlicesSplit put one Split where the first half's Slice was, after the
    second half's readers (afis 1.2.7's LEADER, from tf2onnx), and wrote Split-18's
    ``num_outputs`` at opset 17: fold's checks refused the graph and kept it unfolded."""
    import onnx

    from onnx_shrink.passes.fold import FoldPass

    text = f"""
    <ir_version: 8, opset_import: ["" : {opset}]>
    g (float[1, 3, 8] x) => (float[1, 3, 4] y)
    <int64[1] s0 = {{0}}, int64[1] s4 = {{4}}, int64[1] s8 = {{8}}, int64[1] ax = {{-1}},
     float one = {{1.0}}> {{
      b = Slice(x, s4, s8, ax)
      sb = Sigmoid(b)
      a = Slice(x, s0, s4, ax)
      ra = Relu(a)
      m = Mul(ra, sb)
      y = Mul(m, one)
    }}
    """
    result = FoldPass()(io.load(parse(text)))
    assert result.modified  # x * 1 is gone
    assert [n.op_type for n in result.model.graph] == ["Slice", "Sigmoid", "Slice", "Relu", "Mul"]
    onnx.checker.check_model(onnx.load_from_string(io.to_bytes(result.model)), full_check=True)
