"""``k2quant calibrate``: post-training quantisation of a TDNN-F for integer-only inference,
calibrated on real features (``--cuts``) or on zero-shot synthetic ones (``--zero-shot``).

Examples::

    k2quant calibrate --model exp/epoch-10.pt --allow-pickle --zero-shot --out exp/int8
    k2quant calibrate --model exp/model-4bit.k2q --cuts data/fbank/cuts_dev.jsonl.gz --out exp/int
    k2quant calibrate --model exp/epoch-10.pt --allow-pickle --zero-shot --plan exp/plan.json \\
        --out exp/mixed

Writes to ``--out``: ``int_model.pt`` (the integer engine, ``IntTdnnF.load``),
``act_ranges.json`` (per-point ranges and bits, with the model spec), ``model.k2q`` (the
packed weights, when the weights were quantised here or came quantised), ``plan.json`` (if a
plan was used) and ``calibration.json`` (settings, zero-shot loss history, agreement of the
integer engine with the float model on the calibration features, and ``utt_cmn``: the
per-utterance mean normalisation the model was trained with, applied to ``--cuts`` features
here and by ``k2quant decode-int`` when decoding).
"""
import logging
import os

import click

log = logging.getLogger("k2quant.calibrate")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model", "model_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Training checkpoint (EXP/epoch-N.pt) or packed export (.k2q).")
@click.option("--zero-shot", is_flag=True, help="Calibrate on synthetic features (no data).")
@click.option("--cuts", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Calibrate on real features from this lhotse cut manifest.")
@click.option("--num-utts", default=8, show_default=True,
              help="Synthetic utterances (--zero-shot) or cuts read (--cuts).")
@click.option("--frames", default=200, show_default=True,
              help="Frames per synthetic utterance / max frames per cut.")
@click.option("--steps", default=300, show_default=True, help="Zero-shot Adam steps.")
@click.option("--lr", default=0.1, show_default=True, help="Zero-shot Adam learning rate.")
@click.option("--tv-weight", default=0.01, show_default=True,
              help="Zero-shot temporal smoothness (total variation) weight.")
@click.option("--bits", default=8, show_default=True, type=click.IntRange(2, 8),
              help="Weight bits of float layers (ignored for already quantised weights).")
@click.option("--act-bits", default=8, show_default=True, type=click.IntRange(2, 8),
              help="Activation bits where the plan does not say otherwise.")
@click.option("--plan", "plan_path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Mixed-precision plan (JSON) to quantise a float model with; its act_bits "
                   "set the activation bits of each layer's input.")
@click.option("--method", default="minmax", show_default=True,
              type=click.Choice(["minmax", "percentile", "mse"]), help="Activation range method.")
@click.option("--percentile", default=99.99, show_default=True)
@click.option("--backend", default="auto", show_default=True,
              type=click.Choice(["auto", "qtensor", "int_mm", "fbgemm", "float64"]))
@click.option("--seed", default=0, show_default=True)
@click.option("--utt-cmn/--no-utt-cmn", default=None,
              help="Per-utterance mean normalisation of --cuts features (as the training data "
                   "loader does) [default: from the checkpoint's training config, else on]; "
                   "recorded in calibration.json for 'k2quant decode-int'.")
@click.option("--allow-pickle", is_flag=True,
              help="Let torch.load unpickle the checkpoint (training checkpoints store RNG "
                   "state); only for files you trust.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Output directory.")
def main(model_path, zero_shot, cuts, num_utts, frames, steps, lr, tv_weight, bits, act_bits,
         plan_path, method, percentile, backend, seed, utt_cmn, allow_pickle, out_dir):
    """Calibrate MODEL for integer-only inference and write the integer model."""
    import torch

    from k2quant.infer.calibrate import (
        calibrate_model, load_acoustic_model, load_cut_features, point_bits_from_plan,
        synthesize_features)
    from k2quant.infer.evaluate import DEFAULT_UTT_CMN, checkpoint_utt_cmn
    from k2quant.utils.io import atomic_write_json

    if zero_shot == (cuts is not None):
        raise click.UsageError("give exactly one of --zero-shot or --cuts")
    try:
        model = load_acoustic_model(model_path, allow_pickle=allow_pickle)
    except ValueError as e:
        raise click.ClickException(str(e))
    from k2quant.models.tdnnf import TdnnF
    from k2quant.nn import QuantModule
    from k2quant.plan import LayerConfig, Plan, convert, quantize_

    if not isinstance(model, TdnnF):
        raise click.ClickException(f"{model_path}: expected a TDNN-F acoustic model, got "
                                   f"{type(model).__name__}")
    quantized = any(isinstance(m, QuantModule) for m in model.modules())
    plan = None
    if plan_path:
        if quantized:
            raise click.ClickException("--plan: the model is already quantised; give a float "
                                       "checkpoint or drop --plan")
        plan = Plan.load(plan_path)
    if utt_cmn is not None:
        cmn_source = "command line"
    else:
        utt_cmn, cmn_source = checkpoint_utt_cmn(model_path, allow_pickle=allow_pickle)
        if utt_cmn is None:
            utt_cmn, cmn_source = DEFAULT_UTT_CMN, f"training default ({cmn_source})"
    os.makedirs(out_dir, exist_ok=True)
    info = {"model": os.path.abspath(model_path), "method": method, "act_bits": act_bits,
            "weight_bits": bits, "plan": plan_path, "seed": seed, "utt_cmn": bool(utt_cmn),
            "utt_cmn_source": cmn_source}
    if method == "percentile":
        info["percentile"] = percentile
    torch.manual_seed(seed)
    if zero_shot:
        click.echo(f"synthesising {num_utts} x {frames} frames of calibration features "
                   f"({steps} Adam steps) from the model's BatchNorm statistics ...")
        feats, zinfo = synthesize_features(model, num_utts, frames, steps, lr, tv_weight, seed)
        info["zero_shot"] = zinfo
        batches = [feats[i : i + 4] for i in range(0, feats.shape[0], 4)]
        click.echo(f"BN-statistics loss {zinfo['initial_bn_loss']:.3f} (initial noise) -> "
                   f"{zinfo['final_bn_loss']:.3f} ({zinfo['seconds']:.0f} s)")
    else:
        try:
            # whole utterances first: the mean of the per-utterance normalisation is that of
            # the whole utterance, as in the training data loader
            batches = load_cut_features(cuts, num_utts, max_frames=10 ** 9)
        except ValueError as e:
            raise click.ClickException(str(e))
        if utt_cmn:
            batches = [b - b.mean(dim=1, keepdim=True) for b in batches]
        batches = [b[:, :frames] for b in batches]
        info["cuts"] = os.path.abspath(cuts)
        info["num_utts"] = len(batches)
        info["frames"] = sum(int(b.shape[1]) for b in batches)
        click.echo(f"calibrating on {len(batches)} utterances ({info['frames']} frames) of "
                   f"{cuts} (utt_cmn={bool(utt_cmn)}, from {cmn_source})")
    if not quantized:
        plan = plan or Plan(default=LayerConfig(weight_bits=bits))
        float_model = model
        import copy

        model = quantize_(copy.deepcopy(model), plan)
        convert(model)
        quantized = True
    else:
        float_model = None
    point_bits = point_bits_from_plan(model, plan, act_bits) if plan is not None else None
    try:
        engine, ranges = calibrate_model(model, batches, method, act_bits, point_bits, bits,
                                         percentile, backend)
    except ValueError as e:
        raise click.ClickException(str(e))
    ref = float_model if float_model is not None else model
    agree = []
    with torch.no_grad():
        for x in batches:
            agree.append(float((ref(x).argmax(-1) == engine(x).argmax(-1)).float().mean()))
    info["top1_agreement_on_calibration_features"] = sum(agree) / len(agree)
    info["backend"] = engine.backend
    info["memory"] = engine.memory_report()
    engine.save(os.path.join(out_dir, "int_model.pt"))
    atomic_write_json(os.path.join(out_dir, "act_ranges.json"), ranges)
    from k2quant.export import save_packed

    sizes = save_packed(model, os.path.join(out_dir, "model.k2q"))
    info["packed_bytes"] = sizes["file_bytes"]
    if plan is not None:
        plan.save(os.path.join(out_dir, "plan.json"))
    atomic_write_json(os.path.join(out_dir, "calibration.json"), info)
    click.echo(f"wrote {out_dir}/int_model.pt, act_ranges.json, model.k2q, calibration.json; "
               f"top-1 agreement with the float model on the calibration features "
               f"{info['top1_agreement_on_calibration_features'] * 100:.1f}%")
