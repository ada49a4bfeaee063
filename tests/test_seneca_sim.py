"""The seneca simulator against ONNX Runtime on tiny Llama- and GPT-2-shaped models; the
programs it writes; its exact MAC accounting; the dense-handler counts against the interpreter."""
from __future__ import annotations

import collections
import json
import re

import numpy as np
import pytest
import sparsecc
from conftest import float32_target, gpt2_model, llama_model, save
from sparsecc import cli, model_io, ops
from sparsecc import passes as registry
from sparsecc.backends.seneca import dense
from sparsecc.backends.seneca.interpreter import Core, run
from sparsecc.backends.seneca.isa import assemble, decode, disassemble
from sparsecc.backends.seneca.simulator import Simulator
from sparsecc.backends.seneca.summary import Agreement
from sparsecc.backends.seneca.target import builtin, load_target
from sparsecc.pipeline import default_pipeline
from sparsecc.runtime import ort_session
from sparsecc.sites import analyze


def small_cores(tmp_path, data_memory=4096):
    """The seneca target with small cores, so that a tiny model spreads over several."""
    text = re.sub(r"^data_memory_bytes = \{ value = \d+", f"data_memory_bytes = {{ value = {data_memory}",
                  builtin()["seneca"].read_text(), flags=re.M)
    path = tmp_path / "small.toml"
    path.write_text(text)
    return str(path)


def compiled(tmp_path, proto, feeds, sparsity=0.5, target=None):
    """Thresholds calibrated on `feeds`, then partitioned for seneca (compile --target seneca)."""
    path = save(proto, tmp_path / "model.onnx")
    out = tmp_path / "out"
    passes = default_pipeline(sparsity=sparsity)
    if target is not None:
        passes.append(registry.get("partition")(target=target, max_context=16))
    sparsecc.compile_model(path, passes, feeds, out=out, target="seneca")
    return out, model_io.load_model(out / "model.onnx")


def llama_feeds(n=4, seq=12, vocab=24):
    rng = np.random.default_rng(0)
    return [{"input_ids": rng.integers(0, vocab, (1, seq)).astype(np.int64)} for _ in range(n)]


def gpt2_feeds(n=4, seq=12, dim=16):
    rng = np.random.default_rng(1)
    return [{"x": rng.standard_normal((seq, dim)).astype(np.float32)} for _ in range(n)]


CASES = {"llama": (llama_model, llama_feeds), "gpt2": (gpt2_model, gpt2_feeds)}


