"""Speed: how much of every method's training time is learning, the input pipeline, and scale in clients.

Three measurements (../shared/BENCHMARK.md), all in this one process, so that ratios compare figures
taken under the same load on the same device:

1. Efficiency ratio, per method file = in-loop training images/s / bare-step images/s.
   In-loop: the method's own main() runs here with a small budget and writes metrics.jsonl; common.Run
   times each round without its kNN evaluation, so the figure includes augmentation, batching, client
   switching (state-dict loads, optimizer resets), aggregation and logging. After every round (outside
   its timing) one block of bare steps of about a round's images is timed, and the ratio is the median
   over rounds 2 .. R-1 (round 1 warms up allocators; rounds 1 and R carry the kNN monitor) of round /
   the bare block after it: on a shared machine the load drifts within minutes, and interleaving compares
   figures taken together. The same ratio by process CPU time (round start to run.log, and the block) is
   printed beside it: with one torch thread (OMP_NUM_THREADS=1) it hardly depends on the machine's load.
   Bare step: forward + backward + optimizer step of the same encoder, head and loss at the same batch
   size, on two views already augmented and on the device, written here from common's pieces:
     simclr  encoder + MLP projector, both views in one batch, NT-Xent          local_cl, fedavg_cl, gossip_cl,
                                                                                dec_ssl, dec_ssl --featarc (+ its align term)
     moco    online encoder + projector on view 1, EMA key encoder on view 2,   feature_fusion, neighborhood_match
             InfoNCE against a queue, FIFO enqueue; with --symmetric (their     (queue = |Q_l| + |Q_r| rows, |Q_r|
             default) also view 2 as query and both keys enqueued               the rows a client gets: at most
                                                                                (participants - 1) x M)
     moco+nm the moco step + lambda L_NM (neighborhood_match.nm_term, the run's  neighborhood_match (N = the whole
             --nm-form, --tau-nm, --nm-weight; both views with --symmetric)     queue: Q_r + Q_l; --nm-local false:
                                                                                its |Q_r| rows); the loop computes
                                                                                L_NM in warm-up rounds too (x 0)
     sfl     MocoSFL's computation without the split: h_q = C(x_q) with grad,   mocosfl (batch = pool x per-client
             h_k = Cbar(x_k); InfoNCE(S(h_q), Sbar(h_k)) + InfoNCE(S(h_k),      batch, the server's batch; no
             Sbar(h_q)), one queue; GroupNorm + weight standardisation,        per-client weights, no vmap)
             Linear-ReLU-Linear head, SGD
     byol    online encoder + projector + predictor, EMA target, 2 - 2cos both  fed_cluster (its default loss
             ways                                                               "both" adds NT-Xent, and stage 2 a
                                                                                cluster head: the ratio counts
                                                                                that extra learning as overhead)
   Images/s count both views, as the methods do. A ratio near 1 means the loop adds almost nothing.
2. Input pipeline: our batched on-device augmentation (common.Augment) against torchvision's PIL
   transforms in a DataLoader with worker processes (two views per image; RandomResizedCrop, flip,
   ColorJitter with p=0.8, for RGB also saturation/hue and grayscale p=0.2; normalise), each alone and
   feeding the same SimCLR step on the same device.
3. Scale: training images/s with 10, 100 and 1000 clients for the same total number of images: fedavg_cl
   (its main(); batch = images / 1000, the whole data of a client in the 1000-client setting, so every
   setting uses the same batch and only the number of clients changes) and mocosfl
   (mocosfl.train_images_per_s: the code's pool/batch rule, about 100 images per server step).
4. Processes (issue #17): fedavg_cl's training images/s in 1 process x 1 thread and under torchrun in
   --procs processes x 1 thread (gloo), 2 clients per process, the same images; the ratio is the speed-up
   (ideal: the number of processes). The load average is reported with it: other work on the machine
   takes cores from the N processes first.
The bare step uses the method's memory layout (channels-last from common.make_encoder and Augment; the
default layout for mocosfl, whose vmap needs it). With a GPU (or --gpu-extras true) it is also timed with
bf16 autocast (and channels-last for mocosfl's too), and compiled with torch.compile (--compile); both as
extra columns.

4. Profile (torch.profiler, CPU activities): per method, the ops that compute (leaf aten ops, not views:
   on a GPU each launches at least one kernel) per bare step and per step of its loop (one profiled round,
   divided by its images in bare steps), so the difference is what the loop adds per step; fedavg_cl's
   per-client pieces (download, fresh optimizer or in-place reset, upload copy, FedAvg share) in ops and
   microseconds; and Augment's ops per call and microseconds per view. Counts do not depend on the load.
Figures: median of --repeats timed blocks and their spread ((max - min) / median); the device is named.
Run:      python benchmark.py                 (CPU: about 10 minutes on a quiet machine; GPU: a few)
          OMP_NUM_THREADS=1 python benchmark.py --sections ratio,scale,profile --train-size 512 --repeats 3 \
              --scale-clients 10,1000 --scale-methods fedavg_cl      (results/benchmark-cpu.md: 10.5 minutes
                                                                      on 2 shared cores, load 3.5)
          python benchmark.py --render results/benchmark-cpu.json --before results/benchmark-cpu-before.json
          python benchmark.py --quick         (under a minute on 2 cores; tiny budgets, noisy figures)
          python benchmark.py --json bench.json --sections ratio --methods fedavg_cl,mocosfl
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib
import inspect
import io
import json
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F

import common

ROOT = Path(__file__).resolve().parent

# method row -> (module, extra flags, bare-step kind); the bare step's sizes are read from the run's config.json
METHODS = {
    "local_cl": ("local_cl", [], "simclr"),
    "fedavg_cl": ("fedavg_cl", [], "simclr"),
    "gossip_cl": ("gossip_cl", [], "simclr"),
    "feature_fusion": ("feature_fusion", [], "moco"),
    "neighborhood_match": ("neighborhood_match", [], "moco"),
    "dec_ssl": ("dec_ssl", [], "simclr"),
    "dec_ssl_featarc": ("dec_ssl", ["--featarc", "true"], "simclr"),
    "mocosfl": ("mocosfl", [], "sfl"),
    "fed_cluster": ("fed_cluster", [], "byol"),
}
SECTIONS = ("ratio", "pipeline", "scale", "profile", "procs")


@dataclass
class Args:
    quick: bool = False
    """tiny budgets (under a minute on 2 cores): checks the pipeline, the figures are noisy"""
    json: str = ""
    """also write every figure to this JSON file"""
    device: str = "auto"
    """auto | cpu | cuda"""
    methods: str = "all"
    """comma-separated rows of the efficiency table (all = every method file)"""
    sections: str = "ratio,pipeline,scale,profile,procs"
    """which measurements: ratio, pipeline, scale, profile (operator counts), procs (torchrun)"""
    repeats: int = 0
    """timed blocks per figure; 0 = 5 (--quick: 2)"""
    train_size: int = 0
    """images the in-loop runs train on, split over 2 clients; 0 = 2048 (--quick: 128)"""
    batch_size: int = 0
    """batch of the in-loop runs and their bare steps; 0 = each method's default (--quick: 32)"""
    scale_images: int = 0
    """images per round in the scale measurement; 0 = 10000 (--quick: 1000, and 10/100 clients only)"""
    scale_clients: str = ""
    """client counts of the scale measurement, comma-separated; empty = 10,100,1000 (--quick: 10,100)"""
    scale_methods: str = "fedavg_cl,mocosfl"
    """methods of the scale measurement (fedavg_cl, mocosfl)"""
    workers: int = 2
    """DataLoader worker processes of the torchvision pipeline"""
    gpu_extras: str = "auto"
    """bare step also with bf16 autocast (+ channels-last everywhere): auto (with a GPU) | true | false"""
    compile: str = "auto"
    """bare step also under torch.compile: auto (with a GPU) | true | false"""
    procs: int = 2
    """processes of the torchrun scaling measurement (section procs), each with one thread"""
    render: str = ""
    """measure nothing: print the markdown of this saved --json file (with --before: before/after columns)"""
    before: str = ""
    """a --json file of the same command on older code: its ratios, op counts and scale figures as extra columns"""

    def check(self):
        if self.device not in ("auto", "cpu", "cuda"):
            common.fail(f"--device must be one of auto, cpu, cuda (got {self.device!r})")
        if self.device == "cuda" and not torch.cuda.is_available():
            common.fail("--device cuda was asked for but no CUDA GPU is visible to torch")
        for name in ("gpu_extras", "compile"):
            if getattr(self, name) not in ("auto", "true", "false"):
                common.fail(f"--{name.replace('_', '-')} must be auto, true or false (got {getattr(self, name)!r})")
        if self.methods != "all" and not set(self.method_list) <= set(METHODS):
            common.fail(f"--methods: unknown {sorted(set(self.method_list) - set(METHODS))}; "
                        f"choose from {', '.join(METHODS)}")
        if not set(self.section_list) <= set(SECTIONS):
            common.fail(f"--sections: choose from {', '.join(SECTIONS)} (got {self.sections!r})")
        if self.procs < 2:
            common.fail(f"--procs must be at least 2 (got {self.procs})")
        for name in ("repeats", "train_size", "batch_size", "scale_images", "workers"):
            if getattr(self, name) < 0:
                common.fail(f"--{name.replace('_', '-')} must be >= 0 (got {getattr(self, name)})")
        if self.workers > 4 * (os.cpu_count() or 1):
            common.fail(f"--workers must be at most 4 x the {os.cpu_count()} CPU cores (got {self.workers})")
        if 0 < self.train_size < 64:
            common.fail(f"--train-size must be at least 64 (got {self.train_size})")
        # the quick/full defaults behind the zeros
        self.repeats = self.repeats or (2 if self.quick else 5)
        self.train_size = self.train_size or (128 if self.quick else 2048)
        self.batch_size = self.batch_size or (32 if self.quick else 0)
        self.scale_images = self.scale_images or (1000 if self.quick else 10000)
        if self.scale_clients and not all(c.isdigit() and int(c) > 0 for c in self.scale_clients.split(",")):
            common.fail(f"--scale-clients must be positive integers separated by commas (got {self.scale_clients!r})")
        if not self.scale_methods or not set(self.scale_methods.split(",")) <= {"fedavg_cl", "mocosfl"}:
            common.fail(f"--scale-methods: choose from fedavg_cl, mocosfl (got {self.scale_methods!r})")
        if self.scale_images < 2 * max(self.scale_counts):
            common.fail(f"--scale-images must be at least {2 * max(self.scale_counts)}: "
                        f"{max(self.scale_counts)} clients need 2 images each (got {self.scale_images})")

    @property
    def scale_counts(self):
        if self.scale_clients:
            return tuple(int(c) for c in self.scale_clients.split(","))
        return (10, 100) if self.quick else (10, 100, 1000)

    @property
    def method_list(self):
        return list(METHODS) if self.methods == "all" else [m for m in self.methods.split(",") if m]

    @property
    def section_list(self):
        return [s for s in self.sections.split(",") if s]


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed_rate(fn, images: int, device, repeats: int, steps: int, warmup: int = 2) -> dict:
    """Images/s of `steps` calls of fn (each processing `images`), median and spread over `repeats` blocks."""
    return summarise(timed_rates(fn, images, device, repeats, steps, warmup))


