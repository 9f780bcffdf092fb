"""The fp32 pass: a model computing in float16/bfloat16 widened to float32, checked on
onnxruntime CPU, on the ONNX conformance cases and on a real float16 model."""

from __future__ import annotations

import logging

import ml_dtypes
import numpy as np
import onnx
import onnx.helper as oh
import onnx_ir as ir
import pytest

from models import digits
from onnx_shrink import shrink
from onnx_shrink.compiler import io
from onnx_shrink.compiler.io import data_files, large_tensors
from onnx_shrink.passes.fp16 import Float16Pass
from onnx_shrink.passes.fp32 import Float32Pass
from onnx_shrink.runtime_check import collect, data
from tests.helpers import cosine, make_model, run_ort
from tests.passes import conformance_cases as conformance

F, H, BF = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16
HALF = {H, BF}
RNG = np.random.default_rng(11)


def _widen(proto: onnx.ModelProto, **options) -> tuple[onnx.ModelProto, bool]:
    result = Float32Pass(**options)(io.load(proto))
    widened = io.serialize_proto(result.model)
    onnx.checker.check_model(widened, full_check=True)
    return widened, result.modified


def _inner_types(proto: onnx.ModelProto) -> dict[str, int]:
    """Element type of every value inside the main graph (inputs and outputs aside), and of
    every initializer, by onnx's inference on ``proto``."""
    graph = onnx.shape_inference.infer_shapes(proto).graph
    types = {i.name: i.type.tensor_type.elem_type for i in graph.value_info}
    types.update({t.name: t.data_type for t in graph.initializer})
    return types


def _half_cnn() -> onnx.ModelProto:
    """float16 in and out: Conv (weights float16) -> Relu -> Mul by a float16 Constant ->
    Flatten -> MatMul (float16) -> Add -> Cast to float32 (a second output), all in float16."""
    nodes = [
        oh.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
        oh.make_node("Relu", ["c"], ["r"]),
        oh.make_node(
            "Constant", [], ["k"], value=onnx.numpy_helper.from_array(np.float16([0.5]), "k")
        ),
        oh.make_node("Mul", ["r", "k"], ["s"]),
        oh.make_node("Flatten", ["s"], ["f"]),
        oh.make_node("MatMul", ["f", "m"], ["mm"]),
        oh.make_node("Add", ["mm", "bias"], ["y"]),
        oh.make_node("Cast", ["y"], ["y32"], to=F),
    ]
    return make_model(
        nodes,
        [oh.make_tensor_value_info("x", H, ["N", 4, 6, 6])],
        [
            oh.make_tensor_value_info("y", H, ["N", 10]),
            oh.make_tensor_value_info("y32", F, ["N", 10]),
        ],
        {
            "w": (0.3 * RNG.standard_normal((8, 4, 3, 3))).astype(np.float16),
            "b": (0.1 * RNG.standard_normal(8)).astype(np.float16),
            "m": (0.05 * RNG.standard_normal((8 * 36, 10))).astype(np.float16),
            "bias": RNG.standard_normal(10).astype(np.float16),
        },
    )


