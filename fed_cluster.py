"""Federated SSL with contrastive vs non-contrastive losses, then federated deep clustering (two stages).

Paper: R. Miao and E. Koyuncu, "Contrastive and Non-Contrastive Strategies for Federated Self-Supervised
Representation Learning and Deep Clustering", IEEE Journal of Selected Topics in Signal Processing, 2024,
https://doi.org/10.1109/JSTSP.2024.3461311. ONLY THE ABSTRACT IS KNOWN: no preprint, no public code, so nearly
everything here is our reconstruction. Its four claims (non-IID clients; federated self-supervised
representation learning, FedSSRL, and federated clustering, FedCl) are all a reader can check it against:
  1. a two-stage model (representation learning first, then clustering) works well for BOTH tasks;
  2. adding a contrastive loss as a regulariser helps a lot, even for representation learning;
  3. for FedCl, a contrastive loss is best in both stages;
  4. for FedSSRL, a non-contrastive loss (as the main loss) is best.
`--sweep true` runs the comparisons behind these claims and writes one table saying which hold here.
[paper] (abstract) two stages; contrastive, non-contrastive and contrastive-regularised losses; FedSSRL and
  FedCl on non-IID clients. [related] FedMCC (same authors, arXiv 2206.05093): online + EMA target, two stages.
[reconstruction], all of the following:
  - networks: online encoder f, projector g, predictor q (BYOL's, for the non-contrastive loss), cluster head
    c: h -> softmax over M clusters (M = number of classes; MLP d -> d -> M without BatchNorm as in
    Contrastive Clustering, so train and eval mode assign alike); targets f', g', c' = EMA copies,
    xi <- m xi + (1 - m) theta, m = 0.99 per step.
  - stage 1 (rounds 1 .. R - C): --loss noncontrastive: L_N = (2 - 2 cos(q(z1), z2')) + (2 - 2 cos(q(z2), z1'))
    (BYOL, z' from the target); contrastive: L_C = NT-Xent over the batch (SimCLR, tau 0.5);
    both: L_N + lambda_C L_C (the contrastive "regulariser").
  - stage 2 (the last C = --cluster-rounds rounds): the stage-1 loss is kept and a cluster loss added.
    contrastive (Contrastive Clustering, Li et al., AAAI 2021): NT-Xent over the M columns of the two views'
    B x M assignment matrices (tau_c = 1.0) plus log M + sum_m P_m log P_m per view (P = mean assignment;
    zero iff clusters are used uniformly, prevents collapse). noncontrastive: cross-entropy from the
    target's sharpened assignment (temperature --tau-t) of the other view to the online one, plus the same
    entropy term. --cluster-rounds = --rounds gives the one-stage baseline (cluster loss from round 1).
  - federation: FedAvg (weighted by sample counts) of f, g, q and c; the targets stay on the client and are
    re-initialised from the global online weights every round (--keep-target true: kept).
  - evaluation: the encoder (kNN, linear probe) after stage 1 and after stage 2; the clustering (argmax of c
    on the test set) with ACC (Hungarian matching), NMI and ARI (common.py).
Sanity anchor (centralized Contrastive Clustering, ResNet-34, CIFAR-10; not this paper): ACC 0.790, NMI
0.705, ARI 0.637: a federated non-IID run should land below (above suggests a leak); a constant clustering
has ACC 0.10, NMI 0, ARI 0.
torchrun (distributed.py): client c on process c % N (its kept target too); uploads all-gathered, the
same FedAvg on every process, in both stages.
Run:      python fed_cluster.py     (Fashion-MNIST, 10 clients, 2 classes each, CPU; stage 2 = rounds 11-20)
          python fed_cluster.py --loss contrastive --cluster-loss noncontrastive --cluster-rounds 5
          python fed_cluster.py --sweep true --sweep-seeds 3    (the four claims; one table)
          python fed_cluster.py --preset paper (CIFAR-10, ResNet-18: our GPU setting; the paper's is unknown)
Mind the batch: a client needs several steps per round (--batch-size 128 on 200 images is ONE step, and the
cluster head then stays near uniform).
Expected: see results/claims.md and results/results.md (the committed cells); a short run's numbers from
e60a4f1 (2026-11-23, before the per-client streams) are in results/recipes.md.
"""
import copy
import itertools
import json
import math
import subprocess
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import distributed


