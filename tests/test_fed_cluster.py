"""fed_cluster.py: clustering metrics and losses against slow references, the two stages end to end."""
import copy
import itertools
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import common
import fed_cluster as fc
from conftest import (SMALL, TINY, assert_bad_input, assert_complete_run, assert_encoder_reproduces, read_run,
                      run_in_process, run_script, resume_to)


# ---------------------------------------------------------------------------------------------
# Clustering metrics against independent slow references
# ---------------------------------------------------------------------------------------------

def relabel(y):
    return [sorted(set(y)).index(v) for v in y]


def acc_brute_force(y_true, y_pred):
    """Best share over every one-to-one map of clusters onto classes (labels padded to one size)."""
    t, p = relabel(list(y_true)), relabel(list(y_pred))
    k = max(max(t), max(p)) + 1
    return max(sum(perm[pi] == ti for ti, pi in zip(t, p)) for perm in itertools.permutations(range(k))) / len(t)


def nmi_loops(y_true, y_pred):
    n = len(y_true)
    classes, clusters = sorted(set(y_true)), sorted(set(y_pred))
    p_t = {a: sum(1 for y in y_true if y == a) / n for a in classes}
    p_p = {b: sum(1 for y in y_pred if y == b) / n for b in clusters}
    mi = 0.0
    for a in classes:
        for b in clusters:
            p_ab = sum(1 for s, r in zip(y_true, y_pred) if s == a and r == b) / n
            if p_ab > 0:
                mi += p_ab * math.log(p_ab / (p_t[a] * p_p[b]))
    h_t = -sum(p * math.log(p) for p in p_t.values())
    h_p = -sum(p * math.log(p) for p in p_p.values())
    return 1.0 if h_t == h_p == 0 else mi / ((h_t + h_p) / 2)


def ari_pair_counting(y_true, y_pred):
    """ARI from the 2x2 table of sample pairs (together / apart in each partition), looping over pairs."""
    n11 = n10 = n01 = n00 = 0
    for i in range(len(y_true)):
        for j in range(i + 1, len(y_true)):
            same_t, same_p = y_true[i] == y_true[j], y_pred[i] == y_pred[j]
            n11 += same_t and same_p
            n10 += same_t and not same_p
            n01 += same_p and not same_t
            n00 += not same_t and not same_p
    den = (n00 + n01) * (n01 + n11) + (n00 + n10) * (n10 + n11)
    return 1.0 if den == 0 else 2 * (n00 * n11 - n01 * n10) / den


def test_hungarian_matches_brute_force_on_tied_integer_costs():
    rng = np.random.default_rng(0)
    for _ in range(300):
        n = int(rng.integers(1, 7))
        cost = rng.integers(-3, 4, (n, n)).astype(float)        # few values: many ties
        col = common.hungarian(cost)
        best = min(sum(cost[i, p[i]] for i in range(n)) for p in itertools.permutations(range(n)))
        assert sorted(col.tolist()) == list(range(n))
        assert cost[np.arange(n), col].sum() == pytest.approx(best)


def test_metrics_match_slow_references():
    rng = np.random.default_rng(1)
    for _ in range(60):
        n, kt, kp = int(rng.integers(2, 30)), int(rng.integers(1, 6)), int(rng.integers(1, 6))
        y = rng.integers(0, kt, n) * 7 - 3                         # labels need not be 0..K-1
        p = rng.integers(0, kp, n) + 100
        assert common.cluster_acc(y, p) == pytest.approx(acc_brute_force(y, p))
        assert common.nmi(y, p) == pytest.approx(nmi_loops(y.tolist(), p.tolist()))
        assert common.ari(y, p) == pytest.approx(ari_pair_counting(y.tolist(), p.tolist()))
        assert all(type(f(y, p)) is float for f in (common.cluster_acc, common.nmi, common.ari))


def test_permuted_perfect_clustering_scores_one():
    y = np.random.default_rng(2).integers(0, 10, 500)
    p = np.random.default_rng(3).permutation(10)[y] + 20           # same partition, other names
    assert common.cluster_acc(y, p) == 1.0
    assert common.nmi(y, p) == pytest.approx(1.0)
    assert common.ari(y, p) == pytest.approx(1.0)


