"""The ``qtensor`` back end of :class:`k2quant.infer.int_engine.IntTdnnF`: activations kept as
torch quantized tensors (quint8) end to end, fbgemm's static int8 kernels with their fused
float requantisation, and a bit-exact simulated reference of that arithmetic.

Why a second arithmetic
-----------------------
The dyadic back ends (``int_mm``, ``fbgemm``, ``float64``) run the documented integer-only
arithmetic (int32 accumulators, ``m / 2**e`` multipliers, round half up) but must do the
requantisation as separate int64 tensor passes in eager PyTorch, which costs more than the
int8 GEMMs. torch's static quantized kernels (``quantized::linear[_relu]``,
``quantized::add``) requantise inside fbgemm's GEMM epilogue, but with a *float*
multiplier, so they compute a different (equally integer-in, integer-out) function. This
module defines that function precisely, builds it from the same :class:`IntLayer`
parameters, and checks it against an independent simulation.

Representation of an activation point
-------------------------------------
Each activation point ``P`` is a quint8 tensor of codes ``q`` with metadata scale ``mu`` and
zero point ``zeta`` plus two *real* constants the kernels never see: a positive factor
``lam`` and a per-channel offset vector ``o``::

    h_P  =  lam * mu * (q - zeta)  +  o                       (h_P: the real activation)

* The offsets remove the per-channel BatchNorm shift ``c_j`` that follows every ReLU
  (``a * relu(y) + c``; a shift after the ReLU cannot be expressed by a fused
  ``linear_relu``). The point stores ``u = h - o >= 0`` and ``o`` is folded into the
  *next* layers' biases (``sum_i W_ji o_i``) and carried through the bypass
  (``o_out = c + 0.66 o_x``). With ``u >= 0`` every ReLU/bypass point has ``zeta = 0`` and
  all 256 levels for non-negative values.
* ``lam`` lets the bypass run as a plain ``quantized::add``: ``add`` sums the dequantised
  inputs, so the bypass scale ``beta ~ 0.66`` is folded into the *metadata* scales
  (``lam_out = beta * lam_x``; a real factor ``lam`` is absorbed by the weight scales of the
  consumers). For the 15 tdnnf layers of the 7q net ``lam`` falls to ~0.66**15 ~ 2e-3,
  harmless in float32.
* Linear points (bottleneck outputs, ``prefinal_l``, ``prefinal_chain.batchnorm2``) have
  ``o = 0`` and use the calibrated grid of the dyadic model (same scale and zero point).
* The grid of a ReLU point covers ``[0, hi - min_j o_j]`` (``hi``: top of the calibrated
  grid of ``h``), a bound that needs no data and clips no value the dyadic grid keeps.

Layers (``acc = sum W (q_in - zeta_in)``, exact int32 in fbgemm with AVX512-VNNI/AVX-VNNI)
------------------------------------------------------------------------------------------
With ``g_j``, ``f_j`` derived from the dyadic constants (``M_j = m_j / 2**e``, ``B_j``,
``C_j / 2**e``, the input grid ``S_in`` and the input representation) the real pre-activation
is ``g_j * acc_j + f_j``. fbgemm is given per-channel weight scales ``ws_j = g_j / (lam_out *
mu_in)`` (rows with ``g_j < 0`` are negated, ``g_j = 0`` rows zeroed) and the float bias
``b_j = f_j / lam_out``, and computes -- measured bit for bit on torch 1.13 and 2.13 --::

    atws_j = f32(mu_in) * f32(ws_j)                        float32 products/quotients
    mult_j = atws_j / f32(mu_out)
    v      = (f32(acc_j) + b_j / atws_j) * mult_j          each op rounded to float32
    q_out  = clamp(nearbyint(v) + zeta_out, relu ? zeta_out : 0, 255)   (half to even)

``quantized::add`` (ReLU points have zero point 0, which makes its vectorised and scalar
paths identical: the fused ``scale * q + (-zp * scale)`` premultiplication is exact)::

    s     = f32(q_r) * f32(mu_r) + f32(q_x) * f32(mu_x)
    q_out = clamp(nearbyint(s * (1 / f32(mu_out))), 0, 255)

The output layer needs float logits: ``quantized::linear_dynamic`` on the dequantised codes
of ``prefinal_chain.batchnorm2`` (metadata scale 1, two extra rows pin the dynamic range to
exactly ``[-zeta, 255 - zeta]``, so the re-quantised codes are the stored ones) computes
``logits = fma(f32(acc_j), f32(out_scale_j), f32(out_bias_j))`` (one rounding; the
reference emulates the fused multiply-add exactly with float64 and round-to-odd).

The input step is the dyadic engine's ``q = clamp(round(x * mul + add), 0, 255)`` via
``torch.quantize_per_tensor(x * mul + add, 1.0, 0)`` (the only quantize call).

Layout of the fast path
-----------------------
Frames of all utterances are one time-major matrix ``(N * T, C)`` (utterance ``n`` at rows
``n * T ...``); a layer with kernel ``k`` and dilation ``d`` maps rows ``r .. r + (k-1) d``
to row ``r`` via an overlapping ``as_strided`` view (a kernel-2 layer is one GEMM on each
frame concatenated with its shifted copy, copied once by ``contiguous``: far cheaper than
quantized ``cat``, which dequantises); the bypass is a row slice (contiguous). Rows near
the end of each utterance mix two utterances and are never used by valid rows; the valid
rows are selected once before the output layer. ``T`` is padded to a multiple of the
subsampling factor so that the global ``[::3]`` keeps every utterance's phase.

Accuracy vs the dyadic model
----------------------------
Same weights and (except for ReLU points) the same grids, but float instead of dyadic
multipliers, round-half-even instead of round-half-up, the bypass point rounded twice
(the branch on its own grid, then the sum) and slightly different ReLU-point grids: codes
differ by about one step in a small fraction of places; both are 8-bit models of the same
float network (the tests bound their distance to fp32).

Limits: 8-bit activation points only, non-negative BatchNorm scales after every ReLU (always
true for Kaldi's BatchNorm without affine parameters), an x86 fbgemm build whose u8 x s8
GEMM does not saturate (checked once by :func:`fbgemm_u8s8_exact`; AVX2-only CPUs without
VNNI saturate 16-bit pair sums). :func:`qtensor_unsupported` says why a model cannot use it.
"""
import contextlib
import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, Optional, Tuple

