"""Word error rate of the integer engine: decode with :class:`~k2quant.infer.IntTdnnF`
through the same HLG decoder as the fp32 model, and compare with a baseline (issue 6).

This is the library behind ``k2quant decode-int``. The integer model is what
``k2quant calibrate`` wrote (``OUT/int_model.pt`` next to ``OUT/calibration.json``); it is
decoded with :func:`k2quant.decode.run.decode_cuts` (same batching, HLG, beams and LM scale as
``k2quant decode``), scored with :mod:`k2quant.scoring` and, given the per-utterance errors of
a baseline on the same cuts (e.g. the fp32 ``per_utt-*.tsv`` of ``k2quant decode``), tested
with :func:`k2quant.significance.lossless_verdict` (MAPSSWE and the paired bootstrap,
one-sided "the integer model is worse").

Feature normalisation. The integer engine folds the model's ``input_bn`` but not the
per-utterance mean subtraction (``utt_cmn``) applied by the data loader in training; the
decoder must apply it exactly as in training. It is resolved, in this order, from an explicit
choice, the ``utt_cmn`` recorded by ``k2quant calibrate`` in ``calibration.json``, the
training config of the checkpoint that was calibrated (``config.utt_cmn`` in the checkpoint or
the ``train-config.json`` next to it), and finally the training default (``True``), with a
warning in that last case (:func:`resolve_utt_cmn`).

Output files in ``out_dir`` (``TAG`` e.g. ``dev-int8``; other LM scales get
``TAG-lm_scale_S`` as in :mod:`k2quant.decode.run`): ``hyps-TAG.txt``, ``ref-TAG.txt``,
``per_utt-TAG.tsv``, ``errs-TAG.txt``, ``wer-TAG.json``, ``wer-summary-TAG.txt`` and
``summary-TAG.json`` (WER, settings, calibration provenance and, with a baseline, the
significance tests and the acceptance check, see :func:`acceptance`).
"""
import json
import logging
import os
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import torch

log = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

INT_MODEL_FILE = "int_model.pt"
CALIBRATION_FILE = "calibration.json"
#: the training loop's default (k2quant.training.train.TrainConfig.utt_cmn)
DEFAULT_UTT_CMN = True
#: the issue-6 acceptance: WER increase (absolute, percent) tolerated for the integer model
DEFAULT_MAX_WER_INCREASE = 0.5


