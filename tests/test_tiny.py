import torch
from safetensors.torch import load_file
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer


def test_tiny_models_load_with_auto_classes(tiny_base, tiny_retriever):
    head = AutoModelForCausalLM.from_pretrained(tiny_base).lm_head.weight
    assert torch.equal(head, load_file(tiny_base / "model.safetensors")["lm_head.weight"])
    model = AutoModel.from_pretrained(tiny_retriever)
    assert type(model).__name__ == "LlamaModel"
    tok = AutoTokenizer.from_pretrained(tiny_retriever)
    ids = tok("cell gene river")["input_ids"]
    assert ids[0] == tok.bos_token_id and tok.unk_token_id not in ids
