"""``k2quant compute-fbank``: lhotse fbank features -> ``cuts_{split}.jsonl.gz``.

Thin wrapper over :func:`k2quant.data.features.compute_fbank`.
"""

import click


@click.command()
@click.option(
    "--manifest-dir",
    required=True,
    type=click.Path(file_okay=False),
    help="Directory with {prefix}_recordings_{split}.jsonl.gz and supervisions.",
)
@click.option("--prefix", required=True, help="Corpus prefix of the manifests: an4 or mini.")
@click.option(
    "--output-dir",
    required=True,
    type=click.Path(file_okay=False),
    help="Where cuts_{split}.jsonl.gz and the feature archives go.",
)
@click.option(
    "--splits",
    default=None,
    help="Comma-separated splits, e.g. train,dev,test [default: all with manifests].",
)
@click.option("--num-mel-bins", default=80, show_default=True, help="Feature dimension.")
@click.option("--num-jobs", default=1, show_default=True, help="Worker processes.")
@click.option(
    "--speed-perturb/--no-speed-perturb",
    default=False,
    show_default=True,
    help="Add 0.9x/1.1x speed-perturbed copies of train.",
)
@click.option(
    "--storage",
    type=click.Choice(["auto", "lilcom", "numpy"]),
    default="auto",
    show_default=True,
    help="Feature storage (auto: lilcom when installed).",
)
def main(manifest_dir, prefix, output_dir, splits, num_mel_bins, num_jobs, speed_perturb, storage):
    """Compute fbank features for the manifests of a corpus."""
    from k2quant.data.features import compute_fbank

    split_list = [s.strip() for s in splits.split(",") if s.strip()] if splits else None
    try:
        compute_fbank(
            manifest_dir,
            prefix,
            output_dir,
            splits=split_list,
            num_mel_bins=num_mel_bins,
            num_jobs=num_jobs,
            speed_perturb=speed_perturb,
            storage=storage,
        )
    except (FileNotFoundError, FileExistsError, ValueError, ImportError) as e:
        raise click.ClickException(str(e)) from e
