"""Where a model lives on a mesh of cores: the data model shared by the partition pass, code
generation and the simulator.

A linear site's weight [K, N] is cut into tiles, each held by one core: per activation event
(a non-zero input channel k) the core reads row k of its slice and accumulates into its output
neurons. A constant-table Gather (embedding lookup) is the same thing seen from its one-hot
input: K = table rows (token ids), N = the row's width. Every other node runs on one core.

Cores are numbered row-major, core = row * cols + col; x is the column, y the row. The NoC
routes XY (along the row first, then along the column), so a message takes Manhattan hops and
a multicast from one core follows a tree of those paths.

A step graph (sparsecc.stepgraph) carries its recurrent state between tokens: each state
lives in the data memory of one core, the core of the node that writes `new_state.i`
(`ResidentState`); its bytes are the core's `step_state` memory.
"""
from __future__ import annotations

import dataclasses
import json

from sparsecc.errors import SparseccError

SCHEMA = "sparsecc.placement/1"
METADATA_KEY = "sparsecc.placement"   # the model metadata entry holding the placement JSON
CATEGORIES = ("weights", "states", "constants", "kv")  # what a core's data memory holds
STEP_STATE = "step_state"   # a step graph's recurrent state (and decode KV cache), resident between tokens
WORD = 2   # bytes of a 16-bit activation, accumulator, constant or state word in data memory


@dataclasses.dataclass(frozen=True)
class Tile:
    owner: str               # name of the node the tile belongs to (MatMul/Gemm, or Gather)
    core: int
    k: tuple[int, int]       # input channels [k0, k1): weight rows (table rows of a Gather)
    n: tuple[int, int]       # output neurons [n0, n1)
    weight_bytes: int        # bytes this tile adds to its core: 0 when it shares another tile's (tied weights)
    state_bytes: int         # accumulators, + outgoing partial sums when the site is split by k


@dataclasses.dataclass(frozen=True)
class ResidentState:
    """One state of a step graph, resident in its core's data memory between tokens."""

    input: str                  # state.i
    output: str                 # new_state.i
    role: str
    core: int                   # the core of the node that writes new_state.i
    bytes: int                  # at position 0 (before the first token), 16-bit words
    bytes_per_position: int     # added per token (a KV cache), else 0
    reserved_positions: int     # positions of growth the core's memory holds room for (0 when it does not grow)

    def bytes_at(self, past: int) -> int:
        """Bytes after `past` tokens."""
        return self.bytes + self.bytes_per_position * past


@dataclasses.dataclass(frozen=True)
class Mesh:
    rows: int
    cols: int

    @property
    def cores(self) -> int:
        return self.rows * self.cols

    def core_xy(self, core: int) -> tuple[int, int]:
        return core % self.cols, core // self.cols

    def hops(self, a: int, b: int) -> int:
        (ax, ay), (bx, by) = self.core_xy(a), self.core_xy(b)
        return abs(ax - bx) + abs(ay - by)

    def multicast_links(self, src: int, dests: list[int]) -> int:
        """Links of the XY multicast tree from `src` to `dests`: along src's row out to the
        farthest columns, then up and down each column to its farthest destination."""
        sx, sy = self.core_xy(src)
        lo = hi = sx
        spans: dict[int, tuple[int, int]] = {}
        for dest in dests:
            x, y = self.core_xy(dest)
            lo, hi = min(lo, x), max(hi, x)
            top, bottom = spans.get(x, (sy, sy))
            spans[x] = (min(top, y), max(bottom, y))
        return hi - lo + sum(bottom - top for top, bottom in spans.values())

    def snake(self, i: int) -> int:
        """The i-th core of the boustrophedon order: rows left to right, then right to left, so
        consecutive positions are always neighbours."""
        row, col = divmod(i, self.cols)
        return row * self.cols + (col if row % 2 == 0 else self.cols - 1 - col)