# ----------------------------------------------------------------------------------------
# locating the integer model and its provenance
# ----------------------------------------------------------------------------------------
def locate_int_model(path: PathLike) -> Tuple[Path, Dict[str, Any]]:
    """``path`` is a ``k2quant calibrate`` output directory or its ``int_model.pt`` (any
    file name). Returns ``(model_file, calibration_info)``; the info is the
    ``calibration.json`` next to the model file, or ``{}`` when there is none.

    Raises:
      FileNotFoundError: no such file / the directory has no ``int_model.pt``.
      ValueError: ``calibration.json`` exists but is not valid JSON.
    """
    p = Path(path)
    if p.is_dir():
        model_file = p / INT_MODEL_FILE
        if not model_file.is_file():
            raise FileNotFoundError(
                f"{p} has no {INT_MODEL_FILE}; give the directory written by "
                f"'k2quant calibrate --out DIR' or the integer model file itself"
            )
    elif p.is_file():
        model_file = p
    else:
        raise FileNotFoundError(f"integer model {p} not found")
    calib = model_file.parent / CALIBRATION_FILE
    info: Dict[str, Any] = {}
    if calib.is_file():
        try:
            info = json.loads(calib.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{calib}: not valid JSON ({e})") from e
        if not isinstance(info, dict):
            raise ValueError(f"{calib}: expected a JSON object, got {type(info).__name__}")
    return model_file, info


def checkpoint_utt_cmn(path: Optional[PathLike],
                       allow_pickle: bool = False) -> Tuple[Optional[bool], str]:
    """The ``utt_cmn`` a checkpoint was trained with.

    Reads ``config.utt_cmn`` of the checkpoint if it loads with ``weights_only=True`` (or
    with ``allow_pickle``, for files you trust: epoch checkpoints carry RNG state, and
    torch 1.13's restricted unpickler rejects even the floats of a training config), else the
    ``train-config.json`` in the checkpoint's directory (written by the training loop).
    Packed exports (``.k2q``) carry no training config.

    Returns ``(utt_cmn or None, where it was found)``.
    """
    if path is None:
        return None, "no checkpoint"
    p = Path(path)
    if p.is_file() and p.suffix != ".k2q":
        try:
            ck = torch.load(p, map_location="cpu", weights_only=not allow_pickle)
        except Exception:  # pickled objects (RNG state, floats on torch 1.13), not torch
            ck = None
        if isinstance(ck, dict) and isinstance(ck.get("config"), dict) \
                and "utt_cmn" in ck["config"]:
            return bool(ck["config"]["utt_cmn"]), f"{p} (config.utt_cmn)"
    tc = p.parent / "train-config.json"
    if tc.is_file():
        try:
            cfg = json.loads(tc.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            cfg = {}
        cfg = cfg.get("config", cfg) if isinstance(cfg, dict) else {}
        if isinstance(cfg, dict) and "utt_cmn" in cfg:
            return bool(cfg["utt_cmn"]), f"{tc} (config.utt_cmn)"
    return None, f"{p}: no training config found"


def resolve_utt_cmn(explicit: Optional[bool], calibration: Mapping[str, Any]) -> Tuple[bool, str]:
    """Feature normalisation for decoding (see the module docstring). Returns
    ``(utt_cmn, source)``."""
    if explicit is not None:
        return bool(explicit), "command line"
    if "utt_cmn" in calibration and calibration["utt_cmn"] is not None:
        return bool(calibration["utt_cmn"]), "calibration.json"
    val, src = checkpoint_utt_cmn(calibration.get("model"))
    if val is not None:
        return val, src
    log.warning("feature normalisation (utt_cmn) of the calibrated model is unknown (%s); "
                "using the training default utt_cmn=%s", src, DEFAULT_UTT_CMN)
    return DEFAULT_UTT_CMN, "training default"


def load_int_model(path: PathLike, backend: str = "auto"):
    """``(IntTdnnF, model_file, calibration_info)`` from :func:`locate_int_model`'s
    ``path``. Raises ValueError for a file that is not a (current) integer model."""
    from k2quant.infer.int_engine import IntTdnnF

    model_file, info = locate_int_model(path)
    try:
        engine = IntTdnnF.load(model_file, backend=backend)
    except ValueError as e:
        log.debug("IntTdnnF.load(%s): %s", model_file, e)
        msg = str(e)
        if "format version" in msg:
            raise
        raise ValueError(
            f"{model_file}: not an integer model written by 'k2quant calibrate' (a training "
            f"checkpoint or a .k2q export must be calibrated first: 'k2quant calibrate --model "
            f"FILE --zero-shot|--cuts CUTS --out DIR', then pass DIR)"
        ) from e
    return engine, model_file, info


def _check_cuts(cuts, feat_dim: int, baseline: Optional[Mapping[str, Any]], cuts_path) -> None:
    """Fail before decoding: features of another dimension than the model's, or (cuts with
    one supervision each, keyed by cut id) other utterances than the baseline's."""
    ids = []
    single = True
    for cut in cuts:
        nf = getattr(cut, "num_features", None)
        if nf is not None and int(nf) != feat_dim:
            raise ValueError(
                f"{cuts_path}: cut {cut.id} has {nf}-dimensional features but the integer "
                f"model expects feat_dim={feat_dim}; decode features of the kind it was "
                f"trained on")
        single = single and len(cut.supervisions) == 1
        ids.append(cut.id)
    if baseline is not None and single:
        a, b = set(baseline), set(ids)
        if a != b:
            raise ValueError(
                f"the baseline errors are of other utterances than {cuts_path}: "
                f"{len(a - b)} only in the baseline (e.g. {sorted(a - b)[:5]}), "
                f"{len(b - a)} only in the cuts (e.g. {sorted(b - a)[:5]}); the paired tests "
                f"need the same utterances in both systems")


def calibration_summary(info: Mapping[str, Any]) -> Dict[str, Any]:
    """The provenance fields of ``calibration.json`` worth repeating in a decode summary."""
    out: Dict[str, Any] = {}
    for k in ("model", "method", "act_bits", "weight_bits", "plan", "seed", "cuts",
              "num_utts", "frames", "percentile", "utt_cmn",
              "top1_agreement_on_calibration_features", "packed_bytes"):
        if k in info:
            out[k] = info[k]
    if "zero_shot" in info:
        z = info["zero_shot"]
        out["data"] = "zero-shot"
        out["zero_shot"] = {k: z[k] for k in ("num_utts", "frames", "steps", "lr", "tv_weight",
                                              "initial_bn_loss", "final_bn_loss") if k in z}
    elif "cuts" in info:
        out["data"] = "real"
    return out


# ----------------------------------------------------------------------------------------
# comparison with a baseline
# ----------------------------------------------------------------------------------------
def errors_of(wer) -> Dict[str, Tuple[int, int]]:
    """``{utt_id: (errors, ref_words)}`` of a :class:`k2quant.scoring.WerResult`."""
    return {u: (e.errors, e.ref_len) for u, e in wer.utts.items()}


def acceptance(verdict: Mapping[str, Any], max_wer_increase: float = DEFAULT_MAX_WER_INCREASE,
               alpha: float = 0.05) -> Dict[str, Any]:
    """Issue 6's acceptance of system B against baseline A from a
    :func:`~k2quant.significance.lossless_verdict`: the WER increase is at most
    ``max_wer_increase`` (absolute, percent) *and* not significant (both one-sided p-values
    >= ``alpha``)."""
    m = verdict["mapsswe"]
    delta = float(m["wer_b_percent"]) - float(m["wer_a_percent"])
    within = delta <= max_wer_increase + 1e-9
    not_worse = float(verdict["p_value"]) >= alpha
    return {"wer_delta_abs": delta, "max_wer_increase": max_wer_increase,
            "within_tolerance": bool(within), "not_significantly_worse": bool(not_worse),
            "accepted": bool(within and not_worse)}


def compare_with_baseline(
    baseline_errors: PathLike,
    wer,
    *,
    alpha: float = 0.05,
    num_samples: int = 10000,
    seed: int = 0,
    max_wer_increase: float = DEFAULT_MAX_WER_INCREASE,
) -> Dict[str, Any]:
    """Significance of the WER change of ``wer`` (a ``WerResult``) over the per-utterance
    errors in ``baseline_errors`` (``per_utt-*.tsv``). Returns the
    :func:`~k2quant.significance.lossless_verdict` dict plus ``baseline`` (the file),
    ``wer_a``/``wer_b`` and ``acceptance``.

    Raises ValueError if the utterance sets or the reference lengths differ.
    """
    from k2quant.significance import load_errors, lossless_verdict

    base = load_errors(baseline_errors)
    verdict = lossless_verdict(base, errors_of(wer), alpha=alpha, num_samples=num_samples,
                               seed=seed)
    verdict["baseline"] = str(baseline_errors)
    verdict["wer_a"] = verdict["mapsswe"]["wer_a_percent"]
    verdict["wer_b"] = verdict["mapsswe"]["wer_b_percent"]
    verdict["acceptance"] = acceptance(verdict, max_wer_increase, alpha)
    return verdict


@torch.no_grad()
def output_agreement(engine, float_model, cuts, utt_cmn: bool,
                     max_duration: float = 300.0) -> Dict[str, Any]:
    """How closely the integer engine follows the float model on ``cuts`` (features
    normalised as in training), frame by frame on the subsampled output grid:

    - ``top1_agreement``: fraction of frames whose arg-max output column agrees;
    - ``mean_kl``: mean KL(float || integer) of the output distributions (nats / frame);
    - ``max_abs_logprob_diff``: largest |log p_float - log p_int| over all outputs.

    A finer view of the calibration than the WER (each AN4 dev error is 0.16 % WER).
    """
    from k2quant.training.dataset import AsrDataset, make_dataloader, make_eval_sampler

    float_model.eval()
    dl = make_dataloader(AsrDataset(utt_cmn=utt_cmn), make_eval_sampler(cuts, max_duration))
    sf = int(engine.subsampling_factor)
    agree = frames = 0
    kl = 0.0
    worst = 0.0
    for batch in dl:
        x = batch["inputs"]
        a = float_model(x)
        b = engine(x)
        if a.shape != b.shape:
            raise ValueError(f"float model output {tuple(a.shape)} and integer engine output "
                             f"{tuple(b.shape)} differ: not the same model")
        # only the frames of each utterance (batches are padded to the longest)
        sup = batch["supervisions"]
        for i, s0, n in zip(sup["sequence_idx"].tolist(), sup["start_frame"].tolist(),
                            sup["num_frames"].tolist()):
            lo, hi = s0 // sf, min(a.shape[1], (s0 + n + sf - 1) // sf)
            pa, pb = a[i, lo:hi], b[i, lo:hi]
            agree += int((pa.argmax(-1) == pb.argmax(-1)).sum())
            frames += hi - lo
            kl += float((pa.exp() * (pa - pb)).sum())
            worst = max(worst, float((pa - pb).abs().max())) if hi > lo else worst
    if frames == 0:
        raise ValueError("output_agreement: no frames")
    return {"frames": frames, "top1_agreement": agree / frames, "mean_kl": kl / frames,
            "max_abs_logprob_diff": worst}


# ----------------------------------------------------------------------------------------
# decoding
# ----------------------------------------------------------------------------------------
def decode_int(
    int_model: PathLike,
    lang_dir: PathLike,
    cuts_path: PathLike,
    out_dir: PathLike,
    *,
    backend: str = "auto",
    hlg_path: Optional[PathLike] = None,
    opts=None,
    utt_cmn: Optional[bool] = None,
    tag: Optional[str] = None,
    baseline_errors: Optional[PathLike] = None,
    alpha: float = 0.05,
    num_samples: int = 10000,
    max_wer_increase: float = DEFAULT_MAX_WER_INCREASE,
    float_model=None,
    num_threads: int = 0,
    progress: bool = True,
) -> Dict[str, Any]:
    """Decode ``cuts_path`` with the integer model, write the result files (module
    docstring) and return the summary dict (also written to ``summary-TAG.json``).

    Args:
      int_model: ``k2quant calibrate`` output directory or integer model file.
      opts: :class:`k2quant.decode.run.DecodeOptions` (defaults: those of ``k2quant
        decode``); its ``utt_cmn`` is replaced by :func:`resolve_utt_cmn`.
      utt_cmn: force the feature normalisation (None: as in training).
      baseline_errors: per-utterance errors of the baseline on the same cuts; adds
        ``significance`` (see :func:`compare_with_baseline`) to the summary.
      float_model: the float model that was calibrated (``nn.Module``); adds
        ``agreement_with_float`` (:func:`output_agreement` on the decoded cuts).
    Raises:
      FileNotFoundError: missing model, graph, words.txt, cuts or baseline file.
      ValueError: not an integer model, a graph of another lang, features of another
        dimension, baseline of other utterances.
    """
    import time

    from k2quant.decode.graph import check_hlg, load_hlg
    from k2quant.decode.run import (
        DecodeOptions,
        decode_cuts,
        graph_files,
        read_words_table,
        score_and_write,
    )
    from k2quant.training.dataset import load_cuts
    from k2quant.utils.io import atomic_write_json

    opts = opts or DecodeOptions()
    if num_threads > 0:
        torch.set_num_threads(num_threads)
    hlg, words_txt = graph_files(lang_dir, hlg_path, "'k2quant compile-hlg'")
    if not Path(cuts_path).is_file():
        raise FileNotFoundError(f"cuts {cuts_path} not found")
    if baseline_errors is not None and not Path(baseline_errors).is_file():
        raise FileNotFoundError(f"baseline per-utterance errors {baseline_errors} not found")

    engine, model_file, calib = load_int_model(int_model, backend)
    opts.utt_cmn, cmn_source = resolve_utt_cmn(utt_cmn, calib)
    HLG = load_hlg(hlg, device="cpu")
    check_hlg(HLG, engine.num_classes)
    split = Path(cuts_path).name.replace("cuts_", "").split(".")[0]
    tag = tag or f"{split}-int"
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    log.info("decoding %s with the integer model %s (back end %s, utt_cmn=%s from %s), "
             "graph %s, lm scales %s", cuts_path, model_file, engine.backend, opts.utt_cmn,
             cmn_source, hlg, list(opts.lm_scales))
    cuts = load_cuts(cuts_path)
    base = None
    if baseline_errors is not None:
        from k2quant.significance import load_errors

        base = load_errors(baseline_errors)
    _check_cuts(cuts, engine.feat_dim, base, cuts_path)
    t0 = time.time()
    res = decode_cuts(engine, HLG, cuts, read_words_table(words_txt), opts,
                      device=torch.device("cpu"), progress=progress)
    wall = time.time() - t0
    score_and_write(res, out, tag, opts.lm_scales, {
        "int_model": str(model_file), "backend": engine.backend, "cuts": str(cuts_path)})
    primary = res.wer[opts.lm_scales[0]]
    summary: Dict[str, Any] = {
        "tag": tag,
        "int_model": str(model_file),
        "backend": engine.backend,
        "cuts": str(cuts_path),
        "lang_dir": str(lang_dir),
        "hlg": str(hlg),
        "utt_cmn": opts.utt_cmn,
        "utt_cmn_source": cmn_source,
        "decode_options": {
            "search_beam": opts.search_beam, "output_beam": opts.output_beam,
            "min_active_states": opts.min_active_states,
            "max_active_states": opts.max_active_states,
            "lm_scales": list(opts.lm_scales), "max_duration": opts.max_duration,
        },
        "lm_scale": opts.lm_scales[0],
        "wer": primary.to_dict(),
        "wer_by_lm_scale": {f"{s:g}": res.wer[s].wer_percent for s in opts.lm_scales},
        "calibration": calibration_summary(calib),
        "memory": engine.memory_report(),
        "decode_seconds": round(wall, 2),
        "audio_seconds": round(res.audio_seconds, 2),
        "real_time_factor": round(wall / max(res.audio_seconds, 1e-9), 4),
        "torch_threads": torch.get_num_threads(),
    }
    if float_model is not None:
        summary["agreement_with_float"] = output_agreement(
            engine, float_model, load_cuts(cuts_path), opts.utt_cmn, opts.max_duration)
    if baseline_errors is not None:
        summary["significance"] = compare_with_baseline(
            baseline_errors, primary, alpha=alpha, num_samples=num_samples,
            max_wer_increase=max_wer_increase)
    atomic_write_json(out / f"summary-{tag}.json", summary)
    return summary


def format_summary(summary: Mapping[str, Any]) -> str:
    """Human-readable lines for a :func:`decode_int` summary."""
    w = summary["wer"]
    lines = [f"%WER {w['wer']:.2f} [ {w['errors']} / {w['ref_words']}, {w['ins']} ins, "
             f"{w['del']} del, {w['sub']} sub ] over {w['num_utts']} utterances "
             f"(integer engine, back end {summary['backend']})"]
    agr = summary.get("agreement_with_float")
    if agr:
        lines.append(f"agreement with the float model over {agr['frames']} output frames: "
                     f"top-1 {100 * agr['top1_agreement']:.2f}%, mean KL "
                     f"{agr['mean_kl']:.4f} nats/frame")
    sig = summary.get("significance")
    if sig:
        acc = sig["acceptance"]
        lines.append(
            f"vs baseline {sig['baseline']}: WER {sig['wer_a']:.2f} -> {sig['wer_b']:.2f} "
            f"({acc['wer_delta_abs']:+.2f} abs); p(MAPSSWE) = {sig['mapsswe']['p_value']:.3g}, "
            f"p(bootstrap) = {sig['bootstrap']['p_value']:.3g} (one-sided, worse); "
            f"{'not ' if sig['lossless'] else ''}significantly worse at alpha {sig['alpha']}; "
            f"acceptance (<= {acc['max_wer_increase']:g} abs and not significantly worse): "
            f"{'PASS' if acc['accepted'] else 'FAIL'}")
    return "\n".join(lines)


__all__ = [
    "INT_MODEL_FILE", "CALIBRATION_FILE", "locate_int_model", "checkpoint_utt_cmn",
    "resolve_utt_cmn", "load_int_model", "calibration_summary", "errors_of", "acceptance",
    "compare_with_baseline", "output_agreement", "decode_int", "format_summary",
]
