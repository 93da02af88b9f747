import numpy as np
import torch

from mdland.data.procedural import draw_face, procedural_faces, random_landmarks
from mdland.detector.data import (edge_maps, face_crop, pixels_to_unit, point_maps, prepare_detector_batch,
                                  texture_augment)
from mdland.detector.model import EDGES, normalised_to_pixels, to_network_input
from mdland.landmarks.align import transform_points
from mdland.landmarks.scheme import flip_landmarks


def marked_face(seed=0):
    rng = np.random.default_rng(seed)
    points = random_landmarks(rng, 200)
    image = draw_face(points, "line_art", 200, rng).copy()
    x, y = np.round(points[30]).astype(int)
    image[y - 1 : y + 2, x - 1 : x + 2] = [255, 0, 0]
    points[30] = [x, y]
    return image, points


def red_centre(image):
    red = np.clip(image[..., 0].astype(float) - image[..., 1:].max(-1), 0, None)
    red[red < 120] = 0
    ys, xs = np.mgrid[: image.shape[0], : image.shape[1]]
    return np.array([(red * xs).sum() / red.sum(), (red * ys).sum() / red.sum()])


def test_augmented_crops_move_pixels_and_landmarks_together():
    image, points = marked_face()
    flips = 0
    for seed in range(12):
        crop, moved, matrix = face_crop(image, points, 128, np.random.default_rng(seed))
        np.testing.assert_allclose(red_centre(crop), moved[30], atol=0.7)
        # After a flip the image's left eye (36-41) is still the one on the image's left.
        assert moved[36:42, 0].mean() < moved[42:48, 0].mean() + 1e-3 or abs(moved[36, 0] - moved[45, 0]) < 5
        # Mapped back to the source, the points are the original ones, or (after a flip) the mirrored ones.
        back = transform_points(moved, np.linalg.inv(matrix))
        flipped = np.allclose(back, flip_landmarks(points, image.shape[1]), atol=1e-3)
        assert flipped or np.allclose(back, points, atol=1e-3)
        flips += flipped
    assert 2 <= flips <= 10, flips  # flipped about half the time
    crop, moved, _ = face_crop(image, points, 128)
    box = moved.max(0) - moved.min(0)
    assert abs(box.max() - 128 / 1.05) < 0.5  # the landmark box's longer side fills 1 / 1.05 of the crop


