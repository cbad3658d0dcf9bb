"""``k2quant size MODEL``: per-layer size table of a packed model file or a torch checkpoint.

Examples::

    k2quant size exp/model-4bit.k2q            # packed: bits per layer, bytes, ratio vs fp32
    k2quant size --tensors exp/model-4bit.k2q  # one row per tensor (codes, scales, biases ...)
    k2quant size exp/pretrained.pt             # fp32 table of a state_dict checkpoint (1.0x)
"""
import json

import click


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model", type=click.Path(exists=True, dir_okay=False))
@click.option("--tensors", "per_tensor", is_flag=True,
              help="One row per tensor instead of one row per layer.")
@click.option("--json", "as_json", is_flag=True,
              help="Print the rows and totals as JSON instead of a table.")
@click.option("--allow-pickle", is_flag=True,
              help="Checkpoints only: allow torch.load to unpickle arbitrary Python objects "
                   "(needed for training checkpoints that store RNG/optimizer state; only for "
                   "files you trust).")
def main(model: str, per_tensor: bool, as_json: bool, allow_pickle: bool):
    """Print the size of MODEL per layer (name, params, bits, bytes), the totals and the
    compression ratio vs fp32.

    MODEL is a packed file written by k2quant.export.save_packed, or a torch
    checkpoint holding a state_dict or {"model": state_dict} (reported as stored, fp32 -> 1.0x).
    """
    from k2quant.export.size import format_report, size_table

    try:
        report = size_table(model, allow_pickle=allow_pickle)
    except ValueError as e:  # PackedFormatError included
        raise click.ClickException(str(e))
    if as_json:
        rows = report.rows if per_tensor else report.by_layer()
        click.echo(json.dumps({
            "path": report.path,
            "kind": report.file_kind,
            "rows": [{"name": r.name, "params": r.params, "bits": r.bits, "bytes": r.bytes,
                      "kind": r.kind} for r in rows],
            "params": report.params,
            "fp32_bytes": report.fp32_bytes,
            "payload_bytes": report.payload_bytes,
            "file_bytes": report.file_bytes,
            "ratio": report.ratio,
        }, indent=2))
        return
    click.echo(format_report(report, per_tensor=per_tensor))
