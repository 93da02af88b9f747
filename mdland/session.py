"""Where a `train_func` runs: on a Ray Train worker, or alone in one plain process for debugging.

Both give the rank and world size, the latest checkpoint as a local folder, one epoch of numpy batches, and
`report(metrics, checkpoint_dir, step)`. On Ray, storage, resume and failure handling are Ray Train's; in a plain
process, checkpoints are copied to `storage_path/name/checkpoint_NNNNNN` and `latest.json` points at the newest.
"""

import contextlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from mdland.cluster import check_gpus, free_port, init_ray
from mdland.data import storage
from mdland.log import get_logger

PRECISIONS = ("auto", "bf16", "fp32")
WORKERS = "workers.json"  # in each checkpoint: {"workers": the number of ranks that wrote it}
LOCAL_POINTER = "latest.json"  # a plain-process run's latest checkpoint
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's record of a run's checkpoints
log = get_logger(__name__)


class RaySession:
    def __init__(self):
        import ray.train

        self.train = ray.train
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[str | None]:
        ckpt = self.train.get_checkpoint()
        if ckpt is None:
            yield None
        else:
            with ckpt.as_directory() as d:
                yield d
                # Ranks on one node share one download, deleted when its last reader leaves: a rank that comes to
                # it after the others have left finds it gone. No rank leaves before every rank has read it.
                if torch.distributed.is_initialized():
                    torch.distributed.barrier()

    def epoch(self, batch_size: int, seed: int) -> Iterator[dict]:
        shard = self.train.get_dataset_shard("train")
        return shard.iter_batches(batch_size=batch_size, batch_format="numpy", drop_last=True,
                                  local_shuffle_buffer_size=max(4 * batch_size, 64),
                                  local_shuffle_seed=seed + self.rank)

    def report(self, metrics: dict, checkpoint_dir: str, step: int) -> None:
        if self.rank == 0:  # how many ranks wrote it, even if a crash leaves some ranks' files out of it
            (Path(checkpoint_dir) / WORKERS).write_text(json.dumps({"workers": self.world}))
        self.train.report(metrics, checkpoint=self.train.Checkpoint.from_directory(checkpoint_dir),
                          checkpoint_dir_name=f"checkpoint_{step:06d}")


class LocalSession:
    def __init__(self, storage_path: str, name: str, keep: int, local_epoch: Callable[[int, int], Iterator[dict]]):
        self.rank, self.world = 0, 1
        self.root = storage.join(storage_path, name)
        self.keep = keep  # checkpoints kept, as Ray Train's CheckpointConfig(num_to_keep) does
        self.local_epoch = local_epoch

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[str | None]:
        pointer = storage.join(self.root, LOCAL_POINTER)
        if not storage.exists(pointer):
            yield None
            return
        with tempfile.TemporaryDirectory() as d:
            storage.copy_to_local(json.loads(storage.read_bytes(pointer))["checkpoint"], d)
            yield d

    def epoch(self, batch_size: int, seed: int) -> Iterator[dict]:
        return self.local_epoch(batch_size, seed)

    def report(self, metrics: dict, checkpoint_dir: str, step: int) -> None:
        uri = storage.join(self.root, f"checkpoint_{step:06d}")
        (Path(checkpoint_dir) / WORKERS).write_text(json.dumps({"workers": 1}))
        storage.copy_from_local(checkpoint_dir, uri)
        pointer = storage.join(self.root, LOCAL_POINTER)
        kept = json.loads(storage.read_bytes(pointer)).get("kept", []) if storage.exists(pointer) else []
        kept = ([k for k in kept if k != uri] + [uri])[-self.keep:]
        storage.write_bytes(pointer, json.dumps({"checkpoint": uri, "kept": kept, **metrics}).encode())
        # Only once the pointer no longer names them; also any a run cut short between copy and pointer left.
        for old in _checkpoint_folders(self.root):
            if old not in kept:
                storage.delete_folder(old)


def endless(session, batch_size: int, seed: int) -> Iterator[dict]:
    """Epoch after epoch of batches, each epoch shuffled with a new seed."""
    while True:
        yield from session.epoch(batch_size, seed)
        seed += 1000


def set_single_process_env() -> None:
    """What torch.distributed / DeepSpeed need to run as a world of one outside Ray Train."""
    for var, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(free_port())), ("RANK", "0"),
                       ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        os.environ.setdefault(var, value)


def import_deepspeed(on_gpu: bool):
    """DeepSpeed set up for this device. On CPU it uses its CPU accelerator with gloo all-reduce rather than its
    shared-memory op: that op is JIT-compiled on first use (a compiler run on every fresh machine) and a worker
    killed mid-build leaves a lock in ~/.cache/torch_extensions that hangs every later run."""
    if not on_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before DeepSpeed picks its accelerator
    import deepspeed
    import deepspeed.ops

    if not on_gpu:
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return deepspeed


