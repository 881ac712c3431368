"""Local and gs:// paths through pyarrow filesystems, Beam-free (used by the CLI, readers and the model).

`STORAGE_EMULATOR_HOST` (the GCS emulator convention) points gs:// at an emulator, anonymously.
Model directories named by URI are copied once into a local cache (`POPCAST_CACHE_DIR`, default
~/.cache/popcast; model copies and exported graphs under its models/, or `POPCAST_MODEL_CACHE`).
"""
from __future__ import annotations

import hashlib
import os
import posixpath
import shutil
import tempfile
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlparse

import pyarrow.fs as pafs

__all__ = ["scheme_of", "local_path", "filesystem_and_path", "join", "exists", "read_bytes", "write_bytes",
           "cache_dir", "model_cache_dir", "download_model_dir", "local_model_dir", "gcs_filesystem", "unreachable",
           "within_roots", "GCS_RETRY_SECONDS"]


def scheme_of(uri: str) -> str:
    parsed = urlparse(uri)
    # A Windows drive letter or a bare path has no scheme worth the name.
    return parsed.scheme if len(parsed.scheme) > 1 else ""


def local_path(uri: str) -> str:
    return urlparse(uri).path if scheme_of(uri) == "file" else uri


# GCS calls give up after this long (retries included): without credentials or with an unreachable endpoint
# the default retry policy would wait for many minutes without a word.
GCS_RETRY_SECONDS = 20.0   # POPCAST_GCS_RETRY_SECONDS overrides it
GCS_HELP = ("set GOOGLE_APPLICATION_CREDENTIALS to a service-account key file (or run `gcloud auth "
            "application-default login`); for an emulator set STORAGE_EMULATOR_HOST=http://HOST:PORT")


def gcs_filesystem() -> pafs.FileSystem:
    retry = timedelta(seconds=float(os.environ.get("POPCAST_GCS_RETRY_SECONDS", GCS_RETRY_SECONDS)))
    emulator = os.environ.get("STORAGE_EMULATOR_HOST")
    if emulator:
        parsed = urlparse(emulator if "://" in emulator else f"http://{emulator}")
        return pafs.GcsFileSystem(anonymous=True, endpoint_override=parsed.netloc,
                                  scheme=parsed.scheme or "http", retry_time_limit=retry)
    return pafs.GcsFileSystem(retry_time_limit=retry)


def unreachable(uri: str) -> str | None:
    """Why an object-store URI cannot be reached (credentials, endpoint), in one line with what to set;
    None when it can (whether or not the object exists). Bounded by GCS_RETRY_SECONDS."""
    if scheme_of(uri) != "gs":
        return None
    fs, path = filesystem_and_path(uri)
    try:
        fs.get_file_info(path)
    except OSError as err:
        first = " ".join(str(err).split())[:240]
        return f"cannot reach {uri} ({first}); {GCS_HELP}"
    return None


