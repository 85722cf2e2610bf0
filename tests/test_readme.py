"""The README's commands from a fresh clone's point of view: every program, flag, make target and exercise
they name exists and parses, and they run as typed once .venv is active (the README's one set-up step)."""
import dataclasses
import importlib
import importlib.util
import os
import re
import shlex
import subprocess
import sys

import pytest

import common
from conftest import ROOT

DOCS = ["README.md", *sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "exercises").glob("*.md"))]
START = re.compile(r"^(\w+=\S+ )*(python|\.venv/bin/python|torchrun|make|bash) ")
PLACEHOLDER = re.compile(r"[{}$<>|]|\.\.\.|\b[A-Z][A-Z0-9_]*\b")     # RUN_DIR, NAME, {a | b}, $m, HOST0:29500


def commands(text: str) -> list[str]:
    """What a reader types: the indented code lines and the `inline code` that start with a program."""
    block = re.sub(r"\\\n\s*", " ", text)                   # a line continued with a backslash is one command
    inline = re.findall(r"(?<!`)`([^`\n]+(?:\n[^`\n]+)?)`(?!`)", re.sub(r"```.*?```", "", text, flags=re.S))
    found = [line.strip() for line in block.splitlines() if line.startswith("    ")] + inline   # inline: may wrap
    found = [" ".join(re.split(r"\s+#\s", c)[0].split()) for c in found]       # trailing comments
    return sorted({c for c in found if START.match(c)})


ALL = [(doc, c) for doc in DOCS for c in commands((ROOT / doc).read_text())]


def test_the_readme_has_commands_to_check():
    readme = [c for doc, c in ALL if doc == "README.md"]
    assert len(readme) > 20 and any(c.startswith("python compare.py") for c in readme)
    assert any(c.startswith("python -m exercises.check") for doc, c in ALL if doc.startswith("exercises/"))


def test_the_activation_step_is_stated_before_the_first_python_command():
    text = (ROOT / "README.md").read_text()
    first = re.search(r"`python |^ {4}python ", text, re.M).start()
    assert text.index("source .venv/bin/activate") < first
    assert "`.venv/bin/python`" in text[:first]                              # the way without activating
    ex = (ROOT / "exercises/README.md").read_text()
    assert ex.index("source .venv/bin/activate") < ex.index("python -m exercises.check")


@pytest.mark.parametrize("doc, command", ALL, ids=[f"{d}: {c[:60]}" for d, c in ALL])
def test_every_command_names_a_real_program_and_flags_it_accepts(doc, command):
    words = shlex.split(command)
    while "=" in words[0]:                                   # OMP_NUM_THREADS=1 python ...
        words = words[1:]
    program, args = words[0], words[1:]
    if args == ["..."]:                                       # "python ..." in a sentence: any command
        return
    if program == "make":
        targets = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M))
        assert set(args) <= targets, f"{doc}: make {args}: the Makefile has {sorted(targets)}"
        return
    if program == "bash":
        assert (ROOT / args[0]).is_file(), f"{doc}: {command}"
        return
    if program == "torchrun":                                # torchrun's own flags, then the script and its flags
        program, args = "python", args[next(i for i, a in enumerate(args) if a.endswith(".py")):]
    if args[0] == "-m":
        assert args[1] == "exercises.check", f"{doc}: {command}"
        ex = importlib.import_module("exercises.check")
        names = [a for a in args[2:] if not a.startswith("-")][:1]
        assert all(n in ex.EXERCISES or n.isdigit() or PLACEHOLDER.search(n) for n in names), f"{doc}: {command}"
        return
    script = ROOT / args[0]
    assert script.is_file() and script.parent == ROOT, f"{doc}: {command}: no {args[0]} in the repository"
    module = importlib.import_module(script.stem)
    known = {"--" + f.name.replace("_", "-") for f in dataclasses.fields(module.Args)} | {"--help"}
    flags = [a.split("=")[0] for a in args[1:] if a.startswith("--")]
    assert set(flags) <= known, f"{doc}: {command}: {sorted(set(flags) - known)} are not flags of {args[0]}"
    if not PLACEHOLDER.search(" ".join(args[1:])) and "--resume" not in flags:
        common.parse_args(module.Args, args[1:])             # the values parse too (types, booleans, presets)


def test_the_commands_run_as_typed_with_the_venv_active(tmp_path):
    """`source .venv/bin/activate` puts the venv's bin folder first on PATH: so does this test, with nothing
    else a fresh shell would not have (no PYTHONPATH, the repository as the working directory)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PATH=f"{os.path.dirname(sys.executable)}:/usr/bin:/bin", OMP_NUM_THREADS="1", HOME=str(tmp_path))
    typed = "python fedavg_cl.py --help && python -m exercises.check --list"
    proc = subprocess.run(["bash", "-c", typed], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "usage: fedavg_cl.py" in proc.stdout and "enqueue" in proc.stdout
    assert importlib.util.find_spec("torch") is not None
