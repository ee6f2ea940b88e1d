"""Every notebook runs top to bottom (its own asserts included)."""

import glob
import os

import pytest

from conftest import ROOT

NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "notebooks", "*.ipynb")))


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_executes(path):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    env_backup = os.environ.pop("XLA_FLAGS", None)  # the kernel gets one CPU device, like a user's laptop
    try:
        NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": os.path.dirname(path)}}).execute()
    finally:
        if env_backup is not None:
            os.environ["XLA_FLAGS"] = env_backup


def test_there_is_a_notebook():
    assert NOTEBOOKS
