"""What a user sees: load_encoder, features.png with alignment/uniformity, curves.png, partition.png,
the console's diagnostics and closing lines, and the bundled data found from any working directory."""
import dataclasses
import itertools
import json
import math
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import common
import dec_ssl
import fed_cluster
import fedavg_cl
import gossip_cl
import local_cl
import mocosfl
import neighborhood_match
from conftest import (ROOT, SMALL, TINY, assert_complete_run, assert_encoder_reproduces, diagnostics, run_in_process,
                      run_script)


# --- alignment, uniformity, PCA against brute-force references ------------------------------------

def test_alignment_and_uniformity_match_loop_references():
    torch.manual_seed(0)
    z1, z2 = torch.randn(7, 5), torch.randn(7, 5)
    unit = lambda v: v / v.norm()
    align = sum(((unit(a) - unit(b)) ** 2).sum().item() for a, b in zip(z1, z2)) / 7
    pairs = list(itertools.combinations(range(7), 2))
    uniform = math.log(sum(math.exp(-2 * ((unit(z1[i]) - unit(z1[j])) ** 2).sum().item()) for i, j in pairs) / len(pairs))
    assert common.alignment(z1, z2) == pytest.approx(align, rel=1e-5)
    assert common.uniformity(z1) == pytest.approx(uniform, rel=1e-5)
    assert common.alignment(z1, 3 * z1) == pytest.approx(0.0, abs=1e-6)          # scale does not matter
    assert common.uniformity(z1[:1].expand(5, 5)) == pytest.approx(0.0, abs=1e-6)  # collapse: log 1


def test_pca_2d_matches_the_covariance_eigenvectors():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(200, 6, generator=g) @ torch.diag(torch.tensor([5.0, 3.0, 1.0, 0.5, 0.2, 0.1])) + 2.0
    mean, dirs, share = common.pca_2d(x)
    vals, vecs = np.linalg.eigh(np.cov(x.numpy().T))              # ascending eigenvalues
    for k in range(2):
        assert abs(float(dirs[k].numpy() @ vecs[:, -1 - k])) == pytest.approx(1.0, abs=1e-6)   # same axis, any sign
        assert share[k] == pytest.approx(vals[-1 - k] / vals.sum(), rel=1e-6)
    assert torch.allclose(mean, x.double().mean(0))


# --- plots: what is drawn ---------------------------------------------------------------------------

def test_curves_show_the_untrained_baseline_integer_rounds_and_a_full_title(tmp_path):
    hist = [{"round": r, "loss": 3.0 - 0.1 * r, **({"knn_acc": 0.70 + 0.01 * r} if r in (1, 3) else {})}
            for r in range(1, 4)]                                  # 3 rounds: matplotlib alone would tick 0.5, 1.0, ...
    title = "mocosfl: fmnist, 2 classes per client, 10 clients, seed 3"
    drawn = common.plot_curves(hist, tmp_path / "c.png", title, baseline=0.65)
    assert (tmp_path / "c.png").stat().st_size > 5000
    assert drawn["ylim"][0] <= 0.65 <= drawn["ylim"][1]                # the baseline is on the axis
    assert any("untrained network (0.650)" in label for label in drawn["labels"])
    assert drawn["xticks"] and all(float(t).is_integer() for t in drawn["xticks"])
    assert drawn["title"] == title
    one = common.plot_curves(hist[:1], tmp_path / "d.png", title, baseline=0.65)     # a one-round run
    assert one["xticks"] == [1.0]


def test_title_names_method_partition_clients_and_seed():
    args = common.RunArgs(partition="dirichlet", alpha=0.1, clients=10, seed=4)
    assert common.Run.title(SimpleNamespace(args=args, script="dec_ssl")) == \
        "dec_ssl: fmnist, Dirichlet alpha 0.1, 10 clients, seed 4"
    args.clients = 1
    assert "centralized, 1 client," in common.Run.title(SimpleNamespace(args=args, script="fedavg_cl"))