def test_constant_clustering_scores_what_theory_says():
    y = np.array([0] * 50 + [1] * 30 + [2] * 20)
    p = np.zeros_like(y)
    assert common.cluster_acc(y, p) == pytest.approx(0.5)              # the largest class share
    assert common.nmi(y, p) == 0.0
    assert common.ari(y, p) == pytest.approx(0.0, abs=1e-12)


def test_one_off_clustering_is_below_one_and_mismatched_lengths_fail():
    y = np.array([0, 0, 1, 1, 2, 2])
    p = np.array([0, 0, 1, 1, 2, 1])
    assert common.cluster_acc(y, p) == pytest.approx(5 / 6)
    assert common.nmi(y, p) < 1 and common.ari(y, p) < 1
    with pytest.raises(ValueError):
        common.cluster_acc(y, p[:-1])


# ---------------------------------------------------------------------------------------------
# Losses against loop references
# ---------------------------------------------------------------------------------------------

def assignments(b, m, seed):
    g = torch.Generator().manual_seed(seed)
    return F.softmax(torch.randn(b, m, generator=g, dtype=torch.float64) * 2, dim=1)


def entropy_gap_loops(p):
    b, m = p.shape
    usage = [sum(p[i, j].item() for i in range(b)) / b for j in range(m)]
    return math.log(m) + sum(u * math.log(u) for u in usage)


def test_contrastive_cluster_loss_matches_loop_reference():
    p1, p2, tau_c = assignments(8, 4, 0), assignments(8, 4, 1), 1.0
    cols = [p1[:, j] for j in range(4)] + [p2[:, j] for j in range(4)]   # 2M cluster "samples"
    cos = lambda a, b: (a @ b / (a.norm() * b.norm())).item()
    total = 0.0
    for i in range(8):
        pos = (i + 4) % 8
        den = sum(math.exp(cos(cols[i], cols[k]) / tau_c) for k in range(8) if k != i)
        total += -math.log(math.exp(cos(cols[i], cols[pos]) / tau_c) / den)
    ref = total / 8 + entropy_gap_loops(p1) + entropy_gap_loops(p2)
    assert fc.cluster_loss_contrastive(p1, p2, tau_c).item() == pytest.approx(ref, rel=1e-9)


def test_noncontrastive_cluster_loss_matches_loop_reference():
    p1, p2 = assignments(6, 3, 2), assignments(6, 3, 3)
    l1_t, l2_t, tau_t = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64), 0.5
    ce = 0.0
    for i in range(6):
        for p, l_other in ((p1, l2_t), (p2, l1_t)):
            z = sum(math.exp(l_other[i, j].item() / tau_t) for j in range(3))
            ce -= sum(math.exp(l_other[i, j].item() / tau_t) / z * math.log(p[i, j].item()) for j in range(3))
    ref = ce / 6 / 2 + entropy_gap_loops(p1) + entropy_gap_loops(p2)
    assert fc.cluster_loss_noncontrastive(p1, p2, l1_t, l2_t, tau_t).item() == pytest.approx(ref, rel=1e-9)


def test_byol_loss_matches_loop_reference():
    g = torch.Generator().manual_seed(4)
    p1, p2, z1, z2 = (torch.randn(5, 7, generator=g, dtype=torch.float64) for _ in range(4))
    cos = lambda a, b: (a @ b / (a.norm() * b.norm())).item()
    ref = sum((2 - 2 * cos(p1[i], z2[i])) + (2 - 2 * cos(p2[i], z1[i])) for i in range(5)) / 5
    assert fc.byol_loss(p1, p2, z1, z2).item() == pytest.approx(ref, rel=1e-9)


def test_entropy_term_is_smallest_for_uniform_usage():
    """log M - H(P): 0 when every cluster is used equally (H largest), log M when all samples pick one."""
    m = 5
    uniform = torch.eye(m, dtype=torch.float64).repeat(4, 1)           # 20 samples, each cluster 4 times
    collapsed = torch.zeros(20, m, dtype=torch.float64)
    collapsed[:, 2] = 1
    assert fc.entropy_gap(uniform).item() == pytest.approx(0.0, abs=1e-12)
    assert fc.entropy_gap(collapsed).item() == pytest.approx(math.log(m))
    for seed in range(20):
        p = assignments(20, m, seed)
        assert fc.entropy_gap(p).item() == pytest.approx(entropy_gap_loops(p), rel=1e-9)
        assert fc.entropy_gap(p).item() > fc.entropy_gap(uniform).item()


