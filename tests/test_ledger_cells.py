"""The claims ledger built up across sessions: the cells a claim needs, the committed cells (results/cells/), the
code fingerprint that marks a cell stale, collecting a finished run, --collect from another output, --dry-run."""
import json
import shlex
import subprocess
import sys

import pytest

from conftest import ROOT

import compare


def test_fingerprint_ignores_docstrings_and_comments_and_follows_project_imports(tmp_path):
    src = {"m.py": '"""doc"""\nimport helper\nimport os\n\ndef f(x):\n    """what f does"""\n    return x + 1  # why\n',
           "helper.py": "import torch\nK = 3\n"}
    read = lambda name: src.get(name)
    fp = compare.code_fingerprint("m.py", read)
    assert set(fp) == {"m.py", "helper.py"}                            # os and torch are not project files
    src["m.py"] = src["m.py"].replace('"""what f does"""', '"""another text"""').replace("# why", "# other")
    assert compare.code_fingerprint("m.py", read) == fp                  # docstrings and comments: same code
    src["m.py"] = src["m.py"].replace("x + 1", "x + 2")
    assert compare.code_fingerprint("m.py", read)["m.py"] != fp["m.py"]
    src["helper.py"] = "import torch\nK = 4\n"                          # a change in an imported module counts
    assert compare.code_fingerprint("m.py", read)["helper.py"] != fp["helper.py"]
    real = compare.code_fingerprint("fedavg_cl.py")
    assert {"fedavg_cl.py", "common.py", "distributed.py"} <= set(real) and "compare.py" not in real


def test_equivalences_chain_to_todays_code():
    assert compare.current("a", "a", {}) and not compare.current("a", "b", {})
    assert compare.current("a", "c", {"a": "b", "b": "c"}) and not compare.current("a", "c", {"a": "b"})
    assert not compare.current("a", "c", {"a": "b", "b": "a"})          # a loop ends, it does not hang


def test_device_and_out_do_not_make_another_cell():
    flags = ["fedavg_cl.py", "--rounds", "2", "--device", "cpu", "--seed", "0"]
    same = ["fedavg_cl.py", "--rounds", "2", "--device", "cuda", "--seed", "0", "--out", "x"]
    assert compare.identity(flags) == compare.identity(same) == ["fedavg_cl.py", "--rounds", "2", "--seed", "0"]
    assert compare.cell_dir(ROOT, "k", "iid", 0, flags) == compare.cell_dir(ROOT, "k", "iid", 0, same)
    assert compare.cell_dir(ROOT, "k", "iid", 0, flags) != compare.cell_dir(ROOT, "k", "iid", 0, flags + ["--lr", "1"])


def test_ledger_cells_are_exactly_what_the_claims_compare_in_each_setting():
    args = compare.parse_args([])
    cells = compare.ledger_cells(args, ROOT / "runs")
    assert len({c.dir for c in cells}) == len(cells)                       # each command once
    for name, st in compare.SETTINGS.items():
        mine = {(c.method, c.partition) for c in cells if c.setting == name}
        need = {tuple(side.split("@")) for c in compare.CLAIMS if name in c.settings for side in (c.a, c.b)}
        assert mine == need, name
        view = compare.setting_args(args, name)
        for c in (c for c in cells if c.setting == name):
            a = compare.common.parse_args(__import__(c.flags[0][:-3]).Args, c.flags[1:])
            assert a.seed == c.seed and a.local_epochs * a.rounds in (view.local_epochs * view.rounds,
                                                                       10 * view.local_epochs * view.rounds)
            for k, v in st.flags.items():                                   # the paper's shape reaches every run
                if k not in ("clients", "rounds", "local_epochs", "eval_every") or not compare.ROWS[c.method].flags:
                    assert getattr(a, k) == v or k == "alpha" and c.partition != "dirichlet", (name, c.name, k)
    assert {c.seed for c in cells} == {0, 1, 2, 3, 4}
    assert all(len(c.settings) == len(set(c.settings)) and set(c.settings) <= set(compare.SETTINGS)
               for c in compare.CLAIMS)
    shapes = {n: compare.setting_args(args, n) for n in compare.SETTINGS}
    assert all(a.rounds * a.local_epochs == 20 for a in shapes.values())   # the same image passes everywhere
    assert (shapes["decssl"].clients, shapes["decssl"].local_epochs, shapes["decssl"].alpha) == (5, 5, 0.02)
    assert (shapes["ccl"].clients, shapes["ccl"].local_epochs) == (5, 5) and shapes["mocosfl"].clients == 5


