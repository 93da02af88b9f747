"""`mdland generate`: the synthetic set as a resumable Ray Data pipeline.

pending shard indices -> plan + edit, then render in blocks of one batch (CPU tasks) -> generation actors (one model each, loaded once;
one GPU each with `use_gpu`) -> CPU tasks that PNG-encode (with GPUs) and hand each row to the shard assembler that
owns its shard (shard mod N; each writes a shard atomically once all its rows are in) -> manifest.json, preview.png.
Shards that exist are complete (writes are atomic), so a re-run writes only the missing ones.
"""

import json
import time
from collections import defaultdict
from dataclasses import asdict, replace

import numpy as np
import pyarrow.parquet as pq

from mdland.cluster import check_gpus, init_ray
from mdland.config import check_counts, from_dict
from mdland.data import storage
from mdland.data.preview import style_preview
from mdland.data.shards import (MANIFEST, Face, encode_image, landmarks_from_rows, shard_name, summarise_table,
                                 write_manifest, write_shard)
from mdland.diffusion.models import PRESETS, check_controlnet, check_model_dir
from mdland.generation.plan import (COMPILE_MODES, GenerateConfig, load_styles, render_conditions, shard_rows,
                                    source_landmarks)
from mdland.landmarks.edits import EDITS
from mdland.log import get_logger, setup_logging

log = get_logger(__name__)
PLAN = "plan.json"
PREVIEW = "preview.png"
WRITE_ATTEMPTS = 5  # of a shard, 1 + 2 + 4 + 8 s apart


def _torch_dtype(cfg: GenerateConfig, on_gpu: bool):
    import torch

    return getattr(torch, cfg.dtype) if on_gpu else torch.float32


def build_sampler(cfg: GenerateConfig):
    """The sampler a generation actor holds: SD parts + the ControlNet export, on this worker's device."""
    from mdland.diffusion.models import build_controlnet, load_components
    from mdland.generation.sampler import LandmarkSampler
    from mdland.session import pick_device

    device = pick_device(cfg.use_gpu)
    on_gpu = device.type == "cuda"
    components = load_components(cfg.model, seed=cfg.seed)
    controlnet = build_controlnet(components, cfg.controlnet)
    return LandmarkSampler(components, controlnet, device, _torch_dtype(cfg, on_gpu),
                           cfg.num_inference_steps, cfg.guidance_scale, cfg.eta, channels_last=cfg.channels_last and on_gpu,
                           compile=cfg.compile and on_gpu, vae_batch_size=cfg.vae_batch_size,
                           fuse_qkv=cfg.fuse_qkv and on_gpu, compile_mode=cfg.compile_mode)


def check_weights(cfg: GenerateConfig, weights: dict) -> None:
    """Fail when the weights at the config's paths are no longer the ones the run planned with (`weights`: the plan's
    fingerprints): a training run that goes on re-publishes its export at the same path, and one output folder must
    not mix the images of two ControlNets."""
    for name, planned in weights.items():
        if name != "source" and storage.fingerprint(getattr(cfg, name)) != planned:
            raise ValueError(f"{name}: {getattr(cfg, name)} changed after this run planned its samples (re-published?); "
                             "run again to plan with the weights there now")


class GenerationActor:
    """Holds one sampler (and optionally a detector) for its lifetime; turns batches of conditions into images (uint8
    on GPU, for the encode tasks; PNG on CPU), each scored by the detector's NME against the landmarks it was drawn
    from."""

    def __init__(self, config: dict, weights: dict):
        setup_logging()
        self.cfg = from_dict(GenerateConfig, config)
        check_weights(self.cfg, weights)
        self.sampler = build_sampler(self.cfg)
        self.detector = None
        if self.cfg.detector:
            from mdland.detector.checkpoint import load_detector

            self.detector = load_detector(self.cfg.detector, device=self.sampler.device).eval().to(
                dtype=self.sampler.dtype)
        check_weights(self.cfg, weights)  # nothing was re-published while this actor loaded
        self.done, self.t0 = 0, time.time()

    def alignment(self, images: np.ndarray, points: np.ndarray) -> np.ndarray:
        from mdland.detector.data import CROP_MARGIN
        from mdland.detector.inference import predict
        from mdland.detector.metrics import nme
        from mdland.landmarks.align import crop_from_landmarks

        pred = predict(self.detector, list(images), [crop_from_landmarks(p, CROP_MARGIN) for p in points],
                       self.sampler.dtype)
        return nme(pred, points).astype(np.float32)

    def __call__(self, batch: dict) -> dict:
        from mdland.generation.sampler import to_uint8

        images = to_uint8(self.sampler(batch["condition"], [str(p) for p in batch["prompt"]],
                                       [int(s) for s in batch["seed"]]))
        self.done += len(images)
        log.info("actor: %d images, %.2f images/s", self.done, self.done / (time.time() - self.t0))
        out = {k: v for k, v in batch.items() if k != "condition"}
        out["image"] = images
        if not self.cfg.use_gpu:
            out = encode_images(out)
        out["alignment"] = (self.alignment(images, landmarks_from_rows(batch["landmarks"])) if self.detector is not None
                            else np.full(len(images), np.nan, dtype=np.float32))
        return out


