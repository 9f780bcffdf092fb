"""Models that mix the samples of a batch run each sample alone in the check and calibration."""

from __future__ import annotations

import logging
import mmap

import numpy as np
import onnx
import onnx.helper as oh
import onnx_ir as ir
import pytest

import onnx_shrink
from onnx_shrink.compiler.io import data_files
from onnx_shrink.runtime_check import batch_mixing, checker, data, sessions
from onnx_shrink.runtime_check.batch_mixing import mixed_output
from tests.helpers import OneSampleReader, make_model, resident_kib

WIDTH = 8


def _normalized(over_batch: bool, divide: bool = True) -> onnx.ModelProto:
    """``z = MatMul(h / max(h), w2)``, ``h = MatMul(x, w1)``: the max over every axis, batch
    included (``over_batch``, as openWakeWord's mel model takes it), or over each row's own
    features. ``divide=False``: ``z = MatMul(h, w2)``, the same outputs' names, no mixing."""
    rng = np.random.default_rng(0)
    inits = {
        "w1": rng.standard_normal((WIDTH, WIDTH)).astype(np.float32),
        "w2": rng.standard_normal((WIDTH, WIDTH)).astype(np.float32),
    }
    reduce = {"keepdims": 0} if over_batch else {"keepdims": 1, "axes": [1]}
    nodes = [oh.make_node("MatMul", ["x", "w1"], ["h"])]
    if divide:
        nodes += [
            oh.make_node("Abs", ["h"], ["a"]),
            oh.make_node("ReduceMax", ["a"], ["m"], **reduce),
            oh.make_node("Div", ["h", "m"], ["y"]),
            oh.make_node("MatMul", ["y", "w2"], ["z"]),
        ]
    else:
        nodes.append(oh.make_node("MatMul", ["h", "w2"], ["z"]))
    float_nx = onnx.TensorProto.FLOAT
    inputs = [oh.make_tensor_value_info("x", float_nx, ["N", WIDTH])]
    outputs = [oh.make_tensor_value_info("z", float_nx, ["N", WIDTH])]
    return make_model(nodes, inputs, outputs, inits)


def _samples(count: int = 16) -> np.ndarray:
    """Rows of very different magnitudes: each row's max differs from its batch's."""
    rng = np.random.default_rng(1)
    scales = np.geomspace(0.1, 100.0, count, dtype=np.float32)[:, None]
    return (rng.standard_normal((count, WIDTH)) * scales).astype(np.float32)


def _session(model: onnx.ModelProto):
    return sessions.create_session(model.SerializeToString())


def _specs(model: onnx.ModelProto) -> list[data.InputSpec]:
    return data.specs_from_model(ir.from_proto(model))


def _run(session, x: np.ndarray) -> dict[str, np.ndarray]:
    """Output ``z`` of one run of ``session`` on ``x``."""
    return {"z": session.run(["z"], {"x": x})[0]}


def test_an_output_whose_rows_move_with_their_batch_mates_is_named():
    x = _samples(2)
    for over_batch, expected in ((True, "z"), (False, None)):
        session = _session(_normalized(over_batch))
        alone = [_run(session, x[:1]), _run(session, x[1:])]
        assert mixed_output(alone, _run(session, x)) == expected


def test_rounding_differences_and_outputs_without_sample_rows_say_nothing():
    rows = np.array([[1.0, -2.0], [3.0, 4.0]], np.float32)
    alone = [
        {"y": rows[:1], "n": np.int64(7), "i": np.array([1]), "t": rows.T[:, :1]},
        {"y": rows[1:], "n": np.int64(7), "i": np.array([2]), "t": rows.T[:, 1:]},
    ]
    nudged = rows * (1 + 1e-6)
    # A scalar, an integer output that moved, and rows not laid out per sample (``t``: a
    # sample a column) are skipped.
    joined = {"y": nudged, "n": np.int64(9), "i": np.array([5, 6]), "t": rows.T}
    assert mixed_output(alone, joined) is None
    moved = rows.copy()
    moved[1, 0] += 0.1  # 2.5% of the output's largest magnitude
    assert mixed_output(alone, {"y": moved}) == "y"
    assert mixed_output(alone, {"y": np.concatenate([rows, rows])}) is None  # 4 rows for 2


