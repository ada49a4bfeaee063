"""The seneca backend (in progress): code generation for SENECA-style cores and their simulator.

Done so far: the reference interpreter of the ISA (`interpreter`), the event handler of a
linear tile (`codegen.linear_handler`) and its vectorised execution with the interpreter's
exact instruction counts (`linear.run_tile`), energy by category and cycles from the target
file (`cost`). Not yet: dense handlers for the other ops, the whole-model simulator with NoC transport,
the `sparsecc simulate` command and the entry-point registration.
"""
