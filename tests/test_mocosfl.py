"""mocosfl.py against slow references: the unsplit network, one graph through all clients and the
server, per-client nn.Module copies with their own torch.optim.SGD, and a loop-based InfoNCE."""
import copy
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

import common
import mocosfl
from conftest import ROOT, TINY, assert_bad_input, assert_complete_run, assert_encoder_reproduces, read_run, run_script, resume_to


def make(clients=3, channels=1, **kw):
    args = mocosfl.Args(clients=clients, device="cpu", **kw)
    args.check()
    return args


def stacked_pool(st, P, seed):
    """Pool weights with a different random perturbation per client (online and momentum models)."""
    g = torch.Generator().manual_seed(seed)
    w = {k: (p.detach().expand(P, *p.shape) + 0.1 * torch.randn(P, *p.shape, generator=g)).requires_grad_()
         for k, p in st["client"].named_parameters()}
    w_m = {k: v.detach() + 0.1 * torch.randn(v.shape, generator=g) for k, v in w.items()}
    return {"w": w, "w_m": w_m, "buf": {k: torch.zeros_like(v) for k, v in w_m.items()}}


def module_of(client, weights):
    """An ordinary nn.Module copy of the client part holding one client's weights."""
    m = copy.deepcopy(client)
    with torch.no_grad():
        for k, p in m.named_parameters():
            p.copy_(weights[k])
    return m


def ref_info_nce(q, k, queue, tau):
    """InfoNCE one query at a time: -log softmax([q.k, q.queue_1, ...] / tau)[0], averaged."""
    total = 0
    for j in range(len(q)):
        qj, kj = q[j] / q[j].norm(), k[j] / k[j].norm()
        logits = torch.cat([(qj * kj).sum().view(1), queue @ qj]) / tau
        total = total - torch.log_softmax(logits, 0)[0]
    return total / len(q)


class Reference:
    """Loop over clients, one autograd graph from the client weights to the loss (no split)."""

    def __init__(self, st, pool, args):
        P = len(next(iter(pool["w"].values())))
        self.clients = [module_of(st["client"], {k: v[i] for k, v in pool["w"].items()}) for i in range(P)]
        self.momenta = [module_of(st["client"], {k: v[i] for k, v in pool["w_m"].items()}) for i in range(P)]
        self.opts = [torch.optim.SGD(c.parameters(), lr=1.0, momentum=0.9, weight_decay=args.weight_decay)
                     for c in self.clients]
        self.server, self.server_m = copy.deepcopy(st["server"]), copy.deepcopy(st["server_m"])
        self.server_opt = torch.optim.SGD(self.server.parameters(), lr=1.0, momentum=0.9,
                                          weight_decay=args.weight_decay)
        self.queue, self.ptr, self.args = st["queue"].clone(), st["meta"]["queue_ptr"], args

    def loss(self, x_q, x_k):
        a = self.args
        h_q = [c(x) for c, x in zip(self.clients, x_q)]
        with torch.no_grad():
            for c, cm in zip(self.clients, self.momenta):
                for p, pm in zip(c.parameters(), cm.parameters()):
                    pm.mul_(a.m).add_((1 - a.m) * p)
            h_k = torch.cat([cm(x) for cm, x in zip(self.momenta, x_k)])
            for p, pm in zip(self.server.parameters(), self.server_m.parameters()):
                pm.mul_(a.m).add_((1 - a.m) * p)
            k1, k2 = self.server_m(torch.cat(h_q)), self.server_m(h_k)
        H_q = torch.cat(h_q)
        loss = (ref_info_nce(self.server(H_q), k2, self.queue, a.tau)          # L12
                + ref_info_nce(self.server(h_k), k1, self.queue, a.tau))      # L21
        return loss, h_q, torch.cat([k1, k2])

    def step(self, x_q, x_k, lr):
        loss, h_q, keys = self.loss(x_q, x_k)
        for opt in self.opts + [self.server_opt]:
            opt.zero_grad()
            opt.param_groups[0]["lr"] = lr
        loss.backward()
        for opt in self.opts + [self.server_opt]:
            opt.step()
        for key in F.normalize(keys, dim=1):
            self.queue[self.ptr] = key
            self.ptr = (self.ptr + 1) % len(self.queue)
        return loss.detach()


