"""Check a student's solution to an exercise against the project's own implementation.

Every exercise has a list of cases: randomised inputs and the edge cases that catch the usual slips.
For each case the checker calls the student's function and the project's (the reference) on the
same inputs and compares what can be observed: the return value, the gradients, and the inputs
after the call (in-place updates, or arguments that must stay untouched). Random partitions cannot
be compared entry by entry, so that exercise checks invariants and statistics instead. An argument the
function changes in place (which the statements forbid, except for enqueue's queue) fails the case.
It prints PASS or FAIL per case with the first mismatch (each message once), and exits 0 only if every
case ran and passed. The command line runs the solution in a child process with a time limit for its
import and for each case, so sys.exit, KeyboardInterrupt or an endless loop in it fails a case (or, at
import, ends with an `error:` line and status 2) instead of ending or hanging the checker.

    python -m exercises.check nt_xent                        # checks exercises/nt_xent.py
    python exercises/check.py nt_xent --solution my_nt_xent.py
    python -m exercises.check nt_xent --solution reference   # the project's own code (self-test)
    python -m exercises.check --list

From Python (this is how tests/test_exercises.py feeds it right and wrong answers), in this process:
    from exercises.check import check
    check("nt_xent", my_function)    # -> True or False, and the same report on stdout
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import importlib.util
import inspect
import json
import operator
import os
import queue
import signal
import subprocess
import sys
import threading
import traceback
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CASE_SECONDS = 20      # a case that runs longer than this is most likely an endless loop


class Wrong(Exception):
    """The student's output has the wrong kind (type, shape, no gradient): the message says what."""


class CaseTimeout(BaseException):
    """Raised by the alarm; a BaseException so that a student's `except Exception` cannot swallow it."""


# ----------------------------------------------------------------------------------------------
# Comparing observations: the first mismatch, said in words
# ----------------------------------------------------------------------------------------------

def first_mismatch(got, want, where: str = "result", rtol: float = 1e-4, atol: float = 1e-6) -> str | None:
    """None if `got` matches `want`, else one line naming the first place where they differ."""
    if isinstance(want, Mapping):
        if not isinstance(got, Mapping):
            return f"{where}: expected a dict, got {type(got).__name__}"
        missing, extra = [k for k in want if k not in got], [k for k in got if k not in want]
        if missing or extra:
            return f"{where}: keys differ (missing {missing[:3]}, unexpected {extra[:3]})"
        for k in want:
            sub = f"{where}[{k!r}]" if where != "" else str(k)
            m = first_mismatch(got[k], want[k], sub, rtol, atol)
            if m:
                return m
        return None
    if isinstance(want, (list, tuple)):
        if not isinstance(got, (list, tuple)):
            return f"{where}: expected a list, got {type(got).__name__}"
        if len(got) != len(want):
            return f"{where}: {len(got)} items, expected {len(want)} ({_short(got)} vs {_short(want)})"
        for i, (g, w) in enumerate(zip(got, want)):
            m = first_mismatch(g, w, f"{where}[{i}]", rtol, atol)
            if m:
                return m
        return None
    if isinstance(want, (torch.Tensor, np.ndarray)):
        if not isinstance(got, type(want)):
            return f"{where}: expected a {type(want).__module__.split('.')[0]} {type(want).__name__}, got {type(got).__name__}"
        g, w = torch.as_tensor(got).detach().cpu(), torch.as_tensor(want).detach().cpu()
        if g.shape != w.shape:
            return f"{where}: shape {tuple(g.shape)}, expected {tuple(w.shape)}"
        if g.dtype != w.dtype:
            return f"{where}: dtype {g.dtype}, expected {w.dtype}"
        bad = ~torch.isclose(g, w, rtol, atol, equal_nan=True) if w.is_floating_point() else g != w
        if bad.any():
            idx = tuple(bad.nonzero()[0].tolist())
            at = f" at index {idx}" if idx else ""
            count = f" ({int(bad.sum())} of {bad.numel()} entries differ)" if bad.numel() > 1 else ""
            return f"{where}{at}: got {_num(g[idx])}, expected {_num(w[idx])}{count}"
        return None
    if isinstance(want, bool) or want is None:
        return None if got is want or got == want else f"{where}: got {got!r}, expected {want!r}"
    if isinstance(want, float):
        try:
            g = float(got)
        except (TypeError, ValueError):
            return f"{where}: expected a number, got {type(got).__name__}"
        ok = abs(g - want) <= atol + rtol * abs(want) or (g != g and want != want)
        return None if ok else f"{where}: got {g:.6g}, expected {want:.6g}"
    return None if got == want else f"{where}: got {got!r}, expected {want!r}"


def _num(t: torch.Tensor) -> str:
    v = t.item()
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def _short(seq, n=8) -> str:
    seq = list(seq)
    return str(seq[:n])[:-1] + (", ...]" if len(seq) > n else "]")


def grad_of(t: torch.Tensor) -> torch.Tensor:
    """The gradient an input received; none at all counts as zeros."""
    return t.grad.detach().clone() if t.grad is not None else torch.zeros_like(t)


def scalar_loss(loss) -> torch.Tensor:
    if not isinstance(loss, torch.Tensor):
        raise Wrong(f"the loss must be a torch tensor, got {type(loss).__name__}")
    if loss.dim() != 0:
        raise Wrong(f"the loss must be a scalar (0-d tensor), got shape {tuple(loss.shape)}: average it")
    if not loss.requires_grad:
        raise Wrong("the loss carries no gradient (no grad_fn): compute it from the inputs with torch "
                    "operations, without .detach(), .item() or numpy")
    return loss


