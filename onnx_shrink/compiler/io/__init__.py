"""Model I/O: this package is the only place files and protobufs are read or written.

This module holds model files and protobufs; ``io.data_files`` holds arrays and text files
(memory-mapped where the format allows); ``io.large_tensors`` holds what must not serialize
large weights (exact saved size, shape inference, in-memory sources for onnxruntime).

Contract:

* ``load`` validates before it returns: a bad input raises ``BadModelError`` whose message is
  one line naming the file and the problem. The input file is opened read-only; large tensors
  stay memory-mapped (onnx_ir's ``ExternalTensor``) so a model over 2 GB is not held twice.
* ``load`` of an in-memory model (``onnx.ModelProto`` or ``onnx_ir.Model``) returns a model the
  caller may rewrite freely without touching the caller's object.
* ``save`` is atomic: everything is written into a temporary folder beside the target and
  renamed into place, so a failure leaves any earlier file untouched and an external-data file
  is always written fresh, never appended to. External data is used when asked for or when the
  model would pass protobuf's 2 GB limit.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import google.protobuf.message
import onnx
import onnx.numpy_helper
import onnx_ir as ir

from onnx_shrink.compiler import walk
from onnx_shrink.compiler.io import embedded_weights, external, validation
from onnx_shrink.compiler.io.validation import first_line
from onnx_shrink.compiler.io.zipped import zipped_bytes, zipped_size  # noqa: F401
from onnx_shrink.errors import BadModelError, ShrinkError

logger = logging.getLogger(__name__)

ModelSource = str | os.PathLike | bytes | onnx.ModelProto | ir.Model


# Protobuf refuses to serialize messages of 2 GiB or more; keep a margin for the graph itself.
EXTERNAL_DATA_THRESHOLD_BYTES = 1_800_000_000


# The external-data location of a stand-in for a tensor handed to onnxruntime in memory
# (compiler.io.large_tensors): serialization keeps it a reference, never reads it.
IN_MEMORY_LOCATION = "onnx-shrink:in-memory"


@dataclasses.dataclass(frozen=True)
class SavedModel:
    """Where a model was written and how many bytes it takes on disk (model + external data)."""

    path: Path
    external_data_path: Path | None
    bytes_on_disk: int


def load(source: ModelSource, label: str | None = None) -> ir.Model:
    """Load and validate a model from a path, serialized bytes, an ``onnx.ModelProto`` or an
    ``onnx_ir.Model``. ``label``: how messages name a model given in memory (the check's
    "candidate"), in place of "the given onnx_ir.Model".

    Raises:
        BadModelError: the file is missing, unreadable, not ONNX, truncated, rejected by
            onnx.checker, references missing external data, uses an IR/opset version
            onnxruntime does not support, or has nodes in unknown custom domains.
    """
    if isinstance(source, ir.Model):
        # Passes never write tensor data, but onnx_ir and onnxscript do rename tensors in
        # place, so the clone gets tensor objects of its own (the data stays shared).
        where = label or "the given onnx_ir.Model"
        proto = serialize_proto(source, keep_in_file=True)
        if validation.validate(proto, where):
            # onnx_ir cannot clone a graph whose nodes read values written later: a copy
            # from its protobuf is sorted instead (the caller's model stays as it is).
            model = ir.serde.deserialize_model(proto)
            _sort(model, where)
            return model
        model = source.clone()
        unshare_tensors(model)
        return model
    if isinstance(source, (bytes, bytearray)):  # as torch.onnx.export writes into BytesIO
        return _load_proto(parse_bytes(bytes(source)), owned=True, where=label)
    if isinstance(source, onnx.ModelProto):
        return _load_proto(source, owned=False, where=label)
    if not isinstance(source, (str, os.PathLike)):
        raise BadModelError(
            f"expected a path, bytes, an onnx.ModelProto or an onnx_ir.Model, not "
            f"{type(source).__name__}"
        )
    return _load_file(Path(source))


def _load_proto(proto: onnx.ModelProto, owned: bool, where: str | None = None) -> ir.Model:
    """A validated ModelProto as an onnx_ir model; copied first unless ``owned`` (parsed here
    from bytes): onnx_ir wraps the TensorProto messages it is given, and renaming such a
    tensor writes into the message, so folding renamed tensors of the caller's ModelProto
    (and made it larger). ``where``: how messages name it."""
    where = where or "the given ModelProto"
    unsorted = validation.validate(proto, where)
    outside = external.external_tensors(proto)
    if outside:  # onnx_ir would look for them in the working directory
        raise BadModelError(
            f"the given ModelProto keeps tensor '{outside[0].name}' in an external file, "
            "and a ModelProto does not say where it lives: give the model's path, or "
            "load it with its data (onnx.load(path))"
        )
    if not owned:
        copied = onnx.ModelProto()
        copied.CopyFrom(proto)
        proto = copied
    model = ir.serde.deserialize_model(proto)
    if unsorted:
        _sort(model, where)
    return model


def _sort(model: ir.Model, where: str, once: bool = False) -> None:
    """Put the nodes of every graph in topological order, as onnxruntime does when it loads a
    model, and check the model again (onnx.checker stopped at the order). ``once``: ``where``
    is a file, which a run loads more than once: said the first time only."""
    try:
        model.graph.sort()
        for function in model.functions.values():
            function.sort()
    except ValueError as e:  # onnx.checker reports a cycle as nodes out of order
        raise BadModelError(f"{where}: the nodes cannot be ordered: {first_line(e)}") from e
    validation.run_checker(
        embedded_weights.checker_view(serialize_proto(model, keep_in_file=True)), where
    )
    if not once or where not in _SORTED:
        _SORTED.add(where)
        logger.warning(
            "%s: the nodes are not in topological order (onnxruntime sorts them when it loads "
            "a model); sorted",
            where,
        )


_SORTED: set[str] = set()


def _load_file(path: Path) -> ir.Model:
    where = str(path)
    if not path.exists():
        raise BadModelError(f"{where}: no such file")
    if path.is_dir():
        raise BadModelError(f"{where}: is a directory, expected an .onnx file")
    if path.stat().st_size == 0:
        raise BadModelError(f"{where}: the file is empty")
    proto, mapped = _read_proto(path, where)
    validation.check_header(proto, where)
    external.check_external_data(proto, path.parent, where)
    unsorted = validation.run_checker(
        embedded_weights.checker_view(proto), where, allow_unsorted=True
    )
    model = ir.serde.deserialize_model(proto)
    ir.external_data.set_base_dir(model.graph, path.parent)
    for function in model.functions.values():
        for graph in function.subgraphs():
            ir.external_data.set_base_dir(graph, path.parent)
    external.follow_linked_data(model)
    embedded_weights.map_from_file(model, mapped, path.resolve())
    if unsorted:
        _sort(model, where, once=True)
    return model


def _read_proto(path: Path, where: str) -> tuple[onnx.ModelProto, set[str]]:
    """The file's ModelProto with large embedded weights left in the file (see
    ``embedded_weights``), and their names; a hard-linked file is parsed whole, since onnx_ir
    refuses to map data from a file with several links."""
    try:
        if path.resolve().stat().st_nlink == 1:
            with contextlib.suppress(embedded_weights.Malformed):
                return embedded_weights.read_model(path)
        # Not protobuf as far as the walk can tell: onnx's parser names the problem.
        return onnx.load_model(str(path), load_external_data=False), set()
    except (google.protobuf.message.DecodeError, ValueError, RuntimeError) as e:
        if _ort_format(path):
            raise BadModelError(
                f"{where}: an ONNX Runtime format (.ort) model, which only onnxruntime reads: "
                "compress the .onnx model it was converted from"
            ) from e
        raise BadModelError(
            f"{where}: not an ONNX model or the file is truncated ({first_line(e)})"
        ) from e
    except OSError as e:
        raise BadModelError(f"{where}: cannot be read ({e.strerror or e})") from e


def _ort_format(path: Path) -> bool:
    """Whether ``path`` holds an ONNX Runtime format model: a flatbuffer whose file identifier
    (bytes 4-8) is "ORTM" (piper-phonemize ships its tashkeel model so)."""
    with path.open("rb") as file:
        return file.read(8)[4:] == b"ORTM"


def unshare_tensors(model: ir.Model) -> None:
    """Give every stored tensor of ``model`` an object of its own, sharing data where it can.

    ``ir.Model.clone`` shares tensor objects with the original, and onnx_ir and onnxscript
    write tensor *names* in place (renaming a value renames its ``const_value``; serializing
    an initializer names its tensor after the value; folding a ``Constant`` adopts its tensor).
    Rewriting a clone would then rename tensors of the original. Call this on a clone before
    rewriting it. Numpy-backed and memory-mapped tensors are re-wrapped without copying data;
    a tensor read from a protobuf keeps its name in the message, so that message is copied.
    """
    owned: dict[int, ir.TensorProtocol] = {}

    def own(tensor: ir.TensorProtocol) -> ir.TensorProtocol:
        if id(tensor) not in owned:
            if isinstance(tensor, ir.serde.TensorProtoTensor):
                proto = onnx.TensorProto()
                proto.CopyFrom(tensor.raw)
                owned[id(tensor)] = ir.serde.TensorProtoTensor(proto)
            else:
                owned[id(tensor)] = copy.copy(tensor)
        return owned[id(tensor)]

    for graph in model.graphs():
        for value in graph.initializers.values():
            if value.const_value is not None:
                value.const_value = own(value.const_value)
    for node in walk.all_nodes(model):
        for name, attr in list(node.attributes.items()):
            if attr.type == ir.AttributeType.TENSOR and not attr.is_ref():
                node.attributes[name] = ir.Attr(
                    name, ir.AttributeType.TENSOR, own(attr.value), doc_string=attr.doc_string
                )
        for value in node.outputs:
            if value.const_value is not None:
                value.const_value = own(value.const_value)


def tensor_bytes(model: ir.Model) -> int:
    """Bytes of all stored tensors (initializers and Constant values, everywhere)."""
    return sum(tensor.nbytes for tensor in walk.all_tensors(model))


def save(
    model: ir.Model, path: str | os.PathLike, *, external_data: bool | None = None
) -> SavedModel:
    """Write ``model`` to ``path`` atomically and return where it went and its size on disk.

    Args:
        external_data: True to store tensors in ``<name>.data`` beside the model, False to embed
            them, None to decide by size (external above ``EXTERNAL_DATA_THRESHOLD_BYTES``).
    """
    path = Path(path)
    check_writable(path)
    if external_data is None:
        external_data = tensor_bytes(model) > EXTERNAL_DATA_THRESHOLD_BYTES
    # The producer is left as the exporter wrote it, even where none is named: naming
    # onnx-shrink made the output of a pass that changed nothing 17 bytes larger than its
    # input (fold promises never larger), and saving wrote into the caller's model.
    data_name = external_data_path(path).name if external_data else None
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    except OSError as e:
        raise ShrinkError(f"{path}: cannot write the model there ({e.strerror})") from e
    try:
        if external_data:
            # onnx_ir copies each external tensor under its size threshold into memory and
            # closes its mapping, which raises BufferError while a pass's view of it lives:
            # embedded first as copies (small: at most 256 bytes each), nothing is closed.
            with _embedded_tensors(model, keep=_over_ir_threshold, copy=True):
                ir.save(
                    model,
                    staging / path.name,
                    external_data=data_name,
                    size_threshold_bytes=IR_SAVE_THRESHOLD_BYTES,
                )
        else:
            from onnx_shrink.compiler.io import large_tensors  # it builds on this module

            large_tensors.write_embedded(model, staging / path.name)
        if data_name is not None:
            os.replace(staging / data_name, path.parent / data_name)
        os.replace(staging / path.name, path)
    except OSError as e:  # a full disk, a folder turned read-only: a line, not a traceback
        raise ShrinkError(f"{path}: cannot write the model ({e.strerror or e})") from e
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    data_path = path.parent / data_name if data_name else None
    size = path.stat().st_size + (data_path.stat().st_size if data_path else 0)
    logger.info("saved %s (%d bytes)", path, size)
    return SavedModel(path=path, external_data_path=data_path, bytes_on_disk=size)


def check_writable(path: str | os.PathLike, what: str = "output") -> None:
    """Raise ``ShrinkError`` unless a file can be created at ``path``: not a folder, in a
    folder that exists and that this process may write. Callers check before any work, so a
    typo costs nothing; writing still turns an ``OSError`` into a ``ShrinkError``."""
    path = Path(path)
    if path.is_dir():
        raise ShrinkError(f"{path}: is a directory; give the {what} a file name")
    if path.parent.exists() and not path.parent.is_dir():
        raise ShrinkError(f"{path.parent}: is a file, not a folder; the {what} cannot go in it")
    if not path.parent.is_dir():
        raise ShrinkError(f"{path.parent}: the {what} folder does not exist")
    if not os.access(path.parent, os.W_OK):
        raise ShrinkError(f"{path.parent}: the {what} folder is not writable")


def refuse_clashes(
    writes: Mapping[str, str | os.PathLike], reads: Mapping[str, str | os.PathLike]
) -> None:
    """Raise ``ShrinkError`` where a file a run writes (by what names it: ``"--report"``) is
    one it reads, or another it writes: checked before any work, so nothing is lost."""
    seen: dict[Path, str] = {}
    for flag, path in writes.items():
        where = Path(path).resolve()
        for what, read in reads.items():
            if same_file(read, where):
                raise ShrinkError(f"{path}: {flag} would write over {what}; choose another path")
        if where in seen:
            raise ShrinkError(f"{path}: {flag} and {seen[where]} would write the same file")
        seen[where] = flag


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two paths name one file (after symbolic links and ``..``)."""
    return Path(a).resolve() == Path(b).resolve()


