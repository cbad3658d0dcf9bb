"""BatchNorm folding for :class:`k2quant.models.tdnnf.TdnnF` (eval mode), in float.

What is folded, and why it is exact
-----------------------------------
In eval mode a BatchNorm is the per-channel affine map ``bn(v) = a * v + c`` with
``a = gamma / sqrt(running_var + eps)`` (``gamma = 1`` without affine parameters, as in
Kaldi) and ``c = beta - running_mean * a``. The TDNN-F uses it in three places:

1. ``input_bn`` on the features: a per-dimension affine map *before* the first layer. The
   integer engine folds it into the input quantisation step (``q = round(x * mul_d + add_d)``,
   one multiply-add per feature dimension at the float -> integer boundary): exact.
2. ``BN(ReLU(y))`` in tdnn1, every tdnnf layer and ``prefinal_chain.batchnorm1``:
   ``a * relu(y) + c``. The scale cannot move in front of the ReLU in general
   (``a * relu(y) = relu(a * y)`` only for ``a > 0``), so we keep the order
   ``relu(y) -> * a -> + c``: in the integer engine ``a`` joins the requantisation
   multiplier applied *after* the integer ReLU (any sign of ``a`` is fine) and ``c`` is a
   per-channel constant added in the same fixed-point sum before the rounding shift. Folding
   ``c`` into the *next* layer's bias instead would also be exact for unpadded convolutions,
   but the bypass carries ``c`` forward (``0.66 * c`` into every later layer), so the
   constants of all later layers would change; keeping it in the requantisation of the
   layer that produces it is simpler and costs nothing (the requantisation adds a constant
   anyway: rounding offset and zero point).
3. ``BN(linear(u))`` in ``prefinal_chain.batchnorm2`` (no ReLU in between): folded into the
   linear layer, ``W' = a * W`` and ``b' = c`` -- exact in real arithmetic; we again keep
   ``a`` as a post-scale so that quantised weight codes are reused untouched.

:func:`fold_tdnnf` returns a :class:`FoldedTdnnF` holding every layer as
``y = post_scale * act(conv(x) + bias) + post_shift [+ bypass * x_center]`` (float64);
``FoldedTdnnF.forward`` reproduces ``TdnnF.forward`` (chain branch) to float rounding, which
the tests check. The integer engine (:mod:`k2quant.infer.int_engine`) is built from it.
Quantised layers (``k2quant.nn.QuantConv1d``/``QuantLinear``, frozen or fake-quant) are read
as their integer codes and per-channel scales (:func:`integer_weight`).
"""
import logging
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

log = logging.getLogger(__name__)


@dataclass
class IntWeight:
    """A weight as exact integers: ``weight = codes * scale[:, None, None]``.

    Attributes:
      codes: int8 tensor (out, in, k) with values in [-127, 127] (or [-128, 127]).
      scale: float64 tensor (out,).
      bits: the bit width the codes came from (4 for a 4-bit layer expanded to int8).
      exact: True if ``codes * scale`` equals the (de)quantised model weight, False if the
        weight was re-quantised to int8 here (float layers, codebook quantizers).
    """

    codes: torch.Tensor
    scale: torch.Tensor
    bits: int
    exact: bool


@dataclass
class FoldedLayer:
    """One layer after folding: ``y = post_scale * act(conv1d(x, weight, dilation) + bias)
    + post_shift`` with ``act`` = ReLU or identity; tdnnf affine layers then add
    ``bypass * x_in[:, :, d:T-d]`` (the tdnnf layer's input, d = its dilation).

    Tensors are float64; ``weight`` is (out, in, k). ``qweight`` is the integer form of the
    weight if the module was quantised (else None). ``out_point`` names the activation this
    layer produces (None for the output layer, whose result stays float).
    """

    name: str
    weight: torch.Tensor
    dilation: int
    bias: torch.Tensor
    relu: bool
    post_scale: torch.Tensor
    post_shift: torch.Tensor
    in_point: str
    out_point: Optional[str]
    bypass: float = 0.0
    bypass_point: Optional[str] = None
    bypass_offset: int = 0
    qweight: Optional[IntWeight] = None
    weight_bits: Optional[int] = None

    @property
    def kernel(self) -> int:
        return int(self.weight.shape[2])


