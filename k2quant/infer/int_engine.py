"""Integer-only TDNN-F inference: int8 weights, 8-bit (or 4-bit) activations, int32
accumulation, dyadic requantisation; only the output layer's dequantisation and the final
log-softmax are float.

Arithmetic (one definition, two implementations)
------------------------------------------------
Activations at every point of :func:`k2quant.infer.fold.activation_points` are unsigned codes
``c in [0, 2**b - 1]`` of a per-tensor asymmetric grid: value ``S * (c - z)``. Weights are
int8 ``W`` with a per-output-channel scale ``s_w`` (4-bit layers: codes expanded to int8 in
[-8, 7]). A layer with kernel ``k`` and dilation ``d`` computes, per output channel j and
frame t (taps stacked, ``K = k * C_in``)::

    acc_j   = sum_{tap, i} W[j, i, tap] * (c_in[i, t + tap * d] - z_in)         exact integer
    a_j     = acc_j + B_j                    B_j = round(bias_j / (S_in s_w_j))
    a_j     = max(a_j, 0)                    (layers followed by ReLU)
    num_j   = a_j * m_j + C_j [+ mx * (c_x[j] - z_x)]                 int64, exact
    c_out_j = clamp(floor((num_j + 2**(e-1)) / 2**e) + z_out, 0, 2**b_out - 1)

with ``m_j / 2**e ~ M_j = S_in s_w_j a_j / S_out`` (``a_j``: the BatchNorm scale after the
ReLU; see :mod:`k2quant.infer.fold`), ``C_j = round(c_j / S_out * 2**e)`` (the BatchNorm
shift), and for tdnnf layers the bypass ``mx / 2**e ~ 0.66 S_x / S_out`` applied to the
layer's input codes ``c_x`` (centre frames). One shift ``e`` per layer: the largest of the
layer's multipliers gets 31 significant bits (:func:`dyadic_multiplier`); the others share
its absolute resolution ``2**-e`` (relative error ``<= 2**-31 * max|M| / |M_j|``, in practice
< 1e-6). The output layer returns ``float32(acc_j) * (S_in s_w_j) + bias_j`` and the
log-softmax. The input step ``c = clamp(round(x * mul_d + add_d), 0, 2**b - 1)`` folds
``input_bn`` (per-dimension affine) into the quantisation of the float features.

* :meth:`IntTdnnF.reference_forward` evaluates these formulas literally: channels-first, the
  accumulators by a float64 ``conv1d`` on the integer codes (exact: every partial sum is an
  integer below 2**53), the requantisation by :func:`rounding_shift` on int64.
* :meth:`IntTdnnF.forward` is the fast engine: time-major ``(N*T, K)`` activations (the taps
  of a dilated kernel-2/3 convolution stacked by one ``cat``, so each layer is a single int8
  GEMM whose M dimension is all frames of the batch), activations kept in 8-bit storage
  between layers, constants pre-folded (zero points, biases, rounding offset) so that the
  requantisation is ``[add, relu,] int64 multiply, [bypass multiply-add,] add, shift,
  clamp, narrow``. GEMM back ends (``backend=``):

  - ``"int_mm"`` (torch >= 2.1): ``torch._int_mm`` int8 x int8 -> int32 (oneDNN/VNNI);
    activations stored as int8 ``c - 128``.
  - ``"fbgemm"`` (torch 1.13 and later with the fbgemm engine): fbgemm's int8 GEMM through
    ``quantized::linear_dynamic`` with unit scales: weights are prepacked as qint8 with
    scale 1, zero point 0 (the integer ``W`` itself); the uint8 codes are passed as float
    with two extra rows (all 0, all 255) so that the dynamic range is exactly [0, 255],
    i.e. activation scale 1 and zero point 0, and fbgemm's float output
    ``1.0 * 1.0 * float(acc)`` is the int32 accumulator exactly as long as
    ``|acc| < 2**24``. That bound is guaranteed statically: K is split into chunks with
    ``255 * max_j sum_{k in chunk} |W[j, k]| < 2**24`` (one chunk for most layers) and the
    chunks' accumulators are added in int64.
  - ``"float64"``: exact float64 GEMM (slow fallback where neither exists).

  All dyadic back ends produce exactly the same integer accumulators, so the engine equals the
  reference **bit for bit** (codes at every point and the float log-probs); the tests assert
  equality (no 1-LSB slack is needed because no dyadic back end uses float requantisation).

  torch's static quantized ops (``quantized::linear`` with quint8 in/out) requantise with a
  float multiplier inside fbgemm (``float(acc) * M`` then round-to-nearest-even), which is not
  the dyadic arithmetic above. Measured here (AMD EPYC Zen 5, AVX-512 VNNI, 1 thread,
  (1000 x 3072) x (3072 x 160)): ``torch._int_mm`` 0.35-0.7 ms, static ``quantized::linear``
  0.8 ms, the unit-scale ``linear_dynamic`` trick 0.8 ms on torch 1.13 (1.5 ms on torch
  2.13), fp32 ``mm`` 7-17 ms. The GEMMs are therefore not the bottleneck of these back ends;
  the requantisation's elementwise int64 passes are. In eager mode they run on row blocks of
  ~64k elements (cache resident).

  - ``"qtensor"`` (:mod:`k2quant.infer.qtensor`; torch 1.13 and 2.x with fbgemm): quint8
    tensors end to end through ``quantized::linear[_relu]`` and ``quantized::add``, i.e. the
    requantisation fused into fbgemm's GEMM epilogue -- several times faster than the dyadic
    back ends in eager mode. It computes a *different* integer function (float32
    multipliers, round half to even, BatchNorm shifts carried as per-channel offsets), built
    from the same :class:`IntLayer` constants; :meth:`IntTdnnF.reference_forward` then
    simulates *that* arithmetic and equals the engine bit for bit. ``"auto"`` picks it
    whenever the model allows (8-bit activations, non-negative BatchNorm scales after the
    ReLUs, VNNI fbgemm), otherwise the fastest dyadic back end; the dyadic back ends remain
    the documented exact integer-only path (``dyadic_reference_forward``).

* The *fused* engine (``set_backend(b, compile=True)``, :meth:`IntTdnnF._fused_forward`): the
  same integers, evaluated in the time-major layout of :mod:`k2quant.infer.qtensor` (the
  frames of all utterances as one ``(N * stride, C)`` matrix, a layer maps rows
  ``r .. r + (k-1) d`` to row ``r``, so no per-utterance ``cat``; rows mixing two utterances
  are never used by valid rows and are dropped before the output layer) with each layer's
  requantisation as one expression (:func:`_requant_fused`); ``"auto"`` never picks it
  (compiling takes ~1 min; :func:`fused_backend` names the one available):

  - ``"int_mm"`` (torch >= 2): the whole integer forward compiled by ``torch.compile``
    (dynamic shapes; two graphs, one utterance and batches); each layer is one ``cat`` of
    shifted row slices, one ``_int_mm`` and one vectorised requantisation loop. inductor
    vectorises int8 <-> int64 conversions badly, so the expression converts through int32
    (exact): 4-6x faster loops than the plain form. The elementwise loops are compiled
    single-threaded (:data:`FUSED_SERIAL_LOOPS`). Measured with ``k2quant bench`` (2-core
    AMD EPYC shared with other jobs, load 1.5-2; speedup vs fp32, batch / streaming):
    small preset 4.6x / 5.2x at 1 thread, 3.7x / 3.3x at 2 threads; kaldi_7q 4.2x / 5.0x
    and 3.6x / 3.8x (eager ``int_mm``: 1.8-2.3x batch).
  - ``"fbgemm"`` (torch 1.13, no ``torch.compile``/``_int_mm``): eager layers (one float32
    im2col + ``linear_dynamic`` per layer) and each requantisation a TorchScript function
    fused into one loop by the NNC (TensorExpr) CPU fuser, which is enabled only around the
    engine's calls. Needs ``|acc| < 2**31`` (checked when built). Measured (torch 1.13, 1
    thread): small 2.6x / 5.3x, kaldi_7q 1.9x / 6.2x fp32 (eager fbgemm: ~1.1x batch); the
    batch figure is bounded by ``linear_dynamic``'s own dynamic quantisation of its input.

  The input quantisation and the final log-softmax run eagerly (the same ATen kernels as the
  reference); the output layer's dequantisation ``float32(acc) * s + b`` is part of the fused
  graph, rounded twice as in eager mode (inductor compiles with ``-ffp-contract=off``; the
  tests compare the log-probs bit for bit).

Caution:
  the xent branch of a TdnnF is not part of the integer model (inference uses the chain
  output only).
"""
import logging
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from k2quant.infer.dyadic import MULTIPLIER_BITS, dyadic_multiplier, rounding_shift
from k2quant.infer.fold import (
    FoldedLayer,
    FoldedTdnnF,
    activation_points,
    check_features,
    fold_tdnnf,
)
from k2quant.infer.streaming import chunked_forward, pad_features

