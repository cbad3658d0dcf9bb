"""Decode a CutSet with an acoustic model and an HLG graph, then score it.

This is the driver behind ``k2quant decode``: it runs the model over the cuts (batches of
precomputed features from :mod:`k2quant.training.dataset`, the same feature normalisation as in
training), builds lattices with :func:`k2quant.decode.lattice.get_lattice`, takes the 1-best
path and scores it with :mod:`k2quant.scoring`.

LM scale. Lattice arcs carry ``scores`` (acoustic + graph) and ``lm_scores`` (graph part), so
for each ``lm_scale`` the 1-best path is taken on ``am_scores + lm_scale * lm_scores``
(``am_scores = scores - lm_scores``); the lattice itself is generated once, with
``lm_scale = 1`` (Kaldi's chain models decode with acoustic scale 1.0 too). Several scales are
cheap; the first one given is the "primary" result.

Output files in ``out_dir`` (``NAME`` = ``tag``, e.g. ``dev-epoch-6-avg-2``, for the first
(primary) LM scale and ``{tag}-lm_scale_{s}`` for the others):

- ``hyps-NAME.txt`` and ``ref-{tag}.txt`` (Kaldi text format),
- ``errs-NAME.txt`` (alignment report), ``per_utt-NAME.tsv`` (per-utterance errors),
  ``wer-NAME.json`` (totals), ``wer-summary-{tag}.txt`` (one line per scale),
- with ``save_lattices``: ``lattices-{tag}/<cut_id>.pt`` (see :mod:`k2quant.decode.lattice`).
"""
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from k2quant.utils.io import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)


@dataclass
class DecodeOptions:
    search_beam: float = 20.0
    output_beam: float = 8.0
    min_active_states: int = 30
    max_active_states: int = 10000
    lm_scales: Sequence[float] = (1.0,)
    max_duration: float = 300.0
    utt_cmn: bool = True
    save_lattices: bool = False


@dataclass
class DecodeResult:
    hyps: Dict[float, Dict[str, List[str]]]  # lm_scale -> cut id -> words
    refs: Dict[str, List[str]]
    wer: Dict[float, Any] = field(default_factory=dict)  # lm_scale -> WerResult
    seconds: float = 0.0
    audio_seconds: float = 0.0


def _rescale(lattice, lm_scale: float):
    """A copy of ``lattice`` with scores ``am + lm_scale * lm`` (same lattice if scale 1)."""
    if lm_scale == 1.0 or not hasattr(lattice, "lm_scores"):
        return lattice
    am = lattice.scores - lattice.lm_scores
    lat = lattice.clone() if hasattr(lattice, "clone") else lattice
    lat.scores = am + lm_scale * lattice.lm_scores
    return lat