@dataclass
class FoldedTdnnF:
    """A TdnnF with BatchNorm folded (see the module docstring). Chain branch only."""

    spec: Optional[dict]
    feat_dim: int
    num_classes: int
    subsampling_factor: int
    left_context: int
    right_context: int
    subsample_index: int
    input_mean: torch.Tensor  # (F,) float64
    input_inv_std: torch.Tensor  # (F,) float64
    tdnn1: FoldedLayer
    tdnnfs: List[Tuple[FoldedLayer, FoldedLayer]]
    prefinal: List[FoldedLayer]  # prefinal_l, prefinal_chain.affine, prefinal_chain.linear
    output: FoldedLayer
    layers: Dict[str, FoldedLayer] = field(default_factory=dict)

    def all_layers(self) -> List[FoldedLayer]:
        out = [self.tdnn1]
        for lin, aff in self.tdnnfs:
            out += [lin, aff]
        return out + list(self.prefinal) + [self.output]

    @torch.no_grad()
    def forward(self, x: torch.Tensor, pad: bool = True) -> torch.Tensor:
        """Float64 forward of the folded network: same contract as ``TdnnF.forward`` (chain
        branch); returns float32 log-probs (N, T', num_classes)."""
        from k2quant.infer.streaming import pad_features

        check_features(x, self.feat_dim, "FoldedTdnnF")
        if pad:
            x = pad_features(x, self.left_context, self.right_context, self.subsampling_factor)
        h = x.to(torch.float64).transpose(1, 2)
        h = (h - self.input_mean[:, None]) * self.input_inv_std[:, None]
        h = _float_layer(self.tdnn1, h)
        sf = self.subsampling_factor
        for i, (lin, aff) in enumerate(self.tdnnfs):
            if i == self.subsample_index and sf > 1:
                h = h[:, :, ::sf]
            z = _float_layer(lin, h)
            h = _float_layer(aff, z, h)
        if self.subsample_index == len(self.tdnnfs) and sf > 1:
            h = h[:, :, ::sf]
        for layer in self.prefinal:
            h = _float_layer(layer, h)
        logits = _float_layer(self.output, h).transpose(1, 2)
        return F.log_softmax(logits, dim=-1).to(torch.float32)


def _float_layer(
    layer: FoldedLayer, x: torch.Tensor, bypass_src: Optional[torch.Tensor] = None
) -> torch.Tensor:
    y = F.conv1d(x, layer.weight, layer.bias, dilation=max(layer.dilation, 1))
    if layer.relu:
        y = F.relu(y)
    y = y * layer.post_scale[:, None] + layer.post_shift[:, None]
    if layer.bypass != 0.0:
        d = layer.bypass_offset
        src = bypass_src[:, :, d : bypass_src.shape[2] - d] if d > 0 else bypass_src
        y = y + layer.bypass * src
    return y


def check_features(x: torch.Tensor, feat_dim: int, who: str) -> None:
    """Raise ``ValueError`` unless ``x`` is a float (N, T, feat_dim) tensor with N, T >= 1."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(
            f"{who}: expected features as a torch.Tensor (N, T, {feat_dim}), got "
            f"{type(x).__name__}"
        )
    if x.dim() != 3 or x.shape[2] != feat_dim:
        raise ValueError(
            f"{who}: expected features (N, T, {feat_dim}), got {tuple(x.shape)}; check the "
            f"feature extractor's dimension (the model was built with feat_dim={feat_dim})"
        )
    if not x.is_floating_point():
        raise ValueError(f"{who}: expected float32 features, got {x.dtype}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{who}: expected N >= 1 and T >= 1, got {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{who}: the features contain NaN/Inf")


def bn_affine(bn: Optional[nn.BatchNorm1d], dim: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BatchNorm as ``(a, c)`` float64 vectors: ``bn(v) = a * v + c``."""
    if bn is None:
        return torch.ones(dim, dtype=torch.float64), torch.zeros(dim, dtype=torch.float64)
    if not isinstance(bn, nn.BatchNorm1d):
        raise ValueError(f"fold: expected nn.BatchNorm1d, got {type(bn).__name__}")
    if not bn.track_running_stats or bn.running_mean is None:
        raise ValueError(
            "fold: BatchNorm without running statistics (track_running_stats=False) cannot be "
            "folded; inference needs fixed statistics"
        )
    var = bn.running_var.detach().to(torch.float64)
    mean = bn.running_mean.detach().to(torch.float64)
    a = 1.0 / torch.sqrt(var + bn.eps)
    c = -mean * a
    if bn.affine:
        g = bn.weight.detach().to(torch.float64)
        b = bn.bias.detach().to(torch.float64)
        a, c = a * g, c * g + b
    return a, c


