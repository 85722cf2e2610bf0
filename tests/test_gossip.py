"""gossip_cl.py: the mixing matrix of every topology, one gossip step against the plain mean and
common.fedavg, the empty graph, the consensus rate the spectral gap predicts, and the script end to end
(the run folder, complete == FedAvg unweighted, resume, bad flags)."""
import copy
import math

import numpy as np
import pytest
import torch

import common
import gossip_cl as g
from conftest import (SMALL, TINY, assert_bad_input, assert_complete_run, read_run, resume_to, run_in_process,
                      run_script)

GRAPHS = [("ring", 2), ("ring", 5), ("ring", 12), ("torus", 4), ("torus", 12), ("random", 12),
          ("random", 2), ("complete", 7), ("none", 6)]


@pytest.mark.parametrize("topology,n", GRAPHS)
def test_mixing_matrix_is_symmetric_doubly_stochastic_on_the_graph(topology, n):
    adj = g.graph(n, topology, degree=3, seed=1)
    w = g.mixing_matrix(adj)
    assert np.array_equal(adj, adj.T) and not adj.diagonal().any()
    np.testing.assert_allclose(w, w.T, atol=0)
    np.testing.assert_allclose(w.sum(0), 1, atol=1e-12)
    np.testing.assert_allclose(w.sum(1), 1, atol=1e-12)
    assert (w >= 0).all() and (w.diagonal() > 0).all()
    assert np.array_equal(w > 0, adj | np.eye(n, dtype=bool))      # weight only on edges and self
    degrees = adj.sum(1)
    expected = {"ring": min(2, n - 1), "torus": {4: 2, 12: 4}.get(n), "complete": n - 1, "none": 0}
    if topology != "random":
        assert (degrees == expected[topology]).all()
    else:
        assert g.connected(adj) and np.array_equal(adj, g.graph(n, "random", 3, seed=1))   # seeded
    if topology == "complete":
        np.testing.assert_allclose(w, np.full((n, n), 1 / n), atol=1e-15)   # Metropolis-Hastings = plain mean
    lam2 = g.second_eigenvalue(w)                            # connected: the clients agree in the limit
    assert lam2 == pytest.approx(1.0) if topology == "none" else lam2 < 1 - 1e-9


def test_random_graphs_differ_between_seeds_and_ring_eigenvalue_is_the_closed_form():
    assert not np.array_equal(g.graph(12, "random", 3, seed=1), g.graph(12, "random", 3, seed=2))
    # ring with Metropolis-Hastings weights 1/3: eigenvalues (1 + 2 cos(2 pi k / n)) / 3
    for n in (5, 8, 9):
        ref = max(abs(1 + 2 * math.cos(2 * math.pi * k / n)) / 3 for k in range(1, n))
        assert g.second_eigenvalue(g.mixing_matrix(g.graph(n, "ring"))) == pytest.approx(ref, abs=1e-12)


def small_models(n, seed=0):
    """n SimCLR models (channels-last cnn, as the script builds them) with different weights, BatchNorm
    statistics and num_batches_tracked counters."""
    torch.manual_seed(seed)
    models = []
    for c in range(n):
        m = g.SimCLR(common.SmallCNN(1, "bn", 4).to(memory_format=torch.channels_last), 8)
        m(torch.randn(6, 1, 28, 28) * (c + 1))                    # train mode: running statistics move
        for mod in m.modules():
            if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
                mod.num_batches_tracked.fill_(3 * c + c * c)      # 0, 4, 10, 18: mean 8
        models.append(m)
    return models


def stack(models):
    clients = g.Stacked(copy.deepcopy(models[0]), len(models))
    for c, m in enumerate(models):
        clients.model.load_state_dict(m.state_dict())
        clients.store(c)
    return clients


def test_stacked_rows_round_trip_every_model_exactly():
    models = small_models(3)
    clients = stack(models)
    for c in (2, 0, 1):
        got = clients.load(c).state_dict()
        for key, ref in models[c].state_dict().items():
            assert torch.equal(got[key], ref), key


def test_one_gossip_step_on_complete_is_the_plain_mean_and_common_fedavg():
    models = small_models(4)
    states = [m.state_dict() for m in models]
    clients = stack(models)
    w = torch.tensor(g.mixing_matrix(g.graph(4, "complete")), dtype=torch.float32)
    g.gossip(w, clients.x, clients.counts, steps=1)
    fedavg = common.fedavg(states, weights=None)
    for c in range(4):
        got = clients.load(c).state_dict()
        for key, ref in states[0].items():
            if ref.is_floating_point():
                mean = sum(s[key] for s in states) / 4                       # by hand
                torch.testing.assert_close(got[key], mean, rtol=1e-5, atol=1e-6)
                torch.testing.assert_close(got[key], fedavg[key], rtol=1e-5, atol=1e-6)
            else:
                assert got[key].item() == fedavg[key].item() == 8, key        # (0 + 4 + 10 + 18) / 4
    assert g.consensus_distance(clients.x) < 1e-10


