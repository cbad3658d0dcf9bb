"""The compression / LM / rescoring stages (7-12) of egs/an4 and egs/mini run.sh, against stub
CLIs: each stage must call the right ``k2quant`` subcommand with the right options, skip runs
that are already done, and fail clearly on a bad run name. (The real CLIs are tested elsewhere;
the measured recipe results are in the recipes' headers.) Runs in a few seconds.
"""
import os
import stat
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
AN4 = REPO / "egs" / "an4" / "ASR" / "run.sh"
MINI = REPO / "egs" / "mini" / "ASR" / "run.sh"

# A k2quant / lhotse stand-in: logs its arguments, creates the files the next stage reads.
STUB = r"""#!/usr/bin/env bash
echo "$(basename "$0") $*" >> "$STUB_LOG"
prog=$(basename "$0"); cmd=$1; shift
get() { local want=$1; shift; while [ $# -gt 0 ]; do [ "$1" = "$want" ] && { echo "$2"; return; }; shift; done; }
case "$prog:$cmd" in
  lhotse:kaldi) mkdir -p "$4"; printf 'u1 A B\nu2 C\n' > "$4/text" ;;
  k2quant:compress) d=$(get --out-dir "$@"); mkdir -p "$d"; head -c 1234 /dev/zero > "$d/model.k2q"
                    echo '{}' > "$d/report.json" ;;
  k2quant:report) o=$(get --out "$@"); echo "| table |" > "$o" ;;
  k2quant:train-lm) d=$(get --exp-dir "$@"); mkdir -p "$d"; touch "$d/epoch-$(get --num-epochs "$@").pt" ;;
  k2quant:compress-lm) d=$(get --out-dir "$@"); mkdir -p "$d"; touch "$d/lm.k2q" ;;
  k2quant:decode) d=$(get --out-dir "$@"); mkdir -p "$d/lattices-$(get --tag "$@")" ;;
  k2quant:rescore) d=$(get --out "$@"); mkdir -p "$d"; echo '%WER 1.0' > "$d/wer-summary.txt"
                   echo '{}' > "$d/rescore-summary.json" ;;
esac
"""


