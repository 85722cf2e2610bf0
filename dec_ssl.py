"""Dec-SSL and FeatARC: FedAvg of a self-supervised objective on non-IID unlabelled data.

Paper: L. Wang, K. Zhang, Y. Li, Y. Tian, R. Tedrake, "Does Learning from Decentralized Non-IID Unlabeled
Data Benefit from Self Supervision?", ICLR 2023, https://arxiv.org/abs/2210.10947. Official code:
https://github.com/liruiw/Dec-SSL. Claims: decentralized SSL is robust to label skew (accuracy drops little
as the Dirichlet alpha shrinks), is on par with centralized SSL, and FeatARC helps in highly non-IID cases.
[paper] FedAvg on an SSL loss; FeatARC = feature alignment + clustering. [code] each sampled client starts
  from the global weights, trains E epochs with a FRESH optimizer (Adam 1e-3, wd 1e-6 for SimCLR; its SimSiam:
  SGD, see Run; our default is Adam for every objective); the server takes the UNWEIGHTED mean of the whole
  state dict (BN statistics included; `--weighted true`: sample-count FedAvg); server lr x0.3 at 30/60/90%
  of the rounds. SimCLR: projector d -> 512 BN ReLU -> 512 (src/models.py 61), NT-Xent tau 0.5
  ([reconstruction] ours ends in d, --proj-dim 0: the code's on ResNet-18, and FeatARC needs it). SimSiam:
  3-layer projector, 2-layer predictor, negative cosine, stop-gradient ([reconstruction] projector hidden
  --hidden-dim 512, the code's 2048; predictor 512 as the code's).
  FeatARC: C cluster models initialised independently, client k starts in cluster k mod C; before local
  training a client joins the cluster whose backbone features of its clean images align best (mean cosine)
  with those of its last local model; L = L_SSL - lam * align; each cluster averages its clients' models.
[reconstruction] BYOL (EMA target, predictor, 2-2cos) and MoCo v2 (EMA key encoder, queue, InfoNCE tau 0.2,
  symmetrised, no shuffled BN) for the paper's "range of" SSL methods; their target is averaged (`--target
  average`) or reset to the new global online network (`reset`); MoCo's queue is emptied every round.
  `--bn-reestimate` recomputes BN statistics before evaluation (the code's probe does; off by default).
  Clients per round round(pK) (the code: max(floor(pK), 1)); both views in one batch (the code: separately).
  FeatARC's mean cosine is scored on --featarc-sample (64) random images, only the chosen cluster computes
  all anchors: N + C x S image passes instead of (C + 1) x N (0 = the rule as written; one fused pass).
Defects of the released code, fixed here:
1. Server MultiStepLR(milestones=[int(.3R), int(.6R), int(.9R)]): for R < 4 training STARTS decayed (R=1:
   x0.027). We decay round r once per f in {.3,.6,.9} with (r-1)/R >= f (milestones rounded UP): equal when
   R is a multiple of 10, different otherwise (R=15: after rounds 5, 9, 14, not 4, 9, 13). A second
   MultiStepLR per client (src/update.py 295-302, milestones int(f x E x epochs), stepped with E x round +
   epoch, update.py 322, 410) fires at 30/60/90% for E = 1 (compounding with the server's), once at 60% for
   E = 2, at 90% for E = 3, never for E >= 4 (the paper's 50). We apply only the server's.
2. FeatARC aggregation appends uploads in sampling order but indexes them by client id, and includes
   assigned clients that were not sampled: clusters average the wrong models (or fail). We key by client id.
3. Each client trains on the first 80% of its (label-ordered) index list, more extreme skew; `--first80 true`
   reproduces it (the code's exact subset for the Dirichlet partition only).
Fixed FeatARC tends to keep its assignment (a client's own cluster averages its last model;
test_featarc_rule_keeps_* / _moves_*): in our CPU runs it stayed at k mod C (the paper's ResNet-18 and 50
local epochs never tried). Headline = the MEAN over cluster models; summary.json also gives the best one by
test accuracy, as the code reports (optimistic). torchrun (distributed.py): client c on process c % N.
Run:      python dec_ssl.py --partition dirichlet --alpha 0.05 --clients 5 [--featarc true --clusters 2]
          python dec_ssl.py --preset paper --alpha 0.1   (GPU; the code's Dirichlet sweep: CIFAR-10, ResNet-18,
              5 clients, 10 rounds x 50 local epochs, batch 256, Adam 1e-3; its SimSiam runs: add --ssl
              simsiam --optimizer sgd --lr 0.03 --weight-decay 5e-4)
Expected: see results/claims.md and results/results.md (the committed cells); the claims sweep, FeatARC's
checks and their old numbers (efaa20c, 2026-11-23, before the per-client streams): results/recipes.md.
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
    ssl: str = "simclr"
    """simclr | simsiam | byol | moco: the objective every client optimises"""
    weighted: bool = False
    """false: unweighted mean of the clients' models (the released code); true: FedAvg weighted by images"""
    lr_decay: bool = True
    """server lr x0.3 at 30, 60 and 90 percent of the rounds (the code's schedule without its few-rounds defect)"""
    first80: bool = False
    """train each client on only the first 80 percent of its label-ordered index list (released code's defect)"""
    hidden_dim: int = 512
    """hidden width of projector and predictor (512: the code's SimCLR projector and SimSiam predictor; its SimSiam projector: 2048)"""
    proj_dim: int = 0
    """projector output size; 0 = the backbone's size (FeatARC needs that)"""
    tau: float = 0.5
    """NT-Xent temperature (SimCLR, the code's 0.5)"""
    moco_tau: float = 0.2
    """InfoNCE temperature (MoCo v2)"""
    queue_size: int = 1024
    """MoCo queue length (on the client, emptied every round; its first step uses in-batch negatives)"""
    ema: float = 0.99
    """EMA momentum of the BYOL/MoCo target network"""
    target: str = "average"
    """BYOL/MoCo target at aggregation: average (like the online net) | reset (= new global online net)"""
    featarc: bool = False
    """FeatARC: C cluster models, per-round assignment of clients, alignment term"""
    clusters: int = 2
    """C, the number of FeatARC cluster models"""
    lam: float = 1.0
    """lambda, weight of FeatARC's alignment term"""
    featarc_sample: int = 64
    """FeatARC: random images of a client its cluster choice is scored on (0 = all; 64 agreed with 0 on every checked choice, see results/recipes.md)"""
    bn_reestimate: bool = False
    """recompute BatchNorm statistics on the training set before the final evaluation"""

    CHOICES: ClassVar[dict] = {**common.RunArgs.CHOICES, "ssl": ("simclr", "simsiam", "byol", "moco"),
                               "target": ("average", "reset")}
    TORCHRUN: ClassVar[bool] = True       # runs under torchrun: clients spread over processes (see distributed.py)
    PAPER: ClassVar[dict] = dict(dataset="cifar10", encoder="resnet18", clients=5, partition="dirichlet",
                                 alpha=0.1, rounds=10, local_epochs=50, batch_size=256, optimizer="adam",
                                 lr=1e-3, weight_decay=1e-6, train_size=0, eval_every=1, probe_epochs=50,
                                 crop_min=0.08)

    def check(self):
        super().check()
        for name in ("tau", "moco_tau", "hidden_dim", "clusters"):
            if getattr(self, name) <= 0:
                common.fail(f"--{name.replace('_', '-')} must be > 0 (got {getattr(self, name)})")
        for name in ("proj_dim", "queue_size", "lam", "featarc_sample"):
            if getattr(self, name) < 0:
                common.fail(f"--{name.replace('_', '-')} must be >= 0 (got {getattr(self, name)})")
        if not 0 <= self.ema < 1:
            common.fail(f"--ema must be in [0, 1) (got {self.ema})")
        if self.featarc and self.proj_dim:
            common.fail("--featarc aligns projector outputs with backbone features: leave --proj-dim at 0")
        if self.ssl == "moco" and self.queue_size < 1:   # no negatives: InfoNCE is 0 whatever the network does
            common.fail("--ssl moco needs negatives: --queue-size must be at least 1")
        if self.featarc and self.clusters > self.clients:   # client k starts in cluster k mod C
            common.fail(f"--clusters {self.clusters} with {self.clients} clients: clusters {self.clients}.."
                        f"{self.clusters - 1} would start with no client and never train; use --clusters <= --clients")

    def memory_extra(self) -> dict:
        d = common.encoder_dim(self)
        out, hid = self.proj_dim or d, self.hidden_dim
        head = d * hid + 2 * hid * hid + hid * out + out * hid + hid * out
        clusters, local = (self.clusters, self.clients) if self.featarc else (1, 0)
        return {"heads": common.model_copies_bytes(self, head) * (2 if self.ssl in ("byol", "moco") else 1),
                "cluster models": 4 * clusters * (head + common.encoder_params(self)),
                "local backbones": 4 * local * common.encoder_params(self), "queue": 4 * self.queue_size * out}


