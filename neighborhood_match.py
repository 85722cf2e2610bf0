"""Feature fusion + neighborhood matching (FF + NM): CCL, the full method.

Paper: Y. Wu, Z. Wang, D. Zeng, M. Li, Y. Shi, J. Hu, "Decentralized Unsupervised Learning of Visual
Representations", IJCAI 2022, pp. 2326-2333, https://arxiv.org/abs/2111.10763 (collaborative contrastive
learning, CCL). This file is feature_fusion.py plus CCL's second contribution, neighborhood matching
(`diff feature_fusion.py neighborhood_match.py`). No official code is public and only the abstract,
introduction and overview figure could be read (no equation numbers to cite), so much here is ours:
[paper] non-IID clients with few classes suffer from false negatives (most "negatives" of a 2-class client
  share the query's class); one round = (1) every client uploads its model AND features of its local data,
  (2) the server aggregates the models, (3) every client downloads the aggregated model and the other
  clients' features ("remote features", Q_r), (4) local learning uses them as extra negatives (L_FF, as
  in feature_fusion.py) and aligns each client's local features to the remote features so that all
  clients' features cluster well in one shared space ("neighborhood matching").
[reconstruction] the local learner, the uploads and everything else of FF: as in feature_fusion.py (MoCo v2
  details, one queue Q_l per client, last-epoch momentum keys as uploads, --remote-bank rows per client).
[code] symmetric loss, as the federated MoCo code of FedU/FedEMA (EasyFL) and MocoSFL: both views serve as
  query against the other's key and both keys enter the queue; they sum the two terms, we average them
  (the asymmetric loss's scale; --symmetric false: MoCo v2's asymmetric loss, view 1 as query only).
[reconstruction] the NM loss, two forms (--nm-form), both matching against the neighbour set N = Q_r + Q_l
  (--nm-local false: Q_r only; with 2 disjoint classes per client the remote rows hold no feature of the
  query's class, so remote-only matching can only pull toward other classes):
  entropy (default): DANCE-style soft neighbourhood entropy (Saito et al., NeurIPS 2020),
    L_NM = -(1/B) sum_i sum_j p_ij log p_ij, p_ij = softmax_j(q_i . n_j / tau_nm): every local feature
    commits to a few nearby features of N.
  fcl [reconstruction, lineage]: the authors' predecessor FCL (Wu et al., MICCAI 2021) takes remote features
    of the same PARTITION (slices from the same position of other clients' volumes) as POSITIVES in an
    InfoNCE; natural images have no partitions, so the top-k (--nm-topk) neighbours P_i of k_i in N are q_i's:
    L_NM = -(1/B) sum_i (1/k) sum_{p in P_i} log( e^{q_i.p/tau} / (e^{q_i.k_i/tau} + sum_{n in N} e^{q_i.n/tau}) ).
  L = L_FF + lambda L_NM, lambda 0.1, tau_nm 0.05, NM off for the first 10% of rounds (early features are
  near random). The form was chosen on the holdout (one seed, a gap within noise): results/recipes.md.
[reconstruction] --preset paper: CIFAR-10 and IID are the paper's headline setting (linear probe 88.90);
  ResNet-18, 5 clients, 100 rounds x 5 epochs, SGD 0.06, batch 256 and the bank sizes are our guesses.
Privacy and diagnostics as in feature_fusion.py (fn_ratio_local / fn_ratio_fused from labels on eval rounds;
pos_beats_queue, pos_beats_batch, remote_mass); loss_nm = L_NM alone, every round. torchrun: as there.
Run:      python neighborhood_match.py                   (10 clients, 2 classes each, Fashion-MNIST)
          python neighborhood_match.py --nm-weight 0     (NM off: feature_fusion.py)
          python neighborhood_match.py --preset paper    (CIFAR-10, ResNet-18; for a GPU)
Recipe: feature_fusion.py's (tau 0.1, crop_min 0.5, queue and remote bank 256), chosen on the holdout with
this file's runs included, see results/recipes.md.
Expected: see results/claims.md and results/results.md (the committed cells); the last holdout numbers
(4820159, 2026-12-02) predate the last-epoch uploads and are kept in results/recipes.md.
"""
import copy
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common


