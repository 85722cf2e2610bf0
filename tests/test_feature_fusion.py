"""feature_fusion.py and neighborhood_match.py (CCL, Wu et al., IJCAI 2022): losses against slow loop
references, the queue and the remote bank, FF-off == FedAvg + MoCo, and both scripts end to end."""
import copy
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import common
import feature_fusion as ff
import neighborhood_match as nm
from conftest import (TINY, assert_bad_input, assert_complete_run, assert_encoder_reproduces, diagnostics, read_run,
                      resume_to, run_script)

SMALL_BANKS = ["--queue-size", "64", "--remote-features", "16", "--remote-bank", "0", "--proj-dim", "16"]


def unit(*shape, seed=0):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64), dim=-1)


def ff_loss_loop(q, k, queue, remote, tau):
    """-log(e^{q.k+/t} / (e^{q.k+/t} + sum_Ql e^{q.n/t} + sum_Qr e^{q.r/t})), one query at a time."""
    total = 0.0
    for qi, ki in zip(q.tolist(), k.tolist()):
        qn, kn = math.sqrt(sum(x * x for x in qi)), math.sqrt(sum(x * x for x in ki))
        dot = lambda a, b: sum(x * y for x, y in zip(a, b)) / qn
        pos = math.exp(dot(qi, ki) / kn / tau)
        neg = sum(math.exp(dot(qi, n) / tau) for n in queue.tolist() + (remote.tolist() if remote is not None else []))
        total += -math.log(pos / (pos + neg))
    return total / len(q)


@pytest.mark.parametrize("mod", [ff, nm])
@pytest.mark.parametrize("n_remote", [None, 0, 7])
def test_ff_loss_matches_loop_reference(mod, n_remote):
    q, k = 3 * torch.randn(5, 8, dtype=torch.float64), torch.randn(5, 8, dtype=torch.float64)   # raw, not unit
    queue = unit(11, 8, seed=1)
    remote = None if n_remote is None else unit(n_remote, 8, seed=2)
    got = mod.ff_loss(q, k, queue, remote, 0.2).item()
    assert got == pytest.approx(ff_loss_loop(q, k, queue, remote, 0.2), rel=1e-9)


def test_fusion_off_is_moco_infonce_and_remote_negatives_raise_the_loss():
    q, k, queue, remote = torch.randn(6, 8), torch.randn(6, 8), unit(20, 8).float(), unit(20, 8, seed=3).float()
    assert ff.ff_loss(q, k, queue, None, 0.1).item() == pytest.approx(common.info_nce(q, k, queue, 0.1).item(), rel=1e-6)
    assert ff.ff_loss(q, k, queue, remote, 0.1) > ff.ff_loss(q, k, queue, None, 0.1)   # more negatives, more loss


@pytest.mark.parametrize("mod", [ff, nm])
def test_gradient_reaches_only_the_query(mod):
    q, k = torch.randn(4, 8, requires_grad=True), torch.randn(4, 8, requires_grad=True)
    queue, remote = unit(9, 8).float().requires_grad_(), unit(5, 8, seed=4).float().requires_grad_()
    loss = mod.ff_loss(q, k, queue, remote, 0.1)
    if mod is nm:
        loss = loss + nm.nm_loss(q, remote, 0.05)
    loss.backward()
    assert q.grad is not None and q.grad.abs().sum() > 0
    assert k.grad is None and queue.grad is None and remote.grad is None   # keys, queue, remote bank: constants


def nm_loss_loop(q, neighbours, tau):
    """-(1/B) sum_i sum_j p_ij log p_ij with p_ij = softmax_j(q_i . n_j / tau), q_i normalised."""
    total = 0.0
    for qi in q.tolist():
        norm = math.sqrt(sum(x * x for x in qi))
        e = [math.exp(sum(a * b for a, b in zip(qi, n)) / norm / tau) for n in neighbours.tolist()]
        p = [x / sum(e) for x in e]
        total += -sum(pi * math.log(pi) for pi in p)
    return total / len(q)


