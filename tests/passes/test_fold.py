"""The fold pass on small hand-written graphs: what folds, where, and the growth bound."""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes
import pytest

from models import builders
from onnx_shrink.compiler import io, stats
from onnx_shrink.compiler.io import large_tensors
from onnx_shrink.passes import fold as fold_mod
from onnx_shrink.passes.fold import FoldPass
from tests.helpers import parse, run_ort


def _fold(text: str, **options) -> tuple[ir.Model, ir.Model, bool]:
    original = io.load(parse(text))
    result = FoldPass(**options)(original)
    return original, result.model, result.modified


def _same_outputs(a: ir.Model, b: ir.Model, feed: dict[str, np.ndarray]) -> None:
    for x, y in zip(run_ort(io.to_bytes(a), feed), run_ort(io.to_bytes(b), feed), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6)


CHAIN = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 4] x) => (float[N, 3] y) {
  w = Constant <value = float[4, 3] {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12}> ()
  two = Constant <value = float {2.0}> ()
  w2 = Mul(w, two)
  t = MatMul(x, w2)
  y = Relu(t)
}
"""


def test_constant_subexpressions_fold_and_outputs_stay_equal():
    original, folded, modified = _fold(CHAIN)
    assert modified
    assert [n.op_type for n in folded.graph] == ["MatMul", "Relu"]
    assert "w2" in folded.graph.initializers
    _same_outputs(original, folded, {"x": np.arange(8, dtype=np.float32).reshape(2, 4)})


def test_the_input_model_is_left_as_it_was():
    original = io.load(parse(CHAIN))
    before = io.to_bytes(original)
    FoldPass()(original)
    assert io.to_bytes(original) == before


def test_folding_a_folded_model_reports_no_change_and_says_why(caplog):
    _, folded, _ = _fold(CHAIN)
    with caplog.at_level(logging.WARNING, logger=fold_mod.__name__):
        assert not FoldPass()(folded).modified
    assert [r.getMessage() for r in caplog.records] == [
        "fold: no change: no constant subexpression to compute and no rewrite: the graph is "
        "folded already"
    ]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=fold_mod.__name__):
        assert FoldPass()(io.load(parse(CHAIN))).modified
    assert not caplog.records


def test_nodes_that_keep_their_names_gain_no_inferred_types(caplog):
    """Shape inference types every value; saved, that is value_info the input did not hold.
    It once made fold grow, and roll back, any model without value_info it could not shrink."""
    model = io.load(builders.build_transformer_encoder(layers=2, d_model=32, heads=2, d_ff=64))
    candidate = fold_mod._private_clone(model)
    annotations = fold_mod._Annotations.of(model)
    FoldPass()._run_pipeline(candidate, allow_growth=True)
    annotations.strip_new(candidate)
    assert not io.serialize_proto(candidate).graph.value_info
    with caplog.at_level(logging.INFO, logger="onnx_shrink.passes.fold"):
        FoldPass()(model)
    assert "exceeds the limit" not in caplog.text


def test_constant_weights_are_lifted_to_initializers():
    _, folded, _ = _fold("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 4] x) => (float[N, 3] y) {
      w = Constant <value = float[4, 3] {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12}> ()
      y = MatMul(x, w)
    }
    """)
    assert [n.op_type for n in folded.graph] == ["MatMul"]
    assert folded.graph.initializers["w"].const_value.shape == ir.Shape([4, 3])


IF_MODEL = """
<ir_version: 8, opset_import: ["" : 17]>
g (bool c, float[4] x) => (float[4] y) {
  y = If (c) <
    then_branch = t () => (float[4] a) {
      k = Constant <value = float[4] {1, 2, 3, 4}> ()
      k3 = Mul(k, k)
      a = Add(x, k3)
    },
    else_branch = e () => (float[4] b) { b = Neg(x) }
  >
}
"""


