"""Pattern options given a tensor's name: they stand for the nodes that write it.

A pass's pattern options (``option(patterns=True)``: ``fp16.exclude``, ``quant.exclude``,
``lowrank.only``, ...) name nodes. ``--layers``, the check's notes and model viewers show
tensors, and many exported models name no node at all: Swift-F0's float16 error was in
tensors like ``v131`` whose nodes had no name in the file, so a user had no node name to
give. A pattern that names no node of the model a pass gets, but names tensors its nodes
write, is read as the names of those nodes (``resolved``); one that names a node keeps its
meaning, so a node name that is also some other node's output tensor name (fold writes both
as ``Add.22``) still names just that node.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Sequence

import onnx_ir as ir

from onnx_shrink.compiler import walk
from onnx_shrink.compiler.options import pattern_names

logger = logging.getLogger(__name__)


def resolved(pass_: ir.passes.PassBase, model: ir.Model) -> ir.passes.PassBase:
    """``pass_`` with each item of its pattern options that names no node of ``model`` but
    names tensors its nodes write replaced by those nodes' names (escaped: exact); itself
    where no item does. Unnamed writers cannot be named: ``shrink`` names every node while
    the passes run (``graph_edit.name_unnamed_nodes``)."""
    if not dataclasses.is_dataclass(pass_):
        return pass_
    fields = [f for f in dataclasses.fields(pass_) if f.metadata.get("patterns")]
    if not any(getattr(pass_, f.name) for f in fields):
        return pass_
    nodes = list(walk.all_nodes(model))
    node_names = [node.name for node in nodes if node.name]
    changed = {}
    for field in fields:
        given = getattr(pass_, field.name)
        items = _items(given, nodes, node_names, f"{pass_.name}.{field.name}")
        if items != list(given):
            changed[field.name] = tuple(items)
    return dataclasses.replace(pass_, **changed) if changed else pass_


def _items(
    patterns: Sequence[str], nodes: Sequence[ir.Node], node_names: Sequence[str], option: str
) -> list[str]:
    """``patterns`` with those that name only tensors replaced by their writers' names."""
    items = []
    for pattern in patterns:
        if any(pattern_names(pattern, name) for name in node_names):
            items.append(pattern)
            continue
        writers = [
            node.name
            for node in nodes
            if node.name and any(v.name and pattern_names(pattern, v.name) for v in node.outputs)
        ]
        if not writers:
            items.append(pattern)  # the pass warns of a pattern that names nothing
            continue
        writers = list(dict.fromkeys(writers))
        shown = ", ".join(writers[:3]) + (
            f" and {len(writers) - 3} more" if len(writers) > 3 else ""
        )
        logger.info(
            "%s: %r names no node but tensors, so it names the nodes that write them: %s",
            option,
            pattern,
            shown,
        )
        items += [re.escape(name) for name in writers]
    return items
