"""Shared fixtures: offline model loading, the shared data folder, a real GCS emulator."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

# Weights come from installed packages; set before any test imports transformers.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("NO_GCE_CHECK", "true")

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"
REAL_CATALOGS = sorted(SHARED.glob("data/*/catalog.parquet"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def gcs_emulator():
    """A real gcp-storage-emulator on a free loopback port; yields its URL with env set for gs://."""
    executable = Path(sys.executable).with_name("gcp-storage-emulator")
    for _ in range(3):
        port = _free_port()
        proc = subprocess.Popen([str(executable), "start", "--host", "127.0.0.1", "--port", str(port),
                                 "--in-memory"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 20
        while time.time() < deadline and proc.poll() is None:
            try:  # a taken port leaves a live but deaf process: check that it answers
                urllib.request.urlopen(f"{url}/storage/v1/b?project=test", timeout=1).read()
                break
            except OSError:
                time.sleep(0.2)
        else:
            proc.kill()
            continue
        break
    else:
        pytest.fail("GCS emulator did not start")
    previous = os.environ.get("STORAGE_EMULATOR_HOST")
    os.environ["STORAGE_EMULATOR_HOST"] = url
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        if previous is None:
            os.environ.pop("STORAGE_EMULATOR_HOST", None)
        else:
            os.environ["STORAGE_EMULATOR_HOST"] = previous


@pytest.fixture
def gcs_bucket(gcs_emulator, request):
    """A fresh bucket on the emulator; yields 'gs://<name>'."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    client = storage.Client(project="test", credentials=AnonymousCredentials())
    name = "b" + str(abs(hash(request.node.nodeid)) % 10**10)
    client.create_bucket(name)
    yield f"gs://{name}"
