"""``k2quant decode``: decode cuts with an (averaged) checkpoint or a packed compressed model
and an HLG graph, and score.

Examples::

    k2quant decode --exp-dir exp --epoch 6 --avg 2 --lang-dir data/lang \\
        --cuts data/fbank/cuts_dev.jsonl.gz --out-dir exp/decode
    k2quant decode ... --lm-scale 0.8 --lm-scale 1.0 --lm-scale 1.2 --save-lattices
    k2quant decode --model exp/compress/hessian-sub-r16/model.k2q --lang-dir data/lang \\
        --cuts data/fbank/cuts_dev.jsonl.gz --out-dir exp/decode --save-lattices

Writes hyps/ref text files, per-utterance errors, an error report and WER JSON per LM scale
(see :mod:`k2quant.decode.run`), and prints the ``%WER`` line of each scale; the first scale's
line is printed last, prefixed with ``WER``.
"""
import click

from k2quant.bin.common import beam_options, decode_input_options, num_threads_option


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--exp-dir", default=None, type=click.Path(exists=True, file_okay=False),
              help="Training directory holding epoch-N.pt (with --epoch; or give --model).")
@click.option("--epoch", default=None, type=int, help="Last epoch to use (with --exp-dir).")
@click.option("--avg", default=1, show_default=True, type=int,
              help="Average epochs epoch-avg+1 .. epoch.")
@click.option("--model", "model_path", default=None, type=click.Path(dir_okay=False),
              help="Instead of --exp-dir/--epoch: one model file, a packed .k2q export "
                   "('k2quant compress' model.k2q) or an epoch-N.pt checkpoint.")
@click.option("--utt-cmn/--no-utt-cmn", default=None,
              help="Per-utterance feature mean normalisation [default: as the model was "
                   "trained (checkpoint config / packed header), else on].")
@decode_input_options
@click.option("--out-dir", required=True, type=click.Path(file_okay=False),
              help="Where to write hyps, errors and WER.")
@click.option("--hlg", "hlg_path", default=None, type=click.Path(dir_okay=False),
              help="Decoding graph [default: LANG_DIR/HLG.pt].")
@click.option("--method", type=click.Choice(["1best"]), default="1best", show_default=True,
              help="Decoding method (n-best rescoring is 'k2quant rescore').")
@click.option("--lm-scale", "lm_scales", multiple=True, type=float, default=(1.0,),
              show_default=True, help="LM scale(s) for the 1-best path; repeatable.")
@beam_options
@click.option("--save-lattices", is_flag=True,
              help="Also save one lattice per utterance (OUT_DIR/lattices-TAG/<cut>.pt).")
@click.option("--tag", default=None, help="Name of the output files [default: SPLIT-epoch-N-avg-K].")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
              show_default=True)
@num_threads_option
def main(exp_dir, epoch, avg, model_path, utt_cmn, lang_dir, cuts_path, out_dir, hlg_path,
         method, lm_scales, search_beam, output_beam, min_active_states, max_active_states, max_duration,
         save_lattices, tag, device, num_threads):
    """Decode CUTS with EXP_DIR's epoch EPOCH (averaged over AVG epochs), or with the model
    file MODEL, and print the WER."""
    from k2quant.decode.run import DecodeOptions, run_decode

    if model_path is not None and (exp_dir is not None or epoch is not None):
        raise click.UsageError("give either --model or --exp-dir/--epoch, not both")
    if model_path is None and (exp_dir is None or epoch is None):
        raise click.UsageError("give --exp-dir and --epoch (a training run) or --model FILE")

    opts = DecodeOptions(
        search_beam=search_beam, output_beam=output_beam, min_active_states=min_active_states,
        max_active_states=max_active_states, lm_scales=tuple(lm_scales),
        max_duration=max_duration, save_lattices=save_lattices,
    )
    try:
        res = run_decode(exp_dir, epoch, avg, lang_dir, cuts_path, out_dir, model_path=model_path,
                         utt_cmn=utt_cmn, hlg_path=hlg_path, opts=opts, device=device, tag=tag,
                         num_threads=num_threads)
    except (FileNotFoundError, ValueError) as e:
        raise click.ClickException(str(e)) from e
    for s in lm_scales:
        click.echo(f"lm_scale {s:g}: {res.wer[s].summary()}")
    click.echo(f"WER {res.wer[lm_scales[0]].summary()}")
