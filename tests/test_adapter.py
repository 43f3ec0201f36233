import csv

import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from readaptir.stages.adapter import train_adapter

SMALL = dict(r=4, lora_alpha=8, batch_size=4, max_length=32, lr=1e-3, epochs=2)


def test_dora_adapter_trains_logs_and_loads(tmp_path, tiny_base, tiny_beir):
    out = tmp_path / "adapter"
    out.mkdir()
    summary = train_adapter(tiny_base, tiny_beir, out, **SMALL)
    assert summary["steps"] == 6  # 12 passages / batch 4 × 2 epochs
    rows = list(csv.DictReader((out / "training_log.csv").open()))
    assert [int(r["step"]) for r in rows] == list(range(1, 7))
    assert all(float(r["loss"]) > 0 for r in rows)
    tensors = load_file(out / "adapter_model.safetensors")
    assert any("lora_magnitude_vector" in k for k in tensors)
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in tensors.items())
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), out)
    assert model.peft_config["default"].use_dora


def test_same_seed_same_adapter_and_lora_option(tmp_path, tiny_base, tiny_beir):
    outs = []
    for i, method in enumerate(("lora", "lora", "dora")):
        out = tmp_path / f"a{i}"
        out.mkdir()
        train_adapter(tiny_base, tiny_beir, out, method=method, max_steps=2, **SMALL)
        outs.append(load_file(out / "adapter_model.safetensors"))
    assert outs[0].keys() == outs[1].keys()
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])
    assert not any("magnitude" in k for k in outs[0]) and any("magnitude" in k for k in outs[2])
