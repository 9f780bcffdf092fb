"""Probes: each edit's model-output error, measured in one combined model, equals a run of the
model with that edit alone; a remade edit is fitted on one block of samples and measured on
the other."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper
import pytest

from onnx_shrink.compiler import io
from onnx_shrink.compiler.data_aware import Probe, ProbeBudget
from onnx_shrink.compiler.statistics import Gram, Statistics
from onnx_shrink.errors import ShrinkError
from onnx_shrink.passes import lowrank_ranks
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


def _probes(proto, held_out: bool = False) -> list[Probe]:
    model = io.load(proto)
    lowrank = LowRankPass(budget_metric="model-output", probe_ranks=3, held_out=held_out)
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


def _dataset(proto, tmp_path, x: np.ndarray) -> data_mod.Dataset:
    np.savez(tmp_path / "x.npz", x=x)
    return data_mod.prepare(data_mod.specs_from_model(io.load(proto)), tmp_path / "x.npz")


def test_a_remade_probe_is_fitted_on_one_block_and_measured_on_the_other(tmp_path):
    proto = _two_layers()
    x = RNG.standard_normal((40, K)).astype(np.float32) * np.linspace(0.1, 3, K, dtype=np.float32)
    w0 = onnx.numpy_helper.to_array(next(i for i in proto.graph.initializer if i.name == "w0"))
    probes = _probes(proto, held_out=True)
    assert all(p.remade is not None and p.requests for p in probes)
    measured = probe_mod.measure(io.load(proto), probes, _dataset(proto, tmp_path, x), batch=4)
    for probe in probes:
        diff = ref = 0.0
        for fit, test in ((x[20:], x[:20]), (x[:20], x[20:])):
            rows = fit if probe.requests[0].tensor == "x" else np.tanh(fit @ w0)  # mm1 reads t
            gram = rows.astype(np.float64).T @ rows.astype(np.float64)
            stats = Statistics({probe.requests[0]: Gram(gram, len(fit))}, len(fit), "block")
            edited = io.load(proto)
            probe.remade(stats)(edited)
            (y,) = run_ort(io.to_bytes(edited), {"x": test})
            (y0,) = run_ort(io.to_bytes(io.load(proto)), {"x": test})
            diff += float(np.sum((y.astype(np.float64) - y0) ** 2))
            ref += float(np.sum(y0.astype(np.float64) ** 2))
        assert measured[probe.key] == pytest.approx(diff / ref, rel=1e-4)


def test_a_blocks_statistics_are_freed_before_the_next_blocks_are_collected(tmp_path, monkeypatch):
    """Two blocks' statistics at once were lowrank's peak memory (1.8 GB of Grams a set on a
    0.6 GB encoder): the first block's must be gone when the second's are collected."""
    import gc
    import weakref

    proto = _two_layers()
    x = RNG.standard_normal((40, K)).astype(np.float32)
    collected: list[weakref.ref] = []
    alive_at_next: list[bool] = []
    real_collect = probe_mod.collect_mod.collect

    def tracking_collect(*args, **kwargs):
        gc.collect()
        alive_at_next.extend(ref() is not None for ref in collected)
        stats = real_collect(*args, **kwargs)
        collected.append(weakref.ref(stats))
        return stats

    monkeypatch.setattr(probe_mod.collect_mod, "collect", tracking_collect)
    probe_mod.measure(
        io.load(proto), _probes(proto, held_out=True), _dataset(proto, tmp_path, x), batch=4
    )
    assert len(collected) == 2 and alive_at_next == [False]


def test_with_fewer_samples_than_blocks_a_remade_probe_is_measured_in_sample(tmp_path):
    proto = _two_layers()
    x = RNG.standard_normal((1, K)).astype(np.float32)
    held_out = probe_mod.measure(
        io.load(proto), _probes(proto, held_out=True), _dataset(proto, tmp_path, x)
    )
    in_sample = probe_mod.measure(io.load(proto), _probes(proto), _dataset(proto, tmp_path, x))
    assert held_out == pytest.approx(in_sample, rel=1e-6)


def test_every_output_counts_alike_whatever_its_scale(tmp_path):
    """The error is the mean over outputs of each one's relative squared error: an untouched
    output 100x louder halves it, it does not drown it."""
    w0 = RNG.standard_normal((K, K)).astype(np.float32) / 8
    proto = make_model(
        [
            oh.make_node("MatMul", ["x", "w0"], ["y"], name="mm0"),
            oh.make_node("Mul", ["x", "loud"], ["z"], name="scale"),
        ],
        [oh.make_tensor_value_info("x", F, ["n", K])],
        [oh.make_tensor_value_info("y", F, ["n", K]), oh.make_tensor_value_info("z", F, ["n", K])],
        {"w0": w0, "loud": np.array(100.0, dtype=np.float32)},
    )
    x = RNG.standard_normal((8, K)).astype(np.float32)
    probes = _probes(proto)
    measured = probe_mod.measure(io.load(proto), probes, _dataset(proto, tmp_path, x))
    for probe in probes:
        edited = io.load(proto)
        probe.edit(edited)
        (y, _), (y0, _) = (
            run_ort(io.to_bytes(edited), {"x": x}),
            run_ort(io.to_bytes(io.load(proto)), {"x": x}),
        )
        expected = np.sum((y - y0).astype(np.float64) ** 2) / np.sum(y0.astype(np.float64) ** 2)
        assert measured[probe.key] == pytest.approx(expected / 2, rel=1e-5)


@pytest.mark.parametrize("held_out", [False, True], ids=["in-sample", "held-out"])
def test_past_its_budget_the_rest_keep_their_lowest_priorities(tmp_path, caplog, held_out):
    # A budget of 0 s: the first run (two of mm0's three ranks) is past it, so of the rest
    # only priority 0 is measured: mm1's middle rank. Held-out blocks measure the same three.
    proto = _two_layers()
    x = RNG.standard_normal((8, K)).astype(np.float32)
    probes = _probes(proto, held_out=held_out)
    budget = ProbeBudget(0.0, "lowrank.probe_seconds")
    with caplog.at_level("WARNING", logger="onnx_shrink.runtime_check.probe"):
        measured = probe_mod.measure(
            io.load(proto), probes, _dataset(proto, tmp_path, x), batch=2, budget=budget
        )
    expected = [p.key for p in probes[:2]] + [p.key for p in probes[2:] if p.priority == 0]
    assert sorted(measured) == sorted(expected) and len(expected) == 3
    assert "lowrank: measured 3 of 6 probes within its 0 s" in caplog.text
    assert "raise lowrank.probe_seconds" in caplog.text
    # Unlimited, every probe; the ones measured under the budget read the same.
    everything = probe_mod.measure(io.load(proto), probes, _dataset(proto, tmp_path, x), batch=2)
    assert len(everything) == 6
    assert measured == pytest.approx({k: everything[k] for k in measured}, rel=1e-6)


def test_a_layers_grid_keeps_its_middle_first_then_its_ends():
    assert lowrank_ranks.grid_priorities(6) == [1, 3, 4, 0, 5, 2]  # ranks 3, 0, 5, 1, 2, 4
    assert lowrank_ranks.grid_priorities(1) == [0]
    assert lowrank_ranks.grid_priorities(0) == []


def _fake_run(monkeypatch, seconds_per_edit: dict[str, float]):
    """Measure without onnxruntime: each edit "takes" its list's seconds on a fake clock."""
    now = [0.0]
    monkeypatch.setattr(probe_mod.time, "perf_counter", lambda: now[0])

    def stream(combined, count, setting, data, label):
        now[0] += seconds_per_edit["now"] * count
        return np.ones((count, 1)), np.ones(1)

    monkeypatch.setattr(probe_mod, "_stream", stream)
    monkeypatch.setattr(probe_mod.combined_mod, "build", lambda *a, **k: None)
    return probe_mod._Setting(None, [0], "#", "cpu", 4, None)


