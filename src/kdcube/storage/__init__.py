"""The storage port: blobs by key, and the adapters behind it."""

from kdcube.storage.keys import InvalidKey, check_key
from kdcube.storage.ports import ObjectInfo, ObjectNotFound, Storage, StorageError

__all__ = [
    "InvalidKey",
    "ObjectInfo",
    "ObjectNotFound",
    "Storage",
    "StorageError",
    "check_key",
]
