"""The seneca backend: everything of SENECA-style event-driven cores, from placement to simulation.

`backend` (the Backend: lowering to per-core programs), `target` + `targets/` (target files and
their loader), `isa` (the instruction set), `placement` (where a model lives on the mesh) and
`partition` (the pass that decides it), `codegen` + `linear` (linear-tile event handlers),
`dense` (every other op), `program` (the program image lowering writes and simulation loads),
`simulator` (the whole model on the mesh), `simulation` + `steps` (simulating a compile folder;
step graphs token by token), `summary` (the simulation report), `report` (its section of the
reports), `interpreter` (the reference ISA interpreter), `cost` (energy and cycles from the
target file), `docs` (its generated sections of docs/seneca.md).
"""