def external_data_path(path: str | os.PathLike) -> Path:
    """Where ``save`` puts the tensors of a model saved to ``path`` with external data."""
    path = Path(path)
    return path.with_name(f"{path.name}.data")


IR_SAVE_THRESHOLD_BYTES = 256  # smaller external tensors are embedded by io.save


def _over_ir_threshold(tensor: ir.ExternalTensor) -> bool:
    return tensor.nbytes > IR_SAVE_THRESHOLD_BYTES


def _embed(
    model: ir.Model,
    keep: Callable[[ir.ExternalTensor], bool] | None = None,
    copy: bool = False,
) -> list[tuple[ir.Value, ir.TensorProtocol]]:
    """Replace memory-mapped initializers (but those ``keep`` says stay in their file) with
    in-memory views, or copies; the (value, tensor) pairs replaced."""
    swapped = []
    for value, tensor in walk.initializer_tensors(model):
        if (
            isinstance(tensor, ir.ExternalTensor)
            and tensor.location != IN_MEMORY_LOCATION
            and not (keep is not None and keep(tensor))
        ):
            swapped.append((value, tensor))
            array = tensor.numpy().copy() if copy else tensor.numpy()
            value.const_value = ir.Tensor(array, name=tensor.name)
    return swapped


@contextlib.contextmanager
def _embedded_tensors(
    model: ir.Model,
    keep: Callable[[ir.ExternalTensor], bool] | None = None,
    copy: bool = False,
) -> Iterator[None]:
    """Temporarily replace memory-mapped initializers with in-memory views so they embed
    (except those ``keep`` says stay in their file)."""
    swapped = _embed(model, keep, copy)
    try:
        yield
    finally:
        for value, tensor in swapped:
            value.const_value = tensor