# --- the objectives: z = g(f(x)) projector outputs, p = h(z) predictor outputs, t = target outputs -------

def simsiam_loss(p1, p2, z1, z2):
    """SimSiam Eq. 4: L = D(p1, sg(z2))/2 + D(p2, sg(z1))/2, D(p, z) = -cos(p, z); sg = stop-gradient."""
    return -(F.cosine_similarity(p1, z2.detach()).mean() + F.cosine_similarity(p2, z1.detach()).mean()) / 2


def byol_loss(p1, p2, t1, t2):
    """BYOL Eq. 2, symmetrised: ||p/|p| - t/|t|||^2 = 2 - 2cos(p, t) for both view orders; t gets no gradient."""
    return (4 - 2 * F.cosine_similarity(p1, t2.detach()) - 2 * F.cosine_similarity(p2, t1.detach())).mean()


def moco_loss(q1, q2, k1, k2, queue, tau):
    """MoCo v2 InfoNCE (MoCo Eq. 1) both ways: positive = the other view's key, negatives = the queue; while
    the queue is empty (a round's first step) the batch's keys of the OTHER images ([reconstruction]: with no
    negatives InfoNCE is exactly 0 and Adam's step would be weight decay alone)."""
    k1, k2 = k1.detach(), k2.detach()
    if len(queue) == 0:
        return (in_batch_info_nce(q1, k2, k1, tau) + in_batch_info_nce(q2, k1, k2, tau)) / 2
    return (common.info_nce(q1, k2, queue, tau) + common.info_nce(q2, k1, queue, tau)) / 2


