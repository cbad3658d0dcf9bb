"""The compression pipeline: fp32 TDNN-F -> plan -> QAT -> packed model -> WER and verdict.

``k2quant compress`` is a thin wrapper around :func:`compress`::

    from k2quant.compress import CompressConfig, compress
    report = compress(CompressConfig(
        model="exp/epoch-8.pt", avg=2, lang_dir="data/lang",
        cuts="data/fbank/cuts_train.jsonl.gz", dev_cuts="data/fbank/cuts_dev.jsonl.gz",
        out_dir="exp/compress/hessian-4bits", method="hessian", avg_bits=4.0))

Stages (each timed; the timings go to the report):

1. **load**: the fp32 checkpoint (``--avg K`` averages epochs ``N-K+1..N``); the model's output
   dimension must equal the lang dir's ``num_pdfs`` (``lang.json``) and the number of entries
   of ``tokens.txt``.
2. **budget check** (before anything expensive): the on-disk floor (every layer at its lowest
   admissible width, smallest bottleneck candidates; measured by packing that model) and the
   ceiling (fp32) give the feasible range; a budget outside it is an error naming the range.
3. **sensitivity** (``hessian``: HAWQ ``Tr(H_i)/n_i * ||Q_b(W_i) - W_i||^2`` with Hutchinson
   traces of the LF-MMI loss, finite-difference Hessian-vector products because k2's double
   backward is incomplete; ``kl``: KL divergence of the output posteriors) on
   ``sens_utts`` training utterances, cached as JSON (:mod:`k2quant.search.sensitivity`);
   the TDNN-F bottleneck candidates ``dims`` are always scored (so one cache serves runs with
   and without ``subspace``), the allocation uses them only with ``subspace``.
4. **allocation**: the exact ILP (:func:`k2quant.search.allocate.allocate`) under the budget;
   ``nas``: the differentiable search (:func:`k2quant.search.nas.search_mixed_precision`) with
   the LF-MMI loss instead of 3+4; ``uniform``: every quantizable layer at one width; ``plan``:
   a given plan (``plan_path``, optional ``dims_path``). Budgets given as a compression ratio
   or bytes are *on-disk* budgets: the allocation's own size model does not see the BatchNorm
   statistics, the quantizer state and the file header, so the pipeline measures the packed
   size of the chosen plan (before any training: the size depends only on the plan) and
   tightens the allocation budget until the file fits. ``plan.json`` (and ``dims.json``) are
   written next to the packed model.
5. **QAT** (:func:`k2quant.qat.run_qat`), **export** (``model.k2q``, packed low-bit).
6. **decode**: the packed file is loaded back (:func:`k2quant.export.load_packed`) and the dev
   cuts are decoded with the lang dir's HLG (1-best, :func:`k2quant.decode.run.decode_cuts`);
   per-utterance errors (:mod:`k2quant.scoring`). The fp32 model is decoded the same way
   (cached in ``fp32_dir``, keyed by the model fingerprint, the cuts and the decoding options)
   unless ``fp32_errors`` gives its per-utterance error file.
7. **verdict**: MAPSSWE and paired bootstrap, one-sided for a WER increase
   (:func:`k2quant.significance.lossless_verdict`); "lossless" = both p-values >= 0.05.
8. ``report.json`` in ``out_dir`` (see :func:`compress` for its fields).

Sizes: ``fp32_bytes`` = 4 bytes per parameter of the fp32 model (the reference of every
compression ratio); ``bytes_on_disk`` = ``os.path.getsize(model.k2q)`` (header, BatchNorm
statistics, scales and quantizer state included); ``ratio = fp32_bytes / bytes_on_disk``;
``avg_bits`` = average width of the quantized weights, read from the packed file.
"""
import copy
import dataclasses
import json
import logging
import os
import random
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from k2quant.plan import LayerConfig, Plan, quantizable_layers
from k2quant.utils.io import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

PathLike = Union[str, Path]

__all__ = [
    "METHODS",
    "REPORT_FORMAT",
    "CompressConfig",
    "compress",
    "check_model_lang",
    "parse_budget",
    "parse_min_bits",
    "uniform_plan",
    "sensitivity_batches",
    "run_sensitivity",
    "decode_errors",
]

METHODS = ("hessian", "kl", "nas", "uniform", "plan")
_METRIC = {"hessian": "hawq", "kl": "kl"}
REPORT_FORMAT = "k2quant-compress-report"
REPORT_VERSION = 1


