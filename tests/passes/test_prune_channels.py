"""prune-channels: each grouping rule against a model built directly at the pruned size."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_shrink.compiler import io
from onnx_shrink.compiler.statistics import ChannelValues, Statistics, StatRequest
from onnx_shrink.passes import channel_refit
from onnx_shrink.passes.group_growth import analyse
from onnx_shrink.passes.prune_channels import PruneChannelsPass
from tests.helpers import run_ort

RNG = np.random.default_rng(0)


def _w(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def _model(nodes, weights: dict[str, np.ndarray], x: list, rank: int = 4) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None] * rank)],
        [numpy_helper.from_array(v, k) for k, v in weights.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _prune(proto: onnx.ModelProto, **options) -> bytes:
    model = io.load(proto)
    result = PruneChannelsPass(ratio=0.5, round_to=1, **options)(model)
    assert result.modified
    return io.to_bytes(result.model)


def _keep(scores: np.ndarray) -> np.ndarray:
    return np.sort(np.argsort(scores, kind="stable")[len(scores) // 2 :])


def _rows(w: np.ndarray, axis: int = 0) -> np.ndarray:
    """Squared L2 norm of each slice of ``w`` along ``axis``."""
    return (np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1).astype(np.float64) ** 2).sum(1)


def _assert_same(pruned: bytes, direct: onnx.ModelProto, feed: dict[str, np.ndarray]) -> None:
    got, want = run_ort(pruned, feed)[0], run_ort(direct.SerializeToString(), feed)[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def _conv(x: str, w: str, y: str, b: str | None = None, **attrs) -> onnx.NodeProto:
    return helper.make_node("Conv", [x, w] + ([b] if b else []), [y], name=f"conv_{y}", **attrs)


def residual(w: dict[str, np.ndarray]) -> onnx.ModelProto:
    nodes = [
        _conv("x", "w1", "c1", "b1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["a"]),
        _conv("a", "w2", "c2"),
        helper.make_node("Add", ["c2", "a"], ["s"]),
        helper.make_node("Mul", ["s", "scale"], ["m"]),
        helper.make_node("Relu", ["m"], ["r"]),
        _conv("r", "w3", "y"),
    ]
    return _model(nodes, w, [2, 4, 6, 6])


def _residual_weights(draw=_w) -> dict[str, np.ndarray]:
    w = {"w1": draw(8, 4, 3, 3), "b1": draw(8), "w2": draw(8, 8, 1, 1), "w3": draw(2, 8, 1, 1)}
    w["scale"] = draw(1, 8, 1, 1)
    return w


def _residual_pruned_by_hand(w: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``residual``'s weights with half of the group's channels cut, by hand."""
    keep = _keep(np.sqrt(_rows(w["w1"]) + _rows(w["w2"])))
    return {
        "w1": w["w1"][keep],
        "b1": w["b1"][keep],
        "w2": w["w2"][keep][:, keep],
        "w3": w["w3"][:, keep],
        "scale": w["scale"][:, keep],
    }


def test_residual_add_prunes_both_branches_as_one_group():
    w = _residual_weights()
    feed = {"x": _w(2, 4, 6, 6)}
    _assert_same(_prune(residual(w)), residual(_residual_pruned_by_hand(w)), feed)


def test_weights_stored_as_constant_nodes_are_pruned_without_fold():
    """A Paddle PicoDet's 102 Conv weights came from Constant nodes: without fold first,
    prune-channels said there was no Conv "with a constant weight" and pruned nothing."""
    rng = np.random.default_rng(7)  # its own: the module's draws serve the tests after

    def draw(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float32)

    w = _residual_weights(draw)
    proto = residual(w)
    held = {"w1", "w2", "w3"}
    constants = [
        helper.make_node("Constant", [], [t.name], value=t)
        for t in proto.graph.initializer
        if t.name in held
    ]
    kept = [t for t in proto.graph.initializer if t.name not in held]
    nodes = constants + list(proto.graph.node)
    del proto.graph.initializer[:], proto.graph.node[:]
    proto.graph.initializer.extend(kept)
    proto.graph.node.extend(nodes)
    direct = residual(_residual_pruned_by_hand(w))
    _assert_same(_prune(proto), direct, {"x": draw(2, 4, 6, 6)})


