"""A run folder (and compare.py's --out) belongs to one process at a time: a second process is refused in
one line, a lock left by a dead process is taken over, and compare.py deletes no folder it did not create."""
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, TINY

import common
import compare


def hold_lock(folder):
    """A child process that takes the folder's lock and waits; returns it once the lock is held."""
    code = ("import sys, time; sys.path.insert(0, sys.argv[1]); import common; "
            "common.FolderLock(sys.argv[2], 'holder'); print('locked', flush=True); time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(ROOT), str(folder)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_process_on_a_locked_folder_is_refused_and_the_lock_is_freed_on_exit(tmp_path, capsys):
    folder = tmp_path / "run"
    folder.mkdir()
    lock = common.FolderLock(folder, "first.py")
    assert (folder / ".lock").read_text() == f"pid {os.getpid()} (first.py)\n"
    with pytest.raises(common.UserError, match=f"in use by pid {os.getpid()} \\(first.py\\)"):
        common.FolderLock(folder, "second.py")          # another open file: flock refuses it, same process or not
    lock.release()
    assert not (folder / ".lock").exists()
    common.FolderLock(folder, "third.py").release()     # free again, and no takeover note: nobody died holding it
    assert "taking over" not in capsys.readouterr().err


def test_a_lock_left_by_a_killed_process_is_taken_over_with_a_note(tmp_path, capsys):
    holder = hold_lock(tmp_path)
    with pytest.raises(common.UserError, match=f"in use by pid {holder.pid} \\(holder\\)"):
        common.FolderLock(tmp_path, "mine")
    holder.kill()                                       # kill -9: no atexit, the file stays behind
    holder.wait()
    assert (tmp_path / ".lock").read_text() == f"pid {holder.pid} (holder)\n"
    lock = common.FolderLock(tmp_path, "mine")
    assert f"taking over the lock of {tmp_path} left by pid {holder.pid} (holder), which holds no lock on it (it " \
        "ended, or this folder is a copy)" in capsys.readouterr().err
    assert (tmp_path / ".lock").read_text() == f"pid {os.getpid()} (mine)\n"
    lock.release()


def test_resume_of_a_running_folder_is_refused_and_ctrl_c_frees_it(out):
    """Two processes on one run folder: the second --resume is refused in one line; Ctrl-C (exit 130)
    releases the first one's lock."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    flags = [*TINY, "--train-size", "200", "--test-size", "100", "--clients", "2", "--batch-size", "16",
             "--rounds", "500", "--eval-every", "1000"]          # rounds of a second or so, no kNN on the way
    first = subprocess.Popen([sys.executable, str(ROOT / "fedavg_cl.py"), *flags, "--out", str(out)],
                             cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.time() + 300
        while not list(out.glob("*/checkpoint.pt")) and time.time() < deadline and first.poll() is None:
            time.sleep(0.5)
        folder = next(out.glob("*/checkpoint.pt")).parent
        second = subprocess.run([sys.executable, str(ROOT / "fedavg_cl.py"), "--resume", str(folder)], cwd=ROOT,
                                capture_output=True, text=True, timeout=300, env=env)
        assert second.returncode == 2, second.stderr
        assert second.stderr.strip().splitlines()[-1] == \
            f"error: {folder} is in use by pid {first.pid} (fedavg_cl.py); one process at a time per folder " \
            "(wait for it to end)"
        assert "Traceback" not in second.stderr
    finally:
        first.send_signal(signal.SIGINT)
        _, err = first.communicate(timeout=300)
    assert first.returncode == 130, err
    assert not (folder / ".lock").exists()


def test_a_second_compare_on_the_same_out_is_refused(tmp_path, capsys):
    holder = hold_lock(tmp_path)
    try:
        with pytest.raises(SystemExit) as e:
            compare.main(["--quick", "--methods", "fedavg_cl", "--partitions", "iid", "--device", "cpu",
                          "--out", str(tmp_path)])
    finally:
        holder.kill()
        holder.wait()
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {tmp_path.resolve()} is in use by pid {holder.pid} (holder); one process at a time "
                   "per folder (wait for it to end)"]
    assert not (tmp_path / "runs").exists()            # refused before running anything


def test_compare_deletes_no_folder_it_did_not_create(tmp_path):
    """A folder without a checkpoint in a cell (another process's run that has not saved yet, or a dead
    one) is left alone; the cell starts a new run beside it."""
    cell = compare.Cell("fedavg_cl", "iid", 0, ["-c", "pass"], tmp_path / "cell")
    foreign = cell.dir / "fedavg_cl-fmnist-iid-s0-20260101-000000"
    foreign.mkdir(parents=True)
    (foreign / "config.json").write_text("{}")
    rc, _, log = compare.run_cell(cell, {**os.environ})
    assert rc == 0 and "-c pass --out" in log.read_text()
    assert (foreign / "config.json").is_file()
