"""compare.py and benchmark.py: the shared budget reaches every method, the table's arithmetic, the whole
pipeline end to end (tiny budget), resuming, and the benchmark's JSON. No test asserts a time."""
import importlib
import json
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT

import benchmark
import common
import compare

# the smallest budget that still runs every method (3 clients, 1 round of 100 images each); one column
TINY_COMPARE = ["--quick", "--train-size", "300", "--test-size", "200", "--clients", "3", "--rounds", "1",
                "--batch-size", "16", "--probe-epochs", "1", "--device", "cpu"]


def run(tool, *flags):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / tool), *map(str, flags)], cwd=ROOT, capture_output=True,
                          text=True, timeout=900, env=env)


def parsed(flags):
    """The Args a method script builds from a compare.py command line (its own parser and checks)."""
    mod = importlib.import_module(flags[0].removesuffix(".py"))
    args = common.parse_args(mod.Args, flags[1:])
    args.check()
    return args


@pytest.mark.parametrize("partition", ["iid", "classes", "dirichlet"])
def test_every_row_gets_the_same_budget_partition_and_evaluation(partition):
    args = compare.parse_args(["--rounds", "7", "--local-epochs", "3", "--clients", "20", "--alpha", "0.3",
                               "--classes-per-client", "3", "--train-size", "5000", "--device", "cpu"])
    args.check()
    got = {key: parsed(compare.method_flags(key, args, partition, seed=4)) for key in compare.ROWS}
    for key, a in got.items():
        assert (a.rounds, a.local_epochs, a.seed, a.train_size, a.eval_every, a.probe_epochs, a.encoder) == \
            (7, 3, 4, 5000, args.eval_every, args.probe_epochs, "cnn"), key
        if key == "centralized":
            assert a.clients == 1
            continue
        assert (a.clients, a.partition) == (20, partition), key
        assert (a.alpha, a.classes_per_client) == (0.3 if partition == "dirichlet" else 0.1,
                                                   3 if partition == "classes" else 2), key
    assert got["mocosfl"].batch_size == 100 // 20                  # its own rule: ~100 images per server step
    assert {got[k].batch_size for k in compare.ROWS if k != "mocosfl"} == {args.batch_size}
    assert got["dec_ssl_featarc"].featarc and not got["dec_ssl"].featarc
    assert got["fedavg_moco"].remote_features == 0 < got["feature_fusion"].remote_features


def test_quick_is_a_preset_that_explicit_flags_override():
    a = compare.parse_args(["--quick", "--rounds", "5"])
    assert a.quick and a.rounds == 5 and a.seeds == compare.Args.QUICK["seeds"]
    assert a.train_size == compare.Args.QUICK["train_size"]
    assert compare.parse_args([]).rounds == compare.Args().rounds


def fake_cell(method, partition, seed, knn, lin, rand=(0.3, 0.2)):
    return {"method": method, "partition": partition, "seed": seed, "knn_acc": knn, "linear_acc": lin,
            "random_encoder": {"knn_acc": rand[0], "linear_acc": rand[1]}, "wall_s": 10.0 * (seed + 1),
            "images_per_s": 100.0, "curve": [[1, knn - 0.1], [2, knn]]}


