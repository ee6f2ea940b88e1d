"""Load an experiment config file the way the command line does, for notebooks and scripts.

``load_config("configs/train.py:smoke", {"train.steps": 20})`` is what ``--config=configs/train.py:smoke
--config.train.steps=20`` gives an experiment: the file's ``get_config(preset)``, the overrides applied (unknown keys
and wrong types raise ``ConfigError``), then locked. A relative path is looked up in the working directory, then in
the repository the package was installed from (so notebooks in ``notebooks/`` find ``configs/``).
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any, Mapping

from ml_collections import ConfigDict

from llmopt_jax.errors import ConfigError

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _find(path: str) -> str:
    for candidate in (path, os.path.join(REPOSITORY, path)):
        if os.path.isfile(candidate):
            return candidate
    raise ConfigError(f"config file {path} not found (looked in {os.getcwd()} and {REPOSITORY})")


def load_config(spec: str, overrides: Mapping[str, Any] | None = None) -> ConfigDict:
    """The locked ``ConfigDict`` of ``spec`` (``FILE.py`` or ``FILE.py:PRESET``) with dotted-key ``overrides``."""
    path, _, preset = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location(f"_llmopt_config_{abs(hash(path))}", _find(path))
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    config = module.get_config(preset) if preset else module.get_config()
    for key, value in (overrides or {}).items():
        *parents, leaf = key.split(".")
        node = config
        try:
            for parent in parents:
                node = node[parent]
            if leaf not in node:
                raise KeyError(leaf)
            node[leaf] = value
        except KeyError as e:
            raise ConfigError(f"unknown config key {key!r} in {spec}") from e
        except TypeError as e:
            raise ConfigError(f"config key {key!r}: {e}") from e
    config.lock()
    return config
