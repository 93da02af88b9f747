"""`mdland serve`: the detector behind an HTTP API on Ray Serve, with dynamic batching.

POST /v1/landmarks          one image: raw bytes with an image content type, or multipart (`image` file, `box` field)
POST /v1/landmarks/batch    several images: multipart (`images` files, one `boxes` field each or none) or JSON
                            {"images": [{"image": <base64>, "box": [x0, y0, x1, y1]}, ...]}
GET  /healthz               200 once this replica has loaded its model
GET  /v1/model              model id, input size, point scheme
GET  /docs, /openapi.json   FastAPI's OpenAPI documents

The face box `x0,y0,x1,y1` is in pixel-edge coordinates, as face detectors give boxes (the whole image is 0,0,W,H),
and is the square crop the network sees (its longer side; a tight landmark box should be widened by 1.05 first, as
training crops were); it may reach past the image's edges (the network sees black there), and without one the whole
image is the crop. Points come back as 68 [x, y] pairs in the original image's pixels, 0-based pixel centres. Bad
input gets a 4xx with one line naming the problem. Decoding and cropping run per request in threads; only the
network's forward pass is batched.
"""

import asyncio
import base64
import binascii
import errno
import io
import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields, replace

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from PIL import Image, ImageOps, UnidentifiedImageError
from ray import serve

from mdland.cluster import cluster_address, free_port, init_ray, ray_started_here
from mdland.config import check_counts, from_dict
from mdland.data import storage
from mdland.data.shards import rgb_array
from mdland.detector.checkpoint import load_detector
from mdland.detector.inference import CudaGraphDetector, predict_crops, serving_detector
from mdland.landmarks.align import MAX_BOX_RATIO, check_face_box, crop_from_edge_box, crop_matrix, warp_image
from mdland.session import pick_device


@dataclass
class ServeConfig:
    detector: str = ""  # detector checkpoint (.pkl), local or s3://
    max_batch_size: int = 16  # images per batched forward
    # How long a request waits for others to batch with. None needed: faces that come in while a forward pass runs
    # go into the next one together, and an idle replica answers at once (on CPU, 2 ms of waiting cost a lone request
    # 3 ms in the replica, 4-6 ms end to end).
    batch_wait_timeout_s: float = 0.0
    max_bytes: int = 10 * 2**20  # per request body
    max_pixels: int = 25_000_000  # per image
    max_images: int = 32  # per batch request
    max_box_ratio: float = MAX_BOX_RATIO  # a box's side at most this many times the image's longer side
    decode_threads: int = 4  # images decoded and cropped at once per replica (each may take max_pixels x 3 bytes)
    use_gpu: bool = False  # fp16 on a GPU; fp32 on CPU
    cuda_graphs: bool = True  # on a GPU, replay the forward pass from CUDA graphs captured at start-up


APP_NAME = "landmarks"


