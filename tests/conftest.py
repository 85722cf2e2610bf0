"""Shared test helpers: run a script end to end in a subprocess with a tiny budget."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import common  # noqa: E402  (after the path)

# A budget that runs any method in seconds on two CPU cores.
TINY = ["--train-size", "600", "--test-size", "300", "--clients", "5", "--rounds", "2", "--local-epochs", "1",
        "--batch-size", "32", "--eval-every", "1", "--probe-epochs", "2", "--device", "cpu"]


def run_script(script, *flags, out, timeout=600, env=None, cwd=ROOT):
    """Run `python script flags --out out` in `cwd`; returns (CompletedProcess, run folder or None)."""
    cmd = [sys.executable, str(ROOT / script), *map(str, flags), "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "2", **(env or {})}
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    folders = sorted(Path(out).glob("*/")) if Path(out).exists() else []
    return proc, (folders[-1] if folders else None)


def read_run(folder):
    """summary.json (or None), metrics.jsonl rows and config.json of a run folder."""
    folder = Path(folder)
    summary = json.loads((folder / "summary.json").read_text()) if (folder / "summary.json").exists() else None
    metrics = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return summary, metrics, json.loads((folder / "config.json").read_text())


def assert_complete_run(folder, rounds):
    """The run-folder contract every script shares (see README, Protocol)."""
    folder = Path(folder)
    for name in ("config.json", "partition.json", "metrics.jsonl", "checkpoint.pt", "curves.png",
                 "partition.png", "features.png", "encoder.pt", "summary.json"):
        assert (folder / name).is_file(), f"{name} missing in {folder}"
    summary, metrics, _ = read_run(folder)
    assert summary["complete"] is True
    assert [m["round"] for m in metrics] == list(range(1, rounds + 1))
    assert all(m["images_per_s"] > 0 and m["loss"] == m["loss"] for m in metrics)
    assert "knn_acc" in metrics[-1] and "knn_acc" in metrics[0]       # the first and the last round are evaluated
    assert "knn_acc_1pct" in metrics[-1]                              # the monitor: all labels and 1 %
    for key in common.EVAL_KEYS:           # full-label and few-label numbers, trained, untrained and their gain
        assert 0 <= summary[key] <= 1, key
        assert 0 <= summary["random_encoder"][key] <= 1, key
        assert summary["gain"][key] == summary[key] - summary["random_encoder"][key], key
    assert summary["images_per_s"] > 0 and summary["wall_s"] > 0
    return summary, metrics


def assert_encoder_reproduces(folder, knn_acc, index=None, tol_images=0):
    """common.load_encoder(folder) is in eval mode and, fed through its own .preprocess, gives the kNN
    accuracy the run reported on the run's own data (within tol_images test images)."""
    import torch
    import common
    enc = common.load_encoder(folder, index)
    assert not enc.training
    cfg = json.loads((Path(folder) / "config.json").read_text())["args"]
    args = common.RunArgs(**{k: v for k, v in cfg.items() if k in common.RunArgs.__dataclass_fields__})
    data, _ = common.load_data(args, torch.device("cpu"))
    with torch.no_grad():
        bank, query = enc(enc.preprocess(data.train_x)), enc(enc.preprocess(data.test_x))
    acc = (common.knn_predict(bank, data.train_y, query, data.num_classes) == data.test_y).float().mean().item()
    assert abs(acc - knn_acc) <= tol_images / len(data.test_y) + 1e-7, (acc, knn_acc)
    return enc


def diagnostics(stdout: str) -> dict:
    """{round: its diagnostics (the indented lines under its round line, wrapped lines joined; the one-time
    legend "  (key: meaning; ...)" left out)} for the rounds that print them."""
    out, rnd = {}, None
    for line in stdout.splitlines():
        if line.startswith("round "):
            rnd = int(line.split()[1].split("/")[0])
        elif rnd is not None and len(line) > 2 and line[:2] == "  " and line[2] not in " (":
            out[rnd] = (out.get(rnd, "") + "  " + line.strip()).strip()
        elif not line.startswith("  "):
            rnd = None
    return out


def assert_bad_input(proc, out, needle):
    """Exit 2, one `error:` line on stderr mentioning `needle`, no traceback, no complete run."""
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error:") and needle in lines[-1], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not list(Path(out).glob("*/summary.json"))


@pytest.fixture
def out(tmp_path):
    return tmp_path / "runs"


def resume_to(script, folder, out, **new_args):
    """Turn a finished run into an interrupted one with more rounds to go (edit config.json, drop
    summary.json) and continue it with --resume; returns the CompletedProcess."""
    folder = Path(folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["args"].update(new_args)
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "summary.json").unlink()
    proc, _ = run_script(script, "--resume", folder, out=out)
    return proc


def run_in_process(module, *flags, out, monkeypatch):
    """Run `module.main()` with these flags inside the test process, so a test can wrap the method's
    own functions (monkeypatch.setattr on the module) and watch what the round loop passes them.
    Returns the run folder."""
    import signal
    monkeypatch.setattr(sys, "argv", [module.__file__, *map(str, flags), "--out", str(out)])
    handler = signal.getsignal(signal.SIGINT)      # Run.rounds installs its own Ctrl-C handler
    try:
        module.main()
    finally:
        signal.signal(signal.SIGINT, handler)
    return sorted(Path(out).glob("*/"))[-1]


# A smaller budget for in-process runs (two rounds, few images, a one-epoch probe).
SMALL = ["--train-size", "200", "--test-size", "100", "--rounds", "2", "--local-epochs", "1", "--batch-size", "32",
         "--eval-every", "2", "--probe-epochs", "1", "--device", "cpu"]
