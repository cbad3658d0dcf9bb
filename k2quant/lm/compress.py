"""Mixed-precision compression of the Transformer LM (``k2quant compress-lm``).

:func:`compress_lm` takes a float LM checkpoint (``k2quant train-lm``) to a packed low-bit file
``lm.k2q`` through the same machinery as the acoustic model:

1. **Sensitivity** of every quantizable LM layer (``embed`` -- which is also the tied output
   layer --, ``layers.N.self_attn.{q,k,v,out}_proj``, ``layers.N.ff1``, ``layers.N.ff2``) at
   every candidate width, by :func:`k2quant.search.sensitivity.compute_sensitivity` on a sample
   of the training text, with the LM loss:

   * ``method="kl"``: mean per predicted token of ``KL(p_fp32 || p_q)`` between the next-token
     distributions of the float LM and of the LM with that one layer quantized;
   * ``method="hessian"``: HAWQ-V3 ``Tr(H_i) / n_i * ||Q_b(W_i) - W_i||^2`` with the Hutchinson
     trace of the cross-entropy Hessian. HVPs by double backprop (``hvp="autograd"``, the
     default here): the LM is pure torch, so the second derivative is exact (the GUIDE's
     caution concerns k2). The sensitivity module's ``hvp="auto"`` check against finite
     differences fails on the float32 LM and would pick FD, which is the inaccurate one:
     measured on the AN4 LM in float64, FD matches autograd to 1e-9 only with a step of
     1e-6..1e-8 x ||w|| (the tied embedding needs 1e-7), while the default 1e-3 step in float32
     is off by 65-100% (ReLU kinks and rounding);
   * ``method="nas"``: no table: the differentiable mixed-precision search of
     :func:`k2quant.search.nas.search_mixed_precision` on the cross-entropy loss;
   * ``method="uniform"``: every layer at one width (the baseline).

2. **Allocation** (:func:`k2quant.search.allocate.allocate`, exact ILP): one width per layer
   under the budget. Budgets: ``avg_bits`` (average width of the quantized weights,
   ``sum n_i b_i / sum n_i``), or an on-disk budget ``ratio`` / ``size_bytes``. On-disk budgets
   are checked against the *real* packed file. The allocator's size model is
   ``sum_i (n_i b_i / 8 + overhead_i(b_i) + 4 * biases_i) + 4 * other float parameters``; the
   sensitivity table's ``overhead_i(b)`` (scales and zero points) is replaced by every byte the
   packed format stores for the layer besides codes and biases, including the quantizers' own
   state (an LSQ quantizer keeps its learned per-channel step next to the frozen scale: 4 more
   bytes per output channel; a per-channel General Quantizer keeps ``2**b`` centroids per
   channel). The plan is then exported once to a temporary file (:func:`packed_file_bytes`);
   if the file (header included) misses the target, the allocator's budget is lowered by the
   unmodelled bytes and the ILP re-solved. NAS (whose size model counts scales only) gets the
   same correction loop.

3. **QAT** (:func:`qat_finetune`): ``quantize_`` with the plan (``lsq`` by default, ``general``
   -- the mu-law General Quantizer, temperature annealed to hard assignment -- as option),
   initialised from the float weights, fine-tuned on the training text with the LM
   cross-entropy, optionally mixed with distillation from the float LM:
   ``loss = (1 - distill) * CE + distill * KL(p_fp32 || p_q)`` per token.

4. **Export**: ``convert`` + :func:`k2quant.export.save_packed` -> ``out_dir/lm.k2q``;
   the file is re-loaded (:func:`k2quant.models.transformer_lm.load_lm`, i.e.
   :func:`k2quant.export.load_packed`) and its held-out perplexity is the reported one (it is
   checked to equal the fake-quant model's).

What stays float: biases of the projections, LayerNorm weights/biases, the output bias and
the per-channel quantization scales (float32). The plan has no bias quantization; for the
small AN4 LM they are ~3% of the 2-bit file (see ``summary["size"]["float_bytes"]``).

Outputs in ``out_dir``: ``lm.k2q``, ``plan.json``, ``allocation.json`` (not for ``uniform``),
``sensitivity-<method>.json`` (cache: reused when model, data and settings are unchanged),
``qat-history.json``, ``summary.json`` (the return value of :func:`compress_lm`) and
``log/log-compress-lm.txt``.

Size definitions (:mod:`k2quant.export.size`): ``fp32_bytes`` = 4 bytes per parameter of
the float LM; ``file_bytes`` = ``os.path.getsize(lm.k2q)``; ``ratio = fp32_bytes / file_bytes``.
"""
import copy
import dataclasses
import json
import logging
import math
import os
import random
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from k2quant.lm.text import EncodedText, make_batches, pad_batch, read_sentences
from k2quant.plan import LayerConfig, Plan, convert, quantizable_layers, quantize_
from k2quant.utils.io import atomic_write_json

log = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]

METHODS = ("kl", "hessian", "nas", "uniform")
QAT_QUANTIZERS = ("lsq", "general", "uniform", "sawb")
DEFAULT_BITS = (1, 2, 3, 4, 8)

__all__ = [
    "METHODS",
    "DEFAULT_BITS",
    "LmCompressConfig",
    "lm_batches",
    "lm_loss",
    "lm_forward",
    "qat_loss",
    "packed_file_bytes",
    "lm_sensitivity",
    "choose_plan",
    "qat_finetune",
    "compress_lm",
]


