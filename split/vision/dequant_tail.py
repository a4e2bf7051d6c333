"""Self-contained compressed tails: an exported tail whose ONNX graph starts with the codec's
dequantization, so any Open Inference Protocol server (MLServer, Triton, cloud-service) serves
it with ordinary input tensors; no codec `parameters` on the wire (see split.codec).

    self_contained_tail("repo/res_cnn_tail_stage2/1/model.onnx", "out/model.onnx", "int4")
    # or: split.vision.export.write_tail(repo, name, tail, activation, codec="int4")

Inputs of the written model, for a tail whose input `z` is float32 (B, C, H, W) at export
(`z` is the tail's input name; a rank-r input other than 4 uses its last axis as the channels,
as the device runtime's encode does):
    z_q           UINT8   (B, C, H, W)            int8: split.codec.encode(z, "int8").data
                          (B, C, H, ceil(W/2))    int4: encode(z, "int4").data, two values a byte,
                                                  element 2i in the low nibble; W is the model's own
                                                  (fixed at export), so `last_dim` does not travel
    z_scale       FP32    (C,)                    encode's `scale`, one per channel (axis 1)
    z_zero_point  UINT8   (C,)                    encode's `zero_point` (0..255, or 0..15 for int4)
The graph: int4 unpacks with BitShift (low = (q << 4) >> 4, high = q >> 4, interleaved, sliced
to W), then DequantizeLinear(z_q, z_scale, z_zero_point, axis=1) gives `z` = (q - zero_point) *
scale, exactly split.codec.decode's value, and the original tail follows unchanged. Bytes on
the wire: the same payload; the codec values as 5 * C bytes of tensors instead of text.
The scale and zero point have no batch dimension, so such a tail is served with
max_batch_size = 0 (one request, one batch; the runtime sends batch 1).
"""
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

CODECS = ("int8", "int4")


def input_names(name: str = "z") -> tuple[str, str, str]:
    """The self-contained tail's inputs for a tail input `name`: wire, scale, zero point."""
    return f"{name}_q", f"{name}_scale", f"{name}_zero_point"


def _dims(value_info) -> list:
    return [d.dim_param if d.HasField("dim_param") else (d.dim_value if d.HasField("dim_value") else None)
            for d in value_info.type.tensor_type.shape.dim]


def self_contained_tail(src, dst, codec: str, input_name: str | None = None) -> Path:
    """Read the tail ONNX at `src` (one float input), write at `dst` the same model behind the
    dequantization of `codec` ("int8" | "int4"); returns `dst`."""
    if codec not in CODECS:
        raise ValueError(f"codec '{codec}': a self-contained tail dequantizes {' or '.join(CODECS)}")
    model = onnx.load(str(src))
    graph = model.graph
    inits = {i.name for i in graph.initializer}
    real = [i for i in graph.input if i.name not in inits]
    if input_name is None:
        if len(real) != 1:
            raise ValueError(f"{src}: a tail has one input, this model has {[i.name for i in real]}")
        input_name = real[0].name
    found = [i for i in real if i.name == input_name]
    if not found or found[0].type.tensor_type.elem_type != TensorProto.FLOAT:
        raise ValueError(f"{src}: no float32 input '{input_name}'")
    dims = _dims(found[0])
    rank = len(dims)
    if rank < 2 or any(not isinstance(d, int) or d < 1 for d in dims[1:]):
        raise ValueError(f"{src}: input '{input_name}' needs a fixed shape after the batch, has {dims}")
    axis = 1 if rank == 4 else rank - 1
    channels, width = dims[axis], dims[-1]
    q_name, scale_name, zero_name = input_names(input_name)
    wire_dims = [dims[0], *dims[1:-1], (width + 1) // 2 if codec == "int4" else width]
    new_inputs = [helper.make_tensor_value_info(q_name, TensorProto.UINT8, wire_dims),
                  helper.make_tensor_value_info(scale_name, TensorProto.FLOAT, [channels]),
                  helper.make_tensor_value_info(zero_name, TensorProto.UINT8, [channels])]
    nodes, consts = [], []
    q = q_name
    if codec == "int4":
        def const(name, array):
            consts.append(numpy_helper.from_array(np.asarray(array), f"dequant_{name}"))
            return f"dequant_{name}"
        four, last = const("four", np.uint8(4)), [rank]
        nodes += [
            helper.make_node("BitShift", [q_name, four], ["dequant_high"], direction="RIGHT"),
            helper.make_node("BitShift", [q_name, four], ["dequant_shifted"], direction="LEFT"),
            helper.make_node("BitShift", ["dequant_shifted", four], ["dequant_low"], direction="RIGHT"),
            helper.make_node("Unsqueeze", ["dequant_low", const("last_axis", last)], ["dequant_low1"]),
            helper.make_node("Unsqueeze", ["dequant_high", "dequant_last_axis"], ["dequant_high1"]),
            helper.make_node("Concat", ["dequant_low1", "dequant_high1"], ["dequant_pairs"], axis=-1),
            helper.make_node("Reshape", ["dequant_pairs", const("flat", [0] * (rank - 1) + [-1])],
                             ["dequant_unpacked"]),
            helper.make_node("Slice", ["dequant_unpacked", const("start", [0]), const("end", [width]),
                                       const("axis", [rank - 1])], ["dequant_q"]),
        ]
        q = "dequant_q"
    nodes.append(helper.make_node("DequantizeLinear", [q, scale_name, zero_name], [input_name], axis=axis))
    others = [i for i in graph.input if i.name != input_name]
    new_graph = helper.make_graph([*nodes, *graph.node], graph.name, [*new_inputs, *others], list(graph.output),
                                  [*consts, *graph.initializer], value_info=list(graph.value_info))
    out = helper.make_model(new_graph, opset_imports=list(model.opset_import), ir_version=model.ir_version,
                            producer_name="edgefold split.vision.dequant_tail")
    onnx.checker.check_model(out)
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(out, str(dst))
    return dst
