"""dec_ssl.py: each objective against a slow reference, FeatARC's assignment and per-cluster averaging
(with the released code's indexing defect reproduced and shown to fail), the server lr schedule, and
end-to-end runs for every --ssl value and for --featarc."""
import copy
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import dec_ssl
from conftest import (SMALL, TINY, assert_bad_input, assert_complete_run, assert_encoder_reproduces, read_run,
                      run_in_process, run_script, resume_to)


def cos(a, b):
    return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def test_simclr_objective_is_nt_xent_over_2b_views():
    torch.manual_seed(0)
    z1, z2, tau = torch.randn(5, 7), torch.randn(5, 7), 0.5
    z = [F.normalize(v, dim=0).tolist() for v in torch.cat([z1, z2])]
    total = 0.0
    for i in range(10):        # view i's positive is its partner, every other view a negative
        j = (i + 5) % 10
        denom = sum(math.exp(sum(a * b for a, b in zip(z[i], z[k])) / tau) for k in range(10) if k != i)
        total += -math.log(math.exp(sum(a * b for a, b in zip(z[i], z[j])) / tau) / denom)
    assert common.nt_xent(z1, z2, tau).item() == pytest.approx(total / 10, rel=1e-5)


@pytest.mark.parametrize("name", ["simsiam", "byol"])
def test_negative_cosine_losses_and_stop_gradient(name):
    """Value against a loop; the predictor h gets gradient, the target branch does not."""
    torch.manual_seed(1)
    h = nn.Linear(6, 6)
    z1, z2 = torch.randn(4, 6, requires_grad=True), torch.randn(4, 6, requires_grad=True)
    p1, p2 = h(z1), h(z2)
    if name == "simsiam":      # D(p1, z2)/2 + D(p2, z1)/2, D = -cos
        loss = dec_ssl.simsiam_loss(p1, p2, z1, z2)
        ref = sum(-cos(p1[i].tolist(), z2[i].tolist()) / 2 - cos(p2[i].tolist(), z1[i].tolist()) / 2
                  for i in range(4)) / 4
    else:                      # ||p/|p| - t/|t|||^2 summed over both view orders
        loss = dec_ssl.byol_loss(p1, p2, z1, z2)
        ref = sum(((F.normalize(p1[i], dim=0) - F.normalize(z2[i], dim=0)) ** 2).sum().item()
                  + ((F.normalize(p2[i], dim=0) - F.normalize(z1[i], dim=0)) ** 2).sum().item() for i in range(4)) / 4
    assert loss.item() == pytest.approx(ref, rel=1e-5)
    loss.backward()
    assert h.weight.grad.abs().sum() > 0                              # the predictor learns
    # z reaches the loss twice: through h (gradient) and as a target (stop-gradient); only the first counts
    zc1, zc2 = z1.detach().clone().requires_grad_(), z2.detach().clone().requires_grad_()
    fn = dec_ssl.simsiam_loss if name == "simsiam" else dec_ssl.byol_loss
    fn(h(zc1), h(zc2), z1.detach(), z2.detach()).backward()
    assert torch.allclose(z1.grad, zc1.grad, atol=1e-6) and torch.allclose(z2.grad, zc2.grad, atol=1e-6)
    zf1, zf2 = z1.detach().clone().requires_grad_(), z2.detach().clone().requires_grad_()
    p1f, p2f = h(zf1), h(zf2)          # without stop-gradient the target path would add gradient
    (-(F.cosine_similarity(p1f, zf2).mean() + F.cosine_similarity(p2f, zf1).mean())).backward()
    assert not torch.allclose(zf1.grad * (0.5 if name == "simsiam" else 2), z1.grad, atol=1e-4)


def test_moco_loss_matches_loop_and_keys_get_no_gradient():
    torch.manual_seed(2)
    q1, q2 = torch.randn(3, 5, requires_grad=True), torch.randn(3, 5, requires_grad=True)
    k1, k2 = torch.randn(3, 5, requires_grad=True), torch.randn(3, 5, requires_grad=True)
    queue, tau = F.normalize(torch.randn(4, 5), dim=1), 0.2
    loss = dec_ssl.moco_loss(q1, q2, k1, k2, queue, tau)

    def infonce(q, k):
        total = 0.0
        for i in range(3):
            logits = [cos(q[i].tolist(), k[i].tolist()) / tau] + [cos(q[i].tolist(), n.tolist()) / tau for n in queue]
            total += -logits[0] + math.log(sum(math.exp(v) for v in logits))
        return total / 3
    assert loss.item() == pytest.approx((infonce(q1, k2) + infonce(q2, k1)) / 2, rel=1e-5)
    loss.backward()
    assert k1.grad is None and k2.grad is None and q1.grad.abs().sum() > 0


def test_featarc_alignment_term():
    torch.manual_seed(3)
    a = F.normalize(torch.randn(4, 6), dim=1).requires_grad_()
    z1, z2 = torch.randn(4, 6, requires_grad=True), torch.randn(4, 6)
    ref = -0.5 * sum(cos(a[i].tolist(), z1[i].tolist()) + cos(a[i].tolist(), z2[i].tolist()) for i in range(4)) / 4
    loss = dec_ssl.featarc_align(a, z1, z2)
    assert loss.item() == pytest.approx(ref, rel=1e-5)
    loss.backward()
    assert a.grad is None and z1.grad.abs().sum() > 0                # the anchor is frozen


