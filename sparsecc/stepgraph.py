"""Step graphs: one token in, logits and the next recurrent state out.

A step graph has the inputs `input_ids` ([1, 1] int64) and `state.0 .. state.N-1`, and the
outputs `logits` ([1, 1, vocab]) and `new_state.0 .. new_state.N-1`; `new_state.i` is fed
back as `state.i` for the next token. The pairing, each state's shape, initial value and role
are recorded in the model's metadata_props under `sparsecc.step` (JSON), so tools loop
tokens without guessing from names:

    {"schema": "sparsecc.step/1", "arch": "rwkv", "token": "input_ids", "logits": "logits",
     "state": [{"input": "state.0", "output": "new_state.0", "role": "layer 0 time-mix shift",
                "shape": [1, 256], "init": 0.0, "grow_axis": null}, ...]}

A state whose `grow_axis` is set (a Llama KV cache) starts empty (length 0 on that axis,
`"past"` in `shape`) and grows by one per token; the others keep their shape.

This module needs no torch: the exporters are in `sparsecc.export`.
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx_ir as ir

from sparsecc.errors import SparseccError

METADATA_KEY = "sparsecc.step"
SCHEMA = "sparsecc.step/1"
TOKEN, LOGITS = "input_ids", "logits"


def state_input(i: int) -> str:
    return f"state.{i}"


def state_output(i: int) -> str:
    return f"new_state.{i}"


@dataclasses.dataclass(frozen=True)
class StateSpec:
    role: str                       # for people, e.g. "layer 2 wkv numerator"
    shape: tuple                    # ints; "past" on the growing axis
    init: float = 0.0               # every element's value before the first token
    grow_axis: int | None = None    # the axis that grows by one per token (KV cache), else None
    dtype: str = "float32"

    def initial(self) -> np.ndarray:
        shape = [0 if d == "past" else int(d) for d in self.shape]
        return np.full(shape, self.init, dtype=self.dtype)


@dataclasses.dataclass(frozen=True)
class StepSpec:
    arch: str
    states: tuple[StateSpec, ...]

    def to_json(self) -> str:
        rows = [{"input": state_input(i), "output": state_output(i), "role": s.role, "shape": list(s.shape),
                 "dtype": s.dtype, "init": s.init, "grow_axis": s.grow_axis} for i, s in enumerate(self.states)]
        return json.dumps({"schema": SCHEMA, "arch": self.arch, "token": TOKEN, "logits": LOGITS, "state": rows},
                          sort_keys=True)

    def initial_state(self) -> dict[str, np.ndarray]:
        return {state_input(i): s.initial() for i, s in enumerate(self.states)}

    def state_bytes(self, past: int = 0) -> int:
        """Bytes of state held between tokens after `past` tokens."""
        total = 0
        for s in self.states:
            shape = [past if d == "past" else int(d) for d in s.shape]
            total += int(np.prod(shape)) * np.dtype(s.dtype).itemsize
        return total


def read_spec(model: ir.Model | str | Path) -> StepSpec:
    """The step-graph description stored in a model, or SparseccError when it has none."""
    if not isinstance(model, ir.Model):
        from sparsecc.model_io import load_model

        model = load_model(model)
    text = model.metadata_props.get(METADATA_KEY)
    if text is None:
        raise SparseccError(f"the model has no {METADATA_KEY!r} metadata: it is not a step graph; "
                            "export one with `sparsecc export`")
    data = json.loads(text)
    if data.get("schema") != SCHEMA:
        raise SparseccError(f"step-graph metadata has schema {data.get('schema')!r}, expected {SCHEMA!r}; re-export it")
    states = []
    for i, row in enumerate(data["state"]):
        if (row["input"], row["output"]) != (state_input(i), state_output(i)):
            raise SparseccError(f"step-graph metadata pairs {row['input']} with {row['output']} at position {i}; re-export it")
        states.append(StateSpec(row["role"], tuple(row["shape"]), row["init"], row["grow_axis"], row["dtype"]))
    return StepSpec(data["arch"], tuple(states))


def run_tokens(session, spec: StepSpec, tokens: Iterable[int]) -> np.ndarray:
    """Logits [T, vocab] of an ONNX Runtime session on a step graph, fed one token at a time
    from the initial state, the state carried from step to step."""
    state = spec.initial_state()
    outputs = [LOGITS] + [state_output(i) for i in range(len(spec.states))]
    logits = []
    for token in tokens:
        feeds = {TOKEN: np.array([[token]], dtype=np.int64), **state}
        result = session.run(outputs, feeds)
        logits.append(result[0].reshape(-1))
        state = {state_input(i): value for i, value in enumerate(result[1:])}
    return np.stack(logits)
