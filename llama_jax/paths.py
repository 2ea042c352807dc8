"""One path type for every path a user gives: local files and `gs://` objects alike.

Run directories, data files and globs, tokenizers, checkpoints and the
converters' inputs and outputs all go through `user_path`, which returns an
`etils.epath.Path` (the path type orbax uses): a local path made absolute, or a
`gs://bucket/...` URL left as it is (pathlib's `Path("gs://b").absolute()`
would turn it into a local folder named `gs:`). epath reaches Cloud Storage
through gcsfs; orbax's arrays go through tensorstore's own GCS driver.

Cloud Storage has no directories (a prefix exists once an object is under it)
and no append or atomic rename: writers here rewrite whole objects, which GCS
makes visible only when complete. Failures are turned into one line naming
the path and the fix (`storage_error`): a bucket that does not exist, no
credentials, permission denied, storage that does not answer. The first contact
with a bucket (`check_bucket`) is bounded by FIRST_CONTACT_TIMEOUT: gcsfs would
otherwise retry an unreachable endpoint for over a minute.
"""

from __future__ import annotations

import glob as local_glob
import os

import fsspec.asyn
import fsspec.config
from etils import epath

from llama_jax.cli import first_line

URL_PREFIXES = ("gs://",)
CREDENTIALS_HELP = ("run `gcloud auth application-default login`, or set GOOGLE_APPLICATION_CREDENTIALS "
                    "to a service account key file (a TPU VM uses its service account)")
# Seconds for a bucket's first answer: a few round trips (token, bucket metadata) on a
# TPU VM, and far less than gcsfs's six retries with back-off (~70 s) of a dead endpoint.
FIRST_CONTACT_TIMEOUT = 10.0

# tensorstore (orbax's arrays) and the other hosts write behind gcsfs's back:
# a cached listing could miss a step they saved, so listings are never cached.
fsspec.config.conf.setdefault("gs", {}).setdefault("use_listings_cache", False)


class StorageError(OSError):
    """A Cloud Storage path that cannot be used as it stands (one-line message)."""


def is_url(path) -> bool:
    """Whether `path` names an object store (gs://...) rather than a local file."""
    return str(path).startswith(URL_PREFIXES)


def user_path(path: str | os.PathLike) -> epath.Path:
    """`path` as an epath.Path: local paths absolute, `gs://` URLs unchanged."""
    if is_url(path):
        return epath.Path(str(path))
    return epath.Path(os.path.abspath(os.fspath(path)))


def bucket_of(path) -> str:
    """The bucket name of a gs:// path."""
    return str(path)[len("gs://"):].split("/", 1)[0]


def _fs():
    import fsspec
    return fsspec.filesystem("gs")  # the instance epath uses


def _endpoint() -> str:
    """The Cloud Storage endpoint gcsfs talks to: the emulator's when STORAGE_EMULATOR_HOST is set."""
    return os.environ.get("STORAGE_EMULATOR_HOST") or "storage.googleapis.com"


def check_credentials(path) -> None:
    """StorageError if a gs:// path would be read without any Google credentials.

    The emulator (STORAGE_EMULATOR_HOST) needs none; elsewhere the clients would
    fall back to anonymous requests, which fail later with less helpful errors.
    """
    if not is_url(path) or os.environ.get("STORAGE_EMULATOR_HOST"):
        return
    import google.auth
    from google.auth.exceptions import DefaultCredentialsError
    try:
        google.auth.default()
    except DefaultCredentialsError:
        raise StorageError(f"{path}: no Google Cloud credentials found; {CREDENTIALS_HELP}") from None


