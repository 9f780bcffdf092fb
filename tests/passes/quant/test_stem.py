"""Placement rule 10 (``stem``): the narrow Convs between an image model's input and its first
wide Conv stay float, unless asked; what is not a stem (a first Conv that keeps the input's
size, a narrow Conv after a wide one or after a MatMul, a Conv that also reads a wide path)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh
import pytest

from onnx_shrink.compiler import io
from onnx_shrink.passes.quant import stem
from tests.helpers import cosine, make_model, optimized_ops, run_ort
from tests.passes.quant.test_static_placement import _quantize

F = onnx.TensorProto.FLOAT
STEM = ("first", "depthwise", "pointwise")  # K = 27, 9 and 8 multiply-adds per output


def _backbone(first_stride: int = 2) -> onnx.ModelProto:
    """x [N, 3, 32, 32] -> a stem (3x3 Conv 3->8 of ``first_stride`` and its HardSwish, a
    depthwise 3x3 Conv, a 1x1 Conv 8->16) -> a wide 3x3 Conv 16->32 (K 144) -> a narrow
    depthwise one (K 9) -> pooled -> Gemm to 10 scores."""
    rng = np.random.default_rng(0)

    def weight(*shape):
        return (rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))).astype(np.float32)

    strides = [first_stride] * 2
    nodes = [
        oh.make_node("Conv", ["x", "w0"], ["a0"], "first", pads=[1] * 4, strides=strides),
        oh.make_node("HardSwish", ["a0"], ["h0"]),
        oh.make_node("Conv", ["h0", "w1"], ["a1"], "depthwise", pads=[1] * 4, group=8),
        oh.make_node("Relu", ["a1"], ["r1"]),
        oh.make_node("Conv", ["r1", "w2"], ["a2"], "pointwise"),
        oh.make_node("Relu", ["a2"], ["r2"]),
        oh.make_node("Conv", ["r2", "w3"], ["a3"], "wide", pads=[1] * 4),
        oh.make_node("Relu", ["a3"], ["r3"]),
        oh.make_node("Conv", ["r3", "w4"], ["a4"], "deep_depthwise", pads=[1] * 4, group=32),
        oh.make_node("Relu", ["a4"], ["r4"]),
        oh.make_node("GlobalAveragePool", ["r4"], ["p"]),
        oh.make_node("Flatten", ["p"], ["f"]),
        oh.make_node("Gemm", ["f", "w5"], ["y"], "head", transB=1),
    ]
    inits = {
        "w0": weight(8, 3, 3, 3),
        "w1": weight(8, 1, 3, 3),
        "w2": weight(16, 8, 1, 1),
        "w3": weight(32, 16, 3, 3),
        "w4": weight(32, 1, 3, 3),
        "w5": weight(10, 32),
    }
    return make_model(
        nodes,
        [oh.make_tensor_value_info("x", F, ["N", 3, 32, 32])],
        [oh.make_tensor_value_info("y", F, ["N", 10])],
        inits,
    )


def _stem_of(proto: onnx.ModelProto) -> set[str]:
    model = io.load(proto)
    return {node.name for node in model.graph if stem.in_stem(node)}


def test_the_narrow_convs_from_a_downsampled_input_are_the_stem():
    proto = _backbone()
    assert _stem_of(proto) == set(STEM)  # not the wide Conv, nor the narrow one after it


def test_a_first_conv_that_keeps_the_input_size_makes_no_stem():
    # The 8x8 digits: a stride-1 first Conv kept float ran slower than quantized.
    proto = _backbone(first_stride=1)
    assert _stem_of(proto) == set()


@pytest.mark.parametrize("wide_op", ["Conv", "MatMul"])
def test_a_narrow_conv_reading_a_weighted_layer_is_not_the_stem(wide_op):
    # A narrow Conv beside the (pooled) input, but also reading a wide layer's output through
    # an Add. The wide Conv (5x5 over 3 channels: K = 75) downsamples as a stem's first would:
    # only its width keeps it, and the narrow Conv after it, out of the stem.
    wide = (
        oh.make_node("Conv", ["x", "w_wide"], ["b"], pads=[2] * 4, strides=[2, 2])
        if wide_op == "Conv"
        else oh.make_node("MatMul", ["p", "w_wide"], ["b"])
    )
    w_wide = np.ones((3, 3, 5, 5) if wide_op == "Conv" else (8, 8), np.float32)
    proto = make_model(
        [
            oh.make_node("MaxPool", ["x"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
            wide,
            oh.make_node("Add", ["p", "b"], ["s"]),
            oh.make_node("Conv", ["s", "w"], ["y"], "narrow", strides=[2, 2]),
        ],
        [oh.make_tensor_value_info("x", F, [1, 3, 16, 16])],
        [oh.make_tensor_value_info("y", F, [1, 8, 4, 4])],
        {"w_wide": w_wide, "w": np.ones((8, 3, 1, 1), np.float32)},
    )
    assert _stem_of(proto) == set()


def test_quant_keeps_the_stem_float_and_quantizes_it_when_asked(tmp_path):
    proto = _backbone()
    x = np.random.default_rng(1).standard_normal((16, 3, 32, 32)).astype(np.float32)
    reference = run_ort(proto.SerializeToString(), {"x": x})[0]

    def quantized(float_stem: bool):
        """The Convs reading a DequantizeLinear, onnxruntime's ops, and the scores."""
        folder = tmp_path / str(float_stem)
        folder.mkdir()
        path, model = _quantize(proto, {"x": x}, folder, float_stem=float_stem)
        quantized_inputs = {
            node.name
            for node in model.graph
            if node.op_type == "Conv"
            and getattr(node.inputs[0].producer(), "op_type", None) == "DequantizeLinear"
        }
        return quantized_inputs, optimized_ops(path), run_ort(path, {"x": x})[0]

    kept, ops, kept_out = quantized(float_stem=True)
    assert kept == {"wide", "deep_depthwise"}
    assert ops["QLinearConv"] == 2 and ops["QuantizeLinear"] == 1, ops  # after the stem
    asked, ops, asked_out = quantized(float_stem=False)
    assert asked == {*STEM, "wide", "deep_depthwise"}
    assert ops["QLinearConv"] == 5, ops
    # Both are the float model's scores within int8's rounding.
    assert cosine(kept_out, reference) > 0.99
    assert cosine(asked_out, reference) > 0.99


