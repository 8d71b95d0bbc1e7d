"""Data pipeline, trainer steps, exact resume, and the distributed (gloo) path."""

from __future__ import annotations

import io
import json
import pickle
import zipfile

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from ghn_onnx.training.datasets import CLASSES, BatchStream, ImageSet, augment, load_cifar10, train_val_split
from ghn_onnx.errors import GhnOnnxError
from ghn_onnx.training.generator import ArchPool, TrainingStream
from ghn_onnx.training.trainer import TrainConfig, Trainer, init_ghn, lr_at


def _images(n: int, seed: int = 0) -> ImageSet:
    rng = np.random.default_rng(seed)
    return ImageSet(rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), np.arange(n, dtype=np.int64) % 10)


# -- data ----------------------------------------------------------------------------------------

def test_validation_split_is_class_balanced_and_disjoint():
    data = ImageSet(np.zeros((2000, 32, 32, 3), np.uint8), np.repeat(np.arange(10), 200))  # class by class
    train, val = train_val_split(data, n_val=500, seed=0)
    assert len(train) == 1500 and len(val) == 500
    assert np.bincount(val.labels).tolist() == [50] * 10


def test_batch_stream_resumes_exactly():
    data = _images(100)
    a = BatchStream(data, 32, seed=3)
    for _ in range(4):
        a.next()
    b = BatchStream(data, 32, seed=3, **a.state())
    xa, ya = a.next()
    xb, yb = b.next()
    assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_augment_crops_and_flips_within_padding():
    x = np.zeros((4, 32, 32, 3), np.uint8)
    x[:, 10:20, 10:20] = 255
    out = augment(x, np.random.default_rng(0))
    assert out.shape == (4, 3, 32, 32)
    bright = (out[:, 0] > 0).sum(dim=(1, 2))
    assert torch.all(bright == 100)  # the square is never cut by a 4-pixel shift


def test_image_folder_zip_reader(tmp_path, monkeypatch):
    from PIL import Image

    monkeypatch.setenv("GHN_ONNX_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "tiny.zip"
    with zipfile.ZipFile(path, "w") as zf:
        for split in ("train", "test"):
            for c, name in enumerate(CLASSES[:3]):
                buf = io.BytesIO()
                Image.fromarray(np.full((32, 32, 3), c * 40, np.uint8)).save(buf, format="PNG")
                zf.writestr(f"{split}/{name}/0001.png", buf.getvalue())
    data = load_cifar10(path)
    assert data["train"].images.shape == (3, 32, 32, 3)
    assert sorted(data["test"].labels.tolist()) == [0, 1, 2]
    assert list((tmp_path / "cache").glob("cifar10-*.npz"))  # decoded once, cached
    assert load_cifar10(path)["train"].labels.tolist() == data["train"].labels.tolist()


def test_official_batches_reader_and_refusal_of_foreign_pickles(tmp_path, monkeypatch):
    monkeypatch.setenv("GHN_ONNX_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), b"labels": [1, 2, 3, 4]}
        (folder / name).write_bytes(pickle.dumps(batch))
    data = load_cifar10(folder)
    assert data["train"].images.shape == (20, 32, 32, 3) and len(data["test"]) == 4

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    bad = tmp_path / "bad" / "cifar-10-batches-py"
    bad.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (bad / name).write_bytes(pickle.dumps({b"data": Evil(), b"labels": []}))
    with pytest.raises(GhnOnnxError, match="refusing to unpickle"):
        load_cifar10(bad)


# -- trainer -------------------------------------------------------------------------------------

def test_lr_schedule_warms_up_then_decays():
    cfg = TrainConfig(steps=100, warmup_steps=10, lr=1.0)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(55, cfg) == pytest.approx(0.5) and lr_at(100, cfg) == pytest.approx(0.0)


def _trainer(out, steps, seed=0):
    cfg = TrainConfig(steps=steps, meta_batch=2, batch_size=8, warmup_steps=1, save_every=2, log_every=1, seed=seed)
    return Trainer(init_ghn(seed=seed), cfg, _images(64), ArchPool(TrainingStream(seed), add_every=2), out)


@pytest.fixture
def one_thread():
    """Multi-threaded BLAS may split sums differently from run to run (MKL adapts its thread
    count to the load); bit-for-bit comparisons need one thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_training_steps_change_the_ghn_and_resume_exactly(tmp_path, one_thread):
    straight = _trainer(tmp_path / "a", 4)
    before = {k: v.clone() for k, v in straight.ghn.state_dict().items()}
    straight.fit(progress=False)
    assert any(not torch.equal(before[k], v) for k, v in straight.ghn.state_dict().items())

    first = _trainer(tmp_path / "b", 4)
    first.cfg = TrainConfig(**{**first.cfg.__dict__, "steps": 2})
    first.fit(progress=False)
    resumed = _trainer(tmp_path / "b", 4)
    state = resumed.load()
    resumed.nets = ArchPool.from_state(state["nets"])
    assert resumed.step == 2
    resumed.fit(progress=False)
    for k, v in straight.ghn.state_dict().items():
        assert torch.equal(resumed.ghn.state_dict()[k], v), k  # bit for bit
    logs = [(tmp_path / d / "log.jsonl").read_text().splitlines() for d in ("a", "b")]
    assert len(logs[1]) == 4
    assert [json.loads(x)["loss"] for x in logs[0]] == [json.loads(x)["loss"] for x in logs[1]]


def _distributed_worker(rank: int, world: int, port: int, out: str) -> None:
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    trainer = _trainer(out, 1)
    trainer.train_step()
    grads = {f"grad:{k}": p.grad for k, p in trainer.ghn.named_parameters()}
    torch.save({**trainer.ghn.state_dict(), **grads}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_two_process_gloo_training_equals_single_process(tmp_path):
    """Each rank runs half of the meta-batch; the averaged gradient is the single-process one
    (compared before Adam, which turns rounding-level differences into step-sized ones)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_distributed_worker, args=(2, port, str(tmp_path)), nprocs=2, start_method="spawn")
    single = _trainer(tmp_path / "single", 1)
    single.train_step()
    r0 = torch.load(tmp_path / "rank0.pt")
    r1 = torch.load(tmp_path / "rank1.pt")
    for k, v in single.ghn.state_dict().items():
        assert torch.equal(r0[k], r1[k]), k  # ranks stay in lock-step
    for k, p in single.ghn.named_parameters():
        scale = float(p.grad.abs().max()) + 1e-12
        # float32 through deep nets with batch-statistics BN: ~1e-4 of the largest entry
        torch.testing.assert_close(r0[f"grad:{k}"] / scale, p.grad / scale, rtol=0, atol=1e-3, msg=k)
