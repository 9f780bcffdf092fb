"""Constant folding and cleanup on onnxscript's optimizer, with a hard bound on model growth."""

from __future__ import annotations

import ast
import dataclasses
import logging
import math
from collections.abc import Callable
from typing import ClassVar

import onnx_ir as ir
import onnx_ir.passes.common as common_passes
from onnx_ir.passes.common import initializer_deduplication
from onnxscript import rewriter
from onnxscript.optimizer import _constant_folding

from onnx_shrink.compiler import graph_edit, io, walk
from onnx_shrink.compiler.io import large_tensors
from onnx_shrink.compiler.options import check_options, option
from onnx_shrink.compiler.pass_results import MeasuredResult
from onnx_shrink.passes import fold_freeze, fold_rules
from onnx_shrink.passes.fold_cones import FoldWeightConesPass
from onnx_shrink.passes.fold_conv_affine import ConvAffinePass
from onnx_shrink.passes.fold_loops import HoistLoopInvariantsPass
from onnx_shrink.passes.fold_reshape import ReshapeCopiedDimsPass

logger = logging.getLogger(__name__)


class _AtDebug(logging.Filter):
    """Warnings of the folder's own limits, which name no remedy, go to debug:

    - onnxscript's constant folding: "Skipping constant folding for op Split with multiple
      outputs." for each such node (tf2onnx's LSTM kernels: 4 lines on every run);
    - onnx-ir's initializer deduplication: "Skipped deduplication of initializer 'w' as it is
      a graph input or output", one line per such weight (an old torch export: 52 lines
      before the summary).
    """

    def __init__(self, phrase: str) -> None:
        super().__init__()
        self.phrase = phrase

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.WARNING and self.phrase in str(record.msg):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
        return True


logging.getLogger(_constant_folding.__name__).addFilter(_AtDebug("with multiple outputs"))
logging.getLogger(initializer_deduplication.__name__).addFilter(
    _AtDebug("as it is a graph input or output")
)

# Ops whose folded output is usually larger than their constant inputs: a 2-element shape
# becomes a filled tensor. They fold only when the result fits the expansion budget.
EXPANDING_OPS = frozenset(
    {
        "ConstantOfShape",
        "Expand",
        "Tile",
        "Range",
        "Resize",
        "Upsample",
        "Pad",
        "OneHot",
        "EyeLike",
        "RandomNormal",
        "RandomUniform",
    }
)

SMALL_GROWTH_BYTES = 1024  # a result this much larger is rewrites that do not pay, no budget
REWRITE_PROVENANCE = "pkg.onnxscript.rewriter.rule_name"  # a rewritten node's rule, in metadata

# Quantization boundaries stay as they are: folding DequantizeLinear(int8 weight) would store
# the weight as float32 again (4x larger) and hide the quantization from onnxruntime.
NEVER_FOLD = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"})