# ---------------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------------
@dataclass
class CompressConfig:
    """Everything ``k2quant compress`` takes (flags are the field names with ``-``).

    Budget: exactly one of ``avg_bits`` (average weight bits), ``ratio`` (on-disk compression
    vs fp32) or ``size_bytes`` (on-disk bytes of ``model.k2q``); ``uniform`` takes its width
    from ``uniform_bits`` (or an integer ``avg_bits``) instead.
    """

    model: str
    lang_dir: str
    cuts: str
    dev_cuts: str
    out_dir: str
    avg: int = 1
    method: str = "hessian"
    avg_bits: Optional[float] = None
    ratio: Optional[float] = None
    size_bytes: Optional[float] = None
    uniform_bits: Optional[int] = None
    subspace: bool = False
    bits: Tuple[int, ...] = (1, 2, 3, 4, 6, 8)
    dims: Tuple[int, ...] = (32, 48, 64, 80)
    min_bits: Dict[str, int] = field(default_factory=lambda: {"output": 8})
    quantizer: str = "lsq"
    granularity: str = "channel"
    plan_path: Optional[str] = None
    dims_path: Optional[str] = None
    # sensitivity
    sens_utts: int = 200
    sens_max_duration: float = 60.0
    sens_samples: int = 4
    sens_probes: str = "joint"
    hvp: str = "fd"
    sensitivity_cache: Optional[str] = None
    # NAS
    nas_steps: int = 120
    nas_lr_alpha: float = 0.05
    nas_lr_weights: float = 0.0
    nas_utts: int = 400
    # QAT
    qat_epochs: int = 2
    qat_lr: float = 3e-4
    qat_final_lr: float = 1e-4
    qat_lr_quant: Optional[float] = None
    qat_bn_mode: str = "freeze_after_first"
    qat_max_duration: Optional[float] = None  # None: the fp32 training's --max-duration
    qat_max_cuts: Optional[int] = None
    # decoding and verdict
    fp32_dir: Optional[str] = None
    fp32_errors: Optional[str] = None
    lm_scale: float = 1.0
    search_beam: float = 20.0
    output_beam: float = 8.0
    decode_max_duration: float = 300.0
    alpha: float = 0.05
    bootstrap_samples: int = 10000
    # run
    tag: Optional[str] = None
    seed: int = 42
    num_threads: int = 0
    device: str = "cpu"

    def budget(self) -> Tuple[Optional[str], Optional[float]]:
        given = [(k, v) for k, v in (("avg_bits", self.avg_bits), ("ratio", self.ratio),
                                     ("size_bytes", self.size_bytes)) if v is not None]
        if len(given) > 1:
            raise ValueError(
                f"give one budget: --budget Nbits, --ratio R or --size-bytes N; received "
                f"{', '.join(f'{k}={v:g}' for k, v in given)}"
            )
        return given[0] if given else (None, None)

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"--method must be one of {list(METHODS)}, got {self.method!r}")
        kind, value = self.budget()
        if self.method in ("hessian", "kl", "nas") and kind is None:
            raise ValueError(f"--method {self.method} needs a budget: --budget 4bits, "
                             f"--ratio 12 or --size-bytes N")
        if self.method == "uniform":
            self.uniform_width()
        if self.method == "plan" and not self.plan_path:
            raise ValueError("--method plan needs --plan PLAN.json")
        if self.plan_path and self.method != "plan":
            raise ValueError(f"--plan is used with --method plan (got --method {self.method})")
        if kind == "avg_bits" and not value > 0:
            raise ValueError(f"--budget must be a positive number of bits, got {value}")
        if kind == "ratio" and not value > 0:
            raise ValueError(f"--ratio must be > 0, got {value}")
        if kind == "size_bytes" and not value > 0:
            raise ValueError(f"--size-bytes must be > 0, got {value}")
        bad = [b for b in self.bits if not 1 <= int(b) <= 8]
        if not self.bits or bad:
            raise ValueError(f"--bits must be widths in 1..8, got {list(self.bits)}")
        if self.subspace and not self.dims:
            raise ValueError("--subspace needs candidate bottleneck --dims, e.g. 32,48,64")
        if self.subspace and self.method in ("uniform", "plan"):
            raise ValueError(f"--subspace searches the bottleneck dims; it does not apply to "
                             f"--method {self.method} (give --dims-json with --method plan)")
        if self.avg < 1:
            raise ValueError(f"--avg must be >= 1, got {self.avg}")
        for name in ("model", "cuts", "dev_cuts"):
            p = Path(getattr(self, name))
            if not p.is_file():
                raise FileNotFoundError(f"--{name.replace('_', '-')} {p} does not exist")
        if not Path(self.lang_dir).is_dir():
            raise FileNotFoundError(f"--lang-dir {self.lang_dir} does not exist")

    def uniform_width(self) -> int:
        if self.uniform_bits is not None:
            b = int(self.uniform_bits)
        elif self.avg_bits is not None and float(self.avg_bits).is_integer():
            b = int(self.avg_bits)
        elif len(self.bits) == 1:
            b = int(self.bits[0])
        else:
            raise ValueError("--method uniform needs one width: --bits 4 (or --budget 4bits)")
        if not 1 <= b <= 8:
            raise ValueError(f"--method uniform: the width must be in 1..8, got {b}")
        return b

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["bits"], d["dims"] = list(self.bits), list(self.dims)
        return d

    def system_name(self) -> str:
        if self.tag:
            return self.tag
        kind, value = self.budget()
        if self.method == "uniform":
            return f"uniform-{self.uniform_width()}bit"
        if kind is None:
            b = ""
        elif kind == "avg_bits":
            b = f"{value:g}bits"
        elif kind == "ratio":
            b = f"{value:g}x"
        else:
            b = f"{value:.0f}B"
        return f"{self.method}{'+subspace' if self.subspace else ''}{'-' + b if b else ''}"