def same(observe: Callable, *inputs, rtol=1e-4, atol=1e-6) -> Callable:
    """A case: observe(reference, inputs) and observe(student, inputs) on fresh copies must match."""
    def test(student, reference):
        want = observe(reference, *copy.deepcopy(inputs))   # the reference runs first: its errors are ours
        got = observe(student, *copy.deepcopy(inputs))
        return first_mismatch(got, want, "", rtol, atol)
    return test


# ----------------------------------------------------------------------------------------------
# Exercise 1: NT-Xent (SimCLR)  -- reference common.nt_xent
# ----------------------------------------------------------------------------------------------

def nt_xent_cases():
    def observe(fn, z1, z2, tau):
        z1.requires_grad_()
        z2.requires_grad_()
        loss = scalar_loss(fn(z1, z2, tau))
        loss.backward()
        return {"loss": loss.detach(), "gradient w.r.t. z1": grad_of(z1), "gradient w.r.t. z2": grad_of(z2)}

    g = torch.Generator().manual_seed(1)
    z = lambda b, d, scale=1.0: torch.randn(b, d, generator=g) * scale
    a = z(8, 16)
    return [
        ("B=8, D=16, tau=0.5", same(observe, z(8, 16), z(8, 16), 0.5)),
        ("B=32, D=128, tau=0.1", same(observe, z(32, 128), z(32, 128), 0.1)),
        ("B=2, D=3, tau=2.0", same(observe, z(2, 3), z(2, 3), 2.0)),
        ("B=1: the only other view is the positive, so the loss is 0", same(observe, z(1, 8), z(1, 8), 0.5)),
        ("inputs of very different norms (similarities are cosines)", same(observe, z(6, 10, 0.01), z(6, 10, 100.0), 0.3)),
        ("identical views (z2 = z1)", same(observe, a, a.clone(), 0.5)),
        ("B=64, D=32, tau=0.07", same(observe, z(64, 32), z(64, 32), 0.07)),
    ]


# ----------------------------------------------------------------------------------------------
# Exercise 2: FedAvg of whole state dicts, BatchNorm buffers included  -- reference common.fedavg
# ----------------------------------------------------------------------------------------------

def _client_states(n, seed, nbt=None, extra=False):
    """n state dicts of a small conv + BatchNorm network, every entry random (counters: integers)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                        nn.Linear(16, 3), nn.BatchNorm1d(3))
    g = torch.Generator().manual_seed(seed)
    states = []
    for i in range(n):
        s = {}
        for k, v in net.state_dict().items():
            if k.endswith("num_batches_tracked"):
                s[k] = torch.tensor(nbt[i] if nbt else int(torch.randint(0, 500, (), generator=g)))
            elif k.endswith("running_var"):
                s[k] = torch.rand(v.shape, generator=g) + 0.5
            else:
                s[k] = torch.randn(v.shape, generator=g)
        if extra:      # other dtypes a state dict may hold; each must come back in its own dtype
            s["scale64"] = torch.randn(2, generator=g, dtype=torch.float64)
            s["steps32"] = torch.randint(0, 100, (3,), generator=g, dtype=torch.int32)
        states.append(s)
    return states


def fedavg_cases():
    def observe(fn, states, weights):
        result = fn(states, weights)
        return {"result": result, "the clients' states after the call (must be unchanged)": states}

    return [
        ("3 clients, weights = sample counts [120, 30, 50] (a list)", same(observe, _client_states(3, 1), [120, 30, 50])),
        ("4 clients, weights = run.sizes (a float64 tensor)",
         same(observe, _client_states(4, 2), torch.tensor([10.0, 300.0, 55.0, 7.0], dtype=torch.float64))),
        ("weights=None: the plain mean", same(observe, _client_states(3, 3), None)),
        ("one client: the average is its own state", same(observe, _client_states(1, 4), [42])),
        ("a client with no images (weight 0) has no say", same(observe, _client_states(3, 5), [50, 0, 25])),
        ("num_batches_tracked 10, 11 and 17, equal weights: the mean 12.67 is rounded to 13, still int64",
         same(observe, _client_states(3, 6, nbt=[10, 11, 17]), [1, 1, 1])),
        ("num_batches_tracked 3 and 100, weights 9 and 1: 12.7 -> 13", same(observe, _client_states(2, 7, nbt=[3, 100]), [9, 1])),
        ("a float64 entry and an int32 counter keep their dtypes", same(observe, _client_states(3, 8, extra=True), [1, 2, 3])),
        ("20 clients, random weights",
         same(observe, _client_states(20, 9), torch.randint(1, 1000, (20,), generator=torch.Generator().manual_seed(9)).tolist())),
    ]


# ----------------------------------------------------------------------------------------------
# Exercise 3: Dirichlet label-skew partition  -- reference common.dirichlet_partition
# ----------------------------------------------------------------------------------------------

def _partition_problem(parts, labels, clients, min_size) -> str | None:
    """Why `parts` is not a valid partition of range(len(labels)) into `clients` sets, or None."""
    n = len(labels)
    if not isinstance(parts, (list, tuple)):
        return f"expected a list of {clients} index arrays, got {type(parts).__name__}"
    if len(parts) != clients:
        return f"{len(parts)} clients returned, expected {clients} (empty clients are still clients)"
    arrays = []
    for i, p in enumerate(parts):
        a = np.asarray(p)
        if a.ndim != 1 or a.dtype.kind not in "iu":
            return f"client {i}: expected a 1-d integer array of indices, got dtype {a.dtype} and shape {a.shape}"
        arrays.append(a)
    flat = np.concatenate(arrays) if arrays else np.zeros(0, np.int64)
    if len(flat) and (flat.min() < 0 or flat.max() >= n):
        return f"index {flat.min() if flat.min() < 0 else flat.max()} is not a position in labels (0..{n - 1})"
    if len(np.unique(flat)) != len(flat):
        vals, cnt = np.unique(flat, return_counts=True)
        return f"not disjoint: image {vals[cnt > 1][0]} is given to {cnt.max()} clients"
    if len(flat) != n:
        missing = np.setdiff1d(np.arange(n), flat)
        return f"not covering: {len(missing)} of {n} images belong to no client (first: {missing[0]})"
    need = min(min_size, n // clients)
    sizes = [len(a) for a in arrays]
    if min(sizes) < need:
        return f"client {int(np.argmin(sizes))} holds {min(sizes)} images, fewer than min(min_size, n // clients) = {need}"
    return None


def _valid_partitions(labels, clients, alpha, min_size, seeds):
    """A case: for every seed the student's partition satisfies the invariants."""
    def test(student, reference):
        for s in seeds:
            reference(labels.copy(), clients, alpha, min_size, np.random.default_rng(s))   # the case is feasible
            lab = labels.copy()
            parts = student(lab, clients, alpha, min_size, np.random.default_rng(s))
            problem = _partition_problem(parts, labels, clients, min_size)
            if problem is None and not np.array_equal(lab, labels):
                problem = "labels were modified"
            if problem:
                return f"seed {s}: {problem}"
        return None
    return test


