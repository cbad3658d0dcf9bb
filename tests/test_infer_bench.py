"""Benchmark plumbing: interleaved timing rounds, ratio summaries, a tiny end-to-end run
(no speed assertions: the CI box is shared)."""
import torch

from k2quant.infer.bench import format_result, interleaved_times, run_benchmark, summarize_times


def test_interleaved_rounds_rotate_and_count():
    calls = []
    fns = {n: (lambda n=n: calls.append(n)) for n in ("a", "b", "c")}
    t = interleaved_times(fns, repeats=4)
    assert calls[:3] == ["a", "b", "c"]  # warm-ups
    rounds = [calls[3 + 3 * r: 6 + 3 * r] for r in range(4)]
    assert rounds == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]]
    assert all(len(v["wall"]) == 4 and len(v["cpu"]) == 4 for v in t.values())


def test_summarize_ratios():
    times = {"fp32": {"wall": [4.0, 8.0, 6.0], "cpu": [4.0, 4.0, 4.0]},
             "int": {"wall": [1.0, 4.0, 2.0], "cpu": [1.0, 1.0, 2.0]}}
    s = summarize_times(times)
    assert s["fp32"]["speedup"] == 1.0
    assert s["int"]["speedup"] == 6.0 / 2.0
    assert s["int"]["paired_speedup"] == 3.0  # per-round ratios 4, 2, 3
    assert s["int"]["cpu_speedup"] == 4.0
    assert s["int"]["best_speedup"] == 4.0


def test_run_benchmark_smoke():
    torch.manual_seed(0)
    res = run_benchmark("small", threads=(1,), batch=2, frames=40, repeats=1,
                        stream_frames=60, chunk=7, backend=("auto", "dyadic", "float64"),
                        compile=False)
    assert res["backend"] == res["backends"][0]
    assert "float64" in res["backends"]
    run = res["runs"][0]
    assert set(run["batch"]) == {"fp32", *res["backends"]}
    assert res["memory"]["weight_ratio"] >= 3.9
    text = format_result(res)
    for n in res["backends"]:
        assert n in text


def test_arithmetic_labels_and_best_variant():
    from k2quant.infer.bench import arithmetic, best_by_arithmetic

    assert arithmetic("fp32") == "fp32"
    assert arithmetic("qtensor") == "qtensor (float32 requant)"
    for n in ("int_mm", "fbgemm", "float64", "int_mm+compile", "fbgemm+compile"):
        assert arithmetic(n) == "dyadic (exact)"

    def entry(b, s):
        return {"batch": b, "stream": s}

    runs = [{"threads": t, "batch": {n: {"speedup": b} for n, (b, _) in v.items()},
             "stream": {n: {"speedup": s} for n, (_, s) in v.items()}}
            for t, v in ((1, {"fp32": (1, 1), "int_mm": (2, 3), "int_mm+compile": (4, 3.5),
                              "qtensor": (5, 6)}),
                         (2, {"fp32": (1, 1), "int_mm": (1.5, 2), "int_mm+compile": (3.5, 3),
                              "qtensor": (4, 4)}))]
    res = {"backends": ["int_mm", "qtensor", "int_mm+compile"], "runs": runs}
    best = best_by_arithmetic(res)
    assert best["dyadic (exact)"]["variant"] == "int_mm+compile"
    assert best["dyadic (exact)"]["runs"][2] == entry(3.5, 3)
    assert best["qtensor (float32 requant)"]["runs"][1] == entry(5, 6)


def test_format_labels_dyadic_and_qtensor():
    torch.manual_seed(0)
    res = run_benchmark("small", threads=(1,), batch=2, frames=40, repeats=1,
                        stream_frames=60, chunk=7, backend=("dyadic", "qtensor"),
                        compile=False)
    text = format_result(res)
    assert "dyadic (exact)" in text
    if "qtensor" in res["backends"]:
        assert "qtensor (float32 requant)" in text
    assert "best dyadic (exact)" in text and "streaming" in text