def test_assignment_picks_the_best_aligned_cluster():
    torch.manual_seed(4)
    own = F.normalize(torch.randn(50, 8), dim=1)
    far, near, opposite = F.normalize(torch.randn(50, 8), dim=1), F.normalize(own + 0.3 * torch.randn(50, 8), dim=1), -own
    assert dec_ssl.assign_cluster(own, [far, near, opposite]) == 1
    assert dec_ssl.assign_cluster(own, [opposite, far]) == 1
    # with real encoders: a client whose last local model is cluster 2 (slightly trained) goes back to 2
    x = torch.randint(0, 256, (40, 1, 28, 28), dtype=torch.uint8)
    data = common.Data(x, torch.zeros(40, dtype=torch.long), x, torch.zeros(40, dtype=torch.long), 10, (0.3,), (0.35,))
    run = SimpleNamespace(data=data, augment=common.Augment(data))
    encs = [common.SmallCNN(1) for _ in range(3)]
    local = copy.deepcopy(encs[2])
    with torch.no_grad():
        for p in local.parameters():
            p.add_(0.01 * torch.randn_like(p))
    idx = torch.arange(40)
    feats = [dec_ssl.clean_features(e, run, idx) for e in encs]
    assert dec_ssl.assign_cluster(dec_ssl.clean_features(local, run, idx), feats) == 2


def _states(ids):
    """One upload per client: a weight equal to the client id and a BN-style integer counter."""
    return [{"w": torch.tensor([float(c)]), "n": torch.tensor(10 * c)} for c in ids]


def _check_cluster_average(aggregate_fn):
    """6 clients, 3 sampled, in the order 2, 4, 1; cluster assignments known for all six (as in the
    released code); only SAMPLED clients may enter, each into its own cluster."""
    order, assign_all = [2, 4, 1], [1, 0, 0, 1, 1, 1]
    out = aggregate_fn(order, _states(order), assign_all, 2)
    assert out[0]["w"].item() == pytest.approx((1 + 2) / 2)          # clients 1 and 2
    assert out[1]["w"].item() == pytest.approx(4.0)                  # client 4 only
    assert out[1]["n"].dtype == torch.int64 and out[1]["n"].item() == 40


def test_per_cluster_average_is_keyed_by_client_id():
    ours = lambda order, ups, assign_all, C: dec_ssl.aggregate(
        dict(zip(order, ups)), {c: assign_all[c] for c in order}, C)
    _check_cluster_average(ours)


def test_the_released_indexing_fails_the_same_check():
    def released(order, local_weights, assign_all, C):   # decentralized_featarc_ssl_main.py, transcribed
        out = {}
        for i in range(C):
            selected_idx = np.where(np.array(assign_all) == i)[0]
            if len(selected_idx) > 0:
                out[i] = common.fedavg([local_weights[idx] for idx in selected_idx])
        return out
    with pytest.raises((AssertionError, IndexError)):
        _check_cluster_average(released)


def test_weighted_per_cluster_average_uses_the_members_sizes():
    sizes = torch.tensor([1.0, 3.0, 100.0, 1.0], dtype=torch.float64)
    ups = {0: _states([0])[0], 1: _states([1])[0], 3: _states([3])[0]}
    out = dec_ssl.aggregate(ups, {0: 0, 1: 0, 3: 1}, 2, weights=sizes)
    assert out[0]["w"].item() == pytest.approx((0 * 1 + 1 * 3) / 4) and out[1]["w"].item() == 3.0


def test_server_lr_schedule_and_the_released_few_rounds_defect():
    def released(R):            # MultiStepLR with milestones [int(.3R), int(.6R), int(.9R)], stepped per round
        opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, [int(R * 0.3), int(R * 0.6), int(R * 0.9)], gamma=0.3)
        lrs = []
        for _ in range(R):
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return lrs
    ours = lambda R: [dec_ssl.server_lr(SimpleNamespace(lr=1.0, lr_decay=True, rounds=R), r) for r in range(1, R + 1)]
    for R in (10, 20, 50):      # integer milestones: identical to the released schedule
        assert ours(R) == pytest.approx(released(R))
    for R in (1, 2, 3):         # few rounds: the released schedule starts decayed, ours starts at lr
        assert released(R)[0] < 1.0 and ours(R)[0] == 1.0
    assert ours(2) == pytest.approx([1.0, 0.3]) and ours(4) == pytest.approx([1.0, 1.0, 0.3, 0.09])
    decays = lambda lrs: [r for r in range(1, len(lrs)) if lrs[r] < lrs[r - 1]]    # rounds after which lr drops
    assert decays(ours(15)) == [5, 9, 14] and decays(released(15)) == [4, 9, 13]   # not a multiple of 10


