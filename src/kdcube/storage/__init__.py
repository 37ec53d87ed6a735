"""The storage port: blobs by key, and the adapters behind it."""

from kdcube.storage.keys import InvalidKey, check_key
from kdcube.storage.ports import (
    AccessDenied,
    InvalidStorageUrl,
    ObjectInfo,
    ObjectNotFound,
    Storage,
    StorageError,
    StorageUnavailable,
)

__all__ = [
    "AccessDenied",
    "InvalidKey",
    "InvalidStorageUrl",
    "ObjectInfo",
    "ObjectNotFound",
    "Storage",
    "StorageError",
    "StorageUnavailable",
    "check_key",
]
