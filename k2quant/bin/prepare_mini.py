"""``k2quant prepare-mini``: synthesise the embedded AN4-style corpus with eSpeak NG (offline).

Thin wrapper over :func:`k2quant.data.mini.prepare_mini`.
"""

import click


@click.command()
@click.option(
    "--output-dir",
    required=True,
    type=click.Path(file_okay=False),
    help="Where wav/, the manifests and mini_lexicon.txt go.",
)
@click.option(
    "--num-train",
    type=int,
    default=None,
    help="Training utterances [default: 600, or 48 with --small].",
)
@click.option(
    "--num-test",
    type=int,
    default=None,
    help="Test utterances (unseen voices) [default: 150, or 12 with --small].",
)
@click.option("--seed", default=0, show_default=True, help="The corpus is a function of the seed.")
@click.option("--small", is_flag=True, help="Tiny smoke-test corpus (48 + 12 utterances).")
def main(output_dir, num_train, num_test, seed, small):
    """Synthesise the mini corpus: wavs, lhotse manifests and lexicon."""
    from k2quant.data.mini import prepare_mini

    try:
        prepare_mini(output_dir, num_train=num_train, num_test=num_test, seed=seed, small=small)
    except (FileNotFoundError, FileExistsError, ValueError, ImportError) as e:
        raise click.ClickException(str(e)) from e
