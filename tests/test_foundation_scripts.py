"""fedavg_cl.py and local_cl.py end to end: run folder contract, resume, Ctrl-C, and every bad input."""
import json
import os
import signal
import subprocess
import sys

import pytest

import common
from conftest import ROOT, TINY, assert_bad_input, assert_complete_run, assert_encoder_reproduces, read_run, run_script


def test_fedavg_cl_end_to_end_writes_the_run_folder(out):
    proc, folder = run_script("fedavg_cl.py", *TINY, out=out)
    assert proc.returncode == 0, proc.stderr
    summary, metrics = assert_complete_run(folder, rounds=2)
    assert folder.name.startswith("fedavg_cl-fmnist-classes-s0-")
    part = json.loads((folder / "partition.json").read_text())
    assert len(part["clients"]) == 5
    assert all(sum(1 for c in cl["class_counts"] if c) == 2 for cl in part["clients"])   # 2 classes each
    ids = [i for cl in part["clients"] for i in cl["indices"]]
    assert len(ids) == len(set(ids)) == 600
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["args"]["rounds"] == 2 and "torch" in cfg["versions"]
    assert "learned encoder: kNN" in proc.stdout and "random encoder:  kNN" in proc.stdout
    assert metrics[0]["images"] == 5 * (120 // 32) * 32 * 2      # 5 clients x 3 full batches x 2 views


def test_local_cl_reports_every_client_and_their_mean(out):
    proc, folder = run_script("local_cl.py", *TINY, out=out)
    assert proc.returncode == 0, proc.stderr
    summary, _ = assert_complete_run(folder, rounds=2)
    per = summary["per_client"]
    assert len(per) == 5
    for key in common.EVAL_KEYS:           # few-label numbers too: the mean over clients
        assert summary[key] == pytest.approx(sum(p[key] for p in per) / 5), key
    assert summary["knn_acc_std"] >= 0
    assert_encoder_reproduces(folder, per[3]["knn_acc"], index=3)      # one encoder per client, by index
    with pytest.raises(common.UserError, match="5 encoders, one per client: pass index=0..4"):
        common.load_encoder(folder)


def test_centralized_is_one_client_with_the_same_image_passes(out):
    proc, folder = run_script("fedavg_cl.py", "--train-size", "600", "--test-size", "300", "--clients", "1",
                              "--rounds", "1", "--batch-size", "30", "--probe-epochs", "1", "--device", "cpu", out=out)
    assert proc.returncode == 0, proc.stderr
    _, metrics, _ = read_run(folder)
    assert metrics[0]["images"] == 2 * 600           # every image once, two views, batch 30 divides 600


@pytest.mark.parametrize("script", ["fedavg_cl.py", "local_cl.py"])
def test_resume_after_ctrl_c_reaches_the_same_metrics(script, out, tmp_path):
    flags = [*TINY, "--rounds", "4", "--eval-every", "2", "--seed", "3"]
    ref, ref_folder = run_script(script, *flags, out=tmp_path / "ref")
    assert ref.returncode == 0, ref.stderr

    # interrupt the same run with Ctrl-C as soon as round 1 is printed
    cmd = [sys.executable, str(ROOT / script), *flags, "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "2"})
    for line in proc.stdout:
        if line.startswith("round 1/4"):
            proc.send_signal(signal.SIGINT)
            break
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    assert "--resume" in err and "Traceback" not in err
    folder = next(out.glob("*/"))
    assert (folder / "checkpoint.pt").exists() and not (folder / "summary.json").exists()
    done = [json.loads(l)["round"] for l in (folder / "metrics.jsonl").read_text().splitlines()]
    assert done and done[-1] < 4

    res, _ = run_script(script, "--resume", folder, out=out)
    assert res.returncode == 0, res.stderr
    s_ref, m_ref, _ = read_run(ref_folder)
    s_res, m_res, _ = read_run(folder)
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("images_per_s", "elapsed_s")} for r in rows]
    assert strip(m_res) == strip(m_ref)                        # same losses and kNN, to the last digit
    for key in ("knn_acc", "linear_acc"):
        assert s_res[key] == s_ref[key]


BAD = [
    (["--dataset", "mnist"], "--dataset must be one of"),
    (["--dataset", "cifar10", "--data-dir", "/nonexistent"], "cifar10 not found"),
    (["--alpha", "0", "--partition", "dirichlet"], "--alpha must be > 0"),
    (["--classes-per-client", "11"], "more than the 10 classes"),
    (["--clients", "700", "--partition", "iid"], "more than the 600 training images"),
    (["--rounds", "-1"], "--rounds must be at least 1"),
    (["--resume", "/tmp"], "not a run folder"),
    (["--lr", "abc"], "invalid float value"),
    (["--no-such-flag"], "unrecognized arguments"),
]


@pytest.mark.parametrize("flags, needle", BAD, ids=[b[1] for b in BAD])
def test_bad_input_exits_2_with_one_error_line(flags, needle, out):
    proc, _ = run_script("fedavg_cl.py", "--train-size", "600", *flags, out=out)
    assert_bad_input(proc, out, needle)


def test_cuda_without_a_gpu_is_refused(out):
    proc, _ = run_script("local_cl.py", "--device", "cuda", out=out, env={"CUDA_VISIBLE_DEVICES": ""})
    assert_bad_input(proc, out, "no CUDA GPU")


def test_help_lists_every_flag_with_its_docstring():
    proc = subprocess.run([sys.executable, str(ROOT / "fedavg_cl.py"), "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    assert "--classes-per-client" in proc.stdout and "NT-Xent temperature" in proc.stdout