@dataclass
class Args(common.RunArgs):
    tau: float = 0.1
    """temperature of L_FF (MoCo v2's; 0.2 scored lower on the holdout, see results/recipes.md)"""
    crop_min: float = 0.5
    """smallest crop area; 0.5 instead of common's 0.2, chosen on the holdout, see results/recipes.md"""
    momentum: float = 0.99
    """m of the momentum encoder: xi <- m xi + (1 - m) theta"""
    proj_dim: int = 128
    """output size of the projection head (the space of keys, queue and remote features)"""
    queue_size: int = 256
    """K = |Q_l|: keys in each client's local queue (kept across rounds; 256 chosen on the holdout, see results/recipes.md)"""
    remote_features: int = 256
    """M: features each client uploads per round (0 = no fusion, i.e. FedAvg + MoCo)"""
    remote_bank: int = 256
    """|Q_r|: rows of the other clients' features a client downloads (0 = all of them; = K by default)"""
    weighted: bool = True
    """FedAvg weights clients by their number of images (false: unweighted mean)"""
    symmetric: bool = True
    """both views serve as query, the loss is the mean of the two (false: MoCo v2's view-1 query only)"""
    nm_weight: float = 0.1
    """lambda in L = L_FF + lambda L_NM (0 = no neighborhood matching)"""
    tau_nm: float = 0.05
    """temperature of the neighbourhood softmax p_ij"""
    nm_warmup: float = 0.1
    """NM is off for this fraction of the rounds (early features are near random)"""
    nm_form: str = "entropy"
    """entropy (DANCE-style soft-neighbourhood entropy) | fcl (top-k neighbours of the key as positives, FCL)"""
    nm_topk: int = 5
    """--nm-form fcl: neighbours of each key in N used as extra positives"""
    nm_local: bool = True
    """the neighbour set N is Q_r AND the local queue Q_l (false: Q_r only)"""

    CHOICES: ClassVar[dict] = {**common.RunArgs.CHOICES, "nm_form": ("entropy", "fcl")}
    TORCHRUN: ClassVar[bool] = True       # runs under torchrun: clients spread over processes (see distributed.py)
    PAPER: ClassVar[dict] = dict(dataset="cifar10", encoder="resnet18", clients=5, partition="iid",
                                 rounds=100, local_epochs=5, batch_size=256, optimizer="sgd", lr=0.06,
                                 weight_decay=5e-4, train_size=0, eval_every=10, probe_epochs=100,
                                 queue_size=4096, remote_features=1024, remote_bank=4096, crop_min=0.2,
                                 nm_weight=0.1, tau_nm=0.05, nm_warmup=0.1)

    def check(self):
        super().check()
        if self.tau <= 0:
            common.fail(f"--tau must be > 0 (got {self.tau})")
        if not 0 <= self.momentum < 1:
            common.fail(f"--momentum must be in [0, 1) (got {self.momentum})")
        if self.queue_size < 1 or self.proj_dim < 1:
            common.fail(f"--queue-size and --proj-dim must be at least 1 (got {self.queue_size}, {self.proj_dim})")
        if self.remote_features < 0 or self.remote_bank < 0:
            common.fail(f"--remote-features and --remote-bank must be >= 0 "
                        f"(got {self.remote_features}, {self.remote_bank})")
        if self.nm_weight < 0 or self.tau_nm <= 0:
            common.fail(f"--nm-weight must be >= 0 and --tau-nm > 0 (got {self.nm_weight}, {self.tau_nm})")
        if self.nm_topk < 1:
            common.fail(f"--nm-topk must be at least 1 (got {self.nm_topk})")
        if not 0 <= self.nm_warmup <= 1:
            common.fail(f"--nm-warmup must be in [0, 1] (got {self.nm_warmup})")

    def memory_extra(self) -> dict:
        d, k = common.encoder_dim(self), self.proj_dim
        return {"heads": common.model_copies_bytes(self, d * d + d * k),      # queues and uploads: one per client
                "queues": 4 * self.clients * (self.queue_size + self.remote_features) * (k + 2) * 2,
                "remote bank": 4 * (self.remote_bank or self.clients * self.remote_features) * k}


class MoCo(nn.Module):
    """Encoder f and projection head g: z = g(f(x)); the momentum encoder is a copy of this."""

    def __init__(self, encoder: nn.Module, proj_dim: int):
        super().__init__()
        self.encoder = encoder
        self.projector = common.mlp([encoder.dim, encoder.dim, proj_dim])

    def forward(self, x):
        return self.projector(self.encoder(x))


