"""Synthetic builders: checker-valid, runnable on onnxruntime, deterministic per seed."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from models.builders import BUILDERS, build_transformer_block

# name -> (input name, concrete input shape, expected output shape)
CASES: dict[str, tuple[str, tuple[int, ...], tuple[int, ...]]] = {
    "mlp": ("x", (3, 64), (3, 10)),
    "cnn": ("image", (2, 3, 32, 32), (2, 10)),
    "transformer": ("hidden", (2, 7, 64), (2, 7, 64)),
}


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def test_registry_names() -> None:
    assert set(BUILDERS) == {"mlp", "cnn", "transformer"}


@pytest.mark.parametrize("name", sorted(CASES))
def test_checker_valid_and_versions(name: str) -> None:
    model = BUILDERS[name]()
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version == 8
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 17)]
    first_dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert first_dim.dim_param == "batch"


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("batch", [1, 4])
def test_runs_with_finite_outputs(name: str, batch: int) -> None:
    input_name, shape, out_shape = CASES[name]
    shape = (batch, *shape[1:])
    x = np.random.default_rng(123).standard_normal(shape).astype(np.float32)
    (y,) = _run(BUILDERS[name](), {input_name: x})
    assert y.shape == (batch, *out_shape[1:])
    assert y.dtype == np.float32
    assert np.isfinite(y).all()
    assert float(y.std()) > 1e-3  # not collapsed
    assert float(np.abs(y).max()) < 1e3  # not exploded


def test_transformer_dynamic_seq_and_gelu() -> None:
    model = BUILDERS["transformer"]()
    ops = {n.op_type for n in model.graph.node}
    assert {"Erf", "Softmax", "LayerNormalization", "Transpose", "Reshape"} <= ops
    assert model.graph.input[0].type.tensor_type.shape.dim[1].dim_param == "seq"
    for seq in (1, 5, 16):
        x = np.random.default_rng(seq).standard_normal((2, seq, 64)).astype(np.float32)
        (y,) = _run(model, {"hidden": x})
        assert y.shape == (2, seq, 64)
        assert np.isfinite(y).all()


def test_transformer_custom_sizes() -> None:
    model = build_transformer_block(seed=3, d_model=32, heads=2, d_ff=48)
    x = np.zeros((1, 3, 32), dtype=np.float32)
    (y,) = _run(model, {"hidden": x})
    assert y.shape == (1, 3, 32)
    with pytest.raises(ValueError):
        build_transformer_block(d_model=30, heads=4)


def test_cnn_has_batchnorm_and_residual() -> None:
    ops = [n.op_type for n in BUILDERS["cnn"]().graph.node]
    assert ops.count("BatchNormalization") >= 3
    assert "Add" in ops and "GlobalAveragePool" in ops


@pytest.mark.parametrize("name", sorted(CASES))
def test_deterministic_per_seed(name: str) -> None:
    build = BUILDERS[name]
    assert build(seed=0).SerializeToString() == build(seed=0).SerializeToString()
    a, b = build(seed=0), build(seed=1)
    assert a.SerializeToString() != b.SerializeToString()
    wa = {t.name: onnx.numpy_helper.to_array(t) for t in a.graph.initializer}
    wb = {t.name: onnx.numpy_helper.to_array(t) for t in b.graph.initializer}
    assert wa.keys() == wb.keys()
    assert any(not np.array_equal(wa[k], wb[k]) for k in wa if wa[k].dtype == np.float32)
