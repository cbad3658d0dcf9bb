"""``k2quant compress``: mixed-precision (and subspace) compression of a TDNN-F with a verdict.

Examples::

    k2quant compress --model exp/epoch-8.pt --avg 2 --lang-dir data/lang \\
        --cuts data/fbank/cuts_train.jsonl.gz --dev-cuts data/fbank/cuts_dev.jsonl.gz \\
        --budget 4bits --method hessian --out-dir exp/compress/hessian-4bits
    k2quant compress ... --ratio 12 --method kl --subspace --dims 32,48,64,80 --out-dir ...
    k2quant compress ... --method uniform --bits 4 --out-dir exp/compress/uniform-4
    k2quant compress ... --method plan --plan my-plan.json [--dims-json dims.json] --out-dir ...

Stages: sensitivity (cached JSON) -> allocation (ILP) or NAS -> plan.json/dims.json -> QAT with
LF-MMI -> model.k2q (packed) -> decode dev -> significance vs fp32 -> OUT_DIR/report.json.
See :mod:`k2quant.compress`; tabulate several runs with ``k2quant report``.
"""
import click

from k2quant.bin.common import num_threads_option


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--model", required=True, type=click.Path(dir_okay=False),
              help="fp32 checkpoint EXP/epoch-N.pt from 'k2quant train'.")
@click.option("--avg", default=1, show_default=True, type=int,
              help="Average epochs N-avg+1..N of the same directory.")
@click.option("--lang-dir", required=True, type=click.Path(file_okay=False),
              help="Lang dir of the model (lang.json, tokens.txt, HLG.pt).")
@click.option("--cuts", required=True, type=click.Path(dir_okay=False),
              help="Training cuts (sensitivity, NAS and QAT).")
@click.option("--dev-cuts", required=True, type=click.Path(dir_okay=False),
              help="Dev cuts decoded for the WER and the significance tests.")
@click.option("--out-dir", required=True, type=click.Path(file_okay=False))
@click.option("--method", type=click.Choice(["hessian", "kl", "nas", "uniform", "plan"]),
              default="hessian", show_default=True)
@click.option("--budget", default=None, help="Average weight bits, e.g. 4bits or 3.5bits.")
@click.option("--ratio", default=None, type=float, help="On-disk compression vs fp32, e.g. 12.")
@click.option("--size-bytes", default=None, type=float, help="On-disk bytes of model.k2q.")
@click.option("--subspace", is_flag=True, help="Also choose each TDNN-F bottleneck dim.")
@click.option("--bits", default="1,2,3,4,6,8", show_default=True,
              help="Candidate widths (uniform: the one width).")
@click.option("--dims", default="32,48,64,80", show_default=True,
              help="Candidate bottleneck dims (with --subspace).")
@click.option("--min-bits", default="output=8", show_default=True,
              help="LAYER=BITS,... lower bounds for the search ('none' for no bound).")
@click.option("--quantizer", type=click.Choice(["lsq", "general", "uniform", "sawb", "pact"]),
              default="lsq", show_default=True, help="Weight quantizer of the plan.")
@click.option("--plan", "plan_path", default=None, type=click.Path(dir_okay=False),
              help="With --method plan: the plan JSON to apply.")
@click.option("--dims-json", "dims_path", default=None, type=click.Path(dir_okay=False),
              help="With --method plan: {tdnnfs.i: dim} JSON.")
@click.option("--sens-utts", default=200, show_default=True, type=int,
              help="Training utterances for the sensitivity.")
@click.option("--sens-samples", default=4, show_default=True, type=int,
              help="Hutchinson probes per batch.")
@click.option("--sensitivity-cache", default=None, type=click.Path(dir_okay=False),
              help="Sensitivity JSON cache [default: OUT_DIR/sensitivity-METRIC.json].")
@click.option("--nas-steps", default=120, show_default=True, type=int)
@click.option("--nas-lr-alpha", default=0.05, show_default=True, type=float)
@click.option("--qat-epochs", default=2, show_default=True, type=int)
@click.option("--qat-lr", default=3e-4, show_default=True, type=float)
@click.option("--qat-final-lr", default=1e-4, show_default=True, type=float)
@click.option("--qat-bn-mode", type=click.Choice(["freeze_after_first", "train", "freeze"]),
              default="freeze_after_first", show_default=True)
@click.option("--qat-max-duration", default=None, type=float,
              help="Seconds of audio per QAT batch [default: the fp32 training's].")
@click.option("--fp32-dir", default=None, type=click.Path(file_okay=False),
              help="Cache of the fp32 decode, shareable between runs [default: OUT_DIR/fp32].")
@click.option("--fp32-errors", default=None, type=click.Path(dir_okay=False),
              help="Per-utterance errors of the fp32 model (skip its decode).")
@click.option("--lm-scale", default=1.0, show_default=True, type=float)
@click.option("--tag", default=None, help="System name in the report.")
@click.option("--seed", default=42, show_default=True, type=int)
@num_threads_option
def main(model, avg, lang_dir, cuts, dev_cuts, out_dir, method, budget, ratio, size_bytes,
         subspace, bits, dims, min_bits, quantizer, plan_path, dims_path, sens_utts,
         sens_samples, sensitivity_cache, nas_steps, nas_lr_alpha, qat_epochs, qat_lr,
         qat_final_lr, qat_bn_mode, qat_max_duration, fp32_dir, fp32_errors, lm_scale, tag,
         seed, num_threads):
    """Compress MODEL under a budget, fine-tune, export, decode and judge "lossless"."""
    from k2quant.compress import CompressConfig, _int_list, compress, parse_budget, parse_min_bits

    try:
        bit_list = _int_list(bits, "--bits")
        cfg = CompressConfig(
            model=model, avg=avg, lang_dir=lang_dir, cuts=cuts, dev_cuts=dev_cuts,
            out_dir=out_dir, method=method,
            avg_bits=parse_budget(budget) if budget is not None else None,
            ratio=ratio, size_bytes=size_bytes,
            uniform_bits=bit_list[0] if method == "uniform" and len(bit_list) == 1 else None,
            subspace=subspace, bits=bit_list, dims=_int_list(dims, "--dims"),
            min_bits=parse_min_bits(min_bits) if method != "uniform" else {},
            quantizer=quantizer, plan_path=plan_path, dims_path=dims_path,
            sens_utts=sens_utts, sens_samples=sens_samples, sensitivity_cache=sensitivity_cache,
            nas_steps=nas_steps, nas_lr_alpha=nas_lr_alpha, qat_epochs=qat_epochs,
            qat_lr=qat_lr, qat_final_lr=qat_final_lr, qat_bn_mode=qat_bn_mode,
            qat_max_duration=qat_max_duration, fp32_dir=fp32_dir, fp32_errors=fp32_errors,
            lm_scale=lm_scale, tag=tag, seed=seed, num_threads=num_threads,
        )
        report = compress(cfg)
    except (ValueError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from e
    from k2quant.compress import _summary

    click.echo(_summary(report))
