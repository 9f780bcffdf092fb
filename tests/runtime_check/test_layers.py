"""Per-layer localization: what the upstream column says when a pass removed tensors."""

from __future__ import annotations

from models import digits


def test_the_upstream_error_walks_past_tensors_a_pass_removed():
    """fold puts the digits CNN's BatchNormalizations into their Convs: the Conv outputs are
    gone from the candidate, and a BatchNormalization output's upstream error is that of
    the matched tensor before its Conv (it read 0)."""
    import onnx_shrink
    from onnx_shrink.api import CheckOptions

    options = CheckOptions(data=digits.TEST_DATA_PATH, layers=True, latency_runs=0)
    result = onnx_shrink.shrink(digits.MODEL_PATH, "fold,quant", check=options)
    layers = {layer.tensor: layer for layer in result.verification.layers.layers}
    after_pool = layers["/res/res.1/BatchNormalization_output_0"]
    assert "/res/res.0/Conv_output_0" not in layers  # folded away
    assert after_pool.upstream_relative_error == layers["/pool/MaxPool_output_0"].relative_error
    assert after_pool.upstream_relative_error > 0
