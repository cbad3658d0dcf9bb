"""Speed / memory / size benchmark: fp32 TdnnF vs the integer-only engine on the same model
and the same features (``tools/bench_infer.py``, ``k2quant bench``).

For each preset: a TdnnF with random weights (BatchNorm statistics from two training-mode
passes over random features, so activations have realistic ranges), calibrated with minmax
ranges on the benchmark features, then for each thread count (``torch.set_num_threads``):

* batch: ``forward`` on (batch, frames, feat_dim) features, fp32 vs integer;
* streaming: one utterance of ``stream_frames`` frames evaluated in chunks of ``chunk``
  output frames (each chunk recomputes its left/right context), fp32 vs integer.

Times are medians over ``repeats`` runs after one warm-up; ratios are fp32 / integer measured
in the same run. Peak memory is the peak RSS increase during one forward (a sampling thread
reads ``/proc/self/statm`` every 0.5 ms; torch's allocations are invisible to tracemalloc).
Sizes: fp32 checkpoint (``torch.save`` of the state dict) vs 8-bit packed export
(``save_packed``) on disk; weights in memory: fp32 weight matrices (+ biases and BatchNorm
statistics) vs the engine's int8 matrices (+ requantisation constants).
"""
import copy
import os
import statistics
import tempfile
import threading
import time
from typing import Any, Callable, Dict, Optional, Sequence

import torch

from k2quant.infer.int_engine import IntTdnnF, fp32_reference_bytes
from k2quant.infer.streaming import chunked_forward

PRESET_SHAPES = {"small": (80, 500), "kaldi_7q": (40, 6034)}


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):  # pragma: no cover - non-Linux
        return 0


def peak_rss_increase(fn: Callable[[], Any]) -> int:
    """Peak RSS above the starting RSS while ``fn()`` runs (bytes, sampled)."""
    base = _rss_bytes()
    peak = [base]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.0005)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    try:
        fn()
    finally:
        stop.set()
        th.join()
    peak[0] = max(peak[0], _rss_bytes())
    return max(peak[0] - base, 0)


def median_time(fn: Callable[[], Any], repeats: int) -> float:
    fn()  # warm-up
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def build_bench_model(preset: str, seed: int = 0):
    from k2quant.models.tdnnf import TdnnF, get_preset

    if preset not in PRESET_SHAPES:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESET_SHAPES)}")
    feat_dim, num_classes = PRESET_SHAPES[preset]
    torch.manual_seed(seed)
    model = TdnnF(get_preset(preset, feat_dim, num_classes))
    model.train()
    model.set_dropout_proportion(0.0)
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(2, 150, feat_dim))
    return model.eval()


def _file_size(obj_writer) -> int:
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "f")
        obj_writer(path)
        return os.path.getsize(path)


def disk_sizes(model, engine: IntTdnnF) -> Dict[str, int]:
    from k2quant.export import save_packed
    from k2quant.plan import LayerConfig, Plan, convert, quantize_

    fp32 = _file_size(lambda p: torch.save(model.state_dict(), p))
    q = copy.deepcopy(model)
    q = quantize_(q, Plan(default=LayerConfig(weight_bits=8)))
    convert(q)
    packed = _file_size(lambda p: save_packed(q, p))
    eng = _file_size(engine.save)
    return {"fp32_checkpoint_bytes": fp32, "packed_8bit_bytes": packed,
            "int_engine_file_bytes": eng}


