"""The converter reproduces the GHN-2 reference graph of every parity fixture."""

from __future__ import annotations

import json

import pytest
from conftest import PARITY_MODELS
from reference_graphs import compare, load_reference

from ghn_onnx.convert import convert_file


def test_the_parametrized_list_is_the_fixture_list(parity_dir):
    config = json.loads((parity_dir / "config.json").read_text())
    assert sorted(config["models"]) == sorted(PARITY_MODELS)


@pytest.mark.parametrize("name", PARITY_MODELS)
def test_graph_matches_reference(parity_dir, name):
    graph = convert_file(parity_dir / f"{name}.onnx")
    ref = load_reference(parity_dir / f"{name}.graph.json")
    assert compare(graph, ref) == []
    assert len(graph) == len(ref["nodes"])