def test_nm_loss_matches_loop_reference_and_its_bounds():
    q, neighbours = 2 * torch.randn(5, 8, dtype=torch.float64), unit(13, 8, seed=5)
    assert nm.nm_loss(q, neighbours, 0.5).item() == pytest.approx(nm_loss_loop(q, neighbours, 0.5), rel=1e-9)
    # entropy lies in [0, log |N|]: log |N| when q is equally far from all, ~0 when q sits on one neighbour
    assert nm.nm_loss(torch.tensor([[0.0, 0, 1]]), torch.eye(3)[:2], 0.05).item() == pytest.approx(math.log(2))
    assert nm.nm_loss(torch.eye(3)[:1], torch.eye(3), 0.05).item() < 1e-6
    assert nm.nm_loss(q, torch.zeros(0, 8, dtype=torch.float64), 0.05).item() == 0


@pytest.mark.parametrize("mod", [ff, nm])
@pytest.mark.parametrize("size,ptr,b", [(8, 0, 3), (5, 3, 4), (3, 1, 5), (4, 2, 4)])
def test_enqueue_is_a_fifo_ring_buffer(mod, size, ptr, b):
    keys = torch.randn(b, 2)
    queue, ref = torch.zeros(size, 2), torch.zeros(size, 2)
    labels, ref_labels = torch.full((size,), -1), torch.full((size,), -1)
    for i in range(b):                                  # one key at a time: the oldest row is overwritten
        ref[(ptr + i) % size], ref_labels[(ptr + i) % size] = keys[i], i
    assert mod.enqueue(queue, ptr, keys) == (ptr + b) % size
    assert torch.equal(queue, ref)
    mod.enqueue(labels, ptr, torch.arange(b))           # the 1-d label queue of the diagnostic, too
    assert torch.equal(labels, ref_labels)


def test_remote_rows_never_hand_a_client_its_own_features():
    counts = torch.tensor([3, 0, 2, 3])                  # client 1 uploaded nothing, client 2 only two rows
    for c, expected in [(0, {6, 7, 9, 10, 11}), (1, {0, 1, 2, 6, 7, 9, 10, 11}), (3, {0, 1, 2, 6, 7})]:
        assert set(ff.remote_rows(counts, 3, c, 0).tolist()) == expected
        sub = ff.remote_rows(counts, 3, c, 4).tolist()
        assert len(sub) == 4 == len(set(sub)) and set(sub) <= expected
    assert len(nm.remote_rows(torch.tensor([3, 0, 0, 0]), 3, 0, 0)) == 0   # nobody else shared: empty bank


def test_fn_ratio_counts_same_class_negatives():
    query_y = torch.tensor([0, 0, 0, 1])
    queue_y = torch.tensor([0, 1, 1, -1])                # -1: a random initial row, never a false negative
    remote_y = torch.tensor([2, 2, 0, 3])
    local, fused = ff.fn_ratio(query_y, queue_y, remote_y, 4)
    share = lambda negs: sum(sum(n == y for n in negs) / len(negs) for y in query_y.tolist()) / len(query_y)
    assert local.item() == pytest.approx(share(queue_y.tolist()))            # (3 * 1/4 + 2/4) / 4
    assert fused.item() == pytest.approx(share(queue_y.tolist() + remote_y.tolist()))


class StubRun:
    """Just enough of common.Run for local_update: one fixed batch with fixed views."""

    def __init__(self, n=8, steps=1):
        g = torch.Generator().manual_seed(0)
        self.steps = steps
        self.device = torch.device("cpu")
        self.v1, self.v2 = torch.randn(n, 1, 28, 28, generator=g), torch.randn(n, 1, 28, 28, generator=g)
        self.data = SimpleNamespace(train_y=torch.arange(n) % 3)

    def batches(self, idx):
        for _ in range(self.steps):
            yield idx

    def two_views(self, b):
        return self.v1[b], self.v2[b]


def one_step(mod, remote, **kw):
    torch.manual_seed(0)
    model = mod.MoCo(common.SmallCNN(1), 16)
    args = mod.Args(optimizer="sgd", lr=0.1, momentum=0.9, **kw)
    queue, queue_y = unit(32, 16, seed=7).float(), torch.full((32,), -1)
    key_enc, run = copy.deepcopy(model), StubRun()
    extra = (0.5,) if mod is nm else ()
    out = mod.local_update(model, key_enc, queue, queue_y, 30, remote, run, torch.arange(8), args, *extra)
    return model, queue, queue_y, out