# =============================================================================================
# Configuration
# =============================================================================================
@dataclass
class LmCompressConfig:
    """Settings of :func:`compress_lm` (JSON-able; written to ``summary.json``).

    Budget: exactly one of ``avg_bits``, ``ratio``, ``size_bytes`` (see the module docstring);
    with ``method="uniform"`` the width is ``uniform_bits`` if given, else ``round(avg_bits)``,
    else the widest candidate whose packed file meets the ratio/size budget.
    """

    avg_bits: Optional[float] = None
    ratio: Optional[float] = None
    size_bytes: Optional[float] = None
    bits: Tuple[int, ...] = DEFAULT_BITS
    method: str = "kl"
    uniform_bits: Optional[int] = None
    quantizer: str = "lsq"              # QAT weight quantizer ("lsq" default, "general", ...)
    granularity: str = "channel"        # "channel" (one scale per output row) or "tensor"
    quantizer_options: Dict[str, Any] = field(default_factory=dict)
    min_bits: Optional[Dict[str, int]] = None   # {layer or "re:...": bits}, e.g. {"embed": 4}
    max_bits: Optional[Dict[str, int]] = None
    # sensitivity
    sens_sentences: int = 256           # training sentences used for the sensitivity
    sens_max_tokens: int = 2000
    hessian_samples: int = 8            # Hutchinson probes per batch and layer
    hvp: str = "autograd"               # Hessian-vector products: "autograd" | "fd" | "auto"
    # NAS
    nas_steps: int = 300
    nas_lr_alpha: float = 0.05
    # QAT
    qat_epochs: int = 10
    qat_lr: float = 5e-4
    qat_warmup_steps: int = 20
    qat_final_lr_factor: float = 0.1    # cosine decay from qat_lr to qat_lr * this
    distill: float = 0.5                # weight of KL(fp32 || quantized) in the QAT loss
    max_tokens: int = 500               # padded tokens per QAT batch
    grad_clip: float = 5.0
    general_t_start: float = 1.0        # General Quantizer: soft-assignment temperature
    general_t_end: float = 1e-3         # annealed over the first 80% of the QAT steps
    text_format: str = "plain"
    seed: int = 42
    device: str = "cpu"
    num_threads: int = 0

    def validate(self) -> None:
        given = [k for k in ("avg_bits", "ratio", "size_bytes") if getattr(self, k) is not None]
        if self.method == "uniform" and self.uniform_bits is not None and not given:
            pass
        elif len(given) != 1:
            raise ValueError(
                f"give exactly one budget of avg_bits / ratio / size_bytes; got {given or 'none'} "
                f"(e.g. avg_bits=2.0, or ratio=12 for 12x smaller than fp32 on disk)"
            )
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {list(METHODS)}; got {self.method!r}")
        bits = list(self.bits)
        if not bits or any(not isinstance(b, int) or isinstance(b, bool) or not 1 <= b <= 8
                           for b in bits):
            raise ValueError(f"bits must be a non-empty list of ints in 1..8; got {bits}")
        if self.uniform_bits is not None and not 1 <= int(self.uniform_bits) <= 8:
            raise ValueError(f"uniform_bits must be in 1..8; got {self.uniform_bits}")
        if self.quantizer not in QAT_QUANTIZERS:
            raise ValueError(
                f"quantizer must be one of {list(QAT_QUANTIZERS)}; got {self.quantizer!r}"
            )
        if self.granularity not in ("channel", "tensor"):
            raise ValueError(f"granularity must be 'channel' or 'tensor'; got {self.granularity!r}")
        if not 0.0 <= float(self.distill) <= 1.0:
            raise ValueError(f"distill must be in [0, 1]; got {self.distill}")
        if self.qat_epochs < 0 or self.qat_lr <= 0 or self.max_tokens < 1:
            raise ValueError(
                f"need qat_epochs >= 0, qat_lr > 0, max_tokens >= 1; got qat_epochs="
                f"{self.qat_epochs}, qat_lr={self.qat_lr}, max_tokens={self.max_tokens}"
            )
        if self.sens_sentences < 1 or self.sens_max_tokens < 1:
            raise ValueError("sens_sentences and sens_max_tokens must be >= 1")
        if self.avg_bits is not None and not 0 < float(self.avg_bits) <= 32:
            raise ValueError(f"avg_bits must be in (0, 32]; got {self.avg_bits}")
        if self.ratio is not None and not float(self.ratio) > 0:
            raise ValueError(f"ratio must be > 0; got {self.ratio}")
        if self.size_bytes is not None and not float(self.size_bytes) > 0:
            raise ValueError(f"size_bytes must be > 0; got {self.size_bytes}")
        if self.hvp not in ("autograd", "fd", "auto"):
            raise ValueError(f"hvp must be 'autograd', 'fd' or 'auto'; got {self.hvp!r}")
        if self.device not in ("cpu", "cuda", "auto"):
            raise ValueError(f"device must be cpu, cuda or auto; got {self.device!r}")

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["bits"] = list(self.bits)
        return d