def in_batch_info_nce(q, k, k_same, tau):
    """InfoNCE of q_i: positive k_i, negatives the 2B - 2 keys k_j, k_same_j (j != i) of the other images."""
    keys = F.normalize(torch.cat([k, k_same]), dim=1)
    logits = F.normalize(q, dim=1) @ keys.t() / tau                    # B x 2B, column i = the positive
    own = torch.eye(len(q), dtype=torch.bool, device=q.device)
    logits = logits.masked_fill(torch.cat([torch.zeros_like(own), own], dim=1), float("-inf"))   # k_same_i: same image
    return F.cross_entropy(logits, torch.arange(len(q), device=q.device))


def featarc_align(a, z1, z2):
    """FeatARC's alignment: -1/2 mean_i(<a_i, z1_i> + <a_i, z2_i>), z normalised, a a frozen unit anchor."""
    a = a.detach()
    return -0.5 * ((a * F.normalize(z1, dim=1)).sum(1).mean() + (a * F.normalize(z2, dim=1)).sum(1).mean())


class SSLModel(nn.Module):
    """Backbone f and projector g; predictor h (SimSiam, BYOL); EMA target (f', g') (BYOL, MoCo)."""

    def __init__(self, args: Args, encoder: nn.Module):
        super().__init__()
        d, hid = encoder.dim, args.hidden_dim
        self.out_dim = out = args.proj_dim or d
        self.encoder = encoder
        if args.ssl == "simsiam":
            self.projector = common.mlp([d, hid, hid, out], last_bn=True)   # [code] 3 layers, BN on the output
        else:                                                            # SimCLR [code], BYOL; MoCo v2: no BN
            self.projector = common.mlp([d, hid, out], bn=args.ssl != "moco")
        self.predictor = common.mlp([out, hid, out]) if args.ssl in ("simsiam", "byol") else None
        self.target = None
        if args.ssl in ("byol", "moco"):
            self.target = copy.deepcopy(nn.Sequential(self.encoder, self.projector)).requires_grad_(False)

    def reset_target(self):
        self.target[0].load_state_dict(self.encoder.state_dict())
        self.target[1].load_state_dict(self.projector.state_dict())


