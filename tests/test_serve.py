import base64
import io
import json
import select
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
import torch
import yaml
from PIL import Image

from mdland.cluster import free_port, init_ray
from mdland.data.procedural import procedural_faces
from mdland.data.shards import decode_image
from mdland.detector.checkpoint import load_detector, save_checkpoint
from mdland.detector.inference import predict
from mdland.detector.model import ARCHS, STARNet

LIMITS = {"max_bytes": 300_000, "max_pixels": 400 * 400, "max_images": 8}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import ray
    from ray import serve

    from mdland.serve.app import start_server

    root = tmp_path_factory.mktemp("serve")
    torch.manual_seed(0)
    save_checkpoint(STARNet(ARCHS["tiny"]), str(root / "det.pkl"))
    init_ray(num_cpus=4, include_dashboard=False)
    url = start_server({"detector": str(root / "det.pkl"), "max_batch_size": 8, **LIMITS}, port=free_port())
    faces = [f.image for f in procedural_faces(24, seed=5, size=96)]
    yield url, load_detector(str(root / "det.pkl")).eval(), faces
    serve.shutdown()
    ray.shutdown()


def expected(net, png: bytes, box=None) -> np.ndarray:
    image = decode_image(png)
    x0, y0, x1, y1 = box or (0, 0, image.shape[1], image.shape[0])
    # A box's edges in pixel-centre coordinates: the whole 96-px image is centred on pixel 47.5.
    return predict(net, [image], [(((x0 + x1) / 2 - 0.5, (y0 + y1) / 2 - 0.5), max(x1 - x0, y1 - y0) / 200)])[0]


def post_image(url, png, timeout=60, **params):
    return requests.post(f"{url}/v1/landmarks", data=png, headers={"content-type": "image/png"}, params=params,
                         timeout=timeout)


def test_single_image_matches_in_process_inference(server):
    url, net, faces = server
    assert requests.get(f"{url}/healthz", timeout=30).status_code == 200
    r = post_image(url, faces[0])
    assert r.status_code == 200
    body = r.json()
    np.testing.assert_allclose(body["landmarks"], expected(net, faces[0]), atol=2e-3)
    assert body["box"] == [0, 0, 96, 96] and body["image_size"] == [96, 96] and body["time_ms"] > 0
    r = post_image(url, faces[1], box="10,12,80,90")
    np.testing.assert_allclose(r.json()["landmarks"], expected(net, faces[1], (10, 12, 80, 90)), atol=2e-3)
    r = requests.post(f"{url}/v1/landmarks", files={"image": ("f.png", faces[2], "image/png")},
                      data={"box": "5,5,90,90"}, timeout=60)
    np.testing.assert_allclose(r.json()["landmarks"], expected(net, faces[2], (5, 5, 90, 90)), atol=2e-3)
    r = post_image(url, faces[3], box="-12,-8,100,98")  # a widened box may reach past the image's edges
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(r.json()["landmarks"], expected(net, faces[3], (-12, -8, 100, 98)), atol=2e-3)
    from ray import serve

    # The replica passes Serve's health checks (check_health runs every few seconds).
    assert serve.status().applications["landmarks"].deployments["LandmarkDetector"].status == "HEALTHY"
    model = requests.get(f"{url}/v1/model", timeout=30).json()
    assert model["points"] == 68 and model["input_size"] == 64
    assert model["cuda_graphs"] is False and model["dtype"] == "float32"  # CUDA graphs are for a GPU's replica
    assert "/v1/landmarks/batch" in requests.get(f"{url}/openapi.json", timeout=30).json()["paths"]
    assert requests.get(f"{url}/docs", timeout=30).status_code == 200


