"""Safe torch loading (no unpickling of user files) and output-directory locks."""
import os
import subprocess
import sys

import pytest
import torch

from k2quant.utils.io import UnsafeFileError, load_torch
from k2quant.utils.rundir import DirLock, DirLockedError, check_writable, file_digest, staged_dir


class _Planted:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_load_torch_plain_data_round_trips(tmp_path):
    obj = {"w": torch.arange(6, dtype=torch.uint8), "lr": 3e-4, "cfg": {"a": [1, 2.5, None, True]},
           "name": "x", "t": (1, 2), "size": torch.Size([2]), "dtype": torch.float16,
           "p": torch.nn.Parameter(torch.ones(2))}
    torch.save(obj, tmp_path / "a.pt")
    got = load_torch(tmp_path / "a.pt", "checkpoint")
    assert torch.equal(got["w"], obj["w"]) and got["lr"] == 3e-4 and got["cfg"] == obj["cfg"]
    assert got["dtype"] is torch.float16 and got["size"] == torch.Size([2])


def test_load_torch_never_runs_a_planted_pickle(tmp_path):
    marker = tmp_path / "PWNED"
    torch.save({"x": _Planted(marker)}, tmp_path / "evil.pt")
    with pytest.raises(UnsafeFileError, match=r"--model .*evil.pt holds pickled Python objects.*--allow-pickle"):
        load_torch(tmp_path / "evil.pt", "--model")
    assert not marker.exists()
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pt")
    with pytest.raises(UnsafeFileError, match="module.pt"):
        load_torch(tmp_path / "module.pt", "--model")


def test_load_torch_allow_pickle_loads_objects(tmp_path):
    torch.save({"m": torch.nn.Linear(2, 3)}, tmp_path / "m.pt")
    assert load_torch(tmp_path / "m.pt", allow_pickle=True)["m"].out_features == 3


def test_load_torch_bad_files_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="--lm .*none.pt does not exist"):
        load_torch(tmp_path / "none.pt", "--lm")
    torch.save({"a": torch.zeros(1000)}, tmp_path / "ok.pt")
    (tmp_path / "trunc.pt").write_bytes((tmp_path / "ok.pt").read_bytes()[:300])
    with pytest.raises(ValueError, match="trunc.pt is not a readable torch file"):
        load_torch(tmp_path / "trunc.pt", "checkpoint")
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(ValueError, match="text.pt"):
        load_torch(tmp_path / "text.pt", "checkpoint")


def test_dir_lock_names_the_holder(tmp_path):
    out = tmp_path / "run"
    code = ("import sys, time; from k2quant.utils.rundir import DirLock\n"
            f"with DirLock({str(out)!r}):\n    print('held', flush=True); time.sleep(30)\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, env=env)
    try:
        assert p.stdout.readline().strip() == b"held"
        with pytest.raises(DirLockedError, match=rf"--out-dir .*run is in use by another k2quant process \(pid {p.pid}"):
            with DirLock(out):
                pass
    finally:
        p.kill()
        p.wait()
    with DirLock(out):  # released when the holder dies
        pass


def test_check_writable_fails_before_compute(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as a user that can write anywhere")
        with pytest.raises(PermissionError, match="--out-dir .*ro is not writable"):
            check_writable(ro)
    finally:
        ro.chmod(0o700)
    (tmp_path / "f").write_text("x")
    with pytest.raises(NotADirectoryError, match="--out-dir .*f exists and is not a directory"):
        check_writable(tmp_path / "f")


def test_staged_dir_replaces_together_or_not_at_all(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "plan.json").write_text("old plan")
    (out / "model.k2q").write_text("old model")
    with pytest.raises(RuntimeError):
        with staged_dir(out) as tmp:
            (tmp / "plan.json").write_text("new plan")
            raise RuntimeError("killed before the model was written")
    assert (out / "plan.json").read_text() == "old plan"
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # no temporary left behind
    with staged_dir(out) as tmp:
        (tmp / "plan.json").write_text("new plan")
        (tmp / "model.k2q").write_text("new model")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "a").write_text("a")
    assert (out / "plan.json").read_text() == "new plan"
    assert (out / "model.k2q").read_text() == "new model"
    assert (out / "sub" / "a").read_text() == "a"
    assert len(file_digest(out / "plan.json")) == 64
