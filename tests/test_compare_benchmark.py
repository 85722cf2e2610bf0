"""compare.py and benchmark.py: the shared budget reaches every method, the table's arithmetic, the whole
pipeline end to end (tiny budget), resuming, and the benchmark's JSON. No test asserts a time."""
import importlib
import json
import os
import re
import statistics
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


# the rows that deliberately change one thing of the shared setting (the claim they serve is about that thing)
DEVIATES = {"centralized": dict(clients=1), "centralized_moco": dict(clients=1), "dec_ssl_central": dict(clients=1),
            "fedavg_moco_c100": dict(clients=100), "mocosfl_c100": dict(clients=100),
            "mocosfl_c1000": dict(clients=1000, rounds=80, eval_every=40),        # a pool of 100: 10x the rounds
            "dec_ssl_fewer_rounds": dict(rounds=2, local_epochs=12, eval_every=1),   # 8 x 3 -> 2 x 12: same passes
            "dec_ssl_p05": dict(participation=0.5), "mocosfl_sync10": dict(sync_every=10),
            "mocosfl_sync_round": dict(sync_every=1000000)}


@pytest.mark.parametrize("partition", ["iid", "classes", "dirichlet"])
def test_every_row_gets_the_same_budget_partition_and_evaluation(partition):
    args = compare.parse_args(["--rounds", "8", "--local-epochs", "3", "--clients", "20", "--alpha", "0.3",
                               "--classes-per-client", "3", "--train-size", "5000", "--eval-every", "4",
                               "--device", "cpu"])
    args.check()
    got = {key: parsed(compare.method_flags(key, args, partition, seed=4)) for key in compare.ROWS}
    for key, a in got.items():
        part = partition if compare.ROWS[key].partitioned else "iid"          # centralized rows: no partition
        want = {**dict(rounds=8, local_epochs=3, seed=4, train_size=5000, eval_every=4, probe_epochs=args.probe_epochs,
                       encoder="cnn", clients=20, partition=part, alpha=0.3 if part == "dirichlet" else 0.1,
                       classes_per_client=3 if part == "classes" else 2), **DEVIATES.get(key, {})}
        assert {k: getattr(a, k) for k in want} == want, key
        if key not in ("dec_ssl_p05", "mocosfl_c1000", "fedavg_moco_c100", "mocosfl_c100"):
            assert a.participation in (1.0, 0.0), key
    assert got["dec_ssl_fewer_rounds"].rounds * got["dec_ssl_fewer_rounds"].local_epochs == 8 * 3   # same image passes
    assert got["mocosfl"].batch_size == 100 // 20                  # its own rule: ~100 images per server step
    assert {got[k].batch_size for k in compare.ROWS if not k.startswith("mocosfl")} == {args.batch_size}
    assert got["dec_ssl_featarc"].featarc and not got["dec_ssl"].featarc
    assert got["fedavg_moco"].remote_features == 0 < got["feature_fusion"].remote_features
    assert got["centralized_moco"].remote_features == 0 == got["fedavg_moco_c100"].remote_features
    assert got["fed_cluster_1stage"].cluster_rounds == 8 == args.rounds          # one stage: clustering from round 1
    assert (got["fed_cluster_cn"].loss, got["fed_cluster_cn"].cluster_loss) == ("contrastive", "noncontrastive")
    assert type(got["fedavg_sl"]).__module__ == "fedavg_sl"


def test_quick_is_a_preset_that_explicit_flags_override():
    a = compare.parse_args(["--quick", "--rounds", "5"])
    assert a.quick and a.rounds == 5 and a.seeds == compare.Args.QUICK["seeds"]
    assert a.train_size == compare.Args.QUICK["train_size"]
    assert compare.parse_args([]).rounds == compare.Args().rounds


