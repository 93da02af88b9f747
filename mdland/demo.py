"""`mdland demo`: the pipeline on the embedded default — procedural faces, local (or s3://) storage, a report.

Stages that exist so far: procedural source -> shards -> landmark edits and condition images -> metrics.
ControlNet training, generation, the STAR detector and serving join as they land; until then the report
scores a mean-shape baseline, so the metrics path is exercised end to end.
"""

import html
import json
import time
from pathlib import Path

import numpy as np
from PIL import Image

from mdland.data import storage
from mdland.data.preview import write_preview
from mdland.data.procedural import procedural_faces
from mdland.data.shards import ShardWriter, landmarks_array, read_dataset
from mdland.detector.evaluate import metrics_table
from mdland.detector.metrics import nme, plot_ced, summarise
from mdland.landmarks.edits import fit_in_frame, sample_edits
from mdland.landmarks.render import image_grid, render_landmarks
from mdland.log import get_logger

log = get_logger(__name__)


def write_faces(root: str, count: int, seed: int, size: int, start: int = 0, rows_per_shard: int = 64) -> dict:
    writer = ShardWriter(root, rows_per_shard, {"source": "procedural", "seed": seed, "size": size})
    for face in procedural_faces(count, seed, size, start=start):
        writer.add(face)
    return writer.close()


def edit_grid(points: np.ndarray, seed: int, size: int) -> tuple[np.ndarray, list[list[str]]]:
    """Conditions of each face before and after two random edits, side by side."""
    tiles, names = [], []
    for i, p in enumerate(points):
        edited, records = sample_edits(p, np.random.default_rng([seed, i]), k=2)
        tiles += [render_landmarks(p, size), render_landmarks(fit_in_frame(edited, size), size)]
        names.append([r["name"] for r in records])
    return image_grid(tiles, 4), names


def run_demo(out: str = "demo-report", storage_root: str = "demo-data", train: int = 96, test: int = 32,
             size: int = 256, seed: int = 0) -> dict:
    t0 = time.time()
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    train_root, test_root = storage.join(storage_root, "procedural-train"), storage.join(storage_root, "procedural-test")
    log.info("[1/4] writing %d + %d procedural faces to %s", train, test, storage_root)
    write_faces(train_root, train, seed, size)
    write_faces(test_root, test, seed, size, start=train)

    log.info("[2/4] drawing samples and landmark edits")
    write_preview(train_root, out_dir / "samples.png", count=8, columns=4, condition=True)
    train_points = landmarks_array(read_dataset(train_root))
    grid, edit_names = edit_grid(train_points[:8], seed, size)
    Image.fromarray(grid).save(out_dir / "edits.png")

    log.info("[3/4] scoring the mean-shape baseline on the test faces")
    test_points = landmarks_array(read_dataset(test_root))
    baseline = np.broadcast_to(train_points.mean(axis=0), test_points.shape)
    errors = nme(baseline, test_points)
    row = {"name": "procedural-test (mean shape)", **summarise(errors).as_dict()}
    plot_ced({"mean-shape baseline": errors}, out_dir / "ced.png")

    log.info("[4/4] writing the report")
    table = metrics_table([row])
    (out_dir / "metrics.json").write_text(json.dumps([row], indent=1))
    (out_dir / "index.html").write_text(_report_html(table, edit_names, storage_root, time.time() - t0))
    log.info("demo done in %.1fs: open %s", time.time() - t0, out_dir / "index.html")
    return row


def _report_html(table_md: str, edit_names: list[list[str]], storage_root: str, seconds: float) -> str:
    rows = [line.strip("|").split("|") for line in table_md.strip().splitlines() if not line.startswith("|---")]
    table = "".join(
        "<tr>" + "".join(f"<{'th' if i == 0 else 'td'}>{html.escape(c.strip())}</{'th' if i == 0 else 'td'}>"
                         for c in r) + "</tr>"
        for i, r in enumerate(rows)
    )
    edits = ", ".join(" + ".join(n) for n in edit_names)
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>mdland demo</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}img{{max-width:100%}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px}}</style></head><body>
<h1>mdland demo report</h1>
<p>Data in <code>{html.escape(storage_root)}</code>; ran in {seconds:.1f}s.
Stages so far: procedural faces &rarr; shards &rarr; landmark edits &rarr; metrics. ControlNet training, generation,
the STAR detector and serving are not built yet; the metrics below score a mean-shape baseline.</p>
<h2>Faces and their condition images</h2><img src="samples.png">
<h2>Landmark edits (condition before / after)</h2><p>{html.escape(edits)}</p><img src="edits.png">
<h2>Metrics</h2><table>{table}</table><h2>Cumulative error distribution</h2><img src="ced.png">
</body></html>
"""
