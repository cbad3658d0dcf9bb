"""``k2quant score-sclite``: NIST scoring of a test set with an stm and glm (eval2000).

Thin wrapper over :func:`k2quant.sctk.score_stm_files` (needs SCTK: ``apt-get install sctk``)::

    k2quant score-sclite --hyp exp/decode/hyps-eval2000.txt \\
        --cuts data/fbank/cuts_eval2000.jsonl.gz --stm data/manifests/swbd_eval2000.stm \\
        --glm data/manifests/swbd_eval2000.glm --out-dir exp/decode/sclite --name fp32
"""
import click


@click.command()
@click.option("--hyp", "hyp_path", default=None, type=click.Path(exists=True, dir_okay=False),
              help="Hypotheses, Kaldi text keyed by cut id.")
@click.option("--cuts", "cuts_path", default=None, type=click.Path(exists=True, dir_okay=False),
              help="The test set's cuts (for each hypothesis' recording, side and times).")
@click.option("--stm", default=None, type=click.Path(dir_okay=False),
              help="Reference stm (eval2000: LDC2002T43 hub5e00.english.000405.stm).")
@click.option("--glm", default=None, type=click.Path(dir_okay=False),
              help="Global mapping file (eval2000: LDC2002T43 en20000405_hub5.glm).")
@click.option("--table", "table_names", default=None,
              help="Instead of scoring: comma-separated systems already scored into --out-dir; "
              "write their table to --out-dir/NAME.md (--baseline: p-value columns).")
@click.option("--out-dir", required=True, type=click.Path(file_okay=False),
              help="sclite's files and sclite-NAME.json go here.")
@click.option("--name", required=True, help="System name (file names; use a word without dots).")
@click.option("--baseline", default=None,
              help="Name of a system scored before into --out-dir: add sc_stats MAPSSWE vs it.")
def main(hyp_path, cuts_path, stm, glm, table_names, out_dir, name, baseline):
    """Score with hubscr.pl (glm, hesitations, fragments) per subset: total, swbd, callhome."""
    from pathlib import Path

    from k2quant.sctk import SctkError, score_stm_files, sclite_table
    from k2quant.utils.io import atomic_write_text

    if "." in name or "/" in name:
        raise click.BadParameter(f"{name!r}: no dots or slashes", param_hint="--name")
    if table_names:
        names = [n for n in table_names.split(",") if n]
        try:
            md = sclite_table(out_dir, names, baseline, title=name)
        except FileNotFoundError as e:
            raise click.ClickException(str(e)) from e
        atomic_write_text(Path(out_dir) / f"{name}.md", md)
        click.echo(md, nl=False)
        return
    for opt, v in (("--hyp", hyp_path), ("--cuts", cuts_path), ("--stm", stm), ("--glm", glm)):
        if v is None:
            raise click.UsageError(f"{opt} is required (unless --table is given)")
    try:
        res = score_stm_files(hyp_path, cuts_path, stm, glm, out_dir, name, baseline=baseline)
    except (SctkError, FileNotFoundError, ValueError) as e:
        raise click.ClickException(str(e)) from e
    for subset, part in res["subsets"].items():
        line = (f"%WER {part['wer_percent']:.2f} [ {part['errors']} / {part['ref_words']} ] "
                f"{name} {subset}")
        if subset in res["mapsswe"]:
            st = res["mapsswe"][subset]
            line += f"  (vs {baseline}: MAPSSWE p two-sided {st['p_two_sided']:.4f})"
        click.echo(line)