def test_first80_keeps_the_first_80_percent_of_the_label_ordered_list():
    y = torch.tensor([3, 0, 1, 0, 2, 1, 3, 2, 1, 0])
    run = SimpleNamespace(clients=[torch.arange(10)], data=SimpleNamespace(train_y=y))
    idx = dec_ssl.client_indices(run, 0, SimpleNamespace(first80=True))
    assert y[idx].tolist() == [0, 0, 0, 1, 1, 1, 2, 2]                # class 3 is dropped entirely
    assert len(dec_ssl.client_indices(run, 0, SimpleNamespace(first80=False))) == 10


def test_byol_target_is_a_frozen_copy_and_reset_matches_online():
    args = dec_ssl.Args(ssl="byol", hidden_dim=16)
    m = dec_ssl.SSLModel(args, common.SmallCNN(1, width=4))
    assert all(not p.requires_grad for p in m.target.parameters())
    with torch.no_grad():
        m.encoder.net[0].weight.add_(1.0)
    m.reset_target()
    assert torch.equal(m.target[0].net[0].weight, m.encoder.net[0].weight)
    assert dec_ssl.SSLModel(dec_ssl.Args(ssl="simclr"), common.SmallCNN(1)).target is None


@pytest.mark.parametrize("ssl", ["simclr", "simsiam", "byol", "moco"])
def test_end_to_end_every_objective(ssl, out):
    proc, folder = run_script("dec_ssl.py", *TINY, "--ssl", ssl, "--partition", "dirichlet", "--alpha", "0.5", out=out)
    assert proc.returncode == 0, proc.stderr
    summary, metrics = assert_complete_run(folder, rounds=2)
    assert summary["ssl"] == ssl
    assert_encoder_reproduces(folder, summary["knn_acc"])
    assert [m["lr"] for m in metrics] == pytest.approx([1e-3, 3e-4])  # 2 rounds: decayed once, in round 2


def test_featarc_end_to_end_and_resume(out, tmp_path):
    # seed 1: its draws give each cluster a client (2 of 4 clients for 2 rounds may leave one untrained, which
    # makes the run incomplete); seed 0 did so before clients drew from their own streams (#17), not after
    flags = [*TINY, "--clients", "4", "--ssl", "byol", "--featarc", "true", "--clusters", "2", "--participation", "0.5",
             "--seed", "1"]
    proc, folder = run_script("dec_ssl.py", *flags, out=out)
    assert proc.returncode == 0, proc.stderr
    summary, metrics = assert_complete_run(folder, rounds=2)
    assert len(summary["clusters"]) == 2 and "MEAN" in summary["headline"]
    for key in common.EVAL_KEYS:
        assert summary[key] == pytest.approx(sum(c[key] for c in summary["clusters"]) / 2), key
    best = summary["best_cluster"]
    assert best["linear_acc"] == max(c["linear_acc"] for c in summary["clusters"])
    assert best["knn_acc"] == summary["clusters"][best["cluster"]]["knn_acc"]
    assert_encoder_reproduces(folder, summary["clusters"][1]["knn_acc"], index=1)    # one encoder per cluster
    for m in metrics:           # 2 of 4 clients per round, each in cluster 0 or 1; the others -1
        assert sorted(m["assign"])[:2] == [-1, -1] and all(a in (0, 1) for a in sorted(m["assign"])[2:])
        assert m["knn_acc"] == pytest.approx(sum(m["knn_clusters"]) / 2)
    # resume: stop after round 1, continue to 2, get the uninterrupted run's numbers
    out2 = tmp_path / "runs2"
    proc, half = run_script("dec_ssl.py", *flags, "--rounds", "1", out=out2)
    assert proc.returncode == 0, proc.stderr
    proc = resume_to("dec_ssl.py", half, out2, rounds=2)
    assert proc.returncode == 0, proc.stderr
    resumed, rmetrics, _ = read_run(half)
    for a, b in zip(metrics, rmetrics):
        assert (a["loss"], a["assign"], a["knn_clusters"]) == (b["loss"], b["assign"], b["knn_clusters"])
    assert resumed["linear_acc"] == summary["linear_acc"]


# --- FeatARC's rule, and what the round loop does with it ------------------------------------------

def _tiny_run(n=40, seed=7):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=g)
    data = common.Data(x, torch.zeros(n, dtype=torch.long), x, torch.zeros(n, dtype=torch.long), 10, (0.3,), (0.35,))
    return SimpleNamespace(data=data, augment=common.Augment(data), device=torch.device("cpu"))


def _moved(model, scale, seed):
    """A copy of `model` with every parameter moved a little, as a few local steps would."""
    g = torch.Generator().manual_seed(seed)
    m = copy.deepcopy(model)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return m


def _cluster_models(encoders):
    args = dec_ssl.Args(hidden_dim=8)
    models = [dec_ssl.SSLModel(args, common.SmallCNN(1, width=8)) for _ in encoders]
    for m, e in zip(models, encoders):
        m.encoder.load_state_dict(e.state_dict())
    return models


