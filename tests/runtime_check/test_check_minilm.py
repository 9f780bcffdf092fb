"""check() on the real MiniLM sentence embedder with real sentences (``models.text``).

MiniLM against itself over 200 tokenized sentences must show zero error and a latency ratio
near 1; a copy with noise on one MatMul weight in the middle of the network (encoder layer 1,
FFN up-projection) must fail, and the per-layer localization must name that MatMul's output
as the first jump.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from models.fetch import fetch
from models.perturb import perturb_node_weight
from models.text import minilm_dataset
from onnx_shrink.runtime_check import Tolerances, check

pytestmark = pytest.mark.network

PERTURBED_NODE = "/model/model.0/auto_model/encoder/layer.1/intermediate/dense/MatMul"


@pytest.fixture(scope="module")
def minilm() -> Path:
    return fetch("minilm")


def test_minilm_against_itself_on_200_real_sentences(minilm: Path, tmp_path: Path):
    data = minilm_dataset(tmp_path / "minilm-200.npz", n=200)
    report = check(
        minilm, minilm, data, tolerances=Tolerances(atol=0, min_cosine=0.999999), latency_runs=30
    )
    assert report.passed, report.numeric.failures
    assert report.numeric.samples == 200
    assert not report.numeric.synthetic
    assert len(report.numeric.outputs) == 4  # ids and mask echoed, token and sentence embeddings
    for out in report.numeric.outputs:
        assert out.max_abs_error == 0 and out.outside_tolerance == 0, out.name
        assert out.cosine == pytest.approx(1.0, abs=1e-9), out.name
    embedding = next(o for o in report.numeric.outputs if o.elements == 200 * 384)
    assert embedding.reference_max_abs > 0
    assert 0.67 < report.latency.ratio < 1.5
    assert report.reference_size == report.candidate_size


def test_a_perturbed_matmul_fails_and_is_the_first_jump(minilm: Path, tmp_path: Path):
    bad = tmp_path / "minilm-bad.onnx"
    born = perturb_node_weight(minilm, bad, PERTURBED_NODE)
    data = minilm_dataset(tmp_path / "minilm-20.npz", n=20)
    report = check(
        minilm, bad, data, tolerances=Tolerances(min_cosine=0.99999), layers=True, latency_runs=0
    )
    assert not report.passed
    assert any("cosine" in failure for failure in report.numeric.failures)
    layers = report.layers
    assert layers.samples == 20
    assert layers.first_jump is not None
    assert layers.first_jump.tensor == born
    assert layers.first_jump.op_type == "MatMul"
    assert layers.first_jump.upstream_relative_error == 0
    errors = {layer.tensor: layer.relative_error for layer in layers.layers}
    upstream = [e for layer, e in errors.items() if "encoder/layer.0/" in layer]
    assert upstream and all(e == 0 for e in upstream)  # nothing before the perturbation moved
    assert layers.ranked[0] in errors and errors[layers.ranked[0]] >= errors[born] > 0.1