import torch
import torch.nn.functional as F

if TYPE_CHECKING:  # pragma: no cover
    from k2quant.infer.int_engine import IntLayer, IntTdnnF

_F32 = torch.float32


@contextlib.contextmanager
def _quiet_fbgemm():
    """Select the fbgemm engine (torch 2.x defaults to ``x86``, which may pick oneDNN for some
    ops) and silence torch 2.x's deprecation warning for quantized tensors."""
    old = torch.backends.quantized.engine
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*quantized tensor creation.*")
        warnings.filterwarnings("ignore", message=".*deprecated.*quantiz.*")
        if old != "fbgemm":
            torch.backends.quantized.engine = "fbgemm"
        try:
            yield
        finally:
            if old != "fbgemm":
                torch.backends.quantized.engine = old


_EXACT: Dict[str, bool] = {}


def fbgemm_u8s8_exact() -> bool:
    """True if fbgemm's static quantized linear has exact int32 accumulation here: 255 * 127
    pair sums overflow the 16-bit intermediate of AVX2's ``vpmaddubsw`` (saturating), but not
    VNNI's ``vpdpbusd``. Checked once per process with a 2-column product of 64770."""
    if "ok" in _EXACT:
        return _EXACT["ok"]
    ok = False
    if any(e == "fbgemm" for e in torch.backends.quantized.supported_engines):
        try:
            with _quiet_fbgemm():
                for K, out_scale, want in ((2, 1000.0, 65), (64, 10000.0, 207)):
                    # acc = 255 * 127 * K: 64770 -> 65; 2072640 -> 207 (a saturated 16-bit
                    # pair sum 32767 would give 33 and 105)
                    a = torch._make_per_tensor_quantized_tensor(
                        torch.full((3, K), 255, dtype=torch.uint8), 1.0, 0)
                    w = torch._make_per_channel_quantized_tensor(
                        torch.full((8, K), 127, dtype=torch.int8),
                        torch.ones(8, dtype=torch.float64), torch.zeros(8, dtype=torch.int64), 0)
                    pk = torch.ops.quantized.linear_prepack(w, None)
                    y = torch.ops.quantized.linear(a, pk, out_scale, 0).int_repr()
                    ok = bool((y == want).all())
                    if not ok:
                        break
        except (RuntimeError, NotImplementedError):
            ok = False
    _EXACT["ok"] = ok
    return ok


