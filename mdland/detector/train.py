"""Step 4 of the method: fine-tune the STAR detector on synthetic (and/or real) shards with Ray Train + DeepSpeed.

Every worker runs `train_func`: the STAR network under DeepSpeed (ZeRO stage 1; bf16 on GPU, fp32 on CPU), Adam,
STAR's losses, augmented crops from Ray Data; rank 0 keeps STAR's moving average of the weights. After each epoch
rank 0 measures NME on the held-out shards with the weights and with their average, and a checkpoint (DeepSpeed
state, `detector.pkl`, history, loss curve) goes to `storage_path/name/checkpoint_NNNNNN`; the best weights seen
(of either kind) are also kept at `storage_path/name/best/detector.pkl`. A re-run with the same name resumes
from the latest checkpoint. Starting from a STAR checkpoint (`init`) loads its weights only: the new run starts at
epoch 0 of its own schedule, however long the checkpoint had trained.
"""

import json
import tempfile
import time
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from mdland.config import check_counts, check_learning_rate, from_dict
from mdland.data import storage
from mdland.data.datasets import check_training_data, count_rows, local_epoch, read_shards
from mdland.data.shards import read_dataset
from mdland.detector.checkpoint import load_detector, save_checkpoint
from mdland.detector.data import COLUMNS, prepare_detector_batch
from mdland.detector.loss import detector_loss
from mdland.detector.metrics import nme
from mdland.detector.model import ARCHS, STARNet, normalised_to_pixels, to_network_input
from mdland.log import get_logger, setup_logging
from mdland.plots import plot_curves
from mdland.session import (LocalSession, RaySession, check_precision, check_resumable, deepspeed_engine,
                            launch, master_weights, mean_over_ranks, pick_device, training_dtype)

log = get_logger(__name__)
VAL_KEYS = {"net": "val_nme", "ema": "val_nme_ema"}  # history's validation NME of the weights and of their average


@dataclass
class DetectorTrainConfig:
    data: list[str] = field(default_factory=list)  # shard datasets to train on (synthetic and/or real)
    val_data: list[str] = field(default_factory=list)  # held-out shard datasets (e.g. one per domain): per-epoch NME
    init: str | None = None  # a STAR .pkl (or mdland detector.pkl) to start from; None: random
    arch: str = "star-300w"  # used when starting from scratch
    epochs: int = 10
    batch_size: int = 32  # per worker
    learning_rate: float = 1e-4
    augment: bool = True  # STAR's flip and geometry
    texture: bool = True  # and, with augment, STAR's texture augmentation (occlusion, blur, gamma, noise, grey)
    star_w: float = 1.0
    # STAR's trainer: a moving average of the weights and BatchNorm statistics, with a half-life of 10,000 faces
    # (0: none); each epoch validates both, and the better becomes the best checkpoint.
    ema_half_life: float = 10_000
    zero_stage: int = 1
    precision: str = "auto"  # auto: bf16 autocast on GPU (fp32 weights and BatchNorm statistics), fp32 on CPU
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    log_every: int = 20
    storage_path: str = "runs"
    name: str = "detector"
    keep_checkpoints: int = 3
    max_failures: int = 1
    seed: int = 0


def check_config(cfg: DetectorTrainConfig) -> tuple[int, int]:
    """Fail before any worker starts; returns the number of training faces and the network's input size."""
    check_counts(cfg, ("epochs", "batch_size", "num_workers", "log_every", "keep_checkpoints"))
    check_learning_rate(cfg.learning_rate)
    check_precision(cfg.precision, cfg.zero_stage, cfg.use_gpu, bf16_weights=False)
    if not cfg.ema_half_life >= 0:
        raise ValueError(f"ema_half_life: a number of faces, 0 for no average, got {cfg.ema_half_life}")
    if cfg.init is None and cfg.arch not in ARCHS:
        raise ValueError(f"arch: unknown detector architecture {cfg.arch!r}; choose one of {sorted(ARCHS)}")
    # Reads and checks the weights now, not on every worker later.
    size = load_detector(cfg.init, cfg.arch).arch.input_size
    rows = check_training_data(cfg.data, cfg.batch_size, cfg.num_workers)
    for val in cfg.val_data:
        if count_rows(val) == 0:
            raise ValueError(f"val_data: {val} holds no faces")
    storage.check_writable(storage.join(cfg.storage_path, cfg.name))
    return rows, size