@torch.no_grad()
def decode_cuts(
    model: nn.Module,
    HLG: Any,
    cuts,
    id2word: Dict[int, str],
    opts: DecodeOptions,
    *,
    device: torch.device = torch.device("cpu"),
    lattice_dir: Optional[Path] = None,
    words_txt: Optional[Path] = None,
    progress: bool = True,
) -> DecodeResult:
    """Decode every supervision of ``cuts``; returns hypotheses per LM scale and references.

    Args:
      model: acoustic model in eval mode: (N, T, C) features -> (N, T', num_pdfs) log-probs,
        with ``subsampling_factor``.
      HLG: arc-sorted decoding graph on ``device`` (``k2quant.decode.graph.load_hlg``).
      cuts: lhotse CutSet with features; one hypothesis per supervision, keyed by cut id
        (supervision id when a cut has several).
      id2word: word id -> word (inverse of ``words.txt``).
    """
    from k2quant.decode.lattice import get_lattice, ids_to_words, one_best, save_lattices
    from k2quant.training.dataset import (
        AsrDataset, make_dataloader, make_eval_sampler, supervision_segments,
    )

    model.eval()
    sf = int(getattr(model, "subsampling_factor", 1))
    dl = make_dataloader(AsrDataset(utt_cmn=opts.utt_cmn), make_eval_sampler(cuts, opts.max_duration))
    hyps: Dict[float, Dict[str, List[str]]] = {s: {} for s in opts.lm_scales}
    refs: Dict[str, List[str]] = {}
    t0 = time.time()
    audio = 0.0
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(desc="decode", unit="batch", leave=False)
    for batch in dl:
        sup = batch["supervisions"]
        ids = _utt_ids(sup)
        x = batch["inputs"].to(device)
        log_probs = model(x)
        seg, texts, order = supervision_segments(sup, sf)
        seg_ids = [ids[i] for i in order]
        lattice = get_lattice(
            log_probs, HLG, seg,
            search_beam=opts.search_beam, output_beam=opts.output_beam,
            min_active_states=opts.min_active_states, max_active_states=opts.max_active_states,
            subsampling_factor=sf,
        )
        for s in opts.lm_scales:
            words = ids_to_words(one_best(_rescale(lattice, s)), id2word)
            for uid, w in zip(seg_ids, words):
                hyps[s][uid] = w
        for uid, t in zip(seg_ids, texts):
            refs[uid] = t.split()
        if lattice_dir is not None:
            save_lattices(lattice, seg_ids, lattice_dir, words_txt=words_txt,
                          subsampling_factor=sf, supervision_segments=seg)
        audio += batch["duration"]
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return DecodeResult(hyps=hyps, refs=refs, seconds=time.time() - t0, audio_seconds=audio)


def _utt_ids(sup: Dict[str, Any]) -> List[str]:
    ids = list(sup["cut_id"])
    if len(set(ids)) == len(ids):
        return ids
    # several supervisions per cut: disambiguate with their index within the cut
    seen: Dict[str, int] = {}
    out = []
    for i in ids:
        k = seen.get(i, 0)
        seen[i] = k + 1
        out.append(f"{i}-{k}")
    return out


def read_words_table(path: Path) -> Dict[int, str]:
    id2word = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        f = line.split()
        if len(f) == 2:
            id2word[int(f[1])] = f[0]
    return id2word


def graph_files(lang_dir: Any, hlg_path: Optional[Any], build_hint: str):
    """``(HLG path, words.txt path)`` of ``lang_dir`` (``hlg_path`` overrides the graph);
    ``FileNotFoundError`` if either is missing (``build_hint``: how to build the graph)."""
    lang_dir_p = Path(lang_dir)
    hlg = Path(hlg_path) if hlg_path else lang_dir_p / "HLG.pt"
    if not hlg.is_file():
        raise FileNotFoundError(
            f"decoding graph {hlg} not found; build it with {build_hint} or pass --hlg")
    words_txt = lang_dir_p / "words.txt"
    if not words_txt.is_file():
        raise FileNotFoundError(f"{words_txt} not found; --lang-dir must be a prepared lang dir")
    return hlg, words_txt


def score_and_write(res: DecodeResult, out: Path, tag: str, lm_scales: Sequence[float],
                    extra: Dict[str, Any]) -> None:
    """Score ``res`` per LM scale (filling ``res.wer``) and write into ``out`` the reference,
    and per scale the hyps, per-utterance errors, error report and ``wer-NAME.json`` (the WER
    dict, ``lm_scale`` and ``extra``), then ``wer-summary-TAG.txt``. NAME is ``tag`` for the
    first scale, ``TAG-lm_scale_S`` for the others."""
    from k2quant.scoring import compute_wer, write_error_report, write_hyps, write_per_utt_errors

    write_hyps(res.refs, out / f"ref-{tag}.txt")
    lines = []
    for i, s in enumerate(lm_scales):
        name = tag if i == 0 else f"{tag}-lm_scale_{s:g}"
        hyps = res.hyps[s]
        wer = compute_wer(res.refs, hyps)
        res.wer[s] = wer
        write_hyps(hyps, out / f"hyps-{name}.txt")
        write_per_utt_errors(wer, out / f"per_utt-{name}.tsv")
        write_error_report(wer, res.refs, hyps, out / f"errs-{name}.txt")
        d = wer.to_dict()
        d.update({"lm_scale": s, **extra})
        atomic_write_json(out / f"wer-{name}.json", d)
        lines.append(f"{name}\tlm_scale {s:g}\t{wer.summary()}")
    atomic_write_text(out / f"wer-summary-{tag}.txt", "\n".join(lines) + "\n")


