import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pytest

from mdland.data import storage
from mdland.data.storage import StorageError


def test_write_list_read_overwrite(storage_root):
    a, b = storage.join(storage_root, "x", "a.bin"), storage.join(storage_root, "x", "b.bin")
    storage.write_bytes(b, b"bee")
    storage.write_bytes(a, b"one")
    assert storage.read_bytes(a) == b"one" and storage.exists(a)
    assert storage.list_files(storage.join(storage_root, "x")) == [a, b]
    assert storage.list_files(storage.join(storage_root, "x"), ".txt") == []
    storage.write_bytes(a, b"two" * 1000)
    assert storage.read_bytes(a) == b"two" * 1000
    storage.delete(a)
    assert not storage.exists(a) and storage.list_files(storage.join(storage_root, "x")) == [b]
    assert storage.list_files(storage.join(storage_root, "empty")) == []
    with pytest.raises(StorageError, match="not found"):
        storage.read_bytes(a)
    storage.check_writable(storage.join(storage_root, "y"))
    c = storage.join(storage_root, "x", "sub", "c.bin")
    storage.write_bytes(c, b"c")
    storage.write_bytes(storage.join(storage_root, "x", ".staging", "d.bin"), b"d")  # a hidden folder's: not listed
    assert storage.list_files(storage.join(storage_root, "x")) == [b]
    assert storage.list_files(storage.join(storage_root, "x"), recursive=True) == [b, c]
    storage.delete_folder(storage.join(storage_root, "x"))
    assert storage.list_files(storage.join(storage_root, "x")) == []
    assert not storage.exists(storage.join(storage_root, "x", "sub", "c.bin"))
    storage.delete_folder(storage.join(storage_root, "x"))  # already gone: fine


def test_copy_from_local_uploads_every_file(storage_root, tmp_path):
    (tmp_path / "sub").mkdir()
    payload = os.urandom(9 * 2**20)  # above boto3's 8 MiB multipart threshold: goes up in parts
    (tmp_path / "sub" / "optim_states.pt").write_bytes(payload)
    (tmp_path / "empty.txt").write_bytes(b"")
    storage.copy_from_local(str(tmp_path), storage.join(storage_root, "ckpt"))
    assert storage.read_bytes(storage.join(storage_root, "ckpt", "sub", "optim_states.pt")) == payload
    assert storage.read_bytes(storage.join(storage_root, "ckpt", "empty.txt")) == b""


def test_s3_keys_keep_hash_and_question_marks(s3_bucket):
    a, b = f"{s3_bucket}/run#2/a?x.bin", f"{s3_bucket}/run#2/b.bin"
    storage.write_bytes(a, b"first")
    storage.write_bytes(b, b"second")
    assert storage.read_bytes(a) == b"first" and storage.read_bytes(b) == b"second"
    assert storage.list_files(f"{s3_bucket}/run#2") == [a, b]


_INTERRUPTED_UPLOAD = """
import sys
from mdland.data import storage
print("uploading", flush=True)
try:
    storage.write_file(sys.argv[1], sys.argv[2])
except KeyboardInterrupt:
    print("interrupted", flush=True)
"""