log = logging.getLogger(__name__)

FORMAT = "k2quant-int-tdnnf"
FORMAT_VERSION = 1
BACKENDS = ("auto", "qtensor", "int_mm", "fbgemm", "float64")
_FBGEMM_LIMIT = 1 << 24  # float32 integers are exact below this
# torch 2.x converts int32 -> int64 slowly with .to() but fast inside a promoting multiply;
# torch 1.13 the other way round (measured; both exact).
_PROMOTING_MUL = int(torch.__version__.split(".")[0]) >= 2
#: requantisation works on row blocks of about this many elements (int64: 512 KiB)
_BLOCK_ELEMENTS = 1 << 16
#: The fused int_mm engine compiles its elementwise loops single-threaded (inductor
#: ``cpp.threads=1``); the GEMMs still use all of torch's threads. Measured on the shared
#: 2-core machine at 2 threads (load ~2.5): kaldi_7q batch 224 ms vs 895 ms with OpenMP loops,
#: streaming 3.4 s vs 5.6 s (every parallel region waits for a descheduled thread); at 1
#: thread within noise. Set before ``set_backend(..., compile=True)``.
FUSED_SERIAL_LOOPS = True


# ----------------------------------------------------------------------------------------
# activation quantisation
# ----------------------------------------------------------------------------------------
@dataclass
class ActQuant:
    """Per-tensor asymmetric activation grid of one point: value = scale * (code - zero_point),
    codes in [0, 2**bits - 1]."""

    point: str
    scale: float
    zero_point: int
    bits: int
    lo: float
    hi: float

    @property
    def qmax(self) -> int:
        return (1 << self.bits) - 1

    @classmethod
    def from_range(cls, point: str, lo: float, hi: float, bits: int = 8) -> "ActQuant":
        from k2quant.quant.uniform import uniform_grid

        if not isinstance(bits, int) or not 2 <= bits <= 8:
            raise ValueError(f"activation point {point!r}: bits must be an int in 2..8, got {bits!r}")
        lo, hi = float(lo), float(hi)
        if not (math.isfinite(lo) and math.isfinite(hi)) or lo > hi:
            raise ValueError(f"activation point {point!r}: invalid range [{lo}, {hi}]")
        scale, zp = uniform_grid(
            torch.tensor(lo, dtype=torch.float32), torch.tensor(hi, dtype=torch.float32),
            bits, symmetric=False, signed=False,
        )
        return cls(point, float(scale), int(zp), bits, lo, hi)

    def to_dict(self) -> Dict[str, Any]:
        return {"scale": self.scale, "zero_point": self.zero_point, "bits": self.bits,
                "lo": self.lo, "hi": self.hi}


# ----------------------------------------------------------------------------------------
# integer layers
# ----------------------------------------------------------------------------------------
@dataclass
class IntLayer:
    """Canonical integer parameters of one layer (see the module docstring).

    ``W``: int8 (out, in, k). ``B``, ``m``, ``C``: int64 (out,). ``e``, ``mx``: ints.
    Final (float-output) layers use ``out_scale``/``out_bias`` (float32 (out,)) instead of
    ``B, m, C``.
    """

    name: str
    W: torch.Tensor
    w_scale: torch.Tensor  # float64 (out,), for information / fp32 comparison
    dilation: int
    relu: bool
    z_in: int
    bits_in: int
    B: Optional[torch.Tensor] = None
    m: Optional[torch.Tensor] = None
    e: int = 0
    C: Optional[torch.Tensor] = None
    z_out: int = 0
    bits_out: int = 8
    mx: int = 0
    z_x: int = 0
    bypass_offset: int = 0
    out_scale: Optional[torch.Tensor] = None
    out_bias: Optional[torch.Tensor] = None
    weight_bits: int = 8
    weight_exact: bool = True

    @property
    def final(self) -> bool:
        return self.out_scale is not None

    @property
    def kernel(self) -> int:
        return int(self.W.shape[2])

    @property
    def out_features(self) -> int:
        return int(self.W.shape[0])

    def to_dict(self) -> Dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "IntLayer":
        return cls(**dict(d))


def quantize_weight_per_channel(w: torch.Tensor, bits: int = 8) -> Tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel quantisation of a float (out, in, k) weight.

    Returns int8 codes in ``[-(2**(b-1) - 1), 2**(b-1) - 1]`` and float64 scales (out,)."""
    if not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"weight bits must be an int in 2..8, got {bits!r}")
    w = w.detach().to(torch.float64)
    qmax = (1 << (bits - 1)) - 1
    amax = w.abs().reshape(w.shape[0], -1).max(dim=1).values
    scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
    codes = torch.round(w / scale.reshape(-1, *([1] * (w.dim() - 1)))).clamp(-qmax, qmax)
    return codes.to(torch.int8), scale


def build_int_layer(
    fl: FoldedLayer,
    in_act: ActQuant,
    out_act: Optional[ActQuant],
    bypass_act: Optional[ActQuant] = None,
    weight_bits: int = 8,
) -> IntLayer:
    """Integer parameters of a folded layer for the given activation grids."""
    if fl.qweight is not None:
        W, w_scale, wbits, exact = fl.qweight.codes, fl.qweight.scale, fl.qweight.bits, True
    else:
        W, w_scale = quantize_weight_per_channel(fl.weight, weight_bits)
        wbits, exact = weight_bits, False
    s_acc = float(in_act.scale) * w_scale.to(torch.float64)  # (out,) > 0
    layer = IntLayer(
        name=fl.name, W=W.contiguous(), w_scale=w_scale.clone(), dilation=fl.dilation,
        relu=fl.relu, z_in=in_act.zero_point, bits_in=in_act.bits, weight_bits=wbits,
        weight_exact=exact,
    )
    if out_act is None:
        layer.out_scale = (s_acc * fl.post_scale).to(torch.float32)
        layer.out_bias = (fl.post_scale * fl.bias + fl.post_shift).to(torch.float32)
        return layer
    M = s_acc * fl.post_scale / out_act.scale
    Mx = fl.bypass * bypass_act.scale / out_act.scale if fl.bypass != 0.0 else 0.0
    biggest = max(float(M.abs().max()), abs(Mx))
    if biggest == 0.0:
        raise ValueError(f"{fl.name}: all requantisation multipliers are zero")
    _, e = dyadic_multiplier(biggest, MULTIPLIER_BITS)
    if e < 1:
        raise ValueError(
            f"{fl.name}: requantisation scale {biggest:g} >= 2**30 cannot be represented; "
            f"the activation ranges are degenerate (recalibrate)"
        )
    lim = (1 << MULTIPLIER_BITS) - 1
    layer.m = torch.round(M * 2.0 ** e).clamp(-lim, lim).to(torch.int64)
    layer.e = int(e)
    layer.mx = int(round(Mx * 2.0 ** e))
    layer.B = torch.round(fl.bias / s_acc).to(torch.int64)
    layer.C = torch.round(fl.post_shift / out_act.scale * 2.0 ** e).to(torch.int64)
    layer.z_out, layer.bits_out = out_act.zero_point, out_act.bits
    if fl.bypass != 0.0:
        layer.z_x = bypass_act.zero_point
        layer.bypass_offset = fl.bypass_offset
    # int64 overflow guard: |acc| <= sum|W| * (2**b_in - 1)
    acc_max = W.to(torch.int64).abs().reshape(W.shape[0], -1).sum(1) * ((1 << in_act.bits) - 1)
    bound = (acc_max + layer.B.abs()) * layer.m.abs() + layer.C.abs() + (1 << e)
    bound = bound + abs(layer.mx) * 256
    if float(bound.max()) >= 2.0 ** 62:
        raise ValueError(
            f"{fl.name}: the fixed-point requantisation could overflow int64 (bound "
            f"{float(bound.max()):.3g}); the bias/BatchNorm shift is huge relative to the "
            f"output range - check the activation ranges"
        )
    return layer


# ----------------------------------------------------------------------------------------
# GEMM back ends
# ----------------------------------------------------------------------------------------
def have_int_mm() -> bool:
    """True if ``torch._int_mm`` runs on the CPU here."""
    if not hasattr(torch, "_int_mm"):
        return False
    try:
        a = torch.ones(17, 8, dtype=torch.int8)
        return int(torch._int_mm(a, torch.ones(8, 8, dtype=torch.int8))[0, 0]) == 8
    except (RuntimeError, NotImplementedError):
        return False


def have_fbgemm() -> bool:
    """True if the fbgemm quantized engine is available (x86)."""
    return any(e in torch.backends.quantized.supported_engines for e in ("fbgemm", "x86"))


def resolve_backend(backend: str) -> str:
    """The dyadic back end ``backend`` names (``"auto"``: the fastest available dyadic one).
    ``"qtensor"`` is returned as is (its availability depends on the model:
    :func:`k2quant.infer.qtensor.qtensor_unsupported`); ``IntTdnnF.set_backend("auto")``
    prefers it where the model allows."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown integer backend {backend!r}; choose one of {list(BACKENDS)}")
    if backend == "qtensor":
        return backend
    if backend == "auto":
        if have_int_mm():
            return "int_mm"
        return "fbgemm" if have_fbgemm() else "float64"
    if backend == "int_mm" and not have_int_mm():
        raise ValueError(f"backend 'int_mm' needs torch._int_mm (torch >= 2.1); this is torch "
                         f"{torch.__version__}. Use backend='fbgemm' or 'auto'")
    if backend == "fbgemm" and not have_fbgemm():
        raise ValueError("backend 'fbgemm' needs the fbgemm quantized engine (x86 CPU builds)")
    return backend


