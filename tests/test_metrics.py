import numpy as np
import pytest
from PIL import Image
from scipy.integrate import simpson as scipy_simpson

from mdland.data.procedural import MEAN_FACE
from mdland.detector.metrics import ced, fr_auc, nme, plot_ced, simpson, summarise

GT = (MEAN_FACE * 100 + 128).astype(np.float64)


def test_nme_hand_computed():
    iod = np.linalg.norm(GT[36] - GT[45])  # outer eye corners: 0.98 face units -> 98 px
    assert iod == pytest.approx(98.0)
    pred = GT + [3.0, 4.0]  # every point 5 px off
    assert nme(pred, GT)[0] == pytest.approx(5 / 98)
    pupils = np.linalg.norm(GT[36:42].mean(0) - GT[42:48].mean(0))
    assert nme(pred, GT, "inter_pupil")[0] == pytest.approx(5 / pupils)
    w, h = GT.max(0) - GT.min(0)
    assert nme(pred, GT, "box")[0] == pytest.approx(5 / np.sqrt(w * h))
    # Half the points exact, half 10 px off: mean error 5 px.
    pred = GT.copy()
    pred[::2, 0] += 10
    assert nme(pred[None], GT[None])[0] == pytest.approx(5 / 98)


def test_nme_errors():
    with pytest.raises(ValueError, match="does not match"):
        nme(GT[None], GT[None, :60])
    with pytest.raises(ValueError, match="unknown NME normalisation"):
        nme(GT, GT, "diag")
    flat = GT.copy()
    flat[45] = flat[36]
    with pytest.raises(ValueError, match="face 0: normalising distance"):
        nme(GT, flat)
    with pytest.raises(ValueError, match=r"face squint: normalising distance \(inter_ocular\) is zero"):
        nme(np.stack([GT, GT]), np.stack([GT, flat]), names=["fine", "squint"])


def test_fr_and_auc_hand_computed():
    assert fr_auc(np.zeros(10)) == (0.0, pytest.approx(1.0))  # all perfect: CED is 1 everywhere
    assert fr_auc(np.full(4, 0.5)) == (1.0, 0.0)  # all failures
    # Half the faces at NME 0, half failing: CED = 0.5 on [0, t].
    fr, auc = fr_auc(np.array([0.0, 0.0, 0.3, 0.3]))
    assert fr == 0.5 and auc == pytest.approx(0.5)
    # One face at exactly 0.05 (a CED step at the middle sample) and one at 0: CED 0.5 then 1.
    # Simpson on 1001 samples: 500 intervals at 0.5 and 500 at 1, the step sample (index 500, even) weighted 2/3.
    fr, auc = fr_auc(np.array([0.0, 0.05]))
    expected = (1e-4 / 3) * (0.5 + 1 + 4 * (250 * 0.5 + 250 * 1) + 2 * (249 * 0.5 + 1 + 249 * 1)) / 0.1
    assert fr == 0.0 and auc == pytest.approx(expected, abs=1e-12)


def test_matches_star_definition_on_random_errors():
    errors = np.random.default_rng(0).gamma(2.0, 0.025, size=500)
    xs = np.arange(0, 0.1 + 1e-4, 1e-4)  # STAR: thresholds, count of nme <= x, simps / thres
    ys = np.array([np.count_nonzero(errors <= x) for x in xs]) / len(errors)
    fr, auc = fr_auc(errors)
    assert fr == pytest.approx(1 - ys[-1])
    assert auc == pytest.approx(scipy_simpson(ys, x=xs) / 0.1, abs=1e-12)
    cx, cy = ced(errors)
    assert len(cx) == 1001 and np.all(np.diff(cy) >= 0)
    assert simpson(np.ones(5), 0.25) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        ced(errors, threshold=0.1, step=0.03)


def test_summary_and_ced_plot(tmp_path):
    errors = np.array([0.01, 0.02, 0.2])
    s = summarise(errors)
    assert (s.count, s.nme, s.fr) == (3, pytest.approx(0.23 / 3), pytest.approx(1 / 3))
    plot_ced({"a": errors, "b": errors / 2}, tmp_path / "ced.png")
    with Image.open(tmp_path / "ced.png") as im:
        assert im.size[0] > 300 and im.size[1] > 200