class BadInput(Exception):
    """A request answered with `status` and a one-line message, never a stack trace."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


# The raster formats a face photo or drawing comes in. Pillow opens more, some through outside programs (EPS runs
# Ghostscript on the upload's PostScript), which a public endpoint should not offer.
UPLOAD_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF", "PPM")


def decode_upload(data: bytes, limits: ServeConfig, what: str = "image") -> np.ndarray:
    if not data:
        raise BadInput(400, f"{what}: empty body")
    if len(data) > limits.max_bytes:
        raise BadInput(413, f"{what}: {len(data)} bytes is over the {limits.max_bytes}-byte limit")
    try:
        with Image.open(io.BytesIO(data), formats=UPLOAD_FORMATS) as im:
            if im.width * im.height > limits.max_pixels:
                raise BadInput(413, f"{what}: {im.width}x{im.height} pixels is over the {limits.max_pixels}-pixel limit")
            # Points are given in the image as viewers show it: phone photos store it sideways with an EXIF turn.
            return rgb_array(ImageOps.exif_transpose(im))
    except BadInput:
        raise
    except Image.DecompressionBombError:
        raise BadInput(413, f"{what}: over the {limits.max_pixels}-pixel limit") from None
    except UnidentifiedImageError as e:
        raise BadInput(400, f"{what}: not an image ({type(e).__name__})") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise BadInput(400, f"{what}: truncated or corrupt image ({str(e).splitlines()[0] if str(e) else 'unreadable'})") from None
    except Exception as e:  # decoders of rarer formats raise other kinds (NotImplementedError, TypeError, ...)
        raise BadInput(400, f"{what}: undecodable image ({type(e).__name__})") from None


def parse_box(box: str | bytes | list | None, width: int, height: int, what: str = "box",
              max_ratio: float = ServeConfig.max_box_ratio) -> tuple[float, ...]:
    if isinstance(box, bytes):  # a multipart `box` sent as a file
        try:
            box = box.decode()
        except UnicodeDecodeError:
            raise BadInput(400, f"{what}: expected four numbers x0,y0,x1,y1 as text, got binary data") from None
    if box is None or box == "":
        return (0.0, 0.0, float(width), float(height))
    try:
        values = [float(v) for v in (box.split(",") if isinstance(box, str) else box)]
    except (TypeError, ValueError, OverflowError):  # OverflowError: a JSON integer too large for a float
        raise BadInput(400, f"{what}: expected four numbers x0,y0,x1,y1, got {box!r:.80}") from None
    try:
        return check_face_box(values, width, height, max_ratio)
    except ValueError as e:
        raise BadInput(400, f"{what}: {e}") from None


def content_type(request: Request) -> str:
    """The request's media type, without parameters (`image/png; charset=x` -> `image/png`)."""
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def limited_stream(request: Request, limit: int):
    """The request body's chunks, refused with 413 as soon as they pass `limit` bytes (a declared length first, and
    the running count for chunked uploads, which declare none)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise BadInput(413, f"body: {declared} bytes is over the {limit}-byte limit")
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BadInput(413, f"body: over the {limit}-byte limit")
        yield chunk


async def read_body(request: Request, limit: int) -> bytes:
    return b"".join([chunk async for chunk in limited_stream(request, limit)])


api = FastAPI(title="mdland landmark detector", description=__doc__)


@api.exception_handler(BadInput)
async def _bad_input(request: Request, exc: BadInput):
    return JSONResponse({"error": exc.message}, status_code=exc.status)


@api.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception):  # never a stack trace to the client
    return JSONResponse({"error": f"internal error: {type(exc).__name__}"}, status_code=500)


@serve.deployment(name="LandmarkDetector")
@serve.ingress(api)
class LandmarkService:
    def __init__(self, config: dict):
        self.cfg = from_dict(ServeConfig, config)
        # The forward pass has a thread of its own, so a ready batch never queues behind image decodes; decodes share
        # a bounded pool, which caps the memory of images being decoded at once.
        self.forward_pool = ThreadPoolExecutor(1, thread_name_prefix="forward")
        self.decode_pool = ThreadPoolExecutor(self.cfg.decode_threads, thread_name_prefix="decode")
        self.failure: str | None = None
        self.pending: list[tuple[tuple[np.ndarray, np.ndarray], asyncio.Future]] = []
        self.forward_task: asyncio.Task | None = None
        # Warmed up before the replica reports healthy, so no request pays for it; in the forward thread, as cuDNN
        # keeps the kernels it picked per thread.
        self.net, self.dtype = self.forward_pool.submit(serving_detector, self.cfg.detector,
                                                        pick_device(self.cfg.use_gpu), self.cfg.max_batch_size,
                                                        self.cfg.cuda_graphs).result()
        # Pillow refuses images past twice its own limit before mdland's `max_pixels` is read.
        Image.MAX_IMAGE_PIXELS = max(Image.MAX_IMAGE_PIXELS or 0, self.cfg.max_pixels)
        self.enqueue.set_max_batch_size(self.cfg.max_batch_size)
        self.enqueue.set_batch_wait_timeout_s(self.cfg.batch_wait_timeout_s)

    # Serve forms the next batch while one runs, closing it batch_wait_timeout_s after its first request, so behind
    # a busy forward pass its batches would stay small. They are only queued here: each caller gets a future, and each
    # forward pass takes all the faces waiting (up to max_batch_size). A caller that goes away cancels its future,
    # and its face is skipped.
    @serve.batch(max_batch_size=ServeConfig.max_batch_size, batch_wait_timeout_s=ServeConfig.batch_wait_timeout_s)
    async def enqueue(self, items: list[tuple[np.ndarray, np.ndarray]]) -> list[asyncio.Future]:
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in items]
        self.pending.extend(zip(items, futures))
        if self.forward_task is None or self.forward_task.done():
            self.forward_task = loop.create_task(self._forward_loop())
        return futures

    async def _forward_loop(self) -> None:
        """Forward passes over what waits in `pending` (up to max_batch_size faces each) until nothing does, in the
        forward thread: the event loop keeps taking requests meanwhile."""
        loop = asyncio.get_running_loop()
        while True:
            self.pending = [(item, future) for item, future in self.pending if not future.done()]  # callers gone
            if not self.pending:
                break
            taken = self.pending[: self.cfg.max_batch_size]
            del self.pending[: len(taken)]
            try:
                points = await loop.run_in_executor(self.forward_pool, predict_crops, self.net,
                                                    [crop for (crop, _), _ in taken], [m for (_, m), _ in taken],
                                                    self.dtype)
            except Exception as e:
                # Inputs are checked before they reach a batch, so a failing forward pass means a broken replica (a
                # lost CUDA context fails every later call too): check_health reports it, Serve replaces it.
                self.failure = f"forward pass failed: {type(e).__name__}: {str(e)[:200]}"
                for _, future in taken:
                    if not future.done():
                        future.set_exception(e)
                continue
            for (_, future), p in zip(taken, points):
                if future.done():
                    continue
                if np.isfinite(p).all():
                    future.set_result((p, len(taken)))
                else:  # half precision can overflow on an odd input; JSON has no NaN to answer with
                    future.set_exception(BadInput(500, "the detector's points for this face are not finite"))

    def check_health(self) -> None:
        if self.failure:
            raise RuntimeError(self.failure)

    def _decode_and_crop(self, data: bytes, box, index: int | None) -> tuple[tuple[int, int], tuple, np.ndarray,
                                                                            np.ndarray]:
        """Decode and crop one upload: ((width, height), box, crop, source->crop matrix)."""
        image = decode_upload(data, self.cfg, "image" if index is None else f"images[{index}]")
        box = parse_box(box, image.shape[1], image.shape[0], "box" if index is None else f"boxes[{index}]",
                        self.cfg.max_box_ratio)
        size = self.net.arch.input_size
        matrix = crop_matrix(*crop_from_edge_box(box), size)
        return (image.shape[1], image.shape[0]), box, warp_image(image, matrix, size), matrix

    async def prepare(self, data: bytes, box, index: int | None = None) -> tuple:
        """Decode and crop one upload in the decode pool (`_decode_and_crop`). `index` names the image's place in a
        batch request."""
        return await asyncio.get_running_loop().run_in_executor(self.decode_pool, self._decode_and_crop, data, box,
                                                                index)

    async def detect(self, face: tuple, t0: float) -> dict:
        """The answer for one prepared face, from a batched forward pass; `t0`: when its request came in."""
        image_size, box, crop, matrix = face
        points, batch = await (await self.enqueue((crop, matrix)))
        return {"landmarks": np.round(points.astype(np.float64), 3).tolist(), "box": list(box),
                "image_size": list(image_size), "model": self.cfg.detector, "batch_size": batch,
                "time_ms": round((time.perf_counter() - t0) * 1000, 2)}

    @api.get("/healthz")
    async def healthz(self):
        if self.failure:  # as check_health reports it, until Serve replaces this replica
            return JSONResponse({"status": "failing", "error": self.failure}, status_code=503)
        return {"status": "ok", "model": self.cfg.detector}

    @api.get("/v1/model")
    async def model(self) -> dict:
        arch = self.net.arch
        return {"model": self.cfg.detector, "input_size": arch.input_size, "points": 68, "scheme": "ibug-300w-68",
                "architecture": asdict(arch), "dtype": str(self.dtype).split(".")[-1],
                "max_batch_size": self.cfg.max_batch_size, "cuda_graphs": isinstance(self.net, CudaGraphDetector),
                "torch_threads": torch.get_num_threads()}

    @api.post("/v1/landmarks")
    async def landmarks(self, request: Request, box: str | None = None) -> dict:
        kind = content_type(request)
        if kind.startswith("image/") or kind == "application/octet-stream":
            data = await read_body(request, self.cfg.max_bytes)
        elif kind == "multipart/form-data":
            form = await self._form(request)
            uploads = form.get("image", [])
            if not uploads or isinstance(uploads[0], str):
                raise BadInput(400, "multipart: no `image` file field")
            data = uploads[0]
            if "box" in form and box is not None:  # two boxes for one face: neither wins silently
                raise BadInput(400, "box: given both in the query string and as a multipart field; send one")
            box = form.get("box", [box])[0]
        else:
            raise BadInput(415, f"content type {kind or 'missing'!r}: send image bytes (image/*) or multipart/form-data")
        t0 = time.perf_counter()
        return await self.detect(await self.prepare(data, box), t0)

    @api.post("/v1/landmarks/batch")
    async def landmarks_batch(self, request: Request) -> dict:
        kind = content_type(request)
        if kind == "application/json":
            body = await read_body(request, self.cfg.max_bytes)
            try:
                items = json.loads(body)["images"]
                # Whitespace dropped first: `base64` and Python's encodebytes break lines every 76 characters.
                pairs = [(base64.b64decode("".join(item["image"].split()), validate=True), item.get("box"))
                         for item in items]
            except UnicodeDecodeError:
                raise BadInput(400, "JSON: the body is not UTF-8") from None
            except json.JSONDecodeError as e:
                raise BadInput(400, f"JSON: malformed at line {e.lineno} column {e.colno} ({e.msg})") from None
            except RecursionError:
                raise BadInput(400, "JSON: nested too deeply") from None
            except (KeyError, TypeError, AttributeError):
                raise BadInput(400, 'JSON: expected {"images": [{"image": <base64>, "box": [x0, y0, x1, y1]}]}') from None
            except (binascii.Error, ValueError):
                raise BadInput(400, "JSON: an `image` is not valid base64") from None
        elif kind == "multipart/form-data":
            form = await self._form(request)
            files = form.get("images", [])
            boxes = form.get("boxes") or [None] * len(files)
            if len(boxes) != len(files):
                raise BadInput(400, f"multipart: {len(boxes)} boxes for {len(files)} images")
            for i, f in enumerate(files):
                if isinstance(f, str):  # a text field would shift every later image's index in the answer
                    raise BadInput(400, f"images[{i}]: a text field, not a file")
            pairs = list(zip(files, boxes))
        else:
            raise BadInput(415, f"content type {kind or 'missing'!r}: send multipart/form-data or application/json")
        if not pairs:
            raise BadInput(400, "batch: no images")
        if len(pairs) > self.cfg.max_images:
            raise BadInput(413, f"batch: {len(pairs)} images is over the {self.cfg.max_images}-image limit")
        t0 = time.perf_counter()
        # Every image is decoded and checked before any joins a batch: a request refused for one bad image costs
        # no forward pass.
        faces = await asyncio.gather(*(self.prepare(data, b, i) for i, (data, b) in enumerate(pairs)))
        return {"results": list(await asyncio.gather(*(self.detect(face, t0) for face in faces)))}

    async def _form(self, request: Request) -> dict[str, list[bytes | str]]:
        """A multipart body as {field: [file bytes or text, ...]}, held to `max_bytes` as it streams in."""
        from starlette.formparsers import MultiPartParser

        parser = MultiPartParser(request.headers, limited_stream(request, self.cfg.max_bytes),
                                 max_files=self.cfg.max_images + 1, max_fields=self.cfg.max_images + 1)
        try:
            form = await parser.parse()
        except BadInput:
            raise
        except Exception as e:  # the multipart parser's own errors, whose messages name the problem
            message = str(e).splitlines()[0] if str(e) else type(e).__name__
            too_big = message.startswith(("Too many", "Part exceeded"))
            raise BadInput(413 if too_big else 400, f"multipart: {message}") from None
        try:
            return {k: [v if isinstance(v, str) else await v.read() for v in form.getlist(k)] for k in form.keys()}
        finally:
            await form.close()


def build_app(args: dict) -> serve.Application:
    """The application for `serve run` / RayService configs: `import_path: mdland.serve.app:build_app`, `args` are
    ServeConfig fields plus optional `num_replicas`, `autoscaling_config` and `ray_actor_options`."""
    args = dict(args)
    deployment = ("num_replicas", "autoscaling_config", "ray_actor_options")
    options = {k: args.pop(k) for k in deployment if k in args}
    known = sorted(f.name for f in fields(ServeConfig))
    unknown = sorted(set(args) - set(known))
    if unknown:
        raise ValueError(f"unknown key(s) {unknown}; known: {known} and the deployment's {list(deployment)}")
    cfg = from_dict(ServeConfig, args)
    if not cfg.detector:
        raise ValueError("detector: no checkpoint given")
    check_counts(cfg, ("max_batch_size", "max_bytes", "max_pixels", "max_images", "decode_threads"))
    if not cfg.max_box_ratio > 0 or cfg.batch_wait_timeout_s < 0:  # non-finite numbers: refused by from_dict
        raise ValueError(f"max_box_ratio must be above 0 and batch_wait_timeout_s at least 0, got "
                         f"{cfg.max_box_ratio} and {cfg.batch_wait_timeout_s}")
    # Replicas run in other working directories; and a checkpoint that will not load fails here, with its reason,
    # rather than in replicas that Serve retries before it gives up with its own message.
    cfg = replace(cfg, detector=storage.absolute(cfg.detector))
    load_detector(cfg.detector)
    if cfg.use_gpu:
        options.setdefault("ray_actor_options", {}).setdefault("num_gpus", 1)
    # Serve admits only this many requests per replica at once (default 5): at least two full batches, so a batch
    # can fill while the one before it runs.
    options.setdefault("max_ongoing_requests", 2 * cfg.max_batch_size)
    return LandmarkService.options(**options).bind(asdict(cfg))


def start_server(args: dict, host: str = "127.0.0.1", port: int | None = None) -> str:
    """Deploy the app on the running (or a new local) Ray and return its base URL; `stop_server()` stops it. Serve
    has one HTTP address per cluster: where it runs already, `port` None takes its address and another is refused;
    on a Serve this starts, None is a free port."""
    import ray

    app = build_app(args)  # bad arguments fail before Ray or Serve starts
    if not ray.is_initialized() and cluster_address() is None and port is not None:
        # This machine's HAProxy would fail to listen deep inside Serve's start, in pages of Ray's log.
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a closing server's TIME_WAIT is no owner
            try:
                probe.bind((host, port))
            except OSError as e:
                hint = "; another server has it (pick another with --port)" if e.errno == errno.EADDRINUSE else ""
                raise ValueError(f"cannot listen on {host}:{port}: {e.strerror}{hint}") from None
    init_ray()
    running = serve.context._get_global_client(raise_if_no_controller_running=False)
    if running is None:
        port = port or free_port()
        serve.start(http_options={"host": host, "port": port})
    else:  # Serve.start would ignore another address, and the app would not be where we said
        have = running.http_config
        if port is not None and (have.host, have.port) != (host, port):
            raise ValueError(f"Serve already runs on this Ray cluster at {have.host}:{have.port}, its one HTTP "
                             f"address: serve there (--host {have.host} --port {have.port}), or stop it first "
                             "(serve shutdown)")
        host, port = have.host, have.port
    serve.run(app, name=APP_NAME, route_prefix="/")
    return f"http://{host}:{port}"


def stop_server() -> None:
    """Take down the app `start_server` began. On a Ray this process started, Serve goes with it (its port freed for
    the next start). On a cluster it joined only the app goes, other apps keep running, and without waiting for its
    replicas to stop: `ray job stop` kills a job 3 s after its SIGTERM, and Serve's controller finishes the work."""
    import ray

    if not ray.is_initialized():  # else Serve would start a Ray only to find no app
        return
    if ray_started_here():
        serve.shutdown()
    elif serve.context._get_global_client(raise_if_no_controller_running=False) is not None:  # Serve had started
        serve.delete(APP_NAME, _blocking=False)
