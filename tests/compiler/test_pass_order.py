"""Pass orders in which a float rewriter follows a quantizer: warned before any model is read,
with an order that runs both; the passes name the quantized weights they leave."""

from __future__ import annotations

import logging

import numpy as np
import pytest

import onnx_shrink
from models import digits
from onnx_shrink.compiler import pass_order, spec
from tests.helpers import digits_images


@pytest.mark.parametrize(
    ("names", "expected"),
    [
        ("fold,quant,prune", "fold,prune,quant"),
        ("quant,prune", "prune,quant"),
        (
            "fold,quant-weight,lowrank,quant,prune-channels",
            "fold,lowrank,prune-channels,quant-weight,quant",
        ),
        ("fold,quant-dynamic,fp16,prune", "fold,prune,quant-dynamic,fp16"),
    ],
)
def test_late_float_rewriters_are_warned_with_an_order_that_runs_both(names, expected, caplog):
    with caplog.at_level(logging.WARNING):
        message = pass_order.warn_order(spec.parse_spec(names))
    assert message is not None and [r.getMessage() for r in caplog.records] == [message]
    assert message.endswith(f"the order {expected} does both"), message
    assert pass_order.reordered(expected.split(",")) == expected.split(",")


@pytest.mark.parametrize(
    "names", ["fold,prune,quant", "fold,lowrank,prune-channels,quant-weight", "quant,fp16", "prune"]
)
def test_orders_that_run_every_pass_are_not_warned(names, caplog):
    with caplog.at_level(logging.WARNING):
        assert pass_order.warn_order(spec.parse_spec(names)) is None
    assert not caplog.records


def test_quant_then_prune_warns_first_and_prune_names_the_quantized_weights(caplog):
    """The order warning comes before the calibration's; prune then says why it left each
    layer (quantized already, not "computed in the graph from constants"), and the order it
    suggests prunes and quantizes."""
    calibration = {"image": digits_images(16)}
    model = digits.MODEL_PATH.read_bytes()
    with caplog.at_level(logging.WARNING):
        late = onnx_shrink.shrink(model, "fold,quant,prune", check=False, calibration=calibration)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warned[0].startswith("prune after quant in the passes"), warned
    prune = next(w for w in warned if w.startswith("prune: no layer changed"))
    assert "weight quantized already" in prune and "computed in the graph" not in prune
    assert "the model is quantized already" in prune
    assert [s.modified for s in late.steps] == [True, True, False]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        both = onnx_shrink.shrink(model, "fold,prune,quant", check=False, calibration=calibration)
    assert not any("in the passes" in r.getMessage() for r in caplog.records)
    assert [s.modified for s in both.steps] == [True, True, True]
    assert _zero_codes(both.model) > 2 * _zero_codes(late.model)  # the weights pruned


def _zero_codes(model) -> int:
    """Zeros among the model's int8 weight codes."""
    arrays = (v.const_value.numpy() for v in model.graph.initializers.values())
    return sum(int((a == 0).sum()) for a in arrays if a.dtype == np.int8)


def test_lowrank_names_a_quantized_weight(caplog):
    calibration = {"image": digits_images(16)}
    with caplog.at_level(logging.WARNING):
        onnx_shrink.shrink(
            digits.MODEL_PATH.read_bytes(),
            "fold,quant,lowrank",
            check=False,
            calibration=calibration,
        )
    lowrank = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("lowrank:"))
    assert "weight quantized already" in lowrank, lowrank
    assert "weight is not a constant" not in lowrank
