"""The results table: every method on the same partitions, seeds, encoder, budget and evaluation.

Each cell (method x partition x seed) is one run of the method's own script in a subprocess,
`python X.py <shared flags> <method flags> --out results/runs/...`; this file only reads what the runs
wrote (summary.json, metrics.jsonl) and writes
  results/results.md    the tables (linear probe and kNN, mean +- std over seeds, wall-clock per row),
                        with the exact command line and the device above them
  results/results.png   kNN accuracy against rounds, one line per method, one panel per partition
  results/results.json  every cell's numbers (the tables are computed from it)
It is resumable: a cell whose run folder holds a complete summary.json for the same command is not run
again, an interrupted one continues with the method's own --resume, so re-running the same command
after Ctrl-C (or after adding a method) only runs what is missing. A cell is keyed by its command line,
not by the method's code: after changing a method, delete results/runs/<row>/ to run it again. Run
folders (results/runs/) are not committed.

What is the same for every row (the shared protocol, see README): dataset and its --train-size subset,
the partition (same --seed => same indices in every method), the encoder (cnn, width 32), --clients,
the evaluation (kNN k=200 t=0.1 every --eval-every rounds; linear probe, last of --probe-epochs) and the
image-pass budget: --rounds R x --local-epochs E, i.e. every image of every client is seen E times per
round, R x E times in all. Per method (each keeps its own hyper-parameters: optimizer, lr, tau, ...):
  local_cl              R rounds x E local epochs, no server; each client alone; numbers = mean over clients
  fedavg_cl             R x E, FedAvg + SimCLR
  gossip_ring           R x E, SimCLR clients, no server: one gossip step with the 2 ring neighbours per round;
                        numbers = mean over the client models
  gossip_complete       the same on the complete graph: FedAvg with the unweighted mean
  fedavg_moco           R x E, feature_fusion with fusion off: FedAvg + MoCo, the ablation baseline of FF
  feature_fusion        R x E, FedAvg + MoCo with the other clients' features as extra negatives
  neighborhood_match    R x E, feature_fusion + neighbourhood-matching loss
  dec_ssl               R x E, SimCLR, unweighted model mean, server lr decay (the Dec-SSL code's recipe)
  dec_ssl_featarc       R x E, the same with FeatARC (2 cluster models; headline = mean over them)
  mocosfl               R rounds = R epochs of the pool (all clients when fewer than 200) x E passes:
                        steps per round = E x mean client size // b; its own batch rule b = 100 // clients
                        images per client per step (server batch ~100; --batch-size is not passed), its own
                        network norm (GroupNorm + weight standardisation: it refuses BatchNorm), SGD 0.06
  fed_cluster           R x E; rounds 1..R - R//2 stage 1 (representation), the last R//2 stage 2 (clustering)
  centralized           fedavg_cl --clients 1: one client with all images, R x E epochs; no partition, so
                        one run per seed, repeated in every column
  random encoder        not a run: summary.json's random_encoder of the fedavg_cl cells (an untrained
                        encoder of the same architecture under the same evaluation)

Run:      python compare.py                   (3 seeds x (3 partitions x 11 rows + centralized) = 102 runs;
                                               meant for a GPU with the default --jobs, about 400k
                                               training views per run: hours on a 2-core CPU)
          python compare.py --quick           (one seed, tiny budget, 34 runs: a few minutes on 2 cores)
          python compare.py --methods fedavg_cl,mocosfl --partitions classes --seeds 0
Then copy results/results.md into the README (nothing in it is typed by hand).
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import hashlib
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

import common

ROOT = Path(__file__).resolve().parent


@dataclass
class Row:
    label: str
    script: str
    flags: tuple = ()             # added after the shared flags (the last value of a flag wins)
    drop: tuple = ()              # shared flags this method does not take
    partitioned: bool = True      # False: one run per seed, shown in every partition's column


# One line per row of the table, in this order (adding a method = adding a line).
ROWS = {
    "local_cl": Row("local_cl (each client alone; mean over clients)", "local_cl.py"),
    "fedavg_cl": Row("fedavg_cl (FedAvg + SimCLR)", "fedavg_cl.py"),
    "gossip_ring": Row("gossip_cl ring (no server; mean over clients)", "gossip_cl.py", ("--topology", "ring")),
    "gossip_complete": Row("gossip_cl complete (= FedAvg unweighted)", "gossip_cl.py", ("--topology", "complete")),
    "fedavg_moco": Row("fedavg_moco (feature_fusion --remote-features 0: FedAvg + MoCo)", "feature_fusion.py",
                       ("--remote-features", "0")),
    "feature_fusion": Row("feature_fusion (CCL: FF)", "feature_fusion.py"),
    "neighborhood_match": Row("neighborhood_match (CCL: FF + NM)", "neighborhood_match.py"),
    "dec_ssl": Row("dec_ssl (Dec-SSL: FedAvg + SimCLR)", "dec_ssl.py"),
    "dec_ssl_featarc": Row("dec_ssl --featarc (FeatARC, mean of 2 cluster models)", "dec_ssl.py", ("--featarc", "true")),
    "mocosfl": Row("mocosfl (MocoSFL-1)", "mocosfl.py", drop=("--batch-size",)),
    "fed_cluster": Row("fed_cluster (two stages, encoder after stage 2)", "fed_cluster.py"),
    "centralized": Row("centralized (fedavg_cl --clients 1)", "fedavg_cl.py", ("--clients", "1"), partitioned=False),
}
PARTITIONS = {"iid": "IID", "classes": "{k} classes per client", "dirichlet": "Dirichlet {alpha}"}
RANDOM_FROM = "fedavg_cl"      # whose runs' random_encoder gives the random-encoder row


@dataclass
class Args:
    quick: bool = False
    """tiny budget and one seed (the whole pipeline in a few minutes on 2 cores); explicit flags override it"""
    methods: str = "all"
    """comma-separated rows (all = every row): local_cl, fedavg_cl, gossip_ring, gossip_complete, fedavg_moco, feature_fusion, neighborhood_match,
    dec_ssl, dec_ssl_featarc, mocosfl, fed_cluster, centralized"""
    partitions: str = "iid,classes,dirichlet"
    """comma-separated columns: iid | classes (--classes-per-client) | dirichlet (--alpha)"""
    seeds: str = "0,1,2"
    """comma-separated seeds (partition, initialisation, augmentation)"""
    dataset: str = "fmnist"
    """fmnist | cifar10 | cifar100"""
    encoder: str = "cnn"
    """cnn | resnet18"""
    clients: int = 10
    """clients of every federated row"""
    classes_per_client: int = 2
    """K of the classes partition"""
    alpha: float = 0.1
    """Dirichlet concentration of the dirichlet partition"""
    rounds: int = 20
    """communication rounds R"""
    local_epochs: int = 1
    """local epochs E per round (every row sees every image R x E times)"""
    batch_size: int = 128
    """images per local step (mocosfl keeps its own rule, see above)"""
    train_size: int = 10000
    """class-stratified training subset (0 = all)"""
    test_size: int = 0
    """class-stratified test subset (0 = all)"""
    eval_every: int = 2
    """kNN monitor every this many rounds (the curves in results.png)"""
    probe_epochs: int = 30
    """linear-probe epochs (last epoch reported)"""
    device: str = "auto"
    """auto | cpu | cuda, passed to every run"""
    jobs: int = 0
    """runs at once; 0 = 1 on a CPU, min(8, cores // 2) with a GPU (small runs leave a GPU mostly idle)"""
    out: str = "results"
    """where results.md/.png/.json go; run folders go to OUT/runs/"""

    QUICK: ClassVar[dict] = dict(seeds="0", clients=5, rounds=2, train_size=1000, test_size=500, batch_size=32,
                                 eval_every=1, probe_epochs=5)
    SWITCH_PRESETS: ClassVar[dict] = {"quick": QUICK}

    def check(self):
        if self.dataset not in common.DATASETS:
            common.fail(f"--dataset must be one of {', '.join(common.DATASETS)} (got {self.dataset!r})")
        if self.encoder not in ("cnn", "resnet18"):
            common.fail(f"--encoder must be cnn or resnet18 (got {self.encoder!r})")
        if self.device not in ("auto", "cpu", "cuda"):
            common.fail(f"--device must be one of auto, cpu, cuda (got {self.device!r})")
        unknown = set(self.method_list) - set(ROWS)
        if unknown or not self.method_list:
            common.fail(f"--methods: unknown {sorted(unknown) or self.methods!r}; choose from {', '.join(ROWS)}")
        bad = set(self.partition_list) - set(PARTITIONS)
        if bad or not self.partition_list:
            common.fail(f"--partitions: unknown {sorted(bad) or self.partitions!r}; choose from {', '.join(PARTITIONS)}")
        try:
            seeds = self.seed_list
        except ValueError:
            common.fail(f"--seeds must be comma-separated integers (got {self.seeds!r})")
        if not seeds or len(set(seeds)) != len(seeds):
            common.fail(f"--seeds must name at least one seed, each once (got {self.seeds!r})")
        if not all(0 <= s < 2 ** 32 for s in seeds):
            common.fail(f"--seeds must be in [0, 2**32) (got {self.seeds!r})")
        for name in ("clients", "rounds", "local_epochs", "batch_size", "eval_every", "classes_per_client",
                     "probe_epochs"):
            if getattr(self, name) < 1:
                common.fail(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(self, name)})")
        for name in ("train_size", "test_size", "jobs"):
            if getattr(self, name) < 0:
                common.fail(f"--{name.replace('_', '-')} must be >= 0 (got {getattr(self, name)})")
        if self.alpha <= 0:
            common.fail(f"--alpha must be > 0 (got {self.alpha})")
        for key in self.method_list:
            if not (ROOT / ROWS[key].script).is_file():
                common.fail(f"--methods {key}: {ROWS[key].script} is not in {ROOT}")

    @property
    def method_list(self):
        return list(ROWS) if self.methods == "all" else [m for m in self.methods.split(",") if m]

    @property
    def partition_list(self):
        return [p for p in self.partitions.split(",") if p]

    @property
    def seed_list(self):
        return [int(s) for s in self.seeds.split(",") if s.strip()]