AM_INFO_FILE = "am-info.json"


def am_info(model: nn.Module, source: str, path: Optional[Any] = None,
            fp32_params: Optional[int] = None) -> Dict[str, Any]:
    """What a lattice directory records about the acoustic model that produced it (read by
    ``k2quant rescore`` and the system report): ``model`` (its source), and
    :func:`k2quant.export.model_size_info` of the model file ``path`` (``params``, ``packed``,
    ``bytes``; a float model without a file counts 4 bytes per parameter), plus
    ``fp32_params``: of the fp32 model it came from (the model itself if float; else when
    known)."""
    from k2quant.export import model_params, model_size_info

    if path is not None:
        info = model_size_info(model, path)
    else:
        n = model_params(model)
        info = {"params": n, "packed": False, "bytes": 4 * n}
    fp32 = fp32_params if info["packed"] else info["params"]
    return {"model": source, **info, "fp32_params": int(fp32) if fp32 else None}


def _decode_and_write(model: nn.Module, utt_cmn: bool, lang_dir: str, cuts_path: str,
                      out_dir: str, hlg_path: Optional[str], opts: DecodeOptions,
                      dev: torch.device, tag: str, extra: Dict[str, Any],
                      am: Dict[str, Any]) -> DecodeResult:
    from k2quant.decode.graph import load_hlg
    from k2quant.training.dataset import load_cuts

    hlg, words_txt = graph_files(
        lang_dir, hlg_path,
        f"'k2quant compile-hlg --lang-dir {lang_dir} --arpa WORD_LM.arpa' (the recipe's LM stage)")
    opts.utt_cmn = bool(utt_cmn)
    HLG = load_hlg(hlg, device=dev)
    cuts = load_cuts(cuts_path)
    out = Path(out_dir)
    lat_dir = out / f"lattices-{tag}" if opts.save_lattices else None
    log.info("decoding %s with %s, graph %s, lm scales %s", cuts_path, am["model"], hlg,
             list(opts.lm_scales))
    res = decode_cuts(model.to(dev).eval(), HLG, cuts, read_words_table(words_txt), opts,
                      device=dev, lattice_dir=lat_dir, words_txt=words_txt)
    if lat_dir is not None:
        atomic_write_json(lat_dir / AM_INFO_FILE, am)
    score_and_write(res, out, tag, opts.lm_scales, {
        **extra, "am": am, "cuts": str(cuts_path), "utt_cmn": bool(utt_cmn),
        "decode_seconds": round(res.seconds, 2),
        "real_time_factor": round(res.seconds / max(res.audio_seconds, 1e-9), 4)})
    log.info("decoded %.1f s of audio in %.1f s (RTF %.3f)", res.audio_seconds, res.seconds,
             res.seconds / max(res.audio_seconds, 1e-9))
    return res


def _device(device: str, num_threads: int) -> torch.device:
    if num_threads > 0:
        torch.set_num_threads(num_threads)
    return torch.device("cuda" if device in ("auto", "cuda") and torch.cuda.is_available()
                        else "cpu")


def _split_name(cuts_path: str) -> str:
    return Path(cuts_path).name.replace("cuts_", "").split(".")[0]


