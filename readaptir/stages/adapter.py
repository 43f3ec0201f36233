"""The knowledge adapter Ψ: a PEFT DoRA/LoRA adapter trained on the passages of a collection.

Decoder bases learn by next-token prediction, encoder bases by masked-LM (``training``). A passage
is title and text (EOS appended for decoders) truncated to ``max_length``; by default passages are
packed into rows of ``max_length`` tokens with attention kept inside each passage (``packing``),
``packing=False`` pads one per row. With ``checkpoint_dir`` a killed run resumes from its last
checkpoint and ends with the adapter an uninterrupted run makes (bit for bit on CPU), its tokens
read back from the same folder. Under
torchrun (WORLD_SIZE > 1) the ranks share each step's rows and the model is wrapped in DDP; the
steps are the same as in one process (``distributed``).

``gradient_checkpointing="auto"`` turns it on for training on a GPU: DoRA at 7B with packed
1024-token rows and PEFT's own DoRA forward runs out of memory without it on an 80 GB card; with
the forward of ``readaptir.dora`` it fits, but trained slower on an H100 in one run
(``bench/adapter.py``). A number checkpoints that share of the layers.
Writes the PEFT adapter and ``training_log.csv`` (step, epoch, loss, lr, cumulative real
tokens: a DVC plots file).
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np

from readaptir.artifacts import files_identity, read_json, write_json
from readaptir.checkpoints import (
    load_checkpoint,
    restore_checkpoint,
    save_checkpoint,
)
from readaptir.corpus import Passage, iter_passages, load_qrels, passage_text
from readaptir.distributed import (
    Ranks,
    join_group,
    launched_ranks,
    leave_distributed,
    mean_across_ranks,
    rank_device,
    rank_share,
    seed_rank,
    torch_seed,
    wrap_distributed,
)
from readaptir.encoding import log_filled
from readaptir.models import load_tokenizer, torch_dtype
from readaptir.objective import CAUSAL, load_model, objective_for
from readaptir.packing import (
    Layout,
    TokenStore,
    causal_inputs,
    check_packed_attention,
    layout,
    masked_inputs,
    plan_epoch,
    total_steps,
)
from readaptir.targets import check_stored_targets, linear_modules, resolve_targets, targets_for
from readaptir.training import (
    Meter,
    attach_adapter,
    autocast_dtype,
    check_passages_kept_apart,
    enable_gradient_checkpointing,
    position_limit,
    position_offset,
    train_step,
)

LOG = logging.getLogger(__name__)

TRAIN_TEMPLATE = "{title} {text}"
PASSAGE_SELECTIONS = ("all", "judged", "unjudged")
TOKENIZE_CHUNK = 10_000
# the training tokens in a work folder: the arrays, then the manifest saying what made them
TOKENS_IDS, TOKENS_OFFSETS, TOKENS_MANIFEST = "tokens-ids.npy", "tokens-offsets.npy", "tokens.json"
TOKENS_POLL_SECONDS = 1.0
TOKENS_WAIT_LOG_SECONDS = 300.0  # how often a waiting rank says it still waits


def passage_filter(
    selection: str, qrels: dict[str, dict[str, int]] | None
) -> Callable[[Passage], bool]:
    """Which passages train: all, or those with (``judged``) or without (``unjudged``) a positive
    judgment in ``qrels``."""
    if selection not in PASSAGE_SELECTIONS:
        raise ValueError(f"passages={selection!r}; expected one of {', '.join(PASSAGE_SELECTIONS)}")
    if selection == "all":
        return lambda p: True
    if qrels is None:
        raise ValueError(f"passages={selection!r} needs the judgments of the evaluated collection")
    judged = {doc for docs in qrels.values() for doc, grade in docs.items() if grade > 0}
    wanted = selection == "judged"
    return lambda p: (p.id in judged) == wanted


def _tokenize(tokenizer, texts: Iterable[str], max_length: int, append_eos: bool) -> TokenStore:
    eos = tokenizer.eos_token_id
    if append_eos and eos is None:
        raise ValueError(
            "the base model's tokenizer has no EOS token; passages cannot be delimited"
        )
    limit = max_length - 1 if append_eos else max_length

    def chunks():
        stream = iter(texts)
        while batch := list(itertools.islice(stream, TOKENIZE_CHUNK)):
            encoded = tokenizer(batch, add_special_tokens=True, truncation=True, max_length=limit)
            # one EOS closes each passage, also where the tokenizer adds one itself
            yield [
                ids + [eos] if append_eos and (not ids or ids[-1] != eos) else ids
                for ids in encoded["input_ids"]
            ]

    return TokenStore.from_chunks(chunks())


def _training_tokens(
    tokenizer,
    corpus_dir: Path,
    selection: str,
    qrels_dir: Path | None,
    qrels_split: str,
    max_length: int,
    objective: str,
) -> TokenStore:
    qrels = None
    if selection != "all":
        qrels = load_qrels(Path(qrels_dir or corpus_dir), qrels_split)
    keep = passage_filter(selection, qrels)
    # streamed: at MS MARCO scale only the token ids are held, never the passages' text
    selected = (passage_text(p, TRAIN_TEMPLATE) for p in iter_passages(corpus_dir) if keep(p))
    texts = (text for text in selected if text)  # stripped: a blank passage is empty
    tokens = _tokenize(tokenizer, texts, max_length, append_eos=objective == CAUSAL)
    if len(tokens) == 0:
        raise ValueError(
            f"{corpus_dir}: passages={selection!r} leaves no passage with text to train on"
        )
    log_filled(tokens.lengths, max_length, "passages")
    return tokens


def _shared_tokens(
    folder: Path | None, identity: dict, ranks: Ranks, make: Callable[[], TokenStore]
) -> TokenStore:
    """The training tokens, made once per work ``folder``: rank 0 tokenizes and saves them there
    (the manifest, ``identity``, last), the other ranks and a resumed run read them back, where
    each would tokenize the whole corpus again (tens of minutes at MS MARCO scale). The ranks
    wait by watching the manifest, not at a barrier, which would time out on a long corpus."""
    if folder is None:
        return make()
    folder = Path(folder)
    manifest = folder / TOKENS_MANIFEST
    identity = json.loads(json.dumps(identity))

    def saved() -> bool:
        try:
            return read_json(manifest) == identity
        except (OSError, ValueError):
            return False

    if ranks.main and not saved():
        manifest.unlink(missing_ok=True)
        make().save(folder / TOKENS_IDS, folder / TOKENS_OFFSETS)
        write_json(manifest, identity)
    started = last_said = time.monotonic()
    while not saved():
        time.sleep(TOKENS_POLL_SECONDS)
        now = time.monotonic()
        if now - last_said >= TOKENS_WAIT_LOG_SECONDS:
            # under a launcher that does not stop the other ranks when rank 0 dies, this is the
            # sign that it did
            LOG.info(
                "rank %d: waited %.0f s for rank 0 to write the training tokens (%s); if rank 0 "
                "has stopped, stop this run too",
                ranks.rank, now - started, manifest,
            )  # fmt: skip
            last_said = now
    return TokenStore.load(folder / TOKENS_IDS, folder / TOKENS_OFFSETS)


class TrainingDiverged(ValueError):
    """Not a RuntimeError, which a nearly full disk would have taken for a failed write."""


def _diverged(step: int, loss: float) -> str:
    """Why training stops at ``step``, whose loss is ``loss`` (inf or nan): its gradient, clipped
    or not, leaves the adapter's weights nan, and the steps left would not mend them."""
    return (
        f"step {step}: the training loss is {loss}; the adapter's weights are no longer finite, "
        "so no adapter is written. Lower adapter.lr or raise warmup_ratio, keep max_grad_norm, "
        "or train in float32 (base.dtype): a rerun with the same settings takes the same steps"
    )


