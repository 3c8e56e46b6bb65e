"""Text about URLs without their secrets, and loggers that say nothing else.

The one place where a URL loses its credentials (:func:`redact`): error messages, error rows,
log records (:func:`get_logger`) and recorded URLs go through it, so that a presigned URL's
signature or a URL's password never lands in an output, a log or a terminal. This module
imports nothing from the package, so that every other module may use it.
"""

from __future__ import annotations

import logging
import re
from urllib.parse import unquote

# Query parameters of signed http(s) URLs whose values are credentials (AWS SigV4 and SigV2,
# GCS V4, Azure SAS, CloudFront), compared lower-case.
SIGNED_URL_PARAMS = frozenset({
    "x-amz-signature", "x-amz-credential", "x-amz-security-token", "x-goog-signature", "x-goog-credential",
    "signature", "sig", "awsaccesskeyid", "key-pair-id", "policy", "token", "access_token",
})
REDACTED = "REDACTED"
_URL = re.compile(r"\b([A-Za-z][A-Za-z0-9+.-]*)://([^\s'\"<>]*)")


def is_http(url: str) -> bool:
    """Whether ``url`` is an http(s) URL (whose '?' starts a query, not part of a name)."""
    return url[:8].lower().startswith(("http://", "https://"))


def redact_url(url: str) -> str:
    """``url`` without its secrets: user information (``user:pw@``) becomes ``REDACTED@``; for
    http(s), the values of query and fragment parameters that carry credentials (the signed-URL
    ones, and any whose name holds sig, key, token, secret, pass, credential, auth or session)
    become ``REDACTED``. Object names keep their '?' (on S3 or a disk it is part of the name)."""
    if "@" not in url and "?" not in url and "#" not in url:
        return url  # the usual case, and cheap: one check per row
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    http = is_http(url)
    # The authority ends at the path, or (http) at a query or fragment: "https://h?sig=s".
    end = min((i for i in (rest.find(c) for c in ("/?#" if http else "/")) if i >= 0), default=len(rest))
    authority, tail = rest[:end], rest[end:]
    if "@" in authority:
        authority = REDACTED + authority[authority.rindex("@"):]
    if http:
        tail = _QUERY_OR_FRAGMENT.sub(_redact_params, tail)
    return f"{scheme}://{authority}{tail}"


# A query or fragment: "?a=1&b=2" or "#access_token=…".
_QUERY_OR_FRAGMENT = re.compile(r"([?#])([^#]*)")


_SECRET_PARTS = ("sig", "key", "token", "secret", "pass", "credential", "auth", "session")


def _redact_params(match: re.Match) -> str:
    params = []
    for param in match.group(2).split("&"):
        name, eq, _ = param.partition("=")
        params.append(f"{name}={REDACTED}" if eq and _is_secret(unquote(name).lower()) else param)
    return match.group(1) + "&".join(params)


# Parameters of a signed URL that change with each signing (AWS, GCS, Azure SAS).
_SIGNING_PARAMS = frozenset({
    "expires", "se", "st", "sv", "sp", "sr", "spr", "signedheaders", "skoid", "sktid",
})


def url_identity(url: str) -> str:
    """What an http(s) URL names, whoever signed it when: the URL without its user information
    and without signing and credential parameters (two presigned URLs of one object, signed at
    different times, give one identity). Other URLs as :func:`redact_url` gives them."""
    url = redact_url(url)
    if not is_http(url) or ("?" not in url and "#" not in url):
        return url

    def keep(match: re.Match) -> str:
        params = [p for p in match.group(2).split("&") if not _is_signing(p.partition("=")[0].lower())]
        return (match.group(1) + "&".join(params)) if params else ""

    return _QUERY_OR_FRAGMENT.sub(keep, url)


def _is_secret(name: str) -> bool:
    """Whether a (lower-case) parameter name carries a credential."""
    return name in SIGNED_URL_PARAMS or any(part in name for part in _SECRET_PARTS)


def _is_signing(name: str) -> bool:
    """Whether a (lower-case) parameter name is part of a signature: a credential, or what
    changes with each signing (dates, expiries)."""
    return _is_secret(name) or name in _SIGNING_PARAMS or name.startswith(("x-amz-", "x-goog-"))


def signed_params(text: str, any_scheme: bool = False) -> bool:
    """Whether an http(s) URL in ``text`` (any URL with ``any_scheme``: a presigned ``s3://…?``
    a tool takes) carries a credential in its query or fragment (a signed URL's signature, an
    access token): what :func:`redact_url` hides there."""
    return any(
        (any_scheme or is_http(match.group(0)))
        and _QUERY_OR_FRAGMENT.sub(_redact_params, match.group(2)) != match.group(2)
        for match in _URL.finditer(text)
    )


def redact(text: str) -> str:
    """``text`` with every URL in it passed through :func:`redact_url`."""
    if "://" not in text:
        return text
    return _URL.sub(lambda m: redact_url(m.group(0)), text)


class _Redacting(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:
            return True  # a bad format is logging's to report, as it does without this filter
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, ()
        if record.exc_info:
            # A traceback (--log-level debug) quotes the exceptions' messages: URLs included.
            text = logging.Formatter().formatException(record.exc_info)
            record.exc_text, record.exc_info = redact(text), None
        return True


_REDACTING = _Redacting()


def get_logger(name: str) -> logging.Logger:
    """The module logger ``name``, whose records have every URL redacted (a filter on the
    logger itself: it acts wherever the record is handled, in the driver or a Ray worker)."""
    logger = logging.getLogger(name)
    if _REDACTING not in logger.filters:
        logger.addFilter(_REDACTING)
    return logger