@pytest.mark.parametrize("sample", [0, 16])
def test_featarc_rule_moves_a_client_whose_model_belongs_to_the_other_cluster(sample):
    """Client 0 (k mod C = 0) whose last local model is close to cluster 1's (its data made it so) and
    far from cluster 0's: the rule moves it to cluster 1, and its anchors are cluster 1's features of all
    its images; also when scored on 16 random images of its 40."""
    torch.manual_seed(8)
    run, idx = _tiny_run(), torch.arange(40)
    c0, c1 = common.SmallCNN(1, width=8), common.SmallCNN(1, width=8)      # initialised independently
    local = _moved(c1, 0.02, seed=1)
    j, anchors = dec_ssl.featarc_choose(local, _cluster_models([c0, c1]), run, idx, sample)
    assert j == 1 and j != 0 % 2
    assert torch.allclose(anchors, dec_ssl.clean_features(c1, run, idx))
    assert not torch.allclose(anchors, dec_ssl.clean_features(c0, run, idx), atol=1e-2)


@pytest.mark.parametrize("sample", [0, 16])
def test_featarc_rule_keeps_a_client_whose_cluster_averages_its_own_model(sample):
    """Why assignments stay at k mod C once the indexing defect is fixed: cluster 0 is the mean of this
    client's last model and a sibling's (both trained from cluster 0), cluster 1 an independent model
    moved the same way by its own members; the client's own cluster always aligns better (also on 16
    random images of its 40)."""
    torch.manual_seed(9)
    run, idx = _tiny_run(), torch.arange(40)
    start0, start1 = common.SmallCNN(1, width=8), common.SmallCNN(1, width=8)
    local, sibling = _moved(start0, 0.05, seed=2), _moved(start0, 0.05, seed=3)
    c0 = copy.deepcopy(start0)
    c0.load_state_dict(common.fedavg([local.state_dict(), sibling.state_dict()]))
    c1 = copy.deepcopy(start1)
    c1.load_state_dict(common.fedavg([_moved(start1, 0.05, seed=4).state_dict(), _moved(start1, 0.05, seed=5).state_dict()]))
    assert dec_ssl.featarc_choose(local, _cluster_models([c0, c1]), run, idx, sample)[0] == 0


def _old_featarc_choose(last_local, clusters, run, idx):
    """The rule as it was (reference): C + 1 separate eval passes, common.features in chunks of 1024."""
    def feats(encoder):
        return F.normalize(common.features(encoder, run.data.train_x[idx], run.augment), dim=1)
    cluster_feats = [feats(m.encoder) for m in clusters]
    own = feats(last_local)
    j = int(torch.stack([(own * f).sum(1).mean() for f in cluster_feats]).argmax())
    return j, cluster_feats[j]


@pytest.mark.parametrize("sample", [0, dec_ssl.Args().featarc_sample])
@pytest.mark.parametrize("case", range(8))
def test_featarc_one_pass_chooses_what_the_separate_passes_chose(case, sample):
    """featarc_choose scores every cluster in one chunked pass over the client's images; on constructed
    cases (2 or 3 clusters with trained BN statistics, a last local model near one cluster, one nearly tied
    between two, the mean of two, an independent one) it picks the old rule's cluster and returns its anchors
    of all the images; also when it scores the clusters on --featarc-sample's default of random images."""
    torch.manual_seed(case)
    run, idx = _tiny_run(n=300, seed=case), torch.randperm(300)[:290]      # 3 chunks of 128, the last partial
    encs = [common.SmallCNN(1, width=8) for _ in range(2 + case % 2)]
    for e in encs:                                                          # BN running statistics != 0 / 1
        e(torch.randn(64, 1, 28, 28) * (1 + torch.rand(1)))
        e.eval()
    near = case % len(encs)
    local = (_moved(encs[near], 0.01 * (1 + case), seed=case) if case < 6 else
             common.SmallCNN(1, width=8).eval() if case == 6 else _moved(encs[0], 0.0, seed=0))
    if case == 7:                                                           # the mean of two clusters
        local.load_state_dict(common.fedavg([encs[0].state_dict(), encs[1].state_dict()]))
    clusters = _cluster_models(encs)                                        # (in training mode)
    modes = [local.training] + [m.encoder.training for m in clusters]
    j_old, a_old = _old_featarc_choose(local, clusters, run, idx)
    j_new, a_new = dec_ssl.featarc_choose(local, clusters, run, idx, sample)
    assert j_new == j_old and (case >= 5 or j_new == near)                # case 5: a near tie (0.64 vs 0.64)
    assert torch.allclose(a_new, a_old, atol=1e-5)
    assert [local.training] + [m.encoder.training for m in clusters] == modes         # modes restored