def test_without_remote_features_one_step_is_fedavg_moco():
    model, queue, queue_y, (loss, images, ptr, _, _) = one_step(ff, torch.zeros(0, 16), symmetric=False)
    torch.manual_seed(0)                                 # the same step written as plain MoCo v2
    ref = ff.MoCo(common.SmallCNN(1), 16)
    key = copy.deepcopy(ref)
    opt, run = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-6), StubRun()
    q = ref(run.v1)
    common.ema_update(key, ref, 0.9)
    with torch.no_grad():
        k = F.normalize(key(run.v2), dim=1)
    ref_loss = common.info_nce(q, k, unit(32, 16, seed=7).float(), 0.1)
    opt.zero_grad()
    ref_loss.backward()
    opt.step()
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-5) and images == 16 and ptr == (30 + 8) % 32
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(queue[[30, 31, 0, 1, 2, 3, 4, 5]], k)        # the ring buffer wrapped around
    assert queue_y[[30, 31, 0, 1, 2, 3, 4, 5]].tolist() == (torch.arange(8) % 3).tolist()


@pytest.mark.parametrize("mod", [ff, nm])
def test_remote_features_change_the_update_but_never_enter_the_queue(mod):
    remote = unit(10, 16, seed=9).float()
    m_off, q_off, _, _ = one_step(mod, torch.zeros(0, 16))
    m_on, q_on, _, _ = one_step(mod, remote)
    torch.testing.assert_close(q_on, q_off)              # one step: the same keys enqueued either way
    assert torch.cdist(q_on, remote).min() > 1e-3        # and no remote row among them
    assert any(not torch.allclose(a, b) for a, b in zip(m_on.parameters(), m_off.parameters()))


def test_nm_weight_zero_is_feature_fusion():
    remote = unit(10, 16, seed=9).float()
    m_ff, q_ff, _, (l_ff, _, _, _, _) = one_step(ff, remote)
    torch.manual_seed(0)
    model = nm.MoCo(common.SmallCNN(1), 16)
    args, queue = nm.Args(optimizer="sgd", lr=0.1, momentum=0.9, nm_local=False), unit(32, 16, seed=7).float()
    l_nm, ent, _, _, _, _ = nm.local_update(model, copy.deepcopy(model), queue, torch.full((32,), -1), 30, remote,
                                      StubRun(), torch.arange(8), args, 0.0)
    assert l_nm.item() == pytest.approx(l_ff.item(), rel=1e-6) and 0 < ent.item() <= math.log(10) + 1e-6
    for a, b in zip(model.parameters(), m_ff.parameters()):
        torch.testing.assert_close(a, b)


def test_feature_fusion_end_to_end_and_resume(out, tmp_path):
    proc, folder = run_script("feature_fusion.py", *TINY, *SMALL_BANKS, out=out)
    assert proc.returncode == 0, proc.stderr
    summary, metrics = assert_complete_run(folder, rounds=2)
    r1, r2 = metrics
    others = read_run(folder)[2]["args"]["clients"] - 1
    assert r1["feature_bytes_down"] == 0 and r1["fn_ratio_fused"] == r1["fn_ratio_local"]   # round 1: no remote yet
    assert r2["feature_bytes_down"] == others * 16 * 16 * 4          # other clients x M rows x d x fp32
    assert r1["feature_bytes_up"] == r2["feature_bytes_up"] == 16 * 16 * 4
    assert r2["fn_ratio_fused"] < r2["fn_ratio_local"]              # fusion dilutes same-class negatives
    model = ff.MoCo(common.SmallCNN(1), 16)
    assert r1["model_bytes_up"] == r1["model_bytes_down"] == common.state_bytes(model)
    assert summary["fn_ratio_fused"] == r2["fn_ratio_fused"]
    assert_encoder_reproduces(folder, summary["knn_acc"])
    shown = diagnostics(proc.stdout)                                  # eval rounds' diagnostics
    assert sorted(shown) == [1, 2] and all("fn_ratio_fused" in shown[r] and "alignment" in shown[r] for r in shown)
    # interrupted after round 1, resumed to 2: the same numbers as the uninterrupted run
    flags = list(TINY)
    flags[flags.index("--rounds") + 1] = "1"
    proc, part = run_script("feature_fusion.py", *flags, *SMALL_BANKS, out=tmp_path / "b")
    assert proc.returncode == 0, proc.stderr
    proc = resume_to("feature_fusion.py", part, tmp_path / "b", rounds=2)
    assert proc.returncode == 0, proc.stderr
    _, resumed, _ = read_run(part)
    for key in ("loss", "knn_acc", "fn_ratio_local", "fn_ratio_fused"):
        assert resumed[1][key] == r2[key], key


