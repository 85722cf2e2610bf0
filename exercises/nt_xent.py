"""Exercise 1: the NT-Xent loss of SimCLR. Statement: exercises/nt_xent.md.
Check your work with:  python -m exercises.check nt_xent
"""
import torch
import torch.nn.functional as F


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, tau: float) -> torch.Tensor:
    """SimCLR's NT-Xent loss (Chen et al. 2020, Eq. 1), averaged over all 2B views.

    z1, z2: B x D projections of two augmented views of the same B images (not normalised);
            row i of z1 and row i of z2 are a positive pair, every other view is a negative.
    tau:    temperature > 0; it divides every cosine similarity.
    Returns a differentiable scalar (0-d) tensor.
    """
    raise NotImplementedError("exercise 1: write the NT-Xent loss in exercises/nt_xent.py")