def test_featarc_scores_a_sample_then_computes_anchors_for_the_chosen_cluster_only(monkeypatch):
    """--featarc-sample S < N images: S images go through the last local model and the C cluster models,
    the other N - S through the chosen cluster's only, i.e. N + C x S image passes instead of (C + 1) x N;
    the scored images are a fresh random draw."""
    torch.manual_seed(3)
    run, idx = _tiny_run(n=200), torch.arange(100, 200)          # the client's images: not 0 .. N-1
    encs = [common.SmallCNN(1, width=8).eval() for _ in range(3)]
    calls, real = [], dec_ssl.clean_features_of
    monkeypatch.setattr(dec_ssl, "clean_features_of",
                        lambda encoders, run_, images, *a: calls.append((len(encoders), images.tolist())) or
                        real(encoders, run_, images, *a))
    j, anchors = dec_ssl.featarc_choose(_moved(encs[2], 0.01, seed=0), _cluster_models(encs), run, idx, 30)
    assert j == 2 and [(n, len(images)) for n, images in calls] == [(4, 30), (1, 70)]
    assert sorted(calls[0][1] + calls[1][1]) == idx.tolist()                  # every image: scored or not
    assert torch.allclose(anchors, real([encs[2]], run, idx)[0], atol=1e-5)   # cluster 2's, in idx's order
    dec_ssl.featarc_choose(encs[0], _cluster_models(encs), run, idx, 30)
    assert calls[2][1] != calls[0][1]


def test_featarc_round_loop_uses_the_rule_trains_from_and_aligns_to_the_assigned_cluster(monkeypatch, tmp_path):
    """main() with a rule that puts every client into cluster 1 (client 0's k mod C is 0): the metrics
    say so, each client starts from cluster 1's model and is anchored to its features, next round the
    rule sees the client's own last model, cluster 1 becomes the mean of its members' uploads and
    cluster 0, without members, keeps its weights."""
    seen, trained, uploads, cluster_states = [], {}, [], []
    real_update, real_choose = dec_ssl.local_update, dec_ssl.featarc_choose

    def rule(own, cluster_feats):
        seen.append((own.clone(), [f.clone() for f in cluster_feats]))
        return 1

    def among(rows, feats):                                           # every row is one of feats' rows
        return torch.cdist(rows, feats, compute_mode="donot_use_mm_for_euclid_dist").min(1).values.max() < 1e-4

    def update(model, run, idx, args, lr, anchors=None, opt=None):
        own, feats = seen[-1]
        key = int(idx[0])
        assert len(own) == args.featarc_sample == 64 < len(idx)       # scored on 64 random images of 100
        start = dec_ssl.clean_features(model.encoder, run, idx)
        assert among(feats[1], start) and torch.allclose(anchors[idx], start, atol=1e-5)   # starts from and
        if key in trained:                                            # is anchored to 1; round 2: compared
            assert among(own, trained[key])                           # its own last model
        out = real_update(model, run, idx, args, lr, anchors, opt)
        trained[key] = dec_ssl.clean_features(model.encoder, run, idx)
        uploads.append({k: v.clone() for k, v in model.state_dict().items()})
        return out

    def choose(last_local, clusters, *a):
        cluster_states.append([{k: v.clone() for k, v in m.encoder.state_dict().items()} for m in clusters])
        return real_choose(last_local, clusters, *a)

    monkeypatch.setattr(dec_ssl, "assign_cluster", rule)
    monkeypatch.setattr(dec_ssl, "local_update", update)
    monkeypatch.setattr(dec_ssl, "featarc_choose", choose)
    with pytest.raises(SystemExit) as stop:     # cluster 0 never trained: the run ends incomplete, exit 1
        run_in_process(dec_ssl, *SMALL, "--clients", "2", "--partition", "iid", "--featarc", "true",
                       "--clusters", "2", "--hidden-dim", "16", out=tmp_path / "runs", monkeypatch=monkeypatch)
    assert stop.value.code == 1
    folder = sorted((tmp_path / "runs").glob("*/"))[-1]
    assert "cluster 0 was never trained" in json.loads((folder / "summary.json").read_text())["incomplete"]
    metrics = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [m["assign"] for m in metrics] == [[1, 1], [1, 1]]
    assert len(seen) == 4 and len(trained) == 2
    for c in (0, 1):                    # calls: round 1 client 0, client 1, round 2 client 0, client 1
        before, after = cluster_states[c], cluster_states[2 + c]
        assert all(torch.equal(after[0][k], v) for k, v in before[0].items())         # cluster 0 never changed
        assert not all(torch.allclose(after[1][k], v) for k, v in before[1].items())  # cluster 1 did
    ckpt = torch.load(folder / "checkpoint.pt", weights_only=False)["state"]["clusters"]
    for k, v in uploads[2].items():                                        # round 2's two uploads
        if v.is_floating_point():
            assert torch.allclose(ckpt[f"1.{k}"], (uploads[2][k] + uploads[3][k]) / 2, atol=1e-6), k


