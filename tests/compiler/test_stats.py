"""Accounting: nodes, params, bytes and MACs, including subgraphs and functions."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as onh
import onnx.parser
import onnx.version_converter
import onnx_ir as ir
import pytest

from models import digits
from onnx_shrink.compiler import io, stats
from tests.helpers import make_model, parse


def _weights_model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits = [
        onh.from_array(rng.standard_normal(shape).astype(np.float32), name)
        for name, shape in (("w", (4, 3, 3, 3)), ("wm", (16, 32)), ("wg", (8, 16)))
    ]
    f = onnx.TensorProto.FLOAT
    graph = oh.make_graph(
        [
            oh.make_node("Conv", ["img", "w"], ["c"], pads=[1, 1, 1, 1]),
            oh.make_node("MatMul", ["x", "wm"], ["m"]),
            oh.make_node("Gemm", ["x", "wg"], ["gm"], transB=1),
        ],
        "g",
        [
            oh.make_tensor_value_info("img", f, ["N", 3, 8, 8]),
            oh.make_tensor_value_info("x", f, ["N", 16]),
        ],
        [
            oh.make_tensor_value_info("c", f, ["N", 4, 8, 8]),
            oh.make_tensor_value_info("m", f, ["N", 32]),
            oh.make_tensor_value_info("gm", f, ["N", 8]),
        ],
        initializer=inits,
    )
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)], ir_version=8)


def test_macs_of_matmul_gemm_and_conv_follow_their_formulas():
    model = io.load(_weights_model())
    s = stats.measure(model)
    conv = 4 * 8 * 8 * (3 * 3 * 3)  # output elements x (Cin x kh x kw)
    matmul = 32 * 16  # output elements x K
    gemm = 8 * 16
    assert s.macs == conv + matmul + gemm
    assert s.nodes_without_macs == 0
    assert s.params == 4 * 3 * 3 * 3 + 16 * 32 + 8 * 16
    assert s.tensor_bytes == s.params * 4


def test_counts_include_if_branches():
    model = io.load(
        parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (bool c, float[2] x) => (float[2] y) {
      y = If (c) <
        then_branch = t () => (float[2] a) { a = Relu(x) },
        else_branch = e () => (float[2] b) {
          k = Constant <value = float[2] {1, 2}> ()
          b = Add(x, k)
        }
      >
    }
    """)
    )
    s = stats.measure(model)
    assert s.nodes == 4
    assert s.op_types == {"If": 1, "Relu": 1, "Constant": 1, "Add": 1}
    assert s.params == 2


def _reshaped_model() -> onnx.ModelProto:
    """Inputs reshaped by runtime shapes: shape inference knows h's rank but no dim, and
    neither rank nor dims of u and v (their shape input has a symbolic length)."""
    rng = np.random.default_rng(1)
    inits = {
        name: rng.standard_normal(shape).astype(np.float32)
        for name, shape in (("wm", (16, 32)), ("wg", (8, 16)), ("wc", (6, 16, 1, 1)))
    }
    f, i64 = onnx.TensorProto.FLOAT, onnx.TensorProto.INT64
    return make_model(
        [
            oh.make_node("Reshape", ["x", "s"], ["h"]),
            oh.make_node("Reshape", ["x", "su"], ["u"]),
            oh.make_node("Reshape", ["x", "su"], ["v"]),
            oh.make_node("MatMul", ["u", "wm"], ["m"]),
            oh.make_node("Gemm", ["h", "wg"], ["gm"], transB=1),
            oh.make_node("MatMul", ["h", "v"], ["aa"]),  # activation x activation
            oh.make_node("Reshape", ["x", "s4"], ["h4"]),
            oh.make_node("Conv", ["h4", "wc"], ["c"]),
            *(oh.make_node("Relu", [n], [f"r_{n}"]) for n in ("m", "gm", "aa", "c")),
        ],
        [
            oh.make_tensor_value_info("x", f, ["N", 16]),
            oh.make_tensor_value_info("s", i64, [2]),
            oh.make_tensor_value_info("su", i64, ["L"]),
            oh.make_tensor_value_info("s4", i64, [4]),
        ],
        [
            oh.make_tensor_value_info(f"r_{n}", f, ["a", "b", "c", "d"][:rank])
            for n, rank in (("m", 2), ("gm", 2), ("aa", 2), ("c", 4))
        ],
        inits,
    )


