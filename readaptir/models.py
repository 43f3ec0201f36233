"""Where model weights come from: a local folder or a hub id at a revision, and PEFT adapters."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from pathlib import Path

from readaptir.artifacts import INDEX, SINGLE, expand_home, read_json_mapping

LOG = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
# PEFT initialisations that rewrite the base layer's weight (W − its start, or a quantised W)
BASE_CHANGING_INITS = ("pissa", "corda", "olora", "loftq", "lora_ga")


# Other copies of the weights a repository's safetensors hold, in formats never read here: a 7B
# model's repository often holds a second full copy as PyTorch pickles (Llama-2, Mistral-7B-v0.1)
# and a third in its authors' own layout (Mistral's consolidated.safetensors, Llama 3's original/).
OTHER_WEIGHTS = (
    "pytorch_model*.bin", "*.pt", "*.pth", "*.ckpt", "consolidated*", "original/*",
    "tf_model*", "*.h5", "flax_model*", "*.msgpack", "*.onnx", "*.onnx_data", "onnx/*",
    "openvino/*", "*.gguf", "*.ot", "*.tflite", "coreml/*",
)  # fmt: skip
# the safetensors weights transformers and PEFT load: where a repository has them, nothing else
_LOADED_WEIGHTS = re.compile(r"(model|adapter_model)(-\d+-of-\d+)?\.safetensors")


def skipped_files(files: list[str]) -> list[str]:
    """The patterns of a repository's files not to fetch: ``OTHER_WEIGHTS`` where it has the
    safetensors weights transformers loads, else none (a model published as pickles alone still
    encodes, through transformers)."""
    return list(OTHER_WEIGHTS) if any(_LOADED_WEIGHTS.fullmatch(f) for f in files) else []


def local_dir(
    source: str, revision: str | None = None, check: Callable[[str], None] | None = None
) -> Path:
    """A local folder holding the model: ``source`` itself, or a hub snapshot at ``revision``
    (without ``skipped_files``). Where the hub answers, the commit ``revision`` names now is
    passed to ``check`` before anything is downloaded. The snapshot is fetched by ``revision``, not
    by that commit, so that the cache records the branch (``refs/main``) for runs offline."""
    path = expand_home(source)
    if path.exists():
        if not path.is_dir():
            raise FileNotFoundError(f"model {source!r} is a file; expected a model folder")
        return path.resolve()
    if source.startswith((".", "/", "~")):
        raise FileNotFoundError(f"model folder {source!r} does not exist")
    from huggingface_hub import HfApi, constants, snapshot_download

    where = "the local hub cache (offline)" if constants.HF_HUB_OFFLINE else "the hub"
    LOG.info("fetching %s@%s from %s", source, revision or "main", where)
    try:
        info = HfApi().model_info(source, revision=revision)
    except Exception as err:  # offline, or the hub refused: the snapshot call says why
        LOG.debug("asking the hub of %s: %s", source, err)
        info = None
    skipped = skipped_files([f.rfilename for f in info.siblings or []]) if info else []
    if info is not None and info.sha and check is not None:
        check(info.sha)
    if skipped:
        LOG.info("%s: not fetching other formats of its safetensors weights", source)
    try:
        folder = snapshot_download(
            repo_id=source, revision=revision, ignore_patterns=skipped or None
        )
    except Exception as err:  # the hub's errors name no model when the network fails
        raise OSError(f"fetching {source}@{revision or 'main'} from {where}: {err}") from err
    LOG.info("%s: commit %s", source, Path(folder).name)  # snapshots/<sha>
    return Path(folder)


def is_peft_adapter(model_dir: Path) -> bool:
    return (Path(model_dir) / ADAPTER_CONFIG).is_file()


def peft_config(model_dir: Path) -> dict:
    return read_json_mapping(Path(model_dir) / ADAPTER_CONFIG)


def check_mergeable_adapter(config: dict, adapter_dir: Path) -> None:
    """A PEFT adapter's config that the merge can apply tensor by tensor: LoRA or DoRA, on Linear
    (not Conv1D) layers, for every token, over the base's own weights; else an error naming the
    folder and why."""
    if config.get("peft_type") != "LORA":
        raise ValueError(
            f"{adapter_dir}: only LoRA/DoRA adapters are supported "
            f"(its adapter_config.json has peft_type {config.get('peft_type')!r})"
        )
    if config.get("fan_in_fan_out"):
        raise ValueError(f"{adapter_dir}: fan_in_fan_out (Conv1D) adapters are not supported")
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(BASE_CHANGING_INITS):
        raise ValueError(
            f"{adapter_dir}: its {ADAPTER_CONFIG} has init_lora_weights {init!r}, which "
            "replaces the base's weights before training (by a residual or a quantised copy), "
            "so the adapter holds only on those, not on the base the merge reads; convert it "
            "to a plain LoRA adapter first (PEFT: save_pretrained(..., "
            "path_initial_model_for_weight_conversion=<the adapter saved before training>))"
        )
    if config.get("alora_invocation_tokens"):
        raise ValueError(
            f"{adapter_dir}: an aLoRA adapter (alora_invocation_tokens) changes only tokens "
            "after its invocation, which no merged weight can do; PEFT refuses to merge it too"
        )


def warn_if_other_base(
    retriever_dir: Path, base: dict, where: str, retriever: str | None = None
) -> None:
    """Warn when a PEFT retriever says it was trained on another hub model than the recipe's
    ``base`` (its identity: a hub id, or a local folder, which is not compared); ``retriever``
    names it (a hub id) where its folder is a snapshot of the hub's cache.

    Θ + Ψ_R is only the retriever on the model it was trained from; another one of the same
    shapes (a chat variant, another size's sibling) would pass every check and give a retriever
    that is not the published one. A mirror of the same weights is fine, hence a warning.
    """
    if "fingerprint" in base or not is_peft_adapter(retriever_dir):
        return
    named = peft_config(retriever_dir).get("base_model_name_or_path")
    if isinstance(named, str) and named and named.lower() != base["source"].lower():
        LOG.warning(
            "%s: the retriever %s is a PEFT adapter trained on %r, but the base is %r: "
            "Θ must be the model the retriever was trained from (ignore this if %r holds the "
            "same weights)",
            where,
            retriever or retriever_dir,
            named,
            base["source"],
            base["source"],
        )


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
    Every tensor the model needs must come from the checkpoint (transformers would initialise a
    missing one at random and say so only in a log), and a PEFT adapter must be applied whole,
    tensor for tensor as its file holds them and the merge stage reads them.
    """
    from readaptir.weights import base_model_prefix

    model_dir = Path(model_dir)
    adapter = is_peft_adapter(model_dir)
    if adapter and base_dir is None:
        raise ValueError(f"{model_dir} is a PEFT adapter; its base model is needed to load it")
    weights_dir = Path(base_dir) if adapter else model_dir
    tok_dir = model_dir if has_tokenizer(model_dir) or base_dir is None else Path(base_dir)
    tokenizer = load_tokenizer(tok_dir)
    rows = read_json_mapping(weights_dir / "config.json").get("vocab_size")
    _check_vocabulary(tokenizer, rows, tok_dir)  # before minutes of loading a 7B model
    if adapter:
        stored = _adapter_keys(model_dir)
        # an adapter trained over the causal-LM wrapper names its tensors under the body's prefix
        wrapped = any(k.startswith(f"{PEFT_LEAD}{base_model_prefix(weights_dir)}.") for k in stored)
        model = _with_adapter(_bare_model(weights_dir, dtype, wrapped), model_dir, stored)
        model = model.merge_and_unload()
        model = getattr(model, model.base_model_prefix) if wrapped else model
    else:
        model = _bare_model(model_dir, dtype)
    _check_vocabulary(tokenizer, model.get_input_embeddings().num_embeddings, tok_dir)
    return model.to(device).eval(), tokenizer


def load_tokenizer(folder: Path):
    """The folder's tokenizer; none there, or one that does not load, is an error naming it."""
    from transformers import AutoTokenizer

    if not has_tokenizer(folder):
        raise FileNotFoundError(f"no tokenizer files in {folder}")
    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as err:
        raise ValueError(f"{folder}: the tokenizer does not load ({err})") from None


def _check_vocabulary(tokenizer, rows: int | None, tok_dir: Path) -> None:
    """A tokenizer with more tokens than the embeddings have rows is an error naming its folder
    (else the first text holding such a token fails deep in the model, with no file named)."""
    if isinstance(rows, int) and len(tokenizer) > rows:
        raise ValueError(
            f"{tok_dir}: the tokenizer has {len(tokenizer)} tokens, the model's embeddings "
            f"{rows} rows: they do not belong together"
        )


def check_weight_files(folder: Path) -> None:
    """Every safetensors header of a model folder checked, so that a corrupt, cut-short or
    git-lfs pointer file is named before transformers reads it (its own error names no file)."""
    from readaptir.shards import Checkpoint

    if (Path(folder) / SINGLE).is_file() or (Path(folder) / INDEX).is_file():
        Checkpoint(folder)


def _bare_model(folder: Path, dtype, causal_lm: bool = False):
    """AutoModel (or, to take an adapter trained over it, AutoModelForCausalLM) from ``folder``,
    its weight files checked first and its load report read."""
    from transformers import AutoModel, AutoModelForCausalLM

    from readaptir.weights import HEADS, is_buffer, lm_head_names

    check_weight_files(folder)
    cls = AutoModelForCausalLM if causal_lm else AutoModel
    model, info = cls.from_pretrained(folder, dtype=dtype, output_loading_info=True)
    # the pooler is not used by any pooling here; buffers are rebuilt; LM heads belong elsewhere
    missing = [n for n in info.get("missing_keys") or () if not is_buffer(n)]
    missing = [n for n in missing if not n.startswith("pooler.")]
    heads = lm_head_names(folder)
    unexpected = [
        n
        for n in info.get("unexpected_keys") or ()
        if not (n.startswith(HEADS) or n in heads or is_buffer(n))
    ]
    for names, what in ((missing, "lacks"), (unexpected, "holds tensors the model does not use:")):
        if names:
            raise ValueError(
                f"{folder}: the checkpoint {what} {len(names)} tensors of a "
                f"{type(model).__name__} (e.g. {', '.join(sorted(names)[:3])})"
            )
    return model


PEFT_LEAD = "base_model.model."


def _adapter_keys(adapter_dir: Path) -> set[str]:
    """The tensor names of a PEFT adapter's file, its config checked first (missing, corrupt or
    not a LoRA config: named, where PEFT would fail with a traceback or a hub lookup)."""
    from readaptir.shards import Checkpoint

    config = peft_config(adapter_dir)
    if not isinstance(config, dict) or not isinstance(config.get("peft_type"), str):
        raise ValueError(f"{Path(adapter_dir) / ADAPTER_CONFIG}: no peft_type")
    return {_peft_key(n) for n in Checkpoint(adapter_dir, adapter=True).names()}


def _with_adapter(model, adapter_dir: Path, stored: set[str]):
    """``model`` with the PEFT adapter applied, checked to hold every tensor of the adapter's
    file (``stored``) and nothing else (PEFT itself only warns about keys it could not place,
    and ignores tensors its config does not name)."""
    from peft import PeftConfig, PeftModel, get_peft_model_state_dict

    _same_base_copies(model, adapter_dir, stored)
    config = PeftConfig.from_pretrained(adapter_dir)
    config.task_type = None  # no task wrapper: CAUSAL_LM's would want generation hooks
    try:
        model = PeftModel.from_pretrained(model, adapter_dir, config=config)
    except RuntimeError as err:  # torch's size mismatch names tensors, not the folder
        first = str(err).strip().splitlines()
        raise ValueError(
            f"{adapter_dir}: PEFT cannot load the adapter onto its base ({' '.join(first[:3])}): "
            "check its adapter_config.json (r, target_modules) against its tensors and base"
        ) from None
    # as saved: with whole embedding layers or without (PEFT's "auto" would look the base up on
    # the hub), whichever gives the file's keys; a file's own copies of a trained embedding
    # (modules_to_save) or of one LoRA wraps look alike by name, so both are tried
    applied_as = [
        {_peft_key(n) for n in get_peft_model_state_dict(model, save_embedding_layers=embeddings)}
        for embeddings in (False, True)
    ]
    # neither: measured against the one the file's keys lean to, so the error names what is wrong
    leaning = applied_as[1] if stored & (applied_as[1] - applied_as[0]) else applied_as[0]
    applied = next((keys for keys in applied_as if keys == stored), leaning)
    for names, what in ((stored - applied, "are not applied"), (applied - stored, "are missing")):
        if names:
            raise ValueError(
                f"{adapter_dir}: {len(names)} adapter tensors {what} by PEFT onto "
                f"{type(model.base_model.model).__name__} with its adapter_config.json (e.g. "
                f"{', '.join(sorted(names)[:2])}): check its target_modules, use_dora and keys"
            )
    return model


def _same_base_copies(model, adapter_dir: Path, stored: set[str]) -> None:
    """A file's copies of its base's layers (``base_layer.weight`` of LoRA on an embedding) must
    be its base's: PEFT loads them into the model, while the merge reads the base's own."""
    import torch

    from readaptir.shards import Checkpoint

    copies = sorted(k for k in stored if k.endswith(".base_layer.weight"))
    if not copies:
        return
    own = model.state_dict()
    ckpt = Checkpoint(adapter_dir, adapter=True)
    for key in copies:
        name = key.removeprefix(PEFT_LEAD).replace(".base_layer.weight", ".weight")
        if name in own and not torch.equal(ckpt.get(key).to(own[name].dtype), own[name]):
            raise ValueError(
                f"{adapter_dir}: its copy of {name} ({key}) is not its base's: the baseline would "
                "encode with the copy and the merge with the base's"
            )


def _peft_key(name: str) -> str:
    # PEFT releases name a DoRA magnitude with or without ".weight"
    return name.removesuffix(".weight") if "lora_magnitude_vector" in name else name


# files any one of which makes a tokenizer transformers can load (with what the folder holds)
TOKENIZER_CORE = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "vocab.txt",
    "vocab.json",
)


def has_tokenizer(path: Path) -> bool:
    return any((Path(path) / n).is_file() for n in TOKENIZER_CORE)
