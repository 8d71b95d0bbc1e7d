"""Data pipeline, trainer steps, exact resume, the cheaper-step levers, and the distributed
(gloo) path."""

from __future__ import annotations

import io
import json
import pickle
import zipfile

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from ghn_onnx.errors import CheckpointError, GhnOnnxError
from ghn_onnx.ghn import checkpoint
from ghn_onnx.training.datasets import CLASSES, BatchStream, ImageSet, augment, load_cifar10, train_val_split
from ghn_onnx.training.generator import ArchPool, TrainingStream, export_onnx
from ghn_onnx.training.ops import ChannelSE, Transformer
from ghn_onnx.training.trainer import (PredictionCoverageError, TrainConfig, Trainer, init_ghn, lr_at,
                                       param_groups)


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


#: The trainer as it was before the levers (fp32, NCHW, CPU-built networks, reference ops).
REFERENCE = {"precision": "fp32", "channels_last": False, "fast_ops": False, "meta_nets": False}
LEVERS = {"precision": "bf16", "channels_last": True, "fast_ops": True, "meta_nets": True}


def _trainer(out, steps, seed=0, images=64, **changes):
    cfg = TrainConfig(**{**dict(steps=steps, meta_batch=2, batch_size=8, warmup_steps=1, save_every=2, log_every=1,
                                seed=seed, **REFERENCE), **changes})
    pool = ArchPool(TrainingStream(seed), add_every=2, device="meta" if cfg.meta_nets else None)
    return Trainer(init_ghn(seed=seed), cfg, _images(images), pool, out)


def _resumed(out, steps, **changes):
    trainer = _trainer(out, steps, **changes)
    state = trainer.load()
    trainer.nets = ArchPool.from_state(state["nets"], device="meta" if trainer.cfg.meta_nets else None)
    return trainer


