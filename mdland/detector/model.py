"""STAR's stacked-hourglass landmark network, with the module structure and parameter names of STAR's released
code (StackedHGNetV1), so the `net` state dict of STAR's 300W checkpoints loads with `strict=True`.

Input: (B, 3, S, S) BGR images scaled by (x - 127.5) / 127.5. Each stack predicts 68 landmark heatmaps, 68 point
maps and 9 edge maps at S/4; the landmark "fusion" map (heatmap x point map x its edge map) is decoded by a
normalised weighted mean over a [-1, 1] grid. Coordinates are in [-1, 1] with STAR's convention: the crop's pixel
`p` is `((c + 1) * S - 1) / 2`.
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from mdland.landmarks.scheme import NUM_POINTS

# STAR's 300W edges (channel order of the edge maps): (closed, point indices).
EDGES: list[tuple[bool, list[int]]] = [
    (False, list(range(0, 17))), (False, list(range(17, 22))), (False, list(range(22, 27))),
    (False, list(range(27, 31))), (False, list(range(31, 36))), (True, list(range(36, 42))),
    (True, list(range(42, 48))), (True, list(range(48, 60))), (True, list(range(60, 68))),
]


# Point and edge maps are nearly all background. Their heads start at sigmoid(-4.6) ~ 0.01 (the focal-loss prior
# initialisation) instead of 0.5, so training from scratch does not spend its first epochs unlearning a flat map under
# AWing's x11 weights: on 384 procedural faces, 8 epochs reach 3.6% NME instead of 11%. Loaded checkpoints overwrite it.
BACKGROUND_LOGIT = -4.6


@dataclass(frozen=True)
class DetectorArch:
    input_size: int = 256
    nstack: int = 4
    nlevels: int = 4
    channels: int = 256

    @property
    def heatmap_size(self) -> int:
        return self.input_size // 4


ARCHS = {"star-300w": DetectorArch(), "tiny": DetectorArch(input_size=64, nstack=2, nlevels=2, channels=32)}


class ConvBlock(nn.Module):
    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1, bn: bool = False, relu: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, padding=(kernel - 1) // 2, bias=True)
        self.relu = nn.ReLU() if relu else None
        self.bn = nn.BatchNorm2d(cout) if bn else None

    def forward(self, x):
        x = self.conv(x)
        if self.bn is not None:
            x = self.bn(x)
        return self.relu(x) if self.relu is not None else x


class ResBlock(nn.Module):
    """Pre-activation bottleneck. STAR creates `skip_layer` always (its checkpoints hold it) but uses it only when
    the channel count changes."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        mid = cout // 2
        self.relu = nn.ReLU()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = ConvBlock(cin, mid, 1, relu=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv2 = ConvBlock(mid, mid, 3, relu=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv3 = ConvBlock(mid, cout, 1, relu=False)
        self.skip_layer = ConvBlock(cin, cout, 1, relu=False)
        self.need_skip = cin != cout

    def forward(self, x):
        residual = self.skip_layer(x) if self.need_skip else x
        out = self.conv1(self.relu(self.bn1(x)))
        out = self.conv2(self.relu(self.bn2(out)))
        out = self.conv3(self.relu(self.bn3(out)))
        return out + residual


def pixel_ramp(n: int, device: torch.device | str | None = None) -> torch.Tensor:
    """(n,) coordinates -1 .. 1 over n pixel centres."""
    return torch.arange(n, dtype=torch.float32, device=device) / (n - 1) * 2 - 1


def coordinate_grids(size: int) -> torch.Tensor:
    """(3, size, size): rows and cols (varying down the height and across the width) and the radius
    sqrt(rows^2 + cols^2) normalised to a maximum of 1."""
    ramp = pixel_ramp(size)
    rows, cols = ramp.view(size, 1).expand(size, size), ramp.view(1, size).expand(size, size)
    radius = torch.sqrt(rows**2 + cols**2)
    return torch.stack([rows, cols, radius / radius.max()])


class CoordConv(nn.Module):
    """A convolution over the input plus coordinate channels: rows, cols, normalised radius, and (given the
    previous stack's heatmaps) the rows/cols where the last landmark's heatmap exceeds 0.05."""

    def __init__(self, size: int, cin: int, cout: int, boundary: bool, relu: bool = False, bn: bool = False,
                 **conv):
        super().__init__()
        self.size, self.boundary = size, boundary
        self.conv = nn.Conv2d(cin + 3 + (2 if boundary else 0), cout, **conv)
        self.relu = nn.ReLU() if relu else None
        self.bn = nn.BatchNorm2d(cout) if bn else None
        # Built once and moved with the module; not persistent, so STAR's state-dict names stay as they are.
        self.register_buffer("grids", coordinate_grids(size), persistent=False)

    def forward(self, x, heatmap=None):
        grids = self.grids.to(x.dtype)
        parts = [x, grids.unsqueeze(0).expand(x.shape[0], -1, -1, -1)]
        if self.boundary:
            near = torch.clamp(heatmap[:, -1:], 0, 1) > 0.05
            parts += [torch.where(near, g, torch.zeros_like(g)) for g in grids[:2]]
        x = torch.cat(parts, dim=1)
        x = self.conv(x)
        if self.bn is not None:
            x = self.bn(x)
        return self.relu(x) if self.relu is not None else x


class Hourglass(nn.Module):
    def __init__(self, n: int, f: int, coord_size: int | None = None, first: bool = False):
        super().__init__()
        # Only each stack's outermost level has the coordinate convolution (none for the first stack's boundary).
        self.coordconv = (CoordConv(coord_size, f, f, boundary=not first, kernel_size=1, stride=1, padding=0)
                          if coord_size else None)
        self.up1 = ResBlock(f, f)
        self.pool1 = nn.MaxPool2d(2, 2)
        self.low1 = ResBlock(f, f)
        self.low2 = Hourglass(n - 1, f) if n > 1 else ResBlock(f, f)
        self.low3 = ResBlock(f, f)
        self.up2 = nn.Upsample(scale_factor=2, mode="nearest")

    def forward(self, x, heatmap=None):
        if self.coordconv is not None:
            x = self.coordconv(x, heatmap)
        return self.up1(x) + self.up2(self.low3(self.low2(self.low1(self.pool1(x)))))


class EdgeToPoints(nn.Module):
    """Each landmark's channel takes the edge map of the edge it lies on (a fixed 1x1 convolution, kept as
    buffers named as STAR names them)."""

    def __init__(self, edges=EDGES, num_points: int = NUM_POINTS):
        super().__init__()
        weight = torch.zeros(num_points, len(edges), 1, 1)
        for e, (_, points) in enumerate(edges):
            weight[points, e] = 1.0
        self.register_buffer("weight", weight)
        self.register_buffer("bias", (weight.sum(dim=(1, 2, 3)) == 0).float())

    def forward(self, edgemaps):
        return F.conv2d(edgemaps, self.weight.to(edgemaps.dtype), self.bias.to(edgemaps.dtype))


def decode_heatmaps(heatmaps: torch.Tensor) -> torch.Tensor:
    """(B, N, H, W) non-negative maps -> (B, N, 2) (x, y) weighted means over a [-1, 1] pixel-centre grid, in float32
    (bf16's 8-bit mantissa would put the sums, and so the points, up to half a crop pixel off)."""
    heatmaps = heatmaps.float()
    h, w = heatmaps.shape[-2:]
    rows = pixel_ramp(h, heatmaps.device).view(h, 1).to(heatmaps.dtype)
    cols = pixel_ramp(w, heatmaps.device).view(1, w).to(heatmaps.dtype)
    total = heatmaps.sum(dim=(-2, -1)).clamp(min=1e-6)
    x = (heatmaps * cols).sum(dim=(-2, -1)) / total
    y = (heatmaps * rows).sum(dim=(-2, -1)) / total
    return torch.stack([x, y], dim=-1)


@dataclass
class DetectorOutput:
    landmarks: list[torch.Tensor]  # per stack (B, 68, 2) in [-1, 1]
    pointmaps: list[torch.Tensor]  # per stack (B, 68, h, w), after sigmoid
    edgemaps: list[torch.Tensor]  # per stack (B, 9, h, w), after sigmoid
    fusionmaps: list[torch.Tensor]  # per stack (B, 68, h, w): what the landmarks are decoded from


class STARNet(nn.Module):
    def __init__(self, arch: DetectorArch = DetectorArch()):
        super().__init__()
        self.arch = arch
        c, n, hm = arch.channels, arch.nstack, arch.heatmap_size
        self.pre = nn.Sequential(
            CoordConv(arch.input_size, 3, 64, boundary=False, relu=True, bn=True, kernel_size=7, stride=2, padding=3),
            ResBlock(64, 128), nn.MaxPool2d(2, 2), ResBlock(128, 128), ResBlock(128, c))
        self.hgs = nn.ModuleList([Hourglass(arch.nlevels, c, coord_size=hm, first=i == 0) for i in range(n)])
        self.features = nn.ModuleList([nn.Sequential(ResBlock(c, c), ConvBlock(c, c, 1, bn=True, relu=True))
                                       for _ in range(n)])
        self.out_heatmaps = nn.ModuleList([ConvBlock(c, NUM_POINTS, 1, relu=False) for _ in range(n)])
        self.e2h_transform = EdgeToPoints()
        self.out_edgemaps = nn.ModuleList([ConvBlock(c, len(EDGES), 1, relu=False) for _ in range(n)])
        self.out_pointmaps = nn.ModuleList([ConvBlock(c, NUM_POINTS, 1, relu=False) for _ in range(n)])
        self.merge_edgemaps = nn.ModuleList([ConvBlock(len(EDGES), c, 1, relu=False) for _ in range(n - 1)])
        self.merge_pointmaps = nn.ModuleList([ConvBlock(NUM_POINTS, c, 1, relu=False) for _ in range(n - 1)])
        self.merge_features = nn.ModuleList([ConvBlock(c, c, 1, relu=False) for _ in range(n - 1)])
        self.merge_heatmaps = nn.ModuleList([ConvBlock(NUM_POINTS, c, 1, relu=False) for _ in range(n - 1)])
        for head in [*self.out_pointmaps, *self.out_edgemaps]:
            nn.init.constant_(head.conv.bias, BACKGROUND_LOGIT)

    def forward(self, x: torch.Tensor) -> DetectorOutput:
        x = self.pre(x)
        out = DetectorOutput([], [], [], [])
        heatmaps = None
        for i in range(self.arch.nstack):
            feature = self.features[i](self.hgs[i](x, heatmaps))
            heatmaps = F.relu(F.instance_norm(self.out_heatmaps[i](feature)))
            pointmaps = torch.sigmoid(self.out_pointmaps[i](feature))
            edgemaps = torch.sigmoid(self.out_edgemaps[i](feature))
            fusion = self.e2h_transform(edgemaps) * pointmaps * heatmaps
            out.landmarks.append(decode_heatmaps(fusion))
            out.pointmaps.append(pointmaps)
            out.edgemaps.append(edgemaps)
            out.fusionmaps.append(fusion)
            if i < self.arch.nstack - 1:
                x = x + self.merge_features[i](feature) + self.merge_heatmaps[i](heatmaps)
                x = x + self.merge_pointmaps[i](pointmaps)
                x = x + self.merge_edgemaps[i](edgemaps)
        return out


def to_network_input(crops: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(B, S, S, 3) RGB uint8 crops -> (B, 3, S, S) BGR in [-1, 1], as STAR feeds its network; scaled in float32, then
    cast to `dtype`."""
    return ((crops.flip(-1).permute(0, 3, 1, 2).float() - 127.5) / 127.5).to(dtype)


def normalised_to_pixels(points: torch.Tensor, size: int) -> torch.Tensor:
    """[-1, 1] network coordinates -> crop pixel coordinates (STAR's convention)."""
    return ((points + 1) * size - 1) / 2
