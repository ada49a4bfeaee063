"""The partition pass: tiles cover every weight exactly once and fit their cores, every node
gets a core, layouts keep neighbours close, and a model that does not fit fails in one line
before anything is written."""
from __future__ import annotations

import random
import re

import networkx as nx
import numpy as np
import onnx
import pytest
from conftest import SAMPLE_MODEL, Builder, bert_model, gpt2_model, linear_model, llama_model, mlp_model, save, to_ir
from onnx import TensorProto, helper

import sparsecc
from sparsecc import model_io, passes
from sparsecc import pipeline as pipelines
from sparsecc.backends.seneca import partition as partition_module
from sparsecc.backends.seneca.placement import Mesh, Placement
from sparsecc.backends.seneca.target import builtin
from sparsecc.errors import PreconditionError, SparseccError
from sparsecc.pass_manager import Context, PassManager
from sparsecc.sites import analyze, int8_weight

SMALL = {"rows": 8, "cols": 8, "data_memory": 1024}  # 921 usable bytes per core at the default headroom


def chip(tmp_path, rows: int, cols: int, data_memory: int) -> str:
    """The built-in seneca target with another mesh and data memory, as a file."""
    text = builtin()["seneca"].read_text()
    for key, value in (("rows", rows), ("cols", cols), ("data_memory_bytes", data_memory)):
        text, count = re.subn(rf"^{key} = \{{ value = \d+", f"{key} = {{ value = {value}", text, count=1, flags=re.M)
        assert count == 1, key
    path = tmp_path / f"chip-{rows}x{cols}-{data_memory}.toml"
    path.write_text(text)
    return str(path)