def test_interrupted_s3_upload_keeps_the_old_object(s3_bucket, tmp_path):
    """Ctrl-C halfway through uploading a large file (a checkpoint, an export re-published in place) leaves the
    object as it was: pyarrow's stream completed the multipart upload with what had been sent."""
    uri = f"{s3_bucket}/export/model.safetensors"
    storage.write_bytes(uri, b"the previous complete export")
    fifo = tmp_path / "source"
    os.mkfifo(fifo)
    proc = subprocess.Popen([sys.executable, "-c", _INTERRUPTED_UPLOAD, uri, str(fifo)], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "uploading"
    with open(fifo, "wb") as f:
        f.write(os.urandom(24 * 2**20))  # returns once the uploader has read all but the pipe's buffer: mid-upload
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
        time.sleep(1.0)
    out, _ = proc.communicate(timeout=60)
    assert "interrupted" in out
    assert storage.read_bytes(uri) == b"the previous complete export"
    # Aborted, not left pending (S3 would keep, and bill, the parts sent).
    client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"], region_name="us-east-1")
    assert "Uploads" not in client.list_multipart_uploads(Bucket=s3_bucket.removeprefix("s3://"))


def test_fingerprint_changes_when_anything_is_rewritten(storage_root):
    folder = storage.join(storage_root, "export")
    storage.write_bytes(storage.join(folder, "config.json"), b"{}")
    storage.write_bytes(storage.join(folder, "sub", "weights.bin"), b"w" * 10)
    first = storage.fingerprint(folder)
    assert storage.fingerprint(folder) == first and storage.fingerprint(storage.join(folder, "config.json")) != first
    storage.write_bytes(storage.join(folder, "sub", "weights.bin"), b"w" * 11)
    assert storage.fingerprint(folder) != first
    with pytest.raises(StorageError, match="nothing.*not found"):
        storage.fingerprint(storage.join(storage_root, "nothing"))


def test_a_republished_s3_model_is_copied_again_and_a_copy_in_use_is_kept(s3_bucket, tmp_path, monkeypatch):
    from mdland.diffusion.models import local_copy

    monkeypatch.setenv("MDLAND_CACHE", str(tmp_path))
    uri = f"{s3_bucket}/runs/stage1/controlnet"
    storage.write_bytes(f"{uri}/config.json", b"first")
    storage.write_bytes(f"{uri}/samples/grid.png", b"not read by loading")  # a folder beside a model's files
    with local_copy(uri) as old:
        assert sorted(p.name for p in old.rglob("*")) == [".complete", "config.json"]
        with local_copy(uri + "/") as again:
            assert again == old
        # Re-published while another process still loads the first export: that copy stays until it is done.
        storage.write_bytes(f"{uri}/config.json", b"second export")
        with local_copy(uri) as new:
            assert (new / "config.json").read_bytes() == b"second export"
        assert (old / "config.json").read_bytes() == b"first"
    with local_copy(uri) as again:  # the next load removes the copy no one loads from any more, and its lock file
        assert again == new and not old.exists() and not Path(f"{old}.in-use").exists()
    storage.write_bytes(f"{uri}/config.json", b"third export")
    with local_copy(uri) as newest:
        assert (newest / "config.json").read_bytes() == b"third export"
    assert not new.exists()


def test_a_model_file_deleted_while_it_is_copied_is_a_re_publish_copied_again(s3_bucket, tmp_path, monkeypatch):
    import pyarrow.fs as pafs

    from mdland.diffusion.models import local_copy

    monkeypatch.setenv("MDLAND_CACHE", str(tmp_path))
    uri = f"{s3_bucket}/runs/stage1/controlnet"
    storage.write_bytes(f"{uri}/config.json", b"first")
    storage.write_bytes(f"{uri}/diffusion_pytorch_model.bin", b"old weights")
    copy_files = pafs.copy_files

    def republish_before_the_first_copy(*args, **kwargs):
        # The listing is made: the next export replaces the .bin weights with .safetensors ones.
        if storage.exists(f"{uri}/diffusion_pytorch_model.bin"):
            storage.delete(f"{uri}/diffusion_pytorch_model.bin")
            storage.write_bytes(f"{uri}/diffusion_pytorch_model.safetensors", b"new weights")
            storage.write_bytes(f"{uri}/config.json", b"second")
        return copy_files(*args, **kwargs)

    monkeypatch.setattr(pafs, "copy_files", republish_before_the_first_copy)
    with local_copy(uri) as path:
        assert sorted(p.name for p in path.iterdir()) == [".complete", "config.json",
                                                          "diffusion_pytorch_model.safetensors"]
        assert (path / "config.json").read_bytes() == b"second"
    monkeypatch.setattr(pafs, "copy_files", copy_files)
    # A file that cannot be read while nothing changed is an error, not a retry.
    storage.write_bytes(f"{uri}/config.json", b"third")
    monkeypatch.setattr(pafs, "copy_files", lambda *a, **k: (_ for _ in ()).throw(OSError("AWS Error ACCESS_DENIED")))
    with pytest.raises(StorageError, match="cannot copy .*access denied"), local_copy(uri):
        pass


def test_a_model_snapshot_is_copied_without_what_loading_does_not_read(s3_bucket, tmp_path, monkeypatch):
    from mdland.diffusion.models import SUBFOLDERS, local_copy, weights_variant

    monkeypatch.setenv("MDLAND_CACHE", str(tmp_path))
    uri = f"{s3_bucket}/models/sd15"
    snapshot = ["model_index.json", "v1-5-pruned.ckpt", "v1-5-pruned-emaonly.safetensors",
                "safety_checker/model.safetensors", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
                "unet/diffusion_pytorch_model.bin", "unet/diffusion_pytorch_model.fp16.safetensors",
                "unet/diffusion_pytorch_model.non_ema.safetensors", "vae/config.json",
                "vae/diffusion_pytorch_model.fp16.safetensors", "vae/diffusion_pytorch_model.fp16.bin",
                "text_encoder/config.json", "text_encoder/model.safetensors", "text_encoder/model.fp16.safetensors",
                "text_encoder/pytorch_model.bin", "text_encoder/pytorch_model.fp16.bin",
                "tokenizer/tokenizer_config.json", "tokenizer/vocab.json", "tokenizer/merges.txt",
                "scheduler/scheduler_config.json"]
    for f in snapshot:
        storage.write_bytes(f"{uri}/{f}", f.encode())
    with local_copy(uri, tuple(SUBFOLDERS)) as path:
        copied = sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file() and p.name != ".complete")
        # The plain weights where there are some; the vae holds only fp16 ones, so those (safetensors over bin).
        assert copied == sorted(["model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
                                 "vae/config.json", "vae/diffusion_pytorch_model.fp16.safetensors",
                                 "text_encoder/config.json", "text_encoder/model.safetensors",
                                 "tokenizer/tokenizer_config.json", "tokenizer/vocab.json", "tokenizer/merges.txt",
                                 "scheduler/scheduler_config.json"])
        assert weights_variant(path / "vae") == "fp16" and weights_variant(path / "unet") is None
    # A file loading does not read changes nothing: the copy is used as it is.
    storage.write_bytes(f"{uri}/safety_checker/model.safetensors", b"other")
    with local_copy(uri, tuple(SUBFOLDERS)) as again:
        assert again == path


