"""The seneca backend (in progress): code generation for SENECA-style cores and their simulator.

Done so far: the reference interpreter of the ISA (`interpreter`) and the event handler of a
linear tile (`codegen.linear_handler`). Not yet: dense handlers for the other ops, the
whole-model simulator with NoC transport, the `sparsecc simulate` command and the
entry-point registration.
"""
