import os
import shutil
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import boto3
import numpy as np
import pytest

from mdland.cluster import free_port

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _moto_binary() -> str:
    found = shutil.which("moto_server") or str(Path(sys.executable).with_name("moto_server"))
    if not Path(found).exists():
        pytest.fail("moto_server not found: install the dev extra (moto[server])")
    return found


def _start_moto(extra_env: dict | None = None):
    port = free_port()
    proc = subprocess.Popen(
        [_moto_binary(), "-H", "127.0.0.1", "-p", str(port)],
        env={**os.environ, **(extra_env or {})}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while True:
        try:
            urllib.request.urlopen(f"{url}/moto-api/", timeout=1)
            return proc, url
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                pytest.fail("moto S3 server did not start")
            time.sleep(0.2)


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server (moto's server mode) on 127.0.0.1 for the whole session."""
    proc, url = _start_moto()
    yield url
    proc.terminate()
    proc.wait(10)


@pytest.fixture
def s3_bucket(s3_server, monkeypatch):
    """A fresh bucket on the test server, with the AWS environment pointing at it; yields 's3://bucket'."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    name = f"mdland-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def s3_auth_server():
    """A second server that checks credentials: only the first request (bucket creation) goes unauthenticated."""
    proc, url = _start_moto({"INITIAL_NO_AUTH_ACTION_COUNT": "1"})
    boto3.client("s3", endpoint_url=url, region_name="us-east-1", aws_access_key_id="x",
                 aws_secret_access_key="x").create_bucket(Bucket="mdland-auth")
    yield url
    proc.terminate()
    proc.wait(10)


@pytest.fixture(params=["local", "s3"])
def storage_root(request, tmp_path):
    """A dataset root on the local filesystem and on the S3 server."""
    if request.param == "local":
        return str(tmp_path / "data")
    return request.getfixturevalue("s3_bucket") + "/data"


@pytest.fixture
def face():
    """One procedural face: (image array, landmarks)."""
    from mdland.data.procedural import draw_face, random_landmarks

    rng = np.random.default_rng(7)
    points = random_landmarks(rng, 256)
    return draw_face(points, "flat_cartoon", 256, rng), points


@pytest.fixture
def serve_cli():
    """`start(detector, marker, *args)`: `mdland serve --detector detector *args` in a subprocess with a Ray of its
    own, returned as (process, its output lines so far, its port) once a line holds `marker`; killed at teardown if
    still running."""
    import threading

    started: list[subprocess.Popen] = []

    def start(detector: str, marker: str, *args: str) -> tuple[subprocess.Popen, list[str], int]:
        port = free_port()
        proc = subprocess.Popen([sys.executable, "-u", "-m", "mdland", "serve", "--detector", detector, "--port",
                                 str(port), *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        started.append(proc)
        lines: list[str] = []
        threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
        deadline = time.time() + 240
        while not any(marker in line for line in lines) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert proc.poll() is None, "".join(lines)[-3000:]
        assert any(marker in line for line in lines), f"no {marker!r} in 240 s: " + "".join(lines)[-3000:]
        return proc, lines, port

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
