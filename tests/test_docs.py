"""The docs match the code: every command the README, EXERCISES and the scripts' docstrings give for a
numbered script parses with that script's flags, and every file and `module.symbol` EXERCISES names exists."""

import ast
import glob
import os
import re
import shlex
import subprocess

import pytest
from conftest import ROOT, load_script

from machinery import cli

SCRIPTS = ["00_base_model", "01_reflect_data", "02_sft", "03_grpo", "04_eval"]
DOCS = ["README.md", "EXERCISES.md", "RESULTS.md", *[os.path.relpath(p, ROOT) for p in glob.glob(
    os.path.join(ROOT, "docs", "*.md"))]]


def _commands(text):
    """(script, argv) of every `python NN_script.py ...` command, continuation lines joined."""
    text = text.replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        for m in re.finditer(r"(?:python3?|accelerate launch[^\n]*?)\s+(0[0-4]_\w+)\.py([^\n`#|&;)]*)", line):
            argv = []
            for a in shlex.split(m.group(2)):  # "..." stands for a value a reader fills in, or for more flags
                if a != "...":
                    argv.append(a)
                elif argv and argv[-1].startswith("--"):
                    argv.append("PLACEHOLDER")
            out.append((m.group(1), argv))
    return out


def _documented_commands():
    found = []
    for name in DOCS:
        found += [(name, s, a) for s, a in _commands(open(os.path.join(ROOT, name)).read())]
    for script in SCRIPTS:  # each script's own docstring
        doc = ast.get_docstring(ast.parse(open(os.path.join(ROOT, script + ".py")).read()))
        found += [(script + ".py", s, a) for s, a in _commands(doc)]
    return found


def test_documented_commands_parse_with_the_scripts_flags():
    commands = _documented_commands()
    assert len(commands) > 30 and {s for _, s, _ in commands} == set(SCRIPTS)
    modules = {s: load_script(s) for s in SCRIPTS}
    for where, script, argv in commands:
        # placeholders a reader fills in (YOUR_ORG/..., $NODE_RANK) parse as strings; flags must exist
        try:
            cli.parse_args(modules[script].Args, [a for a in argv if a != "--cpu" or script in ("02_sft", "03_grpo")])
        except SystemExit:
            pytest.fail(f"{where}: `{script}.py {' '.join(argv)}` does not parse")


def _module_paths(module):
    """Where `module.symbol` in a document can live: a root script, the machinery, or the toy world."""
    if module == "toy":
        return [os.path.join(ROOT, "toy", "world.py"), os.path.join(ROOT, "toy", "model.py")]
    return [os.path.join(ROOT, module + ".py"), os.path.join(ROOT, "machinery", module + ".py")]


def test_exercises_name_files_and_symbols_that_exist():
    text = open(os.path.join(ROOT, "EXERCISES.md")).read()
    for ref in set(re.findall(r"`([\w/.]+\.(?:py|md|json|png|jsonl))`", text)):
        if not ref.startswith("runs/") and (ref.endswith((".py", ".md")) or "/" in ref):  # not a run's outputs
            assert os.path.exists(os.path.join(ROOT, ref)), ref
    for module, symbol in set(re.findall(r"`(\w+)\.(\w+)`", text)):
        paths = [p for p in _module_paths(module) if os.path.exists(p)]
        if paths and symbol not in ("py", "md"):
            names = set()
            for path in paths:
                tree = ast.parse(open(path).read())
                names |= {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))} | \
                    {t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}
            assert symbol in names, f"EXERCISES names {module}.{symbol}"
    # exercise 9 edits the re-read out of the toy teacher's check: the text it names is there
    source = ast.get_source_segment(open(os.path.join(ROOT, "toy", "world.py")).read(), next(
        n for n in ast.parse(open(os.path.join(ROOT, "toy", "world.py")).read()).body
        if isinstance(n, ast.FunctionDef) and n.name == "oracle_reflection"))
    assert "{colour}: {n}." in source


def test_the_makefiles_recipe_flags_parse():
    """The flags `make demo`, `make seeds`, `make ablations` and `make demo-dots` pass to every stage."""
    text = open(os.path.join(ROOT, "Makefile")).read()
    variables = dict(re.findall(r"^(\w+) \??:?= ?(.*)$", text, re.M))
    for name, script in (("REFLECT_ARGS", "01_reflect_data"), ("SFT_ARGS", "02_sft"), ("DOTS_RL", "03_grpo")):
        assert variables[name].startswith("--"), name
        args = cli.parse_args(load_script(script).Args, shlex.split(variables[name]))
        assert args is not None, name
    args = cli.parse_args(load_script("01_reflect_data").Args, shlex.split(variables["REFLECT_ARGS"]))
    assert args.direct_rows > 0 and args.pool_size >= args.num_samples + args.direct_rows


def test_the_files_the_docs_name_exist():
    """A path in backticks (`toy/world.py`, `configs/zero2.yaml`) or a run command (`python bench/x.py`)
    names a file of the repository, so that a moved module leaves no stale pointer behind. The notebook is
    history and keeps the names of its day."""
    for doc in (d for d in DOCS if d != os.path.join("docs", "notebook.md")):
        text = open(os.path.join(ROOT, doc)).read()
        refs = set(re.findall(r"`([\w./-]+\.(?:py|md|yaml|json|jsonl))(?::\w+)?`", text))
        refs |= set(re.findall(r"python3? ([\w./-]+\.py)", text))
        for ref in refs:
            if ref.startswith(("runs/", "data/", "my-org/")) or "/" not in ref and not ref.endswith((".py", ".md")):
                continue  # a run's outputs or a file the reader brings
            folders = ("", "machinery", "toy", "docs")  # a name given inside its folder's row or sentence
            assert any(os.path.exists(os.path.join(ROOT, f, ref)) for f in folders), f"{doc} names {ref}: missing"


def test_every_exercise_target_runs_commands_that_parse():
    """`make exercise N=<n>` for every exercise of EXERCISES.md: the stage commands it would run parse."""
    headings = re.findall(r"^## (\d+)\. ", open(os.path.join(ROOT, "EXERCISES.md")).read(), re.M)
    assert [int(h) for h in headings] == list(range(len(headings)))
    for n in headings:
        out = subprocess.run(["make", "-n", "exercise", f"N={n}"], cwd=ROOT, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        for script, argv in _commands(re.sub(r"\s\d?>&?\s*\S+", " ", out.stdout)):  # no redirections
            try:
                cli.parse_args(load_script(script).Args, argv)
            except SystemExit:
                pytest.fail(f"make exercise N={n}: `{script}.py {' '.join(argv)}` does not parse")
