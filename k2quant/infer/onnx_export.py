"""Export the integer-only TDNN-F (:class:`k2quant.infer.int_engine.IntTdnnF`) to ONNX.

The exported graph is the *dyadic* integer model, layer by layer as
:meth:`IntTdnnF.dyadic_reference_forward` (``_ref_layer``) evaluates it, built from standard
ONNX operators only (default domain, opset 13 or later; 17 by default), so that any runtime
implementing them (tested: onnxruntime, CPUExecutionProvider) computes the same integers.

Graph inputs (one of, chosen by ``export_onnx(..., inputs=...)``)
------------------------------------------------------------------
* ``"features"`` (default): ``features``, float32 ``(N, T, feat_dim)``, the features **already
  edge-padded** as ``dyadic_reference_forward(x, pad=True)`` pads them, i.e.
  ``pad_features(x, left_context, right_context, subsampling_factor)`` (``pad=False``
  semantics; :func:`onnx_feed` does it). ``T >= left_context + right_context + 1``. The graph
  starts with the input quantisation ``clamp(round(x * input_mul + input_add), 0, qmax)``
  (float32 ``Mul``, ``Add``, ``Round`` -- round half to even like ``torch.round`` -- ``Max``,
  ``Min``, ``Cast`` to uint8).
* ``"codes"``: ``input_codes``, uint8 ``(N, T, feat_dim)``, the codes of the ``input`` point
  (``IntTdnnF.quantize_input`` of the padded features).

``N`` and ``T`` are dynamic. The edge padding itself is not part of the graph.

Graph outputs
-------------
* ``log_probs``: float32 ``(N, T_out, num_classes)``: the frames of
  ``dyadic_reference_forward(x, pad=False)`` for the graph's input (for features padded by
  :func:`onnx_feed`, ``T_out = ceil(T_orig / subsampling_factor)`` as with ``pad=True``).
* ``output_acc``: int32 ``(N, T_out, num_classes)``, the output layer's integer accumulators.
* ``prefinal_codes``: uint8 ``(N, T_out, C)``, the codes of the ``prefinal_chain.batchnorm2``
  point (the output layer's input).
* with ``all_codes=True`` also ``codes/<point>``: uint8 ``(N, T_point, C_point)`` for every
  activation point of :func:`k2quant.infer.fold.activation_points` (time-major like
  ``dyadic_reference_forward(..., return_codes=True)``).

Arithmetic (per hidden layer, channels-first ``(N, C, T)``)
-----------------------------------------------------------
::

    acc  = ConvInteger(c_in, W, x_zero_point=z_in, dilations=[d])    uint8 x int8 -> int32
    a    = Cast<int64>(acc) + B          [ReLU layers: a = Max(a, 0)]
    num  = a * m + (C + 2**(e-1) - mx * z_x)  [+ mx * Cast<int64>(Slice(c_x, d, -d))]
    q    = (num - Mod(num, 2**e)) / 2**e                              floor(num / 2**e)
    c_out = Cast<uint8>(Min(Max(q + z_out, 0), 2**b_out - 1))

The rounding shift ``floor((num + 2**(e-1)) / 2**e)`` is written with ``Mod`` (``fmod=0``: the
remainder has the sign of the divisor, i.e. lies in ``[0, 2**e)``) so that the ``Div`` is an
exact division: ONNX integer ``Div`` truncates toward zero and ``BitShift`` is defined for
unsigned types only, so neither gives the floor of a negative numerator by itself. Every
intermediate is an exact int64 (the bounds are checked at export: ``|num| < 2**62``) and the
accumulators are exact int32 (checked: ``sum|W| * max|c - z_in| < 2**31``), hence the codes at
every point and ``output_acc`` equal the reference **bit for bit**.

Subsampling is ``Slice(steps=[sf])`` on the time axis (``c[:, :, ::sf]``); the bypass of a
tdnnf layer uses the centre frames ``c_x[:, :, d : T - d]`` (``d = bypass_offset``).

The output layer: ``Cast<float32>(acc) * out_scale + out_bias`` (two float32 roundings, as in
the reference; ``output_acc`` is exact, so the logits differ only if a runtime fused the two
roundings) and ``LogSoftmax(axis=-1)``, the runtime's own kernel, which may differ from torch's
by float32 rounding (measured with onnxruntime 1.31: max abs difference of the log-probs
< 1e-6; the tests bound it by 1e-5).

Supported: activation points of any width 2..8 bits (stored as uint8 codes; mixed widths per
point), int8 weights (4-bit layers as their int8 expansion), any strides/subsampling layout of
the TDNN-F. Not supported: the fast engines'' other arithmetic (the ``qtensor`` back end's float
requantisation is not exported -- the graph is always the dyadic model), streaming state, and
the edge padding (done by the caller, :func:`onnx_feed`).
"""
from pathlib import Path
from typing import Dict, List, Optional, Union