# =============================================================================================
# LM batches, losses, outputs
# =============================================================================================
def lm_batches(ids: Sequence[Sequence[int]], max_tokens: int, model: nn.Module, *,
               shuffle: bool = False, seed: int = 0) -> List[Dict[str, Tensor]]:
    """Padded LM batches ``{"x", "y", "lengths", "num_utterances"}`` of token-id sentences.

    ``x``/``y``: (N, L) int64 inputs ``[sos, t_1..t_n]`` / targets ``[t_1..t_n, eos]``,
    right-padded with the model's ``pad_id``; ``lengths``: (N,) int64 ``n + 1``.
    """
    out = []
    for idx in make_batches([len(s) + 1 for s in ids], max_tokens, shuffle=shuffle, seed=seed):
        x, y, lengths = pad_batch([ids[i] for i in idx], model.sos_id, model.eos_id, model.pad_id)
        out.append({"x": x, "y": y, "lengths": lengths, "num_utterances": len(idx)})
    return out


def _to(batch: Mapping[str, Any], device) -> Tuple[Tensor, Tensor, Tensor]:
    return batch["x"].to(device), batch["y"].to(device), batch["lengths"].to(device)


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    if p is not None:
        return p.device
    b = next(model.buffers(), None)
    return b.device if b is not None else torch.device("cpu")


def _valid_mask(lengths: Tensor, L: int) -> Tensor:
    return torch.arange(L, device=lengths.device).unsqueeze(0) < lengths.unsqueeze(1)


def _keep_columns(model: nn.Module, V: int, device) -> Tensor:
    """Every vocabulary column but the padding symbol (whose logit is ``-inf``)."""
    keep = torch.ones(V, dtype=torch.bool, device=device)
    keep[model.pad_id] = False
    return keep.nonzero().squeeze(1)


def lm_loss(model: nn.Module, batch: Mapping[str, Any]) -> Tensor:
    """Cross entropy per predicted token (0-d tensor) of an LM batch (:func:`lm_batches`)."""
    x, y, lengths = _to(batch, _device_of(model))
    nll = model(x, y, lengths)
    return nll.sum() / lengths.sum()


def lm_forward(model: nn.Module, batch: Mapping[str, Any]) -> Tuple[Tensor, Tensor]:
    """``(logits, mask)`` for the KL sensitivity: (N, L, V-1) next-token logits without the
    padding column (its ``-inf`` would make ``0 * (-inf - -inf)`` NaN in the KL) and the (N, L)
    bool mask of the predicted positions."""
    x, _, lengths = _to(batch, _device_of(model))
    logits = model.logits(x)
    keep = _keep_columns(model, logits.shape[-1], logits.device)
    return logits.index_select(-1, keep), _valid_mask(lengths, x.shape[1])


class _SharedTable:
    """Within the context, the LM's (quantized) embedding table is fake-quantized once and the
    same tensor serves the input lookup and the tied output layer.

    Without it ``TransformerLM.logits`` runs the embedding's weight quantizer twice per
    forward; the General Quantizer projects its parameters in place at every training-mode
    call, so the second call would invalidate what the first saved for backward. Same values
    and gradients, half the quantizer work."""

    def __init__(self, model: nn.Module):
        self.emb = getattr(model, "embed", None)

    def __enter__(self):
        emb = self.emb
        if emb is not None and callable(getattr(type(emb), "effective_weight", None)):
            w = type(emb).effective_weight(emb)
            emb.effective_weight = lambda: w  # instance attribute shadows the method
        else:
            self.emb = None
        return self

    def __exit__(self, *exc):
        if self.emb is not None:
            del self.emb.effective_weight
        return False


def qat_loss(model: nn.Module, batch: Mapping[str, Any], teacher: Optional[nn.Module] = None,
             distill: float = 0.0) -> Tuple[Tensor, Tensor]:
    """QAT loss of one batch: ``(1 - distill) * CE + distill * KL(p_teacher || p_model)``,
    both per predicted token. Returns ``(loss, ce)`` (``ce`` detached, for logging)."""
    x, y, lengths = _to(batch, _device_of(model))
    mask = _valid_mask(lengths, x.shape[1])
    n_tok = lengths.sum()
    with _SharedTable(model):
        logits = model.logits(x)
    keep = _keep_columns(model, logits.shape[-1], logits.device)
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1),
                         ignore_index=model.pad_id, reduction="sum") / n_tok
    if teacher is None or distill <= 0.0:
        return ce, ce.detach()
    logq = logits.index_select(-1, keep).log_softmax(-1)
    with torch.no_grad():
        logp = teacher.logits(x).index_select(-1, keep).log_softmax(-1)
    kl = (logp.exp() * (logp - logq)).sum(-1)
    kl = kl.masked_fill(~mask, 0.0).sum() / n_tok
    return (1.0 - distill) * ce + distill * kl, ce.detach()


# =============================================================================================
# Sizes on disk
# =============================================================================================
def packed_file_bytes(model: nn.Module, plan: Plan) -> int:
    """Bytes of the packed file (:func:`k2quant.export.save_packed`) of ``model`` quantized with
    ``plan`` (quantizers initialised from the weights, as QAT starts). ``model`` is not
    modified. The learned state (LSQ steps, codebooks) has the same shapes after QAT, so this
    is the size of the final file up to a few header bytes."""
    from k2quant.export import save_packed

    m = quantize_(copy.deepcopy(model), plan)
    convert(m)
    with tempfile.TemporaryDirectory(prefix="k2q-size-") as d:
        path = os.path.join(d, "probe.k2q")
        save_packed(m, path)
        return os.path.getsize(path)