def test_data_a_mixing_model_reads_comes_one_whole_sample_per_feed(caplog):
    model = _normalized(over_batch=True)
    specs = _specs(model)
    dataset = data.prepare(specs, {"x": _samples()})
    assert [b.samples for b in dataset.batches()] == [16]  # joined, as read
    with caplog.at_level(logging.WARNING):
        vetted = batch_mixing.vetted(dataset, specs, _session(model), "mel.onnx")
    assert "mel.onnx mixes the samples of a batch: output 'z'" in caplog.text
    feeds = [b.feed["x"] for b in vetted.batches()]
    assert [f.shape for f in feeds] == [(1, WIDTH)] * 16
    np.testing.assert_array_equal(np.concatenate(feeds), _samples())
    assert vetted.whole_samples and not vetted.independent_samples  # nothing joins them again


def test_the_trial_runs_the_quietest_sample_beside_the_loudest():
    """Mixing may show only between samples far apart: ``Clip(x, min=max(x) - 3)``, the
    max over the batch (the mel model's 80 dB floor), leaves row i of [i, i + 1] alone
    unless a batch-mate's max is 3 above its own. Rows 0 and 1 joined read as alone."""
    model = make_model(
        [
            oh.make_node("ReduceMax", ["x"], ["m"], keepdims=0),
            oh.make_node("Sub", ["m", "depth"], ["floor"]),
            oh.make_node("Clip", ["x", "floor"], ["z"]),
        ],
        [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", WIDTH])],
        [oh.make_tensor_value_info("z", onnx.TensorProto.FLOAT, ["N", WIDTH])],
        {"depth": np.array(3.0, np.float32)},
    )
    rng = np.random.default_rng(2)
    rows = np.arange(16, dtype=np.float32)[:, None] + rng.random((16, WIDTH), np.float32)
    shuffled = rows[[5, 6, 15, 1, 0, 2, 3, 4, 7, 8, 9, 10, 11, 12, 13, 14]]
    specs = _specs(model)
    session = _session(model)
    first_two = [_run(session, shuffled[i : i + 1]) for i in (0, 1)]
    assert mixed_output(first_two, _run(session, shuffled[:2])) is None
    vetted = batch_mixing.vetted(data.prepare(specs, {"x": shuffled}), specs, session)
    assert vetted.whole_samples


def _with_batch(op: str) -> onnx.ModelProto:
    """``z = x + N / 2`` (N: the batch size; "Add"), or ``z = CumSum(x)`` over the batch
    (each row the sum of those before it too; "CumSum")."""
    float_nx = onnx.TensorProto.FLOAT
    if op == "Add":
        nodes = [
            oh.make_node("Shape", ["x"], ["shape"], end=1),
            oh.make_node("Cast", ["shape"], ["n"], to=float_nx),
            oh.make_node("Mul", ["n", "half"], ["n2"]),
            oh.make_node("Add", ["x", "n2"], ["z"]),
        ]
    else:
        nodes = [oh.make_node("CumSum", ["x", "axis"], ["z"])]
    inits = {"half": np.array(0.5, np.float32), "axis": np.array(0, np.int64)}
    return make_model(
        nodes,
        [oh.make_tensor_value_info("x", float_nx, ["N", WIDTH])],
        [oh.make_tensor_value_info("z", float_nx, ["N", WIDTH])],
        {k: v for k, v in inits.items() if k == ("half" if op == "Add" else "axis")},
    )


def test_rows_that_move_with_the_batch_size_but_not_with_the_batch_mate_do_not_mix(caplog):
    """Found in PP-OCRv4 rec's quant.max_error search: "candidate mixes the samples of a
    batch" for 2 of 11 candidates, whose int8 rounding tipped between runs of one and two
    samples (another kernel's sums), while a sample beside a copy of itself read exactly as
    beside the other one. ``x + N / 2`` moves with the batch size alone, as those do: its
    samples are independent. A cumulative sum over the batch moves only the second row, with
    the first: the sample beside a copy of itself tells it."""
    x = np.random.default_rng(3).standard_normal((16, WIDTH)).astype(np.float32)
    for op, mixes in (("Add", False), ("CumSum", True)):
        model = _with_batch(op)
        specs = _specs(model)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="onnx_shrink"):
            vetted = batch_mixing.vetted(data.prepare(specs, {"x": x}), specs, _session(model))
        assert vetted.independent_samples is not mixes and vetted.whole_samples is mixes
        assert ("mixes the samples of a batch" in caplog.text) is mixes
        assert ("another batch size's arithmetic, not mixing" in caplog.text) is not mixes


