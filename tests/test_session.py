import json
from pathlib import Path

import pyarrow.fs as pafs

from mdland.cluster import init_ray

CHECKPOINT_FILES = 3000  # enough that deleting the shared download takes a while


def test_every_rank_reads_a_downloaded_checkpoint_however_late_it_comes(tmp_path):
    """Ray Train downloads a remote checkpoint once per node into a shared folder and deletes it when its last reader
    leaves: a rank that came to it just as another left found it deleted ("does not exist, even though it should
    have been created by another process"), 1 resume in 4 on S3."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    def restore_one_after_the_other(config: dict) -> None:
        """The first run saves a checkpoint; in the next, rank 1 comes to it the moment rank 0 is done with it.
        A local function, so pickled by value: Ray's workers cannot import this test module."""
        import glob
        import tempfile
        import time

        import ray.train

        from mdland.session import RaySession

        session = RaySession()
        if ray.train.get_checkpoint() is None:
            with tempfile.TemporaryDirectory() as d:
                if session.rank == 0:
                    for i in range(CHECKPOINT_FILES):
                        (Path(d) / f"part-{i:05d}").write_bytes(b"x")
                ckpt = ray.train.Checkpoint.from_directory(d) if session.rank == 0 else None
                ray.train.report({}, checkpoint=ckpt)
            return
        done = Path(config["out"]) / "rank0-read"
        if session.rank == 1:
            # Until rank 0 has read the download and let go of it (Ray marks each reader with a lock file beside it),
            # or for 5 s: a rank 0 that waits for every rank before it lets go waits for this one.
            shared = ray.train.get_checkpoint()._get_temporary_checkpoint_dir()
            start = time.time()
            while (not done.exists() or glob.glob(f"{shared}.del_lock_*")) and time.time() - start < 5:
                time.sleep(0.0005)
        with session.latest_checkpoint() as d:
            files = len(list(Path(d).iterdir()))
            if session.rank == 0:
                done.touch()
        (Path(config["out"]) / f"rank{session.rank}.json").write_text(json.dumps({"files": files}))

    # Not the local filesystem's class, so Ray downloads checkpoints as it does from s3:// (and fast).
    remote = pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem())
    init_ray(num_cpus=2, include_dashboard=False)
    try:
        for _ in range(2):  # the second run resumes from the first one's checkpoint
            TorchTrainer(restore_one_after_the_other, train_loop_config={"out": str(tmp_path)},
                         scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
                         run_config=RunConfig(name="late", storage_path="runs", storage_filesystem=remote)).fit()
    finally:
        ray.shutdown()
    for rank in (0, 1):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == {"files": CHECKPOINT_FILES}