@pytest.fixture
def one_thread():
    """Multi-threaded BLAS may split sums differently from run to run (MKL adapts its thread
    count to the load); bit-for-bit comparisons need one thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("levers", [{}, LEVERS], ids=["reference", "all-levers"])
def test_training_steps_change_the_ghn_and_resume_exactly(tmp_path, one_thread, levers):
    straight = _trainer(tmp_path / "a", 4, **levers)
    before = {k: v.clone() for k, v in straight.ghn.state_dict().items()}
    straight.fit(progress=False)
    assert any(not torch.equal(before[k], v) for k, v in straight.ghn.state_dict().items())

    first = _trainer(tmp_path / "b", 2, **levers)
    first.fit(progress=False)  # saves at its last step
    saved_rng = torch.get_rng_state()
    torch.manual_seed(12345)  # whatever ran in between: the checkpoint's RNG state wins
    resumed = _resumed(tmp_path / "b", 4, **levers)  # more steps: a schedule change, allowed
    assert torch.equal(torch.get_rng_state(), saved_rng)
    assert resumed.step == 2 and resumed.changes == []
    resumed.fit(progress=False)
    for k, v in straight.ghn.state_dict().items():
        assert torch.equal(resumed.ghn.state_dict()[k], v), k  # bit for bit
    for p, q in zip(straight.ghn.parameters(), resumed.ghn.parameters()):
        for k, v in straight.opt.state[p].items():
            assert torch.equal(resumed.opt.state[q][k], v), k
    logs = [(tmp_path / d / "log.jsonl").read_text().splitlines() for d in ("a", "b")]
    assert len(logs[1]) == 4
    assert [json.loads(x)["loss"] for x in logs[0]] == [json.loads(x)["loss"] for x in logs[1]]


def test_best_validated_weights_are_kept_across_a_resume(tmp_path):
    """best.safetensors holds the weights of the best validation, not the latest; a resume keeps
    the record, so a later, worse validation does not replace them."""
    scores = iter([0.2, 0.3, 0.25, 0.28])
    weights = {}

    def evaluate(trainer):
        weights[trainer.step] = {k: v.clone() for k, v in trainer.ghn.state_dict().items()}
        return {"val_acc": next(scores), "val_sem": 0.01}

    _trainer(tmp_path, 4, eval_every=1).fit(evaluate=evaluate, progress=False)  # 0.2, 0.3, 0.25, 0.28
    best = checkpoint.load(tmp_path / "best.safetensors")
    assert all(torch.equal(v, weights[2][k]) for k, v in best.state_dict().items())
    assert not all(torch.equal(v, weights[4][k]) for k, v in best.state_dict().items())
    assert json.loads((tmp_path / "trainer.json").read_text())["best"] == {"step": 2, "val_acc": 0.3, "val_sem": 0.01}

    scores = iter([0.29, 0.31])
    resumed = _resumed(tmp_path, 6, eval_every=1)
    resumed.fit(evaluate=evaluate, progress=False)  # 0.29 is below the recorded 0.3: kept; 0.31 wins
    assert resumed.best["step"] == 6
    best = checkpoint.load(tmp_path / "best.safetensors")
    assert all(torch.equal(v, weights[6][k]) for k, v in best.state_dict().items())


def test_a_parameter_the_ghn_does_not_predict_is_an_error(tmp_path):
    trainer = _trainer(tmp_path, 1)
    predict = trainer.ghn.forward

    def drop_one(graphs):
        preds = predict(graphs)
        return [{k: v for k, v in p.items() if k != "classifier.0.bias"} for p in preds]

    trainer.ghn.forward = drop_one
    with pytest.raises(PredictionCoverageError, match=r"no prediction for 1 of its \d+ parameters: classifier.0.bias"):
        trainer.train_step()


def test_weight_decay_only_on_linear_conv_and_recurrent_weights(tmp_path):
    ghn = init_ghn()
    decayed, other = param_groups(ghn, 0.1)
    expected = {f"{n}.weight" for n, m in ghn.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    expected |= {"gnn.gru.weight_ih", "gnn.gru.weight_hh"}
    assert set(decayed["names"]) == expected and decayed["weight_decay"] == 0.1
    assert {"embed.weight", "shape_enc.embed_channel.weight", "ln.weight", "ln.bias", "decoder.fc.0.bias",
            "gnn.gru.bias_ih"} <= set(other["names"]) and other["weight_decay"] == 0.0
    assert len(decayed["names"]) + len(other["names"]) == len(list(ghn.parameters()))
    trainer = _trainer(tmp_path, 1, weight_decay=0.1)
    assert [g["weight_decay"] for g in trainer.opt.param_groups] == [0.1, 0.0]
    with pytest.raises(TypeError, match="PReLU"):
        param_groups(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.PReLU()), 0.1)


@pytest.mark.parametrize("change", [{"seed": 1}, {"batch_size": 16}, {"meta_batch": 4}, {"images": 80}],
                         ids=["seed", "batch_size", "meta_batch", "image_set"])
def test_resume_refuses_a_change_of_the_streams(tmp_path, change):
    _trainer(tmp_path, 4).save()
    name = next(iter(change)) if "images" not in change else "training images"
    with pytest.raises(CheckpointError, match=f"cannot resume with {name}"):
        _resumed(tmp_path, 4, **change)


def test_resume_allows_schedule_and_records_precision_changes(tmp_path):
    _trainer(tmp_path, 4).save()
    assert _resumed(tmp_path, 10, save_every=5, eval_every=3, log_every=7).changes == []
    resumed = _resumed(tmp_path, 4, precision="bf16", lr=5e-4)
    assert resumed.changes == [{"step": 0, "lr": [1e-3, 5e-4], "precision": ["fp32", "bf16"],
                                "resolved_precision": ["fp32", "bf16"]}]
    resumed.save()
    assert json.loads((tmp_path / "trainer.json").read_text())["changes"] == resumed.changes


def test_resume_of_a_folder_saved_before_rng_state_was_checkpointed(tmp_path):
    """Run folders written before this change lack the RNG state, the new configuration fields
    and the recorded precision: they resume, with one warning, and the defaults count as changes."""
    from safetensors.torch import load_file, save_file

    first = _trainer(tmp_path, 4)
    first.save()
    tensors = load_file(str(tmp_path / "trainer.safetensors"))
    save_file({k: v for k, v in tensors.items() if not k.startswith("rng::")}, str(tmp_path / "trainer.safetensors"))
    state = json.loads((tmp_path / "trainer.json").read_text())
    for key in ("precision", "world", "scaler", "changes", "data_size"):
        del state[key]
    for key in REFERENCE:
        del state["config"][key]
    (tmp_path / "trainer.json").write_text(json.dumps(state))
    with pytest.warns(UserWarning, match="saved without RNG state") as caught:
        resumed = _resumed(tmp_path, 4, fast_ops=True)
    assert len(caught) == 1
    assert resumed.changes == [{"step": 0, "fast_ops": [False, True]}]


def _flat_grad(trainer):
    images, labels = trainer.next_batch()
    trainer.forward_backward(images, labels, trainer.draw_share())
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in trainer.ghn.parameters()])


def test_each_lever_keeps_the_ghn_gradient(tmp_path, one_thread):
    """Same GHN, images, networks and dropout seeds: meta-device networks change nothing (their own
    initialisation is discarded), channels_last and the fast ops change rounding only, bf16
    autocast keeps the gradient's direction (the bench reports the cosine on the full step).
    Seed 29 draws a network with dropout, msa blocks and depthwise convolutions."""
    ref = _flat_grad(_trainer(tmp_path, 1, seed=29))
    assert torch.equal(_flat_grad(_trainer(tmp_path, 1, seed=29, meta_nets=True)), ref)
    scale = float(ref.abs().max())
    for lever in ({"channels_last": True}, {"fast_ops": True}):
        torch.testing.assert_close(_flat_grad(_trainer(tmp_path, 1, seed=29, **lever)) / scale, ref / scale,
                                   rtol=0, atol=1e-4, msg=str(lever))
    bf16 = _flat_grad(_trainer(tmp_path, 1, seed=29, precision="bf16", channels_last=True))
    assert not torch.equal(bf16, ref)
    assert float(torch.nn.functional.cosine_similarity(bf16.double(), ref.double(), dim=0)) > 0.99


# -- cheaper ops -----------------------------------------------------------------------------------

@pytest.mark.parametrize("stride,side", [(1, (7, 5)), (2, (7, 5)), (2, (8, 8))])
def test_fast_msa_equals_the_reference_attention(stride, side):
    torch.manual_seed(0)
    block = Transformer(24, stride)
    x = torch.randn(3, 24, *side, requires_grad=True)
    outs, grads = [], []
    for fast in (True, False):
        block.fast = fast
        y = block(x)
        outs.append(y)
        grads.append(torch.autograd.grad(y.square().sum(), [x, *block.parameters()]))
    assert outs[0].shape == outs[1].shape == (3, 24, -(-side[0] // stride), -(-side[1] // stride))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_fast_strided_se_is_bitwise_the_reference():
    torch.manual_seed(0)
    block = ChannelSE(16, stride=2)
    x = torch.randn(2, 16, 9, 7)
    fast = block(x)
    block.fast = False
    assert torch.equal(fast, block(x))


def test_onnx_export_traces_the_reference_ops():
    """The graphs a GHN trains on are read from exports: the fast ops must not change them."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, stride=4, padding=1), Transformer(16, 2), ChannelSE(16, 2))
    ops = []
    for fast in (True, False):
        for m in net[1:]:
            m.fast = fast
        ops.append([n.op_type for n in export_onnx(net).graph.node])
    assert ops[0] == ops[1] and "Softmax" in ops[0]


