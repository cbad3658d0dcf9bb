"""``k2quant sensitivity``: per-layer quantization (and bottleneck) sensitivity of a TDNN-F.

Example::

    k2quant sensitivity --model exp/epoch-8.pt --lang-dir data/lang \\
        --cuts data/fbank/cuts_train.jsonl.gz --metrics hawq,kl --out exp/sensitivity.json

The scores are those of :mod:`k2quant.search.sensitivity` with the LF-MMI loss (per frame) on
``--utts`` random training utterances; the JSON is also the cache ``k2quant compress`` reads
(pass it with ``--sensitivity-cache``: same metric, bits, dims and data settings).
"""
import click


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--model", required=True, type=click.Path(dir_okay=False))
@click.option("--avg", default=1, show_default=True, type=int)
@click.option("--lang-dir", required=True, type=click.Path(file_okay=False))
@click.option("--cuts", required=True, type=click.Path(dir_okay=False))
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Table JSON.")
@click.option("--metrics", default="hawq", show_default=True, help="hawq,kl,loss,mse")
@click.option("--bits", default="1,2,3,4,6,8", show_default=True)
@click.option("--dims", default=None, help="Bottleneck candidates, e.g. 32,48,64 (off if unset).")
@click.option("--quantizer", default="lsq", show_default=True)
@click.option("--utts", default=200, show_default=True, type=int)
@click.option("--samples", default=4, show_default=True, type=int, help="Hutchinson probes.")
@click.option("--probes", type=click.Choice(["joint", "layer"]), default="joint", show_default=True)
@click.option("--hvp", type=click.Choice(["fd", "autograd", "auto"]), default="fd",
              show_default=True)
@click.option("--seed", default=42, show_default=True, type=int)
@click.option("--num-threads", default=0, show_default=True, type=int)
def main(model, avg, lang_dir, cuts, out, metrics, bits, dims, quantizer, utts, samples, probes,
         hvp, seed, num_threads):
    """Compute (or reuse) the sensitivity table of MODEL and print the per-layer summary."""
    import torch

    from k2quant.compress import (_int_list, _objective, _per_frame_loss, check_model_lang,
                                  sensitivity_batches)
    from k2quant.plan import LayerConfig
    from k2quant.qat import load_fp32_model, prepare_cuts
    from k2quant.search.sensitivity import compute_sensitivity

    if num_threads > 0:
        torch.set_num_threads(num_threads)
    try:
        fp32, info = load_fp32_model(model, avg)
        check_model_lang(fp32, lang_dir)
        base = info["config"]
        sf = int(getattr(fp32, "subsampling_factor", 1))
        batches = sensitivity_batches(cuts, lang_dir, sf, utts, 60.0,
                                      bool(base.get("utt_cmn", True)), seed=seed)
        texts = [s.text for c in prepare_cuts(cuts, lang_dir, sf) for s in c.supervisions if s.text]
        obj = _objective(lang_dir, base, texts, sf, torch.device("cpu"))
        table = compute_sensitivity(
            fp32, _per_frame_loss(obj), batches, bits=_int_list(bits, "--bits"),
            dims=list(_int_list(dims, "--dims")) if dims else None,
            quantizer=LayerConfig(weight_quantizer=quantizer),
            metrics=[m.strip() for m in metrics.split(",") if m.strip()], hvp=hvp,
            n_samples=samples, probes=probes, seed=seed, cache_path=out,
        )
    except (ValueError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from e
    ms = [m for m in ("hawq", "kl", "loss", "mse") if m in table.method.get("metrics", [])]
    for name in table.layer_names:
        b = table.bits_for(name)
        scores = ", ".join(f"{m}@{b[0]}b={table.get(name, b[0]).score(m):.3g}" for m in ms)
        click.echo(f"{name}\t{table.layers[name].n_params}\t{scores}")
    click.echo(f"wrote {out} (hvp: {table.method.get('hvp')}, {table.num_utterances} utterances)")