def test_weight_nodes_without_inferred_shapes_count_their_macs_per_row():
    s = stats.measure(io.load(_reshaped_model()))
    # K and N from the weights; rows (output positions) unknown count once
    assert s.macs == 16 * 32 + 16 * 8 + 6 * 16
    assert s.nodes_without_macs == 1  # the activation x activation MatMul


def test_observed_shapes_give_the_macs_of_that_run():
    shapes = {"h": (5, 16), "u": (5, 16), "v": (16, 5), "m": (5, 32), "gm": (5, 8), "aa": (5, 5)}
    shapes |= {"h4": (1, 16, 2, 3), "c": (1, 6, 2, 3)}
    s = stats.measure(io.load(_reshaped_model()), shapes)
    assert s.macs == 5 * 16 * 32 + 5 * 16 * 8 + 5 * 5 * 16 + 6 * 6 * 16
    assert s.nodes_without_macs == 0


def _detector_like() -> onnx.ModelProto:
    """Two Convs on an image of symbolic height and width (a detector exported for any size),
    its annotations symbolic as exporters write them."""
    rng = np.random.default_rng(0)
    f = onnx.TensorProto.FLOAT
    proto = make_model(
        [
            oh.make_node("Conv", ["img", "w"], ["c"], strides=[2, 2]),
            oh.make_node("Conv", ["c", "w2"], ["y"], pads=[1, 1, 1, 1]),
        ],
        [oh.make_tensor_value_info("img", f, ["N", 3, "H", "W"])],
        [oh.make_tensor_value_info("y", f, ["N", 4, "H2", "W2"])],
        {
            "w": rng.standard_normal((8, 3, 2, 2)).astype(np.float32),
            "w2": rng.standard_normal((4, 8, 3, 3)).astype(np.float32),
        },
    )
    proto.graph.value_info.append(oh.make_tensor_value_info("c", f, ["N", 8, "H2", "W2"]))
    return proto


def test_input_dims_give_the_macs_of_one_sample_of_that_size():
    model = io.load(_detector_like())
    per_position = 8 * 3 * 2 * 2 + 4 * 8 * 3 * 3
    assert stats.measure(model).macs == per_position  # H and W count as 1
    s = stats.measure(model, input_dims={"img": (1, 3, 320, 320)})
    assert s.macs == 160 * 160 * per_position
    assert str(model.graph.inputs[0].shape[2]) == "H"  # the model is left as it was


def test_the_summary_counts_macs_on_the_calibration_data_or_the_requested_shapes():
    import onnx_shrink

    proto = _detector_like()
    per_position = 8 * 3 * 2 * 2 + 4 * 8 * 3 * 3
    images = np.random.default_rng(1).standard_normal((4, 3, 64, 64)).astype(np.float32)
    calibrated = onnx_shrink.shrink(
        proto, passes="fold,quant", check=False, calibration={"img": images}
    )
    assert [step.before.macs for step in calibrated.steps] == [32 * 32 * per_position] * 2
    assert calibrated.steps[-1].after.macs == 32 * 32 * per_position  # int8 computes as many
    # No pass calibrates: the check's data gives the dims all the same.
    checked = onnx_shrink.shrink(proto, passes="fold", data={"img": images})
    assert checked.steps[0].before.macs == 32 * 32 * per_position
    asked = onnx_shrink.shrink(
        proto, passes="fold", check=False, input_shapes={"img": (2, 3, 32, 32)}
    )
    assert asked.steps[0].before.macs == 16 * 16 * per_position  # per sample: batch 1
    # Synthetic inputs' default dims are made up: symbolic dims still count as 1.
    synthetic = onnx_shrink.shrink(proto, passes="fold,quant", check=False)
    assert synthetic.steps[0].before.macs == per_position


# The MatMul that ends each flatten below.
_BY_W = """
  w = Constant <value = float[5, 4] {1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0,
                                     11.0, 12.0, 13.0, 14.0, 15.0, 16.0, 17.0, 18.0, 19.0, 20.0}> ()
  y = MatMul(flat, w)
}
"""
# Paddle's flatten at opset 12 (PP-OCRv4 rec): onnx's shape inference cannot follow a Slice
# of a Shape, so nothing after the Reshape has a shape: the MatMul's 6 rows count as 1.
FLATTENED_MATMUL = (
    """
<ir_version: 7, opset_import: ["" : 12]>
g (float[N, 6, 1, 5] x) => (float[N, M, 4] y) {
  shape = Shape(x)
  starts = Constant <value = int64[1] {0}> ()
  ends = Constant <value = int64[1] {2}> ()
  axes = Constant <value = int64[1] {0}> ()
  head = Slice(shape, starts, ends, axes)
  rest = Constant <value = int64[1] {-1}> ()
  target = Concat <axis = 0> (head, rest)
  flat = Reshape(x, target)"""
    + _BY_W
)


