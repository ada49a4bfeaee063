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

Every tool that feeds windows of tokens (calibration, searches, evaluation) runs a step
graph through `StepSession`, which `sparsecc.runtime.load_session` returns for one: fed
`input_ids` [1, T], it runs the T tokens one by one and returns every step's outputs.

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


def is_step_graph(model: ir.Model) -> bool:
    return METADATA_KEY in model.metadata_props


def read_spec(model: ir.Model | str | Path) -> StepSpec:
    """The step-graph description stored in a model, or SparseccError when it has none."""
    if not isinstance(model, ir.Model):
        from sparsecc.model_io import load_model

        model = load_model(model)
    text = model.metadata_props.get(METADATA_KEY)
    if text is None:
        raise SparseccError(f"the model has no {METADATA_KEY!r} metadata: it is not a step graph; "
                            "export one with `sparsecc export`")
    return parse_spec(text)


def parse_spec(text: str) -> StepSpec:
    """A step-graph description from its metadata JSON."""
    data = json.loads(text)
    if data.get("schema") != SCHEMA:
        raise SparseccError(f"step-graph metadata has schema {data.get('schema')!r}, expected {SCHEMA!r}; re-export it")
    states = []
    for i, row in enumerate(data["state"]):
        if (row["input"], row["output"]) != (state_input(i), state_output(i)):
            raise SparseccError(f"step-graph metadata pairs {row['input']} with {row['output']} at position {i}; re-export it")
        states.append(StateSpec(row["role"], tuple(row["shape"]), row["init"], row["grow_axis"], row["dtype"]))
    return StepSpec(data["arch"], tuple(states))


class StepSession:
    """An ONNX Runtime session on a step graph that reads like one on a window graph. Fed
    `input_ids` [1, T], `run` feeds the T tokens one at a time from the initial state, carrying
    the state, and returns each asked-for output over all T steps: the logits as [1, T, vocab],
    any other tensor stacked on a new leading axis [T, ...]. Other inputs (a search's
    thresholds) go to every step unchanged; the state is neither an input nor an output here."""

    def __init__(self, session, spec: StepSpec):
        self.session, self.spec = session, spec
        self.state_inputs = {state_input(i) for i in range(len(spec.states))}
        self.state_outputs = [state_output(i) for i in range(len(spec.states))]

    def get_inputs(self):
        return [i for i in self.session.get_inputs() if i.name not in self.state_inputs]

    def get_outputs(self):
        return [o for o in self.session.get_outputs() if o.name not in self.state_outputs]

    def run(self, output_names, feed: dict) -> list[np.ndarray]:
        names = list(output_names or [o.name for o in self.get_outputs()])
        ids = np.asarray(feed[TOKEN])
        if ids.ndim != 2 or ids.shape[0] != 1:
            raise SparseccError(f"a step graph takes one sequence of tokens at a time: input_ids [1, T], got {list(ids.shape)}")
        fixed = {k: v for k, v in feed.items() if k != TOKEN}
        fetch = list(dict.fromkeys(names + self.state_outputs))
        steps = {name: [] for name in names}
        state = self.spec.initial_state()
        for token in ids[0]:
            values = dict(zip(fetch, self.session.run(fetch, {TOKEN: np.array([[token]], dtype=np.int64), **fixed, **state})))
            for name in names:
                steps[name].append(values[name])
            state = {state_input(i): values[name] for i, name in enumerate(self.state_outputs)}
        return [np.concatenate(steps[n], axis=1) if n == LOGITS else np.stack(steps[n]) for n in names]

    def logits(self, tokens: Iterable[int]) -> np.ndarray:
        """Logits [T, vocab] of `tokens` fed one at a time from the initial state."""
        return self.run([LOGITS], {TOKEN: np.array([list(tokens)], dtype=np.int64)})[0][0]
