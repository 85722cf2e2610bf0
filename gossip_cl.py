"""Gossip + SimCLR: decentralized contrastive learning without a server; clients average with their neighbours.

Papers: Lian et al., "Can Decentralized Algorithms Outperform Centralized Algorithms? A Case Study for
Decentralized Parallel Stochastic Gradient Descent" (NeurIPS 2017, arXiv 1705.09056) for D-PSGD;
Koloskova et al., "A Unified Theory of Decentralized SGD with Changing Topology and Local Updates"
(ICML 2020, arXiv 2003.10422) for local steps between gossip steps; Xiao, Boyd & Lall, "A Scheme for
Robust Distributed Sensor Fusion Based on Average Consensus" (IPSN 2005) for Metropolis(-Hastings) weights;
Chen et al., SimCLR (ICML 2020, arXiv 2002.05709) for the clients' objective. It is fedavg_cl.py with the
server replaced by a communication graph: `diff fedavg_cl.py gossip_cl.py` shows exactly that.

What is faithful: [D-PSGD] every client keeps its own model, all start from the same x_0, and a gossip
step replaces every client's model by a weighted average of its own and its neighbours' models,
X <- W X, with W symmetric and doubly stochastic (so the average model is preserved); the consensus
distance shrinks per step by at least |lambda_2(W)|^2, so the spectral gap 1 - |lambda_2| says how fast
the clients agree. [Xiao et al.] Metropolis-Hastings weights W_ij = 1 / (1 + max(d_i, d_j)) on edges,
W_ii = 1 - sum_j W_ij: symmetric, doubly stochastic, and on `complete` exactly the plain mean.
[SimCLR] two augmented views, MLP projector, NT-Xent with temperature tau (Eq. 1).
[reconstruction] E local epochs (Adam, a fresh optimizer each round as in fedavg_cl.py) between rounds
of --gossip-steps gossip steps, instead of D-PSGD's one gradient step per gossip step; the whole state
dict is mixed (BatchNorm statistics like weights; integer counters get the mixed value rounded, as
common.fedavg does); `random` is an Erdos-Renyi graph with edge probability degree / (clients - 1),
seeded and redrawn until connected; `torus` is the most square rows x cols grid with wrap-around.
Consequences: `--topology complete --gossip-steps 1` is fedavg_cl.py --weighted false (tested);
`--topology none` is local training, but unlike local_cl.py every client starts from the same weights
and takes a fresh optimizer each round. Without torchrun all clients run in one process, and each
client's row of the stacked weights stands for what it would send to its neighbours.
Evaluation: the headline knn_acc / linear_acc (every key of the shared evaluation) is the MEAN OVER
CLIENT MODELS, what a client holds; `consensus` = the same for the average model (which no client holds
unless all average once more); per round: knn_acc, knn_acc_consensus, consensus distance before and
after gossip, bytes sent per client.

torchrun: distributed (see distributed.py): client c trains on process c % N; then one all-gather gives
every process every client's weights and each applies the same mixing step X <- W X. That moves each
client's weights to every process, not only to its neighbours: the logged upload_bytes (the all-gather)
differ from bytes_sent_per_client (what the decentralized protocol sends); a neighbour-only exchange
would need point-to-point sends and is not built.
Run:      python gossip_cl.py                          (ring of 10 clients, 2 classes each, Fashion-MNIST)
          python gossip_cl.py --topology complete      (= FedAvg, unweighted)
          python gossip_cl.py --topology random --degree 3 --gossip-steps 2
Recipe: fedavg_cl.py's SimCLR learner (tau 0.2, crop_min 0.5), not tuned here; see results/recipes.md.
Expected: see the README's note on gossip (ring vs complete vs local, one seed, reduced budget) and
the committed cells of results/results.md.
"""
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.nn as nn

import common

TOPOLOGIES = ("ring", "torus", "random", "complete", "none")
MAX_GOSSIP_STEPS = 1000      # --gossip-steps bound: more only moves clients nearer the average (complete: one step)


