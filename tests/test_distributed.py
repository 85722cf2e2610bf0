"""torchrun (issue #17; mocosfl: #29): 2 processes give what 1 process gives; rank 0 writes one run folder; Ctrl-C
and --resume; a killed process stops the others; methods not distributed yet refuse. CPU, gloo backend."""
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import common
from conftest import ROOT, assert_complete_run, read_run, run_script

BUDGET = ["--train-size", "200", "--test-size", "100", "--rounds", "3", "--local-epochs", "1", "--batch-size", "32",
          "--eval-every", "2", "--probe-epochs", "1", "--device", "cpu"]
FLAGS = {"fedavg_cl.py": [*BUDGET, "--clients", "4", "--participation", "0.75"],   # 3 of 4 sampled: 2 + 1 per process
         "local_cl.py": [*BUDGET, "--clients", "3"],                               # 2 clients on process 0, 1 on process 1
         "dec_ssl.py": [*BUDGET, "--clients", "4", "--participation", "0.75", "--featarc", "true", "--clusters", "2",
                        "--featarc-sample", "16"],                         # 50 images a client: 16 scored
         "fed_cluster.py": [*BUDGET, "--rounds", "4", "--cluster-rounds", "2", "--clients", "4", "--participation", "0.75",
                            "--keep-target", "true"],                              # both stages, targets kept per client
         "gossip_cl.py": [*BUDGET, "--clients", "3"],
         "feature_fusion.py": [*BUDGET, "--clients", "4", "--participation", "0.75"],
         "neighborhood_match.py": [*BUDGET, "--clients", "4", "--participation", "0.75", "--nm-warmup", "0.5"]}
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "FEDSSL_DIST_TIMEOUT": "30"}
TOL = 1e-6     # the stated tolerance; on one CPU build the numbers come out bit-for-bit equal


def torchrun(script, *flags, out, procs=2):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs),
            str(ROOT / script), *map(str, flags), "--out", str(out)]


def run_torchrun(script, *flags, out, procs=2):
    proc = subprocess.run(torchrun(script, *flags, out=out, procs=procs), cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env=ENV)
    folders = sorted(Path(out).glob("*/")) if Path(out).exists() else []
    return proc, folders


def same_numbers(a, b):
    """Every number of two metrics rows / summaries equal within TOL, except timings."""
    if isinstance(a, dict):
        keys = set(a) - {"images_per_s", "elapsed_s", "wall_s"}
        assert keys == set(b) - {"images_per_s", "elapsed_s", "wall_s"}, (sorted(a), sorted(b))
        return all(same_numbers(a[k], b[k]) for k in keys)
    if isinstance(a, list):
        return len(a) == len(b) and all(same_numbers(x, y) for x, y in zip(a, b))
    if isinstance(a, float):
        return abs(a - b) <= TOL
    return a == b