@pytest.mark.parametrize("target", ["average", "reset"])
def test_byol_target_at_download_and_unweighted_server_mean(target, monkeypatch, tmp_path):
    """Round 2 downloads the UNWEIGHTED mean of round 1's uploads (clients of different sizes), target
    network included: averaged like the online one (--target average) or reset to the online one."""
    entries, uploads = [], []
    real_update = dec_ssl.local_update

    def update(model, run, idx, args, lr, anchors=None, opt=None):
        entries.append({k: v.clone() for k, v in model.state_dict().items()})
        out = real_update(model, run, idx, args, lr, anchors, opt)
        uploads.append({k: v.clone() for k, v in model.state_dict().items()})
        return out

    monkeypatch.setattr(dec_ssl, "local_update", update)
    folder = run_in_process(dec_ssl, *SMALL, "--clients", "2", "--partition", "dirichlet", "--alpha", "0.3",
                            "--ssl", "byol", "--target", target, "--hidden-dim", "16",
                            out=tmp_path / "runs", monkeypatch=monkeypatch)
    sizes = json.loads((folder / "partition.json").read_text())["clients"]
    assert sizes[0]["size"] != sizes[1]["size"]
    online = [k for k in entries[2] if k.startswith(("encoder.", "projector.")) and entries[2][k].is_floating_point()]
    for k in online:
        mean = (uploads[0][k] + uploads[1][k]) / 2
        assert torch.allclose(entries[2][k], mean, atol=1e-6), k
        t = "target." + ("0." if k.startswith("encoder.") else "1.") + k.split(".", 1)[1]
        want = (uploads[0][t] + uploads[1][t]) / 2 if target == "average" else mean
        assert torch.allclose(entries[2][t], want, atol=1e-6), t
    assert any(not torch.allclose(entries[2]["target.0." + k.split(".", 1)[1]], entries[2][k])
               for k in online if k.startswith("encoder.")) == (target == "average")


def test_alignment_term_enters_the_loss_with_weight_lambda():
    """local_update's first-step loss = L_SSL + lam * align(anchors[b], z1, z2), computed on the same views;
    the anchors are indexed by image id, and the batch is a shuffled subset of the images, so only the
    anchors of the batch's own images, in the batch's order, give this value."""
    torch.manual_seed(10)
    x = torch.randn(32, 1, 28, 28)
    idx = torch.arange(1, 32, 2)                                           # the client's images: the odd ids
    b = idx[torch.randperm(16)]
    run = SimpleNamespace(device=torch.device("cpu"), batches=lambda idx: [b],
                          two_views=lambda b: (x[b] + 0.1, x[b].flip(-1)))
    args = dec_ssl.Args(hidden_dim=8, lam=0.5, local_epochs=1)
    model = dec_ssl.SSLModel(args, common.SmallCNN(1, width=8))
    anchors = F.normalize(torch.randn(32, model.out_dim), dim=1)           # one row per image id
    ref = copy.deepcopy(model)
    v1, v2 = run.two_views(b)
    l_ssl, z1, z2, _ = dec_ssl.ssl_step(ref, v1, v2, args, None)
    want = l_ssl + 0.5 * dec_ssl.featarc_align(anchors[b], z1, z2)
    loss, _ = dec_ssl.local_update(model, run, idx, args, 1e-3, anchors)
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    assert abs(dec_ssl.featarc_align(anchors[b], z1, z2).item()) > 1e-3   # the term is not negligible
    for other in (anchors[idx], anchors[:16], anchors[b.sort().values]):  # other rows give another loss
        assert abs((l_ssl + 0.5 * dec_ssl.featarc_align(other, z1, z2)).item() - loss.item()) > 1e-4


@pytest.mark.parametrize("ssl", ["byol", "moco"])
def test_target_follows_the_online_network_by_ema_after_each_step(ssl):
    """After one local step: target params = m * target params before + (1 - m) * online params after the
    step (xi <- m xi + (1 - m) theta), target BN statistics = the online ones."""
    torch.manual_seed(14)
    x = torch.randn(16, 1, 28, 28)
    run = SimpleNamespace(device=torch.device("cpu"), batches=lambda idx: [idx],
                          two_views=lambda b: (x[b] + 0.1, x[b].flip(-1)))
    args = dec_ssl.Args(ssl=ssl, hidden_dim=8, local_epochs=1, ema=0.9)
    model = dec_ssl.SSLModel(args, common.SmallCNN(1, width=8))
    with torch.no_grad():                                                  # a target unlike the online net
        for p in model.target.parameters():
            p.add_(0.1 * torch.randn_like(p))
    t0 = copy.deepcopy(model.target)
    dec_ssl.local_update(model, run, torch.arange(16), args, 1e-2)
    online = nn.Sequential(model.encoder, model.projector)
    for (k, t), p0, p in zip(model.target.named_parameters(), t0.parameters(), online.parameters()):
        assert torch.allclose(t, 0.9 * p0 + 0.1 * p, atol=1e-6), k
        assert not torch.allclose(t, p0, atol=1e-5), k                     # it moved
    for t, o in zip(model.target.buffers(), online.buffers()):
        assert torch.equal(t, o)


