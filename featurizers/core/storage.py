"""Local and gs:// paths through pyarrow filesystems, Beam-free (used by the CLI, readers and the model).

`STORAGE_EMULATOR_HOST` (the GCS emulator convention) points gs:// at an emulator, anonymously.
"""
from __future__ import annotations

import os
from urllib.parse import urlparse

import pyarrow.fs as pafs


def scheme_of(uri: str) -> str:
    parsed = urlparse(uri)
    # A Windows drive letter or a bare path has no scheme worth the name.
    return parsed.scheme if len(parsed.scheme) > 1 else ""


def local_path(uri: str) -> str:
    return urlparse(uri).path if scheme_of(uri) == "file" else uri


def gcs_filesystem() -> pafs.FileSystem:
    emulator = os.environ.get("STORAGE_EMULATOR_HOST")
    if emulator:
        parsed = urlparse(emulator if "://" in emulator else f"http://{emulator}")
        return pafs.GcsFileSystem(anonymous=True, endpoint_override=parsed.netloc,
                                  scheme=parsed.scheme or "http")
    return pafs.GcsFileSystem()


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