def run_round(st, clients, pool, steps, args, views, lr=0.05):
    """mocosfl.run_round with the pool's image orders from the current stream; views(idx) -> (x_q, x_k)."""
    orders = {c: mocosfl.client_order(clients[c], steps * args.batch_size) for c in pool}
    return mocosfl.run_round(st, pool, orders, steps, lr, args, lambda c, idx: views(idx))


def setup(P=3, B=2, seed=0, **kw):
    torch.manual_seed(seed)
    args = make(clients=P, batch_size=B, queue_size=16, proj_dim=8, **kw)
    st = mocosfl.init_state(args, 1, torch.device("cpu"))
    pool = stacked_pool(st, P, seed)
    x_q, x_k = torch.randn(P, B, 1, 12, 12), torch.randn(P, B, 1, 12, 12)
    return args, st, pool, x_q, x_k


@pytest.mark.parametrize("encoder,cuts,shape", [("cnn", (1, 2), (1, 12, 12)), ("resnet18", (1, 2), (3, 8, 8))])
def test_split_forward_equals_unsplit_forward(encoder, cuts, shape):
    for cut in cuts:
        args = make(encoder=encoder, cut_layer=cut)
        torch.manual_seed(1)
        whole = common.make_encoder(args, shape[0])
        torch.manual_seed(1)
        client, trunk = mocosfl.split_network(args, shape[0])
        x = torch.randn(2, 3, *shape)                          # 2 clients x 3 images
        w = {k: p.detach().expand(2, *p.shape) for k, p in client.named_parameters()}
        with torch.no_grad():
            split = trunk(mocosfl.client_forward(client, w, x).flatten(0, 1))
            assert torch.allclose(split, whole(x.flatten(0, 1)), atol=1e-4, rtol=1e-4), (encoder, cut)


def test_resnet18_client_sizes_match_the_paper():
    sizes = [sum(p.numel() for p in mocosfl.split_network(make(encoder="resnet18", cut_layer=c), 3)[0].parameters())
             for c in (1, 2)]
    assert sizes == [1856, 75840]          # MocoSFL-1 and MocoSFL-3


def test_client_gradient_equals_gradient_of_unsplit_loss():
    args, st, pool, x_q, x_k = setup()
    ref = Reference(st, pool, args)
    ref_loss, h_list, _ = ref.loss(x_q, x_k)
    want = torch.autograd.grad(ref_loss, h_list)
    # the split: clients send detached activations, the server returns dL/dH_q sliced per client
    h_q = mocosfl.client_forward(st["client"], pool["w"], x_q)
    with torch.no_grad():
        for k in pool["w_m"]:
            pool["w_m"][k].mul_(args.m).add_(pool["w"][k], alpha=1 - args.m)
        h_k = mocosfl.client_forward(st["client"], pool["w_m"], x_k)
    H_q = h_q.detach().flatten(0, 1).requires_grad_()
    common.ema_update(st["server_m"], st["server"], args.m)
    loss, _ = mocosfl.server_step(st["server"], st["server_m"], st["queue"], H_q, h_k.flatten(0, 1), args.tau)
    loss.backward()
    assert torch.allclose(loss, ref_loss, atol=1e-5)
    sent = H_q.grad.view_as(h_q)
    for i in range(len(want)):
        assert torch.allclose(sent[i], want[i], atol=1e-6, rtol=1e-4)
    assert sent.abs().sum() > 0