def test_stage_split_and_claim_verdicts():
    assert fc.Args(rounds=20).stage1_rounds == 10
    assert fc.Args(rounds=5, cluster_rounds=2).stage1_rounds == 3
    assert fc.Args(rounds=5, cluster_rounds=5).stage1_rounds == 0          # one-stage baseline

    def row(s1_linear, acc, linear=0.5):
        return {"stage1": {"knn_acc": 0.5, "linear_acc": s1_linear}, "knn_acc": 0.5, "linear_acc": linear,
                "cluster_acc": acc, "nmi": 0.3, "ari": 0.2}
    mean = {"N / C": row(0.70, 0.50), "C / C": row(0.60, 0.65), "N+C / C": row(0.75, 0.60),
            "N / N": row(0.70, 0.40), "C / N": row(0.60, 0.45), "N+C / N": row(0.75, 0.42),
            "one-stage C": {**row(0, 0.55, linear=0.4), "stage1": None}}
    assert [ok for _, _, ok in fc.claims(mean)] == [True, True, True, True]
    mean["C / C"] = row(0.80, 0.65)                                     # contrastive now best for FedSSRL
    mean["N+C / N"] = row(0.75, 0.70)                                   # and not best for FedCl
    assert [ok for _, _, ok in fc.claims(mean)] == [True, True, False, False]


# ---------------------------------------------------------------------------------------------
# End to end: both stages, each --loss, resume, bad flags
# ---------------------------------------------------------------------------------------------

def assert_two_stage_summary(folder, rounds, stage1_rounds):
    summary, metrics = assert_complete_run(folder, rounds)
    assert [m["stage"] for m in metrics] == [1] * stage1_rounds + [2] * (rounds - stage1_rounds)
    assert all("cluster_acc" in m and "nmi" in m and "ari" in m for m in metrics if m["stage"] == 2)
    assert summary["stage2"] == {k: summary[k] for k in common.EVAL_KEYS}
    for key in ("cluster_acc", "nmi", "ari"):
        assert -1 <= summary[key] <= 1 and summary[key] == metrics[-1][key]
    assert 0.1 <= summary["cluster_acc"] <= 1        # some matching of a 10 x 10 table holds >= 1/10 of it
    return summary, metrics


@pytest.mark.parametrize("loss,extra,stage1_rounds", [
    ("contrastive", ["--cluster-rounds", "2"], 0),                   # one-stage baseline
    ("noncontrastive", [], 1),                                       # default split: half and half
])
def test_end_to_end(out, loss, extra, stage1_rounds):
    proc, folder = run_script("fed_cluster.py", *TINY, "--loss", loss, *extra, out=out)
    assert proc.returncode == 0, proc.stderr
    summary, _ = assert_two_stage_summary(folder, 2, stage1_rounds)
    assert summary["loss_kind"] == loss
    if stage1_rounds == 0:
        assert summary["stage1"] is None
    else:
        assert set(summary["stage1"]) == set(common.EVAL_KEYS)
    assert "stage 1" in proc.stdout and "clustering (test set): ACC" in proc.stdout
    assert_encoder_reproduces(folder, summary["knn_acc"])


def test_resume_with_kept_targets_reproduces_the_uninterrupted_run(tmp_path):
    flags = [*TINY, "--loss", "both", "--cluster-loss", "noncontrastive", "--keep-target", "true"]
    proc, full = run_script("fed_cluster.py", *flags, "--cluster-rounds", "1", out=tmp_path / "a")
    assert proc.returncode == 0, proc.stderr
    assert_two_stage_summary(full, 2, 1)
    proc, part = run_script("fed_cluster.py", *flags, "--rounds", "1", "--cluster-rounds", "0", out=tmp_path / "b")
    assert proc.returncode == 0, proc.stderr
    proc = resume_to("fed_cluster.py", part, tmp_path / "b", rounds=2, cluster_rounds=1)   # extend stage 1
    assert proc.returncode == 0, proc.stderr
    (s_full, m_full, _), (s_part, m_part, _) = read_run(full), read_run(part)
    keys = ("loss", "knn_acc", "stage", "cluster_loss", "cluster_acc", "nmi", "ari")
    assert [[m.get(k) for k in keys] for m in m_part] == [[m.get(k) for k in keys] for m in m_full]
    for key in ("stage1", "stage2", "cluster_acc", "nmi", "ari"):
        assert s_part[key] == s_full[key]


