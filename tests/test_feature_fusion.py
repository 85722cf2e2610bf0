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
from conftest import TINY, assert_bad_input, assert_complete_run, read_run, resume_to, run_script

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

    def __init__(self, n=8):
        g = torch.Generator().manual_seed(0)
        self.device = torch.device("cpu")
        self.v1, self.v2 = torch.randn(n, 1, 28, 28, generator=g), torch.randn(n, 1, 28, 28, generator=g)
        self.data = SimpleNamespace(train_y=torch.arange(n) % 3)

    def batches(self, idx):
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
    model, queue, queue_y, (loss, images, ptr) = one_step(ff, torch.zeros(0, 16))
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
    m_ff, q_ff, _, (l_ff, _, _) = one_step(ff, remote)
    torch.manual_seed(0)
    model = nm.MoCo(common.SmallCNN(1), 16)
    args, queue = nm.Args(optimizer="sgd", lr=0.1, momentum=0.9), unit(32, 16, seed=7).float()
    l_nm, ent, _, _ = nm.local_update(model, copy.deepcopy(model), queue, torch.full((32,), -1), 30, remote,
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
    _, metrics = assert_complete_run(folder, rounds=2)
    assert [m["nm_weight"] for m in metrics] == [0.0, 0.1]             # NM switched on after the warm-up
    others = read_run(folder)[2]["args"]["clients"] - 1
    assert metrics[0]["loss_nm"] == 0 and 0 < metrics[1]["loss_nm"] <= math.log(others * 16)
    assert metrics[1]["fn_ratio_fused"] < metrics[1]["fn_ratio_local"]


@pytest.mark.parametrize("script,flag,value,needle", [
    ("feature_fusion.py", "--tau", "0", "--tau"),
    ("feature_fusion.py", "--remote-features", "-1", "--remote-features"),
    ("feature_fusion.py", "--momentum", "1", "--momentum"),
    ("neighborhood_match.py", "--nm-warmup", "2", "--nm-warmup"),
    ("neighborhood_match.py", "--tau-nm", "0", "--tau-nm"),
])
def test_bad_flags_exit_2(out, script, flag, value, needle):
    proc, _ = run_script(script, *TINY, flag, value, out=out)
    assert_bad_input(proc, out, needle)