def _fp32_bytes(model: nn.Module) -> int:
    return 4 * sum(p.numel() for p in model.parameters() if p.is_floating_point())


def _target_file_bytes(cfg: LmCompressConfig, fp32_bytes: int) -> Optional[float]:
    if cfg.size_bytes is not None:
        return float(cfg.size_bytes)
    if cfg.ratio is not None:
        return fp32_bytes / float(cfg.ratio)
    return None


# =============================================================================================
# Sensitivity and allocation
# =============================================================================================
def _layer_config(cfg: LmCompressConfig, bits: int) -> LayerConfig:
    return LayerConfig(weight_bits=bits, weight_quantizer=cfg.quantizer,
                       granularity=cfg.granularity, weight_options=dict(cfg.quantizer_options))


def _sensitivity_quantizer(cfg: LmCompressConfig) -> LayerConfig:
    opts = dict(cfg.quantizer_options)
    if cfg.quantizer == "general":
        opts["temperature"] = 0.0  # hard assignment: what the frozen model computes
    return LayerConfig(weight_quantizer=cfg.quantizer, granularity=cfg.granularity,
                       weight_options=opts)


def lm_sensitivity(model: nn.Module, batches: Sequence[Mapping[str, Any]], cfg: LmCompressConfig,
                   cache_path: Optional[PathLike] = None):
    """:class:`~k2quant.search.sensitivity.SensitivityTable` of every quantizable LM layer at
    ``cfg.bits`` with the LM loss: metric ``kl`` (``method="kl"``) or ``hawq``
    (``method="hessian"``), quantizer = the QAT quantizer at its initialisation."""
    from k2quant.search.sensitivity import compute_sensitivity

    metrics = {"kl": ("kl",), "hessian": ("hawq",)}[cfg.method]
    return compute_sensitivity(
        model, lm_loss, batches, bits=sorted(set(cfg.bits)), quantizer=_sensitivity_quantizer(cfg),
        metrics=metrics, forward_fn=lm_forward, n_samples=cfg.hessian_samples, hvp=cfg.hvp,
        seed=cfg.seed,
        cache_path=cache_path,
    )


def _layer_metadata_bytes(module: nn.Module, name: str, config: LayerConfig) -> float:
    """Bytes the packed file stores for layer ``name`` quantized with ``config`` besides its
    codes and float biases: scales, zero points, codebooks *and* the quantizers' own state
    (LSQ steps, General-Quantizer ``u``/``alpha``, flags), constant tensors as one element,
    exactly as :func:`k2quant.export.save_packed` writes them."""
    from k2quant.nn import quant_class_for
    from k2quant.search.sensitivity import _stored_bytes

    float_copy = copy.deepcopy(module)
    qm = quant_class_for(float_copy).from_float(float_copy, config, name=name)
    qm.eval()
    qm.freeze()
    kept = {n for n, p in qm.named_parameters(recurse=False)}  # float params left (biases)
    return float(sum(_stored_bytes(t) for k, t in qm.state_dict().items()
                     if not k.endswith("_codes") and k not in kept))


def _with_file_overheads(table, model: nn.Module, cfg: LmCompressConfig):
    """A copy of the sensitivity table whose entries' ``overhead_bytes`` are the layer's
    metadata bytes in the packed file (:func:`_layer_metadata_bytes`), so that the allocator's
    size model differs from the real file only by the header."""
    table = copy.deepcopy(table)
    mods = quantizable_layers(model)
    for (layer, b, dim), e in table.entries.items():
        if dim is None and layer in mods and b <= 8:
            e.overhead_bytes = _layer_metadata_bytes(mods[layer], layer, _layer_config(cfg, b))
    return table


def _uniform_plan(model: nn.Module, cfg: LmCompressConfig, bits: int) -> Plan:
    return Plan({n: _layer_config(cfg, bits) for n in quantizable_layers(model)}, default=None)


def _plan_from_bits(model: nn.Module, cfg: LmCompressConfig, bits: Mapping[str, int]) -> Plan:
    names = list(quantizable_layers(model))
    missing = [n for n in names if n not in bits]
    if missing:
        raise ValueError(f"the allocation gives no width for layers {missing}")
    return Plan({n: _layer_config(cfg, int(bits[n])) for n in names}, default=None)


def _avg_bits(model: nn.Module, bits: Mapping[str, int]) -> float:
    from k2quant.search.sensitivity import layer_weight_params

    mods = quantizable_layers(model)
    n = {k: sum(p.numel() for p in layer_weight_params(mods[k]).values()) for k in bits}
    return sum(n[k] * bits[k] for k in bits) / max(1, sum(n.values()))


def _budget_str(cfg: LmCompressConfig) -> str:
    for k in ("avg_bits", "ratio", "size_bytes"):
        if getattr(cfg, k) is not None:
            return f"{k}={getattr(cfg, k)}"
    return f"uniform_bits={cfg.uniform_bits}"


