import numpy as np
import pytest

from mdland.landmarks.render import PART_COLOURS, draw_landmarks, image_grid, render_landmarks
from mdland.landmarks.scheme import POLYLINES


def test_condition_image_is_deterministic_and_coloured_by_part(face):
    _, points = face
    a, b = render_landmarks(points, 256), render_landmarks(points, 256)
    assert a.shape == (256, 256, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    for part, idx, _ in POLYLINES:
        x, y = np.round(points[idx[len(idx) // 2]]).astype(int)
        assert tuple(a[y, x]) == PART_COLOURS[part], part
    assert tuple(a[0, 0]) == (0, 0, 0)  # black away from the face
    lit = (a.sum(axis=2) > 0).mean()
    assert 0.01 < lit < 0.2


@pytest.mark.parametrize("size", [64, 512, (320, 200)])
def test_any_size_keeps_the_drawing_in_proportion(face, size):
    _, points = face
    w, h = (size, size) if isinstance(size, int) else size
    scaled = points * [w / 256, h / 256]
    img = render_landmarks(scaled, size)
    assert img.shape == (h, w, 3)
    x, y = np.round(scaled[30]).astype(int)
    assert img[y, x].any()


def test_bad_points_are_refused():
    with pytest.raises(ValueError, match="expected 68x2"):
        render_landmarks(np.zeros((5, 2)), 64)
    with pytest.raises(ValueError, match="landmark 3 is not finite"):
        render_landmarks(np.where(np.arange(136).reshape(68, 2) == 6, np.nan, 1.0), 64)


def test_overlay_and_grid(face):
    image, points = face
    over = draw_landmarks(image, points, colour=(0, 255, 0))
    x, y = np.round(points[8]).astype(int)
    assert tuple(over[y, x]) == (0, 255, 0)
    grid = image_grid([image, over, image], columns=2, pad=2)
    assert grid.shape == (2 * 258 + 2, 2 * 258 + 2, 3)
    assert np.array_equal(grid[2:258, 260:516], over)