def test_vectorised_train_step_equals_per_client_loop():
    """Two full steps (momentum buffers and queue wrap-around in play) against the unsplit loop."""
    args, st, pool, x_q, x_k = setup()
    ref = Reference(st, pool, args)
    for step, lr in enumerate((0.05, 0.03)):
        xq, xk = x_q + step, x_k - step
        loss = mocosfl.train_step(st, pool, xq, xk, lr, args)
        ref_loss = ref.step(xq, xk, lr)
        assert torch.allclose(loss, ref_loss, atol=1e-5)
    for i, (c, cm) in enumerate(zip(ref.clients, ref.momenta)):
        for k, p in c.named_parameters():
            assert torch.allclose(pool["w"][k][i], p, atol=1e-5), k
            assert torch.allclose(pool["w_m"][k][i], dict(cm.named_parameters())[k], atol=1e-6)
            assert torch.allclose(pool["buf"][k][i], ref.opts[i].state[p]["momentum_buffer"], atol=1e-5)
    for p, q in zip(st["server"].parameters(), ref.server.parameters()):
        assert torch.allclose(p, q, atol=1e-5)
    assert st["meta"]["queue_ptr"] == ref.ptr == (2 * 12) % 16
    assert torch.allclose(st["queue"], ref.queue, atol=1e-5)


def test_vectorised_client_step_equals_separate_client_steps():
    """N clients, random server gradients: vmap + stacked SGD == N modules each with torch.optim.SGD."""
    args, st, pool, x_q, _ = setup(P=5, B=1)
    w_start = pool["w"]["0.0.weight"].detach().clone()
    refs = [module_of(st["client"], {k: v[i] for k, v in pool["w"].items()}) for i in range(5)]
    opts = [torch.optim.SGD(r.parameters(), lr=0.1, momentum=0.9, weight_decay=args.weight_decay) for r in refs]
    for step in range(2):
        g = torch.randn(5, 1, 32, 6, 6)
        mocosfl.client_forward(st["client"], pool["w"], x_q).backward(g)
        mocosfl.sgd_step(pool["w"], pool["buf"], 0.1, args.weight_decay)
        for i, (r, opt) in enumerate(zip(refs, opts)):
            opt.zero_grad()
            r(x_q[i]).backward(g[i])
            opt.step()
    for i, r in enumerate(refs):
        for k, p in r.named_parameters():
            assert torch.allclose(pool["w"][k][i], p, atol=1e-6), (i, k)
    # each client moved by its own gradient (the rows differed before the steps, so compare the moves)
    moved = pool["w"]["0.0.weight"] - w_start
    assert moved.abs().sum() > 0 and not torch.allclose(moved[0], moved[1], atol=1e-6)


@pytest.mark.parametrize("with_momentum", [False, True])
def test_sync_averages_exactly_the_online_models(with_momentum):
    _, st, pool, _, _ = setup(P=4)
    w0 = {k: v.detach().clone() for k, v in pool["w"].items()}
    m0 = {k: v.clone() for k, v in pool["w_m"].items()}
    mocosfl.sync(pool["w"], pool["w_m"], with_momentum)
    for k in w0:
        for i in range(4):
            assert torch.allclose(pool["w"][k][i], w0[k].mean(0), atol=1e-7)
            if with_momentum:
                assert torch.allclose(pool["w_m"][k][i], m0[k].mean(0), atol=1e-7)
        if not with_momentum:
            assert torch.equal(pool["w_m"][k], m0[k])


@pytest.mark.parametrize("with_momentum", [False, True])
def test_round_writes_back_only_the_pool(with_momentum):
    """After a round every client's online model is the pool's mean (one copy kept); momentum models
    and SGD buffers of clients outside the pool are untouched unless momentum models are averaged."""
    torch.manual_seed(0)
    args = make(clients=6, batch_size=2, queue_size=32, proj_dim=8, sync_every=1, sync_momentum=with_momentum)
    st = mocosfl.init_state(args, 1, torch.device("cpu"))
    st["client_m"].add_(0.1 * torch.randn_like(st["client_m"]))          # one row per client (mocosfl.flat)
    m0 = mocosfl.as_params(st["client_m"], st["client"])
    x = torch.randn(60, 1, 12, 12)
    clients = list(torch.arange(60).chunk(6))
    pool = [1, 3, 4]
    run_round(st, clients, pool, 3, args, lambda i: (x[i] + 0.1, x[i] - 0.1))
    w = mocosfl.as_params(st["client_m"], st["client"])["0.0.weight"]
    if with_momentum:
        assert all(torch.allclose(w[i], w[0], atol=1e-7) for i in range(6))
    else:
        assert all(torch.equal(w[i], m0["0.0.weight"][i]) for i in (0, 2, 5))
        assert not torch.allclose(w[1], m0["0.0.weight"][1])
    buf = mocosfl.as_params(st["client_buf"], st["client"])["0.0.weight"]
    assert all(buf[i].abs().sum() == 0 for i in (0, 2, 5)) and all(buf[i].abs().sum() > 0 for i in pool)
    assert st["meta"]["weights_bytes"] == 3 * 3 * common.state_bytes(st["client"]) * (2 if with_momentum else 1)


