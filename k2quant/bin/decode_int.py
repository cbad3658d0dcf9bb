"""``k2quant decode-int``: decode cuts with the integer engine (``k2quant calibrate`` output)
through the HLG decoder of ``k2quant decode``, score it and, given a baseline's per-utterance
errors, test whether it is significantly worse.

Examples::

    k2quant decode-int --int-model exp_int8/zs --lang-dir data/lang \\
        --cuts data/fbank/cuts_dev.jsonl.gz --out-dir exp_int8/zs/decode \\
        --baseline-errors exp/decode/per_utt-dev-epoch-6-avg-2.tsv
    k2quant decode-int --int-model exp_int8/zs/int_model.pt --backend float64 ...

Writes hyps/ref, per-utterance errors, an error report, ``wer-TAG.json`` and
``summary-TAG.json`` (WER, back end, feature normalisation, calibration provenance and, with
``--baseline-errors``, MAPSSWE + paired bootstrap p-values and the acceptance check: WER
increase <= ``--max-wer-increase`` absolute and not significantly worse; with
``--float-model``, the frame-level agreement of the integer engine with that float model); see
:mod:`k2quant.infer.evaluate`. The feature normalisation (per-utterance CMN) is the one the
model was trained with, read from ``calibration.json`` or the calibrated checkpoint.
"""
import click

from k2quant.bin.common import beam_options, decode_input_options, num_threads_option


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--int-model", required=True, type=click.Path(exists=True),
              help="'k2quant calibrate' output directory, or its int_model.pt.")
@decode_input_options
@click.option("--out-dir", required=True, type=click.Path(file_okay=False),
              help="Where to write hyps, errors, WER and the summary.")
@click.option("--backend", default="auto", show_default=True,
              type=click.Choice(["auto", "qtensor", "int_mm", "fbgemm", "float64"]),
              help="Integer engine back end (float64: the exact dyadic arithmetic in float64).")
@click.option("--baseline-errors", default=None, type=click.Path(dir_okay=False),
              help="Per-utterance errors (per_utt-*.tsv) of the baseline on the same cuts: run "
                   "the significance tests.")
@click.option("--float-model", default=None, type=click.Path(exists=True, dir_okay=False),
              help="The float checkpoint / .k2q that was calibrated: also measure the frame "
                   "agreement (top-1, KL) of the integer engine with it on the cuts.")
@click.option("--allow-pickle", is_flag=True,
              help="Let torch.load unpickle --float-model (training checkpoints); only for "
                   "files you trust.")
@click.option("--hlg", "hlg_path", default=None, type=click.Path(dir_okay=False),
              help="Decoding graph [default: LANG_DIR/HLG.pt].")
@click.option("--lm-scale", "lm_scales", multiple=True, type=float, default=(1.0,),
              show_default=True, help="LM scale(s); the first is the primary one.")
@beam_options
@click.option("--utt-cmn/--no-utt-cmn", default=None,
              help="Force the per-utterance mean normalisation [default: as in training].")
@click.option("--alpha", default=0.05, show_default=True, type=float,
              help="Significance level of the 'significantly worse' tests.")
@click.option("--bootstrap-samples", default=10000, show_default=True, type=int)
@click.option("--max-wer-increase", default=0.5, show_default=True, type=float,
              help="Acceptance: tolerated absolute WER increase over the baseline (percent).")
@click.option("--tag", default=None, help="Name of the output files [default: SPLIT-int].")
@num_threads_option
def main(int_model, lang_dir, cuts_path, out_dir, backend, baseline_errors, float_model,
         allow_pickle, hlg_path, lm_scales,
         search_beam, output_beam, min_active_states, max_active_states, max_duration, utt_cmn,
         alpha, bootstrap_samples, max_wer_increase, tag, num_threads):
    """Decode CUTS with the integer model INT_MODEL and print the WER (and the significance
    of its change over --baseline-errors)."""
    from k2quant.decode.run import DecodeOptions
    from k2quant.infer.evaluate import decode_int, format_summary

    if not 0 < alpha < 1:
        raise click.BadParameter("must be in (0, 1)", param_hint="--alpha")
    if bootstrap_samples < 1:
        raise click.BadParameter("must be >= 1", param_hint="--bootstrap-samples")
    opts = DecodeOptions(
        search_beam=search_beam, output_beam=output_beam, min_active_states=min_active_states,
        max_active_states=max_active_states, lm_scales=tuple(lm_scales),
        max_duration=max_duration,
    )
    try:
        fmodel = None
        if float_model is not None:
            from k2quant.infer.calibrate import load_acoustic_model

            fmodel = load_acoustic_model(float_model, allow_pickle=allow_pickle)
        summary = decode_int(
            int_model, lang_dir, cuts_path, out_dir, backend=backend, hlg_path=hlg_path,
            opts=opts, utt_cmn=utt_cmn, tag=tag, baseline_errors=baseline_errors, alpha=alpha,
            num_samples=bootstrap_samples, max_wer_increase=max_wer_increase,
            float_model=fmodel, num_threads=num_threads)
    except (FileNotFoundError, ValueError) as e:
        raise click.ClickException(str(e)) from e
    for s, w in summary["wer_by_lm_scale"].items():
        if len(lm_scales) > 1:
            click.echo(f"lm_scale {s}: %WER {w:.2f}")
    click.echo(format_summary(summary))
    click.echo(f"wrote {out_dir}/summary-{summary['tag']}.json")