def _edits(prefix: str, count: int):
    return [probe_mod._Edit(f"{prefix}{i}", lambda: None, (), i % 3, 1.0) for i in range(count)]


def test_a_cut_list_leaves_other_lists_alone_and_blocks_measure_the_same(monkeypatch):
    # Found in review: once the in-sample list was cut, every held-out probe was dropped;
    # and a second block running slower could be cut on its own, leaving some probes
    # measured on one block only.
    cost = {"now": 1.0}
    setting = _fake_run(monkeypatch, cost)
    sums = {}
    clock = probe_mod._Clock(ProbeBudget(20.0, "lowrank.probe_seconds"), 12 + 2 * 12)
    probe_mod._measure_edits(setting, _edits("in", 12), None, "probe", sums, clock)
    for block, seconds in ((1, 1.0), (2, 1.5)):
        cost["now"] = seconds
        probe_mod._measure_edits(setting, _edits("held", 12), None, f"block {block}", sums, clock)
    held = [key for key in sums if key.startswith("held")]
    assert held and clock.cut
    assert all(sums[key].ref[0] == 2.0 for key in held)  # every held-out probe: both blocks
    # Unlimited time for block 1: block 2, slower, still measures every probe.
    setting = _fake_run(monkeypatch, cost)
    sums = {}
    clock = probe_mod._Clock(ProbeBudget(24.0, "lowrank.probe_seconds"), 2 * 12)
    for seconds in (1.0, 1.5):
        cost["now"] = seconds
        probe_mod._measure_edits(setting, _edits("held", 12), None, "block", sums, clock)
    assert len(sums) == 12 and all(v.ref[0] == 2.0 for v in sums.values())