def parse_args(argv: list) -> Args:
    """common.parse_args: field docstrings are the --help, --quick switches on the QUICK preset."""
    return common.parse_args(Args, argv)


# ----------------------------------------------------------------------------------------------
# Cells: one run each
# ----------------------------------------------------------------------------------------------

@dataclass
class Cell:
    method: str
    partition: str                # "all" for rows without a partition
    seed: int
    flags: list                   # the method's command line, without --out
    dir: Path                     # parent of the method's run folder (the run's --out)

    @property
    def name(self):
        return f"{self.method} {self.partition} s{self.seed}"

    def run_folder(self, complete=True):
        """The newest run folder inside (with a summary.json if complete, else with a checkpoint)."""
        need = "summary.json" if complete else "checkpoint.pt"
        found = sorted(p for p in self.dir.glob("*/") if (p / need).is_file()) if self.dir.is_dir() else []
        return found[-1] if found else None


def shared_flags(args: Args, partition: str, seed: int) -> list:
    """The flags every row gets (the protocol and the budget); see the module docstring."""
    flags = ["--dataset", args.dataset, "--encoder", args.encoder, "--clients", args.clients,
             "--rounds", args.rounds, "--local-epochs", args.local_epochs, "--batch-size", args.batch_size,
             "--train-size", args.train_size, "--test-size", args.test_size, "--eval-every", args.eval_every,
             "--probe-epochs", args.probe_epochs, "--seed", seed, "--device", args.device, "--partition", partition]
    if partition == "classes":
        flags += ["--classes-per-client", args.classes_per_client]
    if partition == "dirichlet":
        flags += ["--alpha", args.alpha]
    return [str(f) for f in flags]


