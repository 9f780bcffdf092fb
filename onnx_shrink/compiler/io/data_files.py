"""Data files: arrays (``.npz``, ``.npy``, serialized ``TensorProto``) and small text files.

Contract:

* Arrays are memory-mapped wherever the format allows: a ``.npy`` file, and every member of
  an ``.npz`` stored uncompressed (what ``np.savez`` writes). Reading a calibration set one
  sample at a time then holds one sample in memory, not the file; compressed members
  (``np.savez_compressed``) are read whole. Mapped arrays are read-only.
* Pickled (object) arrays are refused; every failure is a ``ShrinkError`` naming the file.
"""

from __future__ import annotations

import mmap
import os
import struct
import tempfile
import zipfile
from pathlib import Path

import google.protobuf.message
import numpy as np
import onnx
import onnx.numpy_helper

from onnx_shrink.compiler.io.validation import first_line
from onnx_shrink.errors import ShrinkError

# A zip local file header: signature, versions, flags, method, times, crc, sizes, then the
# lengths of the file name and the extra field; the member's bytes follow both.
_LOCAL_HEADER = struct.Struct("<4s5H3L2H")
_LOCAL_SIGNATURE = b"PK\x03\x04"
_NPY_MAGIC = b"\x93NUMPY"


def load_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read an ``.npz`` archive into a dict of arrays, memory-mapping stored members."""
    try:
        with zipfile.ZipFile(path) as archive, open(path, "rb") as raw:
            members = [info for info in archive.infolist() if info.filename.endswith(".npy")]
            arrays = {}
            for info in members:
                key = info.filename[: -len(".npy")]
                mapped = _map_member(path, raw, info) if info.compress_type == 0 else None
                if mapped is None:
                    with archive.open(info) as member:
                        mapped = np.lib.format.read_array(member, allow_pickle=False)
                arrays[key] = mapped
            return arrays
    except (OSError, ValueError, zipfile.BadZipFile, struct.error) as e:
        raise ShrinkError(f"{path}: cannot read as .npz ({first_line(e)}{_hint(e)})") from e


def _hint(error: Exception) -> str:
    """What to do instead of storing object arrays, which are pickles (never loaded: a pickle
    runs code): strings go in as str arrays, which onnxruntime takes for string inputs."""
    if "Object arrays" not in str(error) and "Python objects" not in str(error):
        return ""
    return "; store strings as str arrays (np.array(words, dtype=str)), not dtype=object"


def _map_member(path, raw, info: zipfile.ZipInfo) -> np.ndarray | None:
    """A read-only memory map of an uncompressed ``.npy`` member, or None where none can be
    made (empty or object arrays: those are read the ordinary way)."""
    raw.seek(info.header_offset)
    fields = _LOCAL_HEADER.unpack(raw.read(_LOCAL_HEADER.size))
    if fields[0] != _LOCAL_SIGNATURE:
        raise ValueError(f"bad zip header for {info.filename}")
    name_length, extra_length = fields[-2], fields[-1]
    raw.seek(info.header_offset + _LOCAL_HEADER.size + name_length + extra_length)
    shape, fortran, dtype = _read_npy_header(raw)
    if dtype.hasobject or 0 in shape:
        return None
    order = "F" if fortran else "C"
    return np.memmap(path, dtype=dtype, mode="r", offset=raw.tell(), shape=shape, order=order)


def release_pages(array: np.ndarray) -> None:
    """Hand back the resident pages of a memory-mapped ``array`` (a slice of what
    ``load_npz``/``load_npy`` map): the mapping is read-only, so a later read faults them in
    again from the file, unchanged. Pages a read touched otherwise stay in the process (and
    its peak RSS) for the mapping's life: an 8 to 128-sample calibration set then costs its
    whole size. Does nothing for an array that is not mapped."""
    mapping = _mapping_of(array)
    if mapping is None or array.nbytes == 0 or not hasattr(mmap, "MADV_DONTNEED"):
        return
    start = array.ctypes.data - np.frombuffer(mapping, np.uint8).ctypes.data
    first = start // mmap.PAGESIZE * mmap.PAGESIZE  # neighbours' pages fault back in if read
    mapping.madvise(mmap.MADV_DONTNEED, first, start + array.nbytes - first)


def _mapping_of(array: np.ndarray) -> mmap.mmap | None:
    """The file mapping under ``array``: views of a memmap, and plain arrays over one
    (``np.asarray(mapped[i])``), reach it through their ``base`` chain."""
    base = array
    while base is not None and not isinstance(base, mmap.mmap):
        base = getattr(base, "base", None)
    return base


def _read_npy_header(handle) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = np.lib.format.read_magic(handle)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(handle)
    return np.lib.format.read_array_header_2_0(handle)


def save_npz(path: str | os.PathLike, arrays: dict[str, np.ndarray]) -> None:
    """Write arrays to an uncompressed ``.npz`` (so ``load_npz`` maps them)."""
    with open(path, "wb") as handle:
        np.savez(handle, **arrays)


def load_npy(path: str | os.PathLike) -> np.ndarray:
    """Read one ``.npy`` array, memory-mapped (no pickles)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(len(_NPY_MAGIC))
        if head != _NPY_MAGIC:
            # np.load takes any other file for a pickle, and its error advised unpickling a
            # JSON labels file.
            raise ShrinkError(
                f"{path}: cannot read as .npy (no NumPy array: it starts with {head!r}; "
                "write arrays with numpy.save or numpy.savez)"
            )
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ShrinkError(f"{path}: cannot read as .npy ({first_line(e)}{_hint(e)})") from e


def load_tensor_pb(path: str | os.PathLike) -> tuple[str, np.ndarray]:
    """Read a serialized ``TensorProto`` (onnxruntime's test-data layout): (name, array)."""
    tensor = onnx.TensorProto()
    try:
        tensor.ParseFromString(Path(path).read_bytes())
        return tensor.name, onnx.numpy_helper.to_array(tensor)
    except (OSError, google.protobuf.message.DecodeError, ValueError) as e:
        raise ShrinkError(f"{path}: not a serialized TensorProto ({first_line(e)})") from e


def read_text(path: str | os.PathLike) -> str:
    """Read a small UTF-8 text file (recipes), with or without a byte-order mark (Windows
    editors write one); errors become one clear line."""
    try:
        return Path(path).read_text(encoding="utf-8-sig")
    except OSError as e:
        raise ShrinkError(f"{path}: cannot be read ({e.strerror or e})") from e
    except UnicodeDecodeError as e:
        raise ShrinkError(
            f"{path}: not UTF-8 text (byte {e.start} is {e.object[e.start]:#04x}); save it as UTF-8"
        ) from e


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file atomically (reports)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent or ".")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a report is an ordinary file
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
