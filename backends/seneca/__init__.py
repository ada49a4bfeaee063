"""The seneca backend: code generation for SENECA-style event-driven cores and their simulator.

`backend` (lowering to per-core programs, `simulate`), `simulator` (the whole model on the
mesh), `codegen` + `linear` (linear-tile event handlers), `dense` (every other op),
`interpreter` (the reference ISA interpreter the handlers are tested on), `cost` (energy and
cycles from the target file).
"""
