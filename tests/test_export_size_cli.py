"""`k2quant size` (k2quant/bin/size.py) and the size table (k2quant.export.size)."""
import json
import os
import re

import pytest
import torch
import torch.nn as nn
from click.testing import CliRunner

from k2quant.bin.cli import cli
from k2quant.export import save_packed, size_table
from k2quant.plan import LayerConfig, Plan, quantize_


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(160, 1536, bias=False),
        nn.ReLU(),
        nn.Linear(1536, 160, bias=False),
        nn.Linear(160, 10),
    )
    quantize_(model, Plan({"0": LayerConfig(weight_bits=4), "2": LayerConfig(weight_bits=3),
                           "3": None}))
    path = tmp_path_factory.mktemp("size") / "model.k2q"
    save_packed(model.eval(), path)
    return path


def test_size_table_rows_and_totals(packed):
    rep = size_table(packed)
    rows = {r.name: r for r in rep.rows}
    assert rows["0.weight_codes"].bits == 4 and rows["0.weight_codes"].bytes == 1536 * 160 / 2
    assert rows["2.weight_codes"].bits == 3 and rows["2.weight_codes"].bytes == 1536 * 160 * 3 / 8
    assert rows["3.weight"].bits == 32 and rows["3.weight"].bytes == 4 * 1600
    assert rows["0.weight_scale"].kind == "meta" and rows["0.weight_scale"].fp32_bytes == 0
    fp32 = 4 * (2 * 1536 * 160 + 1600 + 10)
    assert rep.fp32_bytes == fp32
    assert rep.params == 2 * 1536 * 160 + 1610
    assert rep.file_bytes == os.path.getsize(packed)
    assert rep.ratio == pytest.approx(fp32 / rep.file_bytes)
    layers = {r.name: r for r in rep.by_layer()}
    assert set(layers) == {"0", "2", "3"}
    assert layers["0"].params == 1536 * 160 and layers["0"].bits == "4"
    assert layers["3"].params == 1610 and layers["3"].bits == "32"
    # a layer's bytes include its scales/zero points/quantizer state
    assert layers["0"].bytes == sum(r.bytes for r in rep.rows if r.name.startswith("0."))


def test_cli_size_packed(packed):
    res = CliRunner().invoke(cli, ["size", str(packed)])
    assert res.exit_code == 0, res.output
    out = res.output
    lines = out.splitlines()
    assert re.search(r"^name\s+params\s+bits\s+bytes$", lines[0])
    assert re.search(r"^0\s+245,760\s+4\s+1\d\d,\d\d\d$", out, re.M), out
    assert re.search(r"^2\s+245,760\s+3\s+9\d,\d\d\d$", out, re.M), out
    assert re.search(r"^3\s+1,610\s+32\s+6,440$", out, re.M), out
    rep = size_table(packed)
    assert f"fp32 size:         {rep.fp32_bytes:,} bytes" in out
    assert f"file size:         {rep.file_bytes:,} bytes" in out
    m = re.search(r"compression ratio: ([\d.]+)x vs fp32", out)
    assert m and float(m.group(1)) == pytest.approx(rep.ratio, abs=0.006)
    assert rep.ratio > 8.0  # 4 and 3 bits

    res = CliRunner().invoke(cli, ["size", "--tensors", str(packed)])
    assert res.exit_code == 0 and "0.weight_codes" in res.output and "2.weight_scale" in res.output

    res = CliRunner().invoke(cli, ["size", "--json", str(packed)])
    assert res.exit_code == 0, res.output
    d = json.loads(res.output)
    assert d["kind"] == "packed" and d["ratio"] == pytest.approx(rep.ratio)
    assert [r["name"] for r in d["rows"]] == ["0", "2", "3"]


@pytest.mark.parametrize("wrap", [False, True])
def test_cli_size_checkpoint_fp32(tmp_path, wrap):
    model = nn.Sequential(nn.Linear(20, 30), nn.BatchNorm1d(30))
    sd = model.state_dict()
    path = tmp_path / "model.pt"
    torch.save({"model": sd, "epoch": 3} if wrap else sd, path)
    res = CliRunner().invoke(cli, ["size", str(path)])
    assert res.exit_code == 0, res.output
    assert re.search(r"^0\s+630\s+32\s+2,520$", res.output, re.M), res.output
    assert "(checkpoint)" in res.output
    assert "compression ratio: 1.00x vs fp32" in res.output
    rep = size_table(path)
    assert rep.ratio == pytest.approx(1.0, abs=0.01)


def test_cli_size_errors(tmp_path):
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"hello world")
    res = CliRunner().invoke(cli, ["size", str(bad)])
    assert res.exit_code != 0
    assert "bad.bin: neither a k2quant packed file nor a readable torch checkpoint" in res.output
    res = CliRunner().invoke(cli, ["size", str(tmp_path / "missing.k2q")])
    assert res.exit_code != 0 and "does not exist" in res.output
