"""Post-training calibration of a TDNN-F for the integer engine, with real or synthetic
(zero-shot) features.

Zero-shot features (ZeroQ, Cai et al. 2020; Q-ASR, Kim et al. 2021, arXiv 2103.16827)
---------------------------------------------------------------------------------------
No data is read. :func:`synthesize_features` starts from noise shaped like fbank features --
``N(0, 1)`` *after* the model's input normalisation, i.e. ``running_mean + sqrt(running_var)
* N(0, 1)`` per dimension from ``input_bn`` (models without ``input_bn``: a log-mel-like
``N(-6, 3^2)``, the rough range of lhotse 80-dim fbank) -- and optimises the features with
Adam so that the per-channel mean and standard deviation of the input of every BatchNorm
(over batch and time) match its ``running_mean`` / ``sqrt(running_var + eps)``::

    loss = sum_BN ||mean(x) - running_mean||_2 + ||std(x) - sqrt(running_var + eps)||_2
           + tv_weight * mean_t |x_{t+1} - x_t| / std_d          (optional smoothness prior)

Calibration
-----------
:func:`collect_activation_ranges` runs the float (or fake-quant / converted) model on the
calibration features and records, with forward hooks, every activation point the integer
engine quantises (:func:`k2quant.infer.fold.activation_points`): exact min/max plus a random
subsample for ``percentile`` / ``mse`` ranges (computed with
:class:`k2quant.quant.UniformQuantizer`, asymmetric unsigned grid). :func:`calibrate_model`
turns the ranges into an :class:`~k2quant.infer.int_engine.IntTdnnF`.
"""
import logging
import math
import time
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

import torch
import torch.nn as nn

from k2quant.infer.fold import activation_points
from k2quant.infer.int_engine import IntTdnnF

log = logging.getLogger(__name__)

RANGE_METHODS = ("minmax", "percentile", "mse")
#: log-mel-like prior for models without input_bn (lhotse fbank is roughly in [-15, 5])
FBANK_PRIOR_MEAN = -6.0
FBANK_PRIOR_STD = 3.0


# ----------------------------------------------------------------------------------------
# loading models
# ----------------------------------------------------------------------------------------
def load_acoustic_model(path, allow_pickle: bool = False) -> nn.Module:
    """Load a TdnnF from a packed export (``*.k2q``) or a training checkpoint
    (``{"model": state_dict, "model_spec": spec, ...}`` as written by
    ``k2quant.training.checkpoint.save_checkpoint``). Returns the model in eval mode.

    ``allow_pickle``: let ``torch.load`` unpickle arbitrary objects (training checkpoints
    store RNG/optimizer state); only for files you trust.
    """
    from k2quant.export import is_packed_file, load_packed
    from k2quant.models import build_model

    if is_packed_file(path):
        return load_packed(path).eval()
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except Exception as e:
        hint = "" if allow_pickle else (
            " If it is a training checkpoint you trust, pass --allow-pickle (allow_pickle=True)."
        )
        raise ValueError(f"{path}: cannot read the checkpoint ({e}).{hint}") from e
    if isinstance(ckpt, dict) and "model" in ckpt:
        sd, spec = ckpt["model"], ckpt.get("model_spec")
    else:
        sd, spec = ckpt, None
    if spec is None:
        raise ValueError(
            f"{path}: the checkpoint has no 'model_spec'; expected a k2quant training "
            f"checkpoint (epoch-N.pt) or a packed export (.k2q)"
        )
    model = build_model(spec)
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise ValueError(
            f"{path}: the state dict does not match its model_spec ({e}). A quantization-aware "
            f"checkpoint must be exported with save_packed first."
        ) from e
    return model.eval()


def _quant_modules(model: nn.Module):
    from k2quant.nn import QuantModule

    return [m for m in model.modules() if isinstance(m, QuantModule)]


class _ActsOff:
    """Context: disable activation fake-quant of k2quant QuantModules (the integer engine
    quantises activations itself)."""

    def __init__(self, model: nn.Module) -> None:
        self.mods = _quant_modules(model)

    def __enter__(self):
        self.saved = [m.quant_acts_enabled for m in self.mods]
        for m in self.mods:
            m.set_quant_enabled(acts=False)
        return self

    def __exit__(self, *exc):
        for m, s in zip(self.mods, self.saved):
            m.set_quant_enabled(acts=s)


