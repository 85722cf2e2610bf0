"""The results table and the claims ledger: every method on the same partitions, seeds, encoder, budget and evaluation.

Each cell (row x partition x seed, in a setting) is one run of the method's own script in a subprocess,
`python X.py <shared flags> <row flags> --out OUT/runs/...`; this file only reads what the runs wrote and writes
  OUT/cells/<row>/<partition>-s<seed>-<tag>/   one folder per finished cell, a few KB (cell.json: its numbers,
                    command, commit, device, date, partition hash and code fingerprint; the run's summary.json,
                    metrics.jsonl, config.json). results/cells/ is COMMITTED: the ledger is built up across sessions
  OUT/results.md    per setting the tables: kNN and linear probe with all, 1 % and 10 % of the training labels; every
                    cell is the trained encoder's mean +- std over seeds AND (in brackets) its gain over the run's own
                    untrained network of the same architecture (paired by seed), wall-clock per row
  OUT/claims.md     the claims ledger: per claim of the papers and setting, the paired per-seed differences, their
                    mean, 95 % t-interval and the verdict read from it (the rule at its top; CLAIMS below), and a
                    reading per paper generated from it
  OUT/results.png   kNN accuracy against rounds (results-<setting>.png for a paper's setting)
  OUT/results.json  every cell's numbers, the tables and the ledger

The default command is the LEDGER: exactly the cells the claims need (CLAIMS: each claim's two sides x --seeds),
in every setting (SETTINGS): the default CPU setting and each paper's own shape at CPU scale (fixed before any run
of it, with the same image passes). It runs only what is not committed: a cell is
  done     results/cells holds it (same command; the device does not count) and the code it ran has today's
           fingerprint (per project file the run imports, a hash of its syntax tree without docstrings and
           comments), or a fingerprint `--restamp` proved equivalent (a seeded tiny run of every row
           bit-identical at the cell's commit and today: results/cells/equivalent.json);
  stale    committed, but its code changed since: it runs again;
  missing  not committed: it runs.
A finished run folder in OUT/runs (or in another compare.py output named by --collect, e.g. a git worktree that
ran cells of a fixed commit) is taken into OUT/cells instead of being run again. A resumed run whose code changed
between its launches is not taken. Run folders (OUT/runs/) are never committed.
A table of your own: --methods and/or --partitions (every row x column x seed; --quick = a tiny budget, one seed);
it reads the committed cells of the same command too. Only the default setting writes into results/; any other
into runs/compare-<hash of its flags>/ (an explicit --out wins).

What is the same for every row (the shared protocol, see README): dataset and its --train-size subset, the partition
(same --seed => same indices in every method), the encoder (cnn, width 32), --clients, the evaluation (kNN k=200
t=0.1 every --eval-every rounds; linear probe, last of --probe-epochs; the same few-label subsets) and the image-pass
budget: --rounds R x --local-epochs E, i.e. every image of every client is seen E times per round, R x E in all.
Per method (each keeps its own hyper-parameters: optimizer, lr, tau, ...):
  local_cl / fedavg_cl  each client alone (mean over clients) / FedAvg + SimCLR; centralized = fedavg_cl --clients 1
  fedavg_sl             FedAvg + cross-entropy on the clients' LABELS (Dec-SSL's decentralized supervised baseline)
  gossip_ring/_complete SimCLR clients, no server: one gossip step a round with the ring neighbours / everybody
  fedavg_moco           feature_fusion with fusion off (FedAvg + MoCo), the ablation of FF; centralized_moco: 1 client
  feature_fusion / neighborhood_match   CCL: + the other clients' features as negatives / + neighbourhood matching
  dec_ssl (_featarc)    SimCLR, unweighted mean, server lr decay (the Dec-SSL code's recipe) (+ FeatARC, 2 clusters);
                        _p05: half the clients a round; _fewer_rounds: R/4 rounds x 4E local epochs (same passes);
                        dec_ssl_central: --clients 1
  mocosfl               R rounds = R epochs of the pool x E passes; its own batch rule b = 100 // clients images per
                        client per step (server batch ~100; --batch-size is not passed), GroupNorm + WS, SGD 0.06;
                        _c100 / _c1000: 100 / 1000 clients on the same data (at 1000 a pool of 100 a round, so 10x the
                        rounds for the same passes); _sync10 / _sync_round: client sync every 10 steps / once a round
  fed_cluster (_cc, _nc, _cn, _1stage)  rounds 1..R - R//2 stage 1, the last R//2 stage 2; losses N+C / C by default,
                        the other losses and the one-stage baseline for Miao & Koyuncu's orderings (2 classes only)
Rows differ in their networks (mocosfl: GroupNorm + WS), so compare rows by their gain, not by raw accuracy.

Run:      python compare.py --dry-run       what is done, stale and missing, per row and setting (runs nothing)
          python compare.py                 the ledger: runs only the missing cells (one CPU run at a time; on 2
                                            cores `--jobs 2`), then writes results/; bash gpu_ledger.sh on a GPU
          python compare.py --setting decssl            one setting
          python compare.py --quick         (one seed, 2 classes per client, tiny budget: checks the pipeline,
                                            not the methods; a few minutes on 2 cores)
          python compare.py --plot RUN,RUN  overlay run folders' curves in runs/overlay.png
          python compare.py --methods fedavg_cl,mocosfl --partitions classes --seeds 0
          python compare.py --report        the tables and the ledger from what is committed, running nothing
          python compare.py --restamp       keep stale cells whose code change is proven not to change numbers
          python compare.py --collect ../worktree/results     take finished cells from another output folder
Then paste results/results.md and results/claims.md into the README (nothing in them is typed by hand).
"""
from __future__ import annotations

import ast
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import io
import json
import os
import platform
import re
import shlex
import shutil
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
    flags: tuple = ()             # added after the shared flags (the last value of a flag wins); {x} = FMT[x]
    drop: tuple = ()              # shared flags this method does not take
    partitioned: bool = True      # False: one run per seed, shown in every partition's column
    only: tuple = ()              # the partitions this row runs on (empty = all)
    variant: bool = False         # a row for one claim (another client count, sync, ...): in a table of your own
                                  # only with --methods all or by name


# One line per row of the table, in this order (adding a method = adding a line).
ROWS = {
    "local_cl": Row("local_cl (each client alone; mean over clients)", "local_cl.py"),
    "fedavg_cl": Row("fedavg_cl (FedAvg + SimCLR)", "fedavg_cl.py"),
    "fedavg_sl": Row("fedavg_sl (FedAvg + cross-entropy: trained on the LABELS)", "fedavg_sl.py"),
    "gossip_ring": Row("gossip_cl ring (no server; mean over clients)", "gossip_cl.py", ("--topology", "ring")),
    "gossip_complete": Row("gossip_cl complete (= FedAvg unweighted)", "gossip_cl.py", ("--topology", "complete")),
    "fedavg_moco": Row("fedavg_moco (feature_fusion --remote-features 0: FedAvg + MoCo)", "feature_fusion.py",
                       ("--remote-features", "0")),
    "fedavg_moco_c100": Row("fedavg_moco at 100 clients", "feature_fusion.py",
                            ("--remote-features", "0", "--clients", "100"), variant=True),
    "feature_fusion": Row("feature_fusion (CCL: FF)", "feature_fusion.py"),
    "neighborhood_match": Row("neighborhood_match (CCL: FF + NM)", "neighborhood_match.py"),
    "dec_ssl": Row("dec_ssl (Dec-SSL: FedAvg + SimCLR)", "dec_ssl.py"),
    "dec_ssl_p05": Row("dec_ssl --participation 0.5", "dec_ssl.py", ("--participation", "0.5"), variant=True),
    "dec_ssl_fewer_rounds": Row("dec_ssl, 4x fewer rounds x 4x the local epochs", "dec_ssl.py",
                                ("--rounds", "{rounds_div4}", "--local-epochs", "{local_epochs_x4}",
                                 "--eval-every", "{eval_every_div4}"), variant=True),
    "dec_ssl_featarc": Row("dec_ssl --featarc (FeatARC, mean of 2 cluster models)", "dec_ssl.py", ("--featarc", "true")),
    "mocosfl": Row("mocosfl (MocoSFL-1)", "mocosfl.py", drop=("--batch-size",)),
    "mocosfl_c100": Row("mocosfl at 100 clients (1 image per client per step)", "mocosfl.py", ("--clients", "100"),
                        drop=("--batch-size",), variant=True),
    "mocosfl_c1000": Row("mocosfl at 1000 clients (a pool of 100 a round, 10x the rounds)", "mocosfl.py",
                         ("--clients", "1000", "--rounds", "{rounds_x10}", "--eval-every", "{eval_every_x10}"),
                         drop=("--batch-size",), variant=True),
    "mocosfl_sync10": Row("mocosfl, clients synchronised every 10 steps", "mocosfl.py", ("--sync-every", "10"),
                          drop=("--batch-size",), variant=True),
    "mocosfl_sync_round": Row("mocosfl, clients synchronised once a round", "mocosfl.py",
                              ("--sync-every", "1000000"), drop=("--batch-size",), variant=True),
    "fed_cluster": Row("fed_cluster (N+C / C: two stages, encoder after stage 2)", "fed_cluster.py"),
    # Miao & Koyuncu's orderings (ledger only; stage-1 / stage-2 losses; their claims are about non-IID clients)
    "fed_cluster_cc": Row("fed_cluster C / C", "fed_cluster.py", ("--loss", "contrastive"), only=("classes",)),
    "fed_cluster_nc": Row("fed_cluster N / C", "fed_cluster.py", ("--loss", "noncontrastive"), only=("classes",)),
    "fed_cluster_cn": Row("fed_cluster C / N", "fed_cluster.py", ("--loss", "contrastive", "--cluster-loss",
                          "noncontrastive"), only=("classes",)),
    "fed_cluster_1stage": Row("fed_cluster one-stage C / C", "fed_cluster.py", ("--loss", "contrastive",
                              "--cluster-rounds", "{rounds}"), only=("classes",)),
    "centralized": Row("centralized (fedavg_cl --clients 1)", "fedavg_cl.py", ("--clients", "1"), partitioned=False),
    "centralized_moco": Row("centralized MoCo (feature_fusion --clients 1 --remote-features 0)", "feature_fusion.py",
                            ("--clients", "1", "--remote-features", "0"), partitioned=False, variant=True),
    "dec_ssl_central": Row("centralized Dec-SSL (dec_ssl --clients 1)", "dec_ssl.py", ("--clients", "1"),
                           partitioned=False, variant=True),
}