import numpy as np
import torch

from k2quant.infer.fold import activation_points, check_features
from k2quant.infer.int_engine import IntLayer, IntTdnnF

MIN_OPSET = 13
INPUT_KINDS = ("features", "codes")
_ACC_LIMIT = 1 << 31
_NUM_LIMIT = 1 << 62


def _import_onnx():
    try:
        import onnx
        from onnx import TensorProto, helper, numpy_helper
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "k2quant ONNX export needs the 'onnx' package (and 'onnxruntime' to run the "
            "model): pip install onnx onnxruntime"
        ) from e
    return onnx, TensorProto, helper, numpy_helper


def check_exportable(eng: IntTdnnF) -> None:
    """Raise ``ValueError`` (naming the layer) unless every layer of ``eng`` fits the graph's
    exact integer arithmetic."""
    if not isinstance(eng, IntTdnnF):
        raise ValueError(f"export_onnx: expected an IntTdnnF, got {type(eng).__name__}")
    for name in eng.layer_names():
        L = eng.layers[name]
        if L.W.dtype != torch.int8 or L.W.dim() != 3:
            raise ValueError(f"{name}: expected int8 (out, in, k) weights, got "
                             f"{L.W.dtype} {tuple(L.W.shape)}")
        if not 1 <= L.bits_in <= 8 or not 0 <= L.z_in <= (1 << L.bits_in) - 1:
            raise ValueError(f"{name}: input activations must be unsigned codes of <= 8 bits "
                             f"with the zero point on the grid (bits {L.bits_in}, z {L.z_in})")
        qmax_in = (1 << L.bits_in) - 1
        span = max(L.z_in, qmax_in - L.z_in)
        wsum = L.W.to(torch.int64).abs().reshape(L.out_features, -1).sum(1)
        acc_max = int(wsum.max()) * span
        if acc_max >= _ACC_LIMIT:
            raise ValueError(f"{name}: |accumulator| may reach {acc_max} >= 2**31; ONNX "
                             f"ConvInteger accumulates in int32")
        if L.final:
            if L.out_bias is None:
                raise ValueError(f"{name}: final layer without out_bias")
            continue
        if L.B is None or L.m is None or L.C is None:
            raise ValueError(f"{name}: missing requantisation constants (B, m, C)")
        if L.e < 1 or L.e > 61:
            raise ValueError(f"{name}: shift e={L.e} outside 1..61")
        if not 1 <= L.bits_out <= 8 or not 0 <= L.z_out <= (1 << L.bits_out) - 1:
            raise ValueError(f"{name}: output activations must be unsigned codes of <= 8 bits "
                             f"(bits {L.bits_out}, zero point {L.z_out})")
        bound = ((wsum * span + L.B.abs()) * L.m.abs() + L.C.abs() + (1 << L.e)
                 + abs(L.mx) * (256 + abs(L.z_x)))
        if float(bound.max()) >= _NUM_LIMIT:
            raise ValueError(f"{name}: the requantisation numerator may reach "
                             f"{float(bound.max()):.3g} >= 2**62 (int64 headroom)")