def integer_weight(module: nn.Module, name: str) -> Tuple[torch.Tensor, Optional[IntWeight]]:
    """The weight of a conv/linear leaf as float64 (out, in, k) and, for quantised modules,
    its exact integer form.

    Uniform-family codes with an integer (or half-integer) zero point map to int8 exactly:
    ``w = (codes - zp) * s = (k * (codes - zp)) * (s / k)`` with k = 1 (or 2); a 4-bit layer
    becomes int8 values in [-8, 7]. Codebook quantizers and float layers return ``None``
    (the engine re-quantises them to int8 per output channel).
    """
    from k2quant.nn import QuantModule

    def as3d(w: torch.Tensor) -> torch.Tensor:
        w = w.detach().to(torch.float64)
        return w[:, :, None] if w.dim() == 2 else w

    if isinstance(module, (nn.Conv1d, nn.Linear)) and not isinstance(module, QuantModule):
        return as3d(module.weight), None
    if not isinstance(module, QuantModule):
        raise ValueError(f"fold: layer {name!r} is a {type(module).__name__}; expected a "
                         f"Conv1d/Linear or a k2quant QuantConv1d/QuantLinear")
    if getattr(module, "frozen", False):
        codes = getattr(module, "weight_codes")
        params = module._frozen_params("weight")
        w = module.quant_weight("weight")
    elif "weight" in module.weight_quantizers and module.quant_weights_enabled:
        q = module.weight_quantizers["weight"]
        was = q.training
        q.eval()
        try:
            with torch.no_grad():
                codes, params = q.quantize(module.weight.detach())
                w = q.dequantize(codes, params)
        finally:
            q.train(was)
    else:  # weight quantisation disabled: a float layer
        return as3d(module.weight), None
    w3 = as3d(w)
    out = w3.shape[0]
    if params.codebook is not None or params.ch_axis not in (None, 0):
        log.warning("%s: %s weights are not a uniform integer grid; re-quantising to int8",
                    name, "codebook" if params.codebook is not None else "non-row")
        return w3, None
    zp = params.zero_point
    zp = torch.zeros(()) if zp is None else zp
    zp = zp.detach().to(torch.float64).reshape(-1).expand(out) if zp.numel() == 1 else \
        zp.detach().to(torch.float64).reshape(out)
    scale = params.scale.detach().to(torch.float64)
    scale = scale.reshape(-1).expand(out) if scale.numel() == 1 else scale.reshape(out)
    for k in (1, 2):
        if bool(torch.all(torch.frac(zp * k) == 0)):
            ints = (codes.to(torch.float64) - zp.reshape([out] + [1] * (codes.dim() - 1))) * k
            ints = as3d(ints)
            if float(ints.abs().max()) <= 127:
                return w3, IntWeight(
                    codes=ints.round().to(torch.int8),
                    scale=(scale / k).clone(),
                    bits=int(params.bits),
                    exact=True,
                )
    log.warning("%s: weight codes do not fit int8 exactly; re-quantising to int8", name)
    return w3, None


def _bias(module: nn.Module, out: int) -> torch.Tensor:
    b = getattr(module, "bias", None)
    if b is None:
        return torch.zeros(out, dtype=torch.float64)
    return b.detach().to(torch.float64).clone()