def parse_budget(text: str) -> float:
    """``"4bits"``, ``"3.5bit"``, ``"4"`` -> average bits (float)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(bits?|b)?\s*", str(text))
    if not m:
        raise ValueError(f"--budget must look like 4bits or 3.5bits, got {text!r}")
    return float(m.group(1))


def parse_min_bits(text: Optional[str]) -> Dict[str, int]:
    """``"output=8,tdnn1.affine=8"`` -> dict; ``""``/``"none"`` -> {}."""
    if text is None or text.strip().lower() in ("", "none"):
        return {}
    out = {}
    for item in text.split(","):
        if "=" not in item:
            raise ValueError(f"--min-bits entries look like LAYER=BITS, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip()] = int(v)
    return out


def _int_list(text: str, what: str) -> Tuple[int, ...]:
    try:
        return tuple(int(x) for x in str(text).split(",") if x.strip())
    except ValueError:
        raise ValueError(f"{what} must be comma-separated integers, got {text!r}") from None


# ---------------------------------------------------------------------------------------------
# checks
# ---------------------------------------------------------------------------------------------
def _model_output_dim(model: nn.Module) -> Optional[int]:
    n = getattr(model, "num_classes", None)
    if isinstance(n, int):
        return n
    spec = model.model_spec() if hasattr(model, "model_spec") else {}
    for k in ("num_classes", "output_dim", "num_pdfs"):
        if k in spec.get("config", {}):
            return int(spec["config"][k])
    return None


def check_model_lang(model: nn.Module, lang_dir: PathLike) -> int:
    """The model's output dimension must equal ``lang.json``'s ``num_pdfs`` and the number of
    ``tokens.txt`` entries (ids ``0..n-1``). Returns it; raises ``ValueError`` otherwise."""
    from k2quant.training.train import read_lang_info

    lang_dir = Path(lang_dir)
    info = read_lang_info(str(lang_dir))
    num_pdfs = info.get("num_pdfs")
    tok = lang_dir / "tokens.txt"
    n_tokens = None
    if tok.is_file():
        ids = [int(f[1]) for f in (line.split() for line in tok.read_text().splitlines())
               if len(f) == 2]
        n_tokens = max(ids) + 1 if ids else 0
    out = _model_output_dim(model)
    problems = []
    if num_pdfs is not None and out != int(num_pdfs):
        problems.append(f"{lang_dir}/lang.json has num_pdfs={num_pdfs}")
    if n_tokens is not None and out != n_tokens:
        problems.append(f"{lang_dir}/tokens.txt has {n_tokens} tokens (ids 0..{n_tokens - 1})")
    if problems:
        raise ValueError(
            f"model/lang mismatch: the model outputs {out} classes but "
            + " and ".join(problems)
            + "; use the lang dir the model was trained with (--lang-dir of 'k2quant train')"
        )
    return int(out)


def _floor_bits(names: Sequence[str], bits: Sequence[int],
                min_bits: Mapping[str, int]) -> Dict[str, int]:
    lo = min(bits)
    out = {}
    for n in names:
        mb = min_bits.get(n)
        out[n] = lo if mb is None else min([b for b in bits if b >= mb] or [max(bits)])
    return out


def _check_min_bits(model: nn.Module, min_bits: Mapping[str, int]) -> None:
    have = list(quantizable_layers(model))
    unknown = [k for k in min_bits if k not in have]
    if unknown:
        raise ValueError(f"--min-bits names layers the model lacks: {unknown}; quantizable "
                         f"layers are {have}")


# ---------------------------------------------------------------------------------------------
# sizes
# ---------------------------------------------------------------------------------------------
def uniform_plan(model: nn.Module, bits: Union[int, Mapping[str, int]], quantizer: str = "lsq",
                 granularity: str = "channel") -> Plan:
    """One exact key per quantizable layer: ``bits`` (an int or ``{name: bits}``)."""
    layers = {}
    for n in quantizable_layers(model):
        b = bits if isinstance(bits, int) else int(bits[n])
        layers[n] = LayerConfig(weight_bits=int(b), weight_quantizer=quantizer,
                                granularity=granularity)
    return Plan(layers, default=None)


def packed_size(fp32_model: nn.Module, plan: Plan, dims: Optional[Mapping[str, int]] = None) -> int:
    """Bytes of the packed file of ``fp32_model`` re-factorised to ``dims`` and quantized with
    ``plan`` (no training: the size depends on the plan only), with the header metadata of
    :func:`compress`'s export. An upper bound: the header (zlib-compressed JSON) holds
    per-tensor checksums that depend on the trained values (see the slack below), so the real
    file may be a few bytes smaller."""
    from k2quant.export import save_packed
    from k2quant.qat import build_qat_model

    model = build_qat_model(fp32_model, plan, dims).eval()
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "size.k2q"
        # the export's metadata, with the longer of the two utt_cmn values
        save_packed(model, p, extra=packed_extra(False, fp32_bytes_of(fp32_model) // 4))
        # The header holds a crc32 per tensor as a decimal number: trained weights have other
        # checksums, whose digits may be more. Bound that: 1 byte per possibly missing digit
        # (random digits compress to less) and 16 bytes for zlib's block boundaries.
        from k2quant.export import read_header

        slack = 16 + sum(10 - len(str(e["c"])) for e in read_header(p).tensors if "c" in e)
        return os.path.getsize(p) + slack


def packed_extra(utt_cmn: bool, fp32_params: int) -> Dict[str, Any]:
    """Header metadata of a compressed model's packed file (read by ``k2quant decode --model``)."""
    return {"utt_cmn": bool(utt_cmn), "fp32_params": int(fp32_params)}


def fp32_bytes_of(model: nn.Module) -> int:
    """4 bytes per parameter: the reference of every compression ratio."""
    return 4 * sum(p.numel() for p in model.parameters())


def _smallest_dims(model: nn.Module, cand: Sequence[int]) -> Dict[str, int]:
    out = {}
    for n in model.tdnnf_layer_names():
        cur = int(model.get_submodule(f"{n}.linear").weight.shape[0])
        ok = [d for d in cand if d <= cur]
        out[n] = min(ok) if ok else cur
    return out