def _reproducible(student, reference):
    labels = np.repeat(np.arange(5), 40)
    run = lambda s: [np.asarray(p) for p in student(labels, 6, 0.5, 5, np.random.default_rng(s))]
    a, b, c = run(0), run(0), run(1)
    if any(not np.array_equal(x, y) for x, y in zip(a, b)):
        return "two calls with np.random.default_rng(0) gave different partitions: draw every random number from rng"
    if all(np.array_equal(x, y) for x, y in zip(a, c)):
        return "seeds 0 and 1 gave the same partition: draw the random numbers from the rng argument"
    return None


def _stat(fn, labels, clients, alpha, seeds):
    """Mean over seeds of (share of a client's largest class, averaged over non-empty clients;
    coefficient of variation of the client sizes)."""
    out = []
    for s in seeds:
        parts = [np.asarray(p, dtype=np.int64) for p in fn(labels, clients, alpha, 0, np.random.default_rng(s))]
        sizes = np.array([len(p) for p in parts])
        counts = np.stack([np.bincount(labels[p], minlength=labels.max() + 1) for p in parts])
        top = counts.max(1)[sizes > 0] / sizes[sizes > 0]
        out.append((top.mean(), sizes.std() / sizes.mean()))
    return np.mean(out, axis=0)


def _statistics(which: int, tol: float):
    """A case: label skew (which=0) or size spread (which=1) over 20 seeds close to the reference's,
    for alpha 0.1, 1 and 100. Between two correct versions that use the rng in different orders the
    20-seed difference had a standard deviation of at most 0.010 (skew) and 0.035 (size spread,
    alpha 0.1) over 30 blocks of seeds; the tolerances are 8 and 5 of those."""
    def test(student, reference):
        labels, seeds = np.repeat(np.arange(10), 100), range(100, 120)
        lines = []
        for alpha in (0.1, 1.0, 100.0):
            got = _stat(student, labels, 10, alpha, seeds)[which]
            want = _stat(reference, labels, 10, alpha, seeds)[which]
            if abs(got - want) > tol:
                lines.append(f"alpha {alpha}: {got:.3f}, expected {want:.3f} +- {tol}")
        return "; ".join(lines) or None
    return test


def dirichlet_cases():
    ten = np.repeat(np.arange(10), 100)
    rng = np.random.default_rng(3)
    return [
        ("1000 images, 10 classes, 10 clients, alpha 0.5, min_size 10 (5 seeds): disjoint, covering, min size",
         _valid_partitions(ten, 10, 0.5, 10, range(5))),
        ("alpha 0.1, min_size 10 (first draws often leave a client too small: redraw) (10 seeds)",
         _valid_partitions(ten, 10, 0.1, 10, range(10))),
        ("unbalanced, shuffled labels, 7 clients, alpha 1.0, min_size 20 (5 seeds)",
         _valid_partitions(rng.permutation(np.repeat(np.arange(4), [300, 30, 150, 20])), 7, 1.0, 20, range(5))),
        ("min_size 0, alpha 0.01, 20 clients, 100 images: zero-size clients are returned as empty arrays",
         _valid_partitions(np.repeat(np.arange(10), 10), 20, 0.01, 0, range(5))),
        ("labels with absent classes (only 0, 1 and 5 occur)",
         _valid_partitions(np.repeat(np.array([0, 1, 5]), 50), 5, 0.5, 5, range(5))),
        ("a single class: every client gets a share of the same class",
         _valid_partitions(np.zeros(200, dtype=np.int64), 4, 1.0, 5, range(5))),
        ("min_size 50 with 105 images and 10 clients: capped at n // clients = 10 (alpha 100)",
         _valid_partitions(np.zeros(105, dtype=np.int64), 10, 100.0, 50, range(3))),
        ("same seed -> same partition; another seed -> another partition", _reproducible),
        ("label skew follows alpha: mean share of a client's largest class (20 seeds; alpha 0.1, 1, 100)",
         _statistics(0, 0.08)),
        ("client sizes vary as per-class Dirichlet shares imply: size std / mean (20 seeds)", _statistics(1, 0.18)),
    ]


