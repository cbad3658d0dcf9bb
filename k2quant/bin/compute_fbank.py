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
@click.option("--prefix", required=True, help="Corpus prefix of the manifests: an4, mini, swbd.")
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
@click.option(
    "--num-mel-bins",
    default=None,
    type=int,
    help="Feature dimension [default: 40 for telephone speech (<= 8 kHz), else 80].",
)
@click.option(
    "--low-freq", default=None, type=float, help="Lowest filter edge in Hz [default: 20]."
)
@click.option(
    "--high-freq",
    default=None,
    type=float,
    help="Highest filter edge in Hz [default: 3700 at <= 8 kHz, else Nyquist - 400].",
)
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
@click.option(
    "--audio-reader",
    type=click.Choice(["auto", "libsndfile"]),
    default="auto",
    show_default=True,
    help="auto: lhotse's (sph2pipe for .sph, needed for LDC's shorten SPHERE); libsndfile: "
    "libsndfile for everything (WAV, FLAC, uncompressed or mu-law SPHERE).",
)
def main(manifest_dir, prefix, output_dir, splits, num_mel_bins, low_freq, high_freq, num_jobs,
         speed_perturb, storage, audio_reader):
    """Compute fbank features (at the corpus's sample rate) for the manifests of a corpus."""
    from k2quant.data.features import AudioReadError, compute_fbank

    split_list = [s.strip() for s in splits.split(",") if s.strip()] if splits else None
    try:
        compute_fbank(
            manifest_dir,
            prefix,
            output_dir,
            splits=split_list,
            num_mel_bins=num_mel_bins,
            low_freq=low_freq,
            high_freq=high_freq,
            num_jobs=num_jobs,
            speed_perturb=speed_perturb,
            storage=storage,
            audio_reader=audio_reader,
        )
    except (FileNotFoundError, FileExistsError, ValueError, ImportError, AudioReadError) as e:
        raise click.ClickException(str(e)) from e
