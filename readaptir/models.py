"""Where model weights come from: a local folder or a hub id at a revision, and PEFT adapters."""

from __future__ import annotations

import json
import logging
from pathlib import Path

LOG = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"


def local_dir(source: str, revision: str | None = None) -> Path:
    """A local folder holding the model: ``source`` itself, or a hub snapshot at ``revision``."""
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise FileNotFoundError(f"model {source!r} is a file; expected a model folder")
        return path.resolve()
    if source.startswith((".", "/", "~")):
        raise FileNotFoundError(f"model folder {source!r} does not exist")
    from huggingface_hub import snapshot_download

    LOG.info("fetching %s@%s from the hub", source, revision or "main")
    return Path(snapshot_download(repo_id=source, revision=revision))


def is_peft_adapter(model_dir: Path) -> bool:
    return (Path(model_dir) / ADAPTER_CONFIG).is_file()


def peft_config(model_dir: Path) -> dict:
    return json.loads((Path(model_dir) / ADAPTER_CONFIG).read_text())


def torch_dtype(name: str | None):
    """Recipe dtype names → torch dtypes; ``auto``/None keeps the checkpoint's own."""
    import torch

    if name in (None, "auto"):
        return None
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in table:
        raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(table)} or auto")
    return table[name]


def load_encoder(model_dir: Path, base_dir: Path | None = None, dtype=None, device: str = "cpu"):
    """A bare transformer (AutoModel, no LM head) ready for encoding, and its tokenizer.

    ``model_dir`` is a full model or a PEFT LoRA adapter, which is merged onto ``base_dir``.
    """
    from transformers import AutoModel, AutoTokenizer

    model_dir = Path(model_dir)
    if is_peft_adapter(model_dir):
        if base_dir is None:
            raise ValueError(f"{model_dir} is a PEFT adapter; its base model is needed to load it")
        from peft import PeftModel

        model = AutoModel.from_pretrained(base_dir, dtype=dtype)
        model = PeftModel.from_pretrained(model, model_dir).merge_and_unload()
    else:
        model = AutoModel.from_pretrained(model_dir, dtype=dtype)
    tok_dir = model_dir if _has_tokenizer(model_dir) else base_dir
    if tok_dir is None:
        raise FileNotFoundError(f"no tokenizer files in {model_dir}")
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    return model.to(device).eval(), tokenizer


def _has_tokenizer(path: Path) -> bool:
    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.txt")
    return any((Path(path) / n).is_file() for n in names)
