"""Bad input, broken run folders, divergence and Ctrl-C: one `error:` line and the right exit status,
never a traceback, never a summary that says complete. Most cases stop before any training, so they
run in this process (main() with argv, SystemExit caught) instead of paying a Python start each."""
import contextlib
import dataclasses
import importlib
import io
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

import common
from conftest import ROOT

SCRIPTS = ["fedavg_cl.py", "local_cl.py", "gossip_cl.py", "dec_ssl.py", "feature_fusion.py", "neighborhood_match.py",
           "mocosfl.py", "fed_cluster.py"]
SMALL = ["--train-size", "200", "--test-size", "100", "--clients", "2", "--rounds", "1", "--batch-size", "16",
         "--probe-epochs", "1", "--width", "8", "--device", "cpu"]
MOCOSFL = ["--train-size", "200", "--test-size", "100", "--clients", "2", "--rounds", "1", "--probe-epochs", "1",
           "--width", "8", "--device", "cpu"]          # mocosfl keeps its own batch rule


def small(script):
    return MOCOSFL if script == "mocosfl.py" else SMALL


def call(script, *flags, out):
    """script's main() with these flags in this process: (exit status, stdout, stderr)."""
    mod = importlib.import_module(Path(script).stem)
    argv, handler = sys.argv, signal.getsignal(signal.SIGINT)
    sys.argv = [str(ROOT / script), *map(str, flags), "--out", str(out)]
    so, se = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(so), contextlib.redirect_stderr(se):
            mod.main()
        code = 0
    except SystemExit as e:
        code = e.code
    finally:
        sys.argv = argv
        signal.signal(signal.SIGINT, handler)
        common._fresh_dir = None
    return code, so.getvalue(), se.getvalue()


def refused(result, out, needle, code=2):
    """The exit status, one `error:` line naming the problem as the last stderr line, no complete summary."""
    status, _, err = result
    assert status == code, err
    lines = err.strip().splitlines()
    assert lines and lines[-1].startswith("error:") and needle in lines[-1], err
    assert sum(line.startswith("error:") for line in lines) == 1 and "Traceback" not in err
    for s in Path(out).glob("**/summary.json"):
        assert json.loads(s.read_text())["complete"] is not True


def float_flags(script):
    mod = importlib.import_module(Path(script).stem)
    return [f.name for f in dataclasses.fields(mod.Args) if isinstance(getattr(mod.Args(), f.name), float)]


# --- 1. values that cannot mean anything --------------------------------------------------------

@pytest.mark.parametrize("script", SCRIPTS)
def test_every_float_flag_refuses_nan_and_inf(script, tmp_path):
    names = float_flags(script)
    assert {"lr", "alpha", "weight_decay"} <= set(names)
    for i, name in enumerate(names):            # each flag one value; nan, inf and -inf all used
        flag, value = "--" + name.replace("_", "-"), ("nan", "inf", "-inf")[i % 3]
        refused(call(script, f"{flag}={value}", out=tmp_path), tmp_path, f"{flag} must be a finite number")


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("flags, needle", [
    (["--weight-decay", "-1"], "--weight-decay must be >= 0"),
    (["--seed", "-1"], "--seed must be in [0, 2**32)"),
    (["--seed", str(2 ** 32)], "--seed must be in [0, 2**32)"),
    (["--probe-epochs", "0"], "--probe-epochs must be at least 1"),
    (["--holdout", "60000"], "--holdout 60000 leaves no training images"),
    (["--width", "100000"], "GiB"),
    (["--width", str(2 ** 63)], "cannot even describe"),
    (["--clients", "201", "--train-size", "200"], "is more than the 200 training images"),
], ids=["wd", "seed-neg", "seed-big", "probe0", "holdout", "width", "width-overflow", "clients"])
def test_meaningless_values_are_refused_up_front(script, flags, needle, tmp_path):
    refused(call(script, *flags, out=tmp_path), tmp_path, needle)
    assert not any(tmp_path.iterdir()) if tmp_path.exists() else True     # no run folder was started


