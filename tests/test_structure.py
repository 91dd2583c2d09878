"""The layout a newcomer relies on: at the root the stages and the reward, the machinery in one package, the
toy world in its own; imports run one way (root -> machinery -> toy; the toy imports nothing of the project),
no module imports itself back through others, and files stay readable in one sitting."""

import ast
import glob
import os

from conftest import ROOT

LAYERS = {"root": 0, "machinery": 1, "toy": 2}  # a module may import only from its own layer or below


def _modules():
    """{'03_grpo': path, 'machinery.rollout': path, 'toy.world': path, ...}."""
    found = {os.path.basename(p)[:-3]: p for p in glob.glob(os.path.join(ROOT, "*.py"))}
    for package in ("machinery", "toy"):
        for p in glob.glob(os.path.join(ROOT, package, "*.py")):
            name = os.path.basename(p)[:-3]
            found[package if name == "__init__" else f"{package}.{name}"] = p
    return found


MODULES = _modules()


def _layer(module):
    return LAYERS.get(module.split(".")[0], LAYERS["root"])


def _project_imports(path):
    """Project modules imported anywhere in the file (top level or inside functions)."""
    names = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return {n for n in names if n in MODULES}


def _graph():
    return {m: _project_imports(p) - {m} for m, p in MODULES.items()}


def test_the_root_holds_the_stages_and_the_reward():
    root = sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "*.py")))
    assert "rewards.py" in root
    assert [f for f in root if f[:2].isdigit()] == ["00_base_model.py", "01_reflect_data.py", "02_sft.py",
                                                    "03_grpo.py", "04_eval.py"]
    assert len(root) <= 8, root


def test_the_toy_world_imports_nothing_of_the_project():
    graph = _graph()
    for m in (m for m in graph if m.split(".")[0] == "toy"):
        assert all(n.split(".")[0] == "toy" for n in graph[m]), (m, graph[m])
    assert graph["toy.world"] == set()


def test_imports_run_one_way():
    for m, imported in _graph().items():
        upward = {n for n in imported if _layer(n) < _layer(m)}
        assert not upward, f"{m} imports {sorted(upward)}, a layer above it"


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
    for name, path in MODULES.items():
        n = len(open(path).read().splitlines())
        assert n <= 600, f"{name}: {n} lines"
    for doc, most in (("README.md", 200), ("RESULTS.md", 150)):
        text = open(os.path.join(ROOT, doc)).read()
        assert len(text.splitlines()) <= most, f"{doc}: {len(text.splitlines())} lines"
        assert "the issue" not in text.lower(), f"{doc} refers to an issue its reader cannot see"


def test_the_training_scripts_mains_read_in_one_screen():
    for name, most in (("02_sft.py", 110), ("03_grpo.py", 130)):
        tree = ast.parse(open(os.path.join(ROOT, name)).read())
        main = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main")
        assert main.end_lineno - main.lineno + 1 <= most, f"{name}: main is {main.end_lineno - main.lineno + 1} lines"