def disk_range(fp32_model: nn.Module, bits: Sequence[int], min_bits: Mapping[str, int],
               quantizer: str, granularity: str,
               dims: Optional[Sequence[int]] = None) -> Tuple[int, Dict[str, Any]]:
    """On-disk floor: the packed bytes with every layer at its lowest admissible width (and the
    smallest bottleneck candidates). Returns ``(floor_bytes, {"bits", "dims"})``."""
    names = list(quantizable_layers(fp32_model))
    fb = _floor_bits(names, bits, min_bits)
    fd = _smallest_dims(fp32_model, dims) if dims else {}
    plan = uniform_plan(fp32_model, fb, quantizer, granularity)
    return packed_size(fp32_model, plan, fd), {"bits": fb, "dims": fd}


def _fmt_range(kind: str, lo: float, hi: float) -> str:
    if kind == "ratio":
        return f"{lo:.4g}x..{hi:.4g}x"
    if kind == "size_bytes":
        return f"{lo:,.0f}..{hi:,.0f} bytes"
    return f"{lo:.4g}..{hi:.4g} avg bits"


def check_budget(cfg: CompressConfig, fp32_model: nn.Module) -> Dict[str, Any]:
    """Reject a budget outside the feasible range before any expensive stage.

    ``avg_bits``: the floor is the parameter-weighted average of each layer's lowest admissible
    width (``--bits``, ``--min-bits``), the ceiling 32 (fp32). ``ratio``/``size_bytes``: the
    floor is the measured on-disk size of that smallest model (smallest ``--dims`` with
    ``--subspace``), the ceiling the fp32 size (4 bytes/parameter, ratio 1).

    Returns ``{"kind", "value", "target_bytes" (on disk, or None), "floor_bytes", "fp32_bytes"}``.
    """
    kind, value = cfg.budget()
    fp32 = fp32_bytes_of(fp32_model)
    out = {"kind": kind, "value": value, "target_bytes": None, "fp32_bytes": fp32}
    if kind is None:
        return out
    layers = quantizable_layers(fp32_model)
    fb = _floor_bits(list(layers), cfg.bits, cfg.min_bits)
    if kind == "avg_bits":
        ns = {n: sum(p.numel() for pn, p in m.named_parameters(recurse=False)
                     if not pn.startswith("bias")) for n, m in layers.items()}
        lo = sum(ns[n] * fb[n] for n in ns) / max(sum(ns.values()), 1)
        if value < lo * (1 - 1e-9) or value > 32:
            why = "below the floor" if value < lo else "above fp32"
            raise ValueError(
                f"budget {value:g} avg bits is {why}: feasible {_fmt_range(kind, lo, 32.0)} "
                f"(floor: every layer at {min(cfg.bits)} bits"
                f"{', --min-bits ' + str(cfg.min_bits) if cfg.min_bits else ''}; ceiling: fp32)"
            )
        return out
    floor, _ = disk_range(fp32_model, cfg.bits, cfg.min_bits, cfg.quantizer, cfg.granularity,
                          cfg.dims if cfg.subspace else None)
    out["floor_bytes"] = floor
    target = fp32 / value if kind == "ratio" else float(value)
    if kind == "ratio":
        lo_r, hi_r = 1.0, fp32 / floor
        if value < 1.0:
            raise ValueError(f"budget ratio {value:g}x is above fp32 (ratio 1 is the float model "
                             f"itself): feasible {_fmt_range(kind, lo_r, hi_r)}")
        if value > hi_r:
            raise ValueError(
                f"budget ratio {value:g}x is below the floor: the smallest packed model "
                f"({floor:,} bytes: every layer at {min(cfg.bits)} bits"
                f"{', --min-bits ' + str(cfg.min_bits) if cfg.min_bits else ''}"
                f"{', smallest --dims' if cfg.subspace else ''}) compresses {hi_r:.4g}x; "
                f"feasible {_fmt_range(kind, lo_r, hi_r)}")
    else:
        if value < floor or value > fp32:
            why = "below the floor" if value < floor else "above fp32"
            raise ValueError(f"budget {value:,.0f} bytes is {why}: feasible "
                             f"{_fmt_range(kind, floor, fp32)}")
    out["target_bytes"] = target
    return out


# ---------------------------------------------------------------------------------------------
# data and losses
# ---------------------------------------------------------------------------------------------
def _subset(cuts, n: int, seed: int):
    cuts = cuts.to_eager()
    if n is not None and len(cuts) > n:
        ids = sorted(c.id for c in cuts)
        random.Random(seed).shuffle(ids)
        keep = set(ids[:n])
        cuts = cuts.filter(lambda c: c.id in keep).to_eager()
    return cuts


def sensitivity_batches(cuts_path: PathLike, lang_dir: PathLike, subsampling_factor: int,
                        num_utts: int, max_duration: float, utt_cmn: bool,
                        seed: int = 0) -> List[Dict[str, Any]]:
    """``num_utts`` random (seeded) usable training utterances as a list of batches (the
    training loop's batch layout, :mod:`k2quant.training.dataset`)."""
    from k2quant.qat import prepare_cuts
    from k2quant.training.dataset import AsrDataset, make_dataloader, make_eval_sampler

    cuts = _subset(prepare_cuts(cuts_path, lang_dir, subsampling_factor), num_utts, seed)
    cuts = cuts.sort_by_duration(ascending=False)
    dl = make_dataloader(AsrDataset(utt_cmn=utt_cmn), make_eval_sampler(cuts, max_duration))
    return list(dl)