def row_format(args) -> dict:
    """The values a row's flags may name: the setting's budget and what a row derives from it (same image passes)."""
    return dict(rounds=args.rounds, rounds_div4=max(1, args.rounds // 4), local_epochs_x4=4 * args.local_epochs,
                eval_every_div4=max(1, args.eval_every // 4), rounds_x10=10 * args.rounds,
                eval_every_x10=10 * args.eval_every)


PARTITIONS = {"iid": "IID", "classes": "{k} classes per client", "dirichlet": "Dirichlet {alpha}"}
METRICS = {"knn_acc": "kNN accuracy (all labels)", "knn_acc_1pct": "kNN accuracy, 1 % of the labels",
           "knn_acc_10pct": "kNN accuracy, 10 % of the labels", "linear_acc": "Linear probe accuracy (all labels)",
           "linear_acc_1pct": "Linear probe accuracy, 1 % of the labels",
           "linear_acc_10pct": "Linear probe accuracy, 10 % of the labels"}
assert set(METRICS) == set(common.EVAL_KEYS)


@dataclass
class Args:
    quick: bool = False
    """tiny budget and one seed (the whole pipeline in a few minutes on 2 cores); explicit flags override it"""
    setting: str = "all"
    """all | default | ccl | decssl | mocosfl: the ledger's settings to run (each paper's own shape: SETTINGS)"""
    dry_run: bool = False
    """list what is done, stale and missing per row, run nothing"""
    report: bool = False
    """write the tables and the ledger from the cells already there (committed, or finished in OUT/runs and --collect
    folders), run nothing"""
    yes: bool = False
    """start a job estimated at more than an hour (without it such a job only prints its estimate)"""
    plot: str = ""
    """comma-separated run folders: overlay their curves (kNN with all and with 1 percent of the labels, loss;
    each run's own untrained network dashed) in OUT/overlay.png (default runs/overlay.png); runs nothing else"""
    readme: bool = False
    """also paste the new results.md and claims.md into README.md's generated blocks (the committed setting only)"""
    restamp: bool = False
    """for stale committed cells: prove with a seeded tiny run per row that the code they ran and today's give
    bit-identical numbers; if so, keep them (results/cells/equivalent.json); run nothing else"""
    collect: str = ""
    """comma-separated output folders of other compare.py runs (e.g. a git worktree's results/) whose finished
    cells are taken into this one's cells/ instead of being run again"""
    methods: str = ""
    """comma-separated rows for a table of your own (all = every row, variants included; empty = the rows the claims
    need, or with --partitions / --quick every method row)"""
    partitions: str = ""
    """comma-separated columns for a table of your own: iid | classes | dirichlet (empty = what the claims need)"""
    seeds: str = "0,1,2,3,4"
    """comma-separated seeds (partition, initialisation, augmentation)"""
    dataset: str = "fmnist"
    """fmnist | cifar10 | cifar100"""
    data_dir: str = ""
    """folder of the dataset files, passed to every run (empty: the repository's data/; CIFAR has to be put there)"""
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
    """images per local step (mocosfl keeps its own rule: 100 // clients images per client per step)"""
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
    out: str = ""
    """where results.md/.png/.json and claims.md go (run folders: OUT/runs/); empty = results/ for the default
    setting (the committed table), runs/compare-quick/ for --quick, runs/compare-<hash>/ for any other"""

    QUICK: ClassVar[dict] = dict(seeds="0", partitions="classes", clients=5, rounds=2, train_size=1000,
                                 test_size=500, batch_size=32, eval_every=1, probe_epochs=5)
    SWITCH_PRESETS: ClassVar[dict] = {"quick": QUICK}

    def check(self):
        if self.dataset not in common.DATASETS:
            common.fail(f"--dataset must be one of {', '.join(common.DATASETS)} (got {self.dataset!r})")
        if self.encoder not in ("cnn", "resnet18"):
            common.fail(f"--encoder must be cnn or resnet18 (got {self.encoder!r})")
        if self.device not in ("auto", "cpu", "cuda"):
            common.fail(f"--device must be one of auto, cpu, cuda (got {self.device!r})")
        if self.setting != "all" and self.setting not in SETTINGS:
            common.fail(f"--setting must be all or one of {', '.join(SETTINGS)} (got {self.setting!r})")
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
    def grid(self) -> bool:
        """A table of your own (--methods, --partitions or --quick): every row x column x seed; otherwise the
        ledger: exactly the cells the claims need, in every setting (--setting)."""
        return bool(self.methods or self.partitions or self.quick)

    @property
    def method_list(self):
        if self.methods == "all":
            return list(ROWS)
        return [k for k, r in ROWS.items() if not r.variant] if not self.methods else \
            [m for m in self.methods.split(",") if m]

    @property
    def partition_list(self):
        return [p for p in (self.partitions or ",".join(PARTITIONS)).split(",") if p]

    @property
    def seed_list(self):
        return [int(s) for s in self.seeds.split(",")]        # an empty item is refused, not skipped


def parse_args(argv: list) -> Args:
    """common.parse_args: field docstrings are the --help, --quick switches on the QUICK preset."""
    return common.parse_args(Args, argv)


# ----------------------------------------------------------------------------------------------
# Cells: one run each
# ----------------------------------------------------------------------------------------------

@dataclass(eq=False)          # a cell is itself (a dict key), not equal to another with the same fields
class Cell:
    method: str
    partition: str                # "all" for rows without a partition
    seed: int
    flags: list                   # the method's command line, without --out
    dir: Path                     # parent of the method's run folder (the run's --out)
    setting: str = "default"

    @property
    def name(self):
        return f"{self.method} {self.partition} s{self.seed}" + ("" if self.setting == "default" else f" [{self.setting}]")

    @property
    def tag(self):
        return self.dir.name

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
    if args.data_dir:                            # only when given: the same files elsewhere are the same cell
        flags += ["--data-dir", args.data_dir]
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
    return [row.script, *flags, *(f.format(**row_format(args)) for f in row.flags)]


def identity(flags: list) -> list:
    """A cell's command without what does not change its numbers' meaning (--device, --out, --data-dir): a cell
    made on a GPU and one made on a CPU are the same cell, and its device is recorded with it."""
    flags, i = list(flags), 0
    while i < len(flags):
        if flags[i] in ("--device", "--out", "--data-dir"):
            del flags[i:i + 2]
        else:
            i += 1
    return flags


def cell_dir(runs: Path, key: str, part: str, seed: int, flags: list) -> Path:
    tag = hashlib.sha1(" ".join(identity(flags)).encode()).hexdigest()[:8]     # another budget = another cell
    return runs / key / f"{part}-s{seed}-{tag}"


def make_cells(args: Args, runs: Path, setting: str = "default") -> list:
    """Every row x column x seed of args (a table of your own)."""
    cells = []
    for key in args.method_list:
        parts = [p for p in args.partition_list if not ROWS[key].only or p in ROWS[key].only]
        parts = parts if ROWS[key].partitioned else ["all"]
        for part in parts:
            for seed in args.seed_list:
                flags = method_flags(key, args, part, seed)
                cells.append(Cell(key, part, seed, flags, cell_dir(runs, key, part, seed, flags), setting))
    return cells


def setting_args(args: Args, name: str) -> Args:
    """args with the setting's flags (a paper's own shape); the default setting is args as given."""
    return dataclasses.replace(args, **SETTINGS[name].flags)


def setting_names(args: Args) -> list:
    return list(SETTINGS) if args.setting == "all" else [args.setting]


def ledger_view(args: Args, name: str) -> Args:
    """The setting's args, with --methods / --partitions = the rows and columns its claims compare."""
    sides = [side.split("@") for c in CLAIMS if name in c.settings for side in (c.a, c.b)]
    rows = [k for k in ROWS if any(k == key for key, _ in sides)]
    parts = [p for p in PARTITIONS if any(p == part for _, part in sides)]
    return dataclasses.replace(setting_args(args, name), methods=",".join(rows), partitions=",".join(parts))


def ledger_cells(args: Args, runs: Path) -> list:
    """Exactly the cells the claims need: per setting, each claim's two sides x seeds (shared cells once)."""
    cells, seen = [], set()
    for name in setting_names(args):
        view = ledger_view(args, name)
        needed = {tuple(side.split("@")) for c in CLAIMS if name in c.settings for side in (c.a, c.b)}
        for key, part in sorted(needed, key=lambda kp: (list(ROWS).index(kp[0]), kp[1])):
            for seed in args.seed_list:
                flags = method_flags(key, view, part if part != "all" else "iid", seed)
                d = cell_dir(runs, key, part, seed, flags)
                if d not in seen:
                    seen.add(d)
                    cells.append(Cell(key, part, seed, flags, d, name))
    return cells


# ----------------------------------------------------------------------------------------------
# The committed cells: results/cells/<row>/<partition>-s<seed>-<tag>/ (a few KB each, never a checkpoint)
# ----------------------------------------------------------------------------------------------
# cell.json holds the record the tables read (read_cell), the command, and where it came from: the commit, the
# device, the date, the partition's hash and the FINGERPRINT of the code it ran: per project file the run imports
# (the script, common.py, distributed.py, ...), a hash of its syntax tree without docstrings and comments, so an
# edit of a docstring or comment keeps a cell valid and any edit of code makes it stale. summary.json,
# metrics.jsonl and config.json are the run's own files, copied. A stale cell is run again; a refactor that keeps
# a seeded tiny run bit-identical is recorded in equivalent.json (`--restamp`) and keeps its cells valid.

STORE = ROOT / "results" / "cells"          # the committed cells; a run writes its own into OUT/cells
EQUIVALENT = STORE / "equivalent.json"


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list):
            node.body = [n for n in body if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)
                                                 and isinstance(n.value.value, str))] or [ast.Pass()]
    return tree


