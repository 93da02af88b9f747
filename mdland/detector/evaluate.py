"""Scoring landmark predictions against ground truth: tables (JSON + markdown) and CED plots."""

import json
from pathlib import Path

import numpy as np

from mdland.detector.metrics import nme, plot_ced, summarise
from mdland.landmarks.io import LANDMARK_SUFFIXES, read_landmark_file


def read_landmark_set(path: str) -> dict[str, np.ndarray]:
    """Key -> (68, 2) landmarks from a folder of `.pts`/`.txt` files (key: file stem), an `.npy` array of shape
    (N, 68, 2) (key: row index), or a shard dataset (key: the `key` column)."""
    p = Path(path)
    if p.suffix == ".npy":
        arr = np.load(p)
        if arr.ndim != 3 or arr.shape[1:] != (68, 2):
            raise ValueError(f"{p}: expected an (N, 68, 2) array, got shape {arr.shape}")
        return {str(i): a.astype(np.float32) for i, a in enumerate(arr)}
    if p.is_dir() and any(f.suffix.lower() in LANDMARK_SUFFIXES for f in p.iterdir()):
        files = sorted(f for f in p.iterdir() if f.suffix.lower() in LANDMARK_SUFFIXES)
        return {f.stem: read_landmark_file(f) for f in files}
    from mdland.data.shards import landmarks_array, read_dataset

    table = read_dataset(path)
    return dict(zip(table.column("key").to_pylist(), landmarks_array(table)))


def evaluate_predictions(pred: str, gt: str, out: str | None = None, norm: str = "inter_ocular",
                         threshold: float = 0.10, name: str = "predictions") -> dict:
    """Pair predictions with ground truth by key and score them; with `out`, write metrics.json/.md and ced.png."""
    predicted, truth = read_landmark_set(pred), read_landmark_set(gt)
    missing = sorted(truth.keys() - predicted.keys())
    if missing:
        raise ValueError(f"{pred}: no prediction for {len(missing)} ground-truth face(s), e.g. {missing[:3]}")
    keys = sorted(truth)
    p = np.stack([predicted[k] for k in keys])
    g = np.stack([truth[k] for k in keys])
    errors = nme(p, g, norm)
    result = {"name": name, **summarise(errors, norm, threshold).as_dict()}
    if out:
        out_dir = Path(out)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "metrics.json").write_text(json.dumps(result, indent=1))
        (out_dir / "metrics.md").write_text(metrics_table([result]))
        plot_ced({name: errors}, out_dir / "ced.png", threshold)
    return result


def metrics_table(rows: list[dict]) -> str:
    """The paper's table layout: NME (%), FR@t (%), AUC@t per evaluation set."""
    t = rows[0]["threshold"] * 100 if rows else 10
    lines = [f"| set | faces | NME (%) | FR@{t:g}% (%) | AUC@{t:g}% |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['count']} | {r['nme'] * 100:.2f} | {r['fr'] * 100:.2f} | {r['auc']:.4f} |")
    return "\n".join(lines) + "\n"