def test_partition_plot_names_classes_and_labels_clients(tmp_path):
    counts = np.arange(50).reshape(5, 10)
    drawn = common.plot_partition(counts, tmp_path / "p.png", "t", common.CLASS_NAMES["fmnist"])
    assert drawn["xticklabels"][0] == "T-shirt/top" and drawn["xticklabels"][9] == "Ankle boot"
    assert drawn["yticklabels"] == ["0", "1", "2", "3", "4"]                   # every client
    assert (tmp_path / "p.png").stat().st_size > 5000
    many = common.plot_partition(np.ones((1000, 100), dtype=int), tmp_path / "q.png", "t", None)
    assert many["yticklabels"][0] == "0" and many["yticklabels"][-1] == "999" and len(many["yticklabels"]) <= 41
    assert many["xticklabels"] == [str(k) for k in range(0, 100, 10)]           # CIFAR-100: numbers


def test_first_and_last_round_are_evaluated_so_mocosfl_default_draws_a_line():
    args = mocosfl.Args()
    args.check()                                                 # resolves the code's rule: rounds, pool
    run = SimpleNamespace(args=args)
    evals = [r for r in range(1, args.rounds + 1) if common.Run.is_eval_round(run, r)]
    assert args.eval_every > args.rounds and evals == [1, args.rounds]


# --- console ---------------------------------------------------------------------------------------

def test_final_report_gives_the_gain_and_warns_when_training_did_not_help():
    rand = {"knn_acc": 0.70, "linear_acc": 0.80}
    good = common.final_report({"knn_acc": 0.75, "linear_acc": 0.82}, rand)
    assert good[2].split()[:5] == ["gain:", "kNN", "+0.0500", "linear", "+0.0200"]
    assert not any(l.startswith("warning:") for l in good)
    bad = common.final_report({"knn_acc": 0.6990, "linear_acc": 0.82}, rand)
    assert bad[-1].startswith("warning:") and "kNN -0.0010" in bad[-1] and "linear" not in bad[-1].split("(")[1]
    equal = common.final_report({"knn_acc": 0.75, "linear_acc": 0.80}, rand)
    assert equal[-1].startswith("warning:") and "linear +0.0000" in equal[-1]
    no_probe = common.final_report({"knn_acc": 0.75, "linear_acc": float("nan")}, {**rand, "linear_acc": float("nan")})
    assert not any(l.startswith("warning:") for l in no_probe)