def test_fusion_off_end_to_end(out):
    proc, folder = run_script("feature_fusion.py", *TINY, *SMALL_BANKS[:2], "--remote-features", "0", out=out)
    assert proc.returncode == 0, proc.stderr
    _, metrics = assert_complete_run(folder, rounds=2)
    for m in metrics:
        assert m["feature_bytes_up"] == m["feature_bytes_down"] == 0 and m["fn_ratio_fused"] == m["fn_ratio_local"]


def test_neighborhood_match_end_to_end(out):
    proc, folder = run_script("neighborhood_match.py", *TINY, *SMALL_BANKS, "--nm-warmup", "0.5", out=out)
    assert proc.returncode == 0, proc.stderr
    summary, metrics = assert_complete_run(folder, rounds=2)
    assert_encoder_reproduces(folder, summary["knn_acc"])
    assert [m["nm_weight"] for m in metrics] == [0.0, 0.1]             # NM switched on after the warm-up
    others = read_run(folder)[2]["args"]["clients"] - 1
    # N = Q_r + Q_l (64 rows): round 1 has no remote rows yet, only the local queue
    assert 0 < metrics[0]["loss_nm"] <= math.log(64) and 0 < metrics[1]["loss_nm"] <= math.log(others * 16 + 64)
    assert metrics[1]["fn_ratio_fused"] < metrics[1]["fn_ratio_local"]


@pytest.mark.parametrize("script,flag,value,needle", [
    ("feature_fusion.py", "--tau", "0", "--tau"),
    ("feature_fusion.py", "--remote-features", "-1", "--remote-features"),
    ("feature_fusion.py", "--momentum", "1", "--momentum"),
    ("neighborhood_match.py", "--nm-warmup", "2", "--nm-warmup"),
    ("neighborhood_match.py", "--tau-nm", "0", "--tau-nm"),
    ("neighborhood_match.py", "--nm-form", "topk", "--nm-form"),
    ("neighborhood_match.py", "--nm-topk", "0", "--nm-topk"),
])
def test_bad_flags_exit_2(out, script, flag, value, needle):
    proc, _ = run_script(script, *TINY, flag, value, out=out)
    assert_bad_input(proc, out, needle)


# --- symmetric loss, neighborhood matching (FCL form), diagnostics ---------------------------------

def nm_fcl_loop(q, k, neighbours, topk, tau):
    """-(1/k) sum over the k neighbours p of k_i nearest to it of log(e^{q.p/t} / (e^{q.k_i/t} + sum_N e^{q.n/t}))."""
    total = 0.0
    for qi, ki in zip(q.tolist(), k.tolist()):
        qn, kn = math.sqrt(sum(x * x for x in qi)), math.sqrt(sum(x * x for x in ki))
        dot = lambda a, b: sum(x * y for x, y in zip(a, b))
        ns = neighbours.tolist()
        nearest = sorted(range(len(ns)), key=lambda j: -dot(ki, ns[j]))[:topk]       # brute force
        den = math.exp(dot(qi, ki) / qn / kn / tau) + sum(math.exp(dot(qi, n) / qn / tau) for n in ns)
        total += -sum(math.log(math.exp(dot(qi, ns[j]) / qn / tau) / den) for j in nearest) / len(nearest)
    return total / len(q)