def test_resnet18_vmap_equals_a_loop_over_clients_with_different_weights():
    """MocoSFL-3's client (stem + a basic block, GroupNorm + WS) with a different model per client:
    the vmapped forward and the gradient in each client's row equal a per-client nn.Module's."""
    torch.manual_seed(5)
    client, _ = mocosfl.split_network(make(encoder="resnet18", cut_layer=2), 3)
    g = torch.Generator().manual_seed(6)
    w = {k: (p.detach().expand(3, *p.shape) + 0.2 * torch.randn(3, *p.shape, generator=g)).requires_grad_()
         for k, p in client.named_parameters()}
    x = torch.randn(3, 2, 3, 8, 8)
    h = mocosfl.client_forward(client, w, x)
    grad_out = torch.randn_like(h)
    h.backward(grad_out)
    for i in range(3):
        ref = module_of(client, {k: v[i] for k, v in w.items()})
        out = ref(x[i])
        assert torch.allclose(h[i], out, atol=1e-5, rtol=1e-4), i
        out.backward(grad_out[i])
        for k, p in ref.named_parameters():
            assert torch.allclose(w[k].grad[i], p.grad, atol=1e-5, rtol=1e-4), (i, k)
    assert not torch.allclose(h[0], h[1], atol=1e-3)          # the clients' models really differ


def test_cosine_lr_per_round():
    args = make(lr=0.06, rounds=4)
    assert [mocosfl.cosine_lr(args, r) for r in (1, 2, 3, 4)] == pytest.approx(
        [0.06, 0.03 * (1 + math.sqrt(0.5)), 0.03, 0.03 * (1 - math.sqrt(0.5))])


def test_rounds_write_back_the_mean_and_carry_momentum_models_and_buffers():
    """Round 1 ends by loading the pool's last synced mean into the one client model; round 2 starts from
    it, and from each pool client's own momentum model and SGD buffer as round 1 left them (zero for a
    client that never trained), never from fresh ones."""
    torch.manual_seed(0)
    args = make(clients=6, batch_size=2, queue_size=32, proj_dim=8, sync_every=2)
    st = mocosfl.init_state(args, 1, torch.device("cpu"))
    x = torch.randn(60, 1, 12, 12)
    clients = list(torch.arange(60).chunk(6))
    views = lambda i: (x[i] + 0.1, x[i] - 0.1)
    synced, entry = [], []
    real_sync, real_step = mocosfl.sync, mocosfl.train_step

    def spy_sync(w, w_m, with_momentum, *a):
        means = real_sync(w, w_m, with_momentum, *a)
        synced.append({k: v.detach().clone() for k, v in w.items()})
        return means

    def spy_step(st_, pool, *a):
        entry.append({part: {k: v.detach().clone() for k, v in pool[part].items()} for part in ("w", "w_m", "buf")})
        return real_step(st_, pool, *a)

    mocosfl.sync, mocosfl.train_step = spy_sync, spy_step
    try:
        w0 = {k: p.detach().clone() for k, p in st["client"].named_parameters()}
        run_round(st, clients, [1, 3, 4], 3, args, views)
        after = {k: p.detach().clone() for k, p in st["client"].named_parameters()}
        m1, b1 = (mocosfl.as_params(st[part], st["client"]) for part in ("client_m", "client_buf"))
        entry.clear()
        run_round(st, clients, [3, 5], 1, args, views)
    finally:
        mocosfl.sync, mocosfl.train_step = real_sync, real_step
    assert len(synced) == 3                                   # after steps 2 and 3 of round 1, step 1 of round 2
    for k in after:
        assert torch.equal(after[k], synced[1][k][0])         # the last synced mean of round 1 ...
        assert not torch.allclose(after[k], w0[k])            # ... which moved away from the start
        assert all(torch.equal(entry[0]["w"][k][i], after[k]) for i in range(2))   # round 2 downloads it
        assert torch.equal(entry[0]["w_m"][k][0], m1[k][3]) and torch.equal(entry[0]["w_m"][k][1], m1[k][5])
        assert torch.equal(entry[0]["buf"][k][0], b1[k][3]) and entry[0]["buf"][k][1].abs().sum() == 0
        assert b1[k][3].abs().sum() > 0 and not torch.equal(m1[k][3], m1[k][5])


