"""`ray job submit` against a real local cluster (`ray start --head` on 127.0.0.1, token auth on both sides)."""

import json
import os
import re
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mdland.cluster import free_port
from mdland.data.procedural import write_faces

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))


def port_above_ray_workers() -> int:
    while True:
        port = free_port()
        if port > 20000:  # below that Ray hands ports to its workers
            return port


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    temp = tmp_path_factory.mktemp("ray")
    dashboard = port_above_ray_workers()
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16),
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    start = subprocess.run([RAY, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port_above_ray_workers()}",
                            "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--num-cpus=4",
                            f"--temp-dir={temp}", "--disable-usage-stats"], env=env, capture_output=True, text=True,
                           timeout=180)
    assert start.returncode == 0, start.stderr[-2000:]
    yield f"http://127.0.0.1:{dashboard}", env
    stop_cluster(str(temp))


def stop_cluster(temp: str) -> None:
    """Stop this cluster's processes only (`ray stop` would stop every Ray on the machine)."""
    import psutil

    ours = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(temp in arg for arg in proc.info["cmdline"] or []):
                ours.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    for proc in ours:
        proc.terminate()
    _, alive = psutil.wait_procs(ours, timeout=20)
    for proc in alive:
        proc.kill()


def submit(cluster, *entrypoint: str, wait: bool = True) -> subprocess.CompletedProcess:
    address, env = cluster
    for _ in range(12):
        out = subprocess.run([RAY, "job", "submit", "--address", address, "--working-dir", str(ROOT), "--runtime-env",
                              str(ROOT / "jobs" / "runtime_env.yaml"), *([] if wait else ["--no-wait"]), "--",
                              sys.executable, *entrypoint],
                             env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
        if "No available agent to submit job" not in out.stdout + out.stderr:
            return out
        time.sleep(5)  # a cluster just started: its job agent is not up yet
    return out


def job_status(cluster, output: str) -> str:
    """The status `ray job status` reports for the job that `output` (of `ray job submit`) names."""
    address, env = cluster
    job_id = re.search(r"raysubmit_\w+", output).group(0)
    out = subprocess.run([RAY, "job", "status", "--address", address, job_id], env=env, capture_output=True,
                         text=True, timeout=120)
    return re.search(r"\b(SUCCEEDED|FAILED|STOPPED|RUNNING|PENDING)\b", out.stdout.upper()).group(1)


def test_a_training_job_succeeds_and_writes_its_outputs(cluster, tmp_path):
    write_faces(str(tmp_path / "train"), 16, seed=0, size=64)
    write_faces(str(tmp_path / "val"), 8, seed=0, size=64, start=100)
    out = submit(cluster, "jobs/train_detector.py", "--config", "tiny",
                 "--set", f"data=[{tmp_path / 'train'}]", f"val_data={tmp_path / 'val'}", "epochs=1", "num_workers=1",
                 f"storage_path={tmp_path / 'runs'}", "name=job")
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    assert job_status(cluster, out.stdout + out.stderr) == "SUCCEEDED"
    # The run's Ray Data progress (in an actor) is logged as lines, not terminal bars drawn into the job's log.
    assert "Total Progress" in out.stdout and "\x1b[A" not in out.stdout
    history = json.loads(next((tmp_path / "runs" / "job").glob("checkpoint_*/history.json")).read_text())
    assert [r["epoch"] for r in history] == [0, 1]
    assert (tmp_path / "runs" / "job" / "best" / "detector.pkl").is_file()


def test_a_failing_job_shows_failed_with_its_error(cluster, tmp_path):
    out = submit(cluster, "jobs/evaluate.py", "--detector", str(tmp_path / "missing.pkl"), "--data", str(tmp_path),
                 "--out", str(tmp_path / "report"))
    text = out.stdout + out.stderr
    assert out.returncode != 0
    assert "missing.pkl: detector checkpoint not found" in text
    assert job_status(cluster, text) == "FAILED"
    # evaluate's default --out is relative: in a job it would land in Ray's copy of the working directory, and go.
    out = submit(cluster, "jobs/evaluate.py", "--detector", str(tmp_path / "missing.pkl"), "--data", str(tmp_path))
    text = out.stdout + out.stderr
    assert out.returncode != 0 and "eval-report: a path in a Ray job's copy of --working-dir" in text
    # Training makes its storage_path absolute first: still inside the job's copy.
    write_faces(str(tmp_path / "train"), 16, seed=0, size=64)
    out = submit(cluster, "jobs/train_detector.py", "--config", "tiny", "--set", "storage_path=runs",
                 f"data=[{tmp_path / 'train'}]", "val_data=[]", "num_workers=1")
    text = out.stdout + out.stderr
    assert out.returncode != 0 and re.search(r"/runs/tiny-detector: a path in a Ray job's copy of --working-dir", text)


@pytest.mark.slow
def test_stopping_a_serve_job_takes_its_app_down(cluster, tmp_path):
    import requests

    from mdland.detector.checkpoint import save_checkpoint
    from mdland.detector.model import ARCHS, STARNet

    address, env = cluster
    save_checkpoint(STARNet(ARCHS["tiny"]), str(tmp_path / "d.pkl"))
    port = port_above_ray_workers()
    out = submit(cluster, "jobs/serve.py", "--detector", str(tmp_path / "d.pkl"), "--port", str(port), wait=False)
    job_id = re.search(r"raysubmit_\w+", out.stdout + out.stderr).group(0)

    def healthy() -> bool:
        try:
            return requests.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200
        except requests.ConnectionError:
            return False

    deadline = time.time() + 300
    while not healthy():
        assert time.time() < deadline and job_status(cluster, job_id) in ("PENDING", "RUNNING"), out.stdout[-2000:]
        time.sleep(2)
    subprocess.run([RAY, "job", "stop", "--address", address, job_id], env=env, capture_output=True, timeout=120)
    deadline = time.time() + 60
    while healthy():  # Serve's controller deletes the app the job's SIGTERM asked it to
        assert time.time() < deadline, "the app outlived its stopped job"
        time.sleep(1)
    logs = subprocess.run([RAY, "job", "logs", "--address", address, job_id], env=env, capture_output=True,
                          text=True, timeout=120).stdout
    assert "stopped" in logs.splitlines() and "Traceback" not in logs
