"""Exercise 6: clustering accuracy with Hungarian matching. Statement: exercises/cluster_acc.md.
Check your work with:  python -m exercises.check cluster_acc
"""
import numpy as np


def cluster_acc(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """ACC = max over one-to-one maps m from clusters to classes of (1/n) sum_i 1[y_true_i = m(y_pred_i)].

    y_true: n class labels, y_pred: n cluster ids (numpy integer arrays; any integers, not
    necessarily 0..K-1; the numbers of classes and clusters may differ; do not modify them).
    A cluster left without a class (or a class without a cluster) counts nothing.
    Returns a Python float in [0, 1].
    """
    raise NotImplementedError("exercise 6: write the Hungarian-matched accuracy in exercises/cluster_acc.py")
