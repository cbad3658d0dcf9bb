"""Training checkpoints: save, resume bit-exactly, average.

A checkpoint ``exp_dir/epoch-N.pt`` is written (atomically, through
:func:`k2quant.utils.io.atomic_torch_save`) at the end of epoch ``N`` and holds everything the
training loop needs to continue as if it had never stopped:

- ``model``: ``state_dict()`` of the unwrapped model (no ``module.`` prefix from DDP);
- ``model_spec``: ``model.model_spec()`` (``{"arch", "config"}``), so the model can be rebuilt
  with :func:`k2quant.models.build_model` without the training flags;
- ``optimizer``, ``scheduler``: their ``state_dict()``;
- ``sampler``: ``state_dict()`` of the lhotse training sampler;
- ``rng``: python ``random``, numpy and torch (CPU and every CUDA device) RNG states;
  ``rng_per_rank`` (DDP): those of every rank;
- ``epoch`` (the epoch just finished), ``step`` (global optimizer steps), ``config`` (the
  training configuration, JSON-able), ``extra`` (loss history, ...).

The RNG states are captured *after* everything that consumes randomness in epoch ``N``
(including validation), so loading ``epoch-N.pt`` and running epoch ``N+1`` gives results
identical, bit for bit, to an uninterrupted run with the same seed.

Averaging (:func:`average_checkpoints`) follows icefall: floating-point entries of the model
state dicts are averaged; integer entries (e.g. BatchNorm's ``num_batches_tracked``) are taken
from the last checkpoint.
"""
import logging
import random
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn

from k2quant.utils.io import atomic_torch_save, load_trusted

PathLike = Union[str, Path]

log = logging.getLogger(__name__)


def unwrap_model(model: nn.Module) -> nn.Module:
    """Return the module inside a DistributedDataParallel/DataParallel wrapper (or ``model``)."""
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model


# ---------------------------------------------------------------------------------------------
# RNG states
# ---------------------------------------------------------------------------------------------
def get_rng_state() -> Dict[str, Any]:
    """Capture the python, numpy and torch (CPU + all CUDA devices) RNG states."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restore RNG states captured by :func:`get_rng_state`."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
        else:
            log.warning(
                "checkpoint has CUDA RNG states for %d devices but %d are visible; "
                "CUDA RNG not restored (results will not be bit-identical)",
                len(cuda_states), torch.cuda.device_count(),
            )


def fix_random_seed(seed: int) -> None:
    """Seed python ``random``, numpy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


# ---------------------------------------------------------------------------------------------
# save / load
# ---------------------------------------------------------------------------------------------
def checkpoint_path(exp_dir: PathLike, epoch: int) -> Path:
    """``exp_dir/epoch-{epoch}.pt``."""
    return Path(exp_dir) / f"epoch-{epoch}.pt"


def save_checkpoint(
    path: PathLike,
    model: nn.Module,
    *,
    epoch: int,
    step: int = 0,
    optimizer: Optional[torch.optim.Optimizer] = None,
    scheduler: Optional[Any] = None,
    sampler: Optional[Any] = None,
    config: Optional[Dict[str, Any]] = None,
    extra: Optional[Dict[str, Any]] = None,
    rng: Union[bool, List[Dict[str, Any]]] = True,
) -> None:
    """Write a checkpoint atomically (see the module docstring for its keys).

    Args:
      path: destination, usually :func:`checkpoint_path` ``(exp_dir, epoch)``.
      model: the model, possibly DDP-wrapped (the wrapper is removed).
      epoch: the epoch just finished (1-based).
      step: global optimizer step count.
      optimizer, scheduler, sampler: objects with ``state_dict()``; ``None`` skips them.
      config: JSON-able training configuration.
      extra: more JSON-able/picklable data.
      rng: ``True`` captures this process's RNG states (needed for bit-exact resume);
        a list stores the given per-rank states (DDP: rank ``r`` resumes from ``rng[r]``).
    """
    inner = unwrap_model(model)
    ckpt: Dict[str, Any] = {
        "model": inner.state_dict(),
        "model_spec": inner.model_spec() if hasattr(inner, "model_spec") else None,
        "epoch": int(epoch),
        "step": int(step),
        "config": config or {},
        "extra": extra or {},
    }
    if optimizer is not None:
        ckpt["optimizer"] = optimizer.state_dict()
    if scheduler is not None:
        ckpt["scheduler"] = scheduler.state_dict()
    if sampler is not None:
        try:
            ckpt["sampler"] = sampler.state_dict()
        except (AssertionError, AttributeError, NotImplementedError) as e:  # pragma: no cover
            log.warning("sampler state not saved (%s)", e)
    if isinstance(rng, list):
        ckpt["rng"] = rng[0]
        ckpt["rng_per_rank"] = rng
    elif rng:
        ckpt["rng"] = get_rng_state()
    atomic_torch_save(ckpt, path)
    log.info("saved checkpoint %s (epoch %d, step %d)", path, epoch, step)


