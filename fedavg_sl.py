"""FedAvg + supervised cross-entropy: decentralized SUPERVISED learning, the row Dec-SSL compares against.

Papers: McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized Data"
(AISTATS 2017) for FedAvg; L. Wang et al., "Does Learning from Decentralized Non-IID Unlabeled Data
Benefit from Self Supervision?" (ICLR 2023) for the comparison: Dec-SSL's abstract says decentralized
SSL "sometimes" outperforms decentralized supervised learning under heterogeneity; its released code
has `decentralized_sl_main.py` for this baseline.

The one row of the project that uses TRAINING LABELS: every client trains the encoder and a linear
classifier head with cross-entropy on its own labelled images; the server averages both (FedAvg).
Evaluation is the shared protocol's, on the encoder alone (the head is dropped): kNN and the linear
probe, so its numbers sit in the same table as the self-supervised rows.
[paper] FedAvg: every round each sampled client starts from the global weights, runs E local epochs with a
fresh optimizer, the server takes the sample-count-weighted mean of the whole state dict (BatchNorm
statistics included). [reconstruction] The recipe is fedavg_cl.py's, so `diff fedavg_cl.py fedavg_sl.py`
shows only the loss: the small CNN, Adam 1e-3, batch 128, ONE view of the shared augmentation (crop 0.5,
the SimCLR augmentation of every row) instead of two, a linear head on the encoder's features.

Run:      python fedavg_sl.py                  (10 clients, 2 classes each, Fashion-MNIST, CPU minutes)
          python fedavg_sl.py --partition dirichlet --alpha 0.1
Recipe: fedavg_cl.py's, not tuned separately (results/recipes.md holds every method's holdout evidence).
Expected: not measured yet (no fedavg_sl cell is committed); the ledger asks whether Dec-SSL beats it in
kNN with 1 % of the labels under Dirichlet skew (results/claims.md).
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
    crop_min: float = 0.5
    """smallest crop area (fedavg_cl's value, so the two rows see the same augmentation)"""
    weighted: bool = True
    """FedAvg weights clients by their number of images (false: unweighted mean)"""

    PAPER: ClassVar[dict] = dict(dataset="cifar10", encoder="resnet18", clients=5, partition="dirichlet",
                                 alpha=0.1, rounds=10, local_epochs=50, batch_size=256, optimizer="adam",
                                 lr=1e-3, weight_decay=1e-6, train_size=0, eval_every=1, probe_epochs=50,
                                 crop_min=0.08)                 # dec_ssl.py's preset: the same shape
    TORCHRUN: ClassVar[bool] = True       # runs under torchrun: clients spread over processes (see distributed.py)


class Classifier(nn.Module):
    """Encoder f and a linear head W: logits = W f(x)."""

    def __init__(self, encoder: nn.Module, num_classes: int):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.dim, num_classes)

    def forward(self, x):
        return self.head(self.encoder(x))


def local_update(model: Classifier, run: common.Run, idx: torch.Tensor, args: Args, opt=None):
    """E epochs of cross-entropy on one client's labelled images, with a fresh optimizer (opt: the previous
    client's, reset in place to a fresh one's state); returns (mean loss, images)."""
    opt = common.make_optimizer(list(model.parameters()), args, reuse=opt)
    loss_sum, steps, images = torch.zeros((), device=run.device), 0, 0
    for _ in range(args.local_epochs):
        for b in run.batches(idx):
            x = run.augment(run.data.train_x[b])                      # one augmented view
            loss = F.cross_entropy(model(x), run.data.train_y[b])     # the client's own labels
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.detach()
            steps, images = steps + 1, images + len(b)
    return loss_sum / max(steps, 1), images


def main():
    args, run = common.start(Args)
    model = Classifier(common.make_encoder(args, run.data.channels), run.data.num_classes).to(run.device)
    worker = copy.deepcopy(model)          # one working copy, re-loaded for every client
    opt = common.make_optimizer(list(worker.parameters()), args)          # reset to fresh for every client
    for rnd in run.rounds({"model": model}):
        picked = run.sample_clients()
        states, losses, images = {}, {}, {}
        for c in run.my_clients(picked):                          # clients train in turn (torchrun: this process's)
            worker.load_state_dict(model.state_dict())            # download the global model
            with run.client(c):                                   # c's own random stream: (seed, round, c)
                loss, images[c] = local_update(worker, run, run.clients[c], args, opt)
            states[c] = {k: v.clone() for k, v in worker.state_dict().items()}   # upload
            losses[c] = loss.item()
        states, losses, images = run.gather(states, losses, images)   # every sampled client's upload, by id
        weights = run.sizes[picked] if args.weighted else None
        model.load_state_dict(common.fedavg(list(states.values()), weights))   # the server: FedAvg
        run.log(rnd, loss=np.mean(list(losses.values())), images=sum(images.values()), encoder=model.encoder)
    run.finish(model.encoder)


if __name__ == "__main__":
    main()