def _objective(lang_dir, base_config: Mapping[str, Any], texts: List[str], sf: int,
               device: torch.device):
    from k2quant.training.train import MmiObjective, TrainConfig

    d = dict(base_config)
    d.update(lang_dir=str(lang_dir))
    d.setdefault("exp_dir", ".")
    d.setdefault("train_cuts", "")
    tcfg = TrainConfig.from_dict(d)
    return MmiObjective(str(lang_dir), device, tcfg, train_texts=texts, use_xent=False,
                        subsampling_factor=sf)


def _per_frame_loss(objective):
    def loss_fn(model, batch):
        loss, stats = objective(model, batch)
        return loss / max(stats["frames"], 1.0)
    return loss_fn


def run_sensitivity(fp32_model: nn.Module, batches, loss_fn, cfg: CompressConfig,
                    metric: str, cache_path: PathLike):
    """:func:`k2quant.search.sensitivity.compute_sensitivity` with the pipeline's settings
    (cached at ``cache_path``)."""
    from k2quant.search.sensitivity import compute_sensitivity

    dims = None
    if cfg.dims and hasattr(fp32_model, "refactor_bottleneck"):
        # always score the bottleneck candidates: one cache then serves runs with and without
        # --subspace (allocate ignores them unless asked)
        dims = {}
        for name in fp32_model.tdnnf_layer_names():
            cur = int(fp32_model.get_submodule(f"{name}.linear").weight.shape[0])
            dims[name] = [d for d in cfg.dims if d <= cur] or [cur]
    return compute_sensitivity(
        fp32_model, loss_fn, batches, bits=cfg.bits, dims=dims,
        quantizer=LayerConfig(weight_quantizer=cfg.quantizer, granularity=cfg.granularity),
        metrics=(metric,), hvp=cfg.hvp, n_samples=cfg.sens_samples, probes=cfg.sens_probes,
        seed=cfg.seed, cache_path=cache_path,
    )


def clamp_negative_traces(table) -> Dict[str, float]:
    """Replace non-positive Hutchinson traces by the smallest positive curvature density.

    A layer's trace estimate can come out <= 0 when its true curvature is small next to the
    probe noise (or the model is not at a minimum); a negative ``hawq`` score would make the
    allocator *prefer* perturbing that layer (the larger ``||Q_b(W) - W||^2``, the lower the
    cost) and push it to 1 bit. Such layers get the smallest positive density
    ``Tr(H_j) / n_j`` of the other layers (least sensitive, but still sensitive), and their
    ``hawq`` entries are recomputed as ``density * perturbation``. Returns ``{layer: original
    trace}`` of the changed layers.
    """
    dens = [i.trace / i.n_params for i in table.layers.values()
            if i.trace is not None and i.trace > 0 and i.n_params > 0]
    bad = {n: i.trace for n, i in table.layers.items() if i.trace is not None and i.trace <= 0}
    if not bad:
        return {}
    floor = min(dens) if dens else 1.0
    for n in bad:
        info = table.layers[n]
        info.trace = floor * info.n_params
        pairs = [p for p, v in table.pairs.items() if v.get("affine") == n]
        for e in table.entries.values():
            if e.hawq is None:
                continue
            if (e.layer == n and e.bits != 32) or (e.layer in pairs and e.bits == 32):
                e.hawq = floor * e.perturbation  # bottleneck entries use the affine's density
    log.warning("sensitivity: non-positive Hessian trace estimates for %s replaced by the "
                "smallest positive curvature density %.3g", sorted(bad), floor)
    return bad


# ---------------------------------------------------------------------------------------------
# decoding
# ---------------------------------------------------------------------------------------------
def decode_errors(model: nn.Module, lang_dir: PathLike, cuts_path: PathLike, out_dir: PathLike,
                  name: str, cfg: CompressConfig, utt_cmn: bool) -> Dict[str, Any]:
    """Decode ``cuts_path`` with ``model`` and the lang dir's HLG (1-best at ``cfg.lm_scale``);
    write ``hyps-NAME.txt``, ``ref-NAME.txt``, ``per_utt-NAME.tsv``, ``errs-NAME.txt`` and
    ``wer-NAME.json`` in ``out_dir``. Returns the WER dict (+ ``per_utt`` path, seconds)."""
    from k2quant.decode.graph import load_hlg
    from k2quant.decode.run import DecodeOptions, decode_cuts, read_words_table
    from k2quant.scoring import compute_wer, write_error_report, write_hyps, write_per_utt_errors
    from k2quant.training.dataset import load_cuts

    lang_dir = Path(lang_dir)
    hlg = lang_dir / "HLG.pt"
    if not hlg.is_file():
        raise FileNotFoundError(f"decoding graph {hlg} not found; build it with 'k2quant "
                                f"compile-hlg --lang-dir {lang_dir} --lm WORD_LM.arpa'")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    opts = DecodeOptions(search_beam=cfg.search_beam, output_beam=cfg.output_beam,
                         lm_scales=(cfg.lm_scale,), max_duration=cfg.decode_max_duration,
                         utt_cmn=utt_cmn)
    dev = torch.device("cpu")
    res = decode_cuts(model.to(dev).eval(), load_hlg(hlg, device=dev), load_cuts(cuts_path),
                      read_words_table(lang_dir / "words.txt"), opts, device=dev, progress=False)
    hyps = res.hyps[cfg.lm_scale]
    wer = compute_wer(res.refs, hyps)
    write_hyps(res.refs, out / f"ref-{name}.txt")
    write_hyps(hyps, out / f"hyps-{name}.txt")
    write_per_utt_errors(wer, out / f"per_utt-{name}.tsv")
    write_error_report(wer, res.refs, hyps, out / f"errs-{name}.txt")
    d = wer.to_dict()
    d.update(per_utt=str(out / f"per_utt-{name}.tsv"), decode_seconds=round(res.seconds, 2),
             audio_seconds=round(res.audio_seconds, 2), lm_scale=cfg.lm_scale,
             cuts=str(cuts_path), summary=wer.summary())
    atomic_write_json(out / f"wer-{name}.json", d)
    return d


