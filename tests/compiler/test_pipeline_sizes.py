"""The pipeline's bytes before and after each pass: exact, and not measured twice."""

from __future__ import annotations

import functools

import numpy as np
import onnx
import onnx_ir as ir

from models import digits
from onnx_shrink import FoldPass, shrink
from onnx_shrink.compiler import io, pipeline
from onnx_shrink.compiler.io import data_files, large_tensors
from onnx_shrink.passes.prune import PrunePass
from onnx_shrink.passes.quant.static import QuantPass
from onnx_shrink.runtime_check import collect, data
from tests.helpers import save_proto


def _counting_saved_bytes(monkeypatch) -> list[int]:
    calls: list[int] = []
    original = large_tensors.saved_bytes
    monkeypatch.setattr(
        large_tensors,
        "saved_bytes",
        lambda model, *a, **k: calls.append(1) or original(model, *a, **k),
    )
    return calls


def test_a_functional_pass_that_measured_its_sizes_is_not_measured_again(monkeypatch):
    model = io.load(digits.MODEL_PATH)
    size = len(io.to_bytes(model))
    calls = _counting_saved_bytes(monkeypatch)
    result = pipeline.run(model, [FoldPass(), FoldPass()])
    assert len(calls) == 4  # each fold's input and result; the pipeline's own: none
    first, second = result.steps
    assert first.bytes_before == size
    assert first.bytes_after == second.bytes_before == len(io.to_bytes(_folded(model)))
    assert second.bytes_after == len(io.to_bytes(result.model))


def test_a_pass_that_changes_its_input_is_measured_before_it_runs(monkeypatch):
    model = io.load(digits.MODEL_PATH)
    size = len(io.to_bytes(model))
    calls = _counting_saved_bytes(monkeypatch)
    prune = PrunePass(sparsity=0.5)
    assert prune.changes_input
    result = pipeline.run(model, [prune])
    (step,) = result.steps
    assert len(calls) == 2
    assert step.bytes_before == size and step.bytes_after == len(io.to_bytes(result.model))


def _folded(model: ir.Model) -> ir.Model:
    return FoldPass()(model).model


def test_a_rolled_back_data_aware_pass_leaves_the_model_as_its_requests_found_it(tmp_path):
    """quant's requests convert the opset (16-bit activations need 21): a rollback undoes
    that too, and the step's size after is its size before."""
    model = io.load(digits.MODEL_PATH)
    opset = model.opset_imports[""]
    assert opset < 21
    size = len(io.to_bytes(model))
    images = data_files.load_npz(digits.TEST_DATA_PATH)["image"][:8]
    np.savez(tmp_path / "d.npz", image=images)
    dataset = data.prepare(data.specs_from_model(model), tmp_path / "d.npz")
    result = pipeline.run(
        model,
        [QuantPass(int16=(".*",))],
        verify=lambda candidate: pipeline.Verdict(False, "rejected by the test"),
        collect=lambda m, requests, *_: collect.collect(m, requests, dataset),
    )
    (step,) = result.steps
    assert step.rolled_back
    assert result.model.opset_imports[""] == opset
    assert step.bytes_before == step.bytes_after == size == len(io.to_bytes(result.model))


def test_the_summary_ends_with_the_sizes_of_the_files_on_disk(tmp_path):
    # External data lays tensors out its own way: the last pass's "after" is what was written,
    # as the total shows it, not the model serialized inline; a pass that changed nothing
    # shows no change.
    import onnx_shrink

    out = tmp_path / "folded.onnx"
    run = functools.partial(onnx_shrink.shrink, output=out, external_data=True, check=False)
    result = run(digits.MODEL_PATH, "fold")
    on_disk = out.stat().st_size + io.external_data_path(out).stat().st_size
    assert result.steps[-1].bytes_after == result.output_bytes == on_disk
    assert result.steps[0].bytes_before == result.input_bytes == digits.MODEL_PATH.stat().st_size
    twice = run(digits.MODEL_PATH, "fold,fold").steps
    assert not twice[1].modified and twice[1].bytes_before == twice[1].bytes_after


def test_sizes_between_passes_leave_out_the_names_given_for_the_run(tmp_path):
    # Nodes without a name are named for the run (quant.exclude needs names) and unnamed
    # again when written: swift_f0's fold step read +1% in "fold,quant", -2% alone.
    proto = onnx.load(digits.MODEL_PATH)
    for node in proto.graph.node:
        node.ClearField("name")
    path = save_proto(proto, tmp_path / "unnamed.onnx")
    alone = shrink(path, "fold", check=False, output=tmp_path / "fold.onnx")
    both = shrink(path, "fold,prune", check=False, output=tmp_path / "both.onnx")
    assert alone.output_bytes == (tmp_path / "fold.onnx").stat().st_size
    assert both.steps[0].bytes_after == alone.output_bytes
    assert both.steps[1].bytes_before == alone.output_bytes


def test_a_pass_whose_result_grew_says_so_and_a_widening_one_does_not(caplog):
    # An int8 Whisper encoder quantized again with quant.activation_matmuls=true got Q/DQ on
    # its activation products and nothing smaller: +23.5 KiB, with no word but the table's.
    import logging

    import onnx.helper as oh

    from onnx_shrink.passes.fp32 import Float32Pass
    from tests.helpers import make_model

    products = [oh.make_node("MatMul", ["x", "x"], ["p0"])]
    products += [oh.make_node("MatMul", [f"p{i}", "x"], [f"p{i + 1}"]) for i in range(7)]
    float_type = onnx.TensorProto.FLOAT
    proto = make_model(
        products,
        [oh.make_tensor_value_info("x", float_type, ["N", 8, 8])],
        [oh.make_tensor_value_info("p7", float_type, ["N", 8, 8])],
        {},
    )
    x = np.random.default_rng(3).uniform(-0.5, 0.5, (8, 8, 8)).astype(np.float32)
    with caplog.at_level(logging.WARNING):
        result = shrink(
            proto, [QuantPass(activation_matmuls=True)], calibration={"x": x}, check=False
        )
    (step,) = result.steps
    assert step.bytes_after > step.bytes_before + pipeline.GROWTH_WARNED_BYTES
    grew = [r.getMessage() for r in caplog.records if "more bytes than its input" in r.getMessage()]
    assert len(grew) == 1 and grew[0].startswith("quant(activation_matmuls=True): ")
    caplog.clear()
    half_type = onnx.TensorProto.FLOAT16
    half = make_model(
        [oh.make_node("Mul", ["h", "table"], ["y"])],
        [oh.make_tensor_value_info("h", half_type, ["N", 64])],
        [oh.make_tensor_value_info("y", half_type, ["N", 64])],
        {"table": np.ones((64, 64), np.float16)},
    )
    with caplog.at_level(logging.WARNING):
        widened = shrink(half, [Float32Pass()], check=False)
    assert widened.steps[0].bytes_after > widened.steps[0].bytes_before
    assert "more bytes than its input" not in caplog.text
