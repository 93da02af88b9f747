"""`mdland demo`: the whole method on the embedded default, on one machine, in minutes on a CPU.

procedural faces -> ingest -> stage 1 ControlNet (empty prompts) -> stage 2 (style prompts) -> generate a synthetic set
(edited landmarks x styles) -> fine-tune the STAR detector (tiny) -> evaluate -> serve it and query it once ->
`demo-report/index.html`. Every training and generation stage runs on a local Ray (Ray Train + DeepSpeed, Ray Data),
with tiny random-initialised models; storage is a local folder or `s3://` (`--storage`).
"""

import html
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from mdland.cluster import init_ray
from mdland.config import check_counts
from mdland.data import storage
from mdland.data.ingest import ingest
from mdland.data.procedural import procedural_faces, write_faces
from mdland.data.shards import landmarks_array, read_dataset
from mdland.detector.evaluate import metrics_table
from mdland.detector.metrics import nme, plot_ced, summarise
from mdland.landmarks.edits import fit_in_frame, sample_edits
from mdland.landmarks.io import write_pts
from mdland.landmarks.render import image_grid, render_landmarks
from mdland.log import get_logger

log = get_logger(__name__)


@dataclass
class DemoSize:
    train: int = 384  # procedural faces to learn from
    test: int = 32  # held-out faces to evaluate on
    size: int = 64  # stored and model resolution
    controlnet_steps: int = 30  # per stage
    styles: int = 3  # of the 25 shipped styles
    images_per_style: int = 16
    sampling_steps: int = 10
    detector_epochs: int = 6
    seed: int = 0


def write_annotated_folder(folder: Path, count: int, seed: int, start: int = 0) -> None:
    """Procedural faces as an ArtFace-style folder (PNG + 1-based .pts), drawn larger than stored, for ingest."""
    folder.mkdir(parents=True, exist_ok=True)
    for face in procedural_faces(count, seed, 128, start=start):
        (folder / f"{face.key}.png").write_bytes(face.image)
        write_pts(folder / f"{face.key}.pts", face.landmarks)


def edit_grid(points: np.ndarray, seed: int, size: int) -> tuple[np.ndarray, list[list[str]]]:
    """Conditions of each face before and after two random edits, side by side."""
    tiles, names = [], []
    for i, p in enumerate(points):
        edited, records = sample_edits(p, np.random.default_rng([seed, i]), k=2)
        tiles += [render_landmarks(p, size), render_landmarks(fit_in_frame(edited, size), size)]
        names.append([r["name"] for r in records])
    return image_grid(tiles, 4), names


def _copy_picture(uri: str, path: Path) -> str:
    path.write_bytes(storage.read_bytes(uri))
    return path.name


DEMO_MARKER = ".mdland-demo"


def _claim_storage(root: str) -> None:
    """Mark `root` as the demo's, or refuse it when it holds files of something else (the demo replaces its
    folders there, and `--storage s3://bucket` must never wipe a real synthetic set)."""
    marker = storage.join(root, DEMO_MARKER)
    if storage.exists(marker):
        return
    try:
        storage.fingerprint(root)
    except storage.StorageError:  # nothing there yet
        storage.write_bytes(marker, b"written by mdland demo: its folders here are replaced on every run\n")
        return
    raise ValueError(f"--storage {root}: holds files the demo did not write, and the demo replaces its folders "
                     "there; give it an empty folder (or one an earlier demo used)")