def check_bucket(path) -> None:
    """StorageError (one line) unless the bucket of a gs:// path exists and answers us.

    Local paths pass unchecked."""
    if not is_url(path):
        return
    check_credentials(path)
    bucket = bucket_of(path)
    fs = _fs()
    try:  # sync's timeout cancels the request and its retries
        found = fsspec.asyn.sync(fs.loop, fs._exists, bucket, timeout=FIRST_CONTACT_TIMEOUT)
    except fsspec.asyn.FSTimeoutError:
        raise StorageError(f"{path}: bucket gs://{bucket} not reached in {FIRST_CONTACT_TIMEOUT:g} s ({_endpoint()}); "
                           "check the network, credentials (gcloud auth application-default login) "
                           "or STORAGE_EMULATOR_HOST") from None
    except Exception as err:
        raise storage_error(err, path) from None
    if not found:
        raise StorageError(f"{path}: bucket gs://{bucket} does not exist; create it "
                           f"(gcloud storage buckets create gs://{bucket}) or fix the path")


def storage_error(err: BaseException, path) -> OSError:
    """A one-line OSError for a failure reading or writing `path` (the fix named where known)."""
    text, first = str(err), first_line(err)
    if is_url(path):
        from google.auth.exceptions import DefaultCredentialsError
        if isinstance(err, DefaultCredentialsError):
            return StorageError(f"{path}: no Google Cloud credentials found; {CREDENTIALS_HELP}")
        if text.startswith("Forbidden") or "403" in first or "does not have storage" in text:
            return StorageError(f"{path}: permission denied by Cloud Storage; grant this account "
                                "roles/storage.objectAdmin on the bucket (or use another bucket)")
        if "401" in first or "Unauthorized" in text or "Invalid Credentials" in text:
            return StorageError(f"{path}: Cloud Storage refused the credentials; {CREDENTIALS_HELP}")
    if isinstance(err, OSError) and err.strerror:
        return StorageError(err.errno, err.strerror, str(path))
    return StorageError(f"{path}: {first}")


def ensure_dir(path) -> epath.Path:
    """Create directory `path` (and parents) if local; check the bucket if gs://.

    Returns the epath.Path. Raises StorageError (one line) when it cannot be used.
    """
    path = user_path(path)
    if is_url(path):
        check_bucket(path)
        return path  # a prefix needs no creating
    path.mkdir(parents=True, exist_ok=True)
    return path


def has_magic(pattern: str) -> bool:
    return local_glob.has_magic(str(pattern))


def expand_glob(pattern: str) -> list[epath.Path]:
    """The files matching a glob (`**` allowed), sorted; local or gs://."""
    if not is_url(pattern):
        return sorted(user_path(p) for p in local_glob.glob(os.fspath(pattern), recursive=True)
                      if os.path.isfile(p))
    fs = _fs()
    return sorted(epath.Path("gs://" + p) for p in fs.glob(str(pattern)) if fs.isfile(p))


def open_ranged(path):
    """A binary file object for seek-and-read of parts of `path` (local or gs://).

    On gs:// each read is a ranged GET with a small read-ahead, never the whole
    object (gcsfs's "readahead" cache: reads here are short and mostly forward).
    """
    path = user_path(path)
    if not is_url(path):
        return path.open("rb")
    return _fs().open(str(path), "rb", cache_type="readahead")


def copy_tree(source, destination) -> None:
    """Copy every file under local directory `source` to `destination` (local or gs://),
    at the same relative paths, streaming each file. StorageError (one line) on failure."""
    import shutil

    destination = user_path(destination)
    files = sorted(os.path.join(folder, name) for folder, _, names in os.walk(source) for name in names)
    for file in files:
        target = destination / os.path.relpath(file, source)
        try:
            if not is_url(target):
                target.parent.mkdir(parents=True, exist_ok=True)
            with open(file, "rb") as reader, target.open("wb") as writer:
                shutil.copyfileobj(reader, writer)
        except Exception as err:
            raise storage_error(err, target) from None


def remove_tree(path) -> None:
    """Delete a directory (or prefix) and everything under it; nothing if it is absent."""
    path = user_path(path)
    if path.exists():
        path.rmtree()
