"""Per-layer quantization (and bottleneck) sensitivity of a float model.

A *layer* is one quantizable weight module (:func:`k2quant.plan.quantizable_layers`), e.g.
``tdnnfs.3.linear`` and ``tdnnfs.3.affine`` are two layers. Its *weights* are the module's
floating-point parameters whose names do not start with ``bias`` (``weight``; for an LSTM
``weight_ih_l*`` / ``weight_hh_l*``); ``n_i`` counts their elements. Everything is computed on
a few hundred utterances through two user functions, so the same code serves the acoustic
model (LF-MMI) and the LM (cross entropy):

* ``loss_fn(model, batch) -> 0-d tensor`` (preferably normalised per frame/token);
* ``forward_fn(model, batch) -> log-probs/logits (..., C)`` or ``(log-probs, mask)`` with a
  bool ``mask`` of shape ``(...)`` selecting the valid frames (default
  :func:`default_forward`: ``model(batch)``, ``model(batch[0])`` or ``model(batch["inputs"])``).

Scores, for every layer ``i`` and candidate bit width ``b`` (the layer quantized alone with
its configured weight quantizer, weight-only, everything else float):

``hawq``
    ``Omega_i(b) = Tr(H_i) / n_i * ||Q_b(W_i) - W_i||^2`` (HAWQ-V3), ``Tr(H_i)`` the trace of the
    loss Hessian w.r.t. the layer's weights, by Hutchinson: ``mean_j v_j^T H_i v_j`` with
    Rademacher ``v_j`` restricted to the layer (GUIDE section 4).
``kl``
    mean per frame of ``KL(p_fp32 || p_quantized)`` of the output posteriors.
``loss``
    mean over batches of ``loss_fn(quantized) - loss_fn(fp32)``.
``mse`` (optional)
    the same as ``hawq`` with the curvature of the output-MSE loss
    ``1/(2F) sum ||f(W) - f(W_fp32)||^2`` (arXiv 2111.14479): its Hessian at the float weights is
    the Gauss-Newton matrix ``J^T J / F`` whose trace is estimated as ``E ||J v||^2 / F`` with
    ``J v`` by central differences of the outputs (forward passes only, no double backward).

Hessian-vector products come from double backprop (``autograd``: ``torch.autograd.grad`` with
``create_graph=True``) or, for losses without a usable second derivative, from central
differences in the model's *output* (``fd``, :func:`_fd_hvp`): ``H v = J^T H_l J v + sum_k
gamma_k f_k'' v`` with the loss curvature ``H_l J v`` as ``(gamma(f + eps J v) - gamma(f - eps
J v)) / (2 eps)``, ``eps = fd_eps * ||f|| / ||J v||``, and everything else (``J v``, ``J^T``,
the network's own curvature) by double backprop through the network. Central differences of
*weight* gradients do not work on ReLU networks: a step large enough for float32 moves many
pre-activations across 0, whose gradient jumps then dominate the quotient (measured on a
TDNN-F layer: 5.7 by weight differences vs 0.022 exact, in float32 and float64 alike); output
differences never move a weight. k2's second derivative through ``get_tot_scores`` is missing
(GUIDE section 3), so ``hvp="auto"`` compares both on the first batch (:func:`check_hvp`) and
uses autograd only if they agree within ``hvp_tol`` (relative error) on every checked layer,
else FD.

TDNN-F bottleneck candidates (``dims``): for factored pair ``tdnnfs.k`` and dimension ``d``
the model is deep-copied and re-factorised with
:func:`k2quant.models.tdnnf.refactor_bottleneck`. The re-factorised layer equals the original
one with the affine weight ``A_eq = A' M`` (``M = L' L^+`` maps the old bottleneck onto the new
one), so its perturbation is ``||A_eq - A||^2`` in the affine's own parameter space and the
Hessian proxy is ``Tr(H_affine) / n_affine * ||A_eq - A||^2``; ``kl`` and ``loss`` are
measured on the re-factorised model. The pair's two layers are also scored at every bit width
*on top of* dimension ``d`` (entries ``(layer, b, d)``): ``hawq``/``mse`` with the layer's
curvature density at the original dimension and the quantization error of the re-factorised
weight; ``kl``/``loss`` measured against the re-factorised float model when
``measure_dim_bits=True``, otherwise estimated as ``score(layer, b) * pert(layer, b, d) /
pert(layer, b)`` (flagged ``estimated``). The allocator adds the dim and bit terms
(additive-sensitivity assumption).

Results form a :class:`SensitivityTable` (JSON, atomic). :func:`compute_sensitivity` with
``cache_path`` reuses a cached table if the model weights (fingerprint), the data and the
settings are unchanged; otherwise it logs a warning and recomputes.
"""
import copy
import dataclasses
import hashlib
import itertools
import json
import logging
import math
import os
import re
from contextlib import contextmanager, nullcontext as _nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from k2quant.plan import LayerConfig, Plan, quantizable_layers
from k2quant.utils.io import atomic_write_json

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]
LossFn = Callable[[nn.Module, Any], Tensor]
ForwardFn = Callable[[nn.Module, Any], Any]
QuantizerSpec = Union[str, LayerConfig, Plan]

__all__ = [
    "DEFAULT_BITS",
    "FLOAT_BITS",
    "METRICS",
    "HvpCheck",
    "LayerInfo",
    "SensitivityEntry",
    "SensitivityTable",
    "check_hvp",
    "compute_sensitivity",
    "default_forward",
    "hessian_vector_product",
    "hutchinson_trace",
    "layer_traces",
    "layer_weight_params",
    "model_fingerprint",
    "quantize_layer_weights",
]

#: Default candidate weight bit widths.
DEFAULT_BITS = (1, 2, 3, 4, 6, 8)
#: Bit width recorded for float (dimension-only) entries.
FLOAT_BITS = 32
#: Score names of a :class:`SensitivityEntry`.
METRICS = ("hawq", "kl", "loss", "mse")
TABLE_FORMAT = "k2quant-sensitivity"
TABLE_VERSION = 1
#: How ``hvp="fd"`` differentiates (part of the cache key: tables computed with central
#: differences of weight gradients, wrong on ReLU networks, are recomputed).
FD_METHOD = "output-differences"


# =============================================================================================
# Small helpers
# =============================================================================================
def default_forward(model: nn.Module, batch: Any) -> Tensor:
    """``model(batch)`` for a tensor, ``model(batch[0])`` for a tuple/list,
    ``model(batch[key])`` for a dict with key ``inputs``, ``features``, ``x`` or ``tokens``."""
    if isinstance(batch, Tensor):
        return model(batch)
    if isinstance(batch, Mapping):
        for key in ("inputs", "features", "x", "tokens"):
            if key in batch:
                return model(batch[key])
        raise ValueError(
            f"default_forward: a dict batch needs one of the keys inputs/features/x/tokens, got "
            f"{sorted(batch)}; pass forward_fn=lambda model, batch: ... to compute_sensitivity"
        )
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        return model(batch[0])
    raise ValueError(
        f"default_forward: cannot find the model input in a batch of type "
        f"{type(batch).__name__}; pass forward_fn=lambda model, batch: ..."
    )


def _batch_size(batch: Any) -> int:
    """Utterances in a batch: ``batch["num_utterances"]`` or the leading dim of its input."""
    if isinstance(batch, Mapping) and "num_utterances" in batch:
        return int(batch["num_utterances"])
    if isinstance(batch, Tensor):
        return int(batch.shape[0]) if batch.dim() else 1
    if isinstance(batch, Mapping):
        for key in ("inputs", "features", "x", "tokens"):
            if isinstance(batch.get(key), Tensor):
                return _batch_size(batch[key])
    if isinstance(batch, (tuple, list)) and batch:
        return _batch_size(batch[0])
    return 1


