"""``fold.freeze``: a graph input held at one value, and the graph folded on it."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from models.fetch import fetch
from models.inputs import sample_inputs
from onnx_shrink import shrink
from onnx_shrink.compiler import io
from onnx_shrink.errors import ShrinkError
from onnx_shrink.passes.fold import FoldPass
from onnx_shrink.runtime_check import data as data_mod
from onnx_shrink.runtime_check import sessions
from tests.helpers import CONVS_IN_IF, convs_in_if, convs_in_if_x, run_ort


def test_a_frozen_flag_folds_the_if_to_its_branch_and_leaves_the_inputs(tmp_path):
    result = shrink(convs_in_if(), "fold", sets="fold.freeze=c=true", check=False)
    graph = result.model.graph
    assert [v.name for v in graph.inputs] == ["x"]
    assert [n.op_type for n in graph] == ["Conv"]  # the then-branch, in the main graph
    x = convs_in_if_x()
    (expected,) = run_ort(convs_in_if().SerializeToString(), {"c": np.array(True), "x": x})
    (frozen,) = run_ort(io.to_bytes(result.model), {"x": x})
    np.testing.assert_allclose(frozen, expected, rtol=1e-6, atol=1e-6)
    # The check feeds the reference the data's flag, and the candidate what it takes.
    np.savez(tmp_path / "d.npz", c=np.array(True), x=convs_in_if_x(3)[:, None])
    checked = shrink(convs_in_if(), "fold", sets="fold.freeze=c=true", data=tmp_path / "d.npz")
    assert checked.verification is not None
    assert checked.verification.numeric.outputs[0].max_abs_error < 1e-5


def test_quant_calibrates_the_layers_a_frozen_input_brought_into_the_main_graph(caplog):
    calibration = {"c": np.array(True), "x": convs_in_if_x(4)[:, None]}
    with caplog.at_level(logging.WARNING):
        plain = shrink(convs_in_if(), "fold,quant", check=False, calibration=calibration)
    assert "(2 Conv: inside an If/Loop/Scan body" in caplog.text
    frozen = shrink(
        convs_in_if(), "fold,quant", sets="fold.freeze=c=1", check=False, calibration=calibration
    )
    ops = [n.op_type for n in frozen.model.graph]
    assert "QuantizeLinear" in ops and "If" not in ops
    assert frozen.output_bytes < plain.output_bytes / 2


@pytest.mark.parametrize(
    ("items", "message"),
    [
        (("c",), "'c' is not NAME=VALUE"),
        (("c=yes",), "'c=yes' is not NAME=VALUE"),
        (("=1",), "is not NAME=VALUE"),
        (("c=1", "c=0"), "input 'c' is given twice"),
    ],
)
def test_a_bad_item_fails_as_the_pass_is_made(items, message):
    with pytest.raises(ShrinkError, match=message):
        FoldPass(freeze=items)


@pytest.mark.parametrize(
    ("text", "item", "message"),
    [
        (CONVS_IN_IF, "z=1", r"no input 'z' \(its inputs: c, x\)"),
        (
            '<ir_version: 8, opset_import: ["" : 17]> g (float[N, 4] x) => (float[N, 4] y) '
            "{ y = Relu(x) }",
            "x=1",
            "has dims .*only an input of fixed dims",
        ),
        (
            '<ir_version: 8, opset_import: ["" : 17]> g (int64 k, float[2] x) => (float[2] y) '
            "{ f = Cast <to = 1> (k) \n y = Mul(x, f) }",
            "k=2.5",
            "INT64, which cannot hold 2.5",
        ),
    ],
)
def test_what_cannot_be_frozen_is_said(text, item, message):
    proto = convs_in_if() if text == CONVS_IN_IF else onnx.parser.parse_model(text)
    with pytest.raises(ShrinkError, match=message):
        shrink(proto, "fold", sets=f"fold.freeze={item}", check=False)


def test_a_freeze_that_cannot_be_is_said_before_the_data_is_read(tmp_path, caplog):
    """BERT's attention_mask [batch, 32]: two warnings that its data held other values than
    the one frozen came first, then the error that it could not be frozen at all."""
    proto = onnx.parser.parse_model(
        '<ir_version: 8, opset_import: ["" : 17]> g (float[N, 4] x) => (float[N, 4] y) '
        "{ y = Relu(x) }"
    )
    x = np.zeros((4, 4), np.float32)
    with caplog.at_level(logging.WARNING), pytest.raises(ShrinkError, match="fixed dims"):
        shrink(proto, "fold", sets="fold.freeze=x=1", calibration={"x": x}, data={"x": x})
    assert caplog.text == ""


@pytest.mark.network
def test_silero_vad_at_16_khz_gets_its_convs_quantized():
    """Silero VAD v5's whole network sits in an If on ``sr``: quant quantized its LSTMs only
    (1.4 MB of 2.3); at a frozen 16 kHz its Convs are calibrated too."""
    feeds = [sample_inputs("silero-vad-v5", seed) for seed in range(8)]
    calibration = {
        "input": np.concatenate([f["input"] for f in feeds]),
        "state": np.stack([f["state"] for f in feeds]),
        "sr": np.array(16000),
    }
    source = fetch("silero-vad-v5")
    result = shrink(
        source, "fold,quant", sets="fold.freeze=sr=16000", check=False, calibration=calibration
    )
    convs = [n for n in result.model.graph if n.op_type == "Conv"]  # the 16 kHz branch's
    assert len(convs) == 6
    assert all(n.inputs[1].producer().op_type == "DequantizeLinear" for n in convs)
    assert result.output_bytes < 400_000
    reference = sessions.create_session(source)
    candidate = sessions.create_session(io.to_bytes(result.model))
    for feed in feeds:
        (expected, _) = reference.run(None, feed)
        (got, _) = candidate.run(None, sessions.declared_feed(candidate, feed))  # no "sr"
        assert abs(float(got.item()) - float(expected.item())) < 0.1


@pytest.mark.network
def test_silero_vad_frozen_is_checked_on_synthetic_frames_at_its_rate():
    """Without --data a random ``sr`` took the 8 kHz branch, whose Pad failed on the frame."""
    result = shrink(
        fetch("silero-vad-v5"),
        "fold",
        sets="fold.freeze=sr=16000",
        input_shapes={"input": (1, 512), "state": (2, 1, 128)},
    )
    assert result.verification is not None
    assert all(o.max_abs_error < 1e-4 for o in result.verification.numeric.outputs)


def test_a_freeze_that_grows_the_model_past_its_budget_is_warned_of(caplog):
    # A [1, 64] mask frozen stores 64 floats where the input declared them: larger.
    proto = onnx.parser.parse_model(
        '<ir_version: 8, opset_import: ["" : 17]> '
        "g (float[1, 64] m, float[1, 64] x) => (float[1, 64] y) { y = Mul(x, m) }"
    )
    with caplog.at_level(logging.WARNING):
        result = shrink(proto, "fold", sets="fold.freeze=m=1", check=False)
    assert not result.steps[0].modified
    assert "its inputs not frozen (raise fold.max_growth_bytes)" in caplog.text
    sets = ["fold.freeze=m=1", "fold.max_growth_bytes=1000"]
    grown = shrink(proto, "fold", sets=sets, check=False)
    assert [v.name for v in grown.model.graph.inputs] == ["x"]


@pytest.mark.parametrize("flag", [True, False])
def test_synthetic_data_holds_the_frozen_value(flag):
    # Seed 0 draws one flag: the reference took that branch whatever was frozen, and either
    # the true or the false freeze read the other branch's error.
    result = shrink(convs_in_if(), "fold", sets=f"fold.freeze=c={str(flag).lower()}")
    assert result.verification is not None
    assert result.verification.numeric.outputs[0].max_abs_error < 1e-5
    specs = data_mod.specs_from_model(ir.from_proto(convs_in_if()))
    plain = data_mod.synthetic(specs).first_feed()
    held = data_mod.synthetic(specs, held={"c": float(flag)}).first_feed()
    assert held["c"].dtype == np.bool_ and bool(held["c"]) is flag
    np.testing.assert_array_equal(held["x"], plain["x"])  # the other inputs: the same draw


def test_data_that_gives_a_frozen_input_another_value_is_warned_of(tmp_path, caplog):
    np.savez(tmp_path / "d.npz", c=np.array(True), x=convs_in_if_x(2)[:, None])
    with caplog.at_level(logging.WARNING):
        shrink(convs_in_if(), "fold", sets="fold.freeze=c=false", data=tmp_path / "d.npz")
    assert "fold.freeze holds input 'c' at 0, but" in caplog.text
    assert "gives it 1 in its first batch" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        shrink(convs_in_if(), "fold", sets="fold.freeze=c=true", data=tmp_path / "d.npz")
    assert "fold.freeze holds" not in caplog.text
