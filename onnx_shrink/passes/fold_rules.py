"""onnxscript's default rewrite rules, tried only on nodes whose op type they can match.

onnxscript's ``RewriteRuleSet`` tries every rule at every node, and each try sets up a match
before looking at the node's op type (about 45 µs): on PP-OCR's 860-node recognizer that is
39,000 tries and 1.9 s of a 2.5 s fold. A rule whose pattern ends in one known op can only
match a node of that op, so ``by_root_op`` gives each such rule a copy whose ``try_rewrite``
returns at once elsewhere. A pattern with several output nodes matches the node it is tried
at against its first one (and searches the whole graph for the others, so each try costs a
pass over every node: quadratic, 0.2 s of det's fold): it is filtered by that first node's op.
The rules, their order and so every rewrite are unchanged; ``UNSAFE`` ones are left out, and
the no-op rules (``x * 1``, ``x + 0``, ...) are exact ones (``EXACT_NO_OPS``), not onnxscript's
tolerant ones.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Sequence

import numpy as np
import onnx_ir as ir
from onnxscript import rewriter
from onnxscript.rewriter import pattern
from onnxscript.rewriter.rules.common import _no_op as no_op_rules


def by_root_op(rules: Sequence[pattern.RewriteRule]) -> list[pattern.RewriteRule]:
    """``rules`` in order, each tried only where its pattern's (first) output op could match."""
    return [_filtered(rule) for rule in rules]


def _filtered(rule: pattern.RewriteRule) -> pattern.RewriteRule:
    root = _root_op(rule)
    if root is None:
        return rule
    fast = copy.copy(rule)  # the shared default rule stays as onnxscript made it
    try_rewrite = rule.try_rewrite

    @functools.wraps(try_rewrite)
    def try_where_it_can_match(model, graph_or_function, node: ir.Node, **kwargs):
        if node.op_type != root[1] or _domain(node.domain) != root[0]:
            return None
        return try_rewrite(model, graph_or_function, node, **kwargs)

    fast.try_rewrite = try_where_it_can_match  # type: ignore[method-assign]
    return fast


def _root_op(rule: pattern.RewriteRule) -> tuple[str, str] | None:
    """(domain, op type) of the node the rule is tried at: its pattern's first output node
    (onnxscript's matcher fixes the tried node to it); None when that is not a known op."""
    target = getattr(rule, "_target_pattern", None)
    outputs = getattr(target, "output_nodes", None)
    if not outputs:
        return None
    identifier = outputs[0].op_identifier()
    if identifier is None or not isinstance(identifier[1], str):
        return None
    return _domain(identifier[0]), identifier[1]


def _domain(domain: str) -> str:
    return "" if domain == "ai.onnx" else domain


UNSAFE = frozenset({"MaterializeReshapeShape", "SlicesSplit"})
"""onnxscript 0.7.2 default rules fold leaves out.

* MaterializeReshapeShape makes a computed Reshape shape the constant of its output's shape
  as annotated, and a graph output's annotation is the exporter's word, sometimes stale:
  ddddocr 1.6.1's OCR output (20, 1, 8210) became (1, 164200). It also writes
  ``allowzero=1``, an attribute of Reshape-14, into any opset: onnxruntime refused the folded
  opset-12 model. ``fold_reshape`` makes constant the shapes it can prove; onnxruntime folds
  the rest when it loads the model.
* SlicesSplit turns ``x[0:h]`` and ``x[h:2h]`` into one Split where the first Slice was: where
  the second half's Slice and its readers come first (tf2onnx's SpaceToBatch code in afis
  1.2.7's LEADER), they then read the Split before it is made, and it writes ``num_outputs``,
  an attribute of Split-18, into any opset. The fold's checks refused every such graph and
  kept the model unfolded."""


def _identity(op, x, **_):
    return op.Identity(x)


def _exactly(expected: float, negative_zero: bool = False):
    """A condition: ``c`` is a scalar constant equal to ``expected``, exactly; a float zero
    also of the sign ``negative_zero`` asks (integers have one zero)."""

    def condition(_context, c, **_) -> bool:
        tensor = c.const_value
        if tensor is None:
            return False
        array = tensor.numpy()
        if array.ndim != 0 or array.dtype.kind not in "fiu" or array.item() != expected:
            return False
        return array.dtype.kind != "f" or expected != 0 or bool(np.signbit(array)) == negative_zero

    return condition


def _rule(target, expected: float, negative_zero: bool = False) -> pattern.RewriteRule:
    return pattern.RewriteRule(target, _identity, _exactly(expected, negative_zero))


EXACT_NO_OPS = [
    _rule(lambda op, x, c: op.Mul(x, c), 1),
    _rule(lambda op, x, c: op.Mul(c, x), 1),
    _rule(lambda op, x, c: op.Add(x, c), 0, negative_zero=True),
    _rule(lambda op, x, c: op.Add(c, x), 0, negative_zero=True),
    _rule(lambda op, x, c: op.Sub(x, c), 0),
    _rule(lambda op, x, c: op.Div(x, c), 1),
]
"""``x * 1``, ``x + (-0.0)``, ``x - (+0.0)`` and ``x / 1`` become ``x`` only where the scalar
constant is exactly that (for integers, 0 or 1): bit for bit the identity. ``x + (+0.0)``
turns ``-0.0`` into ``+0.0`` (a Reciprocal after it gives +inf for -inf) and stays.
onnxscript 0.7.2's own no-op rules match within rel_tol 1e-5 and abs_tol 1e-8: they dropped
basic-pitch's ``Log(x * x + 1e-10)`` epsilon (its folded model gave NaN on silence) and a
decomposed LayerNorm's 1e-12, and would drop a scale of 1.00001."""

_INEXACT = {id(r) for r in no_op_rules.rules.rules if r is not None} - {
    id(r) for r in (no_op_rules.dropout_zero_rule, no_op_rules.dropout_inference_rule)
}

DEFAULT_RULES = by_root_op(
    EXACT_NO_OPS
    + [r for r in rewriter._DEFAULT_REWRITE_RULES if r.name not in UNSAFE and id(r) not in _INEXACT]
)
"""onnxscript's default rules, its tolerant no-op rules replaced by ``EXACT_NO_OPS``,
filtered once (rules keep no state between applications)."""