def _float32_reference(proto: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    """``_half_cnn``'s ``y`` computed in float32 from its float16 weights (onnx's reference
    evaluator on a hand-widened copy)."""
    from onnx.reference import ReferenceEvaluator

    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    for index, tensor in enumerate(copy.graph.initializer):
        array = onnx.numpy_helper.to_array(tensor).astype(np.float32)
        copy.graph.initializer[index].CopyFrom(onnx.numpy_helper.from_array(array, tensor.name))
    for node in copy.graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                array = onnx.numpy_helper.to_array(attr.t).astype(np.float32)
                attr.t.CopyFrom(onnx.numpy_helper.from_array(array, attr.t.name))
    for value in [*copy.graph.input, *copy.graph.output]:
        value.type.tensor_type.elem_type = F
    return ReferenceEvaluator(copy).run(None, {"x": x.astype(np.float32)})[0]


def test_a_float16_model_computes_in_float32_and_keeps_its_io_types():
    proto = _half_cnn()
    widened, modified = _widen(proto)
    assert modified
    assert [i.type.tensor_type.elem_type for i in widened.graph.input] == [H]
    assert [o.type.tensor_type.elem_type for o in widened.graph.output] == [H, F]
    assert [o.name for o in widened.graph.output] == ["y", "y32"]
    inner = _inner_types(widened)
    assert not [name for name, dtype in inner.items() if dtype in HALF]
    # One Cast in, one back to float16 for y; the model's own Cast to float32, now an
    # identity, is gone: the float32 sum itself is the output y32.
    assert [n.op_type for n in widened.graph.node].count("Cast") == 2
    x = RNG.standard_normal((3, 4, 6, 6)).astype(np.float16)
    y, y32 = run_ort(widened.SerializeToString(), {"x": x})
    want = _float32_reference(proto, x)
    assert y.dtype == np.float16 and y32.dtype == np.float32
    np.testing.assert_allclose(y32, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(y, want.astype(np.float16))


def test_without_keep_io_types_inputs_and_outputs_become_float32():
    proto = _half_cnn()
    widened, _ = _widen(proto, keep_io_types=False)
    assert [i.type.tensor_type.elem_type for i in widened.graph.input] == [F]
    assert [o.type.tensor_type.elem_type for o in widened.graph.output] == [F, F]
    # Only the identity that makes y32 is left: y and y32 are two outputs of one value.
    assert [n.op_type for n in widened.graph.node].count("Cast") == 1
    x = RNG.standard_normal((2, 4, 6, 6)).astype(np.float32)
    (y, _) = run_ort(widened.SerializeToString(), {"x": x})
    np.testing.assert_allclose(y, _float32_reference(proto, x), rtol=1e-5, atol=1e-5)


def test_weights_stored_in_float16_for_float32_maths_stay_as_stored(caplog):
    """Rule 2: the model computes in float32 already; widening would only double the file."""
    proto = make_model(
        [
            oh.make_node("Cast", ["w16"], ["w"], to=F),
            oh.make_node("MatMul", ["x", "w"], ["y"]),
        ],
        [oh.make_tensor_value_info("x", F, ["N", 8])],
        [oh.make_tensor_value_info("y", F, ["N", 4])],
        {"w16": RNG.standard_normal((8, 4)).astype(np.float16)},
    )
    with caplog.at_level(logging.WARNING, logger="onnx_shrink"):
        widened, modified = _widen(proto)
    assert not modified
    assert widened.graph.initializer[0].data_type == H
    assert "fp32: no node changed" in caplog.text


def test_bfloat16_is_widened_too():
    weights = RNG.standard_normal((8, 4)).astype(ml_dtypes.bfloat16)
    proto = make_model(
        [
            oh.make_node("Cast", ["x"], ["xb"], to=BF),
            oh.make_node("MatMul", ["xb", "w"], ["yb"]),
            oh.make_node("Cast", ["yb"], ["y"], to=F),
        ],
        [oh.make_tensor_value_info("x", F, ["N", 8])],
        [oh.make_tensor_value_info("y", F, ["N", 4])],
        {"w": weights},
    )
    assert proto.graph.initializer[0].data_type == BF
    widened, _ = _widen(proto)
    assert [n.op_type for n in widened.graph.node] == ["MatMul"]
    assert widened.graph.initializer[0].data_type == F
    x = RNG.standard_normal((2, 8)).astype(np.float32)
    (y,) = run_ort(widened.SerializeToString(), {"x": x})
    # x is no longer rounded to bfloat16 on the way in: float32 maths on the stored weights.
    np.testing.assert_allclose(y, x @ weights.astype(np.float32), rtol=1e-5, atol=1e-5)


def test_if_branches_and_their_outer_weights_are_widened():
    half = oh.make_tensor_value_info
    then_branch = oh.make_graph(
        [oh.make_node("Mul", ["x", "w"], ["a"])], "then", [], [half("a", H, ["N", 4])]
    )
    constant = onnx.numpy_helper.from_array(np.float16([0.5]), "h")
    else_branch = oh.make_graph(
        [
            oh.make_node("Constant", [], ["h"], value=constant),
            oh.make_node("Add", ["x", "h"], ["b"]),
        ],
        "else",
        [],
        [half("b", H, ["N", 4])],
    )
    proto = make_model(
        [oh.make_node("If", ["c"], ["y"], then_branch=then_branch, else_branch=else_branch)],
        [half("x", H, ["N", 4]), half("c", onnx.TensorProto.BOOL, [])],
        [half("y", H, ["N", 4])],
        {"w": np.float16([1.5, -2.0, 0.25, 3.0])},
    )
    widened, _ = _widen(proto)
    body_types = []
    for attr in _if_node(widened).attribute:
        body = onnx.helper.get_attribute_value(attr)
        body_types += [o.type.tensor_type.elem_type for o in body.output]
        body_types += [n.attribute[0].t.data_type for n in body.node if n.op_type == "Constant"]
    assert body_types and set(body_types) == {F}
    assert widened.graph.initializer[0].data_type == F
    x = RNG.standard_normal((3, 4)).astype(np.float16)
    w = np.float32([1.5, -2.0, 0.25, 3.0])
    for flag, want in ((True, x.astype(np.float32) * w), (False, x.astype(np.float32) + 0.5)):
        (y,) = run_ort(widened.SerializeToString(), {"x": x, "c": np.array(flag)})
        np.testing.assert_array_equal(y, want.astype(np.float16))


def _if_node(proto: onnx.ModelProto) -> onnx.NodeProto:
    return next(n for n in proto.graph.node if n.op_type == "If")


def test_a_model_local_function_stays_half_with_casts_around_it():
    """Rule 3: a function is typed per call; its body is left as written."""
    function = oh.make_function(
        "local",
        "HalfScale",
        ["a"],
        ["b"],
        [
            oh.make_node(
                "Constant", [], ["k"], value=onnx.numpy_helper.from_array(np.float16([2.0]))
            ),
            oh.make_node("Mul", ["a", "k"], ["b"]),
        ],
        [oh.make_opsetid("", 17)],
    )
    graph = oh.make_graph(
        [
            oh.make_node("MatMul", ["x", "w"], ["m"]),
            oh.make_node("HalfScale", ["m"], ["s"], domain="local"),
            oh.make_node("Relu", ["s"], ["y"]),
        ],
        "g",
        [oh.make_tensor_value_info("x", H, ["N", 8])],
        [oh.make_tensor_value_info("y", H, ["N", 4])],
        [onnx.numpy_helper.from_array(RNG.standard_normal((8, 4)).astype(np.float16), "w")],
    )
    proto = oh.make_model(
        graph,
        opset_imports=[oh.make_opsetid("", 17), oh.make_opsetid("local", 1)],
        functions=[function],
        ir_version=8,
    )
    onnx.checker.check_model(proto)
    widened, _ = _widen(proto)
    ops = [n.op_type for n in widened.graph.node]
    assert ops == ["Cast", "MatMul", "Cast", "HalfScale", "Cast", "Relu", "Cast"]
    inner = _inner_types(widened)
    call = next(n for n in widened.graph.node if n.op_type == "HalfScale")
    assert inner[call.input[0]] == H and inner[call.output[0]] == H
    x = RNG.standard_normal((2, 8)).astype(np.float16)
    (want,) = run_ort(proto.SerializeToString(), {"x": x})
    (got,) = run_ort(widened.SerializeToString(), {"x": x})
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3)


def test_a_float32_model_is_left_unchanged_and_says_why(caplog):
    proto = onnx.load(digits.MODEL_PATH)
    with caplog.at_level(logging.WARNING, logger="onnx_shrink"):
        widened, modified = _widen(proto)
    assert not modified
    assert widened.graph.node == proto.graph.node
    assert "no float16/bfloat16 tensor" in caplog.text


def test_digits_converted_by_fp16_and_widened_back_keeps_every_prediction():
    """fp16 then fp32: the same graph as the original, every weight float32 again (each the
    original rounded to float16), and the same predictions on the held-out digits."""
    original = io.load(digits.MODEL_PATH)
    arrays = data_files.load_npz(digits.TEST_DATA_PATH)
    fp16 = Float16Pass()
    dataset = data.prepare(data.specs_from_model(original), digits.TEST_DATA_PATH)
    stats = collect.collect(original, fp16.requests(original), dataset)
    half = io.load(original)
    fp16.bind(stats)(half)
    half_bytes = io.to_bytes(half)
    widened = io.load(half)
    assert Float32Pass()(widened).modified
    assert [n.op_type for n in widened.graph] == [n.op_type for n in original.graph]
    assert all(
        v.const_value.dtype == ir.DataType.FLOAT for v in widened.graph.initializers.values()
    )
    assert large_tensors.saved_bytes(widened) == pytest.approx(
        large_tensors.saved_bytes(original), rel=0.01
    )
    feed = {"image": arrays["image"]}
    (logits,) = run_ort(io.to_bytes(widened), feed)
    (half_logits,) = run_ort(half_bytes, feed)
    (float_logits,) = run_ort(io.to_bytes(original), feed)
    np.testing.assert_array_equal(logits.argmax(1), float_logits.argmax(1))
    # Widened, only the weights' rounding to float16 is left: closer to float32 than fp16's.
    assert np.abs(logits - float_logits).max() <= np.abs(half_logits - float_logits).max()


CASES = conformance.all_cases()
DATA = conformance.read_data()
SKIPPED = set(DATA[conformance.ORT_SECTION]) | set(DATA[conformance.LOAD_SECTION])


def _holds_half(proto: onnx.ModelProto) -> bool:
    graph = proto.graph
    infos = [*graph.input, *graph.output, *graph.value_info]
    if any(i.type.tensor_type.elem_type in HALF for i in infos):
        return True
    if any(t.data_type in HALF for t in graph.initializer):
        return True
    for node in graph.node:
        for attr in node.attribute:
            if attr.name in ("to", "dtype") and attr.i in HALF:
                return True
            if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type in HALF:
                return True
    return False


HALF_CASES = sorted(n for n, c in CASES.items() if n not in SKIPPED and _holds_half(c.model))


def test_the_conformance_sweep_covers_the_half_cases():
    assert len(HALF_CASES) >= 100


@pytest.mark.parametrize("name", HALF_CASES)
def test_conformance_cases_in_half_precision_keep_their_outputs(name: str):
    """Every operator conformance case holding a float16/bfloat16 tensor: widened, it still
    gives the recorded outputs (or, where onnxruntime misses them before the pass too, the
    original's outputs on onnxruntime)."""
    case = CASES[name]
    original = case.model.SerializeToString()
    widened, _ = _widen(case.model)
    session = conformance.session(widened.SerializeToString())
    reason = conformance.outputs_mismatch(case, session)
    if reason is not None and conformance.ort_failure(case) is not None:
        reference = conformance.session(original)
        reason = conformance.outputs_mismatch(case, session, reference=reference)
    assert reason is None, reason
    assert case.model.SerializeToString() == original, "the caller's ModelProto was modified"


@pytest.mark.network
def test_a_real_float16_segmenter_is_widened_and_then_quantized(tmp_path):
    """UKIS csmask (an EfficientNet-b4 U-Net that computes in float16): ``fp32`` keeps its
    output, and ``fp32,quant`` gives it int8 kernels in about half its float16 bytes, where
    ``quant`` alone leaves it as it is."""
    from models.fetch import fetch

    path = fetch("csmask-fp16")
    x = np.random.default_rng(3).random((1, 6, 256, 256), dtype=np.float32)
    widened, modified = _widen(onnx.load(path))
    assert modified and not [t for t, d in _inner_types(widened).items() if d in HALF]
    (want,) = run_ort(path, {"input": x})
    (got,) = run_ort(widened.SerializeToString(), {"input": x})
    assert cosine(want, got) >= 0.9999
    calibration = tmp_path / "calib.npz"
    np.savez(calibration, input=np.random.default_rng(4).random((2, 6, 256, 256), np.float32))
    out = tmp_path / "int8.onnx"
    shrink(str(path), passes="fold,fp32,quant", output=str(out), check=False, data=str(calibration))
    quantized = onnx.load(out)
    convs = [n for n in quantized.graph.node if n.op_type == "Conv"]
    dequantized = {
        o for n in quantized.graph.node if n.op_type == "DequantizeLinear" for o in n.output
    }
    assert convs and all(n.input[1] in dequantized for n in convs)
    assert out.stat().st_size < 0.55 * path.stat().st_size
    run_ort(out, {"input": x})


def _same_as_original(proto: onnx.ModelProto, feed: dict[str, np.ndarray]) -> onnx.ModelProto:
    """Widen ``proto`` and check that onnxruntime runs it with the original's output names,
    types and values (within float16 rounding); the widened model."""
    widened, modified = _widen(proto)
    assert modified
    names = [o.name for o in proto.graph.output]
    assert [o.name for o in widened.graph.output] == names
    for want, got in zip(
        run_ort(proto.SerializeToString(), feed),
        run_ort(widened.SerializeToString(), feed),
        strict=True,
    ):
        assert got.dtype == want.dtype
        np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32), 2e-3, 2e-3)
    return widened


