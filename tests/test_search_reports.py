"""What a search chose is shown where people look: a table per search in report.md and the
choices in compile's summary line (sparsity per group or role, loss, moves or thresholds,
forward passes, seconds), all read back against report.json, which names every group."""
from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
from conftest import llama_model, save, save_npz

from sparsecc import cli, report

SEARCHES = {
    "allocate-sparsity": ["--sparsity", "0.5", "--search", "allocate-sparsity", "--search-option", "step=0.1"],
    "sequential-search": ["--search", "sequential-search", "--search-option", "loss_inc=1.01"],
    "greedy-blocks": ["--sparsity", "0.5", "--search", "greedy-blocks", "--search-option", "step=0.1"],
    "finetune-bands": ["--sparsity", "0.5", "--finetune-steps", "2"],
}
LABELS = {"q/k/v", "o", "gate/up", "down"}   # the tiny Llama's thresholds, one layer


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("searches")
    model = save(llama_model(), root / "llama.onnx")
    rng = np.random.default_rng(0)
    data = save_npz([{"input_ids": rng.integers(0, 24, (1, 12)).astype(np.int64)} for _ in range(6)], root / "calib.npz")
    out = {}
    for name, flags in SEARCHES.items():
        folder = root / name
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout):
            assert cli.main(["-q", "compile", str(model), "--calib", str(data), "--cache-dir", str(root / "cache"),
                             *flags, "-o", str(folder)]) == 0
        doc = json.loads((folder / "report.json").read_text())
        out[name] = (next(p for p in doc["passes"] if p["pass"] == name), stdout.getvalue(),
                     (folder / "report.md").read_text())
    return out


def _chosen(p: dict) -> list[tuple[str, float]]:
    """(label, sparsity) per group or threshold, as report.json records them."""
    d = p["details"]
    if p["pass"] == "allocate-sparsity":
        return [(g["label"], g["sparsity"]) for g in d["groups"]]
    if p["pass"] == "sequential-search":
        return [(h["label"], h["level"]) for h in d["history"]]
    if p["pass"] == "greedy-blocks":
        return [(t["label"], t["level"]) for t in d["thresholds"]]
    return [(t["label"], t["sparsity_after"]) for t in d["thresholds"]]


def _costs(p: dict) -> list[str]:
    d = p["details"]
    if p["pass"] == "finetune-bands":
        t = d["training"]
        return [f"{d['loss']['before']:.4g}", f"{d['loss']['after']:.4g}", f"{t['steps']} steps",
                f"{t['forward_passes']} forward", f"{t['seconds']:.1f} s"]
    s, loss = d["search"], d.get("loss", {})
    out = [f"{s['forward_passes']} forward passes", f"{s['seconds']:.1f} s"]
    out += [f"{loss[k]:.4g}" for k in ("dense", "allocated", "searched") if k in loss]
    return out + ([f"{s['moves']} moves"] if "moves" in s else [f"{s['thresholds']} thresholds"])


@pytest.mark.parametrize("name", sorted(SEARCHES))
def test_report_json_names_every_group_by_its_sites(compiled, name):
    p, _, _ = compiled[name]
    assert {label for label, _ in _chosen(p)} == LABELS
    if name == "allocate-sparsity":   # the ids stay beside the labels
        assert {g["group"] for g in p["details"]["groups"]} == {"16x16+16x16+16x16 band 0", "16x16 band 0",
                                                                "16x40+16x40 band 0", "40x16 band 0"}


@pytest.mark.parametrize("name", sorted(SEARCHES))
def test_report_md_has_a_table_of_what_the_search_chose(compiled, name):
    p, _, markdown = compiled[name]
    section = markdown.split(f"## {p['id']}\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| threshold |")
            and not line.startswith("| group |") and not line.startswith("| block |")]
    for label, level in _chosen(p):
        if name == "greedy-blocks":   # one row per block, its thresholds' levels in it
            assert f"{label} {_pct(level)}" in section
        else:
            assert any(row.startswith(f"| {label} |") and _pct(level) in row for row in rows), (label, rows)
    for cost in _costs(p):
        assert cost in section, cost


@pytest.mark.parametrize("name", sorted(SEARCHES))
def test_the_summary_line_shows_the_choices(compiled, name):
    p, stdout, _ = compiled[name]
    line = stdout.strip().splitlines()[-1]
    assert line.startswith(f"{p['pass']}: ") and line.endswith("/model.onnx")
    d = p["details"]
    if name == "allocate-sparsity":
        shown = [(g["label"], g["sparsity"]) for g in d["groups"]]
    elif name == "finetune-bands":
        shown = [(r["label"], r["after"]) for r in d["sparsity_by_role"].values()]
    else:   # mean per role
        shown = [(d["role_labels"][role], level) for role, level in d["mean_sparsity_by_role"].items()]
    for label, level in shown:
        assert f"{label} {_pct(level)}" in line, (label, line)
    for cost in _costs(p):
        assert cost in line, cost


def test_layers_spanned_by_every_group_are_said_once():
    p = {"id": "allocate-sparsity", "pass": "allocate-sparsity", "details": {
        "groups": [{"label": "layers 0-3 q/k/v", "sparsity": 0.1}, {"label": "layers 0-3 down", "sparsity": 0.7}],
        "loss": {"dense": 3.0, "allocated": 3.1, "kind": "cross-entropy"},
        "search": {"moves": 5, "forward_passes": 40, "seconds": 1.5, "resumed": True}}}
    assert report.search_summary(p) == ("layers 0-3 q/k/v 10.0%, down 70.0%; loss 3 dense -> 3.1 (cross-entropy), "
                                        "5 moves, 40 forward passes, 1.5 s, resumed from its checkpoint")
    p["details"]["groups"][1]["label"] = "layers 2-3 down"   # bands: each says its own layers
    assert report.search_summary(p).startswith("layers 0-3 q/k/v 10.0%, layers 2-3 down 70.0%;")
