"""``k2quant average-checkpoints``: average epoch-(N-K+1) .. epoch-N into one model file.

Example::

    k2quant average-checkpoints --exp-dir exp --epoch 6 --avg 3    # -> exp/avg-epoch-6-avg-3.pt

The output holds ``{"model": averaged state_dict, "model_spec": ..., "config": ...,
"averaged_from": [...]}`` (no optimizer/RNG state: it is for decoding and export, not resuming).
"""
import click


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--exp-dir", required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--epoch", required=True, type=int, help="Last epoch to average.")
@click.option("--avg", required=True, type=int, help="Number of epochs to average.")
@click.option("--out", "out_path", default=None, type=click.Path(dir_okay=False),
              help="Output file [default: EXP_DIR/avg-epoch-EPOCH-avg-AVG.pt].")
def main(exp_dir, epoch, avg, out_path):
    """Average the model parameters of the last AVG epochs up to EPOCH."""
    from pathlib import Path

    from k2quant.training.checkpoint import average_checkpoints, checkpoints_to_average
    from k2quant.utils.io import atomic_torch_save

    try:
        paths = checkpoints_to_average(exp_dir, epoch, avg)
    except (FileNotFoundError, ValueError) as e:
        raise click.ClickException(str(e)) from e
    ck = average_checkpoints(paths)
    out = Path(out_path) if out_path else Path(exp_dir) / f"avg-epoch-{epoch}-avg-{avg}.pt"
    atomic_torch_save(ck, out)
    click.echo(f"averaged {', '.join(p.name for p in paths)} -> {out}")
