"""Shared plumbing for every method file: data, partitions, augmentation, encoders, shared losses,
aggregation, evaluation, the run folder and the command line. No method logic lives here.

The protocol these pieces implement is written down in the README ("Protocol"): every method is
trained on the same partitions with the same augmentation and evaluated by the same kNN monitor
(k=200, t=0.1) and linear probe, next to a randomly initialised encoder.
"""
from __future__ import annotations

import argparse
import ast
import atexit
import contextlib
import dataclasses
import fcntl
import functools
import gzip
import hashlib
import inspect
import json
import copy
import errno
import io
import math
import os
import pickle
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import textwrap
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.fusion import fuse_conv_bn_eval

import distributed

ROOT = Path(__file__).resolve().parent


class UserError(Exception):
    """An input the user can fix; the command line turns it into one `error:` line and exit 2."""


def fail(msg: str):
    """Refuse a bad input: one line on stderr, exit status 2, no traceback."""
    raise UserError(msg)


# ----------------------------------------------------------------------------------------------
# Command line: a dataclass whose field docstrings are the --help text (CleanRL style)
# ----------------------------------------------------------------------------------------------

@dataclass
class RunArgs:
    dataset: str = "fmnist"
    """fmnist (bundled) | cifar10 | cifar100"""
    data_dir: str = ""
    """where datasets live (CIFAR: cifar-10-batches-py/ or the python-version .tar.gz inside it); empty = the
    repository's data/ folder, wherever the script is run from; a relative path is taken from the working directory"""
    encoder: str = "cnn"
    """cnn (small, fast on a CPU) | resnet18 (CIFAR stem)"""
    width: int = 32
    """width w of the cnn encoder (channels w, 2w, 4w; the representation has 4w dimensions)"""
    norm: str = "bn"
    """normalisation layers: bn (BatchNorm) | gn (GroupNorm) | gnws (GroupNorm + weight standardisation)"""
    clients: int = 10
    """number of clients; 1 = centralized"""
    partition: str = "classes"
    """iid | dirichlet | classes | skew"""
    alpha: float = 0.1
    """Dirichlet concentration for --partition dirichlet (smaller = more skewed)"""
    classes_per_client: int = 2
    """K for --partition classes"""
    skew_ratio: float = 0.0
    """R for --partition skew (Dec-SSL): share of each class dealt uniformly; 0 = label-sorted, 1 = IID"""
    min_client_size: int = 10
    """--partition dirichlet redraws until every client holds at least this many images"""
    participation: float = 1.0
    """fraction of clients sampled per round"""
    rounds: int = 20
    """communication rounds"""
    local_epochs: int = 1
    """passes over its own data a client makes per round"""
    batch_size: int = 128
    """images per local step (each gives two views)"""
    lr: float = 1e-3
    """client learning rate"""
    optimizer: str = "adam"
    """adam | sgd (momentum 0.9); a fresh optimizer per client per round, as FedAvg does"""
    weight_decay: float = 1e-6
    """client weight decay"""
    train_size: int = 10000
    """use a seeded, class-stratified subset of this many training images (0 = all)"""
    test_size: int = 0
    """use a seeded, class-stratified subset of this many test images (0 = all); for tests"""
    holdout: int = 0
    """evaluate on this many held-out TRAINING images instead of the test set (for choosing hyper-parameters)"""
    crop_min: float = 0.2
    """smallest area of the random resized crop (0.08 in SimCLR's ImageNet recipe)"""
    eval_every: int = 5
    """kNN monitor every this many rounds (and at the first and the last round)"""
    probe_epochs: int = 30
    """epochs of the linear probe on frozen features (last epoch reported)"""
    seed: int = 0
    """seed for partition, initialisation, augmentation and sampling"""
    device: str = "auto"
    """auto | cpu | cuda"""
    preset: str = "default"
    """default (CPU minutes) | paper (the paper's setting, for a GPU); explicit flags override it"""
    out: str = "runs"
    """parent folder of run folders"""
    resume: str = ""
    """continue an interrupted run from RUN_DIR/checkpoint.pt (other flags are taken from its config.json)"""

    PAPER: ClassVar[dict] = {}

    # The values a text flag accepts: check() refuses others and --help's usage line lists them. A method
    # with text flags of its own extends it: CHOICES = {**common.RunArgs.CHOICES, "topology": TOPOLOGIES}.
    CHOICES: ClassVar[dict] = dict(dataset=("fmnist", "cifar10", "cifar100"), encoder=("cnn", "resnet18"),
                                   norm=("bn", "gn", "gnws"), partition=("iid", "dirichlet", "classes", "skew"),
                                   optimizer=("adam", "sgd"), device=("auto", "cpu", "cuda"),
                                   preset=("default", "paper"))

    MIN_CLIENT_IMAGES: ClassVar[int] = 2      # a training step needs 2 images (BatchNorm, contrastive pairs)

    TORCHRUN: ClassVar[bool] = False          # True in a method whose round loop runs under torchrun (see distributed.py)

    def check(self):
        """Refuse settings that cannot run; method Args extend this and call super().check()."""
        check_fields(self)
        for name, allowed in self.CHOICES.items():
            if getattr(self, name) not in allowed:
                fail(f"--{name.replace('_', '-')} must be one of {', '.join(allowed)} (got {getattr(self, name)!r})")
        for name in ("clients", "rounds", "local_epochs", "batch_size", "eval_every", "classes_per_client", "width"):
            if getattr(self, name) < 1:
                fail(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(self, name)})")
        for name in ("train_size", "test_size", "holdout", "min_client_size"):
            if getattr(self, name) < 0:
                fail(f"--{name.replace('_', '-')} must be >= 0 (got {getattr(self, name)})")
        if self.probe_epochs < 1:    # 0 epochs would report an untrained probe's (undefined) accuracy
            fail(f"--probe-epochs must be at least 1 (got {self.probe_epochs})")
        if self.weight_decay < 0:
            fail(f"--weight-decay must be >= 0 (got {self.weight_decay})")
        if self.alpha <= 0:
            fail(f"--alpha must be > 0 (got {self.alpha})")
        if not 0 <= self.skew_ratio <= 1:
            fail(f"--skew-ratio must be in [0, 1] (got {self.skew_ratio})")
        if not 0 < self.participation <= 1:
            fail(f"--participation must be in (0, 1] (got {self.participation})")
        if not 0 < self.crop_min <= 1:
            fail(f"--crop-min must be in (0, 1] (got {self.crop_min})")
        if self.lr <= 0:
            fail(f"--lr must be > 0 (got {self.lr})")
        if self.device == "cuda" and not torch.cuda.is_available():
            fail("--device cuda was asked for but no CUDA GPU is visible to torch")
        images = TRAIN_IMAGES[self.dataset]
        if self.holdout >= images:
            fail(f"--holdout {self.holdout} leaves no training images ({self.dataset} has {images})")
        images = min(self.train_size or images, images - self.holdout)
        if self.clients > 1 and self.clients * self.MIN_CLIENT_IMAGES > images:
            fail(f"--clients {self.clients} x {self.MIN_CLIENT_IMAGES} images (the least a client can train on) "
                 f"is more than the {images} training images")
        if not self.resume:
            check_out(self.out)
        check_memory(self, self.memory_extra())

    def memory_extra(self) -> dict:
        """Bytes of the method's own large tensors (queues, feature banks) beyond the networks; methods add theirs."""
        return {}


TRAIN_IMAGES = {"fmnist": 60000, "cifar10": 50000, "cifar100": 50000}
IMAGE_SHAPE = {"fmnist": (1, 28, 28), "cifar10": (3, 32, 32), "cifar100": (3, 32, 32)}


FLOAT32_MAX = float(torch.finfo(torch.float32).max)     # the networks and optimizers compute in float32


def check_fields(args):
    """Values that cannot mean anything in any flag, found by introspection so a new flag is covered:
    a non-finite float (nan, inf), a seed outside numpy's [0, 2**32)."""
    for f in dataclasses.fields(args):
        v = getattr(args, f.name)
        if isinstance(v, float) and not math.isfinite(v):
            fail(f"--{f.name.replace('_', '-')} must be a finite number (got {v})")
        if isinstance(v, float) and abs(v) > FLOAT32_MAX:      # torch turns it into a float32 and overflows
            fail(f"--{f.name.replace('_', '-')} must be at most {FLOAT32_MAX:.3g} in size, the largest float32 "
                 f"(got {v:g})")
        if f.name == "seed" and not 0 <= v < 2 ** 32:
            fail(f"--seed must be in [0, 2**32) (got {v})")


def check_out(out: str):
    """--out must be a folder we can create run folders in (or one we can create)."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        fail(f"--out {out} is not a folder")
    parent = path
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        fail(f"--out {out}: {parent} is not a writable folder")


def _device_memory(device: str) -> int:
    """Bytes the training device has in all (a CUDA GPU's total memory; a CPU's physical memory)."""
    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        return torch.cuda.get_device_properties(0).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 2 ** 40


def encoder_dim(args) -> int:
    """Size of the representation make_encoder gives (before building it)."""
    return 512 if args.encoder == "resnet18" else 4 * getattr(args, "width", 32)


def encoder_params(args) -> int:
    """Parameters of make_encoder(args), counted on the meta device (nothing is allocated)."""
    try:
        with torch.device("meta"):
            return sum(p.numel() for p in make_encoder(args, IMAGE_SHAPE.get(args.dataset, (3, 32, 32))[0]).parameters())
    except Exception as e:       # sizes past what a tensor shape can hold (RuntimeError, OverflowError, c10 errors)
        fail(f"--width {getattr(args, 'width', '')} gives a network torch cannot even describe ({type(e).__name__})")


def model_copies_bytes(args, params: int) -> int:
    """fp32 bytes of `params` parameters held once per client of a round (uploads, local models) plus a few
    (global, worker, optimizer state): what check_memory assumes for networks and heads."""
    pool = max(1, round(args.participation * args.clients)) if args.participation > 0 else args.clients
    return 4 * params * (pool + 4)


def check_memory(args, extra: dict | None = None):
    """Refuse before allocating anything when the networks (a copy per client of a round: its upload,
    plus optimizer state), the activations of one batch of two views and the method's own tensors
    (`extra`, bytes) cannot fit the device's memory. A rough lower bound: it only catches the impossible."""
    c, h, w = IMAGE_SHAPE.get(args.dataset, (3, 32, 32))
    params = encoder_params(args)
    n = TRAIN_IMAGES.get(args.dataset, 50000)
    batch = min(args.batch_size, args.train_size or n, n)     # a client smaller than a batch is one batch
    if args.encoder == "resnet18":
        act = 2 * batch * 64 * h * w * 20          # ~20 maps of the stem's size per image
    else:
        act = 2 * batch * getattr(args, "width", 32) * h * w * 4        # conv/norm/relu maps of the first block
    need = {"networks": model_copies_bytes(args, params), "activations": 4 * act, **(extra or {})}
    have = _device_memory(args.device)
    if sum(need.values()) > have:
        parts = ", ".join(f"{k} {v / 2 ** 30:.1f}" for k, v in need.items() if v)
        fail(f"these sizes need at least {sum(need.values()) / 2 ** 30:.1f} GiB ({parts}) but the device has "
             f"{have / 2 ** 30:.1f} GiB: lower --width, --batch-size, --clients or the queue sizes")


@functools.lru_cache(maxsize=None)
def _field_docs(cls) -> dict:
    """The docstring under each dataclass field, collected over the class and its bases."""
    docs = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            body = ast.parse(inspect.getsource(klass).strip()).body[0].body
        except (OSError, TypeError, IndexError):
            continue
        for a, b in zip(body, body[1:]):
            if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant):
                docs[a.target.id] = str(b.value.value).strip()
    return docs


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        fail(message)


