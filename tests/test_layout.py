"""harmoclip/ is plain torch: importing every one of its modules pulls in neither Ray nor MLflow
(checked in a fresh interpreter, since this test process has imported both already)."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import harmoclip


def test_harmoclip_imports_neither_ray_nor_mlflow():
    modules = [f"harmoclip.{m.name}" for m in pkgutil.iter_modules(harmoclip.__path__)]
    code = ("import importlib, sys\n"
            f"for name in {modules!r}: importlib.import_module(name)\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'ray', 'mlflow'}))")
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert len(modules) > 5 and found.strip() == "[]", found