# ----------------------------------------------------------------------------------------
# zero-shot synthetic features
# ----------------------------------------------------------------------------------------
def _bn_modules(model: nn.Module) -> List[Tuple[str, nn.BatchNorm1d]]:
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, nn.BatchNorm1d) and m.track_running_stats
            and m.running_mean is not None]


class _BNStats:
    """Forward pre-hooks collecting the per-channel mean/std of every BatchNorm input."""

    def __init__(self, model: nn.Module) -> None:
        self.stats: Dict[str, Tuple[torch.Tensor, torch.Tensor, nn.BatchNorm1d]] = {}
        self.handles = []
        for name, bn in _bn_modules(model):
            self.handles.append(bn.register_forward_pre_hook(self._hook(name, bn)))

    def _hook(self, name, bn):
        def hook(mod, args):
            x = args[0]
            dims = (0, 2) if x.dim() == 3 else (0,)
            mean = x.mean(dim=dims)
            var = x.var(dim=dims, unbiased=False)
            self.stats[name] = (mean, torch.sqrt(var + bn.eps), bn)
        return hook

    def loss(self) -> torch.Tensor:
        total = None
        for mean, std, bn in self.stats.values():
            l = torch.linalg.norm(mean - bn.running_mean) + torch.linalg.norm(
                std - torch.sqrt(bn.running_var + bn.eps))
            total = l if total is None else total + l
        if total is None:
            raise ValueError("the model has no BatchNorm with running statistics; zero-shot "
                             "calibration needs them (use --cuts with real data)")
        return total

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def _feature_prior(model: nn.Module, feat_dim: int) -> Tuple[torch.Tensor, torch.Tensor]:
    bn = getattr(model, "input_bn", None)
    if isinstance(bn, nn.BatchNorm1d) and bn.running_mean is not None:
        return (bn.running_mean.detach().clone(),
                torch.sqrt(bn.running_var.detach() + bn.eps))
    return (torch.full((feat_dim,), FBANK_PRIOR_MEAN), torch.full((feat_dim,), FBANK_PRIOR_STD))


@torch.no_grad()
def bn_statistics_loss(model: nn.Module, x: torch.Tensor) -> float:
    """The BatchNorm-statistics loss of features ``x`` (N, T, F) (no smoothness term)."""
    was = model.training
    model.eval()
    st = _BNStats(model)
    try:
        with _ActsOff(model):
            model(x)
        return float(st.loss())
    finally:
        st.close()
        model.train(was)


def synthesize_features(
    model: nn.Module,
    num_utts: int = 8,
    frames: int = 200,
    steps: int = 300,
    lr: float = 0.05,
    tv_weight: float = 0.01,
    seed: int = 0,
    log_every: int = 50,
) -> Tuple[torch.Tensor, Dict[str, Any]]:
    """Zero-shot calibration features for ``model`` (see the module docstring).

    Returns:
      ``(features, info)``: float32 (num_utts, frames, feat_dim) and a dict with
      ``initial_bn_loss``, ``final_bn_loss``, ``history`` (bn loss every ``log_every`` steps),
      ``steps``, ``seconds``.
    """
    feat_dim = model.config.feat_dim if hasattr(model, "config") else model.feat_dim
    for name, v, lo in (("num_utts", num_utts, 1), ("frames", frames, 1), ("steps", steps, 0)):
        if not isinstance(v, int) or v < lo:
            raise ValueError(f"synthesize_features: {name} must be an int >= {lo}, got {v!r}")
    gen = torch.Generator().manual_seed(seed)
    mean, std = _feature_prior(model, feat_dim)
    x0 = mean + std * torch.randn(num_utts, frames, feat_dim, generator=gen)
    x = x0.clone().requires_grad_(True)
    was = model.training
    model.eval()
    req = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in req:
        p.requires_grad_(False)
    st = _BNStats(model)
    t0 = time.time()
    history = []
    opt = torch.optim.Adam([x], lr=lr)
    inv_std = (1.0 / std).detach()
    try:
        with _ActsOff(model):
            with torch.no_grad():
                model(x)
                initial = float(st.loss())
            history.append((0, initial))
            for step in range(1, steps + 1):
                opt.zero_grad()
                model(x)
                bn_loss = st.loss()
                loss = bn_loss
                if tv_weight > 0:
                    tv = ((x[:, 1:] - x[:, :-1]).abs() * inv_std).mean()
                    loss = loss + tv_weight * tv
                loss.backward()
                opt.step()
                if step % log_every == 0 or step == steps:
                    history.append((step, float(bn_loss.detach())))
                    log.info("zero-shot step %d/%d: bn loss %.4f", step, steps, float(bn_loss))
            with torch.no_grad():
                model(x)
                final = float(st.loss())
    finally:
        st.close()
        for p, r in req:
            p.requires_grad_(r)
        model.train(was)
    info = {"initial_bn_loss": initial, "final_bn_loss": final, "history": history,
            "steps": steps, "seconds": time.time() - t0, "num_utts": num_utts,
            "frames": frames, "lr": lr, "tv_weight": tv_weight, "seed": seed}
    return x.detach(), info


