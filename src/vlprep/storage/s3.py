"""``s3://`` (AWS S3, MinIO and other S3-compatible stores) through boto3.

The endpoint is ``VLPREP_S3_ENDPOINT``, else ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` (e.g. KFP's
MinIO, ``http://minio-service.kubeflow:9000``), else AWS itself; credentials come the standard AWS way
(``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``, a web identity role). With an
endpoint of its own, buckets are addressed by path (MinIO's default) and checksums are sent only where the
API requires them (older S3-compatible servers reject the newer checksum headers).

An object appears only when its upload completes: a small one is one PUT; a larger one is a multipart
upload, whose parts stay invisible until it completes, aborted when the write fails. (A killed process
leaves an incomplete multipart upload: invisible, but it holds space until a bucket lifecycle rule that
aborts incomplete multipart uploads removes it.) Reads are ranged GETs pinned to the object's ETag
(:mod:`.ranged`). Every request has a timeout, botocore's standard retry, and backoff on top while the store
stays unavailable, bounded by the storage deadline (:func:`_call`, :mod:`.limits`).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import time
from collections.abc import Iterator
from typing import BinaryIO

from vlprep import VlprepError

from . import limits, ranged, uris

BOTOCORE_ATTEMPTS = 2  # botocore's own quick retry (a dropped keep-alive connection); _call retries on top
_UNAVAILABLE = ("SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "Throttling")
_clients: dict[int, object] = {}  # by attempts: the retrying one, and a single-try one for best-effort aborts
_checked_buckets: set[str] = set()


def reset() -> None:
    _clients.clear()
    _checked_buckets.clear()


def endpoint() -> str | None:
    """The S3 endpoint URL, when it is not AWS's own."""
    for name in ("VLPREP_S3_ENDPOINT", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        if os.environ.get(name, "").strip():
            return os.environ[name].strip()
    return None


def _s3_client(attempts: int = BOTOCORE_ATTEMPTS):
    if attempts not in _clients:
        import boto3
        from botocore.config import Config

        t = limits.attempt_timeout()
        custom = endpoint()
        checksums = "when_required" if custom else "when_supported"
        config = Config(
            connect_timeout=t, read_timeout=t, retries={"total_max_attempts": attempts, "mode": "standard"},
            s3={"addressing_style": "path"} if custom else None,
            request_checksum_calculation=checksums, response_checksum_validation=checksums,
        )
        # "Found credentials in environment variables" on every client is noise beside our own log lines
        logging.getLogger("botocore.credentials").setLevel(logging.WARNING)
        _clients[attempts] = boto3.session.Session().client("s3", endpoint_url=custom, config=config)
    return _clients[attempts]


def _client_error(uri: str, e) -> VlprepError:
    code = str(e.response.get("Error", {}).get("Code", ""))
    status = int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
    bucket = uris.split(uri)[0]
    if status >= 500 or status == 429 or code in _UNAVAILABLE:
        return limits.unreachable(uri, e)
    if code == "NoSuchBucket":
        return VlprepError(f"{uri}: bucket s3://{bucket} does not exist; create it or fix the URI")
    if status == 403 or code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken"):
        return VlprepError(
            f"{uri}: access to bucket s3://{bucket} is denied ({code}) by {endpoint() or 'AWS'}; check the "
            "credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or the role) and VLPREP_S3_ENDPOINT, and grant "
            "them s3:GetObject, s3:PutObject, s3:DeleteObject, s3:ListBucket and s3:AbortMultipartUpload on it"
        )
    if status == 412 or code == "PreconditionFailed":
        return VlprepError(f"{uri}: the object was replaced while it was being read; rerun")
    return VlprepError(f"{uri}: the S3 service refused the request ({limits.cause(e)})")


@contextlib.contextmanager
def _translated(uri: str) -> Iterator[None]:
    """botocore's failures as one VlprepError; anything else (the caller's own errors) passes."""
    from botocore import exceptions as bexc

    try:
        yield
    except bexc.ClientError as e:
        raise _client_error(uri, e) from None
    except (bexc.NoCredentialsError, bexc.PartialCredentialsError, bexc.CredentialRetrievalError):
        raise VlprepError(
            f"{uri}: no S3 credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (for MinIO, its "
            "access and secret key), AWS_PROFILE, or use a web identity role"
        ) from None
    except (bexc.ConnectionError, bexc.HTTPClientError, bexc.IncompleteReadError) as e:
        raise limits.unreachable(uri, e) from None


def _unavailable(e: Exception) -> bool:
    """Whether a failure says the store is unavailable for now (worth retrying) rather than refusing."""
    from botocore import exceptions as bexc

    if isinstance(e, bexc.ClientError):
        status = int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        return status >= 500 or status == 429 or e.response.get("Error", {}).get("Code") in _UNAVAILABLE
    return isinstance(e, (bexc.ConnectionError, bexc.HTTPClientError))


def _call(operation: str, **params) -> dict:
    """One S3 request. botocore retries once at once; while the store stays unavailable (refused, 5xx,
    timing out), more attempts follow with exponential backoff, each started only if it can end before
    the storage deadline. Callers translate what is left (:func:`_translated`)."""
    give_up = time.monotonic() + limits.deadline()
    longest_attempt = BOTOCORE_ATTEMPTS * limits.attempt_timeout()
    delay = 0.5
    while True:
        try:
            return getattr(_s3_client(), operation)(**params)
        except Exception as e:
            if not _unavailable(e) or time.monotonic() + delay + longest_attempt > give_up:
                raise
        time.sleep(delay)
        delay = min(2 * delay, 8.0)


def _is_missing(e) -> bool:
    return e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound", "NoSuchBucket")


def _bucket(uri: str) -> tuple[str, str]:
    from botocore.exceptions import ClientError

    bucket, key = uris.split(uri)
    if bucket not in _checked_buckets:
        with _translated(uri):
            try:
                _call("head_bucket", Bucket=bucket)
            except ClientError as e:
                if _is_missing(e):
                    raise VlprepError(f"{uri}: bucket s3://{bucket} does not exist; create it or fix the URI") from None
                raise
        _checked_buckets.add(bucket)
    return bucket, key


def _object(uri: str) -> tuple[str, str]:
    bucket, key = _bucket(uri)
    if not key:
        raise VlprepError(f"{uri}: names a bucket, not an object")
    return bucket, key


def _head(uri: str) -> dict | None:
    """The object's metadata, or None when there is no such object."""
    from botocore.exceptions import ClientError

    bucket, key = _object(uri)
    with _translated(uri):
        try:
            return _call("head_object", Bucket=bucket, Key=key)
        except ClientError as e:
            if _is_missing(e):
                return None
            raise


def _fetcher(uri: str, head: dict):
    """``fetch(start, n)`` for :mod:`.ranged`: ranged GETs of the version the read started with (its ETag),
    each retried as :func:`_call` does; a body cut off midway (which botocore does not retry) is fetched again."""
    from botocore import exceptions as bexc

    bucket, key = uris.split(uri)

    def fetch(start: int, n: int) -> bytes:
        give_up, delay = time.monotonic() + limits.deadline(), 0.5
        while True:
            with _translated(uri):
                body = _call("get_object", Bucket=bucket, Key=key, IfMatch=head["ETag"],
                             Range=f"bytes={start}-{start + n - 1}")["Body"]
            try:
                return body.read()
            except (bexc.HTTPClientError, bexc.IncompleteReadError) as e:
                if time.monotonic() + delay > give_up:
                    raise limits.unreachable(uri, e) from None
                time.sleep(delay)
                delay *= 2

    return fetch


def open_read(uri: str) -> BinaryIO:
    head = _head(uri)
    if head is None:
        raise FileNotFoundError(f"{uri}: no such object")
    return ranged.open_ranged(uri, int(head["ContentLength"]), _fetcher(uri, head))


def exists(uri: str) -> bool:
    return bool(uris.split(uri)[1]) and _head(uri) is not None


def size(uri: str) -> int:
    head = _head(uri)
    if head is None:
        raise FileNotFoundError(f"{uri}: no such object")
    return int(head["ContentLength"])


def list_prefix(uri: str) -> list[str]:
    bucket, key = _bucket(uri)
    keys, page = [], {"IsTruncated": True}
    with _translated(uri):
        while page.get("IsTruncated"):
            more = {"ContinuationToken": page["NextContinuationToken"]} if "NextContinuationToken" in page else {}
            page = _call("list_objects_v2", Bucket=bucket, Prefix=key, **more)
            keys += [o["Key"] for o in page.get("Contents", [])]
    return sorted(f"s3://{bucket}/{k}" for k in keys if uris.under(k, key))


class _Writer(io.BufferedIOBase):
    """Collects writes into parts of ``limits.CHUNK`` bytes; nothing is visible until :meth:`commit`."""

    def __init__(self, uri: str):
        super().__init__()
        self._bucket, self._key = _object(uri)
        self._buffer, self._parts, self._upload_id = bytearray(), [], None

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        view = memoryview(data)
        self._buffer += view
        while len(self._buffer) >= limits.CHUNK:
            self._send_part(bytes(self._buffer[: limits.CHUNK]))
            del self._buffer[: limits.CHUNK]
        return view.nbytes

    def _send_part(self, data: bytes) -> None:
        where = {"Bucket": self._bucket, "Key": self._key}
        if self._upload_id is None:
            self._upload_id = _call("create_multipart_upload", **where)["UploadId"]
        number = len(self._parts) + 1
        etag = _call("upload_part", **where, UploadId=self._upload_id, PartNumber=number, Body=data)["ETag"]
        self._parts.append({"ETag": etag, "PartNumber": number})

    def commit(self) -> None:
        """Publish the object: one PUT, or the last part and the multipart upload's completion."""
        where = {"Bucket": self._bucket, "Key": self._key}
        if self._upload_id is None:
            _call("put_object", **where, Body=bytes(self._buffer))
        else:
            if self._buffer:
                self._send_part(bytes(self._buffer))
            _call("complete_multipart_upload", **where, UploadId=self._upload_id,
                  MultipartUpload={"Parts": self._parts})
        self._buffer = bytearray()

    def abort(self) -> None:
        """Abort the multipart upload (its parts are dropped): one try, quietly, since the failure that
        brought us here is likely to fail this too, and the upload is invisible either way."""
        if self._upload_id is not None:
            with contextlib.suppress(Exception):
                _s3_client(attempts=1).abort_multipart_upload(Bucket=self._bucket, Key=self._key,
                                                              UploadId=self._upload_id)


@contextlib.contextmanager
def open_write(uri: str) -> Iterator[BinaryIO]:
    writer = _Writer(uri)
    try:
        with _translated(uri):
            yield writer
            writer.commit()
    except BaseException:
        writer.abort()
        raise


def delete(uri: str) -> None:
    """Delete each object under the prefix, one request each (the batch call needs a Content-MD5 header
    that current botocore no longer sends, which older S3-compatible servers then refuse)."""
    bucket, _ = _bucket(uri)
    for item in list_prefix(uri):
        with _translated(item):
            _call("delete_object", Bucket=bucket, Key=uris.split(item)[1])  # missing is not an error in S3