def choose_plan(model: nn.Module, cfg: LmCompressConfig, batches: Sequence[Mapping[str, Any]],
                out_dir: Optional[PathLike] = None) -> Tuple[Plan, Dict[str, Any]]:
    """The mixed-precision (or uniform) plan of the LM under the budget of ``cfg``.

    Returns ``(plan, info)``; ``info`` has ``bits`` (per layer), ``avg_bits``,
    ``predicted_file_bytes`` (measured with :func:`packed_file_bytes`), ``target_file_bytes``
    (on-disk budgets), ``sensitivity`` (predicted total, table methods) and
    ``allocator_budget_bytes`` (the corrected budget given to the allocator).

    Raises:
      ValueError: a budget that no choice of candidate widths can meet (the message gives the
        feasible range on disk).
    """
    fp32 = _fp32_bytes(model)
    target = _target_file_bytes(cfg, fp32)
    cands = sorted(set(cfg.bits))
    names = list(quantizable_layers(model))
    # On-disk floor/ceiling: every layer at the narrowest / widest candidate (min/max_bits
    # are applied by the allocator; the floor check here covers the common case).
    if target is not None:
        floor = packed_file_bytes(model, _uniform_plan(model, cfg, cands[0]))
        if floor > target:
            raise ValueError(
                f"budget {_budget_str(cfg)} asks for a packed file of at most {target:.0f} bytes "
                f"(fp32 {fp32} bytes), but even every layer at {cands[0]} bits gives {floor} "
                f"bytes ({fp32 / floor:.2f}x); feasible: ratio <= {fp32 / floor:.2f} or "
                f"size_bytes >= {floor}, or add narrower candidate bits"
            )
    info: Dict[str, Any] = {"target_file_bytes": target, "fp32_bytes": fp32}

    if cfg.method == "uniform":
        if cfg.uniform_bits is not None:
            b = int(cfg.uniform_bits)
        elif cfg.avg_bits is not None:
            b = int(round(cfg.avg_bits))
            if not 1 <= b <= 8:
                raise ValueError(f"avg_bits={cfg.avg_bits} rounds to {b} bits, outside 1..8")
        else:
            b = None
            for c in sorted(cands, reverse=True):
                if packed_file_bytes(model, _uniform_plan(model, cfg, c)) <= target:
                    b = c
                    break
            assert b is not None  # the floor check passed
        plan = _uniform_plan(model, cfg, b)
        size = packed_file_bytes(model, plan)
        if target is not None and size > target:
            raise ValueError(
                f"uniform {b}-bit gives a {size}-byte file, over the budget {_budget_str(cfg)} "
                f"({target:.0f} bytes)"
            )
        info.update(bits={n: b for n in names}, avg_bits=float(b), predicted_file_bytes=size)
        return plan, info

    if cfg.method == "nas":
        return _choose_nas(model, cfg, batches, target, info)

    from k2quant.search.allocate import allocate

    cache = None if out_dir is None else Path(out_dir) / f"sensitivity-{cfg.method}.json"
    t0 = time.time()
    table = lm_sensitivity(model, batches, cfg, cache_path=cache)
    info["sensitivity_seconds"] = round(time.time() - t0, 2)
    table = _with_file_overheads(table, model, cfg)
    metric = {"kl": "kl", "hessian": "hawq"}[cfg.method]
    kw = dict(bits=cands, metric=metric, min_bits=cfg.min_bits, max_bits=cfg.max_bits,
              model=model)
    if target is None:
        alloc = allocate(table, avg_bits=float(cfg.avg_bits), **kw)
        plan = _plan_from_bits(model, cfg, alloc.bits)
        size = packed_file_bytes(model, plan)
    else:
        budget = target
        for attempt in range(5):
            try:
                alloc = allocate(table, size_bytes=budget, **kw)
            except ValueError as e:
                raise ValueError(
                    f"budget {_budget_str(cfg)} (a packed file of at most {target:.0f} bytes; "
                    f"the allocator was given {budget:.0f} bytes after subtracting the file "
                    f"overhead it does not model) cannot be met: {e}"
                ) from e
            plan = _plan_from_bits(model, cfg, alloc.bits)
            size = packed_file_bytes(model, plan)
            log.info("allocation %d: allocator budget %.0f bytes -> predicted %.0f, packed "
                     "file %d bytes (target %.0f)", attempt + 1, budget, alloc.size_bytes, size,
                     target)
            if size <= target:
                break
            # what the allocator does not model (the file header) is nearly independent of
            # the widths: give it the target minus that overhead
            unmodelled = size - alloc.size_bytes
            budget = min(budget - 8, target - unmodelled)
        else:
            raise ValueError(
                f"could not meet the on-disk budget {_budget_str(cfg)} ({target:.0f} bytes) after "
                f"5 corrections of the allocator budget; last file {size} bytes"
            )
        info["allocator_budget_bytes"] = budget
    if out_dir is not None:
        alloc.save(Path(out_dir) / "allocation.json")
    info.update(bits=dict(alloc.bits), avg_bits=alloc.avg_bits, predicted_file_bytes=size,
                sensitivity=alloc.sensitivity, metric=metric,
                allocator_size_bytes=alloc.size_bytes)
    return plan, info


