"""A full disk or a read-only folder never loses a run: the first failed write ends the run with one `error:`
line naming the file, exit status 1, the last good checkpoint kept and the --resume command; every file is
written through a temporary name and a rename, so no reader ever sees half a file."""
import errno
import os
import subprocess
from pathlib import Path

import pytest

import common
from conftest import TINY, read_run, run_script
from test_robust import call, refused

SMALL = ["--train-size", "200", "--test-size", "100", "--clients", "2", "--rounds", "2", "--batch-size", "16",
         "--probe-epochs", "1", "--width", "8", "--device", "cpu"]


def _can_mount(tmp_path) -> bool:
    probe = tmp_path / "probe"
    probe.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(probe)],
                                           capture_output=True).returncode != 0:
        return False
    subprocess.run(["umount", str(probe)], check=True)
    return True


def test_write_atomic_keeps_the_old_file_whole(tmp_path, monkeypatch):
    path = tmp_path / "summary.json"
    common.write_atomic(path, "old")
    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(common.os, "replace", full)
    with pytest.raises(common.WriteError, match=f"cannot write {path} \\(the disk is full\\)"):
        common.write_atomic(path, "new")
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def test_full_disk_stops_at_the_last_checkpoint_and_resumes(tmp_path):
    """A real full disk where it can be made (root, tmpfs): round 1's checkpoint fits, round 2's does not."""
    if not _can_mount(tmp_path):       # elsewhere: the second checkpoint's write fails with ENOSPC
        pytest.skip("needs root and mount -t tmpfs (test_read_only_folder covers the injected failure)")
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=900k", "tmpfs", str(disk)], check=True)
    try:
        proc, folder = run_script("fedavg_cl.py", *TINY, out=disk, env={"OMP_NUM_THREADS": "1"})
        assert proc.returncode == 1, proc.stderr
        err = proc.stderr.strip().splitlines()
        assert sum(line.startswith("error:") for line in err) == 1 and "Traceback" not in proc.stderr
        assert err[-1].startswith(f"error: cannot write {folder / 'checkpoint.pt'} (the disk is full): the run "
                                  "stops after round 2; the checkpoint of round 1 is kept"), proc.stderr
        assert f"--resume {folder}" in err[-1] and "warning" not in proc.stderr
        names = sorted(p.name for p in folder.iterdir())
        assert "summary.json" not in names and "encoder.pt" not in names and not [n for n in names if "tmp" in n]
        subprocess.run(["mount", "-o", "remount,size=20m", str(disk)], check=True)      # space freed
        proc, _ = run_script("fedavg_cl.py", "--resume", folder, out=disk, env={"OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0, proc.stderr
        summary, metrics, _ = read_run(folder)
        assert summary["complete"] is True and [m["round"] for m in metrics] == [1, 2]
    finally:
        subprocess.run(["umount", "-l", str(disk)])


def test_full_disk_before_the_first_checkpoint_leaves_no_folder(tmp_path, monkeypatch):
    real = common.os.replace
    def replace(src, dst):
        if Path(dst).name == "checkpoint.pt":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(src, dst)
    monkeypatch.setattr(common.os, "replace", replace)
    result = call("fedavg_cl.py", *SMALL, out=tmp_path)
    refused(result, tmp_path, "checkpoint.pt (the disk is full): the run stops after round 1; nothing was saved; "
                              "removed", code=1)
    assert list(tmp_path.iterdir()) == []


def test_read_only_folder_mid_run(tmp_path, monkeypatch):
    """The folder turns read-only after round 1's checkpoint: the clean-up of the temporary file fails too."""
    real, saved = common.os.replace, []
    def replace(src, dst):
        if Path(dst).name == "checkpoint.pt":
            if saved:
                raise PermissionError(errno.EACCES, "Permission denied")
            saved.append(dst)
        return real(src, dst)
    def unlink(self, missing_ok=False):
        raise PermissionError(errno.EACCES, "Permission denied")
    monkeypatch.setattr(common.os, "replace", replace)
    monkeypatch.setattr(common.Path, "unlink", unlink)
    result = call("fedavg_cl.py", *SMALL, out=tmp_path)
    refused(result, tmp_path, "checkpoint.pt (Permission denied): the run stops after round 2; the checkpoint of "
                              "round 1 is kept; free space (or make the folder writable), then resume with: ", code=1)
    assert "--resume" in result[2] and not list(tmp_path.glob("*/summary.json"))


def test_full_disk_while_writing_encoder_pt(tmp_path, monkeypatch):
    real = common.os.replace
    def replace(src, dst):
        if Path(dst).name == "encoder.pt":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(src, dst)
    monkeypatch.setattr(common.os, "replace", replace)
    result = call("fedavg_cl.py", *SMALL, out=tmp_path)
    refused(result, tmp_path, "encoder.pt (the disk is full): the final evaluation's files are not all written; "
                              "the checkpoint of round 2 is kept", code=1)
    folder, = tmp_path.iterdir()
    assert sorted(p.name for p in folder.iterdir() if "tmp" in p.name or p.name in ("encoder.pt", "summary.json")) == []
