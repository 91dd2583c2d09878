"""The README's paper-to-code table points at code that exists and carries the equations' tags."""

import os
import re

from conftest import ROOT


def _table_rows():
    text = open(os.path.join(ROOT, "README.md")).read()
    table = text.split("## The paper in the code", 1)[1].split("\n\n", 2)[1]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()[2:]]
    assert len(rows) >= 10 and all(len(r) == 3 for r in rows)
    return rows


def _symbols(cell):
    """'`a.py:f`, `g`' -> [('a.py', 'f'), ('a.py', 'g')]"""
    out, file = [], None
    for ref in re.findall(r"`([^`]+)`", cell):
        file, name = ref.split(":") if ":" in ref else (file, ref)
        out.append((file, name))
    return out


def _source(file, name):
    """The lines of top-level `def name`/`class name`/`NAME =` up to the next top-level statement."""
    lines = open(os.path.join(ROOT, file)).read().splitlines()
    start = next((i for i, line in enumerate(lines)
                  if re.match(rf"(def|class) {name}\b|{name} = ", line)), None)
    assert start is not None, f"{file} defines no {name}"
    end = next((i for i in range(start + 1, len(lines)) if lines[i] and not lines[i][0].isspace()
                and not lines[i].startswith((")", "]", "}"))), len(lines))
    return lines[max(0, start - 1):end]  # the comment line above a constant counts


def _equations(cell):
    """'Eq. 3' -> [3]; 'Eqs. 4-6' -> [4, 5, 6]"""
    m = re.search(r"Eqs?\. (\d+)(?:-(\d+))?", cell)
    return [] if not m else list(range(int(m.group(1)), int(m.group(2) or m.group(1)) + 1))


def test_every_table_entry_exists_and_tags_its_equations():
    for concept, paper, where in _table_rows():
        symbols = _symbols(where)
        assert symbols, concept
        comments = ""
        for file, name in symbols:
            comments += "\n".join(line.split("#", 1)[1] for line in _source(file, name) if "#" in line)
        for n in _equations(paper):
            assert re.search(rf"Eqs?\.[^\n]*\({n}\)", comments), f"{concept}: no '# Eq. ({n})' in {where}"