def fake_run(cell_dir, cell, knn=0.7, fp=None, commit=None):
    """A finished run folder of `cell` as a method script writes it (the files the store reads)."""
    folder = cell_dir / "run-1"
    folder.mkdir(parents=True)
    rand = {m: 0.5 for m in compare.METRICS}
    summary = {**{m: knn for m in compare.METRICS}, "random_encoder": rand,
               "gain": {m: knn - 0.5 for m in compare.METRICS}, "wall_s": 3.0, "images_per_s": 100.0}
    (folder / "summary.json").write_text(json.dumps(summary))
    (folder / "metrics.jsonl").write_text(json.dumps({"round": 1, "knn_acc": knn, "knn_acc_1pct": knn}) + "\n")
    (folder / "config.json").write_text(json.dumps({"command": " ".join(cell.flags + ["--out", str(cell_dir)]),
                                                    "git_commit": commit, "versions": {"torch": "x"}}))
    (folder / "partition.json").write_text(json.dumps({"clients": [{"indices": [1, 2]}, {"indices": [3]}]}))
    (folder / "checkpoint.pt").write_bytes(b"x")
    if fp is not None:
        (cell_dir / "fingerprint.json").write_text(json.dumps([fp]))
    return folder


def one_cell(out, method="fedavg_cl"):
    args = compare.parse_args(["--methods", method, "--partitions", "iid", "--seeds", "0", "--device", "cpu"])
    return compare.make_cells(args, out / "runs")[0]


def test_a_finished_run_is_collected_and_goes_stale_when_its_code_changes(tmp_path, monkeypatch):
    out = tmp_path / "out"
    cell = one_cell(out)
    fp = compare.code_fingerprint("fedavg_cl.py")
    fake_run(cell.dir, cell, knn=0.7, fp=fp)
    status = compare.Status([out / "cells"])
    assert status(cell) == "missing"
    state = compare.plan([cell], out / "cells", status, {}, "CPU test")
    assert state[cell] == "done"
    rec = json.loads((out / "cells" / "fedavg_cl" / cell.tag / "cell.json").read_text())
    assert rec["knn_acc"] == 0.7 and rec["fingerprint"] == fp and rec["device"] == "CPU test"
    assert rec["partition_hash"] and identity_of(rec) == compare.identity(cell.flags)
    assert sorted(p.name for p in (out / "cells" / "fedavg_cl" / cell.tag).iterdir()) == \
        ["cell.json", "config.json", "metrics.jsonl", "summary.json"]               # never the checkpoint
    assert compare.read_cell(dataclasses_replace(cell, out / "elsewhere"), [out / "cells"])["knn_acc"] == 0.7
    # the code changes: the committed cell is stale, the old run folder is set aside so that the cell runs again
    monkeypatch.setattr(compare, "code_fingerprint", lambda script, read=None: {**fp, "common.py": "changed"})
    status = compare.Status([out / "cells"])
    assert status(cell) == "stale"
    state = compare.plan([cell], out / "cells", status, {}, "CPU test")
    assert state[cell] == "stale" and not cell.dir.exists() and list(cell.dir.parent.glob(cell.tag + ".stale-*"))
    assert compare.row_lines([cell], state) == ["  fedavg_cl [default]: 1 cells, 0 committed, 1 to run (1 stale: "
                                                "code changed; --restamp keeps those it proves unchanged)"]
    # a refactor proven bit-identical (equivalent.json) keeps it
    new = compare.fingerprint_id({**fp, "common.py": "changed"})
    monkeypatch.setattr(compare, "EQUIVALENT", tmp_path / "equivalent.json")
    (tmp_path / "equivalent.json").write_text(json.dumps({compare.fingerprint_id(fp): {"to": new}}))
    assert compare.Status([out / "cells"])(cell) == "done"


def identity_of(rec):
    return compare.identity(shlex.split(rec["command"])[1:])


