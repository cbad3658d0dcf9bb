"""``k2quant compress-lm``: a float Transformer LM -> mixed-precision packed ``lm.k2q``.

Examples::

    k2quant compress-lm --lm exp/lm/epoch-20.pt --train-text data/lm/train.txt \\
        --valid-text data/lm/dev.txt --avg-bits 2 --method kl --out-dir exp/lm-2bit
    k2quant compress-lm ... --ratio 12 --method hessian --min-bits embed=4
    k2quant compress-lm ... --method uniform --uniform-bits 2      # the uniform baseline

Sensitivity (KL or Hessian trace on the LM loss) -> ILP bit allocation under the budget ->
QAT (LSQ, or the General Quantizer) with distillation from the float LM -> packed export;
held-out perplexity of the float LM and of the packed file, bytes on disk and the ratio vs
fp32 go to ``OUT_DIR/summary.json`` (see :mod:`k2quant.lm.compress`).
"""
import click

from k2quant.bin.common import num_threads_option


def _parse_bits(text: str):
    try:
        bits = [int(b) for b in str(text).split(",") if b.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated ints like 1,2,3,4,8; got {text!r}")
    if not bits:
        raise click.BadParameter("no bit width given")
    return bits


def _parse_layer_bits(values, flag: str):
    out = {}
    for v in values:
        name, sep, b = v.rpartition("=")
        if not sep or not name:
            raise click.BadParameter(f"{flag} expects LAYER=BITS (e.g. embed=4 or "
                                     f"'re:.*ff.*=2'); got {v!r}")
        try:
            out[name] = int(b)
        except ValueError:
            raise click.BadParameter(f"{flag}: bits must be an int in {v!r}") from None
    return out or None


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--lm", "lm_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Float LM checkpoint (EXP/epoch-N.pt of 'k2quant train-lm').")
@click.option("--train-text", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Text for sensitivity and QAT (the LM's training text).")
@click.option("--valid-text", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Held-out text for the reported perplexities.")
@click.option("--out-dir", required=True, type=click.Path(file_okay=False),
              help="Output directory (lm.k2q, plan.json, summary.json, ...).")
@click.option("--avg-bits", type=float, default=None,
              help="Budget: average weight bits (default 2 if no budget is given).")
@click.option("--ratio", type=float, default=None,
              help="Budget: compression vs fp32 of the packed file on disk, e.g. 12.")
@click.option("--size-bytes", type=float, default=None, help="Budget: packed file bytes.")
@click.option("--bits", default="1,2,3,4,8", show_default=True, help="Candidate widths.")
@click.option("--method", type=click.Choice(["kl", "hessian", "nas", "uniform"]), default="kl",
              show_default=True)
@click.option("--uniform-bits", type=int, default=None, help="Width for --method uniform.")
@click.option("--quantizer", type=click.Choice(["lsq", "general", "uniform", "sawb"]),
              default="lsq", show_default=True, help="QAT weight quantizer.")
@click.option("--granularity", type=click.Choice(["channel", "tensor"]), default="channel",
              show_default=True)
@click.option("--min-bits", multiple=True, help="LAYER=BITS lower bound (repeatable).")
@click.option("--max-bits", multiple=True, help="LAYER=BITS upper bound (repeatable).")
@click.option("--qat-epochs", default=10, show_default=True, type=int,
              help="QAT epochs (0: post-training quantization).")
@click.option("--qat-lr", default=5e-4, show_default=True, type=float)
@click.option("--distill", default=0.5, show_default=True, type=float,
              help="Weight of KL(fp32 || quantized) in the QAT loss (0: cross entropy only).")
@click.option("--max-tokens", default=500, show_default=True, type=int,
              help="Padded tokens per QAT batch.")
@click.option("--sens-sentences", default=256, show_default=True, type=int,
              help="Training sentences used for the sensitivity.")
@click.option("--nas-steps", default=300, show_default=True, type=int)
@click.option("--text-format", type=click.Choice(["plain", "kaldi"]), default="plain",
              show_default=True)
@click.option("--seed", default=42, show_default=True, type=int)
@click.option("--device", type=click.Choice(["cpu", "cuda", "auto"]), default="cpu",
              show_default=True)
@num_threads_option
def main(lm_path, train_text, valid_text, out_dir, avg_bits, ratio, size_bytes, bits, method,
         uniform_bits, quantizer, granularity, min_bits, max_bits, qat_epochs, qat_lr, distill,
         max_tokens, sens_sentences, nas_steps, text_format, seed, device, num_threads):
    """Quantize the Transformer LM LM_PATH to ~2-bit mixed precision and pack it."""
    from k2quant.lm.compress import compress_lm

    try:
        s = compress_lm(
            lm_path, train_text, valid_text, out_dir, avg_bits=avg_bits, ratio=ratio,
            size_bytes=size_bytes, bits=_parse_bits(bits), method=method,
            qat_epochs=qat_epochs, uniform_bits=uniform_bits, quantizer=quantizer,
            granularity=granularity, min_bits=_parse_layer_bits(min_bits, "--min-bits"),
            max_bits=_parse_layer_bits(max_bits, "--max-bits"), qat_lr=qat_lr,
            distill=distill, max_tokens=max_tokens, sens_sentences=sens_sentences,
            nas_steps=nas_steps, text_format=text_format, seed=seed, device=device,
            num_threads=num_threads,
        )
    except (FileNotFoundError, ValueError) as e:
        raise click.ClickException(str(e)) from e
    q, z = s["quantized"], s["size"]
    click.echo(f"fp32 LM:      ppl {s['fp32']['ppl']:.3f}, {z['fp32_bytes']} bytes (4/param)")
    click.echo(f"packed LM:    ppl {q['ppl']:.3f} ({100 * q['ppl_rel_change']:+.2f}%), "
               f"{z['file_bytes']} bytes on disk, {z['ratio']:.2f}x, avg {z['avg_bits']:.3f} bits")
    click.echo(f"wrote {s['out']} and {out_dir}/summary.json")
