"""Run a labeling job on a Ray cluster through the Ray Jobs API.

    seglabel submit --address http://HEAD:8265 --config jobs/coco-instance.yaml --wait
    seglabel status|logs|stop --address http://HEAD:8265 SUBMISSION_ID

The job's settings travel in the runtime_env (an environment variable holding the YAML spec),
so the cluster needs nothing but the installed package; ``working_dir`` ships a folder too
(e.g. a checkout with ``jobs/``) and ``pip`` extra requirements. The entrypoint is
``seglabel.jobs_entry``, the same code path as ``seglabel run``. The driver asks for no GPU.

Token authentication: a Ray 2.60 head started where a token exists (``ray start --head`` after
any local ``ray.init``, or with ``RAY_AUTH_MODE=token``) answers 401 to a client that sends
none, and Ray's own client sends one only when ``RAY_AUTH_MODE=token`` is set where it runs.
When the head asks for a token, seglabel looks where Ray keeps one (``RAY_AUTH_TOKEN``,
``RAY_AUTH_TOKEN_PATH``, ``~/.ray/auth_token``) and sends it; with none, the error says how to
provide it. A token is only ever sent to a head that asked for one.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

import yaml

from ..core.config import JobConfig
from ..core.errors import ConfigError, one_line
from ..core.redaction import SIGNED_URL_PARAMS, get_logger, signed_params

log = get_logger(__name__)

SPEC_ENV = "SEGLABEL_JOB_SPEC"
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
SUBMIT_RETRY_S = 120
# Field names that carry secrets, at any depth of a spec: a spec travels to the cluster in the
# clear, so credentials must come from the platform (IRSA, workload identity, instance profiles).
SECRET_NAMES = (
    "key", "secret", "token", "pass", "pwd", "cred", "auth", "connection_string", "sas", "signature",
    "cookie", "private",
)
# Fields named like secrets that are settings, not secrets: how to sign (s3fs, botocore), and
# gcsfs's token values that name an identity rather than hold one (the platform's: what a
# cluster should use).
NOT_SECRET_FIELDS = ("signature_version",)
NOT_SECRET_VALUES = {"token": ("cloud", "google_default", "anon")}
# Fields whose every value is sent as is to a server: an HTTP header under any name may carry
# what Authorization carries.
SECRET_FIELDS = ("headers",)
# Strings that carry a secret whatever their field's name (Azure connection strings, signed URLs).
SECRET_MARKERS = ("accountkey=", "sharedaccesssignature=") + tuple(sorted(f"{p}=" for p in SIGNED_URL_PARAMS))
# Names like secrets that are identifiers of keys, not keys (SSE-KMS: SSEKMSKeyId).
NOT_SECRET_SUFFIXES = ("keyid", "key_id")
# A shipped working_dir is readable by anyone who can read the cluster's jobs: credential files
# are never packed (gitignore patterns, as Ray reads them), nor build leftovers.
# A pattern with a slash before its end is anchored at the root in gitignore's rules, so the
# folders kept under .config are written ``**/`` to be left out at any depth; and they match in
# any letter case (``_any_case``: ``.ENV`` and ``.AWS/`` are the same files to a reader).
CREDENTIAL_FILES = [
    ".env", ".env.*", "*.env", ".aws/", ".azure/", "**/.config/gcloud/", "**/.config/rclone/", ".docker/",
    ".kube/", ".ssh/", ".gnupg/", ".netrc", ".git-credentials", ".npmrc", ".pypirc", ".s3cfg", ".boto",
    "rclone.conf", ".pgpass", ".my.cnf", "*.pem", "*.key", "*.p12", "*.pfx", "id_rsa*", "id_ed25519*",
    "id_ecdsa*", "credentials", "credentials.json", "*-credentials.json", "*_credentials.json",
    "client_secret*.json", "service-account*.json", "service_account*.json", "*-sa-key.json", "*.keytab",
]


def _any_case(pattern: str) -> str:
    """A gitignore pattern matching its letters in either case (gitignore's own matching is
    case-sensitive)."""
    return "".join(f"[{c.lower()}{c.upper()}]" if c.isalpha() else c for c in pattern)


WORKING_DIR_EXCLUDES = [".git", ".venv", "venv", "__pycache__", "*.egg-info", ".pytest_cache", ".carry",
                        *map(_any_case, CREDENTIAL_FILES)]
TOKEN_HELP = (
    "set RAY_AUTH_TOKEN to the cluster's token, or RAY_AUTH_TOKEN_PATH to a file holding it, or copy the "
    "head's ~/.ray/auth_token to this machine (`ray get-auth-token` on the head prints it)"
)


def find_token() -> tuple[str, str] | None:
    """The Ray authentication token where Ray's own tools look for it, and where it was found:
    ``RAY_AUTH_TOKEN``, then the file ``RAY_AUTH_TOKEN_PATH`` names, then ``~/.ray/auth_token``."""
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if token:
        return token, "RAY_AUTH_TOKEN"
    candidates = []
    if os.environ.get("RAY_AUTH_TOKEN_PATH"):
        candidates.append(("RAY_AUTH_TOKEN_PATH", Path(os.environ["RAY_AUTH_TOKEN_PATH"]).expanduser()))
    candidates.append(("~/.ray/auth_token", Path.home() / ".ray" / "auth_token"))
    for source, path in candidates:
        try:
            token = path.read_text().strip()
        except OSError:
            continue
        if token:
            return token, f"{source} ({path})"
    return None


def _is_auth_error(exc: BaseException) -> bool:
    # Ray raises AuthenticationError for a 401 or 403 from the Jobs API (its messages quote the
    # address, so a "401" in the text would prove nothing).
    return type(exc).__name__ == "AuthenticationError" or "Authentication required" in str(exc)


def client(address: str):
    """A Jobs API client for ``address``, with the cluster's token when the head asks for one."""
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except Exception as exc:  # connection refused, not a dashboard, bad URL, a token required
        if not _is_auth_error(exc):
            raise ConfigError(f"cannot reach the Ray Jobs API at {address}: {one_line(exc)}") from exc
    found = find_token()
    if found is None:
        raise ConfigError(f"the Ray cluster at {address} requires an authentication token: {TOKEN_HELP}")
    token, source = found
    try:
        return JobSubmissionClient(address, headers={"Authorization": f"Bearer {token}"})
    except Exception as exc:
        if _is_auth_error(exc) or "Authentication failed" in str(exc):
            raise ConfigError(
                f"the Ray cluster at {address} refused the token from {source}: {TOKEN_HELP}"
            ) from exc
        raise ConfigError(f"cannot reach the Ray Jobs API at {address}: {one_line(exc)}") from exc


