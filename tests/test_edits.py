import numpy as np
import pytest

from mdland.data.procedural import random_landmarks
from mdland.landmarks.edits import EDIT_MOVES, EDITS, fit_in_frame, sample_edits

SIZE = 256


def faces(n=40):
    return [random_landmarks(np.random.default_rng(i), SIZE) for i in range(n)]


@pytest.mark.parametrize("name", sorted(EDITS))
def test_edit_moves_only_its_parts(name):
    for i, p in enumerate(faces(10)):
        out, params = EDITS[name](p, np.random.default_rng(i), 1.0)
        moved = np.linalg.norm(out - p, axis=1) > 1e-4
        still = np.setdiff1d(np.arange(68), EDIT_MOVES[name])
        assert not moved[still].any(), f"{name} moved {np.flatnonzero(moved[still])}"
        assert moved.any()
        assert isinstance(params, dict) and params


@pytest.mark.parametrize("name", sorted(EDITS))
def test_edit_keeps_face_in_frame_and_is_reproducible(name):
    for i, p in enumerate(faces()):
        out, params = EDITS[name](p, np.random.default_rng(100 + i), 1.0)
        assert out.dtype == np.float32 and out.shape == (68, 2)
        assert (out >= 0).all() and (out <= SIZE - 1).all(), (name, i)
        again, params2 = EDITS[name](p, np.random.default_rng(100 + i), 1.0)
        assert np.array_equal(out, again) and params == params2


@pytest.mark.parametrize("name", sorted(EDITS))
def test_strength_zero_is_a_no_op_and_strength_scales(name):
    p = faces(1)[0]
    out, _ = EDITS[name](p, np.random.default_rng(3), 0.0)
    np.testing.assert_allclose(out, p, atol=1e-4)
    half, _ = EDITS[name](p, np.random.default_rng(3), 0.5)
    full, _ = EDITS[name](p, np.random.default_rng(3), 1.0)
    assert np.abs(half - p).max() < np.abs(full - p).max()


def test_specific_directions():
    p = faces(1)[0]
    out, _ = EDITS["open_eyes"](p, np.random.default_rng(0), 1.0)
    assert out[37, 1] < p[37, 1] and out[41, 1] > p[41, 1]  # upper lid up, lower lid down (no roll)
    out, params = EDITS["raise_eyebrows"](p, np.random.default_rng(0), 1.0)
    raised = (p[17:27, 1] - out[17:27, 1]) > 1e-3
    expect = {"left": [True] * 5 + [False] * 5, "right": [False] * 5 + [True] * 5, "both": [True] * 10}
    assert raised.tolist() == expect[params["which"]]
    out, _ = EDITS["stretch_nostrils"](p, np.random.default_rng(0), 1.0)
    assert np.linalg.norm(out[31] - out[35]) > np.linalg.norm(p[31] - p[35])
    out, _ = EDITS["chubby"](p, np.random.default_rng(0), 1.0)
    assert np.linalg.norm(out[4] - out[12]) > np.linalg.norm(p[4] - p[12])


@pytest.mark.parametrize("name,parts", [("shift_nose", ("nose_bridge", "nose_lower")),
                                        ("shift_mouth", ("mouth_outer", "mouth_inner"))])
def test_shift_nose_and_mouth_move_as_their_params_say(name, parts):
    from mdland.landmarks.edits import face_axes
    from mdland.landmarks.scheme import PARTS, inter_ocular

    for i, p in enumerate(faces(10)):
        out, params = EDITS[name](p, np.random.default_rng(i), 1.0)
        right, up = face_axes(p)
        idx = [j for part in parts for j in PARTS[part]]
        moved = (out[idx] - p[idx]).mean(axis=0) / inter_ocular(p)
        np.testing.assert_allclose([moved @ right, moved @ up], [params["right"], params["up"]], atol=1e-4)


def test_shift_eyes_moves_both_eyes_as_its_params_say():
    from mdland.landmarks.edits import face_axes
    from mdland.landmarks.scheme import PARTS, inter_ocular

    for i, p in enumerate(faces(10)):
        out, params = EDITS["shift_eyes"](p, np.random.default_rng(i), 1.0)
        right, up = face_axes(p)
        iod = inter_ocular(p)
        for part, sign in (("eye_left", -1), ("eye_right", 1)):
            moved = (out[list(PARTS[part])] - p[list(PARTS[part])]).mean(axis=0) / iod
            np.testing.assert_allclose([moved @ right, moved @ up], [sign * params["apart"], params["up"]], atol=1e-4)


def test_sample_edits_applies_k_distinct_recorded_edits():
    p = faces(1)[0]
    seen = set()
    for seed in range(30):
        out, records = sample_edits(p, np.random.default_rng(seed), k=2)
        names = [r["name"] for r in records]
        assert len(names) == 2 and len(set(names)) == 2 and set(names) <= set(EDITS)
        seen.update(names)
        again, records2 = sample_edits(p, np.random.default_rng(seed), k=2)
        assert np.array_equal(out, again) and records == records2
    assert seen == set(EDITS)
    with pytest.raises(ValueError, match="k must be between"):
        sample_edits(p, np.random.default_rng(0), k=0)


def test_fit_in_frame():
    p = faces(1)[0]
    np.testing.assert_allclose(fit_in_frame(p, SIZE), p, atol=1e-4)  # already inside: unchanged
    big = (p - 128) * 2.5 + 150
    fitted = fit_in_frame(big, SIZE, margin=2)
    assert fitted.min() >= 2 - 1e-4 and fitted.max() <= SIZE - 3 + 1e-4
    # Shape is kept: only a uniform scale and a shift.
    ratio = np.linalg.norm(fitted[36] - fitted[45]) / np.linalg.norm(big[36] - big[45])
    np.testing.assert_allclose(np.linalg.norm(fitted[0] - fitted[16]) / np.linalg.norm(big[0] - big[16]), ratio, rtol=1e-4)
    with pytest.raises(ValueError, match="a 4-pixel frame has no room"):  # its shrink would mirror the face
        fit_in_frame(p, 4, margin=2)


def test_linear_transform_records_the_matrix_it_applied():
    for i, p in enumerate(faces(5)):
        out, params = EDITS["linear_transform"](p, np.random.default_rng(i), 0.5)
        centre = p.mean(axis=0)
        np.testing.assert_allclose((p - centre) @ np.array(params["matrix"]).T + centre, out, atol=1e-3)
