"""Build single-op FULLY_CONNECTED / QUANTIZE .tflite flatbuffers without TensorFlow.

Used by tests/test_intsim.py to run ai-edge-litert as an external oracle. The
flatbuffer is assembled with the object API of the schema module that the
ai-edge-litert wheel bundles (``ai_edge_litert.schema_py_generated``), so the
layout follows the runtime's own schema rather than a hand-copied one.
"""

from __future__ import annotations

import flatbuffers
import numpy as np
from ai_edge_litert import schema_py_generated as schema

_TYPES = {
    np.dtype(np.float32): schema.TensorType.FLOAT32,
    np.dtype(np.int8): schema.TensorType.INT8,
    np.dtype(np.int16): schema.TensorType.INT16,
    np.dtype(np.int32): schema.TensorType.INT32,
    np.dtype(np.int64): schema.TensorType.INT64,
}
ACTIVATIONS = {
    "none": schema.ActivationFunctionType.NONE,
    "relu": schema.ActivationFunctionType.RELU,
    "relu6": schema.ActivationFunctionType.RELU6,
}


def _quant(scale, zero_point, axis=0):
    q = schema.QuantizationParametersT()
    q.scale = [float(s) for s in np.atleast_1d(scale)]
    q.zeroPoint = [int(z) for z in np.atleast_1d(zero_point)]
    q.quantizedDimension = axis
    return q


def _tensor(name, shape, dtype, buffer, quant):
    t = schema.TensorT()
    t.name = name
    t.shape = list(shape)
    t.type = _TYPES[np.dtype(dtype)]
    t.buffer = buffer
    t.quantization = quant
    return t


def _buffer(data=None):
    b = schema.BufferT()
    if data is not None:
        b.data = np.frombuffer(np.ascontiguousarray(data).tobytes(), np.uint8)
    return b


def _model(tensors, opcode, op_inputs, op_outputs, buffers, options_type=0, options=None):
    op = schema.OperatorT()
    op.opcodeIndex = 0
    op.inputs, op.outputs = op_inputs, op_outputs
    op.builtinOptionsType, op.builtinOptions = options_type, options
    code = schema.OperatorCodeT()
    code.builtinCode = code.deprecatedBuiltinCode = opcode
    code.version = 1
    sub = schema.SubGraphT()
    sub.tensors, sub.inputs, sub.outputs, sub.operators = tensors, op_inputs[:1], op_outputs, [op]
    model = schema.ModelT()
    model.version = 3
    model.operatorCodes, model.subgraphs = [code], [sub]
    # Buffer 0 is the schema's empty sentinel; activations point at it.
    model.buffers = [_buffer()] + buffers
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def quantize_model(*, shape, scale, zero_point, out_dtype=np.int8):
    """Returns .tflite bytes for a per-tensor QUANTIZE float32 -> out_dtype."""
    tensors = [_tensor("x", shape, np.float32, 0, None),
               _tensor("q", shape, out_dtype, 0, _quant(scale, zero_point))]
    return _model(tensors, schema.BuiltinOperator.QUANTIZE, [0], [1], [])


def fully_connected_model(*, batch, w_q, bias_q, s_in, z_in, s_w, s_out, z_out,
                          in_dtype=np.int8, activation="none"):
    """Returns .tflite bytes for y = FC(x) with constant int8 weights [N, K].

    s_w may be a scalar (per-tensor) or shape [N] (per-channel, axis 0). The
    bias scale is s_in * s_w[c], zp 0, as the TFLite quantization spec asks;
    bias_q must already be int32 (int8 activations) or int64 (int16).
    """
    w_q = np.asarray(w_q, np.int8)
    n, k = w_q.shape
    s_w = np.asarray(s_w, np.float32)
    bias_scale = np.float32(s_in) * s_w
    tensors = [
        _tensor("x", (batch, k), in_dtype, 0, _quant(s_in, z_in)),
        _tensor("w", (n, k), np.int8, 1, _quant(s_w, np.zeros(s_w.shape, np.int64))),
        _tensor("b", (n,), bias_q.dtype, 2, _quant(bias_scale, np.zeros(np.shape(bias_scale), np.int64))),
        _tensor("y", (batch, n), in_dtype, 0, _quant(s_out, z_out)),
    ]
    opts = schema.FullyConnectedOptionsT()
    opts.fusedActivationFunction = ACTIVATIONS[activation]
    return _model(tensors, schema.BuiltinOperator.FULLY_CONNECTED, [0, 1, 2], [3],
                  [_buffer(w_q), _buffer(bias_q)], schema.BuiltinOptions.FullyConnectedOptions, opts)


def run(model_bytes, x_q, resolver):
    """Runs a one-input model under an OpResolverType name ('BUILTIN_REF', ...)."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    interp = Interpreter(model_content=model_bytes,
                         experimental_op_resolver_type=getattr(OpResolverType, resolver))
    interp.allocate_tensors()
    interp.set_tensor(interp.get_input_details()[0]["index"], x_q)
    interp.invoke()
    return interp.get_tensor(interp.get_output_details()[0]["index"]).copy()
