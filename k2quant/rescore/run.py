"""The ``k2quant rescore`` driver: lattice directory + LM -> hypotheses, WER, summary.

Output files in ``out_dir`` (``NAME`` = a setting name such as ``lm_scale_0.5`` or, with
several n-gram scales or a non-zero one, ``lm_scale_0.5-ngram_scale_1``; ``-wip_X`` is appended
for a non-zero word insertion penalty):

- ``hyps-NAME.txt``: hypotheses (Kaldi text format), one file per setting;
- ``hyps-1best.txt``: the lattice 1-best (the baseline, lattice scores as decoded);
- with references: ``ref.txt``, ``per_utt-NAME.tsv`` / ``per_utt-1best.tsv``
  (:func:`k2quant.scoring.write_per_utt_errors`), ``errs-NAME.txt`` (alignment report),
  ``wer-summary.txt`` (one ``%WER`` line per setting, baseline first);
- ``rescore-summary.json``: settings, WER per setting and of the baseline, the best setting,
  number of utterances / empty lattices (with their ids) / n-best candidates, LM OOV rate,
  wall time, LM time and throughput (utterances per second).

References (``refs``): a Kaldi ``text`` file, or a lhotse cut manifest (``*.jsonl[.gz]``,
``*.json``) whose supervision texts are used with the ids that ``k2quant decode`` gives its
lattices (the cut id; ``<cut_id>-<k>`` for cuts with several supervisions).
"""
import logging
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from k2quant.utils.io import PathLike, atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)