def _update_hash(h: "hashlib._Hash", obj: Any) -> None:
    if isinstance(obj, Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(obj, Mapping):
        for k in sorted(obj, key=str):
            h.update(f"K{k}".encode())
            _update_hash(h, obj[k])
    elif isinstance(obj, (list, tuple)):
        h.update(f"L{len(obj)}".encode())
        for x in obj:
            _update_hash(h, x)
    elif isinstance(obj, (str, int, float, bool)) or obj is None:
        h.update(repr(obj).encode())
    else:  # objects we cannot hash reproducibly (e.g. lhotse cuts): their repr
        h.update(repr(type(obj)).encode())


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 (first 20 hex digits) of the model's state dict: names, dtypes, shapes, bytes."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        _update_hash(h, t)
    return h.hexdigest()[:20]


def _data_fingerprint(batches: Sequence[Any]) -> str:
    h = hashlib.sha256()
    _update_hash(h, list(batches))
    return h.hexdigest()[:20]


def layer_weight_params(module: nn.Module) -> Dict[str, nn.Parameter]:
    """The layer's quantizable weights: float parameters not named ``bias*`` (see module doc)."""
    return {
        n: p
        for n, p in module.named_parameters(recurse=False)
        if p.is_floating_point() and not n.startswith("bias")
    }


def _float_params(module: nn.Module) -> int:
    """Elements of the layer's float parameters that stay float (biases)."""
    w = set(layer_weight_params(module))
    return sum(p.numel() for n, p in module.named_parameters(recurse=False)
               if p.is_floating_point() and n not in w)


def _stored_bytes(t: Tensor) -> float:
    """Bytes the packed format stores for a raw tensor (constant tensors: one element)."""
    n = t.numel()
    if n > 1 and bool((t.reshape(-1) == t.reshape(-1)[0]).all()):
        n = 1
    return float(n * t.element_size())


def _layer_config(quantizer: QuantizerSpec, name: str, bits: int) -> LayerConfig:
    """The weight-only LayerConfig used to quantize layer ``name`` at ``bits``."""
    if isinstance(quantizer, str):
        base = LayerConfig(weight_quantizer=quantizer)
    elif isinstance(quantizer, LayerConfig):
        base = quantizer
    elif isinstance(quantizer, Plan):
        base = quantizer.config_for(name) or LayerConfig()
    else:
        raise ValueError(
            f"quantizer must be a quantizer kind (str), a LayerConfig or a Plan; received "
            f"{type(quantizer).__name__}: {quantizer!r}"
        )
    return dataclasses.replace(base, weight_bits=bits, act_bits=None, locations={})


def _describe_quantizer(quantizer: QuantizerSpec) -> Any:
    if isinstance(quantizer, str):
        return quantizer
    if isinstance(quantizer, LayerConfig):
        return quantizer.to_dict()
    return quantizer.to_dict()


@torch.no_grad()
def quantize_layer_weights(
    module: nn.Module, name: str, config: LayerConfig
) -> Tuple[Dict[str, Tensor], float]:
    """Quantize-dequantize one float layer's weights with ``config`` (weight-only).

    The layer is copied, wrapped by its :mod:`k2quant.nn` class, frozen (eval mode, exactly
    what :func:`k2quant.plan.convert` stores) and turned back into floats.

    Returns:
      ``(weights, overhead_bytes)``: ``{param name: dequantized float tensor}`` for the
      parameters of :func:`layer_weight_params`, and the bytes of the quantization metadata
      the packed format stores for the layer (scales, zero points, codebooks; constant
      tensors count one element).
    """
    from k2quant.nn import quant_class_for

    cfg = dataclasses.replace(config, act_bits=None)
    float_copy = copy.deepcopy(module)
    qm = quant_class_for(float_copy).from_float(float_copy, cfg, name=name)
    qm.eval()
    qm.freeze()
    overhead = sum(
        _stored_bytes(buf)
        for bname, buf in qm.named_buffers(recurse=False)
        if bname.endswith(("_scale", "_zero_point", "_codebook"))
    )
    fm = qm.to_float()
    weights = {n: getattr(fm, n).detach().clone() for n in layer_weight_params(module)}
    return weights, overhead


@contextmanager
def _swapped(module: nn.Module, new: Mapping[str, Tensor]) -> Iterator[None]:
    """Temporarily overwrite ``module``'s parameters ``new`` (values restored exactly)."""
    saved = {}
    with torch.no_grad():
        for n, t in new.items():
            p = getattr(module, n)
            saved[n] = p.detach().clone()
            p.copy_(t)
    try:
        yield
    finally:
        with torch.no_grad():
            for n, t in saved.items():
                getattr(module, n).copy_(t)


def _sqdist(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> float:
    return float(sum(float((a[n].double() - b[n].detach().double()).pow(2).sum()) for n in a))


def _check_loss(loss: Any) -> Tensor:
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        raise ValueError(
            "loss_fn(model, batch) must return a scalar (0-d) tensor; got "
            + (f"a tensor of shape {tuple(loss.shape)}" if isinstance(loss, Tensor)
               else type(loss).__name__)
        )
    if not torch.isfinite(loss.detach()).all():
        raise ValueError(f"loss_fn(model, batch) returned a non-finite loss {float(loss)}")
    return loss.reshape(())


def _rademacher(like: Sequence[Tensor], gen: torch.Generator) -> List[Tensor]:
    return [
        (torch.randint(0, 2, p.shape, generator=gen, dtype=torch.int64).to(p.dtype) * 2 - 1).to(p.device)
        for p in like
    ]


def _dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> float:
    return float(sum(float((x.double() * y.double()).sum()) for x, y in zip(a, b)))


def _norm(a: Sequence[Tensor]) -> float:
    return math.sqrt(sum(float(x.double().pow(2).sum()) for x in a))


# =============================================================================================
# Hessian-vector products and Hutchinson traces
# =============================================================================================
def _grads(
    model: nn.Module, loss_fn: LossFn, batch: Any, params: Sequence[Tensor], create_graph: bool
) -> Tuple[Tensor, List[Tensor]]:
    with torch.enable_grad():
        loss = _check_loss(loss_fn(model, batch))
        if not loss.requires_grad:
            raise ValueError(
                "loss_fn(model, batch) returned a loss that does not require grad; it must be "
                "computed from the model's parameters (do not wrap it in torch.no_grad())"
            )
        gs = torch.autograd.grad(loss, list(params), create_graph=create_graph, allow_unused=True)
    return loss, [torch.zeros_like(p) if g is None else g for p, g in zip(params, gs)]


def _float_tensors(out: Any) -> List[Tensor]:
    """The floating-point tensors of a model output (a tensor, or tuples/lists/dicts of them)."""
    if isinstance(out, Tensor):
        return [out] if out.is_floating_point() else []
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _float_tensors(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in _float_tensors(o)]
    return []


def _replace_float_tensors(out: Any, new: Iterator[Tensor]) -> Any:
    """``out`` with its floating-point tensors replaced, in :func:`_float_tensors` order."""
    if isinstance(out, Tensor):
        return next(new) if out.is_floating_point() else out
    if isinstance(out, (tuple, list)):
        return type(out)(_replace_float_tensors(o, new) for o in out)
    if isinstance(out, dict):
        return type(out)((k, _replace_float_tensors(o, new)) for k, o in out.items())
    return out


def _loss_at_output(model: nn.Module, loss_fn: LossFn, batch: Any,
                    replace: Optional[Sequence[Tensor]] = None,
                    structure: Any = None) -> Tuple[Tensor, List[Tensor], Any]:
    """``loss_fn(model, batch)`` recording the floating-point tensors of the model's output
    (a forward hook), or, with ``replace``, with ``model(...)`` returning ``structure`` (an
    earlier output) with those tensors replaced, without running the network.

    Returns (loss, the output's floating-point tensors, the output)."""
    seen: List[Any] = []

    def hook(module, inputs, out):
        seen.append(out)

    if replace is not None:
        def forward(*args, **kwargs):
            out = _replace_float_tensors(structure, iter(replace))
            seen.append(out)
            return out

        own = model.__dict__.get("forward")  # an instance-level forward to restore, if any
        model.forward = forward  # an instance attribute: nn.Module.__call__ calls it
        handle = None
    else:
        handle = model.register_forward_hook(hook)
    try:
        with torch.enable_grad():
            loss = _check_loss(loss_fn(model, batch))
    finally:
        if handle is not None:
            handle.remove()
        elif own is not None:
            model.forward = own
        else:
            del model.forward
    if len(seen) != 1 or not _float_tensors(seen[0]):
        raise ValueError(
            "hvp='fd' differentiates the loss with respect to the output of model(...): "
            f"loss_fn(model, batch) must call the model exactly once (it called it "
            f"{len(seen)} time(s)) and the model must return floating-point tensors; use "
            f"hvp='autograd' for other losses"
        )
    return loss, (list(replace) if replace is not None else _float_tensors(seen[0])), seen[0]


def _fd_hvp(
    model: nn.Module, loss_fn: LossFn, batch: Any, params: Sequence[Tensor],
    vs: Sequence[Tensor], fd_eps: float, check_output_only: bool = False,
) -> List[Tensor]:
    """``H v`` with the loss's curvature by central differences in the model's *output*.

    For ``L(w) = l(f(w))`` (``f`` the model output, ``gamma = dl/df``, ``J = df/dw``)::

        H v = J^T H_l (J v) + sum_k gamma_k (d^2 f_k / dw^2) v

    The first term is ``J^T (gamma(f + eps u) - gamma(f - eps u)) / (2 eps)`` with
    ``u = J v`` and ``eps = fd_eps * ||f|| / ||u||`` (the weights never move, so ReLU kinks
    are never crossed and float32 suffices: ``l`` is smooth in ``f``; the network is not even
    run for these two loss evaluations); ``J v``, ``J^T`` and
    the second term come from double backprop through the network alone (plain torch ops),
    never through the loss. So ``l`` only needs a correct first derivative (k2's
    ``get_tot_scores`` has no second one). The loss must depend on the parameters only
    through ``model(...)`` (``check_output_only`` verifies that ``dL/dw == J^T gamma``).
    """
    params = list(params)
    loss, fs, structure = _loss_at_output(model, loss_fn, batch)
    fs_used = [f for f in fs if f.requires_grad]
    if not fs_used:
        raise ValueError("hvp='fd': the model output does not depend on the parameters")
    gam = torch.autograd.grad(loss, fs_used, retain_graph=True, allow_unused=True)
    gam = [torch.zeros_like(f) if g is None else g.detach() for f, g in zip(fs_used, gam)]
    if check_output_only:
        full = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        via = torch.autograd.grad(fs_used, params, grad_outputs=gam, retain_graph=True,
                                  allow_unused=True)
        full = [torch.zeros_like(p) if g is None else g for p, g in zip(params, full)]
        via = [torch.zeros_like(p) if g is None else g for p, g in zip(params, via)]
        diff, ref = _norm([a - b for a, b in zip(full, via)]), _norm(full)
        if diff > 1e-3 * max(ref, 1e-30):
            raise ValueError(
                f"hvp='fd': the loss depends on the parameters other than through the model's "
                f"output (|dL/dw - J^T dL/df| = {diff:.3g} vs |dL/dw| = {ref:.3g}, e.g. a "
                f"weight penalty inside loss_fn); use hvp='autograd'"
            )
    # one double-backward pass through the network: d<J^T r, v>/dr = J v and, at r = gamma,
    # d<J^T r, v>/dw = sum_k gamma_k (d^2 f_k/dw^2) v
    rs = [g.clone().requires_grad_(True) for g in gam]
    jtr = torch.autograd.grad(fs_used, params, grad_outputs=rs, create_graph=True,
                              allow_unused=True)
    pairs = [(g, v) for g, v in zip(jtr, vs) if g is not None and g.requires_grad]
    nr = len(rs)
    if pairs:
        outs = torch.autograd.grad([g for g, _ in pairs], rs + params,
                                   grad_outputs=[v for _, v in pairs], retain_graph=True,
                                   allow_unused=True)
    else:
        outs = [None] * (nr + len(params))
    us = [torch.zeros_like(f) if o is None else o.detach() for f, o in zip(fs_used, outs[:nr])]
    hv = [torch.zeros_like(p) if o is None else o.detach()
          for p, o in zip(params, outs[nr:])]
    un = _norm(us)
    if un > 0:
        fn = _norm([f.detach() for f in fs_used])
        eps = fd_eps * (fn if fn > 0 else 1.0) / un
        diffs = []
        for sign in (1.0, -1.0):
            moved = [(f.detach() + sign * eps * u).requires_grad_(True)
                     for f, u in zip(fs_used, us)]
            # outputs that do not depend on the parameters are left as they are
            it = iter(moved)
            replace = [next(it) if f.requires_grad else f.detach() for f in fs]
            loss_s, _, _ = _loss_at_output(model, loss_fn, batch, replace, structure)
            g_s = torch.autograd.grad(loss_s, moved, allow_unused=True)
            diffs.append([torch.zeros_like(m) if g is None else g.detach()
                          for m, g in zip(moved, g_s)])
        dgam = [(a - b) / (2.0 * eps) for a, b in zip(*diffs)]
        gn = torch.autograd.grad(fs_used, params, grad_outputs=dgam, allow_unused=True)
        hv = [h if g is None else h + g.detach() for h, g in zip(hv, gn)]
    del jtr, outs, loss
    return hv


def _autograd_hvp_from(grads: Sequence[Tensor], params: Sequence[Tensor],
                       vs: Sequence[Tensor]) -> List[Tensor]:
    """``H v`` restricted to ``params`` from gradients built with ``create_graph=True``."""
    gs = [g for g in grads if g.requires_grad]
    if not gs:  # the loss is (at most) linear in these parameters
        return [torch.zeros_like(p) for p in params]
    vv = [v for g, v in zip(grads, vs) if g.requires_grad]
    hv = torch.autograd.grad(gs, list(params), grad_outputs=vv, retain_graph=True,
                             allow_unused=True)
    return [torch.zeros_like(p) if h is None else h.detach() for p, h in zip(params, hv)]


def hessian_vector_product(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    params: Sequence[Tensor],
    vs: Sequence[Tensor],
    method: str = "autograd",
    fd_eps: float = 1e-3,
) -> List[Tensor]:
    """``H v`` of ``loss_fn(model, batch)`` w.r.t. ``params`` (the other parameters fixed).

    Args:
      params: parameters of ``model`` (leaf tensors requiring grad).
      vs: one tensor per parameter (same shapes).
      method: ``"autograd"`` (double backprop) or ``"fd"`` (the loss curvature by central
        differences in the model output, ``eps = fd_eps * ||f|| / ||J v||``; see
        :func:`_fd_hvp`; ``loss_fn`` must call ``model`` once and depend on the parameters
        only through its output).

    Returns:
      one tensor per parameter (detached).
    """
    params = list(params)
    vs = [v.to(p.dtype) for p, v in zip(params, vs)]
    if method == "autograd":
        _, g = _grads(model, loss_fn, batch, params, create_graph=True)
        return _autograd_hvp_from(g, params, vs)
    if method == "fd":
        return _fd_hvp(model, loss_fn, batch, params, vs, fd_eps)
    raise ValueError(f"hessian_vector_product: method must be 'autograd' or 'fd', got {method!r}")


def hutchinson_trace(
    hvp: Callable[[List[Tensor]], List[Tensor]],
    like: Sequence[Tensor],
    n_samples: int = 8,
    generator: Optional[torch.Generator] = None,
    basis: bool = False,
) -> Tuple[float, float, int]:
    """Estimate ``Tr(H)`` from Hessian-vector products.

    Args:
      hvp: ``vs -> H vs`` for a list of tensors shaped like ``like``.
      like: the parameter tensors (shapes, dtypes, devices).
      n_samples: Rademacher probes (``Tr(H) ~ mean_j v_j^T H v_j``).
      generator: RNG for the probes.
      basis: use every unit vector instead (exact, ``numel`` products; for small tests).

    Returns:
      ``(trace, std_error, num_products)``; ``std_error`` is the standard error of the mean
      (0 for ``basis=True`` or a single probe).
    """
    like = list(like)
    if basis:
        total = 0.0
        count = 0
        for i, p in enumerate(like):
            for k in range(p.numel()):
                vs = [torch.zeros_like(q) for q in like]
                vs[i].view(-1)[k] = 1.0
                total += _dot(vs, hvp(vs))
                count += 1
        return total, 0.0, count
    if n_samples < 1:
        raise ValueError(f"hutchinson_trace: n_samples must be >= 1, got {n_samples}")
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    vals = []
    for _ in range(n_samples):
        vs = _rademacher(like, gen)
        vals.append(_dot(vs, hvp(vs)))
    mean = sum(vals) / len(vals)
    if len(vals) > 1:
        var = sum((x - mean) ** 2 for x in vals) / (len(vals) - 1)
        se = math.sqrt(var / len(vals))
    else:
        se = 0.0
    return mean, se, n_samples


@dataclass
class HvpCheck:
    """Result of :func:`check_hvp`.

    ``rel_err = ||Hv_autograd - Hv_fd|| / max(||Hv_autograd||, ||Hv_fd||)`` (worst over the
    probes); ``vhv_*`` = ``v^T H v`` of the first probe; ``autograd_error`` holds the exception
    text if double backprop raised (then ``rel_err`` is inf); ``ok = rel_err <= tol``.
    """

    layer: str
    rel_err: float
    vhv_autograd: float
    vhv_fd: float
    norm_autograd: float
    norm_fd: float
    tol: float
    ok: bool
    autograd_error: Optional[str] = None

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        for k, v in d.items():
            if isinstance(v, float) and not math.isfinite(v):
                d[k] = repr(v)
        return d


def _resolve_layer(model: nn.Module, layer: Union[str, nn.Module]) -> Tuple[str, nn.Module]:
    layers = quantizable_layers(model)
    if isinstance(layer, nn.Module):
        for n, m in layers.items():
            if m is layer:
                return n, m
        raise ValueError("check_hvp: the given module is not a quantizable layer of the model")
    if layer not in layers:
        raise ValueError(
            f"unknown layer {layer!r}; quantizable layers of the model are: {list(layers)}"
        )
    return layer, layers[layer]


def check_hvp(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    layer: Union[str, nn.Module],
    n_vectors: int = 1,
    fd_eps: float = 1e-3,
    tol: float = 0.05,
    seed: int = 0,
) -> HvpCheck:
    """Compare double-backprop and finite-difference Hessian-vector products on one layer.

    Rademacher probes restricted to the layer's weights (:func:`layer_weight_params`). The
    model's train/eval mode is left as it is (use eval mode so BatchNorm/dropout are fixed).
    Autograd failures (an op without a double backward) are caught and reported.
    """
    name, module = _resolve_layer(model, layer)
    params = list(layer_weight_params(module).values())
    gen = torch.Generator().manual_seed(seed)
    probes = [_rademacher(params, gen) for _ in range(max(1, n_vectors))]
    fds = [_fd_hvp(model, loss_fn, batch, params, vs, fd_eps, check_output_only=(j == 0))
           for j, vs in enumerate(probes)]
    ags: List[Optional[List[Tensor]]] = [None] * len(probes)
    err = None
    try:
        _, grads = _grads(model, loss_fn, batch, params, create_graph=True)
        for j, vs in enumerate(probes):
            ags[j] = _autograd_hvp_from(grads, params, vs)
        del grads
    except RuntimeError as e:
        err = f"{type(e).__name__}: {e}"
    vs0, hf0, ha0 = probes[0], fds[0], ags[0]
    vhv_f, nf = _dot(vs0, hf0), _norm(hf0)
    if err is not None:
        return HvpCheck(name, math.inf, math.nan, vhv_f, math.nan, nf, tol, False, err)
    worst = 0.0
    for ha, hf in zip(ags, fds):
        diff = _norm([a - b for a, b in zip(ha, hf)])
        denom = max(_norm(ha), _norm(hf))
        worst = max(worst, diff / denom if denom > 0 else 0.0)
    vhv_a, na = _dot(vs0, ha0), _norm(ha0)
    return HvpCheck(name, worst, vhv_a, vhv_f, na, nf, tol, bool(worst <= tol), err)


def layer_traces(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Sequence[Any],
    layers: Sequence[str],
    method: str = "autograd",
    n_samples: int = 8,
    fd_eps: float = 1e-3,
    seed: int = 0,
    probes: str = "layer",
) -> Dict[str, Tuple[float, float]]:
    """Hutchinson ``Tr(H_i)`` of every layer, averaged over ``batches``.

    ``probes="layer"`` (default, GUIDE section 4): Rademacher probes restricted to one layer at
    a time. With autograd one forward/backward (``create_graph=True``) per batch serves every
    layer; FD costs two forward/backward passes per probe *and layer*.
    ``probes="joint"``: one probe over all layers at once, ``Tr(H_i) ~ v_i^T (H v)_i`` (the
    cross terms have zero mean): the same cost for all layers together (FD: two passes per
    probe), at the price of a larger variance.

    Returns ``{layer: (trace, std_error)}``.
    """
    if method not in ("autograd", "fd"):
        raise ValueError(f"layer_traces: method must be 'autograd' or 'fd', got {method!r}")
    if probes not in ("layer", "joint"):
        raise ValueError(f"layer_traces: probes must be 'layer' or 'joint', got {probes!r}")
    mods = quantizable_layers(model)
    params = {n: list(layer_weight_params(mods[n]).values()) for n in layers}
    flat = [p for n in layers for p in params[n]]
    spans, k = {}, 0
    for n in layers:
        spans[n] = (k, k + len(params[n]))
        k += len(params[n])
    gen = torch.Generator().manual_seed(seed)
    sums: Dict[str, List[float]] = {n: [] for n in layers}
    for batch in batches:
        grads = None
        if method == "autograd":
            _, grads = _grads(model, loss_fn, batch, flat, create_graph=True)
        if probes == "joint":
            for _ in range(n_samples):
                vs = _rademacher(flat, gen)
                if method == "autograd":
                    hv = _autograd_hvp_from(grads, flat, vs)
                else:
                    hv = _fd_hvp(model, loss_fn, batch, flat, vs, fd_eps)
                for n in layers:
                    a, b = spans[n]
                    sums[n].append(_dot(vs[a:b], hv[a:b]))
        else:
            for n in layers:
                a, b = spans[n]
                for _ in range(n_samples):
                    vs = _rademacher(params[n], gen)
                    if method == "autograd":
                        hv = _autograd_hvp_from(grads[a:b], params[n], vs)
                    else:
                        hv = _fd_hvp(model, loss_fn, batch, params[n], vs, fd_eps)
                    sums[n].append(_dot(vs, hv))
        del grads
    out = {}
    for n, vals in sums.items():
        m = sum(vals) / len(vals)
        var = sum((x - m) ** 2 for x in vals) / (len(vals) - 1) if len(vals) > 1 else 0.0
        out[n] = (m, math.sqrt(var / len(vals)))
    return out


# =============================================================================================
# Output-based measurements (KL, loss increase, output-MSE curvature)
# =============================================================================================
def _outputs(forward_fn: ForwardFn, model: nn.Module, batch: Any) -> Tuple[Tensor, Optional[Tensor]]:
    out = forward_fn(model, batch)
    mask = None
    if isinstance(out, (tuple, list)):
        if len(out) != 2:
            raise ValueError(
                "forward_fn must return log-probs (..., C) or a pair (log-probs, mask); got a "
                f"sequence of length {len(out)}"
            )
        out, mask = out
    if not isinstance(out, Tensor) or out.dim() < 1:
        raise ValueError(f"forward_fn must return a tensor (..., C); got {type(out).__name__}")
    logp = torch.log_softmax(out.detach().double(), dim=-1)
    if mask is not None:
        mask = mask.to(torch.bool)
        if mask.shape != logp.shape[:-1]:
            raise ValueError(
                f"forward_fn's mask must have shape {tuple(logp.shape[:-1])} (the output "
                f"without its last dim); got {tuple(mask.shape)}"
            )
    return logp, mask


def _kl_sum(ref: Tensor, mask: Optional[Tensor], logq: Tensor) -> Tuple[float, int]:
    if ref.shape != logq.shape:
        raise ValueError(
            f"the perturbed model's output has shape {tuple(logq.shape)}, the float model's "
            f"{tuple(ref.shape)}; forward_fn must give outputs of the same shape"
        )
    kl = (ref.exp() * (ref - logq)).sum(-1)
    if mask is not None:
        kl = kl[mask]
    return float(kl.sum()), int(kl.numel())


class _Reference:
    """Float-model outputs and losses per batch, cached in memory up to ``max_bytes``."""

    def __init__(self, model, batches, forward_fn, loss_fn, need_out, need_loss, max_bytes):
        self.model, self.batches = model, batches
        self.forward_fn, self.loss_fn = forward_fn, loss_fn
        self.need_out, self.need_loss = need_out, need_loss
        self.max_bytes = max_bytes
        self.cached_bytes = 0
        self._out: Dict[int, Tuple[Tensor, Optional[Tensor]]] = {}
        self._loss: Dict[int, float] = {}

    @torch.no_grad()
    def get(self, i: int) -> Tuple[Optional[Tuple[Tensor, Optional[Tensor]]], Optional[float]]:
        out = loss = None
        if self.need_out:
            out = self._out.get(i)
            if out is None:
                out = _outputs(self.forward_fn, self.model, self.batches[i])
                nbytes = out[0].numel() * out[0].element_size()
                if self.cached_bytes + nbytes <= self.max_bytes:
                    self._out[i] = out
                    self.cached_bytes += nbytes
        if self.need_loss:
            loss = self._loss.get(i)
            if loss is None:
                loss = float(_check_loss(self.loss_fn(self.model, self.batches[i])))
                self._loss[i] = loss
        return out, loss


@torch.no_grad()
def _measure(model_q: nn.Module, ref: _Reference, need_kl: bool, need_loss: bool,
             perturb: Optional[Callable[[], Any]] = None) -> Tuple[Optional[float], Optional[float]]:
    """Mean per-frame KL(ref || model_q) and mean loss increase over the reference batches.

    ``perturb()`` returns a context manager applied around each perturbed evaluation only
    (the reference outputs are computed outside it).
    """
    kl_sum, frames, dl = 0.0, 0, []
    for i, batch in enumerate(ref.batches):
        r, lossr = ref.get(i)
        with (perturb() if perturb is not None else _nullcontext()):
            logq = _outputs(ref.forward_fn, model_q, batch)[0] if need_kl else None
            lossq = float(_check_loss(ref.loss_fn(model_q, batch))) if need_loss else None
        if need_kl:
            s, f = _kl_sum(r[0], r[1], logq)
            kl_sum += s
            frames += f
        if need_loss:
            dl.append(lossq - lossr)
    kl = kl_sum / max(frames, 1) if need_kl else None
    loss = sum(dl) / len(dl) if need_loss else None
    return kl, loss


@torch.no_grad()
def _mse_traces(model, forward_fn, batches, layers, n_samples, fd_eps, seed) -> Dict[str, float]:
    """``Tr(J_i^T J_i) / F`` per layer by Hutchinson with central differences of the outputs."""
    mods = quantizable_layers(model)
    gen = torch.Generator().manual_seed(seed + 1)
    out: Dict[str, float] = {}
    for n in layers:
        params = list(layer_weight_params(mods[n]).values())
        saved = [p.detach().clone() for p in params]
        vals = []
        wn = _norm(saved)
        for batch in batches:
            for _ in range(n_samples):
                vs = _rademacher(params, gen)
                eps = fd_eps * (wn if wn > 0 else 1.0) / max(_norm(vs), 1e-30)
                try:
                    for p, s, v in zip(params, saved, vs):
                        p.copy_(s).add_(v, alpha=eps)
                    fp, mask = _outputs(forward_fn, model, batch)
                    for p, s, v in zip(params, saved, vs):
                        p.copy_(s).add_(v, alpha=-eps)
                    fm, _ = _outputs(forward_fn, model, batch)
                finally:
                    for p, s in zip(params, saved):
                        p.copy_(s)
                jv = (fp - fm) / (2.0 * eps)
                sq = jv.pow(2).sum(-1)
                if mask is not None:
                    sq = sq[mask]
                vals.append(float(sq.sum()) / max(sq.numel(), 1))
        out[n] = sum(vals) / len(vals)
    return out


# =============================================================================================
# The table
# =============================================================================================
@dataclass
class SensitivityEntry:
    """Scores of one ``(layer, bits, dim)``.

    ``layer``: a quantizable layer (quantization entry) or a TDNN-F pair name such as
    ``tdnnfs.3`` (bottleneck entry, ``bits = FLOAT_BITS``). ``dim``: ``None`` for the model's
    own bottleneck, else the candidate dimension of the layer's pair. ``n_params``: quantized
    weight elements (at that dim); ``float_params``: elements kept float (biases);
    ``overhead_bytes``: quantization metadata; ``perturbation``: ``||dW||^2``; scores as in the
    module docstring (``None`` if not computed); ``estimated``: ``kl``/``loss`` scaled rather
    than measured.
    """

    layer: str
    bits: int
    dim: Optional[int]
    n_params: int
    float_params: int = 0
    overhead_bytes: float = 0.0
    perturbation: float = 0.0
    hawq: Optional[float] = None
    kl: Optional[float] = None
    loss: Optional[float] = None
    mse: Optional[float] = None
    estimated: bool = False

    @property
    def key(self) -> Tuple[str, int, Optional[int]]:
        return (self.layer, self.bits, self.dim)

    def size_bytes(self) -> float:
        """Bytes of the layer at these bits: ``n b / 8 + overhead + 4 * float_params``."""
        if self.bits >= FLOAT_BITS:
            return 4.0 * (self.n_params + self.float_params)
        return self.n_params * self.bits / 8.0 + self.overhead_bytes + 4.0 * self.float_params

    def score(self, metric: str) -> float:
        if metric not in METRICS:
            raise ValueError(f"unknown sensitivity metric {metric!r}; choose one of {list(METRICS)}")
        v = getattr(self, metric)
        if v is None:
            raise ValueError(
                f"the sensitivity table has no {metric!r} score for layer {self.layer!r} "
                f"bits={self.bits} dim={self.dim}; recompute it with metrics including "
                f"{metric!r}"
            )
        return float(v)


@dataclass
class LayerInfo:
    """Per-layer facts: weight elements ``n_params`` (``shapes`` of its weight tensors),
    ``float_params``, ``trace`` (Hutchinson ``Tr(H)``) and its standard error ``trace_se``,
    ``trace_mse`` (output-MSE curvature trace), and for TDNN-F pair members the ``pair`` name
    and ``role`` (``linear``/``affine``)."""

    name: str
    n_params: int
    float_params: int
    shapes: Dict[str, List[int]] = field(default_factory=dict)
    trace: Optional[float] = None
    trace_se: Optional[float] = None
    trace_mse: Optional[float] = None
    pair: Optional[str] = None
    role: Optional[str] = None


def _jsonable(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return repr(x)
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def _unjson_float(x: Any) -> Any:
    if isinstance(x, str) and x in ("inf", "-inf", "nan"):
        return float(x)
    return x


@dataclass
class SensitivityTable:
    """Sensitivities of one model (see the module docstring).

    Attributes:
      layers: ``{layer name: LayerInfo}`` in model order.
      entries: ``{(layer, bits, dim): SensitivityEntry}``.
      pairs: ``{pair name: {"linear": name, "affine": name, "dim": current, "dims": [...]}}``
        for TDNN-F pairs with bottleneck candidates.
      other_float_params: parameters outside the quantizable layers (kept float).
      fingerprint: :func:`model_fingerprint` of the model the table was computed on.
      data_fingerprint, settings_key: identify the batches and the settings (cache checks).
      num_utterances, num_batches: the data used.
      method: how it was computed (hvp method and its check, probes, quantizer, metrics).
    """

    layers: Dict[str, LayerInfo]
    entries: Dict[Tuple[str, int, Optional[int]], SensitivityEntry]
    pairs: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    other_float_params: int = 0
    fingerprint: str = ""
    data_fingerprint: str = ""
    settings_key: str = ""
    num_utterances: int = 0
    num_batches: int = 0
    method: Dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ queries
    def get(self, layer: str, bits: int, dim: Optional[int] = None) -> SensitivityEntry:
        """The entry of ``(layer, bits, dim)``; the pair's current dim is the same as ``None``."""
        if dim is not None:
            info = self.layers.get(layer)
            pair = info.pair if info is not None else layer
            if pair in self.pairs and dim == self.pairs[pair]["dim"]:
                dim = None
        try:
            return self.entries[(layer, bits, dim)]
        except KeyError:
            raise ValueError(
                f"the sensitivity table has no entry for layer={layer!r} bits={bits} dim={dim}; "
                f"bit widths for this layer: {self.bits_for(layer)}"
                + (f", dims: {self.dims_for(layer)}" if self.dims_for(layer) else "")
            ) from None

    def score(self, layer: str, bits: int, dim: Optional[int] = None, metric: str = "hawq") -> float:
        """Sensitivity of quantizing ``layer`` at ``bits`` (on top of bottleneck ``dim``);
        for a pair name and ``bits=FLOAT_BITS`` the cost of the bottleneck ``dim`` itself
        (0 for the current dim)."""
        if layer in self.pairs and bits == FLOAT_BITS and (dim is None or dim == self.pairs[layer]["dim"]):
            return 0.0
        return self.get(layer, bits, dim).score(metric)

    def bits_for(self, layer: str) -> List[int]:
        return sorted({b for (n, b, d) in self.entries if n == layer and d is None and b != FLOAT_BITS})

    def dims_for(self, layer_or_pair: str) -> List[int]:
        info = self.layers.get(layer_or_pair)
        pair = info.pair if info is not None else layer_or_pair
        return list(self.pairs[pair]["dims"]) if pair in self.pairs else []

    @property
    def layer_names(self) -> List[str]:
        return list(self.layers)

    @property
    def fp32_bytes(self) -> float:
        """Bytes of the float model: 4 per parameter (quantizable layers and the rest)."""
        n = sum(i.n_params + i.float_params for i in self.layers.values()) + self.other_float_params
        return 4.0 * n

    def check_model(self, model: nn.Module) -> None:
        """Raise ``ValueError`` naming the table's layers that ``model`` lacks."""
        have = set(quantizable_layers(model))
        missing = [n for n in self.layers if n not in have]
        if missing:
            raise ValueError(
                f"the sensitivity table names layers the model lacks: {missing}; the model's "
                f"quantizable layers are {sorted(have)}. Was the table computed on another model?"
            )

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> Dict[str, Any]:
        return _jsonable({
            "format": TABLE_FORMAT,
            "version": TABLE_VERSION,
            "fingerprint": self.fingerprint,
            "data_fingerprint": self.data_fingerprint,
            "settings_key": self.settings_key,
            "num_utterances": self.num_utterances,
            "num_batches": self.num_batches,
            "method": self.method,
            "other_float_params": self.other_float_params,
            "layers": [dataclasses.asdict(i) for i in self.layers.values()],
            "pairs": self.pairs,
            "entries": [dataclasses.asdict(e) for e in self.entries.values()],
        })

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "SensitivityTable":
        if not isinstance(d, Mapping) or d.get("format") != TABLE_FORMAT:
            raise ValueError(
                f"not a k2quant sensitivity table (expected format={TABLE_FORMAT!r}); received "
                f"{str(d)[:200]}"
            )
        if d.get("version") != TABLE_VERSION:
            raise ValueError(
                f"unsupported sensitivity table version {d.get('version')!r}; this k2quant reads "
                f"version {TABLE_VERSION}: recompute the table"
            )
        layers = {}
        for x in d["layers"]:
            layers[x["name"]] = LayerInfo(**{k: _unjson_float(v) for k, v in x.items()})
        entries = {}
        for x in d["entries"]:
            e = SensitivityEntry(**{k: _unjson_float(v) for k, v in x.items()})
            entries[e.key] = e
        return cls(
            layers=layers, entries=entries, pairs=dict(d.get("pairs", {})),
            other_float_params=int(d.get("other_float_params", 0)),
            fingerprint=d.get("fingerprint", ""), data_fingerprint=d.get("data_fingerprint", ""),
            settings_key=d.get("settings_key", ""), num_utterances=int(d.get("num_utterances", 0)),
            num_batches=int(d.get("num_batches", 0)), method=dict(d.get("method", {})),
        )

    def save(self, path: PathLike) -> None:
        """Write the table as JSON (atomic rename)."""
        atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: PathLike) -> "SensitivityTable":
        with open(path, "r", encoding="utf-8") as f:
            try:
                d = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: not a JSON sensitivity table ({e})") from None
        return cls.from_dict(d)


# =============================================================================================
# compute_sensitivity
# =============================================================================================
def _select_layers(model: nn.Module, layers: Optional[Sequence[str]]) -> List[str]:
    from k2quant.nn import QuantModule

    all_layers = quantizable_layers(model)
    quant = [n for n, m in all_layers.items() if isinstance(m, QuantModule)]
    if quant:
        raise ValueError(
            f"compute_sensitivity needs the float model; these layers are already quantized: "
            f"{quant[:10]}. Compute sensitivities before quantize_()."
        )
    names = list(all_layers)
    if layers is None:
        return [n for n in names if layer_weight_params(all_layers[n])]
    out, unknown = [], []
    for key in layers:
        if key.startswith("re:"):
            pat = re.compile(key[3:])
            hit = [n for n in names if pat.fullmatch(n)]
        else:
            hit = [key] if key in all_layers else []
        if not hit:
            unknown.append(key)
        out.extend(h for h in hit if h not in out)
    if unknown:
        raise ValueError(
            f"unknown layer(s) {unknown}: they name no quantizable layer of the model; "
            f"quantizable layers are {names}"
        )
    return [n for n in names if n in out]


def _pair_dims(model: nn.Module, dims: Any, selected: Sequence[str]) -> Dict[str, Dict[str, Any]]:
    """``{pair: {"linear", "affine", "dim", "dims"}}`` for the requested bottleneck candidates."""
    if dims is None:
        return {}
    if not hasattr(model, "factored_pairs") or not hasattr(model, "refactor_bottleneck"):
        raise ValueError(
            f"dims (bottleneck candidates) need a TDNN-F model with factored_pairs() and "
            f"refactor_bottleneck(); got {type(model).__name__}"
        )
    pairs = {}
    mods = quantizable_layers(model)
    all_pairs = {lin.rsplit(".", 1)[0]: (lin, aff) for lin, aff in model.factored_pairs()}
    if isinstance(dims, Mapping):
        unknown = [p for p in dims if p not in all_pairs]
        if unknown:
            raise ValueError(
                f"dims names unknown TDNN-F layers {unknown}; the model's are {list(all_pairs)}"
            )
        wanted = dict(dims)
    else:
        wanted = {p: dims for p in all_pairs}
    for p, ds in wanted.items():
        lin, aff = all_pairs[p]
        if lin not in selected or aff not in selected:
            continue
        cur = int(layer_weight_params(mods[lin])["weight"].shape[0])
        cand = sorted({int(d) for d in ds})
        bad = [d for d in cand if d < 1 or d > cur]
        if bad:
            raise ValueError(
                f"bottleneck candidates for {p} must be in 1..{cur} (its current dim); got {bad}"
            )
        pairs[p] = {"linear": lin, "affine": aff, "dim": cur, "dims": sorted(set(cand) | {cur})}
    return pairs


def _equivalent_affine_delta(orig_pair: nn.Module, new_pair: nn.Module) -> Tensor:
    """``A_eq - A`` for a re-factorised pair, in the original affine's layout."""
    L = orig_pair.linear.weight.detach().double()
    A = orig_pair.affine.weight.detach().double()
    L2 = new_pair.linear.weight.detach().double()
    A2 = new_pair.affine.weight.detach().double()
    B, D, k = L.shape
    r = L2.shape[0]
    Lm, L2m = L.reshape(B, D * k), L2.reshape(r, D * k)
    M = L2m @ torch.linalg.pinv(Lm)  # (r, B): L' = M L
    A_cat = A.permute(2, 0, 1).reshape(k * D, B)
    A2_cat = A2.permute(2, 0, 1).reshape(k * D, r)
    return (A2_cat @ M - A_cat)


def compute_sensitivity(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Any],
    *,
    bits: Sequence[int] = DEFAULT_BITS,
    dims: Union[None, Sequence[int], Mapping[str, Sequence[int]]] = None,
    layers: Optional[Sequence[str]] = None,
    quantizer: QuantizerSpec = "uniform",
    metrics: Sequence[str] = ("hawq", "kl", "loss"),
    forward_fn: Optional[ForwardFn] = None,
    hvp: str = "auto",
    n_samples: int = 8,
    probes: str = "layer",
    fd_eps: float = 1e-3,
    hvp_tol: float = 0.05,
    hvp_check_layers: int = 3,
    measure_dim_bits: bool = False,
    max_batches: Optional[int] = None,
    seed: int = 0,
    cache_path: Optional[PathLike] = None,
    recompute: bool = False,
    ref_cache_bytes: int = 1 << 30,
) -> SensitivityTable:
    """Compute (or load from ``cache_path``) the :class:`SensitivityTable` of a float model.

    Args:
      model: the float model (not yet ``quantize_``-d). Evaluated in eval mode (restored after).
      loss_fn: ``loss_fn(model, batch) -> 0-d tensor`` (LF-MMI, cross entropy, ...).
      batches: the data, e.g. a few hundred utterances; materialised as a list (first
        ``max_batches``). Iterated several times.
      bits: candidate weight bit widths (each in 1..8).
      dims: bottleneck candidates for TDNN-F pairs: a list (every pair) or ``{"tdnnfs.3":
        [64, 96], ...}``; ``None`` = no bottleneck search.
      layers: layer names or ``re:`` patterns to score (default every quantizable layer).
      quantizer: the weight quantizer: a kind (``"uniform"``, ``"lsq"``, ...), a
        :class:`LayerConfig` (kind, granularity, options) or a :class:`Plan` (each layer's own
        config; unmatched layers use ``LayerConfig()``); ``weight_bits`` is set per candidate.
      metrics: any of ``hawq``, ``kl``, ``loss``, ``mse``.
      forward_fn: model outputs for KL/MSE (default :func:`default_forward`).
      hvp: ``"auto"`` | ``"autograd"`` | ``"fd"`` (see the module docstring).
      n_samples: Hutchinson probes per batch and layer.
      probes: ``"layer"`` (probes restricted to each layer) or ``"joint"`` (one probe over all
        layers, ``len(layers)`` times cheaper with FD, noisier); see :func:`layer_traces`.
      fd_eps: relative step of the output-space differences of ``hvp="fd"`` (:func:`_fd_hvp`).
      hvp_tol: relative-error tolerance of the autograd-vs-FD check (``hvp="auto"``).
      hvp_check_layers: number of layers checked (first, last and evenly spaced ones).
      measure_dim_bits: measure ``kl``/``loss`` of every ``(layer, bits, dim)`` (else scaled).
      seed: RNG seed of the probes.
      cache_path: JSON cache; reused if fingerprint, data and settings match, else
        recomputed (a warning says why) and rewritten.
      recompute: ignore an existing cache.
      ref_cache_bytes: memory for caching the float model's outputs (else recomputed).

    Returns:
      The table; ``table.method["hvp"]`` is the HVP method used and
      ``table.method["hvp_check"]`` the check results.
    """
    bits = sorted({int(b) for b in bits})
    bad_bits = [b for b in bits if not 1 <= b <= 8]
    if not bits or bad_bits:
        raise ValueError(f"bits must be a non-empty list of ints in 1..8; got {bits}")
    metrics = list(dict.fromkeys(metrics))
    unknown_m = [m for m in metrics if m not in METRICS]
    if unknown_m or not metrics:
        raise ValueError(f"unknown metrics {unknown_m}; choose from {list(METRICS)}")
    if hvp not in ("auto", "autograd", "fd"):
        raise ValueError(f"hvp must be 'auto', 'autograd' or 'fd'; got {hvp!r}")
    if probes not in ("layer", "joint"):
        raise ValueError(f"probes must be 'layer' or 'joint'; got {probes!r}")
    forward_fn = forward_fn or default_forward
    batches = list(itertools.islice(iter(batches), max_batches))
    if not batches:
        raise ValueError("compute_sensitivity: no batches; pass a non-empty iterable of batches")
    names = _select_layers(model, layers)
    pairs = _pair_dims(model, dims, names)
    n_utts = sum(_batch_size(b) for b in batches)

    fingerprint = model_fingerprint(model)
    data_fp = _data_fingerprint(batches)
    settings = dict(
        bits=bits, pairs={p: v["dims"] for p, v in pairs.items()}, layers=names,
        quantizer=_describe_quantizer(quantizer), metrics=metrics, hvp=hvp,
        n_samples=n_samples, probes=probes, fd_eps=fd_eps, hvp_tol=hvp_tol, seed=seed,
        measure_dim_bits=measure_dim_bits, num_batches=len(batches),
        fd_method=FD_METHOD,
    )
    settings_key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:20]

    if cache_path is not None and os.path.exists(cache_path) and not recompute:
        try:
            cached = SensitivityTable.load(cache_path)
        except (ValueError, KeyError, TypeError) as e:
            logger.warning("sensitivity cache %s is unreadable (%s); recomputing", cache_path, e)
        else:
            if cached.fingerprint != fingerprint:
                logger.warning(
                    "sensitivity cache %s is stale: it was computed for model weights %s, the "
                    "model now has %s; recomputing", cache_path, cached.fingerprint, fingerprint,
                )
            elif cached.data_fingerprint != data_fp:
                logger.warning("sensitivity cache %s was computed on other data; recomputing",
                               cache_path)
            elif cached.settings_key != settings_key:
                logger.warning("sensitivity cache %s was computed with other settings; "
                               "recomputing", cache_path)
            else:
                logger.info("sensitivity: using the cached table %s", cache_path)
                return cached

    was_training = model.training
    model.eval()
    try:
        table = _compute(
            model, loss_fn, batches, names, pairs, bits, quantizer, metrics, forward_fn, hvp,
            n_samples, probes, fd_eps, hvp_tol, hvp_check_layers, measure_dim_bits, seed,
            ref_cache_bytes,
        )
    finally:
        model.train(was_training)
    table.fingerprint = fingerprint
    table.data_fingerprint = data_fp
    table.settings_key = settings_key
    table.num_utterances = n_utts
    table.num_batches = len(batches)
    table.method.update(quantizer=settings["quantizer"], metrics=metrics, n_samples=n_samples,
                        probes=probes,
                        fd_eps=fd_eps, seed=seed, bits=bits)
    if cache_path is not None:
        table.save(cache_path)
    return table


