"""notebooks/sparsegpt_case_study.ipynb runs top to bottom on its small settings (its own asserts included)."""

import pytest

from conftest import execute_notebook


@pytest.mark.slow
def test_notebook_executes():
    execute_notebook("sparsegpt_case_study")