def run_benchmark(
    preset: str = "small",
    threads: Sequence[int] = (1, 2),
    batch: int = 8,
    frames: int = 300,
    repeats: int = 5,
    stream_frames: int = 1500,
    chunk: int = 21,
    backend: str = "auto",
    seed: int = 0,
    log: Optional[Callable[[str], None]] = None,
    compile: bool = True,
) -> Dict[str, Any]:
    """Benchmark one preset; returns a JSON-able dict (see the module docstring).

    ``compile``: also time the integer engine with its requantisation fused by
    ``torch.compile`` (int_mm back end only; the one-off compile time is reported)."""
    from k2quant.infer.calibrate import calibrate_model

    log = log or (lambda s: None)
    model = build_bench_model(preset, seed)
    feat_dim = model.config.feat_dim
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, frames, feat_dim, generator=g)
    xs = torch.randn(1, stream_frames, feat_dim, generator=g)
    old_threads = torch.get_num_threads()
    torch.set_num_threads(max(threads))
    engine, _ = calibrate_model(model, [x[:2]], backend=backend)
    with torch.no_grad():
        y32 = model(x)
        yq = engine(x)
    agree = float((y32.argmax(-1) == yq.argmax(-1)).float().mean())
    compiled = None
    if compile and engine.backend == "int_mm":
        compiled = copy.copy(engine)
        t0 = time.perf_counter()
        compiled.set_backend("int_mm", compile=True)
        with torch.no_grad():
            if not torch.equal(compiled(x), yq):
                raise RuntimeError("compiled integer engine differs from the eager one")
            compiled.streaming_forward(xs[:, : 3 * chunk + model.left_context + 10], chunk)
        compile_s = time.perf_counter() - t0
    res: Dict[str, Any] = {
        "preset": preset, "torch": torch.__version__, "backend": engine.backend,
        "batch": batch, "frames": frames, "stream_frames": stream_frames, "chunk": chunk,
        "repeats": repeats, "params_chain": model.num_parameters(include_xent=False),
        "top1_agreement_fp32_vs_int": agree, "runs": [],
        "compile_seconds": compile_s if compiled is not None else None,
    }
    try:
        for t in threads:
            torch.set_num_threads(t)
            with torch.no_grad():
                tf = median_time(lambda: model(x), repeats)
                ti = median_time(lambda: engine(x), repeats)
                sf = median_time(lambda: chunked_forward(
                    model.forward, xs, model.left_context, model.right_context,
                    model.subsampling_factor, chunk), repeats)
                si = median_time(lambda: engine.streaming_forward(xs, chunk), repeats)
                mf = peak_rss_increase(lambda: model(x))
                mi = peak_rss_increase(lambda: engine(x))
                if compiled is not None:
                    tc = median_time(lambda: compiled(x), repeats)
                    sc = median_time(lambda: compiled.streaming_forward(xs, chunk), repeats)
            run = {"threads": t, "fp32_batch_s": tf, "int_batch_s": ti,
                   "batch_speedup": tf / ti, "fp32_stream_s": sf, "int_stream_s": si,
                   "stream_speedup": sf / si, "fp32_peak_rss_increase_bytes": mf,
                   "int_peak_rss_increase_bytes": mi,
                   "fp32_frames_per_s": batch * frames / tf, "int_frames_per_s": batch * frames / ti}
            if compiled is not None:
                run.update({"intc_batch_s": tc, "intc_batch_speedup": tf / tc,
                            "intc_stream_s": sc, "intc_stream_speedup": sf / sc})
                log(f"{preset} threads={t}: compiled requant: batch {tc * 1e3:.1f} ms "
                    f"({tf / tc:.2f}x), stream {sc * 1e3:.1f} ms ({sf / sc:.2f}x)")
            res["runs"].append(run)
            log(f"{preset} threads={t}: batch fp32 {tf * 1e3:.1f} ms, int {ti * 1e3:.1f} ms "
                f"({tf / ti:.2f}x); stream fp32 {sf * 1e3:.1f} ms, int {si * 1e3:.1f} ms "
                f"({sf / si:.2f}x)")
    finally:
        torch.set_num_threads(old_threads)
    mem = engine.memory_report()
    ref = fp32_reference_bytes(model)
    res["memory"] = {
        "fp32_weight_bytes": ref["weight_bytes"], "fp32_total_bytes": ref["total_bytes"],
        "int8_weight_bytes": mem["weight_bytes"], "int_engine_bytes": mem["engine_bytes"],
        "weight_ratio": ref["weight_bytes"] / mem["weight_bytes"],
        "weights_and_biases_ratio": (ref["weight_bytes"] + ref["bias_bytes"])
        / (mem["weight_bytes"] + mem["bias_bytes"]),
        "total_ratio": ref["total_bytes"] / mem["engine_bytes"],
    }
    res["disk"] = disk_sizes(model, engine)
    res["disk"]["ratio_fp32_vs_packed"] = (
        res["disk"]["fp32_checkpoint_bytes"] / res["disk"]["packed_8bit_bytes"])
    return res


def format_result(res: Dict[str, Any]) -> str:
    mb = 1.0 / (1 << 20)
    lines = [
        f"== {res['preset']}  (torch {res['torch']}, integer backend {res['backend']}, "
        f"{res['params_chain'] / 1e6:.2f}M chain params; batch {res['batch']}x{res['frames']} "
        f"frames; streaming 1x{res['stream_frames']} frames in chunks of {res['chunk']} output "
        f"frames; median of {res['repeats']})",
        f"   top-1 frame agreement int vs fp32 on the benchmark features: "
        f"{res['top1_agreement_fp32_vs_int'] * 100:.1f}%",
        "   threads | batch fp32 ms | batch int ms | speedup | stream fp32 ms | stream int ms |"
        " speedup | peak RSS +MB fp32 / int",
    ]
    for r in res["runs"]:
        lines.append(
            f"   {r['threads']:7d} | {r['fp32_batch_s'] * 1e3:13.1f} | {r['int_batch_s'] * 1e3:12.1f} |"
            f" {r['batch_speedup']:6.2f}x | {r['fp32_stream_s'] * 1e3:14.1f} |"
            f" {r['int_stream_s'] * 1e3:13.1f} | {r['stream_speedup']:6.2f}x |"
            f" {r['fp32_peak_rss_increase_bytes'] * mb:.1f} / {r['int_peak_rss_increase_bytes'] * mb:.1f}")
    if res.get("compile_seconds") is not None:
        lines.append(f"   integer engine with torch.compile-fused requantisation (compile "
                     f"{res['compile_seconds']:.0f} s, once):")
        for r in res["runs"]:
            lines.append(
                f"   {r['threads']:7d} | {r['fp32_batch_s'] * 1e3:13.1f} |"
                f" {r['intc_batch_s'] * 1e3:12.1f} | {r['intc_batch_speedup']:6.2f}x |"
                f" {r['fp32_stream_s'] * 1e3:14.1f} | {r['intc_stream_s'] * 1e3:13.1f} |"
                f" {r['intc_stream_speedup']:6.2f}x |")
    m, d = res["memory"], res["disk"]
    lines.append(
        f"   weights in memory: fp32 {m['fp32_weight_bytes'] * mb:.2f} MB vs int8 "
        f"{m['int8_weight_bytes'] * mb:.2f} MB ({m['weight_ratio']:.2f}x; with biases "
        f"{m['weights_and_biases_ratio']:.2f}x); all inference tensors: fp32 (+bias, BN stats) "
        f"{m['fp32_total_bytes'] * mb:.2f} MB vs engine (+requant constants) "
        f"{m['int_engine_bytes'] * mb:.2f} MB ({m['total_ratio']:.2f}x)")
    lines.append(
        f"   on disk: fp32 checkpoint {d['fp32_checkpoint_bytes'] * mb:.2f} MB, 8-bit packed "
        f"{d['packed_8bit_bytes'] * mb:.2f} MB ({d['ratio_fp32_vs_packed']:.2f}x), integer "
        f"engine file {d['int_engine_file_bytes'] * mb:.2f} MB")
    return "\n".join(lines)
