import numpy as np
import pytest

from mdland.landmarks.render import PART_COLOURS, draw_landmarks, image_grid, render_landmarks
from mdland.landmarks.scheme import POLYLINES, flip_landmarks


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
    if isinstance(size, int):
        assert np.array_equal(render_landmarks(scaled, np.int64(size)), img)  # a numpy integer is a size too
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


def _ink_centroid(image: np.ndarray, ink) -> np.ndarray:
    ys, xs = np.nonzero(ink(image.astype(int)))
    return np.array([xs.mean(), ys.mean()])


def test_drawings_are_centred_on_the_points(face):
    """Drawing the mirrored landmarks gives the mirrored drawing: no half-pixel lean from PIL's rounding down."""
    _, points = face
    for size in (64, 128, 256, 512):
        p = points * size / 256
        lit = lambda im: im.sum(axis=2) > 0  # noqa: E731
        for draw in (lambda q: render_landmarks(q, size),
                     lambda q: draw_landmarks(np.zeros((size, size, 3), np.uint8), q)):
            a, b = _ink_centroid(draw(p), lit), _ink_centroid(draw(flip_landmarks(p, size))[:, ::-1], lit)
            assert abs(a[0] - b[0]) < 0.05, (size, a, b)  # it was 1.0: each drawing leant half a pixel
    # Dots alone, on a grid of fractional positions: each lands on its point.
    grid = np.stack(np.meshgrid(np.arange(17) * 15 + 8, np.arange(4) * 40 + 20), -1).reshape(-1, 2)[:68]
    grid = grid + np.random.default_rng(0).uniform(0, 1, (68, 2))
    canvas = draw_landmarks(np.zeros((256, 256, 3), np.uint8), grid)
    errors = [_ink_centroid(canvas[int(y) - 6 : int(y) + 7, int(x) - 6 : int(x) + 7], lambda im: im[..., 1] > 0)
              - (np.array([x, y]) - np.floor([x, y]) + 6) for x, y in grid]
    assert np.abs(np.mean(errors, axis=0)).max() < 0.1 and np.abs(errors).max() <= 0.51
