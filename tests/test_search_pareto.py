"""Pareto sweep: JSON + PNG written, front monotone, WER attached."""
import json

import pytest

from k2quant.search.allocate import have_milp
from k2quant.search.pareto import (
    ParetoFront,
    ParetoPoint,
    default_budgets,
    non_dominated,
    pareto_sweep,
    write_pareto,
)

from test_search_allocate import make_table  # noqa: E402  (tests/ is on sys.path)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("method", ["auto", "greedy"])
def test_sweep_writes_json_and_png_and_front_is_monotone(tmp_path, method):
    table = make_table(0, n_layers=5, pairs=1)
    budgets = default_budgets(table, "avg_bits", num=7)
    assert budgets[0] == pytest.approx(1.0) and budgets[-1] == pytest.approx(8.0)
    front = pareto_sweep(table, budgets + [0.5], "avg_bits", dims=True, method=method)
    assert len(front.points) == 7 and len(front.skipped) == 1
    assert "below the floor" in front.skipped[0]["error"]
    if method == "auto" and have_milp():
        # exact optimum: more budget never costs sensitivity
        sens = [p.sensitivity for p in front.points]
        assert all(b <= a + 1e-12 for a, b in zip(sens, sens[1:])), sens
    fr = front.front()
    assert fr, "empty front"
    sizes = [p.size_bytes for p in fr]
    sens = [p.sensitivity for p in fr]
    assert sizes == sorted(sizes) and all(b < a for a, b in zip(sens, sens[1:]))
    for p in front.points:  # nothing off the front dominates a front point
        for q in fr:
            assert not (p.size_bytes <= q.size_bytes and p.sensitivity < q.sensitivity)

    front.set_wer({0: 30.0, front.points[3].label: 20.0, 6: 21.0})
    assert [p.wer for p in front.front("wer")] == [30.0, 20.0]
    json_path, png_path = tmp_path / "pareto.json", tmp_path / "pareto.png"
    write_pareto(front, json_path, png_path, title="test")
    d = json.loads(json_path.read_text())
    assert d["format"] == "k2quant-pareto" and len(d["points"]) == 7
    assert d["front"] == [p.label for p in fr]
    assert d["front_wer"] == [front.points[0].label, front.points[3].label]
    assert png_path.read_bytes()[:8] == PNG_MAGIC and png_path.stat().st_size > 5000
    back = ParetoFront.load(json_path)
    assert back.points == front.points


def test_ratio_and_size_sweeps(tmp_path):
    table = make_table(4, n_layers=4)
    for kind in ("ratio", "size_bytes"):
        front = pareto_sweep(table, budget_kind=kind, num=5)
        assert len(front.points) == 5 and not front.skipped
        write_pareto(front, tmp_path / f"{kind}.json", tmp_path / f"{kind}.png")
        assert (tmp_path / f"{kind}.png").read_bytes()[:8] == PNG_MAGIC
    with pytest.raises(ValueError, match="budget_kind"):
        pareto_sweep(table, [3], budget_kind="bits")
    with pytest.raises(ValueError, match="unknown point"):
        front.set_wer({"nope": 1.0})


def test_non_dominated():
    pts = [ParetoPoint(str(i), 0, s, 0, 0, v) for i, (s, v) in
           enumerate([(1, 5), (2, 6), (3, 2), (3, 1), (4, 1), (5, 0.5)])]
    assert [p.label for p in non_dominated(pts)] == ["0", "3", "5"]
