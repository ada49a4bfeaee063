"""Where the PyTorch-based work (distill, self-sampled data, finetune-bands) runs: `auto`
takes a CUDA GPU when PyTorch sees one, else the CPU. Asking for CUDA where there is none,
and running out of GPU memory, end in one line saying what to do."""
from __future__ import annotations

import contextlib
import re

from sparsecc.errors import SparseccError

CHOICES = ("auto", "cpu", "cuda")


def import_torch(what: str):
    try:
        import torch
    except ImportError:
        raise SparseccError(f"{what} needs PyTorch, which is not installed: "
                            "pip install -c constraints.txt -e '.[export]' (torch==2.13.0, the CPU build)") from None
    return torch


def resolve(name: str, what: str = "this pass"):
    """The torch.device for `name`: auto, cpu, cuda or cuda:N."""
    torch = import_torch(what)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if not re.fullmatch(r"cuda(:\d+)?", name or ""):
        raise SparseccError(f"unknown device {name!r}; choose auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        build = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise SparseccError(f"device {name} asked for, but PyTorch ({torch.__version__}, {build}) sees no CUDA GPU; "
                            "use --device cpu (or auto)")
    index = int(name.split(":")[1]) if ":" in name else 0
    if index >= torch.cuda.device_count():
        raise SparseccError(f"device {name} asked for, but PyTorch sees {torch.cuda.device_count()} CUDA GPU(s); "
                            "pick one of them, or --device cuda")
    return torch.device(name)


@contextlib.contextmanager
def gpu_memory(what: str, fix: str):
    """Turn a CUDA out-of-memory error into one line naming `what` ran out and the `fix`."""
    torch = import_torch(what)
    try:
        yield
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        raise SparseccError(f"{what} ran out of GPU memory; {fix}") from None


def autocast(device, bf16: bool):
    """bf16 autocast on `device` when asked, else nothing."""
    torch = import_torch("autocast")
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
