"""Pass results that carry more than onnx_ir's ``PassResult``."""

from __future__ import annotations

import dataclasses

import onnx_ir as ir


@dataclasses.dataclass
class MeasuredResult(ir.passes.PassResult):
    """The result of a functional pass that computed ``large_tensors.saved_bytes`` of its
    input (``bytes_before``) and of the model it returns (``bytes_after``), which nothing
    changes in between: the pipeline takes them instead of serializing both models again."""

    bytes_before: int
    bytes_after: int


@dataclasses.dataclass
class NotedResult(ir.passes.PassResult):
    """A pass result with a note for the summary: what the pass did that the counts and sizes
    do not show (``prune``'s zeros, stored dense, change neither)."""

    note: str