def _secret_fields(value: Any, path: str) -> Iterator[str]:
    """Where ``value`` (a spec's setting, at ``path``) holds a secret, at any depth: a field named
    like one (``client_kwargs.aws_secret_access_key``, ``headers.Authorization``), a URL with a
    password (``https://user:pw@host``), a string carrying an account key or a signature
    (``AccountKey=…``, ``sig=…``). Only field paths are reported, never values."""
    if isinstance(value, Mapping):
        for name, inner in value.items():
            here = f"{path}.{name}"
            field = str(name).lower()
            secret = (any(s in field for s in SECRET_NAMES) and not field.endswith(NOT_SECRET_SUFFIXES)
                      and field not in NOT_SECRET_FIELDS and inner not in NOT_SECRET_VALUES.get(field, ()))
            if isinstance(inner, Mapping) and field in SECRET_FIELDS:
                yield from (f"{here}.{header}" for header, sent in inner.items() if sent not in (None, ""))
            elif field in SECRET_FIELDS and inner not in (None, "", False, [], ()):
                yield here  # headers as a list of pairs, as aiohttp takes them too
            elif inner not in (None, "", False) and secret:
                yield here
            else:
                yield from _secret_fields(inner, here)
    elif isinstance(value, (list, tuple)):
        for i, inner in enumerate(value):
            yield from _secret_fields(inner, f"{path}[{i}]")
    elif isinstance(value, str):
        if "://" in value and "@" in value.split("://", 1)[1].split("/", 1)[0]:
            yield f"{path} (a URL with user information)"
        elif any(marker in value.lower() for marker in SECRET_MARKERS) or value.lower().startswith(
            ("bearer ", "basic ")
        ):
            yield f"{path} (a key or signature)"


