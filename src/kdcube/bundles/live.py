"""The bundle registry in force, and the code each processor loaded for it.

The registry is a live document on the bus (``kdcube.bus.board``): an admin
applies a bundles.yaml, and every process takes it within about a second. The
ingress only resolves bundle ids in it; each processor loads the code.

Hot reload: on a new registry, a processor loads every bundle whose source
changed (its folder, module or config, or for a git bundle its commit) under
a fresh package name, then swaps the whole set at once. New turns get the new
code; a running turn holds the ``LoadedBundle`` it started with to its end.
A replaced version's modules leave ``sys.modules`` once no turn holds it, and
git checkouts that no loaded version uses any more are removed.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import structlog
import yaml

from kdcube.bundles.git import GitBundles
from kdcube.bundles.loader import BundleLoadError, LoadedBundle, load_bundle
from kdcube.bundles.registry import (
    BundleRegistry,
    BundleSpec,
    RegistryError,
    parse_registry,
)

log = structlog.get_logger("kdcube.bundles")


class RegistryCodec:
    """bundles.yaml as stored on the board; relative paths resolve from ``base``."""

    topic = "bundles"

    def __init__(self, base: Path) -> None:
        self._base = base

    def parse(self, text: str) -> BundleRegistry:
        try:
            document = yaml.safe_load(text)
        except (yaml.YAMLError, RecursionError) as exc:
            reason = " ".join(str(exc).split())
            raise RegistryError(f"not valid YAML or JSON: {reason}") from None
        return parse_registry(document, base=self._base)

    def dump(self, value: BundleRegistry) -> str:
        return json.dumps(value.document())


class LoadedBundles:
    """The loaded bundle of each id, swapped whole when the registry changes."""

    def __init__(self, git: GitBundles | None = None) -> None:
        self._git = git
        self._current: dict[str, LoadedBundle] = {}
        self._sources: dict[str, str] = {}
        self._holds: Counter[str] = Counter()
        self._retired: dict[str, LoadedBundle] = {}
        self._reloading = anyio.Lock()
        self.version = 0
        """The registry version whose bundles are loaded."""
        self._reloaded = anyio.Event()

    @classmethod
    def fixed(cls, bundles: Mapping[str, LoadedBundle]) -> LoadedBundles:
        """Bundles loaded by the caller, never reloaded (tests, tools)."""
        loaded = cls()
        loaded._current = dict(bundles)
        return loaded

    def get(self, bundle_id: str) -> LoadedBundle | None:
        return self._current.get(bundle_id)

    @contextmanager
    def hold(self, bundle: LoadedBundle) -> Iterator[None]:
        """Keep ``bundle``'s modules loaded while a turn runs it."""
        self._holds[bundle.package] += 1
        try:
            yield
        finally:
            self._holds[bundle.package] -= 1
            if self._holds[bundle.package] <= 0:
                del self._holds[bundle.package]
                self._unload_if_retired(bundle.package)

    async def wait_loaded(self, version: int) -> None:
        """Return once the bundles of registry ``version`` (or later) are
        loaded; the caller bounds the wait."""
        while self.version < version:
            await self._reloaded.wait()

    async def reload(
        self, registry: BundleRegistry, *, version: int = 0, strict: bool = False
    ) -> None:
        """Load what changed in ``registry`` and swap it in.

        With ``strict`` (start-up), a bundle that fails to load raises
        BundleLoadError; afterwards it is logged, and the bundle keeps its
        previous version (or stays absent, if it is new).
        """
        async with self._reloading:
            fresh: dict[str, LoadedBundle] = {}
            sources: dict[str, str] = {}
            for spec in registry.specs.values():
                loaded = await self._load(spec, strict=strict)
                if loaded is not None:
                    fresh[spec.id], sources[spec.id] = loaded
            self._swap(fresh, sources)
            self.version = max(self.version, version)
            self._reloaded.set()
            self._reloaded = anyio.Event()
        await self._clean_git()

    async def _load(
        self, spec: BundleSpec, *, strict: bool
    ) -> tuple[LoadedBundle, str] | None:
        try:
            folder_spec = await self._materialized(spec)
            source = folder_spec.model_dump_json()
            if self._sources.get(spec.id) == source:
                return self._current[spec.id], source
            loaded = load_bundle(folder_spec)
        except Exception as exc:
            # Any failure (git, import, a locked folder) leaves this bundle as
            # it was; at start-up it stops the process instead.
            if strict:
                raise
            log.error("bundles.reload_failed", bundle_id=spec.id, error=str(exc))
            previous = self._current.get(spec.id)
            if previous is None:
                return None
            return previous, self._sources[spec.id]

        log.info("bundles.loaded", bundle_id=spec.id, package=loaded.package)
        return loaded, source

    async def _materialized(self, spec: BundleSpec) -> BundleSpec:
        """A spec with a local folder: git bundles are fetched at their ref."""
        if spec.repo is None:
            return spec
        if self._git is None:
            raise BundleLoadError(
                f"bundle {spec.id!r}: git bundles need a managed root; none is set"
            )
        folder = await self._git.materialize(spec)
        return BundleSpec(
            id=spec.id,
            name=spec.name,
            path=folder,
            module=spec.module,
            config=spec.config,
        )

    def _swap(self, fresh: dict[str, LoadedBundle], sources: dict[str, str]) -> None:
        kept = {bundle.package for bundle in fresh.values()}
        for bundle in self._current.values():
            if bundle.package not in kept:
                self._retired[bundle.package] = bundle
        self._current, self._sources = fresh, sources
        for package in list(self._retired):
            self._unload_if_retired(package)

    def _unload_if_retired(self, package: str) -> None:
        if package not in self._retired or self._holds.get(package):
            return
        del self._retired[package]
        for name in [
            m for m in sys.modules if m == package or m.startswith(package + ".")
        ]:
            del sys.modules[name]
        log.info("bundles.unloaded", package=package)

    async def _clean_git(self) -> None:
        if self._git is None:
            return
        in_use = {
            bundle.spec.path
            for bundle in (*self._current.values(), *self._retired.values())
            if bundle.spec.path is not None
        }
        try:
            await self._git.cleanup(keep=in_use)
        except Exception as exc:
            # Old checkouts stay until the next reload's cleanup.
            log.warning("bundles.cleanup_failed", error=str(exc))

    def describe(self) -> dict[str, Any]:
        """What is loaded, for logs and the admin view."""
        return {bundle_id: b.package for bundle_id, b in self._current.items()}
