"""Configs of the passes whose options are compile flags (insert-thresholds,
calibrate-thresholds), kept apart from the passes themselves: the CLI builds its parser from
them, and `sparsecc --help`, `--version` and usage errors then need no onnx_ir, ONNX Runtime
or numpy (they answer at once)."""
from __future__ import annotations

import dataclasses
from typing import Literal

from sparsecc.config import option

# Re-measurements with the thresholds in place settle in one or two; far more is a typo.
MAX_REFINE = 100
REFINE = f"[0, {MAX_REFINE}]"   # the `refine` option's range (sparsecc.config.option)


@dataclasses.dataclass(frozen=True)
class InsertThresholdsConfig:
    per_consumer: bool = option(False, "one threshold per site instead of one per activation tensor "
                                       "(q/k/v and gate/up then get their own)")
    include_head: bool = option(False, "threshold the head (LM head, classifier) too; by default it stays dense")


@dataclasses.dataclass(frozen=True)
class CalibrateThresholdsConfig:
    sparsity: float = option(0.5, "target activation sparsity", within="[0, 1)")
    mode: Literal["mac-weighted", "uniform"] = option(
        "mac-weighted", "mac-weighted: one level for all thresholds such that the model-wide "
        "1 - effective/dense MACs meets the target, counting naturally sparse sites; "
        "uniform: every threshold at the target")
    refine: int = option(1, "re-calibrations with the thresholds in place, so each tensor is measured "
                            "as it will be seen behind the upstream thresholds (0: dense statistics only)",
                     within=REFINE)
    refine_every: int = option(4, "the refine rounds re-measure every N-th calibration window and carry "
                                  "what they change over to the others' dense statistics (1: every window)",
                               within="[1, inf)")


# pass name -> its config, in the order their flags appear (pipeline.FLAG_PASSES)
FLAG_CONFIGS = {"insert-thresholds": InsertThresholdsConfig, "calibrate-thresholds": CalibrateThresholdsConfig}
