"""The types and shapes ``quant`` infers and keeps as value_info: the dimension names that
inference invents are not kept, so onnxruntime does not fuse residual Adds and their
LayerNormalization into its slower SkipLayerNormalization kernel."""

from __future__ import annotations

import onnx
import onnx_ir as ir
import pytest

import onnx_shrink
from models.fetch import fetch
from models.text import minilm_dataset
from onnx_shrink.compiler import io
from onnx_shrink.passes.quant import value_types
from tests.helpers import optimized_ops, parse


def test_kept_shapes_lose_invented_dimension_names_but_the_models_own_and_its_outputs():
    model = io.load(
        parse(
            """
        <ir_version: 9, opset_import: ["" : 17]>
        g (float[N, 8] x) => (float[N, 8] y) { h = Relu(x) y = Relu(h) }
        """
        )
    )
    h, y = (node.outputs[0] for node in model.graph)
    h.shape = ir.Shape(["unk__3", "N", 8])
    y.shape = ir.Shape(["unk__4", 8])
    value_types.settle_inferred_types(model, keep=True)
    dims = h.shape.dims
    assert dims[0].value is None and dims[1].value == "N" and dims[2] == 8
    assert y.shape.dims[0].value == "unk__4"  # the model's interface, as it declares it


@pytest.mark.network
def test_quantized_minilm_keeps_add_and_layer_normalization_apart(tmp_path):
    """With inference's names in value_info, onnxruntime fused 3 of the 7 residual Adds into
    SkipLayerNormalization (so did onnxruntime's own quantizer); the float model has none."""
    data = minilm_dataset(tmp_path / "minilm.npz", n=16)
    output = tmp_path / "q.onnx"
    onnx_shrink.shrink(fetch("minilm"), "fold,quant", output=output, check=False, data=data)
    saved = onnx.load(output)
    names = {d.dim_param for v in saved.graph.value_info for d in v.type.tensor_type.shape.dim}
    assert names <= {"", "batch_size", "sequence_length"}
    ops = optimized_ops(output)
    assert ops["SkipLayerNormalization"] == 0 and ops["LayerNormalization"] == 7
