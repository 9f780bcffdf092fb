"""The weights ``quant`` quantizes without calibration statistics, as ``quant-dynamic``
does: embedding tables (its rule 6), LSTM/GRU/RNN weights (rule 10), ConvTranspose weights
(rule 14), tables Slice or Reshape read (rule 15) and MatMul/Gemm/Gather weights inside
If/Loop/Scan bodies, which calibration does not reach (rule 5).

``DynamicRules`` holds the options of ``quant`` that decide them; ``QuantPass`` builds one
and asks it which nodes it takes, to quantize them, and why the others stay float.
"""

from __future__ import annotations

import collections
import dataclasses

import onnx_ir as ir

from onnx_shrink.compiler.walk import nodes_of
from onnx_shrink.passes.quant import dynamic, table_readers
from onnx_shrink.passes.quant.dynamic import QuantDynamicPass

BODY_OPS = ("MatMul", "Gemm", "Gather")
"""What rule 5 quantizes inside bodies"""
SWITCHES = (
    ("LSTM", "lstm"),
    ("GRU", "rnn"),
    ("RNN", "rnn"),
    ("ConvTranspose", "conv_transpose"),
)
"""The main-graph op types rules 10 and 14 take, and the option that turns each off"""


@dataclasses.dataclass(frozen=True)
class DynamicRules:
    """``quant``'s options for rules 5, 6, 10, 14 and 15 (see ``QuantPass``)."""

    gather: bool
    lstm: bool
    rnn: bool
    conv_transpose: bool
    tables: bool
    subgraphs: bool
    fused: bool
    exclude: tuple[str, ...]
    exclude_op_types: tuple[str, ...]
    only: tuple[str, ...]
    log_inputs: bool
    owner: str = "quant"

    @property
    def main_graph_ops(self) -> tuple[str, ...]:
        """Op types rules 6, 10, 14 and 15 give quant-dynamic's int8 weights in the main
        graph, as the options allow (``exclude_op_types`` holds there too)."""
        wanted = ("Gather",) * self.gather + ("LSTM",) * self.lstm + ("GRU", "RNN") * self.rnn
        wanted += ("ConvTranspose",) * self.conv_transpose
        wanted += table_readers.TABLE_READERS * self.tables
        return tuple(op for op in wanted if op not in self.exclude_op_types)

    def has_candidates(self, model: ir.Model) -> bool:
        """Whether the main graph or a body holds a node of ``main_graph_ops`` (a Slice or
        Reshape only where it reads a table)."""
        return bool(table_readers.weight_nodes(model, self.main_graph_ops))

    def layers(self, model: ir.Model) -> list[ir.Node]:
        """The main-graph nodes rules 6, 10, 14 and 15 quantize (embedding tables, recurrent
        layers, ConvTranspose, tables), among ``only`` where it is given; reads ``model``
        only."""
        ops = self.main_graph_ops
        main = {
            n
            for n in model.graph
            if n.op_type in ops and (not self.only or (n.name or "") in self.only)
        }
        if not main:  # with only, mostly a plan's node: no table or LSTM to look at
            return []
        return [node for op_type in ops for node in self._pass(op_type, False).layers(model, main)]

    def quantize(self, model: ir.Model, narrow: bool) -> tuple[bool, str]:
        """Give the weights of rules 5, 6, 10, 14 and 15 ``quant-dynamic``'s int8 (with float16
        scales when ``narrow``; the caller stores them). With ``only``, only the main-graph
        nodes it names. Returns whether any was quantized, and ``per_run_note`` of what it
        wrote."""
        before = dynamic.per_run_nodes(model)
        quantized = self._quantize(model, narrow)
        return quantized, per_run_note(dynamic.per_run_nodes(model) - before)

    def _quantize(self, model: ir.Model, narrow: bool) -> bool:
        count = 0
        # With only: the main-graph nodes it names, as layers (and the warning about names
        # matching nothing) see them; a body's node of the same name stays float.
        chosen = set(self.layers(model)) if self.only else None
        if chosen is not None and not chosen:
            return False
        for op_type in self.main_graph_ops:
            count += self._pass(op_type, narrow).quantize(model, nodes=chosen, owner=self.owner)
        if self.only:
            return count > 0
        in_bodies = tuple(op for op in BODY_OPS if op not in self.exclude_op_types)
        if self.subgraphs and in_bodies and any(True for _ in model.graph.subgraphs()):
            count += self._bodies_pass(in_bodies, narrow).quantize(model, owner=self.owner)
        return count > 0

    def float_reasons(self, model: ir.Model) -> dict[ir.Node, str]:
        """Why each LSTM, GRU, RNN (rule 10) and ConvTranspose (rule 14), and each MatMul and
        Gemm in a body (rule 5), stays float: its option off, or quant-dynamic's reason
        (exclusions are the caller's to say); reads ``model`` only."""
        reasons: dict[ir.Node, str] = {}
        for op_type, switch in SWITCHES:
            if not getattr(self, switch):
                off = f"{self.owner}.{switch}=false"
                reasons.update(dict.fromkeys(nodes_of(model, (op_type,)), off))
            elif op_type in self.main_graph_ops:
                reasons.update(self._pass(op_type, False).float_reasons(model, self.owner))
        linear = ("MatMul", "Gemm")
        in_bodies = [n for n in nodes_of(model, linear) if n.graph is not model.graph]
        if not self.subgraphs:
            reasons.update(dict.fromkeys(in_bodies, f"{self.owner}.subgraphs=false"))
        elif in_bodies:
            reasons.update(self._bodies_pass(linear, False).float_reasons(model, self.owner))
        return reasons

    def _pass(self, op_type: str, narrow: bool) -> QuantDynamicPass:
        """Rule 6's, 10's, 14's or 15's quant-dynamic, for ``op_type``."""
        # fused decides only LSTMs here: a Gather's int8 rows are standard ONNX either way.
        fused = self.fused if op_type == "LSTM" else True
        return QuantDynamicPass(
            op_types=(op_type,), exclude=self.exclude, fused=fused, narrow_storage=narrow
        )

    def _bodies_pass(self, op_types: tuple[str, ...], narrow: bool) -> QuantDynamicPass:
        """Rule 5's quant-dynamic: ``op_types`` in If/Loop/Scan bodies."""
        return QuantDynamicPass(
            op_types=op_types,
            exclude=self.exclude,
            graphs="subgraphs",
            narrow_storage=narrow,
            log_inputs=self.log_inputs,
        )


def per_run_note(written: collections.Counter[str]) -> str:
    """For the summary, the nodes of ``written`` (``dynamic.PER_RUN_SCALES``) whose
    activations take their int8 scale from each run, not from calibration: a static pass
    that wrote them says so, where its summary said only what it calibrated (SLANet's Loop
    body: 7 DynamicQuantizeMatMul; a CRNN's 2 DynamicQuantizeLSTM). "" without any."""
    if not written:
        return ""
    nodes = ", ".join(f"{n} {op}" for op, n in sorted(written.items()))
    return f"int8 scales set per run in {nodes}"