def concat(w: dict[str, np.ndarray]) -> onnx.ModelProto:
    nodes = [
        _conv("x", "wa", "a"),
        _conv("x", "wb", "b"),
        helper.make_node("Concat", ["a", "b"], ["c"], axis=1),
        helper.make_node("Sigmoid", ["c"], ["s"]),
        _conv("s", "wc", "y"),
    ]
    return _model(nodes, w, [1, 3, 5, 5])


def test_concat_prunes_each_input_at_its_offset():
    w = {"wa": _w(4, 3, 1, 1), "wb": _w(6, 3, 1, 1), "wc": _w(2, 10, 1, 1)}
    ka, kb = _keep(_rows(w["wa"])), _keep(_rows(w["wb"]))
    direct = {"wa": w["wa"][ka], "wb": w["wb"][kb], "wc": w["wc"][:, np.r_[ka, 4 + kb]]}
    _assert_same(_prune(concat(w)), concat(direct), {"x": _w(1, 3, 5, 5)})


def depthwise(w: dict[str, np.ndarray]) -> onnx.ModelProto:
    channels = w["w1"].shape[0]
    bn = ["bn_s", "bn_b", "bn_m", "bn_v"]
    nodes = [
        _conv("x", "w1", "c1"),
        helper.make_node("BatchNormalization", ["c1", *bn], ["n"]),
        helper.make_node("Clip", ["n", "lo", "hi"], ["r"]),
        _conv("r", "wd", "d", "bd", group=channels, pads=[1, 1, 1, 1]),
        helper.make_node("GlobalAveragePool", ["d"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "wg", "bg"], ["y"], transB=1),
    ]
    return _model(nodes, w, [2, 4, 7, 7], rank=2)


def test_depthwise_conv_and_batchnorm_follow_the_producer():
    w = {"w1": _w(8, 4, 1, 1), "bn_s": _w(8), "bn_b": _w(8), "bn_m": _w(8)}
    w |= {"bn_v": np.abs(_w(8)) + 0.5, "wd": _w(8, 1, 3, 3), "bd": _w(8)}
    w |= {"wg": _w(3, 8), "bg": _w(3), "lo": np.float32(0), "hi": np.float32(6)}
    keep = _keep(_rows(w["w1"]))
    direct = {k: (v[keep] if v.ndim and v.shape[0] == 8 else v) for k, v in w.items()}
    direct["wg"] = w["wg"][:, keep]
    _assert_same(_prune(depthwise(w)), depthwise(direct), {"x": _w(2, 4, 7, 7)})


