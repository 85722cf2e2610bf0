"""MocoSFL: split federated learning + MoCo, with up to 1000 clients on one machine.

Paper: J. Li, L. Lyu, D. Iso, C. Chakrabarti, M. Spranger, "MocoSFL: enabling cross-client collaborative
self-supervised learning", ICLR 2023, https://openreview.net/forum?id=2QGJXyMNoPz. Official code:
https://github.com/SonyResearch/MocoSFL ([code] below; [paper] = the paper's text).
The backbone is cut after `--cut-layer` units: client i holds the part before the cut (C_i) and its momentum
copy (Cbar_i); the server holds the rest plus the head (S) and its momentum copy (Sbar). One step, pool-wide:
  1. client i: h_q = C_i(x_q) (graph kept), Cbar_i <- m Cbar_i + (1-m) C_i, h_k = Cbar_i(x_k)       [code]
  2. server: H_q = cat_i h_q, H_k = cat_i h_k (latent-vector concatenation); Sbar <- m Sbar + (1-m) S;
     L = InfoNCE(S(H_q), Sbar(H_k), queue) + InfoNCE(S(H_k), Sbar(H_q), queue), one queue of keys from all
     clients (feature sharing), one SGD step                                                  [paper, code]
  3. client i gets its slice of dL/dH_q (only the first term reaches it), back-propagates, steps its own
     SGD (momentum 0.9, weight decay; its buffer persists)                                            [code]
  4. every `--sync-every` steps and at the round's end the pool's ONLINE client models become their mean
     (unweighted); momentum models are not [code]; `--sync-momentum true`: they too (MonAcoSFL) [later paper]
[code] A round = one epoch (`--local-epochs` passes per pool client); all clients if fewer than 200, else a
  pool of N / (N // 100) and N // 100 times the epochs (same `--passes`); B = 100 // pool images per client
  (at least 1). GroupNorm (4 channels per group) + weight standardisation (micro-batches of one image);
  `--preset paper` = ResNet-18 (CIFAR stem), units [stem, 8 basic blocks]: cut 1 = MocoSFL-1 (1,856 client
  parameters), cut 2 = MocoSFL-3 (75,840); head Linear(512,1024) ReLU Linear(1024,1024), queue 6000, tau 0.1,
  m 0.99, SGD 0.06 cosine, wd 5e-4. [reconstruction] CPU default: the small CNN (3 units), a 128-wide head.
Where we differ from the code ([reconstruction]):
  - steps per round = (local_epochs x mean pool-client size) // B, each client on its own shuffled stream
    (wrapping around); the code runs len(client 0's loader) steps (last partial batch included) for all.
  - sync every 50 steps by default; the code syncs 1000 // (B x N) times per epoch: every 50 steps in the
    paper's CIFAR-10 settings, every 10 on our 5-client Fashion-MNIST run (there `--sync-every 10`; sync()).
  - one cosine lr per round (cosine_lr()) for server AND clients. Defect: the code steps each client's
    CosineAnnealingLR(T_max = epochs) (functions/sflmoco_functions.py 51) once per client STEP
    (functions/sfl_functions.py 138): its client lr cycles 0.06 -> 0 -> 0.06 every 2 x epochs steps.
  - averaging: the real pool mean. Defect: the code's average_weights starts its sum from client 0's model,
    not the first pool client's (see sync()); both agree when all clients are in the pool (N < 200).
  - the head keeps PyTorch's default initialisation (the code: xavier).
Paper numbers 86.46 / 84.75 (linear probe, 1000 clients, non-IID CIFAR-10, 200 passes; MocoSFL-1 / -3; the
abstract's ">84 %" = --cut-layer 2) use the best-test-kNN checkpoint's best probe epoch, Gaussian blur and
crop scale 0.08 (datasets.py 213; add --crop-min 0.08); ours: the final model's last probe epoch, so lower.
Out of scope: TAResSFL (privacy: a frozen, inversion-resistant client model, bottleneck), inversion attacks.
1000 clients: the pool's weights are STACKED (a leading client dimension), one vmap(functional_call(C, w_i,
x_i)) does what the per-client loop does (client_forward). Each pool client has its own stream run.client(c)
(seed, round, client). Logged: MiB per client (weights at syncs, h_q, h_k, gradients), one step's client
memory (saved-tensor hooks). torchrun: client c on process c % N, the server step replicated (run_round).
Run:      python mocosfl.py --clients 1000 --partition classes --classes-per-client 2   (CPU, minutes)
          python mocosfl.py --clients 5                         (5 clients, 20 images each per step)
          python mocosfl.py --preset paper                      (1000 clients, 2000 rounds; for a GPU)
          torchrun --standalone --nproc_per_node 2 mocosfl.py --clients 1000   (the pool on 2 processes)
Expected: see results/claims.md and results/results.md (the committed cells); an old 1000-client number
(1c978ae, 2026-11-23, before the per-client streams) and the checkpoint sizes are in results/recipes.md.
"""
import copy
import math
import time
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, vmap

