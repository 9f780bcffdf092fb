"""Combined models: each edited copy computes only what its edit changed (the rest is the
unedited graph's, shared), whether the copy is whole or cut below the edited nodes; its
outputs equal a separate run of the edited model."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh
import onnx_ir as ir
import pytest

from onnx_shrink.compiler import io
from onnx_shrink.runtime_check import collect_runs, sample_batches
from onnx_shrink.runtime_check import combined as combined_mod
from onnx_shrink.runtime_check import data as data_mod
from tests.helpers import make_model, run_ort

RNG = np.random.default_rng(5)
F = onnx.TensorProto.FLOAT
K = 8


def _chain() -> onnx.ModelProto:
    """x -> Relu -> MatMul(w) -> LeakyRelu -> y, and z = Sigmoid(Relu(x)) beside it."""
    return make_model(
        [
            oh.make_node("Relu", ["x"], ["r"], name="relu"),
            oh.make_node("Sigmoid", ["r"], ["z"], name="sigmoid"),
            oh.make_node("MatMul", ["r", "w"], ["h"], name="mm"),
            oh.make_node("LeakyRelu", ["h"], ["y"], name="leaky", alpha=0.1),
        ],
        [oh.make_tensor_value_info("x", F, ["n", K])],
        [oh.make_tensor_value_info("y", F, ["n", K]), oh.make_tensor_value_info("z", F, ["n", K])],
        {"w": RNG.standard_normal((K, K)).astype(np.float32)},
    )


def _new_weight(model: ir.Model) -> ir.Model:
    """Replace the MatMul's weight by a new initializer (as lowrank and quant edits do)."""
    node = next(n for n in model.graph if n.name == "mm")
    value = ir.Value(name="w_new", const_value=ir.tensor(np.eye(K, dtype=np.float32)))
    model.graph.register_initializer(value)
    node.replace_input_with(1, value)
    model.graph.initializers.pop("w")
    return model


def _new_alpha(model: ir.Model) -> ir.Model:
    """Change an attribute in place: the node keeps its inputs and outputs."""
    node = next(n for n in model.graph if n.name == "leaky")
    node.attributes["alpha"] = ir.AttrFloat32("alpha", 0.5)
    return model


def _run(model: ir.Model, x: np.ndarray) -> dict[str, np.ndarray]:
    session_outputs = run_ort(io.to_bytes(model), {"x": x})
    return dict(zip([v.name for v in model.graph.outputs], session_outputs, strict=True))


@pytest.mark.parametrize("anchors", [(), (("mm",), ("leaky",))], ids=["whole", "downstream"])
def test_a_copy_runs_only_what_its_edit_changed_and_equals_the_edited_model(anchors):
    proto = _chain()
    base = io.load(proto)
    edits = [_new_weight, _new_alpha]
    combined = combined_mod.build(base, edits, [0, 1], "#", "test", anchors)
    ops = [n.op_type for n in combined.graph]
    # The unedited four, then each copy's changed nodes, and z echoed (computed once).
    unedited = [n.op_type for n in base.graph]
    assert ops == [*unedited, "MatMul", "LeakyRelu", "Identity", "LeakyRelu", "Identity"]
    x = RNG.standard_normal((5, K)).astype(np.float32)
    got = _run(combined, x)
    for index, edit in enumerate(edits):
        expected = _run(edit(io.load(proto)), x)
        for name in ("y", "z"):
            np.testing.assert_allclose(got[f"{name}#{index}"], expected[name], rtol=1e-6)
    assert not np.allclose(got["y#1"], got["y"])  # the changed attribute was not shared


def test_a_downstream_copy_holds_the_edited_nodes_and_what_follows_them():
    seen = []

    def edit(model: ir.Model) -> ir.Model:
        seen.append([n.name for n in model.graph])
        return _new_weight(model)

    base = io.load(_chain())
    combined_mod.build(base, [edit, edit], [0, 1], "#", "test", [("mm",), ("nowhere",)])
    # Named: the MatMul and the LeakyRelu after it; a name the graph lacks: the whole model.
    assert seen == [["mm", "leaky"], ["relu", "sigmoid", "mm", "leaky"]]
    # What the probes' time budget weighs each copy by: the nodes it holds.
    sizes = combined_mod.copy_sizes(base, [("mm",), ("nowhere",), (), ("leaky",)])
    assert sizes == [len(seen[0]), len(seen[1]), 4, 1]


