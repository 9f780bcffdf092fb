"""fold's Conv rule: constant scales and offsets next to a Conv become part of its weights."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnx_shrink.compiler import io
from onnx_shrink.passes.fold import FoldPass
from onnx_shrink.passes.fold_conv_affine import ConvAffinePass
from tests.helpers import make_model, optimized_ops, run_ort

C_IN, C_OUT = 4, 6


def _conv_model(
    before: list[tuple[str, np.ndarray]] = (),
    after: list[tuple[str, np.ndarray]] = (),
    *,
    pads: int = 0,
    group: int = 1,
    bias: bool = True,
    extra_reader: str | None = None,
) -> onnx.ModelProto:
    """x -> steps ``before`` -> Conv(3x3) -> steps ``after`` -> y; each step (op, constant)."""
    rng = np.random.default_rng(1)
    inits = {"W": rng.normal(size=(C_OUT, C_IN // group, 3, 3)).astype(np.float32)}
    if bias:
        inits["B"] = rng.normal(size=C_OUT).astype(np.float32)
    nodes, current = [], "x"
    for i, (op, constant) in enumerate(before):
        inits[f"b{i}"] = constant
        nodes.append(helper.make_node(op, [current, f"b{i}"], [f"pre{i}"], name=f"pre{i}"))
        current = f"pre{i}"
    conv_inputs = [current, "W"] + (["B"] if bias else [])
    nodes.append(
        helper.make_node("Conv", conv_inputs, ["conv"], name="conv", pads=[pads] * 4, group=group)
    )
    current = "conv"
    for i, (op, constant) in enumerate(after):
        inits[f"a{i}"] = constant
        nodes.append(helper.make_node(op, [current, f"a{i}"], [f"post{i}"], name=f"post{i}"))
        current = f"post{i}"
    nodes.append(helper.make_node("Identity", [current], ["y"]))
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", "c", "h", "w"])]
    if extra_reader is not None:
        nodes.append(helper.make_node("Relu", [extra_reader], ["z"]))
        outputs.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, ["n", "c", "h", "w"]))
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, C_IN, 8, 8])]
    return make_model(nodes, inputs, outputs, inits)


def _fold(model: onnx.ModelProto, **options) -> tuple[bytes, list[str], bool]:
    """(folded model bytes, its op types, whether the pass changed anything)."""
    ir_model = io.load(model)
    modified = ConvAffinePass(**options)(ir_model).modified
    return io.to_bytes(ir_model), [n.op_type for n in ir_model.graph], modified


def _assert_same_outputs(model: onnx.ModelProto, folded: bytes) -> None:
    feed = {"x": np.random.default_rng(2).normal(size=(2, C_IN, 8, 8)).astype(np.float32)}
    for want, got in zip(
        run_ort(model.SerializeToString(), feed), run_ort(folded, feed), strict=True
    ):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def _assert_folds_into_the_conv(model: onnx.ModelProto) -> None:
    folded, ops, modified = _fold(model)
    assert modified and ops == ["Conv", "Identity"]
    _assert_same_outputs(model, folded)


def _to_float16(model: onnx.ModelProto) -> None:
    """Weights, constants, input and output of ``model`` in float16, in place."""
    for tensor in model.graph.initializer:
        array = onnx.numpy_helper.to_array(tensor).astype(np.float16)
        tensor.CopyFrom(onnx.numpy_helper.from_array(array, tensor.name))
    model.graph.input[0].type.tensor_type.elem_type = TensorProto.FLOAT16
    model.graph.output[0].type.tensor_type.elem_type = TensorProto.FLOAT16


def _channel(values) -> np.ndarray:
    return np.asarray(values, np.float32).reshape(-1, 1, 1)


PER_OUT = _channel(np.linspace(0.5, 2.0, C_OUT))
PER_IN = _channel(np.linspace(-1.5, 2.0, C_IN))
SCALAR = np.asarray(1.7, np.float32)


@pytest.mark.parametrize(
    "after",
    [
        pytest.param([("Mul", SCALAR)], id="mul-scalar"),
        pytest.param([("Mul", PER_OUT), ("Add", PER_OUT)], id="mul-add-per-channel"),
        pytest.param([("Div", np.asarray([3.0], np.float32)), ("Sub", SCALAR)], id="div-sub"),
        pytest.param([("Add", PER_OUT[None])], id="add-rank-4"),
    ],
)
@pytest.mark.parametrize("pads", [0, 1])
def test_steps_after_a_conv_fold_into_its_weights_and_bias(after, pads):
    _assert_folds_into_the_conv(_conv_model(after=after, pads=pads))


@pytest.mark.parametrize(
    "before",
    [
        pytest.param([("Mul", SCALAR)], id="mul-scalar"),
        pytest.param([("Mul", PER_IN), ("Add", PER_IN)], id="mul-add-per-channel"),
        pytest.param([("Sub", SCALAR), ("Div", PER_IN)], id="sub-div"),
    ],
)
@pytest.mark.parametrize("group", [1, 2])
def test_a_chain_before_an_unpadded_conv_folds_into_it_group_by_group(before, group):
    _assert_folds_into_the_conv(_conv_model(before=before, group=group))


def test_a_scale_before_a_padded_conv_folds_and_an_offset_stays_as_one_add():
    scale_only = _conv_model(before=[("Mul", PER_IN)], pads=1)
    folded, ops, _ = _fold(scale_only)
    assert ops == ["Conv", "Identity"]
    _assert_same_outputs(scale_only, folded)

    chain = _conv_model(before=[("Div", PER_IN), ("Mul", SCALAR), ("Add", PER_IN)], pads=1)
    folded, ops, _ = _fold(chain)
    assert ops == ["Add", "Conv", "Identity"]
    _assert_same_outputs(chain, folded)
    # The Add holds (x * s + o) / s, not pre2: a per-layer comparison must not match them.
    values = {out for node in onnx.load_from_string(folded).graph.node for out in node.output}
    assert "pre2" not in values and "pre2_unscaled" in values

    one_offset = _conv_model(before=[("Add", SCALAR)], pads=1)
    _, ops, modified = _fold(one_offset)
    assert not modified and ops == ["Add", "Conv", "Identity"]


def test_an_offset_into_a_conv_without_bias_creates_one_only_when_growth_is_allowed():
    model = _conv_model(after=[("Add", PER_OUT)], bias=False)
    folded, ops, _ = _fold(model)
    assert ops == ["Conv", "Identity"]
    _assert_same_outputs(model, folded)
    _, ops, modified = _fold(model, allow_bias_growth=False)
    assert not modified and ops == ["Conv", "Add", "Identity"]
    # A scale needs no bias.
    _, ops, _ = _fold(_conv_model(after=[("Mul", PER_OUT)], bias=False), allow_bias_growth=False)
    assert ops == ["Conv", "Identity"]


def test_a_conv_output_read_elsewhere_keeps_the_step_after_it():
    model = _conv_model(after=[("Mul", PER_OUT)], extra_reader="conv")
    _, ops, modified = _fold(model)
    assert not modified and "Mul" in ops


def test_a_step_read_elsewhere_is_not_folded_into_the_conv_after_it():
    model = _conv_model(before=[("Mul", PER_IN)], extra_reader="pre0")
    _, ops, modified = _fold(model)
    assert not modified and "Mul" in ops


@pytest.mark.parametrize(
    "constant",
    [
        pytest.param(np.asarray([0.0], np.float32), id="division-by-zero"),
        pytest.param(np.asarray([np.inf], np.float32), id="infinity"),
        pytest.param(np.asarray([np.nan], np.float32), id="nan"),
    ],
)
def test_nonfinite_constants_and_division_by_zero_are_left_alone(constant):
    _, ops, modified = _fold(_conv_model(after=[("Div", constant)]))
    assert not modified and "Div" in ops


def test_a_constant_that_would_broadcast_the_output_is_left_alone():
    # (2, C, 1, 1) against an output of batch 2 keeps the shape, but not for a batch of 1:
    # only one value per channel is a scale or offset of the Conv.
    batched = np.ones((2, C_OUT, 1, 1), np.float32)
    _, ops, modified = _fold(_conv_model(after=[("Mul", batched)]))
    assert not modified and "Mul" in ops
    rank_5 = np.ones((1, 1, C_OUT, 1, 1), np.float32)
    _, ops, modified = _fold(_conv_model(after=[("Mul", rank_5)]))
    assert not modified and "Mul" in ops


def test_a_constant_before_the_conv_first_is_left_alone_for_sub_and_div():
    # c - x and c / x are not affine steps of x.
    model = _conv_model()
    graph = model.graph
    graph.initializer.append(onnx.numpy_helper.from_array(SCALAR, "c"))
    first = graph.node[0]
    graph.node.insert(0, helper.make_node("Sub", ["c", "x"], ["flipped"]))
    first.input[0] = "flipped"
    _, ops, modified = _fold(model)
    assert not modified and ops[0] == "Sub"


def test_shared_weights_are_not_changed():
    model = _conv_model(after=[("Mul", PER_OUT)])
    model.graph.node.append(helper.make_node("Conv", ["x", "W"], ["other"], pads=[0] * 4))
    model.graph.output.append(
        helper.make_tensor_value_info("other", TensorProto.FLOAT, ["n", "c", "h", "w"])
    )
    _, ops, modified = _fold(model)
    assert not modified and "Mul" in ops


def test_fold_runs_the_rule_and_keeps_outputs_equal():
    model = _conv_model(before=[("Mul", PER_IN)], after=[("Mul", PER_OUT), ("Add", SCALAR)])
    result = FoldPass()(io.load(model))
    assert [n.op_type for n in result.model.graph] == ["Conv"]
    _assert_same_outputs(model, io.to_bytes(result.model))


def test_a_chain_read_by_two_convs_folds_into_each_one():
    model = _conv_model(before=[("Mul", PER_IN), ("Add", SCALAR)])
    rng = np.random.default_rng(3)
    model.graph.initializer.append(
        onnx.numpy_helper.from_array(rng.normal(size=(3, C_IN, 1, 1)).astype(np.float32), "W2")
    )
    model.graph.node.append(helper.make_node("Conv", ["pre1", "W2"], ["other"]))
    model.graph.output.append(
        helper.make_tensor_value_info("other", TensorProto.FLOAT, ["n", "c", "h", "w"])
    )
    folded, ops, modified = _fold(model)
    assert modified and ops.count("Conv") == 2 and "Mul" not in ops and "Add" not in ops
    _assert_same_outputs(model, folded)


def test_a_constant_first_offset_into_a_conv_without_bias_creates_one():
    model = _conv_model(bias=False)
    graph = model.graph
    graph.initializer.append(onnx.numpy_helper.from_array(PER_IN, "c"))
    graph.node.insert(0, helper.make_node("Add", ["c", "x"], ["shifted"]))
    graph.node[1].input[0] = "shifted"
    folded, ops, modified = _fold(model)
    assert modified and ops == ["Conv", "Identity"]
    _assert_same_outputs(model, folded)


def test_an_offset_before_a_conv_padded_by_auto_pad_stays():
    model = _conv_model(before=[("Add", SCALAR)])
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    del conv.attribute[:]
    conv.attribute.append(helper.make_attribute("auto_pad", "SAME_UPPER"))
    _, ops, modified = _fold(model)
    assert not modified and ops[0] == "Add"


def test_float16_weights_fold_within_float16_rounding():
    model = _conv_model(after=[("Mul", PER_OUT), ("Add", PER_OUT)])
    _to_float16(model)
    folded, ops, _ = _fold(model)
    assert ops == ["Conv", "Identity"]
    feed = {"x": np.random.default_rng(4).normal(size=(2, C_IN, 8, 8)).astype(np.float16)}
    (want,) = run_ort(model.SerializeToString(), feed)
    (got,) = run_ort(folded, feed)
    np.testing.assert_allclose(got, want, rtol=1e-2, atol=2e-2)


def test_folded_weights_that_overflow_the_float_type_are_not_written():
    # x / 1e-39 is finite for small x; 1 / 1e-39 is not a float32.
    tiny = np.asarray([1e-39], np.float32)
    _, ops, modified = _fold(_conv_model(after=[("Div", tiny)]))
    assert not modified and "Div" in ops


def test_a_weight_the_model_also_outputs_is_not_changed():
    model = _conv_model(after=[("Mul", PER_OUT)])
    model.graph.output.append(
        helper.make_tensor_value_info("W", TensorProto.FLOAT, [C_OUT, C_IN, 3, 3])
    )
    _, ops, modified = _fold(model)
    assert not modified and "Mul" in ops


def _if_model(outer: str) -> onnx.ModelProto:
    """A Mul (outer="mul") or a bias-less Conv (outer="conv") in the main graph, read only by
    an Add in the If's then-branch (that feeds a Conv there for "mul"); the else-branch
    convolves ``x`` itself."""
    rng = np.random.default_rng(5)
    w = rng.normal(size=(C_OUT, C_IN, 1, 1)).astype(np.float32)
    if outer == "mul":
        then_nodes = [
            helper.make_node("Add", ["pre", "b"], ["z"]),
            helper.make_node("Conv", ["z", "then_W"], ["then_out"]),
        ]
        then_inits = [onnx.numpy_helper.from_array(w, "then_W")]
    else:
        then_nodes = [helper.make_node("Add", ["conv", "b"], ["then_out"])]
        then_inits = []
    then_branch = helper.make_graph(
        then_nodes,
        "then",
        [],
        [helper.make_tensor_value_info("then_out", TensorProto.FLOAT, None)],
        initializer=then_inits,
    )
    else_branch = helper.make_graph(
        [helper.make_node("Conv", ["x", "else_W"], ["else_out"])],
        "else",
        [],
        [helper.make_tensor_value_info("else_out", TensorProto.FLOAT, None)],
        initializer=[onnx.numpy_helper.from_array(-w, "else_W")],
    )
    first = (
        helper.make_node("Mul", ["x", "c"], ["pre"])
        if outer == "mul"
        else helper.make_node("Conv", ["x", "W"], ["conv"])
    )
    branches = {"then_branch": then_branch, "else_branch": else_branch}
    nodes = [first, helper.make_node("If", ["cond"], ["y"], **branches)]
    inputs = [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, C_IN, 8, 8]),
        helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
    ]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", "c", "h", "w"])]
    inits = {"c": np.asarray([1.5], np.float32), "b": np.asarray([0.25], np.float32)}
    if outer == "conv":
        inits["W"] = w
    return make_model(nodes, inputs, outputs, inits)


@pytest.mark.parametrize("outer", ["mul", "conv"])
def test_steps_and_convs_in_different_graphs_stay_apart(outer):
    model = _if_model(outer)
    folded, _, _ = _fold(model)
    onnx.checker.check_model(onnx.load_from_string(folded), full_check=True)
    x = np.random.default_rng(6).normal(size=(2, C_IN, 8, 8)).astype(np.float32)
    for cond in (True, False):
        feed = {"x": x, "cond": np.asarray(cond)}
        (want,) = run_ort(model.SerializeToString(), feed)
        (got,) = run_ort(folded, feed)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_an_offset_before_a_padded_conv_stays_when_the_scale_has_a_zero():
    zero_scale = _channel([0.0, 1.0, 2.0, 3.0])
    model = _conv_model(before=[("Mul", zero_scale), ("Add", SCALAR)], pads=1)
    _, ops, modified = _fold(model)
    assert not modified and ops == ["Mul", "Add", "Conv", "Identity"]


@pytest.mark.parametrize("group", [1, 2])
def test_a_uniform_offset_before_two_padded_convs_stays_as_one_scalar_add(group):
    model = _conv_model(before=[("Mul", SCALAR), ("Add", SCALAR)], pads=1, group=group)
    rng = np.random.default_rng(7)
    weight = rng.normal(size=(2, C_IN // group, 3, 3)).astype(np.float32)
    model.graph.initializer.append(onnx.numpy_helper.from_array(weight, "W2"))
    model.graph.node.append(
        helper.make_node("Conv", ["pre1", "W2"], ["other"], pads=[1] * 4, group=group)
    )
    model.graph.output.append(
        helper.make_tensor_value_info("other", TensorProto.FLOAT, ["n", "c", "h", "w"])
    )
    folded, ops, _ = _fold(model)
    assert ops.count("Add") == 1 and "Mul" not in ops and ops.count("Conv") == 2
    add = next(n for n in onnx.load_from_string(folded).graph.node if n.op_type == "Add")
    offset = next(
        t for t in onnx.load_from_string(folded).graph.initializer if t.name == add.input[1]
    )
    assert list(offset.dims) == [1]
    _assert_same_outputs(model, folded)


def test_a_moved_offset_that_overflows_float16_stays_where_it_was():
    # 1000 / 0.01 = 1e5 is past float16's 65504.
    model = _conv_model(
        before=[("Mul", np.asarray(0.01, np.float32)), ("Add", np.asarray(1000.0, np.float32))],
        pads=1,
    )
    _to_float16(model)
    _, ops, modified = _fold(model)
    assert not modified and ops == ["Mul", "Add", "Conv", "Identity"]


def test_the_half_that_ends_an_erf_gelu_stays_for_onnxruntime_to_fuse_it():
    """Moved into the next Conv, the 0.5 of x * (1 + erf(x / √2)) * 0.5 left onnxruntime a
    Div, Erf, Add and Mul to run instead of one Gelu: PP-OCRv6 rec's fold made it 1.27x
    slower."""
    proto = _gelu_then_conv(scale=None)
    assert not ConvAffinePass()(io.load(proto)).modified
    folded = FoldPass()(io.load(proto)).model
    assert [n.op_type for n in folded.graph].count("Mul") == 2
    assert "Gelu" in optimized_ops(io.to_bytes(folded))


def test_a_step_after_a_gelu_still_folds_with_the_half_left_in_place():
    """Only the GELU's 0.5 must stay: a layer scale after it still goes into the Conv."""
    proto = _gelu_then_conv(scale=0.7)
    model = io.load(proto)
    assert ConvAffinePass()(model).modified
    assert [n.op_type for n in model.graph].count("Mul") == 2  # x * (1 + erf) and the half
    x = np.random.default_rng(0).standard_normal((2, 4, 1, 16)).astype(np.float32)
    (expected,) = run_ort(proto.SerializeToString(), {"x": x})
    (got,) = run_ort(io.to_bytes(model), {"x": x})
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def _gelu_then_conv(scale: float | None) -> onnx.ModelProto:
    """Conv -> erf GELU (x * (1 + erf(x / √2)) * 0.5) -> [* scale] -> Conv, 4 -> 8 -> 4."""
    rng = np.random.default_rng(0)
    constants = {
        "w1": rng.standard_normal((8, 4, 1, 1)),
        "w2": rng.standard_normal((4, 8, 1, 1)),
        "sqrt2": np.array(1.4142135),
        "one": np.array(1.0),
        "half": np.array(0.5),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"]),
        helper.make_node("Div", ["c1", "sqrt2"], ["dv"]),
        helper.make_node("Erf", ["dv"], ["er"]),
        helper.make_node("Add", ["er", "one"], ["ad"]),
        helper.make_node("Mul", ["c1", "ad"], ["mu"]),
        helper.make_node("Mul", ["mu", "half"], ["gelu"]),
    ]
    if scale is not None:
        constants["gamma"] = np.array([scale])
        nodes.append(helper.make_node("Mul", ["gelu", "gamma"], ["scaled"]))
    nodes.append(helper.make_node("Conv", [nodes[-1].output[0], "w2"], ["y"]))
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 1, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 1, 16])],
        [onnx.numpy_helper.from_array(v.astype(np.float32), k) for k, v in constants.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
