"""Speed / memory / size benchmark: fp32 TdnnF vs the integer-only engine on the same model
and the same features (``tools/bench_infer.py``, ``k2quant bench``).

For each preset: a TdnnF with random weights (BatchNorm statistics from two training-mode
passes over random features, so activations have realistic ranges), calibrated with minmax
ranges on the benchmark features, then for each thread count (``torch.set_num_threads``):

* batch: ``forward`` on (batch, frames, feat_dim) features, fp32 vs integer;
* streaming: one utterance of ``stream_frames`` frames evaluated in chunks of ``chunk``
  output frames (each chunk recomputes its left/right context), fp32 vs integer.

Every variant (fp32, each requested integer back end, optionally the fused exact dyadic
engine ``<backend>+compile``) is timed in the same *interleaved* rounds
(:func:`interleaved_times`: one warm-up each, then ``repeats`` rounds that run every
variant once, order rotated), so that the load of a shared machine hits all alike.
Variants are labelled by their arithmetic (:func:`arithmetic`): ``dyadic (exact)`` (every
dyadic back end, eager or fused: bit-exact to ``dyadic_reference_forward``) or ``qtensor
(float32 requant)``; :func:`best_by_arithmetic` gives the best of each per thread count.
Reported per variant: median wall time, the ratio of medians to fp32, the median of
per-round ratios (paired), and the ratio of median process CPU times (``time.process_time``;
at 1 thread the least load-sensitive figure), plus the 1-minute load average before and
after. Peak memory is the peak RSS increase during one forward (a sampling thread reads
``/proc/self/statm`` every 0.5 ms; torch's allocations are invisible to tracemalloc).
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
from typing import Any, Callable, Dict, Optional, Sequence, Union

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


def interleaved_times(fns: Dict[str, Callable[[], Any]], repeats: int) -> Dict[str, Dict[str, Any]]:
    """Time several callables in turns (one warm-up each, then ``repeats`` rounds; each round
    runs every callable once, in an order rotated from round to round), so that a changing
    machine load affects all of them alike.

    Returns ``{name: {"wall": [...], "cpu": [...]}}``: wall-clock seconds
    (``time.perf_counter``) and process CPU seconds (``time.process_time``, all threads)."""
    names = list(fns)
    out: Dict[str, Dict[str, Any]] = {n: {"wall": [], "cpu": []} for n in names}
    for n in names:
        fns[n]()
    for r in range(repeats):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            c0, t0 = time.process_time(), time.perf_counter()
            fns[n]()
            t1, c1 = time.perf_counter(), time.process_time()
            out[n]["wall"].append(t1 - t0)
            out[n]["cpu"].append(c1 - c0)
    return out


def summarize_times(times: Dict[str, Dict[str, Any]],
                    ref: str = "fp32") -> Dict[str, Dict[str, float]]:
    """Medians and ratios against ``ref``: ``speedup`` = median wall(ref) / median wall(v),
    ``paired_speedup`` = median over rounds of wall(ref) / wall(v) (same round, similar load),
    ``cpu_speedup`` = median CPU(ref) / median CPU(v), ``best_speedup`` = min wall(ref) /
    min wall(v)."""
    med = statistics.median
    r = times[ref]
    res = {}
    for n, t in times.items():
        res[n] = {
            "wall_s": med(t["wall"]), "min_wall_s": min(t["wall"]), "cpu_s": med(t["cpu"]),
            "speedup": med(r["wall"]) / med(t["wall"]),
            "paired_speedup": med([a / b for a, b in zip(r["wall"], t["wall"])]),
            "cpu_speedup": med(r["cpu"]) / max(med(t["cpu"]), 1e-9),
            "best_speedup": min(r["wall"]) / min(t["wall"]),
        }
    return res


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


def _engines(engine: IntTdnnF, backends: Sequence[str]) -> Dict[str, IntTdnnF]:
    """``{label: engine}`` for the requested back ends: ``"auto"`` is ``engine`` itself,
    ``"dyadic"`` the fastest dyadic back end (:func:`resolve_backend`); duplicates dropped."""
    from k2quant.infer.int_engine import resolve_backend

    out: Dict[str, IntTdnnF] = {}
    for b in backends:
        name = engine.backend if b == "auto" else resolve_backend("auto") if b == "dyadic" else b
        if name in out:
            continue
        if name == engine.backend:
            out[name] = engine
        else:
            e = copy.copy(engine)
            e.set_backend(name)
            out[name] = e
    return out


def run_benchmark(
    preset: str = "small",
    threads: Sequence[int] = (1, 2),
    batch: int = 8,
    frames: int = 300,
    repeats: int = 5,
    stream_frames: int = 1500,
    chunk: int = 21,
    backend: Union[str, Sequence[str]] = ("auto", "dyadic"),
    seed: int = 0,
    log: Optional[Callable[[str], None]] = None,
    compile: bool = True,
) -> Dict[str, Any]:
    """Benchmark one preset; returns a JSON-able dict (see the module docstring).

    ``backend``: one back end or several (``"auto"``, ``"dyadic"`` = the fastest dyadic one,
    or a name of :data:`k2quant.infer.int_engine.BACKENDS`); the first is the *primary*
    integer engine (``int_*`` keys, memory), all are timed against fp32 in the same
    interleaved rounds. ``compile``: also time the *fused* exact dyadic engine
    (``set_backend(b, compile=True)`` with ``b = fused_backend()``: ``int_mm`` compiled by
    ``torch.compile`` on torch >= 2, ``fbgemm`` with TorchScript-fused requantisations on
    torch 1.13; the one-off compile time is reported)."""
    from k2quant.infer.calibrate import calibrate_model
    from k2quant.infer.int_engine import fused_backend

    log = log or (lambda s: None)
    backends = [backend] if isinstance(backend, str) else list(backend)
    model = build_bench_model(preset, seed)
    feat_dim = model.config.feat_dim
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, frames, feat_dim, generator=g)
    xs = torch.randn(1, stream_frames, feat_dim, generator=g)
    old_threads = torch.get_num_threads()
    torch.set_num_threads(max(threads))
    from k2quant.infer.int_engine import resolve_backend

    first = resolve_backend("auto") if backends[0] == "dyadic" else backends[0]
    engine, _ = calibrate_model(model, [x[:2]], backend=first)
    engines = _engines(engine, backends)
    with torch.no_grad():
        y32 = model(x)
        outs = {n: e(x) for n, e in engines.items()}
    agree = {n: float((y32.argmax(-1) == y.argmax(-1)).float().mean()) for n, y in outs.items()}
    kl = {n: float((y32.exp() * (y32 - y)).sum(-1).mean()) for n, y in outs.items()}
    compile_s = None
    fb = fused_backend() if compile else None
    if fb is not None:
        base = engines.get(fb) or copy.copy(engine).set_backend(fb)
        compiled = copy.copy(base)
        t0 = time.perf_counter()
        compiled.set_backend(fb, compile=True)
        with torch.no_grad():
            if not torch.equal(compiled(x), base(x)):
                raise RuntimeError("fused integer engine differs from the eager one")
            compiled(x)  # TorchScript's profiling executor optimises after two runs
            for _ in range(2):  # the streaming chunk shapes
                compiled.streaming_forward(xs, chunk)
        compile_s = time.perf_counter() - t0
        engines[f"{fb}+compile"] = compiled
    primary = engine.backend
    res: Dict[str, Any] = {
        "preset": preset, "torch": torch.__version__, "backend": primary,
        "backends": list(engines), "batch": batch, "frames": frames,
        "stream_frames": stream_frames, "chunk": chunk, "repeats": repeats,
        "params_chain": model.num_parameters(include_xent=False),
        "top1_agreement_fp32_vs_int": agree[primary], "top1_agreement": agree,
        "kl_fp32_to_int": kl, "runs": [], "compile_seconds": compile_s,
    }

    def stream_fp32():
        return chunked_forward(model.forward, xs, model.left_context, model.right_context,
                               model.subsampling_factor, chunk)

    try:
        for t in threads:
            torch.set_num_threads(t)
            load0 = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
            with torch.no_grad():
                fb = {"fp32": lambda: model(x)}
                fs = {"fp32": stream_fp32}
                for n, e in engines.items():
                    fb[n] = (lambda e=e: e(x))
                    fs[n] = (lambda e=e: e.streaming_forward(xs, chunk))
                sb = summarize_times(interleaved_times(fb, repeats))
                ss = summarize_times(interleaved_times(fs, repeats))
                rss = {n: peak_rss_increase(f) for n, f in fb.items()}
            load1 = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
            run = {"threads": t, "load_before": load0, "load_after": load1,
                   "fp32_batch_s": sb["fp32"]["wall_s"], "int_batch_s": sb[primary]["wall_s"],
                   "batch_speedup": sb[primary]["speedup"],
                   "fp32_stream_s": ss["fp32"]["wall_s"], "int_stream_s": ss[primary]["wall_s"],
                   "stream_speedup": ss[primary]["speedup"],
                   "fp32_peak_rss_increase_bytes": rss["fp32"],
                   "int_peak_rss_increase_bytes": rss[primary],
                   "fp32_frames_per_s": batch * frames / sb["fp32"]["wall_s"],
                   "int_frames_per_s": batch * frames / sb[primary]["wall_s"],
                   "batch": sb, "stream": ss, "peak_rss_increase_bytes": rss}
            res["runs"].append(run)
            for n in engines:
                log(f"{preset} threads={t} {n} [{arithmetic(n)}]: batch "
                    f"{sb[n]['wall_s'] * 1e3:.1f} ms "
                    f"({sb[n]['speedup']:.2f}x, cpu {sb[n]['cpu_speedup']:.2f}x); stream "
                    f"{ss[n]['wall_s'] * 1e3:.1f} ms ({ss[n]['speedup']:.2f}x, cpu "
                    f"{ss[n]['cpu_speedup']:.2f}x); load {load0:.1f}->{load1:.1f}")
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


def arithmetic(variant: str) -> str:
    """What a benchmark variant computes: ``fp32``, the exact dyadic integer model
    (``dyadic_reference_forward``, every dyadic back end) or qtensor's float32-requantised
    integer model."""
    if variant == "fp32":
        return "fp32"
    if variant.split("+")[0] == "qtensor":
        return "qtensor (float32 requant)"
    return "dyadic (exact)"


def best_by_arithmetic(res: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
    """``{arithmetic: {"variant": best, "runs": {threads: {"batch": x, "stream": y}}}}``: for
    each integer arithmetic the variant with the best median batch speedup over all thread
    counts (its batch and streaming speedups vs fp32 per thread count)."""
    out: Dict[str, Dict[str, Any]] = {}
    for kind in ("dyadic (exact)", "qtensor (float32 requant)"):
        names = [n for n in res["backends"] if arithmetic(n) == kind]
        if not names:
            continue

        def score(n):
            return min(r["batch"][n]["speedup"] for r in res["runs"])

        best = max(names, key=score)
        out[kind] = {"variant": best, "runs": {
            r["threads"]: {"batch": r["batch"][best]["speedup"],
                           "stream": r["stream"][best]["speedup"]} for r in res["runs"]}}
    return out


def format_result(res: Dict[str, Any]) -> str:
    mb = 1.0 / (1 << 20)
    lines = [
        f"== {res['preset']}  (torch {res['torch']}, integer back ends {res['backends']} "
        f"(primary {res['backend']}), {res['params_chain'] / 1e6:.2f}M chain params; batch "
        f"{res['batch']}x{res['frames']} frames; streaming 1x{res['stream_frames']} frames in "
        f"chunks of {res['chunk']} output frames; medians of {res['repeats']} interleaved rounds)",
        "   top-1 frame agreement with fp32 / KL(fp32||int): " + ", ".join(
            f"{n} {a * 100:.1f}% / {res['kl_fp32_to_int'][n]:.2e}"
            for n, a in res["top1_agreement"].items()),
        "   arithmetic: 'dyadic (exact)' = the integer-only model with dyadic requantisation "
        "(bit-exact to dyadic_reference_forward); 'qtensor (float32 requant)' = fbgemm's "
        "float32 requantisation (a different integer function)",
        "   speedup = fp32 median / int median (wall); paired = median of per-round ratios; "
        "cpu = ratio of median process CPU times",
        "   threads | load    | arithmetic                | variant        | batch ms | speedup"
        " paired  cpu | stream ms | speedup paired  cpu | peak RSS +MB",
    ]
    if res.get("compile_seconds") is not None:
        fused = [n for n in res["backends"] if n.endswith("+compile")]
        how = ("whole integer forward compiled by torch.compile" if "int_mm+compile" in fused
               else "requantisations fused by TorchScript's NNC fuser")
        lines.insert(4, f"   {', '.join(fused)}: fused exact dyadic engine ({how}; built "
                        f"once in {res['compile_seconds']:.0f} s)")
    for r in res["runs"]:
        load = f"{r['load_before']:.1f}-{r['load_after']:.1f}"
        for n in r["batch"]:
            b, s = r["batch"][n], r["stream"][n]
            lines.append(
                f"   {r['threads']:7d} | {load:7s} | {arithmetic(n):25s} | {n:14s} |"
                f" {b['wall_s'] * 1e3:8.1f} |"
                f" {b['speedup']:6.2f}x {b['paired_speedup']:5.2f}x {b['cpu_speedup']:4.2f}x |"
                f" {s['wall_s'] * 1e3:9.1f} | {s['speedup']:6.2f}x {s['paired_speedup']:5.2f}x"
                f" {s['cpu_speedup']:4.2f}x | {r['peak_rss_increase_bytes'][n] * mb:.1f}")
    for kind, b in best_by_arithmetic(res).items():
        lines.append(f"   best {kind} ({b['variant']}) vs fp32: " + "; ".join(
            f"{t} thread{'s' if t > 1 else ''}: batch {v['batch']:.2f}x, streaming "
            f"{v['stream']:.2f}x" for t, v in b["runs"].items()))
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