def method_flags(key: str, args: Args, partition: str, seed: int) -> list:
    row = ROWS[key]
    flags = shared_flags(args, partition if row.partitioned else "iid", seed)
    for name in row.drop:
        i = flags.index(name)
        del flags[i:i + 2]
    return [row.script, *flags, *row.flags]


def make_cells(args: Args, runs: Path) -> list:
    cells = []
    for key in args.method_list:
        parts = args.partition_list if ROWS[key].partitioned else ["all"]
        for part in parts:
            for seed in args.seed_list:
                flags = method_flags(key, args, part, seed)
                tag = hashlib.sha1(" ".join(flags).encode()).hexdigest()[:8]   # another budget = another cell
                cells.append(Cell(key, part, seed, flags, runs / key / f"{part}-s{seed}-{tag}"))
    return cells


def check_cells(cells: list):
    """Every cell's flags go through its script's own parse_args and check() before anything starts,
    so a value one script refuses stops the whole table up front instead of failing cell by cell."""
    import importlib
    labels = {}
    for cell in cells:
        mod = importlib.import_module(Path(cell.flags[0]).stem)
        try:
            args = common.parse_args(mod.Args, cell.flags[1:], script=None)
            args.check()
            common.check_partition(args, labels)
        except common.UserError as e:
            common.fail(f"{cell.name} ({cell.flags[0]}): {e}")