@dataclasses.dataclass(frozen=True)
class FoldPass(ir.passes.FunctionalPass):
    """Fold constants and clean up the graph, never growing the saved model past a budget.

    Rules:

    1. onnxscript's constant folder, constant expressions over weights they alone read
       folded whole where the folder declines node by node (``fold_cones``: a torch LSTM's
       gate reorder, weight normalization), Loop-carried values every iteration passes
       through unchanged read from outside the Loop (``fold_loops``: tf2onnx's Keras LSTM
       weights), its default (lossless) rewrite rules, constant
       scales and offsets next to a Conv folded into its weights (``fold_conv_affine``), Reshape
       shapes read from the reshaped tensor made constant (``fold_reshape``) and dead-code
       removal run to a fixpoint over the main graph, If/Loop/Scan bodies and model-local
       functions.
    2. Expanding ops (ConstantOfShape, Expand, Tile, ...) fold only when their output is known
       and at most ``expand_budget_bytes``; quantize/dequantize nodes never fold.
    3. ``Constant`` nodes holding tensors are lifted to initializers (subgraph constants to the
       main graph) so later passes see every weight as an initializer; not for IR < 4, where
       initializers must also be graph inputs.
    4. Equal initializers are shared and common subexpressions merged.
    5. With ``strip_stack_traces``, per-node Python stack traces that exporters leave behind
       (``pkg.torch.onnx.stack_trace`` and ``fx_node`` metadata, node doc strings) are
       dropped, with torch's record of the parameters a graph came from (``pkg.torch.
       export.ExportedProgram.graph_signature``): on a torch export they can be a quarter of
       the file. Module names and scopes stay, in a node's ``namespace`` where it holds them
       (its ``pkg.torch.onnx.name_scopes`` and ``class_hierarchy`` lists are then dropped).
    6. Inputs named in ``freeze`` become constants (``fold_freeze``) before anything folds,
       so an If on one resolves to its branch, in the main graph where ``quant`` calibrates
       it; they leave the model's inputs.
    7. Guarantee: the serialized result is at most the input's size plus ``max_growth_bytes``.
       If a run grows the model more, it is repeated without any growing fold; if that still
       grows it, the input is returned unchanged (``modified=False``) with a warning. So is
       it when the result fails strict shape inference, or onnx.checker, that the input passed.

    The pass is functional: it rewrites a clone, so a rolled-back attempt costs nothing.
    """

    name: ClassVar[str] = "fold"

    max_growth_bytes: int = option(
        0, "bytes the saved model may grow by (0: never larger than the input)", minimum=0
    )
    expand_budget_bytes: int = option(
        4096,
        "largest output an expanding op (Expand, Tile, ConstantOfShape) may fold to",
        minimum=0,
    )
    input_size_limit: int = option(
        _constant_folding.DEFAULT_CONSTANT_FOLD_INPUT_SIZE_LIMIT,
        "elements above which a constant input is only folded when this node is its sole user",
        minimum=0,
    )
    iterations: int = option(3, "fold/rewrite rounds before giving up on a fixpoint", minimum=1)
    inline_functions: bool = option(
        False, "inline model-local functions first (may grow a model that calls one often)"
    )
    strip_stack_traces: bool = option(
        True,
        "drop exporters' per-node stack traces and node doc strings, and scope lists a "
        "node's namespace repeats (model metadata is kept)",
    )
    freeze: tuple[str, ...] = option(
        (),
        "graph inputs held at one value, NAME=VALUE (sr=16000): each becomes a constant the "
        "graph is folded on (an If on it resolves to its branch), and leaves the inputs",
    )

    def __post_init__(self) -> None:
        check_options(self)
        fold_freeze.parse(self.freeze)  # a bad item fails as the pass is made

    @property
    def frozen(self) -> dict[str, float]:
        """``freeze`` parsed: the inputs held, by name."""
        return fold_freeze.parse(self.freeze)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        before = large_tensors.saved_bytes(model)
        limit = before + self.max_growth_bytes
        annotations = _Annotations.of(model)
        growth = []
        frozen = self.frozen
        for allow_growth in (True, False):
            candidate = _private_clone(model)
            fold_freeze.freeze(candidate, frozen)
            modified = self._run_pipeline(candidate, allow_growth) or bool(frozen)
            annotations.strip_new(candidate)
            after = large_tensors.saved_bytes(candidate)
            # onnxscript's rewriter deletes dead initializers without reporting a change.
            modified = modified or after != before
            if after > limit:
                growth.append(after - before)
                logger.info(
                    "fold: result of %d bytes exceeds the limit of %d (allow_growth=%s); retrying",
                    after,
                    limit,
                    allow_growth,
                )
                continue
            # Folding can expose shapes the input hid behind an If: onnx's AffineGrid body
            # feeds Range 1-element tensors where the spec wants scalars, which shape inference
            # only sees once the If is folded away, and onnxruntime then refuses the model.
            error = large_tensors.load_error(candidate) if modified else None
            if error is not None and large_tensors.load_error(model) is None:
                logger.warning(
                    "fold: the folded model fails onnx's checks (%s); keeping it unchanged",
                    error,
                )
                break
            logger.debug("fold: %d -> %d bytes (allow_growth=%s)", before, after, allow_growth)
            if not modified:  # "(no change)" in the summary said nothing of why
                _warn_folded_already("no constant subexpression to compute and no rewrite")
            return MeasuredResult(candidate, modified, before, after)
        else:
            # The input's size as serialized here, which may differ from its file's by a few
            # bytes (field order, packing): say so, or the figure looks wrong. A few bytes'
            # growth is rewrites that do not pay (Flatten as a Reshape and its shape), not a
            # budget problem: said, not warned.
            # Frozen inputs asked for and not frozen: always said.
            small = min(growth) <= SMALL_GROWTH_BYTES and not frozen
            logger.log(
                logging.INFO if small else logging.WARNING,
                "fold: no change: every attempt grew the model past %d bytes (the input "
                "re-serialized, %d, + max_growth_bytes %d; by %d bytes at least); keeping the "
                "model unchanged%s",
                limit,
                before,
                self.max_growth_bytes,
                min(growth),
                ", its inputs not frozen (raise fold.max_growth_bytes)" if frozen else "",
            )
            if small:
                _warn_folded_already(f"only rewrites that add {min(growth)} bytes and do not pay")
        return MeasuredResult(_private_clone(model), False, before, before)

    def _run_pipeline(self, model: ir.Model, allow_growth: bool) -> bool:
        budget = self.expand_budget_bytes if allow_growth else 0
        fold = _GuardedFoldConstantsPass(
            shape_inference=True,
            input_size_limit=self.input_size_limit,
            output_size_limit=_constant_folding.DEFAULT_CONSTANT_FOLD_OUTPUT_SIZE_LIMIT,
            should_fold=_growth_guard(budget),
        )
        fixpoint = ir.passes.PassManager(
            [
                fold,
                HoistLoopInvariantsPass(),
                FoldWeightConesPass(self.input_size_limit),
                # Before the cleanups: a folded If's other branch must not keep weights alive.
                _DropDeadUsesPass(),
                rewriter.RewritePass(fold_rules.DEFAULT_RULES),
                ConvAffinePass(allow_bias_growth=allow_growth),
                ReshapeCopiedDimsPass(),
                common_passes.RemoveUnusedNodesPass(),
                common_passes.RemoveUnusedFunctionsPass(),
                common_passes.RemoveUnusedOpsetsPass(),
            ],
            steps=self.iterations,
            early_stop=True,
        )
        stages: list[ir.passes.PassBase] = []
        if self.inline_functions:
            stages.append(common_passes.InlinePass())
        if self.strip_stack_traces:
            stages.append(_StripStackTracesPass())
        if model.ir_version >= 4:
            # Weights stored as Constant nodes (Paddle and some torch exports) must be
            # initializers before the loop: the BatchNormalization->Conv rule only fuses those.
            stages.append(
                common_passes.LiftConstantsToInitializersPass(
                    lift_all_constants=False, size_limit=1
                )
            )
        stages.append(fixpoint)  # each of its rounds ends with dead code removed
        if model.ir_version >= 4:
            stages += [
                common_passes.LiftConstantsToInitializersPass(
                    lift_all_constants=False, size_limit=1
                ),
                common_passes.LiftSubgraphInitializersToMainGraphPass(),
            ]
        stages += [
            common_passes.DeduplicateInitializersPass(),
            common_passes.CommonSubexpressionEliminationPass(),
            # The lift moves a body's initializers up whether read or not (a folded inner
            # If's weights: silero VAD's 1 MB of LSTM weights), and only main-graph ones are
            # dropped unread.
            common_passes.RemoveUnusedNodesPass(),
            common_passes.OutputFixPass(),
        ]
        return ir.passes.Sequential(*stages)(model).modified