def fake_cell(method, partition, seed, knn, lin, rand=(0.3, 0.2), **extra):
    """A read_cell record; the few-label numbers are the full-label ones minus 0.1 (untrained: minus 0.05)."""
    trained = {m: (knn if m.startswith("knn") else lin) - (0.1 if m.endswith("pct") else 0) for m in compare.METRICS}
    random = {m: rand[0 if m.startswith("knn") else 1] - (0.05 if m.endswith("pct") else 0) for m in compare.METRICS}
    return {"method": method, "partition": partition, "seed": seed, **trained, "random_encoder": random,
            "gain": {m: trained[m] - random[m] for m in compare.METRICS}, "wall_s": 10.0 * (seed + 1),
            "images_per_s": 100.0, "curve": {m: [[1, knn - 0.1], [2, knn]] for m in ("knn_acc", "knn_acc_1pct")},
            **extra}


def test_table_mean_std_and_paired_gain_over_seeds_and_centralized_in_every_column(tmp_path):
    args = compare.parse_args(["--methods", "fedavg_cl,centralized", "--partitions", "iid,dirichlet", "--seeds", "0,1"])
    results = [fake_cell("fedavg_cl", "iid", 0, 0.6, 0.7), fake_cell("fedavg_cl", "iid", 1, 0.8, 0.9),
               fake_cell("fedavg_cl", "dirichlet", 0, 0.5, 0.5, rand=(0.1, 0.1)),
               fake_cell("fedavg_cl", "dirichlet", 1, 0.5, 0.5, rand=(0.3, 0.3)),
               fake_cell("centralized", "all", 0, 0.9, 0.95), fake_cell("centralized", "all", 1, 0.9, 0.93)]
    table = compare.aggregate(results, args)
    st = table["fedavg_cl"]["iid"]["knn_acc"]
    assert (st["mean"], st["n"]) == (pytest.approx(0.7), 2) and st["std"] == pytest.approx(0.1414213, abs=1e-6)
    assert st["gain_mean"] == pytest.approx(0.4) and st["random_mean"] == pytest.approx(0.3)   # 0.3 and 0.5 over 0.3
    d = table["fedavg_cl"]["dirichlet"]["knn_acc"]            # gains 0.4 and 0.2: the std of the PAIRED differences
    assert (d["gain_mean"], d["gain_std"], d["std"]) == (pytest.approx(0.3), pytest.approx(0.1414213, abs=1e-6), 0)
    assert table["fedavg_cl"]["iid"]["knn_acc_1pct"]["gain_mean"] == pytest.approx(0.35)  # (0.5 - 0.25 + 0.7 - 0.25) / 2
    assert table["fedavg_cl"]["wall_s"] == pytest.approx(15.0)
    assert "random" not in table                                       # no shared random row: each row has its own
    assert table["centralized"]["iid"] == table["centralized"]["dirichlet"]          # one run, every column
    assert table["centralized"]["iid"]["linear_acc"]["mean"] == pytest.approx(0.94)
    lines = compare.markdown_table(table, args, "knn_acc", with_speed=True)
    assert lines[0] == "| method | IID | Dirichlet 0.1 | wall s per run | train img/s |"
    assert "| fedavg_cl (FedAvg + SimCLR) | 0.700 ± 0.141 (+0.400 ± 0.141) | 0.500 ± 0.000 (+0.300 ± 0.141) | 15 | 100 |" \
        in lines
    one = compare.aggregate(results[:1], compare.parse_args(["--methods", "fedavg_cl", "--partitions", "iid", "--seeds", "0"]))
    assert compare.cell_text(one["fedavg_cl"]["iid"]["linear_acc_10pct"]) == "0.600 (+0.450)"      # one seed: no ±
    compare.plot(tmp_path / "r.png", results, table, args)
    assert (tmp_path / "r.png").stat().st_size > 1000


