from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer


def test_tiny_models_load_with_auto_classes(tiny_base, tiny_retriever):
    assert AutoModelForCausalLM.from_pretrained(tiny_base).lm_head is not None
    model = AutoModel.from_pretrained(tiny_retriever)
    assert type(model).__name__ == "LlamaModel"
    tok = AutoTokenizer.from_pretrained(tiny_retriever)
    ids = tok("cell gene river")["input_ids"]
    assert ids[0] == tok.bos_token_id and tok.unk_token_id not in ids