class _Builder:
    def __init__(self, helper, numpy_helper, TensorProto):
        self.h, self.nh, self.TP = helper, numpy_helper, TensorProto
        self.nodes: List = []
        self.inits: List = []
        self._n = 0

    def uniq(self, base: str) -> str:
        self._n += 1
        return f"{base}__{self._n}"

    def const(self, base: str, arr: np.ndarray) -> str:
        name = self.uniq(base)
        self.inits.append(self.nh.from_array(np.ascontiguousarray(arr), name))
        return name

    def i64(self, base: str, v) -> str:
        return self.const(base, np.asarray(v, dtype=np.int64))

    def op(self, op_type: str, inputs: List[str], base: str, out: Optional[str] = None,
           **attrs) -> str:
        out = out or self.uniq(base)
        self.nodes.append(self.h.make_node(op_type, inputs, [out], name=self.uniq(op_type),
                                           **attrs))
        return out


def _time_slice(b: _Builder, x: str, start: int, end: int, step: int, base: str) -> str:
    return b.op("Slice", [x, b.i64("starts", [start]), b.i64("ends", [end]),
                          b.i64("axes", [2]), b.i64("steps", [step])], base)


def _layer(b: _Builder, L: IntLayer, c: str, cx: Optional[str] = None,
           out: Optional[str] = None) -> str:
    """One layer as in ``IntTdnnF._ref_layer``; ``c``, ``cx``: uint8 (N, C, T)."""
    TP = b.TP
    p = L.name
    W = L.W.numpy().astype(np.int8)
    acc = b.op("ConvInteger", [c, b.const(f"{p}.W", W),
                               b.const(f"{p}.z_in", np.asarray(L.z_in, dtype=np.uint8))],
               f"{p}.acc", kernel_shape=[L.kernel], dilations=[max(L.dilation, 1)])
    if L.final:
        return acc
    col = lambda t: t.to(torch.int64).numpy().reshape(-1, 1)  # noqa: E731  (out, 1)
    a = b.op("Cast", [acc], f"{p}.acc64", to=TP.INT64)
    a = b.op("Add", [a, b.const(f"{p}.B", col(L.B))], f"{p}.a")
    if L.relu:
        a = b.op("Max", [a, b.i64("zero", 0)], f"{p}.relu")
    num = b.op("Mul", [a, b.const(f"{p}.m", col(L.m))], f"{p}.am")
    const = L.C.to(torch.int64) + (1 << (L.e - 1))
    if L.mx:
        const = const - L.mx * L.z_x
    num = b.op("Add", [num, b.const(f"{p}.const", col(const))], f"{p}.num")
    if L.mx:
        if cx is None:
            raise ValueError(f"{p}: bypass layer without bypass input")
        d = L.bypass_offset
        xc = _time_slice(b, cx, d, -d, 1, f"{p}.xc") if d > 0 else cx
        xc = b.op("Cast", [xc], f"{p}.xc64", to=TP.INT64)
        xc = b.op("Mul", [xc, b.i64(f"{p}.mx", L.mx)], f"{p}.xcm")
        num = b.op("Add", [num, xc], f"{p}.numx")
    D = b.i64(f"{p}.D", 1 << L.e)
    r = b.op("Mod", [num, D], f"{p}.rem", fmod=0)  # in [0, 2**e)
    q = b.op("Div", [b.op("Sub", [num, r], f"{p}.mult"), D], f"{p}.q")  # exact division
    q = b.op("Add", [q, b.i64(f"{p}.z_out", L.z_out)], f"{p}.qz")
    q = b.op("Max", [q, b.i64("zero", 0)], f"{p}.lo")
    q = b.op("Min", [q, b.i64(f"{p}.qmax", (1 << L.bits_out) - 1)], f"{p}.hi")
    return b.op("Cast", [q], f"{p}.codes", out=out, to=TP.UINT8)


