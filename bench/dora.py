"""One layer's DoRA projections, forward and backward: PEFT's forward vs readaptir's.

The five DoRA targets of a Llama layer (q/k/v: hidden → hidden, up: hidden → intermediate,
down: intermediate → hidden) as bf16 Linears with float32 DoRA r32 adapters and dropout 0.05,
computing under bf16 autocast as the adapter stage trains them. Each is run forward and backward on
a batch of random activations, in the same run, best of --repeat each:

- PEFT: PEFT's DoRA forward;
- norm: PEFT's layer forward, the DoRA row norm in low-rank form (``LowRankNormDora``);
- ours: the low-rank norm and the layer's output in fewer passes (``LowRankDoraLinear``), as the
  adapter stage trains.

The same modules throughout, only their classes switched.

    python bench/dora.py                      # Llama-2-7B shape; GPU if there is one
    python bench/dora.py --tiny               # a smoke run
    python bench/dora.py --tokens 640 4096    # tokens per step (4 × ~160 padded; 4 × 1024)
"""

from __future__ import annotations

import argparse

import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora.dora import DoraLinearLayer
from peft.tuners.lora.layer import Linear as LoraLinear
from shapes import add_shape_options, apply_tiny, best_of

from readaptir.dora import LowRankDoraLinear, LowRankNormDora, use_fast_dora

TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]


class Projections(torch.nn.Module):
    """A Llama layer's DoRA targets, each applied to its own input."""

    def __init__(self, hidden: int, kv: int, intermediate: int):
        super().__init__()
        shapes = {
            "q_proj": (hidden, hidden),
            "k_proj": (hidden, kv),
            "v_proj": (hidden, kv),
            "up_proj": (hidden, intermediate),
            "down_proj": (intermediate, hidden),
        }
        for name, (fan_in, fan_out) in shapes.items():
            setattr(self, name, torch.nn.Linear(fan_in, fan_out, bias=False))

    def forward(self, hidden: torch.Tensor, wide: torch.Tensor) -> torch.Tensor:
        total = sum(getattr(self, n)(hidden).float().sum() for n in TARGETS[:-2])
        return total + self.up_proj(hidden).float().sum() + self.down_proj(wide).float().sum()


FORWARDS = {  # a DoRA layer's class, its magnitude's class
    "PEFT": (LoraLinear, DoraLinearLayer),
    "norm": (LoraLinear, LowRankNormDora),
    "ours": (LowRankDoraLinear, LowRankNormDora),
}


def set_forward(model: torch.nn.Module, forward: str) -> None:
    layer, magnitude = FORWARDS[forward]
    for module in model.modules():
        if isinstance(module, DoraLinearLayer):
            module.__class__ = magnitude
        elif isinstance(module, LoraLinear):
            module.__class__ = layer


def seconds(model, hidden, wide, device: torch.device, repeat: int) -> float:
    def step() -> None:
        model.zero_grad(set_to_none=True)
        hidden.grad = wide.grad = None
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(hidden, wide)
        loss.backward()

    return best_of(repeat, device, step, warmup=1)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_shape_options(parser)
    parser.add_argument("--tokens", type=int, nargs="+", default=[640, 4096])
    parser.add_argument("--r", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    apply_tiny(parser, args, dict(hidden=256, heads=4, intermediate=688))
    device = torch.device(args.device)
    kv = args.hidden * args.kv_heads // args.heads
    torch.manual_seed(0)
    base = Projections(args.hidden, kv, args.intermediate).to(device, torch.bfloat16)
    config = LoraConfig(r=args.r, lora_alpha=2 * args.r, lora_dropout=0.05,
                        target_modules=TARGETS, use_dora=True)  # fmt: skip
    model = get_peft_model(base, config, autocast_adapter_dtype=True)
    model.train()
    assert use_fast_dora(model) == len(TARGETS)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device {device} ({name}), torch {torch.__version__}")
    print(f"one layer's DoRA targets, hidden {args.hidden}, intermediate {args.intermediate}, "
          f"r {args.r}, bf16 base, float32 adapters, bf16 autocast")  # fmt: skip
    for tokens in args.tokens:
        # inputs that need gradients, as every layer's but the first does: the backward pass then
        # computes them too, the same work under either forward
        hidden = torch.randn(tokens, args.hidden, device=device, requires_grad=True)
        wide = torch.randn(tokens, args.intermediate, device=device, requires_grad=True)
        ms = {}
        for forward in FORWARDS:
            set_forward(model, forward)
            ms[forward] = seconds(model, hidden, wide, device, args.repeat) * 1e3
        figures = ", ".join(f"{forward} {ms[forward]:8.1f} ms" for forward in FORWARDS)
        print(f"{tokens:>6} tokens: {figures}; PEFT/ours {ms['PEFT'] / ms['ours']:.2f}×, "
              f"norm/ours {ms['norm'] / ms['ours']:.2f}×")  # fmt: skip


if __name__ == "__main__":
    main()