def load_checkpoint(
    path: PathLike,
    model: Optional[nn.Module] = None,
    *,
    optimizer: Optional[torch.optim.Optimizer] = None,
    scheduler: Optional[Any] = None,
    restore_rng: bool = False,
    map_location: Union[str, torch.device] = "cpu",
    strict: bool = True,
) -> Dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` into the given objects.

    The lhotse sampler is not restored here: at an epoch boundary the training loop only needs
    ``sampler.set_epoch(epoch + 1)`` (lhotse's ``load_state_dict`` would replay the finished
    epoch); the saved ``sampler`` entry is returned for callers that want it.

    Returns:
      the checkpoint dict (``epoch``, ``step``, ``config``, ``extra``, ``sampler``, ...).

    Raises:
      FileNotFoundError: ``path`` does not exist (the message lists the checkpoints present).
    """
    path = Path(path)
    if not path.is_file():
        present = sorted(p.name for p in path.parent.glob("epoch-*.pt")) if path.parent.is_dir() else []
        raise FileNotFoundError(
            f"checkpoint {path} not found; checkpoints present in {path.parent}: "
            f"{present or 'none'}. Train those epochs first or pick another --epoch/--start-epoch."
        )
    ckpt = load_trusted(path, map_location=map_location)
    if model is not None:
        unwrap_model(model).load_state_dict(ckpt["model"], strict=strict)
    if optimizer is not None:
        if "optimizer" not in ckpt:
            raise KeyError(f"{path} has no optimizer state; cannot resume training from it")
        optimizer.load_state_dict(ckpt["optimizer"])
    if scheduler is not None:
        if "scheduler" not in ckpt:
            raise KeyError(f"{path} has no scheduler state; cannot resume training from it")
        scheduler.load_state_dict(ckpt["scheduler"])
    if restore_rng:
        if "rng" not in ckpt:
            raise KeyError(f"{path} has no RNG state; cannot resume bit-exactly from it")
        set_rng_state(ckpt["rng"])
    return ckpt


# ---------------------------------------------------------------------------------------------
# averaging
# ---------------------------------------------------------------------------------------------
def checkpoints_to_average(exp_dir: PathLike, epoch: int, avg: int) -> List[Path]:
    """Paths of ``epoch-{epoch-avg+1}.pt .. epoch-{epoch}.pt`` (icefall's ``--epoch --avg``).

    Raises:
      ValueError: ``avg < 1`` or ``epoch - avg + 1 < 1``.
      FileNotFoundError: one of them is missing (all missing ones are named).
    """
    if avg < 1:
        raise ValueError(f"--avg must be >= 1, got {avg}")
    first = epoch - avg + 1
    if first < 1:
        raise ValueError(
            f"--epoch {epoch} --avg {avg} would need epochs {first}..{epoch}; "
            f"use --avg <= {epoch}"
        )
    paths = [checkpoint_path(exp_dir, e) for e in range(first, epoch + 1)]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        present = sorted(p.name for p in Path(exp_dir).glob("epoch-*.pt"))
        raise FileNotFoundError(
            f"missing checkpoint(s) for --epoch {epoch} --avg {avg}: {missing}; "
            f"present in {exp_dir}: {present or 'none'}"
        )
    return paths


def average_state_dicts(state_dicts: Sequence[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """Average floating-point tensors; keep integer tensors from the last state dict.

    Sums are accumulated in float64 and cast back to each tensor's dtype.
    """
    if not state_dicts:
        raise ValueError("average_state_dicts: need at least one state dict")
    keys = list(state_dicts[-1].keys())
    for i, sd in enumerate(state_dicts):
        if list(sd.keys()) != keys:
            diff = set(sd.keys()) ^ set(keys)
            raise ValueError(
                f"average_state_dicts: state dict {i} has different keys from the last one "
                f"(differences: {sorted(diff)[:10]}); were they trained with the same model?"
            )
    out: Dict[str, torch.Tensor] = {}
    n = len(state_dicts)
    for k in keys:
        last = state_dicts[-1][k]
        if torch.is_floating_point(last):
            acc = torch.zeros_like(last, dtype=torch.float64)
            for sd in state_dicts:
                acc += sd[k].to(torch.float64)
            out[k] = (acc / n).to(last.dtype)
        else:
            out[k] = last.clone()
    return out


def average_checkpoints(paths: Sequence[PathLike], map_location: str = "cpu") -> Dict[str, Any]:
    """Load ``paths`` and return a checkpoint-like dict with the averaged ``model`` state dict.

    The returned dict has ``model`` (averaged), ``model_spec``, ``config`` and ``epoch`` of the
    last checkpoint, and ``averaged_from`` (the file names).
    """
    if not paths:
        raise ValueError("average_checkpoints: no checkpoints given")
    ckpts = [load_trusted(p, map_location=map_location) for p in paths]
    specs = {repr(c.get("model_spec")) for c in ckpts}
    if len(specs) > 1:
        raise ValueError(
            f"average_checkpoints: checkpoints {[str(p) for p in paths]} have different model "
            f"specs; average only checkpoints of one training run"
        )
    avg = average_state_dicts([c["model"] for c in ckpts])
    last = ckpts[-1]
    return {
        "model": avg,
        "model_spec": last.get("model_spec"),
        "config": last.get("config", {}),
        "epoch": last.get("epoch"),
        "averaged_from": [Path(p).name for p in paths],
    }


def model_from_checkpoint(ck: Dict[str, Any], source: PathLike, device: str = "cpu") -> nn.Module:
    """Rebuild the model of a checkpoint dict (``model_spec`` + ``model``, e.g. from
    :func:`average_checkpoints`) in eval mode; ``ValueError`` naming ``source`` without a spec."""
    from k2quant.models import build_model

    if not isinstance(ck.get("model_spec"), dict):
        raise ValueError(
            f"{source} has no model_spec; it was not written by k2quant's training loop "
            f"('k2quant train' / 'k2quant average-checkpoints')"
        )
    model = build_model(ck["model_spec"])
    model.load_state_dict(ck["model"])
    model.to(device)
    model.eval()
    return model


def load_averaged_model(exp_dir: PathLike, epoch: int, avg: int, device: str = "cpu") -> nn.Module:
    """Rebuild the model of ``exp_dir`` from its spec and load the ``--epoch/--avg`` average.

    ``avg == 1`` loads ``epoch-{epoch}.pt`` as is. The model is returned in eval mode.
    """
    paths = checkpoints_to_average(exp_dir, epoch, avg)
    model = model_from_checkpoint(average_checkpoints(paths), paths[-1], device)
    log.info("loaded model from %s", ", ".join(p.name for p in paths))
    return model