# ----------------------------------------------------------------------------------------
# activation ranges
# ----------------------------------------------------------------------------------------
class _Observer:
    def __init__(self, max_samples: int, gen: torch.Generator) -> None:
        self.lo = math.inf
        self.hi = -math.inf
        self.samples: List[torch.Tensor] = []
        self.count = 0
        self.max_samples = max_samples
        self.gen = gen

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().to(torch.float32).reshape(-1)
        self.lo = min(self.lo, float(x.min()))
        self.hi = max(self.hi, float(x.max()))
        keep = min(x.numel(), self.max_samples)
        idx = torch.randint(0, x.numel(), (keep,), generator=self.gen)
        self.samples.append(x[idx])
        self.count += keep

    def sample(self) -> torch.Tensor:
        s = torch.cat(self.samples)
        if s.numel() > 4 * self.max_samples:
            idx = torch.randint(0, s.numel(), (4 * self.max_samples,), generator=self.gen)
            s = s[idx]
        return s


def _point_modules(model: nn.Module) -> Dict[str, Tuple[nn.Module, bool]]:
    """point -> (module, use input (pre-hook) instead of output)."""
    pts: Dict[str, Tuple[nn.Module, bool]] = {"input": (model.tdnn1, True),
                                              "tdnn1": (model.tdnn1, False)}
    for i, layer in enumerate(model.tdnnfs):
        pts[f"tdnnfs.{i}.linear"] = (layer.linear, False)
        pts[f"tdnnfs.{i}"] = (layer, False)
    pts["prefinal_l"] = (model.prefinal_l, False)
    pts["prefinal_chain.batchnorm1"] = (model.prefinal_chain.batchnorm1, False)
    pts["prefinal_chain.batchnorm2"] = (model.prefinal_chain.batchnorm2, False)
    return pts