class ShardAssembler:
    """Collects generated rows by shard and writes each shard, atomically, as soon as all its rows are in
    (leaving out the pairs the alignment filter rejects)."""

    def __init__(self, config: dict, total: int, weights: dict):
        setup_logging()
        self.cfg = from_dict(GenerateConfig, config)
        self.total = total  # from the driver, which read the styles file
        # Keyed by sample index, so a row delivered twice (a retried task) counts once.
        self.rows: dict[int, dict[int, Face | None]] = defaultdict(dict)
        # Written shard -> (the delivery that completed it, its summary). Rows that come again (a retried task) are
        # dropped; a retry of the completing delivery gets the summary again, as its first answer died with it.
        self.written: dict[int, tuple[int, str]] = {}
        self.model = f"{self.cfg.controlnet}@{weights['controlnet']}"  # path@version, as planned (check_weights)

    def write(self, shard: int, faces: list[Face]) -> dict:
        """`write_shard`, tried again after an OSError (S3 throttling, a network outage) with growing pauses."""
        uri = storage.join(self.cfg.output, shard_name(shard))
        for attempt in range(WRITE_ATTEMPTS):
            try:
                return write_shard(uri, faces)
            except OSError as e:
                if attempt == WRITE_ATTEMPTS - 1:
                    raise
                log.warning("%s: %s; trying again in %d s", uri, e, 2**attempt)
                time.sleep(2**attempt)

    def rejects(self, score: float) -> bool:
        return self.cfg.min_alignment is not None and not np.isnan(score) and score > self.cfg.min_alignment

    def expected(self, shard: int) -> int:
        return min(self.cfg.rows_per_shard, self.total - shard * self.cfg.rows_per_shard)

    def add(self, batch: dict) -> dict:
        """Take rows of this assembler's shards; returns the shards this completed and wrote, with summaries."""
        points = landmarks_from_rows(batch["landmarks"])
        delivery = int(batch["index"][0])  # sample indices are in one block only: the same for a retried delivery
        written = []
        for i in range(len(batch["index"])):
            shard = int(batch["shard"][i])
            if shard in self.written:
                if self.written[shard][0] == delivery and shard not in (w[0] for w in written):
                    written.append((shard, self.written[shard][1]))
                continue
            score = float(batch["alignment"][i])
            self.rows[shard][int(batch["index"][i])] = None if self.rejects(score) else Face(
                image=batch["image"][i], landmarks=points[i],
                key=str(batch["key"][i]), prompt=str(batch["prompt"][i]), style=str(batch["style"][i]),
                source="synthetic", edits=str(batch["edits"][i]).split(","),
                edit_params=json.loads(batch["edit_params"][i]), seed=int(batch["seed"][i]), model=self.model,
                alignment=None if np.isnan(score) else score)
        for shard in [s for s, rows in self.rows.items() if len(rows) == self.expected(s)]:
            faces = sorted((f for f in self.rows[shard].values() if f is not None), key=lambda f: f.key)
            summary = json.dumps(self.write(shard, faces))
            # Dropped only once written: when a write fails for good, a retried delivery completes the shard again.
            del self.rows[shard]
            self.written[shard] = (delivery, summary)
            written.append((shard, summary))
        return {"shard": np.array([w[0] for w in written], dtype=np.int64),
                "summary": np.array([w[1] for w in written], dtype=object)}