def fused_backend() -> Optional[str]:
    """The dyadic back end whose fused engine (``set_backend(b, compile=True)``) runs here:
    ``"int_mm"`` (torch.compile, torch >= 2), else ``"fbgemm"`` (TorchScript NNC fuser,
    torch 1.13), else None."""
    if have_int_mm() and hasattr(torch, "compile"):
        return "int_mm"
    if have_fbgemm() and have_nnc():
        return "fbgemm"
    return None


def _fbgemm_chunks(Wm: torch.Tensor) -> List[Tuple[int, int]]:
    """Split the K columns of an int8 (N, K) matrix so that every chunk's accumulator is
    below 2**24 in magnitude for uint8 inputs (exact in float32)."""
    cum = torch.cat([torch.zeros(Wm.shape[0], 1, dtype=torch.int64),
                     Wm.to(torch.int64).abs().cumsum(1)], dim=1)
    K = Wm.shape[1]
    chunks, k0 = [], 0
    while k0 < K:
        lo, hi = k0 + 1, K  # largest k1 with bound(k0, k1) < limit
        if int((cum[:, k0 + 1] - cum[:, k0]).max()) * 255 >= _FBGEMM_LIMIT:
            raise ValueError("fbgemm backend: a single weight exceeds the exactness bound")
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if int((cum[:, mid] - cum[:, k0]).max()) * 255 < _FBGEMM_LIMIT:
                lo = mid
            else:
                hi = mid - 1
        chunks.append((k0, lo))
        k0 = lo
    return chunks


def _requant_fused(acc: torch.Tensor, Bs: Optional[torch.Tensor], m: torch.Tensor,
                   const: torch.Tensor, e: int, lo: int, hi: int,
                   byp: Optional[torch.Tensor] = None, mx: int = 0) -> torch.Tensor:
    """The requantisation of :meth:`_Prepared.requant` as one expression, for the fused
    (``torch.compile``) engine: inductor turns it into one vectorised loop (same integers).

    The int8 <-> int64 conversions go through int32 explicitly: inductor vectorises a direct
    int8 <-> int64 conversion poorly (measured 4-6x slower loops); the detour is exact."""
    if Bs is not None:
        acc = torch.clamp(acc + Bs, min=0)
    t = acc.to(torch.int64) * m + const
    if byp is not None:
        t = t + byp.to(torch.int32).to(torch.int64) * mx
    return torch.clamp(t >> e, lo, hi).to(torch.int32).to(torch.int8)


def _fused_call(eng: "IntTdnnF", h: torch.Tensor) -> torch.Tensor:
    """Entry point of the compiled fused engine (:meth:`IntTdnnF._fused_forward`)."""
    return eng._fused_forward(h)


# The fbgemm fused engine's requantisations, compiled by TorchScript and fused by its NNC
# (TensorExpr) CPU fuser into one loop each (torch 1.13: no torch.compile / _int_mm). Same
# integers as _requant_fused; ``acc``: float32 (exact integers < 2**24, one K chunk) or int32
# (several chunks; |acc| < 2**31 is checked when the engine is built), storage codes uint8.
def _rq_relu(acc, Bs, m, const, e: int, lo: int, hi: int):
    a = torch.clamp(acc.to(torch.int32) + Bs, min=0)
    t = a.to(torch.int64) * m + const
    return torch.clamp(t >> e, lo, hi).to(torch.int32).to(torch.uint8)


def _rq_relu_byp(acc, Bs, m, const, e: int, lo: int, hi: int, byp, mx: int):
    a = torch.clamp(acc.to(torch.int32) + Bs, min=0)
    t = a.to(torch.int64) * m + const + byp.to(torch.int32).to(torch.int64) * mx
    return torch.clamp(t >> e, lo, hi).to(torch.int32).to(torch.uint8)


def _rq_linear(acc, Bs, m, const, e: int, lo: int, hi: int):
    t = acc.to(torch.int32).to(torch.int64) * m + const
    return torch.clamp(t >> e, lo, hi).to(torch.int32).to(torch.uint8)


def _rq_linear_byp(acc, Bs, m, const, e: int, lo: int, hi: int, byp, mx: int):
    t = acc.to(torch.int32).to(torch.int64) * m + const + byp.to(torch.int32).to(torch.int64) * mx
    return torch.clamp(t >> e, lo, hi).to(torch.int32).to(torch.uint8)


class _CpuFusion:
    """Context manager: TorchScript's NNC fuser enabled on the CPU (off by default in torch;
    restored on exit, so other TorchScript code in the process is not affected)."""

    def __enter__(self):
        self.prev = torch._C._jit_can_fuse_on_cpu()
        torch._C._jit_override_can_fuse_on_cpu(True)

    def __exit__(self, *exc):
        torch._C._jit_override_can_fuse_on_cpu(self.prev)


def _fused_call_nnc(eng: "IntTdnnF", h: torch.Tensor) -> torch.Tensor:
    """Entry point of the fbgemm fused engine (eager layers, NNC-fused requantisations)."""
    with _CpuFusion():
        return eng._fused_forward(h)


def have_nnc() -> bool:
    """True if TorchScript's NNC CPU fuser can generate code here (LLVM build)."""
    f = getattr(torch._C, "_llvm_enabled", None)
    return bool(f is not None and f() and hasattr(torch._C, "_jit_override_can_fuse_on_cpu"))


def _fresh_function(fn):
    """A copy of ``fn`` with its own code object. torch.compile (dynamo) keeps its cache and
    its recompilation limit per code object; each fused engine gets its own copy so that
    many engines in one process (different constants -> different graphs) never exhaust
    the limit of a shared one and silently fall back to eager."""
    import types

    _fresh_function.count = getattr(_fresh_function, "count", 0) + 1
    code = fn.__code__.replace(co_name=f"{fn.__name__}_{_fresh_function.count}")
    return types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__,
                              fn.__closure__)