def code_fingerprint(script: str, read=None) -> dict:
    """{file: hash} over the project modules `script` imports (transitively), docstrings and comments left out.
    read(name) gives a file's source (default: the working tree; compare.py --collect reads a commit)."""
    read = read or (lambda name: (ROOT / name).read_text() if (ROOT / name).is_file() else None)
    out, todo = {}, [script]
    while todo:
        name = todo.pop()
        if name in out or (src := read(name)) is None:
            continue
        tree = ast.parse(src)
        for node in ast.walk(tree):
            mods = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                    [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else [])
            todo += [m.split(".")[0] + ".py" for m in mods]
        out[name] = hashlib.sha256(ast.dump(_strip_docstrings(tree)).encode()).hexdigest()[:16]
    return dict(sorted(out.items()))


def fingerprint_id(fp: dict) -> str:
    return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:16]


def git_reader(commit: str):
    def read(name):
        proc = subprocess.run(["git", "show", f"{commit}:{name}"], cwd=ROOT, capture_output=True, text=True)
        return proc.stdout if proc.returncode == 0 else None
    return read


def equivalents() -> dict:
    """{old fingerprint id: newer id} from the recorded bit-identical refactors."""
    return {k: v["to"] for k, v in json.loads(EQUIVALENT.read_text()).items()} if EQUIVALENT.is_file() else {}


def current(fid: str, now: str, equiv: dict) -> bool:
    """Whether code with fingerprint id `fid` computes what the code with id `now` computes."""
    seen = set()
    while fid != now and fid in equiv and fid not in seen:
        seen.add(fid)
        fid = equiv[fid]
    return fid == now


def stored(cell: Cell, stores: list):
    """The cell.json of this cell (same command) in the first store that has one, or None."""
    for store in stores:
        path = store / cell.method / cell.tag / "cell.json"
        if path.is_file() and identity(shlex.split((rec := json.loads(path.read_text()))["command"])[1:]) == \
                identity(cell.flags):
            return rec
    return None


class Status:
    """done / stale / missing for every cell, against the fingerprint of today's code (computed once per script)."""

    def __init__(self, stores: list):
        self.stores, self.now, self.equiv = stores, {}, equivalents()

    def fid(self, script: str) -> str:
        if script not in self.now:
            self.now[script] = fingerprint_id(code_fingerprint(script))
        return self.now[script]

    def __call__(self, cell: Cell) -> str:
        rec = stored(cell, self.stores)
        if rec is None:
            return "missing"
        return "done" if current(rec["fingerprint_id"], self.fid(cell.flags[0]), self.equiv) else "stale"


def partition_hash(folder: Path):
    path = folder / "partition.json"
    if not path.is_file():
        return None
    clients = json.loads(path.read_text())["clients"]
    return hashlib.sha256(json.dumps([c["indices"] for c in clients]).encode()).hexdigest()[:16]


def write_cell(store: Path, cell: Cell, record: dict, provenance: dict, folder: Path | None = None):
    """Write STORE/<row>/<tag>/ whole or not at all: a temporary folder, then one rename."""
    dest = store / cell.method / cell.tag
    tmp = dest.with_name(dest.name + f".tmp{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    for name in ("summary.json", "metrics.jsonl", "config.json"):
        if folder is not None and (folder / name).is_file():
            shutil.copyfile(folder / name, tmp / name)
    rec = {**record, "run": None, "setting": cell.setting, **provenance}
    (tmp / "cell.json").write_text(json.dumps(rec, indent=1) + "\n")
    if dest.exists():
        old = dest.with_name(dest.name + f".old{os.getpid()}")
        dest.rename(old)
        tmp.rename(dest)
        shutil.rmtree(old)
    else:
        tmp.rename(dest)


def collect(store: Path, cell: Cell, folder: Path, fp: dict, device: str, how: str):
    """Commit-ready copy of a finished run (folder) of `cell`, whose code had fingerprint fp."""
    cfg = json.loads((folder / "config.json").read_text())
    record = read_run(cell, folder)
    write_cell(store, cell, record, {"fingerprint": fp, "fingerprint_id": fingerprint_id(fp), "fingerprint_from": how,
                              "commit": cfg.get("git_commit"), "device": device, "torch": cfg.get("versions", {}).get("torch"),
                              "date": time.strftime("%Y-%m-%d", time.gmtime((folder / "summary.json").stat().st_mtime)),
                              "partition_hash": partition_hash(folder)}, folder)


def launch_fingerprint(cell: Cell):
    """The fingerprint every launch of this cell's run recorded (compare.py writes it before starting the run),
    or None when the launches saw different code (a resume after an edit: such a run is not collected)."""
    path = cell.dir / "fingerprint.json"
    if not path.is_file():
        return None, None
    launches = json.loads(path.read_text())
    ids = {fingerprint_id(f) for f in launches}
    return (launches[0], "the working tree when compare.py started the run") if len(ids) == 1 else (None, None)


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
    """Run (or resume) one cell's script; returns (exit status, seconds, log path). The fingerprint of the code
    it starts with is appended to the cell's fingerprint.json first (a resume after an edit is then visible)."""
    cell.dir.mkdir(parents=True, exist_ok=True)
    partial = cell.run_folder(complete=False)
    if partial is not None:                  # interrupted before: the method's own --resume continues it
        cmd = [sys.executable, cell.flags[0], "--resume", str(partial)]
    else:       # a folder without a checkpoint is left alone: compare.py deletes nothing it did not create now
        cmd = [sys.executable, *cell.flags, "--out", str(cell.dir)]
    fp_path = cell.dir / "fingerprint.json"
    launches = json.loads(fp_path.read_text()) if fp_path.is_file() and partial is not None else []
    if partial is not None and not launches:     # started by an older compare.py: its code is that of its commit
        commit = json.loads((partial / "config.json").read_text()).get("git_commit")
        launches = [code_fingerprint(cell.flags[0], git_reader(commit)) if commit else {"unknown": "no commit"}]
    common._write_json(fp_path, [*launches, code_fingerprint(cell.flags[0])])
    log = cell.dir / "log.txt"
    t = time.time()
    with open(log, "a") as f:
        f.write(f"$ {shlex.join(cmd)}\n")
        f.flush()
        rc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    return rc, time.time() - t, log


def run_all(todo: list, jobs: int, done=lambda cell: None) -> list:
    """Run `todo`, `jobs` at a time, calling done(cell) after each that finished complete; returns the failed."""
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
                msg = (f"kNN {s['knn_acc']:.4f}  linear {s['linear_acc']:.4f}  kNN 1 % labels {s['knn_acc_1pct']:.4f} "
                       f"(gain over untrained {s['gain']['knn_acc_1pct']:+.4f})")
                done(cell)
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

def read_run(cell: Cell, folder: Path) -> dict:
    """The record the tables and the ledger read, from a finished run folder of `cell`."""
    s = json.loads((folder / "summary.json").read_text())
    metrics = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    rand = s["random_encoder"]
    return {"method": cell.method, "partition": cell.partition, "seed": cell.seed, "setting": cell.setting,
            "run": str(folder.relative_to(ROOT)) if folder.is_relative_to(ROOT) else str(folder),
            "command": "python " + shlex.join(cell.flags),
            **{m: s.get(m) for m in METRICS}, "random_encoder": {m: rand.get(m) for m in METRICS},
            "gain": {m: s[m] - rand[m] if m in s and m in rand else None for m in METRICS},
            **{k: s[k] for k in ("stage1", "cluster_acc", "nmi", "ari") if k in s},      # fed_cluster's ledger rows
            "wall_s": s["wall_s"], "images_per_s": s["images_per_s"],
            "curve": {m: [[r["round"], r[m]] for r in metrics if m in r] for m in ("knn_acc", "knn_acc_1pct")}}


def read_cell(cell: Cell, stores: list = ()):
    """A cell's record: from a finished run folder of this compare.py's OUT, else from a store (committed)."""
    folder = cell.run_folder()
    if folder is not None:
        return read_run(cell, folder)
    rec = stored(cell, list(stores))
    return {**rec, "setting": cell.setting} if rec is not None else None


def mean_std(values: list) -> tuple:
    """Mean and sample standard deviation (ddof=1; 0 for a single value)."""
    v = np.asarray(values, dtype=float)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def aggregate(results: list, args: Args) -> dict:
    """table[row][partition][metric] = {mean, std, n, gain_mean, gain_std, random_mean} over seeds (gain = trained -
    the same run's untrained network, so its std is that of the paired differences), plus each row's mean wall_s
    and images/s. A metric the runs did not write (summaries from before it existed) is left out."""
    def stats(cell, m):
        done = [r for r in cell if r[m] is not None]
        if not done:
            return None
        (mean, std), (gain, gain_std) = mean_std([r[m] for r in done]), mean_std([r["gain"][m] for r in done])
        return {"mean": mean, "std": std, "n": len(done), "gain_mean": gain, "gain_std": gain_std,
                "random_mean": mean_std([r["random_encoder"][m] for r in done])[0]}

    table = {}
    for key in args.method_list:
        if ROWS[key].only and not set(ROWS[key].only) & set(args.partition_list):
            continue                                  # a row of other columns (fed_cluster's variants): no line
        runs = [r for r in results if r["method"] == key]
        table[key] = {p: {m: st for m in METRICS if (st := stats(cell, m))} for p in args.partition_list
                      if (cell := [r for r in runs if r["partition"] in (p, "all")])}
        if runs:
            table[key]["wall_s"] = mean_std([r["wall_s"] for r in runs])[0]
            table[key]["images_per_s"] = mean_std([r["images_per_s"] for r in runs])[0]
    return table


def column_name(part: str, args: Args) -> str:
    return PARTITIONS[part].format(k=args.classes_per_client, alpha=args.alpha)


def cell_text(st: dict | None) -> str:
    """`trained (gain over the own untrained network)`, each mean ± sample std over seeds."""
    if st is None:
        return "-"
    if st["n"] == 1:
        return f"{st['mean']:.3f} ({st['gain_mean']:+.3f})"
    return f"{st['mean']:.3f} ± {st['std']:.3f} ({st['gain_mean']:+.3f} ± {st['gain_std']:.3f})"


def markdown_table(table: dict, args: Args, metric: str, with_speed: bool) -> list:
    parts = args.partition_list
    head = "| method | " + " | ".join(column_name(p, args) for p in parts) + " |"
    head += " wall s per run | train img/s |" if with_speed else ""
    lines = [head, "|---" * (len(parts) + 1 + 2 * with_speed) + "|"]
    for key, row in table.items():
        cells = [cell_text(row.get(p, {}).get(metric)) for p in parts]
        speed = (f" {row['wall_s']:.0f} | {row['images_per_s']:.0f} |" if "wall_s" in row else " - | - |") if with_speed else ""
        lines.append(f"| {ROWS[key].label} | " + " | ".join(cells) + " |" + speed)
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


NEUTRAL = ("out", "jobs", "device", "data_dir", "dry_run", "report", "restamp", "collect", "readme", "yes", "plot")   # flags that change no number
SELECTION = ("seeds", "methods", "partitions", "setting")                         # flags that choose cells


def changed_flags(args: Args) -> dict:
    """The flags (other than NEUTRAL) that differ from the default setting."""
    default = Args()
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(Args)
            if f.name not in NEUTRAL and getattr(args, f.name) != getattr(default, f.name)}