def encode_images(batch: dict) -> dict:
    """uint8 images -> PNG bytes, in CPU tasks, so a generation actor goes straight on to its next batch."""
    return {**batch, "image": np.array([encode_image(im) for im in batch["image"]], dtype=object)}


def deliver_rows(batch: dict, assemblers: list, encode: bool) -> dict:
    """Hand each row (PNG-encoded first if `encode`) to the assembler that owns its shard (shard mod N), so every
    shard is written exactly once, whichever actor drew its rows; returns the shards written."""
    import ray

    if encode:
        batch = encode_images(batch)
    owner = np.asarray(batch["shard"]) % len(assemblers)
    calls = [assemblers[a].add.remote({k: v[owner == a] for k, v in batch.items()})
             for a in np.unique(owner)]
    written = ray.get(calls)
    return {"shard": np.concatenate([np.zeros(0, np.int64)] + [w["shard"] for w in written]),
            "summary": np.concatenate([np.zeros(0, object)] + [w["summary"] for w in written])}


def _plan_rows(row: dict, config: dict, styles: list[dict], landmarks) -> list[dict]:
    import ray

    return shard_rows(from_dict(GenerateConfig, config), int(row["shard"]), styles, ray.get(landmarks))


def _check_plan(cfg: GenerateConfig) -> dict:
    """An output folder belongs to one plan: refuse to mix samples of another into it. Returns the plan's identity."""
    uri = storage.join(cfg.output, PLAN)
    ident = cfg.plan_identity()
    existing = json.loads(storage.read_bytes(uri)) if storage.exists(uri) else None
    if existing == ident:
        return ident
    shards = storage.list_files(cfg.output, ".parquet")
    if existing is None and (shards or storage.exists(storage.join(cfg.output, MANIFEST))):
        # Another dataset (an ingested one, a source): its shards would count as this plan's, its manifest replaced.
        raise ValueError(f"output: {cfg.output} holds a dataset that no generation run planned (no {PLAN}); "
                         "use a new output folder")
    if existing is not None:
        if shards:
            changed = sorted(k for k in ident if existing.get(k) != ident[k])
            raise ValueError(f"output: {cfg.output} holds a different plan (differs in {changed}); "
                             "use a new output folder")
        log.info("%s: replacing the plan of an earlier run that wrote no shard", cfg.output)
    storage.write_bytes(uri, json.dumps(ident, indent=1).encode())
    return ident


def pending_shards(cfg: GenerateConfig) -> list[int]:
    done = set(storage.list_files(cfg.output, ".parquet"))
    return [k for k in range(cfg.num_shards) if storage.join(cfg.output, shard_name(k)) not in done]


def _shard_summary(uri: str) -> dict:
    fs, path = storage.filesystem(uri)
    table = pq.read_table(path, filesystem=fs, columns=["style", "source", "model"])
    return summarise_table(table, uri.rstrip("/").split("/")[-1])


def check_generation_settings(cfg: GenerateConfig) -> None:
    """The sampling and editing settings, checked on the driver: in a task or an actor they fail later and without
    the field's name."""
    check_counts(cfg, ("images_per_style", "rows_per_shard", "batch_size", "num_actors", "num_assemblers",
                       "num_inference_steps", "vae_batch_size", "max_shards"))
    if not 1 <= cfg.edits_per_sample <= len(EDITS):
        raise ValueError(f"edits_per_sample: between 1 and {len(EDITS)} (the distinct edits), got "
                         f"{cfg.edits_per_sample}")
    if cfg.seed < 0:
        raise ValueError(f"seed: must not be negative, got {cfg.seed}")
    if cfg.resolution < 64 or cfg.resolution % 64:
        raise ValueError(f"resolution: must be a multiple of 64 (SD 1.x's VAE and UNet halve it six times in "
                         f"all), got {cfg.resolution}")
    for name in ("guidance_scale", "eta", "edit_strength"):
        value = getattr(cfg, name)
        if not np.isfinite(value) or value < 0:
            raise ValueError(f"{name}: must be a finite number of at least 0, got {value}")
    if cfg.num_inference_steps > 1000:
        raise ValueError(f"num_inference_steps: at most SD's 1000 training timesteps, got {cfg.num_inference_steps}")
    if cfg.dtype not in ("float16", "bfloat16"):  # on the CPU too: the same config goes on to a GPU run
        raise ValueError(f"dtype: expected float16 or bfloat16, got {cfg.dtype!r}")
    if cfg.compile_mode is not None:
        if not cfg.compile:
            raise ValueError(f"compile_mode: {cfg.compile_mode!r} is for compiled runs; set `compile: true` too")
        if cfg.compile_mode not in COMPILE_MODES:
            raise ValueError(f"compile_mode: one of {', '.join(COMPILE_MODES)}, got {cfg.compile_mode!r}")