@dataclass
class Args(common.RunArgs):
    tau: float = 0.2
    """NT-Xent temperature (0.2 chosen on the holdout for batch 128, see results/recipes.md; --preset paper uses SimCLR's 0.5)"""
    proj_dim: int = 128
    """output size of the projection head"""
    crop_min: float = 0.5
    """smallest crop area; fedavg_cl.py's holdout-chosen 0.5 (the same SimCLR learner, so only the graph differs)"""
    topology: str = "ring"
    """communication graph: ring | torus | random (Erdos-Renyi, --degree) | complete | none (local training)"""
    degree: int = 3
    """expected number of neighbours of a client in --topology random"""
    gossip_steps: int = 1
    """gossip steps (X <- W X, one exchange with every neighbour each) after every round of local epochs"""
    participation: float = 1.0
    """must be 1.0 here: every client gossips every round (no server samples clients)"""

    CHOICES: ClassVar[dict] = {**common.RunArgs.CHOICES, "topology": TOPOLOGIES}
    TORCHRUN: ClassVar[bool] = True       # runs under torchrun: clients spread over processes (see distributed.py)
    PAPER: ClassVar[dict] = dict(dataset="cifar10", encoder="resnet18", clients=5, partition="classes",
                                 classes_per_client=2, rounds=100, local_epochs=5, batch_size=128,
                                 optimizer="sgd", lr=0.032, weight_decay=5e-4, train_size=0,
                                 eval_every=10, probe_epochs=100, crop_min=0.08, tau=0.5)

    def check(self):
        super().check()
        if self.tau <= 0:
            common.fail(f"--tau must be > 0 (got {self.tau})")
        if self.proj_dim < 1:
            common.fail(f"--proj-dim must be at least 1 (got {self.proj_dim})")
        if self.gossip_steps < 1:
            common.fail(f"--gossip-steps must be at least 1 (got {self.gossip_steps}); --topology none trains locally")
        if self.gossip_steps > MAX_GOSSIP_STEPS:      # a billion steps never end round 1
            common.fail(f"--gossip-steps must be at most {MAX_GOSSIP_STEPS} (got {self.gossip_steps}); for the exact "
                        f"average in one step use --topology complete")
        if self.participation < 1:
            common.fail("--participation: every client gossips every round; use 1.0")
        if self.topology == "random" and not 1 <= self.degree <= self.clients - 1:
            common.fail(f"--degree must be in [1, clients - 1 = {self.clients - 1}] for --topology random "
                        f"(got {self.degree})")
        if self.topology == "torus" and torus_shape(self.clients) is None:
            common.fail(f"--topology torus needs --clients = rows x cols with both >= 2 (got {self.clients}); "
                        f"use ring")
        if self.topology == "random":
            graph(self.clients, "random", self.degree, self.seed)      # refuses here if no draw is connected


class SimCLR(nn.Module):
    """Encoder f and projection head g: z = g(f(x))."""

    def __init__(self, encoder: nn.Module, proj_dim: int):
        super().__init__()
        self.encoder = encoder
        self.projector = common.mlp([encoder.dim, encoder.dim, proj_dim])

    def forward(self, x):
        return self.projector(self.encoder(x))


def local_update(model: SimCLR, run: common.Run, idx: torch.Tensor, args: Args):
    """E epochs of SimCLR on one client's images, with a fresh optimizer; returns (mean loss, images)."""
    opt = common.make_optimizer(model.parameters(), args)
    loss_sum, steps, images = torch.zeros((), device=run.device), 0, 0
    for _ in range(args.local_epochs):
        for b in run.batches(idx):
            v1, v2 = run.two_views(b)
            z1, z2 = model(torch.cat([v1, v2])).chunk(2)
            loss = common.nt_xent(z1, z2, args.tau)            # SimCLR Eq. 1, averaged over 2B views
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.detach()                           # stays on the device: no .item() per step
            steps, images = steps + 1, images + 2 * len(b)
    return loss_sum / max(steps, 1), images


