"""The `seneca` backend: core programs for a SENECA-style mesh (`simulation` runs them).

`lower` writes, beside the compiled model (`program.Image`):
    placement.json          which core holds which tiles and runs which nodes
    target.toml             the target description it was compiled for (`simulate` reads it)
    cores/core_NNNN.s       one assembly listing per used core: its handlers for one token step
    program.bin             every handler assembled to 32-bit words, core by core
    manifest.json           where each core's handlers lie in program.bin (word offsets)
Dense handlers' loop counts depend on the attention context; the listings show them for a
window of `LISTING_TOKENS` tokens (a step graph: one token, a KV cache of that many positions).
"""
from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import onnx_ir as ir

from sparsecc.backends.base import Backend
from sparsecc.backends.seneca.partition import Partition
from sparsecc.backends.seneca.placement import Placement
from sparsecc.backends.seneca.program import Image
from sparsecc.backends.seneca.target import Target, load_target

LISTING_TOKENS = 8


class SenecaBackend(Backend):
    name = "seneca"
    description = "SENECA-style event-driven cores: placement, per-core programs, instruction-level simulator"
    requires = ("partition",)
    passes = (Partition,)

    @classmethod
    def report_section(cls):
        from sparsecc.backends.seneca import report

        return report

    @classmethod
    def doc_sections(cls) -> dict:
        from sparsecc.backends.seneca.docs import SECTIONS

        return SECTIONS

    def target(self, model: ir.Model) -> Target:
        return load_target(Placement.of(model).target)

    def declines(self, model: ir.Model) -> dict[str, str]:
        from sparsecc.backends.seneca.simulator import host_nodes

        return host_nodes(model)

    def lower(self, model: ir.Model, out_dir: Path) -> dict:
        from sparsecc.backends.seneca.simulator import Simulator

        target = self.target(model)
        sim = Simulator(model, target)
        sim.run(dummy_feeds(model.graph, LISTING_TOKENS))   # the handlers of a window of that many tokens
        listings: dict[int, list[tuple[str, str, str]]] = collections.defaultdict(list)   # core -> (node, kind, text)
        for node in sim.nodes:
            for w in sim.work.get(node.name, []):
                listings[w.core].append((node.name, "linear" if node.name in sim.tiles else node.op_type, w.program))
        words = Image.assemble(listings).write(out_dir, listings, sim.placement.cols)
        (out_dir / "target.toml").write_bytes(target.path.read_bytes())
        (out_dir / "placement.json").write_text(sim.placement.to_json() + "\n", encoding="utf-8")
        return {"cores": len(listings), "handlers": sum(len(h) for h in listings.values()),
                "program_words": words, "listing_tokens": LISTING_TOKENS}


def dummy_feeds(graph: ir.Graph, tokens: int) -> dict[str, np.ndarray]:
    """Inputs of `tokens` positions (token id 1, mask 1) for tracing shapes."""
    feeds = {}
    for value in graph.inputs:
        dims = [d if isinstance(d, int) else (1 if i == 0 else tokens) for i, d in enumerate(value.shape or [1, tokens])]
        dtype = value.dtype.numpy() if value.dtype is not None else np.int64
        feeds[value.name] = np.ones(dims, dtype)
    return feeds