# Arguments that do not change the numbers, or do so only through rows, steps and data (hashed).
_NOT_RESUME_RELEVANT = {
    "base_dir", "corpus_dir", "out", "device", "qrels_dir", "checkpoint_dir", "checkpoint_every",
    "on_step", "gradient_checkpointing", "batch_size", "batch_tokens", "max_steps",
}  # fmt: skip


def _fingerprint(
    args: dict, step_size: int | str, steps: int, tokens: TokenStore, base_dir: Path
) -> str:
    """What a checkpoint must have been made under to be resumed from (any number of ranks):
    the settings, the very token ids trained on (a corpus, selection or tokenizer changed since
    the kill is another run, whatever its counts; MS MARCO's ~2.9 GB of ids hash in ~2 s)
    and Θ's files (name, size, modification time: a rebuilt base is another run too)."""
    settings = dict(args, rows=step_size, steps=steps, base=files_identity(base_dir))
    data = hashlib.sha256()
    for array in (tokens.offsets, tokens.ids):
        data.update(memoryview(np.ascontiguousarray(array)).cast("B"))
    settings["data"] = data.hexdigest()
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


def _sort_config_lists(path: Path) -> None:
    """PEFT keeps ``target_modules`` as a set and writes it in the order of this process's string
    hashing: sorted, the file is the same bytes from run to run (DVC would take a retrained
    adapter for a changed one and rerun every stage after it)."""
    config = read_json(path)
    for key in ("target_modules", "exclude_modules", "modules_to_save"):
        if isinstance(config.get(key), list):
            config[key] = sorted(config[key])
    write_json(path, config)