def test_table_mean_and_sample_std_over_seeds_and_centralized_in_every_column(tmp_path):
    args = compare.parse_args(["--methods", "fedavg_cl,centralized", "--partitions", "iid,dirichlet", "--seeds", "0,1"])
    results = [fake_cell("fedavg_cl", "iid", 0, 0.6, 0.7), fake_cell("fedavg_cl", "iid", 1, 0.8, 0.9),
               fake_cell("fedavg_cl", "dirichlet", 0, 0.5, 0.5, rand=(0.1, 0.1)),
               fake_cell("fedavg_cl", "dirichlet", 1, 0.5, 0.5, rand=(0.3, 0.3)),
               fake_cell("centralized", "all", 0, 0.9, 0.95), fake_cell("centralized", "all", 1, 0.9, 0.93)]
    table = compare.aggregate(results, args)
    m, s, n = table["fedavg_cl"]["iid"]["knn_acc"]
    assert (m, n) == (pytest.approx(0.7), 2) and s == pytest.approx(0.1414213, abs=1e-6)   # ddof=1
    assert table["fedavg_cl"]["wall_s"] == pytest.approx(15.0)
    assert table["random"]["dirichlet"]["knn_acc"][:2] == (pytest.approx(0.2), pytest.approx(0.1414213, abs=1e-6))
    assert table["centralized"]["iid"] == table["centralized"]["dirichlet"]          # one run, every column
    assert table["centralized"]["iid"]["linear_acc"][0] == pytest.approx(0.94)
    lines = compare.markdown_table(table, args, "knn_acc", with_speed=True)
    assert lines[0] == "| method | IID | Dirichlet 0.1 | wall s per run | train img/s |"
    assert "| fedavg_cl (FedAvg + SimCLR) | 0.700 ± 0.141 | 0.500 ± 0.000 | 15 | 100 |" in lines
    compare.plot(tmp_path / "r.png", results, table, args)
    assert (tmp_path / "r.png").stat().st_size > 1000


@pytest.mark.parametrize("flags, needle", [(["--partitions", "iid,skewed"], "--partitions"),
                                           (["--seeds", "0,x"], "--seeds"), (["--methods", "fedavg"], "--methods"),
                                           (["--rounds", "0"], "--rounds"), (["--alpha", "-1"], "--alpha"),
                                           (["--jobs", "-2"], "--jobs"), (["--rounds", "two"], "--rounds")])
