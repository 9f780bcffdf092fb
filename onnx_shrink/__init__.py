"""onnx-shrink: a model-compression compiler for ONNX.

Smaller and faster at a known accuracy cost: ``shrink()`` runs a pass pipeline on a model and
onnxruntime verifies what it gained and what it cost.
"""

from __future__ import annotations

__version__ = "0.1.0"
