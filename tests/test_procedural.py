import numpy as np
import pytest

from mdland.data.procedural import STYLES, draw_face, procedural_faces, random_landmarks
from mdland.data.shards import decode_image
from mdland.landmarks.scheme import PARTS, flip_landmarks


def test_faces_are_reproducible_per_index_and_inside_the_frame():
    a = list(procedural_faces(6, seed=5, size=128))
    b = list(procedural_faces(2, seed=5, size=128, start=4))
    assert a[4].image == b[0].image and np.array_equal(a[5].landmarks, b[1].landmarks)
    assert len({f.key for f in a}) == 6 and len({f.seed for f in a}) == 6
    assert [f.style for f in a] == [STYLES[i % 3] for i in range(6)]
    for f in a:
        assert (f.landmarks > 0).all() and (f.landmarks < 127).all()
        assert decode_image(f.image).shape == (128, 128, 3)
    c = next(procedural_faces(1, seed=6, size=128))
    assert not np.array_equal(c.landmarks, a[0].landmarks)


def test_drawing_sits_on_the_landmarks():
    rng = np.random.default_rng(1)
    points = random_landmarks(rng, 256)
    image = draw_face(points, "flat_cartoon", 256, rng).astype(int)
    # Between the outer and inner lip lines the mouth is red.
    x = round(float(points[51, 0]))
    lip = image[round(float(points[51, 1])) : round(float(points[62, 1])) + 1, x]
    assert any(r > 120 and r > g + 60 and r > b + 40 for r, g, b in lip), lip
    # The eye's middle is white or iris, both unlike the skin just below the eye.
    eye = np.round(points[list(PARTS["eye_left"])].mean(0)).astype(int)
    cheek = np.round(points[41] + (points[41] - points[37]) * 1.5).astype(int)
    assert np.abs(image[eye[1], eye[0]] - image[cheek[1], cheek[0]]).sum() > 60
    line = draw_face(points, "line_art", 256, rng)
    chin = np.round(points[8]).astype(int)
    assert line[chin[1] - 1 : chin[1] + 2, chin[0] - 1 : chin[0] + 2].min() < 100  # ink on the jaw line
    assert line[2, 2].min() == 255


def test_unknown_style():
    with pytest.raises(ValueError, match="unknown procedural style 'oil'"):
        list(procedural_faces(1, styles=("oil",)))
    with pytest.raises(ValueError, match="no procedural style given"):
        list(procedural_faces(1, styles=()))


@pytest.mark.parametrize("size", [64, 128, 256])
def test_the_drawing_is_centred_on_the_points(size):
    """Drawing the mirrored landmarks gives the mirrored face: no half-pixel lean from PIL's rounding down."""
    points = random_landmarks(np.random.default_rng(3), size)
    centres = []
    for image in (draw_face(points, "line_art", size), draw_face(flip_landmarks(points, size), "line_art", size)):
        ink = 765.0 - image.astype(float).sum(axis=2)  # line art: dark ink on white, anti-aliased
        centres.append((ink.sum(axis=0) * np.arange(size)).sum() / ink.sum())
    assert abs(centres[0] - (size - 1 - centres[1])) < 0.05
