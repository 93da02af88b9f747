import argparse
import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mdland.detector.checkpoint import load_detector, read_checkpoint, save_checkpoint
from mdland.detector.model import ARCHS, STARNet, decode_heatmaps

DATA = Path(__file__).parent / "data"


def fill(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """The deterministic weights the reference outputs in tests/data were computed with, by STAR's own code."""
    rng = np.random.default_rng(int(hashlib.sha256(name.encode()).hexdigest()[:8], 16))
    if tensor.dtype == torch.int64:
        return torch.zeros_like(tensor)
    if name.endswith("running_var"):
        v = rng.uniform(0.5, 1.5, tensor.shape)
    elif name.endswith("running_mean"):
        v = rng.normal(0, 0.1, tensor.shape)
    elif name.endswith(".weight") and tensor.ndim == 1:
        v = rng.uniform(0.8, 1.2, tensor.shape)
    else:
        v = rng.normal(0, 1.0, tensor.shape) / np.sqrt(max(1, np.prod(tensor.shape[1:])))
    return torch.tensor(v, dtype=tensor.dtype)


@pytest.fixture(scope="module")
def star():
    net = STARNet()
    state = {k: v if k.startswith("e2h_transform") else fill(k, v) for k, v in net.state_dict().items()}
    net.load_state_dict(state, strict=True)
    return net.eval()


def test_parameter_names_and_shapes_are_stars():
    expected = json.loads((DATA / "star_300w_keys.json").read_text())
    ours = [[k, list(v.shape)] for k, v in STARNet().state_dict().items()]
    assert ours == expected  # names, shapes and order of STAR's 300W state dict: 1450 entries
    assert sum(p.numel() for p in STARNet().parameters()) == 17_069_572


def test_outputs_match_stars_network_on_the_same_weights(star):
    ref = json.loads((DATA / "star_300w_reference.json").read_text())
    x = torch.tensor(np.random.default_rng(0).uniform(-1, 1, (2, 3, 256, 256)), dtype=torch.float32)
    with torch.no_grad():
        out = star(x)
    np.testing.assert_allclose(out.landmarks[-1].numpy(), np.array(ref["final_landmarks"]["values"]), atol=1e-4)
    assert abs(out.pointmaps[-1].mean().item() - ref["pointmaps_stack3"]["mean"]) < 1e-4
    assert abs(out.edgemaps[-1].mean().item() - ref["edgemaps_stack3"]["mean"]) < 1e-4
    assert abs(out.fusionmaps[-1].mean().item() - ref["fusionmaps_stack3"]["mean"]) < 1e-4
    assert [t.shape for t in (out.landmarks[0], out.pointmaps[0], out.edgemaps[0])] == [
        (2, 68, 2), (2, 68, 64, 64), (2, 9, 64, 64)]


def test_checkpoint_round_trip_is_exact_and_star_files_load(star, tmp_path):
    save_checkpoint(star, str(tmp_path / "d.pkl"))
    back = load_detector(str(tmp_path / "d.pkl")).eval()
    for (k, a), b in zip(star.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), k
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        assert torch.equal(star(x).landmarks[-1], back(x).landmarks[-1])
    # A STAR training checkpoint: `net` (saved from a wrapped model), plus optimizer state and epoch.
    buf = io.BytesIO()
    torch.save({"net": {f"module.{k}": v for k, v in star.state_dict().items()}, "epoch": 499, "optimizer": {}}, buf)
    (tmp_path / "star.pkl").write_bytes(buf.getvalue())
    state, arch = read_checkpoint(str(tmp_path / "star.pkl"))
    assert arch == ARCHS["star-300w"] and "pre.0.conv.weight" in state


def test_bad_checkpoints_fail_clearly(tmp_path):
    (tmp_path / "junk.pkl").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pkl: not a readable detector checkpoint"):
        load_detector(str(tmp_path / "junk.pkl"))
    # A pickle of other objects: one line, without torch's advice to load it unsafely (weights_only=False).
    buf = io.BytesIO()
    torch.save({"net": {}, "config": argparse.Namespace(lr=1)}, buf)
    (tmp_path / "objects.pkl").write_bytes(buf.getvalue())
    with pytest.raises(ValueError) as refused:
        load_detector(str(tmp_path / "objects.pkl"))
    assert str(refused.value).startswith(f"{tmp_path / 'objects.pkl'}: not a readable detector checkpoint, one of "
                                         "tensors and plain containers (UnpicklingError: ")
    assert "\n" not in str(refused.value) and "weights_only" not in str(refused.value)
    with pytest.raises(ValueError, match="missing.pkl: detector checkpoint not found"):
        load_detector(str(tmp_path / "missing.pkl"))
    buf = io.BytesIO()
    torch.save({"net": STARNet(ARCHS["tiny"]).state_dict(), "arch": {"input_size": 64, "stacks": 2}}, buf)
    (tmp_path / "other-arch.pkl").write_bytes(buf.getvalue())
    with pytest.raises(ValueError, match="other-arch.pkl: unknown detector architecture in the checkpoint"):
        load_detector(str(tmp_path / "other-arch.pkl"))
    tiny = STARNet(ARCHS["tiny"])
    state = tiny.state_dict()
    state.pop("pre.0.conv.bias")
    buf = io.BytesIO()
    torch.save({"net": state, "arch": {"input_size": 64, "nstack": 2, "nlevels": 2, "channels": 32}}, buf)
    (tmp_path / "partial.pkl").write_bytes(buf.getvalue())
    with pytest.raises(ValueError, match=r"partial.pkl: weights do not fit the STAR network \(Missing key.*pre.0.conv.bias"):
        load_detector(str(tmp_path / "partial.pkl"))
    # STAR's WFLW model has 98 heatmaps per stack: say so, not just that loading failed.
    wflw = {k: (torch.zeros(98, *v.shape[1:]) if k.startswith("out_heatmaps.") and v.ndim and v.shape[0] == 68 else v)
            for k, v in STARNet(ARCHS["tiny"]).state_dict().items()}
    buf = io.BytesIO()
    torch.save({"net": wflw, "arch": {"input_size": 64, "nstack": 2, "nlevels": 2, "channels": 32}}, buf)
    (tmp_path / "wflw.pkl").write_bytes(buf.getvalue())
    with pytest.raises(ValueError, match="wflw.pkl: a 98-point model; mdland detects the 68-point scheme"):
        load_detector(str(tmp_path / "wflw.pkl"))


def test_decoding_a_single_peak():
    maps = torch.zeros(1, 2, 64, 64)
    maps[0, 0, 10, 50] = 1.0  # row 10, column 50
    maps[0, 1, 63, 0] = 3.0
    xy = decode_heatmaps(maps)[0]
    np.testing.assert_allclose(xy[0].numpy(), [50 / 63 * 2 - 1, 10 / 63 * 2 - 1], atol=1e-6)
    np.testing.assert_allclose(xy[1].numpy(), [-1, 1], atol=1e-6)
    assert torch.equal(decode_heatmaps(torch.zeros(1, 1, 8, 8)), torch.zeros(1, 1, 2))


def test_a_fresh_network_starts_with_background_point_and_edge_maps():
    # Training from scratch should not spend its first epochs unlearning maps that are 0.5 everywhere.
    torch.manual_seed(0)
    out = STARNet(ARCHS["tiny"]).eval()(torch.randn(2, 3, 64, 64))
    for maps in (*out.pointmaps, *out.edgemaps):
        assert maps.mean() < 0.05 and maps.max() < 0.5


def test_graph_batch_sizes_cover_every_batch_with_few_padding_faces():
    from mdland.detector.inference import CudaGraphDetector, graph_batch_sizes

    assert graph_batch_sizes(16) == [1, 2, 3, 4, 5, 6, 7, 8, 16]
    assert graph_batch_sizes(20) == [1, 2, 3, 4, 5, 6, 7, 8, 16, 20]
    assert graph_batch_sizes(3) == [1, 2, 3]
    for top in (1, 8, 13, 32, 50):
        sizes = graph_batch_sizes(top)
        assert max(sizes) == top
        assert all(0 <= min(s for s in sizes if s >= n) - n <= 7 for n in range(1, top + 1))
    with pytest.raises(ValueError, match="need the network on a GPU"):
        CudaGraphDetector(STARNet(ARCHS["tiny"]), torch.float32, 4)
