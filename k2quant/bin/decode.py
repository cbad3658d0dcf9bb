"""``k2quant decode``: decode cuts with an (averaged) checkpoint and an HLG graph, and score.

Examples::

    k2quant decode --exp-dir exp --epoch 6 --avg 2 --lang-dir data/lang \\
        --cuts data/fbank/cuts_dev.jsonl.gz --out-dir exp/decode
    k2quant decode ... --lm-scale 0.8 --lm-scale 1.0 --lm-scale 1.2 --save-lattices

Writes hyps/ref text files, per-utterance errors, an error report and WER JSON per LM scale
(see :mod:`k2quant.decode.run`), and prints the ``%WER`` line of each scale; the first scale's
line is printed last, prefixed with ``WER``.
"""
import click

from k2quant.bin.common import beam_options, decode_input_options, num_threads_option


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--exp-dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="Training directory holding epoch-N.pt.")
@click.option("--epoch", required=True, type=int, help="Last epoch to use.")
@click.option("--avg", default=1, show_default=True, type=int,
              help="Average epochs epoch-avg+1 .. epoch.")
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
def main(exp_dir, epoch, avg, lang_dir, cuts_path, out_dir, hlg_path, method, lm_scales,
         search_beam, output_beam, min_active_states, max_active_states, max_duration,
         save_lattices, tag, device, num_threads):
    """Decode CUTS with EXP_DIR's epoch EPOCH (averaged over AVG epochs) and print the WER."""
    from k2quant.decode.run import DecodeOptions, run_decode

    opts = DecodeOptions(
        search_beam=search_beam, output_beam=output_beam, min_active_states=min_active_states,
        max_active_states=max_active_states, lm_scales=tuple(lm_scales),
        max_duration=max_duration, save_lattices=save_lattices,
    )
    try:
        res = run_decode(exp_dir, epoch, avg, lang_dir, cuts_path, out_dir, hlg_path=hlg_path,
                         opts=opts, device=device, tag=tag, num_threads=num_threads)
    except (FileNotFoundError, ValueError) as e:
        raise click.ClickException(str(e)) from e
    for s in lm_scales:
        click.echo(f"lm_scale {s:g}: {res.wer[s].summary()}")
    click.echo(f"WER {res.wer[lm_scales[0]].summary()}")