def ff_loss(q, k, local_queue, remote_feats, tau):
    """Feature fusion: InfoNCE whose negatives are the local queue AND the remote features."""
    q, k = F.normalize(q, dim=1), F.normalize(k.detach(), dim=1)
    negatives = [local_queue.detach()]
    if remote_feats is not None and len(remote_feats) > 0:
        negatives.append(remote_feats.detach())
    logits = torch.cat([(q * k).sum(1, keepdim=True)] + [q @ n.t() for n in negatives], dim=1) / tau
    # L_FF = -log( e^{q.k+/tau} / (e^{q.k+/tau} + sum_{n in Q_l} e^{q.n/tau} + sum_{r in Q_r} e^{q.r/tau}) )
    return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))


@torch.no_grad()
def diagnostics(q, k, local_queue, remote_feats, tau):
    """Label-free monitor of L_FF: the share of queries whose positive beats every queue row, the share
    whose positive beats every other key of the batch, and the softmax mass on the remote rows."""
    q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    pos = (q * k).sum(1)
    in_batch = (q @ k.t()).fill_diagonal_(float("-inf"))
    remote = remote_feats if remote_feats is not None else q[:0]
    logits = torch.cat([pos[:, None], q @ local_queue.t(), q @ remote.t()], dim=1) / tau
    mass = logits.softmax(1)[:, 1 + len(local_queue):].sum(1)
    return torch.stack([(pos > (q @ local_queue.t()).max(1).values).float().mean(),
                        (pos > in_batch.max(1).values).float().mean(), mass.mean()])


def nm_loss(q, neighbours, tau_nm):
    """Neighborhood matching: entropy of each query's soft assignment to the (normalised) neighbours."""
    if neighbours is None or len(neighbours) == 0:
        return torch.zeros((), device=q.device)
    log_p = F.log_softmax(F.normalize(q, dim=1) @ neighbours.detach().t() / tau_nm, dim=1)
    return -(log_p.exp() * log_p).sum(1).mean()   # L_NM = -(1/B) sum_i sum_j p_ij log p_ij


def nm_fcl_loss(q, k, neighbours, topk, tau):
    """Neighborhood matching, FCL form: the top-k neighbours of each key k_i in N are extra positives
    of its query, contrasted against k_i and all of N."""
    if neighbours is None or len(neighbours) == 0:
        return torch.zeros((), device=q.device)
    q, k, n = F.normalize(q, dim=1), F.normalize(k.detach(), dim=1), neighbours.detach()
    log_p = F.log_softmax(torch.cat([(q * k).sum(1, keepdim=True), q @ n.t()], dim=1) / tau, dim=1)
    matched = (k @ n.t()).topk(min(topk, len(n)), dim=1).indices + 1     # +1: column 0 is k_i itself
    # L_NM = -(1/B) sum_i (1/|P_i|) sum_{p in P_i} log( e^{q_i.p/tau} / (e^{q_i.k_i/tau} + sum_{n in N} e^{q_i.n/tau}) )
    return -log_p.gather(1, matched).mean()


def nm_term(q, k, neighbours, args):
    """L_NM of --nm-form for queries q with keys k."""
    if args.nm_form == "fcl":
        return nm_fcl_loss(q, k, neighbours, args.nm_topk, args.tau)
    return nm_loss(q, neighbours, args.tau_nm)


@torch.no_grad()
def enqueue(queue, ptr, keys):
    """MoCo's FIFO ring buffer: write keys into queue rows ptr, ptr+1, ... (wrapping); return the new ptr."""
    size, b = len(queue), len(keys)
    i = torch.arange(max(0, b - size), b, device=queue.device)   # if b > size only the last `size` survive
    queue[(ptr + i) % size] = keys.detach()[i].to(queue.dtype)
    return (ptr + b) % size


def remote_rows(counts, m, c, size):
    """Step 3: flat row indices (client * m + row) of the features the OTHER clients uploaded last
    round, a random subset of `size` of them (0 = all). counts[j] = rows client j uploaded (<= m)."""
    valid = torch.arange(m, device=counts.device)[None, :] < counts[:, None]
    valid[c] = False                                  # a client never receives its own features
    rows = valid.flatten().nonzero().squeeze(1)
    if size and len(rows) > size:
        rows = rows[torch.randperm(len(rows), device=rows.device)[:size]]
    return rows


