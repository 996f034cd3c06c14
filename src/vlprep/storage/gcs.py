"""``gs://`` through google-cloud-storage (``STORAGE_EMULATOR_HOST`` is honoured by the library itself).

Writes are resumable uploads: an object exists only once its last chunk is finalized; an upload that fails
is cancelled, so it never appears. Reads are ranged downloads pinned to the object's generation. Every
call carries a retry policy bounded by the storage deadline and a per-request timeout (:mod:`.limits`), and
the library's failures end in one :class:`VlprepError`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import BinaryIO

from vlprep import VlprepError

from . import limits, ranged, uris

_client = None
_checked_buckets: set[str] = set()


def reset() -> None:
    global _client
    _client = None
    _checked_buckets.clear()


def _gcs_client():
    global _client
    if _client is None:
        from google.auth.exceptions import DefaultCredentialsError
        from google.cloud import storage as gcs

        try:
            _client = gcs.Client()
        except DefaultCredentialsError as e:
            raise VlprepError(
                "no Google Cloud credentials found: run `gcloud auth application-default login`, "
                "set GOOGLE_APPLICATION_CREDENTIALS, or use workload identity on GKE "
                f"({e.__class__.__name__})"
            ) from None
    return _client


def _retry():
    """The library's default retry (5xx, 429, connection errors, timeouts), ending before the deadline."""
    from google.cloud.storage.retry import DEFAULT_RETRY

    budget = max(limits.deadline() - limits.attempt_timeout(), 0.5)
    return DEFAULT_RETRY.with_timeout(budget).with_delay(initial=0.5, maximum=8.0, multiplier=2.0)


def _bounded() -> dict:
    """Keyword arguments every call takes: the retry policy and the (connect, read) timeout of one request."""
    t = limits.attempt_timeout()
    return {"retry": _retry(), "timeout": (t, t)}


@contextlib.contextmanager
def _translated(uri: str) -> Iterator[None]:
    """The library's failures as one VlprepError; anything else (the caller's own errors) passes."""
    import requests
    from google.api_core import exceptions as gexc
    from google.auth import exceptions as auth_exc
    from google.cloud.storage.exceptions import InvalidResponse

    try:
        yield
    except gexc.RetryError as e:
        raise limits.unreachable(uri, e.cause or e) from None
    except gexc.Forbidden:
        raise VlprepError(
            f"{uri}: access to bucket gs://{uris.split(uri)[0]} is forbidden; grant the service account "
            "roles/storage.objectAdmin on it"
        ) from None
    except gexc.GoogleAPICallError as e:
        if e.code is None or e.code >= 500 or e.code == 429:
            raise limits.unreachable(uri, e) from None
        raise VlprepError(f"{uri}: Cloud Storage refused the request ({limits.cause(e)})") from None
    except (requests.exceptions.RequestException, auth_exc.TransportError, InvalidResponse) as e:
        raise limits.unreachable(uri, e) from None


def _bucket(uri: str):
    name, key = uris.split(uri)
    bucket = _gcs_client().bucket(name)
    if name not in _checked_buckets:
        with _translated(uri):
            found = bucket.exists(**_bounded())
        if not found:
            raise VlprepError(f"{uri}: bucket gs://{name} does not exist; create it or fix the URI")
        _checked_buckets.add(name)
    return bucket, key


def _blob(uri: str):
    bucket, key = _bucket(uri)
    if not key:
        raise VlprepError(f"{uri}: names a bucket, not an object")
    return bucket.blob(key, chunk_size=limits.CHUNK)


def open_read(uri: str) -> BinaryIO:
    """Ranged downloads (:mod:`.ranged`) of the generation the read started with; each is retried, a body
    cut off midway included. (A blob made afresh also downloads through the client's endpoint, not through
    the ``mediaLink`` an emulator may report.)"""
    from google.api_core import exceptions as gexc

    blob = _blob(uri)
    with _translated(uri):
        try:
            blob.reload(**_bounded())
        except gexc.NotFound:
            raise FileNotFoundError(f"{uri}: no such object") from None
    version = blob.bucket.blob(blob.name, generation=blob.generation)

    def fetch(start: int, n: int) -> bytes:
        with _translated(uri):
            try:
                return version.download_as_bytes(start=start, end=start + n - 1, checksum=None, **_bounded())
            except gexc.NotFound:
                raise VlprepError(f"{uri}: the object was replaced while it was being read; rerun") from None

    return ranged.open_ranged(uri, int(blob.size or 0), fetch)


def exists(uri: str) -> bool:
    bucket, key = _bucket(uri)
    with _translated(uri):
        return bool(key) and bucket.blob(key).exists(**_bounded())


def size(uri: str) -> int:
    from google.api_core import exceptions as gexc

    blob = _blob(uri)
    with _translated(uri):
        try:
            blob.reload(**_bounded())
        except gexc.NotFound:
            raise FileNotFoundError(f"{uri}: no such object") from None
    return int(blob.size)


def list_prefix(uri: str) -> list[str]:
    bucket, key = _bucket(uri)
    with _translated(uri):
        names = [b.name for b in _gcs_client().list_blobs(bucket.name, prefix=key, **_bounded())]
    return sorted(f"gs://{bucket.name}/{n}" for n in names if uris.under(n, key))


@contextlib.contextmanager
def open_write(uri: str) -> Iterator[BinaryIO]:
    from google.cloud.storage.fileio import BlobWriter

    writer = BlobWriter(_blob(uri), chunk_size=limits.CHUNK, ignore_flush=True, **_bounded())
    try:
        with _translated(uri):
            yield writer
            writer.close()  # sends the last chunk: the object appears now, whole
    except BaseException:
        _cancel(writer)
        raise


def _cancel(writer) -> None:
    """Cancel a failed resumable upload, within one request timeout and quietly: an upload that is never
    finalized never appears (the service drops it after a week), so a store that does not answer must
    not hold the caller here as the library's own ``terminate`` would (no timeout)."""
    started = writer._upload_and_transport
    if started:
        upload, transport = started
        with contextlib.suppress(Exception):
            transport.delete(upload.upload_url, timeout=limits.attempt_timeout())


def delete(uri: str) -> None:
    from google.api_core import exceptions as gexc

    bucket, _ = _bucket(uri)
    for item in list_prefix(uri):
        with _translated(item), contextlib.suppress(gexc.NotFound):  # gone meanwhile: what we wanted
            bucket.blob(uris.split(item)[1]).delete(**_bounded())
