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
from ghn_onnx.ghn.decode import flat as flat_decode, numba_store as fused_tiling
from ghn_onnx.ghn.decode.rules import (BIAS_CLASS, BIAS_ROW, DECODER_1D, SCALE_ROW, VectorRow, WeightBlock,
                                       classifier_nodes, vector_row, weight_block, whole_block)


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
    monkeypatch.setattr(flat_decode, "TAPS_PER_CHUNK", taps_per_chunk)
    ghn = fresh_ghn("cpu", seed=17)
    batch = ghn.batch([random_dag(25, 1), odd_shapes_graph(), random_dag(9, 2), small_head_graph()])
    plan = flat_decode.decode_plan(batch, ghn.decode_spec, "cpu")
    members = sorted((id(g), s + k) for p in plan.passes for g, s, n, _ in p.parts for k in range(n))
    assert members == sorted((id(g), k) for g in plan.groups for k in range(len(g.nodes)))
    assert len(plan.passes) > len({(g.block.kh, g.block.kw) for g in plan.groups})
    _assert_same_decode(ghn, batch, torch.randn(batch.n_nodes, ghn.config.hid, generator=torch.Generator().manual_seed(4)))


def test_plans_are_typed_batch_plans_and_training_builds_no_decode_plan():
    """The decode plan and the node inputs are plans of the batch (GraphBatch.plan), frozen and
    on their device; GHN.batch builds the decode plan only without autograd."""
    ghn = fresh_ghn("cpu", seed=18)
    graphs = [odd_shapes_graph(), small_head_graph()]
    trained = ghn.batch(graphs)  # autograd on: the training path decodes tensor by tensor
    assert not any(isinstance(p, flat_decode.DecodePlan) for p in trained._plans.values())
    with torch.no_grad():
        batch = ghn.batch(graphs)
    plans = [p for p in batch._plans.values() if isinstance(p, flat_decode.DecodePlan)]
    assert len(plans) == 1 and plans[0].device == torch.device("cpu") and plans[0].spec == ghn.decode_spec
    assert flat_decode.decode_plan(batch, ghn.decode_spec, torch.device("cpu")) is plans[0]
    with pytest.raises(AttributeError):
        plans[0].total = 0  # frozen
    assert len(plans[0].meta) == len(plans[0].index) and plans[0].meta.stride.shape == (len(plans[0].index), 4)
    inputs = [p for p in batch._plans.values() if type(p).__name__ == "NodeInputs"]
    assert len(inputs) == 1 and inputs[0].primitive.shape == (batch.n_nodes,)
    assert inputs[0].shape_rows.shape == (batch.n_nodes, 4)
    assert not {"_decode_plans", "_node_inputs"} & set(vars(batch))


def test_weight_block_rules():
    """The decode group of a weight: taps clipped to s, the corner of the 64×64 block that tiling
    reads (all rows for the classifier), one column for 1-D targets; GHN-2 decodes the whole block."""
    ghn = fresh_ghn("cpu")
    spec = ghn.decode_spec
    g = odd_shapes_graph()
    cls_w, cls_b = classifier_nodes(g)
    by_name = {n.name: (i, n) for i, n in enumerate(g.nodes)}
    assert g.nodes[cls_w].name == "head.weight" and g.nodes[cls_b].name == "head.bias"
    assert weight_block(spec, by_name["stem.weight"][1], False) == WeightBlock(3, 3, 10, 3, False)
    assert weight_block(spec, by_name["patch.weight"][1], False) == WeightBlock(11, 11, 64, 64, False)
    assert weight_block(spec, by_name["c17.weight"][1], False) == WeightBlock(1, 7, 64, 10, False)
    # (1, T=50, C=130): taps from the 4-D view (1, 130, 7, 7), corner from the target
    assert weight_block(spec, by_name["tokens"][1], False) == WeightBlock(7, 7, 1, 50, False)
    head = weight_block(spec, g.nodes[cls_w], True)
    assert head == WeightBlock(1, 1, 64, 64, True) and whole_block(spec, head) == head
    assert whole_block(spec, WeightBlock(3, 3, 10, 3, False)) == WeightBlock(3, 3, 64, 64, False)
    assert WeightBlock(1, 7, 64, 10, False) < WeightBlock(3, 3, 10, 3, False)  # ordered by taps first


def test_vector_row_rules():
    g = odd_shapes_graph()
    _, cls_b = classifier_nodes(g)
    bn = next(n for n in g.nodes if n.name == "stem.bn")
    assert [vector_row(bn, p, False) for p in bn.params] == [VectorRow(DECODER_1D, SCALE_ROW),
                                                             VectorRow(DECODER_1D, BIAS_ROW)]
    head_bias = g.nodes[cls_b]
    assert vector_row(head_bias, head_bias.params[0], True) == VectorRow(BIAS_CLASS, BIAS_ROW)
    patch_bias = next(n for n in g.nodes if n.name == "patch.bias")
    assert vector_row(patch_bias, patch_bias.params[0], False) == VectorRow(DECODER_1D, BIAS_ROW)