def ssl_step(model: SSLModel, v1, v2, args: Args, queue):
    """The objective on a batch of view pairs (both views in one forward, so BN sees 2B images).
    Returns (loss, z1, z2, keys to enqueue or None)."""
    z1, z2 = model.projector(model.encoder(torch.cat([v1, v2]))).chunk(2)
    if args.ssl == "simclr":
        return common.nt_xent(z1, z2, args.tau), z1, z2, None           # SimCLR Eq. 1
    if args.ssl == "simsiam":
        p1, p2 = model.predictor(torch.cat([z1, z2])).chunk(2)
        return simsiam_loss(p1, p2, z1, z2), z1, z2, None
    with torch.no_grad():
        t1, t2 = model.target(torch.cat([v1, v2])).chunk(2)
    if args.ssl == "byol":
        p1, p2 = model.predictor(torch.cat([z1, z2])).chunk(2)
        return byol_loss(p1, p2, t1, t2), z1, z2, None
    return moco_loss(z1, z2, t1, t2, queue, args.moco_tau), z1, z2, F.normalize(torch.cat([t1, t2]), dim=1)


def local_update(model: SSLModel, run: common.Run, idx, args: Args, lr: float, anchors=None, opt=None):
    """E epochs on one client's images with a fresh optimizer (opt: the previous client's, reset in place to
    a fresh one's state); with anchors (FeatARC) the alignment term is added. Returns (mean loss, images)."""
    opt = common.make_optimizer([p for p in model.parameters() if p.requires_grad], args, lr=lr, reuse=opt)
    queue = torch.zeros(0, model.out_dim, device=run.device)          # MoCo: local, empty at every round
    loss_sum, steps, images = torch.zeros((), device=run.device), 0, 0
    for _ in range(args.local_epochs):
        for b in run.batches(idx):
            v1, v2 = run.two_views(b)
            loss, z1, z2, keys = ssl_step(model, v1, v2, args, queue)
            if anchors is not None:
                loss = loss + args.lam * featarc_align(anchors[b], z1, z2)   # L = L_SSL - lam * align
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if model.target is not None:                                # xi <- m xi + (1 - m) theta
                common.ema_update(model.target[0], model.encoder, args.ema)
                common.ema_update(model.target[1], model.projector, args.ema)
            if keys is not None:
                queue = torch.cat([keys, queue])[: args.queue_size]      # newest first, oldest dropped
            loss_sum += loss.detach()
            steps, images = steps + 1, images + 2 * len(b)
    return loss_sum / max(steps, 1), images


