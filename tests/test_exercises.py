"""The exercises' checkers (exercises/check.py): each one rejects its stub as shipped, accepts the
project's own implementation and an independent correct one, and rejects the typical wrong answers
named in its statement -- each in the case meant to catch it."""
import itertools
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT
from exercises import check as ex


def run_check(name, fn):
    """(passed?, descriptions of the failing cases, the whole report)."""
    lines = []
    ok = ex.check(name, fn, out=lines.append)
    failed = [line.split("FAIL  ", 1)[1].split("\n")[0] for line in lines if "  FAIL  " in line]
    return ok, failed, "\n".join(lines)


def assert_rejected(name, fn, case, message=""):
    """The checker fails `fn`, among others in the case whose description contains `case`, and that
    case's report line contains `message`."""
    ok, failed, report = run_check(name, fn)
    assert not ok, report
    hits = [c for c in failed if case in c]
    assert hits, f"expected a failure in a case mentioning {case!r}:\n{report}"
    block = report.split(f"FAIL  {hits[0]}\n", 1)[1].split("\n")[0]
    if same := re.fullmatch(r' +the same problem as in "(.*)"', block):    # a message is said once, at its first case
        block = report.split(f"FAIL  {same.group(1)}\n", 1)[1].split("\n")[0]
    assert message in block, f"{message!r} not in {block!r}"


# ----------------------------------------------------------------------------------------------
# Every exercise: stub fails, reference passes
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(ex.EXERCISES))
def test_stub_as_shipped_fails_every_case(name):
    stub, _ = ex.load_solution(ex.EXERCISES[name], None)
    ok, failed, report = run_check(name, stub)
    assert not ok
    assert len(failed) == len(ex.EXERCISES[name].cases()) >= 6, report
    assert report.count("not implemented yet") == 1                  # said once; the other cases refer to it
    assert report.count('the same problem as in "') == len(failed) - 1


@pytest.mark.parametrize("name", list(ex.EXERCISES))
def test_reference_passes_every_case(name):
    ok, failed, report = run_check(name, ex.EXERCISES[name].reference_fn())
    assert ok and not failed, report
    assert f"{len(ex.EXERCISES[name].cases())}/{len(ex.EXERCISES[name].cases())} cases passed" in report


@pytest.mark.parametrize("name", list(ex.EXERCISES))
def test_every_exercise_has_a_statement_and_a_stub(name):
    statement = (ROOT / "exercises" / f"{name}.md").read_text()
    assert f"python -m exercises.check {name}" in statement
    assert f"def {name}(" in (ROOT / "exercises" / f"{name}.py").read_text()


# ----------------------------------------------------------------------------------------------
# 1. NT-Xent
# ----------------------------------------------------------------------------------------------