def test_train_command_refuses_fp16_on_cpu(tmp_path):
    from click.testing import CliRunner

    from ghn_onnx.cli import main

    result = CliRunner().invoke(main, ["train", "--out", str(tmp_path / "run"), "--precision", "fp16"])
    assert result.exit_code == 2 and "fp16 needs a CUDA device" in result.output
    assert not (tmp_path / "run").exists()


def _distributed_worker(rank: int, world: int, port: int, out: str) -> None:
    import datetime
    import os

    import torch.distributed as dist

    from ghn_onnx.training.trainer import all_reduce_gradients

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    torch.set_num_threads(1)
    # Ranks disagreeing on which parameters got a gradient: one flat all-reduce, no deadlock.
    a, b, c = (torch.nn.Parameter(torch.ones(n)) for n in (3, 2, 4))
    ((a * 2).sum() + (b * 3).sum() if rank == 0 else (a * 5).sum()).backward()
    all_reduce_gradients([a, b, c])
    toy = {"a": a.grad, "b": b.grad, "c_is_none": c.grad is None}

    trainer = _trainer(out, 1)
    built = []
    build = trainer.nets._build
    trainer.nets._build = lambda *args: built.append(args) or build(*args)
    trainer.train_step()
    grads = {f"grad:{k}": p.grad for k, p in trainer.ghn.named_parameters()}
    torch.save({**trainer.ghn.state_dict(), **grads, "built": len(built), "toy": toy}, f"{out}/rank{rank}.pt")
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
    for r in (r0, r1):
        assert r["built"] == 1  # each rank builds only its share of the meta-batch of 2
        assert r["toy"]["a"].tolist() == [7.0] * 3 and r["toy"]["b"].tolist() == [3.0] * 2 and r["toy"]["c_is_none"]
    for k, v in single.ghn.state_dict().items():
        assert torch.equal(r0[k], r1[k]), k  # ranks stay in lock-step
    for k, p in single.ghn.named_parameters():
        scale = float(p.grad.abs().max()) + 1e-12
        # float32 through deep nets with batch-statistics BN: ~1e-4 of the largest entry
        torch.testing.assert_close(r0[f"grad:{k}"] / scale, p.grad / scale, rtol=0, atol=1e-3, msg=k)