# ----------------------------------------------------------------------------------------------
# Exercise 4: feature-fusion loss with remote negatives  -- reference feature_fusion.ff_loss
# ----------------------------------------------------------------------------------------------

def ff_loss_cases():
    def observe(fn, q, k, local_queue, remote_feats, tau):
        inputs = {"q": q, "k": k, "local_queue": local_queue, "remote_feats": remote_feats}
        for t in inputs.values():
            if t is not None:
                t.requires_grad_()
        loss = scalar_loss(fn(q, k, local_queue, remote_feats, tau))
        loss.backward()
        obs = {"loss": loss.detach(), "gradient w.r.t. q": grad_of(q),
               "gradient w.r.t. k (none: the key is a target)": grad_of(k),
               "gradient w.r.t. local_queue (none)": grad_of(local_queue)}
        if remote_feats is not None:
            obs["gradient w.r.t. remote_feats (none: the remote bank is fixed)"] = grad_of(remote_feats)
        for name, t in inputs.items():
            if t is not None:
                obs[f"{name} after the call (must be unchanged)"] = t.detach()
        return obs

    g = torch.Generator().manual_seed(4)
    x = lambda n, d, scale=1.0: torch.randn(n, d, generator=g) * scale
    unit = lambda n, d: torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)
    return [
        ("B=8, D=16, |Q_l|=32, |Q_r|=24, tau=0.1", same(observe, x(8, 16), x(8, 16), unit(32, 16), unit(24, 16), 0.1)),
        ("B=16, D=32, |Q_l|=64, |Q_r|=128, tau=0.5", same(observe, x(16, 32), x(16, 32), unit(64, 32), unit(128, 32), 0.5)),
        ("B=1", same(observe, x(1, 8), x(1, 8), unit(16, 8), unit(16, 8), 0.2)),
        ("empty remote bank (0 x D): plain MoCo InfoNCE", same(observe, x(8, 16), x(8, 16), unit(32, 16), unit(0, 16), 0.1)),
        ("remote_feats=None (round 1: nothing uploaded yet)", same(observe, x(8, 16), x(8, 16), unit(32, 16), None, 0.1)),
        ("empty local queue (0 x D): only remote negatives", same(observe, x(8, 16), x(8, 16), unit(0, 16), unit(20, 16), 0.1)),
        ("q and k of very different norms (similarities are cosines)",
         same(observe, x(8, 16, 0.01), x(8, 16, 50.0), unit(32, 16), unit(24, 16), 0.1)),
        ("B=64, D=128, |Q_l|=256, |Q_r|=512, tau=0.07",
         same(observe, x(64, 128), x(64, 128), unit(256, 128), unit(512, 128), 0.07)),
    ]


# ----------------------------------------------------------------------------------------------
# Exercise 5: MoCo's queue update (FIFO ring buffer)  -- reference feature_fusion.enqueue
# ----------------------------------------------------------------------------------------------

class OneWritePerRow(torch.overrides.TorchFunctionMode):
    """Refuses an indexed write that names a row twice. With repeated indices, `x[rows] = v` (index_put_)
    and index_copy_ leave undefined which value lands in the row (PyTorch's documentation): the last one
    wins on the CPU today, so a wrong solution would pass by luck, but need not on a GPU."""

    WRITES = {torch.Tensor.__setitem__, torch.Tensor.index_put_, torch.Tensor.index_put, torch.index_put,
              torch.Tensor.index_copy_, torch.Tensor.index_copy, torch.index_copy}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.WRITES:
            rows = self.rows(func, args, kwargs)
            if rows is not None and len(set(rows)) < len(rows):
                twice = sorted({r for r in rows if rows.count(r) > 1})
                raise Wrong(f"one indexed write names row(s) {twice[:4]} more than once (e.g. queue[rows] = keys "
                            f"with B > K): for repeated indices PyTorch leaves undefined which value lands there "
                            f"(the last one need not win, e.g. on a GPU); write each row once: the last K keys")
        return func(*args, **kwargs)

    @staticmethod
    def rows(func, args, kwargs) -> list | None:
        """The (tuples of) indices a write names, negative ones wrapped; None for writes without index tensors."""
        target = args[0]
        if func is torch.Tensor.__setitem__:
            index = args[1] if isinstance(args[1], tuple) else (args[1],)
            accumulate = False
        elif func in (torch.Tensor.index_copy_, torch.Tensor.index_copy, torch.index_copy):
            dim, index = args[1] if len(args) > 1 else kwargs["dim"], args[2] if len(args) > 2 else kwargs["index"]
            index, accumulate = (slice(None),) * (dim % max(target.dim(), 1)) + (index,), False
        else:
            index = tuple(args[1] if len(args) > 1 else kwargs["indices"])
            accumulate = (args[3] if len(args) > 3 else kwargs.get("accumulate", False))
        if accumulate:                                  # index_put_(..., accumulate=True) adds: repeats are defined
            return None
        picks = [(d, torch.as_tensor(i)) for d, i in enumerate(index) if isinstance(i, (torch.Tensor, list))]
        picks = [(d, i) for d, i in picks if i.dtype not in (torch.bool, torch.uint8)]     # masks cannot repeat
        if not picks:
            return None
        wrapped = [(i % target.shape[d]).reshape(-1) if d < target.dim() and target.shape[d] else i.reshape(-1)
                   for d, i in picks]
        rows = list(zip(*[w.tolist() for w in torch.broadcast_tensors(*wrapped)]))
        return [r[0] if len(r) == 1 else r for r in rows]