def have_qtensor() -> bool:
    """True if the ``qtensor`` back end can run here (fbgemm with exact u8 x s8 GEMMs)."""
    return fbgemm_u8s8_exact()


def qtensor_unsupported(eng: "IntTdnnF") -> Optional[str]:
    """None if ``eng`` can use the qtensor back end, else the reason (a sentence)."""
    if not have_qtensor():
        return ("the qtensor back end needs torch's fbgemm engine with exact (non-saturating) "
                "u8 x s8 GEMMs (x86 with AVX512-VNNI or AVX-VNNI)")
    low = [p for p, a in eng.acts.items() if a.bits != 8]
    if low:
        return f"the qtensor back end supports 8-bit activations only (points {low} are not)"
    for L in eng.layers.values():
        if not L.final and L.relu and bool((L.m < 0).any()):
            return (f"the qtensor back end needs non-negative BatchNorm scales after each ReLU; "
                    f"{L.name} has negative ones (use a dyadic back end)")
        if not L.final and L.relu and L.mx < 0:
            return f"{L.name}: negative bypass scale"
    return None


# ----------------------------------------------------------------------------------------
# the quantised model
# ----------------------------------------------------------------------------------------
@dataclass
class QPoint:
    """``h = lam * mu * (q - zp) + offset`` (see the module docstring)."""

    name: str
    mu: float
    zp: int
    lam: float
    offset: Optional[torch.Tensor]  # float64 (C,) or None (= 0)


@dataclass
class QLayer:
    """One layer as fbgemm sees it. ``W``: int8 (out, in, k) (rows possibly negated);
    ``ws``: float64 (out,) > 0; ``bias``: float32 (out,). Final layer: ``out_mu``/``out_zp``
    unused, logits ``fma(f32(acc), f32(ws), bias)``."""

    name: str
    W: torch.Tensor
    ws: torch.Tensor
    bias: torch.Tensor
    dilation: int
    relu: bool
    in_mu: float
    in_zp: int
    out_mu: float = 1.0
    out_zp: int = 0
    bypass_offset: int = 0  # with bypass: add the layer input rows [d, d + R) (d = offset)
    bypass: bool = False
    final: bool = False

    @property
    def kernel(self) -> int:
        return int(self.W.shape[2])