def test_compare_bad_flags_exit_2_with_one_line(flags, needle, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        compare.main([*flags, "--out", str(tmp_path)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and needle in err[0]
    assert not (tmp_path / "results.md").exists()


def table_numbers(md: str, heading: str, columns: int = 1) -> dict:
    """{row label: [numbers in its first `columns` accuracy cells]} of the table under `heading`."""
    block = md.split(heading, 1)[1].split("\n\n", 2)[1]
    rows = {}
    for line in block.splitlines()[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = [float(re.match(r"[\d.]+", c).group()) for c in cells[1:1 + columns]]
    return rows


def test_compare_end_to_end_then_resumes_without_rerunning(tmp_path):
    out = tmp_path / "results"
    proc = run("compare.py", *TINY_COMPARE, "--partitions", "iid", "--jobs", "2", "--out", out)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    n = len(compare.ROWS)
    assert f"{n} cells, 0 already complete, {n} to run" in proc.stdout
    md = (out / "results.md").read_text()
    assert "python compare.py " + " ".join(TINY_COMPARE) in md and "Device: CPU" in md
    for heading in ("## Linear probe accuracy", "## kNN accuracy"):
        rows = table_numbers(md, heading)
        assert set(rows) == {"random encoder (untrained)", *(r.label for r in compare.ROWS.values())}
        assert all(0 < v[0] <= 1 for v in rows.values())
    assert (out / "results.png").stat().st_size > 1000
    res = json.loads((out / "results.json").read_text())
    assert {c["method"] for c in res["cells"]} == set(compare.ROWS)
    assert all(c["curve"] and c["curve"][-1][0] == 1 for c in res["cells"])
    # the same partition (same indices) for every federated row
    parts = {c["method"]: json.loads((ROOT / c["run"] / "partition.json").read_text())["clients"] for c in res["cells"]}
    ref = [p["indices"] for p in parts["fedavg_cl"]]
    assert all([p["indices"] for p in v] == ref for k, v in parts.items() if k != "centralized")

    # the same command again runs nothing; a cell that lost its summary is resumed from its checkpoint
    again = run("compare.py", *TINY_COMPARE, "--partitions", "iid", "--jobs", "2", "--out", out)
    assert again.returncode == 0 and f"{n} already complete, 0 to run" in again.stdout
    cell = next(c for c in res["cells"] if c["method"] == "fedavg_cl")
    folder = next((out / "runs" / "fedavg_cl").glob("iid-s0-*/fedavg_cl-*"))
    (folder / "summary.json").unlink()
    third = run("compare.py", *TINY_COMPARE, "--partitions", "iid", "--jobs", "2", "--out", out)
    assert third.returncode == 0 and f"{n - 1} already complete, 1 to run" in third.stdout, third.stdout + third.stderr
    assert "--resume" in (folder.parent / "log.txt").read_text()
    new = next(c for c in json.loads((out / "results.json").read_text())["cells"] if c["method"] == "fedavg_cl")
    assert new["knn_acc"] == cell["knn_acc"] and new["linear_acc"] == cell["linear_acc"]


def test_benchmark_quick_writes_every_figure(tmp_path):
    path = tmp_path / "bench.json"
    methods = "fedavg_cl,feature_fusion,mocosfl,fed_cluster"          # one row per kind of bare step
    proc = run("benchmark.py", "--quick", "--methods", methods, "--gpu-extras", "true", "--device", "cpu",
               "--json", path)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(path.read_text())
    assert res["device"].startswith("CPU") and res["quick"] is True
    assert [r["method"] for r in res["ratio"]] == methods.split(",")
    assert [r["bare_step"] for r in res["ratio"]] == ["simclr", "moco", "sfl", "byol"]
    for r in res["ratio"]:
        for key in ("in_loop", "bare", "bare_bf16_channels_last"):
            assert r[key]["images_per_s"] > 0 and r[key]["spread"] >= 0, (r["method"], key)
        assert r["ratio"] == pytest.approx(r["in_loop"]["images_per_s"] / r["bare"]["images_per_s"])
    assert next(r for r in res["ratio"] if r["method"] == "mocosfl")["batch_images"] == 100   # the server batch
    p = res["pipeline"]
    for key in ("ours_augment", "torchvision_augment", "ours_train", "torchvision_train"):
        assert p[key]["images_per_s"] > 0
    assert p["augment_ratio"] > 0 and p["train_ratio"] > 0
    assert {(r["method"], r["clients"]) for r in res["scale"]} == {(m, c) for m in ("fedavg_cl", "mocosfl")
                                                                    for c in (10, 100)}
    assert all(r["images_per_s"] > 0 and r["images"] == 1000 for r in res["scale"])
    assert "| fedavg_cl | simclr |" in proc.stdout and "ratio" in proc.stdout


@pytest.mark.parametrize("flags, needle", [(["--methods", "fedavg"], "--methods"), (["--sections", "speed"], "--sections"),
                                           (["--compile", "maybe"], "--compile"), (["--repeats", "-1"], "--repeats")])
def test_benchmark_bad_flags_exit_2_with_one_line(flags, needle, capsys):
    with pytest.raises(SystemExit) as e:
        benchmark.main(flags)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and needle in err[0]


def test_bare_sfl_step_is_the_unsplit_mocosfl_loss():
    """The sfl bare step cuts the network where mocosfl.py cuts it: client units + server units = the encoder."""
    spec = benchmark.BareSpec("sfl", batch=4, norm="gnws", proj=[16, 16], bn_head=False, queue=8, optimizer="sgd")
    import torch
    import torch.nn as nn
    enc = common.make_encoder(common.RunArgs(norm="gnws"), 1)
    net = nn.Sequential(enc, common.mlp([enc.dim, 16, 16], bn=False))
    client, server = benchmark.split_units(net, spec)
    x = torch.randn(3, 1, 28, 28)
    assert torch.allclose(server(client(x)), net(x))
    step, views = benchmark.bare_step(spec, torch.device("cpu"))
    step()
    assert views == 8
