"""``k2quant bench``: fp32 vs integer-only TDNN-F speed, memory and size (random weights).

Examples::

    k2quant bench                                  # small preset, 1 and 2 threads
    k2quant bench --preset small --preset kaldi_7q --json bench.json
    k2quant bench --backend qtensor --backend fbgemm --repeats 21 --no-compile
    k2quant bench --preset kaldi_7q --backend dyadic --backend qtensor --threads 2  # exact
        # dyadic (eager and fused '+compile') next to qtensor (float32 requant)
"""

import click


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--preset", "presets", multiple=True, default=("small",), show_default=True,
              type=click.Choice(["small", "kaldi_7q"]), help="TDNN-F preset (repeatable).")
@click.option("--threads", default="1,2", show_default=True,
              help="Comma-separated torch thread counts.")
@click.option("--batch", default=8, show_default=True, help="Utterances per batch.")
@click.option("--frames", default=300, show_default=True, help="Frames per utterance.")
@click.option("--repeats", default=11, show_default=True,
              help="Interleaved timing rounds (medians; more on a loaded machine).")
@click.option("--stream-frames", default=1500, show_default=True,
              help="Frames of the single streamed utterance.")
@click.option("--chunk", default=21, show_default=True, help="Output frames per chunk.")
@click.option("--backend", "backends", multiple=True, default=("auto", "dyadic"),
              show_default=True,
              type=click.Choice(["auto", "dyadic", "qtensor", "int_mm", "fbgemm", "float64"]),
              help="Integer back end(s) to time against fp32 (repeatable; the first is the "
                   "primary one). 'dyadic': the fastest exact dyadic back end; 'auto': what "
                   "IntTdnnF picks by default (qtensor where available).")
@click.option("--compile/--no-compile", "compile_", default=True, show_default=True,
              help="Also time the fused exact dyadic engine '<backend>+compile' "
                   "(IntTdnnF.set_backend(b, compile=True): int_mm with the whole integer "
                   "forward compiled by torch.compile on torch >= 2; fbgemm with "
                   "TorchScript-fused requantisations on torch 1.13). The output labels every "
                   "variant 'dyadic (exact)' or 'qtensor (float32 requant)'.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None,
              help="Also write the results as JSON.")
def main(presets, threads, batch, frames, repeats, stream_frames, chunk, backends, compile_,
         json_out):
    """Time fp32 vs integer-only forward (batch and chunked streaming) and report the speed
    ratios, peak memory, and weight bytes in memory and on disk."""
    from k2quant.infer.bench import format_result, run_benchmark
    from k2quant.utils.io import atomic_write_json

    try:
        th = [int(t) for t in threads.split(",") if t.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated ints, got {threads!r}",
                                 param_hint="--threads")
    if not th or min(th) < 1:
        raise click.BadParameter("thread counts must be >= 1", param_hint="--threads")
    results = []
    for p in presets:
        res = run_benchmark(p, th, batch, frames, repeats, stream_frames, chunk, list(backends),
                            log=lambda s: click.echo(s, err=True), compile=compile_)
        click.echo(format_result(res))
        results.append(res)
    if json_out:
        atomic_write_json(json_out, results)