def _url_credentials(value: str, path: str) -> Iterator[str]:
    """``path`` once if ``value`` holds a URL with credentials: a password (``user:pass@``), a
    token as the user of an http(s) URL (``https://TOKEN@host``), or a signature or token in an
    http(s) URL's query (an Azure SAS ``sig=``, ``X-Goog-Signature=``: what logs redact)."""
    for match in re.finditer(r"([a-z][a-z0-9+.-]*)://([^/\s@]+)@", value, re.IGNORECASE):
        if ":" in match[2] or match[1].lower().split("+")[-1] in ("http", "https"):
            yield f"{path} (a URL with user information)"
            return
    if signed_params(value, any_scheme=True):
        yield f"{path} (a signed URL)"


# Ray's reader of ignore files says at INFO what each one ignores; its packer says it again.
_QUIET = logging.getLogger(f"{__name__}.links")
_QUIET.setLevel(logging.WARNING)


def check_links(root: str) -> None:
    """Refuse, in one line naming the link, a working dir holding a symbolic link that Ray's
    packer would follow where it must not: to a folder (links between folders can loop, and
    ``k -> .kube`` would ship what the excludes leave out under another name), or to a file
    outside the working dir (``~/.aws/credentials`` linked in) or among what the excludes leave
    out. What Ray leaves out itself (the excludes, and ``.gitignore`` and ``.rayignore`` as it
    reads them, folder by folder) is not looked at: a virtualenv's python link, an ignored
    ``data`` link to a dataset."""
    from ray._private.runtime_env.packaging import get_excludes_from_ignore_files  # as Ray's packer
    from ray._private.thirdparty.pathspec import PathSpec

    read_gitignore = os.environ.get("RAY_RUNTIME_ENV_IGNORE_GITIGNORE", "0") != "1"
    excluded = PathSpec.from_lines("gitwildmatch", WORKING_DIR_EXCLUDES)
    base = os.path.realpath(root)
    ignored_in: dict[str, list] = {}

    def refuse(rel: str, why: str) -> ConfigError:
        return ConfigError(f"the working dir {root} holds a link {rel!r} {why}; remove it, or ship a folder "
                           "without it")

    for folder, dirs, files in os.walk(root):
        ignores = ignored_in.get(os.path.dirname(folder), []) + get_excludes_from_ignore_files(
            Path(folder), include_gitignore=read_gitignore, logger=_QUIET)
        ignored_in[folder] = ignores
        here = os.path.relpath(folder, root)

        def skipped(name: str) -> bool:
            path = os.path.join(folder, name)
            return excluded.match_file(os.path.normpath(os.path.join(here, name))) or any(
                ignore(Path(path)) for ignore in ignores)

        dirs[:] = [d for d in dirs if not skipped(d)]
        for name in dirs + [f for f in files if not skipped(f)]:
            path = os.path.join(folder, name)
            if not os.path.islink(path):
                continue
            rel, target = os.path.normpath(os.path.join(here, name)), os.path.realpath(path)
            if os.path.isdir(target):
                raise refuse(rel, "to a folder: Ray's packer follows it (links can loop, or pack what the "
                                  "excludes leave out under another name)")
            if os.path.commonpath([base, target]) != base:
                raise refuse(rel, "that leaves it: Ray would pack what it points to")
            if excluded.match_file(os.path.relpath(target, base)):
                raise refuse(rel, "to a file the excludes leave out (credentials): Ray would pack it")


