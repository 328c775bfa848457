"""The int8 encoder graph: static int8 activations, outlier channels smoothed into the weights.

Why, and what else was measured: BENCHMARKS.md, issue 19.

`quantize_int8` turns the fp32 export into model.int8.onnx; the helpers below are its steps, in order.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

# Ops whose outputs carry a few outlier channels (up to 5x the other channels' range, mostly at [CLS]) in BERT-like
# models: a per-tensor int8 scale wide enough for them leaves the rest of the tensor a few levels.
OUTLIER_PRODUCERS = {"LayerNormalization", "Gelu"}


def quantize_int8(fp32_path: Path, int8_path: Path, calibration_ids: list[list[int]],
                  outlier_percentile: float = 99.0) -> None:
    """Every MatMul in int8 (u8 activations x s8 per-channel weights), with static activation scales.
    - 7-bit weights (ORT's reduce_range): a CPU without VNNI (AVX2 only: vpmaddubsw) adds each pair of u8 x s8
      products into a saturating int16, which full-range weights overflow: on an AVX2-only EPYC (Zen 3) the
      8-bit graph came out at min cosine 0.9886 to fp32 on the catalogue, under the 0.99 bar, and 0.9915 with
      7-bit weights; the same kernels run, so no speed is lost. One graph for every CPU: a model version must
      mean the same vectors wherever it is exported (where VNNI exists, 8-bit weights measured 0.996).

    - Static scales: each activation's range over `calibration_ids` (token ids, one text each). ORT's dynamic
      quantization picks a scale per batch, so a text encoded alone and inside a batch came out different
      (cosine down to 0.991).
    - Outlier channels: the outputs of LayerNorm and GELU have a few channels (the top 1%) far wider than the rest;
      their min/max scale cost all-int8 a min cosine of 0.985 to fp32, so the FFN down-projections had to stay
      fp32 (1.3-1.9x fp32). Here each such channel is divided by r = its range / the `outlier_percentile`-th
      percentile of channel ranges before the MatMuls that read it, and their weight rows are multiplied by r (the
      fp32 function is unchanged; SmoothQuant's migration, applied to the outlier channels only): min cosine 0.996.
      Clipping the ranges instead (percentile, MSE) gave 0.988 at best and 0.87 at the 99.99th percentile: the
      outliers carry the output.
    - ORT fuses MatMulInteger -> Cast -> Mul into MatMulIntegerToFloat only while the activation scale is computed
      at run time; with static scales constant folding hides the pattern, so the fused op is written here.
    - Two rewrites of the graph around the integer kernels, worth 1.3-1.45x here (1.1x to fp32): the attention's
      NaN guard (Where(IsNaN(p), 0, p): a row cannot be fully masked, [CLS] is always there) is dropped, and the
      residual Add before each LayerNorm becomes a Sum, which ORT does not fuse into SkipLayerNormalization (~5x
      slower than Add + LayerNormalization in ORT 1.32 on this CPU).
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = onnx.load(str(fp32_path))
    readers = _weight_matmuls(model.graph)
    low, high = _channel_ranges(model, list(readers), calibration_ids)
    ranges = _smooth_outlier_channels(model, readers, low, high, outlier_percentile)
    with tempfile.TemporaryDirectory(dir=int8_path.parent) as tmp:
        smoothed, dynamic = Path(tmp) / "smoothed.onnx", Path(tmp) / "dynamic.onnx"
        onnx.save(model, str(smoothed))
        quantize_dynamic(str(smoothed), str(dynamic), per_channel=True, weight_type=QuantType.QInt8,
                         reduce_range=True)
        model = onnx.load(str(dynamic))
    _static_activation_scales(model, ranges)
    _fuse_integer_matmuls(model)
    _drop_nan_guards(model)
    _keep_layer_norms_unfused(model)
    onnx.save(model, str(int8_path))


def _weight_matmuls(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    """The MatMuls with a constant 2-D weight, by the activation they read."""
    weights = {init.name for init in graph.initializer if len(init.dims) == 2}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        if node.op_type == "MatMul" and node.input[1] in weights:
            readers.setdefault(node.input[0], []).append(node)
    return readers


def _channel_ranges(model: onnx.ModelProto, activations: list[str],
                    calibration_ids: list[list[int]]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Per activation, each channel's min and max over the calibration texts, run one at a time on fp32."""
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend(helper.make_tensor_value_info(a, onnx.TensorProto.FLOAT, None) for a in activations)
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    low: dict[str, np.ndarray] = {}
    high: dict[str, np.ndarray] = {}
    for ids in calibration_ids:
        row = np.array([ids], dtype=np.int64)
        values = session.run(activations, {"input_ids": row, "attention_mask": np.ones_like(row)})
        for name, value in zip(activations, values):
            channels = value.reshape(-1, value.shape[-1])  # (tokens, channels)
            low[name] = np.minimum(low.get(name, 0.0), channels.min(axis=0))  # 0 stays in every range (zero point)
            high[name] = np.maximum(high.get(name, 0.0), channels.max(axis=0))
    return low, high


def _smooth_outlier_channels(model: onnx.ModelProto, readers: dict[str, list[onnx.NodeProto]],
                             low: dict[str, np.ndarray], high: dict[str, np.ndarray],
                             percentile: float) -> dict[str, tuple[float, float]]:
    """Divide outlier channels of LayerNorm/GELU outputs by r before their MatMuls, multiply the weight rows by r.

    Returns the (low, high) range of every MatMul input of the new graph."""
    graph = model.graph
    producers = {output: node.op_type for node in graph.node for output in node.output}
    initializers = {init.name: init for init in graph.initializer}
    ranges = {}
    for activation, matmuls in readers.items():
        lo, hi = low[activation], high[activation]
        if producers.get(activation) not in OUTLIER_PRODUCERS:
            ranges[activation] = (float(lo.min()), float(hi.max()))
            continue
        need = np.maximum(hi, -lo)
        r = np.maximum(1.0, need / np.percentile(need, percentile)).astype(np.float32)
        smoothed = activation + "_smoothed"
        graph.initializer.append(numpy_helper.from_array(1 / r, activation + "_inverse_r"))
        for matmul in matmuls:
            weight = initializers[matmul.input[1]]
            weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * r[:, None], weight.name))
            matmul.input[0] = smoothed
        first_reader = min(list(graph.node).index(m) for m in matmuls)
        graph.node.insert(first_reader, helper.make_node("Mul", [activation, activation + "_inverse_r"], [smoothed],
                                                         name=activation + "_smooth"))
        ranges[smoothed] = (float((lo / r).min()), float((hi / r).max()))
    return ranges


def _static_activation_scales(model: onnx.ModelProto, ranges: dict[str, tuple[float, float]]) -> None:
    """Each DynamicQuantizeLinear -> QuantizeLinear with the scale and zero point of its activation's range."""
    graph = model.graph
    for node in [n for n in graph.node if n.op_type == "DynamicQuantizeLinear"]:
        lo, hi = ranges[node.input[0]]
        scale = max(hi - lo, 1e-8) / 255.0
        _, scale_name, zero_point_name = node.output  # become constants of the same names
        graph.initializer.extend([
            numpy_helper.from_array(np.array(scale, dtype=np.float32), scale_name),
            numpy_helper.from_array(np.array(round(-lo / scale), dtype=np.uint8), zero_point_name),
        ])
        static = helper.make_node("QuantizeLinear", [node.input[0], scale_name, zero_point_name], [node.output[0]],
                                  name=node.name + "_static")
        graph.node.insert(list(graph.node).index(node), static)
        graph.node.remove(node)


def _fuse_integer_matmuls(model: onnx.ModelProto) -> None:
    """MatMulInteger -> Cast -> Mul(activation scale x weight scales) [-> Add(bias)] -> one MatMulIntegerToFloat."""
    graph = model.graph
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    producers = {output: node for node in graph.node for output in node.output}
    biases = {init.name for init in graph.initializer if len(init.dims) == 1}
    replaced = []
    for matmul in [n for n in graph.node if n.op_type == "MatMulInteger"]:
        (cast,) = consumers[matmul.output[0]]
        (rescale,) = consumers[cast.output[0]]
        # Mul(activation scale, weight scales)
        scales = producers[next(i for i in rescale.input if i != cast.output[0])]
        inputs = [matmul.input[0], matmul.input[1], *scales.input, matmul.input[2], matmul.input[3]]
        output, absorbed = rescale.output[0], [matmul, cast, rescale]
        followers = consumers.get(output, [])
        if len(followers) == 1 and followers[0].op_type == "Add":
            bias = next(i for i in followers[0].input if i != output)
            if bias in biases:
                inputs.append(bias)
                output = followers[0].output[0]
                absorbed.append(followers[0])
        fused = helper.make_node("MatMulIntegerToFloat", inputs, [output], name=matmul.name + "_to_float",
                                 domain="com.microsoft")
        graph.node.insert(list(graph.node).index(matmul), fused)
        replaced += absorbed
        if all(c in replaced for c in consumers[scales.output[0]]):
            replaced.append(scales)
    for node in replaced:
        graph.node.remove(node)
    if not any(opset.domain == "com.microsoft" for opset in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))


def _drop_nan_guards(model: onnx.ModelProto) -> None:
    """Where(IsNaN(p), 0, p) -> p after each attention softmax: only a fully masked row gives NaN, and none is."""
    graph = model.graph
    producers = {output: node for node in graph.node for output in node.output}
    renamed = {}
    for where in [n for n in graph.node if n.op_type == "Where"]:
        guard = producers.get(where.input[0])
        if guard is not None and guard.op_type == "IsNaN" and where.input[2] == guard.input[0]:
            renamed[where.output[0]] = guard.input[0]
            graph.node.remove(where)
            graph.node.remove(guard)
    for node in graph.node:
        node.input[:] = [renamed.get(name, name) for name in node.input]


def _keep_layer_norms_unfused(model: onnx.ModelProto) -> None:
    """The Add feeding each LayerNormalization -> Sum (the same function), which SkipLayerNormFusion does not match."""
    producers = {output: node for node in model.graph.node for output in node.output}
    for norm in [n for n in model.graph.node if n.op_type == "LayerNormalization"]:
        add = producers.get(norm.input[0])
        if add is not None and add.op_type == "Add":
            add.op_type = "Sum"
