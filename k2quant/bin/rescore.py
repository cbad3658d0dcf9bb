"""``k2quant rescore``: n-best rescoring of saved lattices with a (quantized) Transformer LM.

Examples::

    k2quant decode ... --save-lattices            # writes OUT/lattices-TAG/<cut_id>.pt
    k2quant rescore --lattices exp/decode/lattices-test-epoch-6-avg-2 \\
        --lm exp/lm/epoch-10.pt --words data/lang/words.txt \\
        --refs data/fbank/cuts_test.jsonl.gz --num-paths 100 \\
        --lm-scale 0.1,0.3,0.5,0.7,1.0 --ngram-scale 0,1 --out exp/rescore
    k2quant rescore ... --lm exp/lm/lm-2bit.k2q     # a packed quantized LM

Lattices saved by an icefall decode script (``torch.save(lattice[i].as_dict(), ...)``, one
file per utterance) work too; see :mod:`k2quant.rescore.nbest`. Prints one ``%WER`` line per
setting (the lattice 1-best first) when ``--refs`` is given; all outputs are described in
:mod:`k2quant.rescore.run`.
"""
import click


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--lattices", "lattice_dir", required=True, type=click.Path(file_okay=False),
              help="Directory of <utt_id>.pt lattice files.")
@click.option("--lm", "lm_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="LM: train-lm checkpoint (epoch-N.pt) or packed .k2q file.")
@click.option("--words", "words_txt", required=True, type=click.Path(exists=True, dir_okay=False),
              help="words.txt of the decoding graph (checked against the lattices' sha256).")
@click.option("--refs", default=None, type=click.Path(exists=True, dir_okay=False),
              help="References: Kaldi text file or cuts manifest (.jsonl.gz) -> WER.")
@click.option("--num-paths", default=100, show_default=True, type=int,
              help="Paths sampled per lattice for the n-best list.")
@click.option("--nbest-scale", default=0.5, show_default=True, type=float,
              help="Scale of lattice scores when sampling paths (<1: more diverse).")
@click.option("--lm-scale", "lm_scale", default="0.5", show_default=True,
              help="Neural LM scale(s), comma-separated: 0.3,0.5,0.7.")
@click.option("--ngram-scale", "ngram_scale", default="0.0", show_default=True,
              help="Scale(s) of the lattice's n-gram/graph scores, comma-separated.")
@click.option("--wip", default=0.0, show_default=True, type=float,
              help="Word insertion penalty (added per word).")
@click.option("--skip-words", default="<sil>,<SIL>,!SIL", show_default=True,
              help="Words removed before LM scoring (comma-separated; '' for none).")
@click.option("--batch-size", default=16, show_default=True, type=int,
              help="Lattices processed together.")
@click.option("--max-tokens", default=4000, show_default=True, type=int,
              help="Padded tokens per LM batch.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of path sampling.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Output directory.")
@click.option("--no-progress", is_flag=True, help="No tqdm progress bar.")
def main(lattice_dir, lm_path, words_txt, refs, num_paths, nbest_scale, lm_scale, ngram_scale,
         wip, skip_words, batch_size, max_tokens, device, seed, out_dir, no_progress):
    """Rescore the lattices in LATTICES with LM and write hypotheses (and WER) to OUT."""
    from k2quant.rescore.run import parse_scales, run_rescore

    try:
        lm_scales = parse_scales(lm_scale, "--lm-scale")
        ngram_scales = parse_scales(ngram_scale, "--ngram-scale")
        summary = run_rescore(
            lattice_dir, lm_path, words_txt, out_dir, refs=refs, num_paths=num_paths,
            lm_scales=lm_scales, ngram_scales=ngram_scales, wip=wip, nbest_scale=nbest_scale,
            batch_size=batch_size, max_tokens=max_tokens, device=device,
            skip_words=[w for w in skip_words.split(",") if w], progress=not no_progress,
            seed=seed,
        )
    except (FileNotFoundError, ValueError) as e:
        raise click.ClickException(str(e)) from e
    click.echo(f"rescored {summary['num_utts']} utterances ({summary['num_empty_lattices']} "
               f"empty lattices) at {summary['utts_per_second']:.1f} utt/s")
    if "wer" in summary:
        def fmt(w):
            return "n/a" if w is None else f"{w:.2f}"

        click.echo(f"1best (lattice)\t%WER {fmt(summary['baseline_wer'])}")
        for name, w in summary["wer"].items():
            click.echo(f"{name}\t%WER {fmt(w)}")
        if "best_setting" in summary:
            click.echo(f"best: {summary['best_setting']} %WER {summary['best_wer']:.2f}")