def test_a_workloads_count_on_a_dim_inference_could_not_fix_is_a_bound():
    """Under input dims, a MAC node counted on an unknown or symbolic dim reads as a lower
    bound ("≥")."""
    model = io.load(parse(FLATTENED_MATMUL))
    bound = stats.measure(model, input_dims={"x": (1, 6, 1, 5)})
    assert (bound.macs, bound.nodes_without_macs) == (1 * 5 * 4, 1)
    # With a run's dims it is exact.
    run = stats.measure(model, {"flat": (1, 6, 5), "y": (1, 6, 4)}, {"x": (1, 6, 1, 5)})
    assert (run.macs, run.nodes_without_macs) == (6 * 5 * 4, 0)
    exact = stats.measure(io.load(_detector_like()), input_dims={"img": (1, 3, 320, 320)})
    assert exact.nodes_without_macs == 0  # every dim fixed but the batch's


# A flatten to [batch x sequence, 5] at opset 17: inference cannot follow ReduceProd.
ROWS_FLATTENED_MATMUL = (
    """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 6, 5] x) => (float[M, 4] y) {
  shape = Shape(x)
  start = Constant <value = int64[1] {0}> ()
  end = Constant <value = int64[1] {2}> ()
  dims = Slice(shape, start, end)
  rows = ReduceProd <keepdims = 1> (dims)
  five = Constant <value = int64[1] {5}> ()
  target = Concat <axis = 0> (rows, five)
  flat = Reshape(x, target)"""
    + _BY_W
)


def test_a_first_axis_inference_lost_is_not_taken_for_the_batch():
    """A flatten to [batch x sequence, H] whose target inference cannot follow leaves the
    first axis symbolic: counted as one sample, the MatMul read 20 MACs, exact, where a run
    gives 120."""
    import onnx_shrink

    model = io.load(parse(ROWS_FLATTENED_MATMUL))
    bound = stats.measure(model, input_dims={"x": (1, 6, 5)})
    assert (bound.macs, bound.nodes_without_macs) == (1 * 5 * 4, 1)
    x = np.random.default_rng(0).standard_normal((2, 6, 5)).astype(np.float32)
    step = onnx_shrink.shrink(parse(ROWS_FLATTENED_MATMUL), "fold", data={"x": x}).steps[0]
    assert (step.before.macs, step.before.nodes_without_macs) == (6 * 5 * 4, 0)


def test_the_summary_counts_a_bound_again_on_a_real_run():
    """Where inferred shapes leave a count a bound, the summary counts it on the dims of one
    sample's run: PP-OCRv4 rec read "≥652M -> ≥360M (-45%)" after prune-channels, where a run
    gives 702M -> 410M (-42%)."""
    import onnx_shrink

    x = np.random.default_rng(0).standard_normal((3, 6, 1, 5)).astype(np.float32)
    for kwargs in ({"data": {"x": x}}, {"check": False, "input_shapes": {"x": (2, 6, 1, 5)}}):
        result = onnx_shrink.shrink(parse(FLATTENED_MATMUL), passes="fold", **kwargs)
        step = result.steps[0]
        assert (step.before.macs, step.before.nodes_without_macs) == (6 * 5 * 4, 0)
        assert (step.after.macs, step.after.nodes_without_macs) == (6 * 5 * 4, 0)


def test_integer_and_qlinear_forms_count_the_macs_of_their_float_op():
    u8 = onnx.TensorProto.UINT8
    inits = {
        "wq": np.ones((16, 32), np.uint8),
        "cq": np.ones((4, 3, 3, 3), np.uint8),
        "sc": np.array(0.1, np.float32),
        "zp": np.array(0, np.uint8),
    }
    model = make_model(
        [
            oh.make_node("MatMulInteger", ["x", "wq"], ["mi"]),
            oh.make_node("QLinearMatMul", ["x", "sc", "zp", "wq", "sc", "zp", "sc", "zp"], ["qm"]),
            oh.make_node(
                "QLinearConv",
                ["img", "sc", "zp", "cq", "sc", "zp", "sc", "zp"],
                ["qc"],
                pads=[1, 1, 1, 1],
            ),  # fmt: skip
        ],
        [
            oh.make_tensor_value_info("x", u8, ["N", 16]),
            oh.make_tensor_value_info("img", u8, ["N", 3, 8, 8]),
        ],
        [
            oh.make_tensor_value_info("mi", onnx.TensorProto.INT32, ["N", 32]),
            oh.make_tensor_value_info("qm", u8, ["N", 32]),
            oh.make_tensor_value_info("qc", u8, ["N", 4, 8, 8]),
        ],
        inits,
    )
    s = stats.measure(io.load(model))
    assert s.macs == 2 * 32 * 16 + 4 * 8 * 8 * (3 * 3 * 3)
    assert s.nodes_without_macs == 0