def test_consensus_model_is_the_plain_mean_of_the_clients_and_mixing_keeps_it():
    models = small_models(4, seed=1)
    fedavg = common.fedavg([m.state_dict() for m in models], weights=None)
    clients = stack(models)
    w = torch.tensor(g.mixing_matrix(g.graph(4, "ring")), dtype=torch.float32)
    g.gossip(w, clients.x, clients.counts, steps=2)            # doubly stochastic: the average does not move
    got = clients.load_average().state_dict()
    for key, ref in fedavg.items():
        torch.testing.assert_close(got[key], ref, rtol=1e-5, atol=1e-6)


def test_empty_graph_leaves_every_model_unchanged():
    models = small_models(3)
    clients = stack(models)
    x, counts = clients.x.clone(), clients.counts.clone()
    w = torch.tensor(g.mixing_matrix(g.graph(3, "none")), dtype=torch.float32)
    g.gossip(w, clients.x, clients.counts, steps=3)
    assert torch.equal(clients.x, x) and torch.equal(clients.counts, counts)


def test_consensus_distance_is_the_mean_squared_distance_to_the_average():
    x = torch.tensor([[0.0, 0.0], [2.0, 0.0], [4.0, 3.0]])            # average (2, 1)
    assert g.consensus_distance(x) == pytest.approx((5 + 1 + 8) / 3)   # (1/n) sum_i ||x_i - x_bar||^2


