"""The student track's grader (student/) is self-consistent: the project's own functions pass every grader test,
each catalogued mistake (student/mistakes.py) fails at least one, and the untouched stubs of student/core.py
fail at least one test per function. The grader's tests are called here directly with each implementation
(they take only `impl`), so pytest collects them once, from student/, under `make grade`."""

import inspect

import pytest

from student import adapters, mistakes
from student import test_grade as grade

TESTS = {name: f for name, f in vars(grade).items() if name.startswith("test_") and inspect.isfunction(f)}


def failures(impl):
    """{test name: the first line of its message} of every grader test that fails on `impl`; an exception the
    implementation raised itself (not the grader's report) is named by its type."""
    out = {}
    for name, test in TESTS.items():
        try:
            test(impl)
        except pytest.fail.Exception as e:  # the grader's report (a BaseException, not an Exception)
            out[name] = str(e).splitlines()[0]
        except Exception as e:  # noqa: BLE001 (a wrong implementation may raise anything)
            out[name] = f"raised {type(e).__name__}"
    return out


def test_the_grader_tests_every_function():
    for function in adapters.FUNCTIONS:
        assert any(function in name for name in TESTS), f"no grader test names {function}"
    assert set(adapters.FUNCTIONS) == {f for f, _ in mistakes.CATALOGUE.values()}


def test_the_reference_passes_every_grader_test():
    assert failures(adapters.reference()) == {}


@pytest.mark.parametrize("name", list(mistakes.CATALOGUE))
def test_each_catalogued_mistake_fails_a_grader_test(name):
    function = mistakes.CATALOGUE[name][0]
    failed = failures(adapters.with_mistake(name))
    assert failed, f"the mistake {name!r} ({mistakes.describe(name)}) passes every grader test"
    # caught by a test of its own function, whose report names the function and its equation
    assert any(function in test for test in failed), failed
    assert all(msg.startswith((f"{function} (", "raised ")) for msg in failed.values()), failed


def test_the_catalogue_describes_each_mistake_in_one_line():
    for name, (function, wrong) in mistakes.CATALOGUE.items():
        assert function in adapters.FUNCTIONS, name
        assert wrong.__doc__ and len(mistakes.describe(name)) <= 110, name
        assert list(inspect.signature(wrong).parameters) == list(inspect.signature(
            getattr(adapters, "ref_" + function)).parameters), f"{name}: not {function}'s signature"


def test_the_untouched_stubs_fail_every_function():
    source = inspect.getsource(__import__("student.core", fromlist=["core"]))
    if "raise NotImplementedError" not in source:
        pytest.skip("student/core.py has been filled in")
    failed = failures(adapters.student())
    for function in adapters.FUNCTIONS:
        mine = [t for t in failed if function in t]
        assert mine, f"no grader test fails on the {function} stub"
        assert all("not written yet" in failed[t] for t in mine), failed
