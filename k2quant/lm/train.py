"""Training and evaluating the Transformer LM (``k2quant train-lm`` / ``k2quant eval-lm``).

:func:`train_lm` trains :class:`k2quant.models.transformer_lm.TransformerLM` on a text file:

1. vocabulary (``unit="word"``: :func:`k2quant.lm.text.build_vocab`; ``unit="bpe"``: a
   sentencepiece model trained on the training text, :func:`k2quant.lm.text.train_bpe`),
   written to ``exp_dir/tokenizer.json`` (and ``exp_dir/bpe.model``) and stored in the model
   config, so every checkpoint is self-contained;
2. per epoch: batches of at most ``max_tokens`` padded tokens (sentences sorted by length; the
   batch order shuffled with ``random.Random(seed + epoch)``), Adam (betas 0.9/0.98) with the
   "noam" warm-up ``lr = lr_peak * min(step / warmup, sqrt(warmup / step))``, gradient
   clipping; then the held-out perplexity of ``valid_text``;
3. ``exp_dir/epoch-N.pt`` after each epoch, written atomically by
   :func:`k2quant.training.checkpoint.save_checkpoint` (model, ``model_spec``, optimizer,
   scheduler, step, RNG states captured after validation, config, history), and
   ``exp_dir/lm-history.json`` (one entry per epoch). ``start_epoch=N`` loads ``epoch-(N-1).pt``
   and continues bit-identically to an uninterrupted run (same seed, same flags).

Perplexity is ``exp(total nll / predicted tokens)`` where every sentence predicts its tokens
and one ``<eos>``; ``<unk>`` tokens are predicted like any other token and their number is
reported next to the perplexity (a vocabulary that maps many words to ``<unk>`` looks better
than it is). For BPE models ``word_ppl`` renormalises the same total by words + sentences, so
word and BPE models can be compared.

Logs go to the ``k2quant.lm.train`` logger and to ``exp_dir/log/log-train-lm.txt``.

Defaults suit AN4-scale text (~1k sentences, ~100 words): the "small" preset with
``max_tokens=500``, ``warmup_steps=100``, 20 epochs trains in ~10 s on 2 CPU threads and
reaches a held-out perplexity of about 15 (word unit; 850 AN4 training transcripts for training,
the other 98 held out). Larger corpora want larger batches (``max_tokens`` 4000+).

Multi-GPU (DDP) training is not implemented: LMs for the corpora here train in minutes on one
device (``device="auto"`` picks CUDA when available).
"""
import contextlib
import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence

import torch

from k2quant.lm.text import (
    EncodedText,
    Tokenizer,
    build_vocab,
    make_batches,
    pad_batch,
    read_sentences,
    tokenizer_from_dict,
    train_bpe,
)
from k2quant.utils.io import atomic_write_json

log = logging.getLogger(__name__)