@dataclasses.dataclass(frozen=True)
class Placement:
    target: str
    rows: int
    cols: int
    weight_bits: int
    tiles: list[Tile]
    ops: dict[str, int]                  # every node that is not tiled -> its core
    memory: dict[int, dict[str, int]]    # every used core -> bytes by category (CATEGORIES, + STEP_STATE)
    states: tuple[ResidentState, ...] = ()   # a step graph's states, in state order
    usable_bytes: int = 0                # per core, for the model (the partition's headroom); with states only

    @property
    def mesh(self) -> Mesh:
        return Mesh(self.rows, self.cols)

    def core_xy(self, core: int) -> tuple[int, int]:
        return self.mesh.core_xy(core)

    def hops(self, a: int, b: int) -> int:
        return self.mesh.hops(a, b)

    @property
    def cores_used(self) -> list[int]:
        return sorted(set(self.memory) | {t.core for t in self.tiles} | set(self.ops.values()))

    def core_bytes(self) -> dict[int, int]:
        """Total bytes held by each used core."""
        return {core: sum(self.memory.get(core, {}).values()) for core in self.cores_used}

    def node_cores(self) -> dict[str, list[int]]:
        """Every node -> the sorted cores it runs on (its tiles' cores, or its one core)."""
        found: dict[str, set[int]] = {name: {core} for name, core in self.ops.items()}
        for tile in self.tiles:
            found.setdefault(tile.owner, set()).add(tile.core)
        return {name: sorted(cores) for name, cores in found.items()}

    def state_bytes(self, past: int = 0) -> dict[int, int]:
        """Every core holding state -> its state bytes after `past` tokens."""
        out: dict[int, int] = {}
        for s in self.states:
            out[s.core] = out.get(s.core, 0) + s.bytes_at(past)
        return out

    def fits_up_to(self) -> dict[int, int | None]:
        """Every core holding state -> the longest context its state fits in (its other
        contents and the usable bytes as placed); None where the state does not grow."""
        out: dict[int, int | None] = {}
        for core in sorted({s.core for s in self.states}):
            mine = [s for s in self.states if s.core == core]
            per_position = sum(s.bytes_per_position for s in mine)
            if per_position == 0:
                out[core] = None
                continue
            others = sum(v for c, v in self.memory.get(core, {}).items() if c != STEP_STATE)
            room = self.usable_bytes - others - sum(s.bytes for s in mine)
            out[core] = max(-1, room // per_position)   # -1: not even position 0 fits
        return out

    def to_json(self) -> str:
        """Compact JSON with every mapping in sorted order: the same placement gives the same bytes."""
        categories = CATEGORIES + ((STEP_STATE,) if self.states else ())
        doc = {
            "schema": SCHEMA, "target": self.target, "rows": self.rows, "cols": self.cols,
            "weight_bits": self.weight_bits,
            "tiles": [dataclasses.asdict(t) for t in self.tiles],
            "ops": {name: self.ops[name] for name in sorted(self.ops)},
            "memory": {str(core): {c: self.memory[core].get(c, 0) for c in categories} for core in sorted(self.memory)},
        }
        if self.states:   # step graphs only: a window graph's placement keeps its bytes
            doc["states"] = [dataclasses.asdict(s) for s in self.states]
            doc["usable_bytes"] = self.usable_bytes
        return json.dumps(doc, separators=(",", ":"))

    @classmethod
    def of(cls, model) -> Placement:
        """The placement the partition pass tagged into `model` (an onnx_ir Model)."""
        text = model.metadata_props.get(METADATA_KEY)
        if text is None:
            raise SparseccError("the model has no placement; compile it with --target seneca (the partition pass)")
        return cls.from_json(text)

    @classmethod
    def from_json(cls, text: str) -> Placement:
        doc = json.loads(text)
        if doc.get("schema") != SCHEMA:
            raise SparseccError(f"placement schema {doc.get('schema')!r} is not {SCHEMA!r}; "
                                "re-run the partition pass with this sparsecc")
        tiles = [Tile(t["owner"], t["core"], tuple(t["k"]), tuple(t["n"]), t["weight_bytes"], t["state_bytes"])
                 for t in doc["tiles"]]
        return cls(doc["target"], doc["rows"], doc["cols"], doc["weight_bits"], tiles, dict(doc["ops"]),
                   {int(core): dict(m) for core, m in doc["memory"].items()},
                   tuple(ResidentState(**s) for s in doc.get("states", ())), doc.get("usable_bytes", 0))