def server_lr(args: Args, rnd: int) -> float:
    """lr x0.3 for every milestone f in {.3, .6, .9} with (rnd-1)/R >= f (integer test: no float ties)."""
    if not args.lr_decay:
        return args.lr
    return args.lr * 0.3 ** sum(10 * (rnd - 1) >= f * args.rounds for f in (3, 6, 9))


def client_indices(run: common.Run, c: int, args: Args):
    """A client's images; with --first80 the released code's split: label-ordered list, first 80% only."""
    idx = run.clients[c]
    if args.first80:
        idx = idx[torch.argsort(run.data.train_y[idx], stable=True)][: int(0.8 * len(idx))]
    return idx


def clean_features(encoder, run: common.Run, idx):
    """L2-normalised backbone features of un-augmented images (eval mode)."""
    return clean_features_of([encoder], run, idx)[0]


@torch.no_grad()
def clean_features_of(encoders, run: common.Run, idx, batch: int = 128):
    """clean_features under several encoders in one pass over the images: they are normalised once, each
    chunk goes through every encoder while it is in the cache (chunks of 128: on a 2-core CPU an eval pass
    is about 2x faster than in chunks of 1024), and eval-mode BatchNorm is folded into the conv before it."""
    x = run.augment.plain(run.data.train_x[idx])
    encoders = [common.folded_eval_copy(e) for e in encoders]
    feats = [[] for _ in encoders]
    for i in range(0, len(x), batch):
        for f, e in zip(feats, encoders):
            f.append(e(x[i:i + batch]).float())
    return [F.normalize(torch.cat(f), dim=1) for f in feats]


def assign_cluster(own, cluster_feats) -> int:
    """FeatARC: argmax_j mean_i <f_local(x_i), f_j(x_i)> over the client's images (unit features)."""
    return int(torch.stack([(own * fj).sum(1).mean() for fj in cluster_feats]).argmax())


def featarc_choose(last_local, clusters, run: common.Run, idx, sample: int = 0):
    """FeatARC on one client: (cluster j whose features align best with the client's last local model's,
    anchors a_i = cluster j's clean backbone features of ALL the client's images). sample > 0: the
    alignment is scored on that many random images of the client ([reconstruction], see the docstring)."""
    k = sample if 0 < sample < len(idx) else len(idx)
    order = torch.randperm(len(idx), device=idx.device) if k < len(idx) else torch.arange(len(idx), device=idx.device)
    scored, rest = order[:k], order[k:]
    own, *cluster_feats = clean_features_of([last_local, *(m.encoder for m in clusters)], run, idx[scored])
    j = assign_cluster(own, cluster_feats)
    if not len(rest):
        return j, cluster_feats[j]
    anchors = torch.empty(len(idx), own.shape[1], device=own.device)
    anchors[scored] = cluster_feats[j]
    anchors[rest] = clean_features(clusters[j].encoder, run, idx[rest])   # the chosen cluster only
    return j, anchors


def aggregate(uploads: dict, assign: dict, clusters: int, weights=None) -> dict:
    """Per-cluster mean KEYED BY CLIENT ID: cluster j <- mean of this round's uploads from clients assigned
    to j; clusters without uploads keep their weights. With one cluster this is plain (Dec-SSL) FedAvg."""
    out = {}
    for j in range(clusters):
        members = [c for c in uploads if assign[c] == j]
        if members:
            out[j] = common.fedavg([uploads[c] for c in members], None if weights is None else weights[members])
    return out


@torch.no_grad()
def reestimate_bn(encoder, run: common.Run, batch: int = 512):
    """BatchNorm running statistics recomputed as a plain average over the un-augmented training set."""
    enc = copy.deepcopy(encoder).train()
    for m in enc.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    for i in range(0, len(run.data.train_x), batch):
        enc(run.augment.plain(run.data.train_x[i:i + batch]))
    return enc.eval()