def test_each_pool_row_trains_on_its_own_clients_images(monkeypatch):
    """Row i of the pool's step input holds only images of client pool[i], and over the round it sees every
    one of them (a client with fewer images than the round needs wraps around in a fresh order)."""
    torch.manual_seed(0)
    args = make(clients=6, batch_size=4, queue_size=32, proj_dim=8)
    st = mocosfl.init_state(args, 1, torch.device("cpu"))
    x = torch.arange(60.0).view(60, 1, 1, 1).expand(60, 1, 12, 12)      # every pixel of image j is j
    clients = [torch.arange(60)[i::6] for i in range(6)]                 # interleaved: client i holds i, i+6, ...
    pool, seen = [4, 1, 3], []
    real = mocosfl.train_step

    def spy(st_, pool_st, x_q, *a):
        seen.append(x_q[:, :, 0, 0, 0].long())                           # P x B image ids of this step
        return real(st_, pool_st, x_q, *a)
    monkeypatch.setattr(mocosfl, "train_step", spy)
    run_round(st, clients, pool, 3, args, lambda i: (x[i], x[i]))        # 3 steps x 4 = 12 > 10 images each
    rows = torch.cat(seen, dim=1)
    for r, c in enumerate(pool):
        assert set(rows[r].tolist()) == set(clients[c].tolist()), (r, c)


def test_client_step_memory_counts_activations_per_image():
    client, _ = mocosfl.split_network(make(), 1)
    one, two, three = (mocosfl.client_step_bytes(client, torch.randn(b, 1, 28, 28)) for b in (1, 2, 3))
    assert three - two == two - one > 3 * 32 * 14 * 14 * 4          # activations grow with the batch
    assert one - (two - one) >= 4 * common.state_bytes(client)      # weights, gradient, buffer, momentum model


def test_code_rule_for_pool_batch_and_rounds():
    """The schedule table: 5 clients x 20 images; >= 100 clients: 1 image; >= 200: pool of 100, epochs scaled."""
    rule = [(a.participation, a.batch_size, a.rounds) for a in
            (make(clients=n, passes=200) for n in (5, 100, 200, 1000))]
    assert rule == [(1.0, 20, 200), (1.0, 1, 200), (0.5, 1, 400), (0.1, 1, 2000)]