@pytest.mark.parametrize("case", sorted(CASES))
def test_float32_values_match_ort_and_count_macs_exactly(tmp_path, case):
    build, feeds = CASES[case]
    _, model = compiled(tmp_path, build(), feeds())
    sites = analyze(model.graph).sites
    tensors = sorted({s.consumes for s in sites})
    sim = Simulator(model, float32_target(tmp_path))
    # ORT as the graph is written: its DequantizeLinear + MatMul fusion would quantize activations
    with ort_session(model, tensors, optimize=False) as session:
        names = [o.name for o in session.get_outputs()]
        for feed in feeds(2):
            got = dict(zip(names, session.run(names, feed)))
            result = sim.run(feed)
            ref = got[names[0]]
            np.testing.assert_allclose(result.outputs[names[0]], ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
            # MAC lane-operations counted by the simulator = effective MACs from ORT's activations
            assert result.mac_lane_ops == sum(int(np.count_nonzero(got[s.consumes])) * s.out_features for s in sites)
            assert 0 < result.mac_lane_ops < result.dense_macs


@pytest.mark.parametrize("case", sorted(CASES))
def test_float16_dense_baseline_within_16_bit_tolerance(tmp_path, case):
    """Without thresholds (nothing to flip), 16-bit values stay within a few 16-bit roundings of
    ORT's float32 per op: 1% of the output range here, and the same argmax nearly everywhere."""
    build, feeds = CASES[case]
    path = save(build(), tmp_path / "dense.onnx")
    sparsecc.compile_model(path, [], None, out=tmp_path / "d", target="seneca")
    model = model_io.load_model(tmp_path / "d" / "model.onnx")
    sim = Simulator(model, load_target("seneca"))
    agree = total = 0
    with ort_session(model) as session:
        for feed in feeds(3):
            ref = session.run(None, feed)[0]
            out = sim.run(feed).outputs[session.get_outputs()[0].name]
            assert np.abs(out - ref).max() <= 0.01 * np.abs(ref).max()
            agree += int((out.argmax(-1) == ref.argmax(-1)).sum())
            total += ref.shape[-2]
    assert agree >= 0.95 * total


@pytest.mark.parametrize("case", sorted(CASES))
def test_float16_with_ort_decisions_isolates_the_arithmetic(tmp_path, case):
    """With ORT's threshold decisions the 16-bit run keeps exactly ORT's channels and stays within
    1% of the output range; its own decisions differ from ORT's only at near ties."""
    build, feeds = CASES[case]
    _, model = compiled(tmp_path, build(), feeds())
    thresholds = [(n.inputs[0].name, n.outputs[0].name, n.inputs[1].const_value.numpy())
                  for n in model.graph if ops.is_threshold(n)]
    sim = Simulator(model, load_target("seneca"))
    check = Agreement()
    with ort_session(model, [y for _, y, _ in thresholds], optimize=False) as session:
        names = [o.name for o in session.get_outputs()]
        for feed in feeds(3):
            got = dict(zip(names, session.run(names, feed)))
            result = sim.run(feed, keep=tuple(n for x, y, _ in thresholds for n in (x, y)),
                             decisions={y: got[y] for _, y, _ in thresholds})
            ref = got[names[0]]
            assert np.abs(result.outputs[names[0]] - ref).max() <= 0.01 * np.abs(ref).max()
            for x, y, t in thresholds:
                np.testing.assert_array_equal(result.outputs[y] != 0, got[y] != 0)
                check.add_decisions(result.outputs[x], got[y], t)
    assert check.decisions > 0 and check.tie_margin <= 0.02


def test_agreement_counts_ties_and_real_differences():
    check = Agreement()
    t = np.float32(1.0)
    x_ref = np.array([0.9995, 1.0005, 2.0, 0.5], np.float32)
    y_ref = np.where(np.abs(x_ref) > t, x_ref, 0)
    x_sim = np.array([1.0004, -0.9990, 2.0, 1.5], np.float32)   # two near ties, one agreement, one far
    check.add_decisions(x_sim, y_ref, t)
    assert (check.decisions, check.differing) == (4, 3) and check.tie_margin == pytest.approx(0.5)
    check.add(np.array([[0.0, 1.0], [2.0, 1.9]]), np.array([[0.0, 1.0], [1.9, 2.0]]))
    assert check.summary()["argmax_agreement"] == 0.5
    assert check.summary()["largest_top2_gap_at_mismatch"] == pytest.approx(0.1)
    check.add_quantized(np.array([0.49, 0.51, 2.6, -300.0], np.float32), np.array([0, 0, 3, -128], np.int8), np.float32(1.0))
    assert (check.quantized, check.requantized, check.max_steps) == (4, 1, 1)   # 0.51 rounds to 1; -300 saturates


def test_sparse_costs_less_than_dense_baseline(tmp_path):
    _, model = compiled(tmp_path, llama_model(dim=32, ffn=96), llama_feeds(), sparsity=0.6, target=small_cores(tmp_path))
    assert len(Simulator(model, load_target("seneca")).placement.cores_used) > 4
    feed = llama_feeds(1, seq=16)[0]
    sparse = Simulator(model, load_target("seneca")).run(feed)
    dense_run = Simulator(model, load_target("seneca"), dense_baseline=True).run(feed)
    assert sum(sparse.energy_pj.values()) < sum(dense_run.energy_pj.values())
    assert sparse.mac_lane_ops < dense_run.mac_lane_ops
    assert sparse.counts["MAC"] < dense_run.counts["MAC"]
    assert sparse.latency_cycles.mean() < dense_run.latency_cycles.mean()
    assert sparse.energy_pj["noc"] > 0 and sparse.flit_hops >= sparse.flits > 0


def test_compile_writes_programs_that_decode_to_the_listings(tmp_path):
    out, _ = compiled(tmp_path, llama_model(), llama_feeds())
    manifest = json.loads((out / "manifest.json").read_text())
    image = (out / "program.bin").read_bytes()
    placement = json.loads((out / "placement.json").read_text())
    assert placement["schema"] == "sparsecc.placement/1" and (out / "target.toml").is_file()
    listed = sorted(p.name for p in (out / "cores").iterdir())
    assert listed == [f"core_{int(c):04d}.s" for c in sorted(manifest["cores"], key=int)]
    for core, handlers in manifest["cores"].items():
        text = (out / "cores" / f"core_{int(core):04d}.s").read_text()
        sections = [s for s in re.split(r"\n(?=; )", text) if not s.startswith("; core ")]
        assert len(sections) == len(handlers)
        for section, h in zip(sections, handlers):
            words = decode(image[4 * h["offset"]: 4 * (h["offset"] + h["words"])])
            assert words == assemble(section)                     # the image is the listing, assembled
            assert assemble(disassemble(words)) == words          # and round-trips through the disassembler
    kinds = collections.Counter(h["kind"] for hs in manifest["cores"].values() for h in hs)
    assert kinds["linear"] >= 8 and kinds["Softmax"] == 1 and kinds["ai.sparsecc"] == 0


def test_golden_dense_handler():
    program = dense.elementwise("Mul", 3, [dense.Operand(True, 1), dense.Operand(False, 2)], store=True, send=True)
    assert program.text("Mul") == """\
; Mul
    LI x10, 3
    LOOP x10, 6
    MLD r1, [x1+0]
    MUL r3, r1, r2
    MST r3, [x8+0]
    EVC r3, x8
    ADDI x1, x1, 8
    ADDI x8, x8, 8
"""


@pytest.mark.parametrize("make", [
    lambda: dense.elementwise("Sigmoid", 3, [dense.Operand(True, 1)], True, False),
    lambda: dense.reduce("ReduceMean", 2, 3, dense.Operand(True, 1), True, True),
    lambda: dense.softmax(2, 3, dense.Operand(True, 1), True, False),
    lambda: dense.layernorm(2, 2, dense.Operand(True, 1), False, True),
    lambda: dense.matmul(2, 3, 2, True, True),
    lambda: dense.copy(4, True),
])
def test_dense_counts_equal_the_interpreter(make):
    program = make()
    core = Core(memory_words=1 << 12)
    for register, address in ((1, 64), (2, 512), (3, 1024), (8, 2048), (9, 3000)):
        core.x[register] = address
    run(core, assemble("\n".join(program.lines) + "\n    HALT\n"))
    core.counts["HALT"] -= 1
    assert +core.counts == +program.counts


def test_simulate_cli_report(tmp_path, capsys):
    out, _ = compiled(tmp_path, llama_model(), llama_feeds())
    feeds = tmp_path / "feeds.npz"
    np.savez(feeds, input_ids=np.stack([f["input_ids"] for f in llama_feeds(2)]))
    assert cli.main(["simulate", str(out), "--text", str(feeds), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ratio"]["energy"] > 1.0 and report["vs_ort"]["argmax_agreement"] > 0.5
    pinned = report["vs_ort"]["with_ort_decisions"]
    assert pinned["threshold_decisions"] > 0 and pinned["argmax_agreement"] >= report["vs_ort"]["argmax_agreement"]
    assert pinned["simulator_mac_lane_ops"] == report["vs_ort"]["ort_effective_macs"]   # ORT's zeros: ORT's MACs
    assert set(report["sparse"]["energy_share"]) == {"npe", "memory", "controller", "noc"}
    first = (out / "simulation" / "report.json").read_bytes()
    assert cli.main(["simulate", str(out), "--text", str(feeds), "-q"]) == 0
    assert (out / "simulation" / "report.json").read_bytes() == first     # same inputs, same bytes


def test_simulate_needs_a_seneca_compile(tmp_path, capsys):
    path = save(llama_model(), tmp_path / "m.onnx")
    sparsecc.compile_model(path, default_pipeline(sparsity=0.5), llama_feeds(), out=tmp_path / "ort")
    capsys.readouterr()
    assert cli.main(["simulate", str(tmp_path / "ort"), "--text", "x.txt"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--target seneca" in err
    assert not (tmp_path / "ort" / "simulation").exists()


def test_int8_sites_run_on_the_int8_lanes(tmp_path):
    """w8a8: every site runs MAC8 on int8 events. With ORT's decisions (threshold zero
    patterns, QuantizeLinear integers) the simulator's own integers are those of ORT with
    32-bit values, within one step with 16-bit values; its MAC lane-ops equal ORT's
    effective MACs."""
    from sparsecc.sites import int8_operands

    path = save(llama_model(), tmp_path / "model.onnx")
    sparsecc.compile_model(path, default_pipeline(sparsity=0.5, quant="w8a8"), llama_feeds(), out=tmp_path / "q",
                           target="seneca")
    model = model_io.load_model(tmp_path / "q" / "model.onnx")
    analysis = analyze(model.graph)
    steps = [n for n in model.graph if ops.is_threshold(n) or n.op_type == "QuantizeLinear"]
    quantizers = [n for n in steps if n.op_type == "QuantizeLinear"]
    assert {int8_operands(n).events.name for n in analysis.nodes} == {q.outputs[0].name for q in quantizers}
    with ort_session(model, [n.outputs[0].name for n in steps], optimize=False) as session:
        names = [o.name for o in session.get_outputs()]
        feed = llama_feeds(1)[0]
        got = dict(zip(names, session.run(names, feed)))
    decisions = {n.outputs[0].name: got[n.outputs[0].name] for n in steps}
    for target, most in ((float32_target(tmp_path), 0), (load_target("seneca"), 1)):
        result = Simulator(model, target).run(feed, keep=tuple(q.inputs[0].name for q in quantizers), decisions=decisions)
        check = Agreement()
        for q in quantizers:
            check.add_quantized(result.outputs[q.inputs[0].name], got[q.outputs[0].name], q.inputs[1].const_value.numpy())
        assert check.quantized > 0 and check.max_steps <= most
        assert result.counts["MAC8"] > 0
        assert result.mac_lane_ops == sum(int(np.count_nonzero(got[int8_operands(n).events.name])) * s.out_features
                                          for s, n in zip(analysis.sites, analysis.nodes))
    # the float model at the same sparsity costs more: 16-bit weights, MUL + ADD per lane
    _, float_model = compiled(tmp_path / "f", llama_model(), llama_feeds())
    sparse_int8 = Simulator(model, load_target("seneca")).run(feed)
    sparse_float = Simulator(float_model, load_target("seneca")).run(feed)
    assert sum(sparse_int8.energy_pj.values()) < sum(sparse_float.energy_pj.values())