def _stem_beside_a_pool() -> onnx.ModelProto:
    """PP-OCRv6's tiny detector in small: a narrow downsampling Conv whose Relu feeds a wide
    Conv and a MaxPool, concatenated after."""
    rng = np.random.default_rng(21)

    def weight(*shape):
        return (rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))).astype(np.float32)

    nodes = [
        oh.make_node("Conv", ["x", "w0"], ["a0"], "first", pads=[1] * 4, strides=[2, 2]),
        oh.make_node("Relu", ["a0"], ["r0"], "first_relu"),
        oh.make_node("Conv", ["r0", "w1"], ["a1"], "wide", pads=[1] * 4),
        oh.make_node("Relu", ["a1"], ["r1"]),
        oh.make_node("MaxPool", ["r0"], ["m"], "pool", kernel_shape=[2, 2], auto_pad="SAME_UPPER"),
        oh.make_node("Concat", ["m", "r1"], ["c"], axis=1),
        oh.make_node("Conv", ["c", "w2"], ["y"], "after", pads=[1] * 4),
    ]
    return make_model(
        nodes,
        [oh.make_tensor_value_info("x", F, ["N", 3, 32, 32])],
        [oh.make_tensor_value_info("y", F, ["N", 16, 16, 16])],
        {"w0": weight(8, 3, 3, 3), "w1": weight(16, 8, 3, 3), "w2": weight(16, 24, 3, 3)},
    )


def test_a_narrow_conv_whose_output_a_pool_also_reads_is_not_the_stem():
    # Kept float, its MaxPool and Concat ran float at its resolution and were quantized
    # again after: PP-OCRv6's detector ran 0.91x the float model's latency, 0.82x with the
    # Conv quantized.
    assert _stem_of(_stem_beside_a_pool()) == set()


def test_a_float_maxpool_after_a_float_relu_reads_the_float_tensor(tmp_path):
    # The first Conv float (as PP-OCRv6's detector's stem was): its Relu feeds a quantized
    # Conv and a MaxPool whose Concat stays float. The MaxPool read the Relu's DQ, and
    # onnxruntime moved the DQ past it: its uint8 MaxPool took 17 times the float one's time.
    proto = _stem_beside_a_pool()
    x = np.random.default_rng(22).standard_normal((16, 3, 32, 32)).astype(np.float32)
    path, model = _quantize(proto, {"x": x}, tmp_path, exclude=("first",))
    pool = next(node for node in model.graph if node.op_type == "MaxPool")
    assert pool.inputs[0].producer().name == "first_relu"
    assert "QLinearConcat" not in optimized_ops(path)  # the MaxPool stays float
    reference = run_ort(proto.SerializeToString(), {"x": x})[0]
    assert cosine(run_ort(path, {"x": x})[0], reference) > 0.99
