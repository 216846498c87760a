"""Shared pytest fixtures. Keep this minimal; append fixtures below the existing ones."""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import pytest

# A stable cache, so the embedded model is converted once per machine (CI reuses it), not per run.
# Set at import time: it must hold before any test (or fixture) calls saereward.model.lm.cache_dir().
os.environ.setdefault("SAEREWARD_CACHE", str(Path.home() / ".cache" / "saereward"))

# Let tests import helpers such as tiny_models without tests/ being a package.
_TESTS = str(Path(__file__).parent)
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

EMBEDDED_SPEC = "embedded:smollm2-135m-instruct"


@pytest.fixture(scope="session")
def saereward_cache() -> Path:
    """The saereward cache folder used by this session (``$SAEREWARD_CACHE``)."""
    return Path(os.environ["SAEREWARD_CACHE"]).expanduser()


@pytest.fixture(scope="session", autouse=True)
def _warm_vector_math() -> None:
    """The process's first MKL vector-math call on one thread, as the command and load_model make it."""
    from saereward.threads import warm_vector_math

    warm_vector_math()


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Seed python and torch before every test, so random inputs are reproducible."""
    import torch

    random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def smollm(saereward_cache: Path):
    """The real embedded model (SmolLM2-135M-Instruct, fp32, CPU), loaded once per session.

    Returns a :class:`saereward.model.lm.LoadedModel`. The first run on a machine converts the GGUF (~15 s).
    """
    from saereward.model.lm import load_model

    return load_model(EMBEDDED_SPEC)