@pytest.mark.parametrize("flags,needle", [
    (["--loss", "simclr"], "--loss"),
    (["--sweep", "true", "--sweep-seeds", "0"], "--sweep-seeds"),     # the --sweep path checks too
])
def test_bad_flags_exit_2(out, flags, needle):
    proc, _ = run_script("fed_cluster.py", *TINY, *flags, out=out)
    assert_bad_input(proc, out, needle)


@pytest.mark.parametrize("kw,needle", [
    (dict(rounds=2, cluster_rounds=3), "--cluster-rounds"), (dict(cluster_rounds=-2), "--cluster-rounds"),
    (dict(tau_c=0.0), "--tau-c"), (dict(tau_t=-1.0), "--tau-t"), (dict(lambda_c=-0.5), "--lambda-c"),
    (dict(momentum=1.0), "--momentum"), (dict(cluster_loss="byol"), "--cluster-loss"),
])
def test_bad_values_are_refused_by_check(kw, needle):
    with pytest.raises(common.UserError, match=needle):
        fc.Args(**kw).check()


def test_evaluate_clustering_is_the_argmax_of_the_cluster_head_on_clean_test_images(monkeypatch):
    """A fixed model: the predicted cluster of each test image is argmax_m c(f(x))_m (eval mode, un-augmented),
    and ACC / NMI / ARI are computed on those predictions; with labels equal to them ACC = NMI = ARI = 1."""
    torch.manual_seed(5)
    x = torch.randint(0, 256, (120, 1, 28, 28), dtype=torch.uint8)
    model = fc.Net(common.SmallCNN(1, width=8), 16, 10).eval()
    train_x = torch.randint(0, 256, (120, 1, 28, 28), dtype=torch.uint8)               # not the images scored
    data = common.Data(train_x, torch.zeros(120, dtype=torch.long), x, torch.zeros(120, dtype=torch.long), 10,
                       (0.3,), (0.35,))
    augment = common.Augment(data)
    with torch.no_grad():                       # centre the head's hidden layer: the images spread over clusters
        first = model.cluster[0]
        a = first(model.encoder(augment.plain(x)))
        first.weight.div_(a.std(0)[:, None]), first.bias.copy_((first.bias - a.mean(0)) / a.std(0))
        want = model.cluster(model.encoder(augment.plain(x))).argmax(1)
    data.test_y = want.clone()
    seen, real = [], common.cluster_acc
    monkeypatch.setattr(common, "cluster_acc", lambda y, p: seen.append(p.copy()) or real(y, p))
    out = fc.evaluate_clustering(model, SimpleNamespace(data=data, augment=augment))
    assert seen[0].tolist() == want.tolist() and len(set(want.tolist())) >= 4
    assert out["clusters_used"] == len(set(want.tolist()))
    assert out["cluster_acc"] == out["nmi"] == pytest.approx(1.0) and out["ari"] == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------
# local_update against the same terms recomputed; the round loop watched from inside
# ---------------------------------------------------------------------------------------------

def _fake_run(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 28, 28, generator=g)
    return SimpleNamespace(device=torch.device("cpu"), batches=lambda idx: [idx],
                           two_views=lambda b: (x[b] + 0.1, x[b].flip(-1)))


@pytest.mark.parametrize("loss,stage,cluster_loss", [("both", 1, "contrastive"), ("both", 2, "contrastive"),
                                                     ("noncontrastive", 2, "noncontrastive"),
                                                     ("contrastive", 2, "noncontrastive")])