def test_constants_inside_if_branches_fold_and_lift_to_the_main_graph():
    original, folded, modified = _fold(IF_MODEL)
    assert modified
    then_branch = folded.graph.node(0).attributes["then_branch"].as_graph()
    assert [n.op_type for n in then_branch] == ["Add"]
    lifted = [v for v in folded.graph.initializers.values()]
    assert len(lifted) == 1
    np.testing.assert_array_equal(lifted[0].const_value.numpy(), [1, 4, 9, 16])
    x = np.array([1, -2, 3, -4], np.float32)
    for c in (True, False):
        _same_outputs(original, folded, {"c": np.array(c), "x": x})


FUNCTION_MODEL = """
<ir_version: 8, opset_import: ["" : 17, "local" : 1]>
g (float[4] x) => (float[4] y) {
  y = local.AddSquares(x)
}
<domain: "local", opset_import: ["" : 17]>
AddSquares (x) => (y) {
  k = Constant <value = float[4] {1, 2, 3, 4}> ()
  k2 = Mul(k, k)
  y = Add(x, k2)
}
"""


def test_constants_inside_model_local_functions_fold_without_inlining():
    original, folded, modified = _fold(FUNCTION_MODEL)
    assert modified
    (function,) = folded.functions.values()
    assert [n.op_type for n in function] == ["Constant", "Add"]
    np.testing.assert_array_equal(
        function[0].attributes["value"].as_tensor().numpy(), [1, 4, 9, 16]
    )
    assert [n.op_type for n in folded.graph] == ["AddSquares"]
    _same_outputs(original, folded, {"x": np.ones(4, np.float32)})


def test_inline_functions_option_inlines_them():
    _, folded, _ = _fold(FUNCTION_MODEL, inline_functions=True)
    assert not folded.functions
    assert [n.op_type for n in folded.graph] == ["Add"]


EXPAND = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[256, 256] x) => (float[256, 256] y) {
  one = Constant <value = float[1] {1.5}> ()
  shape = Constant <value = int64[2] {256, 256}> ()
  big = Expand(one, shape)
  y = Mul(x, big)
}
"""


def test_expansions_past_the_budget_stay_unfolded_and_the_model_never_grows():
    original, folded, _ = _fold(EXPAND)
    assert "Expand" in [n.op_type for n in folded.graph]
    assert large_tensors.saved_bytes(folded) <= large_tensors.saved_bytes(original)
    _same_outputs(original, folded, {"x": np.ones((256, 256), np.float32)})


def test_expansions_fold_when_the_budgets_allow_it():
    original, folded, _ = _fold(EXPAND, max_growth_bytes=1 << 20, expand_budget_bytes=1 << 20)
    assert "Expand" not in [n.op_type for n in folded.graph]
    grown = large_tensors.saved_bytes(folded) - large_tensors.saved_bytes(original)
    assert 0 < grown <= 1 << 20


def test_a_run_that_grows_the_model_is_rolled_back(monkeypatch, caplog):
    def grow(self, model, allow_growth):
        value = ir.Value(name="ballast", const_value=ir.tensor(np.zeros(10_000, np.float32)))
        model.graph.register_initializer(value)
        return True

    monkeypatch.setattr(FoldPass, "_run_pipeline", grow)
    original = io.load(parse(CHAIN))
    with caplog.at_level(logging.WARNING, logger=fold_mod.__name__):
        result = FoldPass()(original)
    assert not result.modified
    assert result.model is not original
    assert io.to_bytes(result.model) == io.to_bytes(original)
    assert "keeping the model unchanged" in caplog.text
    # The figure it quotes is the input as serialized here, which is said (a file may differ
    # by a few bytes).
    size = large_tensors.saved_bytes(original)
    assert f"past {size} bytes (the input re-serialized, {size}, + max_growth_bytes 0;" in (
        caplog.text
    )


def test_quantize_dequantize_pairs_are_never_folded():
    _, folded, _ = _fold("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 4] x) => (float[N, 4] y) {
      q = Constant <value = int8[4, 4] {1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16}> ()
      s = Constant <value = float {0.5}> ()
      w = DequantizeLinear(q, s)
      y = MatMul(x, w)
    }
    """)
    assert "DequantizeLinear" in [n.op_type for n in folded.graph]


