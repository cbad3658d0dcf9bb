"""Quantization-aware fine-tuning (QAT) of a planned acoustic model with the LF-MMI loss.

Usage from Python (``k2quant compress`` calls this after the search)::

    from k2quant.qat import QatConfig, load_fp32_model, run_qat, export_packed
    fp32, info = load_fp32_model("exp/epoch-8.pt", avg=2)
    res = run_qat(fp32, plan, QatConfig(exp_dir="compress/qat", lang_dir="data/lang",
                                        train_cuts="data/fbank/cuts_train.jsonl.gz"),
                  dims={"tdnnfs.3": 64}, base_config=info["config"])
    export_packed(res.model, "compress/model.k2q")

What happens (in this order):

1. a deep copy of the float model is re-factorised to the per-layer bottleneck ``dims``
   (:func:`k2quant.models.tdnnf.refactor_bottleneck`, through :func:`apply_dims`), then
   ``quantize_(model, plan)`` swaps the planned layers for fake-quant modules whose quantizers
   are initialised from the fp32 weights (LSQ step ``2 mean|w| / sqrt(Qp)``, General-Quantizer
   centroids on the mu-law grid, ...);
2. one forward pass without gradients on a training batch (eval mode, so the BatchNorm
   statistics are untouched) creates every lazily-built quantizer parameter, and only then the
   optimizer is built (a parameter created after the optimizer would never be trained);
3. fine-tuning with the LF-MMI objective of the training loop
   (:class:`k2quant.training.train.MmiObjective`: same denominator graph, leaky HMM, den scale
   and xent regulariser as the fp32 training, read from its checkpoint's config) on the
   training cuts, with the training loop's dataset, bucketing sampler and cut filtering
   (:mod:`k2quant.training.dataset`, :func:`k2quant.data.cuts.filter_cuts`):

   - Adam with a low learning rate (default ``3e-4`` decaying exponentially to ``1e-4``; the
     quantizer parameters get ``lr_quant``, default the same), gradient-norm clipping, no
     warm-up (the model starts trained);
   - dropout off (Kaldi's schedule ends at 0; QAT continues from the end of training);
   - BatchNorm (``bn_mode``): ``"freeze_after_first"`` (default) lets the running statistics
     follow the quantized activations during the first epoch (train mode) and then switches
     every BatchNorm to eval mode (running statistics, not updated) for the remaining epochs,
     so the last epochs train exactly the network that is decoded; ``"train"`` keeps batch
     statistics throughout; ``"freeze"`` uses the fp32 running statistics from the start;
   - the semi-orthogonal constraint every ``orthonormal_every`` steps on the layers of
     ``model.semi_orthogonal_layer_names()`` that are still float only (re-projecting the
     shadow weights of a quantized layer would move them off the grid the quantizer learned);
   - General-Quantizer layers with ``bits <= soft_max_bits`` anneal their soft-assignment
     temperature exponentially from ``temperature[0]`` to ``temperature[1]`` over the first
     ``anneal_fraction`` of the steps and are hard (T = 0) afterwards (wider general
     quantizers are hard throughout: the soft assignment costs ``O(numel * 2**bits)`` memory);
4. a checkpoint ``exp_dir/qat-epoch-N.pt`` after every epoch (atomic, with optimizer, schedule,
   RNG states, the plan and the dims), and a rerun resumes from the last one whose plan, dims
   and source model match (an epoch already done is not redone);
5. :func:`export_packed`: ``convert`` (on a copy) and :func:`k2quant.export.save_packed`.

The packed model decodes to exactly the fake-quant model's outputs in eval mode.
"""
import copy
import dataclasses
import hashlib
import json
import logging
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch
import torch.nn as nn
from k2quant.utils.io import load_trusted

from k2quant.plan import Plan, quantizable_layers, quantize_

log = logging.getLogger(__name__)

PathLike = Union[str, Path]

__all__ = [
    "QatConfig",
    "QatResult",
    "BN_MODES",
    "load_fp32_model",
    "apply_dims",
    "build_qat_model",
    "init_quantizers",
    "run_qat",
    "export_packed",
    "constrain_float_layers",
    "set_general_temperature",
    "qat_checkpoint_path",
]

BN_MODES = ("freeze_after_first", "train", "freeze")
_CKPT_RE = re.compile(r"^qat-epoch-(\d+)\.pt$")


