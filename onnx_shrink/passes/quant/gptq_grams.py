"""The calibration side of ``quant-weight``'s ``rounding=gptq``: which MatMul inputs to
measure (their Grams, ``StatRequest(kind="gram")``), and each weight's summed Gram once
measured. GPTQ itself (``gptq``) turns a Gram and a weight into codes.

Only main-graph MatMuls reading a computed tensor or a graph input take part: the statistics
engine measures the main graph, and a constant input has no calibration rows.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np
import onnx_ir as ir

from onnx_shrink.compiler.statistics import Gram, Statistics, StatRequest
from onnx_shrink.passes.quant import gptq
from onnx_shrink.passes.quant.weight_matching import WeightContext, match_linear

logger = logging.getLogger(__name__)


def gram_requests(
    context: WeightContext, matmuls: Sequence[ir.Node], gram_memory_mb: int
) -> list[StatRequest]:
    """The Gram of each of ``matmuls``' activations (a quantized weight's rows run along K),
    less those wider than ``gptq.MAX_COLUMNS`` and those past ``gram_memory_mb``
    (``within_budget``), each said in a warning."""
    widths: dict[StatRequest, int] = {}
    wide: dict[str, int] = {}
    for node in matmuls:
        match = match_linear(context, node)
        if isinstance(match, str) or not _measurable(match.activation):
            continue
        width = columns(match.weight)
        if width > gptq.MAX_COLUMNS:
            wide[node.name or match.weight.name or "?"] = width
        else:
            widths[StatRequest(match.activation.name, "gram", axis=-1)] = width
    if wide:
        name = max(wide, key=wide.__getitem__)
        logger.warning(
            "%s: gptq: %d MatMuls read inputs wider than %d columns (%s: %d) and keep "
            "nearest rounding (GPTQ inverts a Gram as wide as the input)",
            context.pass_name,
            len(wide),
            gptq.MAX_COLUMNS,
            name,
            wide[name],
        )
    return within_budget(widths, gram_memory_mb, context.pass_name)


def within_budget(
    widths: Mapping[StatRequest, int], gram_memory_mb: int, pass_name: str
) -> list[StatRequest]:
    """The Gram requests whose matrices fit ``gram_memory_mb`` together, narrowest first
    (a 4096-wide input's Gram is 128 MiB: a 7B model's 96 would hold 12 GiB)."""
    budget, taken = gram_memory_mb << 20, []
    for request in sorted(widths, key=widths.__getitem__):
        budget -= widths[request] ** 2 * 8
        if budget < 0:
            break
        taken.append(request)
    if len(taken) < len(widths):
        logger.warning(
            "%s: gptq: %d of %d MatMul inputs keep nearest rounding: their Grams would pass "
            "gram_memory_mb=%d",
            pass_name,
            len(widths) - len(taken),
            len(widths),
            gram_memory_mb,
        )
    return taken


def weight_grams(
    context: WeightContext, matmuls: Sequence[ir.Node], stats: Statistics
) -> dict[ir.Value, np.ndarray]:
    """For each weight GPTQ rounds, the summed Gram of the inputs of the ``matmuls`` that
    read it (a shared weight is quantized once: for all its readers)."""
    measured = {
        request.tensor: result
        for request, result in stats.results.items()
        if isinstance(result, Gram) and result.rows > 0
    }
    result: dict[ir.Value, np.ndarray] = {}
    rows: dict[ir.Value, int] = {}
    for node in matmuls if measured else ():
        match = match_linear(context, node)
        if isinstance(match, str):
            continue
        gram = measured.get(match.activation.name)
        if gram is None or gram.matrix.shape != (columns(match.weight),) * 2:
            continue
        known = result.get(match.weight)
        result[match.weight] = gram.matrix if known is None else known + gram.matrix
        rows[match.weight] = rows.get(match.weight, 0) + gram.rows
    _warn_few_rows(context.pass_name, rows)
    return result


def _warn_few_rows(pass_name: str, rows: Mapping[ir.Value, int]) -> None:
    """Warn where a weight's Gram comes from fewer input rows than it has columns: GPTQ then
    fits its codes to those rows, and can do worse than nearest rounding on others (g2p's BERT
    from one sample: relative error 0.065 against nearest's 0.063)."""
    short = {w: n for w, n in rows.items() if n < columns(w)}
    if short:
        fewest = min(short, key=short.__getitem__)
        logger.warning(
            "%s: gptq: %d of %d weights saw fewer calibration rows than their inputs' width "
            "(%s: %d rows for %d columns), so their codes fit those rows; give more samples",
            pass_name,
            len(short),
            len(rows),
            fewest.name,
            short[fewest],
            columns(fewest),
        )


def columns(weight: ir.Value) -> int:
    """K of a matched MatMul weight [K, N] (``match_linear`` matches constant ones only)."""
    assert weight.const_value is not None
    return weight.const_value.shape[0]


def _measurable(activation: ir.Value) -> bool:
    """Whether the statistics engine can take the Gram of ``activation``: a tensor the main
    graph computes or takes as input (not a constant)."""
    if activation.const_value is not None or activation.is_initializer():
        return False
    return activation.producer() is not None or activation.is_graph_input()