@pytest.mark.parametrize("topk", [1, 3, 20])
def test_nm_fcl_loss_matches_loop_reference(topk):
    q, k, neighbours = 2 * torch.randn(6, 8, dtype=torch.float64), torch.randn(6, 8, dtype=torch.float64), unit(13, 8, seed=6)
    got = nm.nm_fcl_loss(q, k, neighbours, topk, 0.2).item()
    assert got == pytest.approx(nm_fcl_loop(q, k, neighbours, topk, 0.2), rel=1e-9)
    assert nm.nm_fcl_loss(q, k, neighbours[:0], topk, 0.2).item() == 0


def test_nm_fcl_positives_are_the_neighbours_of_the_key_not_of_the_query():
    # q sits on n_0, k sits on n_1: the loss must treat n_1 as the positive (low loss when q moves to n_1)
    n = torch.eye(4, dtype=torch.float64)
    k = n[1:2]
    on_key, on_other = nm.nm_fcl_loss(n[1:2], k, n, 1, 0.1), nm.nm_fcl_loss(n[0:1], k, n, 1, 0.1)
    assert on_key < on_other - 5


def diagnostics_loop(q, k, queue, remote, tau):
    qs = F.normalize(q, dim=1).tolist()
    ks, qu, re = F.normalize(k, dim=1).tolist(), queue.tolist(), remote.tolist()
    dot = lambda a, b: sum(x * y for x, y in zip(a, b))
    bq = bb = mass = 0.0
    for i, qi in enumerate(qs):
        pos = dot(qi, ks[i])
        bq += all(pos > dot(qi, n) for n in qu)
        bb += all(pos > dot(qi, kj) for j, kj in enumerate(ks) if j != i)
        e_r = sum(math.exp(dot(qi, r) / tau) for r in re)
        mass += e_r / (math.exp(pos / tau) + sum(math.exp(dot(qi, n) / tau) for n in qu) + e_r)
    return [bq / len(qs), bb / len(qs), mass / len(qs)]


@pytest.mark.parametrize("mod", [ff, nm])
def test_diagnostics_match_loop_reference(mod):
    q, k = torch.randn(7, 8, dtype=torch.float64), torch.randn(7, 8, dtype=torch.float64)
    k[:3] = q[:3] + 0.05 * k[:3]                  # some positives close to their query, so both shares lie in (0, 1)
    queue, remote = unit(5, 8, seed=10), unit(4, 8, seed=11)
    got = mod.diagnostics(q, k, queue, remote, 0.2).tolist()
    assert got == pytest.approx(diagnostics_loop(q, k, queue, remote, 0.2), rel=1e-6)   # shares counted in float32
    assert 0 < got[0] < 1 and 0 < got[1] < 1
    assert mod.diagnostics(q, k, queue, remote[:0], 0.2)[2].item() == 0


def test_symmetric_steps_use_both_views_as_query_enqueue_both_keys_and_move_the_momentum_encoder():
    torch.manual_seed(0)
    model = ff.MoCo(common.SmallCNN(1), 16)
    key_enc, args = copy.deepcopy(model), ff.Args(optimizer="sgd", lr=0.1, momentum=0.9)   # symmetric by default
    queue, queue_y = unit(32, 16, seed=7).float(), torch.full((32,), -1)
    loss, images, ptr, _, _ = ff.local_update(model, key_enc, queue, queue_y, 30, torch.zeros(0, 16),
                                           StubRun(steps=2), torch.arange(8), args)
    torch.manual_seed(0)                                 # the same two steps written out by hand
    ref = ff.MoCo(common.SmallCNN(1), 16)
    key = copy.deepcopy(ref)
    opt, run = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-6), StubRun()
    bank, losses, keys = unit(32, 16, seed=7).float(), [], []
    for step in range(2):
        q1, q2 = ref(run.v1), ref(run.v2)
        with torch.no_grad():                            # xi <- 0.9 xi + 0.1 theta (a no-op at step 1: xi = theta)
            for pk, pr in zip(key.parameters(), ref.parameters()):
                pk.mul_(0.9).add_(0.1 * pr)
            for bk, br in zip(key.buffers(), ref.buffers()):
                bk.copy_(br)
            k2, k1 = F.normalize(key(run.v2), dim=1), F.normalize(key(run.v1), dim=1)
        ref_loss = (common.info_nce(q1, k2, bank, 0.1) + common.info_nce(q2, k1, bank, 0.1)) / 2
        opt.zero_grad()
        ref_loss.backward()
        opt.step()
        rows = [(30 + 16 * step + i) % 32 for i in range(16)]
        bank[rows] = torch.cat([k2, k1])
        losses.append(ref_loss.item())
        keys.append(torch.cat([k2, k1]))
    assert loss.item() == pytest.approx(sum(losses) / 2, rel=1e-5) and images == 32 and ptr == (30 + 32) % 32
    for a, b in zip(list(model.parameters()) + list(key_enc.parameters()), list(ref.parameters()) + list(key.parameters())):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(queue, bank)              # 32 keys into 32 rows: the second step overwrote the first
    torch.testing.assert_close(queue[[(30 + 16 + i) % 32 for i in range(16)]], keys[1])
    assert queue_y.tolist() == (torch.arange(8) % 3).repeat(4).roll(30).tolist()


