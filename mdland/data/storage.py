"""The one storage layer: local paths and `s3://bucket/key` URIs through pyarrow filesystems.

S3 settings come from the standard AWS environment: `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
`AWS_SESSION_TOKEN`, `AWS_REGION` / `AWS_DEFAULT_REGION`, and `AWS_ENDPOINT_URL_S3` or `AWS_ENDPOINT_URL` for
S3-compatible servers (MinIO, Ceph, R2, moto). Writes are atomic: a reader sees the whole object or nothing.
Reads and listings go through pyarrow (Ray Data reads the same filesystem); S3 writes go through boto3, whose
multipart uploads are aborted when a write fails or is interrupted, where pyarrow's would publish what was sent.
"""

import hashlib
import io
import json
import os
import posixpath
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlparse

import pyarrow.fs as pafs


class StorageError(OSError):
    """A storage operation failed; the message names the URI and the cause."""


class NotFound(StorageError):
    """Nothing is at the URI (as opposed to it being unreadable: no access, no endpoint)."""


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def join(base: str, *parts: str) -> str:
    """Join path parts onto a local path or an s3:// URI."""
    if is_s3(base):
        return posixpath.join(base, *parts)
    return str(Path(base, *parts))


def absolute(uri: str) -> str:
    """An s3:// URI as is; a local path made absolute, so Ray workers (with another working directory) find it."""
    return uri if not uri or is_s3(uri) else str(Path(uri).absolute())


def s3_settings() -> dict:
    """S3 filesystem arguments from the AWS environment variables."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    settings: dict = {}
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"http://{endpoint}")
        settings["endpoint_override"] = parsed.netloc
        settings["scheme"] = parsed.scheme
        # A custom endpoint has no AWS region to discover; S3-compatible servers accept any.
        region = region or "us-east-1"
    if region:
        settings["region"] = region
    for arg, var in (("access_key", "AWS_ACCESS_KEY_ID"), ("secret_key", "AWS_SECRET_ACCESS_KEY"),
                     ("session_token", "AWS_SESSION_TOKEN")):
        if os.environ.get(var):
            settings[arg] = os.environ[var]
    return settings


def _settings_key() -> tuple:
    """The S3 settings as a hashable key, for the cached filesystem and client."""
    return tuple(sorted(s3_settings().items()))


@lru_cache(maxsize=8)
def _s3(settings: tuple) -> pafs.S3FileSystem:
    # Delayed open: Ray Train's small checkpoint files go up in one PUT each, not a three-request multipart upload.
    return pafs.S3FileSystem(allow_delayed_open=True, **dict(settings))


@lru_cache(maxsize=8)
def _s3_client(settings: tuple):
    import boto3
    from botocore.config import Config

    s = dict(settings)
    endpoint = f"{s['scheme']}://{s['endpoint_override']}" if "endpoint_override" in s else None
    return boto3.session.Session().client(
        "s3", endpoint_url=endpoint, region_name=s.get("region"), aws_access_key_id=s.get("access_key"),
        aws_secret_access_key=s.get("secret_key"), aws_session_token=s.get("session_token"),
        # Only the checksums S3 requires: S3-compatible servers older than S3's default CRC checksums reject them.
        config=Config(request_checksum_calculation="when_required", response_checksum_validation="when_required",
                      retries={"mode": "standard"}))


def _bucket_path(uri: str) -> str:
    # Not urlparse: '#' and '?' are legal in S3 keys, and it would cut the key at them.
    bucket, _, key = uri[len("s3://"):].partition("/")
    if not bucket:
        raise StorageError(f"{uri}: no bucket in S3 URI")
    return f"{bucket}/{key}".rstrip("/")


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path inside it) for a local path or an s3:// URI; usable by Ray Data and pyarrow."""
    if is_s3(uri):
        try:
            return _s3(_settings_key()), _bucket_path(uri)
        except (ValueError, OSError) as e:  # e.g. an access key without its secret
            raise StorageError(f"cannot use {uri}: {e} (check the AWS_* variables)") from None
    return pafs.LocalFileSystem(), str(Path(uri).absolute())