@pytest.fixture()
def stubs(tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for name in ("k2quant", "lhotse"):
        p = bindir / name
        p.write_text(STUB)
        p.chmod(p.stat().st_mode | stat.S_IEXEC)
    log = tmp_path / "calls.log"
    env = dict(os.environ, K2QUANT=str(bindir / "k2quant"), STUB_LOG=str(log))
    data, exp = tmp_path / "data", tmp_path / "exp"
    (exp).mkdir()
    for e in (6, 20):  # an4 and mini defaults
        (exp / f"epoch-{e}.pt").touch()
    (data / "kaldi" / "train").mkdir(parents=True)
    (data / "kaldi" / "train" / "text").write_text("u1 A B\nu2 C\n")
    return env, log, data, exp


def _run(recipe, env, data, exp, *args):
    corpus = ["--corpus-dir", "/nonexistent"] if recipe == AN4 else []
    return subprocess.run(["bash", str(recipe), *corpus, "--data-dir", str(data),
                           "--exp-dir", str(exp), *args],
                          capture_output=True, text=True, env=env, timeout=60)


def _calls(log, sub):
    return [line.split() for line in log.read_text().splitlines()
            if line.startswith(f"k2quant {sub} ")]


def _opt(call, name):
    return call[call.index(name) + 1] if name in call else None


@pytest.mark.parametrize("recipe", [AN4, MINI], ids=["an4", "mini"])
def test_compress_stage_maps_run_names(recipe, stubs):
    env, log, data, exp = stubs
    runs = "uniform2 kl-r8 hessian-u2size hessian-sub-r12.5 nas-b3"
    p = _run(recipe, env, data, exp, "--stage", "7", "--stop-stage", "8", "--compress-runs", runs)
    assert p.returncode == 0, p.stderr[-3000:]
    calls = _calls(log, "compress")
    assert [_opt(c, "--tag") for c in calls] == runs.split()
    u2, kl, hu2, sub, nas = calls
    assert _opt(u2, "--method") == "uniform" and _opt(u2, "--bits") == "2"
    assert _opt(kl, "--method") == "kl" and _opt(kl, "--ratio") == "8"
    assert _opt(kl, "--sensitivity-cache").endswith("compress/sensitivity-kl.json")
    assert _opt(hu2, "--size-bytes") == "1234"  # the file size of uniform2/model.k2q
    assert "--subspace" in sub and _opt(sub, "--ratio") == "12.5"
    assert _opt(nas, "--budget") == "3bits" and "--sensitivity-cache" not in nas
    for c in calls:  # shared fp32 reference decode
        assert _opt(c, "--fp32-dir") == str(exp / "compress" / "fp32")
    rep = _calls(log, "report")
    assert len(rep) == 1 and _opt(rep[0], "--rows").count(",") == 4

    # rerun: every run with a report.json is skipped
    log.unlink()
    p = _run(recipe, env, data, exp, "--stage", "7", "--stop-stage", "7", "--compress-runs", runs)
    assert p.returncode == 0 and not log.exists(), p.stderr[-2000:]


def test_compress_stage_size_matched_to_any_uniform_width(stubs):
    env, log, data, exp = stubs
    p = _run(AN4, env, data, exp, "--stage", "7", "--stop-stage", "7",
             "--compress-runs", "uniform3 kl-u3size")
    assert p.returncode == 0, p.stderr[-3000:]
    u3, kl = _calls(log, "compress")
    assert _opt(u3, "--bits") == "3" and _opt(kl, "--size-bytes") == "1234"
    assert _opt(kl, "--method") == "kl"


def test_compress_stage_rejects_bad_names(stubs):
    env, log, data, exp = stubs
    p = _run(AN4, env, data, exp, "--stage", "7", "--stop-stage", "7", "--compress-runs", "foo")
    assert p.returncode != 0 and "unknown compression run 'foo'" in p.stderr
    p = _run(AN4, env, data, exp, "--stage", "7", "--stop-stage", "7",
             "--compress-runs", "kl-u2size")
    assert p.returncode != 0 and "List uniform2 before kl-u2size" in p.stderr


@pytest.mark.parametrize("recipe", [AN4, MINI], ids=["an4", "mini"])
def test_lm_and_rescore_stages(recipe, stubs, tmp_path):
    env, log, data, exp = stubs
    text = tmp_path / "big.txt"
    text.write_text("A B C\n")
    p = _run(recipe, env, data, exp, "--stage", "9", "--stop-stage", "12", "--lm-text", str(text))
    assert p.returncode == 0, p.stderr[-3000:]
    assert (exp / "lm" / "train.txt").read_text() == "A B C\n"
    assert (exp / "lm" / "valid.txt").read_text() == "A B\nC\n"
    (lm,) = _calls(log, "train-lm")
    assert _opt(lm, "--num-epochs") == "20"
    (clm,) = _calls(log, "compress-lm")
    assert _opt(clm, "--ratio") == "12" and _opt(clm, "--lm") == str(exp / "lm" / "epoch-20.pt")
    (dec,) = _calls(log, "decode")  # no compressed AM yet: fp32 lattices only
    assert "--save-lattices" in dec and _opt(dec, "--exp-dir") == str(exp)
    assert "rescoring the fp32 AM's lattices only" in p.stderr
    resc = _calls(log, "rescore")
    assert [Path(_opt(c, "--lm")).name for c in resc] == ["epoch-20.pt", "lm.k2q"]
    for c in resc:
        assert _opt(c, "--ngram-scale") == "1" and "," in _opt(c, "--lm-scale")
    (rep,) = _calls(log, "report")
    assert [Path(d).name for d in _opt(rep, "--systems").split(",")] == [
        "fp32am-fp32lm", "fp32am-kl-r12lm"]

    # with the compressed AM present: its lattices (decode --model) and all four systems
    system_am = "hessian-sub-r16" if recipe == AN4 else "hessian-sub-r12.5"
    (exp / "compress" / system_am).mkdir(parents=True)
    (exp / "compress" / system_am / "model.k2q").touch()
    log.unlink()
    p = _run(recipe, env, data, exp, "--stage", "11", "--stop-stage", "12")
    assert p.returncode == 0, p.stderr[-3000:]
    (dec,) = _calls(log, "decode")  # the fp32 lattices are done already
    assert _opt(dec, "--model") == str(exp / "compress" / system_am / "model.k2q")
    resc = _calls(log, "rescore")
    assert [Path(_opt(c, "--lattices")).name for c in resc] == [f"lattices-dev-{system_am}"] * 2 \
        if recipe == AN4 else [f"lattices-test-{system_am}"] * 2
    (rep,) = _calls(log, "report")
    assert [Path(d).name for d in _opt(rep, "--systems").split(",")] == [
        "fp32am-fp32lm", "fp32am-kl-r12lm", f"{system_am}am-fp32lm", f"{system_am}am-kl-r12lm"]


def test_mini_default_stops_before_compression():
    text = MINI.read_text()
    assert "\nstop_stage=6 " in text  # `make demo` = stages 0-6 (fp32 train, decode, WER)
