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
