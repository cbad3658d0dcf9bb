"""``k2quant prepare-swbd``: Switchboard-1 + eval2000 manifests, Kaldi dev split, MS-98 lexicon.

Thin wrapper over :func:`k2quant.data.swbd.prepare_swbd` (never downloads anything).
"""

import click


@click.command()
@click.option(
    "--audio-dir",
    required=True,
    type=click.Path(file_okay=False),
    help="LDC97S62 (Switchboard-1 Release 2) with swb1/*.sph.",
)
@click.option(
    "--transcripts-dir",
    required=True,
    type=click.Path(file_okay=False),
    help="Directory holding swb_ms98_transcriptions/ (or that directory).",
)
@click.option(
    "--eval2000-dir",
    default=None,
    type=click.Path(file_okay=False),
    help="Root holding LDC2002S09/ and LDC2002T43/ (the eval2000 test split) [default: none].",
)
@click.option(
    "--lexicon",
    default=None,
    type=click.Path(dir_okay=False),
    help="MS-98 dictionary [default: swb_ms98_transcriptions/sw-ms98-dict.text].",
)
@click.option(
    "--fisher-dir",
    "fisher_dirs",
    multiple=True,
    type=click.Path(file_okay=False),
    help="Fisher transcripts for the LM text (LDC2004T19, LDC2005T19); repeatable.",
)
@click.option(
    "--output-dir",
    required=True,
    type=click.Path(file_okay=False),
    help="Where the manifests and swbd_lexicon.txt go.",
)
@click.option(
    "--num-dev-utts",
    default=4000,
    show_default=True,
    help="Training utterances held out as the dev split (0: none).",
)
@click.option(
    "--dev-split",
    type=click.Choice(["first", "conversations"]),
    default="first",
    show_default=True,
    help="first: Kaldi's train_dev (the first N utterances); conversations: whole conversations "
    "sampled with --seed.",
)
@click.option("--seed", default=0, show_default=True, help="Seed of --dev-split conversations.")
@click.option(
    "--max-dup-utts",
    default=300,
    show_default=True,
    help="Kaldi's train_nodup: at most this many identical transcripts in train (0: keep all).",
)
def main(
    audio_dir,
    transcripts_dir,
    eval2000_dir,
    lexicon,
    fisher_dirs,
    output_dir,
    num_dev_utts,
    dev_split,
    seed,
    max_dup_utts,
):
    """Prepare Switchboard manifests (train/dev[/eval2000]) and the lexicon."""
    from k2quant.data.swbd import prepare_swbd

    try:
        prepare_swbd(
            audio_dir,
            transcripts_dir,
            output_dir,
            eval2000_dir=eval2000_dir,
            lexicon=lexicon,
            fisher_dirs=list(fisher_dirs),
            num_dev_utts=num_dev_utts,
            seed=seed,
            dev_split=dev_split,
            max_dup_utts=max_dup_utts or None,
        )
    except (FileNotFoundError, ValueError, ImportError) as e:
        raise click.ClickException(str(e)) from e