@pytest.mark.parametrize("script", ["fedavg_cl.py", "gossip_cl.py"])   # gossip_cl logs numbers every round
def test_diagnostics_are_printed_under_evaluation_rounds_only(script, tmp_path):
    # --rounds 3 --eval-every 5: rounds 1 and 3 are evaluation rounds, round 2 is not
    proc, _ = run_script(script, *TINY, "--rounds", "3", "--eval-every", "5", out=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.splitlines()
    after = {int(l.split()[1].split("/")[0]): out[i + 1] if i + 1 < len(out) else ""
             for i, l in enumerate(out) if l.startswith("round ")}
    assert sorted(after) == [1, 2, 3]
    for rnd in (1, 3):                   # the evaluation's and the method's own numbers, indented under the round
        assert after[rnd].startswith("  "), out
    assert not after[2].startswith("  "), out
    shown = diagnostics(proc.stdout)
    assert sorted(shown) == [1, 3] and all("knn_acc_1pct" in shown[r] for r in shown), out


def test_format_metrics_is_short_gives_bytes_in_mib_and_wraps_between_pairs():
    line = common.format_metrics({"fn_ratio_local": 0.498765, "model_bytes_up": 123456.0, "assign": [0, 1, -1] * 5,
                                  "lr": 1e-3})
    assert line == ("fn_ratio_local 0.4988  model_bytes_up 0.118 MiB  assign [0, 1, -1, 0, 1, -1, 0, 1, -1, 0, ...]"
                    "  lr 0.001")
    many = {f"key_{i}": 0.5 + i for i in range(30)}
    wrapped = common.format_metrics(many, width=60).splitlines()
    assert len(wrapped) > 1 and all(len(l) <= 60 for l in wrapped)
    assert "  ".join(wrapped) == common.format_metrics(many)        # the same pairs, split only between them


def test_the_console_explains_the_loss_and_the_diagnostics_once_in_short_lines(tmp_path, monkeypatch, capsys):
    import feature_fusion
    run_in_process(feature_fusion, *SMALL, "--eval-every", "1", out=tmp_path, monkeypatch=monkeypatch)
    out = capsys.readouterr().out
    lines = out.splitlines()
    first = next(i for i, l in enumerate(lines) if l.startswith("round 1/"))
    note = " ".join(l.strip() for l in lines[:first] if l.startswith(("loss: ", "      ")))
    assert note.startswith("loss: L_FF, InfoNCE against the local queue") and note.endswith("not divergence")
    assert all(len(l) <= common.WIDTH for l in lines[:first] if l.startswith(("loss: ", "      ")))
    shown = diagnostics(out)
    assert sorted(shown) == [1, 2] and "upload_bytes" in shown[2] and "MiB" in shown[2]
    indented = [l for l in lines if l.startswith("  ")]
    assert indented and all(len(l) <= common.WIDTH for l in indented)     # no line that wraps in a terminal
    legend = " ".join(l.strip() for l in lines if l.startswith("  (") or l.startswith("   "))
    assert out.count("  (knn_acc_1pct: ") == 1 and lines.index(next(l for l in lines if l.startswith("  ("))) < \
        lines.index(next(l for l in lines if l.startswith("round 2/")))          # once, under round 1
    for key in ("pos_beats_queue: share of positives above every queue row", "remote_mass: softmax mass",
                "alignment: ", "upload_bytes: this round's uploads"):
        assert key in legend, legend


def test_fed_cluster_says_stage_1_done_under_its_round_and_curves_mark_stage_2(tmp_path, monkeypatch, capsys):
    drawn = {}
    real = common.plot_curves
    monkeypatch.setattr(common, "plot_curves", lambda *a, **k: drawn.update(real(*a, **k)) or drawn)
    run_in_process(fed_cluster, *SMALL, out=tmp_path, monkeypatch=monkeypatch)   # 2 rounds: stage 2 is round 2
    lines = capsys.readouterr().out.splitlines()
    at = lambda prefix: next(i for i, l in enumerate(lines) if l.startswith(prefix))
    assert at("round 1/2") < at("stage 1 done") < at("round 2/2")
    assert "steps up where stage 2 starts" in " ".join(l.strip() for l in lines[at("loss: "):at("round 1/2")])
    assert drawn["stage_starts"] == [2]


def test_curves_mark_where_the_stage_changes(tmp_path):
    hist = [{"round": r, "loss": 1.0 + (r > 3), "stage": 1 + (r > 3), "knn_acc": 0.5} for r in range(1, 7)]
    assert common.plot_curves(hist, tmp_path / "c.png", "t", baseline=0.4)["stage_starts"] == [4]
    assert common.plot_curves(hist[:3], tmp_path / "d.png", "t", baseline=0.4)["stage_starts"] == []


def test_gossip_says_which_model_is_the_headline_and_which_is_in_the_files(tmp_path, monkeypatch, capsys):
    titles = []
    real = common.plot_features
    monkeypatch.setattr(common, "plot_features", lambda *a, **k: titles.append(a[6]) or real(*a, **k))
    folder = run_in_process(gossip_cl, *SMALL, out=tmp_path, monkeypatch=monkeypatch)
    out = capsys.readouterr().out
    summary = json.loads((folder / "summary.json").read_text())
    headline = next(l for l in out.splitlines() if l.startswith("headline: "))
    assert headline == (f"headline: the mean over the 10 client models; the consensus (average) model: kNN "
                        f"{summary['consensus']['knn_acc']:.4f}  linear {summary['consensus']['linear_acc']:.4f} "
                        f"(encoder.pt, features.png)")
    assert titles and "the consensus model (the average of the clients'); the headline numbers are the mean " \
        "over the client models" in titles[0]
    assert_encoder_reproduces(folder, summary["consensus"]["knn_acc"])   # encoder.pt is the consensus model


# --- --help ----------------------------------------------------------------------------------------

def help_text(module, *argv, capsys) -> str:
    """What `python module.py ARGV --help` prints, with argparse's line wrapping undone."""
    with pytest.raises(SystemExit) as stop:
        common.parse_args(module.Args, [*argv, "--help"])
    assert stop.value.code == 0
    return " ".join(capsys.readouterr().out.split())


def test_help_with_preset_paper_shows_the_values_the_run_would_take(capsys):
    plain, paper = help_text(fedavg_cl, capsys=capsys), help_text(fedavg_cl, "--preset", "paper", capsys=capsys)
    assert "communication rounds (default: 20)" in plain and "from --preset paper" not in plain
    assert "communication rounds (default: 100, from --preset paper)" in paper
    assert "client learning rate (default: 0.032, from --preset paper)" in paper
    assert "--dataset {fmnist,cifar10,cifar100} fmnist (bundled) | cifar10 | cifar100 (default: cifar10, from" in paper
    assert "(--help shows --preset paper's values as the defaults)" in paper
    assert "--seed SEED seed for partition, initialisation, augmentation and sampling (default: 0)" in paper


TEXT_FLAGS = [(m, f) for m in (fedavg_cl, local_cl, gossip_cl, neighborhood_match, fed_cluster, dec_ssl, mocosfl)
              for f in dataclasses.fields(m.Args) if f.type in ("str", str) and " | " in common._field_docs(m.Args)[f.name]]


@pytest.mark.parametrize("module, field", TEXT_FLAGS, ids=lambda v: getattr(v, "name", getattr(v, "__name__", "")))
def test_usage_lists_the_values_of_every_text_flag_and_check_accepts_only_those(module, field, capsys):
    values = module.Args.CHOICES[field.name]
    usage = help_text(module, capsys=capsys).split(" options: ")[0]
    flag = "--" + field.name.replace("_", "-")
    assert f"[{flag} {{{','.join(values)}}}]" in usage
    with pytest.raises(common.UserError, match=f"{flag} must be one of {', '.join(values)} \\(got 'nope'\\)"):
        module.Args(**{field.name: "nope"}).check()


@pytest.mark.parametrize("module", [local_cl, gossip_cl])
def test_a_flag_a_method_refuses_says_so_in_its_help(module, capsys):
    assert "--participation PARTICIPATION must be 1.0 here" in help_text(module, capsys=capsys)
    with pytest.raises(common.UserError, match="--participation"):
        module.Args(participation=0.5).check()


def test_a_holdout_run_says_its_queries_are_validation_images(tmp_path, monkeypatch, capsys):
    folder = run_in_process(fedavg_cl, *SMALL, "--holdout", "100", out=tmp_path, monkeypatch=monkeypatch)
    printed = capsys.readouterr().out
    assert "200 train / 100 validation images held out of the training set (--holdout; the test set is not used)" \
        in printed and "test images" not in printed
    assert "(accuracies on the 100 validation images of --holdout, not on the test set)" in printed
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["eval_split"] == ("validation: 100 training images held out by --holdout 100; "
                                     "the test set was not used")
    plain = run_in_process(fedavg_cl, *SMALL, out=tmp_path / "plain", monkeypatch=monkeypatch)
    assert "eval_split" not in json.loads((plain / "summary.json").read_text())     # test-set runs: as before
    assert "200 train / 100 test images" in capsys.readouterr().out


# --- the commands a script prints run as typed -------------------------------------------------------

def test_a_printed_command_names_the_interpreter_and_script_that_run_it(monkeypatch, tmp_path):
    venv = str(ROOT / ".venv" / "bin" / "python")
    monkeypatch.setattr(common.sys, "executable", venv)
    monkeypatch.chdir(ROOT)
    for on_path in (None, "/usr/bin/python"):      # after `make run`: no python on PATH, or one without torch
        monkeypatch.setattr(common.shutil, "which", lambda name: on_path)
        assert common.shell_command("fedavg_cl.py", "--resume", "runs/a b") == \
            ".venv/bin/python fedavg_cl.py --resume 'runs/a b'"
    monkeypatch.setattr(common.shutil, "which", lambda name: venv)        # after `source .venv/bin/activate`
    assert common.shell_command("fedavg_cl.py", "--resume", "runs/x") == "python fedavg_cl.py --resume runs/x"
    monkeypatch.chdir(tmp_path)                                           # started from another folder
    assert common.shell_command("fedavg_cl.py") == shlex.join(["python", str(ROOT / "fedavg_cl.py")])
    monkeypatch.setattr(common.shutil, "which", lambda name: None)
    assert common.shell_command("fedavg_cl.py") == shlex.join([venv, str(ROOT / "fedavg_cl.py")])


def test_a_printed_command_names_the_file_that_was_started_even_outside_the_repository(tmp_path):
    """A student's own method file elsewhere (here: one that refuses torchrun) is the file the command names."""
    mine = tmp_path / "my_method.py"
    mine.write_text(f"import sys\nsys.path.insert(0, {str(ROOT)!r})\nimport common\n\n\n"
                    "class Args(common.RunArgs):\n    pass\n\n\ncommon.start(Args)\n")
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": "0", "OMP_NUM_THREADS": "1"}     # as torchrun starts it
    proc = subprocess.run([sys.executable, str(mine)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().endswith(f"run it as one process: {common.shell_command(mine)} ...")
    assert str(mine) in proc.stderr and str(ROOT / "my_method.py") not in proc.stderr


def test_the_resume_command_printed_after_ctrl_c_runs_as_typed(tmp_path):
    """From another folder, with a `python` on PATH that has no torch: the printed command finishes the run."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "python").write_text("#!/bin/sh\necho 'this python has no torch' >&2\nexit 99\n")
    (fake / "python").chmod(0o755)
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    env = {**os.environ, "PATH": f"{fake}:/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    child = f"""
import os, signal, sys
sys.path.insert(0, {str(ROOT)!r}); sys.argv = [{str(ROOT / "fedavg_cl.py")!r}, *{SMALL!r}, "--out", "runs"]
import common, fedavg_cl
real = common.Run.two_views
def ctrl_c_once(*a, **k):
    if not getattr(ctrl_c_once, "done", False):
        ctrl_c_once.done = True
        os.kill(os.getpid(), signal.SIGINT)       # Ctrl-C in round 1: the round finishes, is saved, exit 130
    return real(*a, **k)
common.Run.two_views = ctrl_c_once
fedavg_cl.main()
"""
    stopped = subprocess.run([sys.executable, "-c", child], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert stopped.returncode == 130, stopped.stderr
    hint = stopped.stderr.split("resume with: ")[1].splitlines()[0]
    assert hint.startswith(shlex.join([sys.executable, str(ROOT / "fedavg_cl.py")]) + " --resume runs/fedavg_cl-")
    resumed = subprocess.run(["bash", "-c", hint], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout and next(cwd.glob("runs/*/summary.json")).is_file()


# --- data found from anywhere; a user's relative path stays relative ---------------------------------

def test_data_dir_default_is_the_repository_and_a_given_path_is_kept():
    assert common.data_path(common.RunArgs()) == ROOT / "data"
    assert common.data_path(common.RunArgs(data_dir="mine")) == Path("mine")


# --- one tiny fedavg run, started from another folder -------------------------------------------------

@pytest.fixture(scope="module")
def elsewhere(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("elsewhere")
    flags = [*TINY, "--train-size", "300", "--test-size", "100", "--rounds", "1", "--probe-epochs", "1"]
    proc, folder = run_script("fedavg_cl.py", *flags, out=cwd / "runs", cwd=cwd)
    return proc, folder


def test_a_script_run_from_another_folder_finds_the_bundled_data(elsewhere):
    proc, folder = elsewhere
    assert proc.returncode == 0, proc.stderr
    summary, metrics = assert_complete_run(folder, rounds=1)
    assert {"alignment", "uniformity"} <= set(metrics[0]) and 0 <= metrics[0]["alignment"] <= 4
    gain = re.search(r"^gain: +kNN ([-+]\d\.\d{4})  linear ([-+]\d\.\d{4})", proc.stdout, re.M)
    assert gain and float(gain[1]) == pytest.approx(summary["knn_acc"] - summary["random_encoder"]["knn_acc"], abs=1e-4)
    assert ("warning:" in proc.stderr) == (float(gain[1]) <= 0 or float(gain[2]) <= 0)


def test_loaded_encoder_reproduces_the_runs_knn_and_the_readme_example_runs(elsewhere):
    proc, folder = elsewhere
    assert proc.returncode == 0, proc.stderr
    enc = assert_encoder_reproduces(folder, json.loads((folder / "summary.json").read_text())["knn_acc"])
    assert torch.load(folder / "encoder.pt", weights_only=True)["per"] == "client"
    x = torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8)
    assert torch.equal(enc.preprocess(x), enc.preprocess(x.float() / 255))      # uint8 or [0, 1] floats
    with pytest.raises(ValueError, match="N x 1 x H x W"):
        enc.preprocess(torch.zeros(4, 3, 28, 28))
    snippet = re.search(r"```python\n(.*?load_encoder.*?)```", (ROOT / "README.md").read_text(), re.S)[1]
    snippet = re.sub(r'load_encoder\("[^"]*"\)', f'load_encoder("{folder}")', snippet)
    g = torch.Generator().manual_seed(0)
    ns = {"my_images": torch.randint(0, 256, (120, 1, 28, 28), dtype=torch.uint8, generator=g),
          "my_labels": torch.arange(120) % 10}
    exec(snippet, ns)
    assert ns["feats"].shape == (120, 128) and 0 <= ns["accuracy"] <= 1
