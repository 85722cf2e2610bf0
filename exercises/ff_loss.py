"""Exercise 4: the feature-fusion loss of collaborative contrastive learning (Wu et al., IJCAI 2022).
Statement: exercises/ff_loss.md.   Check your work with:  python -m exercises.check ff_loss
"""
import torch
import torch.nn.functional as F


def ff_loss(q: torch.Tensor, k: torch.Tensor, local_queue: torch.Tensor, remote_feats, tau: float) -> torch.Tensor:
    """MoCo's InfoNCE whose negatives are the local queue AND the remote features, averaged over B.

    q:            B x D queries from the online encoder (not normalised); the only input that gets a gradient.
    k:            B x D positive keys from the momentum encoder (normalise them; no gradient).
    local_queue:  K x D past local keys, rows already L2-normalised (K may be 0); read it, never change it.
    remote_feats: M x D features uploaded by the other clients, rows already L2-normalised; M may be 0,
                  or remote_feats may be None (nothing uploaded yet). No gradient, never changed.
    tau:          temperature > 0.
    Returns a differentiable scalar (0-d) tensor.
    """
    raise NotImplementedError("exercise 4: write the feature-fusion loss in exercises/ff_loss.py")
