"""Tiny models made on the spot: a tokenizer trained in seconds and random-init Llama/BERT models.

Used by the offline demo and by the tests; nothing here downloads anything.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

SPECIAL = {"bos": "<s>", "eos": "</s>", "pad": "<pad>", "unk": "<unk>", "mask": "<mask>"}


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512):
    """A byte-level BPE tokenizer fitted to ``texts``, with BOS/EOS/PAD/UNK/MASK tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=SPECIAL["unk"]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos = SPECIAL["bos"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tok.token_to_id(bos))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=SPECIAL["bos"],
        eos_token=SPECIAL["eos"],
        pad_token=SPECIAL["pad"],
        unk_token=SPECIAL["unk"],
        mask_token=SPECIAL["mask"],
        padding_side="right",
    )


def llama_config(tokenizer, hidden: int = 64, layers: int = 2, heads: int = 4, **overrides):
    from transformers import LlamaConfig

    settings = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    return LlamaConfig(**{**settings, **overrides})


def make_llama(out: Path, tokenizer, seed: int = 0, causal_lm: bool = True, **config) -> Path:
    """Save a random-init Llama (with LM head when ``causal_lm``) and its tokenizer to ``out``."""
    import torch
    from transformers import LlamaForCausalLM, LlamaModel

    torch.manual_seed(seed)
    cls = LlamaForCausalLM if causal_lm else LlamaModel
    model = cls(llama_config(tokenizer, **config))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return Path(out)


def make_bert(
    out: Path, tokenizer, seed: int = 0, masked_lm: bool = False, hidden: int = 64
) -> Path:
    """Save a random-init BERT (with MLM head when ``masked_lm``) and its tokenizer to ``out``."""
    import torch
    from transformers import BertConfig, BertForMaskedLM, BertModel

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = (BertForMaskedLM if masked_lm else BertModel)(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return Path(out)