def test_targets():
    points = np.array([[10.0, 20.0]] * 68, dtype=np.float32)
    points[5] = [200.5, 100.5]
    maps = point_maps(points, 256)
    assert maps.shape == (68, 64, 64)
    r, c = np.unravel_index(maps[5].argmax(), maps[5].shape)
    # Sampled at 64-grid centres 4u + 1.5: the nearest is 1 px away in x and y, sigma 1.5.
    assert (r, c) == (25, 50) and abs(maps[5].max() - np.exp(-2 / (2 * 1.5**2))) < 1e-6
    # At any input size a point's map peaks as high: the Gaussian is 0.375 map cells wide whatever the size, so even
    # a point halfway between cell centres (2 px from the nearest in x and y) peaks at exp(-8 / 4.5).
    for size in (64, 128, 256):
        inside = np.random.default_rng(size).uniform(2, size - 3, (68, 2)).astype(np.float32)
        assert point_maps(inside, size).reshape(68, -1).max(1).min() >= np.exp(-8 / 4.5) - 1e-6
    points[7] = [-30.0, 300.0]  # moved out of the crop by augmentation: held at the edge, peak 1
    maps = point_maps(points, 256)
    assert np.unravel_index(maps[7].argmax(), maps[7].shape) == (63, 0) and maps[7].max() == 1
    _, face = marked_face(1)
    edges = edge_maps(face * 256 / 200, 256)
    assert edges.shape == (len(EDGES), 64, 64) and (edges.reshape(9, -1).max(1) > 0.2).all()
    jaw = np.round(face[8] * 256 / 200 / 4 - 0.375).astype(int)
    assert edges[0, jaw[1] - 1 : jaw[1] + 2, jaw[0] - 1 : jaw[0] + 2].max() > 0
    # Edge targets: a one-pixel line area-averaged 4x reads 0.25 in the map cells it crosses, centred where the
    # point maps are: a straight brow on pixel row 40 or 43 (map row 10 holds rows 40-43) is all in map row 10, one
    # on 43.5 half in rows 10 and 11.
    brow = face * 256 / 200
    for y, weights in ((40.0, {10: 0.25}), (43.0, {10: 0.25}), (43.5, {10: 0.125, 11: 0.125})):
        brow[17:22] = np.stack([np.linspace(60, 160, 5), np.full(5, y)], 1)
        line = edge_maps(brow, 256)[1]
        assert np.nonzero(line.max(1))[0].tolist() == list(weights)
        for row, weight in weights.items():
            np.testing.assert_allclose(line[row, 16:40], weight, atol=0.02)
        assert np.array_equal(np.nonzero(line.max(0))[0], np.arange(15, 41))  # x 60..160 at 4 px a cell
    # A closed edge is a spline through its points, as STAR draws it, not straight segments between them.
    angles = np.arange(6) * np.pi / 3
    brow[36:42] = np.stack([128 + 20 * np.cos(angles), 128 + 20 * np.sin(angles)], 1)  # six points on a circle
    eye = edge_maps(brow, 256)[5]
    ys, xs = np.nonzero(eye)
    radius = np.hypot(xs * 4 + 1.5 - 128, ys * 4 + 1.5 - 128)  # map cells sit at input pixels 4u + 1.5
    # The spline's loop: 20 px out on average (the hexagon of straight segments would average 18.2).
    assert abs((eye[ys, xs] * radius).sum() / eye[ys, xs].sum() - 20) < 0.5
    unit = pixels_to_unit(np.array([[-0.5, 255.5], [127.5, 0.0]]), 256)
    np.testing.assert_allclose(unit, [[-1, 1], [0, -1 + 1 / 256]], atol=1e-6)
    np.testing.assert_allclose(normalised_to_pixels(torch.tensor(unit), 256).numpy(),
                               [[-0.5, 255.5], [127.5, 0.0]], atol=1e-4)
    x = to_network_input(torch.tensor([[[[255, 0, 127]]]], dtype=torch.uint8))
    assert x.shape == (1, 3, 1, 1) and x.dtype == torch.float32
    np.testing.assert_allclose(x[0, :, 0, 0].numpy(), [(127 - 127.5) / 127.5, -1, 1])  # BGR order
    half = to_network_input(torch.tensor([[[[255, 0, 127]]]], dtype=torch.uint8), torch.float16)
    assert half.dtype == torch.float16 and torch.equal(half.float(), x.half().float())


def test_prepared_batches_with_and_without_training_targets():
    faces = list(procedural_faces(3, seed=0, size=96))
    rows = {"key": [f.key for f in faces], "image": [f.image for f in faces],
            "landmarks": [f.landmarks.tolist() for f in faces]}
    full = prepare_detector_batch(rows, 64, augment=False)
    assert full["image"].shape == (3, 64, 64, 3) and full["image"].dtype == np.uint8  # scaled on the device
    assert full["landmarks"].shape == (3, 68, 2)
    assert full["pointmaps"].shape == (3, 68, 16, 16) and full["edgemaps"].shape == (3, 9, 16, 16)
    lean = prepare_detector_batch(rows, 64, augment=False, targets=False)
    assert set(lean) == {"image", "landmarks"}
    np.testing.assert_array_equal(lean["landmarks"], full["landmarks"])


def test_texture_augmentation_at_stars_rates():
    crop = draw_face(random_landmarks(np.random.default_rng(0), 64), "flat_cartoon", 64, np.random.default_rng(0))
    rng = np.random.default_rng(1)
    outs = [texture_augment(crop, rng) for _ in range(300)]
    assert all(o.shape == crop.shape and o.dtype == np.uint8 for o in outs)
    grey = np.mean([np.array_equal(o[..., 0], o[..., 1]) and np.array_equal(o[..., 1], o[..., 2]) for o in outs])
    unchanged = np.mean([np.array_equal(o, crop) for o in outs])
    assert 0.13 < grey < 0.27  # STAR's grey rate, 0.2
    assert 0.14 < unchanged < 0.30  # none of the five applied: 0.6 x 0.7 x 0.8 x 0.8 x 0.8 = 0.215
    np.testing.assert_array_equal(texture_augment(crop, np.random.default_rng(5)),
                                  texture_augment(crop, np.random.default_rng(5)))