def attention(w: dict[str, np.ndarray], heads: int, head_dim: int = 4) -> onnx.ModelProto:
    w = w | {
        "split": np.array([0, 0, heads, head_dim], np.int64),
        "merge": np.array([0, 0, heads * head_dim], np.int64),
        "scale": np.array(np.sqrt(head_dim), np.float32),
    }
    nodes = []
    for name, perm in (("q", [0, 2, 1, 3]), ("k", [0, 2, 3, 1]), ("v", [0, 2, 1, 3])):
        nodes += [
            helper.make_node("MatMul", ["x", f"w{name}"], [f"{name}0"]),
            helper.make_node("Add", [f"{name}0", f"b{name}"], [f"{name}1"]),
            helper.make_node("Reshape", [f"{name}1", "split"], [f"{name}2"]),
            helper.make_node("Transpose", [f"{name}2"], [name], perm=perm),
        ]
    nodes += [
        helper.make_node("MatMul", ["q", "k"], ["qk"]),
        helper.make_node("Div", ["qk", "scale"], ["qs"]),
        helper.make_node("Softmax", ["qs"], ["p"], axis=-1),
        helper.make_node("MatMul", ["p", "v"], ["ctx"]),
        helper.make_node("Transpose", ["ctx"], ["ct"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["ct", "merge"], ["cm"]),
        helper.make_node("MatMul", ["cm", "wo"], ["y"]),
    ]
    return _model(nodes, w, ["batch", "seq", 16], rank=3)


def test_attention_prunes_whole_heads_through_reshape_and_transpose():
    w = {f"w{n}": _w(16, 16) for n in "qkvo"} | {f"b{n}": _w(16) for n in "qkv"}
    per_head = sum(_rows(w[f"w{n}"], 1) for n in "qkv").reshape(4, 4).sum(1)
    heads = _keep(np.sqrt(per_head))
    cols = (heads[:, None] * 4 + np.arange(4)).ravel()
    direct = {k: (v[..., cols] if k != "wo" else v[cols]) for k, v in w.items()}
    feed = {"x": _w(2, 5, 16)}
    _assert_same(_prune(attention(w, 4)), attention(direct, 2), feed)


def test_heads_off_declines_the_attention_group():
    w = {f"w{n}": _w(16, 16) for n in "qkvo"} | {f"b{n}": _w(16) for n in "qkv"}
    groups = analyse(io.load(attention(w, 4)), heads=False)
    assert [g.reason for g in groups if "heads" in (g.reason or "")]
    assert all(g.reason for g in groups)


def test_group_reaching_a_graph_output_or_shape_is_declined():
    w = {"w1": _w(8, 4, 1, 1), "w2": _w(8, 8, 1, 1)}
    nodes = [
        _conv("x", "w1", "a"),
        helper.make_node("Shape", ["a"], ["shape"]),
        _conv("a", "w2", "y"),
    ]
    proto = _model(nodes, w, [1, 4, 3, 3])
    proto.graph.output[0].CopyFrom(helper.make_tensor_value_info("y", 1, [1, 8, 3, 3]))
    proto.graph.output.append(helper.make_tensor_value_info("shape", TensorProto.INT64, [4]))
    reasons = sorted(g.reason or "" for g in analyse(io.load(proto)))
    assert "Shape consumer (<unnamed Shape>)" in reasons[0] and "graph output" in reasons[1]
    result = PruneChannelsPass(ratio=0.5, round_to=1)(io.load(proto))
    assert not result.modified


def test_weights_whose_output_shape_is_unknown_are_declined_as_such(caplog):
    """skl2onnx's MLP (surfaces-onnx-files' regressor) scales its input with ai.onnx.ml's
    Scaler, which shape inference does not see through: its three MatMuls were said to be
    "no Conv/ConvTranspose/Gemm/MatMul with a constant weight"."""
    nodes = [
        helper.make_node("Scaler", ["x"], ["s"], domain="ai.onnx.ml", offset=[0.0] * 4),
        helper.make_node("MatMul", ["s", "w1"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("MatMul", ["r", "w2"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 1])],
        initializer=[
            numpy_helper.from_array(_w(4, 64), "w1"),
            numpy_helper.from_array(_w(64, 1), "w2"),
        ],
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 3)]
    proto = helper.make_model(graph, opset_imports=opsets, ir_version=8)
    with caplog.at_level(logging.WARNING):
        result = PruneChannelsPass(ratio=0.5, round_to=1)(io.load(proto))
    assert not result.modified
    assert "(channel count unknown, no static shape inferred for the output: 1; " in caplog.text


def test_round_to_keeps_a_multiple_of_sixteen_channels():
    w = {"w1": _w(32, 4, 1, 1), "w2": _w(2, 32, 1, 1)}
    proto = _model([_conv("x", "w1", "a"), _conv("a", "w2", "y")], w, [1, 4, 3, 3])
    model = PruneChannelsPass(ratio=0.3)(io.load(proto)).model
    assert model.graph.initializers["w1"].const_value.shape[0] == 16  # 22.4 -> 16


def test_activation_criterion_keeps_the_loudest_channels():
    w = {"w1": _w(8, 4, 1, 1), "w2": _w(2, 8, 1, 1)}
    proto = _model([_conv("x", "w1", "a"), _conv("a", "w2", "y")], w, [1, 4, 3, 3])
    pass_ = PruneChannelsPass(ratio=0.5, round_to=1, criterion="activation", reconstruct="off")
    model = io.load(proto)
    (request,) = pass_.requests(model)
    assert request == StatRequest("a", "channel_sqnorm", axis=1)
    loud = np.array([0, 9, 1, 8, 2, 7, 3, 6], np.float64)
    stats = Statistics({request: ChannelValues(loud, 10)}, samples=1, source="test")
    result = pass_.bind(stats)(model)
    kept = result.model.graph.initializers["w1"].const_value.numpy()
    np.testing.assert_array_equal(kept, w["w1"][[1, 3, 5, 7]])


@pytest.mark.parametrize("ratio", [0.0, 0.3])
def test_builders_keep_running_after_pruning(ratio):
    from models import builders

    for build in builders.BUILDERS.values():
        model = io.load(build())
        pruned = PruneChannelsPass(ratio=ratio)(model).model
        onnx.checker.check_model(io.serialize_proto(pruned), full_check=True)


def _chain(w: dict[str, np.ndarray], x: list) -> onnx.ModelProto:
    """conv w1 (+b1) -> Relu -> 1x1 conv w2 (+b2): w2 is the consumer of w1's channels."""
    nodes = [
        _conv("x", "w1", "a", "b1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a"], ["r"]),
        _conv("r", "w2", "y", "b2"),
    ]
    return _model(nodes, w, x)