def test_matmul_integer_to_float_counts_as_its_matmul():
    inits = [
        onh.from_array(np.ones((16, 32), np.int8), "wq"),
        onh.from_array(np.array(0.1, np.float32), "s"),
        onh.from_array(np.zeros(32, np.float32), "bias"),
    ]
    node = oh.make_node(
        "MatMulIntegerToFloat", ["x", "wq", "s", "s", "", "", "bias"], ["y"], domain="com.microsoft"
    )
    graph = oh.make_graph(
        [node],
        "g",
        [oh.make_tensor_value_info("x", onnx.TensorProto.UINT8, ["N", 16])],
        [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 32])],
        initializer=inits,
    )
    opsets = [oh.make_opsetid("", 17), oh.make_opsetid("com.microsoft", 1)]
    s = stats.measure(io.load(oh.make_model(graph, opset_imports=opsets, ir_version=8)))
    assert s.macs == 16 * 32 and s.nodes_without_macs == 0


def test_a_dim_written_as_minus_one_counts_once_and_the_model_is_left_as_it_was():
    """Paddle exports declare unknown dims as -1; they must not make MACs negative."""
    f = onnx.TensorProto.FLOAT
    weight = np.ones((8, 3, 3, 3), np.float32)
    proto = make_model(
        [
            oh.make_node("Conv", ["img", "w"], ["c"], pads=[1, 1, 1, 1]),
            oh.make_node("Relu", ["c"], ["y"]),
        ],
        [oh.make_tensor_value_info("img", f, [-1, 3, 4, 4])],
        [oh.make_tensor_value_info("y", f, [-1, 8, 4, 4])],
        {"w": weight},
    )
    model = io.load(proto)
    assert stats.measure(model).macs == 8 * 4 * 4 * 27
    conv_output = next(iter(model.graph)).outputs[0]
    assert conv_output.shape is None  # inference ran on a serialized copy of the graph
    assert model.graph.initializers["w"].const_value.numpy().sum() == weight.sum()


