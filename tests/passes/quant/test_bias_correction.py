"""Empirical bias correction (``quant.bias_correction``): the second look at the data."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh
import onnx_ir as ir
import pytest

import onnx_shrink
from onnx_shrink.compiler import io
from onnx_shrink.compiler.data_aware import Look
from onnx_shrink.compiler.statistics import ChannelAccumulator
from onnx_shrink.errors import ShrinkError
from onnx_shrink.passes.quant.static import QuantPass
from onnx_shrink.runtime_check import collect, data, sample_batches
from tests.helpers import make_model, run_ort

F = onnx.TensorProto.FLOAT


def _two_convs() -> onnx.ModelProto:
    """Conv -> Relu -> Conv, with biases: the second Conv reads a quantized activation."""
    rng = np.random.default_rng(3)
    return make_model(
        [
            oh.make_node("Conv", ["x", "w1", "b1"], ["c"], pads=[1, 1, 1, 1]),
            oh.make_node("Relu", ["c"], ["r"]),
            oh.make_node("Conv", ["r", "w2", "b2"], ["y"], pads=[1, 1, 1, 1]),
        ],
        [oh.make_tensor_value_info("x", F, ["N", 4, 10, 10])],
        [oh.make_tensor_value_info("y", F, ["N", 6, 10, 10])],
        {
            "w1": rng.standard_normal((8, 4, 3, 3)).astype(np.float32) * 0.4,
            "b1": rng.standard_normal(8).astype(np.float32) * 0.1,
            "w2": rng.standard_normal((6, 8, 3, 3)).astype(np.float32) * 0.4,
            "b2": rng.standard_normal(6).astype(np.float32) * 0.1,
        },
    )


def _clustered_inputs(samples: int) -> np.ndarray:
    """Values clustered a third of the way between grid steps: rounding them is biased."""
    rng = np.random.default_rng(11)
    x = rng.choice([0.37, 1.53, -0.81], size=(samples, 4, 10, 10)).astype(np.float32)
    x[:, :, 0, 0] = np.array([-3.0, 3.0, -3.0, 3.0], np.float32)  # fixes a coarse range
    return x + rng.normal(0, 0.005, x.shape).astype(np.float32)


def _quantized(proto, calib, **options) -> tuple[ir.Model, bytes]:
    result = onnx_shrink.shrink(proto, passes=[QuantPass(**options)], data=calib, check=False)
    return result.model, io.to_bytes(result.model)


def _mean_drift(model_bytes: bytes, proto, x: np.ndarray) -> np.ndarray:
    """Per output channel, the mean of quantized minus float output over ``x``."""
    got = run_ort(model_bytes, {"x": x})[0]
    reference = run_ort(proto.SerializeToString(), {"x": x})[0]
    return (got - reference).mean(axis=(0, 2, 3))


def test_the_correction_takes_the_mean_drift_out_and_changes_only_biases(tmp_path):
    proto = _two_convs()
    x = _clustered_inputs(24)
    np.savez(tmp_path / "calib.npz", x=x)
    plain, plain_bytes = _quantized(proto, tmp_path / "calib.npz", calibration="minmax")
    fixed, fixed_bytes = _quantized(
        proto, tmp_path / "calib.npz", calibration="minmax", bias_correction=True
    )
    # The same graph, nothing of the measurement left: only int32 bias values differ.
    assert [(n.op_type, n.name) for n in plain.graph] == [(n.op_type, n.name) for n in fixed.graph]
    assert set(plain.graph.initializers) == set(fixed.graph.initializers)
    changed = {
        name
        for name, value in fixed.graph.initializers.items()
        if not np.array_equal(
            value.const_value.numpy(), plain.graph.initializers[name].const_value.numpy()
        )
    }
    assert changed and all(
        fixed.graph.initializers[name].const_value.dtype == ir.DataType.INT32 for name in changed
    )
    held_out = _clustered_inputs(40)[24:]
    before = np.abs(_mean_drift(plain_bytes, proto, held_out))
    after = np.abs(_mean_drift(fixed_bytes, proto, held_out))
    assert before.max() > 0.01  # the data makes a drift worth correcting
    assert after.max() < 0.35 * before.max()
    assert after.mean() < 0.35 * before.mean()


@pytest.mark.parametrize(
    "options",
    [{}, {"per_channel": False}, {"activation_type": "s8"}],
    ids=["per-channel", "per-tensor", "s8"],
)
def test_on_a_pointwise_grouped_conv_the_drift_left_is_under_half_a_bias_step(tmp_path, options):
    """For a 1x1 Conv the drift estimate is exact: over the calibration data the corrected
    model's mean output per channel misses the float one's by the bias's rounding alone."""
    rng = np.random.default_rng(5)
    proto = make_model(
        [oh.make_node("Conv", ["x", "w", "b"], ["y"], group=2)],
        [oh.make_tensor_value_info("x", F, ["N", 4, 10, 10])],
        [oh.make_tensor_value_info("y", F, ["N", 6, 10, 10])],
        {
            "w": rng.standard_normal((6, 2, 1, 1)).astype(np.float32),
            "b": rng.standard_normal(6).astype(np.float32) * 0.1,
        },
    )
    x = _clustered_inputs(16)
    np.savez(tmp_path / "calib.npz", x=x)
    calib = tmp_path / "calib.npz"
    plain, _ = _quantized(proto, calib, calibration="minmax", **options)
    fixed, _ = _quantized(proto, calib, calibration="minmax", bias_correction=True, **options)
    conv = next(n for n in fixed.graph if n.op_type == "Conv")
    step = conv.inputs[2].producer().inputs[1].const_value.numpy().astype(np.float64)
    # The Conv's own output, before the Q/DQ of the model's output rounds it again.
    before, after = (
        np.abs(_mean_drift(_with_output(model, conv.outputs[0].name), proto, x))
        for model in (plain, fixed)
    )
    assert before.max() > 10 * step.max()  # rounding the clustered input drifts it
    assert np.all(after <= 0.5 * step * 1.001 + 1e-6)


