"""A quantized MatMul and its constant bias as one onnxruntime kernel (``QuantPass.fused``).

onnxruntime's QDQ fusion turns ``MatMul(DQ(x), DQ(W))`` whose output stays float into
``MatMulIntegerToFloat`` but leaves the bias ``Add`` after it as a separate pass over the
output (on MiniLM, 15 Adds of 23, about 5 % of its latency); the kernel itself takes the bias.
The fused node is in the ``com.microsoft`` domain: only onnxruntime runs it.
"""

from __future__ import annotations

import onnx_ir as ir

from onnx_shrink.passes.quant.weight_matching import MS_DOMAIN, bias_add


def try_fuse(model: ir.Model, matmul: ir.Node) -> bool:
    """``Add(MatMul(DQ(Q(x)), DQ(Wq)), b)``, the MatMul's output float and read by that
    Add alone, ``b`` a constant [N], becomes ``MatMulIntegerToFloat(xq, Wq, sx, sw, zx, zw, b)``:
    ``y = (xq - zx) @ (Wq - zw) * (sx * sw) + b``, the same numbers, one kernel."""
    if matmul.op_type != "MatMul" or len(matmul.inputs) != 2:
        return False
    x_dq, w_dq = (v.producer() if v is not None else None for v in matmul.inputs)
    if x_dq is None or w_dq is None or not _is_activation_dq(x_dq) or not _is_weight_dq(w_dq):
        return False
    weight = w_dq.inputs[0].const_value
    if weight.dtype != ir.DataType.INT8:
        return False
    add, bias = bias_add(matmul, weight.shape[1])
    if add is None:
        return False
    a_zero = x_dq.inputs[2] if len(x_dq.inputs) > 2 else None
    b_zero = w_dq.inputs[2] if len(w_dq.inputs) > 2 else None
    inputs = [x_dq.inputs[0], w_dq.inputs[0], x_dq.inputs[1], w_dq.inputs[1], a_zero, b_zero]
    fused = ir.node(
        "MatMulIntegerToFloat",
        [*inputs, bias],
        domain=MS_DOMAIN,
        outputs=[ir.Value(name=add.outputs[0].name)],
        name=matmul.name,
    )
    model.opset_imports.setdefault(MS_DOMAIN, 1)
    ir.convenience.replace_nodes_and_values(
        model.graph, add, [matmul, add], [fused], add.outputs, fused.outputs
    )
    return True


def _is_activation_dq(node: ir.Node) -> bool:
    """A per-tensor 8-bit DequantizeLinear of a QuantizeLinear's output (the kernel takes no
    16-bit activations, which the ``int16`` option gives)."""
    if node.op_type != "DequantizeLinear" or node.inputs[0] is None:
        return False
    q = node.inputs[0].producer()
    zero = node.inputs[2] if len(node.inputs) > 2 else None
    eight_bit = zero is None or (
        zero.const_value is not None
        and zero.const_value.dtype in (ir.DataType.UINT8, ir.DataType.INT8)
    )
    return q is not None and q.op_type == "QuantizeLinear" and _scalar(node.inputs[1]) and eight_bit


def _is_weight_dq(node: ir.Node) -> bool:
    """A DequantizeLinear of a constant 2-D weight, per tensor or per column (axis 1)."""
    if node.op_type != "DequantizeLinear" or node.inputs[0] is None:
        return False
    weight = node.inputs[0].const_value
    if weight is None or len(weight.shape) != 2:
        return False
    if _scalar(node.inputs[1]):
        return True
    axis = node.attributes.get_int("axis", 1)
    return axis in (1, -1)


def _scalar(value: ir.Value | None) -> bool:
    return value is not None and value.const_value is not None and value.const_value.size == 1
