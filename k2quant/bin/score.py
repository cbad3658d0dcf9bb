"""``k2quant score``: WER of a hypothesis text file against a reference text file."""
import click


@click.command()
@click.option("--ref", "ref_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Reference transcripts, Kaldi text format (utt w1 w2 ...).")
@click.option("--hyp", "hyp_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Hypotheses, Kaldi text format.")
@click.option("--out-dir", type=click.Path(file_okay=False), default=None,
              help="Write errs-NAME.txt, per_utt-NAME.tsv and wer-NAME.json here.")
@click.option("--name", default=None, help="Suffix of the output files [default: hyp file stem].")
@click.option("--allow-extra-hyps", is_flag=True,
              help="Ignore (with a warning) hypotheses whose utterance has no reference "
                   "instead of failing.")
def main(ref_path, hyp_path, out_dir, name, allow_extra_hyps):
    """Score HYP against REF and print the WER (Kaldi-style %WER line).

    Reference utterances without a hypothesis count as all deletions.
    """
    from k2quant.scoring import score_files

    try:
        result = score_files(ref_path, hyp_path, out_dir, name=name,
                             allow_extra_hyps=allow_extra_hyps)
    except ValueError as e:
        raise click.ClickException(str(e)) from e
    click.echo(result.summary())