def main():
    args, run = common.start(Args)
    run.explain(assign="FeatARC: the cluster each client joined this round (-1: not sampled)",
                knn_clusters="kNN of each cluster model")
    C = args.clusters if args.featarc else 1
    clusters = nn.ModuleList([SSLModel(args, common.make_encoder(args, run.data.channels))
                              for _ in range(C)]).to(run.device)        # initialised independently
    worker = copy.deepcopy(clusters[0])                                 # re-loaded for every client
    opt = common.make_optimizer([p for p in worker.parameters() if p.requires_grad], args)   # reset per client
    state = {"clusters": clusters}
    if args.featarc:    # every client's last local backbone; client k starts as a copy of cluster k mod C
        state["local"] = last_local = nn.ModuleList(
            [copy.deepcopy(clusters[k % C].encoder) for k in range(args.clients)])
        anchors = torch.zeros(len(run.data.train_x), clusters[0].encoder.dim, device=run.device)
    for rnd in run.rounds(state):
        lr = server_lr(args, rnd)
        picked = run.sample_clients()
        uploads, assign, losses, images = {}, {}, {}, {}
        for c in run.my_clients(picked):                          # clients train in turn (torchrun: this process's)
            with run.client(c):                                   # c's own random stream: (seed, round, c)
                idx = client_indices(run, c, args)
                assign[c] = 0
                if args.featarc:        # on the client: only the chosen cluster index is sent to the server
                    assign[c], anchors[idx] = featarc_choose(last_local[c], clusters, run, idx,
                                                                        args.featarc_sample)   # a_i: frozen
                worker.load_state_dict(clusters[assign[c]].state_dict())    # download
                if args.target == "reset" and worker.target is not None:
                    worker.reset_target()
                loss, images[c] = local_update(worker, run, idx, args, lr, anchors if args.featarc else None, opt)
                uploads[c] = {k: v.clone() for k, v in worker.state_dict().items()}    # upload, keyed by id
                if args.featarc:
                    last_local[c].load_state_dict(worker.encoder.state_dict())
                losses[c] = loss.item()
        uploads, assign, losses, images = run.gather(uploads, assign, losses, images)   # every sampled client's
        for j, averaged in aggregate(uploads, assign, C, run.sizes if args.weighted else None).items():
            clusters[j].load_state_dict(averaged)                       # the server
        extra = {"lr": lr}
        if args.featarc:
            extra["assign"] = [assign.get(c, -1) for c in range(args.clients)]   # -1: not sampled
            if run.is_eval_round(rnd):
                monitor = [run.monitor(m.encoder) for m in clusters]
                extra["knn_clusters"] = [m["knn_acc"] for m in monitor]
                extra["knn_acc"] = sum(extra["knn_clusters"]) / C
                extra["knn_acc_1pct"] = sum(m["knn_acc_1pct"] for m in monitor) / C
        run.log(rnd, loss=np.mean(list(losses.values())), images=sum(images.values()),
                encoder=None if args.featarc else clusters[0].encoder, **extra)

    if args.featarc:        # a cluster model no client ever trained is still its random initialisation
        used = {a for r in run.history for a in r.get("assign", [])}
        run.incomplete += [f"cluster {j} was never trained (no client was assigned to it)"
                           for j in range(C) if j not in used]
    final = [reestimate_bn(m.encoder, run) if args.bn_reestimate else m.encoder for m in clusters]
    if not args.featarc:
        run.finish(final[0], ssl=args.ssl)
        return
    per = [run.evaluate(e) for e in final]
    best = max(range(C), key=lambda j: per[j]["linear_acc"])
    run.finish(results={k: sum(r[k] for r in per) / C for k in per[0]}, ssl=args.ssl,
               encoders=final, encoders_per="cluster",
               headline="knn_acc/linear_acc are the MEAN over the cluster models", clusters=per,
               best_cluster={"cluster": best, **per[best], "note": "picked by test linear accuracy, as the "
                             "released code does: optimistic"})


if __name__ == "__main__":
    main()
