"""The layout a newcomer relies on: imports run one way (the toy world at the bottom, importing nothing
of the project), no module imports itself back through others, and files stay readable in one sitting."""

import ast
import glob
import os

from conftest import ROOT

MODULES = {os.path.basename(p)[:-3]: p for p in glob.glob(os.path.join(ROOT, "*.py"))}


def _project_imports(path):
    """Project modules imported anywhere in the file (top level or inside functions)."""
    names = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names & set(MODULES)


def _graph():
    return {m: _project_imports(p) - {m} for m, p in MODULES.items()}


def test_the_toy_world_imports_nothing_of_the_project():
    assert _graph()["toy"] == set()


def test_no_import_circle():
    graph = _graph()
    state = {}

    def visit(m, path):
        if state.get(m) == "open":
            raise AssertionError("import circle: " + " -> ".join(path + [m]))
        if state.get(m) == "done":
            return
        state[m] = "open"
        for n in sorted(graph[m]):
            visit(n, path + [m])
        state[m] = "done"

    for m in sorted(graph):
        visit(m, [])


def test_files_fit_in_one_sitting():
    for path in MODULES.values():
        n = len(open(path).read().splitlines())
        assert n <= 600, f"{os.path.basename(path)}: {n} lines"
    for doc, most in (("README.md", 200), ("RESULTS.md", 150)):
        text = open(os.path.join(ROOT, doc)).read()
        assert len(text.splitlines()) <= most, f"{doc}: {len(text.splitlines())} lines"
        assert "the issue" not in text.lower(), f"{doc} refers to an issue its reader cannot see"


def test_the_training_scripts_mains_read_in_one_screen():
    for name, most in (("02_sft.py", 110), ("03_grpo.py", 130)):
        tree = ast.parse(open(os.path.join(ROOT, name)).read())
        main = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main")
        assert main.end_lineno - main.lineno + 1 <= most, f"{name}: main is {main.end_lineno - main.lineno + 1} lines"