def autocast(device: torch.device, dtype: torch.dtype):
    """The forward pass's precision outside the engine (validation), as the engine runs its own."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


@torch.no_grad()
def validation_nme(net, batch: dict, device, dtype) -> float:
    """Mean inter-ocular NME of the final stack on prepared (unaugmented) validation faces."""
    net.eval()
    size = net.arch.input_size
    preds = []
    for start in range(0, len(batch["image"]), 64):
        x = to_network_input(torch.from_numpy(batch["image"][start : start + 64]).to(device))
        with autocast(device, dtype):
            landmarks = net(x).landmarks[-1]
        preds.append(normalised_to_pixels(landmarks.float(), size).cpu().numpy())
    net.train()
    return float(nme(np.concatenate(preds), normalised_to_pixels(torch.from_numpy(batch["landmarks"]), size).numpy()).mean())


def moving_average(net: STARNet, state: dict[str, torch.Tensor] | None = None) -> STARNet:
    """A frozen copy of `net` to average its weights into, starting from `state` (a restored average) if given.
    Built on rank 0 only: its random initialisation, overwritten at once, draws from rank 0's generator alone."""
    ema = STARNet(net.arch).to(next(net.parameters()).device)
    ema.load_state_dict(state if state is not None else net.state_dict())
    return ema.eval().requires_grad_(False)


@torch.no_grad()
def update_moving_average(ema: STARNet, net: torch.nn.Module, decay: float) -> None:
    """ema = decay * ema + (1 - decay) * net, over the weights and the floating-point buffers (BatchNorm's running
    statistics), as STAR's trainer averages them; integer buffers (BatchNorm's step counts) are copied, as it does."""
    pairs = list(zip(ema.state_dict().values(), net.state_dict().values()))
    floats = [(a, b) for a, b in pairs if a.is_floating_point()]
    torch._foreach_lerp_([a for a, _ in floats], [b for _, b in floats], 1.0 - decay)
    for a, b in pairs:
        if not a.is_floating_point():
            a.copy_(b)


def training_batches(cfg: DetectorTrainConfig, size: int) -> partial:
    """The one preparation of training rows, for Ray Data's map and for the plain-process epochs alike."""
    return partial(prepare_detector_batch, size=size, augment=cfg.augment, texture=cfg.texture)


def train_func(config: dict) -> None:
    setup_logging()
    cfg = from_dict(DetectorTrainConfig, config["train"])
    device = pick_device(cfg.use_gpu)
    on_gpu = device.type == "cuda"
    dtype = training_dtype(cfg.precision, on_gpu)
    torch.manual_seed(cfg.seed)  # the same random start on every worker
    net = load_detector(cfg.init, cfg.arch, device).train()
    size = net.arch.input_size
    prepare = training_batches(cfg, size)
    session = (LocalSession(cfg.storage_path, cfg.name, cfg.keep_checkpoints,
                            lambda bs, seed: local_epoch(cfg.data, COLUMNS, prepare, bs, seed))
               if config.get("local") else RaySession())
    # fp32 weights with the forward pass under bf16 autocast: with the model cast to bf16, BatchNorm's running
    # statistics would stop moving once within a bf16 step (~1%) of the batch statistics, and eval-mode predictions
    # use them.
    engine = deepspeed_engine(net, batch_size=cfg.batch_size, zero_stage=cfg.zero_stage, dtype=torch.float32,
                              on_gpu=on_gpu, autocast=dtype,
                              optimizer={"type": "Adam", "lr": cfg.learning_rate})
    history, epoch, best = [], 0, float("inf")
    keeps_average = cfg.ema_half_life > 0 and session.rank == 0
    restored_average = None
    with session.latest_checkpoint() as restored:
        if restored:
            _, client = engine.load_checkpoint(restored)
            history, epoch, best = client["history"], client["epoch"], client["best_nme"]
            history.append({"step": engine.global_steps, "epoch": epoch, "resumed": True})
            log.info("resumed after epoch %d (best validation NME %.2f%%)", epoch, 100 * best)
            if keeps_average:  # none in a checkpoint of a run without one: the average starts from the weights
                restored_average = torch.load(Path(restored) / "detector.pkl", map_location=device,
                                              weights_only=True).get("net_ema")
    ema = moving_average(engine.module, restored_average) if keeps_average else None
    decay = 0.5 ** (cfg.batch_size * session.world / cfg.ema_half_life) if keeps_average else 0.0  # per step
    val = None
    if session.rank == 0 and cfg.val_data:
        table = pa.concat_tables([read_dataset(v).select(COLUMNS) for v in cfg.val_data])
        val = prepare_detector_batch({c: table.column(c).to_pylist() for c in COLUMNS}, size, augment=False,
                                     targets=False)
        if not history:
            history.append({"step": 0, "epoch": 0, "val_nme": validation_nme(engine.module, val, device, dtype)})
            log.info("validation NME before training: %.2f%%", 100 * history[-1]["val_nme"])
    while epoch < cfg.epochs:
        losses, seen, t0 = [], 0, time.time()
        for batch in session.epoch(cfg.batch_size, cfg.seed + epoch):
            out = engine(to_network_input(torch.as_tensor(batch["image"], device=device)))
            loss, parts = detector_loss(out, *(torch.as_tensor(batch[k], device=device)
                                               for k in ("landmarks", "pointmaps", "edgemaps")), cfg.star_w)
            engine.backward(loss)
            engine.step()
            if ema is not None:
                update_moving_average(ema, engine.module, decay)
            losses.append(loss.detach())
            seen += len(batch["image"]) * session.world
            if session.rank == 0 and engine.global_steps % cfg.log_every == 0:
                log.info("epoch %d step %d loss %.4f (star %.4f) %.1f images/s", epoch + 1, engine.global_steps,
                         loss.item(), parts["star"].item(), seen / (time.time() - t0))
        epoch += 1
        loss = mean_over_ranks(torch.stack(losses).float().mean(), session.world)  # every rank ends the epoch here
        record = {"step": engine.global_steps, "epoch": epoch, "loss": float(loss),
                  "images_per_s": seen / (time.time() - t0)}
        kept = "net"  # with nothing to validate on, the latest weights are the best known
        if val is not None:
            record["val_nme"] = validation_nme(engine.module, val, device, dtype)
            if ema is not None:
                record["val_nme_ema"] = validation_nme(ema, val, device, dtype)
            scores = {k: record[key] for k, key in VAL_KEYS.items() if key in record}
            kept = min(scores, key=scores.get)
            if scores[kept] < best:
                best = scores[kept]
            else:
                kept = None
        history.append(record)
        _checkpoint(engine, session, cfg, history, epoch, best, kept, ema)