def run_cell(cell: Cell, env: dict) -> tuple:
    """Run (or resume) one cell's script; returns (exit status, seconds, log path)."""
    cell.dir.mkdir(parents=True, exist_ok=True)
    partial = cell.run_folder(complete=False)
    if partial is not None:                  # interrupted before: the method's own --resume continues it
        cmd = [sys.executable, cell.flags[0], "--resume", str(partial)]
    else:       # a folder without a checkpoint is left alone: compare.py deletes nothing it did not create now
        cmd = [sys.executable, *cell.flags, "--out", str(cell.dir)]
    log = cell.dir / "log.txt"
    t = time.time()
    with open(log, "a") as f:
        f.write(f"$ {shlex.join(cmd)}\n")
        f.flush()
        rc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    return rc, time.time() - t, log


def run_all(cells: list, jobs: int) -> list:
    """Run the cells that are not complete, `jobs` at a time; returns the failed ones."""
    todo = [c for c in cells if c.run_folder() is None]
    print(f"{len(cells)} cells, {len(cells) - len(todo)} already complete, {len(todo)} to run ({jobs} at a time)",
          flush=True)
    env = {**os.environ}
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // jobs)))
    failed, t0 = [], time.time()
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=jobs)
    try:
        futures = {pool.submit(run_cell, c, env): c for c in todo}
        for i, fut in enumerate(concurrent.futures.as_completed(futures), 1):
            cell, (rc, secs, log) = futures[fut], fut.result()
            if rc == 0 and cell.run_folder() is not None:
                s = json.loads((cell.run_folder() / "summary.json").read_text())
                msg = f"kNN {s['knn_acc']:.4f}  linear {s['linear_acc']:.4f}"
            else:
                failed.append(cell)
                msg = f"FAILED (exit {rc}); see {log}"
            eta = (time.time() - t0) / i * (len(todo) - i)
            print(f"[{i}/{len(todo)}] {cell.name}: {secs:.0f}s  {msg}  (ETA {eta:.0f}s)", flush=True)
    except KeyboardInterrupt:                # the runs got Ctrl-C too: they save a checkpoint and stop
        pool.shutdown(wait=True, cancel_futures=True)
        print("\ninterrupted; run the same command again to continue where it stopped", file=sys.stderr)
        sys.exit(130)
    pool.shutdown()
    return failed


# ----------------------------------------------------------------------------------------------
# Reading the runs, the tables and the figure
# ----------------------------------------------------------------------------------------------

