"""insert-thresholds: put a Threshold(x, t) before the linear sites, with t = 0 (a no-op
until calibrate-thresholds sets it)."""
from __future__ import annotations


import numpy as np
import onnx_ir as ir

from sparsecc import ops
from sparsecc.flag_configs import InsertThresholdsConfig
from sparsecc.model_io import earliest
from sparsecc.pass_manager import Context, Pass, PassResult
from sparsecc.sites import Site, activation_dtype, analyze, quantizer_of


class InsertThresholds(Pass):
    """Insert a sparsecc Threshold op before each linear site (one per activation tensor)."""

    name = "insert-thresholds"
    provides = frozenset({"thresholds"})
    Config = InsertThresholdsConfig

    def run(self, model: ir.Model, ctx: Context) -> PassResult:
        graph = model.graph
        analysis = analyze(graph)
        sites = analysis.sites
        chosen = [s for s in sites if s.threshold is None and s.natural is None and s.compensates is None
                  and (self.config.include_head or not s.head)]
        nodes = dict(enumerate(analysis.nodes))
        buckets: dict[str, list[Site]] = {}
        for site in chosen:
            buckets.setdefault(site.node if self.config.per_consumer else site.source, []).append(site)
        if chosen:
            ops.ensure_threshold_function(model)
        taken = {n.name for n in graph if ops.is_threshold(n)}
        counter = 0
        for members in buckets.values():
            while f"sparsecc_threshold_{counter}" in taken:
                counter += 1
            name = f"sparsecc_threshold_{counter}"
            taken.add(name)
            first = nodes[members[0].index]
            # a quantized activation is thresholded before its quantizer: one decision, no event
            readers = [quantizer_of(nodes[s.index].inputs[0]) or nodes[s.index] for s in members]
            x = readers[0].inputs[0]
            dtype = activation_dtype(first) or ir.DataType.FLOAT
            t = ir.Value(name=f"{name}.t", shape=ir.Shape([]), type=ir.TensorType(dtype),
                         const_value=ir.tensor(np.array(0, dtype=dtype.numpy())))
            graph.register_initializer(t)
            node = ops.make_threshold(x, t, name)
            graph.insert_before(earliest(graph, readers), node)
            for reader in {id(r): r for r in readers}.values():
                reader.replace_input_with(0, node.outputs[0])
        skipped = {
            "natural": [s.node for s in sites if s.natural],
            "head": [s.node for s in sites if s.head and not self.config.include_head],
            "already_thresholded": [s.node for s in sites if s.threshold is not None],
        }
        return PassResult({"thresholds": len(buckets), "sites": len(chosen), "skipped": skipped}, changed=bool(chosen))

