import os
import re
import signal
import subprocess
import sys
from pathlib import Path

from mdland.cluster import free_port
from mdland.data import storage

ROOT = Path(__file__).resolve().parents[1]


def test_local_s3_script_starts_a_server_the_storage_layer_uses(monkeypatch):
    port = free_port()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    out = subprocess.run(["bash", str(ROOT / "infra" / "local-s3.sh"), str(port), "mdland-dev"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    pid = int(re.search(r"pid (\d+)", out.stderr).group(1))  # on stderr: shown under `eval "$(...)"`
    try:
        assert len(out.stdout.splitlines()) == 1  # only what `eval` should run
        exports = dict(kv.split("=", 1) for kv in out.stdout.splitlines()[0].removeprefix("export ").split())
        assert exports["AWS_ENDPOINT_URL"] == f"http://127.0.0.1:{port}"
        for k, v in exports.items():
            monkeypatch.setenv(k, v)
        storage.write_bytes("s3://mdland-dev/hello.txt", b"hi")
        # A second server on the same port is refused (it would report a pid that exited), and `eval` fails.
        again = subprocess.run(["bash", "-c", f'eval "$(bash {ROOT / "infra" / "local-s3.sh"} {port} other)"'],
                               env=env, capture_output=True, text=True, timeout=120)
        assert again.returncode != 0 and f"port {port} is in use" in again.stderr
        assert storage.read_bytes("s3://mdland-dev/hello.txt") == b"hi"
    finally:
        os.kill(pid, signal.SIGTERM)


def test_terraform_policy_grants_what_the_storage_layer_does():
    tf = (ROOT / "infra" / "terraform" / "main.tf").read_text()
    for action in ("s3:ListBucket", "s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload"):
        assert f'"{action}"' in tf, action
    assert 'resource "aws_s3_bucket" "mdland"' in tf and 'resource "aws_iam_policy" "mdland_jobs"' in tf
    # Every bucket a shipped config or cluster file names is one terraform makes (with its default prefix).
    made = {f"mdland-{k}" for k in re.search(r'toset\(\[([^]]*)\]\)', tf).group(1).replace('"', "").split(", ")}
    named = {m for p in [*ROOT.glob("mdland/*/configs/*.yaml"), *ROOT.glob("cluster/**/*.yaml")]
             for m in re.findall(r"s3://([a-z0-9-]+)/", p.read_text())}
    assert named and named <= made, named - made
    assert "noncurrent_version_expiration" in tf
    compose = (ROOT / "infra" / "minio-compose.yaml").read_text()
    assert "minio/minio" in compose and "127.0.0.1:9000:9000" in compose