def torus_shape(n: int):
    """The most square rows x cols = n with rows, cols >= 2 (None if n is prime or < 4)."""
    rows = max((r for r in range(2, int(n ** 0.5) + 1) if n % r == 0), default=None)
    return None if rows is None else (rows, n // rows)


def graph(n: int, topology: str, degree: int = 3, seed: int = 0) -> np.ndarray:
    """Symmetric boolean adjacency matrix without self-loops; `random` is seeded and connected."""
    a = np.zeros((n, n), dtype=bool)
    i = np.arange(n)
    if topology == "ring":
        a[i, (i + 1) % n] = True
    elif topology == "torus":
        rows, cols = torus_shape(n)
        r, c = i // cols, i % cols
        a[i, r * cols + (c + 1) % cols] = True
        a[i, ((r + 1) % rows) * cols + c] = True
    elif topology == "complete":
        a[:] = True
    elif topology == "random":                      # own generator: the graph never moves the training RNG
        rng = np.random.default_rng([seed, 7])
        for _ in range(1000):
            a = np.triu(rng.random((n, n)) < degree / (n - 1), 1)
            if connected(a | a.T):
                break
        else:
            common.fail(f"--topology random: no connected graph in 1000 draws with --degree {degree} "
                        f"for {n} clients; raise --degree")
    a = a | a.T
    np.fill_diagonal(a, False)
    return a


def connected(a: np.ndarray) -> bool:
    reach = np.zeros(len(a), dtype=bool)
    reach[0] = True
    for _ in range(len(a)):
        reach = reach | a[reach].any(0)
    return bool(reach.all())


def mixing_matrix(a: np.ndarray) -> np.ndarray:
    """Metropolis-Hastings weights: W_ij = 1 / (1 + max(d_i, d_j)) on edges, W_ii = 1 - sum_j W_ij."""
    d = a.sum(1)
    w = np.where(a, 1.0 / (1 + np.maximum(d[:, None], d[None, :])), 0.0)
    np.fill_diagonal(w, 1 - w.sum(1))
    return w


def second_eigenvalue(w: np.ndarray) -> float:
    """|lambda_2|: the largest |eigenvalue| after the 1 of the all-ones vector (1 if disconnected)."""
    mags = np.sort(np.abs(np.linalg.eigvalsh(w)))[::-1]
    return float(mags[1]) if len(mags) > 1 else 0.0


@torch.no_grad()
def gossip(w: torch.Tensor, x: torch.Tensor, counts: torch.Tensor, steps: int):
    """`steps` gossip steps for all clients at once: X <- W X on the (clients x numbers) stacks, in place."""
    for _ in range(steps):
        x.copy_(w @ x)                                            # x_i <- sum_j W_ij x_j  (D-PSGD)
        counts.copy_((w.double() @ counts.double()).round().long())   # integer counters: as common.fedavg


def consensus_distance(x: torch.Tensor) -> float:
    """(1/n) sum_i ||x_i - x_bar||^2 over every floating number of the state."""
    return (x - x.mean(0)).pow(2).sum(1).mean().item()


class Stacked:
    """Every client's model as two stacks, x (clients x floating numbers: weights and BN statistics) and
    counts (clients x integer counters), and ONE working model that a client's row is loaded into:
    no per-client model copies, and the mixing is one matrix product over the stacks."""

    def __init__(self, model: nn.Module, clients: int):
        sd = model.state_dict()                                  # live tensors: they share the model's storage
        self.model = model
        self.floats = [t for t in sd.values() if t.is_floating_point()]
        self.ints = [t for t in sd.values() if not t.is_floating_point()]
        self.x = self._flat(self.floats, torch.float32).repeat(clients, 1)    # the same x_0 for every client
        self.counts = self._flat(self.ints, torch.long).repeat(clients, 1)

    def _flat(self, tensors, dtype):
        dev = next(self.model.parameters()).device
        return torch.cat([t.reshape(-1) for t in tensors]) if tensors else torch.zeros(0, dtype=dtype, device=dev)

    @staticmethod
    def _copy(tensors, row, into_model: bool):
        for t, r in zip(tensors, row.split([t.numel() for t in tensors])):
            if into_model:
                t.copy_(r.view(t.shape))          # copy_ follows t's strides (channels-last weights)
            else:
                r.view(t.shape).copy_(t)

    def load(self, c: int) -> nn.Module:
        """The working model becomes client c."""
        return self._set(self.x[c], self.counts[c])

    def store(self, c: int):
        """Client c's row takes the working model's state (after its local epochs)."""
        self._copy(self.floats, self.x[c], into_model=False)
        self._copy(self.ints, self.counts[c], into_model=False)

    def load_average(self) -> nn.Module:
        """The working model becomes the consensus model: the plain mean of all clients (counters rounded)."""
        return self._set(self.x.mean(0), self.counts.double().mean(0).round().long())

    def _set(self, row, count_row):
        self._copy(self.floats, row, into_model=True)
        self._copy(self.ints, count_row, into_model=True)
        return self.model


def main():
    args, run = common.start(Args)
    model = SimCLR(common.make_encoder(args, run.data.channels), args.proj_dim).to(run.device)
    clients = Stacked(model, args.clients)
    adj = graph(args.clients, args.topology, args.degree, args.seed)
    w_np = mixing_matrix(adj)
    w, lam2 = torch.tensor(w_np, dtype=torch.float32, device=run.device), second_eigenvalue(w_np)
    sent = adj.sum(1).mean() * common.state_bytes(model) * args.gossip_steps   # a step: the model to each neighbour
    print(f"mixing matrix: {args.topology}, degree {adj.sum(1).min()}-{adj.sum(1).max()}, |lambda_2| {lam2:.4f}, "
          f"spectral gap {1 - lam2:.4f}: consensus distance x <= {lam2 ** 2:.4f} per gossip step", flush=True)
    run.explain(consensus_dist_local="(1/n) sum_i ||x_i - mean x||^2 before this round's gossip",
                consensus_dist="the same after it", bytes_sent_per_client="weights a client sends its neighbours "
                "per round", knn_acc_consensus="kNN of the average model (knn_acc: the mean over client models)")
    mine = run.my_clients(range(args.clients))                    # torchrun: this process's clients
    for rnd in run.rounds({"weights": clients.x, "counters": clients.counts}):
        losses, images, rows = {}, {}, {}
        for c in mine:                                            # clients train in turn, each its own model
            with run.client(c):                                   # c's own random stream: (seed, round, c)
                loss, images[c] = local_update(clients.load(c), run, run.clients[c], args)
                clients.store(c)
                losses[c], rows[c] = loss.item(), (clients.x[c], clients.counts[c])
        rows, losses, images = run.gather(rows, losses, images)   # torchrun: every client's row on every process
        for c, (x, counts) in rows.items():
            clients.x[c], clients.counts[c] = x, counts
        drift = consensus_distance(clients.x)
        gossip(w, clients.x, clients.counts, args.gossip_steps)   # no server: neighbours average
        evals = {}
        if run.is_eval_round(rnd):
            monitor = list(run.gather({c: run.monitor(clients.load(c).encoder) for c in mine}).values())
            evals = {k: np.mean([m[k] for m in monitor]) for k in monitor[0]}   # all labels and 1 %
            evals["knn_acc_consensus"] = run.knn(clients.load_average().encoder)
        run.log(rnd, loss=np.mean(list(losses.values())), images=sum(images.values()), consensus_dist_local=drift,
                consensus_dist=consensus_distance(clients.x), bytes_sent_per_client=sent, **evals)
    per_client = list(run.gather({c: run.evaluate(clients.load(c).encoder) for c in mine}).values())
    consensus = run.evaluate(clients.load_average().encoder)
    keys = per_client[0].keys()                                   # whatever the shared evaluation returns
    run.say(f"headline: the mean over the {args.clients} client models; the consensus (average) model: kNN "
            f"{consensus['knn_acc']:.4f}  linear {consensus['linear_acc']:.4f} (encoder.pt, features.png)")
    run.finish(results={k: np.mean([r[k] for r in per_client]) for k in keys},
               encoder=clients.load_average().encoder,    # encoder.pt and features.png: the consensus model
               encoder_note="the consensus model (the average of the clients'); the headline numbers are the mean "
                            "over the client models",
               **{f"{k}_std": np.std([r[k] for r in per_client]) for k in keys},
               per_client=per_client, consensus=consensus, topology=args.topology, lambda_2=lam2,
               spectral_gap=1 - lam2, degrees=adj.sum(1).tolist(), bytes_sent_per_client_per_round=float(sent))


if __name__ == "__main__":
    main()