def _write_log(path: Path, rows: list[tuple]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["step", "epoch", "loss", "lr", "tokens"])
        writer.writerows(rows)


def train_adapter(
    base_dir: Path,
    corpus_dir: Path,
    out: Path,
    *,
    method: str = "dora",
    r: int = 32,
    lora_alpha: float = 64,
    dropout: float = 0.05,
    target_modules: Sequence[str] | None = None,
    lr: float = 2e-4,
    weight_decay: float = 0.0,
    max_grad_norm: float | None = 1.0,
    batch_size: int = 4,
    epochs: float = 1,
    max_length: int = 1024,
    scheduler: str = "linear",
    warmup_ratio: float = 0.0,
    seed: int = 0,
    max_steps: int | None = None,
    dtype: str | None = None,
    device: str = "cpu",
    packing: bool = True,
    batch_tokens: int | None = None,
    gradient_checkpointing: bool | float | str = "auto",
    passages: str = "all",
    qrels_dir: Path | None = None,
    qrels_split: str = "test",
    checkpoint_dir: Path | None = None,
    checkpoint_every: int = 500,
    on_step: Callable[[int], None] | None = None,
) -> dict:
    """Train Ψ on the passages of ``corpus_dir`` and save it into ``out``; returns a summary.

    ``target_modules`` None takes the architecture's default; ``batch_tokens`` replaces
    ``batch_size``: packed, ``max(1, batch_tokens // max_length)`` rows a step; padded, as many
    passages as fit ``batch_tokens`` once padded to the step's longest; ``passages`` picks
    the passages judged (or not) in ``qrels_dir``'s ``qrels/<qrels_split>.tsv`` (``qrels_dir``
    defaults to ``corpus_dir``); ``max_grad_norm`` None does not clip; ``on_step(step)`` is
    called after every step. ``checkpoint_dir`` keeps its last checkpoint and the tokens after
    the run: the caller removes it once ``out`` is kept, so that a kill before then resumes.
    """
    args = dict(locals())
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoConfig, get_scheduler

    ranks = launched_ranks()
    device = rank_device(ranks, device)
    join_group(ranks, "nccl" if device.startswith("cuda") else "gloo")
    torch.manual_seed(seed)
    tokenizer = load_tokenizer(base_dir)
    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )
    config = AutoConfig.from_pretrained(base_dir)
    objective = objective_for(config)
    if objective != CAUSAL and tokenizer.mask_token_id is None:
        raise ValueError(f"{base_dir}: an encoder base needs a tokenizer with a mask token")
    targets = list(target_modules or targets_for(config))

    model = load_model(base_dir, objective, torch_dtype(dtype))
    # refused targets stop the stage before the corpus is tokenised (minutes at MS MARCO's size)
    resolve_targets(*linear_modules(model), targets, every=not target_modules)
    offset = position_offset(model)
    rows = model.get_input_embeddings().num_embeddings
    # random replacement tokens: a tokenizer may hold more tokens than the embedding has rows
    vocab_size = min(len(tokenizer), rows)
    limit = position_limit(model)
    if limit is not None and max_length > limit:
        LOG.warning(
            "max_length %d exceeds the model's %d positions; using %d", max_length, limit, limit
        )
        max_length = limit
    # a token budget: packed rows are max_length long; padded ones fill each step to the budget
    rows_per_step = max(1, batch_tokens // max_length) if batch_tokens else batch_size
    if packing:
        check_packed_attention(model.config._attn_implementation, rows_per_step)

    identity = {
        "files": files_identity(base_dir, corpus_dir, qrels_dir if passages != "all" else None),
        "passages": passages,
        "qrels_split": qrels_split,
        "max_length": max_length,
        "objective": objective,
    }
    tokens = _shared_tokens(
        checkpoint_dir,
        identity,
        ranks,
        lambda: _training_tokens(
            tokenizer, corpus_dir, passages, qrels_dir, qrels_split, max_length, objective
        ),
    )
    # a tokenizer may hold tokens past the embeddings (added after training) that training never
    # feeds the model; one it does feed would fail at the first step that meets it
    fed = {"the corpus token": int(tokens.ids.max()) if tokens.ids.size else 0, "padding": pad_id}
    if objective != CAUSAL:
        fed["the mask token"] = tokenizer.mask_token_id
    for what, token in fed.items():
        if token is not None and token >= rows:
            raise ValueError(
                f"{base_dir}: the tokenizer gives {what} id {token}, but the model's embeddings "
                f"have {rows} rows: they do not belong together"
            )
    padded_budget = batch_tokens if batch_tokens and not packing else None
    step_size = f"{padded_budget} tokens" if padded_budget else rows_per_step
    plans = [
        plan_epoch(
            tokens.lengths,
            seed=seed,
            epoch=e,
            max_length=max_length,
            rows_per_step=rows_per_step,
            packing=packing,
            batch_tokens=padded_budget,
        )
        for e in range(math.ceil(epochs))
    ]
    steps = total_steps(plans, epochs, max_steps)
    fewest = min(int(min(np.diff(plan.steps_at), default=0)) for plan in plans)
    if ranks.world > fewest:
        LOG.warning(
            "%d processes share steps of as few as %d rows: the others get no row and only wait "
            "(a larger batch would use them, and makes another adapter)",
            ranks.world, fewest,
        )  # fmt: skip
    LOG.info(
        "training %s adapter (%s objective) on %d passages, %d tokens: %d steps of %s, %s rows",
        method, objective, len(tokens), int(tokens.lengths.sum()), steps, step_size,
        "packed" if packing else "padded",
    )  # fmt: skip

    if gradient_checkpointing == "auto":
        supported = getattr(model, "supports_gradient_checkpointing", False)
        gradient_checkpointing = device.startswith("cuda") and supported
    if gradient_checkpointing:  # True: every layer; a number: that share of them
        enable_gradient_checkpointing(model, share=float(gradient_checkpointing))
    model = attach_adapter(
        model,
        objective=objective,
        method=method,
        r=r,
        lora_alpha=lora_alpha,
        dropout=dropout,
        target_modules=targets,
        default_targets=not target_modules,
    ).to(device)
    check_stored_targets(model, base_dir)
    seed_rank(seed, ranks)
    model.train()
    autocast = autocast_dtype(model)
    mask_dtype = autocast or torch.float32
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=weight_decay)
    schedule = get_scheduler(
        scheduler,
        optimizer,
        num_warmup_steps=int(warmup_ratio * steps),
        num_training_steps=steps,
    )

    fingerprint = _fingerprint(
        {k: v for k, v in args.items() if k not in _NOT_RESUME_RELEVANT},
        step_size, steps, tokens, base_dir,
    )  # fmt: skip
    progress = {"step": 0, "epoch": 0, "epoch_step": 0, "tokens": 0, "log": []}
    state = (
        load_checkpoint(checkpoint_dir, fingerprint, ranks.rank, ranks.world)
        if checkpoint_dir
        else None
    )
    if state is not None:
        progress = restore_checkpoint(state, model, optimizer, schedule)
        LOG.info("resuming from step %d of %d (%s)", progress["step"], steps, checkpoint_dir)
    resumed_from = progress["step"]
    step, epoch, epoch_step = progress["step"], progress["epoch"], progress["epoch_step"]
    seen, log_rows = progress["tokens"], [tuple(row) for row in progress["log"]]

    def make_inputs(lay: Layout, step: int) -> dict:
        if objective == CAUSAL:
            return causal_inputs(lay, packing)
        # masking drawn over the whole step from (seed, step) alone: a resumed run, or one on any
        # number of ranks, masks the same tokens
        generator = torch.Generator().manual_seed(torch_seed((seed * 1_000_003 + step) * 1_009))
        return masked_inputs(
            lay,
            packing,
            special_ids=tokenizer.all_special_ids,
            mask_id=tokenizer.mask_token_id,
            vocab_size=vocab_size,
            generator=generator,
            position_offset=offset,
            dtype=mask_dtype,
        )

    if packing:  # before the first step: a model that cannot keep packed passages apart fails
        check_passages_kept_apart(
            model,
            lambda lay: make_inputs(lay, 0),
            vocab_size=vocab_size,
            pad_id=pad_id,
            device=device,
            autocast=autocast,
        )
    engine = wrap_distributed(model, ranks)
    meter = Meter(steps, step)
    log_every = max(1, steps // 20)
    bar = tqdm(total=steps, initial=step, desc="adapter", unit="step", disable=not ranks.main)
    while step < steps and epoch < len(plans):
        plan = plans[epoch]
        if epoch_step >= plan.steps:
            epoch, epoch_step = epoch + 1, 0
            continue
        lay = layout([[tokens[i] for i in row] for row in plan.step_rows(epoch_step)], pad_id)
        share, scale = rank_share(lay, make_inputs(lay, step), ranks)
        loss = train_step(
            engine,
            share,
            optimizer,
            schedule,
            device,
            loss_scale=scale,
            autocast=autocast,
            max_grad_norm=max_grad_norm,
        )
        loss = mean_across_ranks(loss * scale, ranks, device)  # the step's loss over all its rows
        if not math.isfinite(loss):  # every rank sees the mean, so all stop here alike
            raise TrainingDiverged(_diverged(step + 1, loss))
        step, epoch_step = step + 1, epoch_step + 1
        real = lay.real_tokens
        seen += real
        meter.add(real)
        log_rows.append((step, epoch, loss, schedule.get_last_lr()[0], seen))
        bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{meter.rate():.0f}")
        bar.update()
        if meter.due() or step % log_every == 0 or step == steps:
            LOG.info(
                "step %d/%d epoch %d loss %.4f %.0f tokens/s, %.0f s left",
                step, steps, epoch, loss, meter.rate(), meter.eta(step),
            )  # fmt: skip
        if checkpoint_dir and step % checkpoint_every == 0 and step < steps:
            progress = dict(step=step, epoch=epoch, epoch_step=epoch_step, tokens=seen,
                            log=log_rows, fingerprint=fingerprint)  # fmt: skip
            save_checkpoint(
                checkpoint_dir, model, optimizer, schedule, progress, ranks.rank, ranks.world
            )
        if on_step is not None:
            on_step(step)
    bar.close()

    summary = {
        "steps": step,
        "passages": len(tokens),
        "tokens": seen,
        "seconds": round(meter.elapsed(), 3),
        "tokens_per_second": round(meter.rate(), 1),
        "final_loss": log_rows[-1][2] if log_rows else None,
        "objective": objective,
        "packing": packing,
        "resumed_from": resumed_from,
    }
    if ranks.main:
        model.save_pretrained(out)
        _sort_config_lists(Path(out) / "adapter_config.json")
        _write_log(Path(out) / "training_log.csv", log_rows)
        LOG.info("adapter trained: %s", summary)
    del engine  # DDP's reducer goes before its process group, or freeing it later hangs
    leave_distributed(ranks)
    return summary