def test_t_interval_against_a_hand_computation():
    # d = 0.01, 0.03, 0.05: mean 0.03, sd 0.02, se 0.02 / sqrt(3) = 0.0115470, t(0.975, 2) = 4.303 -> half 0.0496868
    mean, lo, hi = compare.t_interval([0.01, 0.03, 0.05])
    assert (mean, lo, hi) == (pytest.approx(0.03), pytest.approx(-0.0196868, abs=1e-6), pytest.approx(0.0796868, abs=1e-6))
    # five seeds: mean 0.02, sd 0.0158114, se 0.0070711, t(0.975, 4) = 2.776 -> half 0.0196294
    mean, lo, hi = compare.t_interval([0.0, 0.01, 0.02, 0.03, 0.04])
    assert (lo, hi) == (pytest.approx(0.0003706, abs=1e-6), pytest.approx(0.0396294, abs=1e-6))
    assert compare.t_interval([0.5]) == (0.5, None, None) and compare.t_interval([]) == (None, None, None)
    assert compare.T975[0] == 12.706 and compare.T975[29] == 2.042 and len(compare.T975) == 30


@pytest.mark.parametrize("n, lo, hi, margin, expected", [
    (3, 0.001, 0.05, None, "holds"), (3, -0.05, -0.001, None, "does not hold"), (3, -0.01, 0.02, None, "inconclusive"),
    (3, 0.0, 0.02, None, "inconclusive"),                                   # lo must be strictly above 0
    (3, -0.019, 0.01, 0.02, "holds"),                                       # at most 0.02 worse: robust
    (3, -0.05, -0.021, 0.02, "does not hold"), (3, -0.03, 0.01, 0.02, "inconclusive"),
    (1, 0.1, 0.2, None, "inconclusive")])                                   # one seed: no interval
def test_verdict_rule_on_constructed_cases(n, lo, hi, margin, expected):
    assert compare.verdict(n, lo, hi, margin)[0] == expected


def test_ledger_pairs_by_seed_and_reads_each_claims_metric():
    args = compare.parse_args(["--seeds", "0,1,2"])
    gains = {0: 0.05, 1: 0.06, 2: 0.07}                       # fedavg_cl's kNN 1 % gain over local_cl, per seed
    results = [fake_cell("local_cl", "classes", s, 0.6 + 0.01 * s, 0.7) for s in (2, 0, 1)]   # any order
    results += [fake_cell("fedavg_cl", "classes", s, 0.6 + 0.01 * s + gains[s], 0.7) for s in (0, 1, 2)]
    results += [fake_cell("fedavg_cl", "classes", 3, 0.9, 0.9)]                   # seed 3: no partner, not paired
    results += [fake_cell("dec_ssl", p, s, 0.6 - (0.01 * s if p == "classes" else 0), 0.7)  # up to 0.02 worse
                for p in ("iid", "classes") for s in (0, 1, 2)]
    # different networks: mocosfl's untrained kNN is 0.2 higher, so its raw lead of 0.05 is a gain deficit of 0.15
    results += [fake_cell("mocosfl", "classes", s, 0.75, 0.8, rand=(0.5, 0.2)) for s in (0, 1)]
    results += [fake_cell("fedavg_moco", "classes", s, 0.7, 0.8) for s in (0, 1)]
    results += [fake_cell("fed_cluster", "classes", s, 0.6, 0.7, cluster_acc=0.5, stage1=None) for s in (0, 1)]
    results += [fake_cell("fed_cluster_cc", "classes", s, 0.6, 0.7, cluster_acc=0.4 + 0.1 * s,
                          stage1={m: 0.5 for m in compare.METRICS}) for s in (0, 1)]
    rows = {(r["a"], r["b"], r["metric"]): r for r in compare.ledger(results, args)}
    assert len(rows) == len(compare.CLAIMS)
    fed = rows[("fedavg_cl@classes", "local_cl@classes", "knn_acc_1pct")]
    assert fed["seeds"] == [0, 1, 2] and fed["diffs"] == pytest.approx([0.05, 0.06, 0.07])
    assert (fed["mean"], fed["lo"], fed["verdict"]) == (pytest.approx(0.06), pytest.approx(0.06 - 4.303 * 0.01 / 3 ** 0.5),
                                                        "holds")
    robust = rows[("dec_ssl@classes", "dec_ssl@iid", "knn_acc_1pct")]      # d = 0, -0.01, -0.02: mean -0.01
    assert robust["diffs"] == pytest.approx([0, -0.01, -0.02]) and robust["verdict"] == "inconclusive"
    clustering = rows[("fed_cluster_cc@classes", "fed_cluster@classes", "cluster_acc")]   # raw ACC: -0.1, 0.0
    assert clustering["diffs"] == pytest.approx([-0.1, 0.0]) and clustering["verdict"] == "inconclusive"
    stage1 = rows[("fed_cluster@classes", "fed_cluster_cc@classes", "stage1.knn_acc_1pct")]  # fed_cluster: no stage 1
    assert stage1["diffs"] == [] and stage1["verdict"] == "inconclusive" and "fed_cluster@classes" in stage1["why"]
    mocosfl = rows[("mocosfl@classes", "fedavg_moco@classes", "knn_acc_1pct")]
    assert mocosfl["diffs"] == pytest.approx([-0.15, -0.15]) and mocosfl["verdict"] == "does not hold"
    nm = rows[("neighborhood_match@classes", "feature_fusion@classes", "knn_acc_1pct")]
    assert nm["verdict"] == "inconclusive" and nm["why"].startswith("not run")