class _NoAliases(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:
        return True


def check_no_secrets(values: Mapping[str, Any]) -> None:
    """Raise ConfigError, naming the fields (never their values), when a job spec's ``values``
    hold credentials: a submitted spec is readable by anyone who can list the cluster's jobs."""
    found = [field for name in sorted(values) for field in _secret_fields(values[name], name)]
    if found:
        raise ConfigError(
            f"the spec holds credentials ({', '.join(found)}); a submitted spec is visible to anyone who can "
            "read the cluster's jobs: give the cluster an identity (IRSA, workload identity, an instance "
            "profile) instead"
        )


def submit(
    address: str,
    values: dict[str, Any],
    *,
    working_dir: str | None = None,
    pip: list[str] | None = None,
    submission_id: str | None = None,
) -> str:
    """Submit a job with these settings (as in a YAML spec); returns the submission id."""
    config = JobConfig.from_mapping(values)  # the same validation as `seglabel run`, before sending
    check_no_secrets(values)
    # Every field sent, not only the spec: a pip requirement or a working_dir URL may carry a
    # token (git+https://oauth2:TOKEN@…, --extra-index-url https://user:pass@…). Only their
    # URLs are checked: "tiktoken==0.7" is no secret, nor is git+ssh://git@host's user.
    found = [f for i, r in enumerate(pip or []) for f in _url_credentials(str(r), f"pip[{i}]")]
    found += list(_url_credentials(working_dir or "", "working_dir"))
    found += list(_url_credentials(submission_id or "", "submission_id"))
    if found:
        raise ConfigError(f"the job holds credentials ({', '.join(found)}); a submitted job is visible to "
                          "anyone who can read the cluster's jobs: use a token the cluster has, or a public "
                          "index")
    if working_dir and os.path.isdir(working_dir):
        check_links(working_dir)
    if config.require_license is not None:
        # Checked here too, so that a refused checkpoint never reaches the cluster's queue.
        from ..core.license import check_allowed
        from ..engine.card import checkpoint_license
        from ..engine.checkpoint import inspect_checkpoint

        info = inspect_checkpoint(config.engine.model, config.engine.revision)
        license = checkpoint_license(config.engine.model, info.revision, info.family)
        check_allowed(license, config.require_license, config.engine.model)
    # No anchors: the cluster's spec reader bounds what aliases expand to, and one dict given
    # for two settings would otherwise travel as an alias.
    spec = yaml.dump(values, Dumper=_NoAliases, sort_keys=True)
    runtime_env: dict[str, Any] = {"env_vars": {SPEC_ENV: spec}}
    if working_dir:
        runtime_env["working_dir"] = working_dir
        runtime_env["excludes"] = WORKING_DIR_EXCLUDES
    if pip:
        runtime_env["pip"] = list(pip)
    # A shipped checkout runs its own jobs/ script (which calls the installed package); without
    # one the cluster's installed package alone runs the job.
    shipped = working_dir and os.path.isfile(os.path.join(working_dir, "jobs", "run_job.py"))
    script = "jobs/run_job.py" if shipped else "-m seglabel.jobs_entry"
    entrypoint = f"python {script} --config env:{SPEC_ENV}"
    jobs = client(address)
    deadline = time.monotonic() + SUBMIT_RETRY_S
    while True:
        try:
            return jobs.submit_job(
                entrypoint=entrypoint,
                runtime_env=runtime_env,
                submission_id=submission_id,
                # The driver only enumerates and commits: no GPU, and no CPU reserved either, so
                # that it also runs on a head started with num-cpus 0.
                entrypoint_num_cpus=0,
                entrypoint_num_gpus=0,
                metadata={"submitted_by": "seglabel"},
            )
        except RuntimeError as exc:
            # A head that has just started answers "No available agent ... try again later".
            if "try again later" not in str(exc) or time.monotonic() > deadline:
                raise
            log.info("the cluster is not ready to take jobs yet; retrying")
            time.sleep(2)


async def _follow(jobs, submission_id: str) -> None:
    async for lines in jobs.tail_job_logs(submission_id):
        sys.stdout.write(lines)
        sys.stdout.flush()


def _status_value(info) -> str:
    return str(getattr(info.status, "value", info.status))


def wait(address: str, submission_id: str, follow: bool = True, poll_s: float = 1.0) -> tuple[str, str]:
    """Wait until the job ends (printing its logs to stdout when ``follow``); returns
    (status, message)."""
    jobs = client(address)
    if follow:
        asyncio.run(_follow(jobs, submission_id))
    while True:
        info = jobs.get_job_info(submission_id)
        status = _status_value(info)
        if status in TERMINAL:
            return status, info.message or ""
        time.sleep(poll_s)


def status(address: str, submission_id: str) -> tuple[str, str]:
    """A submitted job's status and message."""
    info = client(address).get_job_info(submission_id)
    return _status_value(info), info.message or ""


def logs(address: str, submission_id: str) -> str:
    """A submitted job's logs so far."""
    return client(address).get_job_logs(submission_id)


def stop(address: str, submission_id: str) -> bool:
    """Ask a submitted job to stop; False when it was not running."""
    return client(address).stop_job(submission_id)


def last_error_line(text: str) -> str:
    """The last ``seglabel: …`` line of a job's logs: why it failed, in one line."""
    lines = [line for line in text.strip().splitlines() if line.startswith("seglabel: ")]
    return lines[-1] if lines else ""
