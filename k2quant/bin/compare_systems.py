"""``k2quant compare-systems``: paired significance of two systems' hypotheses (and sclite's).

Thin wrapper over :func:`k2quant.significance.compare_systems` and, with ``--sclite``,
:func:`k2quant.sctk.score_trn` + :func:`k2quant.sctk.sc_stats_mapsswe` on the same texts::

    k2quant compare-systems --ref ref.txt --hyp-a fp32/hyps.txt --hyp-b 4bit/hyps.txt \\
        --sclite --out-dir exp/compare
"""
import click


@click.command()
@click.option("--ref", "ref_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Reference transcripts, Kaldi text format (utt w1 w2 ...).")
@click.option("--hyp-a", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Hypotheses of the baseline system A (Kaldi text).")
@click.option("--hyp-b", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Hypotheses of system B (Kaldi text).")
@click.option("--sclite/--no-sclite", default=False, show_default=True,
              help="Also score with NIST sclite and test with sc_stats (needs SCTK).")
@click.option("--num-samples", default=10000, show_default=True, help="Bootstrap resamples.")
@click.option("--seed", default=0, show_default=True, help="Bootstrap seed.")
@click.option("--out-dir", type=click.Path(file_okay=False), default=None,
              help="Write compare.json (and sclite's files) here.")
def main(ref_path, hyp_a, hyp_b, sclite, num_samples, seed, out_dir):
    """MAPSSWE (NIST segments, as sc_stats; and utterance segments) and paired bootstrap."""
    from pathlib import Path

    from k2quant.scoring import read_text
    from k2quant.significance import compare_systems
    from k2quant.utils.io import atomic_write_json

    refs, a, b = read_text(ref_path), read_text(hyp_a), read_text(hyp_b)
    try:
        res = compare_systems(refs, a, b, num_samples=num_samples, seed=seed)
    except ValueError as e:
        raise click.ClickException(str(e)) from e
    nist = res["mapsswe_nist"]
    click.echo(f"WER A {nist['wer_a_percent']:.2f}  B {nist['wer_b_percent']:.2f}  "
               f"({nist['ref_words']} reference words, {nist['num_utts']} utterances)")
    click.echo(f"k2quant MAPSSWE (NIST segments: {nist['num_segments']}): W = "
               f"{nist['statistic']:.3f}, p two-sided = {nist['p_value']:.4f} (sc_stats table: "
               f"{res['sctk_table_p']:.4f}), p (B worse) = "
               f"{res['mapsswe_nist_greater']['p_value']:.4f}")
    click.echo(f"k2quant MAPSSWE (utterance segments): p (B worse) = "
               f"{res['mapsswe_utterance']['p_value']:.4f}; paired bootstrap: p (B worse) = "
               f"{res['bootstrap']['p_value']:.4f}")
    if sclite:
        from k2quant.sctk import SctkError, sc_stats_mapsswe, score_trn

        if out_dir is None:
            raise click.ClickException("--sclite needs --out-dir for sclite's files")
        try:
            part_a, sgml_a = score_trn(refs, a, out_dir, "A")
            part_b, sgml_b = score_trn(refs, b, out_dir, "B")
            st = sc_stats_mapsswe(sgml_a, sgml_b, out_dir)
        except (SctkError, ValueError) as e:
            raise click.ClickException(str(e)) from e
        res["sclite"] = {"A": part_a.to_dict(), "B": part_b.to_dict(), "sc_stats": st.to_dict()}
        res["agreement"] = {
            "abs_diff_p_two_sided": abs(st.p_two_sided - nist["p_value"]),
            "abs_diff_p_printed": None if st.p_printed is None
            else abs(st.p_printed - res["sctk_table_p"]),
        }
        click.echo(f"sclite: WER A {part_a.wer_percent:.2f}  B {part_b.wer_percent:.2f}; sc_stats "
                   f"MAPSSWE: {st.num_segments} segments, Z = {st.z:.3f}, p two-sided = "
                   f"{st.p_two_sided:.4f} (printed: "
                   f"{'<0.001' if st.p_printed is None else st.p_printed})")
        click.echo(f"|p(sc_stats) - p(k2quant)| = {res['agreement']['abs_diff_p_two_sided']:.2e}")
    if out_dir is not None:
        atomic_write_json(Path(out_dir) / "compare.json", res)
