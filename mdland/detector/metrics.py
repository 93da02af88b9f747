"""Landmark metrics as STAR evaluates them: NME, failure rate and AUC at a threshold, and the CED curve.

- NME: mean point-to-point error of a face divided by a normalising distance; inter-ocular (outer eye corners,
  points 36 and 45) by default, as in the paper's table.
- The CED: for thresholds 0, step, ..., t (step 1e-4), the share of faces whose NME is at most the threshold.
- FR@t: 1 - CED(t). AUC@t: Simpson's rule over the CED on [0, t], divided by t.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mdland.landmarks.scheme import LEFT_EYE, OUTER_EYE_CORNERS, RIGHT_EYE

NORMALISATIONS = ("inter_ocular", "inter_pupil", "box")


def normalising_distance(gt: np.ndarray, norm: str = "inter_ocular") -> np.ndarray:
    """Per-face normalising distance for (N, 68, 2) ground truth."""
    gt = np.asarray(gt, dtype=np.float64)
    if norm == "inter_ocular":
        a, b = OUTER_EYE_CORNERS
        return np.linalg.norm(gt[:, a] - gt[:, b], axis=-1)
    if norm == "inter_pupil":
        return np.linalg.norm(gt[:, LEFT_EYE].mean(1) - gt[:, RIGHT_EYE].mean(1), axis=-1)
    if norm == "box":
        # sqrt(w * h) of the landmarks' bounding box, the common "box" normalisation.
        extent = gt.max(axis=1) - gt.min(axis=1)
        return np.sqrt(extent[:, 0] * extent[:, 1])
    raise ValueError(f"unknown NME normalisation {norm!r}; choose one of {NORMALISATIONS}")


def nme(pred: np.ndarray, gt: np.ndarray, norm: str = "inter_ocular", names: list[str] | None = None) -> np.ndarray:
    """Per-face NME of (N, 68, 2) predictions (a single (68, 2) face is taken as N=1). A face whose normalising
    distance is zero fails, named by `names` (its key) or else by its position."""
    pred = np.asarray(pred, dtype=np.float64)
    gt = np.asarray(gt, dtype=np.float64)
    if pred.ndim == 2:
        pred, gt = pred[None], gt[None]
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} does not match ground truth {gt.shape}")
    dist = normalising_distance(gt, norm)
    if np.any(dist <= 0):
        bad = int(np.argmax(dist <= 0))
        raise ValueError(f"face {names[bad] if names else bad}: normalising distance ({norm}) is zero")
    return np.linalg.norm(pred - gt, axis=-1).mean(axis=-1) / dist


def simpson(y: np.ndarray, dx: float) -> float:
    """Composite Simpson's rule on evenly spaced samples (an even number of intervals)."""
    y = np.asarray(y, dtype=np.float64)
    if len(y) < 3 or len(y) % 2 == 0:
        raise ValueError(f"Simpson's rule needs an odd number (>= 3) of samples, got {len(y)}")
    return float(dx / 3 * (y[0] + y[-1] + 4 * y[1:-1:2].sum() + 2 * y[2:-1:2].sum()))


def check_threshold(threshold: float, step: float = 1e-4) -> int:
    """The CED's number of steps up to `threshold`; Simpson's rule needs it even (checked before any inference)."""
    intervals = int(round(threshold / step))
    if intervals < 2 or intervals % 2:
        raise ValueError(f"threshold: {threshold} / {step} must be an even whole number >= 2 (Simpson's rule)")
    return intervals


def ced(nmes: np.ndarray, threshold: float = 0.10, step: float = 1e-4) -> tuple[np.ndarray, np.ndarray]:
    """(thresholds, share of faces with NME <= threshold) on 0, step, ..., threshold."""
    nmes = np.asarray(nmes, dtype=np.float64)
    if nmes.size == 0:
        raise ValueError("no NME values to summarise")
    intervals = check_threshold(threshold, step)
    xs = np.linspace(0.0, threshold, intervals + 1)
    ys = np.searchsorted(np.sort(nmes), xs, side="right") / nmes.size
    return xs, ys


def fr_auc(nmes: np.ndarray, threshold: float = 0.10, step: float = 1e-4) -> tuple[float, float]:
    """(FR@threshold, AUC@threshold) from per-face NMEs."""
    xs, ys = ced(nmes, threshold, step)
    return float(1.0 - ys[-1]), simpson(ys, xs[1] - xs[0]) / threshold


@dataclass
class Summary:
    count: int
    nme: float
    fr: float
    auc: float
    threshold: float
    norm: str

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def summarise(errors: np.ndarray, norm: str = "inter_ocular", threshold: float = 0.10) -> Summary:
    """Summary of per-face NMEs (computed with normalisation `norm`)."""
    errors = np.asarray(errors, dtype=np.float64)
    fr, auc = fr_auc(errors, threshold)
    return Summary(len(errors), float(errors.mean()), fr, auc, threshold, norm)


def plot_ced(curves: dict[str, np.ndarray], path: str | Path, threshold: float = 0.10) -> None:
    """Write a CED plot (PNG) with one curve per name -> per-face NMEs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4), dpi=120)
    for name, errors in curves.items():
        xs, ys = ced(errors, threshold)
        fr, auc = fr_auc(errors, threshold)
        ax.plot(xs * 100, ys, label=f"{name} (NME {np.mean(errors) * 100:.2f}, AUC {auc:.4f})")
    ax.set_xlabel("NME (%)")
    ax.set_ylabel("share of faces")
    ax.set_xlim(0, threshold * 100)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=7)
    ax.set_title(f"Cumulative error distribution (up to {threshold * 100:g}%)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