def test_local_step_loss_has_every_term_and_the_target_follows_by_ema(loss, stage, cluster_loss):
    """The first step's loss = instance loss (L_N + lambda_C L_C, or one of them) [+ cluster loss in
    stage 2], recomputed from the same views; afterwards target = m target + (1 - m) online."""
    torch.manual_seed(12)
    args = fc.Args(loss=loss, cluster_loss=cluster_loss, lambda_c=0.5, tau=0.4, tau_c=0.8, tau_t=0.6,
                   momentum=0.9, local_epochs=1, lr=1e-3)
    online = fc.Net(common.SmallCNN(1, width=8), 16, 4)
    target = fc.Net(copy.deepcopy(online.encoder), 16, 4, predictor=False)
    target.load_state_dict(online.state_dict(), strict=False)
    with torch.no_grad():                                # a target that lags the online net, as after a few steps
        for p in target.parameters():
            p.add_(0.05 * torch.randn_like(p))
    on, tg, t0 = copy.deepcopy(online), copy.deepcopy(target), copy.deepcopy(target)
    run, idx = _fake_run(), torch.arange(16)
    v = torch.cat(run.two_views(idx))
    h = on.encoder(v)
    z = on.projector(h)
    with torch.no_grad():
        h_t = tg.encoder(v)
        z1_t, z2_t = tg.projector(h_t).chunk(2)
    n_loss = fc.byol_loss(*on.predictor(z).chunk(2), z1_t, z2_t)
    c_loss = common.nt_xent(*z.chunk(2), 0.4)
    want = {"both": n_loss + 0.5 * c_loss, "noncontrastive": n_loss, "contrastive": c_loss}[loss]
    want_clu = 0.0
    if stage == 2:
        a1, a2 = F.softmax(on.cluster(h), dim=1).chunk(2)
        if cluster_loss == "contrastive":
            want_clu = fc.cluster_loss_contrastive(a1, a2, 0.8)
        else:
            want_clu = fc.cluster_loss_noncontrastive(a1, a2, *tg.cluster(h_t).detach().chunk(2), 0.6)
    got, clu, images = fc.local_update(online, target, run, idx, args, stage)
    assert got.item() == pytest.approx(float(torch.as_tensor(want + want_clu).detach()), rel=1e-5)
    assert clu.item() == pytest.approx(float(torch.as_tensor(want_clu).detach()), rel=1e-5, abs=1e-7) and images == 32
    if loss != "contrastive" or cluster_loss == "noncontrastive":      # the target is used, so it moves
        for name in ("encoder", "projector", "cluster"):
            for (k, t), o, p0 in zip(getattr(target, name).named_parameters(), getattr(online, name).parameters(),
                                     getattr(t0, name).parameters()):
                assert torch.allclose(t, 0.9 * p0 + 0.1 * o, atol=1e-6), (name, k)


@pytest.mark.parametrize("keep_target", [False, True])
def test_round_loop_downloads_the_weighted_mean_switches_stage_and_sets_the_target(keep_target, monkeypatch, tmp_path):
    calls, real = [], fc.local_update
    state = lambda m: {k: v.detach().clone() for k, v in m.state_dict().items()}

    def update(online, target, run, idx, args, stage):
        entry = (state(online), state(target))
        out = real(online, target, run, idx, args, stage)
        calls.append(dict(idx=idx.clone(), clients=run.clients, stage=stage, entry=entry,
                          upload=state(online), target=state(target)))
        return out

    monkeypatch.setattr(fc, "local_update", update)
    folder = run_in_process(fc, *SMALL, "--clients", "3", "--partition", "dirichlet", "--alpha", "0.5",
                            "--cluster-rounds", "1", "--loss", "both", "--keep-target", str(keep_target).lower(),
                            out=tmp_path / "runs", monkeypatch=monkeypatch)
    sizes = [c["size"] for c in json.loads((folder / "partition.json").read_text())["clients"]]
    assert len(set(sizes)) > 1 and [c["stage"] for c in calls] == [1, 1, 1, 2, 2, 2]
    for i, c in enumerate(calls):
        assert torch.equal(c["idx"], c["clients"][i % 3])
        online, target = c["entry"]
        if i < 3 or not keep_target:                     # target := global online weights at download
            assert all(torch.equal(target[k], online[k]) for k in target)
        else:                                            # kept: the client's own target of last round
            assert all(torch.equal(target[k], calls[i - 3]["target"][k]) for k in target)
    mean = lambda ups: {k: sum(n * u[k] for n, u in zip(sizes, ups)) / sum(sizes) for k in ups[0]
                        if ups[0][k].is_floating_point()}
    for k, want in mean([c["upload"] for c in calls[:3]]).items():
        assert all(torch.allclose(c["entry"][0][k], want, atol=1e-6) for c in calls[3:]), k
    model = torch.load(folder / "checkpoint.pt", weights_only=False)["state"]["model"]
    for k, want in mean([c["upload"] for c in calls[3:]]).items():
        assert torch.allclose(model[k], want, atol=1e-6), k
