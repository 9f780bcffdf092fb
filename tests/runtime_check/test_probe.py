"""Probes: each edit's model-output error, measured in one combined model, equals a run of the
model with that edit alone."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh
import pytest

from onnx_shrink.compiler import io
from onnx_shrink.compiler.data_aware import Probe
from onnx_shrink.compiler.statistics import Gram, Statistics
from onnx_shrink.errors import ShrinkError
from onnx_shrink.passes.lowrank import LowRankPass
from onnx_shrink.runtime_check import data as data_mod
from onnx_shrink.runtime_check import probe as probe_mod
from tests.helpers import make_model, run_ort

RNG = np.random.default_rng(3)
F = onnx.TensorProto.FLOAT
K = 64


def _two_layers() -> onnx.ModelProto:
    """x -> MatMul -> Tanh -> MatMul -> y (a nonlinearity between: errors are not additive)."""
    w0, w1 = RNG.standard_normal((2, K, K)).astype(np.float32) / 8
    return make_model(
        [
            oh.make_node("MatMul", ["x", "w0"], ["h"], name="mm0"),
            oh.make_node("Tanh", ["h"], ["t"], name="tanh"),
            oh.make_node("MatMul", ["t", "w1"], ["y"], name="mm1"),
        ],
        [oh.make_tensor_value_info("x", F, ["n", K])],
        [oh.make_tensor_value_info("y", F, ["n", K])],
        {"w0": w0, "w1": w1},
    )


def _probes(proto) -> list[Probe]:
    model = io.load(proto)
    lowrank = LowRankPass(budget_metric="model-output", probe_ranks=3)
    stats = Statistics({r: Gram(np.eye(K), 10) for r in lowrank.requests(model)}, 10, "test")
    return list(lowrank.probes(model, stats))


def test_each_probe_equals_a_separate_run_with_only_that_layer_replaced(tmp_path):
    proto = _two_layers()
    x = RNG.standard_normal((40, K)).astype(np.float32)
    np.savez(tmp_path / "x.npz", x=x)
    dataset = data_mod.prepare(data_mod.specs_from_model(io.load(proto)), tmp_path / "x.npz")
    probes = _probes(proto)
    assert len(probes) == 6
    measured = probe_mod.measure(io.load(proto), probes, dataset, batch=4)
    (reference,) = run_ort(io.to_bytes(io.load(proto)), {"x": x})
    reference = reference.astype(np.float64)
    for probe in probes:
        edited = io.load(proto)
        probe.edit(edited)
        (y,) = run_ort(io.to_bytes(edited), {"x": x})
        expected = np.sum((y - reference) ** 2) / np.sum(reference**2)
        assert measured[probe.key] == pytest.approx(expected, rel=1e-5)
    ranks = [int(p.key.split("@")[1]) for p in probes[:3]]
    errors = [measured[p.key] for p in probes[:3]]
    assert ranks == sorted(ranks) and errors == sorted(errors, reverse=True)


def test_probe_keys_must_be_unique():
    proto = _two_layers()
    probe = _probes(proto)[0]
    dataset = data_mod.synthetic(data_mod.specs_from_model(io.load(proto)))
    with pytest.raises(ShrinkError, match="unique"):
        probe_mod.measure(io.load(proto), [probe, probe], dataset)
