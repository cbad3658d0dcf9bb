"""``k2quant report``: the paper-style table of compressed systems (Markdown + JSON).

Example::

    k2quant report --rows exp/compress/uniform-8,exp/compress/hessian-4bits,... \\
        --out exp/compress/report.md

Each row is a ``k2quant compress --out-dir`` directory (or its ``report.json``); an ``fp32``
row is added for the fp32 reference. Columns: system, method, avg bits, params, bytes on disk,
ratio vs fp32, WER, one-sided p-values (MAPSSWE, bootstrap), lossless. The JSON goes next to
the Markdown (same name, ``.json``). See :mod:`k2quant.report`.
"""
import click


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--rows", required=True,
              help="Comma-separated compress output dirs (or report.json files), in table order.")
@click.option("--out", required=True, type=click.Path(dir_okay=False),
              help="Markdown file to write (the JSON goes next to it).")
@click.option("--title", default=None, help="Title line of the Markdown.")
@click.option("--alpha", default=0.05, show_default=True, type=float,
              help="Significance level of the lossless verdict.")
def main(rows, out, title, alpha):
    """Tabulate compress reports ROWS into OUT (Markdown) and OUT.json."""
    from k2quant.report import make_report, render_markdown

    paths = [r.strip() for r in rows.split(",") if r.strip()]
    if not paths:
        raise click.ClickException("--rows is empty; give compress output dirs separated by commas")
    try:
        table = make_report(paths, out, title=title, alpha=alpha)
    except (ValueError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from e
    click.echo(render_markdown(table, title, alpha), nl=False)