def _checkpoint(engine, session, cfg: DetectorTrainConfig, history: list, epoch: int, best: float,
                kept: str | None, ema: STARNet | None) -> None:
    """`kept`: the weights ("net" or their average, "ema") that became the best this epoch, None if neither."""
    with tempfile.TemporaryDirectory() as d:
        engine.save_checkpoint(d, tag=f"epoch{epoch}", client_state={"history": history, "epoch": epoch,
                                                                     "best_nme": best})
        last = history[-1]
        validated = "val_nme" in last
        weights = master_weights(engine)
        if session.rank == 0:
            average = ema.state_dict() if ema is not None else None
            save_checkpoint(engine.module, str(Path(d) / "detector.pkl"), weights, average, epoch=epoch)
            (Path(d) / "history.json").write_text(json.dumps(history, indent=1))
            plot_curves(history, Path(d) / "loss.png", ("loss", *VAL_KEYS.values()), "detector fine-tuning")
            if kept:
                save_checkpoint(engine.module, storage.join(cfg.storage_path, cfg.name, "best", "detector.pkl"),
                                average if kept == "ema" else weights, epoch=epoch, averaged=kept == "ema",
                                **({"val_nme": last[VAL_KEYS[kept]]} if validated else {}))
            scores = ", ".join(f"{'average ' if k == 'ema' else ''}{100 * last[key]:.2f}%"
                               for k, key in VAL_KEYS.items() if key in last)
            log.info("epoch %d: loss %.4f, validation NME %s%s", epoch, last["loss"], scores or "n/a",
                     f" (best: {'the average' if kept == 'ema' else 'the weights'})" if kept and validated else "")
        session.report(last | {"best_val_nme": best}, d, engine.global_steps)


def run_training(cfg: DetectorTrainConfig, local: bool = False) -> dict:
    """Fine-tune on Ray Train (or in this process with `local`); returns the last metrics and the best weights."""
    cfg = replace(cfg, data=[storage.absolute(d) for d in cfg.data],
                  val_data=[storage.absolute(v) for v in cfg.val_data],
                  init=cfg.init and storage.absolute(cfg.init), storage_path=storage.absolute(cfg.storage_path))
    rows, size = check_config(cfg)
    check_resumable(storage.join(cfg.storage_path, cfg.name), local, 1 if local else cfg.num_workers,
                    "start a new run (another name) with `init` set to this run's detector.pkl, which keeps "
                    "the weights and resets the optimizer")
    best = storage.join(cfg.storage_path, cfg.name, "best", "detector.pkl")
    log.info("fine-tuning the detector on %d faces from %s", rows, cfg.data)

    def dataset():
        return read_shards(cfg.data, COLUMNS).map_batches(training_batches(cfg, size), batch_format="numpy",
                                                          batch_size=32)

    return {**launch(train_func, cfg, dataset, local), "best": best}