def _warn_folded_already(found: str) -> None:
    """The one warning of a fold that changed nothing because nothing was left to fold."""
    logger.warning("fold: no change: %s: the graph is folded already", found)


class _DropDeadUsesPass(ir.passes.InPlacePass):
    """``graph_edit.drop_dead_uses``: nodes in no graph stop reading the model's values."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        return ir.passes.PassResult(model, graph_edit.drop_dead_uses(model) > 0)


STACK_TRACE_KEYS = frozenset({"pkg.torch.onnx.stack_trace", "pkg.torch.onnx.fx_node"})
"""a node's Python stack trace, and the text of the torch.fx node it was exported from"""
SIGNATURE_KEYS = frozenset({"pkg.torch.export.ExportedProgram.graph_signature"})
"""a graph's record of the torch parameters and buffers it was exported from (8.7 KB on a
MobileNetV3), which names BatchNorm buffers once fold has fused them"""
SCOPE_KEYS = ("pkg.torch.onnx.name_scopes", "pkg.torch.onnx.class_hierarchy")
"""torch's module scopes and classes, as lists: its ``namespace`` joins both"""


class _StripStackTracesPass(ir.passes.InPlacePass):
    """Drop per-node stack traces (metadata and doc strings) that exporters write for
    debugging, and the scope lists a node's ``namespace`` holds as it is: a MobileNetV3 from
    torch's dynamo exporter, quantized, kept 40 KB of node metadata in 208 KB, where
    onnxruntime's quantizer wrote 185 KB in all."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        for graph in (model.graph, *model.graph.subgraphs()):
            for key in SIGNATURE_KEYS & graph.metadata_props.keys():
                del graph.metadata_props[key]
                modified = True
        for node in walk.all_nodes(model):
            props = node.metadata_props
            dropped = STACK_TRACE_KEYS & props.keys()
            if _scopes_in_namespace(props):
                dropped |= set(SCOPE_KEYS)
            for key in dropped:
                del props[key]
            if node.doc_string:
                node.doc_string = None
                modified = True
            modified |= bool(dropped)
        return ir.passes.PassResult(model, modified)


def _scopes_in_namespace(props: dict[str, str]) -> bool:
    """Whether ``props`` has both ``SCOPE_KEYS`` and a ``namespace`` that joins them as
    torch writes it ("scope: class/..."), so that it still gives both without them."""
    if "namespace" not in props or not all(key in props for key in SCOPE_KEYS):
        return False
    try:
        scopes, classes = (ast.literal_eval(props[key]) for key in SCOPE_KEYS)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return False
    if not isinstance(scopes, list) or not isinstance(classes, list):
        return False
    if len(scopes) != len(classes):
        return False
    joined = "/".join(f"{scope}: {cls}" for scope, cls in zip(scopes, classes, strict=True))
    return joined == props["namespace"]


class _GuardedFoldConstantsPass(_constant_folding.FoldConstantsPass):
    """onnxscript's constant folder, declining nodes its op-specific evaluators get wrong.

    Both are onnxscript 0.7.2 behaviours, found by the conformance sweep:

    1. The ``CastLike`` evaluator rewrites ``CastLike(x, like)`` to ``Cast(x, to=...)`` and
       drops ``saturate`` and ``round_mode``: a ``saturate=0`` cast to float8 then saturates
       instead of giving inf/NaN. CastLike nodes with attributes are left alone.
    2. onnxscript wraps an evaluator's exception in a RuntimeError that aborts the whole pass;
       ``split_to_sequence`` raises one (``split_value.ndim`` on None) when ``split`` is a
       scalar graph input. An evaluator builds its replacement on a tape and has not touched
       the graph when it raises, so the node is declined and the pass goes on.
    """

    def process_node(
        self, node: ir.Node, is_function: bool
    ) -> _constant_folding.Replacement | None:
        if node.op_type == "CastLike" and node.domain in ("", "ai.onnx") and node.attributes:
            logger.debug("fold: not folding %s (CastLike): it would lose its attributes", node.name)
            return None
        try:
            return super().process_node(node, is_function=is_function)
        except RuntimeError as e:
            if not str(e).startswith("Error during constant folding"):
                raise
            logger.debug("fold: not folding %s (%s): %r", node.name, node.op_type, e.__cause__)
            return None


def _private_clone(model: ir.Model) -> ir.Model:
    """A clone that shares no tensor objects with ``model`` (see ``io.unshare_tensors``).

    onnxscript's folder adopts a Constant's tensor as its output's ``const_value``, and
    renaming or serializing that value renames the tensor. On a plain clone that wrote names
    into the input's Constants: the input grew, and so did the "unchanged" model returned when
    an attempt is rolled back, past the size limit.
    """
    clone = model.clone()
    io.unshare_tensors(clone)
    return clone


def _growth_guard(budget_bytes: int) -> Callable[[ir.Node], bool | None]:
    """A ``should_fold`` callback: veto folds that would spend more than ``budget_bytes``.

    Growth of one fold = output bytes - bytes of constant inputs only this node uses (those die
    with it). Returns False to veto, None to leave the decision to onnxscript's defaults.
    """
    spent = 0

    def should_fold(node: ir.Node) -> bool | None:
        nonlocal spent
        if node.op_type in NEVER_FOLD:
            return False
        output_bytes = _known_bytes(node.outputs[0]) if node.outputs else None
        if output_bytes is None:
            return False if node.op_type in EXPANDING_OPS else None
        freed = sum(
            inp.const_value.nbytes
            for inp in node.inputs
            if inp is not None
            and inp.const_value is not None
            and len(inp.uses()) == 1
            and not inp.is_graph_input()
        )
        growth = output_bytes - freed
        if growth > 0 and spent + growth > budget_bytes:
            logger.debug("fold: not folding %s (%s): +%d bytes", node.name, node.op_type, growth)
            return False
        spent += max(growth, 0)
        # onnxscript keeps ConstantOfShape by default; within budget an expansion may fold.
        return True if node.op_type in EXPANDING_OPS else None

    return should_fold


@dataclasses.dataclass(frozen=True)
class _Annotations:
    """Node names and annotated value names of the input, to tell them from invented ones."""

    node_names: frozenset[str]
    rewritten_names: frozenset[str]
    """names of the input's nodes that carried a rewriter's provenance already"""
    typed_values: frozenset[str]
    producer_names: dict[str, str]
    """output value name -> name of the input's node that produced it"""

    @classmethod
    def of(cls, model: ir.Model) -> _Annotations:
        nodes = list(walk.all_nodes(model))
        return cls(
            node_names=frozenset(n.name for n in nodes if n.name),
            rewritten_names=frozenset(
                n.name for n in nodes if n.name and REWRITE_PROVENANCE in n.metadata_props
            ),
            producer_names={o.name: n.name for n in nodes if n.name for o in n.outputs if o.name},
            typed_values=frozenset(
                out.name
                for n in nodes
                for out in n.outputs
                if out.name and (out.type is not None or out.shape is not None)
            ),
        )

    def strip_new(self, model: ir.Model) -> None:
        """Drop node names and value types/shapes the input did not have.

        onnxscript names every node it touches, records provenance in each folded value's
        and rewritten node's metadata, and shape inference types every value; saved, that is
        bytes the input did not hold, which on small graphs outweighs what folding saved.
        Graph outputs keep their types. A node that took over an input node's output
        (Conv+BatchNormalization fused into one Conv writes the BatchNormalization's output)
        takes over that node's name, so ``--set quant.exclude=NAME`` and per-layer reports
        can still name it.
        """
        used = {n.name for n in walk.all_nodes(model) if n.name in self.node_names}
        for node in walk.all_nodes(model):
            if not (node.name and node.name in self.node_names):
                node.name = self._inherited_name(node, used)
                if node.name:
                    used.add(node.name)
            if node.name not in self.rewritten_names:
                node.metadata_props.pop(REWRITE_PROVENANCE, None)
            # Every node, renamed or not: shape inference typed the outputs of kept nodes too.
            for out in node.outputs:
                out.metadata_props.pop(_constant_folding.FOLDED_FROM_KEY, None)
                if out.name not in self.typed_values and not out.is_graph_output():
                    out.type = None
                    out.shape = None
        for value, _ in walk.initializer_tensors(model):
            value.metadata_props.pop(_constant_folding.FOLDED_FROM_KEY, None)

    def _inherited_name(self, node: ir.Node, used: set[str]) -> str | None:
        """The name of the input node whose output ``node`` took over, if not taken yet."""
        return next(
            (
                self.producer_names[o.name]
                for o in node.outputs
                if self.producer_names.get(o.name) not in (None, *used)
            ),
            None,
        )


def _known_bytes(value: ir.Value) -> int | None:
    """Bytes of a value whose dtype and full static shape are known, else None."""
    if value.dtype is None or value.shape is None or not value.shape.is_static():
        return None
    itemsize = value.dtype.itemsize
    return math.ceil(math.prod(value.shape.numpy()) * itemsize)
