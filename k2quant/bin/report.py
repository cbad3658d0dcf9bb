"""``k2quant report``: the paper-style table of compressed systems (Markdown + JSON).

Examples::

    k2quant report --rows exp/compress/uniform-8,exp/compress/hessian-4bits,... \\
        --out exp/compress/report.md
    k2quant report --systems exp/rescore/fp32am-fp32lm,exp/rescore/hsub16am-r12lm \\
        --out exp/rescore/systems.md

``--systems``: acoustic model + LM systems, one ``k2quant rescore --out`` directory each
(``NAME=DIR`` names the row), the first being the fp32 AM with the fp32 LM; columns: AM and LM
bytes, their sum and ratio vs the first system, 1-best and rescored WER at one rescoring
setting for all (``--setting``, default the fp32 system's best), p-values, lossless.

Each row is a ``k2quant compress --out-dir`` directory (or its ``report.json``); an ``fp32``
row is added for the fp32 reference. Columns: system, method, avg bits, params, bytes on disk,
ratio vs fp32, WER, one-sided p-values (MAPSSWE, bootstrap), lossless. The JSON goes next to
the Markdown (same name, ``.json``). See :mod:`k2quant.report`.
"""
import click


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--rows", default=None,
              help="Comma-separated compress output dirs (or report.json files), in table order.")
@click.option("--systems", default=None,
              help="Instead of --rows: comma-separated rescore output dirs ([NAME=]DIR), the "
                   "fp32 AM + fp32 LM system first.")
@click.option("--setting", default="auto", show_default=True,
              help="With --systems: the rescoring setting reported (e.g. "
                   "lm_scale_0.3-ngram_scale_1); auto = the first system's best.")
@click.option("--out", required=True, type=click.Path(dir_okay=False),
              help="Markdown file to write (the JSON goes next to it).")
@click.option("--title", default=None, help="Title line of the Markdown.")
@click.option("--alpha", default=0.05, show_default=True, type=float,
              help="Significance level of the lossless verdict.")
def main(rows, systems, setting, out, title, alpha):
    """Tabulate compress reports ROWS (or AM+LM SYSTEMS) into OUT (Markdown) and OUT.json."""
    from k2quant.report import (make_report, make_system_report, render_markdown,
                                render_system_markdown)

    if (rows is None) == (systems is None):
        raise click.UsageError("give exactly one of --rows (compress reports) and --systems "
                               "(rescoring outputs)")
    if systems is not None:
        specs = [r.strip() for r in systems.split(",") if r.strip()]
        if not specs:
            raise click.ClickException("--systems is empty; give rescore output dirs "
                                       "separated by commas")
        try:
            table = make_system_report(specs, out, title=title, setting=setting, alpha=alpha)
        except (ValueError, FileNotFoundError) as e:
            raise click.ClickException(str(e)) from e
        click.echo(render_system_markdown(table, title, alpha), nl=False)
        return
    paths = [r.strip() for r in rows.split(",") if r.strip()]
    if not paths:
        raise click.ClickException("--rows is empty; give compress output dirs separated by commas")
    try:
        table = make_report(paths, out, title=title, alpha=alpha)
    except (ValueError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from e
    click.echo(render_markdown(table, title, alpha), nl=False)