@pytest.mark.parametrize(
    ("channels", "ratio", "round_to", "kept"),
    [
        (32, 0.3, 16, 16),  # 22.4: 16 is nearer than 32
        (32, 0.3, 8, 24),
        (16, 0.3, 16, 8),  # one block: half blocks (11.2 -> 8), not all-or-nothing
        (16, 0.25, 8, 8),  # a tie (12) that would keep every channel goes down
        (48, 0.25, 8, 40),  # a tie that still removes some goes up
        (16, 0.05, 16, 16),  # 15.2 is nearest to all: left alone
        (64, 0.3, 16, 48),
    ],
)
def test_kept_channels_round_to_the_nearest_block(channels, ratio, round_to, kept):
    w = {"w1": _w(channels, 3, 3, 3), "b1": _w(channels), "w2": _w(4, channels, 1, 1)}
    w["b2"] = _w(4)
    model = io.load(_chain(w, [1, 3, 4, 4]))
    pruned = PruneChannelsPass(ratio=ratio, round_to=round_to)(model).model
    assert pruned.graph.initializers["w1"].const_value.shape[0] == kept


def test_rounding_counts_the_producers_channels_not_the_flattened_elements():
    # 32 channels x 4 pixels flattened into a Gemm: the Gemm's unit is 4 elements a channel,
    # but the Conv's channel count must be the multiple of 16 (it was 23 when counted in 4s).
    w = {"w1": _w(32, 2, 1, 1), "wg": _w(3, 128), "bg": _w(3)}
    nodes = [
        _conv("x", "w1", "a"),
        helper.make_node("Flatten", ["a"], ["f"]),
        helper.make_node("Gemm", ["f", "wg", "bg"], ["y"], transB=1),
    ]
    model = io.load(_model(nodes, w, [1, 2, 2, 2], rank=2))
    pruned = PruneChannelsPass(ratio=0.3)(model).model
    assert pruned.graph.initializers["w1"].const_value.shape[0] == 16
    assert pruned.graph.initializers["wg"].const_value.shape == (3, 64)