def _model(nodes, inputs, outputs, inits=(), opsets=(("", 17),)) -> onnx.ModelProto:
    graph = oh.make_graph(nodes, "g", inputs, outputs, list(inits))
    opset_ids = [oh.make_opsetid(domain, version) for domain, version in opsets]
    return oh.make_model(graph, opset_imports=opset_ids, ir_version=8)


X16 = np.float16([[0.5, -1.0, 2.0, -3.0]])
VI = oh.make_tensor_value_info


def test_a_contrib_op_whose_output_onnx_cannot_type_is_cast_around():
    """onnx's inference types nothing after a com.microsoft op: its output is taken to be its
    float16 input's type, and the widened Add reads it through a Cast."""
    proto = _model(
        [
            oh.make_node("Gelu", ["x"], ["g"], domain="com.microsoft"),
            oh.make_node("Add", ["g", "w"], ["y"]),
        ],
        [VI("x", H, [1, 4])],
        [VI("y", H, [1, 4])],
        [onnx.numpy_helper.from_array(np.float16([1, 2, 3, 4]), "w")],
        (("", 17), ("com.microsoft", 1)),
    )
    widened = _same_as_original(proto, {"x": X16})
    assert [n.op_type for n in widened.graph.node] == ["Gelu", "Cast", "Add", "Cast"]


