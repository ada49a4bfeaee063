"""Built-in passes. Each module holds one pass; `BUILTIN` maps stable names to classes.
Backends contribute their own (`Backend.passes`, e.g. seneca's `partition`); third-party passes
join through the `sparsecc.passes` entry-point group."""
from __future__ import annotations

from importlib.metadata import entry_points

from sparsecc.errors import SparseccError
from sparsecc.pass_manager import Pass
from sparsecc.passes.allocate_sparsity import AllocateSparsity
from sparsecc.passes.calibrate_thresholds import CalibrateThresholds
from sparsecc.passes.compensate_lowrank import CompensateLowrank
from sparsecc.passes.discover_sites import DiscoverSites
from sparsecc.passes.distill import Distill
from sparsecc.passes.finetune_bands import FinetuneBands
from sparsecc.passes.fold_qdq import FoldQdq
from sparsecc.passes.greedy_blocks import GreedyBlocks
from sparsecc.passes.insert_thresholds import InsertThresholds
from sparsecc.passes.quantize_activations import QuantizeActivations
from sparsecc.passes.quantize_weights import QuantizeWeights
from sparsecc.passes.sequential_search import SequentialSearch
from sparsecc.passes.smooth_activations import SmoothActivations
from sparsecc.passes.weight_scores import WeightScores

BUILTIN: dict[str, type[Pass]] = {p.name: p for p in (DiscoverSites, FoldQdq, InsertThresholds, CalibrateThresholds, AllocateSparsity,
                                              QuantizeWeights, QuantizeActivations, SequentialSearch, GreedyBlocks,
                                              CompensateLowrank, WeightScores, FinetuneBands, Distill, SmoothActivations)}


def registry() -> dict[str, type[Pass]]:
    """Built-in passes, those of the installed backends, and those registered by installed packages."""
    from sparsecc import backends

    found = dict(BUILTIN)
    for backend in backends.registry().values():
        for p in backend.passes:
            found.setdefault(p.name, p)
    for ep in entry_points(group="sparsecc.passes"):
        if ep.name not in found:
            found[ep.name] = ep.load()
    return found


def get(name: str) -> type[Pass]:
    passes = registry()
    if name not in passes:
        raise SparseccError(f"unknown pass {name!r}; known passes: {', '.join(sorted(passes))}")
    return passes[name]