def enqueue_cases():
    def observe(fn, queue, ptr, batches):
        ptrs = []
        for keys in batches:
            if keys.is_floating_point():
                keys.requires_grad_()          # keys straight from an encoder: the queue must not keep the graph
            with OneWritePerRow():             # repeated indices in one write: undefined, not "the last one wins"
                new = fn(queue, ptr, keys)
            try:
                ptr = operator.index(new)
            except TypeError:
                raise Wrong(f"enqueue must return the new pointer as an int, got {type(new).__name__}") from None
            ptrs.append(ptr)
        return {"queue after the calls": queue.detach(), "returned pointers": ptrs,
                "queue.requires_grad (store detached keys)": queue.requires_grad}

    g = torch.Generator().manual_seed(5)
    q = lambda k, d=4: torch.randn(k, d, generator=g)
    keys = lambda *bs: [torch.randn(b, 4, generator=g) for b in bs]
    return [
        ("K=8, ptr=0, one batch of 3 (no wrap)", same(observe, q(8), 0, keys(3))),
        ("K=8, ptr=5, 3 keys fill the queue to its end: ptr -> 0", same(observe, q(8), 5, keys(3))),
        ("K=8, ptr=6, 4 keys wrap around: rows 6, 7, 0, 1", same(observe, q(8), 6, keys(4))),
        ("K=8, ptr=3, B=K: every row replaced, ptr unchanged", same(observe, q(8), 3, keys(8))),
        ("K=4, ptr=1, B=6 > K: only the last 4 keys survive, as if written one at a time",
         same(observe, q(4), 1, keys(6))),
        ("K=8, seven batches of 3 (K not a multiple of B)", same(observe, q(8), 0, keys(3, 3, 3, 3, 3, 3, 3))),
        ("K=10, batches of 4, 1, 7, 2, 10", same(observe, q(10, 6), 2, [torch.randn(b, 6, generator=g) for b in (4, 1, 7, 2, 10)])),
        ("a queue of int64 labels (feature_fusion.py keeps one beside the keys)",
         same(observe, torch.full((6,), -1), 4, [torch.arange(3), torch.arange(10, 14)])),
        ("an empty batch changes nothing", same(observe, q(5), 2, keys(0))),
    ]


# ----------------------------------------------------------------------------------------------
# Exercise 6: clustering accuracy with Hungarian matching  -- reference common.cluster_acc
# ----------------------------------------------------------------------------------------------

def _labels_from_counts(counts) -> tuple[np.ndarray, np.ndarray]:
    """y_true, y_pred realising a contingency table: counts[i][j] samples of class i in cluster j."""
    pairs = [(i, j) for i, row in enumerate(counts) for j, c in enumerate(row) for _ in range(c)]
    order = np.random.default_rng(0).permutation(len(pairs))
    return np.array([pairs[o][0] for o in order]), np.array([pairs[o][1] for o in order])


def cluster_acc_cases():
    def observe(fn, y_true, y_pred):
        acc = fn(y_true, y_pred)
        try:
            acc = float(acc)
        except (TypeError, ValueError):
            raise Wrong(f"cluster_acc must return a number, got {type(acc).__name__}") from None
        return {"accuracy": acc, "y_true after the call (must be unchanged)": y_true,
                "y_pred after the call (must be unchanged)": y_pred}

    rng = np.random.default_rng(6)

    def noisy(n, classes, clusters, keep):
        """A clustering that follows the classes for a share `keep` of the samples, under renamed clusters."""
        y = rng.integers(0, classes, n)
        pred = np.where(rng.random(n) < keep, rng.permutation(max(classes, clusters))[y] % clusters,
                        rng.integers(0, clusters, n))
        return y, pred

    y = rng.integers(0, 10, 500)
    exact = lambda *a: same(observe, *a, rtol=0.0, atol=1e-12)
    return [
        ("a perfect clustering under other cluster names: ACC = 1", exact(y, rng.permutation(10)[y])),
        ("greedy matching loses: table [[5, 4], [4, 0]] -> best is 8/13, greedy gets 5/13",
         exact(*_labels_from_counts([[5, 4], [4, 0]]))),
        ("a one-to-one map: two clusters may not both take their shared majority class",
         exact(*_labels_from_counts([[6, 5, 0], [0, 4, 1], [1, 0, 3]]))),
        ("greedy trap inside a 4 x 4 table", exact(*_labels_from_counts([[9, 8, 0, 0], [8, 0, 7, 0], [0, 7, 0, 6], [0, 0, 6, 1]]))),
        ("10 classes, 10 clusters, 1000 samples, 60% right", exact(*noisy(1000, 10, 10, 0.6))),
        ("more clusters (15) than classes (10): extra clusters match nothing", exact(*noisy(800, 10, 15, 0.7))),
        ("fewer clusters (3) than classes (10)", exact(*noisy(600, 10, 3, 0.8))),
        ("everything in one cluster: ACC = share of the largest class", exact(y, np.zeros_like(y))),
        ("one sample", exact(np.array([4]), np.array([7]))),
        ("labels that are not 0..K-1 (classes 3, 7, 42; clusters -1, 5, 1000)",
         exact(np.array([3, 3, 7, 42, 42, 42, 7, 3]), np.array([5, 5, -1, 1000, 1000, 5, -1, -1]))),
        ("100 classes x 20 samples, 100 clusters, 50% right (Hungarian, not a search over permutations)",
         exact(*noisy(2000, 100, 100, 0.5))),
    ]