def test_duplicate_outputs_and_a_weight_that_is_an_output_keep_their_names():
    proto = _model(
        [oh.make_node("Add", ["x", "w"], ["s"]), oh.make_node("Relu", ["s"], ["y"])],
        [VI("x", H, [1, 4])],
        [VI("y", H, [1, 4]), VI("y", H, [1, 4]), VI("w", H, [4])],
        [onnx.numpy_helper.from_array(np.float16([1, 2, 3, 4]), "w")],
    )
    widened = _same_as_original(proto, {"x": X16})
    assert widened.graph.initializer[0].data_type == H  # an output: stays as stored


def test_a_loop_carries_its_half_value_in_float32():
    body = oh.make_graph(
        [
            oh.make_node("Identity", ["cond"], ["cond_out"]),
            oh.make_node("Mul", ["carried", "w"], ["carried_out"]),
        ],
        "body",
        [
            VI("i", onnx.TensorProto.INT64, []),
            VI("cond", onnx.TensorProto.BOOL, []),
            VI("carried", H, [1, 4]),
        ],
        [VI("cond_out", onnx.TensorProto.BOOL, []), VI("carried_out", H, [1, 4])],
    )
    proto = _model(
        [oh.make_node("Loop", ["n", "", "x"], ["y"], body=body)],
        [VI("x", H, [1, 4]), VI("n", onnx.TensorProto.INT64, [])],
        [VI("y", H, [1, 4])],
        [onnx.numpy_helper.from_array(np.float16([1.5, 0.5, -1.0, 2.0]), "w")],
    )
    widened = _same_as_original(proto, {"x": X16, "n": np.array(3, np.int64)})
    loop = next(n for n in widened.graph.node if n.op_type == "Loop")
    body = onnx.helper.get_attribute_value(loop.attribute[0])
    assert body.input[2].type.tensor_type.elem_type == F
    assert body.output[1].type.tensor_type.elem_type == F