def test_a_function_constant_that_refers_to_an_attribute_holds_no_tensor_to_count():
    model = io.load(
        onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 17, "local" : 1]>
    g (float[2] x) => (float[2] y) {
      y = local.addc <v = float[2] {1.0, 2.0}> (x)
    }
    <domain: "local", opset_import: ["" : 17]>
    addc <v> (x) => (y) {
      c = Constant <value: tensor = @v> ()
      y = Add(x, c)
    }
    """)
    )
    measured = stats.measure(model)
    assert measured.nodes == 3 and measured.params == 0


def test_mac_shapes_give_node_macs_what_measure_counts():
    model = io.load(digits.MODEL_PATH)
    shapes = stats.mac_shapes(model)
    per_node = [stats.node_macs(n, shapes) for n in model.graph if stats.is_mac_node(n)]
    assert None not in per_node and sum(per_node) == stats.measure(model).macs > 0


@pytest.mark.parametrize("layout", ["matmulnbits", "dequantize_linear"])
def test_weight_only_quantization_keeps_the_macs_it_computes(layout):
    """MatMulNBits holds K and N as attributes and its weight packed: its MACs were not
    counted, and the summary read 'MACs 5.31M -> 0 (-100%)' and 'params -47%' on MiniLM after
    quant-weight."""
    from models.builders import build_mlp
    from onnx_shrink.passes.quant.weight_only import WeightOnlyQuantPass

    proto = build_mlp()
    if layout == "dequantize_linear":  # blocked DequantizeLinear needs opset 21
        proto = onnx.version_converter.convert_version(proto, 21)
    model = io.load(proto)
    before = stats.measure(model)
    WeightOnlyQuantPass(format=layout, min_weight_elements=0)(model)
    after = stats.measure(model)
    assert before.macs > 0 and after.macs == before.macs
    assert after.nodes_without_macs == 0
    # Parameters are counted as parameters, not as the bytes packing them (plus the scales).
    assert after.params > before.params


def test_a_4_bit_embedding_table_counts_its_parameters_not_its_bytes():
    from onnx_shrink.passes.quant.weight_only import WeightOnlyQuantPass

    table = np.random.default_rng(0).standard_normal((256, 64)).astype(np.float32)
    proto = make_model(
        [oh.make_node("Gather", ["table", "ids"], ["y"])],
        [oh.make_tensor_value_info("ids", onnx.TensorProto.INT64, ["N"])],
        [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 64])],
        {"table": table},
    )
    model = io.load(proto)
    before = stats.measure(model).params
    WeightOnlyQuantPass(op_types=("Gather",), min_weight_elements=0)(model)
    assert any(n.op_type == "GatherBlockQuantized" for n in model.graph)
    assert before == table.size <= stats.measure(model).params  # codes, plus their scales


@pytest.mark.parametrize("pass_name", ["quant", "quant-dynamic", "quant-weight"])
def test_quantized_matmuls_and_tables_keep_the_macs_of_the_requested_input_dims(pass_name):
    """onnx infers no output shape for MatMulIntegerToFloat, DynamicQuantizeMatMul,
    MatMulNBits or GatherBlockQuantized, nor then for anything after them: each MatMul's rows
    must still follow the input dims (MiniLM at 1x128 read 717M MACs -> 5.3M)."""
    from onnx_shrink.compiler import spec
    from onnx_shrink.compiler.statistics import MinMax, Statistics

    rng = np.random.default_rng(0)
    proto = make_model(
        [
            oh.make_node("Gather", ["table", "ids"], ["e"]),
            oh.make_node("MatMul", ["e", "w1"], ["h"]),
            oh.make_node("Relu", ["h"], ["r"]),
            oh.make_node("MatMul", ["r", "w2"], ["y"]),
        ],
        [oh.make_tensor_value_info("ids", onnx.TensorProto.INT64, ["batch", "sequence"])],
        [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", "sequence", 64])],
        {
            "table": rng.standard_normal((100, 64)).astype(np.float32),
            "w1": rng.standard_normal((64, 128)).astype(np.float32),
            "w2": rng.standard_normal((128, 64)).astype(np.float32),
        },
    )
    dims = {"ids": (1, 32)}
    before = stats.measure(io.load(proto), input_dims=dims).macs
    sets = [] if pass_name == "quant" else [f"{pass_name}.min_weight_elements=0"]
    (quantizer,) = spec.parse_spec(pass_name, sets)
    model = io.load(proto)
    if pass_name == "quant":  # ordinary ranges for what it measures
        requests = quantizer.requests(model)
        results = {r: MinMax(-4.0, 4.0, 0, 1) for r in requests if r.kind == "minmax"}
        quantizer = quantizer.bind(Statistics(results=results, samples=1, source="made up"))
    after = quantizer(model).model
    assert before == 32 * (64 * 128 + 128 * 64)
    if pass_name != "quant":  # quant's MatMuls here are QDQ (MiniLM's get MatMulIntegerToFloat)
        assert "com.microsoft" in {n.domain for n in after.graph}
    assert stats.measure(after, input_dims=dims).macs == before


def test_a_conv_of_unknown_output_shape_has_unknown_macs_not_one_position():
    # Counted as one position, a Conv in an If body read as its weight's size, and fold
    # (which exposes the shapes) showed MACs rising 144% on Silero VAD.
    x = ir.Value(name="x")
    w = ir.Value(name="w", const_value=ir.tensor(np.ones((4, 3, 3, 3), np.float32)))
    conv = ir.node("Conv", [x, w])
    conv.outputs[0].name = "y"
    assert stats.node_macs(conv, {}) is None
    assert stats.node_macs(conv, {"y": (1, 4, 8, 8)}) == 64 * 4 * 27


def test_a_conv_transpose_after_quantize_dequantize_counts_on_the_float_inputs_dims():
    # After quant, a ConvTranspose read a DequantizeLinear's output that no inference had
    # given a shape, and PP-OCRv6's detector read "423.52k -> >=422.50k" MACs.
    x = ir.Value(name="x", shape=ir.Shape([1, 16, 8, 8]), type=ir.TensorType(ir.DataType.FLOAT))
    scale = ir.Value(name="s", const_value=ir.tensor(np.array(0.1, np.float32)))
    codes = ir.node("QuantizeLinear", [x, scale]).outputs[0]
    dequantized = ir.node("DequantizeLinear", [codes, scale]).outputs[0]
    w = ir.Value(name="w", const_value=ir.tensor(np.ones((16, 4, 2, 2), np.float32)))
    transpose = ir.node("ConvTranspose", [dequantized, w], attributes={"strides": [2, 2]})
    assert dequantized.shape is None
    assert stats.node_macs(transpose, {}) == (16 * 8 * 8) * (4 * 2 * 2)


def test_one_real_run_serves_every_pass_that_keeps_tensor_shapes():
    """The bound's real run cost PP-OCRv4 rec 0.15 s a model: three in fold,quant. Its dims
    serve every later model but after a pass that changes tensors' shapes."""
    from onnx_shrink.compiler import figures
    from onnx_shrink.passes.prune_channels import PruneChannelsPass

    model = io.load(parse(FLATTENED_MATMUL))
    runs = []

    def observe(_model):  # starts a run; what it returns waits for the run's dims
        runs.append(1)
        return lambda: {"flat": (1, 6, 5), "y": (1, 6, 4)}

    observed: dict = {}
    dims = {"x": (1, 6, 1, 5)}
    first = figures.measure(model, dims, observe, observed)
    again = figures.measure(model, dims, observe, observed)
    assert (first.macs, again.macs, again.nodes_without_macs, len(runs)) == (120, 120, 0, 1)
    assert PruneChannelsPass.changes_shapes  # the pipeline forgets the dims after it


