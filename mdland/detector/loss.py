"""STAR's training losses: the STAR loss (v2) on each stack's fusion heatmaps and AWing on its point and edge maps,
weighted [1, 10, 10] x 2^(stack - last), as STAR trains its 300W model.

STAR loss: normalise the heatmap, take its mean and (unbiased, weighted) covariance on the [-1, 1] grid, project
the error (ground truth - mean) on the covariance's eigenvectors, smooth-L1 each component and divide it by the
square root of its eigenvalue (less penalty along the heatmap's uncertain direction), and add `w` times the
eigenvalues (keep heatmaps sharp). The 2x2 eigen-decomposition is done in closed form, on the device. STAR's own
code projects on the rows of `eigh`'s eigenvector matrix, which equal its columns only for some sign conventions;
this projects on the eigenvectors proper.
"""

import torch
import torch.nn.functional as F

from mdland.detector.model import DetectorOutput, pixel_ramp


def smooth_l1(err: torch.Tensor, scale: float = 0.01) -> torch.Tensor:
    """STAR's smooth L1: quadratic (err^2 / (2 scale)) below `scale`, |err| - scale / 2 above."""
    sq = err * err
    return torch.where(sq < scale * scale, 0.5 / scale * sq, torch.sqrt(sq.clamp(min=1e-6)) - 0.5 * scale)


def heatmap_moments(heatmaps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean (B, N, 2) and covariance entries (a, b, d) of [[a, b], [b, d]] per heatmap."""
    h, w = heatmaps.shape[-2:]
    rows = pixel_ramp(h, heatmaps.device).view(h, 1)
    cols = pixel_ramp(w, heatmaps.device).view(1, w)
    p = heatmaps / heatmaps.sum(dim=(-2, -1), keepdim=True).clamp(min=1e-6)
    mx, my = (p * cols).sum(dim=(-2, -1)), (p * rows).sum(dim=(-2, -1))
    dx, dy = cols - mx[..., None, None], rows - my[..., None, None]
    v1 = p.sum(dim=(-2, -1)) + 1e-5
    v2 = (p * p).sum(dim=(-2, -1)) + 1e-5
    norm = v1 - v2 / v1
    a = (p * dx * dx).sum(dim=(-2, -1)) / norm
    b = (p * dx * dy).sum(dim=(-2, -1)) / norm
    d = (p * dy * dy).sum(dim=(-2, -1)) / norm
    return torch.stack([mx, my], dim=-1), a, b, d


def star_loss(heatmaps: torch.Tensor, target: torch.Tensor, w: float = 1.0) -> torch.Tensor:
    """STAR loss v2 of (B, N, H, W) heatmaps against (B, N, 2) targets in [-1, 1]."""
    mean, a, b, d = heatmap_moments(heatmaps.float())
    half_gap = torch.sqrt(((a - d) / 2) ** 2 + b * b + 1e-12)
    centre = (a + d) / 2
    small, large = centre - half_gap, centre + half_gap
    angle = 0.5 * torch.atan2(2 * b, a - d + 1e-12)  # direction of the larger eigenvalue's eigenvector
    major = torch.stack([torch.cos(angle), torch.sin(angle)], dim=-1)
    minor = torch.stack([-torch.sin(angle), torch.cos(angle)], dim=-1)
    err = target.float() - mean
    trans = (smooth_l1((err * minor).sum(-1)) / torch.sqrt(small.clamp(min=0) + 1e-5)
             + smooth_l1((err * major).sum(-1)) / torch.sqrt(large + 1e-5))
    return (trans + w * (small.abs() + large.abs())).mean()


def awing_loss(pred: torch.Tensor, target: torch.Tensor, omega: float = 14.0, theta: float = 0.5,
               epsilon: float = 1.0, alpha: float = 2.1) -> torch.Tensor:
    """Adaptive Wing loss with STAR's weight map (x11 within a 3x3 neighbourhood of target >= 0.2)."""
    pred, target = pred.float(), target.float()
    delta = (pred - target).abs()
    power = alpha - target
    ratio = theta / epsilon
    big_a = omega / (1 + ratio**power) * power * ratio ** (power - 1) / epsilon
    big_c = theta * big_a - omega * torch.log1p(ratio**power)
    loss = torch.where(delta < theta, omega * torch.log1p((delta / epsilon) ** power), big_a * delta - big_c)
    weight = 1 + 10 * (F.max_pool2d(target, 3, stride=1, padding=1) >= 0.2).float()
    return (loss * weight).mean()


def detector_loss(out: DetectorOutput, landmarks: torch.Tensor, pointmaps: torch.Tensor, edgemaps: torch.Tensor,
                  star_w: float = 1.0) -> tuple[torch.Tensor, dict]:
    """STAR's weighted sum over stacks: STAR loss on the fusion maps, AWing on the point and edge maps.
    Also returns the last stack's parts (detached tensors: read them only when logging, to spare a device sync)."""
    n = len(out.fusionmaps)
    total, parts = 0.0, {}
    for i in range(n):
        scale = 2.0 ** (i - (n - 1))
        star = star_loss(out.fusionmaps[i], landmarks, star_w)
        points = awing_loss(out.pointmaps[i], pointmaps)
        edges = awing_loss(out.edgemaps[i], edgemaps)
        total = total + scale * (star + 10 * points + 10 * edges)
        parts = {"star": star.detach(), "awing_points": points.detach(), "awing_edges": edges.detach()}
    return total, parts
