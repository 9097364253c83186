"""Object-storage access through fsspec, with explicit cloud credentials.

Every URL the trainer reads or writes (data shards, checkpoints, exports) goes through
:func:`url_to_fs` / :func:`open_url`, so `file://`, plain paths, `memory://`, `gs://`
(gcsfs) and `s3://` (s3fs) all behave the same.

Credentials for `gs://` are chosen explicitly, never by gcsfs's silent anonymous
fallback (a pod without Workload Identity would otherwise read as anonymous and fail much
later with 401/403). The mode comes from the environment variable ``SAM_GCS_TOKEN``:

- unset or ``google_default``: Application Default Credentials (Workload Identity in a
  GKE pod, ``GOOGLE_APPLICATION_CREDENTIALS``, or ``gcloud auth application-default
  login``). Checked up front; missing credentials raise :class:`CredentialsError`.
- ``cloud``: the GCE/GKE metadata server only.
- ``anon``: anonymous access (public buckets, or an emulator via
  ``STORAGE_EMULATOR_HOST``).
- a path to a service-account JSON key file.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import fsspec

GCS_TOKEN_ENV = "SAM_GCS_TOKEN"
_GCS_PROTOCOLS = ("gs", "gcs")


class StorageError(RuntimeError):
    """An object-storage URL could not be used."""


class CredentialsError(StorageError):
    """Cloud credentials are missing or invalid; the message says what to set."""


def protocol_of(url: str) -> str:
    """The fsspec protocol of ``url`` (``"file"`` for plain paths)."""
    if "://" not in url:
        return "file"
    return url.split("://", 1)[0].lower()


def _gcs_token() -> str:
    # Keyed by everything the lookup reads from the environment, so a changed setting is
    # seen, while 1000 shard opens per epoch still cost one credential lookup per process.
    token = os.environ.get(GCS_TOKEN_ENV, "google_default").strip() or "google_default"
    return _resolve_gcs_token(token, os.environ.get("GOOGLE_APPLICATION_CREDENTIALS"),
                              os.environ.get("CLOUDSDK_CONFIG"))


@functools.lru_cache(maxsize=8)  # failures raise, so only working settings are cached
def _resolve_gcs_token(token: str, adc_file: str | None, gcloud_config: str | None) -> str:
    if token == "anon":
        return token
    if token == "google_default":
        try:
            import google.auth  # gcsfs depends on google-auth
            from google.auth.exceptions import DefaultCredentialsError
        except ImportError as err:  # pragma: no cover - gcsfs pulls google-auth
            raise CredentialsError("gs:// needs gcsfs: pip install 'sam-k8s-trainer[gcs]'") from err
        try:
            google.auth.default()
        except DefaultCredentialsError as err:
            raise CredentialsError(
                "no Google Cloud credentials found for gs:// access. Set one of: "
                "Workload Identity on the pod's Kubernetes service account, "
                "GOOGLE_APPLICATION_CREDENTIALS=<service-account key file>, "
                f"or {GCS_TOKEN_ENV}=anon for a public bucket or an emulator "
                f"({GCS_TOKEN_ENV}=<key file path> and {GCS_TOKEN_ENV}=cloud also work). "
                f"Cause: {err}"
            ) from err
        return token
    if token == "cloud":
        return token
    if not os.path.isfile(token):
        raise CredentialsError(
            f"{GCS_TOKEN_ENV}={token!r} is neither google_default, cloud, anon, nor an existing "
            "service-account key file"
        )
    return token


def storage_options(url: str) -> dict[str, Any]:
    """fsspec keyword arguments for ``url``: the explicit credentials for cloud protocols."""
    if protocol_of(url) in _GCS_PROTOCOLS:
        return {"token": _gcs_token()}
    return {}


def check_protocol(url: str) -> dict[str, Any]:
    """Check that ``url``'s protocol is known and installed and that its credentials
    resolve; return its fsspec options. Raises :class:`StorageError` saying what to fix."""
    protocol = protocol_of(url)
    try:
        fsspec.get_filesystem_class(protocol)
    except ValueError as err:
        raise StorageError(f"unknown protocol {protocol!r} in {url!r}; use a path, file://, "
                           "gs://, s3://, memory:// or another fsspec protocol") from err
    except ImportError as err:
        raise StorageError(f"protocol {protocol!r} of {url!r} needs a package: {err}") from err
    return storage_options(url)


def url_to_fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return ``(filesystem, path inside it)`` for any supported URL or local path."""
    try:
        return fsspec.core.url_to_fs(url, **storage_options(url))
    except (ImportError, ValueError) as err:
        raise StorageError(f"cannot use storage URL {url!r}: {err}") from err


def open_url(url: str, mode: str = "rb") -> Any:
    """Open ``url`` as a file object (streaming for remote protocols)."""
    fs, path = url_to_fs(url)
    return fs.open(path, mode)


def join_url(base: str, *parts: str) -> str:
    """Join path components onto a URL or local path with ``/``."""
    out = base.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


def unstrip(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """Turn a filesystem-internal path back into a URL that :func:`url_to_fs` accepts."""
    return fs.unstrip_protocol(path)