def default_out(args: Args) -> Path:
    """results/ only for the default setting (the committed table); --quick and anything else go to runs/."""
    changed = changed_flags(args)
    if not changed:
        return ROOT / "results"
    if args.quick and all(k == "quick" or Args.QUICK.get(k) == v for k, v in changed.items()):
        return ROOT / "runs" / "compare-quick"
    return ROOT / "runs" / ("compare-" + hashlib.sha1(json.dumps(changed, sort_keys=True).encode()).hexdigest()[:8])


def warning_line(args: Args) -> list:
    """The first line of every markdown this run writes when its numbers are not the reference setting's."""
    if args.quick:
        return ["**Pipeline check (`--quick`): a tiny budget (one seed unless --seeds). These numbers check that "
                "the pipeline runs end to end, not how the methods compare.**", ""]
    setting = [f"--{k.replace('_', '-')} {v}" for k, v in changed_flags(args).items() if k not in SELECTION]
    if setting:
        return [f"**Not the reference setting** (changed: {', '.join(setting)}): compare these numbers only with "
                "runs of the same setting.", ""]
    return []


def setting_line(args: Args) -> str:
    seeds = args.seed_list
    n = f"{len(seeds)} seeds ({args.seeds}), mean ± sample std" if len(seeds) > 1 else f"seed {seeds[0]}"
    return (f"Setting: {args.dataset}, {args.train_size or 'all'} training images, {args.test_size or 'all'} test "
            f"images, encoder {args.encoder}, {args.clients} clients, {args.rounds} rounds x {args.local_epochs} local "
            f"epoch(s), batch {args.batch_size}, Dirichlet alpha {args.alpha}, {args.classes_per_client} classes per "
            f"client; kNN (k=200, t=0.1, k capped at the bank size) on the test set; linear probe {args.probe_epochs} "
            f"epochs, last epoch reported; 1 % / 10 % of the labels = a class-balanced seeded subset of the training "
            f"images as the kNN bank / probe training set; {n}.")


def provenance(results: list) -> str:
    """Where the cells came from: their commits, devices and dates (each cell's own are in results.json)."""
    def count(key):
        got = {}
        for r in results:
            got[r.get(key) or "this run"] = got.get(r.get(key) or "this run", 0) + 1
        return ", ".join(f"{k} ({v})" for k, v in got.items())
    return (f"Cells: {len(results)}; commits: {count('commit')}; devices: {count('device')}; dates: {count('date')}."
            if results else "Cells: none yet.")


def header(args: Args, command: str, device: str, jobs: int) -> list:
    commit = None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, timeout=5).stdout.strip()
    return ["Produced by this command (nothing below is typed by hand):", "", f"    {command}", "",
            f"Written on {device}; {jobs} run(s) at once; git commit {commit or 'unknown'}; "
            f"{time.strftime('%Y-%m-%d')}. Each cell's own commit, device and date: results.json (cells) and "
            "results/cells/*/*/cell.json.", ""]


def write_markdown(path: Path, sections: list, args: Args, head: list, jobs: int, failed: list, missing: list):
    """sections: [(setting name, view args, table, its records, figure file name)]."""
    lines = [*warning_line(args), "# Results", "", *head,
             "Every cell: the trained encoder's accuracy, and in brackets its **gain over the same run's untrained "
             "network** (same architecture, width and normalisation, same seed and evaluation), each as mean ± "
             "sample std over seeds; the gain's std is that of the paired per-seed differences. Rows use different "
             "networks (mocosfl: GroupNorm + weight standardisation), so rank rows by the gain, not by raw "
             "accuracy. The claims of the papers are checked in claims.md. fedavg_sl is the one row trained on the "
             "training labels.", ""]
    many = len(sections) > 1
    for name, view, table, results, figure in sections:
        h = "###" if many else "##"
        if many:
            lines += [f"## Setting `{name}`: {SETTINGS[name].title}", ""]
        lines += [setting_line(view), "", provenance(results), ""]
        for i, (metric, title) in enumerate(METRICS.items()):
            lines += [f"{h} {title}", "", *markdown_table(table, view, metric, with_speed=i == 0), ""]
        lines += [f"![kNN accuracy against rounds, all labels and 1 % of the labels]({figure})", ""]
    lines += ["Notes: every row trains every image R x E times (see compare.py's docstring for the mapping per "
              "method; mocosfl keeps its own batch rule and GroupNorm network). Rows without a partition "
              "(centralized ones) appear in every column. The fed_cluster variants run under 2 classes per client only "
              "(for the ledger). Wall-clock = mean seconds per run including evaluation; "
              f"runs shared the device with others, so compare rows, not machines. "
              "Per-cell numbers (and each run's untrained-network numbers) and commands: results.json."]
    if failed or missing:
        lines += ["", "Not in the table (failed or not run yet): " + ", ".join(c.name for c in failed + missing) + "."]
    common.write_atomic(path, "\n".join(lines) + "\n")