# ---------------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------------
@dataclass
class QatConfig:
    """QAT options.

    Attributes:
      exp_dir: where ``qat-epoch-N.pt`` checkpoints and ``qat-history.json`` go.
      lang_dir: the lang dir of the fp32 model (LF-MMI graphs).
      train_cuts: training CutSet with features.
      valid_cuts: optional CutSet whose LF-MMI loss is logged after every epoch.
      num_epochs: QAT epochs (0: no fine-tuning, post-training quantization).
      lr, final_lr: Adam learning rate, decayed exponentially from ``lr`` to ``final_lr`` over
        the run (after ``warmup_steps`` linear warm-up steps).
      lr_quant: learning rate of the quantizer parameters (step sizes, centroids); ``None``
        = ``lr``.
      max_duration: seconds of audio per batch.
      max_cuts: use only the first ``max_cuts`` (after filtering; ``None``: all).
      bn_mode: see :data:`BN_MODES` and the module docstring.
      orthonormal_every: semi-orthogonal constraint period (steps) on float layers; 0 = off.
      temperature: ``(start, end)`` of the General-Quantizer annealing.
      anneal_fraction: fraction of the steps with a soft General Quantizer.
      soft_max_bits: General Quantizers wider than this stay hard.
      grad_clip: gradient-norm clipping (0: off).
      seed: seed of the batch order and of everything random.
      device: ``cpu``, ``cuda`` or ``auto``.
      num_threads: torch intra-op threads (0: leave torch's default).
      resume: continue from the last matching ``qat-epoch-N.pt`` in ``exp_dir``.
      train_overrides: LF-MMI options overriding the fp32 training config (``den_scale``,
        ``leaky_hmm``, ``xent_regularize``, ``den_output_beam``, ``den_lm_order``, ``utt_cmn``).
    """

    exp_dir: str
    lang_dir: str
    train_cuts: str
    valid_cuts: Optional[str] = None
    num_epochs: int = 2
    lr: float = 3e-4
    final_lr: float = 1e-4
    lr_quant: Optional[float] = None
    warmup_steps: int = 0
    max_duration: float = 150.0
    max_cuts: Optional[int] = None
    num_buckets: int = 10
    bn_mode: str = "freeze_after_first"
    orthonormal_every: int = 4
    temperature: Tuple[float, float] = (1e-3, 1e-5)
    anneal_fraction: float = 0.8
    soft_max_bits: int = 4
    grad_clip: float = 5.0
    seed: int = 42
    device: str = "cpu"
    num_threads: int = 0
    resume: bool = True
    log_interval: int = 20
    train_overrides: Dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        if self.num_epochs < 0:
            raise ValueError(f"QAT num_epochs must be >= 0, got {self.num_epochs}")
        if not self.lr > 0 or not self.final_lr > 0:
            raise ValueError(f"QAT lr and final_lr must be > 0, got {self.lr}, {self.final_lr}")
        if self.bn_mode not in BN_MODES:
            raise ValueError(f"QAT bn_mode must be one of {list(BN_MODES)}, got {self.bn_mode!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"QAT device must be auto, cpu or cuda, got {self.device!r}")
        t0, t1 = self.temperature
        if not 0 < t1 <= t0:
            raise ValueError(f"QAT temperature must be (start, end) with 0 < end <= start, "
                             f"got {self.temperature}")
        if not 0 <= self.anneal_fraction <= 1:
            raise ValueError(f"QAT anneal_fraction must be in [0, 1], got {self.anneal_fraction}")
        if not Path(self.lang_dir).is_dir():
            raise FileNotFoundError(f"lang dir {self.lang_dir} does not exist; create it with "
                                    f"'k2quant prepare-lang'")
        if not Path(self.train_cuts).is_file():
            raise FileNotFoundError(f"training cuts {self.train_cuts} not found; they are "
                                    f"written by 'k2quant compute-fbank'")

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["temperature"] = list(self.temperature)
        return d


@dataclass
class QatResult:
    """``model``: the fine-tuned fake-quant model (eval mode); ``history``: one record per
    epoch; ``checkpoint``: the last checkpoint written or loaded (None if ``num_epochs`` is
    0); ``seconds``: wall time of this call; ``resumed_from``: the epoch resumed after."""

    model: nn.Module
    history: List[Dict[str, Any]]
    checkpoint: Optional[Path]
    seconds: float
    resumed_from: int = 0


# ---------------------------------------------------------------------------------------------
# model preparation
# ---------------------------------------------------------------------------------------------
_EPOCH_RE = re.compile(r"^epoch-(\d+)\.pt$")


def load_fp32_model(model_path: PathLike, avg: int = 1,
                    device: str = "cpu") -> Tuple[nn.Module, Dict[str, Any]]:
    """Load a float acoustic model written by the training loop.

    Args:
      model_path: ``EXP/epoch-N.pt``; with ``avg > 1`` the epochs ``N-avg+1 .. N`` of the same
        directory are averaged (icefall's ``--epoch N --avg K``).
      avg: number of checkpoints to average.

    Returns:
      ``(model, info)``: the model in eval mode and ``{"config": training config,
      "model_spec": ..., "epoch": N, "avg": avg, "path": ...}``.

    Raises:
      FileNotFoundError / ValueError with the expected name or the missing epochs.
    """
    from k2quant.models import build_model
    from k2quant.training import checkpoint as ck

    p = Path(model_path)
    if not p.is_file():
        raise FileNotFoundError(f"model checkpoint {p} not found; give --model EXP/epoch-N.pt "
                                f"written by 'k2quant train'")
    ckpt = load_trusted(p)
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise ValueError(f"{p} is not a k2quant training checkpoint (no 'model' entry)")
    m = _EPOCH_RE.match(p.name)
    epoch = int(m.group(1)) if m else ckpt.get("epoch")
    if avg > 1:
        if not m:
            raise ValueError(f"--avg {avg} needs --model named EXP/epoch-N.pt, got {p.name}")
        model = ck.load_averaged_model(p.parent, epoch, avg, device=device)
    else:
        spec = ckpt.get("model_spec")
        if spec is None:
            raise ValueError(f"{p} has no model_spec; it was not written by k2quant's training "
                             f"loop")
        model = build_model(spec)
        model.load_state_dict(ckpt["model"])
        model.to(device).eval()
    info = {"config": dict(ckpt.get("config", {})), "model_spec": ckpt.get("model_spec"),
            "epoch": epoch, "avg": int(avg), "path": str(p)}
    return model, info


def apply_dims(model: nn.Module, dims: Optional[Mapping[str, int]]) -> List[Dict[str, Any]]:
    """Re-factorise the float TDNN-F ``model`` in place to the bottleneck ``dims``
    (``{"tdnnfs.3": 64, ...}``); layers already at their dim are left alone.

    Raises:
      ValueError: the model has no bottleneck re-factorisation, or names it lacks.
    """
    if not dims:
        return []
    if not hasattr(model, "refactor_bottleneck") or not hasattr(model, "tdnnf_layer_names"):
        raise ValueError(f"bottleneck dims {dict(dims)} need a TDNN-F model; got "
                         f"{type(model).__name__}")
    names = model.tdnnf_layer_names()
    unknown = [n for n in dims if n not in names]
    if unknown:
        raise ValueError(f"the dims name TDNN-F layers the model lacks: {unknown}; the model's "
                         f"TDNN-F layers are {names}")
    out = []
    for name, d in dims.items():
        cur = int(model.get_submodule(f"{name}.linear").weight.shape[0])
        if int(d) != cur:
            out.append(model.refactor_bottleneck(name, int(d)))
    return out


def check_plan(model: nn.Module, plan: Plan) -> None:
    """Raise ``ValueError`` naming the plan's keys that match no quantizable layer, or if the
    plan quantizes none of the model's layers (QAT needs a quantized model)."""
    names = list(quantizable_layers(model))
    try:
        plan.check(names, require_quantized=True)
    except ValueError as e:
        raise ValueError(f"the plan names layers the model lacks: {e}") from None


def build_qat_model(fp32_model: nn.Module, plan: Plan,
                    dims: Optional[Mapping[str, int]] = None) -> nn.Module:
    """A deep copy of ``fp32_model`` re-factorised to ``dims`` and ``quantize_``-d by ``plan``
    (quantizers initialised from the fp32 weights). ``fp32_model`` is not modified."""
    model = copy.deepcopy(fp32_model)
    apply_dims(model, dims)
    check_plan(model, plan)
    return quantize_(model, plan)


@torch.no_grad()
def init_quantizers(model: nn.Module, inputs: torch.Tensor) -> None:
    """One forward pass in eval mode (BatchNorm statistics untouched) so that every lazily
    created quantizer parameter exists before the optimizer is built."""
    was = model.training
    model.eval()
    try:
        model(inputs)
    finally:
        model.train(was)


def _is_quant(module: nn.Module) -> bool:
    from k2quant.nn import QuantModule

    return isinstance(module, QuantModule)


def constrain_float_layers(model: nn.Module) -> int:
    """Kaldi's semi-orthogonal update on the float layers of
    ``model.semi_orthogonal_layer_names()`` (quantized layers are skipped). Returns the
    number of layers updated."""
    from k2quant.models.orthonormal import constrain_orthonormal_

    names = getattr(model, "semi_orthogonal_layer_names", None)
    if not callable(names):
        return 0
    n = 0
    for name in names():
        mod = model.get_submodule(name)
        if _is_quant(mod):
            continue
        w = getattr(mod, "weight", None)
        if isinstance(w, torch.Tensor) and w.is_floating_point():
            with torch.no_grad():
                constrain_orthonormal_(w.data)
            n += 1
    return n


def _general_quantizers(model: nn.Module, max_bits: int):
    from k2quant.quant.general import GeneralQuantizer

    soft, hard = [], []
    for m in model.modules():
        if isinstance(m, GeneralQuantizer):
            (soft if m.bits <= max_bits else hard).append(m)
    return soft, hard


def set_general_temperature(model: nn.Module, temperature: float, max_bits: int = 4) -> int:
    """Set the temperature of the General Quantizers with ``bits <= max_bits`` (the others are
    set hard); returns how many were set soft."""
    soft, hard = _general_quantizers(model, max_bits)
    for q in soft:
        q.set_temperature(temperature)
    for q in hard:
        q.set_temperature(0.0)
    return len(soft)


def _set_bn_eval(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def _plan_digest(plan: Plan, dims: Optional[Mapping[str, int]], source: str) -> str:
    blob = json.dumps({"plan": plan.to_dict(), "dims": dict(dims or {}), "source": source},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def qat_checkpoint_path(exp_dir: PathLike, epoch: int) -> Path:
    """``exp_dir/qat-epoch-{epoch}.pt``."""
    return Path(exp_dir) / f"qat-epoch-{epoch}.pt"


# ---------------------------------------------------------------------------------------------
# learning rate
# ---------------------------------------------------------------------------------------------
class _QatSchedule:
    """Linear warm-up then ``lr * (final_lr / lr) ** progress``; each param group keeps its
    ``lr_scale`` (quantizer parameters may learn at another rate)."""

    def __init__(self, optimizer: torch.optim.Optimizer, lr: float, final_lr: float,
                 warmup_steps: int):
        self.optimizer = optimizer
        self.lr0, self.final_lr, self.warmup = float(lr), float(final_lr), int(warmup_steps)
        self.step_count = 0
        self.progress = 0.0
        self._apply()

    def lr(self) -> float:
        s = self.step_count + 1
        warm = min(1.0, s / self.warmup) if self.warmup > 0 else 1.0
        return self.lr0 * warm * (self.final_lr / self.lr0) ** min(1.0, max(0.0, self.progress))

    def _apply(self) -> None:
        lr = self.lr()
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)

    def step(self, progress: float) -> None:
        self.step_count += 1
        self.progress = float(progress)
        self._apply()

    def state_dict(self) -> Dict[str, Any]:
        return {"step_count": self.step_count, "progress": self.progress}

    def load_state_dict(self, sd: Mapping[str, Any]) -> None:
        self.step_count = int(sd["step_count"])
        self.progress = float(sd["progress"])
        self._apply()


def _make_optimizer(model: nn.Module, cfg: QatConfig) -> torch.optim.Optimizer:
    quant, other = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (quant if ("weight_quantizers." in name or "act_quantizers." in name) else other).append(p)
    scale_q = (cfg.lr_quant / cfg.lr) if cfg.lr_quant is not None else 1.0
    groups = [{"params": other, "lr_scale": 1.0}]
    if quant:
        groups.append({"params": quant, "lr_scale": scale_q})
    return torch.optim.Adam(groups, lr=cfg.lr)


# ---------------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------------
def _pick_device(kind: str) -> torch.device:
    if kind == "cuda" or (kind == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("QAT device cuda requested but CUDA is not available")
        return torch.device("cuda")
    return torch.device("cpu")


def _train_config(cfg: QatConfig, base_config: Optional[Mapping[str, Any]]):
    """The :class:`TrainConfig` whose LF-MMI settings the objective uses: the fp32 training
    run's, overridden by ``cfg.train_overrides``."""
    from k2quant.training.train import TrainConfig

    d = dict(base_config or {})
    d.update(exp_dir=cfg.exp_dir, lang_dir=cfg.lang_dir, train_cuts=cfg.train_cuts,
             valid_cuts=cfg.valid_cuts, seed=cfg.seed, max_duration=cfg.max_duration)
    d.update(cfg.train_overrides)
    return TrainConfig.from_dict(d)


def prepare_cuts(cuts_path: PathLike, lang_dir: PathLike, subsampling_factor: int,
                 max_cuts: Optional[int] = None):
    """Training cuts filtered like the training loop does (unusable cuts dropped, OOVs mapped
    to the lang's OOV word), first ``max_cuts`` of them, as an eager CutSet."""
    from k2quant.data.cuts import filter_cuts
    from k2quant.lang import read_lexicon
    from k2quant.training.dataset import load_cuts
    from k2quant.training.train import read_lang_info

    info = read_lang_info(str(lang_dir))
    lexicon = read_lexicon(Path(lang_dir) / "lexicon.txt")
    cuts = load_cuts(cuts_path)
    kept, stats = filter_cuts(cuts, lexicon=lexicon, subsampling_factor=subsampling_factor,
                              map_oov_to=info.get("oov", "<UNK>"))
    if stats.total != stats.kept:
        log.info("cuts %s: %d of %d kept after filtering", cuts_path, stats.kept, stats.total)
    kept = kept.to_eager()
    if max_cuts is not None and len(kept) > max_cuts:
        kept = kept.subset(first=int(max_cuts))
    if len(kept) == 0:
        raise ValueError(f"{cuts_path}: no usable cuts after filtering ({stats})")
    return kept


def run_qat(fp32_model: nn.Module, plan: Plan, cfg: QatConfig, *,
            dims: Optional[Mapping[str, int]] = None,
            base_config: Optional[Mapping[str, Any]] = None,
            source: str = "",
            objective: Optional[Any] = None) -> QatResult:
    """Quantize ``fp32_model`` (a copy) with ``plan`` after re-factorising it to ``dims`` and
    fine-tune it with LF-MMI (see the module docstring).

    Args:
      fp32_model: the float model (not modified).
      plan: the quantization plan (exact names or ``re:`` patterns of quantizable layers).
      cfg: :class:`QatConfig`.
      dims: per-TDNN-F-layer bottleneck dims (``None``: keep the model's).
      base_config: the fp32 training config (checkpoint ``config``): LF-MMI settings and
        ``utt_cmn`` are taken from it.
      source: identifies the fp32 model (e.g. its path); a checkpoint is resumed only if its
        plan, dims and source match.
      objective: ``objective(model, batch) -> (loss, stats)`` replacing the LF-MMI objective
        (``stats["loss"]``, ``stats["frames"]``); for tests.

    Returns:
      :class:`QatResult` with the fake-quant model in eval mode.
    """
    from k2quant.training import checkpoint as ck
    from k2quant.training.dataset import (
        AsrDataset, make_dataloader, make_eval_sampler, make_train_sampler, total_duration,
    )
    from k2quant.utils.io import atomic_write_json

    cfg.validate()
    t_start = time.time()
    if cfg.num_threads > 0:
        torch.set_num_threads(cfg.num_threads)
    device = _pick_device(cfg.device)
    exp_dir = Path(cfg.exp_dir)
    exp_dir.mkdir(parents=True, exist_ok=True)
    tcfg = _train_config(cfg, base_config)
    digest = _plan_digest(plan, dims, source)

    ck.fix_random_seed(cfg.seed)
    model = build_qat_model(fp32_model, plan, dims).to(device)
    if hasattr(model, "set_dropout_proportion"):
        model.set_dropout_proportion(0.0)
    sf = int(getattr(model, "subsampling_factor", 1))
    cuts = prepare_cuts(cfg.train_cuts, cfg.lang_dir, sf, cfg.max_cuts)
    duration = total_duration(cuts)
    dataset = AsrDataset(utt_cmn=bool(tcfg.utt_cmn))
    sampler = make_train_sampler(cuts, cfg.max_duration, seed=cfg.seed,
                                 num_buckets=cfg.num_buckets)
    dl = make_dataloader(dataset, sampler)
    valid_dl = None
    if cfg.valid_cuts:
        from k2quant.training.dataset import load_cuts

        valid_dl = make_dataloader(dataset, make_eval_sampler(load_cuts(cfg.valid_cuts),
                                                              cfg.max_duration))
    if objective is None:
        from k2quant.training.train import MmiObjective

        texts = [s.text for c in cuts for s in c.supervisions if s.text]
        objective = MmiObjective(cfg.lang_dir, device, tcfg, train_texts=texts,
                                 use_xent=getattr(model, "prefinal_xent", None) is not None,
                                 subsampling_factor=sf)

    # lazily created quantizer parameters must exist before the optimizer is built
    sampler.set_epoch(0)
    first = next(iter(dl))
    init_quantizers(model, first["inputs"][:1].to(device))

    optimizer = _make_optimizer(model, cfg)
    sched = _QatSchedule(optimizer, cfg.lr, cfg.final_lr, cfg.warmup_steps)
    history: List[Dict[str, Any]] = []
    step = 0
    start_epoch = 1
    last_ckpt: Optional[Path] = None
    if cfg.resume:
        found = _last_matching_checkpoint(exp_dir, digest, cfg.num_epochs)
        if found is not None:
            path, epoch = found
            ckd = ck.load_checkpoint(path, model, optimizer=optimizer, scheduler=sched,
                                     restore_rng=True, map_location=device)
            step = int(ckd.get("step", 0))
            history = list(ckd.get("extra", {}).get("history", []))
            start_epoch = epoch + 1
            last_ckpt = path
            log.info("QAT: resumed from %s (epoch %d, step %d)", path, epoch, step)
    resumed_from = start_epoch - 1

    steps_per_epoch = _count_batches(sampler)
    total_steps = max(1, steps_per_epoch * cfg.num_epochs)
    soft_steps = int(round(cfg.anneal_fraction * total_steps))
    n_soft, _ = _general_quantizers(model, cfg.soft_max_bits)
    n_soft = len(n_soft)

    def temperature(s: int) -> float:
        if n_soft == 0 or soft_steps <= 0 or s >= soft_steps:
            return 0.0
        t0, t1 = cfg.temperature
        return t0 * (t1 / t0) ** (s / soft_steps)

    for epoch in range(start_epoch, cfg.num_epochs + 1):
        model.train()
        bn_frozen = cfg.bn_mode == "freeze" or (cfg.bn_mode == "freeze_after_first" and epoch > 1)
        if bn_frozen:
            _set_bn_eval(model)
        sampler.set_epoch(epoch)
        t0 = time.time()
        tot_loss = tot_frames = 0.0
        batches = skipped = 0
        seen = 0.0
        for batch in dl:
            seen += float(batch["duration"])
            if n_soft:
                set_general_temperature(model, temperature(step), cfg.soft_max_bits)
            loss, stats = objective(model, batch)
            optimizer.zero_grad(set_to_none=True)
            if not math.isfinite(stats["loss"]):
                skipped += 1
                log.warning("QAT epoch %d: non-finite loss, batch skipped (cuts %s ...)", epoch,
                            batch["supervisions"]["cut_id"][:3])
                continue
            loss.backward()
            params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
            if cfg.grad_clip > 0 and params:
                gnorm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))
                if not math.isfinite(gnorm):
                    skipped += 1
                    optimizer.zero_grad(set_to_none=True)
                    continue
            optimizer.step()
            step += 1
            progress = ((epoch - 1) + min(1.0, seen / max(duration, 1e-9))) / max(cfg.num_epochs, 1)
            sched.step(progress)
            if cfg.orthonormal_every > 0 and step % cfg.orthonormal_every == 0:
                constrain_float_layers(model)
            tot_loss += stats["loss"]
            tot_frames += stats["frames"]
            batches += 1
            if cfg.log_interval > 0 and batches % cfg.log_interval == 0:
                log.info("QAT epoch %d batch %d: loss/frame %.4f, lr %.3g", epoch, batches,
                         tot_loss / max(tot_frames, 1.0), optimizer.param_groups[0]["lr"])
        rec: Dict[str, Any] = {
            "epoch": epoch, "step": step, "train_loss_per_frame": tot_loss / max(tot_frames, 1.0),
            "train_frames": tot_frames, "batches": batches, "skipped_batches": skipped,
            "bn_frozen": bn_frozen, "lr": optimizer.param_groups[0]["lr"],
            "seconds": round(time.time() - t0, 2),
        }
        if n_soft:
            rec["general_temperature"] = temperature(step)
        if valid_dl is not None:
            rec["valid_loss_per_frame"] = _validate(model, objective, valid_dl)
        history.append(rec)
        log.info("QAT epoch %d: train loss/frame %.5f (%d batches, %d skipped)%s in %.1f s",
                 epoch, rec["train_loss_per_frame"], batches, skipped,
                 (f", valid loss/frame {rec['valid_loss_per_frame']:.5f}"
                  if "valid_loss_per_frame" in rec else ""), rec["seconds"])
        last_ckpt = qat_checkpoint_path(exp_dir, epoch)
        ck.save_checkpoint(
            last_ckpt, model, epoch=epoch, step=step, optimizer=optimizer, scheduler=sched,
            config=cfg.to_dict(),
            extra={"history": history, "digest": digest, "plan": plan.to_dict(),
                   "dims": dict(dims or {}), "source": source},
        )
        atomic_write_json(exp_dir / "qat-history.json", history)

    if n_soft:
        set_general_temperature(model, 0.0, cfg.soft_max_bits)
    model.eval()
    return QatResult(model=model, history=history, checkpoint=last_ckpt,
                     seconds=time.time() - t_start, resumed_from=resumed_from)


def _count_batches(sampler) -> int:
    sampler.set_epoch(0)
    n = sum(1 for _ in sampler)
    return max(n, 1)


def _last_matching_checkpoint(exp_dir: Path, digest: str,
                              num_epochs: int) -> Optional[Tuple[Path, int]]:
    found = []
    for p in exp_dir.glob("qat-epoch-*.pt"):
        m = _CKPT_RE.match(p.name)
        if m and int(m.group(1)) <= num_epochs:
            found.append((int(m.group(1)), p))
    for epoch, p in sorted(found, reverse=True):
        try:
            extra = load_trusted(p).get("extra", {})
        except Exception as e:  # a damaged file: ignore it (atomic writes make this rare)
            log.warning("QAT: cannot read %s (%s); ignoring it", p, e)
            continue
        if extra.get("digest") == digest:
            return p, epoch
        log.warning("QAT: %s was trained with another plan/dims/model; not resuming from it", p)
    return None


@torch.no_grad()
def _validate(model: nn.Module, objective, dl) -> float:
    was = model.training
    model.eval()
    loss = frames = 0.0
    try:
        for batch in dl:
            _, st = objective(model, batch)
            if math.isfinite(st["loss"]):
                loss += st["loss"]
                frames += st["frames"]
    finally:
        model.train(was)
    return loss / max(frames, 1.0)


# ---------------------------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------------------------
def export_packed(model: nn.Module, path: PathLike,
                  extra: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """``convert`` a copy of the fake-quant ``model`` and write it with
    :func:`k2quant.export.save_packed`; returns its size facts (``file_bytes`` measured with
    ``os.path.getsize``, ``payload_bytes``, ``header_bytes``, ``avg_bits`` and
    ``quantized_params`` from the packed file's size table, ``params``: the model's weights
    and biases, quantizer state and BatchNorm statistics excluded). ``extra``: header
    metadata (see :func:`k2quant.export.save_packed`)."""
    import os

    from k2quant.export import model_params, save_packed, size_table

    info = dict(save_packed(model, path, extra=extra))
    info["file_bytes"] = os.path.getsize(path)
    rep = size_table(path)
    packed = [r for r in rep.rows if r.kind == "packed"]
    n = sum(r.params for r in packed)
    info["avg_bits"] = (sum(r.params * int(r.bits) for r in packed) / n) if n else 32.0
    info["quantized_params"] = n
    # parameters of the model (weights and biases; not quantizer state, not BatchNorm buffers)
    info["params"] = model_params(model)
    return info
