"""``k2quant prepare-an4``: AN4 lhotse manifests, speaker-disjoint dev split and lexicon.

Thin wrapper over :func:`k2quant.data.an4.prepare_an4` (and :func:`download_an4` with
``--download``).
"""

import click


@click.command()
@click.option(
    "--corpus-dir",
    required=True,
    type=click.Path(file_okay=False),
    help="AN4 root (holding etc/ and wav/).",
)
@click.option(
    "--output-dir",
    required=True,
    type=click.Path(file_okay=False),
    help="Where the manifests and an4_lexicon.txt go.",
)
@click.option(
    "--num-dev-speakers",
    default=8,
    show_default=True,
    help="Training speakers held out as the dev split (gender-balanced).",
)
@click.option(
    "--num-dev2-speakers",
    default=0,
    show_default=True,
    help="Further training speakers held out as dev2, a second evaluation split never used "
    "for tuning (gender-balanced; disjoint from dev).",
)
@click.option("--seed", default=0, show_default=True, help="Seed of the dev speaker choice.")
@click.option(
    "--download",
    is_flag=True,
    help="Download AN4 from CMU into --corpus-dir first if it is not there.",
)
def main(corpus_dir, output_dir, num_dev_speakers, num_dev2_speakers, seed, download):
    """Prepare AN4 manifests (train/dev[/dev2][/test]) and the lexicon."""
    from k2quant.data.an4 import download_an4, prepare_an4

    try:
        if download:
            download_an4(corpus_dir)
        prepare_an4(corpus_dir, output_dir, num_dev_speakers=num_dev_speakers,
                    num_dev2_speakers=num_dev2_speakers, seed=seed)
    except (FileNotFoundError, FileExistsError, ValueError, ImportError) as e:
        raise click.ClickException(str(e)) from e