def test_end_to_end_5_clients_and_resume(out, tmp_path):
    flags = [*TINY, "--clients", "5", "--sync-every", "2"]          # later flags win
    proc, folder = run_script("mocosfl.py", *flags, out=out)
    assert proc.returncode == 0, proc.stderr
    summary, metrics = assert_complete_run(folder, rounds=2)
    # 600 images / 5 clients = 120 each, B = 32 -> 3 steps per round, syncs after steps 2 and 3
    assert [(m["pool"], m["steps"], m["images"]) for m in metrics] == [(5, 3, 960)] * 2
    assert [m["lr"] for m in metrics] == pytest.approx([0.06, 0.03])           # cosine over 2 rounds
    ckpt = torch.load(folder / "checkpoint.pt", weights_only=False)
    assert ckpt["state"]["server_opt"]["param_groups"][0]["lr"] == pytest.approx(0.03)   # what round 2 used
    assert summary["client_params"] == 32 * 9 + 64
    assert summary["comm_weights_mib"] == pytest.approx(2 * 2 * 352 * 4 / 2 ** 20)
    per_image = 32 * 14 * 14 * 4
    assert summary["comm_smashed_mib"] == pytest.approx(2 * 2 * 32 * 3 * per_image / 2 ** 20)
    assert summary["comm_grads_mib"] == pytest.approx(summary["comm_smashed_mib"] / 2)
    assert summary["client_step_mib"] > 0
    # the client and server halves joined into one encoder (channels-last there, so a vote may flip)
    assert_encoder_reproduces(folder, summary["knn_acc"], tol_images=1)
    # interrupted after round 1, resumed: the same numbers as the uninterrupted run
    out2 = tmp_path / "resumed"
    proc, part = run_script("mocosfl.py", *flags, "--rounds", "1", out=out2)
    assert proc.returncode == 0, proc.stderr
    proc = resume_to("mocosfl.py", part, out2, rounds=2)
    assert proc.returncode == 0, proc.stderr
    _, resumed, _ = read_run(part)
    assert [m["loss"] for m in resumed] == [m["loss"] for m in metrics]
    assert resumed[-1]["knn_acc"] == metrics[-1]["knn_acc"]