def test_the_budget_projects_by_what_each_copy_runs_not_by_count(monkeypatch):
    # Found on PP-OCRv4 rec: copies of its first layers hold the whole model, those of its
    # last ones a few nodes, so its first run read 2.3x the trials' time, and a machine 1.4x
    # slower cut trials that would have fitted. Here the first four edits take 10 s each,
    # the other eight 1 s: 48 s in all, inside a 60 s budget; projected by count, the first
    # run's 40 s for four edits read 120 s.
    now = [0.0]
    monkeypatch.setattr(probe_mod.time, "perf_counter", lambda: now[0])

    def build(base, edits, outputs, sep, who, anchors):  # a run takes its copies' seconds
        now[0] += sum(10.0 if names == ("first",) else 1.0 for names in anchors)

    monkeypatch.setattr(probe_mod.combined_mod, "build", build)
    monkeypatch.setattr(
        probe_mod, "_stream", lambda combined, count, *rest: (np.ones((count, 1)), np.ones(1))
    )
    setting = probe_mod._Setting(None, [0], "#", "cpu", 4, None)
    edits = [
        probe_mod._Edit(f"e{i}", lambda: None, ("first",) if i < 4 else ("last",), i % 3, 1.0)
        for i in range(12)
    ]
    weighted = [dataclasses.replace(e, weight=10.0) if i < 4 else e for i, e in enumerate(edits)]
    budget = ProbeBudget(60.0, "lowrank.probe_seconds")
    sums = {}
    clock = probe_mod._Clock(budget, sum(e.weight for e in weighted))
    probe_mod._measure_edits(setting, weighted, None, "probe", sums, clock)
    assert len(sums) == 12 and not clock.cut and now[0] == 48.0
    # Weighted alike, as by count before, the same runs cut the list after the first one.
    sums = {}
    clock = probe_mod._Clock(budget, len(edits))
    probe_mod._measure_edits(setting, edits, None, "probe", sums, clock)
    assert len(sums) < 12 and clock.cut


def test_an_output_the_model_leaves_nan_counts_only_where_the_reference_is_finite(tmp_path):
    """caustic-nmr outputs NaN for absent atoms: every probe measured NaN, and lowrank gave
    every layer its smallest rank. Errors count over the reference's finite elements."""
    proto = _two_layers()
    proto.graph.node[-1].output[0] = "y0"
    proto.graph.node.append(oh.make_node("Where", ["keep", "y0", "nan"], ["y"]))
    proto.graph.input.append(oh.make_tensor_value_info("keep", onnx.TensorProto.BOOL, ["n", K]))
    proto.graph.initializer.append(onnx.numpy_helper.from_array(np.float32(np.nan), "nan"))
    x = RNG.standard_normal((40, K)).astype(np.float32)
    keep = RNG.random((40, K)) > 0.1
    np.savez(tmp_path / "x.npz", x=x, keep=keep)
    dataset = data_mod.prepare(data_mod.specs_from_model(io.load(proto)), tmp_path / "x.npz")
    probes = _probes(proto)
    measured = probe_mod.measure(io.load(proto), probes, dataset, batch=4)
    (reference,) = run_ort(io.to_bytes(io.load(proto)), {"x": x, "keep": keep})
    reference = reference.astype(np.float64)[keep]
    for probe in probes:
        edited = io.load(proto)
        probe.edit(edited)
        (y,) = run_ort(io.to_bytes(edited), {"x": x, "keep": keep})
        expected = np.sum((y[keep] - reference) ** 2) / np.sum(reference**2)
        assert measured[probe.key] == pytest.approx(expected, rel=1e-5)


def test_each_run_reports_from_0_as_its_model_is_built(tmp_path):
    """The status showed the last run's "8/8" while the next run's copies were built."""
    proto = _two_layers()
    x = RNG.standard_normal((8, K)).astype(np.float32)
    calls = []
    probe_mod.measure(
        io.load(proto),
        _probes(proto),
        _dataset(proto, tmp_path, x),
        batch=2,
        progress=lambda phase, done, total=None: calls.append((phase, done, total)),
    )
    phases = list(dict.fromkeys(phase for phase, _, _ in calls))
    assert phases == [f"output error trials {i}/3" for i in (1, 2, 3)]
    for phase in phases:
        assert [(d, t) for p, d, t in calls if p == phase][0] == (0, 8)