def _calibrated(proto: onnx.ModelProto, feed: dict[str, np.ndarray], **options):
    """The pruned model (bytes) after ``PruneChannelsPass`` with statistics of ``feed``."""
    from onnx_shrink.runtime_check import collect, data

    model = io.load(proto)
    pass_ = PruneChannelsPass(ratio=0.5, round_to=1, **options)
    dataset = data.from_arrays(feed, data.specs_from_model(model), labels=None, where="test")
    stats = collect.collect(model, pass_.requests(model), dataset)
    return io.to_bytes(pass_.bind(stats)(model).model)


def _error(candidate: bytes, proto: onnx.ModelProto, feed) -> float:
    want = run_ort(proto.SerializeToString(), feed)[0]
    got = run_ort(candidate, feed)[0]
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def test_reconstruction_refits_a_1x1_conv_consumer_and_its_bias():
    # Correlated channels: what the removed ones carried is mostly in the kept ones.
    mix = _w(8, 3) @ _w(3, 3 * 9)
    w = {"w1": mix.reshape(8, 3, 3, 3) + 0.1 * _w(8, 3, 3, 3), "b1": _w(8) + 1.0}
    w |= {"w2": _w(5, 8, 1, 1), "b2": _w(5)}
    proto = _chain(w, [None, 3, 6, 6])
    calibration = {"x": _w(16, 3, 6, 6)}
    held_out = {"x": _w(16, 3, 6, 6)}
    plain = _calibrated(proto, calibration, reconstruct="off")
    refit = _calibrated(proto, calibration, reconstruct="on")
    # The producer is unchanged by the refit; the consumer alone differs.
    kept = _keep(_rows(w["w1"]))
    direct = {**w, "w1": w["w1"][kept], "b1": w["b1"][kept], "w2": w["w2"][:, kept]}
    _assert_same(plain, _chain(direct, [None, 3, 6, 6]), held_out)
    before, after = _error(plain, proto, calibration), _error(refit, proto, calibration)
    assert after < 0.5 * before
    assert _error(refit, proto, held_out) < _error(plain, proto, held_out)


def _matmul_bias_chain() -> tuple[dict[str, np.ndarray], onnx.ModelProto]:
    """x -> MatMul w1 -> Relu -> MatMul w2 -> Add b2: the second MatMul and its bias read
    the channels pruned from the first."""
    w = {"w1": _w(6, 8), "w2": _w(8, 4), "b2": _w(4)}
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("MatMul", ["r", "w2"], ["m"]),
        helper.make_node("Add", ["m", "b2"], ["y"]),
    ]
    return w, _model(nodes, w, ["batch", 6], rank=2)


def test_reconstruction_refits_a_matmul_and_the_bias_added_after_it():
    w, proto = _matmul_bias_chain()
    calibration = {"x": _w(64, 6)}
    plain = _calibrated(proto, calibration, reconstruct="off")
    refit = _calibrated(proto, calibration, reconstruct="on")
    assert _error(refit, proto, calibration) < 0.95 * _error(plain, proto, calibration)
    bias = io.load(onnx.load_from_string(refit)).graph.initializers["b2"].const_value.numpy()
    assert not np.allclose(bias, w["b2"])  # the removed channels' mean moved into the bias


def test_a_refit_from_fewer_rows_than_inputs_is_a_warning(caplog):
    """openWakeWord's timer head refit a 3264-wide Gemm from 48 clips: 94 dB SNR on them, 15
    dB on others, and only the check's general in-sample warning said anything."""
    _, proto = _matmul_bias_chain()
    for samples, warned in ((5, True), (64, False)):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            _calibrated(proto, {"x": _w(samples, 6)}, reconstruct="on")
        assert ("1 refit layer(s) saw fewer calibration rows" in caplog.text) == warned
        assert ("(5 < 8): their refit can follow those samples" in caplog.text) == warned


