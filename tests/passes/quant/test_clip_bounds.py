"""An opset conversion keeps a float16 Clip's bounds in float16 (PP-OCR's direction
classifier at opset 10, after fp16: three tracebacks, and a converted model that failed
type inference)."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnx_ir as ir

from onnx_shrink.compiler import io
from onnx_shrink.passes.quant.weight_matching import ensure_opset
from tests.helpers import parse, run_ort

HALF_CLIP = """
<ir_version: 5, opset_import: ["" : 10]>
g (float16[N, 4] x) => (float16[N, 4] y, float[N, 4] z) {
  c = Clip <min = 0.0, max = 6.0> (x)
  y = Relu (c)
  f = Cast <to = 1> (x)
  z = Clip <min = -1.0, max = 1.0> (f)
}
"""


def test_a_float16_clip_keeps_its_type_when_its_bounds_become_inputs(caplog):
    model = io.load(parse(HALF_CLIP))
    with caplog.at_level(logging.WARNING):
        assert ensure_opset(model, 13, "per-channel weights", "quant")
    assert "Traceback" not in caplog.text and "Shape inference failed" not in caplog.text
    proto = ir.to_proto(model)
    onnx.checker.check_model(proto, full_check=True)
    clips = [n for n in model.graph if n.op_type == "Clip"]
    types = [[_constant(v).dtype for v in clip.inputs[1:]] for clip in clips]
    assert types == [[ir.DataType.FLOAT16] * 2, [ir.DataType.FLOAT] * 2]
    x = np.array([[-2.0, 0.5, 3.0, 9.0]], np.float16)
    y, z = run_ort(proto.SerializeToString(), {"x": x})
    np.testing.assert_array_equal(y, [[0.0, 0.5, 3.0, 6.0]])
    np.testing.assert_array_equal(z, [[-1.0, 0.5, 1.0, 1.0]])


def _constant(value: ir.Value) -> ir.TensorProtocol:
    producer = value.producer()
    if producer is not None and producer.op_type == "Constant":
        return producer.attributes["value"].as_tensor()
    assert value.const_value is not None
    return value.const_value
