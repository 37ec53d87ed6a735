"""Import a bundle from its folder under a name of its own.

Each load gets a fresh package name, so two versions of one bundle (or two
bundles that both call their module ``entrypoint``) never share modules.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import inspect
import itertools
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdcube.bundles.registry import BundleSpec
from kdcube.sdk import BundleRun

_PACKAGE_ROOT = "kdcube_loaded_bundles"
_EVENT_LOOPS = frozenset({"anyio", "asyncio"})
_load_numbers = itertools.count(1)


class BundleLoadError(Exception):
    """The bundle's code could not be imported or has no usable ``run``."""


@dataclass(frozen=True, slots=True)
class LoadedBundle:
    spec: BundleSpec
    run: BundleRun
    package: str
    rerun_safe: bool = False
    """The bundle's ``RERUN_SAFE``: it may run again after a processor died
    mid-turn (it has no effects that must not happen twice)."""
    on_asyncio: bool = False
    """The bundle's ``EVENT_LOOP = "asyncio"``: its code needs an asyncio loop
    (most LLM SDKs do), so under Trio it runs through trio-asyncio."""

    @property
    def config(self) -> dict[str, Any]:
        return self.spec.config


def load_bundle(spec: BundleSpec) -> LoadedBundle:
    assert spec.path is not None
    package = f"{_PACKAGE_ROOT}.{spec.id.replace('.', '_').replace('-', '_')}_{next(_load_numbers)}"
    _ensure_root_package()
    _register_package(package, spec.path)
    try:
        module = importlib.import_module(f"{package}.{spec.module}")
    except Exception as exc:
        raise BundleLoadError(f"bundle {spec.id!r}: import failed: {exc!r}") from exc

    run = getattr(module, "run", None)
    if run is None or not inspect.iscoroutinefunction(run):
        raise BundleLoadError(
            f"bundle {spec.id!r}: {spec.module} must define `async def run(ctx)`"
        )
    event_loop = getattr(module, "EVENT_LOOP", "anyio")
    if event_loop not in _EVENT_LOOPS:
        raise BundleLoadError(
            f"bundle {spec.id!r}: EVENT_LOOP must be one of {sorted(_EVENT_LOOPS)},"
            f" got {event_loop!r}"
        )
    return LoadedBundle(
        spec,
        run,
        package,
        rerun_safe=bool(getattr(module, "RERUN_SAFE", False)),
        on_asyncio=event_loop == "asyncio",
    )


def _ensure_root_package() -> None:
    if _PACKAGE_ROOT not in sys.modules:
        root = importlib.util.module_from_spec(
            importlib.machinery.ModuleSpec(_PACKAGE_ROOT, None, is_package=True)
        )
        root.__path__ = []
        sys.modules[_PACKAGE_ROOT] = root


def _register_package(package: str, folder: Path) -> None:
    spec = importlib.util.spec_from_file_location(
        package,
        folder / "__init__.py",
        submodule_search_locations=[str(folder)],
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[package] = module
    if (folder / "__init__.py").is_file():
        spec.loader.exec_module(module)