def filesystem_and_path(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path, file:// or gs:// URI."""
    scheme = scheme_of(uri)
    if scheme == "gs":
        parsed = urlparse(uri)
        return gcs_filesystem(), f"{parsed.netloc}{parsed.path}".rstrip("/")
    if scheme in ("", "file"):
        return pafs.LocalFileSystem(), os.path.abspath(local_path(uri))
    raise ValueError(f"unsupported URI scheme {scheme!r} in {uri!r} (use a local path, file:// or gs://)")


def join(base: str, *parts: str) -> str:
    if scheme_of(base) in ("gs",):
        return "/".join([base.rstrip("/"), *[p.strip("/") for p in parts]])
    return os.path.join(local_path(base), *parts)


def exists(uri: str) -> bool:
    fs, path = filesystem_and_path(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem_and_path(uri)
    with fs.open_input_stream(path) as stream:
        return stream.read()


def write_bytes(uri: str, data: bytes) -> None:
    fs, path = filesystem_and_path(uri)
    parent = path.rsplit("/", 1)[0]
    fs.create_dir(parent, recursive=True)
    with fs.open_output_stream(path) as stream:
        stream.write(data)


def cache_dir() -> Path:
    """popcast's local cache root: $POPCAST_CACHE_DIR or ~/.cache/popcast."""
    return Path(os.environ.get("POPCAST_CACHE_DIR", Path.home() / ".cache" / "popcast"))


def model_cache_dir() -> Path:
    """Where model directories and exported model graphs are cached: $POPCAST_MODEL_CACHE, else
    cache_dir()/models."""
    override = os.environ.get("POPCAST_MODEL_CACHE")
    return Path(override) if override else cache_dir() / "models"


_COMPLETE = ".complete"


def download_model_dir(uri: str, cache_root: Path | None = None) -> Path:
    """A local copy of every file under a model directory URI (gs://, file://), made once and reused.

    The copy is keyed by the URI. It is written into a staging directory that is renamed into place
    with a `.complete` marker inside, so concurrent workers never see half a model and an interrupted
    copy is redone rather than half-used.
    """
    import pyarrow.fs as pafs

    target = Path(cache_root or model_cache_dir()) / hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:16]
    if (target / _COMPLETE).exists():
        return target
    fs, root = filesystem_and_path(uri)
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    files = [info for info in infos if info.type == pafs.FileType.File]
    if not files:
        raise FileNotFoundError(f"no files under model directory {uri!r}")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".model-", dir=target.parent))
    try:
        for info in files:
            destination = staging / info.path[len(root):].lstrip("/")
            destination.parent.mkdir(parents=True, exist_ok=True)
            with fs.open_input_stream(info.path) as source, open(destination, "wb") as sink:
                shutil.copyfileobj(source, sink, length=8 << 20)
        (staging / _COMPLETE).write_text(uri)
        shutil.rmtree(target, ignore_errors=True)   # an interrupted copy from an older version
        try:
            os.replace(staging, target)
        except OSError:   # another worker finished first; its copy is the same model
            if not (target / _COMPLETE).exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def local_model_dir(source: str | os.PathLike, cache_root: Path | None = None) -> str:
    """What `from_pretrained` can load for a configured model source: a local directory or file:// URI as
    is, a gs:// directory as a local copy (download_model_dir), anything without a scheme that is not a
    directory as a Hugging Face hub id (it loads only from the local hub cache when offline)."""
    text = os.fspath(source)
    scheme = scheme_of(text)
    if scheme == "gs":
        return str(download_model_dir(text, cache_root))
    local = local_path(text)
    if scheme == "file" or os.path.isdir(local):
        if not os.path.isdir(local):
            raise FileNotFoundError(f"model directory {local!r} does not exist")
        return local
    if scheme:
        raise ValueError(f"unsupported model source scheme {scheme!r} in {text!r} (use a directory, file:// or gs://)")
    return text


def within_roots(uri: str, roots: tuple[str, ...] | list[str]) -> bool:
    """Whether `uri` lies under one of `roots` (local directories, file:// or gs://bucket/prefix) once `..`
    segments and, for local paths, symlinks are resolved. A root matches whole path segments only:
    /data/media does not contain /data/media2/x.mp4."""
    scheme = scheme_of(uri)
    for root in roots:
        if scheme_of(root) == "gs" and scheme == "gs":
            if _under(_gcs_key(uri), _gcs_key(root)):
                return True
        elif scheme_of(root) in ("", "file") and scheme in ("", "file"):
            if _under(os.path.realpath(local_path(uri)), os.path.realpath(local_path(root))):
                return True
    return False


def _gcs_key(uri: str) -> str:
    parsed = urlparse(uri)
    return "/" + parsed.netloc + posixpath.normpath("/" + parsed.path.lstrip("/")).rstrip("/")


def _under(path: str, root: str) -> bool:
    root = root.rstrip("/") or "/"
    return path == root or path.startswith(root + "/") or root == "/"