def _fail(uri: str, action: str, error: Exception) -> StorageError:
    text = str(error)
    code = text.upper().replace("_", "")
    hint = ""
    if "NOSUCHBUCKET" in code or "BUCKET DOES NOT EXIST" in code:
        hint = " (the bucket does not exist)"
    elif any(k in code for k in ("INVALIDACCESSKEYID", "SIGNATUREDOESNOTMATCH", "ACCESSDENIED", "FORBIDDEN")):
        hint = " (access denied: check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)"
    elif any(k in code for k in ("COULDN'T CONNECT", "CURLCODE: 7", "COULD NOT CONNECT")):
        hint = " (cannot reach the S3 endpoint: check AWS_ENDPOINT_URL)"
    return StorageError(f"cannot {action} {uri}{hint}: {text.splitlines()[0] if text else type(error).__name__}")


def write_bytes(uri: str, data: bytes) -> None:
    """Write `data` to `uri` atomically (local: temp file + rename; S3: the object is replaced whole or not at all)."""
    _write(uri, lambda: io.BytesIO(data))


def write_file(uri: str, local: str | os.PathLike) -> None:
    """Copy the local file `local` to `uri` as `write_bytes` writes, streamed (a ZeRO optimizer-state file of an
    SD 1.5 ControlNet is ~4 GB)."""
    _write(uri, lambda: open(local, "rb"))


def _write(uri: str, open_source) -> None:
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        if is_s3(uri):
            bucket, _, key = _bucket_path(uri).partition("/")
            with open_source() as src:
                _s3_client(_settings_key()).upload_fileobj(src, bucket, key)
            return
        path = str(Path(uri).absolute())
        parent = os.path.dirname(path)
        os.makedirs(parent, exist_ok=True)
        tmp = os.path.join(parent, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex}")
        try:
            with open_source() as src, open(tmp, "wb") as f:
                shutil.copyfileobj(src, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    except StorageError:
        raise
    except (OSError, ValueError, BotoCoreError, ClientError) as e:
        raise _fail(uri, "write", e) from e


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError as e:
        raise NotFound(f"{uri}: not found") from e
    except OSError as e:
        raise _fail(uri, "read", e) from e


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    try:
        return fs.get_file_info(path).type == pafs.FileType.File
    except OSError as e:
        raise _fail(uri, "look up", e) from e


def _entries(uri: str, kind: pafs.FileType, suffix: str, recursive: bool = False) -> list[str]:
    fs, path = filesystem(uri)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=recursive))
        if not infos and is_s3(uri) and fs.get_file_info(path.split("/")[0]).type == pafs.FileType.NotFound:
            raise StorageError(f"cannot list {uri} (the bucket does not exist)")
    except StorageError:
        raise
    except OSError as e:
        raise _fail(uri, "list", e) from e
    names = (posixpath.relpath(i.path, path) for i in infos if i.type == kind and i.path.endswith(suffix))
    return [join(uri, n) for n in sorted(n for n in names if not any(p.startswith(".") for p in n.split("/")))]


def list_files(uri: str, suffix: str = "", recursive: bool = False) -> list[str]:
    """Sorted URIs of the files directly under `uri` (a folder or prefix; with `recursive`, anywhere under it)
    ending in `suffix`.

    Hidden files (temp files of unfinished local writes) and hidden folders' files are not listed. A missing folder
    lists as empty.
    """
    return _entries(uri, pafs.FileType.File, suffix, recursive)


def list_folders(uri: str) -> list[str]:
    """Sorted URIs of the folders directly under `uri` (hidden ones left out); a missing folder lists as empty."""
    return _entries(uri, pafs.FileType.Directory, "")