def test_gossip_step_matches_a_loop_over_neighbours():
    x = torch.randn(12, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    adj = g.graph(12, "random", 3, seed=4)
    w = g.mixing_matrix(adj)
    ref = x.clone()
    for i in range(12):                       # x_i + sum over neighbours j of W_ij (x_j - x_i)
        ref[i] = x[i] + sum(w[i, j] * (x[j] - x[i]) for j in np.flatnonzero(adj[i]))
    got = x.clone()
    g.gossip(torch.tensor(w), got, torch.zeros(12, 0, dtype=torch.long), steps=1)
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(got.mean(0), x.mean(0))        # doubly stochastic: the average is kept


@pytest.mark.parametrize("topology,n", [("ring", 8), ("torus", 12), ("random", 12)])
def test_consensus_distance_shrinks_at_the_rate_of_the_second_eigenvalue(topology, n):
    w = g.mixing_matrix(g.graph(n, topology, degree=3, seed=0))
    rate = g.second_eigenvalue(w) ** 2
    x = torch.randn(n, 50, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    counts = torch.zeros(n, 0, dtype=torch.long)
    dist = [g.consensus_distance(x)]
    while len(dist) < 60 and dist[-1] > 1e-12 * dist[0]:     # stop before float64 rounding dominates
        g.gossip(torch.tensor(w), x, counts, steps=1)
        dist.append(g.consensus_distance(x))
    ratios = np.array(dist[1:]) / np.array(dist[:-1])
    assert (ratios <= rate * (1 + 1e-9)).all()                # never slower than |lambda_2|^2 per step
    assert ratios[-1] == pytest.approx(rate, rel=1e-3)        # and eventually exactly that rate


def test_round_loop_trains_each_client_from_its_own_row_on_its_own_images(monkeypatch, tmp_path):
    """main() on a ring of 4: client c's local update gets c's images and starts from c's row of the
    stacks, which in round 2 is c's OWN mixed model (the rows differ after one ring step)."""
    calls, mixed, real_update, real_gossip = [], [], g.local_update, g.gossip
    flat = lambda m: torch.cat([t.reshape(-1) for t in m.state_dict().values() if t.is_floating_point()])

    def update(model, run, idx, args):
        calls.append((idx.clone(), [c.clone() for c in run.clients], flat(model).clone()))
        return real_update(model, run, idx, args)

    def gossip(w, x, counts, steps):
        real_gossip(w, x, counts, steps)
        mixed.append(x.clone())
    monkeypatch.setattr(g, "local_update", update)
    monkeypatch.setattr(g, "gossip", gossip)
    run_in_process(g, *SMALL, "--clients", "4", "--partition", "iid", "--width", "8", "--proj-dim", "16",
                   out=tmp_path / "runs", monkeypatch=monkeypatch)
    assert len(calls) == 8                                             # 2 rounds x 4 clients
    for i, (idx, clients, start) in enumerate(calls):
        c = i % 4
        assert torch.equal(idx, clients[c])                            # its own images
        if i >= 4:                                                     # round 2: its own row after gossip
            assert torch.equal(start, mixed[0][c]), c
    assert not torch.allclose(mixed[0][0], mixed[0][2])                # the rows differ, so the row matters


def test_end_to_end_ring_writes_mixing_figures_and_resumes_to_the_same_result(out, tmp_path):
    proc, folder = run_script("gossip_cl.py", *TINY, "--topology", "ring", out=out)
    assert proc.returncode == 0, proc.stderr
    summary, metrics = assert_complete_run(folder, rounds=2)
    lam2 = (1 + 2 * math.cos(2 * math.pi / 5)) / 3               # ring of 5 clients, weights 1/3
    assert summary["lambda_2"] == pytest.approx(lam2) and summary["spectral_gap"] == pytest.approx(1 - lam2)
    assert f"spectral gap {1 - lam2:.4f}" in proc.stdout
    assert summary["topology"] == "ring" and summary["degrees"] == [2] * 5
    model_bytes = common.state_bytes(g.SimCLR(common.SmallCNN(1), 128))
    for m in metrics:
        assert m["bytes_sent_per_client"] == 2 * model_bytes        # two neighbours, one step
        assert 0 < m["consensus_dist"] <= lam2 ** 2 * m["consensus_dist_local"] * (1 + 1e-4)
        assert 0 <= m["knn_acc_consensus"] <= 1
    per = summary["per_client"]
    assert len(per) == 5 and set(summary["consensus"]) == set(per[0])
    for key in per[0]:                                               # headline = mean over client models
        assert summary[key] == pytest.approx(np.mean([p[key] for p in per]))
    assert metrics[-1]["knn_acc"] == summary["knn_acc"]              # same models, same kNN
    assert metrics[-1]["knn_acc_consensus"] == summary["consensus"]["knn_acc"]
    # interrupted after round 1, resumed to 2: the same numbers as the uninterrupted run
    flags = list(TINY)
    flags[flags.index("--rounds") + 1] = "1"
    proc, part = run_script("gossip_cl.py", *flags, out=tmp_path / "b")
    assert proc.returncode == 0, proc.stderr
    proc = resume_to("gossip_cl.py", part, tmp_path / "b", rounds=2)
    assert proc.returncode == 0, proc.stderr
    s_res, m_res, _ = read_run(part)
    for key in ("loss", "knn_acc", "knn_acc_consensus", "consensus_dist_local", "consensus_dist"):
        assert m_res[1][key] == metrics[1][key], key
    assert s_res["per_client"] == per and s_res["consensus"] == summary["consensus"]


def test_complete_graph_with_one_step_is_fedavg_unweighted(out, tmp_path):
    proc, folder = run_script("gossip_cl.py", *TINY, "--topology", "complete", out=out)
    assert proc.returncode == 0, proc.stderr
    ref, ref_folder = run_script("fedavg_cl.py", *TINY, "--weighted", "false", out=tmp_path / "fedavg")
    assert ref.returncode == 0, ref.stderr
    (summary, metrics, _), (s_ref, m_ref, _) = read_run(folder), read_run(ref_folder)
    assert metrics[0]["loss"] == m_ref[0]["loss"]                   # round 1: the same start, the same steps
    for m, r in zip(metrics, m_ref):                                # after that: float sums in another order
        assert m["loss"] == pytest.approx(r["loss"], rel=1e-4)
        assert m["consensus_dist"] < 1e-9 < m["consensus_dist_local"]
        assert m["knn_acc"] == pytest.approx(r["knn_acc"], abs=0.01)
    assert summary["knn_acc"] == pytest.approx(s_ref["knn_acc"], abs=0.01)


@pytest.mark.parametrize("flags,needle", [
    (["--topology", "star"], "--topology"),
    (["--gossip-steps", "0"], "--gossip-steps"),
    (["--topology", "random", "--degree", "5"], "--degree"),
    (["--topology", "torus"], "--topology torus"),                  # 5 clients: prime
    (["--topology", "random", "--degree", "1", "--clients", "30"], "raise --degree"),   # 15 edges < a tree's 29
    (["--participation", "0.5"], "--participation"),
])
def test_bad_flags_exit_2_with_one_error_line(flags, needle, out):
    proc, _ = run_script("gossip_cl.py", *TINY, *flags, out=out)
    assert_bad_input(proc, out, needle)


def test_benchmark_and_compare_cover_gossip_cl():
    import benchmark
    import compare
    flags = ["--clients", "2", "--partition", "iid", "--width", "8", "--proj-dim", "16", "--batch-size", "24"]
    spec = benchmark.spec_for("gossip_cl", benchmark.dry_config("gossip_cl", flags))
    assert (spec.kind, spec.proj, spec.batch, spec.width) == ("simclr", [32, 16], 24, 8)   # its own SimCLR step
    args = compare.parse_args(["--device", "cpu"])
    topo = {k: common.parse_args(g.Args, compare.method_flags(k, args, "classes", 0)[1:]).topology
            for k in ("gossip_ring", "gossip_complete")}
    assert topo == {"gossip_ring": "ring", "gossip_complete": "complete"}
