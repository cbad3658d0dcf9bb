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