def test_batch_forms(server):
    url, net, faces = server
    files = [("images", (f"{i}.png", faces[i], "image/png")) for i in range(3)]
    boxes = [("boxes", "0,0,96,96"), ("boxes", "10,10,90,90"), ("boxes", "0,0,60,60")]
    r = requests.post(f"{url}/v1/landmarks/batch", files=files, data=boxes, timeout=60)
    assert r.status_code == 200
    results = r.json()["results"]
    for i, box in enumerate([(0, 0, 96, 96), (10, 10, 90, 90), (0, 0, 60, 60)]):
        np.testing.assert_allclose(results[i]["landmarks"], expected(net, faces[i], box), atol=2e-3)
    # encodebytes breaks its lines, as the `base64` tool does.
    body = {"images": [{"image": base64.encodebytes(faces[3]).decode()},
                       {"image": base64.b64encode(faces[4]).decode(), "box": [4, 4, 80, 80]}]}
    r = requests.post(f"{url}/v1/landmarks/batch", json=body, timeout=60)
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(r.json()["results"][0]["landmarks"], expected(net, faces[3], (0, 0, 96, 96)), atol=2e-3)
    np.testing.assert_allclose(r.json()["results"][1]["landmarks"], expected(net, faces[4], (4, 4, 80, 80)), atol=2e-3)