@pytest.mark.parametrize("script, flags, needle", [
    (s, ["--proj-dim", "0"], "--proj-dim must be at least 1")
    for s in ("fedavg_cl.py", "local_cl.py", "feature_fusion.py", "neighborhood_match.py", "mocosfl.py",
              "fed_cluster.py")] + [
    (s, ["--queue-size", "0"], "--queue-size") for s in ("feature_fusion.py", "neighborhood_match.py", "mocosfl.py")] + [
    ("dec_ssl.py", ["--ssl", "moco", "--queue-size", "0"], "--queue-size must be at least 1"),
    ("dec_ssl.py", ["--featarc", "--clusters", "10", "--clients", "5"], "would start with no client"),
    ("dec_ssl.py", ["--hidden-dim", "10000000"], "GiB"),
    ("feature_fusion.py", ["--queue-size", "1000000000"], "GiB"),
    ("neighborhood_match.py", ["--queue-size", "1000000000"], "GiB"),
    ("mocosfl.py", ["--queue-size", "1000000000"], "GiB"),
    ("neighborhood_match.py", ["--nm-weight", "-1"], "--nm-weight must be >= 0"),
    ("dec_ssl.py", ["--lam", "-1"], "--lam must be >= 0"),
    ("dec_ssl.py", ["--featarc-sample", "-1"], "--featarc-sample must be >= 0"),
    ("fed_cluster.py", ["--lambda-c", "-1"], "--lambda-c must be >= 0"),
    ("fedavg_cl.py", ["--train-size", "600", "--clients", "600", "--partition", "iid"], "more than the 600"),
])
def test_method_flags_and_degenerate_settings_are_refused(script, flags, needle, tmp_path):
    refused(call(script, *flags, out=tmp_path), tmp_path, needle)


@pytest.mark.parametrize("script", SCRIPTS)
def test_out_that_is_not_a_writable_folder(script, tmp_path):
    (tmp_path / "file").write_text("x")
    refused(call(script, out=tmp_path / "file"), tmp_path, "is not a folder")
    refused(call(script, out=tmp_path / "file" / "sub"), tmp_path, "is not a writable folder")


def test_a_client_too_small_to_train_is_refused_when_the_partition_is_drawn(tmp_path):
    # 3 clients x 2 images passes the up-front count, but the Dirichlet draw leaves a client 1 image
    flags = ["--train-size", "200", "--clients", "60", "--partition", "dirichlet", "--alpha", "0.05",
             "--min-client-size", "0", "--device", "cpu"]
    refused(call("fedavg_cl.py", *flags, out=tmp_path), tmp_path, "a client needs 2 to take a training step")


def test_compare_and_benchmark_validate_before_starting_anything(tmp_path, capsys):
    import benchmark
    import compare
    for argv, needle in ((["--alpha", "nan"], "--alpha must be a finite number"),
                         (["--seeds", "-1"], "--seeds must be in [0, 2**32)"),
                         (["--clients", "6000"], "is more than the 10000 training images"),
                         (["--lr", "1"], "unrecognized arguments"),
                         (["--probe-epochs", "0"], "--probe-epochs must be at least 1")):
        with pytest.raises(SystemExit) as e:
            compare.main([*argv, "--out", str(tmp_path / "c")])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("error:") and needle in err and len(err.splitlines()) == 1, err
        assert not (tmp_path / "c").exists()                       # nothing started, not even the folder
    for argv, needle in ((["--workers", "100000"], "--workers must be at most"),
                         (["--json", str(tmp_path)], "is a folder")):
        with pytest.raises(SystemExit) as e:
            benchmark.main(["--quick", *argv])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("error:") and needle in err, err


# --- 2. corrupt CIFAR files ---------------------------------------------------------------------

def write_cifar10(folder, per_batch=20, data=None):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        d = {b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8) if data is None else data,
             b"labels": [i % 10 for i in range(per_batch)]}
        with open(folder / name, "wb") as f:
            pickle.dump(d, f)