def build_onnx_model(eng: IntTdnnF, *, opset: int = 17, inputs: str = "features",
                     all_codes: bool = False):
    """The ``onnx.ModelProto`` of ``eng`` (see the module docstring); checked with
    ``onnx.checker``."""
    onnx, TP, helper, numpy_helper = _import_onnx()
    if inputs not in INPUT_KINDS:
        raise ValueError(f"export_onnx: inputs must be one of {list(INPUT_KINDS)}, got "
                         f"{inputs!r}")
    max_opset = onnx.defs.onnx_opset_version()
    if not isinstance(opset, int) or not MIN_OPSET <= opset <= max_opset:
        raise ValueError(f"export_onnx: opset must be an int in {MIN_OPSET}..{max_opset} "
                         f"(this onnx {onnx.__version__}), got {opset!r}")
    check_exportable(eng)
    b = _Builder(helper, numpy_helper, TP)
    F_, a_in = eng.feat_dim, eng.acts["input"]
    graph_outputs = []

    def emit(point: str, c: str, channels: int, t_dim: str):
        if all_codes:
            name = f"codes/{point}"
            b.op("Transpose", [c], name, out=name, perm=[0, 2, 1])
            graph_outputs.append(helper.make_tensor_value_info(
                name, TP.UINT8, ["N", t_dim, channels]))

    if inputs == "features":
        gin = helper.make_tensor_value_info("features", TP.FLOAT, ["N", "T", F_])
        y = b.op("Mul", ["features", b.const("input_mul", eng.input_mul.numpy().astype(
            np.float32))], "xq.mul")
        y = b.op("Add", [y, b.const("input_add", eng.input_add.numpy().astype(np.float32))],
                 "xq.add")
        y = b.op("Round", [y], "xq.round")
        y = b.op("Max", [y, b.const("xq.zero", np.asarray(0.0, dtype=np.float32))], "xq.lo")
        y = b.op("Min", [y, b.const("xq.qmax", np.asarray(float(a_in.qmax), np.float32))],
                 "xq.hi")
        codes_tm = b.op("Cast", [y], "input_codes", to=TP.UINT8)
    else:
        gin = helper.make_tensor_value_info("input_codes", TP.UINT8, ["N", "T", F_])
        codes_tm = "input_codes"
    c = b.op("Transpose", [codes_tm], "input_cf", perm=[0, 2, 1])
    emit("input", c, F_, "T")
    L = eng.layers["tdnn1.affine"]
    c = _layer(b, L, c)
    emit("tdnn1", c, L.out_features, "T1")
    sf = eng.subsampling_factor
    big = np.iinfo(np.int64).max
    for i in range(eng.num_tdnnf):
        if i == eng.subsample_index and sf > 1:
            c = _time_slice(b, c, 0, big, sf, "subsample")
        Ll = eng.layers[f"tdnnfs.{i}.linear"]
        La = eng.layers[f"tdnnfs.{i}.affine"]
        z = _layer(b, Ll, c)
        c = _layer(b, La, z, c)
        emit(f"tdnnfs.{i}.linear", z, Ll.out_features, f"Tl{i}")
        emit(f"tdnnfs.{i}", c, La.out_features, f"Ta{i}")
    if eng.subsample_index == eng.num_tdnnf and sf > 1:
        c = _time_slice(b, c, 0, big, sf, "subsample")
    for name, point in (("prefinal_l", "prefinal_l"),
                        ("prefinal_chain.affine", "prefinal_chain.batchnorm1"),
                        ("prefinal_chain.linear", "prefinal_chain.batchnorm2")):
        L = eng.layers[name]
        c = _layer(b, L, c)
        if point != "prefinal_chain.batchnorm2":
            emit(point, c, L.out_features, f"T_{point}")
    L = eng.layers["output"]
    C_pre = L.W.shape[1]
    b.op("Transpose", [c], "prefinal_codes", out="prefinal_codes", perm=[0, 2, 1])
    if all_codes:
        b.op("Identity", ["prefinal_codes"], "", out="codes/prefinal_chain.batchnorm2")
    acc = _layer(b, L, c)
    acc = b.op("Transpose", [acc], "output_acc", out="output_acc", perm=[0, 2, 1])
    y = b.op("Cast", [acc], "acc_f", to=TP.FLOAT)
    y = b.op("Mul", [y, b.const("out_scale", L.out_scale.numpy().astype(np.float32))],
             "logits_s")
    y = b.op("Add", [y, b.const("out_bias", L.out_bias.numpy().astype(np.float32))],
             "logits")
    b.op("LogSoftmax", [y], "log_probs", out="log_probs", axis=-1)
    K = eng.num_classes
    outs = [helper.make_tensor_value_info("log_probs", TP.FLOAT, ["N", "T_out", K]),
            helper.make_tensor_value_info("output_acc", TP.INT32, ["N", "T_out", K]),
            helper.make_tensor_value_info("prefinal_codes", TP.UINT8, ["N", "T_out", C_pre])]
    if all_codes:
        outs.append(helper.make_tensor_value_info("codes/prefinal_chain.batchnorm2",
                                                  TP.UINT8, ["N", "T_out", C_pre]))
        have = {o.name for o in outs + graph_outputs}
        missing = [p for p in activation_points(eng.num_tdnnf) if f"codes/{p}" not in have]
        assert not missing, missing
    graph = helper.make_graph(b.nodes, "k2quant_int_tdnnf", [gin], outs + graph_outputs,
                              initializer=b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              producer_name="k2quant")
    # the lowest IR version that carries this opset (runtimes lag behind onnx's newest IR)
    model.ir_version = helper.find_min_ir_version_for(list(model.opset_import))
    meta = {"format": "k2quant-int-tdnnf-onnx", "inputs": inputs,
            "feat_dim": F_, "num_classes": K, "subsampling_factor": sf,
            "left_context": eng.left_context, "right_context": eng.right_context,
            "padding": "edge-replicate by the caller (k2quant.infer.pad_features)"}
    helper.set_model_props(model, {k: str(v) for k, v in meta.items()})
    onnx.checker.check_model(model)
    return model