def png_of(shape) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.zeros(shape, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("case,status,needle", [
    ("not an image", 400, "not an image"),
    ("truncated", 400, "truncated or corrupt"),
    ("empty", 400, "empty body"),
    ("huge bytes", 413, "byte limit"),
    ("huge pixels", 413, "pixel limit"),
    ("box outside", 400, "outside the 96x96 image"),
    ("degenerate box", 400, "degenerate box"),
    ("thin box", 400, "each side at least 2 pixels"),
    ("box text", 400, "expected four numbers"),
    ("content type", 415, "content type 'text/plain'"),
    ("malformed json", 400, "JSON: malformed"),
    ("deep json", 400, "JSON: nested too deeply"),
    ("long box", 400, "got [1.0, 1.0, 1.0, 1.0, 1.0"),
    ("json not utf-8", 400, "not UTF-8"),
    ("chunked multipart", 413, "byte limit"),
    ("json shape", 400, "JSON: expected"),
    ("bad base64", 400, "not valid base64"),
    ("too many images", 413, "image limit"),
    ("too many files", 413, "multipart: Too many files"),
    ("text field as image", 400, "images[0]: a text field, not a file"),
    ("no image field", 400, "no `image` file field"),
    ("huge box", 400, "over 8x the 96x96 image's longer side"),
    ("overflowing box", 400, "boxes[0]: expected four numbers"),
    ("binary box file", 400, "box: expected four numbers x0,y0,x1,y1, got"),
    ("two boxes", 400, "box: given both in the query string and as a multipart field"),
])
def test_bad_input_gets_a_one_line_4xx_and_the_replica_lives(server, case, status, needle):
    url, _, faces = server
    face = faces[0]
    batch = f"{url}/v1/landmarks/batch"
    send = {
        "not an image": lambda: post_image(url, b"hello, not a picture"),
        "truncated": lambda: post_image(url, face[: len(face) // 2]),
        "empty": lambda: post_image(url, b""),
        "huge bytes": lambda: post_image(url, b"\x89PNG" + b"0" * 400_000),
        "huge pixels": lambda: post_image(url, png_of((500, 500, 3))),
        "box outside": lambda: post_image(url, face, box="100,0,200,96"),
        "degenerate box": lambda: post_image(url, face, box="40,40,40,80"),
        "thin box": lambda: post_image(url, face, box="40,40,41,80"),
        "box text": lambda: post_image(url, face, box="left,top"),
        "content type": lambda: requests.post(f"{url}/v1/landmarks", data=b"x", headers={"content-type": "text/plain"}),
        "malformed json": lambda: requests.post(batch, data=b'{"images": [', headers={"content-type": "application/json"}),
        "deep json": lambda: requests.post(batch, data=b"[" * 100_000, headers={"content-type": "application/json"}),
        "long box": lambda: requests.post(batch, json={"images": [{"image": base64.b64encode(face).decode(),
                                                                   "box": [1.0] * 10_000}]}),
        "json not utf-8": lambda: requests.post(batch, data=b'{"images": "\xff"}',
                                                headers={"content-type": "application/json"}),
        # Chunked transfer declares no length: the limit holds as the body streams in.
        "chunked multipart": lambda: requests.post(batch, data=iter([b"--b\r\nContent-Disposition: form-data; "
                                                                     b'name="images"; filename="a.png"\r\n\r\n']
                                                                    + [b"0" * 50_000] * 10),
                                                   headers={"content-type": "multipart/form-data; boundary=b"}),
        "json shape": lambda: requests.post(batch, json={"pictures": []}),
        "bad base64": lambda: requests.post(batch, json={"images": [{"image": "%%%"}]}),
        "too many images": lambda: requests.post(batch, files=[("images", ("a.png", face, "image/png"))] * 9),
        # Past what the multipart parser itself takes (max_images + 1 parts): its own message, as a 413.
        "too many files": lambda: requests.post(batch, files=[("images", ("a.png", face, "image/png"))] * 12),
        "text field as image": lambda: requests.post(batch, data={"images": "hello"},
                                                     files=[("images", ("a.png", face, "image/png"))]),
        # It overlaps the image, but its crop's arithmetic would overflow.
        "huge box": lambda: post_image(url, face, box="-1e20,-1e20,1e20,1e20"),
        # 10**400 is valid JSON and too large for a float.
        "overflowing box": lambda: requests.post(batch, data=json.dumps(
            {"images": [{"image": base64.b64encode(face).decode(), "box": [10**400, 0, 5, 5]}]}),
            headers={"content-type": "application/json"}),
        # Four bytes that, read as numbers, would have made the box (0, 0, 100, 100).
        "binary box file": lambda: requests.post(f"{url}/v1/landmarks", files={
            "image": ("a.png", face, "image/png"), "box": ("box.bin", b"\x00\x00dd", "application/octet-stream")}),
        "two boxes": lambda: requests.post(f"{url}/v1/landmarks", params={"box": "0,0,96,96"}, files={
            "image": ("a.png", face, "image/png"), "box": (None, "10,10,50,50")}),
        "no image field": lambda: requests.post(f"{url}/v1/landmarks", files={"picture": ("a.png", face, "image/png")}),
    }[case]
    r = send()
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert needle in error and "\n" not in error and "Traceback" not in r.text and len(error) < 300
    assert requests.get(f"{url}/healthz", timeout=30).status_code == 200


def test_concurrent_clients_get_their_own_answers(server):
    url, net, faces = server
    # Every third upload is broken: it is refused on its own, and the faces batched around it are still answered.
    uploads = [png[: len(png) // 3] if i % 3 == 2 else png for i, png in enumerate(faces)]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda png: post_image(url, png), uploads))
    for i, (png, r) in enumerate(zip(faces, answers)):
        if i % 3 == 2:
            assert r.status_code == 400 and "truncated" in r.json()["error"]
        else:
            assert r.status_code == 200, r.text
            np.testing.assert_allclose(r.json()["landmarks"], expected(net, png), atol=2e-3)


def test_a_batch_fills_to_max_batch_size(server, tmp_path):
    # A second app whose replica waits long for a full batch: 8 concurrent requests must all land in one batch of 8,
    # which Serve's default cap of 5 ongoing requests per replica would not let happen.
    from ray import serve

    from mdland.serve.app import build_app

    url, net, faces = server
    torch.manual_seed(0)
    save_checkpoint(STARNet(ARCHS["tiny"]), str(tmp_path / "det.pkl"))
    serve.run(build_app({"detector": str(tmp_path / "det.pkl"), "max_batch_size": 8, "batch_wait_timeout_s": 5.0}),
              name="batching", route_prefix="/batching")
    try:
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda png: post_image(f"{url}/batching", png).json(), faces[:8]))
    finally:
        serve.delete("batching")
    assert [a["batch_size"] for a in answers] == [8] * 8
    for png, answer in zip(faces, answers):
        np.testing.assert_allclose(answer["landmarks"], expected(net, png), atol=2e-3)


@pytest.mark.filterwarnings("ignore:coroutine .*ASGIIngressWrapper.__del__. was never awaited")
def test_a_caller_that_went_away_is_left_out_of_the_next_forward_pass():
    import asyncio

    from mdland.detector.inference import predict_crops
    from mdland.landmarks.align import crop_matrix
    from mdland.serve.app import LandmarkService, ServeConfig

    # The class as Serve runs it, without its constructor (which needs a replica context). When a caller goes away
    # and the disconnect reaches the replica, Serve cancels its request, and so the future its face waits on.
    replica = LandmarkService.func_or_class.__new__(LandmarkService.func_or_class)
    replica.cfg = ServeConfig(detector="unused", max_batch_size=3)
    replica.forward_pool = ThreadPoolExecutor(1)
    replica.net, replica.dtype = STARNet(ARCHS["tiny"]).eval(), torch.float32
    replica.failure, replica.pending = None, []
    rng = np.random.default_rng(0)
    faces = [(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), crop_matrix((50.0, 40.0), 0.5 + i, 64))
             for i in range(3)]

    async def three_callers() -> list:
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in faces]
        replica.pending.extend(zip(faces, futures))
        futures[1].cancel()
        await replica._forward_loop()
        return [None if f.cancelled() else f.result() for f in futures]

    answers = asyncio.run(three_callers())
    replica.forward_pool.shutdown()
    assert answers[1] is None and replica.pending == []
    # One forward pass of the two faces still waited for.
    assert [a[1] for a in (answers[0], answers[2])] == [2, 2]
    truth = predict_crops(replica.net, [faces[0][0], faces[2][0]], [faces[0][1], faces[2][1]], torch.float32)
    np.testing.assert_allclose(np.stack([answers[0][0], answers[2][0]]), truth, atol=1e-5)


def test_batches_fill_under_load(server):
    # 16 clients against batches of 8 that Serve closes as soon as it has a request (batch_wait_timeout_s 0): Serve
    # alone would run each forward pass on the one or two requests that had come in; the faces that wait behind a
    # running forward pass go into the next one together.
    url, net, faces = server
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda i: post_image(url, faces[i % len(faces)]).json(), range(96)))
    sizes = [a["batch_size"] for a in answers]
    assert np.mean(sizes) > 4 and max(sizes) <= 8, sizes
    for i, answer in enumerate(answers):
        np.testing.assert_allclose(answer["landmarks"], expected(net, faces[i % len(faces)]), atol=2e-3)