# ----------------------------------------------------------------------------------------------
# The exercises
# ----------------------------------------------------------------------------------------------

@dataclass
class Exercise:
    number: int
    name: str          # also the stub file exercises/<name>.py and the function's name in it
    reference: str     # module.function of the project's own implementation
    title: str
    cases: Callable
    may_change: tuple = ()     # arguments the function is meant to update in place (enqueue's queue)

    def reference_fn(self):
        module, fn = self.reference.rsplit(".", 1)
        return getattr(importlib.import_module(module), fn)


EXERCISES = {e.name: e for e in [
    Exercise(1, "nt_xent", "common.nt_xent", "NT-Xent loss (SimCLR)", nt_xent_cases),
    Exercise(2, "fedavg", "common.fedavg", "FedAvg with BatchNorm buffers", fedavg_cases),
    Exercise(3, "dirichlet_partition", "common.dirichlet_partition", "Dirichlet label-skew partition", dirichlet_cases),
    Exercise(4, "ff_loss", "feature_fusion.ff_loss", "feature-fusion loss with remote negatives", ff_loss_cases),
    Exercise(5, "enqueue", "feature_fusion.enqueue", "MoCo queue update (FIFO ring buffer)", enqueue_cases,
             may_change=("queue",)),
    Exercise(6, "cluster_acc", "common.cluster_acc", "clustering accuracy with Hungarian matching", cluster_acc_cases),
]}


# ----------------------------------------------------------------------------------------------
# Inputs changed in place: every call of the student's function compares its arguments before and after
# ----------------------------------------------------------------------------------------------