def nt_xent_loops(z1, z2, tau):
    """Independent slow version, term by term as in SimCLR's Eq. 1."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n, b, total = len(z), len(z1), 0
    for i in range(n):
        p = (i + b) % n
        den = sum(torch.exp(z[i] @ z[j] / tau) for j in range(n) if j != i)
        total = total - torch.log(torch.exp(z[i] @ z[p] / tau) / den)
    return total / n


def _nt_xent(z1, z2, tau, *, normalise=True, exclude_self=True, temp="divide", both_directions=True):
    z = torch.cat([z1, z2])
    z = F.normalize(z, dim=1) if normalise else z
    b = len(z1)
    sim = z @ z.t()
    sim = sim / tau if temp == "divide" else sim * tau if temp == "multiply" else sim
    if temp == "positive-only":     # tau divides the positive's logit but not the negatives'
        pos = torch.zeros_like(sim, dtype=torch.bool)
        pos[torch.arange(2 * b), torch.cat([torch.arange(b, 2 * b), torch.arange(b)])] = True
        sim = torch.where(pos, sim / tau, sim)
    if exclude_self:
        sim = sim.masked_fill(torch.eye(2 * b, dtype=torch.bool), float("-inf"))
    target = torch.cat([torch.arange(b, 2 * b), torch.arange(b)])
    rows = slice(None) if both_directions else slice(0, b)
    return F.cross_entropy(sim[rows], target[rows])


def test_nt_xent_accepts_an_independent_loop_version():
    ok, _, report = run_check("nt_xent", nt_xent_loops)
    assert ok, report


@pytest.mark.parametrize("wrong, case, message", [
    (dict(temp="multiply"), "B=8, D=16, tau=0.5", "loss"),                    # wrong temperature placement
    (dict(temp="positive-only"), "B=8, D=16, tau=0.5", "loss"),               # tau on the positive only
    (dict(exclude_self=False), "B=1: the only other view is the positive", "loss"),   # self-similarity kept
    (dict(normalise=False), "very different norms", "loss"),                  # dot products, not cosines
    (dict(both_directions=False), "B=8, D=16, tau=0.5", ""),                  # only z1 -> z2 anchors
])
def test_nt_xent_rejects(wrong, case, message):
    assert_rejected("nt_xent", lambda z1, z2, tau: _nt_xent(z1, z2, tau, **wrong), case, message)


def test_nt_xent_rejects_a_loss_without_gradient():
    no_grad = lambda z1, z2, tau: torch.tensor(_nt_xent(z1, z2, tau).item())
    assert_rejected("nt_xent", no_grad, "B=8", "carries no gradient")


# ----------------------------------------------------------------------------------------------
# 2. FedAvg with BatchNorm buffers
# ----------------------------------------------------------------------------------------------

def _weights(states, weights):
    w = torch.ones(len(states)) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
    return (w / w.sum()).tolist()


def fedavg_float64(states, weights=None):
    """Independent correct version: accumulate everything in float64, cast back at the end."""
    w = _weights(states, weights)
    out = {}
    for key, ref in states[0].items():
        avg = sum(wi * s[key].double() for wi, s in zip(w, states))
        out[key] = (avg if ref.is_floating_point() else avg.round()).to(ref.dtype)
    return out


def fedavg_nbt_as_float(states, weights=None):
    w = _weights(states, weights)
    return {k: sum(wi * s[k].float() for wi, s in zip(w, states)) for k in states[0]}


def fedavg_truncates_counters(states, weights=None):
    w = _weights(states, weights)
    return {k: sum(wi * s[k].double() for wi, s in zip(w, states)).to(v.dtype) for k, v in states[0].items()}


def fedavg_ignores_weights(states, weights=None):
    return fedavg_float64(states, None)


def fedavg_unnormalised(states, weights=None):
    w = [1.0] * len(states) if weights is None else torch.as_tensor(weights, dtype=torch.float64).tolist()
    return {k: sum(wi * s[k].double() for wi, s in zip(w, states)).to(v.dtype) if v.is_floating_point() else v.clone()
            for k, v in states[0].items()}


def fedavg_in_place(states, weights=None):
    """Right numbers, but accumulated into the first client's tensors."""
    avg = fedavg_float64(states, weights)
    for k, v in states[0].items():
        v.copy_(avg[k])
    return states[0]


def fedavg_parameters_only(states, weights=None):
    """Averages the learned weights but takes the BatchNorm buffers from the first client."""
    avg = fedavg_float64(states, weights)
    return {k: states[0][k].clone() if ("running" in k or "num_batches" in k) else v for k, v in avg.items()}


def fedavg_all_float32(states, weights=None):
    avg = fedavg_float64(states, weights)
    return {k: v.float() if v.is_floating_point() else v for k, v in avg.items()}


def test_fedavg_accepts_an_independent_float64_version():
    ok, _, report = run_check("fedavg", fedavg_float64)
    assert ok, report


