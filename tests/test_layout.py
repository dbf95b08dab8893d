"""The package's architecture: light modules stay light, and the import rules in pyproject.toml hold."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("module", ["kolors", "kolors.samplers", "kolors.request", "kolors.errors"])
def test_light_modules_do_not_import_the_engine(module):
    """import-linter sees imports, not what `kolors/__init__.py` pulls in at import time: a fresh interpreter
    does."""
    engine = ["kolors.pipeline", "kolors.models.unet", "kolors.models.text_encoder", "kolors.weights"]
    code = f"import sys, {module}; print([m for m in {engine!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_the_public_api_is_where_it_was():
    import kolors
    from kolors import KolorsError, KolorsPipeline, KolorsPipelineOutput, PromptEmbeds
    from kolors.batch import run
    from kolors.pipeline import KolorsPipeline as Same

    assert KolorsPipeline is Same and issubclass(KolorsError, ValueError)
    assert callable(run) and KolorsPipelineOutput and PromptEmbeds
    with pytest.raises(AttributeError):
        kolors.NoSuchThing  # noqa: B018


@pytest.mark.skipif(shutil.which("lint-imports") is None, reason="import-linter is not installed")
def test_import_rules_hold():
    out = subprocess.run(["lint-imports", "--no-cache"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-3000:]