def timed_rates(fn, images: int, device, repeats: int, steps: int, warmup: int = 2) -> list:
    for _ in range(warmup):
        fn()
    rates = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        for _ in range(steps):
            fn()
        sync(device)
        rates.append(images * steps / (time.perf_counter() - t))
    return rates


def summarise(rates: list) -> dict:
    med = statistics.median(rates)
    return {"images_per_s": med, "spread": (max(rates) - min(rates)) / med, "n": len(rates)}


def device_name(device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"CPU {model}, {torch.get_num_threads()} torch threads, {os.cpu_count()} cores visible"


# ----------------------------------------------------------------------------------------------
# Bare steps: model + loss + optimizer on inputs already on the device (nothing else)
# ----------------------------------------------------------------------------------------------

@dataclass
class BareSpec:
    kind: str                     # simclr | moco | byol | sfl
    batch: int                    # images per step (each gives two views)
    channels: int = 1
    size: int = 28
    encoder: str = "cnn"
    width: int = 32
    norm: str = "bn"
    proj: list = field(default_factory=list)     # projector sizes after the encoder, e.g. [d, 128]
    bn_head: bool = True
    predictor_hidden: int = 0
    tau: float = 0.2
    queue: int = 0
    momentum: float = 0.99
    symmetric: bool = False       # moco: both views as query, both keys enqueued (feature_fusion's default)
    optimizer: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 1e-6
    align: bool = False           # dec_ssl --featarc: + alignment of both views' projections to an anchor
    nm_weight: float = 0.0        # neighborhood_match: lambda of L = L_FF + lambda L_NM (0: no L_NM)
    nm_form: str = "entropy"      # its --nm-form, --tau-nm, --nm-topk
    tau_nm: float = 0.05
    nm_topk: int = 5
    nm_rows: int = 0              # |N|: the first nm_rows rows of the queue are the neighbours
    cut: int = 1                  # sfl: units of the backbone before the cut


def bare_step(spec: BareSpec, device, fast: bool = False, compile_: bool = False):
    """Returns (step function, images per call = 2 x batch). The memory layout is the method's: channels-last
    (common.make_encoder and Augment), except sfl (mocosfl keeps the default layout for vmap).
    fast: bf16 autocast, and channels-last for sfl too."""
    args = common.RunArgs(encoder=spec.encoder, width=spec.width, norm=spec.norm, optimizer=spec.optimizer,
                          lr=spec.lr, weight_decay=spec.weight_decay)
    layout = torch.contiguous_format if spec.kind == "sfl" and not fast else torch.channels_last
    enc = common.make_encoder(args, spec.channels)
    online = nn.Sequential(enc, common.mlp([enc.dim, *spec.proj], bn=spec.bn_head)).to(device, memory_format=layout)
    predictor = None
    if spec.kind == "byol":
        out = spec.proj[-1]
        predictor = common.mlp([out, spec.predictor_hidden or enc.dim, out]).to(device)
    target = copy.deepcopy(online).requires_grad_(False) if spec.kind in ("moco", "byol", "sfl") else None
    params = list(online.parameters()) + (list(predictor.parameters()) if predictor is not None else [])
    opt = common.make_optimizer(params, args)
    gen = torch.Generator(device=device).manual_seed(0)
    v1, v2 = (torch.randn(spec.batch, spec.channels, spec.size, spec.size, device=device, generator=gen)
              .contiguous(memory_format=layout) for _ in range(2))
    queue = F.normalize(torch.randn(spec.queue, spec.proj[-1], device=device), dim=1) if spec.queue else None
    anchor = F.normalize(torch.randn(spec.batch, spec.proj[-1], device=device), dim=1)
    ptr = [0]
    if spec.nm_weight:         # neighborhood_match's own L_NM at the run's settings, N = rows of the same queue
        import neighborhood_match
        nm_args = SimpleNamespace(nm_form=spec.nm_form, nm_topk=spec.nm_topk, tau=spec.tau, tau_nm=spec.tau_nm)

        def nm_term(q_, k_):
            return neighborhood_match.nm_term(q_, k_, queue[:spec.nm_rows], nm_args)
    f_online, f_target = online, target
    if spec.kind == "sfl":     # client part C (and Cbar) before the cut, server S (and Sbar) after it
        (client, server), (client_m, server_m) = split_units(online, spec), split_units(target, spec)
    if compile_:
        f_online = torch.compile(online)
        f_target = torch.compile(target) if target is not None else None
        if spec.kind == "sfl":
            client, server, client_m, server_m = map(torch.compile, (client, server, client_m, server_m))
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if fast else contextlib.nullcontext()

    def step():
        with amp:
            if spec.kind == "simclr":
                z1, z2 = f_online(torch.cat([v1, v2])).chunk(2)
                loss = common.nt_xent(z1.float(), z2.float(), spec.tau)
                if spec.align:
                    loss = loss - 0.5 * ((anchor * F.normalize(z1.float(), dim=1)).sum(1).mean()
                                         + (anchor * F.normalize(z2.float(), dim=1)).sum(1).mean())
            elif spec.kind == "moco":
                q = f_online(v1).float()
                q2 = f_online(v2).float() if spec.symmetric else None
                with torch.no_grad():
                    common.ema_update(target, online, spec.momentum)
                    k = F.normalize(f_target(v2).float(), dim=1)
                    k1 = F.normalize(f_target(v1).float(), dim=1) if spec.symmetric else None
                loss = common.info_nce(q, k, queue, spec.tau)
                l_nm = nm_term(q, k) if spec.nm_weight else 0
                if spec.symmetric:
                    loss = (loss + common.info_nce(q2, k1, queue, spec.tau)) / 2
                    l_nm = (l_nm + nm_term(q2, k1)) / 2 if spec.nm_weight else 0
                    k = torch.cat([k, k1])
                loss = loss + spec.nm_weight * l_nm                  # L = L_FF + lambda L_NM
            elif spec.kind == "sfl":
                h_q = client(v1)
                with torch.no_grad():
                    common.ema_update(target, online, spec.momentum)
                    h_k = client_m(v2)
                    k1, k2 = F.normalize(server_m(torch.cat([h_q, h_k])).float(), dim=1).chunk(2)
                q1, q2 = server(torch.cat([h_q, h_k])).float().chunk(2)
                loss = common.info_nce(q1, k2, queue, spec.tau) + common.info_nce(q2, k1, queue, spec.tau)
                k = torch.cat([k1, k2])
            else:
                z = f_online(torch.cat([v1, v2]))
                p1, p2 = predictor(z).float().chunk(2)
                with torch.no_grad():
                    t1, t2 = f_target(torch.cat([v1, v2])).float().chunk(2)
                loss = (4 - 2 * F.cosine_similarity(p1, t2) - 2 * F.cosine_similarity(p2, t1)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if spec.kind == "byol":
            common.ema_update(target, online, spec.momentum)
        if queue is not None:                         # FIFO ring buffer, as the methods keep theirs
            n = min(len(k), len(queue))
            queue[(ptr[0] + torch.arange(n, device=device)) % len(queue)] = k[:n]
            ptr[0] = (ptr[0] + n) % len(queue)

    return step, 2 * spec.batch


def split_units(net: nn.Sequential, spec: BareSpec):
    """(units before the cut, the rest + head) of encoder-plus-head, cut as mocosfl.py cuts it."""
    enc, head = net[0], net[1]
    if spec.encoder == "resnet18":
        units = [nn.Sequential(enc.conv1, enc.bn1, enc.relu)]
        units += [b for layer in (enc.layer1, enc.layer2, enc.layer3, enc.layer4) for b in layer]
        units.append(nn.Sequential(enc.avgpool, nn.Flatten()))
    else:
        units = [enc.net[0:4], enc.net[4:8], enc.net[8:]]
    return nn.Sequential(*units[:spec.cut]), nn.Sequential(*units[spec.cut:], head)


def spec_for(name: str, cfg: dict) -> BareSpec:
    """The bare step matching a method run, from that run's config.json arguments."""
    a, kind = cfg["args"], METHODS[name][2]
    base = dict(channels=1 if a["dataset"] == "fmnist" else 3, size=28 if a["dataset"] == "fmnist" else 32,
                encoder=a["encoder"], width=a["width"], norm=a["norm"], optimizer=a["optimizer"], lr=a["lr"],
                weight_decay=a["weight_decay"], batch=a["batch_size"])
    d = 512 if a["encoder"] == "resnet18" else 4 * a["width"]
    if name in ("local_cl", "fedavg_cl", "gossip_cl"):
        return BareSpec(kind, proj=[d, a["proj_dim"]], tau=a["tau"], **base)
    if name.startswith("dec_ssl"):
        return BareSpec(kind, proj=[a["hidden_dim"], a["proj_dim"] or d], tau=a["tau"], align=a["featarc"], **base)
    if name in ("feature_fusion", "neighborhood_match"):
        others = max(1, round(a["participation"] * a["clients"])) - 1      # the rows a client downloads
        remote = min(others * a["remote_features"], a["remote_bank"] or others * a["remote_features"])
        nm = dict(nm_weight=a["nm_weight"], nm_form=a["nm_form"], tau_nm=a["tau_nm"], nm_topk=a["nm_topk"],
                  nm_rows=remote + a["queue_size"] * a["nm_local"]) if a.get("nm_weight") else {}
        return BareSpec(kind, proj=[d, a["proj_dim"]], tau=a["tau"], queue=a["queue_size"] + remote,
                        momentum=a["momentum"], symmetric=a.get("symmetric", False), **nm, **base)
    if name == "mocosfl":
        pool = max(1, round(a["participation"] * a["clients"]))
        base["batch"] = pool * a["batch_size"]                         # the server's batch
        return BareSpec(kind, proj=[a["proj_dim"], a["proj_dim"]], bn_head=False, tau=a["tau"],
                        queue=a["queue_size"], momentum=a["m"], cut=a["cut_layer"], **base)
    if name == "fed_cluster":
        return BareSpec(kind, proj=[d, a["proj_dim"]], predictor_hidden=d, momentum=a["momentum"], **base)
    raise KeyError(name)


# ----------------------------------------------------------------------------------------------
# In-loop: a method's own main() in this process
# ----------------------------------------------------------------------------------------------

def run_method(module: str, flags: list, out: Path) -> Path:
    """Run module.main() with these flags (output captured); returns its run folder."""
    mod = importlib.import_module(module)
    argv, sys.argv = sys.argv, [str(ROOT / f"{module}.py"), *flags, "--out", str(out)]
    handler = signal.getsignal(signal.SIGINT)          # Run.rounds() installs its own Ctrl-C handler
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            mod.main()
    except SystemExit as e:
        if e.code not in (0, None):
            raise RuntimeError(f"{module} {shlex.join(flags)} exited {e.code}: {buf.getvalue()[-500:]}") from None
    finally:
        sys.argv = argv
        signal.signal(signal.SIGINT, handler)
    return sorted(p for p in out.iterdir() if (p / "summary.json").is_file())[-1]


def dry_config(module: str, flags: list) -> dict:
    """The arguments a method run with these flags will use (its Args after check()), without running it."""
    mod = importlib.import_module(module)
    args = common.parse_args(mod.Args, flags)
    args.check()
    return {"args": dataclasses.asdict(args)}


def in_loop_rate(folder: Path) -> dict:
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    rates = [r["images_per_s"] for r in rows[1:]] or [rows[0]["images_per_s"]]   # round 1 warms up
    return summarise(rates)


def ratio_flags(args: Args, name: str, device) -> list:
    """The command line of one method's in-loop run in the ratio section."""
    flags = ["--train-size", args.train_size, "--test-size", 200, "--clients", 2, "--partition", "iid",
             "--rounds", args.repeats + 2, "--eval-every", 10 ** 6, "--probe-epochs", 1, "--device", device.type,
             *METHODS[name][1]]
    if args.batch_size and name != "mocosfl":        # mocosfl's batch follows its code's rule
        flags += ["--batch-size", args.batch_size]
    return list(map(str, flags))


def scale_flags(args: Args, clients: int, device) -> list:
    """The command line of fedavg_cl's run with `clients` clients in the scale section."""
    n = args.scale_images
    batch = max(2, n // max(args.scale_counts))     # the most clients' whole client data: one batch each
    return list(map(str, ["--train-size", n, "--test-size", 100, "--clients", clients, "--partition", "iid",
                          "--batch-size", batch, "--rounds", 3 if args.quick else 4, "--eval-every", 10 ** 6,
                          "--probe-epochs", 1, "--device", device.type]))


def preflight(args: Args, device):
    """Every run the benchmark will start goes through its script's own checks first: a bad value
    stops here, before minutes of measurements."""
    runs = [(METHODS[n][0], ratio_flags(args, n, device)) for n in args.method_list if "ratio" in args.section_list]
    runs += [("fedavg_cl", scale_flags(args, c, device)) for c in args.scale_counts if "scale" in args.section_list]
    for module, flags in runs:
        try:
            dry_config(module, flags)
        except common.UserError as e:
            common.fail(f"{module} {shlex.join(flags)}: {e}")


def measure_ratios(args: Args, device, tmp: Path, fast: bool, compile_: bool) -> list:
    rows = []
    for name in args.method_list:
        module, extra, kind = METHODS[name]
        flags = ratio_flags(args, name, device)
        spec = spec_for(name, dry_config(module, flags))
        step, views = bare_step(spec, device)
        steps = max(1, args.train_size // spec.batch)       # one timed block = about one round's steps
        timed_rates(step, views, device, 1, 1)               # warm-up

        def bare_block():                                    # (wall, CPU) images/s of about a round's steps
            sync(device)
            t, c = time.perf_counter(), time.process_time()
            for _ in range(steps):
                step()
            sync(device)
            return views * steps / (time.perf_counter() - t), views * steps / (time.process_time() - c)

        # the bare step is timed between the rounds of the run (after each round, outside its timing): the
        # machine's load drifts, so each round is compared with the block next to it. Rounds 2 .. R-1 count
        # (round 1 warms up and, like round R, carries the kNN monitor).
        with watch_rounds(after=bare_block) as rec:
            folder = run_method(module, flags, tmp / name)
        rows_ = round_rows(folder)[1:-1]
        blocks = rec["after"][1:-1]
        wall = [(r["images_per_s"], b[0]) for r, b in zip(rows_, blocks)]
        cpu = [(r["images"] / c, b[1]) for r, c, b in zip(rows_, rec["cpu_s"][1:-1], blocks)]
        loop, bare = summarise([p[0] for p in wall]), summarise([p[1] for p in wall])
        row = {"method": name, "bare_step": kind + ("+nm" if spec.nm_weight else ""),
               "batch_images": spec.batch, "command": f"python {module}.py {shlex.join(flags)}",
               "in_loop": loop, "bare": bare, "ratio": statistics.median(i / b for i, b in wall),
               "ratio_cpu_time": statistics.median(i / b for i, b in cpu),
               "ratio_per_round": [i / b for i, b in wall], "ratio_cpu_time_per_round": [i / b for i, b in cpu],
               "in_loop_cpu": summarise([p[0] for p in cpu]), "bare_cpu": summarise([p[1] for p in cpu])}
        if fast:
            s, v = bare_step(spec, device, fast=True)
            row["bare_bf16_channels_last"] = timed_rate(s, v, device, args.repeats, steps)
        if compile_:
            try:
                s, v = bare_step(spec, device, fast=fast, compile_=True)
                row["bare_compiled"] = timed_rate(s, v, device, args.repeats, steps, warmup=3)
            except Exception as e:                                # compile needs a working toolchain
                row["bare_compiled"] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"}
        rows.append(row)
        print(f"  {name}: in-loop {loop['images_per_s']:.0f}/s, bare {bare['images_per_s']:.0f}/s, "
              f"ratio {row['ratio']:.2f}, by CPU time {row['ratio_cpu_time']:.2f}", file=sys.stderr, flush=True)
    return rows


# ----------------------------------------------------------------------------------------------
# Input pipeline: on-device batched augmentation vs torchvision PIL transforms in a DataLoader
# ----------------------------------------------------------------------------------------------

class TwoViewsPIL(torch.utils.data.Dataset):
    """The conventional pipeline: uint8 images -> PIL -> torchvision transforms, twice per image."""

    def __init__(self, x_uint8, mean, std, crop_min):
        from torchvision import transforms as T
        self.x = x_uint8.cpu().numpy()
        rgb, size = self.x.shape[1] == 3, self.x.shape[-1]
        jitter = T.ColorJitter(0.4, 0.4, 0.4, 0.1) if rgb else T.ColorJitter(0.4, 0.4)
        self.t = T.Compose([T.RandomResizedCrop(size, scale=(crop_min, 1.0)), T.RandomHorizontalFlip(),
                            T.RandomApply([jitter], p=0.8), *([T.RandomGrayscale(0.2)] if rgb else []),
                            T.ToTensor(), T.Normalize(mean, std)])

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        from PIL import Image
        a = self.x[i]
        img = Image.fromarray(a[0] if a.shape[0] == 1 else a.transpose(1, 2, 0))
        return self.t(img), self.t(img)


def forever(loader):
    while True:
        yield from loader


def measure_pipeline(args: Args, device) -> dict:
    n, batch = (1024, 64) if args.quick else (10000, 128)
    data, _ = common.load_data(common.RunArgs(train_size=n, test_size=100, data_dir=str(ROOT / "data")), device)
    augment = common.Augment(data, crop_min=0.2)
    ds = TwoViewsPIL(data.train_x, data.mean, data.std, 0.2)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, drop_last=True, num_workers=args.workers,
                                         persistent_workers=args.workers > 0, pin_memory=device.type == "cuda")
    batches = forever(loader)
    spec = BareSpec("simclr", batch=batch, channels=data.channels, size=data.train_x.shape[-1], proj=[128, 128])

    def ours_views():
        idx = torch.randint(0, len(data.train_x), (batch,), device=device)
        x = data.train_x[idx]
        return augment(x), augment(x)

    def pil_views():
        v1, v2 = next(batches)
        return tuple(v.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last) for v in (v1, v2))

    train = simclr_on_views(spec, device)
    steps = 3 if args.quick else 10
    res = {"batch_images": batch, "workers": args.workers, "dataset": "fmnist"}
    for name, views in (("ours", ours_views), ("torchvision", pil_views)):
        res[f"{name}_augment"] = timed_rate(views, 2 * batch, device, args.repeats, steps)
        res[f"{name}_train"] = timed_rate(lambda: train(*views()), 2 * batch, device, args.repeats, steps)
    res["augment_ratio"] = res["ours_augment"]["images_per_s"] / res["torchvision_augment"]["images_per_s"]
    res["train_ratio"] = res["ours_train"]["images_per_s"] / res["torchvision_train"]["images_per_s"]
    return res


def simclr_on_views(spec: BareSpec, device):
    """A SimCLR step that takes its two views as arguments (for the input-pipeline comparison)."""
    args = common.RunArgs(width=spec.width)
    enc = common.make_encoder(args, spec.channels)
    model = nn.Sequential(enc, common.mlp([enc.dim, *spec.proj])).to(device)
    opt = common.make_optimizer(model.parameters(), args)

    def train(v1, v2):
        z1, z2 = model(torch.cat([v1, v2])).chunk(2)
        loss = common.nt_xent(z1, z2, spec.tau)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return train


# ----------------------------------------------------------------------------------------------
# Scale: 10, 100, 1000 clients for the same number of images
# ----------------------------------------------------------------------------------------------

def measure_scale(args: Args, device, tmp: Path) -> list:
    import mocosfl
    rows, n = [], args.scale_images
    batch = max(2, n // max(args.scale_counts))     # the most clients' whole client data: one batch each
    methods = args.scale_methods.split(",")
    for clients in args.scale_counts:
        if "fedavg_cl" in methods:
            with watch_rounds() as rec:
                folder = run_method("fedavg_cl", scale_flags(args, clients, device), tmp / f"scale-fedavg-{clients}")
            cpu = [r["images"] / c for r, c in zip(round_rows(folder), rec["cpu_s"])][1:-1]   # rounds 2 .. R-1
            rows.append({"method": "fedavg_cl", "clients": clients, "images": n, "batch_per_client": batch,
                         **in_loop_rate(folder), "cpu": summarise(cpu)})
        if "mocosfl" in methods:
            rates = [mocosfl.train_images_per_s(clients, n, device) for _ in range(max(1, args.repeats // 2))]
            pool = clients if clients < 200 else 100
            rows.append({"method": "mocosfl", "clients": clients, "images": n,
                         "batch_per_client": max(1, 100 // pool), **summarise(rates)})
        print(f"  {clients} clients: " + ", ".join(f"{r['method']} {r['images_per_s']:.0f}/s" for r in rows
                                                   if r["clients"] == clients), file=sys.stderr, flush=True)
    return rows


# ----------------------------------------------------------------------------------------------
# Processes: the same fedavg_cl work in 1 process x 1 thread and under torchrun in N processes x 1 thread
# ----------------------------------------------------------------------------------------------

def procs_flags(args: Args, device) -> list:
    """fedavg_cl's command line in the procs section: 2 clients per process, so each process has the same work."""
    flags = ["--train-size", max(args.train_size, 128 * args.procs), "--test-size", 100, "--clients", 2 * args.procs,
             "--partition", "iid", "--rounds", args.repeats + 1, "--eval-every", 10 ** 6, "--probe-epochs", 1,
             "--device", device.type]
    return list(map(str, flags + (["--batch-size", args.batch_size] if args.batch_size else [])))


def measure_procs(args: Args, device, tmp: Path) -> dict:
    """Training images/s of fedavg_cl with 1 process and with --procs processes (torchrun --standalone), one
    thread each (OMP_NUM_THREADS=1), on the same clients and images; ratio = N-process rate / 1-process rate
    (ideal: N). The two runs alternate max(1, repeats // 2) times; each figure is the median of its rounds."""
    flags, env = procs_flags(args, device), {**os.environ, "OMP_NUM_THREADS": "1"}
    launch = {1: [sys.executable], args.procs: [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                "--nproc_per_node", str(args.procs)]}
    rates = {1: [], args.procs: []}
    for i in range(max(1, args.repeats // 2)):
        for n, cmd in launch.items():
            out = tmp / f"procs-{n}-{i}"
            proc = subprocess.run([*cmd, str(ROOT / "fedavg_cl.py"), *flags, "--out", str(out)], cwd=ROOT, env=env,
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"fedavg_cl with {n} process(es) exited {proc.returncode}: {proc.stderr[-500:]}")
            folder = next(out.glob("*/"))
            rates[n] += [json.loads(line)["images_per_s"] for line in (folder / "metrics.jsonl").read_text().splitlines()[1:]]
    one, many = summarise(rates[1]), summarise(rates[args.procs])
    row = {"procs": args.procs, "flags": flags, "one_process": one, "procs_rate": many,
           "ratio": many["images_per_s"] / one["images_per_s"], "load_avg_1min": os.getloadavg()[0],
           "cpu_count": os.cpu_count()}
    print(f"  1 process {one['images_per_s']:.0f}/s, {args.procs} processes {many['images_per_s']:.0f}/s: "
          f"x{row['ratio']:.2f} (ideal x{args.procs})", file=sys.stderr, flush=True)
    return row
# Profile: operator counts (load-independent) of the loop, per-client work and augmentation
# ----------------------------------------------------------------------------------------------

# aten ops that only make a view or an empty tensor: no kernel runs for them, so they are not counted
NO_KERNEL = {"aten::view", "aten::_unsafe_view", "aten::reshape", "aten::as_strided", "aten::expand", "aten::t",
             "aten::transpose", "aten::permute", "aten::unsqueeze", "aten::squeeze", "aten::slice", "aten::select",
             "aten::detach", "aten::alias", "aten::empty", "aten::empty_strided", "aten::empty_like",
             "aten::resolve_conj", "aten::resolve_neg", "aten::lift_fresh", "aten::unbind", "aten::split",
             "aten::chunk", "aten::narrow", "aten::expand_as", "aten::view_as", "aten::flatten", "aten::numpy_T",
             "aten::contiguous", "aten::result_type", "aten::is_nonzero", "aten::item", "aten::_local_scalar_dense",
             "aten::set_", "aten::_reshape_alias", "aten::unflatten", "aten::split_with_sizes", "aten::diagonal"}


def kernel_ops(events) -> int:
    """Leaf aten ops that compute (the CPU analogue of kernel launches: on a GPU each launches >= 1 kernel)."""
    n = 0
    for e in events:
        if e.name.startswith("aten::") and e.name not in NO_KERNEL and \
                not any(c.name.startswith("aten::") for c in e.cpu_children):
            n += 1
    return n


def profiled(fn, repeats: int = 1):
    """(kernel ops per call, wall microseconds per call under the profiler) of fn()."""
    fn()                                                               # warm-up outside the profile
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        t = time.perf_counter()
        for _ in range(repeats):
            fn()
        us = (time.perf_counter() - t) * 1e6 / repeats
    return kernel_ops(prof.events()) / repeats, us


@contextlib.contextmanager
def watch_rounds(after=None):
    """For the next method run (common.Run patched): the process CPU seconds of every round from its start
    to its run.log() call (the kNN evaluation comes later, inside log), and after(), called after every round
    outside its timing. CPU seconds of a single-threaded process hardly depend on what else the machine runs."""
    real_rounds, real_log, rec = common.Run.rounds, common.Run.log, {"cpu_s": [], "after": []}

    def rounds(self, state):
        for rnd in real_rounds(self, state):
            rec["t"] = time.process_time()
            yield rnd
            if after:
                rec["after"].append(after())

    def log(self, rnd, *a, **kw):
        rec["cpu_s"].append(time.process_time() - rec["t"])
        return real_log(self, rnd, *a, **kw)

    common.Run.rounds, common.Run.log = rounds, log
    try:
        yield rec
    finally:
        common.Run.rounds, common.Run.log = real_rounds, real_log


def round_rows(folder: Path) -> list:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


@contextlib.contextmanager
def profile_round(k: int):
    """Profile round k of the next method run (common.Run.rounds patched for the run); fills the dict
    with that round's events and images."""
    real, box = common.Run.rounds, {}

    def rounds(self, state):
        for rnd in real(self, state):
            prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) if rnd == k else None
            if prof:
                prof.__enter__()
            yield rnd
            if prof:
                prof.__exit__(None, None, None)
                box.update(events=prof.events(), images=self.history[-1]["images"])

    common.Run.rounds = rounds
    try:
        yield box
    finally:
        common.Run.rounds = real


def profile_flags(args: Args, name: str, device) -> list:
    """A short run for the counts: 3 rounds (round 2 is profiled; rounds 1 and 3 carry the kNN monitor)."""
    flags = ["--train-size", 512 if args.quick else 1024, "--test-size", 100, "--clients", 2, "--partition", "iid",
             "--rounds", 3, "--eval-every", 10 ** 6, "--probe-epochs", 1, "--device", device.type, *METHODS[name][1]]
    if args.batch_size and name != "mocosfl":
        flags += ["--batch-size", args.batch_size]
    return list(map(str, flags))


def measure_profile(args: Args, device, tmp: Path) -> dict:
    """Kernel ops per training step of each method's loop beyond its bare step, the per-client pieces of
    FedAvg's loop (ops and microseconds) and the augmentation's cost per view. Counts do not depend on the
    machine's load; the microseconds do (and include the profiler's own overhead)."""
    rows = []
    for name in args.method_list:
        module = METHODS[name][0]
        flags = profile_flags(args, name, device)
        spec = spec_for(name, dry_config(module, flags))
        step, views = bare_step(spec, device)
        bare_ops, _ = profiled(step, repeats=2)
        with profile_round(2) as box:
            run_method(module, flags, tmp / f"profile-{name}")
        steps = box["images"] / views                                   # bare steps' worth of images
        loop_ops = kernel_ops(box["events"]) / steps
        rows.append({"method": name, "steps": steps, "bare_ops_per_step": bare_ops, "loop_ops_per_step": loop_ops,
                     "extra_ops_per_step": loop_ops - bare_ops, "command": f"python {module}.py {shlex.join(flags)}"})
        print(f"  {name}: {loop_ops:.0f} ops per step in the loop, {bare_ops:.0f} in the bare step",
              file=sys.stderr, flush=True)
    return {"methods": rows, "per_client": per_client_costs(device), "augment": augment_costs(device)}


def per_client_costs(device) -> dict:
    """What fedavg_cl does once per client, at its default sizes: download (load the global state), a fresh
    optimizer and its first step (which allocates Adam's moments) or the in-place reset of one
    (make_optimizer(reuse=...)) and its first step, against a normal step; the upload copy, and the
    client's share of FedAvg over 10 and 1000 uploads."""
    import fedavg_cl
    a = fedavg_cl.Args()
    model = fedavg_cl.SimCLR(common.make_encoder(a, 1), a.proj_dim).to(device)
    worker = copy.deepcopy(model)
    for p in worker.parameters():
        p.grad = torch.zeros_like(p)
    out = {}
    warm = common.make_optimizer(list(worker.parameters()), a)

    def upload():
        return {k: v.clone() for k, v in worker.state_dict().items()}

    pieces = {"download": lambda: worker.load_state_dict(model.state_dict()), "upload_copy": upload,
              "optimizer_step": warm.step,           # a normal step: part of the bare step, the baseline of the next two
              # Adam allocates its moments on a new optimizer's first step
              "fresh_optimizer_and_step": lambda: common.make_optimizer(worker.parameters(), a).step()}
    if "reuse" in inspect.signature(common.make_optimizer).parameters:      # the in-place reset the loops use
        pieces["reset_optimizer_and_step"] = lambda: common.make_optimizer(list(worker.parameters()), a,
                                                                           reuse=warm).step()
    for key, fn in pieces.items():
        ops, us = profiled(fn, repeats=20)
        out[key] = {"ops": ops, "us": us}
    acc = [torch.zeros_like(v) for v in worker.state_dict().values() if v.is_floating_point()]
    floats = [v for v in worker.state_dict().values() if v.is_floating_point()]
    # not used by the loops (aggregation stays a list of uploads + common.fedavg): what a streaming weighted
    # sum into a preallocated buffer would cost per client instead of the upload copy and the FedAvg share
    ops, us = profiled(lambda: torch._foreach_add_(acc, floats, alpha=0.5), repeats=20)
    out["streaming_sum_alternative"] = {"ops": ops, "us": us}
    for n in (10, 1000):
        states = [upload() for _ in range(n)]
        ops, us = profiled(lambda: common.fedavg(states), repeats=1)
        out[f"fedavg_share_of_{n}"] = {"ops": ops / n, "us": us / n}
    out["state_tensors"] = len(model.state_dict())
    return out


def augment_costs(device) -> dict:
    """One Augment call on a batch of 128 (Fashion-MNIST 1x28x28 and an RGB 3x32x32 batch): kernel ops per
    call and microseconds per view."""
    out = {}
    for label, c, s in (("gray_28", 1, 28), ("rgb_32", 3, 32)):
        x = torch.randint(0, 256, (128, c, s, s), dtype=torch.uint8, device=device)
        data = common.Data(x, None, x, None, 10, (0.5,) * c, (0.25,) * c)
        aug = common.Augment(data)
        ops, us = profiled(lambda: aug(x), repeats=10)
        out[label] = {"ops_per_call": ops, "us_per_view": us / len(x)}
    return out


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------

def fmt(r: dict) -> str:
    if "error" in r:
        return "failed"
    if r["n"] == 1:
        return f"{r['images_per_s']:.0f}"
    return f"{r['images_per_s']:.0f} (±{50 * r['spread']:.0f}%)"


def markdown(res: dict, before: dict | None = None) -> str:
    out = [f"Device: {res['device']}; torch {res['torch']}; `{res['command']}`"]
    if "load" in res:
        out.append(f"Load average (1 min) at the start and the end: {res['load'][0]:.1f}, {res['load'][1]:.1f} "
                   f"on {os.cpu_count()} cores; {res['wall_s'] / 60:.0f} minutes.")
    out += ["Figures: images/s counting both views, median of repeats (± half the max-min spread).", ""]
    old_ratio, old_ops = {}, {}
    if before:
        out[-1:] = [f"Before: the same command on older code ({before.get('code', 'see its file')}); "
                    f"load {before['load'][0]:.1f}, {before['load'][1]:.1f}." if "load" in before else
                    "Before: the same command on older code.", ""]
        old_ratio = {r["method"]: (r["ratio"], r.get("ratio_cpu_time", float("nan"))) for r in before.get("ratio", [])}
        old_ops = {r["method"]: r["extra_ops_per_step"] for r in before.get("profile", {}).get("methods", [])}
        res = {**res, "ratio": [{**r, "before": old_ratio.get(r["method"])} for r in res.get("ratio", [])]} \
            if "ratio" in res else res
    if "ratio" in res:
        extra = [k for k in ("bare_bf16_channels_last", "bare_compiled") if any(k in r for r in res["ratio"])]
        names = {"bare_bf16_channels_last": "bare bf16+channels_last", "bare_compiled": "bare compiled"}
        b = " ratio before (wall / CPU) |" if before else ""
        out += ["| method | bare step | batch | in-loop | bare | ratio | ratio by CPU time |" + b +
                "".join(f" {names[k]} |" for k in extra),
                "|---|---|---|---|---|---|---|" + "---|" * (len(extra) + bool(before))]
        for r in res["ratio"]:
            cols = "".join(f" {fmt(r[k]) if k in r else '-'} |" for k in extra)
            was = (f" {r['before'][0]:.2f} / {r['before'][1]:.2f} |" if r.get("before") else " - |") if before else ""
            out.append(f"| {r['method']} | {r['bare_step']} | {r['batch_images']} | {fmt(r['in_loop'])} | "
                       f"{fmt(r['bare'])} | {r['ratio']:.2f} | {r.get('ratio_cpu_time', float('nan')):.2f} |" + was + cols)
        out.append("")
    if "pipeline" in res:
        p = res["pipeline"]
        out += [f"Input pipeline (Fashion-MNIST, batch {p['batch_images']}, two views; torchvision with "
                f"{p['workers']} DataLoader workers):", "",
                "| | ours (on-device, batched) | torchvision (PIL, DataLoader) | ratio |", "|---|---|---|---|",
                f"| augmentation only | {fmt(p['ours_augment'])} | {fmt(p['torchvision_augment'])} | {p['augment_ratio']:.2f} |",
                f"| + SimCLR step | {fmt(p['ours_train'])} | {fmt(p['torchvision_train'])} | {p['train_ratio']:.2f} |", ""]
    if "scale" in res:
        counts = sorted({r["clients"] for r in res["scale"]})
        out += [f"Scale ({res['scale'][0]['images']} images per round, training images/s):", "",
                "| method |" + "".join(f" {c} clients |" for c in counts) + " batch per client |",
                "|---|" + "---|" * len(counts) + "---|"]
        for m in ("fedavg_cl", "mocosfl"):
            rs = [r for r in res["scale"] if r["method"] == m]
            if not rs:
                continue
            out.append(f"| {m} | " + " | ".join(fmt(r) for r in rs) + " | " +
                       ", ".join(str(r["batch_per_client"]) for r in rs) + " |")
        for label, r in (("", res), (" (before)", before or {})):
            f = {x["clients"]: x for x in r.get("scale", []) if x["method"] == "fedavg_cl"}
            if len(f) > 1:
                hi, lo = f[max(f)], f[min(f)]
                cpu = (f" ({hi['cpu']['images_per_s'] / lo['cpu']['images_per_s']:.2f} by CPU time)"
                       if "cpu" in hi else "")
                out += [f"fedavg_cl with {max(f)} clients runs at {hi['images_per_s'] / lo['images_per_s']:.2f}{cpu} "
                        f"of its {min(f)}-client throughput for the same images{label}.", ""]
        out.append("")
    if "profile" in res:
        p = res["profile"]
        out += ["Operator counts (torch.profiler, CPU activities; leaf aten ops that compute, the CPU analogue of "
                "GPU kernel launches; counts do not depend on the load, microseconds do):", "",
                "| method | ops per step, bare | ops per step, in the loop | beyond the bare step |" +
                (" beyond, before |" if before else ""), "|---|---|---|---|" + ("---|" if before else "")]
        out += [f"| {r['method']} | {r['bare_ops_per_step']:.0f} | {r['loop_ops_per_step']:.0f} | "
                f"{r['extra_ops_per_step']:.0f} |" + (f" {old_ops[r['method']]:.0f} |" if r["method"] in old_ops
                                                       else " - |" if before else "") for r in p["methods"]]
        c = p["per_client"]
        out += ["", f"Per-client work in fedavg_cl ({c['state_tensors']} state tensors): " + ", ".join(
            f"{k.replace('_', ' ')} {v['ops']:.0f} ops / {v['us']:.0f} us" for k, v in c.items() if isinstance(v, dict)),
                "", "Augmentation (batch 128): " + ", ".join(
            f"{k} {v['ops_per_call']:.0f} ops per call / {v['us_per_view']:.1f} us per view" for k, v in p["augment"].items()),
                ""]
        if before and "profile" in before:
            out[-1:] = ["Augmentation before: " + ", ".join(
                f"{k} {v['ops_per_call']:.0f} ops per call / {v['us_per_view']:.1f} us per view"
                for k, v in before["profile"]["augment"].items()), ""]
    if "procs" in res:
        p = res["procs"]
        out += [f"Processes (torchrun, gloo, 1 thread each; fedavg_cl `{' '.join(p['flags'])}`; load average "
                f"{p['load_avg_1min']:.1f} on {p['cpu_count']} cores when it ended):", "",
                f"| 1 process | {p['procs']} processes | ratio (ideal {p['procs']}) |", "|---|---|---|",
                f"| {fmt(p['one_process'])} | {fmt(p['procs_rate'])} | {p['ratio']:.2f} |", ""]
    return "\n".join(out)


def read_saved(name: str, path: str) -> dict:
    """The figures of a saved --json file (for --render / --before), refusing in one line what is not one."""
    try:
        res = json.loads(Path(path).read_text())
    except FileNotFoundError:
        common.fail(f"--{name} {path}: no such file")
    except (OSError, UnicodeDecodeError, ValueError) as e:
        common.fail(f"--{name} {path} cannot be read as JSON ({type(e).__name__}: {e})")
    if not isinstance(res, dict) or "device" not in res or not set(SECTIONS) & set(res):
        common.fail(f"--{name} {path} is not a file written by benchmark.py --json (no device and no section)")
    return res


def parse(argv=None) -> Args:
    try:
        args = common.parse_args(Args, sys.argv[1:] if argv is None else list(argv))
        args.check()
        for name in ("render", "before"):
            if getattr(args, name):
                read_saved(name, getattr(args, name))
        if args.json:                   # before measuring: a failed write would lose minutes of figures
            folder = Path(args.json).resolve().parent
            if Path(args.json).is_dir():
                common.fail(f"--json {args.json} is a folder; give a file name")
            if not folder.is_dir():
                common.fail(f"--json {args.json}: there is no folder {folder} (create it first)")
            if not os.access(folder, os.W_OK | os.X_OK):
                common.fail(f"--json {args.json}: {folder} is not a writable folder")
        preflight(args, common._pick_device(args.device))
    except common.UserError as e:
        common.refuse(str(e))
    return args


def main(argv=None):
    args = parse(argv)
    if args.render:
        try:
            print(markdown(*(read_saved(n, f) for n, f in (("render", args.render), ("before", args.before)) if f)))
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:   # a damaged or older file
            common.refuse(f"--render {args.render}: a benchmark file this code cannot render "
                          f"({type(e).__name__}: {e})")
        except common.UserError as e:
            common.refuse(str(e))
        return
    device = common._pick_device(args.device)
    gpu = device.type == "cuda"
    fast = args.gpu_extras == "true" or (args.gpu_extras == "auto" and gpu)
    compile_ = args.compile == "true" or (args.compile == "auto" and gpu)
    torch.manual_seed(0)
    res = {"device": device_name(device), "torch": torch.__version__, "quick": args.quick,
           "command": "python benchmark.py " + shlex.join(sys.argv[1:] if argv is None else argv),
           "load": [os.getloadavg()[0]]}
    with tempfile.TemporaryDirectory(prefix="benchmark-") as tmp:
        t0, res["section_s"] = time.time(), {}
        for name, fn in (("ratio", lambda: measure_ratios(args, device, Path(tmp), fast, compile_)),
                         ("pipeline", lambda: measure_pipeline(args, device)),
                         ("scale", lambda: measure_scale(args, device, Path(tmp))),
                         ("profile", lambda: measure_profile(args, device, Path(tmp))),
                         ("procs", lambda: measure_procs(args, device, Path(tmp)))):
            if name in args.section_list:
                print(f"{name} ...", file=sys.stderr, flush=True)
                t = time.time()
                res[name] = fn()
                res["section_s"][name] = time.time() - t
        res["wall_s"] = time.time() - t0
    res["load"].append(os.getloadavg()[0])
    report = markdown(res, json.loads(Path(args.before).read_text()) if args.before else None)
    if args.json:                                   # whole or not at all: a temporary file and a rename
        try:
            common.write_atomic(args.json, json.dumps(res, indent=1))
        except common.WriteError as e:              # the figures are not lost: they are printed
            print(report, flush=True)
            common.refuse(f"{e}; the figures are printed above", code=1)
    print(report)


if __name__ == "__main__":
    main()