def _choose_nas(model, cfg, batches, target, info):
    """Differentiable search (:mod:`k2quant.search.nas`) with the LM cross entropy."""
    from k2quant.search.nas import search_mixed_precision

    def loss_fn(search_model, batch):
        # The tied output layer reads ``embed.effective_weight()``; the search's stand-in for
        # the embedding has ``mixed_weight()`` instead: expose it under that name so that the
        # output layer is searched together with the embedding, as QAT will quantize it.
        emb = search_model.embed
        if hasattr(emb, "mixed_weight") and not hasattr(emb, "effective_weight"):
            emb.effective_weight = emb.mixed_weight
        return lm_loss(search_model, batch)

    kinds = cfg.quantizer
    opts = dict(cfg.quantizer_options)
    if cfg.quantizer == "general":
        opts["temperature"] = 0.0
    kw = dict(steps=cfg.nas_steps, lr_weights=0.0, lr_alpha=cfg.nas_lr_alpha,
              candidate_bits=sorted(set(cfg.bits)), quantizer=kinds, granularity=cfg.granularity,
              quantizer_options=opts, seed=cfg.seed, model_mode="eval")
    t0 = time.time()
    if target is None:
        res = search_mixed_precision(model, loss_fn, batches, avg_bits=float(cfg.avg_bits), **kw)
        plan = _plan_from_bits(model, cfg, res.bits)
        size = packed_file_bytes(model, plan)
    else:
        budget = target
        for attempt in range(3):
            res = search_mixed_precision(model, loss_fn, batches, size_bytes=budget, **kw)
            plan = _plan_from_bits(model, cfg, res.bits)
            size = packed_file_bytes(model, plan)
            log.info("NAS %d: budget %.0f bytes -> packed file %d bytes (target %.0f)",
                     attempt + 1, budget, size, target)
            if size <= target:
                break
            budget = min(budget - 8, target - (size - res.size_bytes))
        else:
            raise ValueError(f"NAS could not meet the on-disk budget ({target:.0f} bytes); last "
                             f"file {size} bytes")
        info["allocator_budget_bytes"] = budget
    info["sensitivity_seconds"] = round(time.time() - t0, 2)
    info.update(bits=dict(res.bits), avg_bits=_avg_bits(model, res.bits),
                predicted_file_bytes=size, allocator_size_bytes=res.size_bytes)
    return plan, info


# =============================================================================================
# QAT
# =============================================================================================
def _general_quantizers(model: nn.Module) -> List[nn.Module]:
    from k2quant.quant.general import GeneralQuantizer

    return [m for m in model.modules() if isinstance(m, GeneralQuantizer)]


def _lr_at(step: int, total: int, cfg: LmCompressConfig) -> float:
    """Linear warm-up over ``qat_warmup_steps``, then cosine from ``qat_lr`` to
    ``qat_lr * qat_final_lr_factor`` at the last step."""
    if cfg.qat_warmup_steps > 0 and step < cfg.qat_warmup_steps:
        return cfg.qat_lr * (step + 1) / cfg.qat_warmup_steps
    span = max(1, total - cfg.qat_warmup_steps)
    f = min(1.0, (step - cfg.qat_warmup_steps) / span)
    lo = cfg.qat_lr * cfg.qat_final_lr_factor
    return lo + 0.5 * (cfg.qat_lr - lo) * (1.0 + math.cos(math.pi * f))


def qat_finetune(model_q: nn.Module, teacher: Optional[nn.Module], train_ids: Sequence[Sequence[int]],
                 cfg: LmCompressConfig, valid_enc: Optional[EncodedText] = None
                 ) -> List[Dict[str, Any]]:
    """Quantization-aware fine-tuning of a ``quantize_``-d LM, in place.

    Adam (betas 0.9/0.98) over the weights and the quantizer parameters, the learning-rate
    schedule of :func:`_lr_at`, gradient clipping, loss :func:`qat_loss` (``cfg.distill`` of
    KL to ``teacher``, the float LM in eval mode). General Quantizers are annealed from
    ``general_t_start`` to ``general_t_end`` over the first 80% of the steps, then hard.
    Batches are reshuffled every epoch (seeded). With ``valid_enc`` the fake-quant held-out
    perplexity is logged after each epoch (no model selection on it).

    Returns the per-epoch history (``epoch``, ``train_ce``, ``train_loss``, ``lr``,
    ``valid_ppl`` if ``valid_enc``, ``seconds``).
    """
    from k2quant.lm.train import evaluate_perplexity

    if cfg.qat_epochs == 0:
        return []
    params = [p for p in model_q.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=cfg.qat_lr, betas=(0.9, 0.98), eps=1e-9)
    gq = _general_quantizers(model_q)
    n_batches = len(make_batches([len(s) + 1 for s in train_ids], cfg.max_tokens))
    total = cfg.qat_epochs * n_batches
    anneal_steps = max(1, int(0.8 * total))
    if teacher is not None:
        teacher.eval()
    history: List[Dict[str, Any]] = []
    step = 0
    for epoch in range(1, cfg.qat_epochs + 1):
        t0 = time.time()
        model_q.train()
        batches = lm_batches(train_ids, cfg.max_tokens, model_q, shuffle=True,
                             seed=cfg.seed + epoch)
        tot_ce = tot_loss = 0.0
        tot_tok = 0
        for batch in batches:
            lr = _lr_at(step, total, cfg)
            for g in opt.param_groups:
                g["lr"] = lr
            for q in gq:
                q.anneal(step, anneal_steps, cfg.general_t_start, cfg.general_t_end)
            loss, ce = qat_loss(model_q, batch, teacher, cfg.distill)
            opt.zero_grad()
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            step += 1
            n_tok = int(batch["lengths"].sum())
            tot_ce += float(ce) * n_tok
            tot_loss += float(loss.detach()) * n_tok
            tot_tok += n_tok
            if not math.isfinite(tot_loss):
                raise FloatingPointError(
                    f"QAT epoch {epoch}: non-finite loss; lower qat_lr (now {cfg.qat_lr})"
                )
        entry: Dict[str, Any] = {"epoch": epoch, "train_ce": tot_ce / tot_tok,
                                 "train_loss": tot_loss / tot_tok, "lr": lr}
        for q in gq:
            if step >= anneal_steps:
                q.set_temperature(0.0)
        if valid_enc is not None:
            model_q.eval()
            entry["valid_ppl"] = evaluate_perplexity(model_q, valid_enc)["ppl"]
        entry["seconds"] = round(time.time() - t0, 2)
        history.append(entry)
        log.info("QAT epoch %d/%d: train CE %.4f (ppl %.2f), loss %.4f%s, lr %.2e, %.1f s",
                 epoch, cfg.qat_epochs, entry["train_ce"], math.exp(entry["train_ce"]),
                 entry["train_loss"],
                 f", valid ppl {entry['valid_ppl']:.2f} (fake-quant)" if valid_enc else "",
                 lr, entry["seconds"])
    for q in gq:
        q.set_temperature(0.0)
    model_q.eval()
    return history


