"""Clients as processes: the few collectives common.Run needs when a method runs under torchrun.

    torchrun --standalone --nproc_per_node N fedavg_cl.py ...        (N processes, one machine)

Client c lives on process c % N (`World.mine`); after the local updates the uploads of all
sampled clients are exchanged with one all-gather (`World.gather`), so every process holds the same
uploads in the same client order and runs the same server step: the averaged model (and anything else
the server computes) is bit-for-bit the one a single process computes. Rank 0 alone writes the run folder.
Started as a plain `python script.py`, World is one process and every call returns its input.

Why an all-gather of the uploads and not an all-reduce of weighted sums: the sum of per-process partial
sums adds the floats in another order than one process does, and the results would drift apart by
rounding; with the gather the server's arithmetic is the single-process arithmetic.

A process that stops (crash, kill) makes the next collective of the others fail: they print one line
and exit 1. A process that hangs is waited for FEDSSL_DIST_TIMEOUT seconds (default 300), then the same.
No method file calls torch.distributed: the round loop uses common.Run (my_clients, gather, client).
"""
import datetime
import math
import os
import sys
import time

import torch
import torch.distributed as dist


def launched() -> bool:
    """Started by torchrun with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def payload_bytes(obj) -> int:
    """Bytes of the tensors inside obj (dicts, lists, tuples of tensors and numbers): what a client sends."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(payload_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(payload_bytes(v) for v in obj)
    return 0


class World:
    """The processes of one run: rank, size and the collectives (no-ops in one process)."""

    def __init__(self, device: torch.device):
        self.size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        try:
            self.timeout_s = float(os.environ.get("FEDSSL_DIST_TIMEOUT", "300"))
        except ValueError:
            self.timeout_s = math.nan
        if not 1 <= self.timeout_s < 10 ** 8:    # nan/inf break timedelta; below 1 s the rendezvous itself times out
            if self.rank == 0:                    # one line, not one per process
                print(f"error: FEDSSL_DIST_TIMEOUT must be a number of seconds from 1 to 1e8 "
                      f"(got {os.environ['FEDSSL_DIST_TIMEOUT']!r})", file=sys.stderr, flush=True)
            else:
                time.sleep(5)                     # process 0 ends first: torchrun never cuts its line off
            sys.exit(2)
        self.device = device
        if self.size > 1 and not dist.is_initialized():
            if device.type == "cuda":
                torch.cuda.set_device(device)
            backend = "nccl" if device.type == "cuda" else "gloo"     # NCCL between GPUs, gloo between CPUs
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=self.timeout_s))

    def mine(self, clients) -> list:
        """The clients of `clients` this process hosts: client c lives on process c % size, always (so a
        client's own state, e.g. its local model, stays on one process whichever clients are sampled)."""
        return [c for c in clients if c % self.size == self.rank]

    def _collective(self, fn, *a):
        try:
            return fn(*a)
        except (RuntimeError, dist.DistBackendError, ConnectionError) as e:   # a peer died or timed out
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            sys.stdout.flush()
            print(f"error: process {self.rank}: another process of the run stopped or did not answer within "
                  f"{self.timeout_s:g} s (FEDSSL_DIST_TIMEOUT); stopping too ({first})", file=sys.stderr, flush=True)
            sys.exit(1)

    def gather(self, parts: tuple) -> tuple:
        """A tuple of dicts {client: upload} of this process -> the same dicts with the clients of all processes,
        in client order. CPU tensors travel pickled over gloo; under NCCL all_gather_object goes through the GPU."""
        if self.size == 1:
            return tuple(dict(sorted(p.items())) for p in parts)
        every = [None] * self.size
        self._collective(dist.all_gather_object, every, _to_cpu(tuple(parts)))
        return tuple(dict(sorted((c, _to(v, self.device)) for proc in every for c, v in proc[i].items()))
                     for i in range(len(parts)))

    def any(self, flag: bool) -> bool:
        """True on every process if it is True on any (e.g. Ctrl-C reached one of them)."""
        if self.size == 1:
            return flag
        t = torch.tensor([int(flag)], device=self.device)
        self._collective(dist.all_reduce, t, dist.ReduceOp.MAX)
        return bool(t.item())

    def broadcast(self, obj, src: int = 0):
        """obj of process src, on every process (the run folder's path, a checkpoint)."""
        if self.size == 1:
            return obj
        box = [_to_cpu(obj) if self.rank == src else None]
        self._collective(dist.broadcast_object_list, box, src)
        return box[0]

    def collect(self, obj) -> list | None:
        """[obj of process 0, obj of process 1, ...] on process 0 (None elsewhere)."""
        if self.size == 1:
            return [obj]
        out = [None] * self.size if self.rank == 0 else None
        self._collective(dist.gather_object, _to_cpu(obj), out, 0)
        return out

    def close(self):
        if self.size > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _to(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to(v, device) for v in obj)
    return obj


def _to_cpu(obj):
    return _to(obj, torch.device("cpu"))
