"""How the S3 backend speaks of the store's failures: as the OSErrors storage.py understands, and a
key or multipart upload the store no longer has as FileNotFoundError (gone, not failing)."""

from __future__ import annotations

import contextlib
import errno


def client_errors():
    import botocore.exceptions as bex
    return bex


def store_error(exc: BaseException, doing: str) -> OSError:
    """A store failure as the OSError storage.py understands; no credential ever in the text."""
    bex = client_errors()
    if isinstance(exc, OSError) and not isinstance(exc, bex.BotoCoreError):
        return exc
    if isinstance(exc, bex.ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if status == 403 or code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return OSError(errno.EACCES, f"the object store refused to {doing} ({code or status})")
        return OSError(errno.EIO, f"the object store failed to {doing} ({code or status})")
    if isinstance(exc, bex.NoCredentialsError):
        return OSError(errno.EACCES, "no AWS credentials found for the object store")
    return OSError(errno.EIO, f"the object store is unreachable ({exc.__class__.__name__}) while trying to {doing}")


def from_the_store(exc: BaseException) -> bool:
    """Whether an exception is the store's (or the network's to it), not a fault of ours: only
    those may stop this node taking work; anything else is a bug and must surface as one."""
    return isinstance(exc, OSError) or type(exc).__module__.split(".")[0] in ("botocore", "boto3", "s3transfer", "urllib3")


@contextlib.contextmanager
def missing_as_gone(what: str):
    """A key or multipart upload the store no longer has (deleted meanwhile: delivered, canceled,
    terminated, expired): FileNotFoundError, not the store failing, which would stop this node
    taking work."""
    try:
        yield
    except client_errors().ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in ("NoSuchKey", "NoSuchUpload", "404") or exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
            raise FileNotFoundError(what) from None
        raise
