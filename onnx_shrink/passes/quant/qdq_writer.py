"""Graph edits of static quantization: Q/DQ pairs on activations, DQ'd weights and biases."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from onnx_shrink.compiler import graph_edit
from onnx_shrink.passes.quant import compact
from onnx_shrink.passes.quant.numerics import QuantType, quantize_bias, quantize_weight

Params = tuple[np.ndarray, np.ndarray]  # scale, zero point

# An omitted zero point is 0 of the quantized input's type, so a signed symmetric weight needs
# none (DequantizeLinear, opset >= 10). onnxruntime 1.32 fuses DQ(weight) -> Conv / MatMul
# without it, but not DQ(weight) -> Gemm into QGemm: Gemm weights (and constant inputs of
# glue ops) keep theirs.
ZERO_POINT_OPTIONAL = frozenset({"Conv", "MatMul"})


class QdqWriter:
    """Graph edits: Q/DQ pairs on tensors, DQ'd weights and biases, sharing initializers.

    Names (``compact.Names``): a tensor's Q/DQ values are ``q<k>_scale``, ``_zero_point``,
    ``_quantized`` and ``_dequantized``, and its QuantizeLinear node is named after it; a
    weight's values are its own name with those suffixes. DequantizeLinear nodes are unnamed
    (their outputs name them). Equal activation parameters share one scale and zero point.
    """

    def __init__(self, graph: ir.Graph, narrow_storage: bool) -> None:
        self.graph = graph
        self.narrow_storage = narrow_storage
        self.names = compact.Names(graph)
        self.values = ir.convenience.create_value_mapping(graph, include_subgraphs=False)
        self.weights: dict[tuple[str, int | None, str], tuple[ir.Value, np.ndarray]] = {}
        self.params: dict[tuple[bytes, bytes, str], tuple[ir.Value, ir.Value]] = {}
        self.dequantized: dict[str, Params] = {}
        """DQ output name -> the (scale, zero point) of the tensor it stands for"""

    def _initializer(self, name: str, array: np.ndarray) -> ir.Value:
        return graph_edit.add_initializer(self.graph, self.names.fresh(name), array)

    def _scale_and_zero(self, prefix: str, scale: np.ndarray, zero: np.ndarray) -> tuple:
        scale = np.asarray(scale, np.float32).reshape(())
        zero = np.asarray(zero).reshape(())
        key = (scale.tobytes(), zero.tobytes(), zero.dtype.str)
        if key not in self.params:
            self.params[key] = (
                self._initializer(f"{prefix}_scale", scale),
                self._initializer(f"{prefix}_zero_point", zero),
            )
        return self.params[key]

    def qdq_tensor(
        self,
        name: str,
        scale: np.ndarray,
        zero: np.ndarray,
        reads_dq: Callable[[ir.Node, ir.Value], bool],
    ) -> None:
        """Insert Q -> DQ after ``name`` and route the consumers ``reads_dq`` accepts through
        the DQ output; the others keep reading the float tensor.

        A graph output keeps its name (and type) on the DQ output (the float tensor before it
        is renamed ``<name>_float``), so an integer kernel can write it: onnxruntime fuses
        ``DQ -> op -> Q`` only. An output listed twice is the DQ output twice; a graph input
        that is also an output keeps its name, the output passing it through.
        """
        value = self.values[name]
        prefix = self.names.next_tensor()
        s, z = self._scale_and_zero(prefix, scale, zero)
        uses = [use for use in value.uses() if reads_dq(use.node, value)]
        # An input that is also an output keeps its name: the output passes it through.
        output_indices = [
            i for i, v in enumerate(self.graph.outputs) if v is value and not v.is_graph_input()
        ]
        if not output_indices:
            dq_output = ir.Value(name=self.names.fresh(f"{prefix}_dequantized"))
        else:
            dq_output = ir.Value(name=name, type=value.type, shape=value.shape)
            value.name = self.names.fresh(f"{name}_float")
        q_output = ir.Value(name=self.names.fresh(f"{prefix}_quantized"))
        q_name = self.names.fresh_node(self.names.alias(name))
        q = ir.node("QuantizeLinear", [value, s, z], outputs=[q_output], name=q_name)
        dq = ir.node("DequantizeLinear", [q_output, s, z], outputs=[dq_output], name="")
        producer = value.producer()
        if producer is None:
            self.graph.insert_before(self.graph.node(0), [q, dq])
        else:
            self.graph.insert_after(producer, [q, dq])
        for use in uses:
            use.node.replace_input_with(use.idx, dq_output)
        for index in output_indices:  # an output listed twice is the DQ output twice
            self.graph.outputs[index] = dq_output
        self.dequantized[dq_output.name] = (scale, zero)

    def dq_weight(
        self,
        node: ir.Node,
        index: int,
        qtype: QuantType,
        axis: int | None,
        symmetric: bool = True,
        floor: np.ndarray | None = None,
    ) -> np.ndarray:
        """Replace constant input ``index`` of ``node`` by DQ(quantized copy); return its scale.

        Symmetric scales are raised to ``floor`` where they are below it, then (with
        ``narrow_storage``, per channel) rounded up to float16 values.
        """
        value = node.inputs[index]
        array = value.const_value.numpy()
        if axis is not None:
            axis = axis % array.ndim
        key = (value.name, axis, qtype.name)
        if key not in self.weights:
            q = quantize_weight(
                array,
                qtype,
                axis=axis,
                symmetric=symmetric,
                scale_floor=floor,
                scale_rounding=compact.scale_rounding(self.narrow_storage, axis),
            )
            if axis is None:
                scale, zero = q.scale.reshape(()), q.zero_point.reshape(())
            else:
                scale, zero = q.scale.reshape(-1), q.zero_point.reshape(-1)
            inputs = [
                self._initializer(f"{value.name}_quantized", q.values),
                self._initializer(f"{value.name}_scale", scale),
            ]
            if zero.any() or not qtype.signed or node.op_type not in ZERO_POINT_OPTIONAL:
                inputs.append(self._initializer(f"{value.name}_zero_point", zero))
            attrs = {"axis": axis} if axis is not None else {}
            name = self.names.fresh(f"{value.name}_dequantized")
            dq = ir.node("DequantizeLinear", inputs, attrs, outputs=[ir.Value(name=name)], name="")
            self.graph.insert_before(node, [dq])
            self.weights[key] = (dq.outputs[0], scale)
        output, scale = self.weights[key]
        node.replace_input_with(index, output)
        return scale

    def dq_bias(
        self, node: ir.Node, index: int, input_scale: np.ndarray, weight_scale: np.ndarray
    ) -> None:
        """Replace a float bias by DQ(int32 bias) with scale input_scale x weight_scale."""
        value = node.inputs[index]
        bias = value.const_value.numpy().astype(np.float32)
        if bias.ndim != 1:
            return
        per_channel = np.ndim(weight_scale) > 0
        q, scale = quantize_bias(bias, input_scale, weight_scale)
        if not per_channel:  # one scale: a scalar DQ, valid before opset 13 too
            scale = scale.reshape(-1)[:1].reshape(())
        inputs = [  # an omitted zero point is 0 (of the int32 input's type)
            self._initializer(f"{value.name}_quantized", q),
            self._initializer(f"{value.name}_scale", scale),
        ]
        dq = ir.node(
            "DequantizeLinear",
            inputs,
            attributes={"axis": 0} if per_channel else {},
            outputs=[ir.Value(name=self.names.fresh(f"{value.name}_dequantized"))],
            name="",
        )
        self.graph.insert_before(node, [dq])
        node.replace_input_with(index, dq.outputs[0])