def test_batchnorm_after_conv_is_fused_and_macs_are_unchanged():
    from models.builders import build_cnn

    original = io.load(build_cnn())
    folded = FoldPass()(original).model
    assert "BatchNormalization" not in stats.measure(folded).op_types
    assert stats.measure(folded).macs == stats.measure(original).macs
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    for a, b in zip(
        run_ort(io.to_bytes(original), {"image": x}),
        run_ort(io.to_bytes(folded), {"image": x}),
        strict=True,
    ):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(a).max())


@pytest.mark.parametrize("bad", [{"max_growth_bytes": -1}, {"iterations": 0}])
def test_bad_options_are_rejected(bad):
    with pytest.raises(ValueError):
        FoldPass(**bad)


def test_a_folded_if_leaves_no_reader_of_outer_weights_behind():
    """onnxscript folds an If on a constant into one branch; the other branch's Slice of an
    outer weight stayed registered as its user (Silero VAD), and fp16 then failed on it."""
    model = io.load(
        parse("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 4] x) => (float[N, 2] y) {
          cond = Constant <value = bool {1}> ()
          w = Constant <value = float[4] {1.0, 2.0, 3.0, 4.0}> ()
          start = Constant <value = int64[1] {0}> ()
          end = Constant <value = int64[1] {2}> ()
          late = Constant <value = int64[1] {4}> ()
          h = If (cond) <
            then_branch = g1 () => (float[2] a) { a = Slice (w, start, end) },
            else_branch = g2 () => (float[2] b) { b = Slice (w, end, late) }
          >
          y = Mul (x, h)
        }
        """)
    )
    common_passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
    folded = FoldPass()(model).model
    assert not any(n.op_type == "If" for n in folded.graph)
    live = {id(n) for g in folded.graphs() for n in g}
    for graph in folded.graphs():
        for value in [*graph.initializers.values(), *(o for n in graph for o in n.outputs)]:
            assert all(id(use.node) in live for use in value.uses()), value.name
    # Nor are the weights only the dead branch read kept in the file.
    assert all(value.uses() for value in folded.graph.initializers.values())


def test_rewrites_that_do_not_pay_leave_the_model_as_it_was_with_a_calm_warning(caplog):
    """OriNet ends in a Flatten, which onnxscript rewrites as a Reshape with a shape constant
    and the rule's name in the node's metadata: 160 bytes more. fold keeps the input (it
    never grows a model) and said so as a WARNING that "every attempt grew the model": that
    detail is INFO, and the warning says the graph is folded already (a Reshape and its shape
    constant add 29 bytes since the rule's name no longer goes into metadata)."""
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 4, 1, 1] x) => (float[N, 4] y) {
      y = Flatten <axis = 1> (x)
    }
    """
    with caplog.at_level(logging.INFO, logger=fold_mod.__name__):
        result = FoldPass()(io.load(parse(text)))
    assert not result.modified
    assert [n.op_type for n in result.model.graph] == ["Flatten"]
    (warned,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warned == (
        "fold: no change: only rewrites that add 29 bytes and do not pay: the graph is folded "
        "already"
    )
    assert "no change: every attempt grew the model" in caplog.text  # the detail, as INFO


def test_rewritten_nodes_carry_no_rule_names_in_their_metadata():
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 4] x) => (float[N, 4] y) {
      a = Relu(x)
      y = Relu(a)
    }
    """
    original = io.load(parse(text))
    folded = FoldPass(max_growth_bytes=1 << 10)(original).model
    assert [n.op_type for n in folded.graph] == ["Relu"]  # FuseSuccessiveRelu
    assert not any(n.metadata_props for n in folded.graph)