def read_cell(cell: Cell):
    folder = cell.run_folder()
    if folder is None:
        return None
    s = json.loads((folder / "summary.json").read_text())
    metrics = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return {"method": cell.method, "partition": cell.partition, "seed": cell.seed, "run": str(folder.relative_to(ROOT))
            if folder.is_relative_to(ROOT) else str(folder), "command": "python " + shlex.join(cell.flags),
            "knn_acc": s["knn_acc"], "linear_acc": s["linear_acc"], "random_encoder": s["random_encoder"],
            "wall_s": s["wall_s"], "images_per_s": s["images_per_s"],
            "curve": [[m["round"], m["knn_acc"]] for m in metrics if "knn_acc" in m]}


def mean_std(values: list) -> tuple:
    """Mean and sample standard deviation (ddof=1; 0 for a single value)."""
    v = np.asarray(values, dtype=float)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def aggregate(results: list, args: Args) -> dict:
    """table[row][partition][metric] = (mean, std, n) over seeds, plus each row's mean wall_s and images/s.
    The "random" row reads the random_encoder numbers of the RANDOM_FROM runs."""
    def per_partition(runs, pick):
        return {p: {m: (*mean_std([pick(r, m) for r in cell]), len(cell)) for m in ("knn_acc", "linear_acc")}
                for p in args.partition_list if (cell := [r for r in runs if r["partition"] in (p, "all")])}

    table = {}
    if any(r["method"] == RANDOM_FROM for r in results):
        table["random"] = per_partition([r for r in results if r["method"] == RANDOM_FROM],
                                        lambda r, m: r["random_encoder"][m])
    for key in args.method_list:
        runs = [r for r in results if r["method"] == key]
        table[key] = per_partition(runs, lambda r, m: r[m])
        if runs:
            table[key]["wall_s"] = mean_std([r["wall_s"] for r in runs])[0]
            table[key]["images_per_s"] = mean_std([r["images_per_s"] for r in runs])[0]
    return table


def column_name(part: str, args: Args) -> str:
    return PARTITIONS[part].format(k=args.classes_per_client, alpha=args.alpha)


def markdown_table(table: dict, args: Args, metric: str, with_speed: bool) -> list:
    parts = args.partition_list
    head = "| method | " + " | ".join(column_name(p, args) for p in parts) + " |"
    head += " wall s per run | train img/s |" if with_speed else ""
    lines = [head, "|---" * (len(parts) + 1 + 2 * with_speed) + "|"]
    for key, row in table.items():
        label = "random encoder (untrained)" if key == "random" else ROWS[key].label
        cells = []
        for p in parts:
            if p not in row:
                cells.append("-")
                continue
            m, s, n = row[p][metric]
            cells.append(f"{m:.3f} ± {s:.3f}" if n > 1 else f"{m:.3f}")
        speed = (f" {row['wall_s']:.0f} | {row['images_per_s']:.0f} |" if "wall_s" in row else " - | - |") if with_speed else ""
        lines.append(f"| {label} | " + " | ".join(cells) + " |" + speed)
    return lines


def device_name(device: str) -> str:
    import torch
    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        return f"GPU {torch.cuda.get_device_name(0)}"
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name"))
    return f"CPU {model} ({os.cpu_count()} cores)"