@torch.no_grad()
def collect_activation_ranges(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    method: str = "minmax",
    percentile: float = 99.99,
    bits: int = 8,
    max_samples: int = 50000,
    seed: int = 0,
) -> Dict[str, Dict[str, float]]:
    """Per-point activation ranges ``{point: {"lo": ..., "hi": ...}}`` plus ``"spec"``.

    Args:
      model: a TdnnF (float, fake-quant or converted); run in eval mode with activation
        fake-quant disabled.
      batches: float32 feature tensors (N, T, F) (e.g. the zero-shot features, or one
        utterance at a time).
      method: ``minmax`` (exact extremes), ``percentile`` (``percentile`` and
        ``100 - percentile`` of a random subsample) or ``mse`` (clip minimising the squared
        quantisation error of the subsample at ``bits``).
    """
    from k2quant.quant import UniformQuantizer

    if method not in RANGE_METHODS:
        raise ValueError(f"range method must be one of {list(RANGE_METHODS)}, got {method!r}")
    gen = torch.Generator().manual_seed(seed)
    pts = _point_modules(model)
    obs = {p: _Observer(max_samples, gen) for p in pts}
    handles = []
    for p, (mod, use_input) in pts.items():
        if use_input:
            handles.append(mod.register_forward_pre_hook(
                lambda m, args, p=p: obs[p].update(args[0])))
        else:
            handles.append(mod.register_forward_hook(
                lambda m, args, out, p=p: obs[p].update(out)))
    was = model.training
    model.eval()
    n = 0
    try:
        with _ActsOff(model):
            for x in batches:
                model(x)
                n += 1
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    if n == 0:
        raise ValueError("collect_activation_ranges: no calibration batches")
    out: Dict[str, Any] = {}
    for p in activation_points(len(model.tdnnfs)):
        o = obs[p]
        lo, hi = o.lo, o.hi
        if method != "minmax":
            q = UniformQuantizer(bits, symmetric=False, signed=False, range_method=method,
                                 percentile=percentile)
            l, h = q.batch_range(o.sample())
            lo, hi = max(lo, float(l)), min(hi, float(h))
        out[p] = {"lo": float(lo), "hi": float(hi)}
    out["spec"] = model.model_spec() if hasattr(model, "model_spec") else None
    return out


def point_bits_from_plan(model: nn.Module, plan, default: int = 8) -> Dict[str, int]:
    """Activation bits per point from a :class:`k2quant.plan.Plan`: a point gets the
    ``act_bits`` of the layer that consumes it (``default`` where the plan has none)."""
    n = len(model.tdnnfs)
    consumer = {"input": "tdnn1.affine",
                "tdnn1": "tdnnfs.0.linear" if n else "prefinal_l",
                "prefinal_l": "prefinal_chain.affine",
                "prefinal_chain.batchnorm1": "prefinal_chain.linear",
                "prefinal_chain.batchnorm2": "output"}
    for i in range(n):
        consumer[f"tdnnfs.{i}.linear"] = f"tdnnfs.{i}.affine"
        consumer[f"tdnnfs.{i}"] = f"tdnnfs.{i + 1}.linear" if i + 1 < n else "prefinal_l"
    bits = {}
    for p, layer in consumer.items():
        cfg = plan.config_for(layer) if plan is not None else None
        b = getattr(cfg, "act_bits", None) if cfg is not None else None
        bits[p] = int(b) if b is not None else default
    return bits


def calibrate_model(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    method: str = "minmax",
    act_bits: int = 8,
    point_bits: Optional[Mapping[str, int]] = None,
    weight_bits: int = 8,
    percentile: float = 99.99,
    backend: str = "auto",
) -> Tuple[IntTdnnF, Dict[str, Any]]:
    """Collect ranges on ``batches`` and build the integer engine. Returns
    ``(engine, ranges)``; ``ranges`` is JSON-able (with the per-point bits)."""
    ranges = collect_activation_ranges(model, batches, method, percentile, act_bits)
    bits = dict(point_bits or {})
    for p in activation_points(len(model.tdnnfs)):
        ranges[p]["bits"] = int(bits.get(p, act_bits))
    engine = IntTdnnF.from_model(model, ranges, act_bits=act_bits, weight_bits=weight_bits,
                                 backend=backend)
    return engine, ranges


def load_cut_features(cuts_path, max_utts: int = 32, max_frames: int = 1000) -> List[torch.Tensor]:
    """Real calibration features: the first ``max_utts`` cuts of a lhotse manifest, each as a
    (1, T, F) float32 tensor cropped to ``max_frames`` frames (needs lhotse)."""
    try:
        from lhotse import CutSet
    except ImportError as e:  # pragma: no cover - core env without lhotse
        raise ValueError("--cuts needs lhotse (pip install lhotse); or use --zero-shot") from e
    out = []
    for cut in CutSet.from_file(cuts_path):
        if len(out) >= max_utts:
            break
        if not cut.has_features:
            raise ValueError(f"{cuts_path}: cut {cut.id} has no features; run compute-fbank first")
        f = torch.as_tensor(cut.load_features(), dtype=torch.float32)[:max_frames]
        out.append(f[None])
    if not out:
        raise ValueError(f"{cuts_path}: no cuts")
    return out
