"""Exercise 2: the FedAvg server step on whole state dicts, BatchNorm buffers included.
Statement: exercises/fedavg.md.   Check your work with:  python -m exercises.check fedavg
"""
import torch


def fedavg(states: list[dict], weights=None) -> dict:
    """Weighted average of the clients' state dicts (McMahan et al. 2017, Algorithm 1).

    states:  one state dict per client (same keys, shapes and dtypes in each); do not modify them.
    weights: the clients' sample counts n_k (list, tuple or tensor), or None for the plain mean.
    Returns a new dict with every key: floating entries are the weighted mean in their own dtype;
    integer entries (BatchNorm's num_batches_tracked) are the weighted mean rounded to the nearest
    integer, in their own integer dtype.
    """
    raise NotImplementedError("exercise 2: write the FedAvg step in exercises/fedavg.py")
