"""The `sparsecc` command (also `python -m sparsecc`): signal handling first, then the CLI,
whose imports (numpy, onnx, ONNX Runtime) take a while; a Ctrl-C during them ends in one line."""
from __future__ import annotations

import sys

from sparsecc import signals


def main() -> int:
    signals.install()
    try:
        with signals.as_interrupt():
            from sparsecc.cli import main as cli_main
    except KeyboardInterrupt:
        print("sparsecc: interrupted while starting; no output written", file=sys.stderr)
        return signals.exit_code()
    return cli_main()


if __name__ == "__main__":
    sys.exit(main())