def test_a_pass_that_changes_nothing_is_not_measured_or_run_again():
    """A bound no run settles was run for again after every pass, changed or not."""
    from onnx_shrink.compiler import pipeline
    from onnx_shrink.passes.fold import FoldPass

    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 30] x, int64[3] s) => (float[A, B, 4] y) {
      flat = Reshape(x, s)
      half = Constant <value = float[5, 4] {1., 2., 3., 4., 5., 6., 7., 8., 9., 10.,
                                           11., 12., 13., 14., 15., 16., 17., 18., 19., 20.}> ()
      w = Add(half, half)
      y = MatMul(flat, w)
    }
    """
    runs = []
    result = pipeline.run(
        io.load(parse(text)),
        [FoldPass(), FoldPass(), FoldPass()],
        input_dims={"x": (1, 30), "s": (3,)},
        observe=lambda model: runs.append(1) or (lambda: None),  # no run to be had: a bound
    )
    assert [step.modified for step in result.steps] == [True, False, False]
    assert result.steps[2].after.nodes_without_macs == 1
    assert len(runs) == 2  # the input and the first fold's result; not the unchanged ones


def test_the_inputs_real_run_goes_on_beside_the_first_pass():
    """PP-OCRv4 rec's and MiniLM's input need a run for exact MACs (0.07-0.1 s): it is
    started before the first pass and waited for after it."""
    from onnx_shrink.compiler import pipeline

    events = []

    class Mark(ir.passes.InPlacePass):
        def call(self, model):
            events.append("pass")
            return ir.passes.PassResult(model, False)

    def observe(_model):
        events.append("run started")

        def dims():
            events.append("dims")
            return {"flat": (1, 6, 5), "y": (1, 6, 4)}

        return dims

    model = io.load(parse(FLATTENED_MATMUL))
    result = pipeline.run(model, [Mark()], input_dims={"x": (1, 6, 1, 5)}, observe=observe)
    assert events == ["run started", "pass", "dims"]
    assert (result.steps[0].before.macs, result.steps[0].before.nodes_without_macs) == (120, 0)


def test_a_pass_that_raises_still_waits_for_the_inputs_run():
    """No run may outlive the call that started it: a library caller catching the pass's
    error would otherwise go on beside a session still running and holding memory."""
    from onnx_shrink.compiler import pipeline
    from onnx_shrink.errors import PassFailedError

    events = []

    class Fails(ir.passes.InPlacePass):
        def call(self, model):
            events.append("pass")
            raise ValueError("broken")

    def observe(_model):
        events.append("run started")
        return lambda: events.append("dims") and None

    model = io.load(parse(FLATTENED_MATMUL))
    with pytest.raises(PassFailedError, match="broken"):
        pipeline.run(model, [Fails()], input_dims={"x": (1, 6, 1, 5)}, observe=observe)
    assert events == ["run started", "pass", "dims"]


def test_recurrent_layers_count_their_steps_gates_and_directions():
    """LSTM, GRU and RNN multiply every step's input by W and hidden state by R: openWakeWord's
    LSTM model read 64 MACs (its LSTMs do 1,966,080), a GRU encoder 65,536 of 7.7M."""
    rng = np.random.default_rng(0)
    steps, batch, width, hidden = 7, 3, 5, 8
    for op, gates, layout in (("LSTM", 4, 0), ("GRU", 3, 1), ("RNN", 1, 0)):
        w = rng.standard_normal((2, gates * hidden, width)).astype(np.float32)
        r = rng.standard_normal((2, gates * hidden, hidden)).astype(np.float32)
        x_dims = ["S", "N", width] if layout == 0 else ["N", "S", width]
        y_dims = ["S", 2, "N", hidden] if layout == 0 else ["N", "S", 2, hidden]
        node = oh.make_node(
            op, ["x", "w", "r"], ["y"], hidden_size=hidden, direction="bidirectional", layout=layout
        )
        model = io.load(
            make_model(
                [node],
                [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, x_dims)],
                [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, y_dims)],
                {"w": w, "r": r},
            )
        )
        dims = (steps, batch, width) if layout == 0 else (batch, steps, width)
        counted = stats.measure(model, input_dims={"x": dims})
        expected = steps * batch * 2 * gates * hidden * (width + hidden)
        assert (counted.macs, counted.nodes_without_macs) == (expected, 0), op
        # Without the input's dims, its symbolic steps and batch count once, as anywhere.
        assert stats.measure(model).macs == 2 * gates * hidden * (width + hidden), op


def test_a_bodys_symbolic_first_axis_is_not_a_bound():
    """No run records a body's values: a bound there stayed for good, and every pass that
    changed the model ran the model again for it (4 runs over 3 passes)."""
    from onnx_shrink.compiler import pipeline

    body = oh.make_graph(
        [
            oh.make_node("Identity", ["cond_in"], ["cond_out"]),
            oh.make_node("MatMul", ["s_in", "w"], ["s_out"]),
        ],
        "body",
        [
            oh.make_tensor_value_info("i", onnx.TensorProto.INT64, []),
            oh.make_tensor_value_info("cond_in", onnx.TensorProto.BOOL, []),
            oh.make_tensor_value_info("s_in", onnx.TensorProto.FLOAT, ["N", 64]),
        ],
        [
            oh.make_tensor_value_info("cond_out", onnx.TensorProto.BOOL, []),
            oh.make_tensor_value_info("s_out", onnx.TensorProto.FLOAT, ["N", 64]),
        ],
    )
    model = make_model(
        [oh.make_node("Loop", ["trip", "", "x"], ["y"], body=body)],
        [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 64])],
        [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 64])],
        {"w": np.ones((64, 64), np.float32), "trip": np.array(3, np.int64)},
    )
    counted = stats.measure(io.load(model), input_dims={"x": (1, 64)})
    assert (counted.macs, counted.nodes_without_macs) == (64 * 64, 0)
    runs = []
    pipeline.run(
        io.load(model),
        [],
        input_dims={"x": (1, 64)},
        observe=lambda _model: runs.append(1) or (lambda: None),
    )
    assert runs == []


def test_a_tree_ensembles_params_are_its_split_thresholds_and_leaf_weights():
    # Stored as attributes: nodes_values (the 3 splits' thresholds, 0 for the 4 leaves) and
    # the 4 leaf weights of a depth-2 tree; the int lists (tree structure, feature ids) and
    # the modes are not learned values.
    f = onnx.TensorProto.FLOAT
    tree = oh.make_node(
        "TreeEnsembleRegressor",
        ["x"],
        ["y"],
        domain="ai.onnx.ml",
        n_targets=1,
        nodes_treeids=[0] * 7,
        nodes_nodeids=list(range(7)),
        nodes_featureids=[0, 1, 1, 0, 0, 0, 0],
        nodes_modes=["BRANCH_LEQ"] * 3 + ["LEAF"] * 4,
        nodes_values=[0.5, -1.0, 2.0, 0.0, 0.0, 0.0, 0.0],
        nodes_truenodeids=[1, 3, 5, 0, 0, 0, 0],
        nodes_falsenodeids=[2, 4, 6, 0, 0, 0, 0],
        target_treeids=[0] * 4,
        target_nodeids=[3, 4, 5, 6],
        target_ids=[0] * 4,
        target_weights=[1.0, 2.0, 3.0, 4.0],
    )
    graph = oh.make_graph(
        [tree],
        "g",
        [oh.make_tensor_value_info("x", f, [None, 2])],
        [oh.make_tensor_value_info("y", f, [None, 1])],
    )
    opsets = [oh.make_opsetid("", 17), oh.make_opsetid("ai.onnx.ml", 3)]
    model = oh.make_model(graph, opset_imports=opsets, ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    assert stats.measure(ir.from_proto(model)).params == 7 + 4


def test_without_data_a_model_fixing_all_but_the_batch_counts_one_real_sample(tmp_path):
    """Found in an audit (g2p-id's BERT, token ids [N, 32]): inference alone lost the rows a
    Reshape to [-1, H] flattens, and the summary said 184k MACs a sample for 6.4M, as exact.
    With every dim but the batch fixed, one sample's dims are known without data."""
    from onnx_shrink import shrink

    rng = np.random.default_rng(0)
    nodes = [
        oh.make_node("Gather", ["table", "ids"], ["emb"]),
        oh.make_node("Shape", ["emb"], ["shape"]),
        oh.make_node("Slice", ["shape", "last", "end"], ["width"]),
        oh.make_node("Concat", ["minus_one", "width"], ["flat"], axis=0),
        oh.make_node("Reshape", ["emb", "flat"], ["rows"]),
        oh.make_node("MatMul", ["rows", "w"], ["y"]),
    ]
    inits = {
        "table": rng.standard_normal((32, 16)).astype(np.float32),
        "w": rng.standard_normal((16, 16)).astype(np.float32),
        "last": np.array([-1], np.int64),
        "end": np.array([3], np.int64),
        "minus_one": np.array([-1], np.int64),
    }
    ids = oh.make_tensor_value_info("ids", onnx.TensorProto.INT64, ["N", 8])
    y = oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["R", 16])
    path = tmp_path / "rows.onnx"
    onnx.save(make_model(nodes, [ids], [y], inits), path)
    (step,) = shrink(path, "fold", check=False).steps
    assert step.before.macs == 8 * 16 * 16 and step.before.nodes_without_macs == 0