def test_data_an_independent_model_reads_is_marked_and_keeps_its_batches(caplog):
    model = _normalized(over_batch=False)
    specs = _specs(model)
    dataset = data.prepare(specs, {"x": _samples()})
    with caplog.at_level(logging.WARNING):
        vetted = batch_mixing.vetted(dataset, specs, _session(model))
    assert caplog.text == ""
    assert vetted.independent_samples and not vetted.whole_samples
    assert [b.samples for b in vetted.batches()] == [16]


def test_a_one_shot_reader_is_not_read_past_the_feed_it_showed():
    model = _normalized(over_batch=True)
    specs = _specs(model)
    reader = OneSampleReader(_samples(4), "x")
    dataset = data.prepare(specs, reader)
    assert batch_mixing.vetted(dataset, specs, _session(model)) is dataset  # one sample seen
    assert reader.calls == 1
    assert [b.feed["x"][0, 0] for b in dataset.batches()] == list(_samples(4)[:, 0])


def test_a_model_that_fails_on_two_samples_leaves_the_data_to_its_readers():
    """A dynamic batch axis declared, one sample taken (a torch export's Reshape)."""
    model = make_model(
        [oh.make_node("Reshape", ["x", "shape"], ["z"])],
        [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", WIDTH])],
        [oh.make_tensor_value_info("z", onnx.TensorProto.FLOAT, [1, WIDTH])],
        {"shape": np.array([1, WIDTH], np.int64)},
    )
    specs = _specs(model)
    dataset = data.prepare(specs, {"x": _samples(4)})
    assert batch_mixing.vetted(dataset, specs, _session(model)) is dataset


def _entries(x: np.ndarray) -> dict[str, np.ndarray]:
    """Each sample given whole, as one entry: the data runs one sample at a time."""
    return {"x": x[:, None, :]}


@pytest.mark.parametrize("check", [True, False])
def test_shrink_writes_and_checks_alike_whether_samples_come_joined_or_one_by_one(check):
    """Calibration's ranges and the check's figures are those of samples run alone: joined,
    ``h / max(h)`` took the batch's max and both moved (the model differed without the fix,
    and the check read another SNR)."""
    model = _normalized(over_batch=True)
    results = []
    for given in ({"x": _samples()}, _entries(_samples())):
        options = onnx_shrink.CheckOptions(data=given, latency_runs=0) if check else False
        result = onnx_shrink.shrink(model, "quant", calibration=given, check=options)
        snr = result.verification.numeric.outputs[0].snr_db if check else None
        results.append((ir.to_proto(result.model).SerializeToString(), snr))
    assert results[0] == results[1]


def test_the_check_runs_alone_where_only_the_candidate_mixes(caplog):
    """The input model keeps rows apart; its compressed copy need not (quantized, the mel
    model's zeros under a Log met a batch-wide max)."""
    reference, candidate = _normalized(True, divide=False), _normalized(True)
    with caplog.at_level(logging.WARNING):
        joined = checker.compare(reference, candidate, {"x": _samples()})
    assert "candidate mixes the samples of a batch" in caplog.text
    alone = checker.compare(reference, candidate, _entries(_samples()))
    assert joined.outputs[0].snr_db == alone.outputs[0].snr_db
    assert joined.samples == alone.samples == 16


def test_a_candidate_checked_again_on_the_same_data_is_said_to_mix_once(caplog):
    """quant.max_error's search checks a candidate per measurement: a CRNN whose LSTMs
    quantize per run was said to mix 5 times in one run (sweep 12)."""
    reference, candidate = _normalized(True, divide=False), _normalized(True)
    given = data.prepare(_specs(reference), {"x": _samples()})
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            checker.compare(reference, candidate, given)
    warnings = [r for r in caplog.records if "mixes the samples" in r.getMessage()]
    assert len(warnings) == 1


@pytest.mark.network
def test_openwakeword_mel_runs_each_clip_alone(caplog):
    """The real model: a loud clip and one 40 dB quieter. Joined, the quiet clip's dB floor
    was the loud one's, and the check's figures were those of a batch the package never
    runs."""
    from models.fetch import fetch
    from models.inputs import sample_inputs

    path = str(fetch("oww-mel"))
    clips = sample_inputs("oww-mel")["input"]
    figures = []
    for given in ({"input": clips}, {"input": clips[:, None, :]}):
        check = onnx_shrink.CheckOptions(data=given, latency_runs=0)
        with caplog.at_level(logging.WARNING):
            # Asked to quantize the log-mel front end that rule 9 keeps float (placement):
            # the quiet clip's figures are then those that mixing changed.
            result = onnx_shrink.shrink(path, "quant", sets="quant.log_inputs=true", check=check)
        output = result.verification.numeric.outputs[0]
        figures.append((output.snr_db, output.cosine))
    assert f"{path} mixes the samples of a batch: output 'output'" in caplog.text
    assert figures[0] == figures[1]


def _with_dead_double_erf(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` plus an Erf on a float64 copy of ``x`` that nothing reads: onnxruntime's
    CPU has no float64 Erf, so it refuses the model until ``fold`` drops the node."""
    dead = onnx.ModelProto()
    dead.CopyFrom(model)
    dead.graph.node.extend(
        [
            oh.make_node("Cast", ["x"], ["x64"], to=onnx.TensorProto.DOUBLE),
            oh.make_node("Erf", ["x64"], ["unread"]),
        ]
    )
    return dead


def test_a_model_only_its_first_passes_make_loadable_is_calibrated_a_sample_a_run():
    """The trial could not load the input model: whether it mixes a batch's samples is
    untried, so each runs alone, and ``fold`` then makes it loadable for the collector.
    Before, the trial's load error stopped ``shrink`` with "the model: onnxruntime cannot
    load it"."""
    mixing = _with_dead_double_erf(_normalized(over_batch=True))
    with pytest.raises(onnx_shrink.errors.BadModelError):
        _session(mixing)
    result = onnx_shrink.shrink(mixing, "fold,quant", calibration={"x": _samples()}, check=False)
    alone = onnx_shrink.shrink(
        _normalized(over_batch=True), "fold,quant", calibration=_entries(_samples()), check=False
    )
    assert _scales(result.model) == _scales(alone.model)


def _scales(model: ir.Model) -> dict[str, list[float]]:
    """The model's quantization scales by initializer name."""
    return {
        name: value.const_value.numpy().tolist()
        for name, value in model.graph.initializers.items()
        if name.endswith("_scale")
    }


def test_calibration_that_cannot_load_the_model_says_so():
    mixing = _with_dead_double_erf(_normalized(over_batch=False))
    with pytest.raises(onnx_shrink.errors.BadModelError, match="^calibration on cpu: the model"):
        onnx_shrink.shrink(mixing, "quant", calibration={"x": _samples()}, check=False)


@pytest.mark.skipif(not hasattr(mmap, "MADV_DONTNEED"), reason="needs madvise")
def test_weighing_a_mapped_npz_for_the_trial_hands_its_pages_back(tmp_path):
    """The trial pair is chosen from every sample of the first feed: an .npz's whole array.
    Weighed all at once, PP-OCRv4 det's 128 samples stayed resident (150 MB, calibration's
    peak); weighed as each is split off, each sample's pages go back before the next."""
    width = 1 << 18  # a MiB a sample, 64 of them
    model = make_model(
        [oh.make_node("Relu", ["x"], ["z"])],
        [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", width])],
        [oh.make_tensor_value_info("z", onnx.TensorProto.FLOAT, ["N", width])],
        {},
    )
    rows = np.random.default_rng(3).standard_normal((64, width), dtype=np.float32)
    rows[17] *= 100.0  # the loudest
    rows[40] *= 0.01  # the quietest
    data_files.save_npz(tmp_path / "big.npz", {"x": rows})
    specs, session = _specs(model), _session(model)
    dataset = data.prepare(specs, data_files.load_npz(tmp_path / "big.npz"))
    before = resident_kib()
    vetted = batch_mixing.vetted(dataset, specs, session)
    assert vetted.independent_samples
    assert resident_kib() - before < 16 << 10  # of the file's 64 MiB
    pair = batch_mixing._trial_pair(dataset, specs)
    np.testing.assert_array_equal(np.concatenate([s.feed["x"] for s in pair]), rows[[40, 17]])


@pytest.mark.parametrize(
    "values, largest",
    [
        ([], 0.0),
        ([1.0, -3.0, 2.0], 3.0),
        ([np.inf, -2.0], 2.0),
        ([np.nan, 5.0, -np.inf], 5.0),
        ([np.nan], 0.0),
    ],
)
def test_a_samples_magnitude_is_its_largest_finite_one(values, largest):
    assert batch_mixing._largest_finite(np.array(values, np.float32)) == largest


def test_a_candidate_that_mixes_through_per_run_int8_scales_is_told_so(caplog, tmp_path):
    """quant-dynamic's DynamicQuantizeMatMul takes one scale per run from every row in it: on
    occular-deskew's CNN the warning blamed "a reduction or normalization over the batch
    axis", which the model has none of."""
    reference = _normalized(True, divide=False)
    result = onnx_shrink.shrink(
        reference, "quant-dynamic", sets=("quant-dynamic.min_weight_elements=0",), check=False
    )
    candidate = tmp_path / "dynamic.onnx"
    candidate.write_bytes(ir.to_proto(result.model).SerializeToString())
    with caplog.at_level(logging.WARNING):
        checker.compare(reference, candidate, {"x": _samples()})
    assert "dynamic.onnx mixes the samples of a batch" in caplog.text
    assert "one int8 scale per run, shared by every sample in it: its 2 " in caplog.text
    assert "reduction or normalization" not in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # a model that mixes through its own arithmetic
        checker.compare(reference, _normalized(True), {"x": _samples()})
    assert "(a reduction or normalization over the batch axis)" in caplog.text


def test_an_input_model_with_per_run_scales_is_told_so_for_both_datasets(caplog, tmp_path):
    """pyfrspell's GRU model comes int8 already (3 DynamicQuantizeLinear nodes): the check's
    data was said to mix through "a reduction or normalization over the batch axis" and
    named the model by its path, where calibration's data gave the true cause and named it
    "the input model"."""
    dynamic = onnx_shrink.shrink(
        _normalized(True, divide=False),
        "quant-dynamic",
        sets=("quant-dynamic.min_weight_elements=0",),
        check=False,
    )
    path = tmp_path / "int8.onnx"
    path.write_bytes(ir.to_proto(dynamic.model).SerializeToString())
    rows = _samples(32)
    # In a file: data described alike ("arrays") is told once, whatever reads it.
    np.savez(tmp_path / "check.npz", x=rows[:16])
    check = onnx_shrink.CheckOptions(data=tmp_path / "check.npz", latency_runs=0)
    with caplog.at_level(logging.WARNING):
        onnx_shrink.shrink(str(path), "quant", calibration={"x": rows[16:]}, check=check)
    warnings = [r.getMessage() for r in caplog.records if "mixes the samples" in r.getMessage()]
    assert len(warnings) == 2  # the check's data, then calibration's
    for warning in warnings:
        assert f"{path} mixes the samples of a batch" in warning
        assert "one int8 scale per run, shared by every sample in it: its 2 " in warning
