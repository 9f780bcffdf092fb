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


def test_tensors_computed_from_constants_alone_are_not_compared():
    """An int8 MiniLM casts and scales each weight in the graph: fetching those float
    weights on every run took its --layers check 73 s and 2.5 GB (8 s, 0.5 GB without)."""
    import onnx

    from onnx_shrink.compiler import io
    from onnx_shrink.runtime_check.layers import match_tensors

    model = io.load(
        onnx.parser.parse_model(
            """
            <ir_version: 8, opset_import: ["" : 17]>
            g (float[N, 4] x) => (float[N, 4] y) <int8[4, 4] wq = {1, 2, 3, 4, 5, 6, 7, 8,
                9, 10, 11, 12, 13, 14, 15, 16}, float scale = {0.5}> {
              wf = Cast <to = 1> (wq)
              w = Mul(wf, scale)
              h = MatMul(x, w)
              y = Relu(h)
            }
            """
        )
    )
    tensors, unmatched = match_tensors(model, model)
    assert [t.name for t in tensors] == ["h", "y"] and unmatched == 0


def test_past_a_tensor_pruning_reshaped_the_upstream_error_is_unknown_not_zero():
    """openWakeWord's embedding CNN with pruned channels: every tensor but the last Conv's
    changed shape, was skipped, and the last Conv read as where a 0.29 error was born "from 0
    upstream"."""
    import numpy as np
    import onnx

    from onnx_shrink import console
    from onnx_shrink.compiler import io
    from onnx_shrink.runtime_check import data as data_mod
    from onnx_shrink.runtime_check.layers import localize

    def model(hidden: int, scale: float):
        w1 = ", ".join(["1"] * 4 * hidden)
        w2 = ", ".join([str(scale)] * hidden * 2)
        return io.load(
            onnx.parser.parse_model(f"""
            <ir_version: 8, opset_import: ["" : 17]>
            g (float[N, 4] x) => (float[N, 2] y)
              <float[4, {hidden}] w1 = {{{w1}}}, float[{hidden}, 2] w2 = {{{w2}}}> {{
              h = MatMul(x, w1)
              r = Relu(h)
              y = MatMul(r, w2)
            }}
            """)
        )

    reference, candidate = model(4, 1.0), model(2, 1.5)  # half the channels, refit badly
    x = np.random.default_rng(41).uniform(0.5, 1.0, (3, 4)).astype(np.float32)
    specs = data_mod.specs_from_model(reference)
    report = localize(reference, candidate, data_mod.prepare(specs, {"x": x}), specs)
    assert report.reshaped == 2  # h and r
    (y,) = report.layers
    assert np.isnan(y.upstream_relative_error) and y.relative_error > 0.2
    assert report.first_jump is None
    title = str(console.layers_table(report).title)
    assert "no error jump among the tensors compared; 2 tensors the candidate gave" in title


def _masked_scores(scale: float):
    """Attention scores ``x * scale`` plus a mask of -3.4e38 in the last column, softmaxed."""
    import onnx

    from onnx_shrink.compiler import io

    return io.load(
        onnx.parser.parse_model(f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 4] x) => (float[N, 4] y)
          <float[4] w = {{{scale}, {scale}, {scale}, {scale}}},
           float[4] mask = {{0, 0, 0, -3.4e38}}> {{
          scores = Mul(x, w)
          masked = Add(scores, mask)
          y = Softmax(masked)
        }}
        """)
    )


def test_mask_sentinels_both_models_hold_do_not_hide_the_error_beside_them():
    """An ALBERT tagger's masked attention scores (-3.4e38 where masked) read a relative
    error of 1.6e-39 after weight quantization, so the Softmax after them looked as if it
    made its 0.553 alone."""
    import numpy as np

    from onnx_shrink.runtime_check import data as data_mod
    from onnx_shrink.runtime_check.layers import localize

    model = _masked_scores
    x = np.random.default_rng(43).uniform(-2.0, 2.0, (3, 4)).astype(np.float32)
    specs = data_mod.specs_from_model(model(1.0))
    report = localize(model(1.0), model(1.2), data_mod.prepare(specs, {"x": x}), specs)
    errors = {layer.tensor: layer for layer in report.layers}
    assert errors["masked"].relative_error > 0.1  # the scores' 20%, not 1e-39
    assert errors["y"].upstream_relative_error == errors["masked"].relative_error
    assert report.first_jump.tensor == "scores"


def test_a_half_precision_mask_counts_as_the_float_models_sentinel(recwarn):
    """After fp16, Swift-F0's masked tensors hold float16's -65504 or -inf where the float
    model holds -3.4e38: the comparison with 1e20 overflowed float16 (numpy warned in the
    middle of the run), and such a tensor could rank first with an infinite error."""
    import numpy as np
    import onnx
    import onnx.helper as oh

    from onnx_shrink.compiler import io
    from onnx_shrink.runtime_check import data as data_mod
    from onnx_shrink.runtime_check.layers import localize
    from tests.helpers import make_model

    reference = _masked_scores(1.0)
    half = onnx.TensorProto.FLOAT16
    candidate = io.load(
        make_model(
            [
                oh.make_node("Cast", ["x"], ["half"], to=half),
                oh.make_node("Mul", ["half", "w"], ["scores"]),
                oh.make_node("Add", ["scores", "mask"], ["masked"]),
                oh.make_node("Cast", ["masked"], ["wide"], to=onnx.TensorProto.FLOAT),
                oh.make_node("Softmax", ["wide"], ["y"]),
            ],
            [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 4])],
            [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 4])],
            {
                "w": np.full(4, 1.2, np.float16),
                "mask": np.array([0, 0, 0, -65504], np.float16),
            },
        )
    )
    x = np.random.default_rng(44).uniform(-2.0, 2.0, (3, 4)).astype(np.float32)
    specs = data_mod.specs_from_model(reference)
    report = localize(reference, candidate, data_mod.prepare(specs, {"x": x}), specs)
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]
    masked = next(layer for layer in report.layers if layer.tensor == "masked")
    assert 0.1 < masked.relative_error < 0.3  # the scores' 20%, not infinite
