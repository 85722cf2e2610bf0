"""Exercise 5: MoCo's queue update, a FIFO ring buffer. Statement: exercises/enqueue.md.
Check your work with:  python -m exercises.check enqueue
"""
import torch


def enqueue(queue: torch.Tensor, ptr: int, keys: torch.Tensor) -> int:
    """Write the B rows of `keys` into `queue` IN PLACE at rows ptr, ptr+1, ... (modulo K = len(queue)),
    overwriting the oldest entries; return the new pointer (ptr + B) % K as an int.

    The queue stores detached copies (it must never hold a piece of the autograd graph). If B > K the
    result is as if the keys had been written one at a time: only the last K survive. Works for any
    dtype (feature_fusion.py keeps a queue of int64 labels beside the queue of keys).
    """
    raise NotImplementedError("exercise 5: write the queue update in exercises/enqueue.py")
