"""Loaded by every Python process that has this folder on PYTHONPATH: with FEDLODROP_TEST_RAISE
set, patch `fedlodrop.round.client` the moment it is imported (fault_inject.py)."""

from __future__ import annotations

import importlib.abc
import os
import sys

from fault_inject import ENV, patch

TARGET = "fedlodrop.round.client"


class _PatchOnImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != TARGET:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                run = spec.loader.exec_module

                def exec_module(module, run=run):
                    run(module)
                    patch(module, os.environ[ENV])

                spec.loader.exec_module = exec_module
                return spec
        return None


if os.environ.get(ENV):
    sys.meta_path.insert(0, _PatchOnImport())