def write_markdown(path: Path, table: dict, args: Args, command: str, device: str, jobs: int, failed: list,
                   missing: list):
    seeds = args.seed_list
    n = f"{len(seeds)} seeds ({args.seeds}), mean ± sample std" if len(seeds) > 1 else f"seed {seeds[0]}"
    setting = (f"{args.dataset}, {args.train_size or 'all'} training images, {args.test_size or 'all'} test images, "
               f"encoder {args.encoder}, {args.clients} clients, {args.rounds} rounds x {args.local_epochs} local "
               f"epoch(s), batch {args.batch_size}; kNN (k=200, t=0.1) on the test set; linear probe "
               f"{args.probe_epochs} epochs, last epoch reported")
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, timeout=5).stdout.strip()
    lines = ["# Results", "", "Produced by this command (nothing below is typed by hand):", "", f"    {command}", "",
             f"Device: {device}; {jobs} run(s) at once; git commit {commit or 'unknown'}; "
             f"{time.strftime('%Y-%m-%d')}.", "", f"Setting: {setting}; {n}.", "",
             "## Linear probe accuracy", "", *markdown_table(table, args, "linear_acc", True), "",
             "## kNN accuracy", "", *markdown_table(table, args, "knn_acc", False), "",
             "![kNN accuracy against rounds](results.png)", "",
             "Notes: every row trains every image R x E times (see compare.py's docstring for the mapping per "
             "method; mocosfl keeps its own batch rule and GroupNorm network). `centralized` has no partition: "
             "the same runs appear in every column. `random encoder` is the untrained encoder of the fedavg_cl "
             "runs under the same evaluation. Wall-clock = mean seconds per run including evaluation; "
             f"with {jobs} runs at once they share the device, so compare rows, not machines. "
             "Per-cell numbers and commands: results.json."]
    if failed or missing:
        lines += ["", "Not in the table (failed or not run; see their log.txt): " +
                  ", ".join(c.name for c in failed + missing) + "."]
    path.write_text("\n".join(lines) + "\n")


def plot(path: Path, results: list, table: dict, args: Args):
    plt = common._plt()
    parts = args.partition_list
    from matplotlib.ticker import MaxNLocator
    width = 4.2 * len(parts) + 1.8
    fig, axes = plt.subplots(1, len(parts), figsize=(width, 3.8), squeeze=False, sharey=True)
    colors = plt.get_cmap("tab10")
    for ax, part in zip(axes[0], parts):
        for i, key in enumerate(args.method_list):
            runs = [r for r in results if r["method"] == key and r["partition"] in (part, "all") and r["curve"]]
            if not runs:
                continue
            rounds = sorted(set.intersection(*[{c[0] for c in r["curve"]} for r in runs]))
            ys = [np.mean([dict(map(tuple, r["curve"]))[x] for r in runs]) for x in rounds]
            ax.plot(rounds, ys, marker="o", ms=3, color=colors(i % 10), label=key,
                    ls="--" if key == "centralized" else "-")
        if part in table.get("random", {}):
            ax.axhline(table["random"][part]["knn_acc"][0], color="gray", ls=":", label="random encoder")
        ax.set_title(column_name(part, args))
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("kNN accuracy (mean over seeds)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="center right")
    fig.tight_layout(rect=(0, 0, 1 - 1.7 / width, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = parse_args(argv)
        args.check()
        if args.device == "cuda":
            import torch
            if not torch.cuda.is_available():
                common.fail("--device cuda was asked for but no CUDA GPU is visible to torch")
        common.check_out(args.out)
        out = Path(args.out).resolve()          # the runs are started from the repository root
        cells = make_cells(args, out / "runs")
        check_cells(cells)
    except common.UserError as e:
        common.refuse(str(e))
    device = device_name(args.device)
    jobs = args.jobs or (min(8, max(1, (os.cpu_count() or 2) // 2)) if device.startswith("GPU") else 1)
    out.mkdir(parents=True, exist_ok=True)
    try:
        common.FolderLock(out, "compare.py")      # a second compare.py on the same --out (same cells) is refused
    except common.UserError as e:
        common.refuse(str(e))
    failed = run_all(cells, jobs)
    results = [r for r in map(read_cell, cells) if r is not None]
    missing = [c for c in cells if c.run_folder() is None and c not in failed]
    table = aggregate(results, args)
    command = "python compare.py" + ("" if not argv else " " + shlex.join(argv))
    write_markdown(out / "results.md", table, args, command, device, jobs, failed, missing)
    plot(out / "results.png", results, table, args)
    (out / "results.json").write_text(json.dumps(
        {"command": command, "device": device, "jobs": jobs, "args": dataclasses.asdict(args),
         "table": table, "cells": results}, indent=1))
    print(f"wrote {out / 'results.md'}, {out / 'results.png'} and {out / 'results.json'}")
    if failed:
        print(f"error: {len(failed)} run(s) failed: " + ", ".join(c.name for c in failed), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