def corrupt(kind, root: Path):
    folder = root / "cifar-10-batches-py"
    if kind == "wrong-shape":
        write_cifar10(folder, data=np.zeros((20, 1000), dtype=np.uint8))
    elif kind in ("truncated-pickle", "garbage-pickle", "empty-pickle", "not-a-dict"):
        write_cifar10(folder)
        path = folder / "data_batch_3"
        raw = path.read_bytes()
        path.write_bytes({"truncated-pickle": raw[: len(raw) // 2], "garbage-pickle": os.urandom(500),
                          "empty-pickle": b"", "not-a-dict": pickle.dumps([1, 2, 3])}[kind])
    else:                        # an archive next to no folder: it gets unpacked first
        write_cifar10(root / "src" / "cifar-10-batches-py")
        archive = root / "cifar-10-python.tar.gz"
        with tarfile.open(archive, "w:gz") as tar:
            tar.add(root / "src" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
        shutil.rmtree(root / "src")
        raw = archive.read_bytes()
        archive.write_bytes(raw[: len(raw) // 2] if kind == "truncated-tar" else os.urandom(len(raw)))
        return archive
    return folder / ("data_batch_1" if kind == "wrong-shape" else "data_batch_3")


@pytest.mark.parametrize("kind", ["wrong-shape", "truncated-pickle", "garbage-pickle", "empty-pickle",
                                  "not-a-dict", "truncated-tar", "garbage-tar"])
def test_corrupt_cifar_files_are_named_in_one_line(kind, tmp_path):
    bad = corrupt(kind, tmp_path / "data")
    res = call("fedavg_cl.py", "--dataset", "cifar10", "--data-dir", tmp_path / "data", *SMALL, out=tmp_path / "runs")
    refused(res, tmp_path / "runs", str(bad))
    assert not (tmp_path / "data" / "cifar-10-batches-py").exists() or "tar" not in kind   # no half-unpacked folder


# --- 3. --resume on folders that are not this script's intact run ----------------------------------

@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One finished two-round fedavg_cl run (device auto), copied by each test that damages it."""
    out = tmp_path_factory.mktemp("finished")
    flags = [f for f in SMALL if f not in ("--device", "cpu")]
    code, _, err = call("fedavg_cl.py", *flags, "--rounds", "2", out=out)
    assert code == 0, err
    return next(out.glob("fedavg_cl-*"))


def copy_of(folder, tmp_path):
    dst = tmp_path / "copy" / folder.name
    shutil.copytree(folder, dst)
    (dst / "summary.json").unlink()
    return dst


@pytest.mark.parametrize("script", [s for s in SCRIPTS if s != "fedavg_cl.py"])
def test_resume_refuses_another_scripts_run(script, finished, tmp_path):
    folder = copy_of(finished, tmp_path)
    refused(call(script, "--resume", folder, out=tmp_path), tmp_path, "that is a 'fedavg_cl' run")


@pytest.mark.parametrize("damage, needle", [
    ("zero-byte", "cannot be read"), ("truncated", "cannot be read"), ("garbage", "cannot be read"),
    ("foreign", "not a checkpoint of this code"), ("config-garbage", "config.json is not a run configuration"),
    ("config-type", "config.json gives width = 'wide'"), ("config-width", "does not fit the network"),
    ("no-checkpoint", "nothing can be resumed"),
])
def test_resume_refuses_a_damaged_folder_in_one_line(damage, needle, finished, tmp_path):
    folder = copy_of(finished, tmp_path)
    ckpt, cfg = folder / "checkpoint.pt", folder / "config.json"
    if damage == "zero-byte":
        ckpt.write_bytes(b"")
    elif damage == "truncated":
        ckpt.write_bytes(ckpt.read_bytes()[:5000])
    elif damage == "garbage":
        ckpt.write_bytes(os.urandom(5000))
    elif damage == "foreign":
        import torch
        torch.save({"model": 1}, ckpt)
    elif damage == "config-garbage":
        cfg.write_text("{not json")
    elif damage in ("config-type", "config-width"):
        c = json.loads(cfg.read_text())
        c["args"]["width"] = "wide" if damage == "config-type" else 16
        cfg.write_text(json.dumps(c))
    else:
        ckpt.unlink()
        (folder / "metrics.jsonl").unlink()
    refused(call("fedavg_cl.py", "--resume", folder, out=tmp_path), tmp_path, needle)


def test_flags_next_to_resume_are_refused_or_applied_with_a_line(finished, tmp_path):
    folder = copy_of(finished, tmp_path)
    refused(call("fedavg_cl.py", "--resume", folder, "--rounds", "5", "--lr", "-1", out=finished.parent),
            tmp_path, "drop --rounds --lr")
    code, _, err = call("fedavg_cl.py", "--resume", folder, "--device", "cpu", out=finished.parent)
    assert code == 0 and "note: --resume with --device cpu (the run used auto)" in err, err
    assert json.loads((folder / "summary.json").read_text())["complete"] is True


# --- 4. runs that go wrong while training ---------------------------------------------------------

@pytest.mark.parametrize("script", ["fedavg_cl.py", "dec_ssl.py", "mocosfl.py"])
def test_divergence_stops_with_exit_1_naming_the_round(script, tmp_path):
    lr = ["--lr", "1e30"] if script != "dec_ssl.py" else ["--lr", "1e30", "--optimizer", "sgd"]
    res = call(script, *small(script), "--rounds", "2", *lr, out=tmp_path)
    refused(res, tmp_path, "in round 1: training diverged; try a smaller --lr", code=1)
    assert not list(tmp_path.glob("*/summary.json")) and not list(tmp_path.glob("*/"))   # nothing to resume


def test_summary_and_metrics_never_hold_bare_nan(tmp_path):
    common._write_json(tmp_path / "s.json", {"a": float("nan"), "b": [float("inf"), 1.0], "c": {"d": -float("inf")}})
    assert json.loads((tmp_path / "s.json").read_text(),
                      parse_constant=lambda c: pytest.fail(f"bare {c}")) == {"a": None, "b": [None, 1.0], "c": {"d": None}}


def test_a_metric_that_could_not_be_computed_leaves_the_summary_incomplete(tmp_path, monkeypatch):
    real = common.linear_probe
    monkeypatch.setattr(common, "linear_probe", lambda *a, **k: float("nan") if k.get("seed") == 0 else real(*a, **k))
    res = call("fedavg_cl.py", *SMALL, out=tmp_path)
    refused(res, tmp_path, "the run is not complete: metric(s) linear_acc, linear_acc_10pct, linear_acc_1pct could not be computed",
            code=1)                                 # the few-label probes use the same recipe, so they fail too
    text = next(tmp_path.glob("*/summary.json")).read_text()
    s = json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c}"))
    assert s["complete"] is False and s["linear_acc"] is None and "linear_acc" in s["incomplete"]


def test_a_run_in_which_no_client_trained_is_not_complete(tmp_path, monkeypatch):
    import fedavg_cl                             # every client returns without a step: images_total stays 0
    monkeypatch.setattr(fedavg_cl, "local_update", lambda *a, **k: (torch.zeros(()), 0))
    res = call("fedavg_cl.py", *SMALL, out=tmp_path)
    refused(res, tmp_path, "no client took a training step in any round (nothing was trained)", code=1)
    assert json.loads(next(tmp_path.glob("*/summary.json")).read_text())["complete"] is False


def test_a_cluster_model_no_client_trained_leaves_the_summary_incomplete(tmp_path):
    # 2 clients, 2 clusters, one client sampled per round for one round: one cluster never trains
    res = call("dec_ssl.py", *SMALL, "--featarc", "--clusters", "2", "--participation", "0.5", out=tmp_path)
    refused(res, tmp_path, "was never trained (no client was assigned to it)", code=1)
    assert json.loads(next(tmp_path.glob("*/summary.json")).read_text())["complete"] is False


# --- 5. Ctrl-C at any moment: a child that sends itself SIGINT at a chosen place ----------------------

def interrupted(tmp_path, where, times=1, script="fedavg_cl.py"):
    """Run script in a child whose `where` (a common.Run method or load_data) first sends SIGINT `times` times."""
    code = f"""
import os, signal, sys, time
sys.path.insert(0, {str(ROOT)!r}); sys.argv = [{str(ROOT / script)!r}] + {[*SMALL, '--rounds', '2', '--out', str(tmp_path)]!r}
import common, {Path(script).stem} as m
owner = common if {where!r} == "load_data" else common.Run
real, fired = getattr(owner, {where!r}), []
def hook(*a, **k):
    if not fired:
        fired.append(1)
        for _ in range({times}):
            os.kill(os.getpid(), signal.SIGINT); time.sleep(0.2)
    return real(*a, **k)
setattr(owner, {where!r}, hook)
m.main()
"""
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.parametrize("where, times", [("load_data", 1), ("two_views", 2)], ids=["data-loading", "double-in-round-1"])
def test_ctrl_c_before_the_first_checkpoint_exits_130_and_leaves_nothing(where, times, tmp_path):
    proc = interrupted(tmp_path, where, times)
    assert proc.returncode == 130, proc.stderr
    assert "nothing was saved" in proc.stderr and "Traceback" not in proc.stderr
    assert not list(tmp_path.glob("*/"))                        # no folder that --resume would refuse


def test_ctrl_c_in_the_final_evaluation_exits_130_and_resume_finishes_it(tmp_path):
    proc = interrupted(tmp_path, "evaluate")
    assert proc.returncode == 130 and "Traceback" not in proc.stderr, proc.stderr
    assert "interrupted during the final evaluation" in proc.stderr
    folder = next(tmp_path.glob("fedavg_cl-*"))
    assert (folder / "checkpoint.pt").exists() and not (folder / "summary.json").exists()
    code, out, err = call("fedavg_cl.py", "--resume", folder, out=tmp_path)
    assert code == 0, err
    s = json.loads((folder / "summary.json").read_text())
    assert s["complete"] is True and s["rounds"] == 2 and "resumed" in out
    assert [json.loads(l)["round"] for l in (folder / "metrics.jsonl").read_text().splitlines()] == [1, 2]


@pytest.mark.parametrize("flags", [["--test-size", "1"], ["--holdout", "1"]], ids=["test-size-1", "holdout-1"])
def test_a_single_evaluation_image_still_finishes(flags, tmp_path):
    """features.png of one image: PCA has one direction; the second is drawn as zero, not an IndexError."""
    mean, dirs, share = common.pca_2d(torch.ones(1, 5))
    assert dirs.shape == (2, 5) and share == [0.0, 0.0]
    code, _, err = call("fedavg_cl.py", *[f for f in SMALL if f not in ("--test-size", "100")], *flags, out=tmp_path)
    assert code == 0 and "Traceback" not in err, err
    folder = next(tmp_path.glob("fedavg_cl-*"))
    assert json.loads((folder / "summary.json").read_text())["complete"] is True and (folder / "features.png").exists()


@pytest.mark.parametrize("script", ["fedavg_cl.py", "gossip_cl.py"])
def test_a_float_beyond_float32_is_refused_up_front(script, tmp_path):
    """--lr 1e300 is finite in Python but overflows torch's float32 step (a RuntimeError after the folder existed)."""
    refused(call(script, *small(script), "--lr", "1e300", out=tmp_path), tmp_path,
            "--lr must be at most 3.4e+38 in size, the largest float32 (got 1e+300)")
    assert not list(tmp_path.glob("*/"))


@pytest.mark.parametrize("damage, needle", [
    ("garbage", "encoder.pt cannot be read: it is truncated or not an encoder.pt"),
    ("zero-byte", "encoder.pt cannot be read"), ("truncated", "encoder.pt cannot be read"),
    ("foreign", "encoder.pt is not an encoder.pt of this code"), ("empty-list", "encoder.pt is not an encoder.pt"),
    ("config-garbage", "config.json does not describe a network this code can build (JSONDecodeError"),
    ("config-no-args", "config.json does not describe a network this code can build (KeyError"),
    ("config-type", "config.json does not describe a network this code can build"),
    ("config-width", "encoder.pt does not fit the network that"),
])
def test_load_encoder_names_the_damaged_file(damage, needle, finished, tmp_path):
    """A damaged run folder gives one UserError naming the file and what is wrong, never torch's own error."""
    folder = copy_of(finished, tmp_path)
    weights, cfg = folder / "encoder.pt", folder / "config.json"
    if damage == "garbage":
        weights.write_bytes(os.urandom(5000))
    elif damage == "zero-byte":
        weights.write_bytes(b"")
    elif damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:5000])
    elif damage in ("foreign", "empty-list"):
        torch.save({"model": 1} if damage == "foreign" else {"encoders": [], "per": "client"}, weights)
    elif damage == "config-garbage":
        cfg.write_text("{not json")
    elif damage == "config-no-args":
        cfg.write_text("{}")
    else:
        c = json.loads(cfg.read_text())
        c["args"]["width"] = "wide" if damage == "config-type" else 16
        cfg.write_text(json.dumps(c))
    with pytest.raises(common.UserError) as err:
        common.load_encoder(folder)
    assert needle in str(err.value) and str(folder) in str(err.value), err.value


def test_benchmark_checks_its_json_folder_and_render_input_before_anything(tmp_path, capsys):
    """--json into a missing folder used to measure for minutes and then lose the figures; --render of a JSON
    that is not a benchmark gave a KeyError traceback."""
    import benchmark
    (tmp_path / "other.json").write_text('{"a": 1}')
    (tmp_path / "partial.json").write_text('{"device": "x", "ratio": {"bogus": 1}}')
    (tmp_path / "text.json").write_text("not json")
    for argv, needle in ((["--quick", "--json", str(tmp_path / "no" / "such" / "z.json")],
                          f"--json {tmp_path / 'no' / 'such' / 'z.json'}: there is no folder {tmp_path / 'no' / 'such'}"),
                         (["--render", str(tmp_path / "other.json")], "is not a file written by benchmark.py --json"),
                         (["--render", str(tmp_path / "text.json")], "cannot be read as JSON (JSONDecodeError"),
                         (["--render", str(tmp_path / "partial.json")], "a benchmark file this code cannot render"),
                         (["--render", str(ROOT / "results" / "benchmark-cpu.json"), "--before",
                           str(tmp_path / "other.json")], "--before")):
        with pytest.raises(SystemExit) as e:
            benchmark.main(argv)
        out, err = capsys.readouterr()
        assert e.value.code == 2 and err.startswith("error:") and needle in err and len(err.splitlines()) == 1, err
        assert "ratio ..." not in err and not out                  # nothing was measured or printed


def test_gossip_steps_that_never_end_a_round_are_refused(tmp_path):
    refused(call("gossip_cl.py", *SMALL, "--gossip-steps", "1000000000", out=tmp_path), tmp_path,
            "--gossip-steps must be at most 1000 (got 1000000000)")
    assert not list(tmp_path.glob("*/"))


@pytest.mark.parametrize("value", ["nan", "inf", "0", "-5", "abc"])
def test_a_bad_dist_timeout_is_refused_in_one_line(value, tmp_path, monkeypatch):
    """FEDSSL_DIST_TIMEOUT nan/inf raised in datetime.timedelta, 0 or -5 gave a C++ TCPStore timeout."""
    monkeypatch.setenv("FEDSSL_DIST_TIMEOUT", value)
    refused(call("fedavg_cl.py", *SMALL, out=tmp_path), tmp_path,
            f"FEDSSL_DIST_TIMEOUT must be a number of seconds from 1 to 1e8 (got '{value}')")
    assert not list(tmp_path.glob("*/"))


def test_bad_input_under_torchrun_is_one_line_from_process_0(tmp_path):
    """Every process refuses the same input, but only process 0 prints it, and it ends with status 2 (torchrun's
    own status stays 1: it reports a child's failure so, whatever the status)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "fedavg_cl.py"), *SMALL, "--lr", "-1", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: --lr must be > 0 (got -1.0)"], proc.stderr
    assert "exitcode  : 2" in proc.stderr and not list(tmp_path.glob("*/"))


def test_resume_notes_say_what_was_used(finished, tmp_path):
    """--out next to --resume is not used (the run goes on in its folder); a copied folder's .lock names the
    original's holder, which may well still run: the note must not say it ended."""
    folder = copy_of(finished, tmp_path)
    (folder / ".lock").write_text("pid 1 (fedavg_cl.py)\n")
    code, _, err = call("fedavg_cl.py", "--resume", folder, out=tmp_path / "elsewhere")
    assert code == 0, err
    assert f"note: --out {tmp_path / 'elsewhere'} is not used: --resume continues in {folder}" in err, err
    assert "left by pid 1 (fedavg_cl.py), which holds no lock on it (it ended, or this folder is a copy)" in err, err
    assert "no longer running" not in err and not (tmp_path / "elsewhere").exists()