def test_every_claim_names_rows_and_partitions_that_exist():
    for c in compare.CLAIMS:
        for side in (c.a, c.b):
            key, part = side.split("@")
            assert key in compare.ROWS and (part == "all") == (not compare.ROWS[key].partitioned), side
            assert part == "all" or part in compare.PARTITIONS and (not compare.ROWS[key].only or part in compare.ROWS[key].only)
        assert c.metric in compare.METRICS or c.metric == "cluster_acc" or c.metric.removeprefix("stage1.") in compare.METRICS


def test_only_the_default_setting_writes_into_the_committed_results_folder():
    out = lambda *flags: compare.default_out(compare.parse_args(list(flags)))
    assert out() == ROOT / "results" and out("--jobs", "3", "--device", "cpu") == ROOT / "results"
    assert out("--quick") == ROOT / "runs" / "compare-quick"
    for flags in (["--quick", "--rounds", "1"], ["--seeds", "0"], ["--methods", "fedavg_cl"], ["--rounds", "5"]):
        assert out(*flags).parent == ROOT / "runs" and out(*flags).name.startswith("compare-"), flags
    assert out("--rounds", "5") == out("--rounds", "5") != out("--rounds", "6")        # resumable: same flags, same folder
    assert compare.warning_line(compare.parse_args(["--quick"]))[0].startswith("**Pipeline check")
    assert "--rounds 5" in compare.warning_line(compare.parse_args(["--rounds", "5"]))[0]
    assert compare.warning_line(compare.parse_args(["--seeds", "0,1,2,3,4"])) == []   # more seeds: same setting


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
    table_rows = compare.parse_args(TINY_COMPARE).method_list              # the method rows (no claim variants)
    assert "fedavg_sl" in table_rows and "mocosfl_c1000" not in table_rows
    iid_rows = {k: compare.ROWS[k] for k in table_rows if not compare.ROWS[k].only or "iid" in compare.ROWS[k].only}
    n = len(iid_rows)
    assert f"{n} cells, 0 already complete, {n} to run" in proc.stdout
    md = (out / "results.md").read_text()
    assert md.startswith("**Pipeline check") and "numbers check that the pipeline" in md.splitlines()[0]
    assert "python compare.py " + " ".join(TINY_COMPARE) in md and "Written on CPU" in md
    res = json.loads((out / "results.json").read_text())
    for metric, title in compare.METRICS.items():
        rows = table_numbers(md, "## " + title)
        assert set(rows) == {r.label for r in iid_rows.values()}, title
        assert all(0 < v[0] <= 1 for v in rows.values())
        # the bracket is the gain over the run's own untrained network, from the same summary
        fed = next(c for c in res["cells"] if c["method"] == "fedavg_cl")
        gain = float(re.search(r"\(([+-][\d.]+)\)", md.split("## " + title)[1].split("| fedavg_cl")[1]).group(1))
        assert gain == pytest.approx(fed[metric] - fed["random_encoder"][metric], abs=5e-4), title
    assert (out / "results.png").stat().st_size > 1000
    claims = (out / "claims.md").read_text()
    assert claims.startswith("**Pipeline check") and "# Claims ledger" in claims
    assert len(res["claims"]) == len(compare.CLAIMS)
    assert all(c["verdict"] == "inconclusive" for c in res["claims"])           # one seed: never a verdict
    assert md.split("# Results", 1)[1].strip() in proc.stdout and "# Claims ledger" in proc.stdout   # printed at the end
    assert {c["method"] for c in res["cells"]} == set(iid_rows)
    assert all(c["curve"]["knn_acc"][-1][0] == 1 and c["curve"]["knn_acc_1pct"][-1][0] == 1 for c in res["cells"])
    # the same partition (same indices) for every federated row
    parts = {c["method"]: json.loads((ROOT / c["run"] / "partition.json").read_text())["clients"] for c in res["cells"]}
    ref = [p["indices"] for p in parts["fedavg_cl"]]
    assert all([p["indices"] for p in v] == ref for k, v in parts.items() if k != "centralized")

    # every finished cell was taken into OUT/cells (a few KB each, never a checkpoint)
    kept = sorted(p.parent.parent.name for p in (out / "cells").glob("*/*/cell.json"))
    assert kept == sorted(iid_rows) and not list((out / "cells").glob("*/*/*.pt"))
    # the same command again runs nothing; a cell that lost its summary (and was never kept) is resumed
    again = run("compare.py", *TINY_COMPARE, "--partitions", "iid", "--jobs", "2", "--out", out)
    assert again.returncode == 0 and f"{n} already complete, 0 to run" in again.stdout
    cell = next(c for c in res["cells"] if c["method"] == "fedavg_cl")
    folder = next((out / "runs" / "fedavg_cl").glob("iid-s0-*/fedavg_cl-*"))
    (folder / "summary.json").unlink()
    import shutil
    shutil.rmtree(next((out / "cells" / "fedavg_cl").glob("iid-s0-*")))
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
        assert len(r["ratio_per_round"]) == len(r["ratio_cpu_time_per_round"]) == 2      # --quick: 2 repeats
        assert r["ratio"] == pytest.approx(statistics.median(r["ratio_per_round"]))       # round / bare block after it
        assert r["ratio_cpu_time"] == pytest.approx(statistics.median(r["ratio_cpu_time_per_round"]))
        assert r["in_loop_cpu"]["images_per_s"] > 0 and r["bare_cpu"]["images_per_s"] > 0
    assert next(r for r in res["ratio"] if r["method"] == "mocosfl")["batch_images"] == 100   # the server batch
    p = res["pipeline"]
    for key in ("ours_augment", "torchvision_augment", "ours_train", "torchvision_train"):
        assert p[key]["images_per_s"] > 0
    assert p["augment_ratio"] > 0 and p["train_ratio"] > 0
    assert {(r["method"], r["clients"]) for r in res["scale"]} == {(m, c) for m in ("fedavg_cl", "mocosfl")
                                                                    for c in (10, 100)}
    assert all(r["images_per_s"] > 0 and r["images"] == 1000 for r in res["scale"])
    assert "| fedavg_cl | simclr |" in proc.stdout and "ratio" in proc.stdout
    q = res["procs"]                                                  # torchrun: 1 process vs 2
    assert q["procs"] == 2 and q["one_process"]["images_per_s"] > 0 and q["procs_rate"]["images_per_s"] > 0
    assert q["ratio"] == pytest.approx(q["procs_rate"]["images_per_s"] / q["one_process"]["images_per_s"])
    assert "| 1 process | 2 processes |" in proc.stdout
    prof = res["profile"]
    assert [r["method"] for r in prof["methods"]] == methods.split(",")
    for r in prof["methods"]:     # the loop does at least the bare step's work, plus augmenting two views
        # (mocosfl augments each pool client's views once for all its steps up to the next sync: per step less)
        two_views = 2 * prof["augment"]["gray_28"]["ops_per_call"] - 1 if r["method"] != "mocosfl" else 1
        assert r["bare_ops_per_step"] > 50 and r["extra_ops_per_step"] >= two_views, r
        assert r["loop_ops_per_step"] == pytest.approx(r["bare_ops_per_step"] + r["extra_ops_per_step"])
    for key in ("download", "upload_copy", "optimizer_step", "fresh_optimizer_and_step", "reset_optimizer_and_step"):
        assert prof["per_client"][key]["ops"] > 0 and prof["per_client"][key]["us"] > 0, key
    assert prof["per_client"]["download"]["ops"] == prof["per_client"]["state_tensors"]    # one copy per tensor
    assert "Operator counts" in proc.stdout


