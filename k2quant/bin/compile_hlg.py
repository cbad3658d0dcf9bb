"""``k2quant compile-hlg``: build ``HLG.pt`` from a lang dir and a word ARPA LM."""
import click


@click.command()
@click.option("--lang-dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="Lang dir from 'k2quant prepare-lang' (lang.json, words.txt, L_disambig.pt).")
@click.option("--lm", "arpa", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Word n-gram LM in ARPA format.")
@click.option("--out", "out_path", type=click.Path(dir_okay=False), default=None,
              help="Output file [default: LANG_DIR/HLG.pt].")
@click.option("--lm-order", type=int, default=-1, show_default=True,
              help="Use n-grams up to this order (-1: all orders in the ARPA file).")
@click.option("--force", is_flag=True, help="Rebuild even if the output exists.")
def main(lang_dir, arpa, out_path, lm_order, force):
    """Compile the decoding graph HLG = H o det(L o G) (labels: network columns,
    aux_labels: word ids) and save it with torch.save(HLG.as_dict())."""
    import logging
    from pathlib import Path

    from k2quant.decode.graph import compile_hlg

    log = logging.getLogger("k2quant.compile_hlg")
    out = Path(out_path) if out_path else Path(lang_dir) / "HLG.pt"
    if out.is_file() and not force:
        log.info("%s exists; skipping (use --force to rebuild)", out)
        click.echo(f"{out} exists; skipped")
        return
    try:
        HLG = compile_hlg(lang_dir, arpa, out_path=out, lm_order=lm_order)
    except (ValueError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from e
    click.echo(f"wrote {out}: {HLG.shape[0]} states, {HLG.num_arcs} arcs")
