"""Opening fsspec filesystems with seglabel's defaults, and naming what is on them.

The one home for how seglabel opens storage, shared by the inputs, the outputs, the
checkpoint copy and the bench: :func:`open_url` opens any fsspec URL with retry defaults for
flaky object stores. At 10^7 objects an object store will answer some requests with 503
SlowDown or drop a connection; botocore's own retry machinery (standard mode: exponential
backoff with jitter, retrying throttling, 5xx and connection errors) handles that when given
enough attempts. The defaults apply only where the user's storage options do not say
otherwise; an http(s) URL's headers are kept to its own origin (:class:`OriginHeaders`).
"""

from __future__ import annotations

import os
from typing import Any, Iterable, Mapping
from urllib.parse import urlsplit

import fsspec
from fsspec.core import split_protocol, url_to_fs

S3_PROTOCOLS = frozenset({"s3", "s3a"})
# About a minute of backoff in all (botocore caps each wait at 20 s): enough to ride out
# throttling and a short outage of the endpoint, short enough to report a dead one.
S3_MAX_ATTEMPTS = 10


def with_defaults(url: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Storage options for ``url`` with seglabel's defaults filled in: retries for S3, and for
    http(s) the user's ``headers`` kept to ``url``'s own origin on every hop of a redirect."""
    options = dict(storage_options or {})
    protocol = split_protocol(url)[0]
    if protocol in S3_PROTOCOLS:
        config = dict(options.get("config_kwargs") or {})
        config.setdefault("retries", {"max_attempts": S3_MAX_ATTEMPTS, "mode": "standard"})
        options["config_kwargs"] = config
    elif protocol in ("http", "https"):
        client = dict(options.get("client_kwargs") or {})
        # Headers reach aiohttp two ways: per request (``headers``) and as the session's
        # defaults (``client_kwargs.headers``).
        names = [*_names_of(options.get("headers")), *_names_of(client.get("headers"))]
        if names:
            client["middlewares"] = (*client.get("middlewares", ()), OriginHeaders(url, names))
            options["client_kwargs"] = client
    return options


def _names_of(headers: Any) -> list[str]:
    return [str(name) for name in headers] if isinstance(headers, Mapping) else []


class OriginHeaders:
    """An aiohttp client middleware that sends the user's headers (an API key, a token) to one
    origin only (scheme, host, port), on every request of a redirect chain: aiohttp follows a
    redirect with the same headers and strips only ``Authorization`` and ``Cookie`` on the way
    to another host, so a custom ``X-Api-Key`` reached whatever host the input redirected to.

    Picklable (options travel to Ray workers) and with a stable ``repr``, which fsspec's cache
    of filesystem instances keys on."""

    def __init__(self, url: str, names: Iterable[str]):
        from yarl import URL

        self.origin = str(URL(url).origin())
        self.host = URL(url).host
        self.names = tuple(sorted({str(name).lower() for name in names}))

    async def __call__(self, request: Any, handler: Any) -> Any:
        if not self.allows(request.url):
            for name in self.names:
                request.headers.popall(name, None)
        return await handler(request)

    def allows(self, url: Any) -> bool:
        """The input's own origin, or its host upgraded from http to https (the headers went
        out in the clear on the first hop anyway)."""
        origin = url.origin()
        if str(origin) == self.origin:
            return True
        return self.origin.startswith("http://") and url.scheme == "https" and url.host == self.host and (
            url.port in (None, 443))

    def __repr__(self) -> str:
        return f"OriginHeaders({self.origin!r}, {self.names!r})"


def open_url(url: str, storage_options: Mapping[str, Any] | None = None):
    """``fsspec.core.url_to_fs`` with the defaults above: (filesystem, path). A name without a
    protocol is a local path, ``::`` included: fsspec would read ``x::y.json`` as a chain of
    filesystems and write ``x:`` (chains that start with a protocol, ``simplecache::s3://…``,
    are kept)."""
    if split_protocol(url)[0] is None and "::" in url:
        fs = fsspec.filesystem("file", **with_defaults(url, storage_options))
        return fs, fs._strip_protocol(url)
    return url_to_fs(url, **with_defaults(url, storage_options))


def absolute_local(url: str) -> str:
    """A local path made absolute (``./x``, ``~/x``, ``x``, ``file://x``); other URLs as given.

    The driver resolves local paths before anything reaches a worker: a Ray worker's working
    directory is not the driver's (a notebook that changed directory, a cluster's nodes), so a
    relative path would name another folder there.
    """
    protocol, path = split_protocol(url)
    if protocol not in (None, "file", "local"):
        return url
    return os.path.abspath(os.path.expanduser(path))


def absolute_model(model: str) -> str:
    """A checkpoint folder's absolute path; a Hub id or URL as given. "org/name" is a relative
    path too, so only one that names a folder here (or starts like a path) is taken for one;
    file:// URLs are absolute already."""
    if "://" not in model and (model.startswith((".", "~", "/")) or os.path.isdir(os.path.expanduser(model))):
        return absolute_local(model)
    return model


def protocols(fs: Any) -> tuple[str, ...]:
    """The protocols a filesystem answers to (fsspec gives a string or a tuple)."""
    return (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)


def innermost(fs: Any) -> Any:
    """The filesystem a chain of them writes through to (``simplecache::s3://…``: S3)."""
    while isinstance(getattr(fs, "fs", None), fsspec.AbstractFileSystem):
        fs = fs.fs
    return fs


def is_local(fs: Any) -> bool:
    """Whether ``fs`` is the local disk (where files are renamed into place)."""
    return "file" in protocols(fs) or "local" in protocols(fs)


def full_uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """The full URI of ``path`` (a path as ``fs`` returns it), with its protocol.

    ``fs.unstrip_protocol`` gives ``file:///abs/x.jpg`` for local paths (checked for fsspec
    2024.2 to 2026.9), ``s3://bucket/key`` for S3 and ``memory:///x`` for memory.
    """
    return fs.unstrip_protocol(path)


def options_for(uri: str, base_url: str, storage_options: Mapping[str, Any]) -> dict[str, Any]:
    """The storage options given for an input, for one of its images: they apply to URIs on the
    input's protocol, and for http(s) on the input's host only (there options carry headers,
    tokens among them, that a manifest must not be able to send to any host it lists)."""
    protocol = split_protocol(uri)[0] or "file"
    if protocol != (split_protocol(base_url)[0] or "file"):
        return {}
    if protocol in ("http", "https") and urlsplit(uri).netloc.lower() != urlsplit(base_url).netloc.lower():
        return {}
    return dict(storage_options)
