"""Fewer bytes for the same quantized model: short generated names.

A quantized model's weights shrink 4x, so the graph's own bytes become a visible share of the
file: on paraphrase-MiniLM-L3, names derived from torch's long tensor names and float32
per-channel scales were about 0.6 % of it, as much as the whole margin to onnxruntime's file.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable

import onnx_ir as ir

logger = logging.getLogger(__name__)


# ---- names ---------------------------------------------------------------------------------


class Names:
    """Names of the values and nodes quantization adds.

    The values of the k-th quantized tensor are ``q<k>_scale``, ``q<k>_zero_point``,
    ``q<k>_quantized`` and ``q<k>_dequantized``, each read two to four times; its
    QuantizeLinear node carries the meaning, once: the tensor's *alias*, the shortest
    trailing run of its ``/``-separated name, less a trailing ``_output_0`` (torch's
    exporter), that no other value of the graph ends with
    (``/model/encoder/layer.0/attention/self/query/MatMul_output_0`` becomes
    ``layer.0/attention/self/query/MatMul``). Every name is checked against those in use and
    made unique with ``_1``, ``_2``...
    """

    def __init__(self, graph: ir.Graph) -> None:
        self.taken: set[str] = set()
        self.nodes: set[str] = set()
        for g in (graph, *graph.subgraphs()):
            self.taken.update(v.name for v in (*g.inputs, *g.initializers.values()) if v.name)
            self.taken.update(v.name for node in g for v in node.outputs if v.name)
            self.nodes.update(node.name for node in g if node.name)
        self._suffixes = Counter(
            suffix for name in self.taken for suffix in _suffixes(_segments(name))
        )
        self._count = 0

    def next_tensor(self) -> str:
        """The prefix (``q<k>``) of the next quantized tensor's values."""
        prefix = f"q{self._count}"
        self._count += 1
        return prefix

    def alias(self, tensor: str) -> str:
        """The shortest unambiguous trailing part of ``tensor``'s name (the name if none)."""
        for suffix in _suffixes(_segments(tensor)):
            if self._suffixes[suffix] == 1:
                return "/".join(suffix)
        return tensor

    def fresh(self, name: str) -> str:
        """``name``, or ``name_<i>`` with the first ``i`` not in use; reserved from now on."""
        return _reserve(name, self.taken)

    def fresh_node(self, name: str) -> str:
        """A node name like ``fresh``, unique among node names."""
        return _reserve(name, self.nodes)


def _reserve(name: str, taken: set[str]) -> str:
    candidate, index = name, 1
    while candidate in taken:
        candidate, index = f"{name}_{index}", index + 1
    taken.add(candidate)
    return candidate


def _segments(name: str) -> tuple[str, ...]:
    return tuple(name.removesuffix("_output_0").split("/"))


def _suffixes(segments: tuple[str, ...]) -> Iterable[tuple[str, ...]]:
    """Trailing runs of ``segments``, shortest first."""
    return (segments[-i:] for i in range(1, len(segments) + 1))
