"""The CPU inference path: flat decoding with the numba store against the per-tensor PyTorch
path (``GHN.decode_tensors``). The numba sweep (message passing, its thread counts) is tested with
every other engine in ``tests/test_message_passing_engines.py``."""

from __future__ import annotations

import gc
import threading

import pytest
import torch
from ghn_graphs import (assert_same_predictions, fresh_ghn, odd_shapes_graph, random_dag, small_head_graph,
                        two_node_graph)

from ghn_onnx.convert import convert_file
from ghn_onnx.ghn import checkpoint
from ghn_onnx.ghn.decode import numba_store as fused_tiling


def _assert_same_decode(ghn, batch, h) -> None:
    with torch.no_grad():
        assert_same_predictions(ghn.decode(h, batch), ghn.decode_tensors(h, batch), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("config", [{}, {"weight_norm": False, "max_shape": (64, 64, 16, 16), "num_classes": 1000}],
                         ids=["ghn2-cifar", "raw-imagenet"])
def test_flat_decode_equals_per_tensor_decode(config):
    """Odd channel counts, 1×7 / 7×1 / depthwise / 16×16 kernels, positional encodings,
    classifiers above and below the heads' size, tiny graphs."""
    ghn = fresh_ghn("cpu", seed=11, **config)
    batch = ghn.batch([odd_shapes_graph(), two_node_graph(), small_head_graph(), random_dag(12, 7)])
    _assert_same_decode(ghn, batch, torch.randn(batch.n_nodes, ghn.config.hid, generator=torch.Generator().manual_seed(3)))


def test_flat_decode_fixture_graphs_and_parity_values(shared_dir):
    d = shared_dir / "reference" / "ghn2-parity"
    ghn = checkpoint.load_reference(d / "ghn2_random_cifar10.npz").eval()
    names = ["resnet18", "mobilenet_v2", "deepnets_9", "deepnets_17"]
    batch = ghn.batch([convert_file(d / f"{n}.onnx") for n in names])
    with torch.no_grad():
        h = ghn.node_states(batch)
    _assert_same_decode(ghn, batch, h)


def test_decoder_weight_changes_reach_the_flat_path():
    """Selected decoder rows are cached between calls; an in-place update must invalidate them."""
    ghn = fresh_ghn("cpu", seed=12)
    batch = ghn.batch([odd_shapes_graph()])
    h = torch.randn(batch.n_nodes, ghn.config.hid)
    _assert_same_decode(ghn, batch, h)
    with torch.no_grad():
        ghn.decoder.conv[2].weight.mul_(-2.0)
        ghn.decoder.fc[0].bias.add_(0.5)
    _assert_same_decode(ghn, batch, h)
    ghn.load_state_dict(fresh_ghn("cpu", seed=13).state_dict())
    _assert_same_decode(ghn, batch, h)


def test_output_memory_is_reused_only_when_released():
    ghn = fresh_ghn("cpu", seed=14)
    batch = ghn.batch([odd_shapes_graph(), small_head_graph()])
    h = torch.randn(batch.n_nodes, ghn.config.hid)
    with torch.no_grad():
        first = ghn.decode(h, batch)
        kept = {k: v.clone() for k, v in first[0].items()}
        held = first[0]["stem.weight"]
        del first
        second = ghn.decode(h + 1.0, batch)  # `held` still refers to the first buffer
        assert held.data_ptr() != second[0]["stem.weight"].data_ptr()
        assert torch.equal(held, kept["stem.weight"])
        ptr = second[0]["stem.weight"].data_ptr()
        del held, second
        gc.collect()
        third = ghn.decode(h, batch)  # nothing refers to the second buffer: reused
        assert third[0]["stem.weight"].data_ptr() == ptr
        for name, value in kept.items():
            assert torch.equal(third[0][name], value), name
        del third
        cap, fused_tiling.OUTPUT.max_bytes = fused_tiling.OUTPUT.max_bytes, 1024  # under this output
        try:
            fused_tiling.OUTPUT.release()
            fourth = ghn.decode(h, batch)
            del fourth
            assert fused_tiling.OUTPUT._buf is None
        finally:
            fused_tiling.OUTPUT.max_bytes = cap
    fused_tiling.OUTPUT.release()


def test_concurrent_forwards_on_one_batch():
    """A pipeline may predict from several threads: shared plans and caches stay correct."""
    ghn = fresh_ghn("cpu", seed=16)
    batch = ghn.batch([odd_shapes_graph(), random_dag(30, 3), small_head_graph()])
    with torch.no_grad():
        expected = [{k: v.clone() for k, v in g.items()} for g in ghn(batch)]
    outcomes: list[bool] = []

    def work() -> None:
        with torch.no_grad():  # thread-local
            for _ in range(4):
                out = ghn(batch)
                outcomes.append(all(torch.equal(out[i][k], v) for i, g in enumerate(expected) for k, v in g.items()))

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(outcomes) == 12 and all(outcomes)


@pytest.mark.parametrize("taps_per_chunk", [1, 20, 50])
def test_groups_split_across_decoder_passes(monkeypatch, taps_per_chunk):
    """Big batches decode in passes of at most TAPS_PER_CHUNK taps: groups that share a pass,
    groups cut across passes, and nodes with more taps than a pass all give the same values."""
    from ghn_onnx.ghn.decode import flat as flat_decode

    monkeypatch.setattr(flat_decode, "TAPS_PER_CHUNK", taps_per_chunk)
    ghn = fresh_ghn("cpu", seed=17)
    batch = ghn.batch([random_dag(25, 1), odd_shapes_graph(), random_dag(9, 2), small_head_graph()])
    plan = flat_decode.decode_plan(ghn, batch, torch.device("cpu"))
    members = sorted((id(g), s + k) for p in plan.passes for g, s, n, _ in p.parts for k in range(n))
    assert members == sorted((id(g), k) for g in plan.groups for k in range(len(g.nodes)))
    assert len(plan.passes) > len({(g.kh, g.kw) for g in plan.groups})
    _assert_same_decode(ghn, batch, torch.randn(batch.n_nodes, ghn.config.hid, generator=torch.Generator().manual_seed(4)))