def _fp32_reference(fp32_model: nn.Module, cfg: CompressConfig, utt_cmn: bool,
                    fingerprint: str) -> Dict[str, Any]:
    """The fp32 model's dev errors (decoded once, cached in ``fp32_dir``) and packed size."""
    from k2quant.export import save_packed

    fdir = Path(cfg.fp32_dir) if cfg.fp32_dir else Path(cfg.out_dir) / "fp32"
    fdir.mkdir(parents=True, exist_ok=True)
    key = {"fingerprint": fingerprint, "cuts": str(Path(cfg.dev_cuts).resolve()),
           "lm_scale": cfg.lm_scale, "search_beam": cfg.search_beam,
           "output_beam": cfg.output_beam, "utt_cmn": utt_cmn}
    meta_path = fdir / "fp32.json"
    packed = fdir / "fp32.k2q"
    if not packed.is_file():
        save_packed(fp32_model, packed)
    if cfg.fp32_errors:
        from k2quant.scoring import read_per_utt_errors

        w = read_per_utt_errors(cfg.fp32_errors)
        wer = w.to_dict()
        wer.update(per_utt=str(cfg.fp32_errors), summary=w.summary())
        return {"wer": wer, "packed": str(packed), "cached": True}
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("key") == key and Path(meta["wer"]["per_utt"]).is_file():
            log.info("fp32 reference: using the cached decode in %s", fdir)
            return {"wer": meta["wer"], "packed": str(packed), "cached": True}
    wer = decode_errors(fp32_model, cfg.lang_dir, cfg.dev_cuts, fdir, "fp32", cfg, utt_cmn)
    atomic_write_json(meta_path, {"key": key, "wer": wer})
    return {"wer": wer, "packed": str(packed), "cached": False}


# ---------------------------------------------------------------------------------------------
# search
# ---------------------------------------------------------------------------------------------
def _allocate_on_disk(table, fp32_model, cfg: CompressConfig, budget: Dict[str, Any],
                      metric: str):
    """ILP allocation whose packed file meets an on-disk budget (ratio / bytes): the
    allocation budget is tightened by the measured excess until the file fits."""
    from k2quant.search.allocate import allocate, budget_range

    dims = True if cfg.subspace else None
    kw = dict(bits=cfg.bits, dims=dims, metric=metric, min_bits=cfg.min_bits or None,
              model=fp32_model)
    if budget["kind"] == "avg_bits":
        a = allocate(table, avg_bits=budget["value"], **kw)
        return a, {"allocation_budget": {"avg_bits": budget["value"]}}
    target = budget["target_bytes"]
    floor_alloc, _ = budget_range(table, "size_bytes", bits=cfg.bits, dims=dims,
                                  min_bits=cfg.min_bits or None)
    extra = budget["floor_bytes"] - floor_alloc  # bytes on disk the allocator does not model
    limit = target - extra
    tries = []
    for _ in range(8):
        limit = max(limit, floor_alloc)
        a = allocate(table, size_bytes=limit, **kw)
        plan = a.to_plan(weight_quantizer=cfg.quantizer, granularity=cfg.granularity)
        size = packed_size(fp32_model, plan, a.dims)
        tries.append({"allocation_limit": limit, "predicted": a.size_bytes, "packed": size})
        if size <= target or limit <= floor_alloc:
            break
        limit -= (size - target) + 16
    return a, {"allocation_budget": {"size_bytes": limit}, "disk_fit": tries,
               "extra_disk_bytes": extra}