def export_onnx(eng: IntTdnnF, path: Union[str, Path], *, opset: int = 17,
                inputs: str = "features", all_codes: bool = False) -> Path:
    """Write ``eng`` as an ONNX model to ``path`` (atomic) and return the path.

    Args:
      eng: the integer model (any back end; the graph is always the dyadic arithmetic).
      opset: ONNX opset of the default domain (13 .. the installed onnx's maximum).
      inputs: ``"features"`` (float32 padded features) or ``"codes"`` (uint8 input codes).
      all_codes: also output the codes of every activation point (``codes/<point>``).

    Raises:
      ImportError: onnx is not installed. ValueError: a layer does not fit the exact int32
      / int64 arithmetic (the message names it), or bad arguments.
    """
    from k2quant.utils.io import atomic_open

    model = build_onnx_model(eng, opset=opset, inputs=inputs, all_codes=all_codes)
    data = model.SerializeToString()
    path = Path(path)
    with atomic_open(path, "wb") as f:
        f.write(data)
    return path


def onnx_feed(eng: IntTdnnF, x: torch.Tensor, *, pad: bool = True,
              inputs: str = "features") -> Dict[str, np.ndarray]:
    """The input dict for an exported graph from float features ``x`` (N, T, feat_dim):
    edge-padded like ``dyadic_reference_forward(x, pad)``; ``inputs="codes"`` also quantised
    (``eng.quantize_input``) to uint8."""
    if inputs not in INPUT_KINDS:
        raise ValueError(f"onnx_feed: inputs must be one of {list(INPUT_KINDS)}, got {inputs!r}")
    check_features(x, eng.feat_dim, "onnx_feed")
    x = eng._prepare_input(x, pad)
    if inputs == "codes":
        return {"input_codes": eng.quantize_input(x).to(torch.uint8).numpy()}
    return {"features": np.ascontiguousarray(x.to(torch.float32).numpy())}


__all__ = ["export_onnx", "build_onnx_model", "check_exportable", "onnx_feed",
           "MIN_OPSET"]