def run_demo(out: str = "demo-report", storage_root: str = "demo-data", sizes: DemoSize = DemoSize()) -> dict:
    from mdland.detector.evaluate import evaluate_detector
    from mdland.detector.train import DetectorTrainConfig
    from mdland.detector.train import run_training as train_detector
    from mdland.diffusion.train import ControlNetTrainConfig
    from mdland.diffusion.train import run_training as train_controlnet
    from mdland.generation.pipeline import PREVIEW, run_generation
    from mdland.generation.plan import DEFAULT_STYLES, GenerateConfig, load_styles

    s = sizes
    check_counts(s, ("train", "test", "size", "controlnet_steps", "styles", "images_per_style", "sampling_steps",
                     "detector_epochs"))
    shipped = load_styles(DEFAULT_STYLES)
    if s.styles > len(shipped):
        raise ValueError(f"styles: at most {len(shipped)} (the shipped styles), got {s.styles}")
    t0 = time.time()
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    root = storage.absolute(storage_root)
    data = {k: storage.join(root, k) for k in ("real-train", "real-test", "multi-domain", "synthetic", "runs")}
    timings: dict[str, float] = {}
    # A demo starts from scratch: runs of the same name would resume (and skip training), and an earlier synthetic
    # set of another plan would be refused. It deletes only in a folder it has claimed as its own.
    _claim_storage(root)
    # Several logical CPUs even on a 2-core machine, so training workers never starve Ray Data's tasks. Started
    # before anything is deleted: a Ray that cannot start leaves the earlier demo's data as it was.
    init_ray(num_cpus=4)
    for folder in ("runs", "synthetic"):
        storage.delete_folder(data[folder])

    def stage(name: str, t: float) -> None:
        timings[name] = round(time.time() - t, 1)
        log.info("%s done in %.1fs", name, timings[name])

    log.info("[1/8] ingest: %d + %d procedural faces as ArtFace-style folders -> shards in %s", s.train, s.test, root)
    t = time.time()
    with tempfile.TemporaryDirectory() as d:
        write_annotated_folder(Path(d) / "train", s.train, s.seed)
        write_annotated_folder(Path(d) / "test", s.test, s.seed, start=s.train)
        ingest("artface", Path(d) / "train", data["real-train"], size=s.size, overwrite=True, source="procedural")
        ingest("artface", Path(d) / "test", data["real-test"], size=s.size, overwrite=True, source="procedural")
    # Stage 2's small multi-domain set: faces in the procedural source's styles, each with its style prompt.
    write_faces(data["multi-domain"], s.train, s.seed, size=s.size, start=s.train + s.test)
    stage("ingest", t)

    # Two workers each take a batch: keep batches within the smallest settings' data.
    common = dict(model="tiny", data=[data["real-train"]], resolution=s.size, batch_size=max(1, min(4, s.train // 2)),
                  learning_rate=1e-3,
                  max_steps=s.controlnet_steps, checkpoint_every=s.controlnet_steps, log_every=max(1, s.controlnet_steps // 3),
                  num_validation=4, validation_steps=4, num_workers=2, cpus_per_worker=0.5, storage_path=data["runs"],
                  seed=s.seed)
    log.info("[2/8] stage 1: ControlNet on the faces with empty prompts (Ray Train, 2 workers, DeepSpeed)")
    t = time.time()
    stage1 = train_controlnet(ControlNetTrainConfig(**common, stage="stage1", name="stage1"))
    stage("stage 1", t)
    log.info("[3/8] stage 2: from stage 1's export, on the multi-domain set with style prompts")
    t = time.time()
    stage2 = train_controlnet(ControlNetTrainConfig(**{**common, "data": [data["multi-domain"]]}, stage="stage2",
                                                    controlnet=stage1["export"], name="stage2"))
    stage("stage 2", t)

    styles = [st["name"] for st in shipped[: s.styles]]
    log.info("[4/8] generate: %d styles x %d edited landmark sets (Ray Data, generation actors)", len(styles),
             s.images_per_style)
    t = time.time()
    generated = run_generation(GenerateConfig(
        source=[data["real-train"]], output=data["synthetic"], controlnet=stage2["export"], styles=styles,
        images_per_style=s.images_per_style, seed=s.seed, resolution=s.size, num_inference_steps=s.sampling_steps,
        rows_per_shard=16, batch_size=8))
    stage("generate", t)

    log.info("[5/8] fine-tune the detector (tiny STAR) on synthetic + real faces (Ray Train, 2 workers)")
    t = time.time()
    # No texture augmentation: it is for domains with occlusion and blur, and slows a few-epoch CPU run on clean
    # procedural faces (8 epochs on 384 faces: 5.2% NME with it, 3.6% without).
    detector = train_detector(DetectorTrainConfig(
        arch="tiny", data=[data["synthetic"], data["real-train"]], val_data=[data["real-test"]], epochs=s.detector_epochs,
        texture=False, batch_size=max(1, min(8, (s.train + generated["count"]) // 2)), learning_rate=1e-3,
        num_workers=2, cpus_per_worker=0.5, storage_path=data["runs"], name="detector", seed=s.seed, log_every=10,
        ema_half_life=s.train + generated["count"]))  # an epoch of faces: STAR's 10,000 outlast the demo's epochs
    stage("fine-tune detector", t)

    log.info("[6/8] evaluate on the held-out faces")
    t = time.time()
    rows = evaluate_detector(detector["best"], [("procedural-test", data["real-test"], None)], str(out_dir))
    train_points = landmarks_array(read_dataset(data["real-train"]))
    test_points = landmarks_array(read_dataset(data["real-test"]))
    baseline = nme(np.broadcast_to(train_points.mean(axis=0), test_points.shape), test_points)
    rows.append({"name": "procedural-test (mean-shape baseline)", **summarise(baseline).as_dict()})
    detected = np.array([f["nme"] for f in json.loads((out_dir / "per-face.json").read_text())["procedural-test"]])
    plot_ced({"procedural-test": detected, "mean-shape baseline": baseline}, out_dir / "ced.png")
    (out_dir / "metrics.json").write_text(json.dumps(rows, indent=1))
    stage("evaluate", t)

    log.info("[7/8] serve the detector (Ray Serve) and query it once")
    t = time.time()
    served = query_server_once(detector["best"], data["real-test"])
    stage("serve", t)

    log.info("[8/8] report")
    _copy_picture(storage.join(data["synthetic"], PREVIEW), out_dir / "samples.png")
    pictures = {
        "stage1_loss": _copy_picture(storage.join(stage1["checkpoint"], "loss.png"), out_dir / "stage1-loss.png"),
        "stage2_loss": _copy_picture(storage.join(stage2["checkpoint"], "loss.png"), out_dir / "stage2-loss.png"),
        "stage2_validation": _copy_picture(storage.join(stage2["checkpoint"], "validation.png"),
                                           out_dir / "stage2-validation.png"),
        "detector_loss": _copy_picture(storage.join(detector["checkpoint"], "loss.png"), out_dir / "detector-loss.png"),
    }
    grid, edit_names = edit_grid(train_points[:4], s.seed, s.size)
    Image.fromarray(grid).save(out_dir / "edits.png")
    (out_dir / "metrics.md").write_text(metrics_table(rows))
    summary = {"metrics": rows, "generated": generated, "served": served, "timings_s": timings,
               "seconds": round(time.time() - t0, 1), "storage": root}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    (out_dir / "index.html").write_text(_report_html(rows, edit_names, summary, pictures))
    log.info("demo done in %.1fs: open %s", time.time() - t0, out_dir / "index.html")
    return summary


def query_server_once(detector: str, test_data: str) -> dict:
    """Start the Serve app, send it one held-out face over HTTP, and stop it."""
    import requests

    from mdland.serve.app import start_server, stop_server

    table = read_dataset(test_data)
    png, truth = table.column("image")[0].as_py(), landmarks_array(table)[0]
    url = start_server({"detector": detector})  # a free port, or the one Serve has on a joined cluster
    try:
        reply = requests.post(f"{url}/v1/landmarks", data=png, headers={"content-type": "image/png"}, timeout=120)
        reply.raise_for_status()
        body = reply.json()
    finally:
        stop_server()
    return {"status": reply.status_code, "nme": float(nme(np.array(body["landmarks"]), truth)[0]),
            "time_ms": body["time_ms"]}


def _report_html(rows: list[dict], edit_names: list[list[str]], summary: dict, pictures: dict) -> str:
    table = "".join(
        f"<tr><td>{html.escape(r['name'])}</td><td>{r['count']}</td><td>{r['nme'] * 100:.2f}</td>"
        f"<td>{r['fr'] * 100:.2f}</td><td>{r['auc']:.4f}</td></tr>" for r in rows)
    timings = ", ".join(f"{k} {v}s" for k, v in summary["timings_s"].items())
    served = summary["served"]
    edits = "; ".join(" + ".join(n) for n in edit_names)
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>mdland demo</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto;line-height:1.4}}img{{max-width:100%}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px}}</style></head><body>
<h1>mdland demo report</h1>
<p>The whole method on the embedded default: procedural faces &rarr; ingest &rarr; stage 1 and stage 2 ControlNet
training (Ray Train + DeepSpeed) &rarr; synthetic set generation (Ray Data) &rarr; STAR detector fine-tuning &rarr;
evaluation &rarr; Ray Serve. Tiny random-initialised models on a CPU: the point is the system, not the numbers.
Data in <code>{html.escape(summary['storage'])}</code>; {summary['seconds']}s in all ({html.escape(timings)}).</p>
<h2>Metrics on held-out faces</h2>
<table><tr><th>set</th><th>faces</th><th>NME (%)</th><th>FR@10% (%)</th><th>AUC@10%</th></tr>{table}</table>
<p>Served detector, one held-out face over HTTP: status {served['status']}, NME {served['nme'] * 100:.2f}%,
{served['time_ms']} ms in the replica.</p>
<h2>Cumulative error distribution</h2><img src="ced.png">
<h2>Generated faces, a row per style (each with the landmarks it was drawn from)</h2><img src="samples.png">
<p>{summary['generated'].get('count')} images generated.</p>
<h2>Landmark edits (condition before / after)</h2><p>{html.escape(edits)}</p><img src="edits.png">
<h2>Training curves</h2>
<p>Stage 1</p><img src="{pictures['stage1_loss']}"><p>Stage 2</p><img src="{pictures['stage2_loss']}">
<p>Stage 2 validation: edited conditions and what the ControlNet draws for them</p>
<img src="{pictures['stage2_validation']}">
<p>Detector</p><img src="{pictures['detector_loss']}">
<h2>Worst and best predictions</h2><img src="overlays-procedural-test.png">
</body></html>
"""