def test_reconstruction_refits_a_3x3_consumer_from_im2col_patches():
    mix = _w(8, 3) @ _w(3, 3)
    w = {"w1": mix.reshape(8, 3, 1, 1) + 0.1 * _w(8, 3, 1, 1), "b1": _w(8) + 1.0}
    w |= {"w2": _w(5, 8, 3, 3), "b2": _w(5)}
    nodes = [
        _conv("x", "w1", "a", "b1"),
        helper.make_node("Relu", ["a"], ["r"]),
        _conv("r", "w2", "y", "b2", pads=[1, 0, 1, 1], strides=[2, 1]),
    ]
    proto = _model(nodes, w, [None, 3, 7, 6])
    calibration, held_out = {"x": _w(16, 3, 7, 6)}, {"x": _w(16, 3, 7, 6)}
    plain = _calibrated(proto, calibration, reconstruct="off")
    refit = _calibrated(proto, calibration, reconstruct="on")
    assert _error(refit, proto, calibration) < 0.5 * _error(plain, proto, calibration)
    assert _error(refit, proto, held_out) < _error(plain, proto, held_out)


def test_im2col_rows_are_the_patches_conv_multiplies(monkeypatch):
    from onnx_shrink.compiler import statistics

    monkeypatch.setattr(statistics, "_PATCH_ROWS_BYTES", 1)  # one output row per block
    x, w = _w(1, 3, 7, 6), _w(4, 3, 3, 2)  # one sample: blocks come in output-row order
    patch = (3, 2, 2, 1, 1, 2, 1, 0, 2, 1)
    node = helper.make_node(
        "Conv", ["x", "w"], ["y"], strides=[2, 1], dilations=[1, 2], pads=[1, 0, 2, 1]
    )
    (want,) = run_ort(_model([node], {"w": w}, [1, 3, 7, 6]).SerializeToString(), {"x": x})
    rows = np.concatenate(list(statistics.im2col_rows(x, patch)))
    got = (rows @ w.reshape(4, -1).T).reshape(1, *want.shape[2:], 4).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_reconstruction_is_data_aware_only_when_asked():
    w = {"w1": _w(8, 3, 1, 1), "b1": _w(8), "w2": _w(5, 8, 1, 1), "b2": _w(5)}
    model = io.load(_chain(w, [1, 3, 4, 4]))
    assert PruneChannelsPass(ratio=0.5).requests(model) == [StatRequest("r", "gram", axis=1)]
    assert PruneChannelsPass(ratio=0.5, reconstruct="off").requests(model) == []
    assert PruneChannelsPass(ratio=0.5)(model).modified  # auto: called alone, no refit
    with pytest.raises(ir.passes.PreconditionError):
        PruneChannelsPass(ratio=0.5, reconstruct="on")(io.load(_chain(w, [1, 3, 4, 4])))