@dataclass
class Args(common.RunArgs):
    loss: str = "both"
    """stage-1 (and instance-level) loss: contrastive (NT-Xent) | noncontrastive (BYOL) | both (N + lambda_C C)"""
    lambda_c: float = 1.0
    """lambda_C, weight of the contrastive regulariser in --loss both"""
    cluster_loss: str = "contrastive"
    """stage-2 cluster loss: contrastive (Contrastive Clustering) | noncontrastive (target consistency)"""
    cluster_rounds: int = -1
    """stage-2 rounds, the LAST ones of --rounds; -1 = half (rounded down); = --rounds: one-stage baseline"""
    tau: float = 0.5
    """NT-Xent temperature of the instance-level contrastive loss"""
    tau_c: float = 1.0
    """NT-Xent temperature of the cluster-level contrastive loss (Contrastive Clustering's value)"""
    tau_t: float = 0.5
    """temperature sharpening the target's assignments in the non-contrastive cluster loss"""
    momentum: float = 0.99
    """EMA momentum m of the target networks (per local step)"""
    keep_target: bool = False
    """keep each client's target networks across rounds (default: re-initialise from the global model)"""
    proj_dim: int = 128
    """output size of the projector g (and of the predictor q)"""
    sweep: bool = False
    """instead of one run, run the configurations behind the abstract's four claims and write a table"""
    sweep_seeds: int = 1
    """seeds per configuration in --sweep (mean and std over them)"""

    CHOICES: ClassVar[dict] = {**common.RunArgs.CHOICES, "loss": ("contrastive", "noncontrastive", "both"),
                               "cluster_loss": ("contrastive", "noncontrastive")}
    TORCHRUN: ClassVar[bool] = True       # runs under torchrun: clients spread over processes (see distributed.py)
    PAPER: ClassVar[dict] = dict(dataset="cifar10", encoder="resnet18", clients=5, partition="classes",
                                 classes_per_client=2, rounds=100, cluster_rounds=50, local_epochs=5,
                                 batch_size=128, optimizer="sgd", lr=0.032, weight_decay=5e-4, train_size=0,
                                 eval_every=10, probe_epochs=100, crop_min=0.08)

    def check(self):
        super().check()
        if not -1 <= self.cluster_rounds <= self.rounds:
            common.fail(f"--cluster-rounds must be -1 (half) or in 0..{self.rounds} (--rounds) "
                        f"(got {self.cluster_rounds})")
        for name in ("tau", "tau_c", "tau_t"):
            if getattr(self, name) <= 0:
                common.fail(f"--{name.replace('_', '-')} must be > 0 (got {getattr(self, name)})")
        if self.lambda_c < 0:
            common.fail(f"--lambda-c must be >= 0 (got {self.lambda_c})")
        if not 0 <= self.momentum < 1:
            common.fail(f"--momentum must be in [0, 1) (got {self.momentum})")
        if self.sweep_seeds < 1:
            common.fail(f"--sweep-seeds must be at least 1 (got {self.sweep_seeds})")
        if self.sweep and distributed.launched():
            common.fail("--sweep starts its runs as subprocesses; run it as one process, not under torchrun")
        if self.proj_dim < 1:
            common.fail(f"--proj-dim must be at least 1 (got {self.proj_dim})")

    def memory_extra(self) -> dict:
        d, k = common.encoder_dim(self), self.proj_dim
        return {"heads": common.model_copies_bytes(self, 2 * (d * d + d * k) + k * 100)}

    @property
    def stage1_rounds(self) -> int:
        return self.rounds - (self.rounds // 2 if self.cluster_rounds == -1 else self.cluster_rounds)


# ----------------------------------------------------------------------------------------------
# The method: networks and losses
# ----------------------------------------------------------------------------------------------

class Net(nn.Module):
    """Encoder f, projector g, predictor q (online only) and cluster head c."""

    def __init__(self, encoder: nn.Module, proj_dim: int, clusters: int, predictor: bool = True):
        super().__init__()
        d = encoder.dim
        self.encoder = encoder
        self.projector = common.mlp([d, d, proj_dim])
        self.predictor = common.mlp([proj_dim, d, proj_dim]) if predictor else None
        self.cluster = common.mlp([d, d, clusters], bn=False)  # logits; no BN, as in Contrastive Clustering


def byol_loss(p1, p2, z1_t, z2_t):
    """L_N = (2 - 2 cos(q(z1), z2')) + (2 - 2 cos(q(z2), z1')), averaged over the batch."""
    cos = lambda a, b: (F.normalize(a, dim=1) * F.normalize(b, dim=1)).sum(1)
    return (4 - 2 * cos(p1, z2_t) - 2 * cos(p2, z1_t)).mean()


def entropy_gap(p: torch.Tensor) -> torch.Tensor:
    """log M + sum_m P_m log P_m = log M - H(P), P = mean assignment: 0 iff the clusters are used uniformly."""
    pm = p.mean(0)
    return math.log(p.shape[1]) + (pm * torch.log(pm.clamp_min(1e-12))).sum()


def cluster_loss_contrastive(p1, p2, tau_c):
    """Contrastive Clustering: NT-Xent over the M columns (cluster i of view 1 vs view 2) + entropy terms."""
    return common.nt_xent(p1.t(), p2.t(), tau_c) + entropy_gap(p1) + entropy_gap(p2)


def cluster_loss_noncontrastive(p1, p2, logits1_t, logits2_t, tau_t):
    """Cross-entropy from the sharpened, stop-gradient target assignment of the other view + entropy terms."""
    q1, q2 = F.softmax(logits1_t / tau_t, dim=1), F.softmax(logits2_t / tau_t, dim=1)
    ce = -(q2 * torch.log(p1.clamp_min(1e-12))).sum(1).mean() - (q1 * torch.log(p2.clamp_min(1e-12))).sum(1).mean()
    return ce / 2 + entropy_gap(p1) + entropy_gap(p2)


def local_update(online: Net, target: Net, run: common.Run, idx, args: Args, stage: int):
    """E epochs on one client with a fresh optimizer; returns (mean loss, mean cluster loss, images)."""
    opt = common.make_optimizer(online.parameters(), args)
    use_target = args.loss != "contrastive" or (stage == 2 and args.cluster_loss == "noncontrastive")
    loss_sum, clu_sum = torch.zeros((), device=run.device), torch.zeros((), device=run.device)
    steps, images = 0, 0
    for _ in range(args.local_epochs):
        for b in run.batches(idx):
            v = torch.cat(run.two_views(b))                      # both views as one batch (BN sees 2B)
            h = online.encoder(v)
            z = online.projector(h)
            if use_target:
                with torch.no_grad():
                    h_t = target.encoder(v)
                    z1_t, z2_t = target.projector(h_t).chunk(2)
            loss = torch.zeros((), device=run.device)
            if args.loss != "contrastive":                       # L_N (BYOL form)
                p1, p2 = online.predictor(z).chunk(2)
                loss = loss + byol_loss(p1, p2, z1_t, z2_t)
            if args.loss != "noncontrastive":                    # L_C (SimCLR NT-Xent); weight 1 if alone
                loss = loss + (args.lambda_c if args.loss == "both" else 1.0) * common.nt_xent(*z.chunk(2), args.tau)
            if stage == 2:                                       # + cluster loss; instance loss kept
                a1, a2 = F.softmax(online.cluster(h), dim=1).chunk(2)
                if args.cluster_loss == "contrastive":
                    clu = cluster_loss_contrastive(a1, a2, args.tau_c)
                else:
                    with torch.no_grad():
                        l1_t, l2_t = target.cluster(h_t).chunk(2)
                    clu = cluster_loss_noncontrastive(a1, a2, l1_t, l2_t, args.tau_t)
                loss = loss + clu
                clu_sum += clu.detach()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if use_target:                                       # xi <- m xi + (1 - m) theta
                for name in ("encoder", "projector", "cluster"):
                    common.ema_update(getattr(target, name), getattr(online, name), args.momentum)
            loss_sum += loss.detach()
            steps, images = steps + 1, images + 2 * len(b)
    return loss_sum / max(steps, 1), clu_sum / max(steps, 1), images


@torch.no_grad()
def evaluate_clustering(model: Net, run: common.Run) -> dict:
    """Cluster = argmax of c(f(x)) on the un-augmented test set; ACC / NMI / ARI against the labels."""
    h = common.features(model.encoder, run.data.test_x, run.augment)
    model.cluster.eval()
    pred = model.cluster(h).argmax(1).cpu().numpy()
    model.cluster.train()
    y = run.data.test_y.cpu().numpy()
    return {"cluster_acc": common.cluster_acc(y, pred), "nmi": common.nmi(y, pred), "ari": common.ari(y, pred),
            "clusters_used": len(np.unique(pred))}


def main():
    try:
        args = common.parse_args(Args)
        args.check()
    except common.UserError:
        args = None                                              # common.start reports it the usual way
    if args is not None and args.sweep:
        return sweep(args)
    args, run = common.start(Args)
    model = Net(common.make_encoder(args, run.data.channels), args.proj_dim, run.data.num_classes).to(run.device)
    worker = copy.deepcopy(model)                                # one online working copy, re-loaded per client
    target = Net(copy.deepcopy(model.encoder), args.proj_dim, run.data.num_classes, predictor=False).to(run.device)
    stage1, targets = {}, {}                                     # stage-1 evaluation; kept targets per client
    s1 = args.stage1_rounds
    run.say(f"stage 1 (representation learning, --loss {args.loss}): rounds 1-{s1}; stage 2 (clustering, "
            f"--cluster-loss {args.cluster_loss}): rounds {s1 + 1}-{args.rounds}")
    run.explain(loss="the instance loss (--loss) and in stage 2 also the cluster loss, so it steps up where stage 2 "
                     "starts (curves.png marks the round), which is not divergence",
                stage="1 = representation learning, 2 = clustering", cluster_loss="the cluster loss alone",
                cluster_acc="clustering accuracy on the test set (Hungarian matching)",
                clusters_used="clusters the test images fall into")
    for rnd in run.rounds({"model": model, "stage1": stage1, "targets": targets}):
        stage = 1 if rnd <= args.stage1_rounds else 2
        picked = run.sample_clients()
        states, losses, clu_losses, images = {}, {}, {}, {}
        for c in run.my_clients(picked):                         # clients train in turn (torchrun: this process's)
            with run.client(c):                                  # c's own random stream: (seed, round, c)
                worker.load_state_dict(model.state_dict())           # download the global online networks
                if args.keep_target and c in targets:
                    target.load_state_dict(targets[c])
                else:                                                # target := global online (no predictor)
                    target.load_state_dict(model.state_dict(), strict=False)
                loss, clu, images[c] = local_update(worker, target, run, run.clients[c], args, stage)
                states[c] = {k: v.clone() for k, v in worker.state_dict().items()}   # upload f, g, q, c
                if args.keep_target:                             # kept on the client (its process)
                    targets[c] = {k: v.clone() for k, v in target.state_dict().items()}
                losses[c], clu_losses[c] = loss.item(), clu.item()
        states, losses, clu_losses, images = run.gather(states, losses, clu_losses, images)   # by client id
        model.load_state_dict(common.fedavg(list(states.values()), run.sizes[picked]))   # the server: FedAvg
        extra = {"stage": stage}
        if stage == 2:
            extra["cluster_loss"] = np.mean(list(clu_losses.values()))
            if run.is_eval_round(rnd):
                extra.update(run.timed_eval(evaluate_clustering, model, run))
        if rnd == args.stage1_rounds:                            # end of stage 1: evaluate the encoder
            stage1.update(run.evaluate(model.encoder))
        run.log(rnd, loss=np.mean(list(losses.values())), images=sum(images.values()), encoder=model.encoder,
                **extra)   # prints ACC, NMI, ARI
        if rnd == args.stage1_rounds:                            # under the round it closes
            run.say(f"stage 1 done: kNN {stage1['knn_acc']:.4f}  linear {stage1['linear_acc']:.4f}")
    final, clu = run.evaluate(model.encoder), evaluate_clustering(model, run)
    run.say(f"clustering (test set): ACC {clu['cluster_acc']:.4f}  NMI {clu['nmi']:.4f}  ARI {clu['ari']:.4f}")
    run.finish(model.encoder, results=final, stage1=dict(stage1) or None, stage2=final, **clu,
               stage1_rounds=args.stage1_rounds, loss_kind=args.loss, cluster_loss_kind=args.cluster_loss)


# ----------------------------------------------------------------------------------------------
# --sweep: the configurations behind the abstract's four claims, one table
# ----------------------------------------------------------------------------------------------

# name: (--loss, --cluster-loss, one-stage?) ; N = non-contrastive, C = contrastive, N+C = N + lambda_C C
CONFIGS = {"N / C": ("noncontrastive", "contrastive", False), "C / C": ("contrastive", "contrastive", False),
           "N+C / C": ("both", "contrastive", False), "N / N": ("noncontrastive", "noncontrastive", False),
           "C / N": ("contrastive", "noncontrastive", False), "N+C / N": ("both", "noncontrastive", False),
           "one-stage C": ("contrastive", "contrastive", True)}
COLUMNS = [("stage1", "knn_acc"), ("stage1", "linear_acc"), (None, "knn_acc"), (None, "linear_acc"),
           (None, "cluster_acc"), (None, "nmi"), (None, "ari")]


def claims(mean: dict) -> list[tuple[str, str, bool]]:
    """The four orderings as (claim, the comparison made, holds?) from per-config mean results."""
    g = lambda cfg, stage, key: (mean[cfg][stage] or {}).get(key, float("nan")) if stage else mean[cfg][key]
    acc = {cfg: g(cfg, None, "cluster_acc") for cfg in CONFIGS if cfg != "one-stage C"}
    rep = {cfg: g(cfg + " / C", "stage1", "linear_acc") for cfg in ("N", "C", "N+C")}
    best_acc, best_rep = max(acc, key=acc.get), max(rep, key=rep.get)
    two, one = "C / C", "one-stage C"
    return [
        ("1. two stages work for both tasks", f"two-stage vs one-stage C/C: ACC {acc[two]:.3f} vs "
         f"{g(one, None, 'cluster_acc'):.3f}, final linear {g(two, None, 'linear_acc'):.3f} vs "
         f"{g(one, None, 'linear_acc'):.3f}", acc[two] > g(one, None, "cluster_acc")
         and g(two, None, "linear_acc") > g(one, None, "linear_acc")),
        ("2. contrastive regulariser helps (representation and clustering)", f"N+C vs N: stage-1 linear "
         f"{rep['N+C']:.3f} vs {rep['N']:.3f}, ACC (cluster loss C) {acc['N+C / C']:.3f} vs {acc['N / C']:.3f}",
         rep["N+C"] > rep["N"] and acc["N+C / C"] > acc["N / C"]),
        ("3. FedCl: contrastive in both stages is best", f"best ACC: {best_acc} ({acc[best_acc]:.3f}); "
         f"C / C {acc['C / C']:.3f}", best_acc == "C / C"),
        ("4. FedSSRL: a non-contrastive main loss is best", f"best stage-1 linear: {best_rep} "
         f"({rep[best_rep]:.3f}) of N {rep['N']:.3f}, C {rep['C']:.3f}, N+C {rep['N+C']:.3f}", best_rep != "C"),
    ]


def sweep(args: Args):
    """Run every configuration (same partition and budget) for --sweep-seeds seeds as subprocesses;
    write sweep.md and sweep.json into one folder."""
    folder = Path(args.out) / f"fed_cluster-sweep-{args.dataset}-{args.partition}-{time.strftime('%Y%m%d-%H%M%S')}"
    skip = {"sweep", "sweep_seeds", "out", "resume", "preset", "seed", "loss", "cluster_loss", "cluster_rounds"}
    value = lambda v: str(v).lower() if isinstance(v, bool) else v
    base = [f"--{f.name.replace('_', '-')}={value(getattr(args, f.name))}" for f in fields(Args) if f.name not in skip]
    results = {cfg: [] for cfg in CONFIGS}
    for (cfg, (loss, clu, one_stage)), s in itertools.product(CONFIGS.items(), range(args.sweep_seeds)):
        out = folder / f"{cfg.replace(' / ', '-').replace('+', 'p').replace(' ', '-')}-s{args.seed + s}"
        cmd = [sys.executable, __file__, *base, f"--loss={loss}", f"--cluster-loss={clu}", f"--seed={args.seed + s}",
               f"--cluster-rounds={args.rounds if one_stage else args.cluster_rounds}", f"--out={out}"]
        print(f"sweep: {cfg}, seed {args.seed + s}", flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stdout[-2000:] + proc.stderr[-2000:], file=sys.stderr)
            sys.exit(proc.returncode)
        results[cfg].append(json.loads(next(out.glob("*/summary.json")).read_text()))
    stat = lambda runs, stage, key: np.array([(r[stage] or {}).get(key, np.nan) if stage else r[key] for r in runs])
    mean = {cfg: {"stage1": {k: float(stat(r, "stage1", k).mean()) for k in ("knn_acc", "linear_acc")},
                  **{k: float(stat(r, None, k).mean()) for _, k in COLUMNS[2:]}} for cfg, r in results.items()}

    def cell(v):
        if np.isnan(v).all():
            return "-"
        return f"{np.nanmean(v):.3f}" + (f" ± {np.nanstd(v):.3f}" if len(v) > 1 else "")

    lines = [f"Command: `{' '.join(sys.argv)}`", "", f"{args.sweep_seeds} seed(s) from {args.seed}; "
             "losses as stage 1 / stage 2 (N = non-contrastive BYOL, C = contrastive, N+C = regularised)", "",
             "| config | stage-1 kNN | stage-1 linear | final kNN | final linear | ACC | NMI | ARI |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {cfg} | " + " | ".join(cell(stat(r, st, k)) for st, k in COLUMNS) + " |"
              for cfg, r in results.items()]
    spread = "no spread with one seed: read gaps of a few points as noise" if args.sweep_seeds == 1 else \
        "a gap smaller than the ± spread above is not a result"
    lines += ["", f"Verdicts compare means ({spread}).", "",
              "| claim of the abstract | our comparison (means) | holds here? |", "|---|---|---|"]
    lines += [f"| {c} | {how} | {'yes' if ok else 'no'} |" for c, how, ok in claims(mean)]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sweep.md").write_text("\n".join(lines) + "\n")
    (folder / "sweep.json").write_text(json.dumps({"mean": mean, "runs": results}, indent=1))
    print("\n".join(lines) + f"\n\nsweep folder: {folder}", flush=True)


if __name__ == "__main__":
    main()
