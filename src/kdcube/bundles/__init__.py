"""Bundles: the registry file, and loading bundles from their folders."""

from kdcube.bundles.loader import BundleLoadError, LoadedBundle, load_bundle
from kdcube.bundles.registry import (
    BundleRegistry,
    BundleSpec,
    RegistryError,
    default_registry,
    read_registry,
)

__all__ = [
    "BundleLoadError",
    "BundleRegistry",
    "BundleSpec",
    "LoadedBundle",
    "RegistryError",
    "default_registry",
    "load_bundle",
    "read_registry",
]