def local_update(model, key_enc, queue, queue_y, ptr, remote_feats, run, idx, args, lam, watch=False, opt=None):
    """Step 4: E epochs of MoCo with feature fusion and neighborhood matching (weight lam) on one
    client; returns (mean loss, mean L_NM, images, ptr, mean diagnostics or None, the last epoch's keys
    k+ and their images); the diagnostics are computed only when `watch` (evaluation rounds); opt: the
    previous client's optimizer, reset in place to a fresh one's state."""
    opt = common.make_optimizer(list(model.parameters()), args, reuse=opt)
    loss_sum, nm_sum, steps, images = torch.zeros((), device=run.device), torch.zeros((), device=run.device), 0, 0
    diag = torch.zeros(3, device=run.device) if watch else None
    for _ in range(args.local_epochs):
        last = [], []                                            # this epoch's keys k+ and images (step 1)
        for b in run.batches(idx):
            v1, v2 = run.two_views(b)
            q1 = model(v1)                                       # queries: online encoder theta
            q2 = model(v2) if args.symmetric else None
            with torch.no_grad():
                common.ema_update(key_enc, model, args.momentum)  # xi <- m xi + (1 - m) theta
                k2 = F.normalize(key_enc(v2), dim=1)              # positive keys k+: momentum encoder xi
                k1 = F.normalize(key_enc(v1), dim=1) if args.symmetric else None
            neighbours = torch.cat([remote_feats, queue]) if args.nm_local else remote_feats
            l_ff, l_nm = ff_loss(q1, k2, queue, remote_feats, args.tau), nm_term(q1, k2, neighbours, args)
            if args.symmetric:    # [code] FedU/FedEMA, EasyFL, MocoSFL: view 2 is a query too (they sum)
                l_ff = (l_ff + ff_loss(q2, k1, queue, remote_feats, args.tau)) / 2
                l_nm = (l_nm + nm_term(q2, k1, neighbours, args)) / 2
            loss = l_ff + lam * l_nm                              # L = L_FF + lambda L_NM
            if watch:
                diag += diagnostics(q1.detach(), k2, queue, remote_feats, args.tau)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            keys, y = (torch.cat([k2, k1]), run.data.train_y[b].repeat(2)) if args.symmetric else (k2, run.data.train_y[b])
            enqueue(queue_y, ptr, y)                             # diagnostic only: the keys' labels
            ptr = enqueue(queue, ptr, keys)                      # local keys only: never remote ones
            loss_sum, nm_sum = loss_sum + loss.detach(), nm_sum + l_nm.detach()
            last[0].append(k2), last[1].append(b)
            steps, images = steps + 1, images + 2 * len(b)
    return loss_sum / max(steps, 1), nm_sum / max(steps, 1), images, ptr, (diag / max(steps, 1) if watch else None), last


def upload_features(last, m):
    """Step 1: (features, images) of m random images of the last local epoch; its keys k+ = xi(v2) are the
    L2-normalised momentum projections of one augmented view each (the [reconstruction] in the docstring)."""
    if not last[0] or m < 1:                              # nothing trained (or M = 0): share nothing
        return None, torch.zeros(0, dtype=torch.long)
    keys, images = torch.cat(last[0]), torch.cat(last[1])
    pick = torch.randperm(len(images), device=images.device)[:m]
    return keys[pick], images[pick]


def fn_ratio(query_y, queue_y, remote_y, num_classes):
    """Diagnostic (labels used only here): the mean share of a query's negatives that have its class,
    over the client's images as queries; (local queue only, local queue + remote bank)."""
    p = torch.bincount(query_y, minlength=num_classes).float() / len(query_y)
    in_queue = torch.bincount(queue_y[queue_y >= 0], minlength=num_classes).float()   # -1: initial random rows
    in_remote = torch.bincount(remote_y, minlength=num_classes).float()
    return (p * in_queue).sum() / len(queue_y), (p * (in_queue + in_remote)).sum() / (len(queue_y) + len(remote_y))


