"""Packed export (k2quant.export.format / size): round trips with the real quantized modules,
size vs payload, the 4-bit acceptance ratio, corruption/truncation/version/magic errors,
spec/plan mismatches and atomic writes."""
import copy
import glob
import os
import json
import struct
import zlib

import pytest
import torch
import torch.nn as nn

import k2quant.export.format as fmt
from k2quant.export import (
    FORMAT_VERSION,
    MAGIC,
    PackedFormatError,
    load_packed,
    read_header,
    read_tensors,
    save_packed,
    size_table,
    theoretical_payload_bytes,
)
from k2quant.models import register_arch
from k2quant.nn import QuantConv1d, QuantEmbedding, QuantLinear, QuantLSTM
from k2quant.plan import LayerConfig, Plan, convert, quantize_

ARCH = "test_export_toy"


class Toy(nn.Module):
    """tokens (N, T) int64 -> logits (N, T, vocab) float32, with every quantizable layer type."""

    def __init__(self, vocab: int = 40, dim: int = 16, hidden: int = 12, width: int = 24):
        super().__init__()
        self.config = dict(vocab=vocab, dim=dim, hidden=hidden, width=width)
        self.embed = nn.Embedding(vocab, dim)
        self.conv = nn.Conv1d(dim, dim, kernel_size=3, padding=1)
        self.norm = nn.BatchNorm1d(dim)
        self.lstm = nn.LSTM(dim, hidden, batch_first=True)
        self.fc1 = nn.Linear(hidden, width)
        self.fc2 = nn.Linear(width, width)
        self.fc3 = nn.Linear(width, width)
        self.fc4 = nn.Linear(width, width, bias=False)
        self.keep_float = nn.Linear(width, width)
        self.out = nn.Linear(width, vocab)

    def model_spec(self):
        return {"arch": ARCH, "config": dict(self.config)}

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)  # (N, T, D)
        x = torch.relu(self.norm(self.conv(x.transpose(1, 2)))).transpose(1, 2)
        x, _ = self.lstm(x)
        x = torch.relu(self.fc1(x))
        x = torch.relu(self.fc2(x))
        x = torch.relu(self.fc3(x))
        x = torch.relu(self.fc4(x))
        x = torch.relu(self.keep_float(x))
        return self.out(x)


register_arch(ARCH, lambda cfg: Toy(**cfg))


def mixed_plan() -> Plan:
    return Plan({
        "embed": LayerConfig(weight_bits=5),
        "conv": LayerConfig(weight_bits=3, weight_quantizer="lsq", act_bits=8),
        "lstm": LayerConfig(weight_bits=7, act_bits=8),
        "fc1": LayerConfig(weight_bits=6, granularity="tensor",
                           weight_options={"symmetric": False}),
        "fc2": LayerConfig(weight_bits=4, weight_quantizer="general"),
        "fc3": LayerConfig(weight_bits=1, weight_quantizer="binary"),
        "fc4": LayerConfig(weight_bits=2, weight_quantizer="ternary", act_bits=8),
        "keep_float": None,
        "out": LayerConfig(weight_bits=8, act_bits=4, act_quantizer="pact"),
    })


def tokens(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 40, (2, 7), generator=g)