@pytest.mark.parametrize("form", ["entropy", "fcl"])
@pytest.mark.parametrize("local", [True, False])
def test_nm_steps_add_lambda_times_the_matching_loss_over_local_and_remote(form, local):
    remote, lam = unit(10, 16, seed=9).float(), 0.5
    torch.manual_seed(0)
    model = nm.MoCo(common.SmallCNN(1), 16)
    key_enc, args = copy.deepcopy(model), nm.Args(optimizer="sgd", lr=0.1, momentum=0.9, nm_form=form, nm_local=local, nm_topk=3)
    queue = unit(32, 16, seed=7).float()
    loss, l_nm, _, _, _, _ = nm.local_update(model, key_enc, queue, torch.full((32,), -1), 30, remote,
                                          StubRun(steps=2), torch.arange(8), args, lam)
    torch.manual_seed(0)                                 # two steps by hand, with the loop-checked loss functions
    ref = nm.MoCo(common.SmallCNN(1), 16)
    key = copy.deepcopy(ref)
    opt, run, bank = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-6), StubRun(), unit(32, 16, seed=7).float()
    totals, matches = [], []
    for step in range(2):
        q1, q2 = ref(run.v1), ref(run.v2)
        common.ema_update(key, ref, 0.9)
        with torch.no_grad():
            k2, k1 = F.normalize(key(run.v2), dim=1), F.normalize(key(run.v1), dim=1)
        neighbours = torch.cat([remote, bank]) if local else remote
        match = (lambda q, k: nm.nm_fcl_loss(q, k, neighbours, 3, 0.1)) if form == "fcl" else \
            (lambda q, k: nm.nm_loss(q, neighbours, 0.05))
        ref_nm = (match(q1, k2) + match(q2, k1)) / 2
        ref_loss = (nm.ff_loss(q1, k2, bank, remote, 0.1) + nm.ff_loss(q2, k1, bank, remote, 0.1)) / 2 + lam * ref_nm
        opt.zero_grad()
        ref_loss.backward()
        opt.step()
        bank = bank.clone()
        bank[[(30 + 16 * step + i) % 32 for i in range(16)]] = torch.cat([k2, k1])
        totals.append(ref_loss.item()), matches.append(ref_nm.item())
    assert l_nm.item() == pytest.approx(sum(matches) / 2, rel=1e-5)
    assert loss.item() == pytest.approx(sum(totals) / 2, rel=1e-5)
    for a, b in zip(list(model.parameters()) + list(key_enc.parameters()), list(ref.parameters()) + list(key.parameters())):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(queue, bank)


class ShuffledRun(StubRun):
    """Shuffled batches of 4 of the client's 14 images (the last 2 of each epoch dropped, as common.Run
    drops a partial batch), fresh random views every step; records each step's images and view 2."""

    def __init__(self):
        super().__init__(n=14)
        self.steps_seen = []

    def batches(self, idx):
        order = idx[torch.randperm(len(idx))]
        for i in range(0, len(order) - 3, 4):
            yield order[i:i + 4]

    def two_views(self, b):
        v1, v2 = torch.randn(len(b), 1, 28, 28), torch.randn(len(b), 1, 28, 28)
        self.steps_seen.append((b.clone(), v2.clone()))
        return v1, v2


