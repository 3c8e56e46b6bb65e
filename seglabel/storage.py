"""Open fsspec filesystems with seglabel's defaults for flaky object stores.

At 10^7 objects an object store will answer some requests with 503 SlowDown or drop a
connection; botocore's own retry machinery (standard mode: exponential backoff with jitter,
retrying throttling, 5xx and connection errors) handles that when given enough attempts. The
defaults apply only where the user's storage options do not say otherwise.
"""

from __future__ import annotations

from typing import Any, Mapping

from fsspec.core import split_protocol, url_to_fs

S3_PROTOCOLS = frozenset({"s3", "s3a"})
# About a minute of backoff in all (botocore caps each wait at 20 s): enough to ride out
# throttling and a short outage of the endpoint, short enough to report a dead one.
S3_MAX_ATTEMPTS = 10


def with_defaults(url: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Storage options for ``url`` with seglabel's retry defaults filled in."""
    options = dict(storage_options or {})
    if split_protocol(url)[0] in S3_PROTOCOLS:
        config = dict(options.get("config_kwargs") or {})
        config.setdefault("retries", {"max_attempts": S3_MAX_ATTEMPTS, "mode": "standard"})
        options["config_kwargs"] = config
    return options


def open_url(url: str, storage_options: Mapping[str, Any] | None = None):
    """``fsspec.core.url_to_fs`` with the defaults above: (filesystem, path)."""
    return url_to_fs(url, **with_defaults(url, storage_options))
