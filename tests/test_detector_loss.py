import numpy as np
import pytest
import torch

from mdland.detector.data import edge_maps, pixels_to_unit, point_maps
from mdland.detector.loss import awing_loss, detector_loss, heatmap_moments, star_loss
from mdland.detector.model import ARCHS, STARNet, decode_heatmaps


def blobs(b=2, n=3, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, n, size, size, generator=g) ** 8  # peaky, non-negative


def test_awing_is_zero_with_zero_gradient_at_a_perfect_prediction():
    target = torch.rand(2, 3, 8, 8)
    pred = target.clone().requires_grad_(True)
    loss = awing_loss(pred, target)
    loss.backward()
    assert loss.item() == 0 and pred.grad.abs().max() == 0
    assert awing_loss(target + 0.3, target) > 0


def test_star_loss_translation_part_has_zero_gradient_at_the_heatmap_mean():
    maps = blobs().requires_grad_(True)
    mean = heatmap_moments(maps)[0].detach()
    loss = star_loss(maps, mean, w=0.0)
    loss.backward()
    assert loss.item() < 1e-9 and maps.grad.abs().max() < 1e-6
    assert star_loss(maps.detach(), mean + 0.2, w=0.0) > 0.1
    assert torch.allclose(mean, decode_heatmaps(maps.detach()), atol=1e-5)


def test_closed_form_eigenvalues_match_torch_eigh():
    maps = blobs(seed=3)
    _, a, b, d = heatmap_moments(maps)
    cov = torch.stack([torch.stack([a, b], -1), torch.stack([b, d], -1)], -2).double()
    ref = torch.linalg.eigvalsh(cov)
    centre, half = (a + d) / 2, torch.sqrt(((a - d) / 2) ** 2 + b * b)
    np.testing.assert_allclose(torch.stack([centre - half, centre + half], -1).numpy(), ref.numpy(), rtol=1e-4,
                               atol=1e-7)


def test_loss_decreases_when_fitting_a_batch():
    torch.manual_seed(0)
    net = STARNet(ARCHS["tiny"])
    x = torch.randn(4, 3, 64, 64)
    points = np.random.default_rng(0).uniform(6, 58, (4, 68, 2))  # crop pixels
    target = torch.from_numpy(np.stack([pixels_to_unit(p, 64) for p in points]))
    pointmaps = torch.from_numpy(np.stack([point_maps(p, 64) for p in points]))
    edgemaps = torch.from_numpy(np.stack([edge_maps(p, 64) for p in points]))
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    losses = []
    for _ in range(50):  # a steady fall: about 0.83 of the start after 30 steps, 0.67 after 50
        loss, parts = detector_loss(net(x), target, pointmaps, edgemaps)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.75 * losses[0] and set(parts) == {"star", "awing_points", "awing_edges"}


def test_awing_and_smooth_l1_values_by_hand():
    import math

    from mdland.detector.loss import smooth_l1

    # One pixel, target 0 (power alpha = 2.1), prediction 0.3 (< theta): omega * ln(1 + 0.3^2.1), no weight.
    target, pred = torch.zeros(1, 1, 5, 5), torch.zeros(1, 1, 5, 5)
    pred[0, 0, 0, 0] = 0.3
    assert awing_loss(pred, target).item() * 25 == pytest.approx(14 * math.log1p(0.3**2.1), rel=1e-5)
    # The same error beside a target peak (>= 0.2 in its 3x3 neighbourhood) weighs 11 times.
    target[0, 0, 1, 1] = 0.5
    near = torch.zeros(1, 1, 5, 5)
    near[0, 0, 0, 0] = 0.3
    near[0, 0, 1, 1] = 0.5
    assert awing_loss(near, target).item() * 25 == pytest.approx(11 * 14 * math.log1p(0.3**2.1), rel=1e-5)
    # Past theta the loss is linear: A * delta - C, continuous with the log part at theta (target 0).
    power, ratio = 2.1, 0.5
    big_a = 14 / (1 + ratio**power) * power * ratio ** (power - 1)
    big_c = 0.5 * big_a - 14 * math.log1p(ratio**power)
    far = torch.zeros(1, 1, 5, 5)
    far[0, 0, 4, 4] = 0.9
    assert awing_loss(far, torch.zeros(1, 1, 5, 5)).item() * 25 == pytest.approx(big_a * 0.9 - big_c, rel=1e-5)
    # STAR's smooth L1 with scale 0.01: err^2 / 0.02 below it, |err| - 0.005 above.
    np.testing.assert_allclose(smooth_l1(torch.tensor([0.005, -0.005, 0.02, -0.3])).numpy(),
                               [0.00125, 0.00125, 0.015, 0.295], rtol=1e-5)