@pytest.fixture(scope="module")
def qat_model():
    """A fake-quant Toy after a few QAT steps (learned quantizer state != its initialisation)."""
    torch.manual_seed(0)
    model = Toy()
    quantize_(model, mixed_plan())
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    model.train()
    for step in range(3):
        loss = model(tokens(step)).logsumexp(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def _types(model):
    return {type(m) for m in model.modules()}


def test_round_trip_bit_exact_from_spec(qat_model, tmp_path):
    x = tokens(123)
    with torch.no_grad():
        ref = qat_model(x)
    path = tmp_path / "toy.k2q"
    info = save_packed(qat_model, path)
    assert info["file_bytes"] == os.path.getsize(path)
    # the QAT model itself is left as it was (a copy was converted)
    assert not any(getattr(m, "frozen", False) for m in qat_model.modules())

    loaded = load_packed(path)  # rebuilt from the spec with build_model + plan + convert
    assert not loaded.training
    assert {QuantLinear, QuantConv1d, QuantEmbedding, QuantLSTM} <= _types(loaded)
    assert type(loaded.keep_float) is nn.Linear
    with torch.no_grad():
        out = loaded(x)
    assert out.dtype == torch.float32 and out.shape == (2, 7, 40)
    assert torch.equal(out, ref)

    # every codes buffer was packed at its width (3, 5, 6, 7, 8 bits, binary, ternary, general)
    h = read_header(path)
    bits = {e["n"]: e["b"] for e in h.tensors if e["k"] == "p"}
    assert bits["embed.weight_codes"] == 5
    assert bits["conv.weight_codes"] == 3
    assert bits["fc1.weight_codes"] == 6
    assert bits["fc2.weight_codes"] == 4
    assert bits["fc3.weight_codes"] == 1
    assert bits["fc4.weight_codes"] == 2
    assert bits["out.weight_codes"] == 8
    lstm_bits = {k: v for k, v in bits.items() if k.startswith("lstm.")}
    assert len(lstm_bits) == 8 and set(lstm_bits.values()) == {7}
    assert "fc2.weight_codebook" in loaded.state_dict()
    kinds = {e["n"]: e["k"] for e in h.tensors}
    assert kinds["fc2.weight_codebook"] == "m" and kinds["keep_float.weight"] == "r"
    assert kinds["norm.num_batches_tracked"] == "r"

    # loaded tensors equal the converted model's, dtypes preserved
    conv = convert(copy.deepcopy(qat_model))
    sd_ref, sd = conv.state_dict(), loaded.state_dict()
    assert list(sd) == list(sd_ref)
    for k in sd_ref:
        assert sd[k].dtype == sd_ref[k].dtype, k
        assert torch.equal(sd[k], sd_ref[k]), k


def test_round_trip_into_given_models(qat_model, tmp_path):
    path = tmp_path / "toy.k2q"
    x = tokens(5)
    with torch.no_grad():
        ref = qat_model(x)
    conv = convert(copy.deepcopy(qat_model))
    save_packed(conv, path)  # an already converted model is saved as is
    with torch.no_grad():
        assert torch.equal(conv(x), ref)
        # into a float skeleton (plan applied), a quantized model (converted), a converted one
        for target in (Toy(), quantize_(Toy(), mixed_plan()),
                       convert(quantize_(Toy(), mixed_plan()))):
            m = load_packed(path, model=target)
            assert m is target
            assert torch.equal(m(x), ref)


def test_file_size_close_to_theoretical_payload(qat_model, tmp_path):
    path = tmp_path / "toy.k2q"
    save_packed(qat_model, path)
    rep = size_table(path)
    payload = theoretical_payload_bytes(path)
    assert payload == rep.payload_bytes
    expected = sum(
        (r.params * r.bits / 8 if r.kind == "packed" else r.bytes) for r in rep.rows
    )
    assert payload == pytest.approx(expected)
    size = os.path.getsize(path)
    assert rep.file_bytes == size
    assert payload <= size <= payload * 1.02 + 4096, (size, payload)


@pytest.fixture(scope="module")
def pair_4bit():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(160, 1536, bias=False), nn.Linear(1536, 160, bias=False))
    quantize_(model, Plan(default=LayerConfig(weight_bits=4)))
    return model.eval()


