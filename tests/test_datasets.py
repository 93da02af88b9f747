import numpy as np
import pytest

from mdland.cluster import init_ray
from mdland.data.datasets import read_shards
from mdland.data.shards import Face, ShardWriter, encode_image


def write_domain(root: str, style: str, count: int) -> str:
    writer = ShardWriter(root, rows_per_shard=1000)
    pixel = encode_image(np.zeros((4, 4, 3), np.uint8))
    for i in range(count):
        writer.add(Face(image=pixel, landmarks=np.zeros((68, 2), np.float32), key=f"{style}-{i}", style=style))
    writer.close()
    return root


@pytest.fixture(scope="module")
def ray_local():
    import ray

    init_ray(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


def test_a_small_multi_domain_set_is_shuffled_across_domains(ray_local, tmp_path):
    # Stage 2's shape: one file per domain, each with one style. Batches must mix domains, not run through one
    # domain's file after another; and each epoch comes in a new order.
    data = [write_domain(str(tmp_path / name), name, 96) for name in ("art", "cari", "cartoon")]
    ds = read_shards(data, ["key", "style"])
    epochs = [[b for b in ds.iter_batches(batch_size=8, batch_format="numpy")] for _ in range(2)]
    for batches in epochs:
        assert sorted(k for b in batches for k in b["key"]) == sorted(f"{s}-{i}" for s in ("art", "cari", "cartoon")
                                                                     for i in range(96))
        mixed = [len(set(b["style"])) > 1 for b in batches]
        assert np.mean(mixed) > 0.9, f"{sum(mixed)} of {len(mixed)} batches mix domains"
    assert [list(b["key"]) for b in epochs[0]] != [list(b["key"]) for b in epochs[1]]