def _compute(model, loss_fn, batches, names, pairs, bits, quantizer, metrics, forward_fn, hvp,
             n_samples, probes, fd_eps, hvp_tol, hvp_check_layers, measure_dim_bits, seed,
             ref_cache_bytes) -> SensitivityTable:
    mods = quantizable_layers(model)
    role_of = {}
    for p, v in pairs.items():
        role_of[v["linear"]] = (p, "linear")
        role_of[v["affine"]] = (p, "affine")
    infos: Dict[str, LayerInfo] = {}
    for n in names:
        w = layer_weight_params(mods[n])
        infos[n] = LayerInfo(
            name=n, n_params=sum(p.numel() for p in w.values()),
            float_params=_float_params(mods[n]),
            shapes={k: list(p.shape) for k, p in w.items()},
            pair=role_of.get(n, (None, None))[0], role=role_of.get(n, (None, None))[1],
        )
    in_layers = {id(p) for n in names for p in mods[n].parameters(recurse=False)}
    other = sum(p.numel() for p in model.parameters()
                if id(p) not in in_layers and p.is_floating_point())
    method: Dict[str, Any] = {}

    # ---- Hessian traces
    want_hawq = "hawq" in metrics
    if want_hawq:
        chosen = hvp
        if hvp == "auto":
            k = max(1, min(hvp_check_layers, len(names)))
            idx = sorted({round(i * (len(names) - 1) / max(k - 1, 1)) for i in range(k)})
            checks = [check_hvp(model, loss_fn, batches[0], names[i], fd_eps=fd_eps, tol=hvp_tol,
                                seed=seed) for i in idx]
            method["hvp_check"] = [c.to_dict() for c in checks]
            chosen = "autograd" if all(c.ok for c in checks) else "fd"
            if chosen == "fd":
                worst = max(checks, key=lambda c: c.rel_err)
                logger.warning(
                    "sensitivity: autograd Hessian-vector products disagree with finite "
                    "differences (layer %s: relative error %.3g > %.3g%s); using FD",
                    worst.layer, worst.rel_err, hvp_tol,
                    f", autograd error: {worst.autograd_error}" if worst.autograd_error else "",
                )
        method["hvp"] = chosen
        traces = layer_traces(model, loss_fn, batches, names, chosen, n_samples, fd_eps, seed,
                              probes=probes)
        for n, (t, se) in traces.items():
            infos[n].trace, infos[n].trace_se = t, se
        negative = [n for n, (t, _) in traces.items() if t < 0]
        if negative:
            logger.warning(
                "sensitivity: negative Hessian trace for %s (the model is not at a minimum of "
                "the loss, e.g. untrained); their hawq scores are negative", negative,
            )
    if "mse" in metrics:
        for n, t in _mse_traces(model, forward_fn, batches, names, n_samples, fd_eps, seed).items():
            infos[n].trace_mse = t

    def density(n: str, kind: str) -> Optional[float]:
        t = infos[n].trace if kind == "hawq" else infos[n].trace_mse
        return None if t is None else t / max(infos[n].n_params, 1)

    need_kl, need_loss = "kl" in metrics, "loss" in metrics
    ref = _Reference(model, batches, forward_fn, loss_fn, need_kl, need_loss, ref_cache_bytes)
    entries: Dict[Tuple[str, int, Optional[int]], SensitivityEntry] = {}

    def make_entry(layer_name, b, dim, module, name_for_cfg, info_name, measure_model, ref_):
        cfg = _layer_config(quantizer, name_for_cfg, b)
        w_orig = layer_weight_params(module)
        wq, overhead = quantize_layer_weights(module, name_for_cfg, cfg)
        pert = _sqdist(wq, w_orig)
        e = SensitivityEntry(
            layer=layer_name, bits=b, dim=dim, n_params=sum(p.numel() for p in w_orig.values()),
            float_params=_float_params(module), overhead_bytes=overhead, perturbation=pert,
        )
        dh, dm = density(info_name, "hawq"), density(info_name, "mse")
        e.hawq = None if dh is None else dh * pert
        e.mse = None if dm is None else dm * pert
        if measure_model is not None and (need_kl or need_loss):
            e.kl, e.loss = _measure(measure_model, ref_, need_kl, need_loss,
                                    perturb=lambda: _swapped(module, wq))
        return e

    # ---- quantization entries at the model's own dims
    for n in names:
        for b in bits:
            e = make_entry(n, b, None, mods[n], n, n, model, ref)
            entries[e.key] = e
        logger.info("sensitivity: %s done", n)

    # ---- bottleneck candidates
    for p, v in pairs.items():
        idx = model.tdnnf_layer_names().index(p)
        for d in v["dims"]:
            if d == v["dim"]:
                continue
            m_d = copy.deepcopy(model)
            m_d.eval()
            m_d.refactor_bottleneck(idx, d)
            delta = _equivalent_affine_delta(model.get_submodule(p), m_d.get_submodule(p))
            pert = float(delta.pow(2).sum())
            aff = v["affine"]
            e = SensitivityEntry(layer=p, bits=FLOAT_BITS, dim=d, n_params=0, perturbation=pert)
            dh, dm = density(aff, "hawq"), density(aff, "mse")
            e.hawq = None if dh is None else dh * pert
            e.mse = None if dm is None else dm * pert
            if need_kl or need_loss:
                e.kl, e.loss = _measure(m_d, ref, need_kl, need_loss)
            entries[e.key] = e
            mods_d = quantizable_layers(m_d)
            ref_d = (_Reference(m_d, batches, forward_fn, loss_fn, need_kl, need_loss,
                                ref_cache_bytes) if measure_dim_bits else None)
            for n in (v["linear"], v["affine"]):
                for b in bits:
                    qe = make_entry(n, b, d, mods_d[n], n, n,
                                    m_d if measure_dim_bits else None, ref_d)
                    if not measure_dim_bits:
                        base = entries[(n, b, None)]
                        r = qe.perturbation / base.perturbation if base.perturbation > 0 else 1.0
                        qe.kl = None if base.kl is None else base.kl * r
                        qe.loss = None if base.loss is None else base.loss * r
                        qe.estimated = need_kl or need_loss
                    entries[qe.key] = qe
            del m_d
            logger.info("sensitivity: %s dim %d done", p, d)
    return SensitivityTable(layers=infos, entries=entries, pairs=pairs,
                            other_float_params=int(other), method=method)