def test_layers_left_unrefit_are_one_warning_not_only_a_verbose_table(caplog):
    """On silero-vad v6 every layer reading pruned channels was a 1-D Conv: the refit asked
    for did nothing, said only under -v."""
    import logging

    reports = [
        channel_refit.RefitReport("a", 0, 0, None, None, "Conv that is not 2-D"),
        channel_refit.RefitReport("b", 0, 0, None, None, "Conv that is not 2-D"),
        channel_refit.RefitReport("c", 2, 8, 0.1, 0.01),
    ]
    with caplog.at_level(logging.WARNING):
        channel_refit.log_table(reports)
    (record,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "2 of 3 layers" in record.getMessage()
    assert "Conv that is not 2-D: 2" in record.getMessage()


def test_a_pass_that_changes_nothing_says_why(caplog):
    """Not "none at the asked amount: 1" whatever the reason: the warning says whether the
    model has nothing to prune or what in the options keeps every channel."""
    w = {"w1": _w(32, 4, 1, 1), "w2": _w(2, 32, 1, 1)}
    proto = _model([_conv("x", "w1", "a"), _conv("a", "w2", "y")], w, [1, 4, 3, 3])
    cases = [
        (
            proto,
            {"ratio": 0.2},
            "(ratio=0.2 rounds to no channel at round_to=16: 1; y is a graph output: 1;",
        ),
        (
            proto,
            {"min_channels": 32},
            "(no more channels than min_channels=32: 1; y is a graph output: 1;",
        ),
        (
            _model([helper.make_node("MatMul", ["x", "x"], ["y"])], {}, [4, 4], rank=2),
            {},
            "(no Conv/ConvTranspose/Gemm/MatMul with a constant weight)",
        ),
    ]
    for model, options, why in cases:
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            assert not PruneChannelsPass(**options)(io.load(model)).modified
        assert f"prune-channels: no channel group changed {why}" in caplog.text, caplog.text


def test_the_refit_table_says_its_errors_are_each_layers_own(caplog):
    """openWakeWord's embedding CNN: the table's last layer read 1.7e-05 beside a model output
    0.29 off, with nothing to say the figures were per layer or that it fit its few rows."""

    reports = [
        channel_refit.RefitReport("conv_a", 8, 72, 0.2, 0.007, rows=4096),
        channel_refit.RefitReport("conv_b", 32, 288, 0.8, 1.7e-5, rows=192),
    ]
    with caplog.at_level(logging.INFO, logger="onnx_shrink"):
        channel_refit.log_table(reports)
    lines = caplog.text.splitlines()
    (row_a,) = [line for line in lines if line.startswith("conv_a")]
    (row_b,) = [line for line in lines if line.startswith("conv_b")]
    assert "rows" not in row_a.split("->")[1]
    assert row_b.endswith("1.70e-05 (fit to 192 rows, fewer than its inputs)")
    assert "the errors compound through the model" in caplog.text


@pytest.mark.parametrize(
    ("op", "attributes", "reason"),
    [
        ("Conv", {"auto_pad": "SAME_UPPER"}, "Conv with auto_pad=SAME_UPPER (pads set by"),
        ("ConvTranspose", {}, "ConvTranspose is not refit (Conv, Gemm and MatMul are)"),
    ],
)
def test_a_layer_that_cannot_be_refit_says_why(op, attributes, reason):
    """PP-OCRv6's 2x2 SAME_UPPER Convs were 'Conv that is not 2-D'; its ConvTranspose
    'ConvTranspose weight of rank 4'."""
    weight = ir.Value(name="w", const_value=ir.tensor(np.ones((4, 4, 2, 2), np.float32)))
    x = ir.Value(name="x")
    node = ir.Node("", op, [x, weight], [ir.AttrString(k, v) for k, v in attributes.items()])
    assert channel_refit.consumer(node).startswith(reason)


def test_layers_in_if_bodies_are_named_as_out_of_reach(caplog):
    """Silero VAD's 12 Convs sit in its If branches: the reason read as if it had none."""
    w = np.random.default_rng(4).normal(size=(8, 8)).astype(np.float32)

    def body(name: str) -> onnx.GraphProto:
        return helper.make_graph(
            [helper.make_node("MatMul", ["x", f"w_{name}"], [f"y_{name}"], name=f"mm_{name}")],
            name,
            [],
            [helper.make_tensor_value_info(f"y_{name}", TensorProto.FLOAT, [1, 8])],
            [numpy_helper.from_array(w, f"w_{name}")],
        )

    branch = helper.make_node(
        "If", ["cond"], ["y"], then_branch=body("then"), else_branch=body("else")
    )
    graph = helper.make_graph(
        [branch],
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8]),
            helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    with caplog.at_level(logging.WARNING):
        result = PruneChannelsPass(reconstruct="off")(io.load(proto))
    assert not result.modified
    assert (
        "with a constant weight in the main graph; 2 MatMul in If/Loop/Scan bodies, which it "
        "does not reach" in caplog.text
    )