def test_a_model_whose_types_around_a_contrib_op_are_unknown_is_left_as_it_is(caplog):
    """An op outside onnx's schemas reading no float: its output's type cannot be guessed,
    so whether a Cast belongs after it cannot be told; the pass changes nothing and says so."""
    proto = _model(
        [
            oh.make_node("Lookup", ["ids"], ["e"], domain="com.microsoft"),
            oh.make_node("Add", ["e", "w"], ["y"]),
        ],
        [VI("ids", onnx.TensorProto.INT64, [1, 4])],
        [VI("y", H, [1, 4])],
        [onnx.numpy_helper.from_array(np.float16([1, 2, 3, 4]), "w")],
        (("", 17), ("com.microsoft", 1)),
    )
    original = proto.SerializeToString()
    with caplog.at_level(logging.WARNING, logger="onnx_shrink"):
        result = Float32Pass()(io.load(proto))
    assert not result.modified
    assert "the types around 'e' (Lookup) are not known" in caplog.text
    assert io.serialize_proto(result.model).graph == onnx.load_from_string(original).graph


def test_an_output_a_kept_node_also_reads_keeps_its_name():
    """The half reader's Cast came first; the output's Cast took it and not the name."""
    model = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 17, "com.microsoft" : 1]>
        g (float16[2, 4] x) => (float16[2, 4] y, float16[2, 4] z) {
          y = Relu (x)
          z = com.microsoft.Gelu (y)
        }
    """)
    result = shrink(model, "fp32", check=False)
    assert [v.name for v in result.model.graph.outputs] == ["y", "z"]
    x = np.linspace(-2, 2, 8, dtype=np.float16).reshape(2, 4)
    got = run_ort(io.to_bytes(result.model), {"x": x})
    expected = run_ort(model.SerializeToString(), {"x": x})
    for a, b in zip(got, expected, strict=True):
        assert a.dtype == b.dtype == np.float16
        np.testing.assert_allclose(a, b, atol=2e-3)