def _torch_exported() -> ir.Model:
    """Two nodes with metadata as torch's dynamo exporter writes it; the Sigmoid's namespace
    does not join its scope lists as torch does."""
    model = io.load(
        parse(
            """
            <ir_version: 8, opset_import: ["" : 17]>
            g (float[N, 4] x) => (float[N, 4] y) {
              a = Relu(x)
              y = Sigmoid(a)
            }
            """
        )
    )
    scopes, classes = "['', 'act']", "['__main__.Net', 'torch.nn.modules.activation.ReLU']"
    model.graph.metadata_props["pkg.torch.export.ExportedProgram.graph_signature"] = "# inputs"
    model.graph.metadata_props["pkg.torch.export.ExportedProgram.range_constraints"] = "{}"
    relu, sigmoid = model.graph
    relu.metadata_props.update(
        {
            "namespace": ": __main__.Net/act: torch.nn.modules.activation.ReLU",
            "pkg.torch.onnx.name_scopes": scopes,
            "pkg.torch.onnx.class_hierarchy": classes,
            "pkg.torch.onnx.fx_node": "%relu : [num_users=1] = call_function[...]",
            "pkg.torch.onnx.stack_trace": 'File "net.py", line 12',
        }
    )
    sigmoid.metadata_props.update(
        {
            "namespace": "act",
            "pkg.torch.onnx.name_scopes": scopes,
            "pkg.torch.onnx.class_hierarchy": classes,
        }
    )
    return model


def test_debug_traces_go_and_scopes_stay_in_the_namespace_that_holds_them():
    """torch's dynamo exporter writes each node's fx node text, and its module scopes three
    times over: a quantized MobileNetV3 kept 40 KB of such metadata in 208 KB, where
    onnxruntime's quantizer wrote 185 KB in all."""
    result = FoldPass()(_torch_exported())
    assert result.modified
    assert set(result.model.graph.metadata_props) == {
        "pkg.torch.export.ExportedProgram.range_constraints"
    }
    relu, sigmoid = result.model.graph
    assert dict(relu.metadata_props) == {
        "namespace": ": __main__.Net/act: torch.nn.modules.activation.ReLU"
    }
    assert set(sigmoid.metadata_props) == {
        "namespace",
        "pkg.torch.onnx.name_scopes",
        "pkg.torch.onnx.class_hierarchy",
    }
    relu, sigmoid = FoldPass(strip_stack_traces=False)(_torch_exported()).model.graph
    assert len(relu.metadata_props) == 5 and len(sigmoid.metadata_props) == 3


def test_the_folders_multiple_output_skip_is_not_a_warning(caplog) -> None:
    """onnxscript warns of each Split of a constant it cannot fold, naming nothing (4 lines on
    every run of a tf2onnx LSTM model, sweep 11); fold keeps it at debug."""
    model = io.load(
        parse(
            """
            <ir_version: 8, opset_import: ["" : 18]>
            g (float[1, 4] x) => (float[1, 4] y)
            <float[2, 4] w = {0, 1, 2, 3, 4, 5, 6, 7}> {
                a, b = Split <axis = 0, num_outputs = 2> (w)
                y0 = Add(x, a)
                y = Add(y0, b)
            }
            """
        )
    )
    with caplog.at_level(logging.DEBUG, logger="onnxscript.optimizer._constant_folding"):
        FoldPass()(model)
    skipped = [r for r in caplog.records if "with multiple outputs" in r.getMessage()]
    assert skipped and all(r.levelno == logging.DEBUG for r in skipped)


def test_deduplication_skipping_a_weight_that_is_an_input_is_not_a_warning(caplog) -> None:
    """onnx-ir warns once per initializer that is also a graph input (52 lines before the
    summary on an old torch export whose weights a caller may feed); fold keeps it at debug."""
    model = io.load(
        parse(
            """
            <ir_version: 8, opset_import: ["" : 18]>
            g (float[1, 4] x, float[4] b = {0, 1, 2, 3}) => (float[1, 4] y) {
                y = Add(x, b)
            }
            """
        )
    )
    with caplog.at_level(logging.DEBUG):
        FoldPass()(model)
    skipped = [r for r in caplog.records if "as it is a graph input or output" in r.getMessage()]
    assert skipped and all(r.levelno == logging.DEBUG for r in skipped)