def parse_args(cls, argv=None, script: str | None = None):
    """Build argparse from the Args dataclass; apply --preset paper (cls.PAPER) and any boolean switch
    with a preset (cls.SWITCH_PRESETS, e.g. {"quick": {...}}), then the flags actually given.
    With --resume the flags come from the run folder's config.json (written by `script`)."""
    docs, choices, paper = _field_docs(cls), getattr(cls, "CHOICES", {}), getattr(cls, "PAPER", {})
    argv = sys.argv[1:] if argv is None else list(argv)
    preset = _Parser(add_help=False, argument_default=argparse.SUPPRESS)
    preset.add_argument("--preset")
    shown = "paper" if vars(preset.parse_known_args(argv)[0]).get("preset") == "paper" and paper else ""
    p = _Parser(description=(sys.modules[cls.__module__].__doc__ or "").split("\n")[0] +
                (" (--help shows --preset paper's values as the defaults)" if shown else ""),
                formatter_class=argparse.ArgumentDefaultsHelpFormatter, argument_default=argparse.SUPPRESS)
    base = cls()
    for f in dataclasses.fields(cls):      # with --preset paper, --help shows the values the run would take
        flag, help_ = "--" + f.name.replace("_", "-"), docs.get(f.name, "")
        default = paper[f.name] if shown and f.name in paper else getattr(base, f.name)
        if default != "":
            help_ += f" (default: {default}{', from --preset paper' if shown and f.name in paper else ''})"
        if isinstance(getattr(base, f.name), bool):      # `--featarc` alone means `--featarc true`
            p.add_argument(flag, type=_bool, nargs="?", const=True, metavar="{true,false}", help=help_)
        else:
            metavar = "{" + ",".join(choices[f.name]) + "}" if f.name in choices else None
            p.add_argument(flag, type=type(getattr(base, f.name)), metavar=metavar, help=help_)
    given = vars(p.parse_args(argv))
    if given.get("resume"):
        args = cls(**{**_saved_args(cls, Path(given["resume"]), script), "resume": given["resume"]})
        changed = {k: v for k, v in given.items() if k != "resume" and v != getattr(args, k)}
        if set(changed) - RESUME_MAY_CHANGE:     # the rest would make the run a different run
            fail(f"--resume continues a run with the flags in its config.json; drop "
                 f"{' '.join('--' + k.replace('_', '-') for k in changed)} (or start a new run)")
        for k, v in changed.items():
            if k == "out":                # the run goes on in its own folder, wherever --out points
                print(f"note: --out {v} is not used: --resume continues in {given['resume']}", file=sys.stderr)
                continue
            print(f"note: --resume with --{k.replace('_', '-')} {v} (the run used {getattr(args, k)})",
                  file=sys.stderr)
            setattr(args, k, v)
        check_fields(args)
        return args
    values = dict(cls.PAPER) if given.get("preset") == "paper" else {}
    for switch, preset in getattr(cls, "SWITCH_PRESETS", {}).items():   # e.g. compare.py's --quick
        if given.get(switch):
            values.update(preset)
    values.update(given)
    args = cls(**values)
    check_fields(args)
    return args


# Flags that may differ on --resume: where the run continues, not what it computes.
RESUME_MAY_CHANGE = {"device", "out"}


def _saved_args(cls, folder: Path, script: str | None) -> dict:
    """The flags of the run in `folder`, refused in one line if the folder is not a run of `script`."""
    cfg_path = folder / "config.json"
    if not cfg_path.is_file() or not (folder / "checkpoint.pt").is_file():
        empty = folder.is_dir() and not any(folder.glob("checkpoint.pt*"))
        fail(f"--resume {folder}: not a run folder (needs config.json and checkpoint.pt)" +
             ("; it stopped before its first checkpoint, so nothing can be resumed: delete it and start "
              "a new run" if empty and cfg_path.is_file() else ""))
    try:
        cfg = json.loads(cfg_path.read_text())
        saved = cfg["args"]
        if not isinstance(saved, dict):
            raise TypeError("args is not an object")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        fail(f"--resume {folder}: config.json is not a run configuration ({type(e).__name__}: {e})")
    if script is not None and cfg.get("script") != script:
        fail(f"--resume {folder}: that is a {cfg.get('script')!r} run; resume it with "
             f"{cfg.get('script')}.py, not {script}.py")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    defaults = cls()
    for k, v in saved.items():
        if k in fields:
            want = type(getattr(defaults, k))
            ok = isinstance(v, want) and not (want is not bool and isinstance(v, bool)) or \
                (want is float and isinstance(v, int) and not isinstance(v, bool))
            if not ok:
                fail(f"--resume {folder}: config.json gives {k} = {v!r}, not a {want.__name__}")
    return {k: (float(v) if type(getattr(defaults, k)) is float else v) for k, v in saved.items() if k in fields}


def _bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")


# ----------------------------------------------------------------------------------------------
# Data: one uint8 tensor per split, on the training device; a client is an index tensor into it
# ----------------------------------------------------------------------------------------------