def detach_from_files(model: ir.Model) -> None:
    """Make ``model`` self-contained: every initializer still read from a file (weights the
    loader left in the input file, external data) becomes a tensor of its own, memory-mapped
    until used. ``shrink`` returns its result so: serialized with any tool (``ir.save``,
    ``ir.to_proto``), a model holding file references pointed at the input's file, by an
    offset, from wherever it was written."""
    _embed(model)


def serialize_proto(
    model: ir.Model,
    *,
    keep_in_file: bool | Callable[[ir.ExternalTensor], bool] = False,
) -> onnx.ModelProto:
    """The model as a ModelProto; memory-mapped initializers are embedded unless
    ``keep_in_file`` is True (all stay references to their files) or says so of them."""
    if keep_in_file is True:
        proto = ir.serde.serialize_model(model)
    else:
        with _embedded_tensors(model, keep_in_file if callable(keep_in_file) else None):
            proto = ir.serde.serialize_model(model)
    _drop_initializer_value_info(proto.graph)
    # onnx_ir writes the default domain as an explicit "" (two bytes per import); exporters
    # leave the field unset, which means the same.
    for opset in [*proto.opset_import, *(o for f in proto.functions for o in f.opset_import)]:
        if not opset.domain:
            opset.ClearField("domain")
    return proto


