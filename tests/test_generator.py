"""The DeepNets-1M-like generator: sampling, networks, graphs through the ONNX converter, pools."""

from __future__ import annotations

import itertools
import json
from collections import Counter

import numpy as np
import onnx
import pytest
import torch
from reference_graphs import compare, load_reference

from ghn_onnx.convert import convert
from ghn_onnx.graph.primitives import Primitive
from ghn_onnx.training import (
    CELL_OPS, EVAL_SIZES, SPLITS, ArchPool, ArchSpec, Genotype, GraphRefreshError, TrainingStream,
    arch_graph, arch_onnx, build_net, count_params, eval_keys, eval_specs, eval_width, plan_network,
    refresh_shapes, rejection_reason, sample_arch, sample_width,
)
from ghn_onnx.training import generator
from ghn_onnx.training.ops import OP_FACTORIES, make_op, norm_factory
from ghn_onnx.training.sampling import FC_DIMS, LARGE_CONVS, WIDTHS

# Parameters of generated networks that their graphs do not cover. None: every conv, linear, norm
# and positional encoding is a graph node (BN running statistics are buffers, not parameters).
UNPREDICTED_PARAMS: frozenset[str] = frozenset()

# The five DeepNets-1M parity fixtures, written as specs (read off their parameter names and ONNX
# wiring): built and exported by us, they must give the reference graphs and parameter shapes.
FIXTURE_SPECS = {
    "deepnets_1": ArchSpec(
        Genotype((("dil_conv_3x3", 0), ("conv_7x7", 1), ("dil_conv_5x5", 1), ("sep_conv_5x5", 0)), (2, 3),
                 (("skip_connect", 1), ("conv_1x1", 0), ("max_pool_3x3", 0), ("max_pool_3x3", 1)), (2, 3)),
        n_cells=4, ks=7, stem_type=1, C_mult=2, preproc=True, glob_avg=True, norm="bn", fc_layers=1),
    "deepnets_6": ArchSpec(
        Genotype((("conv_3x3", 1), ("conv_3x3", 0)), (2,), (("dil_conv_3x3", 0), ("sep_conv_3x3", 1)), (2,)),
        n_cells=7, ks=3, stem_type=1, C_mult=1, preproc=True, glob_avg=True, norm="bn", fc_layers=2),
    "deepnets_9": ArchSpec(
        Genotype((("conv_7x1_1x7", 1), ("avg_pool_3x3", 0), ("cse", 2), ("none", 0)), (2, 3),
                 (("conv_1x1", 0), ("conv_1x1", 1), ("conv_1x1", 0), ("max_pool_3x3", 1)), (2, 3)),
        n_cells=14, ks=3, stem_type=0, stem_pool=True, C_mult=1, preproc=True, glob_avg=True, norm="bn",
        fc_layers=1),
    "deepnets_11": ArchSpec(
        Genotype((("dil_conv_3x3", 1), ("sep_conv_5x5", 0), ("conv_7x7", 2), ("dil_conv_3x3", 0),
                  ("sep_conv_3x3", 0), ("skip_connect", 3)), (2, 3, 4),
                 (("none", 0), ("avg_pool_3x3", 1), ("avg_pool_3x3", 1), ("none", 0), ("avg_pool_3x3", 2),
                  ("avg_pool_3x3", 3)), (2, 3, 4)),
        n_cells=8, ks=5, stem_type=1, C_mult=1, preproc=True, glob_avg=True, norm="bn", fc_layers=1),
    "deepnets_17": ArchSpec(
        Genotype((("conv_5x5", 1), ("conv_1x1", 0)), (2,), (("sep_conv_5x5", 1), ("conv_1x1", 0)), (2,)),
        n_cells=5, ks=5, stem_type=0, stem_pool=False, C_mult=1, preproc=True, glob_avg=True, norm="none",
        fc_layers=2),
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Batch-1/2 forward passes of small nets: two threads only contend on a busy 2-core box."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def train_specs() -> list[ArchSpec]:
    rng = np.random.default_rng(0)
    return [sample_arch(rng, "train") for _ in range(200)]


def graph_signature(g):
    return ([(n.primitive, n.name, n.shape, n.params, n.groups) for n in g.nodes], g.edges.tolist())


# -- specs and sampling ---------------------------------------------------------------------------

def test_sampling_is_deterministic_by_seed():
    for split in SPLITS:
        a = [sample_arch(np.random.default_rng(7), split) for _ in range(3)]
        b = [sample_arch(np.random.default_rng(7), split) for _ in range(3)]
        assert a == b
    draws = [sample_arch(np.random.default_rng(s)) for s in range(5)]
    assert len({d.key for d in draws}) == 5
    s1, s2 = TrainingStream(3), TrainingStream(3)
    assert list(itertools.islice(s1, 10)) == list(itertools.islice(s2, 10))
    assert list(itertools.islice(TrainingStream(4), 10)) != list(itertools.islice(TrainingStream(3), 10))


def test_spec_json_round_trip_and_key(train_specs):
    for spec in train_specs[:50]:
        text = json.dumps(spec.to_json())
        back = ArchSpec.from_json(json.loads(text))
        assert back == spec and back.key == spec.key and hash(back) == hash(spec)
    assert len({s.key for s in train_specs}) == len(set(train_specs))


def test_invalid_specs_are_refused():
    g = Genotype((("conv_3x3", 0), ("conv_3x3", 1)), (2,), (("max_pool_3x3", 0), ("skip_connect", 1)), (2,))
    with pytest.raises(ValueError, match="two ops per step"):
        Genotype((("conv_3x3", 0),), (2,), g.reduce, (2,))
    with pytest.raises(ValueError, match="cell op"):
        Genotype((("conv_9x9", 0), ("conv_3x3", 1)), (2,), g.reduce, (2,))
    with pytest.raises(ValueError, match="states 0..1"):
        Genotype((("conv_3x3", 0), ("conv_3x3", 2)), (2,), g.reduce, (2,))
    with pytest.raises(ValueError, match="preproc"):
        ArchSpec(g, n_cells=4, C_mult=2, preproc=False)
    with pytest.raises(ValueError, match="norm"):
        ArchSpec(g, n_cells=4, norm="ln")


def test_rejection_rules_hold(train_specs):
    for spec in train_specs:
        g = spec.genotype
        ops = g.ops()
        assert rejection_reason(spec, SPLITS["train"]) is None
        assert 4 <= spec.n_cells <= 18 and 1 <= spec.steps <= 4
        if spec.n_cells > 10:
            assert spec.steps <= 2
        assert any("conv" in op for op in ops) or "msa" in ops
        for gene in (g.normal, g.reduce):
            names = [op for op, _ in gene]
            assert names.count("cse") <= 1
            assert sum(op in LARGE_CONVS for op in names) <= 1
        if spec.steps == 1:
            assert "none" not in ops
        if spec.steps > 1 or spec.C_mult > 1:
            assert spec.preproc
        if spec.is_vit:
            assert spec.glob_avg
        if spec.norm == "none":
            assert spec.n_cells <= 5 and spec.steps <= 2
        assert plan_network(spec, 32).valid
        assert count_params(spec, 32, 256) <= 10 ** 7
        assert spec.reduction_cells() == (spec.n_cells // 3, 2 * spec.n_cells // 3)
    assert {s.norm for s in train_specs} == {"bn", "none"}
    assert {s.stem_type for s in train_specs} == {0, 1}
    assert {s.glob_avg for s in train_specs} == {True, False}


@pytest.mark.parametrize("split", ["deep", "dense", "bnfree"])
def test_split_settings(split):
    rng = np.random.default_rng(1)
    specs = [sample_arch(rng, split) for _ in range(30)]
    s = SPLITS[split]
    for spec in specs:
        assert s.min_cells <= spec.n_cells <= s.max_cells
        assert s.min_steps <= spec.steps <= s.max_steps
        assert count_params(spec, 32, 256) <= s.max_params
    if split == "bnfree":
        assert all(spec.norm == "none" for spec in specs)


def test_every_cell_op_is_sampled_and_built(train_specs):
    sampled = Counter(op for s in train_specs for op in s.genotype.ops())
    assert set(sampled) == set(CELL_OPS)
    built = Counter(plan.gene[k][0] for s in train_specs for plan in plan_network(s, 32).cells
                    for k in plan.live_ops)
    assert set(built) == set(CELL_OPS) - {"none"}


def test_widths_follow_the_tiers(train_specs):
    rng = np.random.default_rng(2)
    seen_c, seen_fc = set(), set()
    for spec in train_specs * 3:
        C, fc_dim = sample_width(rng, spec)
        seen_c.add(C)
        seen_fc.add(fc_dim)
        assert C in WIDTHS and fc_dim in FC_DIMS
        big = (count_params(spec) > 0.8e6 or not spec.glob_avg or spec.n_cells > 12
               or any(op in LARGE_CONVS for op in spec.genotype.ops()))
        if big:
            assert C == 32
        if fc_dim > 256:
            assert C <= 64
    assert seen_c == set(WIDTHS) and seen_fc == set(FC_DIMS)


def test_param_count_matches_the_module():
    rng = np.random.default_rng(3)
    specs = [sample_arch(rng, split) for split in ("train", "deep", "dense", "bnfree") for _ in range(10)]
    for spec, (C, fc_dim, classes) in zip(specs, itertools.cycle([(32, 256, 10), (48, 128, 7), (128, 64, 100)])):
        net = build_net(spec, C, fc_dim, classes, device="meta")
        assert count_params(spec, C, fc_dim, classes) == sum(p.numel() for p in net.parameters())


# -- networks -------------------------------------------------------------------------------------

@pytest.mark.parametrize("op", CELL_OPS)
@pytest.mark.parametrize("stride", [1, 2])
def test_every_cell_op_runs(op, stride):
    module = make_op(op, 32, 32, stride, norm_factory("bn"))
    if op == "none":
        assert module is None
        return
    with torch.no_grad():
        out = module(torch.randn(2, 32, 8, 8))
    assert out.shape == (2, 32, 8 // stride, 8 // stride)


def test_op_registry_is_complete():
    assert tuple(OP_FACTORIES) == CELL_OPS
    with pytest.raises(ValueError, match="cell op"):
        make_op("conv_9x9", 32, 32, 1, norm_factory("bn"))


def test_forward_pass(train_specs):
    rng = np.random.default_rng(4)
    picked = [s for s in train_specs if s.is_vit][:3] + [s for s in train_specs if not s.is_vit][:9]
    for spec in picked:
        C, fc_dim = sample_width(rng, spec)
        net = build_net(spec, C, fc_dim)
        with torch.no_grad():
            out = net(torch.randn(2, 3, 32, 32))
        assert out.shape == (2, 10) and torch.isfinite(out).all()
        assert not any(m.track_running_stats for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_absent_states_are_zero_filled_and_dead_ops_not_built():
    # Step 0 is none + none: state 2 is absent, so the concat fills it with zeros; op 4 of the
    # normal cell reads state 2 only through 'none' partners and is dead in no cell.
    g = Genotype((("none", 0), ("none", 1), ("conv_3x3", 0), ("sep_conv_3x3", 1)), (2, 3),
                 (("max_pool_3x3", 0), ("conv_1x1", 1), ("skip_connect", 0), ("avg_pool_3x3", 2)), (2, 3))
    spec = ArchSpec(g, n_cells=4, C_mult=1)
    net = build_net(spec, 32, 64)
    assert "0" not in net.cells[0]._ops and "1" not in net.cells[0]._ops
    with torch.no_grad():
        assert net(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    graph = arch_graph(spec, 32, 64)
    assert {p.tensor for p in graph.predicted_tensors()} == set(dict(net.named_parameters()))


def test_disconnected_networks_are_rejected():
    g = Genotype((("none", 0), ("none", 1), ("none", 0), ("none", 2)), (2, 3),
                 (("max_pool_3x3", 0), ("conv_1x1", 1), ("none", 0), ("none", 1)), (2, 3))
    spec = ArchSpec(g, n_cells=4)
    assert not plan_network(spec, 32).valid
    assert "disconnect" in rejection_reason(spec, SPLITS["train"])
    with pytest.raises(ValueError, match="disconnect"):
        build_net(spec, 32, 64)


# -- graphs ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(FIXTURE_SPECS))
def test_fixture_architectures_give_the_reference_graphs(parity_dir, name):
    spec = FIXTURE_SPECS[name]
    graph = arch_graph(spec, 32, 256)
    assert compare(graph, load_reference(parity_dir / f"{name}.graph.json")) == []
    ref = onnx.load(str(parity_dir / f"{name}.onnx"), load_external_data=False)
    ref_params = {t.name: tuple(t.dims) for t in ref.graph.initializer
                  if not t.name.endswith(("running_mean", "running_var"))}
    assert {k: tuple(v.shape) for k, v in build_net(spec, 32, 256).named_parameters()} == ref_params


def test_bn_free_graphs_have_no_bn_nodes():
    specs = sorted(eval_specs("bnfree"), key=lambda s: (s.n_cells, s.steps))[:3]
    for spec in specs:
        model = arch_onnx(spec, 32, 64)
        assert not any(n.op_type == "BatchNormalization" for n in model.graph.node)
        graph = convert(model, name=spec.key)
        assert Primitive.BN not in {n.primitive for n in graph.nodes}
        assert not graph.info["bn_folded"]


@pytest.fixture(scope="module")
def refresh_cases():
    """30 training draws, each exported at its own width and at a different base width."""
    cases = []
    for spec, C1, f1 in itertools.islice(TrainingStream(seed=11), 30):
        C0, f0 = (48 if C1 == 32 else 32), (128 if f1 != 128 else 192)
        cases.append((spec, (C0, f0), (C1, f1), arch_graph(spec, C0, f0), arch_graph(spec, C1, f1)))
    return cases


@pytest.mark.slow
def test_refresh_equals_a_fresh_export(refresh_cases):
    for spec, _, (C1, f1), base, target in refresh_cases:
        net = build_net(spec, C1, f1)
        refreshed = refresh_shapes(base, net)
        assert graph_signature(refreshed) == graph_signature(target), spec.key
        assert refreshed.name == target.name and refreshed.unsupported == target.unsupported == {}
        assert graph_signature(base)[0] != graph_signature(target)[0]  # the widths did change shapes


@pytest.mark.slow
def test_graphs_cover_every_parameter(refresh_cases):
    primitives: set[Primitive] = set()
    for spec, (C0, f0), (C1, f1), base, target in refresh_cases:
        for (C, f), g in (((C0, f0), base), ((C1, f1), target)):
            net = build_net(spec, C, f)
            params = {k: tuple(v.shape) for k, v in net.named_parameters()}
            covered = {p.tensor: p.stored_shape for p in g.predicted_tensors()}
            assert set(params) - set(covered) == UNPREDICTED_PARAMS
            assert all(covered[k] == params[k] for k in covered)
            assert g.warnings == []
        primitives |= {n.primitive for n in target.nodes}
    assert primitives == set(Primitive)


def test_refresh_refuses_another_architecture():
    base = arch_graph(FIXTURE_SPECS["deepnets_17"], 32, 256)
    with pytest.raises(GraphRefreshError, match="Expected parameter"):
        refresh_shapes(base, build_net(FIXTURE_SPECS["deepnets_6"], 48, 64))


# -- evaluation sets and the training stream ------------------------------------------------------

def test_eval_sets_are_fixed_and_disjoint_from_training():
    for split, size in EVAL_SIZES.items():
        specs = eval_specs(split)
        assert len(specs) == size == len({s.key for s in specs})
        assert eval_specs(split, 10) == specs[:10]
    assert eval_specs("wide") == eval_specs("test")[:50]
    assert eval_width("wide") == (128, 256) and eval_width("test") == (32, 256)
    assert all(s.norm == "none" for s in eval_specs("bnfree"))
    assert max(s.n_cells for s in eval_specs("deep")) > 18
    assert max(s.steps for s in eval_specs("dense")) > 4
    # Regenerating from scratch gives the same sets.
    fresh = generator._eval_set.__wrapped__("test")
    assert [s.key for s in fresh] == [s.key for s in eval_specs("test")]
    keys = eval_keys()
    assert len(keys) == 350
    train = [d.spec.key for d in itertools.islice(TrainingStream(seed=0), 300)]
    assert not keys & set(train)
    with pytest.raises(ValueError, match="n <= 200"):
        eval_specs("test", 201)


def test_training_skips_eval_architectures(monkeypatch):
    held_out = eval_specs("test")[0]
    train = sample_arch(np.random.default_rng(0))
    queue = [held_out, held_out, train]
    monkeypatch.setattr(generator, "sample_arch", lambda rng, split: queue.pop(0))
    assert TrainingStream(0).draw(0).spec == train


def test_stream_resumes_exactly():
    stream = TrainingStream(seed=5)
    head = list(itertools.islice(stream, 7))
    state = json.loads(json.dumps(stream.state()))
    rest = list(itertools.islice(stream, 5))
    resumed = TrainingStream.from_state(state)
    assert list(itertools.islice(resumed, 5)) == rest
    assert TrainingStream(seed=5).draw(3) == head[3]
    assert len({d.C for d in itertools.islice(TrainingStream(seed=5), 60)}) > 2  # widths re-sampled


# -- the pool -------------------------------------------------------------------------------------

class FakeClock:
    """Advances one second per reading: every timed section lasts exactly one second."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        self.t += 1.0
        return self.t


def test_pool_exports_only_within_budget():
    pool = ArchPool(TrainingStream(seed=2), budget_fraction=0.1, timer=FakeClock())
    first = pool.draw()
    assert first.new and pool.exports == 1 and pool.export_seconds == 1.0
    second = pool.draw()  # no training time yet: re-use at a fresh width
    assert not second.new and second.spec == first.spec and pool.refresh_seconds == 1.0
    assert graph_signature(second.graph)[1] == graph_signature(first.graph)[1]
    pool.add_training_time(19.0)  # budget 1.9 s < 2 s spent
    assert not pool.draw().new
    pool.add_training_time(11.0)  # budget 3.0 s >= 3 s spent
    third = pool.draw()
    assert third.new and third.spec != first.spec and len(pool.entries) == 2
    stats = pool.stats()
    assert stats["exports"] == 2 and stats["draws"] == 4 and stats["overhead"] == pytest.approx(4 / 30)


def test_pool_state_restores_content_and_draws():
    pool = ArchPool(TrainingStream(seed=9), budget_fraction=0.0, timer=FakeClock())
    pool.draw()
    pool.add_training_time(100.0)
    pool.budget_fraction = 1.0
    pool.draw()
    pool.budget_fraction = 0.0
    state = json.loads(json.dumps(pool.state()))
    resumed = ArchPool.from_state(state, timer=FakeClock())
    assert [e.spec for e in resumed.entries] == [e.spec for e in pool.entries]
    for _ in range(3):
        a, b = pool.draw(), resumed.draw()
        assert not a.new and not b.new
        assert (a.spec, a.C, a.fc_dim) == (b.spec, b.C, b.fc_dim)
        assert graph_signature(a.graph) == graph_signature(b.graph)
        assert {k: v.shape for k, v in a.net.named_parameters()} == {k: v.shape for k, v in b.net.named_parameters()}


def test_pool_with_a_fixed_schedule_ignores_time():
    def run(pool: ArchPool, n: int) -> list:
        out = []
        for _ in range(n):
            d = pool.draw()
            pool.add_training_time(1e-9)
            out.append((d.spec.key, d.C, d.fc_dim, d.new))
        return out

    pool = ArchPool(TrainingStream(seed=4), add_every=3)
    head = run(pool, 4)
    assert [new for *_, new in head] == [True, False, False, True]
    state = json.loads(json.dumps(pool.state()))
    tail = run(pool, 3)
    assert run(ArchPool.from_state(state), 3) == tail