def test_bounded_loopback_load(server, capsys):
    url, _, faces = server
    n, clients = 60, 6
    latencies, errors = [], 0

    def one(i):
        t0 = time.perf_counter()
        r = post_image(url, faces[i % len(faces)])
        return r.status_code, (time.perf_counter() - t0) * 1000

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        for status, ms in pool.map(one, range(n)):
            errors += status != 200
            latencies.append(ms)
    elapsed = time.perf_counter() - t0
    assert errors == 0 and len(latencies) == n
    with capsys.disabled():
        print(f"\nload: {n} requests, {clients} clients: {n / elapsed:.1f} req/s, "
              f"p50 {np.percentile(latencies, 50):.1f} ms, p95 {np.percentile(latencies, 95):.1f} ms")


def test_an_upload_over_max_bytes_is_refused_as_it_streams_in(server):
    """Nothing in front of the replica holds the whole body first: a chunked upload with no declared length is
    answered 413 soon after it passes max_bytes, while the client is still sending."""
    url, _, _ = server
    host, port = url.removeprefix("http://").split(":")
    chunk = b"%x\r\n" % 65536 + b"x" * 65536 + b"\r\n"
    sent, reply = 0, b""
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(b"POST /v1/landmarks HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                  b"Transfer-Encoding: chunked\r\n\r\n")
        while not reply and sent < 80 * 65536:  # 80 chunks: 17x the limit
            try:
                s.sendall(chunk)
                sent += 65536
            except (BrokenPipeError, ConnectionResetError):  # answered and closed between two chunks
                pass
            if select.select([s], [], [], 0.01)[0]:
                reply = s.recv(4096)
        s.settimeout(10)
        while reply and b"}" not in reply:  # the JSON body may come in a segment after the headers
            more = s.recv(4096)
            if not more:
                break
            reply += more
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    assert b"over the 300000-byte limit" in reply
    assert sent < 8 * 65536, sent  # within a few chunks of the limit


def replica_requests_through_haproxy() -> int:
    """Requests HAProxy has forwarded to the app's replicas, from its stats page (CSV: a row per server)."""
    import csv
    import os

    r = requests.get(f"http://127.0.0.1:{os.environ['RAY_SERVE_HAPROXY_STATS_PORT']}/stats;csv", timeout=30)
    assert r.status_code == 200, r.text
    rows = csv.DictReader(r.text.lstrip("# ").splitlines())
    return sum(int(row["stot"]) for row in rows if row["svname"].startswith("SERVE_REPLICA_landmarks"))


def test_haproxy_forwards_requests_and_a_second_local_serve_runs_beside(server, serve_cli, tmp_path):
    import signal

    url, net, faces = server
    before = replica_requests_through_haproxy()
    answers = [post_image(url, faces[i]).json()["landmarks"] for i in range(3)]
    assert replica_requests_through_haproxy() == before + 3  # straight to the replica, not through a proxy actor
    # `mdland serve` in another process starts a Ray, and an HAProxy, of its own: ports must not clash.
    save_checkpoint(net, str(tmp_path / "det.pkl"))
    proc, lines, port = serve_cli(str(tmp_path / "det.pkl"), "Ctrl-C stops")
    for i in range(3):
        r = post_image(f"http://127.0.0.1:{port}", faces[i])
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(r.json()["landmarks"], answers[i], atol=1e-4)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 0, "".join(lines)[-3000:]
    assert post_image(url, faces[0]).json()["landmarks"] == answers[0]  # the first one serves on


def test_serve_config_file_builds_the_app(server, tmp_path):
    from pathlib import Path

    import mdland.serve.app as app

    config = yaml.safe_load(Path(app.__file__).with_name("serve_config.yaml").read_text())
    spec = config["applications"][0]
    assert spec["import_path"] == "mdland.serve.app:build_app"
    assert spec["deployments"][0]["name"] == "LandmarkDetector"
    args = {**spec["args"], "detector": str(tmp_path / "d.pkl"), "use_gpu": False}
    with pytest.raises(ValueError, match="d.pkl: detector checkpoint not found"):  # before any replica starts
        app.build_app(args)
    save_checkpoint(STARNet(ARCHS["tiny"]), str(tmp_path / "d.pkl"))
    assert app.build_app(args) is not None
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['max_batch'\]; known: .*'max_batch_size'.* and the "
                                         r"deployment's \['num_replicas', 'autoscaling_config', 'ray_actor_options'\]"):
        app.build_app({"detector": "x", "max_batch": 3})
    with pytest.raises(ValueError, match="batch_wait_timeout_s: expected a finite number, got inf"):
        app.build_app({**args, "batch_wait_timeout_s": float("inf")})
    with pytest.raises(ValueError, match="decode_threads: must be at least 1"):
        app.build_app({**args, "decode_threads": 0})
    (tmp_path / "notes.pkl").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="notes.pkl: not a readable detector checkpoint"):  # in the driver
        app.build_app({**args, "detector": str(tmp_path / "notes.pkl")})