def test_acceptance_4bit_pair_at_least_7_5x_smaller(pair_4bit, tmp_path):
    path = tmp_path / "pair4.k2q"
    save_packed(pair_4bit, path)
    size = os.path.getsize(path)
    fp32 = 4 * (1536 * 160 + 160 * 1536)
    ratio = fp32 / size
    assert ratio >= 7.5, f"4-bit file is {size} bytes, only {ratio:.3f}x smaller than fp32"
    rep = size_table(path)
    assert rep.fp32_bytes == fp32 and rep.ratio == pytest.approx(ratio)
    assert rep.params == 2 * 1536 * 160
    payload = rep.payload_bytes
    assert payload <= size <= payload * 1.02 + 4096
    x = torch.randn(3, 160)
    target = nn.Sequential(nn.Linear(160, 1536, bias=False), nn.Linear(1536, 160, bias=False))
    with torch.no_grad():
        assert torch.equal(load_packed(path, model=target)(x), pair_4bit(x))


# ---------------------------------------------------------------------------------- errors
@pytest.fixture(scope="module")
def saved_bytes(qat_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("saved") / "toy.k2q"
    save_packed(qat_model, path)
    return path.read_bytes()


@pytest.fixture
def saved(saved_bytes, tmp_path):
    """A fresh copy of the packed Toy file (tests may corrupt it)."""
    path = tmp_path / "toy.k2q"
    path.write_bytes(saved_bytes)
    return path


def test_corrupt_payload_byte_names_the_tensor(saved):
    h = read_header(saved)
    entry = next(e for e in h.tensors if e["n"] == "fc1.weight_codes")
    data = bytearray(saved.read_bytes())
    pos = h.payload_offset + entry["o"] + entry["z"] // 2
    data[pos] ^= 0x10
    saved.write_bytes(bytes(data))
    with pytest.raises(PackedFormatError, match=r"checksum mismatch in tensor 'fc1.weight_codes'"):
        load_packed(saved)
    with pytest.raises(PackedFormatError, match=str(saved.name)):
        read_tensors(saved)


def test_corrupt_header_byte(saved):
    data = bytearray(saved.read_bytes())
    data[20] ^= 0x01
    saved.write_bytes(bytes(data))
    with pytest.raises(PackedFormatError, match="header checksum mismatch"):
        load_packed(saved)


@pytest.mark.parametrize("keep", ["half", "minus1", "prefix"])
def test_truncated_file(saved, keep):
    data = saved.read_bytes()
    n = {"half": len(data) // 2, "minus1": len(data) - 1, "prefix": 12}[keep]
    saved.write_bytes(data[:n])
    with pytest.raises(PackedFormatError, match=r"truncated file: expected (at least )?\d+ bytes.*found %d" % n):
        load_packed(saved)
    if keep == "minus1":
        with pytest.raises(PackedFormatError, match=f"expected {len(data)} bytes, found {n}"):
            size_table(saved)


def test_trailing_garbage(saved):
    size = os.path.getsize(saved)
    with open(saved, "ab") as f:
        f.write(b"xx")
    with pytest.raises(PackedFormatError, match=f"expected {size} bytes, found {size + 2}"):
        load_packed(saved)


def test_newer_version(saved):
    data = bytearray(saved.read_bytes())
    struct.pack_into("<H", data, len(MAGIC), FORMAT_VERSION + 1)
    saved.write_bytes(bytes(data))
    with pytest.raises(
        PackedFormatError,
        match=rf"written by format version {FORMAT_VERSION + 1}; this k2quant reads version "
              rf"{FORMAT_VERSION}; upgrade k2quant",
    ):
        load_packed(saved)


def test_bad_magic(saved, tmp_path):
    data = bytearray(saved.read_bytes())
    data[:7] = b"NOTK2QP"
    saved.write_bytes(bytes(data))
    with pytest.raises(PackedFormatError, match="not a k2quant packed file"):
        load_packed(saved)
    ckpt = tmp_path / "model.pt"
    torch.save(Toy().state_dict(), ckpt)
    with pytest.raises(ValueError, match=r"model.pt: not a k2quant packed file \(bad magic"):
        load_packed(ckpt)
    empty = tmp_path / "empty.k2q"
    empty.write_bytes(b"")
    with pytest.raises(PackedFormatError, match="not a k2quant packed file"):
        read_header(empty)


def test_no_spec_needs_model(pair_4bit, tmp_path):
    path = tmp_path / "pair.k2q"
    save_packed(pair_4bit, path)  # nn.Sequential has no model_spec()
    assert read_header(path).spec is None
    assert read_header(path).get_plan() == pair_4bit.k2quant_plan
    with pytest.raises(PackedFormatError, match=r"pair.k2q: the file has no model spec.*pass model="):
        load_packed(path)


def test_model_mismatch_lists_tensors(saved):
    # a different architecture: missing / unexpected names
    other = Toy(width=24)
    other.extra = nn.Linear(3, 3)
    with pytest.raises(PackedFormatError, match=r"missing in the file: \['extra.weight', 'extra.bias'\]"):
        load_packed(saved, model=other)
    # same architecture, other plan: fc1 at 4 bits instead of 6 (and per channel)
    plan = mixed_plan()
    plan.layers["fc1"] = LayerConfig(weight_bits=4)
    with pytest.raises(PackedFormatError, match=r"spec/plan mismatch.*fc1.weight_codes: file has 6 bits, model expects 4"):
        load_packed(saved, model=quantize_(Toy(), plan))
    # fc3 kept float in the model but quantized in the file
    plan = mixed_plan()
    plan.layers["fc3"] = None
    with pytest.raises(PackedFormatError, match=r"unexpected in the file.*fc3.weight_codes"):
        load_packed(saved, model=quantize_(Toy(), plan))
    # a different width: shape mismatch
    with pytest.raises(PackedFormatError, match=r"fc1.weight_codes: file shape \(24, 12\) != model shape \(30, 12\)"):
        load_packed(saved, model=Toy(width=30))


def test_atomic_write_leaves_destination_untouched(qat_model, pair_4bit, tmp_path, monkeypatch):
    path = tmp_path / "model.k2q"
    save_packed(pair_4bit, path)
    before = path.read_bytes()

    real = fmt._write_chunks
    calls = []

    def failing(f, chunks):
        calls.append(1)
        if len(calls) == 2:  # header written, now fail in the middle of the payload
            it = iter(chunks)
            f.write(next(it))
            raise OSError("disk full (simulated)")
        real(f, chunks)

    monkeypatch.setattr(fmt, "_write_chunks", failing)
    with pytest.raises(OSError, match="disk full"):
        save_packed(qat_model, path)
    assert path.read_bytes() == before
    assert glob.glob(str(tmp_path / ".tmp-*")) == []
    # a new destination is not created either
    with pytest.raises(OSError):
        calls.clear()
        save_packed(qat_model, tmp_path / "new.k2q")
    assert not (tmp_path / "new.k2q").exists()
    monkeypatch.setattr(fmt, "_write_chunks", real)
    with torch.no_grad():
        x = torch.randn(2, 160)
        target = nn.Sequential(nn.Linear(160, 1536, bias=False), nn.Linear(1536, 160, bias=False))
        assert torch.equal(load_packed(path, model=target)(x), pair_4bit(x))


def test_float_model_and_tied_weights(tmp_path):
    """A model without quantized layers is stored raw; tied weights are stored once."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Embedding(30, 8), nn.Linear(8, 30))
    m[1].weight = m[0].weight  # tied
    m.train()
    path = tmp_path / "float.k2q"
    save_packed(m, path)
    h = read_header(path)
    kinds = {e["n"]: e["k"] for e in h.tensors}
    assert kinds == {"0.weight": "r", "1.weight": "a", "1.bias": "r"}
    assert h.payload_bytes == 4 * (30 * 8 + 30)
    m2 = nn.Sequential(nn.Embedding(30, 8), nn.Linear(8, 30))
    load_packed(path, model=m2)
    for k, v in m.state_dict().items():
        assert torch.equal(m2.state_dict()[k], v)
    rep = size_table(path)
    assert rep.fp32_bytes == rep.payload_bytes == h.payload_bytes


def test_stored_plan_that_does_not_fit_the_model(saved):
    class Other(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)

    with pytest.raises(PackedFormatError, match=r"toy.k2q: cannot apply the stored plan.*unknown layer pattern 'embed'"):
        load_packed(saved, model=Other())


@pytest.mark.parametrize("spec", [
    {"arch": "tdnnf", "config": {"feat_dim": 8, "num_classes": 7, "hidden_dim": 24,
                                 "bottleneck_dims": [12, 10, 12], "strides": [1, 0, 3],
                                 "prefinal_bottleneck": 12, "xent": True}},
    {"arch": "transformer_lm", "config": {"vocab_size": 37, "d_model": 16, "num_heads": 2,
                                          "num_layers": 3, "dim_feedforward": 24}},
])
def test_spec_num_parameters_equals_the_built_model(spec):
    from k2quant.models import build_model, spec_num_parameters

    model = build_model(spec)
    assert spec_num_parameters(spec) == sum(p.numel() for p in model.parameters())


def test_spec_checks_run_before_building(tmp_path, monkeypatch):
    from k2quant.models import spec_num_parameters
    from k2quant.models.tdnnf import TdnnF, TdnnFConfig

    assert spec_num_parameters({"arch": ARCH, "config": {}}) is None  # no counter registered
    with pytest.raises(ValueError, match="unknown arch 'nope'"):
        spec_num_parameters({"arch": "nope", "config": {}})
    m = TdnnF(TdnnFConfig(feat_dim=4, num_classes=5, hidden_dim=8, bottleneck_dims=4,
                          strides=[1], prefinal_bottleneck=4, dropout_schedule=None)).eval()
    path = tmp_path / "m.k2q"
    save_packed(m, path)
    assert fmt.is_packed_file(tmp_path / "anything.K2Q") and not fmt.is_packed_file(tmp_path / "x.pt")
    data = path.read_bytes()
    _, version, hlen = fmt._PREFIX.unpack(data[:fmt._PREFIX.size])
    header = json.loads(zlib.decompress(data[fmt._PREFIX.size:fmt._PREFIX.size + hlen]))
    payload = data[fmt._PREFIX.size + hlen + 4:]

    def write(h, name):
        hb = zlib.compress(json.dumps(h).encode())
        prefix = fmt._PREFIX.pack(MAGIC, version, len(hb))
        crc = struct.pack("<I", zlib.crc32(hb, zlib.crc32(prefix)) & 0xFFFFFFFF)
        (tmp_path / name).write_bytes(prefix + hb + crc + payload)
        return tmp_path / name

    h = json.loads(json.dumps(header))
    h["spec"]["config"]["hidden_dim"] = 100000
    monkeypatch.setattr("k2quant.models.build_model", lambda spec: pytest.fail("built"))
    with pytest.raises(PackedFormatError, match=r"big\.k2q: the header's model spec \('tdnnf', "
                                                r"[\d,]+ parameters\) does not match"):
        load_packed(write(h, "big.k2q"))
    h = json.loads(json.dumps(header))
    h["spec"]["config"]["bypass_scale"] = 7.0
    with pytest.raises(PackedFormatError, match=r"bad\.k2q: invalid model spec .*bypass_scale"):
        read_header(write(h, "bad.k2q"))
    h = json.loads(json.dumps(header))
    h["t"][0]["d"] = "object"
    with pytest.raises(PackedFormatError, match=r"dtype\.k2q: malformed header .*unknown tensor "
                                                r"dtype 'object'"):
        read_header(write(h, "dtype.k2q"))
    h = json.loads(json.dumps(header))
    e = next(e for e in h["t"] if e["k"] in "pr" and not e.get("f") and e["s"])
    e["s"] = [e["s"][0] + 1] + e["s"][1:]
    with pytest.raises(PackedFormatError, match=r"shape\.k2q: malformed header .*needs \d+ bytes, "
                                                r"the table says"):
        read_header(write(h, "shape.k2q"))