DATASETS = ("fmnist", "cifar10", "cifar100")
# torchvision's layout: torchvision.datasets.FashionMNIST(root) reads root/FashionMNIST/raw/, so does load_fmnist
FMNIST_FOLDER = Path("FashionMNIST") / "raw"
# SHA-256 of each IDX file's content (unpacked). The bundled .gz files (Debian's dataset-fashion-mnist, packed
# without a file name in the header) and upstream's or torchvision's download (other .gz bytes: different
# MD5) unpack to the same content, so a torchvision root passes the same check.
FMNIST_SHA256 = {
    "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}
STATS = {  # per-channel mean/std of the training split, on [0, 1] pixels
    "fmnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
CLASS_NAMES = {    # for plots; CIFAR-100's 100 classes are shown by number
    "fmnist": ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
    "cifar10": ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
}


@dataclass
class Data:
    train_x: torch.Tensor   # uint8 N x C x H x W, on the device
    train_y: torch.Tensor   # int64 N, on the device
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    mean: tuple
    std: tuple

    @property
    def channels(self):
        return self.train_x.shape[1]


def _idx_array(raw: bytes) -> np.ndarray:
    """An IDX file's bytes (magic number, one big-endian uint32 per dimension, uint8 data) as a writable array."""
    ndim = raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(bytearray(raw), dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fmnist(root="data"):
    """Fashion-MNIST's four IDX files from root/FashionMNIST/raw/ (torchvision's layout) or from `root` itself,
    each the .gz or the unpacked file, verified by the SHA-256 of its content. Returns train images
    N x 1 x 28 x 28, train labels, test images, test labels (writable uint8 numpy arrays) and 10.
    A .gz without its unpacked file is unpacked beside it once (when the folder is writable), so that
    torchvision.datasets.FashionMNIST(root, download=False) reads the same files."""
    root = Path(root)
    folder = root / FMNIST_FOLDER if (root / FMNIST_FOLDER).is_dir() else root
    arrays = []
    for name, digest in FMNIST_SHA256.items():
        packed, plain = folder / f"{name}.gz", folder / name
        if packed.is_file():
            try:
                with gzip.open(packed, "rb") as f:
                    raw = f.read()
            except (OSError, EOFError, zlib.error) as e:
                fail(f"{packed} is not a readable .gz, it is truncated or corrupt ({type(e).__name__}: {e})")
        elif plain.is_file():
            raw = plain.read_bytes()
        else:
            fail(f"Fashion-MNIST file {packed} is missing (the repository ships the four files in data/{FMNIST_FOLDER}/)")
        if hashlib.sha256(raw).hexdigest() != digest:
            fail(f"{packed if packed.is_file() else plain} does not match its recorded SHA-256; restore it from "
                 f"the repository")
        if not plain.exists():
            tmp = plain.with_name(f".{name}.{os.getpid()}.tmp")
            with contextlib.suppress(OSError):     # a read-only folder: only torchvision's reader misses it
                try:
                    tmp.write_bytes(raw)
                    os.replace(tmp, plain)         # atomic: a reader never sees half a file
                finally:
                    tmp.unlink(missing_ok=True)
        arrays.append(_idx_array(raw))
    tx, ty, vx, vy = arrays
    return tx[:, None], ty, vx[:, None], vy, 10


CIFAR = {"cifar10": ("cifar-10-batches-py", "cifar-10-python.tar.gz", [f"data_batch_{i}" for i in range(1, 6)],
                     "test_batch", b"labels", 10),
         "cifar100": ("cifar-100-python", "cifar-100-python.tar.gz", ["train"], "test", b"fine_labels", 100)}


def load_cifar(name: str, data_dir: Path):
    """CIFAR-10/100 from the python-version pickles (extracted folder or the .tar.gz torchvision downloads).
    A file that is truncated, not a pickle or of the wrong shape is refused in one line naming it."""
    folder, archive, train_files, test_file, key, classes = CIFAR[name]
    if not (data_dir / folder).is_dir() and (data_dir / archive).is_file():
        _extract(data_dir / archive, data_dir, folder)
    if not all((data_dir / folder / f).is_file() for f in train_files + [test_file]):
        fail(f"{name} not found: put {archive} (python version, from https://www.cs.toronto.edu/~kriz/cifar.html) "
             f"or its extracted folder {folder}/ into {data_dir}/")

    def read(files):
        xs, ys = [], []
        for f in files:
            path = data_dir / folder / f
            try:
                with open(path, "rb") as fh:
                    d = pickle.load(fh, encoding="bytes")
            except Exception as e:               # unpickling garbage raises almost any type
                fail(f"{path} is not a readable CIFAR batch, it is truncated or corrupt ({type(e).__name__}: {e})")
            if not isinstance(d, dict) or b"data" not in d or key not in d:
                fail(f"{path} is not a CIFAR python-version batch (needs the keys data and {key.decode()})")
            try:
                x, y = np.asarray(d[b"data"]), np.asarray(d[key])
            except Exception as e:
                fail(f"{path}: its data or labels are not arrays ({type(e).__name__}: {e})")
            if x.ndim != 2 or x.shape[1] != 3 * 32 * 32 or x.dtype != np.uint8 or y.shape != (len(x),):
                fail(f"{path}: expected {key.decode()} for every row of a uint8 N x 3072 data array, "
                     f"got data {x.dtype} {tuple(x.shape)} and {len(y.reshape(-1))} labels")
            if y.dtype.kind not in "iu" or (len(y) and (y.min() < 0 or y.max() >= classes)):
                fail(f"{path}: labels must be integers in 0..{classes - 1}")
            xs.append(x.reshape(-1, 3, 32, 32))
            ys.append(y.astype(np.int64))
        return np.concatenate(xs), np.concatenate(ys)

    tx, ty = read(train_files)
    vx, vy = read([test_file])
    if len(ty) < 2 or len(vy) < 1:
        fail(f"{data_dir / folder} holds {len(ty)} training and {len(vy)} test images: too few to train")
    return tx, ty, vx, vy, classes


def _extract(archive: Path, data_dir: Path, folder: str):
    """Unpack the archive into a temporary folder first, so a broken one leaves no half folder behind."""
    import shutil
    import tempfile
    try:
        tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=data_dir))
    except OSError as e:
        fail(f"cannot unpack {archive}: {data_dir} is not writable ({e.strerror})")
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
        if not (tmp / folder).is_dir():
            fail(f"{archive} does not contain the folder {folder}/ (is it the python version?)")
        os.replace(tmp / folder, data_dir / folder)
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        fail(f"{archive} is not a readable .tar.gz, it is truncated or corrupt ({type(e).__name__}: {e})")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_partition(args, cache: dict | None = None):
    """Draw the partition of a run without starting it (compare.py checks every cell up front this way):
    refuses what the run itself would refuse (too few images, an impossible partition, a client too small)."""
    key = (args.dataset, args.data_dir, args.holdout, args.train_size, args.seed)
    if cache is None or key not in cache:
        data, _ = load_data(args, "cpu")
        labels = data.train_y.numpy()
        if cache is not None:
            cache[key] = labels
    labels = cache[key] if cache is not None else labels
    parts = partition(labels, args, log=lambda m: None)
    small = min(len(p) for p in parts)
    if small < min(args.MIN_CLIENT_IMAGES, len(labels)):
        fail(f"the partition gives a client {small} image(s) ({args.clients} clients, {len(labels)} images); "
             f"a client needs {args.MIN_CLIENT_IMAGES} to take a training step")


def stratified_subset(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """A seeded subset of n indices whose class proportions match the full set (n=0: everything)."""
    if n == 0 or n >= len(labels):
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    quota = np.floor(counts / counts.sum() * n).astype(int)
    quota[np.argsort(-(counts / counts.sum() * n - quota))[: n - quota.sum()]] += 1   # largest remainders
    picked = [rng.permutation(np.flatnonzero(labels == c))[:q] for c, q in zip(classes, quota)]
    return np.sort(np.concatenate(picked))


def data_path(args: RunArgs) -> Path:
    """--data-dir, or the repository's data/ folder when it is empty (so the bundled data is found from any cwd)."""
    return Path(args.data_dir) if args.data_dir else ROOT / "data"


def load_data(args: RunArgs, device) -> tuple[Data, np.ndarray]:
    """Load a dataset once onto the device; returns it and the original indices of the training subset."""
    data_dir = data_path(args)
    if args.dataset == "fmnist":
        tx, ty, vx, vy, k = load_fmnist(data_dir)
    else:
        tx, ty, vx, vy, k = load_cifar(args.dataset, data_dir)
    original = np.arange(len(ty))
    if args.holdout >= len(ty):
        fail(f"--holdout {args.holdout} leaves no training images ({args.dataset} has {len(ty)})")
    if args.holdout:        # a validation split carved out of the training set; the test set is not touched
        val = stratified_subset(ty, args.holdout, args.seed + 2)
        original = np.setdiff1d(original, val)
        vx, vy, tx, ty = tx[val], ty[val], tx[original], ty[original]
    keep = stratified_subset(ty, args.train_size, args.seed)
    keep_test = stratified_subset(vy, args.test_size, args.seed + 1)
    as_t = lambda a, dt: torch.as_tensor(np.ascontiguousarray(a), dtype=dt, device=device)
    mean, std = STATS[args.dataset]
    data = Data(as_t(tx[keep], torch.uint8), as_t(ty[keep], torch.int64), as_t(vx[keep_test], torch.uint8),
                as_t(vy[keep_test], torch.int64), k, mean, std)
    return data, original[keep]


# ----------------------------------------------------------------------------------------------
# Partitions (label skew); numpy with a seeded Generator, so they do not depend on the device
# ----------------------------------------------------------------------------------------------

def partition(labels: np.ndarray, args: RunArgs, log=print) -> list[np.ndarray]:
    """Split indices 0..len(labels)-1 into args.clients disjoint, covering sets (see README, Protocol)."""
    n, clients, num_classes = len(labels), args.clients, int(labels.max()) + 1
    if clients > n:
        fail(f"--clients {clients} is more than the {n} training images")
    rng = np.random.default_rng(args.seed)
    if clients == 1:                      # centralized: one client holds everything, whatever the partition
        parts = [np.arange(n)]
    elif args.partition == "iid":
        parts = np.array_split(rng.permutation(n), clients)
    elif args.partition == "dirichlet":
        parts = dirichlet_partition(labels, clients, args.alpha, args.min_client_size, rng)
    elif args.partition == "classes":
        parts = class_partition(labels, clients, args.classes_per_client, rng, log)
    else:
        parts = skew_partition(labels, clients, args.skew_ratio, rng)
    return [np.sort(p).astype(np.int64) for p in parts]


def dirichlet_partition(labels, clients, alpha, min_size, rng, tries=1000):
    """For every class, client shares ~ Dir(alpha); redraw until every client holds >= min_size images."""
    n, num_classes = len(labels), int(labels.max()) + 1
    min_size = min(min_size, n // clients)
    by_class = [rng.permutation(np.flatnonzero(labels == c)) for c in range(num_classes)]
    for _ in range(tries):
        parts = [[] for _ in range(clients)]
        for idx in by_class:
            shares = rng.dirichlet(np.full(clients, alpha))
            cuts = (np.cumsum(shares) * len(idx)).astype(int)[:-1]
            for c, chunk in enumerate(np.split(idx, cuts)):
                parts[c].append(chunk)
        parts = [np.concatenate(p) for p in parts]
        if min(len(p) for p in parts) >= min_size:
            return parts
    fail(f"--partition dirichlet: no draw in {tries} gave every client >= {min_size} images "
         f"(alpha {alpha}, {clients} clients, {n} images); raise --alpha or lower --min-client-size")


def class_partition(labels, clients, k, rng, log=print):
    """Label-sorted shards, k per client. When clients*k is a multiple of the class count every
    client gets k DISTINCT classes (each class cut into clients*k/C equal shards). Otherwise the
    MocoSFL-code rule: sort by label, cut clients*k equal shards, deal them at random, so a client
    may hold two shards of one class (a message says so)."""
    num_classes = int(labels.max()) + 1
    if k > num_classes:
        fail(f"--classes-per-client {k} is more than the {num_classes} classes of the dataset")
    if clients * k > len(labels):
        fail(f"--classes-per-client {k} x --clients {clients} shards need at least that many images ({len(labels)})")
    if (clients * k) % num_classes == 0:
        per_class = clients * k // num_classes
        shards = {c: np.array_split(rng.permutation(np.flatnonzero(labels == c)), per_class)
                  for c in range(num_classes)}
        left, parts = np.full(num_classes, per_class), []
        for _ in range(clients):      # the k classes with most shards left (random tie-break) stay feasible
            pick = np.argsort(-(left + 0.5 * rng.random(num_classes)))[:k]
            left[pick] -= 1
            parts.append(np.concatenate([shards[c].pop() for c in pick]))
        return parts
    log(f"note: {clients} clients x {k} classes is not a multiple of {num_classes} classes; dealing "
        f"label-sorted shards at random (MocoSFL's rule), so a client may hold fewer than {k} distinct classes")
    sorted_idx = np.argsort(labels, kind="stable")
    shards = np.array_split(sorted_idx, clients * k)
    deal = rng.permutation(clients * k)
    return [np.concatenate([shards[s] for s in deal[i * k:(i + 1) * k]]) for i in range(clients)]


def skew_partition(labels, clients, ratio, rng):
    """Dec-SSL's label skew: a (1-R) share of every class dealt in label order, the R share uniformly."""
    num_classes = int(labels.max()) + 1
    sorted_part, uniform_part = [], []
    for c in range(num_classes):
        idx = rng.permutation(np.flatnonzero(labels == c))
        cut = int(round((1 - ratio) * len(idx)))
        sorted_part.append(idx[:cut])
        uniform_part.append(idx[cut:])
    sorted_chunks = np.array_split(np.concatenate(sorted_part), clients)
    uniform_chunks = np.array_split(rng.permutation(np.concatenate(uniform_part)), clients)
    return [np.concatenate([a, b]) for a, b in zip(sorted_chunks, uniform_chunks)]


def class_counts(labels: np.ndarray, parts, num_classes: int) -> np.ndarray:
    return np.stack([np.bincount(labels[p], minlength=num_classes) for p in parts])


# ----------------------------------------------------------------------------------------------
# Augmentation: two views per image, independent random parameters per image, on the device
# ----------------------------------------------------------------------------------------------

class Augment:
    """Batched SimCLR augmentation. Random resized crop + horizontal flip are ONE affine resampling
    (grid_sample) with a per-image matrix; then, with p=0.8 per image, colour jitter (brightness,
    contrast, and for RGB saturation and hue, applied in that fixed order); for RGB grayscale with
    p=0.2; then normalisation. Differences from torchvision's per-image transforms: the crop's
    aspect ratio is clamped instead of re-drawn, the jitter order is fixed, and hue is a rotation
    of the chroma plane in YIQ space rather than an HSV shift.
    Every step of the jitter is linear in the colour vector of a pixel (contrast adds the image's
    mean grey), so the four of them are composed into ONE per-image 3x3 matrix and offset before
    they touch the pixels, and grayscale + normalisation into a second one after the clamp: a few
    dozen small operations per batch whatever the number of jitter steps (tests: the step-by-step
    definition gives the same images)."""

    def __init__(self, data: Data, crop_min: float = 0.2, strength: float = 0.4, hue: float = 0.1,
                 ratio: tuple = (3 / 4, 4 / 3)):
        dev = data.train_x.device
        self.rgb = data.channels == 3
        self.crop_min, self.s, self.hue = crop_min, strength, hue
        self.mean = torch.tensor(data.mean, device=dev).view(1, -1, 1, 1)
        self.std = torch.tensor(data.std, device=dev).view(1, -1, 1, 1)
        # the 11 random numbers of an image, u ~ U[0, 1) mapped to lo + span * u: crop area, log aspect
        # ratio, crop centre x and y, flip, jitter?, grayscale?, brightness (/255: images arrive as 0..255),
        # contrast, saturation factors in [1-s, 1+s], hue angle in radians
        lo = [crop_min, math.log(ratio[0]), -1, -1, 0, 0, 0, (1 - strength) / 255, 1 - strength, 1 - strength,
              -2 * math.pi * hue]
        hi = [1, math.log(ratio[1]), 1, 1, 1, 1, 1, (1 + strength) / 255, 1 + strength, 1 + strength,
              2 * math.pi * hue]
        self.lo = torch.tensor(lo, device=dev)
        self.span = torch.tensor(hi, device=dev) - self.lo
        self.pm = torch.tensor([1.0, -1.0], device=dev)                       # w^2 = area r, h^2 = area / r
        self.flip = torch.tensor([[-1.0, 1.0], [1.0, 1.0]], device=dev)       # x scale sign: flipped, not
        self.grids = {}
        c = data.channels
        self.eye = torch.eye(c, device=dev) / 255                             # not jittered: only the /255
        n = torch.diag(1 / self.std.flatten())                                # normalisation x -> (x - mean) / std
        self.norm, self.shift = n, (-self.mean / self.std).view(1, 1, c)
        if self.rgb:
            gray_w = _GRAY.to(dev)
            self.gray_w = gray_w
            self.to_gray = torch.outer(torch.ones(3, device=dev), gray_w)      # every channel <- the grey value
            self.from_gray = torch.eye(3, device=dev) - self.to_gray
            self.norm_gray = n @ self.to_gray
            self.hue_k = _HUE_K.to(dev)                                       # H(a) = K0 + cos a K1 + sin a K2
            self.phase = torch.tensor([0.0, math.pi / 2], device=dev)         # cos(a - pi/2) = sin(a)

    def base_grid(self, h: int, w: int, dev) -> torch.Tensor:
        """(x, y) pixel centres in [-1, 1] (F.affine_grid's, align_corners=False), cached per size."""
        key = (h, w, str(dev))
        if key not in self.grids:
            ys, xs = ((torch.arange(n, device=dev, dtype=torch.float32) * 2 + 1) / n - 1 for n in (h, w))
            self.grids[key] = torch.stack([xs.expand(h, w), ys.view(h, 1).expand(h, w)], dim=-1)
        return self.grids[key]

    def __call__(self, x_uint8: torch.Tensor) -> torch.Tensor:
        b, c, hgt, wid = x_uint8.shape
        dev = x_uint8.device
        u = torch.rand(b, 11, device=dev)  # every random number of the batch in one draw
        p = torch.addcmul(self.lo, self.span, u)
        # random resized crop + flip: grid = (w * flip * x + cx, h * y + cy), one resampling
        wh = (p[:, 0:1] * (p[:, 1:2] * self.pm).exp()).sqrt().clamp_(max=1)   # crop size as a fraction of the side
        centre = (1 - wh) * p[:, 2:4]                                       # crop centre in [-1, 1] coordinates
        scale = wh * torch.where(p[:, 4:5] < 0.5, self.flip[0], self.flip[1])
        grid = torch.addcmul(centre.view(b, 1, 1, 2), self.base_grid(hgt, wid, dev), scale.view(b, 1, 1, 2))
        x = F.grid_sample(x_uint8.float(), grid, mode="bilinear", padding_mode="reflection", align_corners=False)

        jitter = (p[:, 5] < 0.8).view(b, 1, 1)
        fb, fc = p[:, 7].view(b, 1, 1), p[:, 8].view(b, 1, 1)
        if not self.rgb:   # brightness y = fb x, contrast y = fc (y - m) + m with m the image's mean
            m = fb * x.mean(dim=(1, 2, 3)).view(b, 1, 1)
            a = torch.where(jitter, fb * fc, self.eye)
            x = torch.addcmul((1 - fc) * m * jitter, a, x.reshape(b, 1, -1)).clamp_(0, 1)
            out = torch.addcmul(self.shift, x.view(b, -1, 1), self.norm)     # (x - mean) / std
            return out.view(b, hgt, wid, 1).permute(0, 3, 1, 2)
        # RGB: colour vector v -> A v + c with A = fb fc H S (saturation S = fs I + (1 - fs) 1 g^T,
        # hue H = YIQ^-1 rot(a) YIQ) and c = (1 - fc) m H S 1 (contrast around the mean grey m of fb x)
        sat = torch.addcmul(self.to_gray, p[:, 9].view(b, 1, 1), self.from_gray)
        hue = torch.addmm(self.hue_k[0], torch.cos(p[:, 10:11] - self.phase), self.hue_k[1:]).view(b, 3, 3)
        hs = torch.bmm(hue, sat)
        m = fb * (x.mean(dim=(2, 3)) @ self.gray_w).view(b, 1, 1)
        a = torch.where(jitter, fb * fc * hs, self.eye)
        off = ((1 - fc) * m * jitter) * hs.sum(dim=2, keepdim=True)
        x = torch.baddbmm(off, a, x.reshape(b, 3, -1)).clamp_(0, 1)
        # grayscale (p = 0.2) and normalisation, written pixel-major: the result is channels-last
        g = torch.where((p[:, 6] < 0.2).view(b, 1, 1), self.norm_gray, self.norm)
        out = torch.baddbmm(self.shift, x.transpose(1, 2), g.transpose(1, 2))
        return out.view(b, hgt, wid, 3).permute(0, 3, 1, 2)

    def plain(self, x_uint8: torch.Tensor) -> torch.Tensor:
        """The un-augmented, normalised image (evaluation)."""
        return ((x_uint8.float().div(255) - self.mean) / self.std).contiguous(memory_format=torch.channels_last)


_GRAY = torch.tensor([0.299, 0.587, 0.114])       # ITU-R 601 luma; the weights sum to 1
_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], dtype=torch.float64)
# hue rotation by a of the chroma plane (I, Q): YIQ^-1 [[1, 0, 0], [0, cos, -sin], [0, sin, cos]] YIQ
# = K0 + cos a K1 + sin a K2; rows: K0, then K1 and K2 flattened
_HUE_K = torch.stack([torch.linalg.inv(_YIQ) @ e @ _YIQ for e in (
    torch.diag(torch.tensor([1.0, 0, 0], dtype=torch.float64)), torch.diag(torch.tensor([0, 1.0, 1], dtype=torch.float64)),
    torch.tensor([[0, 0, 0], [0, 0, -1.0], [0, 1.0, 0]], dtype=torch.float64))]).view(3, 9).float()


# ----------------------------------------------------------------------------------------------
# Encoders and heads
# ----------------------------------------------------------------------------------------------

class WSConv2d(nn.Conv2d):
    """Conv with weight standardisation: each output filter has zero mean and unit std."""

    def forward(self, x):
        w = self.weight
        mean = w.mean(dim=(1, 2, 3), keepdim=True)
        std = w.std(dim=(1, 2, 3), keepdim=True, unbiased=False) + 1e-5
        return F.conv2d(x, (w - mean) / std, self.bias, self.stride, self.padding, self.dilation, self.groups)


def norm_layer(kind: str, channels: int) -> nn.Module:
    if kind == "bn":
        return nn.BatchNorm2d(channels)
    return nn.GroupNorm(max(1, channels // 4) if channels >= 4 else 1, channels)   # 4 channels per group


def conv(kind: str, cin, cout, k=3, stride=1, padding=1):
    cls = WSConv2d if kind == "gnws" else nn.Conv2d
    return cls(cin, cout, k, stride=stride, padding=padding, bias=False)


class SmallCNN(nn.Module):
    """Three 3x3 conv blocks (width w, 2w, 4w) and global average pooling: a 4w-d representation."""

    def __init__(self, channels: int, norm: str = "bn", width: int = 32):
        super().__init__()
        layers, cin = [], channels
        for i, cout in enumerate((width, 2 * width, 4 * width)):
            layers += [conv(norm, cin, cout), norm_layer(norm, cout), nn.ReLU(inplace=True)]
            layers += [nn.MaxPool2d(2)] if i < 2 else [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
            cin = cout
        self.net = nn.Sequential(*layers)
        self.dim = cin

    def forward(self, x):
        return self.net(x)


def resnet18(channels: int, norm: str = "bn") -> nn.Module:
    """torchvision ResNet-18 with the CIFAR stem (3x3 conv, stride 1, no max-pool), fc removed."""
    import torchvision
    net = torchvision.models.resnet18(num_classes=10, norm_layer=lambda c: norm_layer(norm, c))
    net.conv1 = nn.Conv2d(channels, 64, 3, 1, 1, bias=False)
    net.maxpool, net.fc = nn.Identity(), nn.Identity()
    if norm == "gnws":
        _to_ws(net)
    net.dim = 512
    return net


def _to_ws(module: nn.Module):
    for name, child in module.named_children():
        if type(child) is nn.Conv2d:
            ws = WSConv2d(child.in_channels, child.out_channels, child.kernel_size, child.stride,
                          child.padding, bias=child.bias is not None)
            setattr(module, name, ws)
        else:
            _to_ws(child)


def make_encoder(args: RunArgs, channels: int) -> nn.Module:
    """The representation network f (no head); `.dim` is its output size. Channels-last memory
    layout: on this torch build it makes the cnn's training step about 25% faster on a CPU
    (max-pooling in particular), and it is the layout GPU convolutions prefer."""
    net = resnet18(channels, args.norm) if args.encoder == "resnet18" else \
        SmallCNN(channels, args.norm, getattr(args, "width", 32))
    return net.to(memory_format=torch.channels_last)


@torch.no_grad()
def folded_eval_copy(encoder: nn.Module) -> nn.Module:
    """An eval-mode copy of the encoder in which every BatchNorm2d that follows a plain Conv2d in a Sequential
    is folded into that conv (in eval mode BN is a per-channel affine map: w' = w g / s, b' = (b - mu) g / s + beta,
    s = sqrt(var + eps)): the same function up to float rounding, one pass over the activations fewer per
    layer. For feature extraction only (the copy does not share parameters with the encoder)."""
    out = copy.deepcopy(encoder).eval()
    for seq in [m for m in out.modules() if isinstance(m, nn.Sequential)]:
        for i in range(len(seq) - 1):
            if type(seq[i]) is nn.Conv2d and isinstance(seq[i + 1], nn.BatchNorm2d) and seq[i + 1].track_running_stats:
                seq[i], seq[i + 1] = fuse_conv_bn_eval(seq[i], seq[i + 1]), nn.Identity()
    return out


def mlp(dims: list[int], bn: bool = True, last_bn: bool = False) -> nn.Sequential:
    """Projector / predictor: Linear (+BN) + ReLU between the given sizes, plain Linear at the end."""
    layers = []
    for i, (a, b) in enumerate(zip(dims, dims[1:])):
        last = i == len(dims) - 2
        layers.append(nn.Linear(a, b, bias=not (bn and not last) and not (last and last_bn)))
        if not last:
            layers += [nn.BatchNorm1d(b)] if bn else []
            layers.append(nn.ReLU(inplace=True))
        elif last_bn:
            layers.append(nn.BatchNorm1d(b, affine=False))
    return nn.Sequential(*layers)


def make_optimizer(params, args: RunArgs, lr: float | None = None, reuse=None):
    """A fresh optimizer (FedAvg: one per client per round). reuse: one this function made before for the same
    parameters, handed back as a fresh one without new allocations: its state (Adam's moments and step count,
    SGD's momentum buffers) zeroed in place, which is exactly where a new optimizer starts (tests)."""
    lr = args.lr if lr is None else lr
    if reuse is not None:
        if [id(p) for p in params] != [id(p) for g in reuse.param_groups for p in g["params"]]:
            raise ValueError("make_optimizer(reuse=...) needs the parameters the reused optimizer was made for")
        for group in reuse.param_groups:
            group["lr"] = lr
        state = [t for st in reuse.state.values() for t in st.values() if torch.is_tensor(t)]
        if state:
            torch._foreach_zero_(state)
        return reuse
    if args.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=args.weight_decay)
    return torch.optim.Adam(params, lr=lr, weight_decay=args.weight_decay)


# ----------------------------------------------------------------------------------------------
# Losses shared by several methods
# ----------------------------------------------------------------------------------------------

def nt_xent(z1: torch.Tensor, z2: torch.Tensor, tau: float) -> torch.Tensor:
    """SimCLR's NT-Xent over 2B views: each view's positive is its partner, the other 2B-2 are negatives."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    b = z1.shape[0]
    sim = z @ z.t() / tau
    sim.fill_diagonal_(float("-inf"))                       # a view is not its own negative
    target = torch.cat([torch.arange(b, 2 * b), torch.arange(b)]).to(z.device)
    return F.cross_entropy(sim, target)


def info_nce(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor | None, tau: float) -> torch.Tensor:
    """MoCo's InfoNCE: positive q.k, negatives q.queue (queue rows are normalised keys, no gradient)."""
    q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    pos = (q * k).sum(dim=1, keepdim=True)
    logits = pos if queue is None or len(queue) == 0 else torch.cat([pos, q @ queue.t()], dim=1)
    return F.cross_entropy(logits / tau, torch.zeros(len(q), dtype=torch.long, device=q.device))


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, m: float):
    """xi <- m * xi + (1 - m) * theta for parameters; buffers (BN statistics) are copied."""
    for t, o in zip(target.parameters(), online.parameters()):
        t.mul_(m).add_(o.detach(), alpha=1 - m)
    for t, o in zip(target.buffers(), online.buffers()):
        t.copy_(o)


# ----------------------------------------------------------------------------------------------
# Aggregation
# ----------------------------------------------------------------------------------------------

@torch.no_grad()
def fedavg(states: list[dict], weights=None) -> dict:
    """Weighted average of whole state dicts (weights = sample counts; None = unweighted mean).
    Floating tensors are averaged in float; integer buffers such as BatchNorm's
    num_batches_tracked cannot be, so they get the weighted mean rounded to the nearest integer."""
    w = torch.ones(len(states)) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
    w = (w / w.sum()).tolist()
    out = {}
    for key, ref in states[0].items():
        if ref.is_floating_point():
            out[key] = sum(wi * s[key] for wi, s in zip(w, states)).to(ref.dtype)
        else:
            avg = sum(wi * s[key].double() for wi, s in zip(w, states))
            out[key] = avg.round().to(ref.dtype)
    return out


def state_bytes(module_or_state) -> int:
    """Bytes a state dict takes on the wire (fp32 as stored)."""
    sd = module_or_state.state_dict() if isinstance(module_or_state, nn.Module) else module_or_state
    return sum(t.numel() * t.element_size() for t in sd.values())


# ----------------------------------------------------------------------------------------------
# Evaluation: the kNN monitor and the linear probe, identical for every method
# ----------------------------------------------------------------------------------------------

@torch.no_grad()
def features(encoder: nn.Module, x_uint8: torch.Tensor, augment: Augment, batch: int = 1024) -> torch.Tensor:
    """Encoder outputs of un-augmented images, in eval mode."""
    was_training = encoder.training
    encoder.eval()
    out = torch.cat([encoder(augment.plain(x_uint8[i:i + batch])).float() for i in range(0, len(x_uint8), batch)])
    encoder.train(was_training)
    return out


@torch.no_grad()
def knn_predict(bank, bank_y, query, num_classes: int, k: int = 200, t: float = 0.1, chunk: int = 1024):
    """Weighted kNN vote (InstDisc / MoCo monitor): each of the k most cosine-similar bank features
    votes for its label with weight exp(sim / t)."""
    bank, query = F.normalize(bank, dim=1), F.normalize(query, dim=1)
    k = min(k, len(bank))
    preds = []
    for i in range(0, len(query), chunk):
        sim, idx = (query[i:i + chunk] @ bank.t()).topk(k, dim=1)
        votes = torch.zeros(len(sim), num_classes, device=bank.device)
        votes.scatter_add_(1, bank_y[idx], (sim / t).exp())
        preds.append(votes.argmax(dim=1))
    return torch.cat(preds)


FEW_LABELS = {"1pct": 0.01, "10pct": 0.10}   # the papers' semi-supervised fractions of the training labels
EVAL_KEYS = ("knn_acc", "linear_acc", *(f"{m}_{n}" for n in FEW_LABELS for m in ("knn_acc", "linear_acc")))


def few_label_subset(labels: np.ndarray, fraction: float, num_classes: int, seed: int) -> np.ndarray:
    """Class-balanced seeded subset: round(fraction * N / classes) images of every class (at least one;
    all of a class that has fewer), sorted positions into `labels`."""
    per_class = max(1, round(fraction * len(labels) / num_classes))
    rng = np.random.default_rng([seed, round(fraction * 1e6)])   # its own stream: one subset per fraction
    picked = [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in range(num_classes)]
    return np.sort(np.concatenate(picked))


def linear_probe(train_f, train_y, test_f, test_y, num_classes, epochs=30, seed=0, batch=256, lr=1e-2):
    """One recipe for every method: standardise frozen features with training statistics, train one
    linear layer with Adam (cosine decay), report test accuracy after the LAST epoch."""
    if epochs == 0:
        return float("nan")
    mu, sd = train_f.mean(0), train_f.std(0) + 1e-6
    train_f, test_f = (train_f - mu) / sd, (test_f - mu) / sd
    gen = torch.Generator(device="cpu").manual_seed(seed)
    head = nn.Linear(train_f.shape[1], num_classes).to(train_f.device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head.reset_parameters()
    opt = torch.optim.Adam(head.parameters(), lr=lr, weight_decay=1e-6)
    steps = epochs * math.ceil(len(train_f) / batch)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(epochs):
        order = torch.randperm(len(train_f), generator=gen).to(train_f.device)
        for i in range(0, len(order), batch):
            b = order[i:i + batch]
            loss = F.cross_entropy(head(train_f[b]), train_y[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    with torch.no_grad():
        return (head(test_f).argmax(1) == test_y).float().mean().item()


def alignment(z1: torch.Tensor, z2: torch.Tensor) -> float:
    """Wang & Isola (ICML 2020) L_align, alpha=2: E ||f(x) - f(x+)||^2 over positive pairs, on
    L2-normalised features (0 = the two views of every image map to the same point; at most 4)."""
    z1, z2 = F.normalize(z1.float(), dim=1), F.normalize(z2.float(), dim=1)
    return (z1 - z2).pow(2).sum(dim=1).mean().item()


def uniformity(z: torch.Tensor, t: float = 2.0) -> float:
    """Wang & Isola L_uniform: log E exp(-t ||f(x) - f(y)||^2) over distinct pairs of L2-normalised
    features (lower = spread more evenly over the sphere; 0 = every feature on one point)."""
    z = F.normalize(z.float(), dim=1)
    return torch.pdist(z).pow(2).mul(-t).exp().mean().log().item()


def pca_2d(x: torch.Tensor):
    """The two leading principal directions of the rows of x, by SVD of the centred matrix.
    Returns (mean, 2 x d directions, share of the variance each explains)."""
    x = x.double()
    mean = x.mean(dim=0)
    _, s, vh = torch.linalg.svd(x - mean, full_matrices=False)
    total = (s ** 2).sum()
    share = (s[:2] ** 2 / total).tolist() if total > 0 else [0.0] * len(s[:2])
    if len(vh) < 2:        # one image (--test-size 1, --holdout 1) or one feature: pad with a zero direction
        vh = torch.cat([vh, vh.new_zeros(2 - len(vh), x.shape[1])])
        share += [0.0] * (2 - len(share))
    return mean, vh[:2], share


# ----------------------------------------------------------------------------------------------
# Clustering metrics (fed_cluster.py): numpy int label vectors in, python float out
# ----------------------------------------------------------------------------------------------

def contingency(y_true, y_pred) -> np.ndarray:
    """C[i, j] = number of samples in true class i and predicted cluster j (labels renumbered 0..K-1)."""
    y_true, y_pred = np.asarray(y_true).ravel(), np.asarray(y_pred).ravel()
    if len(y_true) != len(y_pred) or len(y_true) == 0:
        raise ValueError(f"need two non-empty label vectors of one length (got {len(y_true)} and {len(y_pred)})")
    _, t = np.unique(y_true, return_inverse=True)
    _, p = np.unique(y_pred, return_inverse=True)
    c = np.zeros((t.max() + 1, p.max() + 1), dtype=np.int64)
    np.add.at(c, (t, p), 1)
    return c


def hungarian(cost: np.ndarray) -> np.ndarray:
    """Kuhn-Munkres with row/column potentials, O(n^3), for a square cost matrix: returns col with
    row i assigned to column col[i], minimising sum_i cost[i, col[i]]. Index 0 is a virtual column."""
    n = cost.shape[0]
    u, v = np.zeros(n + 1), np.zeros(n + 1)          # potentials: cost[i, j] - u[i] - v[j] >= 0
    match = np.zeros(n + 1, dtype=np.int64)          # match[j] = row (1-based) holding column j; 0 = free
    way = np.zeros(n + 1, dtype=np.int64)            # previous column on the shortest alternating path
    for i in range(1, n + 1):                        # add row i, then augment along a shortest path
        match[0], j0 = i, 0
        minv, used = np.full(n + 1, np.inf), np.zeros(n + 1, dtype=bool)
        while match[j0] != 0:
            used[j0] = True
            i0, free = match[j0], ~used
            reduced = cost[i0 - 1] - u[i0] - v[1:]   # reduced costs from row i0 to every column
            better = free[1:] & (reduced < minv[1:])
            minv[1:][better], way[1:][better] = reduced[better], j0
            j1 = int(np.argmin(np.where(free, minv, np.inf)))
            delta = minv[j1]
            u[match[used]] += delta                  # keep the tree tight, lower the frontier
            v[used] -= delta
            minv[free] -= delta
            j0 = j1
        while j0:                                    # flip the path: each column takes its predecessor's row
            j1 = way[j0]
            match[j0], j0 = match[j1], j1
    col = np.zeros(n, dtype=np.int64)
    col[match[1:] - 1] = np.arange(n)
    return col


def cluster_acc(y_true, y_pred) -> float:
    """ACC = max over one-to-one maps of clusters to classes of the share of samples mapped right."""
    c = contingency(y_true, y_pred)
    k = max(c.shape)
    square = np.zeros((k, k), dtype=np.int64)        # pad: extra clusters/classes match nothing
    square[:c.shape[0], :c.shape[1]] = c
    col = hungarian(square.max() - square)           # maximise matches = minimise (max - matches)
    return float(square[np.arange(k), col].sum() / c.sum())


def _entropy(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def nmi(y_true, y_pred) -> float:
    """I(Y; C) / ((H(Y) + H(C)) / 2), natural log (scikit-learn's default 'arithmetic' normalisation)."""
    c = contingency(y_true, y_pred)
    h_t, h_p = _entropy(c.sum(1)), _entropy(c.sum(0))
    if h_t == 0 and h_p == 0:                        # one class, one cluster: identical partitions
        return 1.0
    pij = c / c.sum()
    outer = pij.sum(1, keepdims=True) * pij.sum(0, keepdims=True)
    nz = pij > 0
    mi = max(float((pij[nz] * np.log(pij[nz] / outer[nz])).sum()), 0.0)
    return mi / ((h_t + h_p) / 2)


def ari(y_true, y_pred) -> float:
    """Adjusted Rand index (Hubert & Arabie 1985): (index - expected) / (max - expected) on pair counts."""
    c = contingency(y_true, y_pred).astype(np.float64)
    pairs = lambda x: x * (x - 1) / 2
    index, a, b, total = pairs(c).sum(), pairs(c.sum(1)).sum(), pairs(c.sum(0)).sum(), pairs(c.sum())
    expected, top = (a * b / total if total else 0.0), (a + b) / 2
    if top == expected:                              # both partitions trivial (one group / all singletons)
        return 1.0
    return float((index - expected) / (top - expected))


# ----------------------------------------------------------------------------------------------
# The run: folder, logging, checkpoint/resume, Ctrl-C, summary
# ----------------------------------------------------------------------------------------------

def start(cls, argv=None):
    """Parse the flags, pick the device, seed, load data, draw the partition, open the run folder.
    Returns (args, run). Bad input ends here with `error: ...` and exit 2."""
    signal.signal(signal.SIGINT, _sigint_before_training)    # Ctrl-C while starting: exit 130, no traceback
    script = Path(sys.argv[0]).stem if argv is None else cls.__module__
    try:
        args = parse_args(cls, argv, script=script)
        args.check()
        run = Run(args, script=script)
    except UserError as e:
        if distributed.launched() and os.environ.get("RANK", "0") != "0":
            time.sleep(5)               # torchrun: every process refuses the same input; process 0 prints it and
            sys.exit(2)                 # ends first (torchrun then stops this one), so its line is never cut off
        refuse(str(e))
    return args, run


def refuse(msg: str, code: int = 2):
    """One `error:` line on stderr and exit (2: bad input; 1: the run failed)."""
    sys.stdout.flush()
    msg = " / ".join(line.strip() for line in str(msg).splitlines() if line.strip())   # one line, always
    print(f"error: {msg}", file=sys.stderr, flush=True)
    sys.exit(code)


def shell_command(script, *args) -> str:
    """The command that runs the file `script` (a relative path: in this repository) with `args`, to be typed
    in this shell as printed: `python` when that is this interpreter (an activated .venv), else this
    interpreter's path (.venv/bin/python after `make run`); the script relative to the working directory
    when it lies inside it, else its absolute path."""
    def typed(path, program=False):          # relative inside the working directory, else absolute
        rel = os.path.relpath(path)
        if rel.startswith(".."):
            return os.path.abspath(path)
        return "./" + rel if program and os.sep not in rel else rel      # a bare name would be looked up in PATH
    on_path = shutil.which("python")         # compare folders, not files: a venv's python is a symlink
    same = on_path is not None and os.path.dirname(os.path.abspath(on_path)) == os.path.dirname(sys.executable)
    return shlex.join(["python" if same else typed(sys.executable, program=True), typed(ROOT / script),
                       *map(str, args)])


_fresh_dir: Path | None = None      # the run folder this process created, until its first checkpoint


def _remove_fresh_dir() -> str:
    """Delete this process's run folder if no checkpoint was written yet; says what happened."""
    global _fresh_dir
    folder, _fresh_dir = _fresh_dir, None
    if folder is not None and not (folder / "checkpoint.pt").exists():
        import shutil
        shutil.rmtree(folder, ignore_errors=True)
        return f"; removed {folder}" if not folder.exists() else f"; could not remove {folder}"
    return ""


def _sigint_before_training(signum, frame):
    signal.signal(signal.SIGINT, signal.SIG_IGN)      # a second Ctrl-C must not interrupt the clean-up
    print(f"\ninterrupted before the first checkpoint: nothing was saved{_remove_fresh_dir()}",
          file=sys.stderr, flush=True)
    sys.exit(130)


def _pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and distributed.launched():        # torchrun: one GPU per process of a machine
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device(name)


def client_seed(seed: int, rnd: int, client: int) -> int:
    """The seed of client `client`'s random stream in round `rnd`: a hash of the three, so that streams
    of neighbouring (round, client) pairs are unrelated."""
    return int(np.random.SeedSequence([seed, rnd, client]).generate_state(1, np.uint64)[0])


class FolderLock:
    """One process at a time in a folder (a run folder, compare.py's --out): an exclusive flock on
    FOLDER/.lock, a file naming its holder. The kernel drops a flock when its process ends, however it
    ends (error, Ctrl-C, kill -9), so a lock file left by a dead process is simply taken over."""

    def __init__(self, folder: Path, user: str):
        self.path, self.fd = Path(folder) / ".lock", None
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
                os.close(fd)
                fail(f"{folder} is in use by {holder}; one process at a time per folder (wait for it to end)")
            with contextlib.suppress(FileNotFoundError):
                if os.path.samestat(os.fstat(fd), os.stat(self.path)):
                    break
            os.close(fd)       # the holder released (and removed) the file between our open and flock: retry
        left = os.read(fd, 200).decode(errors="replace").strip()
        if left:
            print(f"note: taking over the lock of {folder} left by {left}, which holds no lock on it (it ended, "
                  f"or this folder is a copy)", file=sys.stderr)      # a copied .lock names the original's holder
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} ({user})\n".encode(), 0)
        self.fd = fd
        atexit.register(self.release)      # normal end, sys.exit, an exception; os._exit callers release first

    def release(self):
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.path)       # before closing, so that nobody locks a file about to vanish
            os.close(self.fd)
            self.fd = None


class Run:
    """Everything a method's round loop needs besides the method: data, clients, augmentation,
    batching, client sampling, logging, evaluation, checkpoints and the summary."""

    def __init__(self, args: RunArgs, script: str):
        self.args, self.script = args, script
        started = Path(sys.argv[0])          # the file to name in printed commands (a copy elsewhere: that one)
        self.file = started.resolve() if started.stem == script and started.is_file() else ROOT / f"{script}.py"
        if distributed.launched() and not type(args).TORCHRUN:
            if os.environ.get("RANK", "0") != "0":
                sys.exit(2)                 # the line below is printed once, by process 0
            fail(f"{script}.py is not distributed yet (its docstring says why); run it as one process: "
                 f"{shell_command(self.file)} ...")
        self.device = _pick_device(args.device)
        self.world = distributed.World(self.device)     # one process, or this process's place under torchrun
        self.main = self.world.rank == 0                # the process that writes the run folder and prints
        self.lock = None
        if args.resume:       # a second --resume of a folder in use is refused before any work
            self.dir = Path(args.resume)
            if self.main:
                self.lock = FolderLock(self.dir, f"{script}.py")
        torch.manual_seed(args.seed)
        np.random.seed(args.seed)
        self.data, self.train_ids = load_data(args, self.device)
        labels = self.data.train_y.cpu().numpy()
        self.parts = partition(labels, args, log=lambda m: print(m, file=sys.stderr))
        small = min(range(len(self.parts)), key=lambda i: len(self.parts[i]))
        if len(self.parts[small]) < min(args.MIN_CLIENT_IMAGES, len(labels)):
            fail(f"the partition gives client {small} {len(self.parts[small])} image(s) ({args.clients} clients, "
                 f"{len(labels)} images); a client needs {args.MIN_CLIENT_IMAGES} to take a training step")
        self.counts = class_counts(labels, self.parts, self.data.num_classes)
        self.clients = [torch.as_tensor(p, device=self.device) for p in self.parts]
        self.sizes = torch.tensor([len(p) for p in self.parts], dtype=torch.float64)
        self.augment = Augment(self.data, args.crop_min)
        self.start_round, self.history, self.elapsed0 = 1, [], 0.0
        self.images_total, self.train_s_total = 0, 0.0
        self._saved_round = 0                 # the round of the last checkpoint written
        self._ckpt = self.world.broadcast(self._read_checkpoint() if args.resume and self.main else None)
        self.incomplete: list[str] = []       # reasons the summary cannot be called complete
        if not args.resume and self.main:
            global _fresh_dir
            try:
                self.dir = self._new_dir()
            except OSError as e:
                fail(f"cannot create a run folder in {args.out} ({e.strerror})")
            _fresh_dir = self.dir
            self.lock = FolderLock(self.dir, f"{script}.py")
            try:
                self._write_config()
                self._write_partition()
            except WriteError as e:
                refuse(f"{e}; nothing was saved{_remove_fresh_dir()}", code=1)
        self.dir = self.world.broadcast(self.dir if self.main else None)
        self.round, self._client_rng = 0, {}
        self.upload_bytes = 0                  # bytes of the uploads exchanged by gather() this round
        self._interrupted = False
        self._t0 = self._t_round = time.time()
        self._eval_s = 0.0
        self._state = None
        self.meanings, self._explained = dict(MEANINGS), False
        procs = f", {self.world.size} processes (torchrun)" if self.world.size > 1 else ""
        queries = (f"{len(self.data.test_y)} validation images held out of the training set (--holdout; the "
                   f"test set is not used)" if args.holdout else f"{len(self.data.test_y)} test images")
        self.say(f"{script}: {args.dataset} ({len(labels)} train / {queries}), "
                 f"{args.clients} clients, partition {args.partition}, device {self.device}{procs}; "
                 f"run folder {self.dir}")

    def explain(self, loss: str = "", **keys: str):
        """What the method's loss and its diagnostics keys mean: the loss at once (before round 1), the keys
        under the first diagnostics line they appear in."""
        if loss:
            self.say(textwrap.fill(f"loss: {loss}", WIDTH, subsequent_indent="      "))
        self.meanings.update(keys)

    def say(self, msg: str, err: bool = False):
        """Print once per run: on the main process only (under torchrun every process runs this code)."""
        if self.main:
            print(msg, file=sys.stderr if err else sys.stdout, flush=True)

    # --- run folder -------------------------------------------------------------------------
    def _new_dir(self) -> Path:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        base = Path(self.args.out) / f"{self.script}-{self.args.dataset}-{self.args.partition}-s{self.args.seed}-{stamp}"
        path, i = base, 1
        while True:
            try:
                path.mkdir(parents=True)      # atomic: two runs started in the same second get two folders
                return path
            except FileExistsError:
                path, i = Path(f"{base}-{i}"), i + 1

    def _write_config(self):
        try:
            commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                    timeout=5).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            commit = None
        cfg = {"script": self.script, "args": dataclasses.asdict(self.args), "command": " ".join(sys.argv),
               "versions": {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__},
               "git_commit": commit, "device": str(self.device),
               "device_name": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else platform.processor()}
        _write_json(self.dir / "config.json", cfg)

    def _write_partition(self):
        clients = [{"client": i, "size": len(p), "class_counts": self.counts[i].tolist(),
                    "indices": self.train_ids[p].tolist()} for i, p in enumerate(self.parts)]
        _write_json(self.dir / "partition.json", {
            "partition": self.args.partition, "seed": self.args.seed, "clients": clients,
            "note": "indices are positions in the dataset's original training split"})
        plot_partition(self.counts, self.dir / "partition.png", self.title(), CLASS_NAMES.get(self.args.dataset))

    def title(self) -> str:
        """Script, dataset, partition, clients and seed: the title of every plot of the run."""
        a = self.args
        part = {"iid": "IID", "dirichlet": f"Dirichlet alpha {a.alpha:g}", "skew": f"skew ratio {a.skew_ratio:g}",
                "classes": f"{a.classes_per_client} classes per client"}[a.partition] if a.clients > 1 else "centralized"
        return f"{self.script}: {a.dataset}, {part}, {a.clients} client{'s' * (a.clients > 1)}, seed {a.seed}"

    # --- the loop's helpers -------------------------------------------------------------------
    def batches(self, idx: torch.Tensor, batch_size: int | None = None):
        """Shuffled mini-batches of a client's index tensor; the last partial batch is dropped unless
        the client holds fewer images than one batch (BatchNorm needs at least 2)."""
        bs = batch_size or self.args.batch_size
        order = idx[torch.randperm(len(idx), device=idx.device)]
        if len(order) < bs:
            if len(order) >= 2:
                yield order
            return
        for i in range(0, len(order) - bs + 1, bs):
            yield order[i:i + bs]

    def two_views(self, idx: torch.Tensor):
        x = self.data.train_x[idx]
        return self.augment(x), self.augment(x)

    def sample_clients(self) -> list[int]:
        """max(1, round(participation * clients)) distinct clients, sorted by id; drawn from the round's own
        seed, so every process (torchrun) and a resumed run draw the same ones."""
        n = self.args.clients
        m = max(1, int(round(self.args.participation * n)))
        if m == n:
            return list(range(n))
        gen = torch.Generator().manual_seed(client_seed(self.args.seed, self.round, n))   # n: no client's id
        return sorted(torch.randperm(n, generator=gen)[:m].tolist())

    def my_clients(self, clients) -> list:
        """The clients of `clients` this process trains: all of them in one process, a share under torchrun."""
        return self.world.mine(list(clients))

    @contextlib.contextmanager
    def client(self, c: int):
        """Client c's own random stream: inside `with run.client(c):` every torch draw (batch order,
        augmentation, dropout) comes from a stream seeded by (seed, round, c) that continues where c's last
        block of this round stopped. So a client's randomness does not depend on which clients ran before
        it, or in which process; the stream outside (initialisation, server draws) is not moved."""
        cuda = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            saved = self._client_rng.get((self.round, c))
            if saved is None:
                torch.manual_seed(client_seed(self.args.seed, self.round, c))
            else:
                torch.set_rng_state(saved[0])
                if cuda:
                    torch.cuda.set_rng_state(saved[1], self.device)
            try:
                yield
            finally:
                self._client_rng[(self.round, c)] = (torch.get_rng_state(),
                                                     torch.cuda.get_rng_state(self.device) if cuda else None)

    def gather(self, *uploads: dict):
        """Each argument: {client: what it sends} for this process's clients -> the same for every client of
        the round, in client order (torchrun: one all-gather; one process: as given). The bytes of the
        tensors exchanged are counted in the round's `upload_bytes`."""
        merged = self.world.gather(uploads)
        self.upload_bytes += distributed.payload_bytes(merged)
        return merged if len(merged) > 1 else merged[0]

    def rounds(self, state: dict):
        """Yield round numbers 1..R; on --resume first restore `state` (modules, optimizers, tensors
        and dicts, by name) and the random generators from the checkpoint and skip finished rounds."""
        self._state = state
        if self.args.resume:
            self._restore(state)
            self.say(f"resumed from {self.dir / 'checkpoint.pt'} after round {self.start_round - 1}")
        signal.signal(signal.SIGINT, self._on_sigint)
        self._t0 = time.time()
        for rnd in range(self.start_round, self.args.rounds + 1):
            self._t_round, self._eval_s = time.time(), 0.0
            self.round, self._client_rng, self.upload_bytes = rnd, {}, 0
            yield rnd
        signal.signal(signal.SIGINT, self._on_sigint_final)      # the final evaluation starts now

    def _on_sigint(self, signum, frame):
        if self._interrupted:    # second Ctrl-C: stop now, the last checkpoint stays
            if not (self.dir / "checkpoint.pt").exists():
                print(f"\ninterrupted before the first checkpoint: nothing was saved{_remove_fresh_dir()}",
                      file=sys.stderr, flush=True)
            else:
                print(f"\ninterrupted; resume with: {shell_command(self.file, '--resume', self.dir)}",
                      file=sys.stderr, flush=True)
            if self.lock is not None:
                self.lock.release()      # os._exit skips atexit
            os._exit(130)
        self._interrupted = True
        self.say("\nCtrl-C: stopping after this round (press again to stop now)", err=True)

    def _on_sigint_final(self, signum, frame):
        """Ctrl-C during the final evaluation: every round is in the checkpoint, so stop now;
        --resume skips the rounds and runs the evaluation again."""
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        print(f"\ninterrupted during the final evaluation (all {self.args.rounds} rounds are saved); finish it "
              f"with: {shell_command(self.file, '--resume', self.dir)}", file=sys.stderr, flush=True)
        sys.exit(130)

    def is_eval_round(self, rnd: int) -> bool:
        """Every --eval-every rounds, and the first and the last round (so every curve has a start and an end)."""
        return rnd % self.args.eval_every == 0 or rnd in (1, self.args.rounds)

    def log(self, rnd: int, loss, images: int, encoder: nn.Module | None = None, **extra):
        """End of a round: kNN on evaluation rounds (if an encoder is given), one metrics line,
        one printed line, the checkpoint; stops with exit 130 here if Ctrl-C was pressed."""
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        train_s = time.time() - self._t_round - self._eval_s
        if not math.isfinite(_num(loss)):      # one .item() per round; the loss never recovers from nan/inf
            kept = ("the checkpoint of the last good round is kept" if (self.dir / "checkpoint.pt").exists()
                    else "nothing was saved" + _remove_fresh_dir())
            refuse(f"the training loss became {_num(loss)} in round {rnd}: training diverged; try a smaller --lr "
                   f"(now {self.args.lr}); {kept}; no summary was written", code=1)
        row = {"round": rnd, "loss": _num(loss), "images": int(images),
               "images_per_s": images / max(train_s, 1e-9)}
        if encoder is not None and self.is_eval_round(rnd) and self.main:   # the same model on every process
            row.update(self.monitor(encoder))
            row.update(self.geometry(encoder))
        if self.upload_bytes:          # what run.gather exchanged: under torchrun, what crossed between processes
            row["upload_bytes"] = self.upload_bytes
        row.update({k: _num(v) for k, v in extra.items()})
        self.images_total += int(images)
        self.train_s_total += train_s
        row["elapsed_s"] = self.elapsed0 + time.time() - self._t0
        self.history.append(row)
        if self.main:         # the whole file each round, through a rename: a full disk never leaves half a line
            try:
                write_atomic(self.dir / "metrics.jsonl", "".join(_dumps(r) + "\n" for r in self.history))
            except WriteError as e:
                self._write_failed(e, f"the run stops in round {rnd}")
        eta = (row["elapsed_s"] - self.elapsed0) / (rnd - self.start_round + 1) * (self.args.rounds - rnd)
        knn = f"  kNN {row['knn_acc']:.4f}" if "knn_acc" in row else ""
        self.say(f"round {rnd}/{self.args.rounds}  loss {row['loss']:.4f}  {row['images_per_s']:.0f} img/s  "
                 f"elapsed {row['elapsed_s']:.0f}s  ETA {eta:.0f}s{knn}")
        diagnostics = {k: v for k, v in row.items() if k not in _ROUND_KEYS}
        if self.is_eval_round(rnd) and diagnostics:      # the method's own numbers, alignment, uniformity
            self.say(textwrap.indent(format_metrics(diagnostics, width=WIDTH - 2), "  "))
            told = [f"{k}: {self.meanings[k]}" for k in diagnostics if k in self.meanings]
            if told and not self._explained:              # once a run: what the keys mean
                self._explained = True
                self.say(textwrap.fill("; ".join(told) + "; all of them, every round: metrics.jsonl", WIDTH,
                                       initial_indent="  (", subsequent_indent="   ") + ")")
        stop = self.world.any(self._interrupted)     # torchrun: all stop after the same round (a Ctrl-C that
        self._save(rnd)                               # lands during this exchange counts at the next round)
        if stop:
            self.say(f"interrupted after round {rnd}; resume with: "
                     f"{shell_command(self.file, '--resume', self.dir)}", err=True)
            sys.exit(130)

    def timed_eval(self, fn, *a, **kw):
        """Run an evaluation inside a round without counting it as training time."""
        t = time.time()
        out = fn(*a, **kw)
        self._eval_s += time.time() - t
        return out

    # --- evaluation -------------------------------------------------------------------------
    def monitor(self, encoder: nn.Module) -> dict:
        """The per-round kNN monitor from one pass of features: the whole training set as the bank (knn_acc)
        and the 1 % label subset as the bank (knn_acc_1pct, the few-label curve)."""
        t = time.time()
        bank = features(encoder, self.data.train_x, self.augment)
        query = features(encoder, self.data.test_x, self.augment)
        ids = self.few_label_ids["1pct"]
        acc = lambda f, y: (knn_predict(f, y, query, self.data.num_classes) == self.data.test_y).float().mean().item()
        out = {"knn_acc": acc(bank, self.data.train_y), "knn_acc_1pct": acc(bank[ids], self.data.train_y[ids])}
        self._eval_s += time.time() - t
        return out

    def knn(self, encoder: nn.Module) -> float:
        return self.monitor(encoder)["knn_acc"]

    @torch.no_grad()
    def geometry(self, encoder: nn.Module, n: int = 512) -> dict:
        """Alignment and uniformity (Wang & Isola, ICML 2020) on a fixed seeded sample of n evaluation
        images: alignment between two augmented views of each, uniformity of the plain images. The views
        come from their own seed inside fork_rng, so the training random stream is not moved."""
        t = time.time()
        idx = torch.randperm(len(self.data.test_y), generator=torch.Generator().manual_seed(self.args.seed + 7))[:n]
        x = self.data.test_x[idx.to(self.device)]
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(self.args.seed + 54321)
            v1, v2 = self.augment(x), self.augment(x)
        was_training = encoder.training
        encoder.eval()
        out = {"alignment": alignment(encoder(v1), encoder(v2)), "uniformity": uniformity(encoder(self.augment.plain(x)))}
        encoder.train(was_training)
        self._eval_s += time.time() - t
        return out

    def evaluate(self, encoder: nn.Module) -> dict:
        """kNN and linear probe of a frozen encoder (seeded, so it does not depend on training RNG), with all
        training labels and with the few-label subsets (bank / probe set = the subset; queries = the test set).
        Keys: EVAL_KEYS, e.g. knn_acc, linear_acc, knn_acc_1pct, linear_acc_10pct."""
        t = time.time()
        tr = features(encoder, self.data.train_x, self.augment)
        te = features(encoder, self.data.test_x, self.augment)
        out = {}
        for name, ids in {"": None, **self.few_label_ids}.items():
            f, y = (tr, self.data.train_y) if ids is None else (tr[ids], self.data.train_y[ids])
            key = f"_{name}" if name else ""
            pred = knn_predict(f, y, te, self.data.num_classes)                 # k = min(200, bank size)
            out["knn_acc" + key] = (pred == self.data.test_y).float().mean().item()
            out["linear_acc" + key] = linear_probe(f, y, te, self.data.test_y, self.data.num_classes,
                                                   self.args.probe_epochs, seed=self.args.seed)
        self._eval_s += time.time() - t
        return {k: out[k] for k in EVAL_KEYS}

    @property
    def few_label_ids(self) -> dict:
        """{"1pct": index tensor, "10pct": ...}: the same subsets for every encoder of a run (seeded by --seed)."""
        if not hasattr(self, "_few_label_ids"):
            labels = self.data.train_y.cpu().numpy()
            self._few_label_ids = {name: torch.as_tensor(few_label_subset(labels, frac, self.data.num_classes,
                                                                          self.args.seed), device=self.device)
                                   for name, frac in FEW_LABELS.items()}
        return self._few_label_ids

    def random_encoder(self) -> nn.Module:
        """A freshly initialised encoder of the same architecture (seeded apart from training)."""
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(self.args.seed + 12345)
            return make_encoder(self.args, self.data.channels).to(self.device)

    def finish(self, encoder: nn.Module | None = None, results: dict | None = None,
               encoders: list | None = None, encoders_per: str = "client", encoder_note: str = "", **extra):
        """Final evaluation, the random-encoder row, encoder.pt (the trained `encoder`, or the list
        `encoders` of a run with one per client / cluster), curves.png, features.png, and summary.json
        (written last). `results` (instead of an encoder): a dict with every key of evaluate(), e.g. a
        mean over clients; `encoder_note` then says in features.png's title which model `encoder` is.
        The summary is complete only if something trained and every headline metric
        is a number; otherwise it says why in `incomplete`, and the process ends with exit status 1.
        Under torchrun the main process does all of this; the others return None."""
        signal.signal(signal.SIGINT, self._on_sigint_final)
        if self.world.size > 1 and encoders is not None and len(encoders) == self.args.clients:
            parts = self.world.collect([e.state_dict() for e in encoders])   # client c's encoder lives on c % N
            for c, e in enumerate(encoders if self.main else []):
                e.load_state_dict(parts[c % self.world.size][c])
        self.world.close()             # no collective after this
        if not self.main:
            return None
        results = {k: _num(v) for k, v in results.items()} if results is not None else self.evaluate(encoder)
        if missing := [k for k in EVAL_KEYS if k not in results]:      # a method's own results= dict; keep its run
            print(f"warning: run.finish(results=...) lacks {', '.join(missing)}: average every key of "
                  "run.evaluate(), or compare.py leaves these cells empty", file=sys.stderr)
        rand = self.evaluate(self.random_encoder())
        if self.images_total == 0:
            self.incomplete.append("no client took a training step in any round (nothing was trained)")
        bad = [k for d in (results, rand) for k, v in d.items()
               if isinstance(v, float) and not math.isfinite(v)]
        if bad:
            self.incomplete.append(f"metric(s) {', '.join(sorted(set(bad)))} could not be computed")
        gain = {k: results[k] - rand[k] for k in EVAL_KEYS if k in results}   # what training added (same seed, network)
        summary = {**results, "random_encoder": rand, "gain": gain,
                   "images_per_s": self.images_total / max(self.train_s_total, 1e-9),
                   "wall_s": self.elapsed0 + time.time() - self._t0, "rounds": self.args.rounds,
                   **{k: _num(v) if not isinstance(v, (dict, list, str)) else v for k, v in extra.items()},
                   "complete": not self.incomplete}
        if self.args.holdout:         # the accuracies above are validation numbers, not test numbers
            summary["eval_split"] = (f"validation: {len(self.data.test_y)} training images held out by --holdout "
                                     f"{self.args.holdout}; the test set was not used")
        if self.incomplete:
            summary["incomplete"] = "; ".join(self.incomplete)
        trained = [encoder] if encoder is not None else list(encoders or [])
        try:
            self.save_encoders(trained, encoders_per)
            plot_curves(self.history, self.dir / "curves.png", self.title(), baseline=rand["knn_acc"])
            if trained:
                self.plot_features(trained[0], f"\n{encoder_note}" if encoder_note else
                                   "" if len(trained) == 1 else f" ({encoders_per} 0's encoder)")
            _write_json(self.dir / "summary.json", summary)
        except WriteError as e:
            self._write_failed(e, "the final evaluation's files are not all written")
        for line in final_report(results, rand):
            print(line, file=sys.stderr if line.startswith("warning:") else sys.stdout, flush=True)
        if self.args.holdout:
            print(f"(accuracies on the {len(self.data.test_y)} validation images of --holdout, not on the test set)",
                  flush=True)
        print(f"run folder: {self.dir}", flush=True)
        if self.incomplete:
            refuse(f"the run is not complete: {summary['incomplete']}", code=1)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        return summary

    def save_encoders(self, encoders: list, per: str = "client"):
        """encoder.pt for load_encoder: each trained encoder as a plain tensor state dict in make_encoder's
        layout (MocoSFL evaluates its client and server halves joined: same tensors in the same order),
        so torch.load(weights_only=True) reads it. The layout is checked by comparing outputs."""
        states, x = [], self.data.test_x[:8]
        for enc in encoders:
            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                canon = make_encoder(self.args, self.data.channels).to(self.device)
            src, dst = enc.state_dict(), canon.state_dict()
            same = len(src) == len(dst) and all(a.shape == b.shape for a, b in zip(src.values(), dst.values()))
            if same:
                canon.load_state_dict(dict(zip(dst.keys(), src.values())))
                same = torch.allclose(features(canon, x, self.augment), features(enc, x, self.augment),
                                      rtol=1e-3, atol=1e-4)
            if not same:
                print(f"warning: {self.script}'s encoder is not laid out as make_encoder's; no encoder.pt written",
                      file=sys.stderr)
                return
            states.append({k: v.detach().cpu() for k, v in canon.state_dict().items()})
        if states:
            _save_torch({"encoders": states, "per": per}, self.dir / "encoder.pt")

    def plot_features(self, encoder: nn.Module, note: str = ""):
        """features.png: PCA of up to 2000 test features coloured by class, and of up to 2000 training
        features (seeded sample) in the same projection coloured by the client that holds the image."""
        gen = torch.Generator().manual_seed(self.args.seed + 3)
        te = torch.randperm(len(self.data.test_y), generator=gen)[:2000].to(self.device)
        tr = torch.randperm(len(self.data.train_y), generator=gen)[:2000].to(self.device)
        owner = torch.full((len(self.data.train_y),), -1, dtype=torch.long, device=self.device)
        for c, idx in enumerate(self.clients):
            owner[idx] = c
        geo = self.geometry(encoder)
        plot_features(features(encoder, self.data.test_x[te], self.augment).cpu(), self.data.test_y[te].cpu(),
                      features(encoder, self.data.train_x[tr], self.augment).cpu(), owner[tr].cpu(), self.args.clients,
                      self.dir / "features.png", self.title() + note, CLASS_NAMES.get(self.args.dataset), geo)

    # --- checkpoint ---------------------------------------------------------------------------
    def _save(self, rnd: int):
        state = {k: _state_of(v) for k, v in self._state.items()}
        if self.world.size > 1:        # per-client state (local models, queues, targets): client c's is on process c % N
            per_client = [k for k, v in self._state.items() if isinstance(v, (list, nn.ModuleList, dict)) or
                          isinstance(v, torch.Tensor) and v.dim() > 0 and len(v) == self.args.clients]
            parts = self.world.collect({k: state[k] for k in per_client})
            if not self.main:
                return
            for k in per_client:
                state[k] = self._merge_clients(k, parts)
        ckpt = {"round": rnd, "history": self.history, "images_total": self.images_total,
                "train_s_total": self.train_s_total, "elapsed_s": self.history[-1]["elapsed_s"],
                "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
                        "cuda": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else None},
                "state": state}
        try:
            _save_torch(ckpt, self.dir / "checkpoint.pt")
        except WriteError as e:          # never train on unsaved: stop at the last good checkpoint
            self._write_failed(e, f"the run stops after round {rnd}")
        self._saved_round = rnd
        global _fresh_dir
        _fresh_dir = None                        # from now on the folder can be resumed: never delete it

    def _write_failed(self, e: WriteError, what: str):
        """A file of the run could not be written: one `error:` line saying what survives, exit status 1."""
        if (self.dir / "checkpoint.pt").exists():
            kept = (f"the checkpoint of round {self._saved_round} is kept; free space (or make the folder writable), "
                    f"then resume with: {shell_command(self.file, '--resume', self.dir)}")
        else:
            kept = "nothing was saved" + _remove_fresh_dir()
        refuse(f"{e}: {what}; {kept}; no summary was written", code=1)

    def _merge_clients(self, k: str, parts: list):
        """State entry k for the checkpoint from every process's copy: of a list, ModuleList or tensor with one
        entry (row) per client, entry c from process c % N; of a dict keyed by client id, each client's item from its
        process; anything else (the same on every process) from process 0."""
        obj, n = self._state[k], self.world.size
        if isinstance(obj, nn.ModuleList) and len(obj) == self.args.clients:       # state dict keys "c.name"
            return {name: parts[int(name.split(".")[0]) % n][k][name] for name in parts[0][k]}
        if isinstance(obj, list) and len(obj) == self.args.clients:
            return [parts[c % n][k][c] for c in range(len(obj))]
        if isinstance(obj, torch.Tensor):           # one row per client (a replicated one has equal rows anyway)
            return torch.stack([parts[c % n][k][c] for c in range(len(obj))])
        if isinstance(obj, dict) and all(isinstance(c, int) for p in parts for c in p[k]):
            return {c: v for r, p in enumerate(parts) for c, v in sorted(p[k].items()) if c % n == r}
        return parts[0][k]

    def _read_checkpoint(self) -> dict:
        """Load RUN_DIR/checkpoint.pt for --resume, refusing in one line if it is not a whole checkpoint."""
        path = self.dir / "checkpoint.pt"
        try:
            ckpt = torch.load(path, map_location=self.device, weights_only=False)
            missing = {"round", "history", "images_total", "train_s_total", "elapsed_s", "rng", "state"} - set(ckpt)
        except Exception as e:                   # torch.load raises many types on truncated or foreign files
            fail(f"--resume: {path} cannot be read, it is truncated or not a checkpoint "
                 f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
        if missing:
            fail(f"--resume: {path} is not a checkpoint of this code (missing {', '.join(sorted(missing))})")
        return ckpt

    def _restore(self, state: dict):
        ckpt, self._ckpt = self._ckpt, None
        if (self.dir / "summary.json").exists():
            self.say(f"note: {self.dir} already holds a complete run; re-running its final evaluation", err=True)
        try:
            if set(ckpt["state"]) != set(state):
                raise KeyError(f"it holds {sorted(ckpt['state'])}, this script needs {sorted(state)}")
            for k, v in state.items():
                _load_into(v, ckpt["state"][k])
            torch.set_rng_state(ckpt["rng"]["torch"])
            np.random.set_state(ckpt["rng"]["numpy"])
            if ckpt["rng"]["cuda"] is not None and self.device.type == "cuda":
                torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
        except (RuntimeError, KeyError, ValueError, TypeError, IndexError) as e:
            refuse(f"--resume: {self.dir / 'checkpoint.pt'} does not fit the network that config.json describes "
                   f"({type(e).__name__}: {str(e).splitlines()[0][:300]})")
        self.start_round = ckpt["round"] + 1
        self.history = ckpt["history"]
        self.images_total, self.train_s_total = ckpt["images_total"], ckpt["train_s_total"]
        self.elapsed0 = ckpt["elapsed_s"]
        self._saved_round = ckpt["round"]
        if self.main:                            # drop lines of rounds after the checkpoint
            try:
                write_atomic(self.dir / "metrics.jsonl", "".join(_dumps(r) + "\n" for r in self.history))
            except WriteError as e:
                self._write_failed(e, "the run cannot resume")


_ROUND_KEYS = {"round", "loss", "images", "images_per_s", "elapsed_s", "knn_acc"}   # the round line itself
WIDTH = 100                  # console lines of diagnostics are wrapped at this many characters


def format_metrics(metrics: dict, width: int | None = None) -> str:
    """`name value` pairs for the console: 4 significant digits, whole numbers as integers, byte counts in
    MiB, lists cut at 10; with `width`, lines of at most that many characters (a pair is never split)."""
    def fmt(k, v):
        if isinstance(v, (int, float)) and not isinstance(v, bool) and "bytes" in k:
            return f"{v / 2 ** 20:.3g} MiB"
        if isinstance(v, float):
            return str(int(v)) if v.is_integer() and abs(v) < 1e9 else f"{v:.4g}"
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(fmt("", _num(x)) for x in v[:10]) + (", ..." if len(v) > 10 else "") + "]"
        return str(v)
    lines = [""]
    for pair in (f"{k} {fmt(k, v)}" for k, v in metrics.items()):
        sep = "  " if lines[-1] else ""
        if width and lines[-1] and len(lines[-1]) + len(sep) + len(pair) > width:
            lines.append(pair)
        else:
            lines[-1] += sep + pair
    return "\n".join(lines)


# What the console's diagnostics keys mean: said once, under the first diagnostics line of a run (Run.explain adds
# a method's own)
MEANINGS = {"knn_acc_1pct": "kNN with 1 % of the labels",
            "alignment": "distance of two views' features, lower = they agree",
            "uniformity": "lower = features spread more evenly (both Wang & Isola 2020, 512 test images)",
            "upload_bytes": "this round's uploads",
            "lr": "the learning rate of this round"}


def final_report(results: dict, rand: dict) -> list[str]:
    """The closing lines: the trained encoder next to its untrained network, the gain, and a
    `warning:` line when training did not beat the untrained network (kNN or linear probe)."""
    gain = {k: results[k] - rand[k] for k in ("knn_acc", "linear_acc")}
    lines = [f"learned encoder: kNN {results['knn_acc']:.4f}  linear {results['linear_acc']:.4f}",
             f"random encoder:  kNN {rand['knn_acc']:.4f}  linear {rand['linear_acc']:.4f}",
             f"gain:            kNN {gain['knn_acc']:+.4f}  linear {gain['linear_acc']:+.4f}  "
             "(learned - random: what training added)"]
    worse = [f"{name} {gain[k]:+.4f}" for k, name in (("knn_acc", "kNN"), ("linear_acc", "linear"))
             if gain[k] <= 0]         # a NaN gain (no probe: --probe-epochs 0) is not flagged
    if worse:
        lines.append(f"warning: the trained encoder is not better than its untrained network ({', '.join(worse)}); "
                     "train longer (--rounds, --local-epochs) or compare with the expected result in the script's docstring")
    return lines


# ----------------------------------------------------------------------------------------------
# Using a trained encoder outside this repository's scripts
# ----------------------------------------------------------------------------------------------

class Preprocess:
    """What a loaded encoder expects: images N x C x H x W as uint8 (0-255) or float (0-1), normalised
    with the training set's per-channel mean and std (no augmentation)."""

    def __init__(self, mean, std):
        self.mean, self.std = tuple(mean), tuple(std)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != len(self.mean):
            raise ValueError(f"expected images N x {len(self.mean)} x H x W, got shape {tuple(x.shape)}")
        x = x.float().div(255) if x.dtype == torch.uint8 else x.float()
        mean = torch.tensor(self.mean, device=x.device).view(1, -1, 1, 1)
        return (x - mean) / torch.tensor(self.std, device=x.device).view(1, -1, 1, 1)

    def __repr__(self):
        return f"Preprocess(mean={self.mean}, std={self.std})"


def load_encoder(run_dir, index: int | None = None, device="cpu") -> nn.Module:
    """The trained encoder of a finished run folder of any method, in eval mode on `device`, with
    `.preprocess` (images -> the normalised input it was trained on), `.dim` (feature size) and
    `.config` (the run's arguments). Runs with several encoders (local_cl: one per client;
    dec_ssl --featarc: one per cluster) need `index`. Reads encoder.pt with weights_only=True."""
    run_dir = Path(run_dir)
    weights, config = run_dir / "encoder.pt", run_dir / "config.json"
    if not weights.is_file() or not config.is_file():
        fail(f"{run_dir}: no encoder.pt and config.json (a run folder gets encoder.pt when its run finishes)")
    why = lambda e: f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
    try:                                     # a damaged file: one UserError naming it, whatever torch raises
        saved = torch.load(weights, map_location=device, weights_only=True)
    except Exception as e:
        raise UserError(f"{weights} cannot be read: it is truncated or not an encoder.pt ({why(e)})") from None
    states = saved.get("encoders") if isinstance(saved, dict) else None
    if not isinstance(states, list) or not states or not all(isinstance(st, dict) for st in states):
        fail(f"{weights} is not an encoder.pt of this code (it holds no list of encoder state dicts)")
    per = saved.get("per", "encoder")
    if index is None and len(states) > 1:
        fail(f"{run_dir} holds {len(states)} encoders, one per {per}: pass index=0..{len(states) - 1}")
    if not 0 <= (index or 0) < len(states):
        fail(f"index {index}: {run_dir} holds {len(states)} encoder(s) (index 0..{len(states) - 1})")
    try:
        cfg = json.loads(config.read_text())["args"]
        args = RunArgs(**{f.name: cfg[f.name] for f in dataclasses.fields(RunArgs) if f.name in cfg})
        mean, std = STATS[args.dataset]
        encoder = make_encoder(args, len(mean)).to(device)
    except Exception as e:                   # not JSON, no "args", an unknown dataset, a width that is no number
        raise UserError(f"{config} does not describe a network this code can build ({why(e)})") from None
    try:
        encoder.load_state_dict(states[index or 0])
    except Exception as e:                   # another width or encoder than config.json says
        raise UserError(f"{weights} does not fit the network that {config} describes ({why(e)})") from None
    encoder.preprocess, encoder.config = Preprocess(mean, std), cfg
    return encoder.eval()


def _state_of(obj):
    if hasattr(obj, "state_dict"):
        return obj.state_dict()
    if isinstance(obj, (list, tuple)):
        return [_state_of(o) for o in obj]
    if isinstance(obj, dict):
        return {k: _state_of(v) for k, v in obj.items()}
    return obj.clone() if isinstance(obj, torch.Tensor) else obj


def _load_into(obj, saved):
    """Restore in place, so the method's own references stay valid: modules and optimizers by
    load_state_dict, tensors by copy_, lists element by element, dicts by replacing their content."""
    if hasattr(obj, "load_state_dict"):
        obj.load_state_dict(saved)
    elif isinstance(obj, torch.Tensor):
        obj.copy_(saved)
    elif isinstance(obj, list):
        for o, s in zip(obj, saved):
            _load_into(o, s)
    elif isinstance(obj, dict):
        obj.clear()
        obj.update(saved)
    else:
        raise TypeError(f"cannot restore a {type(obj).__name__} in place; keep it in a dict or a module")


def _num(v):
    if isinstance(v, torch.Tensor):
        return v.item()
    return float(v) if isinstance(v, (int, float, np.floating, np.integer)) and not isinstance(v, bool) else v


def _finite_or_none(obj):
    """nan/inf become null: bare NaN and Infinity are not JSON, and strict readers reject them."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_none(v) for v in obj]
    return obj


def _dumps(obj, **kw) -> str:
    return json.dumps(_finite_or_none(obj), allow_nan=False, **kw)


class WriteError(Exception):
    """A file could not be written (a full disk, a read-only folder); the message names the file and why."""


def write_atomic(path, data: bytes | str):
    """Write `data` to `path` through a temporary file in the same folder and a rename, so that a reader sees
    the old file or the whole new one, never half of it. A failure raises WriteError naming the path."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):     # a read-only folder refuses the clean-up too
            tmp.unlink(missing_ok=True)
        why = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded"}.get(e.errno, e.strerror or str(e))
        raise WriteError(f"cannot write {path} ({why})") from None


def _save_torch(obj, path):
    """torch.save through write_atomic (serialised in memory first: torch.save's own errors on a full disk
    are obscure C++ messages)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    write_atomic(path, buf.getvalue())


def _save_fig(fig, path):
    """savefig through write_atomic; the figure is closed either way."""
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=80)
    finally:
        _plt().close(fig)
    write_atomic(path, buf.getvalue())


def _write_json(path: Path, obj):
    write_atomic(path, _dumps(obj, indent=1))


# ----------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------

def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _client_ticks(n: int, most: int = 40) -> list[int]:
    """Every client when there are at most `most`, else every k-th and the last (a readable subset)."""
    step = max(1, math.ceil(n / most))
    return sorted(set(range(0, n, step)) | {n - 1})


def plot_partition(counts: np.ndarray, path: Path, title: str, class_names=None) -> dict:
    """Heat map of images per client (rows) and class (columns), class names on the x axis, every client
    (or a readable subset of hundreds) on the y axis, counts written in the cells when they fit.
    Returns the tick labels drawn (for tests)."""
    plt = _plt()
    n, c = counts.shape
    names = list(class_names) if class_names is not None and len(class_names) == c else [str(k) for k in range(c)]
    fig, ax = plt.subplots(figsize=(min(3 + 0.55 * c, 14), min(2 + 0.3 * n, 12)))
    im = ax.imshow(counts, aspect="auto", cmap="viridis", interpolation="nearest")
    xt = list(range(c)) if c <= 20 else list(range(0, c, 10))       # CIFAR-100: every 10th class number
    ax.set_xticks(xt, [names[k] for k in xt], rotation=45 if class_names is not None else 0, ha="right"
                  if class_names is not None else "center", fontsize=8)
    yt = _client_ticks(n)
    ax.set_yticks(yt, [str(k) for k in yt], fontsize=8 if n <= 20 else 6)
    if n * c <= 400:                                                 # numbers in the cells of small maps
        for (i, j), v in np.ndenumerate(counts):
            ax.text(j, i, str(v), ha="center", va="center", fontsize=6,
                    color="white" if v < counts.max() / 2 else "black")
    ax.set_xlabel("class")
    ax.set_ylabel("client" if len(yt) == n else f"client (every {yt[1] - yt[0]}th labelled)")
    ax.set_title(f"images per client and class\n{title}", fontsize=10)
    fig.colorbar(im, ax=ax, label="images")
    fig.tight_layout()
    _save_fig(fig, path)
    return {"xticklabels": [names[k] for k in xt], "yticklabels": [str(k) for k in yt]}


def plot_curves(history: list[dict], path: Path, title: str, baseline: float | None = None) -> dict:
    """Training loss and kNN accuracy against rounds (integer ticks), the untrained network's kNN as a
    dashed line, the accuracy axis spanning both; where the rows' `stage` changes (fed_cluster), a dotted
    line before that round. Returns what was drawn (for tests)."""
    plt = _plt()
    from matplotlib.ticker import MaxNLocator
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    rounds = [r["round"] for r in history]
    a.plot(rounds, [r["loss"] for r in history], marker="." if len(rounds) <= 40 else None)
    a.set_xlabel("round")
    a.set_ylabel("training loss")
    ev = [r for r in history if "knn_acc" in r]
    b.plot([r["round"] for r in ev], [r["knn_acc"] for r in ev], marker="o", label="trained encoder")
    ys = [r["knn_acc"] for r in ev]
    if baseline is not None:
        b.axhline(baseline, ls="--", color="gray", label=f"untrained network ({baseline:.3f})")
        ys.append(baseline)
    if ys:
        pad = max(0.01, 0.1 * (max(ys) - min(ys)))
        b.set_ylim(max(0.0, min(ys) - pad), min(1.0, max(ys) + pad))
    b.legend(fontsize=8, loc="best")
    b.set_xlabel("round")
    b.set_ylabel("kNN accuracy")
    staged = [r for r in history if "stage" in r]
    starts = [(r["round"], r["stage"]) for p, r in zip(staged, staged[1:]) if r["stage"] != p["stage"]]
    for rnd, stage in starts:            # the loss gains a term there: a step up is not divergence
        a.axvline(rnd - 0.5, ls=":", color="black", lw=1, label=f"stage {stage} from round {rnd}")
        b.axvline(rnd - 0.5, ls=":", color="black", lw=1, label="_nolegend_")
    if starts:
        a.legend(fontsize=8, loc="best")
    last = max(rounds + [1])
    for ax in (a, b):       # whole rounds only (MaxNLocator alone falls back to fractions below 2 rounds)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        ax.set_xlim(0.5, last + 0.5)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    _save_fig(fig, path)
    return {"ylim": b.get_ylim(), "xticks": [t for t in b.get_xticks() if 0.5 <= t <= last + 0.5],
            "labels": [line.get_label() for line in b.get_lines()], "title": title,
            "stage_starts": [rnd for rnd, _ in starts]}


def plot_features(test_f, test_y, train_f, owner, clients: int, path: Path, title: str, class_names=None,
                  geometry: dict | None = None):
    """features.png: the L2-normalised features (what kNN compares) projected on the two leading
    principal directions of the test features; left the test images coloured by class, right the
    training images in the same projection coloured by the client that holds them."""
    plt = _plt()
    test_f, train_f = F.normalize(test_f.double(), dim=1), F.normalize(train_f.double(), dim=1)
    mean, dirs, share = pca_2d(test_f)
    pt, pr = ((test_f - mean) @ dirs.T).numpy(), ((train_f - mean) @ dirs.T).numpy()
    test_y, owner = test_y.numpy(), owner.numpy()
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 5))
    for ax, pts, groups, n, names, what in (
            (a, pt, test_y, int(test_y.max()) + 1, class_names, "test images by class"),
            (b, pr, owner, clients, None, "training images by client (same projection)")):
        if n <= 20:
            cmap = plt.get_cmap("tab10" if n <= 10 else "tab20")
            for g in range(n):
                sel = groups == g
                if sel.any():
                    label = names[g] if names is not None else (f"client {g}" if ax is b else f"class {g}")
                    ax.scatter(pts[sel, 0], pts[sel, 1], s=5, color=cmap(g), label=label, alpha=0.7)
            ax.legend(fontsize=7, markerscale=2.5, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
        else:                                                  # hundreds of clients / 100 classes: a colour scale
            sc = ax.scatter(pts[:, 0], pts[:, 1], s=5, c=groups, cmap="viridis", alpha=0.7)
            fig.colorbar(sc, ax=ax, label="client" if ax is b else "class")
        ax.set_xlabel(f"PC1 ({share[0]:.0%} of the test features' variance)")
        ax.set_ylabel(f"PC2 ({share[1]:.0%})")
        ax.set_title(what, fontsize=9)
    geo = ""
    if geometry:
        geo = (f"\nalignment {geometry['alignment']:.3f} (0 = two views of an image coincide), uniformity "
               f"{geometry['uniformity']:.3f} (lower = spread more evenly); Wang & Isola 2020")
    fig.suptitle(f"feature space after the last round (PCA of L2-normalised features)\n{title}{geo}", fontsize=9)
    fig.tight_layout()
    _save_fig(fig, path)
