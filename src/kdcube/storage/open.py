"""Open the storage a URL names: ``file:///path`` or ``s3://bucket/prefix``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import unquote, urlsplit

import httpx

from kdcube.storage.keys import InvalidKey, check_key
from kdcube.storage.local import LocalStorage
from kdcube.storage.ports import InvalidStorageUrl, Storage
from kdcube.storage.s3 import DEFAULT_TIMEOUT, S3Storage

_EXPECTED = "file:///absolute/path or s3://bucket/prefix"


@asynccontextmanager
async def open_storage(
    url: str, *, endpoint_url: str | None = None
) -> AsyncIterator[Storage]:
    """The storage at ``url``, closed on exit.

    ``endpoint_url`` points ``s3://`` at an S3-compatible server (MinIO, R2,
    moto); a ``file://`` URL ignores it. S3 credentials and region come from
    botocore's chain (environment, profile, container or instance role).
    """
    parts = urlsplit(url)
    if parts.query or parts.fragment:
        raise InvalidStorageUrl(f"storage URL must be {_EXPECTED}, got {url!r}")

    if parts.scheme == "file":
        yield LocalStorage(_local_root(url, parts.netloc, parts.path))
    elif parts.scheme == "s3":
        bucket, prefix = _bucket_and_prefix(url, parts.netloc, parts.path)
        async with httpx.AsyncClient(timeout=DEFAULT_TIMEOUT) as client:
            yield await S3Storage.from_environment(
                client, bucket=bucket, prefix=prefix, endpoint_url=endpoint_url
            )
    else:
        raise InvalidStorageUrl(f"storage URL must be {_EXPECTED}, got {url!r}")


def _local_root(url: str, host: str, path: str) -> Path:
    root = Path(unquote(path))
    if host not in ("", "localhost") or not root.is_absolute():
        raise InvalidStorageUrl(
            f"a file storage URL needs an absolute path, as file:///srv/kdcube,"
            f" got {url!r}"
        )
    return root


def _bucket_and_prefix(url: str, bucket: str, path: str) -> tuple[str, str]:
    if not bucket:
        raise InvalidStorageUrl(
            f"an S3 storage URL needs a bucket, as s3://bucket/prefix, got {url!r}"
        )
    prefix = unquote(path.lstrip("/"))
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    try:
        check_key(prefix, prefix=True)
    except InvalidKey as exc:
        raise InvalidStorageUrl(f"bad prefix in storage URL {url!r}: {exc}") from None
    return bucket, prefix