def _nas(fp32_model, cfg: CompressConfig, budget: Dict[str, Any], loss_fn, batches):
    from k2quant.search.nas import MixedPrecisionSupernet, search_mixed_precision

    layers = quantizable_layers(fp32_model)
    names = list(layers)
    floor = _floor_bits(names, cfg.bits, cfg.min_bits)
    fixed = {n: floor[n] for n in cfg.min_bits if n in layers}
    searched = [n for n in names if n not in fixed]
    dims = list(cfg.dims) if cfg.subspace else None
    nb = {n: m.weight.numel() for n, m in layers.items()}
    kw: Dict[str, Any] = {}
    extra = None
    if budget["kind"] == "avg_bits":
        n_s = sum(nb[n] for n in searched)
        n_f = sum(nb[n] for n in fixed)
        b = (budget["value"] * (n_s + n_f) - sum(nb[n] * fixed[n] for n in fixed)) / n_s
        kw["avg_bits"] = b
    else:
        sn = MixedPrecisionSupernet(fp32_model, cfg.bits, layers=searched, quantizer=cfg.quantizer,
                                    granularity=cfg.granularity, dims=dims)
        bits0, dims0 = sn.smallest()
        plan0 = uniform_plan(fp32_model, {**bits0, **fixed}, cfg.quantizer, cfg.granularity)
        extra = packed_size(fp32_model, plan0, dims0) - sn.size_bytes(bits0, dims0)
        kw["size_bytes"] = budget["target_bytes"] - extra
        del sn
    r = search_mixed_precision(
        fp32_model, loss_fn, batches, steps=cfg.nas_steps, lr_weights=cfg.nas_lr_weights,
        lr_alpha=cfg.nas_lr_alpha, candidate_bits=cfg.bits, layers=searched,
        quantizer=cfg.quantizer, granularity=cfg.granularity, dims=dims, seed=cfg.seed,
        log_every=max(1, cfg.nas_steps // 10), **kw,
    )
    bits = dict(r.bits)
    bits.update(fixed)
    info = {"nas_budget": kw, "extra_disk_bytes": extra, "nas": {
        "argmax_bits": r.argmax_bits, "size_bytes": r.size_bytes, "avg_bits_searched": r.avg_bits,
        "final": r.history[-1] if r.history else None}}
    return bits, dict(r.dims), r, info


# ---------------------------------------------------------------------------------------------
# the pipeline
# ---------------------------------------------------------------------------------------------
def compress(cfg: CompressConfig) -> Dict[str, Any]:
    """Run the pipeline (module docstring) and return the report written to
    ``out_dir/report.json``::

        {"format": "k2quant-compress-report", "version": 1, "system", "method", "subspace",
         "budget", "avg_bits", "params", "quantized_params", "fp32_params", "bytes_on_disk",
         "fp32_bytes", "ratio", "predicted_size_bytes", "bits" (per layer), "dims",
         "wer" (dev, decoded from the packed file), "fp32": {"wer", "bytes_on_disk", ...},
         "significance": {"lossless", "p_value", "alpha", "mapsswe", "bootstrap"},
         "lossless", "files", "timings" (seconds per stage), "qat" (per-epoch history),
         "search" (details), "config", "load"}
    """
    from k2quant.qat import QatConfig, export_packed, load_fp32_model, run_qat
    from k2quant.search.sensitivity import model_fingerprint
    from k2quant.significance import load_errors, lossless_verdict

    cfg.validate()
    if cfg.num_threads > 0:
        torch.set_num_threads(cfg.num_threads)
    timings: Dict[str, float] = {}
    t_all = time.time()
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)

    t = time.time()
    fp32, info = load_fp32_model(cfg.model, cfg.avg)
    check_model_lang(fp32, cfg.lang_dir)
    _check_min_bits(fp32, cfg.min_bits)
    base = dict(info["config"])
    utt_cmn = bool(base.get("utt_cmn", True))
    sf = int(getattr(fp32, "subsampling_factor", 1))
    fingerprint = model_fingerprint(fp32)
    budget = check_budget(cfg, fp32)
    timings["load"] = time.time() - t
    log.info("compress %s: %s, budget %s, fp32 %d params", cfg.system_name(), cfg.model,
             {k: budget[k] for k in ("kind", "value")}, fp32_bytes_of(fp32) // 4)

    # ---- search -------------------------------------------------------------------------
    search: Dict[str, Any] = {}
    dims: Dict[str, int] = {}
    predicted = None
    t = time.time()
    if cfg.method in ("hessian", "kl"):
        from k2quant.qat import prepare_cuts

        metric = _METRIC[cfg.method]
        batches = sensitivity_batches(cfg.cuts, cfg.lang_dir, sf, cfg.sens_utts,
                                      cfg.sens_max_duration, utt_cmn, seed=cfg.seed)
        texts = [s.text for c in prepare_cuts(cfg.cuts, cfg.lang_dir, sf) for s in c.supervisions
                 if s.text]
        objective = _objective(cfg.lang_dir, base, texts, sf, torch.device("cpu"))
        cache = Path(cfg.sensitivity_cache) if cfg.sensitivity_cache else (
            out / f"sensitivity-{metric}.json")
        table = run_sensitivity(fp32, batches, _per_frame_loss(objective), cfg, metric, cache)
        clamped = clamp_negative_traces(table) if metric == "hawq" else {}
        timings["sensitivity"] = time.time() - t
        t = time.time()
        alloc, extra = _allocate_on_disk(table, fp32, cfg, budget, metric)
        alloc.save(out / "allocation.json")
        plan = alloc.to_plan(weight_quantizer=cfg.quantizer, granularity=cfg.granularity,
                             model=fp32)
        dims = dict(alloc.dims)
        predicted = alloc.size_bytes
        search = {"metric": metric, "sensitivity_cache": str(cache), "hvp": table.method.get("hvp"),
                  "sensitivity_utts": table.num_utterances,
                  "allocation": {"method": alloc.method, "avg_bits": alloc.avg_bits,
                                 "size_bytes": alloc.size_bytes,
                                 "sensitivity": alloc.sensitivity},
                  "clamped_traces": clamped, **extra}
        timings["allocation"] = time.time() - t
    elif cfg.method == "nas":
        from k2quant.qat import prepare_cuts

        batches = sensitivity_batches(cfg.cuts, cfg.lang_dir, sf, cfg.nas_utts,
                                      cfg.sens_max_duration, utt_cmn, seed=cfg.seed)
        texts = [s.text for c in prepare_cuts(cfg.cuts, cfg.lang_dir, sf) for s in c.supervisions
                 if s.text]
        objective = _objective(cfg.lang_dir, base, texts, sf, torch.device("cpu"))
        bits, dims, result, extra = _nas(fp32, cfg, budget, _per_frame_loss(objective), batches)
        result.save(out / "nas.json")
        plan = uniform_plan(fp32, bits, cfg.quantizer, cfg.granularity)
        predicted = result.size_bytes
        search = extra
        timings["nas"] = time.time() - t
    elif cfg.method == "uniform":
        plan = uniform_plan(fp32, cfg.uniform_width(), cfg.quantizer, cfg.granularity)
        timings["allocation"] = time.time() - t
    else:  # plan
        from k2quant.qat import apply_dims, check_plan

        try:
            plan = Plan.load(cfg.plan_path)
        except FileNotFoundError:
            raise FileNotFoundError(f"--plan {cfg.plan_path} does not exist") from None
        if cfg.dims_path:
            dims = {k: int(v) for k, v in json.loads(Path(cfg.dims_path).read_text()).items()}
        probe = copy.deepcopy(fp32)
        apply_dims(probe, dims)
        check_plan(probe, plan)
        del probe
        timings["allocation"] = time.time() - t
    plan.save(out / "plan.json")
    atomic_write_json(out / "dims.json", dims)

    # ---- QAT + export -------------------------------------------------------------------
    t = time.time()
    qcfg = QatConfig(exp_dir=str(out / "qat"), lang_dir=cfg.lang_dir, train_cuts=cfg.cuts,
                     num_epochs=cfg.qat_epochs, lr=cfg.qat_lr, final_lr=cfg.qat_final_lr,
                     lr_quant=cfg.qat_lr_quant, bn_mode=cfg.qat_bn_mode,
                     max_duration=float(cfg.qat_max_duration or base.get("max_duration", 100.0)),
                     max_cuts=cfg.qat_max_cuts,
                     seed=cfg.seed, device=cfg.device, num_threads=cfg.num_threads)
    qres = run_qat(fp32, plan, qcfg, dims=dims, base_config=base,
                   source=f"{Path(cfg.model).resolve()}:avg{cfg.avg}:{fingerprint}")
    timings["qat"] = time.time() - t
    t = time.time()
    packed_path = out / "model.k2q"
    size = export_packed(qres.model, packed_path,
                         extra=packed_extra(utt_cmn, fp32_bytes_of(fp32) // 4))
    timings["export"] = time.time() - t

    # ---- decode + verdict ---------------------------------------------------------------
    from k2quant.export import load_packed

    t = time.time()
    qmodel = load_packed(packed_path)
    wer = decode_errors(qmodel, cfg.lang_dir, cfg.dev_cuts, out / "decode", "compressed", cfg,
                        utt_cmn)
    timings["decode"] = time.time() - t
    t = time.time()
    ref = _fp32_reference(fp32, cfg, utt_cmn, fingerprint)
    timings["fp32_reference"] = time.time() - t
    verdict = lossless_verdict(load_errors(ref["wer"]["per_utt"]), load_errors(wer["per_utt"]),
                               alpha=cfg.alpha, num_samples=cfg.bootstrap_samples, seed=cfg.seed)
    timings["total"] = time.time() - t_all
    timings = {k: round(v, 2) for k, v in timings.items()}

    fp32_bytes = fp32_bytes_of(fp32)
    report = {
        "format": REPORT_FORMAT, "version": REPORT_VERSION,
        "system": cfg.system_name(), "method": cfg.method, "subspace": bool(cfg.subspace),
        "quantizer": cfg.quantizer,
        "budget": {"kind": budget["kind"], "value": budget["value"],
                   "target_bytes": budget.get("target_bytes")},
        "avg_bits": size["avg_bits"],
        "params": size["params"],
        "quantized_params": size["quantized_params"],
        "fp32_params": fp32_bytes // 4,
        "bytes_on_disk": size["file_bytes"],
        "fp32_bytes": fp32_bytes,
        "ratio": fp32_bytes / size["file_bytes"],
        "predicted_size_bytes": predicted,
        "bits": {n: c.weight_bits for n, c in qres.model.k2quant_plan.layers.items()},
        "dims": dims,
        "wer": wer,
        "fp32": {"wer": ref["wer"], "bytes_on_disk": os.path.getsize(ref["packed"]),
                 "packed": ref["packed"], "params": fp32_bytes // 4, "model": cfg.model,
                 "avg": cfg.avg},
        "significance": verdict,
        "lossless": verdict["lossless"],
        "files": {"model": str(packed_path), "plan": str(out / "plan.json"),
                  "dims": str(out / "dims.json"), "per_utt": wer["per_utt"],
                  "fp32_per_utt": ref["wer"]["per_utt"]},
        "timings": timings,
        "qat": qres.history,
        "search": search,
        "config": cfg.to_dict(),
        "load": {"uptime_load": _loadavg(), "torch_threads": torch.get_num_threads()},
    }
    atomic_write_json(out / "report.json", report)
    atomic_write_text(out / "summary.txt", _summary(report) + "\n")
    log.info("%s", _summary(report))
    return report


def _loadavg() -> Optional[List[float]]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover
        return None


def _summary(r: Mapping[str, Any]) -> str:
    sig = r["significance"]
    return (f"{r['system']}: {r['avg_bits']:.2f} avg bits, {r['bytes_on_disk']:,} bytes "
            f"({r['ratio']:.2f}x vs fp32 {r['fp32_bytes']:,}), WER {r['wer']['wer']:.2f}% "
            f"(fp32 {r['fp32']['wer']['wer']:.2f}%), p = {sig['mapsswe']['p_value']:.3g} "
            f"(MAPSSWE) / {sig['bootstrap']['p_value']:.3g} (bootstrap): "
            f"{'lossless' if r['lossless'] else 'NOT lossless'}; {r['timings']['total']:.0f} s")