# ----------------------------------------------------------------------------------------------
# The claims ledger: paired per-seed differences, 95 % t-interval, verdict
# ----------------------------------------------------------------------------------------------

MARGIN = 0.02        # "approaches" / "robust" claims: a may be at most this much worse than b (accuracy points / 100)


@dataclass
class Claim:
    claim: str                    # what the paper says, in our words
    paper: str
    a: str                        # "row@partition": the side the claim says is better (partition "all": centralized)
    b: str
    metric: str = "knn_acc_1pct"  # gain over the own untrained network; stage1.X: after stage 1; cluster_acc: raw
    margin: float | None = None   # None: "a beats b"; m: "a is at most m worse than b" (non-inferiority)
    settings: tuple = ("default",)   # the settings (SETTINGS) it is judged in


@dataclass
class Setting:
    title: str
    flags: dict                   # compare.py flags that differ from the default setting
    source: str                   # where the shape comes from
    fixed: str                    # the date it was committed, before any run of it


# Each paper's own shape at CPU scale, taken from shared/methods/claims.md and the official code, NOT tuned, with
# rounds chosen so every image is seen as often as in the default setting (R x E = 20); fixed before any run of it.
SETTINGS = {
    "default": Setting("the project's CPU setting (shared protocol)", {},
                       "shared/methods/common-protocol.md: 10 clients, 20 rounds x 1 local epoch", "2026-12-02"),
    "ccl": Setting("CCL's own shape: 5 clients, 5 local epochs, every client every round",
                   dict(clients=5, local_epochs=5, rounds=4, eval_every=1),
                   "Wu et al. give no client count or epochs; the FedU/FedCA convention they follow "
                   "(shared/methods/claims.md) [reconstruction]", "2026-12-04"),
    "decssl": Setting("Dec-SSL's own shape: 5 clients, 5 local epochs, Dirichlet beta 0.02",
                      dict(clients=5, local_epochs=5, rounds=4, eval_every=1, alpha=0.02),
                      "liruiw/Dec-SSL: --num_users 5, --frac 1.0, --local_ep 5, Dirichlet beta 0.02 (its highly "
                      "non-IID scripts), unweighted mean (dec_ssl.py's default)", "2026-12-04"),
    "mocosfl": Setting("MocoSFL's own shape: 2 classes per client, 5 clients as the base, up to 1000",
                       dict(clients=5),
                       "SonyResearch/MocoSFL and the paper's tables: 2 classes per client, 5 / 100 / 1000 clients on "
                       "the same data, 1 epoch a round, sync every ~50 steps (mocosfl.py's default)", "2026-12-04"),
}
PAPER_SETTING_NOTE = ("Miao & Koyuncu give nothing but non-IID clients and gossip is not a paper's method here, so "
                      "their claims are judged in the default setting only.")

CCL, DEC, SFL, MK = "CCL (Wu et al.)", "Dec-SSL (Wang et al.)", "MocoSFL (Li et al.)", "Miao & Koyuncu"
BOTH_CCL, BOTH_DEC, BOTH_SFL = ("default", "ccl"), ("default", "decssl"), ("default", "mocosfl")

# One line per checkable claim (adding a claim = adding a line; its rows must be in ROWS).
CLAIMS = [
    Claim("FedAvg beats local training (2 classes per client)", "premise of every federated row",
          "fedavg_cl@classes", "local_cl@classes"),
    Claim("centralized training beats FedAvg (2 classes per client)", "upper bound (CCL, Dec-SSL)",
          "centralized@all", "fedavg_cl@classes"),
    Claim("feature fusion beats its ablation FedAvg + MoCo (2 classes)", CCL,
          "feature_fusion@classes", "fedavg_moco@classes", settings=BOTH_CCL),
    Claim("neighbourhood matching beats feature fusion (2 classes)", CCL,
          "neighborhood_match@classes", "feature_fusion@classes", settings=BOTH_CCL),
    Claim("CCL (FF + NM) beats FedAvg + MoCo (2 classes)", CCL,
          "neighborhood_match@classes", "fedavg_moco@classes", settings=BOTH_CCL),
    Claim("feature fusion beats FedAvg + MoCo under IID", CCL,
          "feature_fusion@iid", "fedavg_moco@iid", settings=BOTH_CCL),
    Claim("CCL (FF + NM) beats FedAvg + MoCo under IID (\"by 11 % on IID data\")", CCL,
          "neighborhood_match@iid", "fedavg_moco@iid", settings=BOTH_CCL),
    Claim("CCL (FF + NM) approaches centralized MoCo (2 classes)", CCL,
          "neighborhood_match@classes", "centralized_moco@all", margin=MARGIN, settings=BOTH_CCL),
    Claim("Dec-SSL is robust to label skew: 2 classes per client vs IID", DEC,
          "dec_ssl@classes", "dec_ssl@iid", margin=MARGIN),
    Claim("Dec-SSL is robust to label skew: Dirichlet vs IID", DEC,
          "dec_ssl@dirichlet", "dec_ssl@iid", margin=MARGIN, settings=BOTH_DEC),
    Claim("Dec-SSL: 4x fewer rounds x 4x the local epochs costs little (Dirichlet)", DEC,
          "dec_ssl_fewer_rounds@dirichlet", "dec_ssl@dirichlet", margin=MARGIN, settings=BOTH_DEC),
    Claim("Dec-SSL: half the clients per round costs little (Dirichlet)", DEC,
          "dec_ssl_p05@dirichlet", "dec_ssl@dirichlet", margin=MARGIN, settings=BOTH_DEC),
    Claim("Dec-SSL is on par with centralized SSL on the same data (Dirichlet)", DEC,
          "dec_ssl@dirichlet", "dec_ssl_central@all", margin=MARGIN, settings=BOTH_DEC),
    Claim("Dec-SSL beats decentralized supervised learning (Dirichlet; the paper: \"sometimes\")", DEC,
          "dec_ssl@dirichlet", "fedavg_sl@dirichlet", settings=BOTH_DEC),
    Claim("FeatARC beats Dec-SSL under skew (2 classes)", DEC, "dec_ssl_featarc@classes", "dec_ssl@classes"),
    Claim("FeatARC beats Dec-SSL under skew (Dirichlet)", DEC,
          "dec_ssl_featarc@dirichlet", "dec_ssl@dirichlet", settings=BOTH_DEC),
    Claim("MocoSFL beats FedAvg + MoCo (2 classes)", SFL, "mocosfl@classes", "fedavg_moco@classes", settings=BOTH_SFL),
    Claim("MocoSFL with 1 image per client per step (100 clients) approaches the base setting's batch", SFL,
          "mocosfl_c100@classes", "mocosfl@classes", margin=MARGIN, settings=BOTH_SFL),
    Claim("MocoSFL keeps its accuracy with 1000 clients of 10 images on the same data", SFL,
          "mocosfl_c1000@classes", "mocosfl@classes", margin=MARGIN, settings=BOTH_SFL),
    Claim("MocoSFL: frequent synchronisation (every 10 steps) beats once a round (2 classes)", SFL,
          "mocosfl_sync10@classes", "mocosfl_sync_round@classes", settings=BOTH_SFL),
    Claim("MocoSFL beats FedAvg + MoCo at 100 clients (2 classes)", SFL,
          "mocosfl_c100@classes", "fedavg_moco_c100@classes", settings=BOTH_SFL),
    Claim("gossip on a ring beats local training (2 classes)", "decentralized SGD (Lian et al.)",
          "gossip_ring@classes", "local_cl@classes"),
    Claim("gossip on a ring approaches the complete graph (2 classes)", "decentralized SGD (Lian et al.)",
          "gossip_ring@classes", "gossip_complete@classes", margin=MARGIN),
    Claim("1. two stages work for clustering: C / C beats one-stage C / C", MK,
          "fed_cluster_cc@classes", "fed_cluster_1stage@classes", "cluster_acc"),
    Claim("1. two stages work for representations: C / C beats one-stage C / C", MK,
          "fed_cluster_cc@classes", "fed_cluster_1stage@classes"),
    Claim("2. a contrastive regulariser helps representations: N+C beats N", MK,
          "fed_cluster@classes", "fed_cluster_nc@classes", "stage1.knn_acc_1pct"),
    Claim("2. a contrastive regulariser helps clustering: N+C / C beats N / C", MK,
          "fed_cluster@classes", "fed_cluster_nc@classes", "cluster_acc"),
    Claim("3. clustering: C / C beats N+C / C", MK, "fed_cluster_cc@classes", "fed_cluster@classes", "cluster_acc"),
    Claim("3. clustering: C / C beats N / C", MK, "fed_cluster_cc@classes", "fed_cluster_nc@classes", "cluster_acc"),
    Claim("3. clustering: C / C beats C / N", MK, "fed_cluster_cc@classes", "fed_cluster_cn@classes", "cluster_acc"),
    Claim("4. representations: a non-contrastive main loss (N) beats C", MK,
          "fed_cluster_nc@classes", "fed_cluster_cc@classes", "stage1.knn_acc_1pct"),
    Claim("4. representations: a non-contrastive main loss (N+C) beats C", MK,
          "fed_cluster@classes", "fed_cluster_cc@classes", "stage1.knn_acc_1pct"),
]

