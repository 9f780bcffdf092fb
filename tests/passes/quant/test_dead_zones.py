"""Dead zones (``quant.dead_zones``): a tensor every reader ignores below a level."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh
import pytest

import onnx_shrink
from onnx_shrink.compiler import io
from onnx_shrink.compiler.statistics import Histogram, MinMax
from onnx_shrink.passes.quant import dead_zones
from onnx_shrink.passes.quant.numerics import QUANT_TYPES, scale_and_zero_point
from onnx_shrink.passes.quant.static import QuantPass
from tests.helpers import make_model, run_ort

F = onnx.TensorProto.FLOAT


def _hard_swish_block(readers=()):
    """Conv -> decomposed hard-swish (x * Clip(x + 3, 0, 6) / 6) -> Conv; ``readers``: more
    nodes reading the first Conv's output ``c``, with their output's shape when it is a graph
    output."""
    rng = np.random.default_rng(5)
    nodes = [
        oh.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
        oh.make_node("Add", ["c", "three"], ["shifted"]),
        oh.make_node("Clip", ["shifted", "zero", "six"], ["gate"]),
        oh.make_node("Mul", ["c", "gate"], ["product"]),
        oh.make_node("Div", ["product", "six"], ["h"]),
        oh.make_node("Conv", ["h", "w2"], ["y"], pads=[1, 1, 1, 1]),
        *(r for r, _ in readers),
    ]
    outputs = [oh.make_tensor_value_info("y", F, ["N", 4, 6, 6])]
    outputs += [oh.make_tensor_value_info(r.output[0], F, shape) for r, shape in readers if shape]
    bias = np.full(8, -6.0, np.float32)  # most of c below -3, a long tail far below
    return make_model(
        nodes,
        [oh.make_tensor_value_info("x", F, ["N", 3, 6, 6])],
        outputs,
        {
            "w": rng.standard_normal((8, 3, 3, 3)).astype(np.float32),
            "b": bias,
            "w2": rng.standard_normal((4, 8, 3, 3)).astype(np.float32) * 0.3,
            "three": np.array(3.0, np.float32),
            "zero": np.array(0.0, np.float32),
            "six": np.array(6.0, np.float32),
        },
        opset=14,
    )


def _zones(proto, tensors):
    model = io.load(proto)
    return dead_zones.zones(model.graph, tensors)


Zone = dead_zones.Zone


def test_a_decomposed_hard_swish_is_flat_below_minus_three():
    assert _zones(_hard_swish_block(), ["c", "h", "x"]) == {"c": Zone(-3.0)}


def test_one_reader_that_is_not_flat_leaves_no_floor():
    exp = oh.make_node("Exp", ["c"], ["e"])
    assert _zones(_hard_swish_block([(exp, ["N", 8, 6, 6])]), ["c"]) == {}


def test_the_lowest_reader_floor_counts_and_shape_ops_pass_through():
    readers = [
        (oh.make_node("Flatten", ["c"], ["flat"]), None),
        (oh.make_node("Relu", ["flat"], ["r"]), ["N", 288]),
        (oh.make_node("Sub", ["c", "three"], ["less"]), None),
        # flat for c - 3 < -3, that is c < 0
        (oh.make_node("HardSwish", ["less"], ["hs"]), ["N", 8, 6, 6]),
    ]
    # Relu through Flatten: 0; HardSwish after - 3: 0; the hard-swish itself: -3.
    assert _zones(_hard_swish_block(readers), ["c"]) == {"c": Zone(-3.0)}


def test_relu_clip_and_hard_sigmoid_levels():
    nodes = [
        oh.make_node("Relu", ["a"], ["r"]),
        oh.make_node("HardSigmoid", ["b"], ["s"], alpha=0.25, beta=0.5),
        oh.make_node("Clip", ["c", "", "six"], ["relu6_top"]),  # max only
        oh.make_node("Add", ["d", "one"], ["d1"]),
        oh.make_node("Clip", ["d1", "zero", "six"], ["relu6"]),
    ]
    proto = make_model(
        nodes,
        [oh.make_tensor_value_info(n, F, [4]) for n in "abcd"],
        [oh.make_tensor_value_info(n, F, [4]) for n in ("r", "s", "relu6_top", "relu6")],
        {n: np.array(v, np.float32) for n, v in (("six", 6.0), ("zero", 0.0), ("one", 1.0))},
    )
    assert _zones(proto, ["a", "b", "c", "d"]) == {
        "a": Zone(0.0),
        "b": Zone(-2.0, 2.0),
        "c": Zone(None, 6.0),
        "d": Zone(-1.0, 5.0),
    }


def test_collapse_moves_the_mass_past_the_levels_onto_them():
    edges = np.linspace(-10.0, 10.0, 21)
    counts = np.arange(20, dtype=np.float64)
    full = MinMax(-10.0, 10.0, 0, 190)
    minmax, histogram, applied = dead_zones.collapse(
        Zone(-3.5, 2.5), full, Histogram(edges, counts)
    )
    assert (minmax.minimum, minmax.maximum) == (-3.5, 2.5) and applied == Zone(-3.5, 2.5)
    np.testing.assert_array_equal(histogram.edges, [-3.5, -3, -2, -1, 0, 1, 2, 2.5])
    assert histogram.counts.sum() == counts.sum()
    assert histogram.counts[0] == counts[:7].sum()  # the bins from -10 to -3 (the floor's)
    assert histogram.counts[-1] == counts[12:].sum()  # from 2 (the ceiling's) to 10
    # A level no value lies past stays out.
    same = dead_zones.collapse(Zone(-12.0, 11.0), full, Histogram(edges, counts))
    assert same[0] == full and same[1].edges[0] == -10.0 and same[2] == Zone()


@pytest.mark.parametrize("floor,hi", [(-3.0, 10.07), (-3.0, 0.4), (-0.01, 50.0), (-7.5, 7.5)])
def test_aligned_reaches_the_floor_and_the_top_on_a_grid_with_zero(floor, hi):
    u8 = QUANT_TYPES["u8"]
    for lo, top, sides in (
        (floor, hi, {"at_floor": True, "at_ceiling": False}),
        (-hi, -floor, {"at_floor": False, "at_ceiling": True}),  # the mirror image
    ):
        lo2, top2 = dead_zones.aligned(lo, top, u8, **sides)
        scale, zero = scale_and_zero_point(lo2, top2, u8, symmetric=False)
        step = float(scale)
        lowest, highest = (0 - int(zero)) * step, (255 - int(zero)) * step
        assert lowest <= lo * (1 - 1e-6) and highest >= top * (1 - 1e-6)
        if sides["at_floor"]:  # the level's end within a step of it (on it where it binds)
            assert lowest >= lo - step * (1 + 1e-6)
        else:
            assert highest <= top + step * (1 + 1e-6)
        assert step <= 1.03 * (top - lo) / 255  # about the plain range's step


def _scale_and_error_with_and_without(proto, x, folder):
    """By ``dead_zones`` off/on: the scale of ``c`` and the RMS output error on ``x[32:]``,
    calibrated (minmax) on ``x[:32]``; the activations kept as ops (``hard_activations``
    rewrites them into the Add/Clip/Mul form, whose zones ``test_hard_activations`` reads)."""
    np.savez(folder / "calib.npz", x=x[:32])
    scales, errors = {}, {}
    for flag in (False, True):
        model = onnx_shrink.shrink(
            proto,
            passes=[QuantPass(calibration="minmax", dead_zones=flag, hard_activations=False)],
            data=folder / "calib.npz",
            check=False,
        ).model
        q = next(n for n in model.graph if n.op_type == "QuantizeLinear" and n.name == "c")
        scales[flag] = float(q.inputs[1].const_value.numpy())
        got = run_ort(io.to_bytes(model), {"x": x[32:]})[0]
        reference = run_ort(proto.SerializeToString(), {"x": x[32:]})[0]
        errors[flag] = float(np.sqrt(np.mean((got - reference) ** 2)))
    return scales, errors


def test_quantized_hard_swish_gets_a_finer_step_and_a_smaller_error(tmp_path):
    proto = _hard_swish_block()
    rng = np.random.default_rng(1)
    x = rng.standard_normal((64, 3, 6, 6)).astype(np.float32) * 3
    scales, errors = _scale_and_error_with_and_without(proto, x, tmp_path)
    assert scales[True] < 0.6 * scales[False]
    assert errors[True] < 0.95 * errors[False]


def test_a_hard_sigmoid_gate_input_is_quantized_between_its_two_levels(tmp_path):
    rng = np.random.default_rng(2)
    proto = make_model(
        [
            oh.make_node("Conv", ["x", "w"], ["c"]),
            oh.make_node("HardSigmoid", ["c"], ["gate"], alpha=0.2, beta=0.5),
            oh.make_node("Mul", ["x", "gate"], ["y"]),
        ],
        [oh.make_tensor_value_info("x", F, ["N", 4, 5, 5])],
        [oh.make_tensor_value_info("y", F, ["N", 4, 5, 5])],
        {"w": rng.standard_normal((4, 4, 1, 1)).astype(np.float32) * 6},  # c spans about ±40
    )
    x = rng.standard_normal((48, 4, 5, 5)).astype(np.float32)
    scales, errors = _scale_and_error_with_and_without(proto, x, tmp_path)
    assert scales[True] <= 1.03 * 5.0 / 255  # [-2.5, 2.5], not the measured ±40
    assert errors[True] < 0.75 * errors[False]


def _paddle_hard_swish_block():
    """Conv -> paddle2onnx's hard-swish ``HardSigmoid(c) * c`` -> Conv, most of ``c`` far
    below -3 (PP-OCRv5's recogniser writes its hard-swishes so)."""
    rng = np.random.default_rng(11)
    return make_model(
        [
            oh.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
            oh.make_node("HardSigmoid", ["c"], ["gate"], alpha=1 / 6, beta=0.5),
            oh.make_node("Mul", ["gate", "c"], ["h"]),
            oh.make_node("Conv", ["h", "w2"], ["y"], pads=[1, 1, 1, 1]),
        ],
        [oh.make_tensor_value_info("x", F, ["N", 3, 6, 6])],
        [oh.make_tensor_value_info("y", F, ["N", 4, 6, 6])],
        {
            "w": rng.standard_normal((8, 3, 3, 3)).astype(np.float32),
            "b": np.full(8, -6.0, np.float32),
            "w2": rng.standard_normal((4, 8, 3, 3)).astype(np.float32) * 0.3,
        },
    )


def test_a_hard_sigmoid_times_its_own_input_is_flat_below_its_zero():
    found = _zones(_paddle_hard_swish_block(), ["c", "h"])
    assert list(found) == ["c"] and found["c"].ceiling is None
    assert found["c"].floor == pytest.approx(-3.0)  # -beta / alpha, alpha a float32 1/6


def test_paddles_hard_swish_gets_a_finer_step_and_a_smaller_error(tmp_path):
    rng = np.random.default_rng(12)
    x = rng.standard_normal((64, 3, 6, 6)).astype(np.float32) * 3
    scales, errors = _scale_and_error_with_and_without(_paddle_hard_swish_block(), x, tmp_path)
    assert scales[True] < 0.6 * scales[False]
    assert errors[True] < 0.95 * errors[False]


def test_an_old_clip_gives_its_levels_by_attribute():
    proto = make_model(
        [oh.make_node("Clip", ["a"], ["r"], min=-1.0, max=6.0)],
        [oh.make_tensor_value_info("a", F, [4])],
        [oh.make_tensor_value_info("r", F, [4])],
        {},
        opset=10,
    )
    assert _zones(proto, ["a"]) == {"a": Zone(-1.0, 6.0)}
