"""Deliberately damaged copies of models, for tests and benchmarks of error localization.

``perturbed_copy`` adds seeded Gaussian noise of ``scale`` x the tensor's standard deviation to
one initializer; ``perturb_node_weight`` does it to the weight of a named node and returns the
node's output, which is where a per-layer check must see the error born.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper


def _add_noise(tensor: onnx.TensorProto, scale: float, seed: int) -> None:
    array = onnx.numpy_helper.to_array(tensor)
    noise = np.random.default_rng(seed).standard_normal(array.shape) * array.std()
    tensor.CopyFrom(
        onnx.numpy_helper.from_array((array + scale * noise).astype(array.dtype), tensor.name)
    )


def perturbed_copy(
    source: Path, target: Path, initializer: str, scale: float = 1.5, seed: int = 0
) -> Path:
    """Write ``source`` to ``target`` with noise on the initializer named ``initializer``."""
    model = onnx.load(str(source))
    tensors = {t.name: t for t in model.graph.initializer}
    if initializer not in tensors:
        raise KeyError(f"{source} has no initializer {initializer!r}")
    _add_noise(tensors[initializer], scale, seed)
    target.write_bytes(model.SerializeToString())
    return target


def perturb_node_weight(
    source: Path, target: Path, node_name: str, scale: float = 0.5, seed: int = 0
) -> str:
    """Write ``source`` to ``target`` with noise on the initializer input of the node whose name
    contains ``node_name``; return that node's first output name."""
    model = onnx.load(str(source))
    tensors = {t.name: t for t in model.graph.initializer}
    node = next(n for n in model.graph.node if node_name in n.name)
    weight = next(i for i in node.input if i in tensors)
    _add_noise(tensors[weight], scale, seed)
    target.write_bytes(model.SerializeToString())
    return node.output[0]