def main():
    args, run = common.start(Args)
    run.explain(loss="L_FF + lambda L_NM; L_FF is InfoNCE against the local queue and the other clients' features, "
                     "the queue starts as random vectors (easy negatives), the remote features arrive in round 2 and "
                     "L_NM after the warm-up, so the loss rises while they come in, which is not divergence",
                fn_ratio_local="share of negatives with the query's class, local queue", fn_ratio_fused="with "
                "the remote features", pos_beats_queue="share of positives above every queue row", pos_beats_batch=
                "above the batch's other keys", remote_mass="softmax mass on the remote features", model_bytes_up=
                "per client (as the other *_bytes_*)", loss_nm="L_NM alone",
                nm_weight="lambda this round (0 in the warm-up)")
    model = MoCo(common.make_encoder(args, run.data.channels), args.proj_dim).to(run.device)
    worker, key_enc = copy.deepcopy(model), copy.deepcopy(model)   # re-loaded for every client
    opt = common.make_optimizer(list(worker.parameters()), args)   # reset in place for every client
    n, d, dev = args.clients, args.proj_dim, run.device
    queues = F.normalize(torch.randn(n, args.queue_size, d, device=dev), dim=2)   # MoCo starts from noise
    queue_y = torch.full((n, args.queue_size), -1, dtype=torch.long, device=dev)
    ptrs = torch.zeros(n, dtype=torch.long)
    feats = torch.zeros(n, args.remote_features, d, device=dev)     # the server's copy of the uploads
    feat_y = torch.full((n, args.remote_features), -1, dtype=torch.long, device=dev)
    counts = torch.zeros(n, dtype=torch.long, device=dev)           # rows uploaded last round (0: none)
    state = dict(model=model, queues=queues, queue_y=queue_y, ptrs=ptrs, feats=feats, feat_y=feat_y, counts=counts)
    model_bytes = common.state_bytes(model)
    for rnd in run.rounds(state):
        picked = run.sample_clients()
        new_feats, new_y, new_counts = torch.zeros_like(feats), torch.full_like(feat_y, -1), torch.zeros_like(counts)
        states, uploads, losses, nms, images, down_rows, watch = {}, {}, {}, {}, {}, {}, {}
        lam = args.nm_weight if rnd > args.nm_warmup * args.rounds else 0.0   # NM after the warm-up
        for c in run.my_clients(picked):                          # clients train in turn (torchrun: this process's)
            with run.client(c):                                   # c's own random stream: (seed, round, c)
                worker.load_state_dict(model.state_dict())            # step 3: download the global model
                key_enc.load_state_dict(model.state_dict())           #   (online and momentum encoder)
                rows = remote_rows(counts, args.remote_features, c, args.remote_bank)   # step 3: remote features
                remote_feats = feats.flatten(0, 1)[rows]
                loss, nm, images[c], ptr, dg, last = local_update(worker, key_enc, queues[c], queue_y[c], int(ptrs[c]),
                                                                  remote_feats, run, run.clients[c], args, lam,
                                                                  watch=run.is_eval_round(rnd), opt=opt)
                ptrs[c] = ptr
                z, pick = upload_features(last, args.remote_features)   # step 1: features of the last epoch
                uploads[c] = (z, run.data.train_y[pick].tolist())  # features; labels only for the diagnostic
                states[c] = {k: v.clone() for k, v in worker.state_dict().items()}       # step 1: model
                losses[c], nms[c], down_rows[c] = loss.item(), nm.item(), len(rows)
                if run.is_eval_round(rnd):
                    fn = fn_ratio(run.data.train_y[run.clients[c]], queue_y[c], feat_y.flatten()[rows],
                                  run.data.num_classes)
                    watch[c] = (dg.tolist(), [f.item() for f in fn])
        states, uploads, losses, nms, images, down_rows, watch = run.gather(   # torchrun: every sampled client's
            states, uploads, losses, nms, images, down_rows, watch)
        for c, (z, y) in uploads.items():                         # step 1 arrives at the server
            if z is not None:
                new_feats[c, :len(z)], new_y[c, :len(z)], new_counts[c] = z, torch.tensor(y), len(z)
        weights = run.sizes[picked] if args.weighted else None
        model.load_state_dict(common.fedavg(list(states.values()), weights))     # step 2: the server, FedAvg
        feats.copy_(new_feats), feat_y.copy_(new_y), counts.copy_(new_counts)   # kept for one round
        comm = dict(model_bytes_up=model_bytes, model_bytes_down=model_bytes,   # per client, this round
                    feature_bytes_up=new_counts[picked].sum() * d * feats.element_size() / len(picked),
                    feature_bytes_down=sum(down_rows.values()) * d * feats.element_size() / len(picked))
        if watch:
            diags, fn = np.array([w[0] for w in watch.values()]), np.array([w[1] for w in watch.values()])
            comm.update(fn_ratio_local=fn[:, 0].mean(), fn_ratio_fused=fn[:, 1].mean())
            beats_queue, beats_batch, mass = diags.mean(0)
            comm.update(pos_beats_queue=beats_queue, pos_beats_batch=beats_batch, remote_mass=mass)
        run.log(rnd, loss=np.mean(list(losses.values())), images=sum(images.values()), encoder=model.encoder,
                loss_nm=np.mean(list(nms.values())), nm_weight=lam, **comm)
    last = run.history[-1]
    run.finish(model.encoder, **{k: v for k, v in last.items() if k.startswith("fn_ratio") or "bytes" in k})


if __name__ == "__main__":
    main()
