import numpy as np

from mdland.data.procedural import MEAN_FACE
from mdland.landmarks.scheme import FLIP_PERMUTATION, GROUPS, PARTS, POLYLINES, flip_landmarks, inter_ocular


def test_groups_partition_the_68_points():
    assert sorted(i for g in GROUPS.values() for i in g) == list(range(68))
    assert sorted(i for g in PARTS.values() for i in g) == list(range(68))
    assert {i for _, idx, _ in POLYLINES for i in idx} == set(range(68))


def test_flip_permutation_is_an_involution_with_the_right_pairs():
    assert (FLIP_PERMUTATION[FLIP_PERMUTATION] == np.arange(68)).all()
    for a, b in [(0, 16), (8, 8), (17, 26), (30, 30), (31, 35), (36, 45), (39, 42), (48, 54), (62, 62), (65, 67)]:
        assert FLIP_PERMUTATION[a] == b and FLIP_PERMUTATION[b] == a


def test_flipping_a_symmetric_face_gives_it_back():
    width = 200
    face = (MEAN_FACE * 50 + [(width - 1) / 2, 100]).astype(np.float32)
    np.testing.assert_allclose(flip_landmarks(face, width), face, atol=1e-4)
    moved = face + [10, 0]
    np.testing.assert_allclose(flip_landmarks(flip_landmarks(moved, width), width), moved, atol=1e-4)
    assert abs(inter_ocular(face) - np.linalg.norm(face[36] - face[45])) < 1e-6
