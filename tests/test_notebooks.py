"""Every notebook has a test that executes it. Each notebook's test lives in a module of its own
(``test_notebook_NAME.py``), so that ``make test``'s workers (one module at a time each) run them in parallel."""

import glob
import os

from conftest import ROOT

NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "notebooks", "*.ipynb")))


def test_there_is_a_notebook():
    assert NOTEBOOKS


def test_every_notebook_is_executed_by_a_test():
    tests = os.path.dirname(os.path.abspath(__file__))
    for path in NOTEBOOKS:
        name = os.path.splitext(os.path.basename(path))[0]
        module = os.path.join(tests, f"test_notebook_{name}.py")
        assert os.path.exists(module), f"{path} has no test module {module}"
        with open(module) as f:
            assert f'execute_notebook("{name}")' in f.read(), module