# t_{0.975, df} for the two-sided 95 % interval, df = 1..30 (standard table; larger df use df = 30: slightly wider)
T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]

RULE = [f"Each claim compares two cells seed by seed: d_s = a − b for every seed s run in both (the same seed = the "
        f"same partition indices, initialisation seed and few-label subset). Metric: the **gain over each run's own "
        f"untrained network** (summary.json's `gain`; equal to the raw difference when a and b use the same network); "
        f"`stage1.` = fed_cluster's encoder after stage 1; `cluster_acc` = clustering accuracy (raw: it has no "
        f"untrained counterpart). Interval: mean(d) ± t(0.975, n − 1) · sd(d) / √n, sd with n − 1, t from a table.",
        "",
        "Verdict, read from the interval [lo, hi]:",
        "- **a beats b**: *holds* if lo > 0; *does not hold* if hi < 0 (b is better); otherwise *inconclusive*.",
        f"- **a approaches b / a is robust (margin m = {MARGIN})**, a non-inferiority claim: a may be up to m worse "
        f"than b, or better: *holds* if lo > −m; *does not hold* if hi < −m; otherwise *inconclusive*.",
        "- fewer than 2 paired seeds: *inconclusive* (no interval).",
        "",
        "95 % per claim, no correction for the number of claims: with about 20 claims, one verdict may be "
        "wrong by chance."]


def t_interval(diffs: list) -> tuple:
    """(mean, lo, hi) of the 95 % t-interval of the mean; lo = hi = None for fewer than 2 values (mean None for 0)."""
    n = len(diffs)
    mean = sum(diffs) / n if n else None
    if n < 2:
        return mean, None, None
    sd = (sum((d - mean) ** 2 for d in diffs) / (n - 1)) ** 0.5
    half = T975[min(n - 1, len(T975)) - 1] * sd / n ** 0.5
    return mean, mean - half, mean + half


def verdict(n: int, lo: float, hi: float, margin: float | None) -> tuple:
    """(verdict, why) by RULE."""
    if n < 2:
        return "inconclusive", f"{n} paired seed(s): an interval needs at least 2"
    bound = 0.0 if margin is None else -margin
    if lo > bound:
        return "holds", f"lo {lo:+.3f} > {bound:+.3f}"
    if hi < bound:
        return "does not hold", f"hi {hi:+.3f} < {bound:+.3f}"
    return "inconclusive", f"the interval contains {bound:+.3f}"


def claim_value(cell: dict, metric: str):
    """The number a claim compares for one run (None when the run did not write it)."""
    if metric.startswith("stage1."):
        key, stage1 = metric.split(".", 1)[1], cell.get("stage1") or {}
        return stage1[key] - cell["random_encoder"][key] if stage1.get(key) is not None else None
    if metric in METRICS:
        return cell["gain"][metric]
    return cell.get(metric)


def ledger(results: list, args: Args, setting: str = "default") -> list:
    """One row per claim judged in `setting`: the paired per-seed differences, their mean, 95 % interval and the
    verdict."""
    rows = []
    results = [r for r in results if r.get("setting", "default") == setting]
    for c in (c for c in CLAIMS if setting in c.settings):
        def values(side):
            method, part = side.split("@")
            return {r["seed"]: v for r in results if r["method"] == method and r["partition"] == part
                    and (v := claim_value(r, c.metric)) is not None}
        va, vb = values(c.a), values(c.b)
        seeds = [s for s in args.seed_list if s in va and s in vb]
        diffs = [va[s] - vb[s] for s in seeds]
        mean, lo, hi = t_interval(diffs)
        v, why = verdict(len(diffs), lo, hi, c.margin)
        if not diffs:
            why = "not run here (" + ", ".join(x for x, got in ((c.a, va), (c.b, vb)) if not got) + ")"
        rows.append({**dataclasses.asdict(c), "setting": setting, "seeds": seeds, "diffs": diffs, "mean": mean,
                     "lo": lo, "hi": hi, "verdict": v, "why": why})
    return rows