@pytest.mark.filterwarnings("ignore:coroutine .*ASGIIngressWrapper.__del__. was never awaited")
def test_a_failing_forward_pass_fails_its_callers_and_marks_the_replica_unhealthy():
    import asyncio

    from mdland.serve.app import LandmarkService, ServeConfig

    # The class as Serve runs it, without its constructor (which needs a replica context), around a network on the
    # meta device: its forward pass runs, and reading its points back fails, as a lost CUDA context would.
    replica = LandmarkService.func_or_class.__new__(LandmarkService.func_or_class)
    replica.cfg = ServeConfig(detector="unused", max_batch_size=2)
    replica.forward_pool = ThreadPoolExecutor(1)
    replica.net, replica.dtype = STARNet(ARCHS["tiny"]).to("meta").eval(), torch.float32
    replica.failure, replica.pending = None, []
    replica.check_health()
    face = (np.zeros((64, 64, 3), np.uint8), np.eye(3)[:2])

    async def three_callers() -> list:
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in range(3)]
        replica.pending.extend((face, f) for f in futures)
        await replica._forward_loop()  # two passes: two faces, then one
        return [f.exception() for f in futures]

    errors = asyncio.run(three_callers())
    assert all(isinstance(e, NotImplementedError) for e in errors), errors
    assert replica.pending == []
    with pytest.raises(RuntimeError, match="forward pass failed: NotImplementedError: .*meta"):
        replica.check_health()
    replica.forward_pool.shutdown()


