"""Array files: memory-mapped where the format allows, the same values either way."""

from __future__ import annotations

import mmap

import numpy as np
import pytest

from onnx_shrink.compiler.io import data_files
from onnx_shrink.errors import ShrinkError
from tests.helpers import resident_kib


@pytest.fixture
def arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "image": rng.standard_normal((5, 3, 4, 4)).astype(np.float32),
        "ids": rng.integers(0, 100, (5, 7)).astype(np.int64),
        "fortran": np.asfortranarray(rng.standard_normal((3, 4))),
        "empty": np.zeros((0, 2), np.float32),
        "scalar": np.array(3.5),
    }


def test_stored_npz_members_are_mapped_with_their_values(tmp_path, arrays):
    path = tmp_path / "data.npz"
    data_files.save_npz(path, arrays)
    loaded = data_files.load_npz(path)
    assert set(loaded) == set(arrays)
    for key, expected in arrays.items():
        np.testing.assert_array_equal(loaded[key], expected)
        assert loaded[key].dtype == expected.dtype
    assert isinstance(loaded["image"], np.memmap)
    assert not loaded["image"].flags.writeable


def test_compressed_npz_members_are_read_whole(tmp_path, arrays):
    path = tmp_path / "data.npz"
    np.savez_compressed(path, **arrays)
    loaded = data_files.load_npz(path)
    assert not isinstance(loaded["image"], np.memmap)
    for key, expected in arrays.items():
        np.testing.assert_array_equal(loaded[key], expected)


def test_object_arrays_are_refused(tmp_path):
    path = tmp_path / "pickled.npz"
    np.savez(path, names=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ShrinkError, match="pickled.npz: cannot read as .npz"):
        data_files.load_npz(path)


def test_not_an_archive_is_one_clear_error(tmp_path):
    path = tmp_path / "bad.npz"
    path.write_bytes(b"not a zip")
    with pytest.raises(ShrinkError, match="bad.npz: cannot read as .npz"):
        data_files.load_npz(path)


def test_npy_files_are_mapped(tmp_path, arrays):
    path = tmp_path / "image.npy"
    np.save(path, arrays["image"])
    loaded = data_files.load_npy(path)
    assert isinstance(loaded, np.memmap)
    np.testing.assert_array_equal(loaded, arrays["image"])


@pytest.mark.skipif(not hasattr(mmap, "MADV_DONTNEED"), reason="needs madvise")
def test_released_pages_of_a_mapped_npz_leave_the_process_and_read_back_unchanged(tmp_path):
    values = np.arange(16 << 20, dtype=np.float32).reshape(64, -1)  # 64 MiB
    data_files.save_npz(tmp_path / "big.npz", {"x": values})
    mapped = data_files.load_npz(tmp_path / "big.npz")["x"]
    before = resident_kib()
    assert float(mapped.sum(dtype=np.float64)) == float(values.sum(dtype=np.float64))
    touched = resident_kib()
    for row in range(0, 64, 8):
        data_files.release_pages(mapped[row : row + 8])
    released = resident_kib()
    assert touched - before > 48 << 10  # reading it mapped most of its 64 MiB in
    assert touched - released > 48 << 10  # and releasing gave them back
    np.testing.assert_array_equal(mapped[37], values[37])  # faulted back in from the file
    data_files.release_pages(values[:8])  # not mapped: nothing to do
    # A plain array over the mapping (what a per-sample .npz item is fed as) hands back too.
    float(mapped.sum(dtype=np.float64))
    touched = resident_kib()
    for row in range(64):
        data_files.release_pages(np.asarray(mapped[row]))
    assert touched - resident_kib() > 48 << 10


def test_a_file_that_is_no_npy_array_is_named_so_not_taken_for_a_pickle(tmp_path):
    """A JSON labels file was refused with numpy's advice to load it as a pickle."""
    path = tmp_path / "labels.json"
    path.write_text('{"a.png": 1}')
    with pytest.raises(ShrinkError) as raised:
        data_files.load_npy(path)
    message = str(raised.value)
    assert "cannot read as .npy (no NumPy array: it starts with b'{\"a.pn'" in message
    assert "pickle" not in message