def test_checkpoint_every_k_rounds_and_a_crash_resumes_exactly(tmp_path):
    """--checkpoint-every 2 over 4 rounds: a run that dies at the start of round 4 left the checkpoint of round 2
    (not 3) and metrics of rounds 1-3; --resume redoes round 3 and reaches every number of the uninterrupted run."""
    flags = [*TINY, "--train-size", "300", "--test-size", "100", "--rounds", "4", "--checkpoint-every", "2",
             "--eval-every", "2", "--probe-epochs", "1"]
    ref, ref_folder = run_script("mocosfl.py", *flags, out=tmp_path / "ref")
    assert ref.returncode == 0, ref.stderr
    out = tmp_path / "crash"
    die = (f"import os, sys\nsys.path.insert(0, {str(ROOT)!r})\n"
           f"sys.argv = [{str(ROOT / 'mocosfl.py')!r}, *{[*flags, '--out', str(out)]!r}]\n"
           "import mocosfl\nlr = mocosfl.cosine_lr\n"
           "mocosfl.cosine_lr = lambda args, rnd: os._exit(9) if rnd == 4 else lr(args, rnd)   # killed\n"
           "mocosfl.main()\n")
    proc = subprocess.run([sys.executable, "-c", die], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert proc.returncode == 9, proc.stderr
    folder, = out.glob("*/")
    assert [m["round"] for m in read_run(folder)[1]] == [1, 2, 3]
    assert torch.load(folder / "checkpoint.pt", weights_only=False)["round"] == 2
    res, _ = run_script("mocosfl.py", "--resume", folder, out=out)
    assert res.returncode == 0, res.stderr
    (s_ref, m_ref, _), (s_res, m_res, _) = read_run(ref_folder), read_run(folder)
    timing = {"images_per_s", "elapsed_s", "wall_s"}
    assert [{k: v for k, v in m.items() if k not in timing} for m in m_res] == \
        [{k: v for k, v in m.items() if k not in timing} for m in m_ref]
    assert {k: v for k, v in s_res.items() if k not in timing} == {k: v for k, v in s_ref.items() if k not in timing}
    assert torch.load(folder / "checkpoint.pt", weights_only=False)["round"] == 4


def test_end_to_end_1000_clients(out):
    proc, folder = run_script("mocosfl.py", *TINY, "--clients", "1000", "--train-size", "2000", out=out)
    assert proc.returncode == 0, proc.stderr
    summary, metrics = assert_complete_run(folder, rounds=2)
    _, _, cfg = read_run(folder)
    assert cfg["args"]["participation"] == 0.1 and cfg["args"]["batch_size"] == 32
    # 2 images per client, B = 32 > 2: one step per round of a pool of 100 clients
    assert [(m["pool"], m["steps"], m["images"]) for m in metrics] == [(100, 1, 2 * 100 * 32)] * 2
    assert summary["comm_weights_mib"] == pytest.approx(2 * 100 * 352 * 4 / 1000 / 2 ** 20)


@pytest.mark.parametrize("flag,value,needle", [("--cut-layer", "3", "--cut-layer"), ("--norm", "bn", "--norm"),
                                               ("--optimizer", "adam", "--optimizer"),
                                               ("--checkpoint-every", "0", "--checkpoint-every must be at least 1")])
def test_bad_flags_exit_2(out, flag, value, needle):
    proc, _ = run_script("mocosfl.py", *TINY, flag, value, out=out)
    assert_bad_input(proc, out, needle)


def test_each_pool_client_draws_from_its_own_stream(out, monkeypatch):
    """main: client c's image order and the augmentation of its views in round r come from the stream seeded
    by (seed, r, c), in that order, whichever clients are in the pool with it."""
    from conftest import SMALL, run_in_process
    seen = {}

    def spy(st, pool, orders, steps, lr, args, views, *rest):
        seen[len(seen) + 1] = (pool, orders, [views(c, orders[c][:5]) for c in pool])   # the round's first draws
        return real(st, pool, orders, steps, lr, args, views, *rest)
    real = mocosfl.run_round
    monkeypatch.setattr(mocosfl, "run_round", spy)
    run_in_process(mocosfl, *SMALL, "--clients", "6", "--participation", "0.5", "--batch-size", "8", "--seed", "4",
                   out=out, monkeypatch=monkeypatch)
    args = make(clients=6, train_size=200, test_size=100, seed=4)
    data, _ = common.load_data(args, torch.device("cpu"))
    parts = common.partition(data.train_y.numpy(), args, log=lambda m: None)      # run.clients
    aug = common.Augment(data)
    assert seen[1][0] != seen[2][0]                                       # two rounds, two pools of 3
    for rnd, (pool, orders, views) in seen.items():
        assert len(pool) == 3 and sorted(orders) == pool
        for c, (x_q, x_k) in zip(pool, views):
            with torch.random.fork_rng():
                torch.manual_seed(common.client_seed(4, rnd, c))
                order = mocosfl.client_order(torch.as_tensor(parts[c]), len(orders[c]))
                x = data.train_x[order[:5]]
                want = aug(torch.cat([x, x]))
            assert torch.equal(orders[c], order), (rnd, c)
            assert torch.equal(torch.cat([x_q, x_k]), want), (rnd, c)


@pytest.mark.parametrize("encoder,cut,shape", [("cnn", 1, (1, 12, 12)), ("resnet18", 1, (3, 8, 8)),
                                               ("resnet18", 2, (3, 8, 8))])
def test_a_process_holding_few_clients_computes_their_rows_as_the_whole_pool(encoder, cut, shape):
    """torchrun: any share of the pool's clients, computed padded to min(pool, GROUPS) rows, gives bit for bit
    the activations and weight gradients that the whole pool's vmap gives them (one process). Without the
    padding, 1 or 2 clients' convolution is not the grouped one of the pool (on this CPU build)."""
    torch.manual_seed(0)
    client, _ = mocosfl.split_network(make(encoder=encoder, cut_layer=cut), shape[0])
    for P in (2, 5):
        g = torch.Generator().manual_seed(P)
        w = {k: (p.detach().expand(P, *p.shape) + 0.1 * torch.randn(P, *p.shape, generator=g)).requires_grad_()
             for k, p in client.named_parameters()}
        x = torch.randn(P, 2, *shape, generator=g)
        h = mocosfl.client_forward(client, w, x, min(P, mocosfl.GROUPS))     # one process: all P, no padding
        grad_out = torch.randn(h.shape, generator=g)
        h.backward(grad_out)
        for share in ([0], [P - 1], [0, P - 1], [1, 2, 4], [0, 1, 3, 4]):
            if max(share) >= P or len(share) == P:
                continue
            ws = {k: v.detach()[share].clone().requires_grad_() for k, v in w.items()}
            hs = mocosfl.client_forward(client, ws, x[share], min(P, mocosfl.GROUPS))
            hs.backward(grad_out[share])
            assert torch.equal(hs, h[share]), (P, share)
            for k in w:
                assert torch.equal(ws[k].grad, w[k].grad[share]), (P, share, k)