def _with_output(model: ir.Model, name: str) -> bytes:
    """``model`` serialized with ``name`` as its first output (a tensor of its main graph)."""
    proto = ir.to_proto(model)
    proto.graph.output.insert(0, onnx.helper.make_empty_tensor_value_info(name))
    return proto.SerializeToString()


def _measured(proto, calib, corrected: bool):
    """(the model, a minmax quant pass with or without bias correction, its statistics)."""
    model = io.load(proto)
    quant = QuantPass(calibration="minmax", bias_correction=corrected)
    dataset = data.prepare(data.specs_from_model(model), calib)
    return model, quant, collect.collect(model, quant.requests(model), dataset)


def test_without_a_collector_the_pass_finishes_as_if_uncorrected(tmp_path):
    """``bind(stats)`` alone has no second look: the model is the uncorrected one."""
    proto = _two_convs()
    np.savez(tmp_path / "calib.npz", x=_clustered_inputs(8))
    results = []
    for corrected in (False, True):
        model, quant, stats = _measured(proto, tmp_path / "calib.npz", corrected)
        quant.bind(stats)(model)
        results.append(io.to_bytes(model))
    assert results[0] == results[1]


def test_the_drift_can_be_measured_on_the_first_samples_only(tmp_path):
    proto = _two_convs()
    x = _clustered_inputs(24)
    np.savez(tmp_path / "calib.npz", x=x)
    seen = []

    def counting(model, requests, look=None):
        look = look or Look()
        dataset = data.prepare(data.specs_from_model(model), tmp_path / "calib.npz")
        if look.samples:
            specs = data.specs_from_model(model)
            dataset = sample_batches.first_samples(dataset, specs, look.samples)
        stats = collect.collect(model, requests, dataset)
        seen.append((stats.samples, look.run_samples, look.purpose))
        return stats

    model = io.load(proto)
    quant = QuantPass(calibration="minmax", bias_correction=True, bias_correction_samples=5)
    quant.bind(counting(model, quant.requests(model)), counting)(model)
    # The float model runs a sample at a time for the means, and progress says what for.
    assert seen == [(24, 0, ""), (5, 1, "bias correction")]


@pytest.mark.parametrize("kind", ["channel_sum", "channel_sqnorm", "channel_absmax"])
def test_channel_accumulators_fold_batches_like_one(kind):
    x = np.random.default_rng(0).standard_normal((6, 3, 4)).astype(np.float32)
    whole, parts = ChannelAccumulator(kind, 1), ChannelAccumulator(kind, 1)
    whole.add(x)
    for i in range(0, 6, 4):
        parts.add(x[i : i + 4])
    flat = np.moveaxis(x.astype(np.float64), 1, -1).reshape(-1, 3)
    expected = {
        "channel_sum": flat.sum(0),
        "channel_sqnorm": (flat**2).sum(0),
        "channel_absmax": np.abs(flat).max(0),
    }[kind]
    np.testing.assert_allclose(whole.result().values, expected, rtol=1e-12)
    np.testing.assert_allclose(parts.result().values, expected, rtol=1e-12)
    assert whole.result().rows == parts.result().rows == 24


def test_a_failed_second_look_leaves_the_uncorrected_result_and_warns(tmp_path, caplog):
    proto = _two_convs()
    np.savez(tmp_path / "calib.npz", x=_clustered_inputs(8))
    results = []
    for corrected in (False, True):
        model, quant, stats = _measured(proto, tmp_path / "calib.npz", corrected)

        def failing(model, requests, look=None):
            raise ShrinkError("onnxruntime could not run the measurement model")

        quant.bind(stats, failing)(model)
        results.append(io.to_bytes(model))
    assert results[0] == results[1]
    assert "second look at the data failed" in caplog.text


def test_progress_names_the_second_look_and_counts_its_samples_out_of_its_total(tmp_path):
    np.savez(tmp_path / "calib.npz", x=_clustered_inputs(8))
    reports = []
    onnx_shrink.shrink(
        _two_convs(),
        passes=[QuantPass(calibration="minmax", bias_correction=True, bias_correction_samples=3)],
        data=tmp_path / "calib.npz",
        check=False,
        on_calibration=lambda phase, done, total: reports.append((phase, done, total)),
    )
    last = {phase: (done, total) for phase, done, total in reports}
    assert last == {"statistics": (8, 8), "bias correction: statistics": (3, 3)}


def test_a_model_without_conv_is_told_bias_correction_has_nothing_to_correct(caplog):
    import logging

    import onnx_shrink
    from models.builders import build_mlp

    proto = build_mlp()
    feeds = {"x": np.random.default_rng(0).standard_normal((16, 64)).astype(np.float32)}
    with caplog.at_level(logging.WARNING):
        onnx_shrink.shrink(
            proto, "quant", sets=["quant.bias_correction=true"], data=feeds, check=False
        )
    assert "bias_correction found no quantized Conv to correct" in caplog.text
