"""The knowledge adapter Ψ: a PEFT DoRA/LoRA adapter trained by next-token prediction on passages.

One passage per sequence (title and text, EOS appended, truncated to ``max_length``), shuffled with
the seed, padded per batch; padding is masked out of the loss. Saves the PEFT adapter (the folder is
loadable by ``PeftModel.from_pretrained``) and ``training_log.csv`` with the loss of every step.
"""

from __future__ import annotations

import csv
import logging
import math
import random
import time
from pathlib import Path

from readaptir.corpus import load_corpus, passage_text
from readaptir.models import torch_dtype

LOG = logging.getLogger(__name__)

TRAIN_TEMPLATE = "{title} {text}"


def _tokenize(tokenizer, texts: list[str], max_length: int) -> list[list[int]]:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError(
            "the base model's tokenizer has no EOS token; passages cannot be delimited"
        )
    encoded = tokenizer(texts, add_special_tokens=True, truncation=True, max_length=max_length - 1)
    return [ids + [eos] for ids in encoded["input_ids"]]


def _batches(sequences: list[list[int]], batch_size: int, seed: int, epoch: int):
    order = list(range(len(sequences)))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    for start in range(0, len(order), batch_size):
        yield [sequences[i] for i in order[start : start + batch_size]]


def _collate(batch: list[list[int]], pad_id: int):
    import torch

    width = max(len(s) for s in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(batch), width), dtype=torch.long)
    for row, seq in enumerate(batch):
        input_ids[row, : len(seq)] = torch.tensor(seq)
        attention[row, : len(seq)] = 1
    labels = input_ids.masked_fill(attention == 0, -100)
    return input_ids, attention, labels


def train_adapter(
    base_dir: Path,
    corpus_dir: Path,
    out: Path,
    *,
    method: str = "dora",
    r: int = 32,
    lora_alpha: float = 64,
    dropout: float = 0.05,
    target_modules: list[str] | tuple[str, ...] = (
        "q_proj",
        "k_proj",
        "v_proj",
        "up_proj",
        "down_proj",
    ),
    lr: float = 2e-4,
    batch_size: int = 4,
    epochs: float = 1,
    max_length: int = 1024,
    scheduler: str = "linear",
    warmup_ratio: float = 0.0,
    seed: int = 0,
    max_steps: int | None = None,
    dtype: str | None = None,
    device: str = "cpu",
) -> dict:
    """Train Ψ on the passages of ``corpus_dir`` and save it into ``out``; returns a summary."""
    import torch
    from peft import LoraConfig, get_peft_model
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer, get_scheduler

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )
    passages = [p for p in load_corpus(corpus_dir) if (p.title or p.text).strip()]
    texts = [passage_text(p, TRAIN_TEMPLATE) for p in passages]
    sequences = _tokenize(tokenizer, texts, max_length)
    steps_per_epoch = math.ceil(len(sequences) / batch_size)
    total_steps = math.ceil(steps_per_epoch * epochs)
    if max_steps is not None:
        total_steps = min(total_steps, max_steps)
    LOG.info("training %s adapter on %d passages: %d steps", method, len(sequences), total_steps)

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch_dtype(dtype))
    lora = LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        lora_dropout=dropout,
        target_modules=list(target_modules),
        use_dora=method == "dora",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora).to(device)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr)
    schedule = get_scheduler(
        scheduler,
        optimizer,
        num_warmup_steps=int(warmup_ratio * total_steps),
        num_training_steps=total_steps,
    )

    log_rows, step, tokens, started = [], 0, 0, time.perf_counter()
    progress = tqdm(total=total_steps, desc="adapter", unit="step")
    epoch = 0
    while step < total_steps:
        for batch in _batches(sequences, batch_size, seed, epoch):
            if step >= total_steps:
                break
            input_ids, attention, labels = (t.to(device) for t in _collate(batch, pad_id))
            loss = model(input_ids=input_ids, attention_mask=attention, labels=labels).loss
            loss.backward()
            loss_value = loss.item()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens += int(attention.sum())
            log_rows.append((step, epoch, loss_value, schedule.get_last_lr()[0], tokens))
            progress.set_postfix(loss=f"{loss_value:.3f}")
            progress.update()
        epoch += 1
    progress.close()
    elapsed = time.perf_counter() - started

    model.save_pretrained(out)
    with (Path(out) / "training_log.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["step", "epoch", "loss", "lr", "tokens"])
        writer.writerows(log_rows)
    summary = {
        "steps": step,
        "passages": len(sequences),
        "tokens": tokens,
        "seconds": round(elapsed, 3),
        "final_loss": log_rows[-1][2] if log_rows else None,
    }
    LOG.info("adapter trained: %s", summary)
    return summary