@pytest.mark.parametrize("mod", [ff, nm])
@pytest.mark.parametrize("m", [5, 100])
def test_uploaded_features_are_the_last_epochs_momentum_keys_of_the_picked_images(mod, m):
    """[reconstruction] step 1 uploads, for m random images of the last local epoch (all of them if
    fewer), the key k+ = normalize(xi(v2)) that epoch's step computed for the image: no separate pass."""
    torch.manual_seed(0)
    model = mod.MoCo(common.SmallCNN(1, width=8), 16)
    key_enc, run, calls = copy.deepcopy(model), ShuffledRun(), []
    forward = key_enc.forward
    key_enc.forward = lambda x: calls.append((x, forward(x))) or calls[-1][1]   # records what xi saw and gave
    args = mod.Args(optimizer="sgd", lr=0.1, local_epochs=2, remote_features=m)
    out = mod.local_update(model, key_enc, unit(32, 16, seed=7).float(), torch.full((32,), -1), 0, torch.zeros(0, 16),
                           run, torch.arange(14), args, *((0.5,) if mod is nm else ()))
    z, pick = mod.upload_features(out[-1], args.remote_features)
    last_epoch = run.steps_seen[3:]                           # 3 steps per epoch
    trained = torch.cat([b for b, _ in last_epoch])
    assert len(pick) == min(m, 12) and len(set(pick.tolist())) == len(pick) and set(pick.tolist()) <= set(trained.tolist())
    for row, image in zip(z, pick.tolist()):
        step = next(s for s, (b, _) in enumerate(last_epoch) if image in b.tolist())
        b, v2 = last_epoch[step]
        x, k = next((x, k) for x, k in calls if torch.equal(x, v2))                # xi's output on that view 2
        torch.testing.assert_close(row, F.normalize(k, dim=1)[b.tolist().index(image)])


# --- the round loop, recorded in process: write-backs, aggregation, per-client state ---------------

LOOP = ["--train-size", "300", "--test-size", "100", "--clients", "3", "--partition", "dirichlet", "--alpha", "0.5",
        "--rounds", "2", "--batch-size", "32", "--eval-every", "1", "--probe-epochs", "1", "--width", "8",
        "--device", "cpu", "--queue-size", "60", "--remote-features", "16", "--remote-bank", "0", "--proj-dim", "16"]


def record_rounds(mod, monkeypatch, tmp_path, *flags):
    """Run mod.main() in this process with every client update and upload recorded (inputs and outputs)."""
    import sys
    rec = dict(calls=[], uploads=[])
    real_start, real_update, real_upload = common.start, mod.local_update, mod.upload_features
    clone = lambda sd: {k: v.detach().clone() for k, v in sd.items()}

    def start(cls, argv=None):
        args, run = real_start(cls, argv)
        rec["run"] = run
        return args, run

    def update(model, key_enc, queue, queue_y, ptr, remote_feats, run, idx, args, *rest, **kw):
        call = dict(model=clone(model.state_dict()), key=clone(key_enc.state_dict()), queue=queue.clone(), ptr=ptr,
                    remote=remote_feats.clone(), idx=idx.clone(), rest=rest, watch=kw.get("watch"))
        out = real_update(model, key_enc, queue, queue_y, ptr, remote_feats, run, idx, args, *rest, **kw)
        call.update(out_model=clone(model.state_dict()), out_queue=queue.clone(), out_ptr=out[-3])
        rec["calls"].append(call)
        return out

    def upload(last, m):
        z, pick = real_upload(last, m)
        rec["uploads"].append(dict(z=z.clone(), pick=pick.clone()))
        return z, pick

    monkeypatch.setattr(common, "start", start)
    monkeypatch.setattr(mod, "local_update", update)
    monkeypatch.setattr(mod, "upload_features", upload)
    monkeypatch.setattr(sys, "argv", [f"{mod.__name__}.py", *LOOP, *flags, "--out", str(tmp_path)])
    mod.main()
    return rec