def _snapshot(x):
    """A copy of x that in-place updates of x cannot reach (tensors detached and cloned, arrays copied,
    through dicts, lists and tuples); other values (numbers, None, an rng) are kept as they are."""
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if isinstance(x, np.ndarray):
        return x.copy()
    if isinstance(x, Mapping):
        return {k: _snapshot(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)([_snapshot(v) for v in x]) if type(x) in (list, tuple) else [_snapshot(v) for v in x]
    return x


def _changed(before, after, where: str) -> str | None:
    """Where (e.g. states[0]['bn.running_mean']) `after` no longer equals its snapshot `before`, or None."""
    if isinstance(before, Mapping):
        if not isinstance(after, Mapping) or list(after) != list(before):
            return where
        return next((c for k in before if (c := _changed(before[k], after[k], f"{where}[{k!r}]"))), None)
    if isinstance(before, (list, tuple)):
        if not isinstance(after, (list, tuple)) or len(after) != len(before):
            return where
        return next((c for i, (b, a) in enumerate(zip(before, after)) if (c := _changed(b, a, f"{where}[{i}]"))), None)
    if isinstance(before, (torch.Tensor, np.ndarray)):
        a = after.detach() if isinstance(after, torch.Tensor) else after
        same = (type(a) is type(before) and a.shape == before.shape and a.dtype == before.dtype
                and bool(((a == before) | ((a != a) & (before != before))).all()))
        return None if same else where
    return None


def guarded(fn: Callable, ex: Exercise) -> Callable:
    """`fn`, watched: an argument it changes in place (other than ex.may_change) fails the case with one
    line naming the function and the argument, also when autograd refuses the in-place update first."""
    try:
        sig = inspect.signature(ex.reference_fn())
    except (TypeError, ValueError):
        return fn

    def watched(*args, **kwargs):
        try:
            bound = sig.bind(*args, **kwargs)
        except TypeError:
            return fn(*args, **kwargs)
        before = {k: _snapshot(v) for k, v in bound.arguments.items() if k not in ex.may_change}
        try:
            result = fn(*args, **kwargs)
        except RuntimeError as e:      # "a leaf Variable that requires grad is being used in an in-place operation"
            if "in-place" not in str(e) and "inplace" not in str(e):
                raise
            again = sig.bind(*args, **kwargs)      # run it once more on copies without gradients to see which
            again.arguments.update({k: _snapshot(v) for k, v in again.arguments.items()})
            with contextlib.suppress(Exception):
                fn(*again.args, **again.kwargs)
            place = next((c for k, b in before.items() if (c := _changed(b, again.arguments[k], k))), None)
            if place is None:
                raise
            raise Wrong(_in_place(ex.name, place, _where_raised(e))) from None
        place = next((c for k, b in before.items() if (c := _changed(b, bound.arguments[k], k))), None)
        if place is not None:
            raise Wrong(_in_place(ex.name, place, ""))
        return result
    return watched


def _in_place(name: str, place: str, where: str) -> str:
    arg = place.split("[")[0]
    return (f"{name} changed its argument {arg} in place{where}" + (f" ({place})" if place != arg else "") +
            f": {arg} after the call must be unchanged; compute new tensors instead of writing into the inputs "
            "(x = x / n, not x /= n or x.div_(n))")


# ----------------------------------------------------------------------------------------------
# Running the cases: one line per case, each message said once
# ----------------------------------------------------------------------------------------------

@contextmanager
def time_limit(seconds: float | None):
    """Stop a case after `seconds` (POSIX main thread only; elsewhere, or with None, no limit). Code that
    catches BaseException can swallow it: the command line's child process has a hard limit instead."""
    if not seconds or not hasattr(signal, "SIGALRM") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_alarm(signum, frame):
        raise CaseTimeout()
    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _where_raised(e: BaseException) -> str:
    """file:line of the innermost frame outside this checker, Python and its libraries (the student's line)."""
    outside = (str(Path(sys.prefix).resolve()), str(Path(sys.base_prefix).resolve()))
    frames = [f for f in traceback.extract_tb(e.__traceback__) if Path(f.filename).resolve() != Path(__file__).resolve()
              and not str(Path(f.filename).resolve()).startswith(outside) and not f.filename.startswith("<")]
    return f" (at {Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""


def run_case(test: Callable, fn: Callable, reference: Callable, seconds: float | None,
             catch_interrupt: bool = False) -> str | None:
    """One case: None if it passed, else one line saying why. Whatever the solution raises fails the case,
    sys.exit included; KeyboardInterrupt too where it cannot be the user's Ctrl-C (catch_interrupt)."""
    try:
        with time_limit(seconds):
            return test(fn, reference)
    except NotImplementedError as e:
        return f"not implemented yet (NotImplementedError: {e})"
    except Wrong as e:
        return str(e)
    except CaseTimeout:
        return f"still running after {seconds:g} s (an endless loop?)"
    except SystemExit as e:
        return f"called sys.exit({e.code!r}){_where_raised(e)}: a function returns its result, it does not end the program"
    except KeyboardInterrupt as e:
        if not catch_interrupt:
            raise
        return f"raised KeyboardInterrupt{_where_raised(e)}"
    except BaseException as e:       # noqa: BLE001 -- anything else the solution raises is its failure
        return f"raised {type(e).__name__}: {e}{_where_raised(e)}"


class Report:
    """The PASS/FAIL lines; a message already given for an earlier case is not repeated."""

    def __init__(self, name: str, cases: int, out=print):
        self.name, self.cases, self.out, self.passed, self.done, self.first = name, cases, out, 0, 0, {}

    def case(self, desc: str, msg: str | None):
        self.done += 1
        self.passed += msg is None
        if msg is None:
            self.out(f"  PASS  {desc}")
        elif msg in self.first:
            self.out(f"  FAIL  {desc}\n        the same problem as in \"{self.first[msg]}\"")
        else:
            self.first[msg] = desc
            self.out(f"  FAIL  {desc}\n        {msg}")

    def end(self) -> bool:
        """True only if every case ran and passed."""
        ok = self.passed == self.done == self.cases > 0
        self.out(f"{self.name}: {self.passed}/{self.cases} cases passed -- {'all good' if ok else 'not yet'}")
        return ok


def check(name: str, fn: Callable, out=print) -> bool:
    """Run every case of exercise `name` on `fn` in this process; print one PASS/FAIL line per case; True if
    all pass. Here a case is stopped after CASE_SECONDS by an alarm only; the command line runs the
    solution in a child process with hard time limits instead (check_file)."""
    ex = EXERCISES[name]
    reference, cases = ex.reference_fn(), ex.cases()
    fn, report = guarded(fn, ex), Report(name, len(cases), out)
    for desc, test in cases:
        report.case(desc, run_case(test, fn, reference, CASE_SECONDS))
    return report.end()


class CannotCheck(Exception):
    """The solution cannot be checked at all (missing, does not import, no such function): exit status 2."""


def load_solution(ex: Exercise, path: str | None) -> tuple[Callable, str]:
    """The function to check: exercises/<name>.py by default, a file given with --solution, or
    'reference' for the project's own implementation."""
    if path == "reference":
        return ex.reference_fn(), ex.reference
    file = Path(path) if path else HERE / f"{ex.name}.py"
    if not file.is_file():
        raise CannotCheck(f"solution file {file} not found")
    spec = importlib.util.spec_from_file_location(f"solution_{ex.name}", file)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except SystemExit as e:
        raise CannotCheck(f"could not import {file}: it calls sys.exit({e.code!r}) while being imported"
                          f"{_where_raised(e)}; keep only definitions at the top level of the file") from None
    except BaseException as e:       # noqa: BLE001 -- KeyboardInterrupt included (the child ignores Ctrl-C)
        where = f" (at {file.name}:{e.lineno})" if isinstance(e, SyntaxError) else _where_raised(e)
        raise CannotCheck(f"could not import {file}: {type(e).__name__}: {e}{where}") from None
    if not callable(getattr(module, ex.name, None)):
        raise CannotCheck(f"{file} defines no function named {ex.name}")
    return getattr(module, ex.name), f"{file}:{ex.name}"


# ----------------------------------------------------------------------------------------------
# The command line: the solution runs in a child process, with a time limit for its import and each case
# ----------------------------------------------------------------------------------------------

STARTUP_SECONDS = 300    # the child's own imports (torch, the reference): slow on a busy machine, never the student's


def _child(name: str, solution: str, start: str):
    """In the child process: import the solution, run cases start, start + 1, ... and send one JSON line
    per event to the parent on what was stdout (the solution's own prints go to stderr)."""
    channel = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    signal.signal(signal.SIGINT, signal.SIG_IGN)     # Ctrl-C is the parent's; a KeyboardInterrupt here is the solution's
    send = lambda *msg: channel.write(json.dumps(msg) + "\n")
    ex = EXERCISES[name]
    reference, cases = ex.reference_fn(), ex.cases()
    send("ready")
    try:
        fn, _ = load_solution(ex, solution or None)
    except CannotCheck as e:
        send("imported", str(e))
        os._exit(0)
    send("imported", None)
    fn = guarded(fn, ex)
    for i in range(int(start), len(cases)):
        send("case", i, run_case(cases[i][1], fn, reference, None, catch_interrupt=True))
    channel.flush()
    sys.stderr.flush()
    os._exit(0)        # skips the solution's atexit handlers and a teardown that could hang


class _Child:
    """A child process running cases from `start` on; get() waits for its next message."""

    def __init__(self, name: str, solution: str | None, start: int):
        code = "import sys; sys.path.insert(0, sys.argv[1]); from exercises.check import _child; _child(*sys.argv[2:])"
        self.proc = subprocess.Popen([sys.executable, "-c", code, str(ROOT), name, solution or "", str(start)],
                                     stdout=subprocess.PIPE, text=True)
        self.messages = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.messages.put(json.loads(line))
        self.messages.put(None)

    def get(self, seconds: float):
        """The next message, or "timeout", or "ended" (then self.status is the exit status)."""
        try:
            msg = self.messages.get(timeout=seconds)
        except queue.Empty:
            return "timeout"
        if msg is None:
            self.status = self.proc.wait()
            return "ended"
        return msg

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def check_file(ex: Exercise, solution: str | None, seconds: float, out=print) -> bool:
    """Check a solution file (or 'reference') in a child process: `seconds` for its import and for each
    case. A case that hangs or ends the process fails, and a fresh child runs the cases after it."""
    descs = [desc for desc, _ in ex.cases()]
    report, i = Report(ex.name, len(descs), out), 0
    while i < len(descs):
        child = _Child(ex.name, solution, i)
        try:
            if child.get(STARTUP_SECONDS) != ["ready"]:
                raise CannotCheck("the checker's child process did not start (see the lines above)")
            msg = child.get(seconds)
            if msg == "timeout":
                raise CannotCheck(f"could not import {solution or ex.name + '.py'}: still running after {seconds:g} s "
                                  "(an endless loop at import time?)")
            if msg == "ended":
                raise CannotCheck(f"could not import {solution or ex.name + '.py'}: importing it ended the process "
                                  f"(exit status {child.status})")
            if msg[1] is not None:
                raise CannotCheck(msg[1])
            while i < len(descs):
                msg = child.get(seconds)
                if msg == "timeout":
                    report.case(descs[i], f"still running after {seconds:g} s (an endless loop?)")
                elif msg == "ended":
                    report.case(descs[i], f"ended the checker's process (exit status {child.status}; os._exit?)")
                else:
                    report.case(descs[msg[1]], msg[2])
                i += 1
                if msg in ("timeout", "ended"):
                    break          # this child is gone or stuck: the next one starts at the next case
        finally:
            child.stop()
    return report.end()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m exercises.check", description=__doc__.split("\n")[0])
    p.add_argument("exercise", nargs="?", help="exercise name or number (see --list)")
    p.add_argument("--solution", help="a .py file defining the function (default: exercises/<name>.py), "
                                      "or 'reference' to check the project's own implementation")
    p.add_argument("--time-limit", type=float, default=CASE_SECONDS, metavar="SECONDS",
                   help="seconds allowed for importing the solution and for each case (default: %(default)s)")
    p.add_argument("--list", action="store_true", help="list the exercises")
    args = p.parse_args(argv)
    by_number = {str(e.number): e for e in EXERCISES.values()}
    if args.list or not args.exercise:
        for e in EXERCISES.values():
            print(f"{e.number}. {e.name:<20} {e.title}  (statement: exercises/{e.name}.md, reference: {e.reference})")
        return 0 if args.list else 2
    ex = EXERCISES.get(args.exercise) or by_number.get(args.exercise)
    if ex is None:
        print(f"error: no exercise {args.exercise!r}; choose one of {', '.join(EXERCISES)}", file=sys.stderr)
        return 2
    if not args.time_limit > 0:
        print(f"error: --time-limit must be > 0 (got {args.time_limit})", file=sys.stderr)
        return 2
    try:
        ex.reference_fn()
    except (ImportError, AttributeError) as e:
        print(f"error: the reference {ex.reference} is not available ({e})", file=sys.stderr)
        return 2
    file = Path(args.solution) if args.solution not in (None, "reference") else HERE / f"{ex.name}.py"
    if args.solution != "reference" and not file.is_file():
        print(f"error: solution file {file} not found", file=sys.stderr)
        return 2
    label = ex.reference if args.solution == "reference" else f"{file}:{ex.name}"
    print(f"exercise {ex.number}, {ex.title}: checking {label} against {ex.reference}", flush=True)
    try:
        return 0 if check_file(ex, "reference" if args.solution == "reference" else str(file), args.time_limit) else 1
    except CannotCheck as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