@pytest.mark.parametrize("wrong, case, message", [
    (fedavg_nbt_as_float, "num_batches_tracked 10, 11 and 17", "dtype torch.float32, expected torch.int64"),
    (fedavg_truncates_counters, "num_batches_tracked 10, 11 and 17", "got 12, expected 13"),
    (fedavg_ignores_weights, "weights = sample counts", "result"),
    (fedavg_unnormalised, "weights = sample counts", "result"),
    (fedavg_in_place, "weights = sample counts", "must be unchanged"),
    (fedavg_parameters_only, "weights = sample counts", "running_mean"),
    (fedavg_all_float32, "a float64 entry", "dtype torch.float32, expected torch.float64"),
])
def test_fedavg_rejects(wrong, case, message):
    assert_rejected("fedavg", wrong, case, message)


# ----------------------------------------------------------------------------------------------
# 3. Dirichlet partition (invariants and statistics, not entries)
# ----------------------------------------------------------------------------------------------

def dirichlet_other_order(labels, clients, alpha, min_size, rng, tries=1000):
    """Independent correct version that consumes the rng in another order (all shares first), so
    its partitions differ from the reference's seed by seed but follow the same distribution."""
    n, classes = len(labels), int(labels.max()) + 1
    need = min(min_size, n // clients)
    for _ in range(tries):
        shares = rng.dirichlet(np.full(clients, alpha), size=classes)
        parts = [[] for _ in range(clients)]
        for c in range(classes):
            idx = rng.permutation(np.flatnonzero(labels == c))
            for j, chunk in enumerate(np.split(idx, (np.cumsum(shares[c]) * len(idx)).astype(int)[:-1])):
                parts[j].append(chunk)
        parts = [np.concatenate(p) for p in parts]
        if min(map(len, parts)) >= need:
            return parts
    raise ValueError("no draw met the minimum size")


def _dirichlet(labels, clients, alpha, min_size, rng, *, redraw=True, cap=True, concentration=None,
               lose_remainders=False, global_rng=False, tries=200):
    draw = np.random if global_rng else rng
    n, classes = len(labels), int(labels.max()) + 1
    need = min(min_size, n // clients) if cap else min_size
    for _ in range(tries):
        parts = [[] for _ in range(clients)]
        for c in range(classes):
            idx = draw.permutation(np.flatnonzero(labels == c))
            p = draw.dirichlet(np.full(clients, concentration or alpha))
            if lose_remainders:      # each chunk size rounded down on its own: the remainders are lost
                ends = np.cumsum((p * len(idx)).astype(int))
                chunks = [idx[e - s:e] for s, e in zip((p * len(idx)).astype(int), ends)]
            else:
                chunks = np.split(idx, (np.cumsum(p) * len(idx)).astype(int)[:-1])
            for j, chunk in enumerate(chunks):
                parts[j].append(chunk)
        parts = [np.concatenate(p) for p in parts]
        if not redraw or min(map(len, parts)) >= need:
            return parts
    raise ValueError("no draw met the minimum size")


def dirichlet_per_client(labels, clients, alpha, min_size, rng):
    """The other convention: each client's class mix ~ Dir(alpha) over classes, equal client sizes."""
    n, classes = len(labels), int(labels.max()) + 1
    mix = rng.dirichlet(np.full(classes, alpha), size=clients)          # clients x classes
    pools = [list(rng.permutation(np.flatnonzero(labels == c))) for c in range(classes)]
    parts = [[] for _ in range(clients)]
    for slot in rng.permutation(np.repeat(np.arange(clients), n // clients + 1))[:n]:
        avail = np.array([len(p) > 0 for p in pools])
        w = mix[slot] * avail
        c = rng.choice(classes, p=w / w.sum()) if w.sum() > 0 else int(np.flatnonzero(avail)[0])
        parts[slot].append(pools[c].pop())
    return [np.array(p, dtype=np.int64) for p in parts]


def test_dirichlet_accepts_a_correct_version_with_another_rng_order():
    ok, _, report = run_check("dirichlet_partition", dirichlet_other_order)
    assert ok, report


@pytest.mark.parametrize("wrong, case, message", [
    (dict(concentration=1.0), "label skew follows alpha", "alpha 0.1"),       # alpha ignored
    (dict(redraw=False), "min_size 10 (first draws often leave a client too small", "fewer than"),
    (dict(cap=False), "capped at n // clients", "raised ValueError"),
    (dict(lose_remainders=True), "alpha 0.5, min_size 10", "not covering"),
    (dict(global_rng=True), "same seed -> same partition", "different partitions"),
])
def test_dirichlet_rejects(wrong, case, message):
    assert_rejected("dirichlet_partition", lambda *a: _dirichlet(*a, **wrong), case, message)


def test_dirichlet_rejects_the_per_client_convention_by_its_sizes():
    assert_rejected("dirichlet_partition", dirichlet_per_client, "client sizes vary", "alpha 0.1")


def test_dirichlet_rejects_shared_indices():
    all_to_one = lambda labels, clients, *a: [np.arange(len(labels))] + [np.zeros(0, np.int64)] * (clients - 1)
    assert_rejected("dirichlet_partition", all_to_one, "alpha 0.5", "holds 0 images")
    duplicate = lambda labels, clients, *a: [np.arange(len(labels))] * clients
    assert_rejected("dirichlet_partition", duplicate, "alpha 0.5", "not disjoint")


# ----------------------------------------------------------------------------------------------
# 4. Feature-fusion loss
# ----------------------------------------------------------------------------------------------

def ff_logsumexp(q, k, local_queue, remote_feats, tau):
    """Independent correct version: -s_pos + logsumexp over [pos, queue, remote], written out."""
    q, k = F.normalize(q, dim=1), F.normalize(k, dim=1).detach()
    bank = local_queue.detach() if remote_feats is None else torch.cat([local_queue, remote_feats]).detach()
    pos = (q * k).sum(1) / tau
    all_logits = torch.cat([pos[:, None], q @ bank.t() / tau], dim=1)
    return (torch.logsumexp(all_logits, dim=1) - pos).mean()


def _ff(q, k, local_queue, remote_feats, tau, *, temp="divide", use_remote=True, detach_remote=True,
        push_remote=False, normalise_k=True, detach_k=True, remote_as_positive=False, none_ok=True):
    q = F.normalize(q, dim=1)
    k = F.normalize(k, dim=1) if normalise_k else k
    k = k.detach() if detach_k else k
    if not none_ok or remote_feats is not None:
        remote = remote_feats.detach() if detach_remote else remote_feats
    else:
        remote = local_queue[:0].detach()
    pos = (q * k).sum(1, keepdim=True)
    negs = [q @ local_queue.detach().clone().t()] + ([q @ remote.t()] if use_remote and not remote_as_positive else [])
    logits = torch.cat([pos] + negs, dim=1)
    logits = logits / tau if temp == "divide" else torch.cat([pos / tau, logits[:, 1:]], dim=1)
    loss = F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long))
    if remote_as_positive and len(remote):        # remote features treated as extra positives
        loss = loss - (q @ remote.t() / tau).mean()
    if push_remote and len(remote):
        with torch.no_grad():       # "fuse" by also writing the remote features into the local queue
            local_queue[:min(len(remote), len(local_queue))] = remote[:len(local_queue)]
    return loss


def test_ff_loss_accepts_an_independent_logsumexp_version():
    ok, _, report = run_check("ff_loss", ff_logsumexp)
    assert ok, report


@pytest.mark.parametrize("wrong, case, message", [
    (dict(temp="positive-only"), "B=8, D=16", "loss"),                           # wrong temperature placement
    (dict(use_remote=False), "B=8, D=16", "loss"),                               # plain MoCo: no fusion
    (dict(detach_remote=False), "B=8, D=16", "gradient w.r.t. remote_feats"),    # gradient into the remote bank
    (dict(push_remote=True), "B=8, D=16", "local_queue after the call"),         # remote pushed to the local queue
    (dict(normalise_k=False), "very different norms", "loss"),
    (dict(detach_k=False), "B=8, D=16", "gradient w.r.t. k"),
    (dict(remote_as_positive=True), "B=8, D=16", "loss"),
    (dict(none_ok=False), "remote_feats=None", "raised AttributeError"),
])
def test_ff_loss_rejects(wrong, case, message):
    assert_rejected("ff_loss", lambda *a: _ff(*a, **wrong), case, message)


def test_ff_loss_wrong_answers_still_pass_where_they_should():
    """Ignoring the remote bank is right when it is empty: the checker reports per case."""
    _, failed, _ = run_check("ff_loss", lambda *a: _ff(*a, use_remote=False))
    assert not any("empty remote bank" in c or "remote_feats=None" in c for c in failed)


# ----------------------------------------------------------------------------------------------
# 5. MoCo queue update
# ----------------------------------------------------------------------------------------------

def enqueue_one_at_a_time(queue, ptr, keys):
    """Independent correct version: the FIFO definition itself, one key at a time."""
    for key in keys:
        queue[ptr] = key.detach()
        ptr = (ptr + 1) % len(queue)
    return ptr


def enqueue_no_wrap(queue, ptr, keys):
    """The official MoCo code's update, which assumes K % B == 0."""
    queue[ptr:ptr + len(keys)] = keys.detach()
    return (ptr + len(keys)) % len(queue)


def enqueue_no_modulo(queue, ptr, keys):
    idx = (ptr + torch.arange(len(keys))) % len(queue)
    queue[idx] = keys.detach()
    return ptr + len(keys)


def enqueue_not_in_place(queue, ptr, keys):
    queue = torch.cat([queue[len(keys):], keys.detach()])       # rebinds the local name only
    return (ptr + len(keys)) % len(queue)


def enqueue_keeps_graph(queue, ptr, keys):
    idx = (ptr + torch.arange(len(keys))) % len(queue)
    queue[idx] = keys
    return (ptr + len(keys)) % len(queue)


def enqueue_first_k(queue, ptr, keys):
    keys = keys[:len(queue)]                                     # keeps the oldest K instead of the newest
    idx = (ptr + torch.arange(len(keys))) % len(queue)
    queue[idx] = keys.detach()
    return (ptr + len(keys)) % len(queue)


def enqueue_repeated_rows(queue, ptr, keys):
    """Writes all B keys at once: for B > K `rows` repeats rows, and which key lands there is undefined in
    PyTorch (index_put_ with repeated indices), though the CPU happens to keep the last."""
    rows = (ptr + torch.arange(len(keys))) % len(queue)
    queue[rows] = keys.detach()
    return (ptr + len(keys)) % len(queue)


def enqueue_repeated_rows_index_copy(queue, ptr, keys):
    queue.index_copy_(0, (ptr + torch.arange(len(keys))) % len(queue), keys.detach())
    return (ptr + len(keys)) % len(queue)


def test_enqueue_accepts_the_one_at_a_time_definition():
    ok, _, report = run_check("enqueue", enqueue_one_at_a_time)
    assert ok, report


@pytest.mark.parametrize("wrong, case, message", [
    (enqueue_no_wrap, "4 keys wrap around", "raised RuntimeError"),
    (enqueue_no_modulo, "fill the queue to its end", "returned pointers"),
    (enqueue_not_in_place, "one batch of 3 (no wrap)", "queue after the calls"),
    (enqueue_keeps_graph, "one batch of 3 (no wrap)", "requires_grad"),
    (enqueue_first_k, "B=6 > K", "queue after the calls"),
    (enqueue_repeated_rows, "B=6 > K", "one indexed write names row(s) [1, 2] more than once"),
    (enqueue_repeated_rows_index_copy, "B=6 > K", "one indexed write names row(s) [1, 2] more than once"),
])
def test_enqueue_rejects(wrong, case, message):
    assert_rejected("enqueue", wrong, case, message)


def test_enqueue_with_repeated_rows_fails_only_where_rows_repeat():
    ok, failed, report = run_check("enqueue", enqueue_repeated_rows)
    assert not ok and failed == ["K=4, ptr=1, B=6 > K: only the last 4 keys survive, as if written one at a time"], report


# ----------------------------------------------------------------------------------------------
# 6. Hungarian-matched clustering accuracy
# ----------------------------------------------------------------------------------------------

def _table(y_true, y_pred):
    _, t = np.unique(y_true, return_inverse=True)
    _, p = np.unique(y_pred, return_inverse=True)
    c = np.zeros((t.max() + 1, p.max() + 1), dtype=np.int64)
    np.add.at(c, (t, p), 1)
    return c


def acc_brute_force(y_true, y_pred):
    """All one-to-one maps (small tables only)."""
    c = _table(y_true, y_pred)
    k = max(c.shape)
    sq = np.zeros((k, k), dtype=np.int64)
    sq[:c.shape[0], :c.shape[1]] = c
    return max(sq[np.arange(k), list(perm)].sum() for perm in itertools.permutations(range(k))) / c.sum()


def acc_greedy(y_true, y_pred):
    c = _table(y_true, y_pred).astype(float)
    total = 0
    for _ in range(min(c.shape)):
        i, j = np.unravel_index(np.argmax(c), c.shape)
        total += c[i, j]
        c[i, :], c[:, j] = -1, -1
    return float(total / len(y_true))


def acc_majority_vote(y_true, y_pred):
    return float(_table(y_true, y_pred).max(0).sum() / len(y_true))


def acc_unmatched(y_true, y_pred):
    return float((np.asarray(y_true) == np.asarray(y_pred)).mean())


def acc_assumes_0_to_k(y_true, y_pred):
    """Right matching, but the table is built with bincount, as if labels were 0..K-1."""
    from common import hungarian
    k = max(len(np.unique(y_true)), len(np.unique(y_pred)))
    c = np.bincount(y_true * k + y_pred, minlength=k * k).reshape(k, k)
    col = hungarian(c.max() - c)
    return float(c[np.arange(k), col].sum() / len(y_true))


def test_the_reference_accuracy_equals_brute_force_on_small_tables():
    rng = np.random.default_rng(0)
    acc = ex.EXERCISES["cluster_acc"].reference_fn()
    for _ in range(30):
        classes, clusters = rng.integers(1, 6, 2)
        y, p = rng.integers(0, classes, 40), rng.integers(0, clusters, 40)
        assert acc(y, p) == pytest.approx(acc_brute_force(y, p), abs=1e-12)


@pytest.mark.parametrize("wrong, case, message", [
    (acc_greedy, "greedy matching loses", "expected 0.615385"),
    (acc_greedy, "greedy trap inside a 4 x 4 table", "accuracy"),
    (acc_majority_vote, "two clusters may not both take", "accuracy"),
    (acc_unmatched, "perfect clustering under other cluster names", "expected 1"),
])
def test_cluster_acc_rejects(wrong, case, message):
    assert_rejected("cluster_acc", wrong, case, message)


def test_cluster_acc_rejects_labels_assumed_to_be_0_to_k():
    assert_rejected("cluster_acc", acc_assumes_0_to_k, "labels that are not 0..K-1", "raised ValueError")
    _, failed, _ = run_check("cluster_acc", acc_assumes_0_to_k)
    assert set(failed) == {"one sample", "labels that are not 0..K-1 (classes 3, 7, 42; clusters -1, 5, 1000)"}


# ----------------------------------------------------------------------------------------------
# The comparator's report and the command line
# ----------------------------------------------------------------------------------------------

def test_first_mismatch_names_the_place_and_the_values():
    want = {"result": {"bn.running_mean": torch.tensor([1.0, 2.0, 3.0])}}
    got = {"result": {"bn.running_mean": torch.tensor([1.0, 2.5, 9.0])}}
    msg = ex.first_mismatch(got, want, "")
    assert msg == "result['bn.running_mean'] at index (1,): got 2.5, expected 2 (2 of 3 entries differ)"
    assert ex.first_mismatch(want, want, "") is None
    assert "missing ['b']" in ex.first_mismatch({"a": 1}, {"a": 1, "b": 2})


def test_a_case_that_never_ends_is_stopped(monkeypatch):
    monkeypatch.setattr(ex, "CASE_SECONDS", 1)

    def endless(*a):
        while True:
            pass
    monkeypatch.setitem(ex.EXERCISES, "enqueue", ex.Exercise(5, "enqueue", "feature_fusion.enqueue", "queue",
                                                               lambda: ex.enqueue_cases()[:1]))
    ok, failed, report = run_check("enqueue", endless)
    assert not ok and "still running after 1 s" in report


def test_command_line_exit_status_and_solution_file(tmp_path, capsys):
    good = tmp_path / "mine.py"
    good.write_text("import torch\n\ndef enqueue(queue, ptr, keys):\n"
                    "    for key in keys:\n        queue[ptr] = key.detach()\n        ptr = (ptr + 1) % len(queue)\n"
                    "    return ptr\n")
    proc = subprocess.run([sys.executable, "-m", "exercises.check", "enqueue", "--solution", str(good)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "9/9 cases passed" in proc.stdout and f"checking {good}:enqueue" in proc.stdout

    assert ex.main(["5"]) == 1                         # the stub as shipped, chosen by its number
    assert "0/9 cases passed" in capsys.readouterr().out
    assert ex.main(["enqueue", "--solution", "reference"]) == 0
    assert "checking feature_fusion.enqueue against" in capsys.readouterr().out
    assert ex.main(["nope"]) == 2
    assert capsys.readouterr().err.startswith("error: no exercise 'nope'")
    assert ex.main(["enqueue", "--solution", str(tmp_path / "missing.py")]) == 2
    assert "not found" in capsys.readouterr().err
    broken = tmp_path / "broken.py"
    broken.write_text("def enqueue(queue, ptr, keys)\n    return 0\n")
    assert ex.main(["enqueue", "--solution", str(broken)]) == 2
    assert "could not import" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# The command line runs the solution in a child process: it cannot end, hang or interrupt the checker
# ----------------------------------------------------------------------------------------------

ENQUEUE_OK = ("def enqueue(queue, ptr, keys):\n    for key in keys:\n        queue[ptr] = key.detach()\n"
              "        ptr = (ptr + 1) % len(queue)\n    return ptr\n")


def check_cli(tmp_path, capfd, source, *flags, name="enqueue"):
    """ex.main on a solution file holding `source`: (exit status, stdout, stderr), child's output included."""
    file = tmp_path / "solution.py"
    file.write_text(source)
    status = ex.main([name, "--solution", str(file), *flags])
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err, out + err
    return status, out, err


def test_sys_exit_in_the_solution_fails_every_case_with_one_message(tmp_path, capfd):
    status, out, _ = check_cli(tmp_path, capfd, "import sys\n\ndef enqueue(queue, ptr, keys):\n    sys.exit(0)\n")
    assert status == 1 and "0/9 cases passed -- not yet" in out
    msg = "called sys.exit(0) (at solution.py:4): a function returns its result, it does not end the program"
    assert out.count(msg) == 1 and out.count("  FAIL  ") == 9 and out.count("the same problem as in") == 8, out


def test_sys_exit_at_import_is_a_bad_solution_not_a_pass(tmp_path, capfd):
    status, out, err = check_cli(tmp_path, capfd, "import sys\nsys.exit(0)\n" + ENQUEUE_OK)
    assert status == 2 and "PASS" not in out
    assert err.strip().splitlines() == [f"error: could not import {tmp_path / 'solution.py'}: it calls sys.exit(0) "
                                        "while being imported (at solution.py:2); keep only definitions at the top "
                                        "level of the file"]


def test_an_endless_loop_at_import_is_stopped_by_the_time_limit(tmp_path, capfd):
    status, out, err = check_cli(tmp_path, capfd, "while True:\n    pass\n" + ENQUEUE_OK, "--time-limit", "2")
    assert status == 2 and "PASS" not in out
    assert err.strip().splitlines() == [f"error: could not import {tmp_path / 'solution.py'}: still running after "
                                        "2 s (an endless loop at import time?)"]


def test_keyboard_interrupt_from_the_solution_is_a_failed_case(tmp_path, capfd):
    status, out, _ = check_cli(tmp_path, capfd, "def enqueue(queue, ptr, keys):\n    raise KeyboardInterrupt\n")
    assert status == 1 and "0/9 cases passed" in out
    assert out.count("raised KeyboardInterrupt (at solution.py:2)") == 1, out


def test_a_case_that_hangs_even_through_except_base_exception_fails_alone(tmp_path, capfd):
    """The alarm cannot stop this loop (it swallows every exception); the child is killed after the time
    limit, and a fresh one runs the remaining cases."""
    hang = ("import time\n\ndef enqueue(queue, ptr, keys):\n    while len(queue) == 4:\n        try:\n"
            "            time.sleep(0.01)\n        except BaseException:\n            pass\n"
            + "".join(ENQUEUE_OK.splitlines(keepends=True)[1:]))
    status, out, _ = check_cli(tmp_path, capfd, hang, "--time-limit", "5")    # the other cases need time too
    assert status == 1 and "8/9 cases passed -- not yet" in out, out
    assert "  FAIL  K=4, ptr=1, B=6 > K: only the last 4 keys survive, as if written one at a time\n" \
           "        still running after 5 s (an endless loop?)" in out


def test_an_input_changed_in_place_is_named_once(tmp_path, capfd):
    """Autograd refuses z1.div_() on an input that requires grad; the checker names the function and the
    argument instead of repeating autograd's error in every case."""
    source = ("import torch\nimport torch.nn.functional as F\n\ndef nt_xent(z1, z2, tau):\n"
              "    z1.div_(z1.norm(dim=1, keepdim=True))\n    z2 = F.normalize(z2, dim=1)\n"
              "    z, b = torch.cat([z1, z2]), len(z1)\n"
              "    sim = (z @ z.t() / tau).masked_fill(torch.eye(2 * b, dtype=torch.bool), float('-inf'))\n"
              "    return F.cross_entropy(sim, torch.cat([torch.arange(b, 2 * b), torch.arange(b)]))\n")
    status, out, _ = check_cli(tmp_path, capfd, source, name="nt_xent")
    assert status == 1 and "0/7 cases passed" in out
    msg = ("nt_xent changed its argument z1 in place (at solution.py:5): z1 after the call must be unchanged; "
           "compute new tensors instead of writing into the inputs")
    assert out.count(msg) == 1 and out.count("the same problem as in") == 6 and "leaf Variable" not in out, out


def test_an_input_changed_in_place_without_autograd_is_named_with_its_place():
    def sorts_its_input(y_true, y_pred):
        y_pred.sort()
        return ex.EXERCISES["cluster_acc"].reference_fn()(y_true, y_pred)
    assert_rejected("cluster_acc", sorts_its_input, "perfect clustering",
                    "cluster_acc changed its argument y_pred in place: y_pred after the call must be unchanged")
    assert_rejected("fedavg", fedavg_in_place, "weights = sample counts",
                    "fedavg changed its argument states in place (states[0]['0.weight'])")
    ok, _, report = run_check("enqueue", enqueue_one_at_a_time)      # enqueue's queue is meant to change
    assert ok, report
