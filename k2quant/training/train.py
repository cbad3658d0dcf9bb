"""The LF-MMI training loop (single process or ``torch.distributed`` DDP).

Usage from Python (the ``k2quant train`` command is a thin wrapper)::

    from k2quant.training.train import TrainConfig, train
    train(TrainConfig(exp_dir="exp", lang_dir="data/lang", train_cuts="data/fbank/cuts_train.jsonl.gz",
                      valid_cuts="data/fbank/cuts_dev.jsonl.gz", num_epochs=6))

What one epoch does (icefall's ``train.py`` structure, Kaldi's chain recipe's knobs):

- batches from a lhotse ``DynamicBucketingSampler`` (``max_duration`` seconds of audio per
  batch, shuffled with ``seed + epoch``) over precomputed fbank features
  (:mod:`k2quant.training.dataset`);
- forward the acoustic model, LF-MMI loss (:class:`k2quant.training.mmi.LFMMILoss`, summed over
  frames) plus, when the model has an xent head, the Kaldi cross-entropy regulariser
  (``--xent-regularize 0.1``) trained towards the numerator posteriors;
- Adam (default) or SGD with momentum, linear warm-up over ``--warmup-steps`` then either
  Kaldi's exponential decay from ``--lr`` to ``--final-lr`` over the whole run (default) or the
  Noam schedule; gradient-norm clipping (``--grad-clip``);
- every ``--orthonormal-every`` steps the semi-orthogonal constraint of the TDNN-F factored
  layers; the model's dropout schedule follows the training progress (fraction of the total
  audio seen, as Kaldi's ``--dropout-schedule``);
- at the end of the epoch: validation loss, a checkpoint ``exp_dir/epoch-N.pt``
  (:mod:`k2quant.training.checkpoint`, written atomically, with optimizer, scheduler, sampler
  and RNG states), per-epoch logs (loss per frame, frames/s, peak memory) to the log file
  ``exp_dir/log/log-train-*.txt`` and to TensorBoard (``exp_dir/tensorboard``).

``--start-epoch N`` resumes from ``epoch-(N-1).pt``; the result is bit-identical to an
uninterrupted run with the same seed and world size (``tests/test_train_resume.py``).

DDP: ``--world-size W > 1`` spawns W processes (``torch.multiprocessing.spawn``) with the
``nccl`` backend on GPUs (one per rank) or ``gloo`` on CPU. Each rank reads every ``W``-th batch
of the same sampler; gradients are averaged by DDP; rank 0 writes checkpoints and logs.
"""
import dataclasses
import json
import logging
import math
import os
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from k2quant.training import checkpoint as ckpt_lib
from k2quant.training.dataset import (
    AsrDataset,
    SpecAugment,
    load_cuts,
    make_dataloader,
    make_eval_sampler,
    make_train_sampler,
    supervision_segments,
    total_duration,
)
from k2quant.utils.io import atomic_write_json

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------------
@dataclass
class TrainConfig:
    """All training options (each is a ``k2quant train`` flag, ``_`` -> ``-``)."""

    exp_dir: str
    lang_dir: str
    train_cuts: str
    valid_cuts: Optional[str] = None
    # run
    num_epochs: int = 6
    start_epoch: int = 1
    world_size: int = 1
    seed: int = 42
    device: str = "auto"  # auto | cpu | cuda
    num_threads: int = 0  # torch intra-op threads per process (0: leave torch's default)
    master_port: int = 12354
    # data
    max_duration: float = 200.0
    num_buckets: int = 10
    utt_cmn: bool = True
    spec_augment: bool = False
    frame_shift_augment: bool = True  # Kaldi-style random 0..sf-1 frame shift per utterance
    # model
    model_preset: str = "small"
    model_config: Optional[str] = None  # JSON: a full spec {"arch","config"} or config overrides
    feat_dim: int = 80
    # optimisation
    optimizer: str = "adam"  # adam | sgd
    lr: float = 2e-3
    final_lr: float = 2e-4
    lr_schedule: str = "exp"  # exp (Kaldi) | noam
    warmup_steps: int = 200
    momentum: float = 0.9
    weight_decay: float = 0.0
    grad_clip: float = 5.0
    orthonormal_every: int = 4
    # loss
    xent_regularize: float = 0.1
    den_scale: float = 1.0
    leaky_hmm: float = 0.1
    den_output_beam: float = 10.0
    den_lm_order: int = 3  # only used when the lang dir has no phone LM yet
    # logging
    log_interval: int = 20
    tensorboard: bool = True
    progress_bar: bool = True  # only when stderr is a terminal; else periodic log lines

    def validate(self) -> None:
        if self.num_epochs < 1:
            raise ValueError(f"--num-epochs must be >= 1, got {self.num_epochs}")
        if not 1 <= self.start_epoch <= self.num_epochs:
            raise ValueError(
                f"--start-epoch must be in 1..--num-epochs ({self.num_epochs}), "
                f"got {self.start_epoch}"
            )
        if self.world_size < 1:
            raise ValueError(f"--world-size must be >= 1, got {self.world_size}")
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"--optimizer must be 'adam' or 'sgd', got {self.optimizer!r}")
        if self.lr_schedule not in ("exp", "noam"):
            raise ValueError(f"--lr-schedule must be 'exp' or 'noam', got {self.lr_schedule!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"--device must be auto, cpu or cuda, got {self.device!r}")
        if self.max_duration <= 0:
            raise ValueError(f"--max-duration must be > 0 seconds, got {self.max_duration}")
        if not Path(self.lang_dir).is_dir():
            raise FileNotFoundError(
                f"--lang-dir {self.lang_dir} does not exist; create it with "
                f"'k2quant prepare-lang' (the recipe's lang stage)"
            )
        if not Path(self.train_cuts).is_file():
            raise FileNotFoundError(
                f"--train-cuts {self.train_cuts} does not exist; it is written by "
                f"'k2quant compute-fbank' (the recipe's feature stage)"
            )
        if self.valid_cuts and not Path(self.valid_cuts).is_file():
            raise FileNotFoundError(f"--valid-cuts {self.valid_cuts} does not exist")

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# ---------------------------------------------------------------------------------------------
# learning-rate schedule
# ---------------------------------------------------------------------------------------------
class LrSchedule:
    """Warm-up, then Kaldi-style exponential decay or Noam; sets the optimizer's lr each step.

    ``exp``: ``lr = lr0 * (final_lr / lr0) ** progress`` where ``progress`` in [0, 1] is the
    fraction of the training audio seen so far (Kaldi decays over archives processed), times a
    linear warm-up factor ``min(1, step / warmup_steps)``.
    ``noam``: ``lr = lr0 * min(step / warmup_steps, sqrt(warmup_steps / step))`` (peak ``lr0``
    at the end of the warm-up).

    The state (``step``, ``progress``) is in ``state_dict()``, so a resumed run continues on
    the same curve.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, lr: float, final_lr: float,
                 warmup_steps: int, kind: str = "exp"):
        self.optimizer = optimizer
        self.lr0 = float(lr)
        self.final_lr = float(final_lr)
        self.warmup_steps = max(0, int(warmup_steps))
        self.kind = kind
        self.step_count = 0
        self.progress = 0.0
        self._apply()

    def lr(self) -> float:
        s = self.step_count + 1  # the lr used by the next step
        if self.kind == "noam":
            w = max(1, self.warmup_steps)
            return self.lr0 * min(s / w, math.sqrt(w / s))
        warm = min(1.0, s / self.warmup_steps) if self.warmup_steps > 0 else 1.0
        ratio = self.final_lr / self.lr0 if self.lr0 > 0 else 1.0
        return self.lr0 * warm * ratio ** min(1.0, max(0.0, self.progress))

    def _apply(self) -> None:
        lr = self.lr()
        for g in self.optimizer.param_groups:
            g["lr"] = lr

    def step(self, progress: float) -> None:
        """Call after ``optimizer.step()``; ``progress`` is the fraction of training done."""
        self.step_count += 1
        self.progress = float(progress)
        self._apply()

    def state_dict(self) -> Dict[str, Any]:
        return {"step_count": self.step_count, "progress": self.progress, "lr0": self.lr0,
                "final_lr": self.final_lr, "warmup_steps": self.warmup_steps, "kind": self.kind}

    def load_state_dict(self, sd: Dict[str, Any]) -> None:
        self.step_count = int(sd["step_count"])
        self.progress = float(sd["progress"])
        self._apply()


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


# ---------------------------------------------------------------------------------------------
# model and loss construction
# ---------------------------------------------------------------------------------------------
def read_lang_info(lang_dir: str) -> Dict[str, Any]:
    """``lang_dir/lang.json`` (written by ``k2quant prepare-lang``)."""
    p = Path(lang_dir) / "lang.json"
    if not p.is_file():
        raise FileNotFoundError(
            f"{p} not found; --lang-dir must be a directory written by 'k2quant prepare-lang'"
        )
    return json.loads(p.read_text())


def num_output_units(lang_dir: str) -> int:
    """Network output dimension for ``lang_dir`` (``num_pdfs`` in lang.json)."""
    info = read_lang_info(lang_dir)
    for key in ("num_pdfs", "num_tokens", "num_classes"):
        if key in info:
            return int(info[key])
    raise KeyError(f"{lang_dir}/lang.json has no 'num_pdfs' entry: {sorted(info)}")


def build_acoustic_model(cfg: TrainConfig, num_classes: int) -> nn.Module:
    """The model of ``--model-preset`` / ``--model-config`` with ``num_classes`` outputs.

    ``--model-config`` is a JSON file, or an inline JSON object (starting with ``{``), holding
    either a full spec ``{"arch": ..., "config": {...}}`` (built with
    :func:`k2quant.models.build_model`; its output size must match the lang dir) or TDNN-F
    config fields that override the preset's (e.g. ``{"hidden_dim": 768, "xent": true}``).
    The training flag ``--orthonormal-every`` is written into the preset's config.
    """
    from k2quant.models import build_model
    from k2quant.models.tdnnf import TdnnF, get_preset

    overrides: Dict[str, Any] = {}
    if cfg.model_config:
        text = cfg.model_config.strip()
        if not text.startswith("{"):
            path = Path(cfg.model_config)
            if not path.is_file():
                raise FileNotFoundError(
                    f"--model-config {cfg.model_config}: no such file (give a JSON file or an "
                    f"inline JSON object)"
                )
            text = path.read_text()
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"--model-config {cfg.model_config!r} is not valid JSON: {e}") from e
        if not isinstance(obj, dict):
            raise ValueError(f"--model-config {cfg.model_config!r}: expected a JSON object "
                             f"(a model spec or TDNN-F config fields), got {type(obj).__name__}")
        if "arch" in obj and "config" in obj:
            model = build_model(obj)
            out_dim = _spec_output_dim(model.model_spec())
            if out_dim is not None and out_dim != num_classes:
                raise ValueError(
                    f"--model-config spec has output dim {out_dim} but the lang dir's num_pdfs "
                    f"is {num_classes}; fix the spec or use the lang dir it was made for"
                )
            return model
        overrides = dict(obj)
    overrides.setdefault("orthonormal_every", cfg.orthonormal_every)
    for k in ("feat_dim", "num_classes"):
        if k in overrides:
            raise ValueError(f"--model-config must not set {k!r}: it comes from --feat-dim and "
                             f"the lang dir")
    return TdnnF(get_preset(cfg.model_preset, feat_dim=cfg.feat_dim, num_classes=num_classes,
                            **overrides))


def _spec_output_dim(spec: Dict[str, Any]) -> Optional[int]:
    c = spec.get("config", {})
    for k in ("num_classes", "output_dim", "num_pdfs"):
        if k in c:
            return int(c[k])
    return None


LossFn = Callable[[nn.Module, Dict[str, Any]], Tuple[torch.Tensor, Dict[str, float]]]


class MmiObjective:
    """LF-MMI (+ optional xent regulariser) for one batch: the default pluggable loss.

    ``__call__(model, batch) -> (loss, stats)`` where ``loss`` is the scalar to back-propagate
    (summed over frames) and ``stats`` has ``loss`` (the LF-MMI objective ``-(num_tot -
    den_scale * den_tot)`` summed over segments), ``frames`` (network output frames of the kept
    segments), ``dropped`` (segments the loss dropped) and ``xent`` when the regulariser is on.

    The denominator phone LM is ``lang_dir/P_{den_lm_order}gram.arpa``; if it does not exist it
    is estimated from ``train_texts`` and written there (k2quant.training.graph_compiler).
    """

    def __init__(self, lang_dir: str, device: torch.device, cfg: TrainConfig,
                 train_texts: Optional[List[str]] = None, use_xent: bool = False,
                 subsampling_factor: int = 3):
        from k2quant.training.graph_compiler import MmiGraphCompiler
        from k2quant.training.mmi import LFMMILoss

        self.device = device
        self.phone_lm = Path(lang_dir) / f"P_{cfg.den_lm_order}gram.arpa"
        self.graph_compiler = MmiGraphCompiler(
            lang_dir, device=device, den_lm_order=cfg.den_lm_order, train_texts=train_texts,
            phone_lm=self.phone_lm, seed=cfg.seed,
        )
        self.use_xent = bool(use_xent and cfg.xent_regularize > 0)
        self.den_scale = float(cfg.den_scale)
        self.loss = LFMMILoss(
            self.graph_compiler, den_scale=cfg.den_scale, leaky_hmm=cfg.leaky_hmm,
            xent_regularize=cfg.xent_regularize if self.use_xent else 0.0,
            allow_truncate=max(0, int(subsampling_factor) - 1),
            den_output_beam=cfg.den_output_beam,
        )

    def __call__(self, model: nn.Module, batch: Dict[str, Any]):
        x = batch["inputs"].to(self.device)
        inner = ckpt_lib.unwrap_model(model)
        sf = int(getattr(inner, "subsampling_factor", 1))
        seg, texts, _ = supervision_segments(batch["supervisions"], sf)
        if self.use_xent:
            log_probs, xent_log_probs = model(x, return_xent=True)
            loss, info = self.loss(log_probs, seg, texts, xent_log_probs=xent_log_probs)
        else:
            log_probs = model(x)
            loss, info = self.loss(log_probs, seg, texts)
        mmi = -(info["num_tot"] - self.den_scale * info["den_tot"])
        stats = {"loss": float(mmi), "frames": float(info["num_frames"]),
                 "dropped": int(info.get("num_dropped", 0))}
        if "xent" in info:
            stats["xent"] = float(info["xent"])
        if not math.isfinite(float(loss.detach())):
            stats["loss"] = float("nan")
        return loss, stats


def _supports_xent(model: nn.Module) -> bool:
    return getattr(model, "prefinal_xent", None) is not None


def _as_float(v) -> float:
    return float(v.detach()) if isinstance(v, torch.Tensor) else float(v)


def _construct(cls, *args, **kwargs):
    """``cls(*args, **kwargs)`` keeping only the keyword arguments ``cls`` accepts."""
    import inspect

    sig = inspect.signature(cls.__init__)
    if any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values()):
        return cls(*args, **kwargs)
    return cls(*args, **{k: v for k, v in kwargs.items() if k in sig.parameters})


# ---------------------------------------------------------------------------------------------
# one epoch
# ---------------------------------------------------------------------------------------------
@dataclass
class _EpochStats:
    loss: float = 0.0
    frames: float = 0.0
    input_frames: int = 0
    xent: float = 0.0
    batches: int = 0
    skipped: int = 0
    dropped_segments: int = 0
    seconds: float = 0.0

    def loss_per_frame(self) -> float:
        return self.loss / max(self.frames, 1.0)


def _peak_memory_mb(device: torch.device) -> Tuple[str, float]:
    if device.type == "cuda":
        return "cuda_max_allocated", torch.cuda.max_memory_allocated(device) / 2**20
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return "cpu_maxrss", kb / 1024.0


class Trainer:
    """Holds the per-process state of a run (one per DDP rank)."""

    def __init__(self, cfg: TrainConfig, rank: int = 0, world_size: int = 1,
                 model_factory: Optional[Callable[[TrainConfig], nn.Module]] = None,
                 loss_factory: Optional[Callable[[TrainConfig, torch.device], LossFn]] = None):
        self.cfg = cfg
        self.rank = rank
        self.world_size = world_size
        self.exp_dir = Path(cfg.exp_dir)
        self.device = _pick_device(cfg.device, rank)
        self.is_main = rank == 0
        # seed: the model init uses it; DDP then broadcasts rank 0's parameters
        ckpt_lib.fix_random_seed(cfg.seed + rank)
        if model_factory is None:
            n = num_output_units(cfg.lang_dir)
            self.model = build_acoustic_model(cfg, n)
        else:
            self.model = model_factory(cfg)
        self.model.to(self.device)
        self.num_params = sum(p.numel() for p in self.model.parameters())
        self.optimizer = make_optimizer(self.model, cfg)
        self.scheduler = LrSchedule(self.optimizer, cfg.lr, cfg.final_lr, cfg.warmup_steps,
                                    cfg.lr_schedule)
        self.train_cuts = load_cuts(cfg.train_cuts)
        self.filter_stats = None
        if loss_factory is None:
            self.train_cuts, self.filter_stats = _filter_train_cuts(
                self.train_cuts, cfg.lang_dir, int(getattr(self.model, "subsampling_factor", 1)))
        self.train_duration = total_duration(self.train_cuts)
        if self.train_duration <= 0:
            raise ValueError(
                f"--train-cuts {cfg.train_cuts} has no usable audio (total duration 0 after "
                f"filtering: {self.filter_stats})"
            )
        if world_size > 1 and rank != 0:
            _barrier()  # rank 0 first: it may estimate and write the phone LM
        if loss_factory is not None:
            self.objective: LossFn = loss_factory(cfg, self.device)
        else:
            texts = [s.text for c in self.train_cuts for s in c.supervisions if s.text]
            self.objective = MmiObjective(
                cfg.lang_dir, self.device, cfg, train_texts=texts,
                use_xent=_supports_xent(self.model),
                subsampling_factor=int(getattr(self.model, "subsampling_factor", 1)),
            )
        if world_size > 1 and rank == 0:
            _barrier()
        self.sampler = make_train_sampler(
            self.train_cuts, cfg.max_duration, seed=cfg.seed, num_buckets=cfg.num_buckets,
            world_size=world_size, rank=rank,
        )
        sf = int(getattr(self.model, "subsampling_factor", 1))
        self.dataset = AsrDataset(
            utt_cmn=cfg.utt_cmn, spec_augment=SpecAugment() if cfg.spec_augment else None,
            max_frame_shift=sf - 1 if cfg.frame_shift_augment else 0)
        self.train_dl = make_dataloader(self.dataset, self.sampler)
        self.valid_dl = None
        if cfg.valid_cuts:
            vc = load_cuts(cfg.valid_cuts)
            self.valid_dl = make_dataloader(
                AsrDataset(utt_cmn=cfg.utt_cmn),
                make_eval_sampler(vc, cfg.max_duration, world_size, rank))
        self.step = 0
        self.history: List[Dict[str, Any]] = []
        self.ddp_model: nn.Module = self.model
        if world_size > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.ddp_model = DDP(self.model, device_ids=[rank] if self.device.type == "cuda" else None)
        self.tb = None

    # -- resume ------------------------------------------------------------------------------
    def resume(self, start_epoch: int) -> None:
        if start_epoch <= 1:
            return
        path = ckpt_lib.checkpoint_path(self.exp_dir, start_epoch - 1)
        ck = ckpt_lib.load_checkpoint(
            path, self.model, optimizer=self.optimizer, scheduler=self.scheduler,
            map_location=self.device,
        )
        saved_ws = ck.get("config", {}).get("world_size", self.world_size)
        if saved_ws != self.world_size:
            log.warning("resuming with --world-size %d but %s was trained with %d: batches "
                        "differ from the original run", self.world_size, path, saved_ws)
        rngs = ck.get("rng_per_rank") or ([ck["rng"]] if "rng" in ck else [])
        if self.rank < len(rngs):
            ckpt_lib.set_rng_state(rngs[self.rank])
        else:
            log.warning("%s has no RNG state for rank %d; not bit-exact", path, self.rank)
        self.step = int(ck.get("step", 0))
        self.history = list(ck.get("extra", {}).get("history", []))
        if self.is_main:
            log.info("resumed from %s (epoch %d, step %d)", path, ck["epoch"], self.step)

    # -- loop --------------------------------------------------------------------------------
    def _progress(self, epoch: int, seen: float) -> float:
        frac = min(1.0, seen / self.train_duration)
        return ((epoch - 1) + frac) / self.cfg.num_epochs

    def _set_model_progress(self, progress: float) -> None:
        for name in ("set_training_progress", "set_dropout_progress"):
            fn = getattr(self.model, name, None)
            if callable(fn):
                fn(progress)
                return

    def _after_step(self) -> None:
        every = self.cfg.orthonormal_every
        if every > 0 and self.step % every == 0:
            fn = getattr(self.model, "constrain_orthonormal", None)
            if callable(fn):
                with torch.no_grad():
                    fn()

    def train_one_epoch(self, epoch: int) -> _EpochStats:
        cfg = self.cfg
        self.ddp_model.train()
        self.sampler.set_epoch(epoch)
        st = _EpochStats()
        seen = 0.0
        t0 = time.time()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        bar = None
        if self.is_main and cfg.progress_bar and sys.stderr.isatty():
            from tqdm import tqdm

            bar = tqdm(total=round(self.train_duration / 60.0, 1), unit="min",
                       desc=f"epoch {epoch}", file=sys.stderr, dynamic_ncols=True, leave=False,
                       bar_format="{l_bar}{bar}| {n:.1f}/{total:.1f} min audio [{elapsed}<{remaining}{postfix}]")
        for batch_idx, batch in enumerate(self.train_dl):
            dur = _batch_duration(batch) * self.world_size
            self._set_model_progress(self._progress(epoch, seen))
            loss, stats = self.objective(self.ddp_model, batch)
            self.optimizer.zero_grad(set_to_none=True)
            # Always back-propagate (DDP ranks must all-reduce in step); after DDP's all-reduce
            # the gradients are identical on every rank, so every rank takes the same decision.
            loss.backward()
            grad_norm = _grad_norm(self.model, cfg.grad_clip)
            seen += dur
            if not (math.isfinite(stats["loss"]) and math.isfinite(grad_norm)):
                st.skipped += 1
                log.warning("epoch %d batch %d: non-finite loss (%s) or gradient norm (%s); "
                            "step skipped (cuts %s ...)", epoch, batch_idx, stats["loss"],
                            grad_norm, batch["supervisions"]["cut_id"][:3])
                self.optimizer.zero_grad(set_to_none=True)
                continue
            self.optimizer.step()
            self.step += 1
            self.scheduler.step(self._progress(epoch, seen))
            self._after_step()
            st.loss += stats["loss"]
            st.frames += stats["frames"]
            st.xent += stats.get("xent", 0.0)
            st.dropped_segments += int(stats.get("dropped", 0))
            st.input_frames += int(batch["supervisions"]["num_frames"].sum())
            st.batches += 1
            if bar is not None:
                bar.update(round(dur / 60.0, 3) / 1.0)
                bar.set_postfix_str(f"loss/frame {st.loss_per_frame():.4f}", refresh=False)
            if self.is_main and bar is None and st.batches % cfg.log_interval == 0:
                el = time.time() - t0
                log.info("epoch %d, batch %d: loss/frame %.4f (this batch %.4f), %.0f%% of the "
                         "epoch's audio, %.0f input frames/s, lr %.3g", epoch, batch_idx + 1,
                         st.loss_per_frame(), stats["loss"] / max(stats["frames"], 1.0),
                         100.0 * min(1.0, seen / self.train_duration),
                         st.input_frames / max(el, 1e-9), self.optimizer.param_groups[0]["lr"])
            if self.is_main and self.tb is not None and self.step % cfg.log_interval == 0:
                self.tb.add_scalar("train/loss_per_frame_batch",
                                   stats["loss"] / max(stats["frames"], 1.0), self.step)
                self.tb.add_scalar("train/lr", self.optimizer.param_groups[0]["lr"], self.step)
        if bar is not None:
            bar.close()
        st.seconds = time.time() - t0
        st = self._reduce(st)
        return st

    def _reduce(self, st: _EpochStats) -> _EpochStats:
        if self.world_size == 1:
            return st
        import torch.distributed as dist

        t = torch.tensor([st.loss, st.frames, float(st.input_frames), st.xent,
                          float(st.batches), float(st.skipped)], dtype=torch.float64,
                         device=self.device)
        dist.all_reduce(t)
        st.loss, st.frames, inf, st.xent, b, s = t.tolist()
        st.input_frames, st.batches, st.skipped = int(inf), int(b), int(s)
        return st

    @torch.no_grad()
    def validate(self) -> Optional[_EpochStats]:
        if self.valid_dl is None:
            return None
        self.ddp_model.eval()
        st = _EpochStats()
        t0 = time.time()
        for batch in self.valid_dl:
            _, stats = self.objective(self.model, batch)
            if not math.isfinite(stats["loss"]):
                st.skipped += 1
                continue
            st.loss += stats["loss"]
            st.frames += stats["frames"]
            st.xent += stats.get("xent", 0.0)
            st.batches += 1
        st.seconds = time.time() - t0
        self.ddp_model.train()
        return self._reduce(st)

    def _gather_rng(self) -> List[Dict[str, Any]]:
        state = ckpt_lib.get_rng_state()
        if self.world_size == 1:
            return [state]
        import torch.distributed as dist

        out: List[Any] = [None] * self.world_size
        dist.all_gather_object(out, state)
        return out

    def run(self) -> List[Dict[str, Any]]:
        cfg = self.cfg
        if self.is_main:
            self.exp_dir.mkdir(parents=True, exist_ok=True)
            if cfg.tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter

                    self.tb = SummaryWriter(log_dir=str(self.exp_dir / "tensorboard"))
                except ImportError as e:  # pragma: no cover
                    log.warning("tensorboard unavailable (%s); no TensorBoard logs", e)
        self.resume(cfg.start_epoch)
        for epoch in range(cfg.start_epoch, cfg.num_epochs + 1):
            st = self.train_one_epoch(epoch)
            vs = self.validate()
            mem_kind, mem_mb = _peak_memory_mb(self.device)
            rec = {
                "epoch": epoch,
                "step": self.step,
                "lr": self.optimizer.param_groups[0]["lr"],
                "train_loss_per_frame": st.loss_per_frame(),
                "train_frames": st.frames,
                "train_batches": st.batches,
                "skipped_batches": st.skipped,
                "dropped_segments": st.dropped_segments,
                "seconds": round(st.seconds, 2),
                "input_frames_per_second": round(st.input_frames / max(st.seconds, 1e-9), 1),
                f"peak_mem_mb_{mem_kind}": round(mem_mb, 1),
            }
            if st.xent:
                rec["train_xent_per_frame"] = st.xent / max(st.frames, 1.0)
            if vs is not None:
                rec["valid_loss_per_frame"] = vs.loss_per_frame()
                rec["valid_frames"] = vs.frames
            self.history.append(rec)
            rngs = self._gather_rng()
            if self.is_main:
                log.info(
                    "epoch %d: train loss/frame %.5f over %d frames (%d batches, %d skipped), "
                    "%s%s%.1f s, %.0f input frames/s, peak memory %.1f MiB (%s), lr %.3g",
                    epoch, rec["train_loss_per_frame"], st.frames, st.batches, st.skipped,
                    (f"xent/frame {rec['train_xent_per_frame']:.4f}, "
                     if "train_xent_per_frame" in rec else ""),
                    (f"valid loss/frame {rec['valid_loss_per_frame']:.5f}, " if vs else ""),
                    st.seconds, rec["input_frames_per_second"], mem_mb, mem_kind, rec["lr"],
                )
                if self.tb is not None:
                    self.tb.add_scalar("train/loss_per_frame", rec["train_loss_per_frame"], epoch)
                    self.tb.add_scalar("train/frames_per_second", rec["input_frames_per_second"], epoch)
                    self.tb.add_scalar("train/peak_mem_mb", mem_mb, epoch)
                    if vs is not None:
                        self.tb.add_scalar("valid/loss_per_frame", rec["valid_loss_per_frame"], epoch)
                    self.tb.flush()
                path = ckpt_lib.checkpoint_path(self.exp_dir, epoch)
                ckpt_lib.save_checkpoint(
                    path, self.model, epoch=epoch, step=self.step, optimizer=self.optimizer,
                    scheduler=self.scheduler, sampler=self.sampler, config=cfg.to_dict(),
                    extra={"history": self.history}, rng=rngs,
                )
                atomic_write_json(self.exp_dir / "train-history.json", self.history)
            if self.world_size > 1:
                import torch.distributed as dist

                dist.barrier()
        if self.tb is not None:
            self.tb.close()
        return self.history


def _barrier() -> None:
    import torch.distributed as dist

    dist.barrier()


def _filter_train_cuts(cuts, lang_dir: str, subsampling_factor: int):
    """Drop unusable training cuts (k2quant.data.cuts.filter_cuts) and map OOVs to <UNK>.

    Empty transcripts, too short/long cuts and cuts with fewer output frames than phones are
    dropped and counted (logged); OOV words become the lang's OOV word (counted, warned).
    """
    from k2quant.data.cuts import filter_cuts
    from k2quant.lang import read_lexicon

    info = read_lang_info(lang_dir)
    lexicon = read_lexicon(Path(lang_dir) / "lexicon.txt")
    kept, stats = filter_cuts(cuts, lexicon=lexicon, subsampling_factor=subsampling_factor,
                              map_oov_to=info.get("oov", "<UNK>"))
    dropped = stats.total - stats.kept
    if dropped:
        log.warning("training cuts: %d of %d dropped (%s)", dropped, stats.total,
                    {k: getattr(stats, k) for k in ("empty_text", "too_short", "too_long",
                                                    "too_few_frames")})
    if stats.oov_tokens:
        log.warning("training cuts: %d OOV word tokens mapped to %s", stats.oov_tokens,
                    info.get("oov", "<UNK>"))
    return kept, stats


def _batch_duration(batch: Dict[str, Any]) -> float:
    return float(batch["duration"])


def _grad_norm(model: nn.Module, clip: float) -> float:
    """Total gradient 2-norm; clips to ``clip`` when ``clip > 0``."""
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return 0.0
    if clip > 0:
        return float(torch.nn.utils.clip_grad_norm_(params, clip))
    return float(torch.norm(torch.stack([p.grad.detach().norm() for p in params])))


def _pick_device(kind: str, rank: int) -> torch.device:
    if kind == "cpu" or (kind == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("--device cuda requested but CUDA is not available; use --device cpu")
    torch.cuda.set_device(rank)
    return torch.device("cuda", rank)


# ---------------------------------------------------------------------------------------------
# entry points
# ---------------------------------------------------------------------------------------------
def _setup_logging(exp_dir: Path, rank: int) -> Optional[logging.Handler]:
    exp_dir.joinpath("log").mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=logging.INFO,
                            format="%(asctime)s %(levelname)s [%(name)s] %(message)s")
    if rank == 0:
        stamp = time.strftime("%Y-%m-%d-%H-%M-%S")
        fh = logging.FileHandler(exp_dir / "log" / f"log-train-{stamp}.txt")
        fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s [%(name)s] %(message)s"))
        fh.setLevel(logging.INFO)
        root.addHandler(fh)
        if root.level > logging.INFO or root.level == logging.NOTSET:
            root.setLevel(logging.INFO)
        return fh
    root.setLevel(logging.WARNING)
    return None


def _versions() -> Dict[str, str]:
    import importlib

    out = {"python": sys.version.split()[0], "torch": torch.__version__}
    for mod, attr_mod in (("k2", "k2.version"), ("lhotse", "lhotse")):
        try:
            out[mod] = str(getattr(importlib.import_module(attr_mod), "__version__", "?"))
        except ImportError:
            out[mod] = "absent"
    return out


def run_rank(rank: int, world_size: int, cfg_dict: Dict[str, Any],
             model_factory=None, loss_factory=None) -> List[Dict[str, Any]]:
    """Body of one process (called directly for world_size 1, through mp.spawn otherwise)."""
    cfg = TrainConfig.from_dict(cfg_dict)
    exp_dir = Path(cfg.exp_dir)
    handler = _setup_logging(exp_dir, rank)
    if cfg.num_threads > 0:
        torch.set_num_threads(cfg.num_threads)
    if world_size > 1:
        import torch.distributed as dist

        os.environ.setdefault("MASTER_ADDR", "localhost")
        os.environ["MASTER_PORT"] = str(cfg.master_port)
        use_cuda = cfg.device != "cpu" and torch.cuda.is_available()
        backend = "nccl" if use_cuda else "gloo"
        dist.init_process_group(backend, rank=rank, world_size=world_size)
    try:
        trainer = Trainer(cfg, rank, world_size, model_factory, loss_factory)
        if rank == 0:
            info = {
                "config": cfg.to_dict(),
                "device": str(trainer.device),
                "num_params": trainer.num_params,
                "model_spec": getattr(trainer.model, "model_spec", lambda: None)(),
                "train_duration_hours": round(trainer.train_duration / 3600.0, 3),
                "versions": _versions(),
                "torch_threads": torch.get_num_threads(),
                "command": " ".join(sys.argv),
            }
            log.info("training configuration:\n%s", json.dumps(info, indent=2, default=str))
            atomic_write_json(exp_dir / "train-config.json", info)
        return trainer.run()
    finally:
        if handler is not None:
            logging.getLogger().removeHandler(handler)
            handler.close()
        if world_size > 1:
            import torch.distributed as dist

            dist.destroy_process_group()


def _spawn_entry(rank, world_size, cfg_dict):
    run_rank(rank, world_size, cfg_dict)


def train(cfg: TrainConfig, model_factory=None, loss_factory=None) -> List[Dict[str, Any]]:
    """Train according to ``cfg``; returns the per-epoch history (rank 0's view).

    ``model_factory(cfg) -> nn.Module`` and ``loss_factory(cfg, device) -> loss_fn`` replace the
    TDNN-F preset and the LF-MMI objective (``loss_fn(model, batch) -> (loss, stats)`` with
    ``stats["loss"]``, ``stats["frames"]``); they are for single-process use (tests).
    """
    cfg.validate()
    if cfg.world_size == 1:
        return run_rank(0, 1, cfg.to_dict(), model_factory, loss_factory)
    if model_factory is not None or loss_factory is not None:
        raise ValueError("custom model/loss factories are supported only with world_size 1")
    if cfg.device != "cpu" and torch.cuda.is_available() and torch.cuda.device_count() < cfg.world_size:
        raise ValueError(
            f"--world-size {cfg.world_size} needs that many GPUs, found "
            f"{torch.cuda.device_count()}; lower it or use --device cpu (gloo)"
        )
    import torch.multiprocessing as mp

    mp.spawn(_spawn_entry, args=(cfg.world_size, cfg.to_dict()), nprocs=cfg.world_size, join=True)
    hist = Path(cfg.exp_dir) / "train-history.json"
    return json.loads(hist.read_text()) if hist.is_file() else []