def test_a_bodys_shapes_follow_constants_of_the_enclosing_graph():
    """fold lifts body initializers to the main graph; onnx infers a body's shapes without
    its enclosing graph's values, so an Unsqueeze's axes from there left its Conv uncounted
    (Silero VAD: "≥0" MACs after fold)."""

    def branch(name: str) -> onnx.GraphProto:
        return oh.make_graph(
            [
                oh.make_node("Unsqueeze", ["x", "axes"], [f"{name}_u"]),
                oh.make_node("Conv", [f"{name}_u", "w"], [f"{name}_y"]),
            ],
            name,
            [],
            [oh.make_tensor_value_info(f"{name}_y", onnx.TensorProto.FLOAT, ["a", "b", "c"])],
        )

    model = make_model(
        [oh.make_node("If", ["c"], ["y"], then_branch=branch("t"), else_branch=branch("e"))],
        [
            oh.make_tensor_value_info("c", onnx.TensorProto.BOOL, []),
            oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", "T"]),
        ],
        [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["a", "b", "c"])],
        {"axes": np.array([1], np.int64), "w": np.ones((8, 1, 4), np.float32)},
    )
    counted = stats.measure(io.load(model), input_dims={"c": (), "x": (1, 16)})
    per_branch = 8 * (16 - 4 + 1) * 4  # output elements x (in channels x kernel)
    assert (counted.macs, counted.nodes_without_macs) == (per_branch, 0)  # a run takes one


def test_an_if_counts_its_larger_branch_and_a_loop_its_body_once():
    """A run takes one branch: both counted read Silero VAD's network twice."""
    model = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (bool c, float[4, 8] x, int64 n) => (float[4, 8] y, float[4, 8] z) {
          y = If (c) <
            then_branch = t () => (float[4, 8] a) { a = MatMul (x, w) },
            else_branch = e () => (float[4, 8] b) { h = MatMul (x, w)  b = MatMul (h, w) }
          >
          z = Loop (n, c, x) <
            body = l (int64 i, bool go, float[4, 8] v) => (bool go2, float[4, 8] v2) {
              go2 = Identity (go)
              v2 = MatMul (v, w)
            }
          >
        }
    """)
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.ones((8, 8), np.float32), "w"))
    counted = stats.measure(io.load(model))
    matmul = 4 * 8 * 8
    assert (counted.macs, counted.nodes_without_macs) == (2 * matmul + matmul, 0)