def chain_model(layers: int, dim: int = 16) -> onnx.ModelProto:
    """x -> MatMul -> MatMul -> ...: one 16x16 site per layer (544 bytes with its accumulators)."""
    b = Builder(5)
    x = "x"
    for i in range(layers):
        x = b.op("MatMul", [x, b.weight(f"w{i}", (dim, dim))], name=f"layer{i}")
    return b.model([helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", dim])], {"y": (x, ["n", dim])})


def partition(model, **options):
    """Run the pass; return (ir model, report details, placement read back from the model)."""
    model = to_ir(model) if isinstance(model, onnx.ModelProto) else model
    [report] = PassManager([passes.get("partition")(**options)]).run(model, Context())
    assert report.changed
    return model, report.details, Placement.from_json(model.metadata_props["sparsecc.placement"])


def tiled_shapes(model) -> dict[str, tuple[int, int]]:
    """(K, N) of every site and (rows, width) of every table Gather, by node name."""
    analysis = analyze(model.graph)
    shapes = {n.name: (s.in_features, s.out_features) for s, n in zip(analysis.sites, analysis.nodes)}
    for node in model.graph:
        if node.op_type == "Gather" and node.inputs[0].const_value is not None:
            shapes[node.name] = tuple(node.inputs[0].const_value.shape)
    return shapes


@pytest.mark.parametrize("build", [llama_model, gpt2_model, bert_model, mlp_model])
def test_tiles_cover_each_weight_exactly_once(tmp_path, build):
    model, _, placement = partition(build(), target=chip(tmp_path, **SMALL), max_context=4)
    shapes = tiled_shapes(model)
    assert {t.owner for t in placement.tiles} == set(shapes)
    packed = {n.name for n in analyze(model.graph).nodes if int8_weight(n) is not None}   # int8: a byte per weight
    for owner, (k, n) in shapes.items():
        cover = np.zeros((k, n), np.int32)
        for tile in (t for t in placement.tiles if t.owner == owner):
            cover[tile.k[0]:tile.k[1], tile.n[0]:tile.n[1]] += 1
            assert tile.weight_bytes >= (tile.k[1] - tile.k[0]) * (tile.n[1] - tile.n[0]) * (1 if owner in packed else 2)
        assert (cover == 1).all(), owner


@pytest.mark.parametrize("build", [llama_model, gpt2_model, bert_model, mlp_model])
def test_every_node_gets_a_core_and_the_graph_is_unchanged(build):
    proto = build()
    model, report, placement = partition(proto)
    before = to_ir(proto)
    assert [(n.name, n.op_type, [v.name if v else "" for v in n.inputs]) for n in model.graph] == \
           [(n.name, n.op_type, [v.name if v else "" for v in n.inputs]) for n in before.graph]
    cores = placement.node_cores()
    assert set(cores) == {n.name for n in model.graph}
    assert not set(placement.ops) & {t.owner for t in placement.tiles}
    for node in model.graph:
        tagged = [int(c) for c in node.metadata_props["sparsecc.cores"].split(",")]
        assert tagged == cores[node.name] == sorted(set(tagged))
        assert all(0 <= c < 32 * 32 for c in tagged)
    assert report["cores_used"] == len(placement.cores_used) <= report["cores_available"] == 1024


@pytest.mark.parametrize("build", [llama_model, mlp_model, lambda: chain_model(12)])
def test_memory_per_core_within_headroom_and_accounted(tmp_path, build):
    _, report, placement = partition(build(), target=chip(tmp_path, **SMALL), max_context=4, headroom=0.8)
    usable = int(0.8 * 1024)
    assert report["usable_bytes"]["per_core"] == usable
    assert set(placement.memory) == set(placement.cores_used)
    for core, held in placement.memory.items():
        assert sum(held.values()) <= usable
        tiles = [t for t in placement.tiles if t.core == core]
        assert held["weights"] == sum(t.weight_bytes for t in tiles)
        assert held["states"] == sum(t.state_bytes for t in tiles)
    assert report["utilisation"]["max"] <= 0.8


def test_a_small_core_splits_by_output_neuron_first_then_by_input_channel(tmp_path):
    target = chip(tmp_path, **SMALL)
    _, _, placement = partition(mlp_model(), target=target)
    gate = [t for t in placement.tiles if t.owner == "gate"]  # 32 x 64: 66 bytes a neuron, 13 neurons a core
    assert len(gate) == 5 and all(t.k == (0, 32) for t in gate)
    assert sorted(t.n[1] - t.n[0] for t in gate) == [12, 13, 13, 13, 13]
    assert [t.state_bytes for t in gate] == [2 * (t.n[1] - t.n[0]) for t in gate]
    assert len({t.core for t in gate}) == 5

    # 600 x 6: one neuron's column (1200 bytes) does not fit 921, so cut k in two as well.
    _, report, placement = partition(linear_model(k=600, n=6), target=target)
    tiles = [t for t in placement.tiles if t.owner == "linear"]
    assert sorted({t.k for t in tiles}) == [(0, 300), (300, 600)]
    assert len(tiles) == 12 and all(t.n[1] - t.n[0] == 1 for t in tiles)
    assert all(t.state_bytes == 4 for t in tiles)  # accumulator + outgoing partial sum
    assert report["tiles_per_site"]["split_by_k"] == ["linear"]


def test_tied_embedding_and_head_share_their_tiles():
    model, report, placement = partition(model_io.load_model(SAMPLE_MODEL))
    [tied] = report["tied_weights"]
    head = [t for t in placement.tiles if t.owner == tied["site"]]
    table = [t for t in placement.tiles if t.owner == tied["gather"]]
    assert len(head) == len(table) == 2  # 2048 x 128 x 2 bytes: two cores
    for h, g in zip(head, table):
        assert (g.core, g.k, g.n, g.weight_bytes) == (h.core, h.n, h.k, 0)
    sites = analyze(model.graph).sites
    assert report["memory_bytes"]["weights"] == sum(s.in_features * s.out_features * 2 for s in sites)
    assert tied["bytes_saved"] == 2048 * 128 * 2


def test_attention_state_is_max_context_positions_of_the_stored_operand():
    _, report, _ = partition(llama_model(), max_context=64)
    assert report["memory_bytes"]["kv"] == 2 * 64 * 16 * 2  # K and V, 16 wide
    # The sample uses grouped-query attention: K/V are stored 64 wide, repeated to 128 on the fly.
    _, report, _ = partition(model_io.load_model(SAMPLE_MODEL), max_context=100)
    assert report["memory_bytes"]["kv"] == 8 * 100 * 64 * 2


def test_packed_int8_weights_take_half_the_bytes():
    _, wide, _ = partition(mlp_model())
    _, packed, _ = partition(mlp_model(), weight_bits=8)
    assert packed["memory_bytes"]["weights"] * 2 == wide["memory_bytes"]["weights"]


def test_a_model_too_large_fails_in_one_line_with_the_shortfall(tmp_path):
    with pytest.raises(SparseccError) as err:
        partition(llama_model(), target=chip(tmp_path, 2, 2, 1024), max_context=4)
    message = str(err.value)
    assert "\n" not in message
    assert re.search(r"model needs [\d.]+ KiB of data memory, target 'seneca' has 3\.6 KiB usable in 4 cores "
                     r"\(short by [\d.]+ KiB\)", message), message
    assert "bigger mesh" in message and "data_memory_bytes" in message and "weight_bits=8" in message
    # Enough bytes in all, but three 544-byte layers cannot share 921-byte cores two by two.
    with pytest.raises(SparseccError, match=r"needs 3 cores .* has 2 \(short by 1 core\)"):
        partition(chain_model(3), target=chip(tmp_path, 1, 2, 1024))
    # Attention state: 1000 positions x 16 x 2 bytes is more than a core holds.
    with pytest.raises(SparseccError, match=r"node 'attn_scores' alone needs 31\.2 KiB .* lower max_context"):
        partition(llama_model(), target=chip(tmp_path, 16, 16, 1024), max_context=1000)
    with pytest.raises(SparseccError, match="or a max_context below 1000$"):
        partition(llama_model(), target=chip(tmp_path, **SMALL), max_context=1000)


def test_compile_writes_nothing_when_the_model_does_not_fit(tmp_path):
    model_path = save(llama_model(), tmp_path / "models" / "llama.onnx")
    small = [passes.get("partition")(target=chip(tmp_path, 2, 2, 1024), max_context=4)]
    with pytest.raises(SparseccError, match="short by"):
        sparsecc.compile_model(model_path, small, out=tmp_path / "out")
    assert not (tmp_path / "out").exists()
    # The same through a pipeline document, on a target it fits: the saved model carries the placement.
    fitting, _ = pipelines.from_spec({"passes": [{"pass": "partition", "target": chip(tmp_path, **SMALL),
                                                  "max_context": 4}]})
    sparsecc.compile_model(model_path, fitting, out=tmp_path / "out")
    saved = onnx.load(str(tmp_path / "out" / "model.onnx"))
    placement = Placement.from_json({p.key: p.value for p in saved.metadata_props}["sparsecc.placement"])
    assert all({p.key for p in node.metadata_props} == {"sparsecc.cores"} for node in saved.graph.node)
    assert set(placement.node_cores()) == {node.name for node in saved.graph.node}


def test_placement_json_round_trips_and_is_deterministic(tmp_path):
    target = chip(tmp_path, **SMALL)
    first, _, placement = partition(llama_model(), target=target, max_context=4)
    second, _, _ = partition(llama_model(), target=target, max_context=4)
    text = first.metadata_props["sparsecc.placement"]
    assert text == second.metadata_props["sparsecc.placement"]
    assert [n.metadata_props["sparsecc.cores"] for n in first.graph] == \
           [n.metadata_props["sparsecc.cores"] for n in second.graph]
    assert Placement.from_json(text) == placement and placement.to_json() == text


def test_consecutive_layers_are_neighbours_on_the_mesh(tmp_path):
    _, report, placement = partition(chain_model(12), target=chip(tmp_path, 4, 4, 1024))
    cores = placement.node_cores()
    assert len({c for i in range(12) for c in cores[f"layer{i}"]}) == 12  # one layer a core
    assert [placement.hops(cores[f"layer{i}"][0], cores[f"layer{i + 1}"][0]) for i in range(11)] == [1] * 11
    assert report["traffic"]["byte_hops"] == 11 * 16 * 2  # 16 activations of 2 bytes, one hop each


@pytest.mark.parametrize("seed", range(4))
def test_local_search_never_increases_byte_hops(seed):
    """On random traffic from a random (bad) start, and on real models from the snake."""
    rng = random.Random(seed)
    mesh, count = Mesh(5, 6), 24
    traffic = nx.DiGraph()
    traffic.add_nodes_from(range(count))
    for _ in range(40):
        src = rng.randrange(count)
        dests = tuple(sorted({rng.randrange(count) for _ in range(rng.randint(1, 4))} - {src}))
        if dests:
            traffic.add_node((src, dests), bytes=rng.randint(1, 100))
            traffic.add_edge(src, (src, dests))
            traffic.add_edges_from(((src, dests), d) for d in dests)
    start = rng.sample(range(mesh.cores), count)
    cores, swaps, _ = partition_module._improve(mesh, start, traffic)
    assert len(set(cores)) == count and all(0 <= c < mesh.cores for c in cores)
    after, before = partition_module.byte_hops(mesh, cores, traffic), partition_module.byte_hops(mesh, start, traffic)
    assert after <= before and (swaps == 0) == (after == before)
    _, report, _ = partition([llama_model, gpt2_model, bert_model, mlp_model][seed]())
    assert report["traffic"]["byte_hops"] <= report["traffic"]["byte_hops_snake"]


def test_mesh_routes_xy():
    mesh = Mesh(4, 5)
    assert mesh.core_xy(7) == (2, 1) and mesh.hops(0, 19) == 4 + 3
    assert [mesh.hops(mesh.snake(i), mesh.snake(i + 1)) for i in range(mesh.cores - 1)] == [1] * (mesh.cores - 1)
    assert sorted(mesh.snake(i) for i in range(mesh.cores)) == list(range(mesh.cores))

    def links(src, dest):  # the XY route: along the row, then along the column
        (x, y), (tx, ty) = mesh.core_xy(src), mesh.core_xy(dest)
        out = set()
        while x != tx:
            step = 1 if tx > x else -1
            out.add(((x, y), (x + step, y)))
            x += step
        while y != ty:
            step = 1 if ty > y else -1
            out.add(((x, y), (x, y + step)))
            y += step
        return out

    rng = random.Random(0)
    for _ in range(50):
        src, dests = rng.randrange(20), rng.sample(range(20), rng.randint(1, 6))
        assert mesh.multicast_links(src, dests) == len(set().union(*(links(src, d) for d in dests)))


def test_bad_options_and_unnamed_nodes():
    with pytest.raises(SparseccError, match="weight_bits must be 16 or 8"):
        passes.get("partition")(weight_bits=4)
    with pytest.raises(SparseccError, match="headroom"):
        passes.get("partition")(headroom=0)
    with pytest.raises(SparseccError, match="max_context"):
        passes.get("partition")(max_context=0)
    with pytest.raises(SparseccError, match="unknown target 'nope'"):
        partition(mlp_model(), target="nope")
    proto = mlp_model()
    proto.graph.node[0].name = ""
    with pytest.raises(PreconditionError, match="NameFixPass"):
        partition(proto)