def pick_device(use_gpu: bool) -> torch.device:
    """This worker's GPU when asked for and present, else the CPU. On a GPU, cuDNN autotunes its convolution kernels:
    training and benchmark batches keep one shape, so the search is paid once."""
    if use_gpu and torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True
        return torch.device(f"cuda:{torch.cuda.current_device()}")
    return torch.device("cpu")


def check_precision(precision: str, zero_stage: int, use_gpu: bool, bf16_weights: bool = True) -> None:
    """Fail fast on a precision / ZeRO stage pair the trainers cannot run (`bf16_weights`: the model itself is cast
    to bf16 and ZeRO keeps the fp32 master copy; otherwise bf16 is an autocast over fp32 weights)."""
    if zero_stage not in (0, 1, 2):
        raise ValueError(f"zero_stage: {zero_stage} is not supported; choose 0, 1 or 2")
    dtype = training_dtype(precision, use_gpu)  # an unknown precision fails here
    if bf16_weights and dtype == torch.bfloat16 and zero_stage == 0:
        raise ValueError("zero_stage: bf16 training needs ZeRO stage 1 or 2 (stage 0 keeps no fp32 master weights)")


def training_dtype(precision: str, on_gpu: bool) -> torch.dtype:
    """The dtype training computes in: `auto` is bf16 on GPU, fp32 on CPU."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision: unknown precision {precision!r}; choose one of {PRECISIONS}")
    if precision == "auto":
        return torch.bfloat16 if on_gpu else torch.float32
    return torch.bfloat16 if precision == "bf16" else torch.float32


def deepspeed_engine(model: torch.nn.Module, *, batch_size: int, optimizer: dict, zero_stage: int, dtype: torch.dtype,
                     on_gpu: bool, accumulation: int = 1, gradient_clipping: float = 0.0,
                     autocast: torch.dtype | None = None):
    """`model` under DeepSpeed ZeRO `zero_stage` (stage 2 runs as stage 1 on a single rank). In bf16 the model holds
    bf16 weights, the optimizer an fp32 master copy, and gradients accumulate in fp32. With `autocast` (and fp32
    `dtype`) the weights stay fp32 and the engine's forward runs under torch.autocast in that dtype (DeepSpeed's own:
    it switches off an autocast around it on GPU).
    The optimizer is PyTorch's Adam / AdamW (fused on GPU), so no DeepSpeed op has to compile on the node.
    `optimizer`: {"type": "Adam" or "AdamW", "lr": ..., other torch.optim args}."""
    deepspeed = import_deepspeed(on_gpu)
    bf16 = dtype == torch.bfloat16
    full = {}
    if bf16:
        # DeepSpeed would start its fp32 master copy from the bf16-rounded weights: keep the originals to restore.
        full = {n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}
        model.to(dtype)  # buffers too: DeepSpeed casts only the parameters
    # With one rank there is no all-reduce to overlap, only a second gradient bucket to allocate.
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else int(
        os.environ.get("WORLD_SIZE", "1"))
    if world == 1 and zero_stage == 2:
        # Stage 2 partitions gradients across ranks: with one there is nothing to partition, and its per-parameter
        # gradient hooks cost ~35% of an SD 1.5 ControlNet step on an H100 (128 vs 198 samples/s with stage 1).
        zero_stage = 1
    kind = optimizer["type"]
    params = {k: v for k, v in optimizer.items() if k != "type"}
    config = {
        "train_micro_batch_size_per_gpu": batch_size,
        "gradient_accumulation_steps": accumulation,
        "gradient_clipping": gradient_clipping,
        "zero_optimization": {"stage": zero_stage, "overlap_comm": on_gpu and world > 1, "contiguous_gradients": True},
        # Where DeepSpeed runs its BF16_Optimizer (bf16 with ZeRO stage 1, so every single-rank run; ZeRO-2 across
        # ranks has a gradient path of its own): each gradient goes into the fp32 accumulator as backward makes it
        # and its bf16 copy is freed, so the small kernels per parameter overlap backward instead of following it.
        # A backward through engine.module outside engine.backward would leak into the next step (mdland has none).
        "bf16": {"enabled": bf16, "immediate_grad_update": True},
        # DeepSpeed's "Adam" is AdamW unless adam_w_mode is off.
        "optimizer": {"type": "Adam", "params": {**params, "torch_adam": True, "adam_w_mode": kind == "AdamW",
                                                 "fused": on_gpu}},
        "steps_per_print": 10**9,
        # Its throughput timer synchronises the device at each forward and step; mdland logs samples/s itself.
        "timers": {"throughput": {"enabled": False}},
    }
    if bf16 and zero_stage > 0:
        config["data_types"] = {"grad_accum_dtype": "fp32"}
    if autocast is not None and autocast != torch.float32:
        # No module's gradients are all-reduced in the lower precision: they stay fp32 end to end.
        config["torch_autocast"] = {"enabled": True, "dtype": str(autocast).split(".")[-1],
                                    "lower_precision_safe_modules": []}
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters()
                                                                          if p.requires_grad], config=config)
    if full:
        from deepspeed.utils import safe_set_full_fp32_param

        for name, param in engine.module.named_parameters():
            if name in full:
                safe_set_full_fp32_param(param, full[name])
    return engine


def _checkpoint_folders(run: str) -> list[str]:
    return [c for c in storage.list_folders(run) if c.rstrip("/").split("/")[-1].startswith("checkpoint_")]


def check_resumable(run: str, local: bool, workers: int, restart_hint: str) -> None:
    """Before a run `run` (storage_path/name) starts, refuse checkpoints there that it would not, or could not,
    resume from:
    - another mode's: a plain-process run resumes from its `latest.json`, Ray Train from its own snapshot, so a run
      in the other mode would start over beside them;
    - another number of workers': ZeRO's optimizer state is partitioned by rank and DeepSpeed cannot re-partition it
      (its own error comes mid-load, inside every worker, and Ray Train's retries repeat it).
    `restart_hint` says how to start over from the weights instead."""
    other, mode = (RAY_SNAPSHOT, "on Ray Train") if local else (LOCAL_POINTER, "in one process (--local)")
    if storage.exists(storage.join(run, other)):
        raise ValueError(f"name: {run} holds the checkpoints of a run {mode}, which this run would not resume from; "
                         f"resume it {mode}, or give this run another name")
    # checkpoint_<step>, zero-padded: the last name is the latest step. One without rank 0's files (DeepSpeed's
    # `latest`, our workers.json) was cut short, and Ray resumes from the one before it.
    latest = next((c for c in reversed(_checkpoint_folders(run)) if storage.exists(storage.join(c, "latest"))
                   and storage.exists(storage.join(c, WORKERS))), None)
    if latest is None:
        return
    saved = json.loads(storage.read_bytes(storage.join(latest, WORKERS)))["workers"]
    if saved != workers:
        raise ValueError(f"num_workers: {latest} was written by {saved} worker(s) and this run has {workers}; "
                         f"ZeRO's optimizer state cannot be re-partitioned. Resume with num_workers={saved}, or "
                         f"{restart_hint}")


def master_weights(engine) -> dict[str, torch.Tensor]:
    """The engine's state dict on the CPU with each trained weight taken from the optimizer's fp32 master copy (in
    bf16 training the module itself only holds rounded weights). Collective: every rank must call it."""
    from deepspeed.utils import safe_get_full_fp32_param

    params = dict(engine.module.named_parameters())
    weights = {}
    for name, value in engine.module.state_dict().items():
        master = safe_get_full_fp32_param(params[name]) if name in params else None
        value = value if master is None else master
        weights[name] = value.detach().float().cpu() if value.is_floating_point() else value.detach().cpu()
    return weights


def mean_over_ranks(value: torch.Tensor, world: int) -> torch.Tensor:
    """The mean of a scalar over all ranks (the loss each logs). Collective when `world` > 1."""
    if world > 1:
        value = value.clone()
        torch.distributed.all_reduce(value)
        value /= world
    return value


def reseed(seed: int, rank: int, step: int) -> None:
    """Seed torch's global RNG (noise, timesteps) differently on each rank and at each resumed step."""
    torch.manual_seed(int(np.random.SeedSequence([seed, rank, step]).generate_state(1)[0]))


def launch(train_func: Callable[[dict], None], cfg, dataset: Callable[[], object], local: bool) -> dict:
    """Run `train_func` with `cfg` (a trainer config dataclass) on Ray Train, with `dataset()` as the "train"
    dataset, or alone in this process with `local`. Returns the last reported metrics and the latest checkpoint's
    URI; checkpoints go to `cfg.storage_path/cfg.name` either way."""
    from dataclasses import asdict

    if local:
        if cfg.use_gpu and not torch.cuda.is_available():
            log.warning("use_gpu: this machine has no GPU torch can use; the run goes on on the CPU")
        set_single_process_env()
        train_func({"train": asdict(cfg), "local": True})
        return json.loads(storage.read_bytes(storage.join(cfg.storage_path, cfg.name, LOCAL_POINTER)))
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    init_ray()
    if cfg.use_gpu:
        check_gpus(cfg.num_workers, "use_gpu")
    nodes = sum(n["Alive"] for n in ray.nodes())
    if nodes > 1 and not storage.is_s3(cfg.storage_path):
        log.warning("storage_path %s is a local path on a %d-node cluster: every node must see it (a shared "
                    "filesystem), or use s3://", cfg.storage_path, nodes)
    fs, path = storage.filesystem(cfg.storage_path)
    gpu = {"GPU": 1} if cfg.use_gpu else {}
    trainer = TorchTrainer(
        train_func,
        train_loop_config={"train": asdict(cfg)},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker, **gpu}),
        run_config=RunConfig(name=cfg.name, storage_path=path, storage_filesystem=fs,
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints)),
        datasets={"train": dataset()},
    )
    result = trainer.fit()
    # Ray's path drops the URI scheme; name the checkpoint in the storage layer's terms.
    name = result.checkpoint.path.rstrip("/").split("/")[-1]
    return {**(result.metrics or {}), "checkpoint": storage.join(cfg.storage_path, cfg.name, name)}
