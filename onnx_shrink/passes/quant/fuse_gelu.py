"""GELUs after integer kernels written as one node (opset 20's Gelu, or with
``QuantPass.fused`` onnxruntime's ``com.microsoft.Gelu``).

A GELU in erf form, ``0.5 * x * (1 + erf(x / sqrt(2)))``, reads x twice: its Div and its
first Mul. After a quantized Conv, x is a DequantizeLinear's output, and onnxruntime gives
each reader of a DequantizeLinear its own copy before it fuses float ops: the Div and the Mul
then read different values, and the five ops run one by one where the float model runs one
Gelu kernel. On PP-OCRv6's tiny detector (13 GELUs after quantized Convs, 8 pages of 480x640)
the quantized model ran 1.08x the float model's latency so, and 0.91x with them fused
(onnxruntime's own quantized model: 0.95x), its outputs unchanged.

Only a GELU reading a DequantizeLinear is rewritten: onnxruntime fuses any other itself. The
node is ONNX's Gelu where the model's opset has it (20 and later); before that, onnxruntime's
``com.microsoft.Gelu``, which only onnxruntime runs, so only with ``fused``.
"""

from __future__ import annotations

import functools
import math

import onnx_ir as ir
from onnxscript.rewriter import pattern

from onnx_shrink.compiler import walk
from onnx_shrink.passes import fold_rules
from onnx_shrink.passes.quant.weight_matching import MS_DOMAIN

STANDARD_GELU_OPSET = 20
_SQRT_2 = math.sqrt(2.0)


def _forms():
    """The erf GELU as exporters write it: x / sqrt(2) as a Div or a Mul, and the three
    ways of grouping its two products (commuted operands are matched by the rule set). Each
    form takes ``(op, x)`` alone: onnxscript makes every parameter a pattern variable."""

    def gate(op, x, by_division):  # 1 + erf(x / sqrt(2))
        scaled = op.Div(x, _SQRT_2) if by_division else op.Mul(x, 1.0 / _SQRT_2)
        return op.Add(op.Erf(scaled), 1.0)

    def grouped(grouping: int, by_division: bool):
        def form(op, x):
            if grouping == 0:
                return op.Mul(op.Mul(x, gate(op, x, by_division)), 0.5)
            if grouping == 1:
                return op.Mul(x, op.Mul(gate(op, x, by_division), 0.5))
            return op.Mul(op.Mul(x, 0.5), gate(op, x, by_division))

        return form

    return [grouped(g, d) for d in (True, False) for g in range(3)]


def _reads_dequantized(context, x: ir.Value, **_) -> bool:
    producer = x.producer()
    return producer is not None and producer.op_type == "DequantizeLinear"


def fuse(model: ir.Model, com_microsoft: bool) -> int:
    """Rewrite each erf GELU whose x a DequantizeLinear computes into one
    Gelu node (ONNX's from opset 20, else ``com.microsoft``'s where ``com_microsoft``);
    returns how many. The result is the same function: only the rounding of float ops
    differs."""
    standard = walk.onnx_opset(model) >= STANDARD_GELU_OPSET
    if not standard and not com_microsoft:
        return 0
    # Most models hold no Erf: the rules' ~70 commuted forms tried at each node took 0.24 s
    # of every quant run on PP-OCRv4 rec (860 nodes), in each of quant.max_error's too.
    if not any(node.op_type == "Erf" for node in walk.all_nodes(model)):
        return 0
    count = _rules(standard).apply_to_model(model)
    if count and not standard:
        model.opset_imports.setdefault(MS_DOMAIN, 1)
    return count


@functools.cache
def _rules(standard: bool) -> pattern.RewriteRuleSet:
    """The forms' rules with their commuted operands, each tried only at a Mul (its root:
    ``fold_rules.by_root_op``), writing ONNX's Gelu where ``standard``, else onnxruntime's."""

    def gelu(op, x):
        return op.Gelu(x) if standard else op.Gelu(x, _domain=MS_DOMAIN)

    rules = [pattern.RewriteRule(form, gelu, _reads_dequantized) for form in _forms()]
    commuted = pattern.RewriteRuleSet(rules, commute=True).rules
    return pattern.RewriteRuleSet(fold_rules.by_root_op(commuted))
