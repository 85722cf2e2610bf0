"""Exercise 3: the Dirichlet label-skew partition. Statement: exercises/dirichlet_partition.md.
Check your work with:  python -m exercises.check dirichlet_partition
"""
import numpy as np


def dirichlet_partition(labels: np.ndarray, clients: int, alpha: float, min_size: int,
                        rng: np.random.Generator) -> list[np.ndarray]:
    """Split the indices 0..len(labels)-1 among `clients` clients with label skew.

    For every class c, the clients' shares of c are drawn from Dir(alpha, ..., alpha) and the class's
    (shuffled) indices are cut accordingly. The whole draw is repeated until every client holds at
    least min(min_size, len(labels) // clients) images.
    labels: int array of class ids (classes may be absent); do not modify it.
    rng:    the only source of randomness (rng.permutation, rng.dirichlet), so a seed fixes the result.
    Returns a list of `clients` 1-d integer index arrays, disjoint and together covering every index
    (an empty client is an empty integer array).
    """
    raise NotImplementedError("exercise 3: write the Dirichlet partition in exercises/dirichlet_partition.py")