def test_kernel_op_count_skips_views_and_counts_leaf_ops_once():
    """kernel_ops counts the aten ops that compute, once each: not the views, not the composite op above them."""
    import torch
    x = torch.randn(4, 6)
    ops, _ = benchmark.profiled(lambda: (x + 1).mul_(2).view(24), repeats=3)
    assert ops == 2                                             # add, mul_ (view: no kernel)
    lin = torch.nn.Linear(6, 3)
    ops, _ = benchmark.profiled(lambda: lin(x), repeats=2)
    assert ops == 1                                             # linear -> addmm (t and the view not counted)


def test_augment_is_a_few_dozen_ops_per_batch():
    """The fused augmentation: a bounded number of ops per call whatever the batch (was 62 and 116)."""
    import torch
    costs = benchmark.augment_costs(torch.device("cpu"))
    assert costs["gray_28"]["ops_per_call"] <= 30 and costs["rgb_32"]["ops_per_call"] <= 40, costs


@pytest.mark.parametrize("flags, needle", [(["--methods", "fedavg"], "--methods"), (["--sections", "speed"], "--sections"),
                                           (["--scale-clients", "10,x"], "--scale-clients"),
                                           (["--scale-methods", "local_cl"], "--scale-methods"),
                                           (["--render", "no-such.json"], "--render"),
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


def test_bare_step_of_neighborhood_match_adds_its_matching_loss(monkeypatch):
    """neighborhood_match's bare step is feature fusion's plus lambda L_NM: neighborhood_match.nm_term at the
    run's settings, N = the queue's rows (Q_r + Q_l; a client gets (participants - 1) x M remote rows), both
    views as query; feature fusion's has no L_NM."""
    import dataclasses
    import torch
    import neighborhood_match
    banks = ["--queue-size", "1024", "--remote-bank", "1024"]
    flags = ["--clients", "2", "--nm-weight", "0.3", "--tau-nm", "0.07", *banks]
    spec = benchmark.spec_for("neighborhood_match", benchmark.dry_config("neighborhood_match", flags))
    assert (spec.kind, spec.nm_weight, spec.tau_nm, spec.nm_form, spec.symmetric) == ("moco", 0.3, 0.07, "entropy", True)
    assert spec.queue == spec.nm_rows == 1024 + 256                     # |Q_l| + the other client's M rows
    local_only = benchmark.dry_config("neighborhood_match", flags + ["--nm-local", "false"])
    assert benchmark.spec_for("neighborhood_match", local_only).nm_rows == 256      # N = Q_r only
    capped = benchmark.dry_config("neighborhood_match", ["--clients", "4", "--queue-size", "300", "--remote-bank", "500"])
    assert benchmark.spec_for("neighborhood_match", capped).nm_rows == 300 + 500     # 3 x 256 received, 500 kept
    ff = benchmark.spec_for("feature_fusion", benchmark.dry_config("feature_fusion", ["--clients", "2", *banks]))
    assert ff.nm_weight == 0 and ff.queue == 1024 + 256
    calls, real = [], neighborhood_match.nm_term
    monkeypatch.setattr(neighborhood_match, "nm_term",
                        lambda q, k, n, a: calls.append((q.shape, len(n), a.tau_nm)) or real(q, k, n, a))
    step, _ = benchmark.bare_step(dataclasses.replace(spec, batch=4, queue=24, nm_rows=24, proj=[32, 8]),
                                  torch.device("cpu"))
    step()
    assert calls == [(torch.Size([4, 8]), 24, 0.07)] * 2                 # view 1 and view 2 as query