def run_decode(
    exp_dir: Optional[str],
    epoch: Optional[int],
    avg: int,
    lang_dir: str,
    cuts_path: str,
    out_dir: str,
    *,
    model_path: Optional[str] = None,
    utt_cmn: Optional[bool] = None,
    hlg_path: Optional[str] = None,
    opts: Optional[DecodeOptions] = None,
    device: str = "auto",
    tag: Optional[str] = None,
    num_threads: int = 0,
) -> DecodeResult:
    """``k2quant decode``: decode ``cuts_path`` with the ``epoch``/``avg`` checkpoint average of
    ``exp_dir``, or (``exp_dir = epoch = None``) with the model file ``model_path``: a packed
    ``.k2q`` export (``k2quant compress``'s ``model.k2q``, any
    :func:`k2quant.export.save_packed` file of an acoustic model) or one ``epoch-N.pt``
    checkpoint; write and score hyps.

    ``utt_cmn`` (per-utterance feature mean normalisation, as in training): None takes it from
    the model (training config of the checkpoint, or the packed header metadata written by
    ``k2quant compress``), else True (the recipes' setting).
    Returns the :class:`DecodeResult` (``wer[lm_scale]`` are :class:`k2quant.scoring.WerResult`).
    Raises ``ValueError`` when the file holds no acoustic model.
    """
    opts = opts or DecodeOptions()
    dev = _device(device, num_threads)
    if model_path is None:
        from k2quant.training.checkpoint import (average_checkpoints, checkpoints_to_average,
                                                 model_from_checkpoint)

        if exp_dir is None or epoch is None:
            raise ValueError("run_decode: give exp_dir and epoch, or model_path")
        paths = checkpoints_to_average(exp_dir, epoch, avg)
        ck = average_checkpoints(paths)
        stored = (ck.get("config") or {}).get("utt_cmn")
        model = model_from_checkpoint(ck, paths[-1])
        tag = tag or f"{_split_name(cuts_path)}-epoch-{epoch}-avg-{avg}"
        am = am_info(model, f"{Path(exp_dir) / f'epoch-{epoch}.pt'} (avg {avg})")
        extra: Dict[str, Any] = {"epoch": epoch, "avg": avg, "exp_dir": str(exp_dir)}
    else:
        if exp_dir is not None or epoch is not None:
            raise ValueError("run_decode: give either model_path or exp_dir/epoch, not both")
        model, stored, am = _load_model_file(Path(model_path))
        tag = tag or f"{_split_name(cuts_path)}-{Path(model_path).stem}"
        extra = {"model": str(model_path)}
    if utt_cmn is None:
        utt_cmn = True if stored is None else bool(stored)
    elif stored is not None and bool(stored) != bool(utt_cmn):
        log.warning("%s was trained with utt_cmn=%s; decoding with utt_cmn=%s as asked",
                    am["model"], stored, utt_cmn)
    return _decode_and_write(model, utt_cmn, lang_dir, cuts_path, out_dir, hlg_path, opts, dev,
                             tag, extra, am)


def _load_model_file(path: Path):
    """(acoustic model, its stored utt_cmn or None, am_info) of a .k2q or checkpoint file."""
    from k2quant.export import is_packed_file, load_packed, read_header

    if not path.is_file():
        raise FileNotFoundError(f"--model {path}: no such file (a packed .k2q export or an "
                                f"epoch-N.pt checkpoint)")
    if is_packed_file(path):
        meta = read_header(path).extra
        model = load_packed(path)
        stored = meta.get("utt_cmn")
        fp32_params = meta.get("fp32_params")
    else:
        from k2quant.training.checkpoint import average_checkpoints, model_from_checkpoint

        try:
            ck = average_checkpoints([path])
        except Exception as e:  # not a torch file
            raise ValueError(f"--model {path}: neither a packed .k2q export nor a k2quant "
                             f"checkpoint ({type(e).__name__}: {e})") from None
        model = model_from_checkpoint(ck, f"--model {path}")
        stored = (ck.get("config") or {}).get("utt_cmn")
        fp32_params = None
    if getattr(model, "subsampling_factor", None) is None:
        raise ValueError(f"--model {path}: holds a {type(model).__name__}, not an acoustic "
                         f"model (TDNN-F)")
    return model, stored, am_info(model, str(path), path, fp32_params)
