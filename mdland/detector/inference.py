"""The detector on face crops: eagerly, or replayed from CUDA graphs. A forward pass of STAR's 4-stack hourglass is
several hundred small kernels; at small batches their launches from Python cost more than the GPU's work (19.6 ms at
batch 1 on an H100), and each launch takes the GIL back from the threads decoding images beside it. A captured graph
is one launch."""

import numpy as np
import torch

from mdland.detector.checkpoint import load_detector
from mdland.detector.model import STARNet, normalised_to_pixels, to_network_input
from mdland.landmarks.align import crop_matrix, uncrop_points, warp_image


def crop_landmarks(net: STARNet, crops: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(B, S, S, 3) RGB uint8 crops on the network's device -> (B, 68, 2) float32 points in crop pixels."""
    return normalised_to_pixels(net(to_network_input(crops, dtype)).landmarks[-1].float(), net.arch.input_size)


def graph_batch_sizes(max_batch_size: int) -> list[int]:
    """The batch sizes captured: each up to 8, every multiple of 8 above, and the maximum. A batch runs in the smallest
    that holds it, so at most 7 padding faces ride along."""
    return sorted({*range(1, min(8, max_batch_size) + 1), *range(8, max_batch_size + 1, 8), max_batch_size})


class CudaGraphDetector:
    """`crop_landmarks` of one network and precision, captured as a CUDA graph per batch size (`graph_batch_sizes`).
    Call it from one thread at a time: the graphs share their input buffer and their memory."""

    @torch.no_grad()
    def __init__(self, net: STARNet, dtype: torch.dtype, max_batch_size: int):
        # The graphs read the network's weights at fixed addresses but hold no reference to them: keep it alive.
        self.net, self.arch, self.dtype, self.max_batch_size = net, net.arch, dtype, max_batch_size
        self.device = next(net.parameters()).device
        if self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need the network on a GPU, not {self.device}")
        self.sizes = graph_batch_sizes(max_batch_size)
        size = net.arch.input_size
        self.crops = torch.zeros(max_batch_size, size, size, 3, dtype=torch.uint8, device=self.device)
        # Lazy initialisation and cuDNN's autotuning (which allocates and synchronises) happen before capture, on a
        # side stream as capture requires.
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for n in self.sizes:
                for _ in range(2):
                    crop_landmarks(net, self.crops[:n], dtype)
        torch.cuda.current_stream(self.device).wait_stream(side)
        # One memory pool, the largest batch captured first: the others reuse its intermediates' memory. A replay may
        # overwrite another graph's output, so each call copies its output out before the next replay.
        pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.points: dict[int, torch.Tensor] = {}
        for n in reversed(self.sizes):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.points[n] = crop_landmarks(net, self.crops[:n], dtype)
            self.graphs[n] = graph
        torch.cuda.synchronize(self.device)

    def __call__(self, crops: torch.Tensor) -> torch.Tensor:
        """(B, S, S, 3) uint8 crops, on any device -> (B, 68, 2) float32 points in crop pixels, on the CPU."""
        if not len(crops):
            raise ValueError("no crops to run the detector on")
        out = []
        for start in range(0, len(crops), self.max_batch_size):
            chunk = crops[start : start + self.max_batch_size]
            n = next(s for s in self.sizes if s >= len(chunk))
            self.crops[: len(chunk)].copy_(chunk)  # rows past it keep older crops: their points are not read
            self.graphs[n].replay()
            out.append(self.points[n][: len(chunk)].cpu())
        return torch.cat(out)


@torch.no_grad()
def predict_crops(net: STARNet | CudaGraphDetector, crops: list[np.ndarray], matrices: list[np.ndarray],
                  dtype: torch.dtype = torch.float32) -> np.ndarray:
    """Landmarks of already-cropped faces (RGB uint8), mapped back through each crop's source->crop matrix. A
    `CudaGraphDetector` runs in its own precision."""
    batch = torch.from_numpy(np.stack(crops))
    if isinstance(net, CudaGraphDetector):
        points = net(batch)
    else:
        points = crop_landmarks(net, batch.to(next(net.parameters()).device), dtype).cpu()
    return np.stack([uncrop_points(p, m) for p, m in zip(points.numpy(), matrices)])


def predict(net: STARNet | CudaGraphDetector, images: list[np.ndarray],
            crops: list[tuple[tuple[float, float], float]], dtype: torch.dtype = torch.float32) -> np.ndarray:
    """(N, 68, 2) landmarks in each image's pixels; each face is cropped at its (centre, scale), as STAR crops."""
    size = net.arch.input_size
    matrices = [crop_matrix(centre, scale, size) for centre, scale in crops]
    return predict_crops(net, [warp_image(im, m, size) for im, m in zip(images, matrices)], matrices, dtype)


def serving_detector(uri: str, device: torch.device, max_batch_size: int,
                     cuda_graphs: bool = True) -> tuple[STARNet | CudaGraphDetector, torch.dtype]:
    """The detector as a serving replica runs it, warmed up, and its precision: fp16 on a GPU (from CUDA graphs with
    `cuda_graphs`: their capture warms every batch size; eagerly, one pass per batch size lets cuDNN pick its kernels
    first), fp32 on CPU."""
    on_gpu = device.type == "cuda"
    dtype = torch.float16 if on_gpu else torch.float32
    net = load_detector(uri, device=device).eval().to(dtype=dtype)
    if on_gpu and cuda_graphs:
        return CudaGraphDetector(net, dtype, max_batch_size), dtype
    size = net.arch.input_size
    for n in range(1, max_batch_size + 1) if on_gpu else [1]:
        predict_crops(net, [np.zeros((size, size, 3), np.uint8)] * n, [np.eye(3)] * n, dtype)
    return net, dtype