import common

UNITS = {"cnn": 3, "resnet18": 9}   # cut units of each backbone
# vmap makes the clients' convolutions one grouped convolution, a group per client. The CPU's (oneDNN's)
# computes a group with the same float operations whatever the number of groups from 3 on, but not with
# 1 or 2 (tests/test_mocosfl.py); so a process holding fewer of the pool's clients pads them with copies
# to min(pool, GROUPS) rows, and under torchrun every client's h_q, h_k and gradients are bit for bit those
# of one process.
GROUPS = 3


@dataclass
class Args(common.RunArgs):
    norm: str = "gnws"
    """gnws (GroupNorm + weight standardisation, the paper's) | gn; BatchNorm is refused"""
    participation: float = 0.0
    """fraction of clients in a round's pool; 0 = the code's rule: all if fewer than 200, else 1 / (clients // 100)"""
    batch_size: int = 0
    """images per client per step; 0 = the code's rule: 100 // pool size, at least 1"""
    rounds: int = 0
    """rounds (epochs of the pool); 0 = --passes / participation (the code's scaling)"""
    passes: int = 6
    """training budget when --rounds 0: passes over the training data (the paper: 200)"""
    eval_every: int = 10
    """kNN monitor every this many rounds (and at the last round)"""
    lr: float = 0.06
    """SGD learning rate of server and clients (cosine decay over the rounds)"""
    optimizer: str = "sgd"
    """sgd (momentum 0.9) for server and clients; adam is refused"""
    weight_decay: float = 5e-4
    """weight decay of server and clients"""
    cut_layer: int = 1
    """units on the client: cnn has 3 units (blocks), resnet18 has 9 (stem, 8 blocks); 1 = MocoSFL-1, 2 = MocoSFL-3"""
    sync_every: int = 50
    """average the pool's client models every this many steps (and at the end of every round)"""
    sync_momentum: bool = False
    """also average the client momentum models at syncs (MonAcoSFL); the MocoSFL code does not"""
    tau: float = 0.1
    """InfoNCE temperature"""
    m: float = 0.99
    """momentum of the EMA key encoders (client Cbar_i and server Sbar)"""
    queue_size: int = 6000
    """keys in the shared MoCo queue (K)"""
    proj_dim: int = 128
    """width of the projection head's hidden and output layer (the paper: 1024)"""
    checkpoint_every: int = 1
    """write the checkpoint after every this many rounds, the last round and a Ctrl-C; --resume continues after the last one written"""

    PAPER: ClassVar[dict] = dict(dataset="cifar10", encoder="resnet18", clients=1000, partition="classes",
                                 classes_per_client=2, passes=200, proj_dim=1024, train_size=0,
                                 eval_every=50, probe_epochs=100, checkpoint_every=50)

    TORCHRUN: ClassVar[bool] = True       # runs under torchrun: the pool's clients spread over processes (see run_round)

    def check(self):
        if self.norm == "bn":
            common.fail("--norm bn: MocoSFL clients train on micro-batches (often one image); use gnws or gn")
        if self.optimizer != "sgd":
            common.fail(f"--optimizer {self.optimizer}: mocosfl trains server and clients with SGD + momentum (sgd)")
        units = UNITS.get(self.encoder, 0)
        if units and not 1 <= self.cut_layer <= units - 1:
            common.fail(f"--cut-layer must be between 1 and {units - 1} for --encoder {self.encoder} "
                        f"({units} units; the server needs at least one) (got {self.cut_layer})")
        for name in ("sync_every", "queue_size", "proj_dim", "passes", "checkpoint_every"):
            if getattr(self, name) < 1:
                common.fail(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(self, name)})")
        if not 0 <= self.m < 1:
            common.fail(f"--m must be in [0, 1) (got {self.m})")
        if self.tau <= 0:
            common.fail(f"--tau must be > 0 (got {self.tau})")
        if self.participation == 0:   # the code's auto-adjust rule
            self.participation = 1.0 if self.clients < 200 else 1 / (self.clients // 100)
        if not 0 < self.participation <= 1:
            common.fail(f"--participation must be in (0, 1], or 0 for the code's rule (got {self.participation})")
        if self.clients >= 1:
            pool = max(1, round(self.participation * self.clients))
            self.batch_size = self.batch_size or max(1, 100 // pool)
            self.rounds = self.rounds or max(1, round(self.passes / self.participation))
        super().check()

    def memory_extra(self) -> dict:
        k = self.proj_dim
        return {"queue": 4 * self.queue_size * k, "heads": 4 * 4 * (512 * k + k * k)}


def split_network(args: Args, channels: int):
    """(client part, server trunk): the backbone cut after args.cut_layer units; trunk ends in a vector."""
    enc = common.make_encoder(args, channels).to(memory_format=torch.contiguous_format)   # vmap needs it
    if args.encoder == "resnet18":
        units = [nn.Sequential(enc.conv1, enc.bn1, enc.relu)]
        units += [b for layer in (enc.layer1, enc.layer2, enc.layer3, enc.layer4) for b in layer]
        units.append(nn.Sequential(enc.avgpool, nn.Flatten()))        # pooling stays on the server
    else:
        units = [enc.net[0:4], enc.net[4:8], enc.net[8:]]
    trunk = nn.Sequential(*units[args.cut_layer:])
    trunk.dim = enc.dim
    return nn.Sequential(*units[:args.cut_layer]), trunk


class Server(nn.Module):
    """S: the backbone after the cut, then the projection head Linear-ReLU-Linear (no BatchNorm)."""

    def __init__(self, trunk: nn.Module, proj_dim: int):
        super().__init__()
        self.trunk = trunk
        self.head = nn.Sequential(nn.Linear(trunk.dim, proj_dim), nn.ReLU(inplace=True), nn.Linear(proj_dim, proj_dim))

    def forward(self, h):
        return self.head(self.trunk(h))


def client_forward(client: nn.Module, w: dict, x: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """h[i] = C(w[i], x[i]) for every client i of the pool at once: w holds (P, ...) stacked weights,
    x is P x B x C x H x W; the result is P x B x (smashed data shape). Fewer than `groups` clients are
    computed padded with copies of them (see GROUPS)."""
    if len(x) < groups:
        pad = torch.arange(groups - len(x), device=x.device) % len(x)
        w_pad = {k: torch.cat([v, v.detach()[pad]]) for k, v in w.items()}
        return client_forward(client, w_pad, torch.cat([x, x[pad]]))[:len(x)]
    # vmap computes exactly what `for i in pool: h[i] = C(w[i], x[i])` computes; row i of the output depends
    # only on row i of the weights, so backward puts client i's own gradient in row i, and the elementwise
    # SGD update of the stacked tensors is each client's own step (tests: N separate models and optimizers)
    return vmap(lambda wi, xi: functional_call(client, wi, (xi,)))(w, x)


def server_step(server, server_m, queue, H_q, H_k, tau):
    """Symmetric MoCo loss on the concatenated smashed data; returns (L, keys to enqueue).
    Server batches need no per-client care: GroupNorm normalises each image on its own."""
    with torch.no_grad():
        k1, k2 = F.normalize(server_m(torch.cat([H_q, H_k])), dim=1).chunk(2)   # Sbar(H_q), Sbar(H_k)
    q1, q2 = server(torch.cat([H_q, H_k])).chunk(2)                               # S(H_q), S(H_k)
    loss = common.info_nce(q1, k2, queue, tau) + common.info_nce(q2, k1, queue, tau)   # L = L12 + L21
    return loss, torch.cat([k1, k2])


@torch.no_grad()
def sgd_step(w: dict, buf: dict, lr: float, wd: float, momentum: float = 0.9):
    """torch.optim.SGD (momentum, weight decay, no dampening) on the stacked weights of the pool. Each
    operation is elementwise, so row i evolves exactly as client i's own optimizer would. (One torch
    optimizer over all N clients' rows would be wrong: momentum and weight decay would move the
    clients outside the pool; hence the pool's rows are gathered for the round.)"""
    for k, p in w.items():
        d_p = p.grad.add(p, alpha=wd)                 # d_p = g + wd * w
        buf[k].mul_(momentum).add_(d_p)               # b = mu * b + d_p (b starts at 0, so step 1 gives b = d_p)
        p.add_(buf[k], alpha=-lr)                     # w = w - lr * b
        p.grad = None


@torch.no_grad()
def sync(w: dict, w_m: dict, with_momentum: bool, everyone=None) -> list:
    """Frequent synchronisation: every pool client receives the unweighted mean of the pool's online
    client models (and of their momentum models with --sync-momentum); returns the means.
    everyone (torchrun): this process's clients' rows -> the whole pool's, stacked in pool order."""
    # [code] differs: average_weights starts its sum from client 0's model, not the first pool client's, so
    # under sampling it drops the first pool model and counts client 0's (pool [3, 1, 4], models worth 3, 1, 4,
    # client 0's worth 0: (0 + 1 + 4) / 3 = 1.667 instead of 2.667); with all clients in the pool (N < 200) both
    # agree. Spacing: the code syncs 1000 // (B x N) times per epoch (auto-adjust), every steps // that: every
    # 50 steps in the paper's CIFAR-10 settings (10 syncs/epoch at 5 and 100 clients, 5 at 200, 1 at 1000),
    # every 10 on our default 5-client Fashion-MNIST run (100 steps/epoch); we sync every --sync-every (50).
    means = []
    for models in ([w, w_m] if with_momentum else [w]):
        pool = models if everyone is None else everyone(models)
        mean = {k: v.mean(0) for k, v in pool.items()}
        for k, v in models.items():
            v.copy_(mean[k].expand_as(v))
        means.append(mean)
    return means


def train_step(st: dict, pool: dict, x_q, x_k, lr: float, args: Args, share=None):
    """One MocoSFL step for the whole pool (steps 1-3 of the docstring); returns the loss tensor.
    share (torchrun): this process's clients' (h_q, h_k) -> the whole pool's (H_q, H_k) and the rows of
    this process's clients in them; without it the pool is the clients in x_q."""
    client, server, server_m = st["client"], st["server"], st["server_m"]
    w, w_m, groups = pool["w"], pool["w_m"], pool.get("groups", 1)
    h_q = h_k = None
    if len(x_q):                                                            # (torchrun: none of the pool here)
        h_q = client_forward(client, w, x_q, groups)                        # 1. h_q = C_i(x_q), graph kept
        with torch.no_grad():
            for k in w_m:
                w_m[k].mul_(args.m).add_(w[k], alpha=1 - args.m)            # Cbar_i <- m Cbar_i + (1-m) C_i
            h_k = client_forward(client, w_m, x_k, groups)                  # h_k = Cbar_i(x_k)
    if share is None:                                                       # 2. latent-vector concatenation
        H_q, H_k, rows = h_q.detach().flatten(0, 1), h_k.flatten(0, 1), slice(None)
    else:
        H_q, H_k, rows = share(h_q, h_k)                                    # of every process's clients
    H_q.requires_grad_()
    common.ema_update(server_m, server, args.m)                             # Sbar <- m Sbar + (1-m) S
    loss, keys = server_step(server, server_m, st["queue"], H_q, H_k, args.tau)
    st["server_opt"].zero_grad(set_to_none=True)
    st["server_opt"].param_groups[0]["lr"] = lr
    loss.backward()
    st["server_opt"].step()
    enqueue(st, keys)                                                       # after the logits: FIFO
    st["meta"]["smashed_bytes"] += 2 * H_q.numel() * H_q.element_size()    # h_q and h_k up
    st["meta"]["grads_bytes"] += H_q.numel() * H_q.element_size()           # dL/dh_q down
    if h_q is not None:
        h_q.backward(H_q.grad.view(-1, *h_q.shape[1:])[rows])               # 3. client i gets dL/dh_q[i]
        sgd_step(w, pool["buf"], lr, args.weight_decay)
    return loss.detach()


@torch.no_grad()
def enqueue(st: dict, keys: torch.Tensor):
    """Write the newest keys over the oldest (FIFO ring buffer)."""
    queue = st["queue"]
    keys = keys[-len(queue):]
    ptr = st["meta"]["queue_ptr"]
    queue[(ptr + torch.arange(len(keys), device=queue.device)) % len(queue)] = keys
    st["meta"]["queue_ptr"] = (ptr + len(keys)) % len(queue)


def client_order(idx: torch.Tensor, length: int) -> torch.Tensor:
    """`length` of a client's image indices: its images in fresh random orders, repeated as needed."""
    orders = [idx[torch.randperm(len(idx), device=idx.device)] for _ in range(-(-length // len(idx)))]
    return torch.cat(orders)[:length]


def client_step_bytes(client: nn.Module, x: torch.Tensor) -> int:
    """Memory of one client's step: 4 copies of its weights (online, gradient, SGD buffer, momentum
    model), the tensors autograd saves for backward, and h_q, h_k, dL/dh_q."""
    params = {p.untyped_storage().data_ptr() for p in client.parameters()}
    saved = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            saved[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        h = client(x)
    return 4 * common.state_bytes(client) + sum(saved.values()) + 3 * h.numel() * h.element_size()


def flat(params: dict) -> torch.Tensor:
    """{name: (n, ...) per-client tensors} -> n x D: one row per client, the parameters side by side."""
    return torch.cat([v.flatten(1) for v in params.values()], 1)


def as_params(rows: torch.Tensor, client: nn.Module) -> dict:
    """n x D rows (flat) -> {name: (n, *shape)} copies, in the client model's parameter order."""
    out, at = {}, 0
    for k, p in client.named_parameters():
        out[k] = rows[:, at:at + p.numel()].reshape(len(rows), *p.shape).contiguous()
        at += p.numel()
    return out


def init_state(args: Args, channels: int, device) -> dict:
    """Everything that evolves across rounds: the client model (all online client models are equal
    after the end-of-round sync, so one copy), per-client momentum models and SGD buffers as N x D
    tensors (a row per client, see flat; under torchrun each process keeps its own clients' rows current
    and the checkpoint takes row c from process c % N), server S and Sbar, the server optimizer, the
    queue and counters."""
    client, trunk = split_network(args, channels)
    client, server = client.to(device), Server(trunk, args.proj_dim).to(device)
    rows = flat({k: p.detach()[None] for k, p in client.named_parameters()}).expand(args.clients, -1).clone()
    return dict(client=client, client_m=rows, client_buf=torch.zeros_like(rows),
                server=server, server_m=copy.deepcopy(server).requires_grad_(False),
                server_opt=torch.optim.SGD(server.parameters(), lr=args.lr, momentum=0.9,
                                           weight_decay=args.weight_decay),
                queue=F.normalize(torch.randn(args.queue_size, args.proj_dim, device=device), dim=1),
                meta=dict(queue_ptr=0, weights_bytes=0, smashed_bytes=0, grads_bytes=0))


def run_round(st, pool, orders, steps, lr, args, views, gather=None):
    """One epoch of the pool: download, `steps` vectorised steps with syncs, write back; returns (loss, views).
    orders: {c: client c's image indices for the round} for the pool's clients this process holds (all of
    them in one process); views(c, idx) -> client c's (x_q, x_k) of them. gather (torchrun): run.gather,
    which brings every process the pool's activations at every step and its client weights at syncs."""
    mine = [c for c in pool if c in orders]
    B, P, n_mine, dev = args.batch_size, len(pool), len(mine), st["queue"].device
    ids = torch.tensor(mine, dtype=torch.long, device=dev)
    # the pool's online models (all equal to the last mean), momentum models and SGD buffers, stacked
    pool_st = {"w": {k: p.detach().expand(n_mine, *p.shape).clone().requires_grad_()
                     for k, p in st["client"].named_parameters()},
               "w_m": as_params(st["client_m"][ids], st["client"]),
               "buf": as_params(st["client_buf"][ids], st["client"]), "groups": min(P, GROUPS)}
    share = everyone = None
    # torchrun: every process runs the same server step on the gathered h_q, h_k (the server is replicated, as
    # in the other methods), so no gradient is sent back: each takes its clients' rows of dL/dH_q. What
    # crosses is what the paper's clients upload (h_q, h_k, weights at syncs: upload_bytes). The cost: the
    # server's work, most of a step, is repeated on every process, so only the clients' part runs in parallel
    # (a server on one process would need a scatter of the gradients and leave the others idle as long).
    # N processes give one process's numbers bit for bit on the CPU (tests/test_distributed.py; see GROUPS).
    if gather is not None:                 # torchrun: what crosses between the processes
        rows = torch.tensor([pool.index(c) for c in mine], dtype=torch.long, device=dev)

        def share(h_q, h_k):               # every client's h_q, h_k to every process, in pool order
            got = gather({c: (h_q[i].detach().clone(), h_k[i].clone()) for i, c in enumerate(mine)})
            return torch.cat([got[c][0] for c in pool]), torch.cat([got[c][1] for c in pool]), rows

        def everyone(models):              # every client's weights, stacked in pool order
            got = gather({c: {k: v[i].detach().clone() for k, v in models.items()} for i, c in enumerate(mine)})
            return {k: torch.stack([got[c][k] for c in pool]) for k in models}
    loss_sum, meta = torch.zeros((), device=dev), st["meta"]
    # communication is counted one direction, as the paper does (weights up at syncs; the download is as large)
    weight_bytes = common.state_bytes(st["client"]) * (2 if args.sync_momentum else 1)
    x_q = x_k = torch.empty(0)
    for t in range(steps):
        if t % args.sync_every == 0 and mine:   # the views up to the next sync, one augmentation call per client
            n = min(args.sync_every, steps - t) * B
            block = [views(c, orders[c][t * B:t * B + n]) for c in mine]
            block_q, block_k = (torch.stack([v[j] for v in block]) for j in (0, 1))   # P x n x C x H x W
        if mine:
            now = slice(t % args.sync_every * B, (t % args.sync_every + 1) * B)
            x_q, x_k = block_q[:, now].contiguous(), block_k[:, now].contiguous()
        loss_sum += train_step(st, pool_st, x_q, x_k, lr, args, share)
        if (t + 1) % args.sync_every == 0 or t == steps - 1:
            means = sync(pool_st["w"], pool_st["w_m"], args.sync_momentum, everyone)
            meta["weights_bytes"] += P * weight_bytes
    with torch.no_grad():                  # the last sync loaded the mean into every client: keep one copy
        for k, p in st["client"].named_parameters():
            p.copy_(means[0][k])
        st["client_m"][ids] = flat(pool_st["w_m"])
        if args.sync_momentum:
            st["client_m"].copy_(flat({k: v[None] for k, v in means[1].items()}).expand_as(st["client_m"]))
        st["client_buf"][ids] = flat(pool_st["buf"])
    return loss_sum / steps, 2 * P * B * steps


def checkpoint_every(run: common.Run, k: int):
    """Run writes its checkpoint after every round; this keeps it to rounds k, 2k, ..., the last one, and a
    round after which some process was interrupted (Ctrl-C; one all-reduce, so the processes agree). A run
    that dies otherwise resumes after the last checkpoint, and redoes the rounds since exactly (each round's
    draws come from its own seeds). Sizes: 4.4 MiB (default), 184 MiB (--preset paper), 747 MiB (paper with
    --cut-layer 2); the preset writes every 50 rounds: 40 times in 2000 rounds, 7.2 / 29 GiB, not 358 / 1460."""
    save = run._save              # common.Run has no such option; wrapping it leaves common.py as it is

    def save_some(rnd: int):
        if rnd % k == 0 or rnd == run.args.rounds or run.world.any(run._interrupted):
            save(rnd)
    run._save = save_some


def cosine_lr(args: Args, rnd: int) -> float:
    """lr of round rnd (1-based) for server and clients: args.lr * (1 + cos(pi (rnd - 1) / R)) / 2."""
    # [code] differs: each CLIENT's CosineAnnealingLR(T_max = epochs) (functions/sflmoco_functions.py 51) is
    # stepped once per client step (functions/sfl_functions.py 138), so the client lr runs 0.06 -> 0 -> 0.06
    # every 2 x epochs client steps: 400 at 200 epochs, about 1.25 cycles per epoch at 5 or 100 clients (500
    # steps each), about 2.5 over a whole 1000-client run (2000 epochs; a client takes 50 steps in each of the
    # ~200 it is sampled for). We read that as a defect and do not copy it; the server's is stepped per epoch.
    return args.lr * 0.5 * (1 + math.cos(math.pi * (rnd - 1) / args.rounds))


def main():
    args, run = common.start(Args)
    st = init_state(args, run.data.channels, run.device)
    encoder = nn.Sequential(st["client"], st["server"].trunk)      # the unsplit backbone, for evaluation
    mib = lambda key: st["meta"][key] / args.clients / 2 ** 20    # mean over all clients
    first = run.data.train_x[run.clients[0][:args.batch_size]]
    step_mib = client_step_bytes(st["client"], run.augment(first)) / 2 ** 20

    def views(c, idx):                                       # client c's two views of images idx, from its own stream
        with run.client(c):
            x = run.data.train_x[idx]
            return run.augment(torch.cat([x, x])).chunk(2)

    if args.checkpoint_every > 1:
        checkpoint_every(run, args.checkpoint_every)
    run.say(f"client model: {sum(p.numel() for p in st['client'].parameters())} parameters; "
            f"client step memory {step_mib:.2f} MiB; pool {max(1, round(args.participation * args.clients))}, "
            f"batch {args.batch_size} per client, {args.rounds} rounds")
    for rnd in run.rounds(st):
        lr = cosine_lr(args, rnd)
        pool = run.sample_clients()
        size = int(run.sizes[pool].mean())
        steps = max(1, args.local_epochs * size // args.batch_size)
        orders = {}
        for c in run.my_clients(pool):                            # (torchrun: this process's share of the pool)
            with run.client(c):                                   # c's own random stream: (seed, round, c)
                orders[c] = client_order(run.clients[c], steps * args.batch_size)
        loss, images = run_round(st, pool, orders, steps, lr, args, views, run.gather if run.world.size > 1 else None)
        run.log(rnd, loss=loss, images=images, encoder=encoder, pool=len(pool), steps=steps, lr=lr,
                comm_weights_mib=mib("weights_bytes"), comm_smashed_mib=mib("smashed_bytes"),
                comm_grads_mib=mib("grads_bytes"))
    run.finish(encoder, client_params=sum(p.numel() for p in st["client"].parameters()), client_step_mib=step_mib,
               comm_weights_mib=mib("weights_bytes"), comm_smashed_mib=mib("smashed_bytes"),
               comm_grads_mib=mib("grads_bytes"))


def train_images_per_s(clients: int, images: int, device="cpu", **flags) -> float:
    """Training views/s (two per image) of MocoSFL with `clients` clients processing `images` images
    (rounded down to whole server batches), pool and batch by the code's rule, random Fashion-MNIST-sized
    pixels, augmentation included; one untimed warm-up step. For benchmark.py."""
    args = Args(clients=clients, device=str(device), **flags)
    args.check()
    device = torch.device(device)
    x = torch.randint(0, 256, (max(images, clients), 1, 28, 28), dtype=torch.uint8, device=device)
    data = common.Data(x, torch.zeros(len(x), dtype=torch.long, device=device), x[:1], x[:1, 0, 0, 0].long(),
                       10, *common.STATS["fmnist"])
    augment = common.Augment(data)
    run_clients = list(torch.arange(len(x), device=device).tensor_split(clients))
    st = init_state(args, 1, device)
    pool = list(range(max(1, round(args.participation * clients))))
    steps = max(1, images // (len(pool) * args.batch_size))
    views = lambda c, idx: augment(torch.cat([x[idx], x[idx]])).chunk(2)
    orders = lambda n: {c: client_order(run_clients[c], n * args.batch_size) for c in pool}
    run_round(st, pool, orders(1), 1, args.lr, args, views)                    # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    _, images = run_round(st, pool, orders(steps), steps, args.lr, args, views)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return images / (time.perf_counter() - t)


if __name__ == "__main__":
    main()
