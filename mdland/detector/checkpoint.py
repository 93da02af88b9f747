"""Detector weights in and out: STAR's released `.pkl` checkpoints (the `net` state dict) and mdland's own, which
use the same layout (`{"net": state_dict, "arch": {...}}`) so either tool can read the other's."""

import io
import re
from dataclasses import asdict

import torch

from mdland.data import storage
from mdland.detector.model import ARCHS, DetectorArch, STARNet


def read_checkpoint(uri: str) -> tuple[dict, DetectorArch]:
    """(state dict, architecture) from a checkpoint file, local or s3://."""
    try:
        data = storage.read_bytes(uri)
    except storage.NotFound:
        raise ValueError(f"{uri}: detector checkpoint not found") from None
    except storage.StorageError as e:  # unreadable: access denied, no endpoint, ...
        raise ValueError(f"detector checkpoint: {e}") from None
    try:
        blob = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # a pickle that is not plain tensors and containers, or not a torch file at all
        # Not torch's advice to load with weights_only=False, which would run whatever the pickle holds.
        detail = str(e).split("WeightsUnpickler error:")[-1].strip().splitlines()
        reason = f"{type(e).__name__}: {detail[0]}" if detail and detail[0] else type(e).__name__
        raise ValueError(f"{uri}: not a readable detector checkpoint, one of tensors and plain containers "
                         f"({reason})") from None
    state = blob.get("net", blob) if isinstance(blob, dict) else None
    if not isinstance(state, dict) or not state:
        raise ValueError(f"{uri}: no `net` state dict in the checkpoint")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    try:
        arch = DetectorArch(**blob["arch"]) if isinstance(blob.get("arch"), dict) else infer_arch(state, uri)
    except TypeError as e:  # an `arch` entry with other keys
        raise ValueError(f"{uri}: unknown detector architecture in the checkpoint ({e})") from None
    return state, arch


def infer_arch(state: dict, where: str) -> DetectorArch:
    """The architecture a STAR state dict was built with (its input size is 256, as all of STAR's are)."""
    try:
        nstack = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"hgs\.(\d+)\.", k)))
        channels = state["pre.4.conv3.conv.weight"].shape[0]
        nlevels = 1 + max(k.count("low2.") for k in state if k.startswith("hgs.0."))
    except (KeyError, ValueError):
        raise ValueError(f"{where}: not a STAR stacked-hourglass state dict") from None
    return DetectorArch(input_size=256, nstack=nstack, nlevels=nlevels - 1, channels=channels)


def save_checkpoint(net: STARNet, path: str, weights: dict[str, torch.Tensor] | None = None,
                    ema: dict[str, torch.Tensor] | None = None, **extra) -> None:
    """`net`'s architecture and weights (`weights` when given, e.g. a trainer's fp32 master copy) as fp32 `.pkl`;
    `ema`, a moving average of the weights, goes under `net_ema`, where STAR's trainer keeps its own."""
    def fp32_cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.detach().float().cpu() if v.is_floating_point() else v.cpu() for k, v in state.items()}

    blob = {"net": fp32_cpu(weights if weights is not None else net.state_dict()), "arch": asdict(net.arch), **extra}
    if ema is not None:
        blob["net_ema"] = fp32_cpu(ema)
    buf = io.BytesIO()
    torch.save(blob, buf)
    storage.write_bytes(path, buf.getvalue())


def load_detector(uri: str | None, arch: str = "star-300w", device: str | torch.device = "cpu") -> STARNet:
    """A detector from a checkpoint (strict: every STAR parameter name must match), or a fresh one of `arch`."""
    if uri is None:
        if arch not in ARCHS:
            raise ValueError(f"unknown detector architecture {arch!r}; choose one of {sorted(ARCHS)}")
        return STARNet(ARCHS[arch]).to(device)
    state, found = read_checkpoint(uri)
    net = STARNet(found)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        points = state.get("out_heatmaps.0.conv.weight")
        if points is not None and points.shape[0] != 68:  # e.g. STAR's 98-point WFLW or 29-point COFW models
            raise ValueError(f"{uri}: a {points.shape[0]}-point model; mdland detects the 68-point scheme") from None
        detail = [line.strip() for line in str(e).splitlines()[1:] if line.strip()][:1]
        raise ValueError(f"{uri}: weights do not fit the STAR network ({detail[0] if detail else e})") from None
    return net.to(device)