# =============================================================================================
# Entry point
# =============================================================================================
def _sample(ids: Sequence[Sequence[int]], n: int, seed: int) -> List[Sequence[int]]:
    if len(ids) <= n:
        return list(ids)
    idx = sorted(random.Random(seed).sample(range(len(ids)), n))
    return [ids[i] for i in idx]


def compress_lm(
    lm_checkpoint: PathLike,
    train_text: PathLike,
    valid_text: PathLike,
    out_dir: PathLike,
    *,
    avg_bits: Optional[float] = None,
    ratio: Optional[float] = None,
    size_bytes: Optional[float] = None,
    bits: Sequence[int] = DEFAULT_BITS,
    method: str = "kl",
    qat_epochs: int = 10,
    **kwargs: Any,
) -> Dict[str, Any]:
    """Compress a float Transformer LM to a mixed-precision packed file (module docstring).

    Args:
      lm_checkpoint: ``epoch-N.pt`` of ``k2quant train-lm`` (or any file
        :func:`~k2quant.models.transformer_lm.load_lm` reads).
      train_text: text for the sensitivity sample and QAT (the LM's training text).
      valid_text: held-out text for the reported perplexities.
      out_dir: output directory (created).
      avg_bits / ratio / size_bytes: exactly one budget (``avg_bits=2.0`` if none is given,
        except with ``method="uniform", uniform_bits=...``).
      bits: candidate weight widths.
      method: ``"kl"``, ``"hessian"``, ``"nas"`` or ``"uniform"``.
      qat_epochs: QAT epochs (0: no fine-tuning, post-training quantization).
      **kwargs: any other field of :class:`LmCompressConfig` (``quantizer``, ``distill``,
        ``qat_lr``, ``min_bits``, ``uniform_bits``, ``granularity``, ``seed``, ...).

    Returns:
      The summary (also written to ``out_dir/summary.json``): ``fp32`` (perplexity, bytes),
      ``quantized`` (perplexity of the packed file and of the fake-quant model), ``size``
      (file bytes, payload, ratio vs fp32, avg bits, float bytes), ``plan_bits`` per layer,
      ``allocation`` info, ``qat`` history, ``config``, ``seconds``.

    Raises:
      FileNotFoundError: missing checkpoint or text.
      ValueError: bad settings or an impossible budget (with the feasible range).
    """
    from k2quant.export import save_packed, size_table
    from k2quant.lm.train import _logged_run, _pick_device, evaluate_perplexity
    from k2quant.models.transformer_lm import TransformerLM, load_lm

    if avg_bits is None and ratio is None and size_bytes is None and not (
            method == "uniform" and kwargs.get("uniform_bits") is not None):
        avg_bits = 2.0
    unknown = sorted(set(kwargs) - {f.name for f in dataclasses.fields(LmCompressConfig)})
    if unknown:
        raise ValueError(f"compress_lm: unknown settings {unknown}; known: "
                         f"{sorted(f.name for f in dataclasses.fields(LmCompressConfig))}")
    cfg = LmCompressConfig(avg_bits=avg_bits, ratio=ratio, size_bytes=size_bytes,
                           bits=tuple(int(b) for b in bits), method=method,
                           qat_epochs=qat_epochs, **kwargs)
    cfg.validate()
    lm_checkpoint = Path(lm_checkpoint)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    with _logged_run(out_dir, "log-compress-lm.txt", cfg.num_threads):
        device = _pick_device(cfg.device, cpu_hint="use device='cpu'")
        log.info("compress-lm: %s -> %s; config %s", lm_checkpoint, out_dir,
                 json.dumps(cfg.to_dict(), sort_keys=True))
        fp32 = load_lm(lm_checkpoint, device=device)
        if not isinstance(fp32, TransformerLM):
            raise ValueError(f"{lm_checkpoint}: not a TransformerLM")
        from k2quant.nn import QuantModule

        if any(isinstance(m, QuantModule) for m in fp32.modules()):
            raise ValueError(f"{lm_checkpoint}: the LM is already quantized; pass the float "
                             f"checkpoint of 'k2quant train-lm'")
        tok = fp32.tokenizer
        train_enc = tok.encode(read_sentences(train_text, cfg.text_format))
        valid_enc = tok.encode(read_sentences(valid_text, cfg.text_format))
        n_params = sum(p.numel() for p in fp32.parameters())
        fp32_bytes = _fp32_bytes(fp32)
        log.info("LM: %d parameters (%d bytes fp32), %s vocabulary of %d; train %d sentences, "
                 "valid %d sentences (%d tokens, %d OOV)", n_params, fp32_bytes, tok.unit, len(tok),
                 len(train_enc.ids), len(valid_enc.ids), valid_enc.num_tokens, valid_enc.num_oov)
        fp32_ppl = evaluate_perplexity(fp32, valid_enc)
        log.info("fp32 held-out perplexity %.3f", fp32_ppl["ppl"])

        # ---- plan
        sens_ids = _sample(train_enc.ids, cfg.sens_sentences, cfg.seed)
        sens_batches = lm_batches(sens_ids, cfg.sens_max_tokens, fp32)
        t0 = time.time()
        plan, info = choose_plan(fp32, cfg, sens_batches, out_dir)
        info["seconds"] = round(time.time() - t0, 2)
        plan.save(out_dir / "plan.json")
        log.info("plan (%s, %s): avg %.3f bits, predicted file %d bytes (%.2fx); bits %s",
                 cfg.method, _budget_str(cfg), info["avg_bits"], info["predicted_file_bytes"],
                 fp32_bytes / info["predicted_file_bytes"], info["bits"])

        # ---- QAT
        torch.manual_seed(cfg.seed)
        model_q = quantize_(copy.deepcopy(fp32), plan)
        model_q.eval()
        ptq_ppl = evaluate_perplexity(model_q, valid_enc)["ppl"]
        log.info("before QAT (quantizers at their initialisation): held-out ppl %.3f", ptq_ppl)
        t0 = time.time()
        teacher = fp32 if cfg.distill > 0 else None
        history = qat_finetune(model_q, teacher, train_enc.ids, cfg, valid_enc)
        qat_seconds = round(time.time() - t0, 2)
        atomic_write_json(out_dir / "qat-history.json", history)
        fake_ppl = evaluate_perplexity(model_q, valid_enc)

        # ---- export and check the packed file
        convert(model_q)
        path = out_dir / "lm.k2q"
        save_packed(model_q, path)
        packed = load_lm(path, device=device)
        packed_ppl = evaluate_perplexity(packed, valid_enc)
        if not math.isclose(packed_ppl["total_nll"], fake_ppl["total_nll"], rel_tol=1e-6,
                            abs_tol=1e-6):
            raise RuntimeError(
                f"{path}: the packed LM's held-out NLL {packed_ppl['total_nll']!r} differs from "
                f"the fake-quant model's {fake_ppl['total_nll']!r}; the export is broken"
            )
        rep = size_table(path)
        file_bytes = os.path.getsize(path)
        float_bytes = sum(r.bytes for r in rep.rows if r.kind == "raw")
        meta_bytes = sum(r.bytes for r in rep.rows if r.kind == "meta")
        packed_bytes = sum(r.bytes for r in rep.rows if r.kind == "packed")
        summary: Dict[str, Any] = {
            "lm": str(lm_checkpoint),
            "train_text": str(train_text),
            "valid_text": str(valid_text),
            "out": str(path),
            "fp32": {
                "ppl": fp32_ppl["ppl"],
                "nll_per_token": fp32_ppl["nll_per_token"],
                "params": n_params,
                "bytes": fp32_bytes,
                "checkpoint_file_bytes": os.path.getsize(lm_checkpoint),
            },
            "quantized": {
                "ppl": packed_ppl["ppl"],
                "nll_per_token": packed_ppl["nll_per_token"],
                "ppl_fake_quant": fake_ppl["ppl"],
                "ppl_before_qat": ptq_ppl,
                "ppl_rel_change": packed_ppl["ppl"] / fp32_ppl["ppl"] - 1.0,
            },
            "valid": {"sentences": len(valid_enc.ids), "tokens": valid_enc.num_tokens,
                      "oov": valid_enc.num_oov},
            "size": {
                "file_bytes": file_bytes,
                "fp32_bytes": fp32_bytes,
                "ratio": fp32_bytes / file_bytes,
                "size_table_ratio": rep.ratio,
                "avg_bits": info["avg_bits"],
                "packed_weight_bytes": packed_bytes,
                "float_bytes": float_bytes,
                "metadata_bytes": meta_bytes,
                "header_bytes": rep.header_bytes,
                "predicted_file_bytes": info["predicted_file_bytes"],
            },
            "method": cfg.method,
            "budget": _budget_str(cfg),
            "plan_bits": info["bits"],
            "allocation": {k: v for k, v in info.items() if k != "bits"},
            "qat": {"epochs": cfg.qat_epochs, "seconds": qat_seconds, "history": history},
            "config": cfg.to_dict(),
            "seconds": round(time.time() - t_start, 2),
        }
        atomic_write_json(out_dir / "summary.json", summary)
        log.info("compressed LM %s: %d bytes on disk, %.2fx vs fp32 (%d bytes), avg %.3f bits; "
                 "held-out ppl fp32 %.3f -> %.3f (%+.2f%%)", path, file_bytes,
                 summary["size"]["ratio"], fp32_bytes, info["avg_bits"], fp32_ppl["ppl"],
                 packed_ppl["ppl"], 100 * summary["quantized"]["ppl_rel_change"])
        return summary