def dataclasses_replace(cell, runs):
    import dataclasses
    return dataclasses.replace(cell, dir=runs / cell.method / cell.tag)


def test_a_run_resumed_on_other_code_is_not_collected(tmp_path):
    out = tmp_path / "out"
    cell = one_cell(out)
    fp = compare.code_fingerprint("fedavg_cl.py")
    fake_run(cell.dir, cell, fp=fp)
    (cell.dir / "fingerprint.json").write_text(json.dumps([fp, {**fp, "fedavg_cl.py": "edited"}]))
    state = compare.plan([cell], out / "cells", compare.Status([out / "cells"]), {}, "CPU")
    assert state[cell] == "missing" and not (out / "cells").exists()


def test_collect_takes_runs_of_an_older_compare_from_another_folder_by_their_command(tmp_path):
    out, other = tmp_path / "out", tmp_path / "worktree-results"
    cell = one_cell(out)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    # an older compare.py: another tag, no fingerprint.json; the code is read at the run's commit
    fake_run(other / "runs" / "fedavg_cl" / "iid-s0-0ldta9", cell, knn=0.66, commit=head)
    index = compare.source_index([other])
    assert list(index.values()) == [[other / "runs" / "fedavg_cl" / "iid-s0-0ldta9"]]
    status = compare.Status([out / "cells"])
    want = compare.code_fingerprint("fedavg_cl.py", compare.git_reader(head))
    state = compare.plan([cell], out / "cells", status, index, "CPU")
    # collected with the code of its commit; done when that is today's code, else stale (it waits for --restamp)
    assert state[cell] == ("done" if compare.fingerprint_id(want) == status.fid("fedavg_cl.py") else "stale")
    rec = json.loads((out / "cells" / "fedavg_cl" / cell.tag / "cell.json").read_text())
    assert rec["knn_acc"] == 0.66 and rec["fingerprint_from"].startswith("git commit " + head[:7])
    assert rec["fingerprint"] == want and (other / "runs" / "fedavg_cl" / "iid-s0-0ldta9").is_dir()   # left alone


def test_dry_run_lists_every_row_and_runs_nothing(tmp_path, capsys):
    compare.main(["--setting", "ccl", "--seeds", "0,1", "--device", "cpu", "--dry-run", "--out", str(tmp_path / "o")])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "14 cells: 0 committed, 0 stale, 14 missing (--dry-run: nothing is run)"
    assert "  feature_fusion [ccl]: 4 cells, 0 committed, 4 to run" in lines
    assert sum(line.startswith("  missing: ") for line in lines) == 14
    assert not (tmp_path / "o").exists()


def test_committed_cells_are_whole_and_belong_to_a_ledger_cell():
    cells = {" ".join(compare.identity(c.flags)): c for c in compare.ledger_cells(compare.parse_args([]), ROOT)}
    found = sorted(compare.STORE.glob("*/*/cell.json"))
    for path in found:
        rec = json.loads(path.read_text())
        cell = cells.get(" ".join(identity_of(rec)))
        assert cell is not None, f"{path}: its command is no cell of the ledger any more"
        assert (path.parent.parent.name, path.parent.name) == (cell.method, cell.tag), path
        assert rec["fingerprint_id"] == compare.fingerprint_id(rec["fingerprint"]) and rec["commit"], path
        assert all(rec[m] is not None for m in compare.METRICS) and rec["device"] and rec["date"], path
        assert not list(path.parent.glob("*.pt")), path
    assert not list(compare.STORE.glob("*/*.tmp*")) and not list(compare.STORE.glob("*/*.old*"))