def test_a_subgraph_downstream_of_the_edit_takes_the_whole_copy():
    then_branch = oh.make_graph(
        [oh.make_node("Neg", ["h"], ["out"])],  # reads the MatMul's output from outside
        "then",
        [],
        [oh.make_tensor_value_info("out", F, ["n", K])],
    )
    else_branch = oh.make_graph(
        [oh.make_node("Identity", ["h"], ["out"])],
        "else",
        [],
        [oh.make_tensor_value_info("out", F, ["n", K])],
    )
    proto = make_model(
        [
            oh.make_node("Relu", ["x"], ["r"], name="relu"),
            oh.make_node("MatMul", ["r", "w"], ["h"], name="mm"),
            oh.make_node("If", ["flag"], ["y"], then_branch=then_branch, else_branch=else_branch),
        ],
        [oh.make_tensor_value_info("x", F, ["n", K])],
        [oh.make_tensor_value_info("y", F, ["n", K])],
        {"w": RNG.standard_normal((K, K)).astype(np.float32), "flag": np.array(True)},
    )
    seen = []

    def edit(model: ir.Model) -> ir.Model:
        seen.append(len(list(model.graph)))
        return _new_weight(model)

    combined = combined_mod.build(io.load(proto), [edit], [0], "#", "test", [("mm",)])
    assert seen == [3]
    x = RNG.standard_normal((5, K)).astype(np.float32)
    got = _run(combined, x)
    np.testing.assert_allclose(got["y#0"], _run(_new_weight(io.load(proto)), x)["y"], rtol=1e-6)


def test_an_unchanged_output_listed_twice_is_echoed_once():
    # Found in review: two Identity nodes wrote the same name, which onnxruntime refuses.
    proto = _chain()
    proto.graph.output.append(proto.graph.output[1])  # z twice
    base = io.load(proto)
    for anchors in ((), (("mm",),)):
        combined = combined_mod.build(base, [_new_weight], [0, 1, 2], "#", "test", anchors)
        x = RNG.standard_normal((5, K)).astype(np.float32)
        got = run_ort(io.to_bytes(combined), {"x": x})
        names = [v.name for v in combined.graph.outputs]
        assert names == ["y", "z", "z", "y#0", "z#0", "z#0"]
        np.testing.assert_array_equal(got[4], got[1])


def test_stream_yields_each_sample_in_order_with_two_runs_at_once(monkeypatch, tmp_path):
    """Two runs go at once (as on two cores or more); each sample's outputs still come in
    the data's order and equal the model's own run, and progress counts samples out of the
    data's."""
    monkeypatch.setattr(collect_runs, "parallel_runs", lambda provider: 2)
    overlapped, in_flight = collect_runs.overlapped_runs, []

    def spied(*args, **kwargs):
        in_flight.append(kwargs["in_flight"])
        return overlapped(*args, **kwargs)

    monkeypatch.setattr(collect_runs, "overlapped_runs", spied)
    model = io.load(_chain())
    x = RNG.standard_normal((10, K)).astype(np.float32)
    np.savez(tmp_path / "x.npz", x=x)
    specs = data_mod.specs_from_model(model)
    data = sample_batches.one_sample_a_run(data_mod.prepare(specs, tmp_path / "x.npz"), specs)
    reports = []
    yielded = list(
        combined_mod.stream(model, data, "cpu", lambda *report: reports.append(report), "p")
    )
    assert [batch.samples for batch, _ in yielded] == [1] * 10
    expected = _run(model, x)
    for index, (batch, outputs) in enumerate(yielded):
        np.testing.assert_array_equal(batch.feed["x"], x[index : index + 1])
        for name in ("y", "z"):
            one = expected[name][index : index + 1]  # run with the others: rounding apart
            np.testing.assert_allclose(outputs[name], one, rtol=1e-5, atol=1e-6)
    assert reports == [("p", done, 10) for done in range(1, 11)] and in_flight == [2]