def test_local_write_is_atomic_when_it_fails(tmp_path, monkeypatch):
    target = str(tmp_path / "shard.parquet")
    storage.write_bytes(target, b"old complete shard")

    def broken_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(StorageError, match="cannot write .*shard.parquet.*disk full"):
        storage.write_bytes(target, b"new half")
    assert open(target, "rb").read() == b"old complete shard"
    assert os.listdir(tmp_path) == ["shard.parquet"]  # no temp file left behind


def test_s3_settings_from_environment(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "https://minio.example:9000")
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.delenv("AWS_REGION", raising=False)
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    s = storage.s3_settings()
    assert s["endpoint_override"] == "minio.example:9000" and s["scheme"] == "https" and s["region"] == "us-east-1"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9999")
    assert storage.s3_settings()["endpoint_override"] == "127.0.0.1:9999"
    assert storage.filesystem("s3://bucket/a/b/")[1] == "bucket/a/b"


def test_missing_bucket_is_a_clear_error(s3_bucket):
    with pytest.raises(StorageError, match="the bucket does not exist"):
        storage.write_bytes("s3://mdland-no-such-bucket/a.bin", b"x")
    with pytest.raises(StorageError, match="the bucket does not exist"):
        storage.list_files("s3://mdland-no-such-bucket/prefix")


def test_bad_credentials_are_a_clear_error(s3_auth_server, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_auth_server)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "wrong")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    with pytest.raises(StorageError, match="access denied"):
        storage.write_bytes("s3://mdland-auth/a.bin", b"x")
    with pytest.raises(StorageError, match="access denied"):
        storage.check_writable("s3://mdland-auth/data")
    from mdland.detector.checkpoint import load_detector

    with pytest.raises(ValueError, match="detector checkpoint: .*mdland-auth/det.pkl.*access denied"):  # not "not found"
        load_detector("s3://mdland-auth/det.pkl")
    # A key without its secret: the URI and the variables named, for reads and writes alike.
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(StorageError, match="cannot use s3://mdland-auth/a.bin: .*secret_key.*AWS_"):
        storage.read_bytes("s3://mdland-auth/a.bin")
    with pytest.raises(StorageError, match="s3://mdland-auth/b.bin"):
        storage.write_bytes("s3://mdland-auth/b.bin", b"x")