def claims_table(rows: list) -> list:
    lines = ["| claim | paper | metric | a − b | per-seed differences | mean [95 % interval] | verdict |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        kind = "beats" if r["margin"] is None else f"within {r['margin']}"
        diffs = ", ".join(f"{d:+.3f}" for d in r["diffs"]) or "-"
        ci = (f"{r['mean']:+.3f} [{r['lo']:+.3f}, {r['hi']:+.3f}]" if len(r["diffs"]) > 1 else
              f"{r['mean']:+.3f}" if r["diffs"] else "-")
        lines.append(f"| {r['claim']} | {r['paper']} | {r['metric']} | {r['a']} − {r['b']} ({kind}) | {diffs} | "
                     f"{ci} | **{r['verdict']}** ({r['why']}) |")
    return lines


def reading(rows: list) -> list:
    """Per paper and setting: which claims hold, which do not, which stay inconclusive (read off the rows)."""
    lines = []
    for paper in dict.fromkeys(r["paper"] for r in rows):
        lines.append(f"- **{paper}**")
        for setting in dict.fromkeys(r["setting"] for r in rows if r["paper"] == paper):
            mine = [r for r in rows if r["paper"] == paper and r["setting"] == setting]
            parts = []
            for v in ("holds", "does not hold", "inconclusive"):
                got = [r for r in mine if r["verdict"] == v and r["diffs"]]
                if got:
                    parts.append(f"*{v}* ({len(got)}): " + "; ".join(
                        f"{r['claim']} {r['mean']:+.3f}" + (f" [{r['lo']:+.3f}, {r['hi']:+.3f}], {len(r['diffs'])} seeds"
                                                           if r["lo"] is not None else ", 1 seed") for r in got))
            if waiting := sum(not r["diffs"] for r in mine):
                parts.append(f"not run yet: {waiting} claim(s)")
            lines.append(f"  - {setting} setting: " + " | ".join(parts))
    return lines


def write_claims(path: Path, sections: list, args: Args, head: list):
    """sections: [(setting name, view args, ledger rows)]; one section per setting, and the reading first."""
    lines = [*warning_line(args), "# Claims ledger", "", *head, *RULE, ""]
    everything = [r for _, _, rows in sections for r in rows]
    if len(sections) > 1:
        lines += ["## Reading, per paper (generated from the tables below)", "", *reading(everything), "",
                  PAPER_SETTING_NOTE, ""]
    for name, view, rows in sections:
        if len(sections) > 1:
            st = SETTINGS[name]
            lines += [f"## Setting `{name}`: {st.title}", "", setting_line(view), "",
                      f"Shape from: {st.source}. Fixed on {st.fixed}, before any run of it.", ""]
        lines += [*claims_table(rows), ""]
    common.write_atomic(path, "\n".join(lines))


# ----------------------------------------------------------------------------------------------
# The figure
# ----------------------------------------------------------------------------------------------

def plot(path: Path, results: list, table: dict, args: Args):
    """Per partition (columns) kNN against rounds with all labels (top) and 1 % of the labels (bottom): mean over
    seeds with a ± std band, and each row's own untrained network dashed in the row's colour."""
    plt = common._plt()
    from matplotlib.ticker import MaxNLocator
    parts, metrics = args.partition_list, ("knn_acc", "knn_acc_1pct")
    width = 4.2 * len(parts) + 2.6
    fig, axes = plt.subplots(2, len(parts), figsize=(width, 7.2), squeeze=False, sharey="row")
    palette = list(plt.get_cmap("tab10").colors)
    keys = [k for k in args.method_list if not ROWS[k].variant       # the claim variants are in the tables only
            and any(r["method"] == k for r in results)]                  # colours for the rows drawn, not all rows
    style = {k: (palette[i % 10], "osD^v"[i // 10 % 5]) for i, k in enumerate(keys)}   # colour x marker: 50 rows
    for col, part in enumerate(parts):
        for row, metric in enumerate(metrics):
            ax = axes[row][col]
            for key in keys:
                runs = [r for r in results if r["method"] == key and r["partition"] in (part, "all")
                        and r["curve"].get(metric)]
                if not runs:
                    continue
                rounds = sorted(set.intersection(*[{c[0] for c in r["curve"][metric]} for r in runs]))
                ys = np.array([[dict(map(tuple, r["curve"][metric]))[x] for x in rounds] for r in runs])
                mean, std = ys.mean(0), ys.std(0, ddof=1) if len(ys) > 1 else np.zeros(len(rounds))
                color, marker = style[key]
                ax.plot(rounds, mean, marker=marker, ms=3, color=color, label=key)
                ax.fill_between(rounds, mean - std, mean + std, color=color, alpha=0.15, lw=0)
                if (st := table.get(key, {}).get(part, {}).get(metric)) is not None:
                    ax.axhline(st["random_mean"], color=color, ls="--", lw=0.9, alpha=0.8)
            ax.set_title(f"{column_name(part, args)}: {'all labels' if metric == 'knn_acc' else '1 % of the labels'}")
            ax.set_xlabel("round")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel("kNN accuracy, all labels")
        axes[1][0].set_ylabel("kNN accuracy, 1 % of the labels")
    legend = {}                                   # every row once, from whichever panel drew it
    for ax in axes.flat:
        legend.update({label: h for h, label in zip(*ax.get_legend_handles_labels()) if label not in legend})
    legend = {key: legend[key] for key in args.method_list if key in legend}           # in the table's order
    from matplotlib.lines import Line2D
    legend["dashed: the row's own\nuntrained network"] = Line2D([], [], color="gray", ls="--")
    fig.legend(legend.values(), legend.keys(), fontsize=8, loc="center left", bbox_to_anchor=(1 - 2.5 / width, 0.5))
    fig.suptitle("kNN accuracy, mean over seeds with a ± std band")
    fig.tight_layout(rect=(0, 0, 1 - 2.5 / width, 1))
    buf = io.BytesIO()
    fig.savefig(buf, dpi=100, format="png")
    plt.close(fig)
    common.write_atomic(path, buf.getvalue())


PROOF = dict(train_size=600, test_size=300, rounds=2, eval_every=1, probe_epochs=2, batch_size=32)
TIMING = ("elapsed_s", "images_per_s", "wall_s", "train_s")      # what a proof run may differ in


def proof_command(cell: Cell, args: Args) -> list:
    """A seeded tiny run of the cell's row in its setting: the proof that two versions of the code compute the same
    numbers (enough images for every client; the row's own flags kept)."""
    view = dataclasses.replace(setting_args(args, cell.setting), **PROOF, device="cpu")
    mod = __import__(Path(cell.flags[0]).stem)
    clients = common.parse_args(mod.Args, cell.flags[1:], script=None).clients
    view.train_size = max(view.train_size, 10 * clients)
    return method_flags(cell.method, view, cell.partition if cell.partition != "all" else "iid", 0)


def proof_numbers(tree: Path, flags: list, out: Path) -> dict:
    """Run `flags` in the source tree `tree` (one thread) and return its metrics.jsonl and summary.json without
    the timings; {} when it did not finish."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, *flags, "--out", str(out)], cwd=tree, capture_output=True, text=True, env=env)
    found = sorted(out.glob("*/summary.json"))
    if proc.returncode != 0 or not found:
        return {}
    clean = lambda d: {k: v for k, v in d.items() if k not in TIMING}
    rows = [clean(json.loads(line)) for line in (found[-1].parent / "metrics.jsonl").read_text().splitlines()]
    return {"metrics": rows, "summary": clean(json.loads(found[-1].read_text()))}


def restamp(cells: list, state: dict, args: Args) -> list:
    """For every stale cell's code version: run each row's proof at the cell's commit and on today's code; when
    every row of that version gives bit-identical numbers, record old -> today's fingerprint in equivalent.json
    (its cells are then done). Returns one line per version: what was proven or why not."""
    import tempfile
    groups, lines = {}, []
    for cell in cells:
        if state[cell] == "stale":
            rec = stored(cell, [STORE])
            groups.setdefault((cell.flags[0], rec["fingerprint_id"], rec["commit"]), []).append((cell, rec))
    equiv = json.loads(EQUIVALENT.read_text()) if EQUIVALENT.is_file() else {}
    for (script, old, commit), members in groups.items():
        now = fingerprint_id(code_fingerprint(script))
        if fingerprint_id(code_fingerprint(script, git_reader(commit))) != old:
            lines.append(f"{script} {old}: commit {commit[:7]} does not hold the code these cells ran (run from an "
                         f"edited tree); run them again")
            continue
        rows = {}
        for cell, _ in members:
            rows.setdefault((cell.method, cell.setting, cell.partition), cell)
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            subprocess.run(["git", "worktree", "add", "--detach", str(tmp / "old"), commit], cwd=ROOT,
                           capture_output=True, check=True)
            try:
                same, why = True, ""
                for i, cell in enumerate(rows.values()):
                    flags = proof_command(cell, args)
                    a = proof_numbers(tmp / "old", flags, tmp / f"a{i}")
                    b = proof_numbers(ROOT, flags, tmp / f"b{i}")
                    if not a or a != b:
                        same, why = False, f"{cell.method} [{cell.setting}]: " + (
                            "the proof run failed" if not a or not b else "the numbers differ")
                        break
            finally:
                subprocess.run(["git", "worktree", "remove", "--force", str(tmp / "old")], cwd=ROOT, capture_output=True)
        if same:
            equiv[old] = {"to": now, "script": script, "from_commit": commit, "date": time.strftime("%Y-%m-%d"),
                          "proof": "bit-identical metrics.jsonl and summary.json (timings aside) of a seeded tiny run "
                                   f"of every row ({', '.join(sorted({k for k, _, _ in rows}))}) at {commit[:7]} and on "
                                   "the code of today", "device": device_name("cpu")}
            common._write_json(EQUIVALENT, equiv)
            lines.append(f"{script} {old} -> {now}: proven bit-identical on {len(rows)} row(s); "
                         f"{len(members)} cell(s) kept")
        else:
            lines.append(f"{script} {old}: not proven ({why}); its {len(members)} cell(s) run again")
    return lines


def readme_blocks(text: str) -> dict:
    """{file: its quoted text} of README's generated blocks, each between `<!-- begin FILE -->` and
    `<!-- end FILE -->` lines (FILE relative to the repository root)."""
    blocks = {}
    for part in text.split("<!-- begin ")[1:]:
        name, rest = part.split(" -->\n", 1)
        blocks[name] = rest.split(f"<!-- end {name} -->", 1)[0]
    return blocks


def paste_into_readme(readme: Path, root: Path = ROOT):
    """Replace every generated block of README.md by the file it names, as it is now."""
    text = readme.read_text()
    for name, old in readme_blocks(text).items():
        body = (root / name).read_text()
        body = re.sub(r"\]\((results[^)/]*\.png)\)", r"](results/\1)", body)      # figures beside the file
        text = text.replace(f"<!-- begin {name} -->\n{old}<!-- end {name} -->",
                            f"<!-- begin {name} -->\n{body}<!-- end {name} -->")
    common.write_atomic(readme, text)


def plan(cells: list, store: Path, status: Status, sources: list, device: str) -> dict:
    """state[cell] = done / stale / missing. A finished run folder (in OUT/runs or a --collect source) of a cell
    that is not done is collected into `store` with the fingerprint of the code it ran (a missing cell always; a
    stale one when the run is of today's code), then judged like any committed cell: so a run of older code
    waits, stale, for `--restamp`. A finished or interrupted run of other code in OUT/runs is set aside (renamed
    *.stale-<time>) so that the cell runs again instead of resuming it."""
    state = {}
    for cell in cells:
        state[cell] = status(cell)
        if state[cell] == "done":
            continue
        now = status.fid(cell.flags[0])
        partial, (fp, _) = cell.run_folder(complete=False), launch_fingerprint(cell)
        if partial is not None and cell.run_folder() is None and fp is not None and not \
                current(fingerprint_id(fp), now, status.equiv):
            cell.dir.rename(cell.dir.with_name(cell.tag + time.strftime(".stale-%Y%m%d-%H%M%S")))   # not resumed
            continue                                                                          # on other code
        for src in [cell, *(dataclasses.replace(cell, dir=d) for d in sources.get(" ".join(identity(cell.flags)), []))]:
            folder = src.run_folder()
            if folder is None:
                continue
            fp, how = launch_fingerprint(src)
            commit = json.loads((folder / "config.json").read_text()).get("git_commit")
            if fp is None and commit and not (src.dir / "fingerprint.json").is_file():   # a run of an older compare.py
                fp, how = code_fingerprint(cell.flags[0], git_reader(commit)), f"git commit {commit[:7]} (config.json)"
            fresh = fp is not None and current(fingerprint_id(fp), now, status.equiv)
            if fp is not None and (state[cell] == "missing" or fresh):
                collect(store, cell, folder, fp, device, how)
                state[cell] = status(cell)
            if state[cell] == "done":
                break
            if src is cell:                          # of other code: this folder is not resumed, the cell runs again
                cell.dir.rename(cell.dir.with_name(cell.tag + time.strftime(".stale-%Y%m%d-%H%M%S")))
    return state


def source_index(sources: list) -> dict:
    """{identity of a command: [cell folders]} over the finished runs in other compare.py outputs (--collect),
    read from each run's config.json, so a folder is found whatever tag the older compare.py gave it."""
    index = {}
    for src in sources:
        for summary in sorted(src.glob("runs/*/*/*/summary.json")):
            cmd = json.loads((summary.parent / "config.json").read_text())["command"].split()
            index.setdefault(" ".join(identity(cmd)), []).append(summary.parent.parent)
    return index


def passes(flags: list) -> float:
    """Image passes of a command relative to the default setting's (training images x rounds x local epochs)."""
    last = {flags[i]: flags[i + 1] for i in range(1, len(flags) - 1) if flags[i].startswith("--")}
    size = int(last.get("--train-size", 10000)) or 60000
    share = float(last.get("--participation", 0)) or 1.0
    if flags[0] == "mocosfl.py" and share == 1.0 and int(last.get("--clients", 10)) >= 200:
        share = 1 / (int(last["--clients"]) // 100)                      # its pool rule (mocosfl.py's Args)
    return size * share * int(last.get("--rounds", 20)) * int(last.get("--local-epochs", 1)) / (10000 * 20)


def estimate(todo: list, stores: list, jobs: int) -> tuple:
    """(seconds, text): how long `todo` takes, from the committed cells' wall-clock (same row, else all rows'),
    scaled by each cell's image passes, at least 10 s a cell, `jobs` at a time."""
    walls = {}
    for store in stores:
        for path in store.glob("*/*/cell.json"):
            rec = json.loads(path.read_text())
            walls.setdefault(path.parent.parent.name, []).append(rec["wall_s"] / passes(shlex.split(rec["command"])[1:]))
    if not todo or not walls:
        return 0, ""
    every = [w for ws in walls.values() for w in ws]
    secs = sum(max(10.0, np.mean(walls.get(c.method, every)) * passes(c.flags)) for c in todo) / jobs
    when = f"{secs / 3600:.1f} h" if secs >= 3600 else f"{secs / 60:.0f} min"
    return secs, (f"about {when} with {jobs} run(s) at once (from the committed cells' wall-clock per image pass "
                  f"on their devices; rows not run yet at the mean of all)")


def row_lines(cells: list, state: dict) -> list:
    """One line per row and setting: how many of its cells are committed, stale, missing."""
    lines, groups = [], {}
    for cell in cells:
        groups.setdefault((cell.method, cell.setting), []).append(cell)
    for (key, setting), group in groups.items():
        n = {k: sum(state[c] == k for c in group) for k in ("done", "stale", "missing")}
        todo = n["stale"] + n["missing"]
        what = "nothing to run" if not todo else f"{todo} to run" + (
            f" ({n['stale']} stale: code changed; --restamp keeps those it proves unchanged)" if n["stale"] else "")
        lines.append(f"  {key} [{setting}]: {len(group)} cells, {n['done']} committed, {what}")
    return lines


def overlay(folders: list, path: Path):
    """kNN, 1 %-label kNN and loss against rounds of any run folders in one figure, each run's own untrained
    network dashed in its colour (from its summary.json; a run still going has none)."""
    plt = common._plt()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    palette = list(plt.get_cmap("tab10").colors)
    for i, folder in enumerate(folders):
        rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        rand = json.loads((folder / "summary.json").read_text())["random_encoder"] \
            if (folder / "summary.json").is_file() else {}
        color, style = palette[i % 10], ("-", "--", ":", "-.")[i // 10 % 4]
        for ax, key in zip(axes, ("knn_acc", "knn_acc_1pct", "loss")):
            pts = [(r["round"], r[key]) for r in rows if r.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", ms=3, ls=style, color=color, label=folder.name)
            if key in rand:
                ax.axhline(rand[key], color=color, ls="--", lw=0.9, alpha=0.7)
    for ax, title in zip(axes, ("kNN accuracy, all labels", "kNN accuracy, 1 % of the labels", "training loss")):
        ax.set_title(title)
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("dashed: each run's own untrained network")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = parse_args(argv)
        if args.plot:
            folders = [Path(p) for p in args.plot.split(",") if p]
            for f in folders:
                if not (f / "metrics.jsonl").is_file():
                    common.fail(f"--plot {f}: not a run folder (it has no metrics.jsonl)")
            path = (Path(args.out) if args.out else ROOT / "runs") / "overlay.png"
            overlay(folders, path)
            print(f"wrote {path}")
            return
        args.check()
        if args.device == "cuda":
            import torch
            if not torch.cuda.is_available():
                common.fail("--device cuda was asked for but no CUDA GPU is visible to torch")
        out = Path(args.out).resolve() if args.out else default_out(args)    # the runs start from the repository root
        common.check_out(str(out))
        sources = [Path(p).resolve() for p in args.collect.split(",") if p]
        for src in sources:
            if not (src / "runs").is_dir():
                common.fail(f"--collect {src}: no runs/ folder in it (give another compare.py's output folder)")
        if args.grid:
            names = [args.setting if args.setting != "all" else "default"]
            cells = make_cells(setting_args(args, names[0]), out / "runs", names[0])
        else:
            names = setting_names(args)
            cells = ledger_cells(args, out / "runs")
        check_cells(cells)
    except common.UserError as e:
        common.refuse(str(e))
    device = device_name(args.device)
    jobs = args.jobs or (min(8, max(1, (os.cpu_count() or 2) // 2)) if device.startswith("GPU") else 1)
    # the committed store takes the cells of the ledger's own settings (no budget flag changed, no --out given)
    store = STORE if not args.out and not args.quick and set(changed_flags(args)) <= set(SELECTION) else out / "cells"
    stores = [store] + ([STORE] if store != STORE else [])
    if args.restamp:
        state = {c: Status([STORE])(c) for c in cells}
        print("\n".join(restamp(cells, state, args) or ["no stale cells: nothing to prove"]))
        return
    if args.dry_run:
        state = {c: Status(stores)(c) for c in cells}
        print(f"{len(cells)} cells: {sum(v == 'done' for v in state.values())} committed, "
              f"{sum(v == 'stale' for v in state.values())} stale, {sum(v == 'missing' for v in state.values())} "
              f"missing (--dry-run: nothing is run)")
        print("\n".join(row_lines(cells, state)))
        if eta := estimate([c for c in cells if state[c] != "done"], stores, jobs)[1]:
            print(f"to run: {eta}")
        for c in cells:
            if state[c] != "done":
                print(f"  {state[c]}: {c.name}: {common.shell_command(*c.flags)}")
        return
    out.mkdir(parents=True, exist_ok=True)
    try:
        common.FolderLock(out, "compare.py")      # a second compare.py on the same --out (same cells) is refused
    except common.UserError as e:
        common.refuse(str(e))
    print(f"output folder: {out}", flush=True)
    status = Status(stores)
    state = plan(cells, store, status, source_index(sources), device)
    todo = [c for c in cells if state[c] != "done"]
    print(f"{len(cells)} cells, {len(cells) - len(todo)} already complete, "
          + (f"{len(todo)} not run (--report)" if args.report else f"{len(todo)} to run ({jobs} at a time)"), flush=True)
    print("\n".join(row_lines(cells, state)), flush=True)
    secs, eta = estimate(todo, stores, jobs) if todo and not args.report else (0, "")
    if eta:
        print(f"{len(todo)} to run: {eta}; Ctrl-C stops, the same command continues", flush=True)
    if secs > 3600 and not args.yes:
        common.refuse(f"{len(todo)} runs, {eta.split(' with')[0]}: add --yes to start them "
                      f"({common.shell_command('compare.py', '--dry-run')} lists them; --quick checks the pipeline "
                      "in minutes)")

    def finished(cell):
        fp, how = launch_fingerprint(cell)
        if fp is not None:
            collect(store, cell, cell.run_folder(), fp, device, how)
    failed = run_all([] if args.report else todo, jobs, finished)
    results = [r for c in cells if (r := read_cell(c, stores)) is not None]
    missing = [c for c in cells if read_cell(c, stores) is None and c not in failed]
    command = "python compare.py" + ("" if not argv else " " + shlex.join(argv))
    try:
        write_outputs(args, argv, out, names, results, failed, missing, command, device, jobs)
    except common.WriteError as e:                 # a full disk, a read-only folder: the cells are kept already
        common.refuse(f"{e}; the finished cells are kept in {store}: the same command writes the tables again", code=1)
    if failed:
        print(f"error: {len(failed)} run(s) failed: " + ", ".join(c.name for c in failed), file=sys.stderr)
        sys.exit(1)


def write_outputs(args, argv, out, names, results, failed, missing, command, device, jobs):
    """results.md, claims.md, the figures and results.json (each whole or not at all), printed at the end."""
    head = header(args, command, device, jobs)
    md, ledgers, tables = [], [], {}
    for name in names:
        view = setting_args(args, name) if args.grid else ledger_view(args, name)
        mine = [r for r in results if r.get("setting", "default") == name]
        tables[name] = aggregate(mine, view)
        figure = "results.png" if name == "default" else f"results-{name}.png"
        plot(out / figure, mine, tables[name], view)
        md.append((name, view, tables[name], mine, figure))
        ledgers.append((name, view, ledger(mine, view, name)))
    write_markdown(out / "results.md", md, args, head, jobs, failed, missing if args.grid else [])
    write_claims(out / "claims.md", ledgers, args, head)
    common.write_atomic(out / "results.json", json.dumps(
        {"command": command, "device": device, "jobs": jobs, "args": dataclasses.asdict(args),
         "settings": {name: dataclasses.asdict(SETTINGS[name]) for name in names},
         "table": tables[names[0]] if len(names) == 1 else tables, "claims": [r for _, _, rows in ledgers for r in rows],
         "cells": results}, indent=1))
    print("\n" + (out / "results.md").read_text() + "\n" + (out / "claims.md").read_text())
    if missing and not args.grid:
        print(f"{len(missing)} cell(s) not run yet: {common.shell_command('compare.py', '--dry-run')} lists them")
    if args.readme and out == ROOT / "results":
        paste_into_readme(ROOT / "README.md")
        print("pasted results/results.md and results/claims.md into README.md")
    print(f"wrote {out / 'results.md'}, {out / 'claims.md'}, the figures and {out / 'results.json'}")


if __name__ == "__main__":
    main()