def run_generation(cfg: GenerateConfig) -> dict:
    """Generate the planned set's missing shards, then (when the set is complete) write the manifest and a preview
    of each style's first faces."""
    cfg = replace(cfg, source=[storage.absolute(s) for s in cfg.source], output=storage.absolute(cfg.output),
                  controlnet=storage.absolute(cfg.controlnet), styles_file=storage.absolute(cfg.styles_file),
                  model=cfg.model if cfg.model in PRESETS else storage.absolute(cfg.model),
                  detector=cfg.detector and storage.absolute(cfg.detector))
    if not cfg.source or not all(cfg.source):
        raise ValueError(f"source: no source dataset given (got {cfg.source})")
    if not cfg.output:
        raise ValueError("output: no output location given")
    if not cfg.controlnet:
        raise ValueError("controlnet: no ControlNet export given")
    check_model_dir(cfg.model)
    check_controlnet(cfg.controlnet, cfg.model)
    styles = load_styles(cfg.styles_file, cfg.styles)
    if cfg.min_alignment is not None and not cfg.detector:
        raise ValueError("min_alignment: needs a detector to score the images with")
    if cfg.detector:
        from mdland.detector.checkpoint import load_detector

        load_detector(cfg.detector)  # a bad checkpoint fails here, before any actor starts
    check_generation_settings(cfg)
    landmarks = source_landmarks(cfg)
    storage.check_writable(cfg.output)
    plan = _check_plan(cfg)
    pending = pending_shards(cfg)
    if cfg.max_shards is not None:
        pending = pending[: cfg.max_shards]  # checked to be at least 1
    log.info("plan: %d styles x %d = %d samples in %d shards; %d to generate", len(styles), cfg.images_per_style,
             cfg.total, cfg.num_shards, len(pending))
    rates = (_run_pipeline(cfg, pending, styles, landmarks, plan["weights"]) if pending
             else {"images_per_s": None, "steady_images_per_s": None})
    remaining = pending_shards(cfg)
    if remaining:
        log.info("%d shard(s) still missing; the manifest is written once the set is complete", len(remaining))
        return {"complete": False, "missing": len(remaining), "total": cfg.total, **rates}
    shards = [_shard_summary(u) for u in storage.list_files(cfg.output, ".parquet")]
    manifest = write_manifest(cfg.output, shards, asdict(cfg), complete=True, model=cfg.model,
                              controlnet=cfg.controlnet, weights=plan["weights"], planned=cfg.total)
    log.info("complete: %d images, %s", manifest["count"], manifest["styles"])
    if cfg.min_alignment is not None:
        dropped = cfg.total - manifest["count"]
        (log.warning if dropped == cfg.total else log.info)(
            "min_alignment %g dropped %d of the %d samples (the `alignment` column of an unfiltered run shows the "
            "scores)", cfg.min_alignment, dropped, cfg.total)
    preview = storage.join(cfg.output, PREVIEW)
    try:  # a look at the set: the set is complete without it
        storage.write_bytes(preview, encode_image(style_preview(cfg.output, [s["name"] for s in styles])))
        log.info("a look at each style: %s", preview)
    except (ValueError, OSError) as e:
        log.warning("no %s: %s", preview, e)
    return {"complete": True, "count": manifest["count"], "total": cfg.total, **rates}