def test_moco_with_an_empty_queue_takes_the_other_images_keys_as_negatives():
    """A round's first step (empty queue): q_i's negatives are k1_j, k2_j for j != i, checked against a loop."""
    torch.manual_seed(12)
    q1, q2 = torch.randn(3, 5, requires_grad=True), torch.randn(3, 5, requires_grad=True)
    k1, k2 = torch.randn(3, 5, requires_grad=True), torch.randn(3, 5, requires_grad=True)
    loss = dec_ssl.moco_loss(q1, q2, k1, k2, torch.zeros(0, 5), 0.2)

    def infonce(q, k, k_same):
        total = 0.0
        for i in range(3):
            negs = [n.tolist() for j in range(3) if j != i for n in (k[j], k_same[j])]
            logits = [cos(q[i].tolist(), k[i].tolist()) / 0.2] + [cos(q[i].tolist(), n) / 0.2 for n in negs]
            total += -logits[0] + math.log(sum(math.exp(v) for v in logits))
        return total / 3
    assert loss.item() == pytest.approx((infonce(q1, k2, k1) + infonce(q2, k1, k2)) / 2, rel=1e-5)
    assert loss.item() > 1.0                                               # ~log(5): not the 0 of no negatives
    loss.backward()
    assert k1.grad is None and k2.grad is None and q1.grad.abs().sum() > 0


def _moco_client(seed, **kw):
    torch.manual_seed(seed)
    x = torch.randn(16, 1, 28, 28)
    run = SimpleNamespace(device=torch.device("cpu"), batches=lambda idx: [idx[:8], idx[8:]],
                          two_views=lambda b: (x[b] + 0.1, x[b].flip(-1)))
    args = dec_ssl.Args(ssl="moco", hidden_dim=8, local_epochs=1, queue_size=100, **kw)
    return run, args, dec_ssl.SSLModel(args, common.SmallCNN(1, width=8))


def test_moco_queue_starts_empty_every_round_and_the_first_step_still_trains(monkeypatch):
    """MoCo's queue lives on the client for one local update: 0 keys at its first step, 2B more per step;
    the first step's loss is InfoNCE over in-batch negatives (> 0), not the 0 of an empty queue."""
    run, args, model = _moco_client(11)
    lengths, losses, real = [], [], dec_ssl.moco_loss

    def spy(q1, q2, k1, k2, queue, tau):
        lengths.append(len(queue))
        losses.append(real(q1, q2, k1, k2, queue, tau).item())
        return real(q1, q2, k1, k2, queue, tau)
    monkeypatch.setattr(dec_ssl, "moco_loss", spy)
    for _ in range(2):                                                     # two rounds
        dec_ssl.local_update(model, run, torch.arange(16), args, 1e-3)
    assert lengths == [0, 16, 0, 16]
    assert losses[0] > 1.0 and losses[2] > 1.0                              # log(2B-1) = log(15) ~ 2.7 at chance


def test_moco_first_step_of_a_round_moves_the_encoder_by_its_gradient():
    """Without weight decay a step with zero gradient would leave Adam's parameters where they are: the
    first step of a round (empty queue) must change the encoder."""
    run, args, model = _moco_client(13, weight_decay=0.0)
    run.batches = lambda idx: [idx[:8]]                                    # one step: the first
    before = copy.deepcopy(model.encoder.state_dict())
    dec_ssl.local_update(model, run, torch.arange(16), args, 1e-3)
    moved = [k for k, v in model.encoder.state_dict().items() if v.is_floating_point() and not torch.equal(v, before[k])]
    assert "net.0.weight" in moved


def _record_round_loop(monkeypatch, tmp_path, *flags):
    """main() in this process; per local_update call: the images, the model at entry and at upload, and
    the lr of every optimizer step it took."""
    calls, real_update, real_step = [], dec_ssl.local_update, torch.optim.Adam.step
    state = lambda m: {k: v.detach().clone() for k, v in m.state_dict().items()}

    def update(model, run, idx, args, lr, anchors=None, opt=None):
        call = dict(idx=idx.clone(), clients=run.clients, y=run.data.train_y, entry=state(model), lrs=[])
        calls.append(call)
        out = real_update(model, run, idx, args, lr, anchors, opt)
        call["upload"] = state(model)
        return out

    def step(self, *a, **kw):
        if calls and "upload" not in calls[-1]:                           # inside a local update
            calls[-1]["lrs"].append(self.param_groups[0]["lr"])
        return real_step(self, *a, **kw)
    monkeypatch.setattr(dec_ssl, "local_update", update)
    monkeypatch.setattr(torch.optim.Adam, "step", step)
    folder = run_in_process(dec_ssl, *SMALL, "--clients", "2", "--partition", "dirichlet", "--alpha", "0.3",
                            "--hidden-dim", "16", *flags, out=tmp_path / "runs", monkeypatch=monkeypatch)
    sizes = [c["size"] for c in json.loads((folder / "partition.json").read_text())["clients"]]
    return calls, sizes