@dataclass
class LmTrainConfig:
    """Flags of :func:`train_lm` (JSON-able; stored in every checkpoint)."""

    train_text: str
    valid_text: str
    exp_dir: str
    unit: str = "word"                 # "word" | "bpe"
    text_format: str = "plain"         # "plain" | "kaldi" (first field = utterance id)
    bpe_vocab_size: int = 200
    min_count: int = 1                 # word unit: rarer words -> <unk>
    max_words: Optional[int] = None    # word unit: keep the most frequent words only
    preset: str = "small"              # TransformerLM preset ("small", "paper")
    d_model: Optional[int] = None      # overrides of the preset
    num_heads: Optional[int] = None
    num_layers: Optional[int] = None
    dim_feedforward: Optional[int] = None
    dropout: Optional[float] = None
    num_epochs: int = 20
    start_epoch: int = 1
    lr: float = 1e-3                   # peak learning rate (end of warm-up)
    warmup_steps: int = 100
    weight_decay: float = 0.0
    grad_clip: float = 5.0
    max_tokens: int = 500              # padded tokens per batch (AN4: ~12 batches/epoch)
    seed: int = 42
    device: str = "auto"               # "auto" | "cpu" | "cuda"
    num_threads: int = 0               # torch intra-op threads (0: torch's default)
    log_interval: int = 100            # batches between progress log lines

    def validate(self) -> None:
        if self.unit not in ("word", "bpe"):
            raise ValueError(f"unit must be 'word' or 'bpe', got {self.unit!r}")
        if self.text_format not in ("plain", "kaldi"):
            raise ValueError(f"text_format must be 'plain' or 'kaldi', got {self.text_format!r}")
        if self.num_epochs < 1 or not (1 <= self.start_epoch <= self.num_epochs + 1):
            raise ValueError(f"need num_epochs >= 1 and 1 <= start_epoch <= num_epochs + 1, got "
                             f"num_epochs={self.num_epochs}, start_epoch={self.start_epoch}")
        if self.lr <= 0 or self.warmup_steps < 0 or self.max_tokens < 1:
            raise ValueError(f"need lr > 0, warmup_steps >= 0, max_tokens >= 1; got lr={self.lr}, "
                             f"warmup_steps={self.warmup_steps}, max_tokens={self.max_tokens}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


class WarmupLR:
    """"noam" learning rate: ``lr * min(s / warmup, sqrt(warmup / s))`` for step ``s >= 1``
    (constant ``lr`` if ``warmup == 0``). Call :meth:`step` after each optimizer step."""

    def __init__(self, optimizer: torch.optim.Optimizer, lr: float, warmup_steps: int):
        self.optimizer = optimizer
        self.peak = float(lr)
        self.warmup = int(warmup_steps)
        self.step_count = 0
        self._apply()

    def lr(self) -> float:
        s = self.step_count + 1  # the step about to be taken
        if self.warmup <= 0:
            return self.peak
        return self.peak * min(s / self.warmup, math.sqrt(self.warmup / s))

    def _apply(self) -> None:
        for g in self.optimizer.param_groups:
            g["lr"] = self.lr()

    def step(self) -> None:
        self.step_count += 1
        self._apply()

    def state_dict(self) -> Dict[str, Any]:
        return {"step_count": self.step_count, "peak": self.peak, "warmup": self.warmup}

    def load_state_dict(self, sd: Dict[str, Any]) -> None:
        self.step_count = int(sd["step_count"])
        self._apply()


# ------------------------------------------------------------------------------ evaluation


@torch.no_grad()
def evaluate_perplexity(
    model, enc: EncodedText, *, max_tokens: int = 4000, num_sentences: Optional[int] = None
) -> Dict[str, Any]:
    """Perplexity of ``model`` on encoded text (see the module docstring).

    Returns:
      ``{"ppl", "nll_per_token", "total_nll", "num_tokens", "num_sentences", "num_words",
      "num_oov", "oov_rate", "word_ppl"}`` (floats/ints; JSON-able).
    """
    if not enc.ids:
        raise ValueError("evaluate_perplexity: no sentences to evaluate")
    scores = model.score_sentences(enc.ids, max_tokens=max_tokens)
    total_nll = -float(scores.sum())
    n_tok = enc.num_tokens
    n_sent = len(enc.ids) if num_sentences is None else num_sentences
    nll = total_nll / n_tok
    return {
        "ppl": math.exp(nll),
        "nll_per_token": nll,
        "total_nll": total_nll,
        "num_tokens": n_tok,
        "num_sentences": n_sent,
        "num_words": enc.num_words,
        "num_oov": enc.num_oov,
        "oov_rate": enc.oov_rate,
        "word_ppl": math.exp(total_nll / max(1, enc.num_words + n_sent)),
    }


def eval_lm(lm_path, text_path, *, text_format: str = "plain", max_tokens: int = 4000,
            device: str = "cpu") -> Dict[str, Any]:
    """Load an LM (checkpoint or packed file) and compute its perplexity on ``text_path``."""
    from k2quant.models.transformer_lm import load_lm

    model = load_lm(lm_path, device=_pick_device(device))
    enc = model.tokenizer.encode(read_sentences(text_path, text_format))
    res = evaluate_perplexity(model, enc, max_tokens=max_tokens)
    res.update({"lm": str(lm_path), "text": str(text_path), "unit": model.tokenizer.unit,
                "oov_words": dict(enc.oov_counts.most_common(20))})
    return res


# -------------------------------------------------------------------------------- training


def _pick_device(kind: str, cpu_hint: str = "use --device cpu") -> torch.device:
    """``"auto"``/``"cpu"``/``"cuda"`` -> a device (shared with :mod:`k2quant.lm.compress`)."""
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device 'cuda' requested but CUDA is not available; {cpu_hint}")
    if kind in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


@contextlib.contextmanager
def _logged_run(out_dir: Path, log_name: str, num_threads: int) -> Iterator[None]:
    """Log the ``k2quant`` package at INFO (at least) to ``out_dir/log/log_name`` and use
    ``num_threads`` torch threads (if > 0) for the body; restores both afterwards. Shared by
    :func:`train_lm` and :func:`k2quant.lm.compress.compress_lm`."""
    (out_dir / "log").mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(out_dir / "log" / log_name, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s [%(name)s] %(message)s"))
    handler.setLevel(logging.INFO)
    pkg_log = logging.getLogger("k2quant")
    pkg_log.addHandler(handler)
    prev_level = pkg_log.level
    if pkg_log.getEffectiveLevel() > logging.INFO:
        pkg_log.setLevel(logging.INFO)  # the log file gets INFO lines even if the console not
    prev_threads = torch.get_num_threads()
    try:
        if num_threads > 0:
            torch.set_num_threads(num_threads)
        yield
    finally:
        torch.set_num_threads(prev_threads)
        pkg_log.setLevel(prev_level)
        pkg_log.removeHandler(handler)
        handler.close()


def build_tokenizer(cfg: LmTrainConfig, sentences: Sequence[Sequence[str]]) -> Tokenizer:
    """The vocabulary of a new run (word list or a freshly trained sentencepiece model)."""
    if cfg.unit == "word":
        return build_vocab(sentences, min_count=cfg.min_count, max_words=cfg.max_words)
    return train_bpe(sentences, cfg.bpe_vocab_size, work_dir=cfg.exp_dir)


def train_lm(cfg: LmTrainConfig) -> List[Dict[str, Any]]:
    """Train (or resume) an LM; returns the per-epoch history (see the module docstring).

    Raises:
      FileNotFoundError: missing text files, or the checkpoint to resume from.
      ValueError: bad flags; a resumed run whose architecture flags differ from the checkpoint.
    """
    from k2quant.models.transformer_lm import TransformerLM, TransformerLMConfig
    from k2quant.training.checkpoint import (
        checkpoint_path,
        fix_random_seed,
        save_checkpoint,
        set_rng_state,
    )

    cfg.validate()
    exp_dir = Path(cfg.exp_dir)
    exp_dir.mkdir(parents=True, exist_ok=True)
    with _logged_run(exp_dir, "log-train-lm.txt", cfg.num_threads):
        device = _pick_device(cfg.device)
        log.info("train-lm config: %s", json.dumps(cfg.to_dict(), sort_keys=True))
        log.info("torch %s, device %s, %d threads", torch.__version__, device,
                 torch.get_num_threads())

        train_sents = read_sentences(cfg.train_text, cfg.text_format)
        valid_sents = read_sentences(cfg.valid_text, cfg.text_format)

        ckpt = None
        if cfg.start_epoch > 1:
            prev = checkpoint_path(exp_dir, cfg.start_epoch - 1)
            if not prev.is_file():
                present = sorted(p.name for p in exp_dir.glob("epoch-*.pt"))
                raise FileNotFoundError(
                    f"--start-epoch {cfg.start_epoch} resumes from {prev}, which does not exist; "
                    f"checkpoints in {exp_dir}: {present or 'none'}"
                )
            # RNG states hold numpy objects: weights_only=False (our own trusted checkpoint)
            ckpt = torch.load(prev, map_location="cpu", weights_only=False)
            spec_cfg = dict(ckpt["model_spec"]["config"])
            _check_resume_flags(cfg, ckpt.get("config", {}), prev)
            tokenizer = tokenizer_from_dict(spec_cfg["tokenizer"])
            model_cfg = TransformerLMConfig.from_dict(spec_cfg)
        else:
            tokenizer = build_tokenizer(cfg, train_sents)
            atomic_write_json(exp_dir / "tokenizer.json", tokenizer.to_dict())
            model_cfg = TransformerLMConfig.preset(
                cfg.preset, len(tokenizer), d_model=cfg.d_model, num_heads=cfg.num_heads,
                num_layers=cfg.num_layers, dim_feedforward=cfg.dim_feedforward,
                dropout=cfg.dropout, tokenizer=tokenizer.to_dict(),
            )
        train_enc = tokenizer.encode(train_sents)
        valid_enc = tokenizer.encode(valid_sents)
        log.info("vocabulary: %s unit, %d symbols", tokenizer.unit, len(tokenizer))
        for name, enc in (("train", train_enc), ("valid", valid_enc)):
            log.info("%s text: %d sentences, %d words, %d tokens (incl. eos), %d OOV -> <unk> "
                     "(%.2f%%)%s", name, len(enc.ids), enc.num_words, enc.num_tokens,
                     enc.num_oov, 100 * enc.oov_rate,
                     f", most frequent: {enc.oov_counts.most_common(5)}" if enc.oov_counts else "")

        fix_random_seed(cfg.seed)
        model = TransformerLM(model_cfg).to(device)
        n_params = sum(p.numel() for p in model.parameters())
        log.info("TransformerLM: %d layers, d_model %d, %d heads, FF %d, %d parameters",
                 model_cfg.num_layers, model_cfg.d_model, model_cfg.num_heads,
                 model_cfg.dim_feedforward, n_params)
        optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-9,
                                     weight_decay=cfg.weight_decay)
        scheduler = WarmupLR(optimizer, cfg.lr, cfg.warmup_steps)
        history: List[Dict[str, Any]] = []
        step = 0
        if ckpt is not None:
            prev = checkpoint_path(exp_dir, cfg.start_epoch - 1)
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
            set_rng_state(ckpt["rng"])
            step = int(ckpt["step"])
            history = list(ckpt.get("extra", {}).get("history", []))
            log.info("resumed from %s (epoch %d, step %d)", prev, ckpt["epoch"], step)
            del ckpt

        lengths = [len(s) + 1 for s in train_enc.ids]
        for epoch in range(cfg.start_epoch, cfg.num_epochs + 1):
            t0 = time.time()
            model.train()
            batches = make_batches(lengths, cfg.max_tokens, shuffle=True, seed=cfg.seed + epoch)
            tot_nll, tot_tok = 0.0, 0
            for b, idx in enumerate(batches, 1):
                x, y, lens = pad_batch([train_enc.ids[i] for i in idx])
                x, y, lens = x.to(device), y.to(device), lens.to(device)
                nll = model(x, y, lens)
                n_tok = int(lens.sum())
                loss = nll.sum() / n_tok
                optimizer.zero_grad()
                loss.backward()
                if cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                optimizer.step()
                scheduler.step()
                step += 1
                tot_nll += float(nll.detach().sum())
                tot_tok += n_tok
                if not math.isfinite(tot_nll):
                    raise FloatingPointError(
                        f"epoch {epoch} batch {b}: non-finite training loss; lower --lr or "
                        f"raise --warmup-steps"
                    )
                if cfg.log_interval and b % cfg.log_interval == 0:
                    log.info("epoch %d batch %d/%d: loss %.4f, lr %.2e", epoch, b, len(batches),
                             tot_nll / tot_tok, scheduler.lr())
            train_loss = tot_nll / max(1, tot_tok)
            val = evaluate_perplexity(model, valid_enc, max_tokens=cfg.max_tokens)
            entry = {
                "epoch": epoch,
                "step": step,
                "lr": scheduler.lr(),
                "train_loss": train_loss,
                "train_ppl": math.exp(train_loss),
                "valid_loss": val["nll_per_token"],
                "valid_ppl": val["ppl"],
                "valid_word_ppl": val["word_ppl"],
                "valid_oov": val["num_oov"],
                "seconds": round(time.time() - t0, 3),
            }
            history.append(entry)
            log.info("epoch %d: train loss %.4f (ppl %.2f), valid ppl %.2f (%d tokens, %d <unk>)"
                     "%s, %.1f s", epoch, train_loss, entry["train_ppl"], val["ppl"],
                     val["num_tokens"], val["num_oov"],
                     f", word ppl {val['word_ppl']:.2f}" if tokenizer.unit == "bpe" else "",
                     entry["seconds"])
            save_checkpoint(checkpoint_path(exp_dir, epoch), model, epoch=epoch, step=step,
                            optimizer=optimizer, scheduler=scheduler, config=cfg.to_dict(),
                            extra={"history": history})
            best = min(history, key=lambda h: h["valid_ppl"])
            atomic_write_json(exp_dir / "lm-history.json",
                              {"history": history, "best_epoch": best["epoch"],
                               "best_valid_ppl": best["valid_ppl"], "unit": tokenizer.unit,
                               "vocab_size": len(tokenizer)})
        return history


_ARCH_FLAGS = ("unit", "text_format", "bpe_vocab_size", "min_count", "max_words", "preset",
               "d_model", "num_heads", "num_layers", "dim_feedforward", "dropout")
_RUN_FLAGS = ("lr", "warmup_steps", "weight_decay", "grad_clip", "max_tokens", "seed",
              "train_text")


def _check_resume_flags(cfg: LmTrainConfig, old: Dict[str, Any], path: Path) -> None:
    """Architecture/vocabulary flags must match the checkpoint; others only warn."""
    now = cfg.to_dict()
    bad = {k: (old.get(k), now[k]) for k in _ARCH_FLAGS if k in old and old[k] != now[k]}
    if bad:
        raise ValueError(
            f"--start-epoch {cfg.start_epoch}: flags differ from those of {path} "
            f"(checkpoint value, given value): {bad}; resume with the same flags or start a new "
            f"--exp-dir"
        )
    diff = {k: (old.get(k), now[k]) for k in _RUN_FLAGS if k in old and old[k] != now[k]}
    if diff:
        log.warning("resuming with training flags that differ from %s (the run will not be "
                    "identical to an uninterrupted one): %s", path, diff)


__all__ = ["LmTrainConfig", "WarmupLR", "train_lm", "evaluate_perplexity", "eval_lm",
           "build_tokenizer"]