def delete(uri: str) -> None:
    fs, path = filesystem(uri)
    try:
        fs.delete_file(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise _fail(uri, "delete", e) from e


def delete_folder(uri: str) -> None:
    """Delete everything under `uri` (a folder or prefix); a missing folder is fine."""
    fs, path = filesystem(uri)
    try:
        if fs.get_file_info(path).type == pafs.FileType.Directory or list_files(uri):
            fs.delete_dir(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise _fail(uri, "delete", e) from e


def _tree(uri: str, select: Callable[[list[str]], list[str]] | None = None) -> list[tuple[str, int, int]]:
    """(relative path, size, mtime) of the file at `uri` ("" for its path) or of the files under it, sorted; with
    `select`, of the relative paths it picks. Hidden files and folders (unfinished writes, ingest's staging folder)
    are not part of what is there."""
    fs, path = filesystem(uri)
    try:
        info = fs.get_file_info(path)
        infos = [info] if info.type == pafs.FileType.File else fs.get_file_info(
            pafs.FileSelector(path, recursive=True, allow_not_found=True))
    except OSError as e:
        raise _fail(uri, "look up", e) from e
    entries = sorted((i.path[len(path):].lstrip("/"), i.size, i.mtime_ns) for i in infos
                     if i.type == pafs.FileType.File
                     and not any(part.startswith(".") for part in i.path[len(path):].split("/")))
    if select is None:
        return entries
    picked = set(select([rel for rel, _, _ in entries]))
    return [e for e in entries if e[0] in picked]


def fingerprint(uri: str, select: Callable[[list[str]], list[str]] | None = None) -> str:
    """A short hash of the relative paths, sizes and modification times of the file at `uri`, or of every file under
    it (or of those `select` picks from their relative paths): it changes whenever something there is rewritten, so
    caches and plans keyed on it notice a re-export."""
    entries = [(f"/{rel}" if rel else "", size, mtime) for rel, size, mtime in _tree(uri, select)]
    if not entries:
        raise NotFound(f"{uri}: not found")
    return hashlib.sha1(json.dumps(entries).encode()).hexdigest()[:16]


def copy_to_local(uri: str, local_dir: str | os.PathLike,
                  select: Callable[[list[str]], list[str]] | None = None) -> None:
    """Copy everything under `uri` (a folder or prefix), or only the files `select` picks from their relative paths,
    into `local_dir`."""
    fs, path = filesystem(uri)
    try:
        if select is None:
            if fs.get_file_info(path).type == pafs.FileType.NotFound and not list_files(uri):
                raise NotFound(f"{uri}: not found")
            files = [""]  # the whole folder in one copy_files call
        else:
            files = [rel for rel, _, _ in _tree(uri, select)]
        Path(local_dir).mkdir(parents=True, exist_ok=True)  # copy_files makes sub-folders, not the root
        for rel in files:
            target = Path(local_dir, rel).absolute()
            target.parent.mkdir(parents=True, exist_ok=True)
            pafs.copy_files(f"{path}/{rel}" if rel else path, str(target), source_filesystem=fs,
                            destination_filesystem=pafs.LocalFileSystem())
    except StorageError:
        raise
    except OSError as e:
        raise _fail(uri, "copy", e) from e


def copy_from_local(local_dir: str | os.PathLike, uri: str) -> None:
    """Copy a local folder's contents to `uri` (a folder or prefix), file by file, each write atomic."""
    root = Path(local_dir)
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        write_file(join(uri, *path.relative_to(root).parts), path)


def _job_working_dir() -> str | None:
    """The working directory of the `ray job submit` job this process is the driver of, or None: Ray hands a job's
    driver its runtime environment in RAY_JOB_CONFIG_JSON_ENV_VAR and runs it in its copy of the working directory."""
    config = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    return (json.loads(config).get("runtime_env") or {}).get("working_dir") if config else None


def check_writable(uri: str) -> None:
    """Fail early, before any work, when `uri` (a folder) cannot be written: missing bucket, bad keys. Leaves no
    trace: a local folder the probe made is removed again, so a run that fails next leaves no empty folder."""
    # Callers may have made a relative path absolute already: what matters is where it lands.
    if not is_s3(uri) and _job_working_dir() and Path(uri).absolute().is_relative_to(Path.cwd()):
        raise StorageError(f"{uri}: a path in a Ray job's copy of --working-dir ({Path.cwd()}), which Ray deletes "
                           "with the job (and a re-run gets a new one, so nothing resumes); give an absolute path "
                           "outside it that every node can reach, or s3://")
    made = []  # local folders the probe's write creates, deepest first
    folder = None if is_s3(uri) else Path(uri).absolute()
    while folder is not None and not folder.exists():
        made.append(folder)
        folder = folder.parent
    probe = join(uri, f".mdland-probe-{uuid.uuid4().hex}")
    try:
        write_bytes(probe, b"")
        delete(probe)
    finally:
        for path in made:
            try:
                path.rmdir()
            except OSError:  # something else wrote there meanwhile, or it was never made
                pass


@contextmanager
def staged_folder(uri: str) -> Iterator[Path]:
    """A local folder for files that belong at `uri` (for tools that write paths: plots, images). A local `uri` is
    the folder itself; for s3:// a temporary folder is copied there once the block succeeds."""
    check_writable(uri)
    if not is_s3(uri):
        Path(uri).mkdir(parents=True, exist_ok=True)
        yield Path(uri)
        return
    with tempfile.TemporaryDirectory() as d:
        yield Path(d)
        copy_from_local(d, uri)