def test_every_client_step_uses_the_rounds_server_lr(monkeypatch, tmp_path):
    """The server's schedule reaches the clients' optimizers: round 2's steps run at server_lr(args, 2)."""
    calls, _ = _record_round_loop(monkeypatch, tmp_path)
    args = dec_ssl.Args(rounds=2)
    assert len(calls) == 4 and all(c["lrs"] for c in calls)
    for i, c in enumerate(calls):
        assert c["lrs"] == pytest.approx([dec_ssl.server_lr(args, 1 + i // 2)] * len(c["lrs"]))
    assert dec_ssl.server_lr(args, 2) == pytest.approx(3e-4)


def test_weighted_and_first80_reach_the_round_loop(monkeypatch, tmp_path):
    """--first80 true: each client trains on client_indices' label-ordered first 80 %; --weighted true:
    round 2 downloads the mean of round 1's uploads weighted by the clients' image counts."""
    calls, sizes = _record_round_loop(monkeypatch, tmp_path, "--first80", "true", "--weighted", "true")
    assert len(calls) == 4 and sizes[0] != sizes[1]
    for i, c in enumerate(calls):
        full, y = c["clients"][i % 2], c["y"]
        want = full[torch.argsort(y[full], stable=True)][: int(0.8 * len(full))]
        assert torch.equal(c["idx"], want) and len(want) < len(full)
    for k, v in calls[2]["entry"].items():
        if v.is_floating_point():
            want = (sizes[0] * calls[0]["upload"][k] + sizes[1] * calls[1]["upload"][k]) / sum(sizes)
            assert torch.allclose(v, want, atol=1e-6), k
            assert torch.equal(v, calls[3]["entry"][k])


@pytest.mark.parametrize("ssl", ["byol", "moco"])
def test_each_view_is_predicted_from_the_other_views_target(ssl):
    """ssl_step's loss pairs the online output of view 1 with the TARGET's output of view 2 and vice versa
    (BYOL Eq. 2 symmetrised, MoCo's positive key); the keys it returns are the target's, normalised."""
    torch.manual_seed(15)
    x = torch.randn(8, 1, 28, 28)
    v1, v2 = x + 0.1, x.flip(-1)
    model = dec_ssl.SSLModel(dec_ssl.Args(ssl=ssl, hidden_dim=8), common.SmallCNN(1, width=8))
    with torch.no_grad():                                                  # a target unlike the online net
        for p in model.target.parameters():
            p.add_(0.2 * torch.randn_like(p))
    queue = F.normalize(torch.randn(5, model.out_dim), dim=1)
    ref = copy.deepcopy(model)
    both = torch.cat([v1, v2])
    z1, z2 = ref.projector(ref.encoder(both)).chunk(2)
    with torch.no_grad():
        t1, t2 = ref.target(both).chunk(2)
    if ssl == "byol":
        p1, p2 = ref.predictor(torch.cat([z1, z2])).chunk(2)
        want = (4 - 2 * F.cosine_similarity(p1, t2) - 2 * F.cosine_similarity(p2, t1)).mean()
    else:
        want = (common.info_nce(z1, t2, queue, 0.2) + common.info_nce(z2, t1, queue, 0.2)) / 2
    loss, _, _, keys = dec_ssl.ssl_step(model, v1, v2, dec_ssl.Args(ssl=ssl, hidden_dim=8), queue)
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    if ssl == "moco":
        assert torch.allclose(keys, F.normalize(torch.cat([t1, t2]), dim=1), atol=1e-6)


def test_moco_queue_keeps_the_newest_keys(monkeypatch):
    """Queue of 2B keys: at every step after the first it holds exactly the previous step's keys."""
    run, args, model = _moco_client(16)
    args.queue_size = 16
    run.batches = lambda idx: [idx[:8], idx[8:], idx[:8]]
    queues, keys, real = [], [], dec_ssl.ssl_step

    def spy(model_, v1, v2, args_, queue):
        queues.append(queue.clone())
        out = real(model_, v1, v2, args_, queue)
        keys.append(out[3].clone())
        return out
    monkeypatch.setattr(dec_ssl, "ssl_step", spy)
    dec_ssl.local_update(model, run, torch.arange(16), args, 1e-3)
    assert [len(q) for q in queues] == [0, 16, 16]
    assert torch.equal(queues[1], keys[0]) and torch.equal(queues[2], keys[1])


def test_bn_reestimate_is_the_plain_average_over_the_training_set():
    """After reestimate_bn the first BatchNorm's running mean is the per-channel mean of its input over all
    training images (3 equal batches: the mean of the batch means), not a momentum average."""
    torch.manual_seed(17)
    run = _tiny_run(n=24)
    enc = common.SmallCNN(1, width=8)
    out = dec_ssl.reestimate_bn(enc, run, batch=8)
    with torch.no_grad():
        h = enc.net[0](run.augment.plain(run.data.train_x))               # the first conv's output
    assert torch.allclose(out.net[1].running_mean, h.mean((0, 2, 3)), atol=1e-5)
    assert not out.training and enc.net[1].running_mean.abs().sum() == 0  # the input encoder is untouched


def test_first80_is_off_by_default():
    assert dec_ssl.Args().first80 is False and dec_ssl.Args().featarc is False


@pytest.mark.parametrize("flags,needle", [(["--ssl", "swav"], "--ssl"), (["--ema", "1"], "--ema"),
                                          (["--featarc", "true", "--proj-dim", "64"], "--proj-dim")])
def test_bad_flags_exit_2(flags, needle, out):
    proc, _ = run_script("dec_ssl.py", *TINY, *flags, out=out)
    assert_bad_input(proc, out, needle)