def weighted_average(states, sizes):
    w = [s / sum(sizes) for s in sizes]
    out = {}
    for key, ref in states[0].items():
        avg = sum(wi * st[key].double() for wi, st in zip(w, states))
        out[key] = avg if ref.is_floating_point() else avg.round()
    return out


@pytest.mark.parametrize("mod", [ff, nm])
def test_round_loop_downloads_aggregates_and_keeps_each_clients_queue(mod, monkeypatch, tmp_path):
    rec = record_rounds(mod, monkeypatch, tmp_path, *(["--nm-warmup", "0.5", "--nm-weight", "0.3"] if mod is nm else []))
    run, calls, ups = rec["run"], rec["calls"], rec["uploads"]
    n = 3
    assert len(calls) == 2 * n and len(ups) == 2 * n
    sizes = [len(c) for c in run.clients]
    assert len(set(sizes)) > 1                                   # unequal clients: weighting matters
    first, second = calls[:n], calls[n:]
    avg = weighted_average([c["out_model"] for c in first], sizes)
    for r, rnd in enumerate((first, second)):
        for c, call in enumerate(rnd):
            assert torch.equal(call["idx"], run.clients[c])      # client c trains on its own images
            assert set(ups[r * n + c]["pick"].tolist()) <= set(run.clients[c].tolist())   # its own images
            for key in call["model"]:                            # online and momentum encoder = the global model
                torch.testing.assert_close(call["key"][key], call["model"][key])
                expected = first[0]["model"][key] if r == 0 else avg[key].to(call["model"][key].dtype)
                torch.testing.assert_close(call["model"][key], expected, rtol=1e-5, atol=1e-6)
            assert call["watch"] is True                         # --eval-every 1: diagnostics every round
    for c in range(n):                                           # the queue and its pointer carry over rounds
        assert first[c]["ptr"] == 0 and second[c]["ptr"] == first[c]["out_ptr"] != 0
        torch.testing.assert_close(second[c]["queue"], first[c]["out_queue"])
        assert not torch.equal(first[c]["out_queue"], first[c]["queue"])
        assert len(first[c]["remote"]) == 0                      # round 1: nothing uploaded yet
        others = torch.cat([ups[j]["z"] for j in range(n) if j != c])   # round 2: all the others' uploads, no own row
        torch.testing.assert_close(second[c]["remote"], others)
    if mod is nm:                                                # lambda follows the warm-up schedule
        assert [call["rest"][0] for call in calls] == [0.0] * n + [0.3] * n
    metrics = read_run(next(tmp_path.glob("*/")))[1]
    assert metrics[0]["remote_mass"] == 0 < metrics[1]["remote_mass"] < 1
    for m in metrics:
        assert 0 <= m["pos_beats_queue"] <= 1 and 0 <= m["pos_beats_batch"] <= 1


@pytest.mark.parametrize("mod", [ff, nm])
def test_with_partial_participation_the_bank_holds_only_last_rounds_participants(mod, monkeypatch, tmp_path):
    """--participation 0.5: a client's remote features in round r are exactly the uploads of round r - 1's
    OTHER participants; a client that uploaded in round r - 2 but sat out round r - 1 is no longer in the bank."""
    rec = record_rounds(mod, monkeypatch, tmp_path, "--clients", "4", "--participation", "0.5", "--rounds", "3")
    run, calls, ups = rec["run"], rec["calls"], rec["uploads"]
    who = [next(c for c, idx in enumerate(run.clients) if torch.equal(idx, call["idx"])) for call in calls]
    rounds = [who[0:2], who[2:4], who[4:6]]                          # 2 of 4 clients a round, in id order
    assert len(calls) == 6 and set(rounds[0]) - set(rounds[1])       # someone uploaded in round 1, not in 2
    for r in (1, 2):
        for i, c in enumerate(rounds[r]):
            others = [ups[2 * (r - 1) + k]["z"] for k, j in enumerate(rounds[r - 1]) if j != c]
            want = torch.cat(others) if others else torch.zeros(0, 16)
            torch.testing.assert_close(calls[2 * r + i]["remote"], want)