@pytest.mark.filterwarnings("ignore:coroutine .*ASGIIngressWrapper.__del__. was never awaited")
def test_non_finite_points_fail_their_request_only():
    import asyncio

    from mdland.serve.app import BadInput, LandmarkService, ServeConfig

    replica = LandmarkService.func_or_class.__new__(LandmarkService.func_or_class)
    replica.cfg = ServeConfig(detector="unused", max_batch_size=2)
    replica.forward_pool = ThreadPoolExecutor(1)
    net = STARNet(ARCHS["tiny"]).eval()
    with torch.no_grad():  # as an fp16 overflow would leave them
        next(net.parameters()).fill_(float("nan"))
    replica.net, replica.dtype = net, torch.float32
    replica.failure, replica.pending = None, []

    async def one_caller():
        future = asyncio.get_running_loop().create_future()
        replica.pending.append(((np.zeros((64, 64, 3), np.uint8), np.eye(3)), future))
        await replica._forward_loop()
        return future.exception()

    error = asyncio.run(one_caller())
    assert isinstance(error, BadInput) and error.status == 500 and "not finite" in error.message
    replica.check_health()  # the replica itself is fine
    replica.forward_pool.shutdown()


def test_uploads_outside_the_raster_formats_are_refused():
    from mdland.serve.app import BadInput, ServeConfig, decode_upload

    # PostScript: Pillow would hand it to Ghostscript.
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n%%EOF\n"
    with pytest.raises(BadInput, match="image: not an image"):
        decode_upload(eps, ServeConfig(detector="unused"))


def test_16_bit_grey_uploads_keep_their_tones():
    from mdland.serve.app import ServeConfig, decode_upload

    ramp = np.tile(np.linspace(0, 65535, 32).astype(np.uint16), (8, 1))
    buf = io.BytesIO()
    Image.fromarray(ramp).save(buf, "PNG")
    image = decode_upload(buf.getvalue(), ServeConfig(detector="unused"))
    assert image.shape == (8, 32, 3) and image.dtype == np.uint8
    np.testing.assert_allclose(image[0, :, 0], ramp[0] / 257, atol=1)  # not clipped to white


def test_uploads_are_read_in_the_orientation_viewers_show():
    from mdland.serve.app import ServeConfig, decode_upload

    stored = np.zeros((20, 40, 3), np.uint8)
    stored[:, :20] = 255  # left half white, as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # EXIF orientation: shown turned 90 degrees clockwise
    buf = io.BytesIO()
    Image.fromarray(stored).save(buf, "JPEG", exif=exif, quality=95)
    shown = decode_upload(buf.getvalue(), ServeConfig(detector="unused"))
    assert shown.shape == (40, 20, 3)
    assert shown[:15].mean() > 200 and shown[25:].mean() < 50  # the white half now on top


def test_a_second_start_serves_where_serve_listens(server):
    from mdland.serve.app import start_server

    url, _, faces = server
    # Serve has one HTTP address per cluster: another port would be ignored and the app not where it was said.
    args = {"detector": requests.get(f"{url}/v1/model", timeout=30).json()["model"], "max_batch_size": 8, **LIMITS}
    with pytest.raises(ValueError, match=f"Serve already runs on this Ray cluster at {url.removeprefix('http://')}"):
        start_server(args, port=free_port())
    assert start_server(args) == url  # no port asked for: where Serve listens
    assert post_image(url, faces[0]).status_code == 200