def conditioned_rows(cfg: GenerateConfig, pending: list[int], styles: list[dict], landmarks: np.ndarray):
    """The planned rows of the `pending` shards with their condition images, as a Ray Dataset; for GPU actors, in
    blocks of exactly `batch_size` rows (the run's last block holds the rest). Left to Ray, a shard's ~200 MB of
    conditions would be cut into blocks of any size, each ending in a short batch: a new shape, which cuDNN
    autotunes again and torch.compile recompiles for. (On CPU shapes cost nothing extra, and the rebundling stage's
    tasks would need a whole core, which a 2-core machine running actors and assemblers does not have free.)"""
    import ray

    ds = ray.data.from_items([{"shard": k} for k in pending], override_num_blocks=len(pending))
    ds = ds.flat_map(_plan_rows, fn_kwargs={"config": asdict(cfg), "styles": styles, "landmarks": ray.put(landmarks)},
                     num_cpus=0.5)
    ds = ds.map_batches(render_conditions, fn_kwargs={"resolution": cfg.resolution}, batch_size=cfg.batch_size,
                        batch_format="numpy", num_cpus=0.5)
    return ds.repartition(target_num_rows_per_block=cfg.batch_size, strict=True) if cfg.use_gpu else ds


def _run_pipeline(cfg: GenerateConfig, pending: list[int], styles: list[dict], landmarks: np.ndarray,
                  weights: dict) -> dict:
    """Run the pipeline over `pending` shards; returns its images/s overall (from the start, the actors' model
    loading included) and steady (first to last shard written; None from fewer than 3 shards)."""
    import ray

    init_ray()
    if cfg.use_gpu:
        check_gpus(cfg.num_actors, "use_gpu")
    config = asdict(cfg)
    ds = conditioned_rows(cfg, pending, styles, landmarks)
    ds = ds.map_batches(GenerationActor, fn_constructor_kwargs={"config": config, "weights": weights},
                        batch_size=cfg.batch_size, compute=ray.data.ActorPoolStrategy(size=cfg.num_actors),
                        num_gpus=1 if cfg.use_gpu else 0, num_cpus=cfg.cpus_per_actor)
    # Plain actors, not a Ray Data stage, so that each shard's rows meet in one of them. One keeps up with about
    # 20-50 GPUs (`mdland bench write`), hence one per 16 generation actors by default.
    total = len(styles) * cfg.images_per_style
    count = cfg.num_assemblers or -(-cfg.num_actors // 16)
    reserved, cpus = cfg.num_actors * cfg.cpus_per_actor + 0.25 * count, ray.cluster_resources().get("CPU", 0)
    if reserved + 0.5 > cpus:  # 0.5: a planning or rendering task
        log.warning("generation actors and assemblers take %.2f of the cluster's %g CPUs, leaving no room for the "
                    "0.5 CPU that planning and rendering tasks need: the run waits until the cluster grows "
                    "(lower num_actors or cpus_per_actor)", reserved, cpus)
    t0, images, done, marks = time.time(), 0, 0, []
    expected = sum(min(cfg.rows_per_shard, total - k * cfg.rows_per_shard) for k in pending)
    assemblers = []
    try:
        assemblers += [ray.remote(ShardAssembler).options(num_cpus=0.25).remote(config, total, weights)
                       for _ in range(count)]
        # With GPUs, these tasks also PNG-encode, so a GPU only samples. (A CPU actor encodes its own images: the
        # tasks would only compete with it for the same cores.)
        # Ray Data retries a delivery task lost with its node; assemblers keep a shard's rows until its write
        # succeeds and count a row delivered twice once.
        ds = ds.map_batches(deliver_rows, fn_kwargs={"assemblers": assemblers, "encode": cfg.use_gpu},
                            batch_format="numpy", batch_size=None, num_cpus=0.5 if cfg.use_gpu else 0.25)
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for shard, summary in zip(batch["shard"], batch["summary"]):
                images += json.loads(summary)["rows"]
                done += min(cfg.rows_per_shard, total - int(shard) * cfg.rows_per_shard)
                marks.append((time.time(), images))
                kept = f" ({images} images kept by min_alignment)" if cfg.min_alignment is not None else ""
                log.info("wrote %s: %d/%d samples of this run%s, %.2f images/s overall", json.loads(summary)["name"],
                         done, expected, kept, images / (time.time() - t0))
    finally:
        for assembler in assemblers:
            ray.kill(assembler)
    rates: dict = {"images_per_s": images / (time.time() - t0) if images else None, "steady_images_per_s": None}
    # First to last shard written, past the actors' start-up; shards written together (by one delivery) would make
    # two marks a rate of nothing, so it takes three at distinct times.
    if len(marks) >= 3 and marks[-1][0] > marks[0][0]:
        rates["steady_images_per_s"] = (marks[-1][1] - marks[0][1]) / (marks[-1][0] - marks[0][0])
    return rates
