import numpy as np
import pytest

from mdland.landmarks.align import (
    SCALE_UNIT, crop_face, crop_from_box, crop_from_landmarks, crop_matrix, resize_points, transform_points,
    uncrop_points, warp_image,
)


def test_crop_matrix_matches_star_convention():
    m = crop_matrix((100.0, 80.0), scale=1.0, size=256)
    # centre -> crop centre (corner pixel centres aligned), 200 px of face -> 256 px
    np.testing.assert_allclose(transform_points(np.array([[100.0, 80.0]]), m), [[127.5, 127.5]], atol=1e-5)
    np.testing.assert_allclose(transform_points(np.array([[200.0, 80.0]]), m), [[127.5 + 128, 127.5]], atol=1e-4)
    with pytest.raises(ValueError):
        crop_matrix((0, 0), 0.0)


def test_crop_params_from_landmarks_and_box(face):
    _, points = face
    centre, scale = crop_from_landmarks(points, margin=1.25)
    lo, hi = points.min(0), points.max(0)
    np.testing.assert_allclose(centre, (lo + hi) / 2, atol=1e-4)
    assert scale == pytest.approx(max(hi - lo) * 1.25 / 200, rel=1e-5)
    assert crop_from_box((10, 20, 110, 70)) == ((60.0, 45.0), 0.5)
    with pytest.raises(ValueError, match="degenerate"):
        crop_from_box((10, 20, 10, 70))


def test_crop_face_moves_image_and_points_together_and_inverts():
    image = np.zeros((300, 400, 3), np.uint8)
    points = np.random.default_rng(0).uniform([120, 80], [280, 220], size=(68, 2)).astype(np.float32)
    x, y = 233, 151
    image[y - 1 : y + 2, x - 1 : x + 2] = 255  # a 3x3 marker centred on (233, 151)
    points[30] = [x, y]
    crop, moved, m = crop_face(image, points, *crop_from_landmarks(points), size=128)
    assert crop.shape == (128, 128, 3)
    weight = crop[..., 0].astype(float)
    ys, xs = np.mgrid[:128, :128]
    marker = np.array([(weight * xs).sum() / weight.sum(), (weight * ys).sum() / weight.sum()])
    np.testing.assert_allclose(marker, moved[30], atol=0.3)
    np.testing.assert_allclose(uncrop_points(moved, m), points, atol=1e-3)


def test_warp_identity_keeps_pixels(face):
    image, _ = face
    out = warp_image(image, np.eye(3), 256)
    assert np.abs(out.astype(int) - image.astype(int)).max() <= 1


def test_resize_points_keeps_pixel_edges_in_place():
    # Pixel 0's centre of a 64-wide image is 1/4 of the way into pixel 0 of a 128-wide one; the outer edges match.
    pts = np.array([[0.0, 0.0], [63.0, 31.0], [-0.5, -0.5]])
    np.testing.assert_allclose(resize_points(pts, (64, 32), (128, 64)), [[0.5, 0.5], [126.5, 62.5], [-0.5, -0.5]])
    np.testing.assert_allclose(resize_points(resize_points(pts, (64, 32), (100, 7)), (100, 7), (64, 32)), pts)


def test_shrinking_crops_average_instead_of_aliasing_and_keep_points_in_place():
    image = np.zeros((1024, 1024, 3), np.uint8)
    image[:, ::3] = 255  # 1-px white lines every 3 px: a pattern finer than the crop's pixels
    image[400:424, 600:624] = [255, 0, 0]  # a red marker centred on (611.5, 411.5)
    crop, points, _ = crop_face(image, np.array([[611.5, 411.5]]), (512.0, 512.0), 1024 / SCALE_UNIT, 128)
    stripes = crop[:32, :, 1].astype(float)
    # Near an even grey (a bilinear warp alone keeps single lines: std 120, not 12).
    assert abs(stripes.mean() - 255 / 3) < 6 and stripes.std() < 20
    red = np.clip(crop[..., 0].astype(float) - crop[..., 1:].max(-1), 0, None)
    ys, xs = np.mgrid[:128, :128]
    np.testing.assert_allclose([(red * xs).sum() / red.sum(), (red * ys).sum() / red.sum()], points[0], atol=0.3)
