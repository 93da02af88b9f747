"""Where a `train_func` runs: on a Ray Train worker, or alone in one plain process for debugging.

Both give the rank and world size, the latest checkpoint as a local folder, one epoch of numpy batches, and
`report(metrics, checkpoint_dir, step)`. On Ray, storage, resume and failure handling are Ray Train's; in a plain
process, checkpoints are copied to `storage_path/name/checkpoint_NNNNNN` and `latest.json` points at the newest.
"""

import contextlib
import json
import tempfile
from collections.abc import Callable, Iterator

from mdland.data import storage


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

    def epoch(self, batch_size: int, seed: int) -> Iterator[dict]:
        shard = self.train.get_dataset_shard("train")
        return shard.iter_batches(batch_size=batch_size, batch_format="numpy", drop_last=True,
                                  local_shuffle_buffer_size=4 * batch_size, local_shuffle_seed=seed + self.rank)

    def report(self, metrics: dict, checkpoint_dir: str, step: int) -> None:
        self.train.report(metrics, checkpoint=self.train.Checkpoint.from_directory(checkpoint_dir),
                          checkpoint_dir_name=f"checkpoint_{step:06d}")


class LocalSession:
    def __init__(self, storage_path: str, name: str, local_epoch: Callable[[int, int], Iterator[dict]]):
        self.rank, self.world = 0, 1
        self.root = storage.join(storage_path, name)
        self.local_epoch = local_epoch

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[str | None]:
        pointer = storage.join(self.root, "latest.json")
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
        storage.copy_from_local(checkpoint_dir, uri)
        storage.write_bytes(storage.join(self.root, "latest.json"), json.dumps({"checkpoint": uri, **metrics}).encode())


def endless(session, batch_size: int, seed: int) -> Iterator[dict]:
    """Epoch after epoch of batches, each epoch shuffled with a new seed."""
    while True:
        yield from session.epoch(batch_size, seed)
        seed += 1000


def set_single_process_env() -> None:
    """What torch.distributed / DeepSpeed need to run as a world of one outside Ray Train."""
    import os
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for var, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(port)), ("RANK", "0"),
                       ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        os.environ.setdefault(var, value)


def import_deepspeed(on_gpu: bool):
    """DeepSpeed set up for this device. On CPU it uses its CPU accelerator with gloo all-reduce rather than its
    shared-memory op: that op is JIT-compiled on first use (a compiler run on every fresh machine) and a worker
    killed mid-build leaves a lock in ~/.cache/torch_extensions that hangs every later run."""
    import os

    if not on_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before DeepSpeed picks its accelerator
    import deepspeed
    import deepspeed.ops

    if not on_gpu:
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return deepspeed


def launch(train_func: Callable[[dict], None], cfg, dataset: Callable[[], object], local: bool) -> dict:
    """Run `train_func` with `cfg` (a trainer config dataclass) on Ray Train, with `dataset()` as the "train"
    dataset, or alone in this process with `local`. Returns the last reported metrics and the latest checkpoint's
    URI; checkpoints go to `cfg.storage_path/cfg.name` either way."""
    from dataclasses import asdict

    if local:
        set_single_process_env()
        train_func({"train": asdict(cfg), "local": True})
        return json.loads(storage.read_bytes(storage.join(cfg.storage_path, cfg.name, "latest.json")))
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if not ray.is_initialized():
        ray.init()
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
