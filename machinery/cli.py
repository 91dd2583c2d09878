"""The command line of every stage: one dataclass per script, a docstring under every field.

    @dataclass
    class Args:
        lr: float = 1e-5
        \"\"\"learning rate\"\"\"          <- becomes the --help line of --lr

    if __name__ == "__main__":
        cli.run(main, Args)

Why our own 25-line parser instead of tyro (CleanRL's choice): it reads the same field docstrings,
needs no extra dependency, and its --help is plain argparse.

Errors a user causes (a bad flag value, a malformed row) raise UserError, a missing file
FileNotFoundError, and `run` prints them as one line naming the file, row or field, and exits with
status 2; bugs keep their traceback.
"""

import argparse
import ast
import dataclasses
import inspect
import random
import sys
import textwrap

import numpy as np
import torch


class UserError(ValueError):
    """A problem with the user's input (file, row, field or flag value): one line, exit status 2."""


def parse_args(cls, argv=None):
    """Build an argparse parser from a dataclass; each field's docstring becomes its --help line."""
    docs = {}
    for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)]):  # shared fields: DataArgs
        body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        for node, nxt in zip(body, body[1:]):
            documented = isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
            if isinstance(node, ast.AnnAssign) and documented:
                docs[node.target.id] = nxt.value.value.replace("%", "%%")  # argparse %-formats help strings
    parser = argparse.ArgumentParser(description=(cls.__doc__ or "").strip(),
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(cls):
        # String annotations (`from __future__ import annotations`) are evaluated; `str | None` are objects.
        kind = eval(f.type, vars(inspect.getmodule(cls))) if isinstance(f.type, str) else f.type  # noqa: S307
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if kind is bool:
            parser.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=default,
                                help=docs.get(f.name))
        elif kind in (int, float, str):
            parser.add_argument(f"--{f.name}", type=kind, default=default, help=docs.get(f.name))
        else:  # optional values and lists are given as strings
            parser.add_argument(f"--{f.name}", type=_parse_loose, default=default, help=docs.get(f.name))
    return cls(**vars(parser.parse_args(argv)))


def _parse_loose(s):
    if s.lower() in ("none", "null", ""):
        return None
    for conv in (int, float):
        try:
            return conv(s)
        except ValueError:
            pass
    return s


def check_choice(flag, value, choices):
    """Fail before any model loads on a flag value that is not one of `choices`."""
    if value not in choices:
        raise UserError(f"--{flag} must be one of {', '.join(map(str, choices))}; got {value!r}")


def run(main, args_cls, argv=None):
    """Parse the flags, run `main(args)`; a UserError becomes one line on stderr and exit status 2."""
    args = parse_args(args_cls, argv)
    try:
        return main(args)
    except (UserError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