def _leaf(model: nn.Module, name: str, in_point: str, out_point: Optional[str], relu: bool,
          bn: Optional[nn.BatchNorm1d], dilation: int = 1) -> FoldedLayer:
    module = model.get_submodule(name)
    w, qw = integer_weight(module, name)
    out = w.shape[0]
    a, c = bn_affine(bn, out)
    dil = dilation if w.shape[2] > 1 else 0
    return FoldedLayer(
        name=name, weight=w, dilation=dil, bias=_bias(module, out), relu=relu,
        post_scale=a, post_shift=c, in_point=in_point, out_point=out_point, qweight=qw,
        weight_bits=None if qw is None else qw.bits,
    )


def _conv_dilation(module: nn.Module) -> int:
    d = getattr(module, "dilation", 1)
    return int(d[0] if isinstance(d, (tuple, list)) else d)


def fold_tdnnf(model: nn.Module) -> FoldedTdnnF:
    """Fold the BatchNorms of a TdnnF (float, fake-quant or converted) in eval mode.

    Raises ``ValueError`` for a model that is not a TdnnF-like network.
    """
    from k2quant.models.tdnnf import TdnnF

    if not isinstance(model, TdnnF):
        raise ValueError(
            f"fold_tdnnf: expected a k2quant.models.tdnnf.TdnnF, got {type(model).__name__}"
        )
    cfg = model.config
    if model.input_bn is not None:
        mean = model.input_bn.running_mean.detach().to(torch.float64).clone()
        inv = 1.0 / torch.sqrt(model.input_bn.running_var.detach().to(torch.float64)
                               + model.input_bn.eps)
    else:
        mean = torch.zeros(cfg.feat_dim, dtype=torch.float64)
        inv = torch.ones(cfg.feat_dim, dtype=torch.float64)
    tdnn1 = _leaf(model, "tdnn1.affine", "input", "tdnn1", True, model.tdnn1.batchnorm)
    tdnnfs = []
    prev = "tdnn1"
    for i, layer in enumerate(model.tdnnfs):
        d = layer.dilation
        lin = _leaf(model, f"tdnnfs.{i}.linear", prev, f"tdnnfs.{i}.linear", False, None,
                    _conv_dilation(layer.linear))
        aff = _leaf(model, f"tdnnfs.{i}.affine", f"tdnnfs.{i}.linear", f"tdnnfs.{i}", True,
                    layer.batchnorm, _conv_dilation(layer.affine))
        aff.bypass = float(layer.bypass_scale)
        aff.bypass_point = prev
        aff.bypass_offset = int(d)
        if lin.kernel != aff.kernel or (lin.kernel > 1 and lin.dilation != d):
            raise ValueError(f"fold_tdnnf: tdnnfs.{i} has an unexpected shape")
        tdnnfs.append((lin, aff))
        prev = f"tdnnfs.{i}"
    pl = _leaf(model, "prefinal_l", prev, "prefinal_l", False, None)
    pa = _leaf(model, "prefinal_chain.affine", "prefinal_l", "prefinal_chain.batchnorm1", True,
               model.prefinal_chain.batchnorm1)
    plin = _leaf(model, "prefinal_chain.linear", "prefinal_chain.batchnorm1",
                 "prefinal_chain.batchnorm2", False, model.prefinal_chain.batchnorm2)
    out = _leaf(model, "output", "prefinal_chain.batchnorm2", None, False, None)
    folded = FoldedTdnnF(
        spec=model.model_spec() if hasattr(model, "model_spec") else None,
        feat_dim=cfg.feat_dim,
        num_classes=cfg.num_classes,
        subsampling_factor=model.subsampling_factor,
        left_context=model.left_context,
        right_context=model.right_context,
        subsample_index=model.subsample_index,
        input_mean=mean,
        input_inv_std=inv,
        tdnn1=tdnn1,
        tdnnfs=tdnnfs,
        prefinal=[pl, pa, plin],
        output=out,
    )
    folded.layers = {l.name: l for l in folded.all_layers()}
    return folded


#: The activation points of a TdnnF that the integer engine quantises, in forward order.
def activation_points(num_tdnnf_layers: int) -> List[str]:
    pts = ["input", "tdnn1"]
    for i in range(num_tdnnf_layers):
        pts += [f"tdnnfs.{i}.linear", f"tdnnfs.{i}"]
    return pts + ["prefinal_l", "prefinal_chain.batchnorm1", "prefinal_chain.batchnorm2"]