def _weight_rows(W: torch.Tensor, g: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-channel scales must be positive: negate the rows with ``g < 0`` and zero the rows
    with ``g == 0`` (their scale is then 1, their contribution 0)."""
    W = W.clone()
    neg = g < 0
    if bool(neg.any()):
        if bool((W[neg] == -128).any()):
            raise ValueError("qtensor: cannot negate a weight row containing -128")
        W[neg] = -W[neg]
    zero = g == 0
    W[zero] = 0
    ws = g.abs().clone()
    ws[zero] = 1.0
    return W, ws


def build_qmodel(eng: "IntTdnnF") -> Tuple[Dict[str, QPoint], Dict[str, QLayer]]:
    """The qtensor model of an :class:`IntTdnnF` (its layers' dyadic constants, read as real
    numbers, and its activation grids)."""
    why = qtensor_unsupported(eng)
    if why is not None:
        raise ValueError(why)
    acts = eng.acts
    a_in = acts["input"]
    points: Dict[str, QPoint] = {
        "input": QPoint("input", 1.0, 0, a_in.scale,
                        torch.full((eng.feat_dim,), -a_in.scale * a_in.zero_point,
                                   dtype=torch.float64)),
    }
    layers: Dict[str, QLayer] = {}
    names = eng.layer_names()
    final_in = eng._point_in("output")
    for name in names:
        L: "IntLayer" = eng.layers[name]
        pin = points[eng._point_in(name)]
        S_in = acts[pin.name].scale
        W64 = L.W.to(torch.float64)
        Wo = (W64.sum(2) @ pin.offset) if pin.offset is not None else torch.zeros(
            L.out_features, dtype=torch.float64)
        if L.final:
            g = L.out_scale.to(torch.float64) * (pin.lam * pin.mu / S_in)
            f = L.out_bias.to(torch.float64) + L.out_scale.to(torch.float64) * Wo / S_in
            W, ws = _weight_rows(L.W, g)
            if pin.mu != 1.0:
                raise AssertionError("qtensor: the output layer's input must have scale 1")
            layers[name] = QLayer(name, W, ws, f.to(_F32), 1, False, pin.mu, pin.zp, final=True)
            continue
        out_pt = eng._out_act(L)
        S_out = out_pt.scale
        M = L.m.to(torch.float64) / 2.0 ** L.e
        Cp = L.C.to(torch.float64) / 2.0 ** L.e
        g = S_out * M * (pin.lam * pin.mu / S_in)
        f = S_out * M * (L.B.to(torch.float64) + Wo / S_in)
        if L.relu:
            o = S_out * Cp
            lam = 1.0
            if L.mx:
                px = points[eng._point_in(name.replace(".affine", ".linear"))]
                if px.zp != 0:
                    raise AssertionError(f"qtensor: bypass source of {name} has a zero point")
                beta = S_out * (L.mx / 2.0 ** L.e) / acts[px.name].scale
                o = o + beta * (px.offset if px.offset is not None else 0.0)
                lam = beta * px.lam
            hi = S_out * (out_pt.qmax - out_pt.zero_point)
            umax = hi - float(o.min())
            sigma = umax / 255.0 if umax > 0 else 1.0
            mu_out, zp_out = sigma / lam, 0
            W, ws = _weight_rows(L.W, g / (lam * pin.mu))
            bias = (f / lam).to(_F32)
            points[out_pt.point] = QPoint(out_pt.point, mu_out, zp_out, lam, o)
        else:
            lam = S_out if out_pt.point == final_in else 1.0
            mu_out, zp_out = S_out / lam, out_pt.zero_point
            W, ws = _weight_rows(L.W, g / (lam * pin.mu))
            bias = ((f + S_out * Cp) / lam).to(_F32)
            points[out_pt.point] = QPoint(out_pt.point, mu_out, zp_out, lam, None)
        layers[name] = QLayer(
            name, W, ws, bias, max(L.dilation, 1), L.relu, pin.mu, pin.zp, mu_out, zp_out,
            bypass_offset=L.bypass_offset if L.mx else 0, bypass=bool(L.mx))
    return points, layers


# ----------------------------------------------------------------------------------------
# simulated reference (float32 formulas of the module docstring, channels-first)
# ----------------------------------------------------------------------------------------
def _f32(v: float) -> torch.Tensor:
    return torch.tensor(v, dtype=_F32)


def _round_to_odd_fma(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """float32 ``fma(a, b, c)`` (one rounding) for float32 tensors: the product is exact in
    float64; the float64 sum is made round-to-odd (TwoSum error), after which rounding to
    float32 is the correctly rounded result."""
    p = a.to(torch.float64) * b.to(torch.float64)
    c64 = c.to(torch.float64)
    s = p + c64
    bb = s - p
    err = (p - (s - bb)) + (c64 - bb)
    even = (s.view(torch.int64) & 1) == 0
    fix = (err != 0) & even
    if bool(fix.any()):
        toward = torch.where(err > 0, torch.full_like(s, math.inf), torch.full_like(s, -math.inf))
        s = torch.where(fix, torch.nextafter(s, toward), s)
    return s.to(_F32)


def ref_linear(QL: QLayer, q: torch.Tensor) -> torch.Tensor:
    """(N, C_in, T) int64 codes -> (N, C_out, T') int64 codes, or float32 logits (final)."""
    x = (q - QL.in_zp).to(torch.float64)
    acc = torch.round(F.conv1d(x, QL.W.to(torch.float64), dilation=QL.dilation))
    acc = acc.to(torch.int64).clamp(-(1 << 31), (1 << 31) - 1).to(_F32)  # f32(int32)
    ws = QL.ws.to(_F32)[:, None]
    if QL.final:
        return _round_to_odd_fma(acc, ws.expand_as(acc), QL.bias[:, None].expand_as(acc))
    atws = _f32(QL.in_mu) * ws
    mult = atws / _f32(QL.out_mu)
    v = (acc + QL.bias[:, None] / atws) * mult
    y = torch.round(v).to(torch.int64) + QL.out_zp
    return y.clamp(QL.out_zp if QL.relu else 0, 255)


def ref_add(qr: torch.Tensor, mu_r: float, qx: torch.Tensor, mu_x: float, mu_out: float):
    """``quantized::add`` of two zero-point-0 code tensors (int64) -> int64 codes."""
    s = qr.to(_F32) * _f32(mu_r) + qx.to(_F32) * _f32(mu_x)
    inv = _f32(1.0) / _f32(mu_out)
    return torch.round(s * inv).to(torch.int64).clamp(0, 255)


# ----------------------------------------------------------------------------------------
# the engine
# ----------------------------------------------------------------------------------------
class QTensorEngine:
    """Fast path and simulated reference of the qtensor arithmetic for one :class:`IntTdnnF`
    (built by ``IntTdnnF.set_backend("qtensor")``)."""

    def __init__(self, eng: "IntTdnnF") -> None:
        self.eng = eng
        self.points, self.qlayers = build_qmodel(eng)
        self.packed: Dict[str, object] = {}
        self.calib: Optional[torch.Tensor] = None
        with _quiet_fbgemm():
            for n, QL in self.qlayers.items():
                Wm = QL.W.permute(0, 2, 1).reshape(QL.W.shape[0], -1).contiguous()  # tap-major
                qw = torch._make_per_channel_quantized_tensor(
                    Wm, QL.ws.to(torch.float64), torch.zeros(Wm.shape[0], dtype=torch.int64), 0)
                self.packed[n] = torch.ops.quantized.linear_prepack(qw, QL.bias.contiguous())
        fin = self.qlayers["output"]
        K = fin.W.shape[1] * fin.kernel
        self.calib = torch.empty(2, K, dtype=_F32)
        self.calib[0] = float(-fin.in_zp)
        self.calib[1] = float(255 - fin.in_zp)

    def nbytes(self) -> int:
        """int8 weights + per-channel float32 scale, float32 bias and fbgemm's int32 column
        offsets (fbgemm's packed copy replaces the int8 matrix)."""
        return sum(QL.W.numel() + 12 * QL.W.shape[0] for QL in self.qlayers.values())

    # -- fast path --------------------------------------------------------------------------
    @staticmethod
    def _im2col(h: torch.Tensor, k: int, d: int) -> torch.Tensor:
        R, C = h.shape
        if k == 1:
            return h
        R2 = R - (k - 1) * d
        return h.as_strided((R2, k, C), (C, d * C, 1)).contiguous().view(R2, k * C)

    def _linear(self, name: str, h: torch.Tensor) -> torch.Tensor:
        QL = self.qlayers[name]
        a = self._im2col(h, QL.kernel, QL.dilation)
        op = torch.ops.quantized.linear_relu if QL.relu else torch.ops.quantized.linear
        return op(a, self.packed[name], QL.out_mu, QL.out_zp)

    def _block(self, name: str, h: torch.Tensor, x: Optional[torch.Tensor] = None):
        QL = self.qlayers[name]
        r = self._linear(name, h)
        if not QL.bypass:
            return r
        d = QL.bypass_offset
        return torch.ops.quantized.add(r, x[d : d + r.shape[0]], QL.out_mu, 0)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, return_codes: bool = False):
        """x: padded float32 features (N, Tp, F) -> log-probs (N, T', C) [, codes]."""
        eng = self.eng
        with _quiet_fbgemm():
            return self._forward(eng, x, return_codes)

    def _forward(self, eng: "IntTdnnF", x: torch.Tensor, return_codes: bool):
        N, Tp, Fd = x.shape
        sf = eng.subsampling_factor
        if N > 1 and sf > 1 and Tp % sf:  # keep every utterance's phase for the global [::sf]
            x = torch.cat([x, x[:, -1:].expand(N, sf - Tp % sf, Fd)], dim=1)
        stride, valid = x.shape[1], Tp  # rows per utterance, valid rows per utterance
        v = x.to(_F32).reshape(N * stride, Fd) * eng.input_mul + eng.input_add
        h = torch.quantize_per_tensor(v, 1.0, 0, torch.quint8)
        codes: Dict[str, Tuple[torch.Tensor, int, int]] = {}

        def keep(point, t, valid):
            if return_codes:
                codes[point] = (t, stride, valid)

        def shrink(name, valid):
            QL = self.qlayers[name]
            return valid - (QL.kernel - 1) * QL.dilation

        keep("input", h, valid)
        h, valid = self._block("tdnn1.affine", h), shrink("tdnn1.affine", valid)
        keep("tdnn1", h, valid)
        for i in range(eng.num_tdnnf):
            if i == eng.subsample_index and sf > 1:
                h = h[::sf].contiguous()
                stride, valid = -(-stride // sf), -(-valid // sf)
            z, valid = self._block(f"tdnnfs.{i}.linear", h), shrink(f"tdnnfs.{i}.linear", valid)
            keep(f"tdnnfs.{i}.linear", z, valid)
            h, valid = self._block(f"tdnnfs.{i}.affine", z, h), shrink(f"tdnnfs.{i}.affine", valid)
            keep(f"tdnnfs.{i}", h, valid)
        if eng.subsample_index == eng.num_tdnnf and sf > 1:
            h = h[::sf].contiguous()
            stride, valid = -(-stride // sf), -(-valid // sf)
        for name, point in (("prefinal_l", "prefinal_l"),
                            ("prefinal_chain.affine", "prefinal_chain.batchnorm1"),
                            ("prefinal_chain.linear", "prefinal_chain.batchnorm2")):
            h = self._block(name, h)
            keep(point, h, valid)
        # valid rows only, dequantised (scale 1: the codes minus the zero point)
        C = h.shape[1]
        if N == 1:
            hv = h[:valid]
        else:
            hv = h.as_strided((N, valid, C), (stride * C, C, 1))
        a = torch.cat([hv.dequantize().reshape(N * valid, C), self.calib])
        logits = torch.ops.quantized.linear_dynamic(a, self.packed["output"], False)[: N * valid]
        out = F.log_softmax(logits, dim=-1).view(N, valid, -1)
        if not return_codes:
            return out
        res = {}
        for p, (t, st, vl) in codes.items():
            c = t.int_repr()
            full = torch.zeros(N * st, c.shape[1], dtype=torch.uint8)
            n = min(c.shape[0], N * st)
            full[:n] = c[:n]
            res[p] = full.view(N, st, -1)[:, :vl].to(torch.int64)
        return out, res

    # -- reference --------------------------------------------------------------------------
    @torch.no_grad()
    def reference_forward(self, x: torch.Tensor, return_codes: bool = False):
        """The same arithmetic simulated per utterance, channels-first, with float64
        convolutions of the integer codes (exact accumulators) and the float32 requantisation
        formulas of the module docstring. x: padded (N, Tp, F)."""
        eng = self.eng
        v = x.to(_F32) * eng.input_mul + eng.input_add
        c = torch.round(v).clamp(0, 255).to(torch.int64).transpose(1, 2)
        codes = {"input": c}

        def block(name, c, cx=None):
            QL = self.qlayers[name]
            r = ref_linear(QL, c)
            if not QL.bypass:
                return r
            d = QL.bypass_offset
            xc = cx[:, :, d : cx.shape[2] - d] if d > 0 else cx
            px = self.points[eng._point_in(name.replace(".affine", ".linear"))]
            return ref_add(r, QL.out_mu, xc, px.mu, QL.out_mu)

        c = block("tdnn1.affine", c)
        codes["tdnn1"] = c
        sf = eng.subsampling_factor
        for i in range(eng.num_tdnnf):
            if i == eng.subsample_index and sf > 1:
                c = c[:, :, ::sf]
            z = block(f"tdnnfs.{i}.linear", c)
            c = block(f"tdnnfs.{i}.affine", z, c)
            codes[f"tdnnfs.{i}.linear"] = z
            codes[f"tdnnfs.{i}"] = c
        if eng.subsample_index == eng.num_tdnnf and sf > 1:
            c = c[:, :, ::sf]
        for name, point in (("prefinal_l", "prefinal_l"),
                            ("prefinal_chain.affine", "prefinal_chain.batchnorm1"),
                            ("prefinal_chain.linear", "prefinal_chain.batchnorm2")):
            c = block(name, c)
            codes[point] = c
        logits = ref_linear(self.qlayers["output"], c).transpose(1, 2).contiguous()
        out = F.log_softmax(logits, dim=-1)
        if not return_codes:
            return out
        return out, {k: t.transpose(1, 2).contiguous() for k, t in codes.items()}

    def real_values(self, point: str, codes: torch.Tensor) -> torch.Tensor:
        """Real activations ``lam * mu * (q - zp) + o`` of (N, T, C) codes of ``point``."""
        P = self.points[point]
        h = (codes.to(torch.float64) - P.zp) * (P.lam * P.mu)
        return h + P.offset if P.offset is not None else h