def read_refs(path: PathLike) -> Dict[str, List[str]]:
    """References from a Kaldi text file or a lhotse cut manifest (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"references {path} not found")
    name = path.name
    if name.endswith((".jsonl", ".jsonl.gz", ".json", ".json.gz")):
        from k2quant.training.dataset import load_cuts

        refs: Dict[str, List[str]] = {}
        for cut in load_cuts(path):
            sups = list(cut.supervisions)
            if len(sups) == 1:
                refs[cut.id] = (sups[0].text or "").split()
            else:
                for k, s in enumerate(sups):
                    refs[f"{cut.id}-{k}"] = (s.text or "").split()
        return refs
    from k2quant.scoring import read_text

    return read_text(path)


def read_words_txt(path: PathLike) -> Dict[int, str]:
    """words.txt (``word id`` lines) -> {id: word}; ``ValueError`` on malformed lines."""
    from k2quant.decode.graph import read_symbol_table

    table = read_symbol_table(path)
    if not table:
        raise ValueError(f"{path}: empty words.txt")
    return {i: w for w, i in table.items()}


def read_am_info(lattice_dir: PathLike) -> Optional[Dict[str, Any]]:
    """The acoustic model facts ``k2quant decode --save-lattices`` stored with the lattices
    (``am-info.json``), or None for lattices from elsewhere (e.g. an icefall decode)."""
    import json

    from k2quant.decode.run import AM_INFO_FILE

    f = Path(lattice_dir) / AM_INFO_FILE
    if not f.is_file():
        return None
    try:
        return json.loads(f.read_text())
    except ValueError:
        log.warning("%s: not JSON; the AM size is unknown", f)
        return None


def parse_scales(text: str, what: str) -> List[float]:
    """``"0.3,0.5"`` -> [0.3, 0.5] (order kept, duplicates removed)."""
    out: List[float] = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        try:
            v = float(part)
        except ValueError:
            raise ValueError(f"{what}: expected comma-separated numbers like 0.3,0.5, got "
                             f"{text!r}") from None
        if v not in out:
            out.append(v)
    if not out:
        raise ValueError(f"{what}: no value given (e.g. 0.3,0.5)")
    return out


def run_rescore(
    lattice_dir: PathLike,
    lm_path: PathLike,
    words_txt: PathLike,
    out_dir: PathLike,
    *,
    refs: Optional[PathLike] = None,
    num_paths: int = 100,
    lm_scales: Sequence[float] = (0.5,),
    ngram_scales: Sequence[float] = (0.0,),
    wip: float = 0.0,
    nbest_scale: float = 0.5,
    batch_size: int = 16,
    max_tokens: int = 4000,
    device: str = "cpu",
    skip_words: Optional[Sequence[str]] = None,
    progress: bool = True,
    seed: int = 0,
) -> Dict[str, Any]:
    """Rescore every lattice of ``lattice_dir`` and write the files listed in the module
    docstring. Returns the summary dict (also written to ``rescore-summary.json``).

    ``seed`` seeds torch before sampling paths (``k2.random_paths`` uses torch's RNG), so a
    run is reproducible.
    """
    import torch

    from k2quant.decode.graph import file_sha256
    from k2quant.export import model_size_info
    from k2quant.models.transformer_lm import load_lm
    from k2quant.rescore.nbest import (
        DEFAULT_SKIP_WORDS,
        ScaleSetting,
        list_lattice_files,
        rescore_lattices,
    )
    from k2quant.scoring import compute_wer, write_error_report, write_hyps, write_per_utt_errors

    if num_paths < 1:
        raise ValueError(f"--num-paths must be >= 1, got {num_paths}")
    files = list_lattice_files(lattice_dir)
    id2word = read_words_txt(words_txt)
    sha = file_sha256(words_txt)
    ref_words = read_refs(refs) if refs is not None else None
    lm = load_lm(lm_path, device=device)
    settings = [ScaleSetting(float(s), float(t), float(wip)) for t in ngram_scales
                for s in lm_scales]
    show_ngram = len(ngram_scales) > 1 or any(t != 0 for t in ngram_scales)
    log.info("rescoring %d lattices of %s with %s (%s LM, %d symbols); num_paths %d, "
             "lm scales %s, ngram scales %s, wip %g", len(files), lattice_dir, lm_path,
             lm.tokenizer.unit, len(lm.tokenizer), num_paths, list(lm_scales),
             list(ngram_scales), wip)
    torch.manual_seed(seed)
    res = rescore_lattices(
        files, lm, id2word, settings, num_paths=num_paths, nbest_scale=nbest_scale,
        words_txt_sha256=sha, words_txt_name=f"--words {words_txt}", batch_size=batch_size,
        max_tokens=max_tokens,
        skip_words=DEFAULT_SKIP_WORDS if skip_words is None else skip_words,
        show_ngram=show_ngram, progress=progress,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_hyps(res.baseline, out / "hyps-1best.txt")
    for name, hyps in res.hyps.items():
        write_hyps(hyps, out / f"hyps-{name}.txt")

    summary: Dict[str, Any] = {
        "lattice_dir": str(lattice_dir),
        "lm": str(lm_path),
        "lm_size": model_size_info(lm, lm_path),
        "am": read_am_info(lattice_dir),
        "lm_unit": lm.tokenizer.unit,
        "words_txt": str(words_txt),
        "words_txt_sha256": sha,
        "num_paths": num_paths,
        "nbest_scale": nbest_scale,
        "settings": {n: vars(s) for n, s in res.settings.items()},
        "num_utts": res.num_utts,
        "num_empty_lattices": len(res.empty),
        "empty_lattices": list(res.empty),
        "num_candidates": res.num_candidates,
        "avg_candidates_per_utt": res.num_candidates / max(1, res.num_utts - len(res.empty)),
        "lm_words": res.lm_stats.num_words,
        "lm_oov_words": res.lm_stats.num_oov,
        "lattice_score_sources": res.score_sources,
        "seconds": round(res.seconds, 3),
        "lm_seconds": round(res.lm_seconds, 3),
        "utts_per_second": round(res.utts_per_second, 3),
    }
    log.info("rescored %d utterances in %.2f s (%.1f utt/s; LM %.2f s), %d candidates, "
             "%d empty lattices", res.num_utts, res.seconds, res.utts_per_second,
             res.lm_seconds, res.num_candidates, len(res.empty))
    if ref_words is not None:
        write_hyps(ref_words, out / "ref.txt")
        wers: Dict[str, Any] = {}
        lines = []
        for name, hyps in [("1best", res.baseline), *res.hyps.items()]:
            wer = compute_wer(ref_words, hyps)
            write_per_utt_errors(wer, out / f"per_utt-{name}.tsv")
            write_error_report(wer, ref_words, hyps, out / f"errs-{name}.txt")
            wers[name] = wer.to_dict()
            lines.append(f"{name}\t{wer.summary()}")
            log.info("%s: %s", name, wer.summary())
        atomic_write_text(out / "wer-summary.txt", "\n".join(lines) + "\n")
        summary["baseline_wer"] = wers["1best"]["wer"]
        summary["wer"] = {n: wers[n]["wer"] for n in res.hyps}
        summary["wer_details"] = wers
        scored = [(w, n) for n, w in summary["wer"].items() if w is not None]
        if scored:
            best_wer, best_name = min(scored)
            summary["best_setting"] = best_name
            summary["best_wer"] = best_wer
    atomic_write_json(out / "rescore-summary.json", summary)
    return summary


__all__ = ["read_refs", "read_words_txt", "parse_scales", "run_rescore", "read_am_info"]