def test_gpu_command_dry_runs_on_the_cpu_and_passes_flags_through(tmp_path):
    env = {**__import__("os").environ, "LEDGER_DEVICE": "cpu", "PYTHON": sys.executable, "OUT": str(tmp_path)}
    proc = subprocess.run(["bash", str(ROOT / "gpu_ledger.sh"), "--setting", "mocosfl", "--seeds", "0", "--dry-run",
                           "--out", str(tmp_path / "o")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "7 cells: 0 committed, 0 stale, 7 missing (--dry-run: nothing is run)", lines[:3]
    assert "  mocosfl_c1000 [mocosfl]: 1 cells, 0 committed, 1 to run" in lines
    assert not (tmp_path / "o").exists()


def test_proof_command_is_the_rows_own_flags_at_a_tiny_budget():
    args = compare.parse_args([])
    cells = {(c.method, c.setting): c for c in compare.ledger_cells(args, ROOT / "runs")}
    flags = compare.proof_command(cells[("dec_ssl_featarc", "decssl")], args)
    a = compare.common.parse_args(__import__("dec_ssl").Args, flags[1:])
    assert (a.featarc, a.clients, a.local_epochs, a.alpha, a.train_size, a.rounds, a.seed, a.device) == \
        (True, 5, 5, 0.02, 600, 2, 0, "cpu")
    big = compare.proof_command(cells[("mocosfl_c1000", "default")], args)
    b = compare.common.parse_args(__import__("mocosfl").Args, big[1:])
    assert (b.clients, b.train_size) == (1000, 10000)                     # 10 images for every client


def test_restamp_keeps_cells_only_when_every_row_gives_the_same_numbers(tmp_path, monkeypatch):
    store = tmp_path / "cells"
    monkeypatch.setattr(compare, "STORE", store)
    monkeypatch.setattr(compare, "EQUIVALENT", store / "equivalent.json")
    args = compare.parse_args(["--setting", "default"])
    cells = [c for c in compare.ledger_cells(args, tmp_path / "runs") if c.flags[0] == "fedavg_cl.py" and c.seed == 0]
    assert {c.method for c in cells} == {"fedavg_cl", "centralized"}
    old = {"fedavg_cl.py": "old"}
    for c in cells:
        compare.write_cell(store, c, {"command": "python " + shlex.join(c.flags), **{m: 0.5 for m in compare.METRICS}},
                           {"fingerprint": old, "fingerprint_id": compare.fingerprint_id(old), "commit": "abc1234"})
    monkeypatch.setattr(compare, "git_reader", lambda commit: (lambda name: None))     # the code at the commit: old
    monkeypatch.setattr(compare, "code_fingerprint", lambda script, read=None: old if read is not None
                        else {"fedavg_cl.py": "new"})
    monkeypatch.setattr(compare.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 0, "", ""))
    runs = []

    def numbers(tree, flags, out):
        runs.append((tree, flags[0]))
        return {"metrics": [{"knn_acc": 0.5}], "summary": {"linear_acc": 0.6 if differ and tree != ROOT else 0.5}}
    monkeypatch.setattr(compare, "proof_numbers", numbers)
    state = {c: "stale" for c in cells}
    differ = True
    lines = compare.restamp(cells, state, args)
    assert len(lines) == 1 and "not proven" in lines[0] and not (store / "equivalent.json").exists()
    differ, runs[:] = False, []
    lines = compare.restamp(cells, state, args)
    assert "proven bit-identical on 2 row(s); 2 cell(s) kept" in lines[0] and len(runs) == 4    # both rows, both trees
    equiv = json.loads((store / "equivalent.json").read_text())
    assert equiv[compare.fingerprint_id(old)]["to"] == compare.fingerprint_id({"fedavg_cl.py": "new"})
    assert compare.Status([store])(cells[0]) == "done"


def test_readme_quotes_the_committed_ledger_and_tables_verbatim():
    import re
    blocks = compare.readme_blocks((ROOT / "README.md").read_text())
    assert set(blocks) == {"results/claims.md"}
    for name, text in blocks.items():
        body = re.sub(r"\]\((results[^)/]*\.png)\)", r"](results/\1)", (ROOT / name).read_text())
        assert text == body, f"README's block of {name} is not the file: python compare.py --report --readme"
    assert "## Reading, per paper" in blocks["results/claims.md"]


def test_paste_into_readme_replaces_only_the_blocks(tmp_path):
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "a.md").write_text("new ![fig](results.png)\n")
    readme = tmp_path / "README.md"
    readme.write_text("top\n<!-- begin results/a.md -->\nold\n<!-- end results/a.md -->\nbottom\n")
    compare.paste_into_readme(readme, tmp_path)
    assert readme.read_text() == ("top\n<!-- begin results/a.md -->\nnew ![fig](results/results.png)\n"
                                  "<!-- end results/a.md -->\nbottom\n")