class _Prepared:
    """A layer's constants folded for one back end (storage offset ``off``)."""

    def __init__(self, L: IntLayer, backend: str) -> None:
        self.name = L.name
        self.k = L.kernel
        self.d = max(L.dilation, 1)
        self.out = L.out_features
        self.backend = backend
        off = 0 if backend == "fbgemm" else 128
        self.off = off
        self.dtype = torch.uint8 if backend == "fbgemm" else torch.int8
        Wm = L.W.permute(0, 2, 1).reshape(L.out_features, -1).contiguous()  # tap-major (N, K)
        self.K = Wm.shape[1]
        colsum = Wm.to(torch.int64).sum(1)
        zs_in = L.z_in - off  # storage zero point of the input
        if backend == "int_mm":
            self.Wm = Wm
            self.Wt = Wm.t()  # (K, N) view, the layout _int_mm is called with
        elif backend == "float64":
            self.W64 = Wm.to(torch.float64).t().contiguous()
        else:
            self.chunks = []
            for k0, k1 in _fbgemm_chunks(Wm):
                qw = torch.quantize_per_channel(
                    Wm[:, k0:k1].to(torch.float32), torch.ones(self.out, dtype=torch.float64),
                    torch.zeros(self.out, dtype=torch.int64), 0, torch.qint8)
                self.chunks.append((k0, k1, torch.ops.quantized.linear_prepack(qw, None)))
            self.calib = torch.zeros(2, self.K, dtype=torch.uint8)
            self.calib[1] = 255
        self.final = L.final
        self.script = None  # fbgemm fused engine: the TorchScript requantisation
        self.block = max(32, _BLOCK_ELEMENTS // self.out)
        # |accumulator of the storage codes| (codes in [0, 255] or [-128, 127])
        self.acc_bound = int(Wm.to(torch.int64).abs().sum(1).max()) * 256
        if L.final:
            self.zcorr = zs_in * colsum
            self.out_scale = L.out_scale
            self.out_bias = L.out_bias
            return
        self.relu = L.relu
        Bs = L.B - zs_in * colsum  # acc_c + B = acc_s + Bs
        self.m = L.m.to(torch.int32)  # |m| < 2**31
        self.e = L.e
        self.mx = L.mx
        const = L.C + (1 << (L.e - 1)) + (L.z_out - off) * (1 << L.e)
        if L.mx:
            const = const + L.mx * (off - L.z_x)
        if L.relu:
            acc_bound = int(Wm.to(torch.int64).abs().sum(1).max()) * 256 + int(Bs.abs().max())
            self.Bs = Bs.to(torch.int32) if acc_bound < (1 << 31) else Bs
        else:
            const = const + Bs * L.m
            self.Bs = None
        self.const = const
        self.lo = -off
        self.hi = (1 << L.bits_out) - 1 - off
        self.bypass_offset = L.bypass_offset

    def nbytes(self) -> int:
        """Bytes of the tensors this back end holds for inference (weights + constants)."""
        n = self.out * self.K  # int8 weights (fbgemm: its packed copy, same size)
        for t in ("m", "Bs", "const", "zcorr", "out_scale", "out_bias"):
            v = getattr(self, t, None)
            if isinstance(v, torch.Tensor):
                n += v.numel() * v.element_size()
        return n

    # -- GEMM -----------------------------------------------------------------------------
    def mm(self, a: torch.Tensor) -> torch.Tensor:
        """(M, K) storage codes -> (M, out) accumulators of the storage codes (int32/int64)."""
        if self.backend == "int_mm":
            return torch._int_mm(a, self.Wm.t())
        if self.backend == "float64":
            return torch.mm(a.to(torch.float64), self.W64).to(torch.int64)
        M = a.shape[0]
        x = torch.cat([a, self.calib]).to(torch.float32)
        acc = None
        for k0, k1, pk in self.chunks:
            xs = x if len(self.chunks) == 1 else x[:, k0:k1].contiguous()
            y = torch.ops.quantized.linear_dynamic(xs, pk, False)[:M].to(torch.int64)
            acc = y if acc is None else acc.add_(y)
        return acc

    def mm_rows(self, h: torch.Tensor, R2: int) -> torch.Tensor:
        """Fused engines: rows ``r .. r + (k-1) d`` of the time-major codes ``h`` -> the
        accumulators of row ``r`` (R2 rows). ``int_mm``: int32; ``fbgemm``: float32 holding
        the exact integers (one K chunk, ``|acc| < 2**24``) or int32 (several chunks; only
        with ``acc_bound < 2**31``, checked by ``set_backend``)."""
        k, d = self.k, self.d
        if self.backend == "int_mm":
            a = h if k == 1 else torch.cat([h[j * d : j * d + R2] for j in range(k)], 1)
            return torch._int_mm(a, self.Wt)
        if self.backend != "fbgemm":
            raise ValueError(f"no fused engine for back end {self.backend!r}")
        C = h.shape[1]
        acc = None
        for k0, k1, pk in self.chunks:  # each chunk's im2col columns built directly
            x = torch.empty(R2 + 2, k1 - k0, dtype=torch.float32)  # + the two range rows
            for j in range(k):
                lo, hi = max(k0, j * C), min(k1, (j + 1) * C)
                if lo < hi:
                    x[:R2, lo - k0 : hi - k0] = h[j * d : j * d + R2, lo - j * C : hi - j * C]
            x[R2] = 0.0
            x[R2 + 1] = 255.0
            y = torch.ops.quantized.linear_dynamic(x, pk, False)[:R2]
            if len(self.chunks) == 1:
                return y
            # exact: each chunk's |acc| < 2**24, the sum < 2**31 (acc_bound, checked)
            acc = y.to(torch.int32) if acc is None else acc.add_(y.to(torch.int32))
        return acc

    # -- requantisation -------------------------------------------------------------------
    def requant(self, acc: torch.Tensor, byp: Optional[torch.Tensor]) -> torch.Tensor:
        if self.relu:
            if self.Bs.dtype == acc.dtype:
                acc.add_(self.Bs).clamp_(min=0)
            else:
                acc = acc.to(torch.int64)
                acc.add_(self.Bs).clamp_(min=0)
        m = self.m.to(torch.int64)  # (out,): cheap; kept int32 in memory
        if acc.dtype == torch.int64:
            t = acc.mul_(m)
        elif _PROMOTING_MUL:
            t = acc * m  # int32 * int64 -> int64 in one pass (torch 2.x: faster than .to)
        else:
            t = acc.to(torch.int64).mul_(m)
        if byp is not None:
            t.add_(byp, alpha=self.mx)  # exact: computed in int64
        t.add_(self.const)
        t.bitwise_right_shift_(self.e)
        t.clamp_(self.lo, self.hi)
        return t.to(self.dtype)

    def dequant(self, acc: torch.Tensor) -> torch.Tensor:
        acc_c = acc.to(torch.int64).sub_(self.zcorr)
        return acc_c.to(torch.float32).mul_(self.out_scale).add_(self.out_bias)


# ----------------------------------------------------------------------------------------
# the integer TDNN-F
# ----------------------------------------------------------------------------------------
class IntTdnnF(nn.Module):
    """Integer-only TDNN-F (chain branch). Build with :meth:`from_model` (float, fake-quant or
    converted/packed TdnnF + activation ranges) or :meth:`load`.

    ``forward(x, pad=True)``: x (N, T, feat_dim) float32 -> log-probs (N, ceil(T/3),
    num_classes), same contract as ``TdnnF.forward`` (``pad=False``: x carries the context).

    Attributes: feat_dim, num_classes, subsampling_factor, left_context, right_context,
    backend, acts (point -> :class:`ActQuant`), layers (name -> :class:`IntLayer`), spec.
    """

    def __init__(
        self,
        *,
        spec: Optional[dict],
        feat_dim: int,
        num_classes: int,
        subsampling_factor: int,
        left_context: int,
        right_context: int,
        subsample_index: int,
        num_tdnnf: int,
        input_mul: torch.Tensor,
        input_add: torch.Tensor,
        acts: Dict[str, ActQuant],
        layers: List[IntLayer],
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.spec = spec
        self.feat_dim = int(feat_dim)
        self.num_classes = int(num_classes)
        self.subsampling_factor = int(subsampling_factor)
        self.left_context = int(left_context)
        self.right_context = int(right_context)
        self.subsample_index = int(subsample_index)
        self.num_tdnnf = int(num_tdnnf)
        self.input_mul = input_mul.to(torch.float32)
        self.input_add = input_add.to(torch.float32)
        self.acts = dict(acts)
        expected = activation_points(self.num_tdnnf)
        missing = [p for p in expected if p not in self.acts]
        if missing:
            raise ValueError(f"IntTdnnF: missing activation grids for {missing}")
        self.layers = {L.name: L for L in layers}
        names = self.layer_names()
        if [L.name for L in layers] != names:
            raise ValueError(
                f"IntTdnnF: layers {[L.name for L in layers]} do not match the TDNN-F with "
                f"{self.num_tdnnf} tdnnf layers ({names})"
            )
        self.set_backend(backend)

    # ------------------------------------------------------------------ construction
    def layer_names(self) -> List[str]:
        names = ["tdnn1.affine"]
        for i in range(self.num_tdnnf):
            names += [f"tdnnfs.{i}.linear", f"tdnnfs.{i}.affine"]
        return names + ["prefinal_l", "prefinal_chain.affine", "prefinal_chain.linear", "output"]

    def set_backend(self, backend: str = "auto", compile: bool = False) -> "IntTdnnF":
        """(Re)prepare the fast path for ``backend`` (see the module docstring).

        ``compile=True``: the *fused* engine (same integers; see the module docstring).
        ``int_mm`` (torch >= 2): the whole integer forward in the time-major layout
        (:meth:`_fused_forward`) compiled by ``torch.compile``, every layer one ``_int_mm``
        plus one vectorised requantisation loop (the first call per input shape compiles,
        ~0.5-1 min, cached by inductor on disk afterwards). ``fbgemm`` (torch 1.13): the same
        layout, eager GEMMs, requantisations fused by TorchScript's NNC fuser."""
        from k2quant.infer.qtensor import QTensorEngine, qtensor_unsupported

        if backend == "auto" and not compile and qtensor_unsupported(self) is None:
            backend = "qtensor"
        self.backend = resolve_backend(backend)
        if compile and self.backend not in ("int_mm", "fbgemm"):
            raise ValueError(f"compile=True needs the int_mm or fbgemm back end, not "
                             f"{self.backend!r}")
        if compile and self.backend == "int_mm" and not hasattr(torch, "compile"):
            raise ValueError(f"compile=True needs torch >= 2 (this is torch {torch.__version__})")
        if compile and self.backend == "fbgemm" and not have_nnc():
            raise ValueError("compile=True with the fbgemm back end needs TorchScript's NNC "
                             "fuser (an LLVM-enabled torch build)")
        self.compiled = bool(compile)
        self._fused = None
        if self.backend == "qtensor":
            self._qt = QTensorEngine(self)  # raises ValueError if the model cannot use it
            self._prep = {}
            return self
        self._qt = None
        self._prep = {n: _Prepared(L, self.backend) for n, L in self.layers.items()}
        self._off = 0 if self.backend == "fbgemm" else 128
        self._storage = torch.uint8 if self.backend == "fbgemm" else torch.int8
        if compile and self.backend == "int_mm":
            opts = {"cpp.threads": 1} if FUSED_SERIAL_LOOPS else None
            self._fused = torch.compile(_fresh_function(_fused_call), dynamic=True,
                                        options=opts)
        elif compile:
            for P in self._prep.values():
                if P.final:
                    continue
                if P.acc_bound >= 1 << 31:
                    raise ValueError(f"{P.name}: |accumulator| may reach 2**31; the fused "
                                     f"fbgemm engine needs int32 accumulators")
                fn = (_rq_relu_byp if P.mx else _rq_relu) if P.relu else (
                    _rq_linear_byp if P.mx else _rq_linear)
                P.m64 = P.m.to(torch.int64)
                if not P.relu:
                    P.Bs = torch.zeros(1, dtype=torch.int32)  # unused argument
                with _CpuFusion():  # one executor per layer: it sees few shapes
                    P.script = torch.jit.script(_fresh_function(fn))
            self._fused = _fused_call_nnc
        return self

    @classmethod
    def from_folded(
        cls,
        folded: FoldedTdnnF,
        act_ranges: Mapping[str, Any],
        act_bits: int = 8,
        point_bits: Optional[Mapping[str, int]] = None,
        weight_bits: int = 8,
        backend: str = "auto",
    ) -> "IntTdnnF":
        """Build from a :class:`FoldedTdnnF` and per-point ranges ``{point: (lo, hi)}`` (or
        :class:`ActQuant` / dicts with ``lo``/``hi``[/``bits``])."""
        pts = activation_points(len(folded.tdnnfs))
        missing = [p for p in pts if p not in act_ranges]
        extra = [p for p in act_ranges if p not in pts]
        if missing or extra:
            raise ValueError(
                f"activation ranges do not match this model ({len(folded.tdnnfs)} tdnnf "
                f"layers): missing {missing}, unexpected {extra}. Were they calibrated for "
                f"another model? Re-run 'k2quant calibrate' on this model."
            )
        point_bits = dict(point_bits or {})
        acts: Dict[str, ActQuant] = {}
        for p in pts:
            r = act_ranges[p]
            if isinstance(r, ActQuant):
                lo, hi, bits = r.lo, r.hi, r.bits
            elif isinstance(r, Mapping):
                lo, hi, bits = r["lo"], r["hi"], r.get("bits", act_bits)
            else:
                lo, hi = r
                bits = act_bits
            acts[p] = ActQuant.from_range(p, lo, hi, int(point_bits.get(p, bits)))
        layers: List[IntLayer] = []
        for fl in folded.all_layers():
            out_act = acts[fl.out_point] if fl.out_point is not None else None
            byp = acts[fl.bypass_point] if fl.bypass_point is not None else None
            layers.append(build_int_layer(fl, acts[fl.in_point], out_act, byp, weight_bits))
        a = acts["input"]
        mul = folded.input_inv_std / a.scale
        add = a.zero_point - folded.input_mean * mul
        return cls(
            spec=folded.spec, feat_dim=folded.feat_dim, num_classes=folded.num_classes,
            subsampling_factor=folded.subsampling_factor, left_context=folded.left_context,
            right_context=folded.right_context, subsample_index=folded.subsample_index,
            num_tdnnf=len(folded.tdnnfs), input_mul=mul, input_add=add, acts=acts,
            layers=layers, backend=backend,
        )

    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        act_ranges: Mapping[str, Any],
        act_bits: int = 8,
        point_bits: Optional[Mapping[str, int]] = None,
        weight_bits: int = 8,
        backend: str = "auto",
    ) -> "IntTdnnF":
        """Build from a TdnnF (float: weights quantised per channel to ``weight_bits``;
        quantised/converted, e.g. from ``load_packed``: its integer codes are used as they
        are) and calibrated activation ranges (:func:`k2quant.infer.calibrate.
        collect_activation_ranges`). If ``act_ranges`` carries a ``"spec"`` entry it must
        equal ``model.model_spec()``."""
        ranges = dict(act_ranges)
        spec = ranges.pop("spec", None)
        ranges.pop("meta", None)
        mspec = model.model_spec() if hasattr(model, "model_spec") else None
        if spec is not None and mspec is not None and spec != mspec:
            raise ValueError(
                f"activation ranges were calibrated for a different model spec "
                f"({_spec_summary(spec)}) than this model ({_spec_summary(mspec)}); "
                f"re-run calibration for this model"
            )
        was = model.training
        model.eval()
        try:
            folded = fold_tdnnf(model)
        finally:
            model.train(was)
        return cls.from_folded(folded, ranges, act_bits, point_bits, weight_bits, backend)

    @classmethod
    def from_packed(cls, path, act_ranges: Mapping[str, Any], backend: str = "auto",
                    **kw) -> "IntTdnnF":
        """``load_packed(path)`` (model rebuilt from the stored spec) + :meth:`from_model`."""
        from k2quant.export import load_packed

        return cls.from_model(load_packed(path), act_ranges, backend=backend, **kw)

    # ------------------------------------------------------------------ input / output
    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """float32 (N, T, F) -> int64 unsigned codes of the ``input`` point (the only float
        -> integer step; folds ``input_bn``)."""
        qmax = self.acts["input"].qmax
        y = torch.round(x.to(torch.float32) * self.input_mul + self.input_add)
        return y.clamp_(0, qmax).to(torch.int64)

    def _prepare_input(self, x: torch.Tensor, pad: bool) -> torch.Tensor:
        check_features(x, self.feat_dim, "IntTdnnF")
        if pad:
            x = pad_features(x, self.left_context, self.right_context, self.subsampling_factor)
        elif x.shape[1] < self.left_context + self.right_context + 1:
            raise ValueError(
                f"IntTdnnF(pad=False): need at least left_context + right_context + 1 = "
                f"{self.left_context + self.right_context + 1} frames, got T={x.shape[1]}"
            )
        return x

    # ------------------------------------------------------------------ fast engine
    def _gemm(self, P: _Prepared, x: torch.Tensor) -> Tuple[torch.Tensor, int]:
        N, T, C = x.shape
        T2 = T - (P.k - 1) * P.d
        if P.k == 1:
            a = x.reshape(N * T, C)
        else:
            a = torch.cat([x[:, j * P.d : j * P.d + T2] for j in range(P.k)], dim=2)
            a = a.view(N * T2, P.k * C)
        return P.mm(a), T2

    def _layer(self, name: str, x: torch.Tensor, byp: Optional[torch.Tensor] = None):
        P = self._prep[name]
        acc, T2 = self._gemm(P, x)
        N = x.shape[0]
        M = N * T2
        if byp is not None:
            byp = byp.reshape(M, P.out)  # copies the (strided) centre frames
        R = P.block
        if M <= R:
            return P.requant(acc, byp).view(N, T2, P.out)
        # Row blocks keep the int64 temporaries small (cache-resident, no page faults from
        # fresh large allocations): several times faster than one pass over all frames.
        out = torch.empty(M, P.out, dtype=self._storage)
        for r in range(0, M, R):
            out[r : r + R] = P.requant(acc[r : r + R], None if byp is None else byp[r : r + R])
        return out.view(N, T2, P.out)

    def _output(self, h: torch.Tensor) -> torch.Tensor:
        acc, T2 = self._gemm(self._prep["output"], h)
        return self._output_acc(acc, h.shape[0])

    def _output_acc(self, acc: torch.Tensor, N: int) -> torch.Tensor:
        """Output-layer accumulators (N * T', num_classes) -> log-probs (N, T', num_classes)
        (eager back ends; row blocks)."""
        P = self._prep["output"]
        M = acc.shape[0]
        out = torch.empty(M, P.out, dtype=torch.float32)
        R = P.block
        for r in range(0, M, R):
            out[r : r + R] = F.log_softmax(P.dequant(acc[r : r + R]), dim=-1)
        return out.view(N, M // N, P.out)

    # ------------------------------------------------------------------ fused engine
    def _fused_layer(self, name: str, h: torch.Tensor, x: Optional[torch.Tensor] = None):
        """One layer of :meth:`_fused_forward`: rows ``r .. r + (k-1) d`` of the time-major
        codes ``h`` -> row ``r`` (one ``cat`` of shifted row slices, one ``_int_mm``, one
        requantisation expression); ``x``: the tdnnf block input (bypass rows ``r + d``)."""
        P = self._prep[name]
        R2 = h.shape[0] - (P.k - 1) * P.d
        acc = P.mm_rows(h, R2)
        if P.final:
            return acc
        byp = None
        if x is not None and P.mx:
            byp = x[P.bypass_offset : P.bypass_offset + R2]
        if P.script is not None:  # fbgemm: TorchScript + NNC (torch 1.13 and later)
            if byp is None:
                return P.script(acc, P.Bs, P.m64, P.const, P.e, P.lo, P.hi)
            return P.script(acc, P.Bs, P.m64, P.const, P.e, P.lo, P.hi, byp, P.mx)
        return _requant_fused(acc, P.Bs if P.relu else None, P.m.to(torch.int64), P.const,
                              P.e, P.lo, P.hi, byp, P.mx)

    def _fused_forward(self, h: torch.Tensor, return_codes: bool = False):
        """The integer forward of the ``int_mm`` back end in the time-major layout of
        :mod:`k2quant.infer.qtensor`, written for ``torch.compile`` (``set_backend(...,
        compile=True)``; run eagerly for ``return_codes``).

        h: int8 storage codes (N, Tp, F) of the padded input. The frames of all utterances
        form one (N * stride, C) matrix; a layer maps rows ``r .. r + (k-1) d`` to row ``r``,
        so rows near the end of an utterance mix two utterances: they are never used by valid
        rows and are dropped before the output layer. ``stride`` is a multiple of the
        subsampling factor (the input is edge-padded), so the global ``[::sf]`` keeps every
        utterance's phase. Returns the output layer's float32 logits of the valid rows
        (N * T', num_classes) [and ``{point: int64 codes (N, T, C)}``]."""
        N, Tp, Fd = h.shape
        sf = self.subsampling_factor
        if N > 1 and sf > 1 and Tp % sf:
            h = torch.cat([h, h[:, -1:].expand(N, sf - Tp % sf, Fd)], dim=1)
        stride, valid = h.shape[1], Tp
        h = h.reshape(N * stride, Fd)
        codes: Dict[str, torch.Tensor] = {}
        off = self._off

        def keep(point: str, t: torch.Tensor) -> None:
            if return_codes:
                full = t.new_zeros(N * stride, t.shape[1])
                full[: t.shape[0]] = t
                codes[point] = full.view(N, stride, -1)[:, :valid].to(torch.int64) + off

        def shrink(name: str) -> int:
            P = self._prep[name]
            return valid - (P.k - 1) * P.d

        keep("input", h)
        h, valid = self._fused_layer("tdnn1.affine", h), shrink("tdnn1.affine")
        keep("tdnn1", h)
        for i in range(self.num_tdnnf):
            if i == self.subsample_index and sf > 1:
                h = h[::sf]
                stride, valid = -(-stride // sf), -(-valid // sf)
            name = f"tdnnfs.{i}.linear"
            z, valid = self._fused_layer(name, h), shrink(name)
            keep(name, z)
            name = f"tdnnfs.{i}.affine"
            h, valid = self._fused_layer(name, z, h), shrink(name)
            keep(f"tdnnfs.{i}", h)
        if self.subsample_index == self.num_tdnnf and sf > 1:
            h = h[::sf]
            stride, valid = -(-stride // sf), -(-valid // sf)
        for name, point in (("prefinal_l", "prefinal_l"),
                            ("prefinal_chain.affine", "prefinal_chain.batchnorm1"),
                            ("prefinal_chain.linear", "prefinal_chain.batchnorm2")):
            h = self._fused_layer(name, h)
            keep(point, h)
        C = h.shape[1]
        if N == 1:
            hv = h[:valid]
        else:  # the valid rows of every utterance (in bounds: rows only shrink)
            hv = torch.cat([h, h.new_zeros(N * stride - h.shape[0], C)])
            hv = hv.view(N, stride, C)[:, :valid].reshape(N * valid, C)
        acc = self._fused_layer("output", hv)
        P = self._prep["output"]
        # float32(acc_c) * out_scale + out_bias: the dequantisation of _Prepared.dequant, two
        # roundings as there (inductor compiles with -ffp-contract=off; the tests check the
        # log-probs bit for bit); |acc_c| < 2**31, so the int32 detour is exact
        acc_c = (acc.to(torch.int64) - P.zcorr).to(torch.int32)
        logits = acc_c.to(torch.float32) * P.out_scale + P.out_bias
        return (logits, codes) if return_codes else logits

    @torch.no_grad()
    def forward(self, x: torch.Tensor, pad: bool = True, return_codes: bool = False):
        """Integer-only forward (see the class docstring). ``return_codes=True`` also returns
        ``{point: int64 unsigned codes (N, T, C)}`` for every activation point (qtensor back
        end: the codes of its own representation, :mod:`k2quant.infer.qtensor`)."""
        x = self._prepare_input(x, pad)
        if self.backend == "qtensor":
            return self._qt.forward(x, return_codes)
        if self._fused is not None:
            # input quantisation and the float output layer run eagerly (the same float ops
            # as the other back ends), the integer layers in the compiled graph
            h = (self.quantize_input(x) - self._off).to(self._storage)
            if return_codes:
                logits, codes = self._fused_forward(h, True)
            else:
                logits, codes = self._fused(self, h), None
            # one log-softmax over all frames (row-wise: the same floats as per row block)
            out = F.log_softmax(logits, dim=-1).view(x.shape[0], -1, logits.shape[1])
            return (out, codes) if return_codes else out
        codes: Dict[str, torch.Tensor] = {}
        off = self._off
        h = (self.quantize_input(x) - off).to(self._storage)
        if return_codes:
            codes["input"] = h.to(torch.int64) + off
        h = self._layer("tdnn1.affine", h)
        if return_codes:
            codes["tdnn1"] = h.to(torch.int64) + off
        sf = self.subsampling_factor
        for i in range(self.num_tdnnf):
            if i == self.subsample_index and sf > 1:
                h = h[:, ::sf]
            z = self._layer(f"tdnnfs.{i}.linear", h)
            P = self._prep[f"tdnnfs.{i}.affine"]
            d = P.bypass_offset
            byp = h[:, d : h.shape[1] - d] if d > 0 else h
            h = self._layer(f"tdnnfs.{i}.affine", z, byp)
            if return_codes:
                codes[f"tdnnfs.{i}.linear"] = z.to(torch.int64) + off
                codes[f"tdnnfs.{i}"] = h.to(torch.int64) + off
        if self.subsample_index == self.num_tdnnf and sf > 1:
            h = h[:, ::sf]
        for name, point in (("prefinal_l", "prefinal_l"),
                            ("prefinal_chain.affine", "prefinal_chain.batchnorm1"),
                            ("prefinal_chain.linear", "prefinal_chain.batchnorm2")):
            h = self._layer(name, h)
            if return_codes:
                codes[point] = h.to(torch.int64) + off
        out = self._output(h)
        return (out, codes) if return_codes else out

    # ------------------------------------------------------------------ reference
    def _ref_layer(self, L: IntLayer, c: torch.Tensor, cx: Optional[torch.Tensor] = None):
        x = (c - L.z_in).to(torch.float64)
        acc = F.conv1d(x, L.W.to(torch.float64), dilation=max(L.dilation, 1))
        acc = torch.round(acc).to(torch.int64)
        if L.final:
            return acc
        a = acc + L.B[:, None]
        if L.relu:
            a = torch.clamp(a, min=0)
        num = a * L.m[:, None] + L.C[:, None]
        if L.mx:
            d = L.bypass_offset
            xc = cx[:, :, d : cx.shape[2] - d] if d > 0 else cx
            num = num + L.mx * (xc - L.z_x)
        q = rounding_shift(num, L.e) + L.z_out
        return q.clamp(0, (1 << L.bits_out) - 1)

    @torch.no_grad()
    def reference_forward(self, x: torch.Tensor, pad: bool = True, return_codes: bool = False):
        """The simulated integer model of the current back end, equal to :meth:`forward` bit
        for bit: :meth:`dyadic_reference_forward` for the dyadic back ends, the float32
        requantisation formulas of :mod:`k2quant.infer.qtensor` for ``qtensor``."""
        if self.backend == "qtensor":
            return self._qt.reference_forward(self._prepare_input(x, pad), return_codes)
        return self.dyadic_reference_forward(x, pad, return_codes)

    @torch.no_grad()
    def dyadic_reference_forward(self, x: torch.Tensor, pad: bool = True,
                                 return_codes: bool = False):
        """The simulated integer model: the formulas of the module docstring evaluated
        literally (channels-first, float64 convolution of the integer codes, int64
        requantisation). Equals :meth:`forward` of the dyadic back ends bit for bit."""
        x = self._prepare_input(x, pad)
        codes: Dict[str, torch.Tensor] = {}
        c = self.quantize_input(x).transpose(1, 2)
        codes["input"] = c
        c = self._ref_layer(self.layers["tdnn1.affine"], c)
        codes["tdnn1"] = c
        sf = self.subsampling_factor
        for i in range(self.num_tdnnf):
            if i == self.subsample_index and sf > 1:
                c = c[:, :, ::sf]
            z = self._ref_layer(self.layers[f"tdnnfs.{i}.linear"], c)
            c = self._ref_layer(self.layers[f"tdnnfs.{i}.affine"], z, c)
            codes[f"tdnnfs.{i}.linear"] = z
            codes[f"tdnnfs.{i}"] = c
        if self.subsample_index == self.num_tdnnf and sf > 1:
            c = c[:, :, ::sf]
        for name, point in (("prefinal_l", "prefinal_l"),
                            ("prefinal_chain.affine", "prefinal_chain.batchnorm1"),
                            ("prefinal_chain.linear", "prefinal_chain.batchnorm2")):
            c = self._ref_layer(self.layers[name], c)
            codes[point] = c
        L = self.layers["output"]
        acc = self._ref_layer(L, c).transpose(1, 2).contiguous()
        logits = acc.to(torch.float32) * L.out_scale + L.out_bias
        out = F.log_softmax(logits, dim=-1)
        if not return_codes:
            return out
        return out, {k: v.transpose(1, 2).contiguous() for k, v in codes.items()}

    def fake_quant_forward(self, x: torch.Tensor, pad: bool = True) -> torch.Tensor:
        """Float view of the same model: dequantised weights, the *real* (not dyadic)
        multipliers and float rounding of each activation to its grid. Differs from
        :meth:`forward` only where a value falls within ~1e-6 of a rounding boundary; used
        to show the dyadic arithmetic does not change the model."""
        x = self._prepare_input(x, pad)
        h = self.quantize_input(x).transpose(1, 2)

        def fq(L: IntLayer, c, cx=None):
            a_in = self.acts_for_input(L)
            v = (c - a_in.zero_point).to(torch.float64) * a_in.scale
            w = L.W.to(torch.float64) * L.w_scale[:, None, None]
            y = F.conv1d(v, w, dilation=max(L.dilation, 1))
            if L.final:
                return y
            s_acc = a_in.scale * L.w_scale
            y = y + L.B.to(torch.float64)[:, None] * s_acc[:, None]
            if L.relu:
                y = torch.relu(y)
            out = self._out_act(L)
            # post scale/shift recovered from the integer constants in real arithmetic
            y = y / s_acc[:, None] * (L.m.to(torch.float64)[:, None] * 2.0 ** -L.e) * out.scale
            y = y + L.C.to(torch.float64)[:, None] * 2.0 ** -L.e * out.scale
            if L.mx:
                d = L.bypass_offset
                xa = self._bypass_act(L)
                xc = cx[:, :, d : cx.shape[2] - d] if d > 0 else cx
                y = y + L.mx * 2.0 ** -L.e * out.scale * (xc - xa.zero_point).to(torch.float64)
            q = torch.floor(y / out.scale + 0.5) + out.zero_point
            return q.clamp(0, out.qmax).to(torch.int64)

        h = fq(self.layers["tdnn1.affine"], h)
        sf = self.subsampling_factor
        for i in range(self.num_tdnnf):
            if i == self.subsample_index and sf > 1:
                h = h[:, :, ::sf]
            z = fq(self.layers[f"tdnnfs.{i}.linear"], h)
            h = fq(self.layers[f"tdnnfs.{i}.affine"], z, h)
        if self.subsample_index == self.num_tdnnf and sf > 1:
            h = h[:, :, ::sf]
        for name in ("prefinal_l", "prefinal_chain.affine", "prefinal_chain.linear"):
            h = fq(self.layers[name], h)
        L = self.layers["output"]
        a_in = self.acts_for_input(L)
        v = (h - a_in.zero_point).to(torch.float64) * a_in.scale
        w = L.W.to(torch.float64) * L.w_scale[:, None, None]
        y = F.conv1d(v, w).transpose(1, 2) + L.out_bias.to(torch.float64)
        return F.log_softmax(y, dim=-1).to(torch.float32)

    def _point_in(self, name: str) -> str:
        if name == "tdnn1.affine":
            return "input"
        if name.startswith("tdnnfs."):
            i = int(name.split(".")[1])
            if name.endswith(".affine"):
                return f"tdnnfs.{i}.linear"
            return "tdnn1" if i == 0 else f"tdnnfs.{i - 1}"
        return {"prefinal_l": f"tdnnfs.{self.num_tdnnf - 1}" if self.num_tdnnf else "tdnn1",
                "prefinal_chain.affine": "prefinal_l",
                "prefinal_chain.linear": "prefinal_chain.batchnorm1",
                "output": "prefinal_chain.batchnorm2"}[name]

    def acts_for_input(self, L: IntLayer) -> ActQuant:
        return self.acts[self._point_in(L.name)]

    def _out_act(self, L: IntLayer) -> ActQuant:
        if L.name == "tdnn1.affine":
            return self.acts["tdnn1"]
        if L.name.startswith("tdnnfs."):
            i = int(L.name.split(".")[1])
            return self.acts[f"tdnnfs.{i}.linear" if L.name.endswith(".linear") else f"tdnnfs.{i}"]
        return self.acts[{"prefinal_l": "prefinal_l",
                          "prefinal_chain.affine": "prefinal_chain.batchnorm1",
                          "prefinal_chain.linear": "prefinal_chain.batchnorm2"}[L.name]]

    def _bypass_act(self, L: IntLayer) -> ActQuant:
        i = int(L.name.split(".")[1])
        return self.acts["tdnn1" if i == 0 else f"tdnnfs.{i - 1}"]

    # ------------------------------------------------------------------ streaming
    @torch.no_grad()
    def streaming_forward(self, x: torch.Tensor, chunk_frames: int = 21) -> torch.Tensor:
        """Chunked evaluation (:func:`k2quant.infer.streaming.chunked_forward`); equal to
        ``forward(x)`` bit for bit."""
        check_features(x, self.feat_dim, "IntTdnnF")
        return chunked_forward(self.forward, x, self.left_context, self.right_context,
                               self.subsampling_factor, chunk_frames)

    # ------------------------------------------------------------------ sizes
    def memory_report(self) -> Dict[str, int]:
        """Bytes held for inference.

        ``weight_bytes``: the int8 weight matrices (4-bit layers expanded to int8);
        ``bias_bytes``: int32 biases ``B`` counted once per layer with a bias term (float
        output layer: float32); ``engine_bytes``: everything the fast path holds (weights +
        per-channel requantisation constants as stored for the back end)."""
        wb = sum(L.W.numel() for L in self.layers.values())
        bb = 0
        for L in self.layers.values():
            if L.final:
                bb += 4 * L.out_features
            elif L.B is not None and bool((L.B != 0).any()):
                bb += 4 * L.out_features
        if self.backend == "qtensor":
            eng = self._qt.nbytes() + 8 * self.feat_dim
        else:
            eng = sum(P.nbytes() for P in self._prep.values()) + 8 * self.feat_dim
        return {"weight_bytes": wb, "bias_bytes": bb, "engine_bytes": eng}

    # ------------------------------------------------------------------ persistence
    def state(self) -> Dict[str, Any]:
        """A dict of tensors plus one JSON string (``meta``) for everything else, so that
        ``torch.load(weights_only=True)`` reads it on every supported torch."""
        import json

        layers_meta, tensors = [], {}
        for n in self.layer_names():
            d = self.layers[n].to_dict()
            meta = {}
            for k, v in d.items():
                if isinstance(v, torch.Tensor):
                    tensors[f"{n}/{k}"] = v
                elif v is not None:
                    meta[k] = v
            layers_meta.append(meta)
        tensors["input_mul"] = self.input_mul
        tensors["input_add"] = self.input_add
        meta = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "spec": self.spec,
            "geometry": {
                "feat_dim": self.feat_dim, "num_classes": self.num_classes,
                "subsampling_factor": self.subsampling_factor,
                "left_context": self.left_context, "right_context": self.right_context,
                "subsample_index": self.subsample_index, "num_tdnnf": self.num_tdnnf,
            },
            "acts": {p: a.to_dict() for p, a in self.acts.items()},
            "layers": layers_meta,
        }
        return {"format": FORMAT, "version": FORMAT_VERSION, "meta": json.dumps(meta),
                "tensors": tensors}

    def save(self, path) -> None:
        """Write the integer model (torch file, atomic)."""
        from k2quant.utils.io import atomic_torch_save

        atomic_torch_save(self.state(), path)

    @classmethod
    def load(cls, path, backend: str = "auto", expected_spec: Optional[dict] = None) -> "IntTdnnF":
        """Load :meth:`save` output. ``expected_spec``: raise if the file is of another model."""
        try:
            try:
                st = torch.load(path, map_location="cpu", weights_only=True)
            except TypeError:  # torch < 1.13 has no weights_only
                st = torch.load(path, map_location="cpu")
        except Exception as e:  # unpickling errors, truncated files
            raise ValueError(f"{path}: not a k2quant integer model ({e})") from e
        if not isinstance(st, dict) or st.get("format") != FORMAT:
            raise ValueError(
                f"{path}: not a k2quant integer TDNN-F file (expected format {FORMAT!r}); "
                f"packed exports (.k2q) load with IntTdnnF.from_packed(path, ranges)"
            )
        if st.get("version") != FORMAT_VERSION:
            raise ValueError(
                f"{path}: integer model format version {st.get('version')!r}; this k2quant "
                f"reads version {FORMAT_VERSION}. Re-run 'k2quant calibrate'"
            )
        import json

        meta = json.loads(st["meta"])
        tensors = st["tensors"]
        if expected_spec is not None and meta.get("spec") != expected_spec:
            raise ValueError(
                f"{path}: the integer model is of a different model spec "
                f"({_spec_summary(meta.get('spec'))}) than expected "
                f"({_spec_summary(expected_spec)})"
            )
        acts = {p: ActQuant(p, d["scale"], d["zero_point"], d["bits"], d["lo"], d["hi"])
                for p, d in meta["acts"].items()}
        layers = []
        for lm in meta["layers"]:
            d = dict(lm)
            prefix = lm["name"] + "/"
            for k, v in tensors.items():
                if k.startswith(prefix):
                    d[k[len(prefix):]] = v
            layers.append(IntLayer.from_dict(d))
        return cls(spec=meta["spec"], input_mul=tensors["input_mul"],
                   input_add=tensors["input_add"], acts=acts, layers=layers, backend=backend,
                   **meta["geometry"])


def _spec_summary(spec: Optional[dict]) -> str:
    if not isinstance(spec, dict):
        return repr(spec)
    cfg = spec.get("config", {})
    keys = ("feat_dim", "num_classes", "hidden_dim", "bottleneck_dims", "strides")
    return f"arch={spec.get('arch')!r}, " + ", ".join(f"{k}={cfg.get(k)!r}" for k in keys if k in cfg)


def fp32_reference_bytes(model: nn.Module) -> Dict[str, int]:
    """Bytes of the fp32 TdnnF tensors the chain forward uses: weights, biases and the
    BatchNorm running statistics (the xent branch is excluded)."""
    w = b = bn = 0
    for name, p in model.named_parameters():
        if name.split(".")[0] in ("prefinal_xent", "output_xent"):
            continue
        if name.endswith("weight") and p.dim() > 1:
            w += p.numel() * 4
        else:
            b += p.numel() * 4
    for name, t in model.named_buffers():
        if name.split(".")[0] in ("prefinal_xent", "output_xent"):
            continue
        if name.endswith("running_mean") or name.endswith("running_var"):
            bn += t.numel() * 4
    return {"weight_bytes": w, "bias_bytes": b, "bn_bytes": bn, "total_bytes": w + b + bn}