def same_tensors(a, b):
    if isinstance(a, torch.Tensor):
        return a.shape == b.shape and torch.allclose(a.float(), b.float(), rtol=0, atol=TOL)
    if isinstance(a, dict):
        return set(a) == set(b) and all(same_tensors(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same_tensors(x, y) for x, y in zip(a, b))
    return a == b


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The reference: each script as one plain process."""
    runs = {}
    for script, flags in FLAGS.items():
        out = tmp_path_factory.mktemp("one")
        proc, folder = run_script(script, *flags, out=out, env={"OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0, proc.stderr
        runs[script] = folder
    return runs


def test_client_stream_depends_on_seed_round_and_client_only():
    """run.client(c): the draws of client c are the same whichever clients ran before it, continue where
    its last block of the round stopped, differ between clients and rounds, and leave the outer stream alone."""
    run = SimpleNamespace(args=SimpleNamespace(seed=5), round=2, device=torch.device("cpu"), _client_rng={})
    draw = lambda c: common.Run.client(run, c)
    torch.manual_seed(0)
    outer = torch.get_rng_state()
    with draw(1):
        a = torch.rand(4)
    with draw(0):
        b = torch.rand(4)
    with draw(1):
        a2 = torch.rand(4)                      # continues client 1's stream
    assert torch.equal(torch.get_rng_state(), outer)
    run._client_rng = {}
    with draw(0):
        b_first = torch.rand(4)                 # client 0 first this time: same numbers as after client 1
    with draw(1):
        assert torch.equal(torch.rand(4), a)
    assert torch.equal(b_first, b) and not torch.equal(a, b) and not torch.equal(a, a2)
    run._client_rng, run.round = {}, 3
    with draw(1):
        assert not torch.equal(torch.rand(4), a)


@pytest.mark.parametrize("script", list(FLAGS))
def test_two_processes_give_the_numbers_of_one_process(script, one_process, tmp_path):
    proc, folders = run_torchrun(script, *FLAGS[script], out=tmp_path / "two")
    assert proc.returncode == 0, proc.stderr
    assert len(folders) == 1                                     # rank 0 alone writes the run folder
    summary, metrics = assert_complete_run(folders[0], rounds=len(read_run(one_process[script])[1]))
    assert proc.stdout.count("learned encoder: kNN") == 1        # and prints the report once
    ref_summary, ref_metrics, _ = read_run(one_process[script])
    assert same_numbers(metrics, ref_metrics)                    # per-round losses, kNN, uploads
    assert same_numbers(summary, ref_summary)                    # final kNN, linear, few-label, random encoder
    for name, key in (("checkpoint.pt", "state"), ("encoder.pt", "encoders")):   # every client's model, from its process
        got, want = (torch.load(f / name, weights_only=False)[key] for f in (folders[0], one_process[script]))
        assert same_tensors(got, want), name
    state = torch.load(folders[0] / "checkpoint.pt", weights_only=False)["state"]
    if script == "local_cl.py":                                  # local training sends no model
        assert all("upload_bytes" not in m for m in metrics)
    elif script == "gossip_cl.py":                               # every client's row of the weight stacks
        rows = state["weights"].nbytes + state["counters"].nbytes
        assert [m["upload_bytes"] for m in metrics] == [rows] * len(metrics)
    elif "feature_bytes_up" in metrics[0]:                       # feature fusion: 3 clients' models and features
        assert [m["upload_bytes"] for m in metrics] == [3 * (m["model_bytes_up"] + m["feature_bytes_up"]) for m in metrics]
        assert metrics[0]["feature_bytes_up"] > 0
    else:                                                        # what crossed = 3 sampled clients' state dicts
        model = state["model"] if "model" in state else {k: v for k, v in state["clusters"].items() if k[0] == "0"}
        assert [m["upload_bytes"] for m in metrics] == [3 * common.state_bytes(model)] * len(metrics)


def test_ctrl_c_then_resume_under_two_processes_reaches_the_uninterrupted_run(tmp_path):
    script, flags = "fedavg_cl.py", [*FLAGS["fedavg_cl.py"], "--rounds", "6"]
    ref, ref_folders = run_torchrun(script, *flags, out=tmp_path / "ref")
    assert ref.returncode == 0, ref.stderr
    out = tmp_path / "runs"
    proc = subprocess.Popen(torchrun(script, *flags, out=out), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV, start_new_session=True)
    for line in proc.stdout:
        if line.startswith("round 1/6"):
            os.killpg(proc.pid, signal.SIGINT)                   # Ctrl-C: the terminal signals the whole group
            break
    _, err = proc.communicate(timeout=300)
    assert proc.returncode != 0, err
    folder, = out.glob("*/")
    assert not (folder / "summary.json").exists(), err
    done = [json.loads(l)["round"] for l in (folder / "metrics.jsonl").read_text().splitlines()]
    assert done and done == list(range(1, done[-1] + 1)) and done[-1] < 6
    assert err.count("interrupted after round") == 1                # printed once, by process 0
    assert torch.load(folder / "checkpoint.pt", weights_only=False)["round"] == done[-1]   # one checkpoint, same round

    res, _ = run_torchrun(script, "--resume", folder, out=out)
    assert res.returncode == 0, res.stderr
    s_ref, m_ref, _ = read_run(ref_folders[0])
    s_res, m_res, _ = read_run(folder)
    assert same_numbers(m_res, m_ref) and same_numbers(s_res, s_ref)


def test_a_killed_process_stops_the_others_without_a_summary(tmp_path):
    out = tmp_path / "runs"
    flags = [*FLAGS["fedavg_cl.py"], "--rounds", "50"]
    proc = subprocess.Popen(torchrun("fedavg_cl.py", *flags, out=out), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV, start_new_session=True)
    for line in proc.stdout:
        if line.startswith("round 1/50"):
            break
    workers = [int(p) for p in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                                              text=True).stdout.split()]
    rank = {pid: Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") for pid in workers}
    victim = next(pid for pid, env in rank.items() if b"RANK=1" in env)
    os.kill(victim, signal.SIGKILL)
    _, err = proc.communicate(timeout=120)                       # torchrun or the collective stops process 0
    assert proc.returncode != 0, err
    folder, = out.glob("*/")
    assert not (folder / "summary.json").exists()
    rounds = [json.loads(l)["round"] for l in (folder / "metrics.jsonl").read_text().splitlines()]
    assert rounds[-1] < 50


def test_a_method_not_distributed_yet_refuses_torchrun(tmp_path):
    """Every method runs under torchrun now; a stand-in method file whose Args keep TORCHRUN = False."""
    script = tmp_path / "not_yet.py"
    script.write_text(f"import sys\nsys.path.insert(0, {str(ROOT)!r})\nimport common\n\n\n"
                      "class Args(common.RunArgs):\n    pass\n\n\ncommon.start(Args)\n")
    proc, folders = run_torchrun(script, *BUDGET, out=tmp_path / "runs")
    assert proc.returncode != 0 and not folders
    assert proc.stderr.count("error: not_yet.py is not distributed yet") == 1    # once, by process 0
    assert "exitcode  : 2" in proc.stderr                          # torchrun's report: the processes exit 2


# mocosfl: 2 of 4 clients a round (seed 0: pools [1, 3], [0, 1], [0, 3]: process 0 holds none of the first,
# each process one client of the others), 6 steps a round, syncs after steps 2, 4, 6
MOCOSFL = [*BUDGET, "--clients", "4", "--participation", "0.5", "--batch-size", "8", "--sync-every", "2"]


def without_uploads(rows):
    return [{k: v for k, v in r.items() if k != "upload_bytes"} for r in rows]


def test_mocosfl_two_processes_give_the_numbers_of_one_process(tmp_path):
    """The pool's clients on two processes, every process running the server step on the gathered activations:
    every loss, kNN, final metric, client row and server weight of one process (bit for bit on this CPU build)."""
    ref, ref_folder = run_script("mocosfl.py", *MOCOSFL, out=tmp_path / "one", env={"OMP_NUM_THREADS": "1"})
    assert ref.returncode == 0, ref.stderr
    proc, folders = run_torchrun("mocosfl.py", *MOCOSFL, out=tmp_path / "two")
    assert proc.returncode == 0, proc.stderr
    assert len(folders) == 1 and proc.stdout.count("learned encoder: kNN") == proc.stdout.count("client model:") == 1
    summary, metrics = assert_complete_run(folders[0], rounds=3)
    ref_summary, ref_metrics, _ = read_run(ref_folder)
    assert same_numbers(without_uploads(metrics), ref_metrics) and same_numbers(summary, ref_summary)
    for name, key in (("checkpoint.pt", "state"), ("encoder.pt", "encoders")):   # client rows from their processes
        got, want = (torch.load(f / name, weights_only=False)[key] for f in (folders[0], ref_folder))
        assert same_tensors(got, want), name
    # what crossed: every step the pool's h_q and h_k, every sync its client weights (the bytes the paper counts)
    total, before = lambda m: (m["comm_smashed_mib"] + m["comm_weights_mib"]) * 4 * 2 ** 20, 0
    for m in metrics:
        assert m["upload_bytes"] == pytest.approx(total(m) - before, rel=1e-9)
        before = total(m)
    assert metrics[0]["upload_bytes"] == 6 * 2 * 2 * 8 * 32 * 14 * 14 * 4 + 3 * 2 * 352 * 4


def test_mocosfl_ctrl_c_under_two_processes_saves_that_round_and_resumes_exactly(tmp_path):
    """--checkpoint-every 4: a Ctrl-C after round 1 or 2 still writes that round's checkpoint (one, from both
    processes' client rows), and --resume under torchrun reaches the numbers of the uninterrupted run."""
    flags = [*MOCOSFL, "--rounds", "5", "--checkpoint-every", "4"]
    ref, ref_folder = run_script("mocosfl.py", *flags, out=tmp_path / "ref", env={"OMP_NUM_THREADS": "1"})
    assert ref.returncode == 0, ref.stderr
    out = tmp_path / "runs"
    proc = subprocess.Popen(torchrun("mocosfl.py", *flags, out=out), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV, start_new_session=True)
    for line in proc.stdout:
        if line.startswith("round 1/5"):
            os.killpg(proc.pid, signal.SIGINT)
            break
    _, err = proc.communicate(timeout=300)
    assert proc.returncode != 0 and err.count("interrupted after round") == 1, err
    folder, = out.glob("*/")
    done = [json.loads(l)["round"] for l in (folder / "metrics.jsonl").read_text().splitlines()]
    assert done == list(range(1, done[-1] + 1)) and done[-1] < 4
    assert torch.load(folder / "checkpoint.pt", weights_only=False)["round"] == done[-1]
    res, _ = run_torchrun("mocosfl.py", "--resume", folder, out=out)
    assert res.returncode == 0, res.stderr
    (s_ref, m_ref, _), (s_res, m_res, _) = read_run(ref_folder), read_run(folder)
    assert same_numbers(without_uploads(m_res), m_ref) and same_numbers(s_res, s_ref)


def test_a_process_that_stops_answering_is_given_up_after_the_timeout(tmp_path):
    """SIGSTOP: the process is alive, so torchrun does not see a failure; the collective's timeout
    (FEDSSL_DIST_TIMEOUT, 10 s here) makes process 0 stop with one line and exit 1."""
    out = tmp_path / "runs"
    proc = subprocess.Popen(torchrun("fedavg_cl.py", *FLAGS["fedavg_cl.py"], "--rounds", "50", out=out), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**ENV, "FEDSSL_DIST_TIMEOUT": "10"}, start_new_session=True)
    for line in proc.stdout:
        if line.startswith("round 1/50"):
            break
    workers = [int(p) for p in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                                              text=True).stdout.split()]
    victim = next(pid for pid in workers if b"RANK=1" in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"))
    watchdog = threading.Timer(120, lambda: [os.kill(p, signal.SIGKILL) for p in workers])   # if it hangs
    watchdog.start()
    os.kill(victim, signal.SIGSTOP)
    try:
        said = next((line for line in proc.stderr if line.startswith("error: process 0")), "")
    finally:
        os.kill(victim, signal.SIGCONT)                          # so that torchrun's SIGTERM ends it at once
        watchdog.cancel()
    _, err = proc.communicate(timeout=120)
    assert "another process of the run stopped or did not answer within 10 s" in said, err
    assert proc.returncode != 0 and "exitcode: 1" in err        # process 0 exited 1 on its own, not killed
    assert not (next(out.glob("*/")) / "summary.json").exists()
