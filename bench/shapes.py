"""What the benchmarks share: the Llama shape options and the config they describe, the
process's peak resident set, and timing work queued on a device.

Each benchmark is run as a script (``python bench/NAME.py``), so this module is imported from the
script's own folder.
"""

from __future__ import annotations

import argparse
import resource
import time
from collections.abc import Callable
from pathlib import Path

import torch

LLAMA_2_7B = {"hidden": 4096, "layers": 32, "heads": 32, "intermediate": 11008, "vocab": 32000}


def add_shape_options(ap: argparse.ArgumentParser, defaults: dict = LLAMA_2_7B) -> None:
    """--tiny, --hidden, --layers, --heads, --kv-heads, --intermediate, --vocab."""
    ap.add_argument("--tiny", action="store_true", help="a tiny shape for a smoke run (CPU)")
    for key in ("hidden", "layers", "heads", "intermediate", "vocab"):
        ap.add_argument(f"--{key}", type=int, default=defaults[key])
    ap.add_argument("--kv-heads", type=int, default=None, help="default: --heads")


def use_tiny(ap: argparse.ArgumentParser, args: argparse.Namespace, tiny: dict) -> None:
    """With --tiny, the tiny values replace the options left at their defaults."""
    if args.tiny:
        for key, value in tiny.items():
            if getattr(args, key) == ap.get_default(key):
                setattr(args, key, value)


def apply_tiny(ap: argparse.ArgumentParser, args: argparse.Namespace, tiny: dict) -> None:
    """``use_tiny`` for the shape options, then --kv-heads defaulting to --heads."""
    use_tiny(ap, args, tiny)
    args.kv_heads = args.kv_heads or args.heads


def llama_config(args: argparse.Namespace, **extra):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        **extra,
    )


def peak_rss_bytes() -> int:
    """This process's peak resident set: VmHWM, which (unlike ru_maxrss) does not carry the
    parent's peak across fork and exec, and which writing "5" to /proc/self/clear_refs resets."""
    hwm = _vm_hwm()
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_rss_source() -> str:
    """Where ``peak_rss_bytes`` reads from on this system, for a report to say."""
    if _vm_hwm() is not None:
        return "VmHWM"
    return "ru_maxrss: no VmHWM here, so a child's figure may be its parent's peak"


def _vm_hwm() -> int | None:
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return None


def sync(device: str | torch.device) -> None:
    """Wait for the work queued on ``device`` (nothing to wait for on a CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def best_of(repeat: int, device: str | torch.device, fn: Callable, warmup: int = 0):
    """(The fastest of ``repeat`` timed calls of ``fn``, after ``warmup`` untimed ones, each
    waited for on ``device``; the last call's result.)"""
    seconds, out = float("inf"), None
    for i in range(warmup + repeat):
        sync(device)
        started = time.perf_counter()
        out = fn()
        sync(device)
        if i >= warmup:
            seconds = min(seconds, time.perf_counter() - started)
    return seconds, out