def _drop_initializer_value_info(graph: onnx.GraphProto) -> None:
    """Remove value_info entries that repeat an initializer's type (onnx_ir writes them).

    The tensor already states its type and shape; the copy only makes files larger.
    """
    initializers = {t.name for t in graph.initializer}
    kept = [vi for vi in graph.value_info if vi.name not in initializers]
    if len(kept) != len(graph.value_info):
        del graph.value_info[:]
        graph.value_info.extend(kept)
    for node in graph.node:
        for subgraph in walk.proto_bodies(node):
            _drop_initializer_value_info(subgraph)


def parse_bytes(data: bytes) -> onnx.ModelProto:
    """A ModelProto from serialized bytes; bad bytes raise ``BadModelError``."""
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(data)
    except google.protobuf.message.DecodeError as e:
        raise BadModelError(f"the given bytes are not an ONNX model ({first_line(e)})") from e
    return proto


def to_bytes(model: ir.Model) -> bytes:
    """The model serialized with all tensors embedded (for in-memory sessions of small models)."""
    return serialize_proto(model).SerializeToString()


def model_files(path: str | os.PathLike) -> list[Path]:
    """A model file followed by the external-data files it references."""
    path = Path(path)
    proto, _ = _read_proto(path, str(path))
    locations = sorted(
        {
            entry.value
            for tensor in external.external_tensors(proto)
            for entry in tensor.external_data
            if entry.key == "location" and entry.value != path.name  # weights left in the file
        }
    )
    return [path, *(path.parent / loc for loc in locations if (path.parent / loc).is_file())]


def model_reads(what: str, path: str | os.PathLike) -> dict[str, Path]:
    """``{what: path}`` and each external-data file the model at ``path`` reads its weights
    from, for ``refuse_clashes`` (a report written over ``model.onnx.data`` destroys the
    model as surely as one written over ``model.onnx``). A path that holds no readable model
    gives itself alone: loading it reports the problem."""
    try:
        files = model_files(path)
    except (BadModelError, OSError):
        return {what: Path(path)}
    return {what: files[0], **{f"{what}'s weights ({p.name})": p for p in files[1:]}}


def file_bytes(path: str | os.PathLike) -> int:
    """Bytes on disk of a model file plus the external-data files it references."""
    return sum(p.stat().st_size for p in model_files(path))
