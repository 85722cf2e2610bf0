"""Local SimCLR: every client trains alone on its own images, nothing is shared (the lower bound).

Paper: Chen et al., "A Simple Framework for Contrastive Learning of Visual Representations"
(ICML 2020, arXiv 2002.05709). Federated SSL papers use this as the "local training" baseline:
what a client gets without collaborating. It is fedavg_cl.py with the server removed:
`diff fedavg_cl.py local_cl.py` shows exactly that.

[paper] SimCLR: two augmented views, MLP projector, NT-Xent with temperature tau (Eq. 1).
[reconstruction] each client keeps its own model AND its own optimizer across rounds (a "round" here is
only a bookkeeping unit of E local epochs, so the image-pass budget equals fedavg_cl's); every
client's encoder is evaluated with the shared protocol (bank = the whole training set in use, so a
2-class client is asked about all 10 classes); the summary reports each client's numbers and their
mean and std, and the headline knn_acc / linear_acc are the means. The per-round kNN is the mean
over clients. The learner is fedavg_cl.py's, crop_min 0.5 included (chosen there on the holdout, not
re-measured here): the lower bound must differ from FedAvg only by the missing server.

Run:      python local_cl.py                    (10 clients, 2 classes each, Fashion-MNIST, CPU)
          python local_cl.py --preset paper     (CIFAR-10, ResNet-18, 5 clients, 2 classes each; GPU)
Recipe and an older single-run measurement: results/recipes.md.
Expected: see results/claims.md and results/results.md (the committed cells: default setting, 3 seeds;
the premise "FedAvg beats local training" is a claim there).
"""
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.nn as nn

import common


@dataclass
class Args(common.RunArgs):
    tau: float = 0.2
    """NT-Xent temperature (0.2 chosen on the holdout for batch 128, see results/recipes.md; --preset paper uses SimCLR's 0.5)"""
    proj_dim: int = 128
    """output size of the projection head"""
    crop_min: float = 0.5
    """smallest crop area; fedavg_cl.py's holdout-chosen 0.5, so that local vs FedAvg differ only by the server"""
    participation: float = 1.0
    """must be 1.0 here: every client trains every round (no server samples clients)"""

    PAPER: ClassVar[dict] = dict(dataset="cifar10", encoder="resnet18", clients=5, partition="classes",
                                 classes_per_client=2, rounds=100, local_epochs=5, batch_size=128,
                                 optimizer="sgd", lr=0.032, weight_decay=5e-4, train_size=0,
                                 eval_every=10, probe_epochs=100, crop_min=0.08, tau=0.5)
    TORCHRUN: ClassVar[bool] = True       # runs under torchrun: clients spread over processes (see distributed.py)

    def check(self):
        super().check()
        if self.tau <= 0:
            common.fail(f"--tau must be > 0 (got {self.tau})")
        if self.participation < 1:
            common.fail("--participation: local training has no server to sample clients; use 1.0")
        if self.proj_dim < 1:
            common.fail(f"--proj-dim must be at least 1 (got {self.proj_dim})")

    def memory_extra(self) -> dict:
        d = common.encoder_dim(self)
        return {"heads": common.model_copies_bytes(self, d * d + d * self.proj_dim)}


class SimCLR(nn.Module):
    """Encoder f and projection head g: z = g(f(x))."""

    def __init__(self, encoder: nn.Module, proj_dim: int):
        super().__init__()
        self.encoder = encoder
        self.projector = common.mlp([encoder.dim, encoder.dim, proj_dim])

    def forward(self, x):
        return self.projector(self.encoder(x))


def local_update(model: SimCLR, opt, run: common.Run, idx: torch.Tensor, args: Args):
    """E epochs of SimCLR on one client's images with its own optimizer; returns (mean loss, images)."""
    loss_sum, steps, images = torch.zeros((), device=run.device), 0, 0
    for _ in range(args.local_epochs):
        for b in run.batches(idx):
            v1, v2 = run.two_views(b)
            z1, z2 = model(torch.cat([v1, v2])).chunk(2)
            loss = common.nt_xent(z1, z2, args.tau)            # SimCLR Eq. 1, averaged over 2B views
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.detach()
            steps, images = steps + 1, images + 2 * len(b)
    return loss_sum / max(steps, 1), images


def main():
    args, run = common.start(Args)
    models = [SimCLR(common.make_encoder(args, run.data.channels), args.proj_dim).to(run.device)
              for _ in range(args.clients)]
    opts = [common.make_optimizer(m.parameters(), args) for m in models]
    mine = run.my_clients(range(args.clients))                    # torchrun: this process's clients
    for rnd in run.rounds({"models": models, "opts": opts}):
        losses, images, monitor = {}, {}, {}
        for c in mine:                                            # no server: each client alone
            with run.client(c):                                   # c's own random stream: (seed, round, c)
                loss, images[c] = local_update(models[c], opts[c], run, run.clients[c], args)
            losses[c] = loss.item()
            if run.is_eval_round(rnd):
                monitor[c] = run.monitor(models[c].encoder)
        losses, images, monitor = run.gather(losses, images, monitor)   # numbers for the log: no model leaves a client
        monitor = list(monitor.values())
        run.log(rnd, loss=np.mean(list(losses.values())), images=sum(images.values()),
                **{k: np.mean([m[k] for m in monitor]) for k in (monitor[0] if monitor else ())})
    per_client = list(run.gather({c: run.evaluate(models[c].encoder) for c in mine}).values())
    knn, lin = np.array([r["knn_acc"] for r in per_client]), np.array([r["linear_acc"] for r in per_client])
    run.finish(results={k: np.mean([r[k] for r in per_client]) for k in per_client[0]},   # every metric
               encoders=[m.encoder for m in models],
               knn_acc_std=knn.std(), linear_acc_std=lin.std(), per_client=per_client)


if __name__ == "__main__":
    main()