def test_an_interrupted_run_of_other_code_is_set_aside_not_resumed(tmp_path):
    out = tmp_path / "out"
    cell = one_cell(out)
    folder = fake_run(cell.dir, cell, fp={"fedavg_cl.py": "yesterday"})
    (folder / "summary.json").unlink()                                     # interrupted: a checkpoint, no summary
    state = compare.plan([cell], out / "cells", compare.Status([out / "cells"]), {}, "CPU")
    assert state[cell] == "missing" and not cell.dir.exists() and list(cell.dir.parent.glob(cell.tag + ".stale-*"))


def test_plot_overlays_any_run_folders_and_refuses_what_is_not_one(tmp_path, capsys):
    cell = one_cell(tmp_path)
    a, b = fake_run(tmp_path / "a", cell, knn=0.6), fake_run(tmp_path / "b", cell, knn=0.7)
    compare.main(["--plot", f"{a},{b}", "--out", str(tmp_path / "fig")])
    assert (tmp_path / "fig" / "overlay.png").stat().st_size > 5000 and "overlay.png" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        compare.main(["--plot", f"{a},{tmp_path}", "--out", str(tmp_path / "fig2")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "not a run folder" in err[0] and not (tmp_path / "fig2").exists()


def test_image_passes_scale_the_estimate():
    assert compare.passes(["x.py", "--train-size", "10000", "--rounds", "20", "--local-epochs", "1"]) == 1
    assert compare.passes(["x.py", "--train-size", "1000", "--rounds", "2", "--rounds", "4"]) == 0.02   # last wins


def test_a_job_of_more_than_an_hour_needs_yes(tmp_path, monkeypatch, capsys):
    ran = []
    monkeypatch.setattr(compare, "estimate", lambda todo, stores, jobs: (7200.0, "about 2.0 h with 1 run(s) at once"))
    monkeypatch.setattr(compare, "run_all", lambda todo, jobs, done: ran.append(len(todo)) or [])
    flags = ["--methods", "fedavg_cl", "--partitions", "iid", "--seeds", "0", "--device", "cpu",
             "--out", str(tmp_path / "o")]
    with pytest.raises(SystemExit) as e:
        compare.main(flags)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "add --yes" in err and "about 2.0 h" in err and ran == []
    compare.main(flags[:-1] + [str(tmp_path / "o2"), "--yes"])          # (the first call still holds o's lock)
    assert ran == [1]


def test_image_passes_count_the_clients_a_round_trains():
    assert compare.passes(["dec_ssl.py", "--participation", "0.5"]) == 0.5
    assert compare.passes(["mocosfl.py", "--clients", "1000", "--rounds", "200"]) == pytest.approx(1.0)   # pool of 100
    assert compare.passes(["mocosfl.py", "--clients", "100", "--rounds", "20"]) == 1.0


def test_a_table_that_cannot_be_written_is_one_error_line_and_the_old_file_stays(tmp_path, monkeypatch, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "claims.md").write_text("old ledger")
    real = compare.common.write_atomic

    def full(path, data):
        if str(path).endswith("claims.md"):
            raise compare.common.WriteError(f"cannot write {path} (the disk is full)")
        real(path, data)
    monkeypatch.setattr(compare.common, "write_atomic", full)
    with pytest.raises(SystemExit) as e:
        compare.main(["--report", "--setting", "ccl", "--seeds", "0", "--device", "cpu", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 1 and len(err) == 1 and "claims.md (the disk is full)" in err[0], err
    assert (out / "claims.md").read_text() == "old ledger" and not list(out.glob(".*.tmp"))


def test_a_finished_run_of_older_code_is_kept_stale_for_restamp_not_dropped(tmp_path):
    out, other = tmp_path / "out", tmp_path / "worktree-results"
    cell = one_cell(out)
    old = {"fedavg_cl.py": "older code", "common.py": "x"}
    fake_run(other / "runs" / "fedavg_cl" / cell.tag, cell, knn=0.61, fp=old)
    state = compare.plan([cell], out / "cells", compare.Status([out / "cells"]), compare.source_index([other]), "CPU")
    assert state[cell] == "stale"
    rec = json.loads((out / "cells" / "fedavg_cl" / cell.tag / "cell.json").read_text())
    assert rec["fingerprint"] == old and rec["knn_acc"] == 0.61
