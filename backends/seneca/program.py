"""A seneca program image: every core's handlers as instructions, as `lower` writes them into
a compile folder and `simulate` reads them back (what ships is what is costed).

    program.bin         every handler assembled to 32-bit words, core by core
    manifest.json       where each core's handlers lie in program.bin (word offsets)
    cores/core_NNNN.s   one assembly listing per used core: the text the words were assembled from

What a handler executes is counted from its instructions here:
- a linear tile's event handler (`event_counts`): its control flow depends only on the events
  it receives, so the counts of a step with no event and the extra counts of one event are
  measured by running it on the reference interpreter;
- a dense handler (`nest_counts`): a loop nest without branches, counted from its loop bounds
  (`LI x, n` + `LOOP x, len`). Its bounds are bound to the shapes of the window it runs on:
  the image holds them for a window of `listing_tokens` (attention's depend on the context).
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import json
from pathlib import Path

import numpy as np

from sparsecc.backends.seneca.interpreter import Core, Event, run
from sparsecc.backends.seneca.isa import Instruction, assemble, decode, encode
from sparsecc.errors import SparseccError

MANIFEST = "sparsecc.program/1"
WORD_BYTES = 4


@dataclasses.dataclass(frozen=True)
class Handler:
    node: str
    kind: str                               # "linear" for a tile's event handler, else the node's op
    instructions: tuple[Instruction, ...]


@dataclasses.dataclass
class Image:
    cores: dict[int, list[Handler]]          # core -> its handlers, in the order they are laid out

    def handlers(self, core: int, node: str) -> list[Handler]:
        """A node's handlers on a core that have instructions, in image order."""
        return self._index.get((core, node), [])

    @functools.cached_property
    def _index(self) -> dict[tuple[int, str], list[Handler]]:
        out = collections.defaultdict(list)
        for core, handlers in self.cores.items():
            for h in handlers:
                if h.instructions:
                    out[(core, h.node)].append(h)
        return out

    @classmethod
    def assemble(cls, listings: dict[int, list[tuple[str, str, str]]]) -> Image:
        """From core -> (node, kind, assembly text) of each handler."""
        return cls({core: [Handler(node, kind, tuple(assemble(text))) for node, kind, text in handlers]
                    for core, handlers in listings.items()})

    def write(self, out_dir: Path, listings: dict[int, list[tuple[str, str, str]]], cols: int) -> int:
        """program.bin, manifest.json and the listings they came from; returns the image's words."""
        (out_dir / "cores").mkdir()
        image, manifest = bytearray(), {"schema": MANIFEST, "word_bytes": WORD_BYTES, "cores": {}}
        for core in sorted(self.cores):
            texts = listings[core]
            listing = [f"; core {core} (x={core % cols}, y={core // cols}): {len(texts)} handlers, one token step each\n"]
            entries = []
            for handler, (_, _, text) in zip(self.cores[core], texts):
                words = encode(list(handler.instructions))
                entries.append({"node": handler.node, "kind": handler.kind, "offset": len(image) // WORD_BYTES,
                                "words": len(words) // WORD_BYTES})
                image += words
                listing.append(text)
            (out_dir / "cores" / f"core_{core:04d}.s").write_text("\n".join(listing), encoding="utf-8")
            manifest["cores"][str(core)] = entries
        (out_dir / "program.bin").write_bytes(bytes(image))
        (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
        return len(image) // WORD_BYTES

    @classmethod
    def load(cls, out_dir: Path) -> Image:
        """The image `write` put in `out_dir`; one line naming the problem if it is not whole."""
        fix = "re-run `sparsecc compile ... --target seneca -o DIR` with this sparsecc"
        try:
            manifest = json.loads((out_dir / "manifest.json").read_text(encoding="utf-8"))
            blob = (out_dir / "program.bin").read_bytes()
        except FileNotFoundError as exc:
            raise SparseccError(f"{out_dir} has no {Path(exc.filename).name}: {fix}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise SparseccError(f"{out_dir / 'manifest.json'} is not JSON ({exc}): {fix}") from None
        if not isinstance(manifest, dict) or manifest.get("schema") != MANIFEST:
            raise SparseccError(f"{out_dir / 'manifest.json'} is not a {MANIFEST} manifest: {fix}")
        words = len(blob) // WORD_BYTES
        cores: dict[int, list[Handler]] = {}
        try:
            for core, entries in manifest["cores"].items():
                handlers = []
                for e in entries:
                    start, count = int(e["offset"]), int(e["words"])
                    if start < 0 or count < 0 or start + count > words:
                        raise SparseccError(f"{out_dir / 'manifest.json'}: handler {e['node']} on core {core} lies "
                                            f"outside program.bin ({words} words): {fix}")
                    chunk = blob[start * WORD_BYTES:(start + count) * WORD_BYTES]
                    handlers.append(Handler(str(e["node"]), str(e["kind"]), tuple(decode(chunk))))
                cores[int(core)] = handlers
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise SparseccError(f"{out_dir / 'manifest.json'} is malformed ({exc!r}): {fix}") from None
        except SparseccError as exc:
            if "manifest.json" in str(exc):
                raise
            raise SparseccError(f"{out_dir / 'program.bin'}: {exc}: {fix}") from None
        return cls(cores)


# Counting ----------------------------------------------------------------------------------------
_CONTROL = ("LOOP", "BEQ", "BNE")   # controller instructions whose registers decide control flow


def event_counts(program: tuple[Instruction, ...], registers: int = 64) -> tuple[collections.Counter, collections.Counter]:
    """(instructions of a step with no event, extra instructions per event) of an event handler,
    measured on the interpreter. The immediates a handler loads into registers that no loop or
    branch reads (addresses, channels, scales) do not change what it executes: they are zeroed,
    so the many tiles of one shape are measured once."""
    control = {ins.args[i] for ins in program if ins.op in _CONTROL for i in range(1 if ins.op == "LOOP" else 2)}
    shape = tuple(Instruction("LI", (ins.args[0], 0)) if ins.op == "LI" and ins.args[0] not in control else ins
                  for ins in program)
    return _measured(shape, registers)


@functools.lru_cache(maxsize=None)
def _measured(program: tuple[Instruction, ...], registers: int) -> tuple[collections.Counter, collections.Counter]:
    reach = max([abs(a) for ins in program if ins.format in ("M", "W", "S") for a in ins.args[-1:]], default=0)
    runs = []
    for events in ([], [Event(0, np.float16(0))]):
        core = Core(memory_words=reach + 64, registers=registers)
        core.inbox.extend(events)
        run(core, list(program))
        runs.append(core.counts)
    return runs[0], runs[1] - runs[0]


def loops(program) -> list[tuple[int, int]]:
    """(position, body length) of every LOOP of a straight-line loop nest, in order."""
    out = []
    for i, ins in enumerate(program):
        if ins.op in ("BEQ", "BNE", "JMP", "RECV"):
            raise SparseccError(f"a dense handler branches ({ins.op} at instruction {i}); it must be a loop nest")
        if ins.op == "LOOP":
            out.append((i, ins.args[1]))
    return out


def nest_counts(program: tuple[Instruction, ...], trips: list[int]) -> collections.Counter:
    """Instructions a loop nest executes with its loops' trip counts `trips` (in program order)."""
    counts: collections.Counter = collections.Counter()
    bounds = iter(trips)

    def walk(start: int, end: int, times: int) -> None:
        i = start
        while i < end:
            ins = program[i]
            counts[ins.op] += times
            if ins.op == "LOOP":
                body = ins.args[1]
                walk(i + 1, i + 1 + body, times * next(bounds))
                i += body
            i += 1

    walk(0, len(program), 1)
    return counts

