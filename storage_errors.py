"""How storage errors are told apart: bad input (a missing object or bucket, refused credentials,
an untrusted certificate: exit 2) or transient (everything else: exit 75), with a message that
names the object and what to check (the node's clock, TLS_CA_BUNDLE, the credentials).
Imports: utils.
"""

from __future__ import annotations

import contextlib
import datetime as dt

from utils import BadInput, TransientError

_NOT_FOUND = {"NoSuchKey", "404", "NotFound"}
_REFUSED = {"AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch", "NoSuchBucket",
            "AllAccessDisabled", "InvalidBucketName", "401", "Unauthorized"}
_CLOCK_SKEW = {"RequestTimeTooSkewed"}


def clock_skew(response: dict) -> float | None:
    """Seconds the storage server's clock (its Date header) is ahead of this node's, when the gap is
    past what S3 tolerates (15 minutes); None otherwise. A HEAD has no error body, so its plain 403
    can only be told from refused credentials this way."""
    from email.utils import parsedate_to_datetime

    date = response.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
    try:
        skew = (parsedate_to_datetime(date) - dt.datetime.now(dt.timezone.utc)).total_seconds()
    except (TypeError, ValueError):
        return None
    return skew if abs(skew) > 15 * 60 else None


def certificate_refused(error: BaseException) -> bool:
    """True when a TLS error is a failed certificate verification (bad configuration), not a
    handshake that was reset or cut short (transient). Looks through the wrapped errors."""
    import ssl

    seen: list[BaseException] = []
    while error is not None and error not in seen and len(seen) < 10:
        seen.append(error)
        if isinstance(error, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY_FAILED" in str(error):
            return True
        kwargs = getattr(error, "kwargs", None)  # botocore keeps the original error there
        wrapped = kwargs.get("error") if isinstance(kwargs, dict) else None
        error = wrapped if isinstance(wrapped, BaseException) else error.__cause__ or error.__context__
    return False


class StorageNotFound(BadInput):
    """The object or prefix does not exist."""


@contextlib.contextmanager
def classified(action: str, where: str, endpoint: str | None):
    """Turn boto3 errors met while trying to `action` the object at `where` into BadInput (missing,
    refused, an untrusted certificate) or TransientError (everything else)."""
    from boto3.exceptions import (
        RetriesExceededError,
        S3TransferFailedError,
        S3UploadFailedError,
    )
    from botocore.exceptions import BotoCoreError, ClientError, SSLError
    from s3transfer.exceptions import RetriesExceededError as PartRetriesExceeded
    from s3transfer.exceptions import S3DownloadFailedError

    try:
        yield
    except (ClientError, S3UploadFailedError) as e:
        # upload_file wraps the ClientError that says what went wrong
        error = e if isinstance(e, ClientError) else e.__context__
        response = error.response if isinstance(error, ClientError) else {}
        code = str(response.get("Error", {}).get("Code", ""))
        status = str(response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
        if code in _NOT_FOUND or (status == "404" and code != "NoSuchBucket"):
            raise StorageNotFound(f"{where} does not exist") from None
        skew = clock_skew(response)
        if code in _CLOCK_SKEW or (status == "403" and skew):  # the node's fault: NTP or another node fixes it
            clock = (f"is {abs(skew) / 60:.0f} minutes {'behind' if skew > 0 else 'ahead of'}" if skew
                     else "differs from")
            raise TransientError(f"storage refused to {action} {where}: {code or status}: this node's clock "
                                 f"{clock} the storage server's, more than it allows (15 minutes on S3); "
                                 "check the node's time synchronisation (NTP)") from None
        if code in _REFUSED or status in ("401", "403"):
            raise BadInput(f"storage refused to {action} {where}: {code or status} "
                           "(check the bucket name and the storage credentials)") from None
        raise TransientError(f"storage failed to {action} {where}: {code or status or e}") from None
    except SSLError as e:
        endpoint = endpoint or "the storage endpoint"
        if certificate_refused(e):
            raise BadInput(f"the TLS certificate of {endpoint} is not trusted (set TLS_CA_BUNDLE to its "
                           "CA)") from None
        # a handshake reset or cut short (a restarting proxy, a load balancer): worth a retry
        raise TransientError(f"TLS handshake with {endpoint} failed while trying to {action} "
                             f"{where}: {e}") from None
    except BotoCoreError as e:
        raise TransientError(f"storage unreachable while trying to {action} {where}: {e}") from None
    except (S3DownloadFailedError, RetriesExceededError, PartRetriesExceeded, S3TransferFailedError) as e:
        # boto3's transfers: a part that failed every retry, an object that changed while downloading
        raise TransientError(f"storage failed to {action} {where}: {e}") from None
