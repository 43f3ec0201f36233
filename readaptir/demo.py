"""The offline demo: a whole readaptir workspace made on the spot, built and run end to end.

- general-domain text (domain A: cooks, athletes and towns) pretrains a tiny Llama briefly: Θ;
- a retriever is made from Θ by a short contrastive fine-tune on domain-A query–passage pairs;
- a domain-B BEIR collection (invented species and their traits) is the target;
- two recipes: the retriever alone, and the retriever readapted with a knowledge adapter trained on
  the domain-B passages. ``readaptir build``, ``dvc repro`` and ``readaptir report`` do the rest.
Deterministic for its seeds; nothing is downloaded.
"""

from __future__ import annotations

import logging
import random
import shutil
import subprocess
from pathlib import Path

from readaptir import dvcfile, report, tiny, workspace
from readaptir.corpus import write_collection
from readaptir.plan import plan_recipes
from readaptir.recipe_files import load_recipes

LOG = logging.getLogger(__name__)

SYLLABLES = "ka lo mi ren tas vor quel dun sip ar bel cor fin gal hul jor nex pim rud zol".split()
DOMAIN_A = {
    "role": ["cook", "runner", "painter", "farmer", "sailor", "teacher"],
    "place": ["the harbour town", "the hill village", "the river city", "the northern coast"],
    "thing": ["bread", "boats", "maps", "songs", "wool", "lamps", "kites"],
    "trait": ["patient", "quick", "careful", "cheerful", "quiet", "bold"],
}
DOMAIN_B = {
    "kind": ["beetle", "lichen", "moss", "shrimp", "orchid", "fungus", "newt"],
    "habitat": ["cave pools", "salt marshes", "cloud forests", "volcanic vents", "tundra bogs"],
    "food": ["decaying bark", "algae films", "pollen grains", "sulfur bacteria", "leaf litter"],
    "colour": ["violet", "amber", "pale green", "crimson", "silver"],
    "season": ["spring", "the wet season", "late autumn", "midwinter"],
}
DEMO_ADAPTER = {
    "r": 8,
    "lora_alpha": 16,
    "max_length": 96,
    "batch_size": 8,
    "epochs": 2,
    "lr": 1e-3,
}


def _name(rng: random.Random) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(3))


def domain_a(rng: random.Random, n: int) -> list[tuple[str, str]]:
    """(query, passage) pairs about people of domain A."""
    pairs = []
    for _ in range(n):
        who, v = _name(rng).title(), {k: rng.choice(vals) for k, vals in DOMAIN_A.items()}
        passage = (
            f"{who} is a {v['trait']} {v['role']} from {v['place']}. {who} makes "
            f"{v['thing']} every week and sells them at the market."
        )
        query = rng.choice(
            [
                f"who makes {v['thing']} in {v['place']}",
                f"what does {who} make",
                f"{v['trait']} {v['role']} {who}",
            ]
        )
        pairs.append((query, passage))
    return pairs


def domain_b(rng: random.Random, n: int) -> tuple[list[dict], list[dict], list[tuple]]:
    """Corpus, queries and judgments about invented species of domain B.

    Each species has a profile passage (what it looks like, where it lives) and a diet passage that
    names it without describing it. Queries ask what a species eats, naming it or describing it:
    a described one needs the link between name and description that only the profiles teach.
    """
    corpus, queries, qrels = [], [], []
    for i in range(n):
        sp, v = _name(rng), {k: rng.choice(vals) for k, vals in DOMAIN_B.items()}
        corpus.append(
            {
                "_id": f"p{i}",
                "title": f"The {sp}",
                "text": f"The {sp} is a {v['colour']} {v['kind']} of {v['habitat']}.",
            }
        )
        corpus.append(
            {
                "_id": f"d{i}",
                "title": "",
                "text": f"The {sp} feeds on {v['food']} and breeds in {v['season']}.",
            }
        )
        # half the queries name the species (the retriever matches names), half describe it
        described = f"the {v['colour']} {v['kind']} of {v['habitat']}"
        queries.append(
            {"_id": f"q{i}", "text": f"what does {described if i % 2 else f'the {sp}'} eat"}
        )
        qrels.append((f"q{i}", f"d{i}", 1))
    return corpus, queries, qrels


def pretrain_base(out: Path, tokenizer, texts: list[str], steps: int = 150, seed: int = 0) -> Path:
    """Θ: a tiny Llama trained briefly with next-token prediction on general text."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny.llama_config(tokenizer, hidden=64, layers=2))
    optim = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rng = random.Random(seed)
    model.train()
    for _ in range(steps):
        batch = tokenizer(
            rng.sample(texts, 16), padding=True, truncation=True, max_length=64, return_tensors="pt"
        )
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        model(**batch, labels=labels).loss.backward()
        optim.step()
        optim.zero_grad()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _last_token(model, tokenizer, texts: list[str]):
    """Normalised last-token (EOS) states: the repllama family's pooling."""
    import torch

    ids = [tokenizer(t)["input_ids"][:63] + [tokenizer.eos_token_id] for t in texts]
    width = max(map(len, ids))
    input_ids = torch.tensor([s + [tokenizer.pad_token_id] * (width - len(s)) for s in ids])
    mask = (torch.arange(width)[None, :] < torch.tensor([len(s) for s in ids])[:, None]).long()
    states = model(input_ids=input_ids, attention_mask=mask).last_hidden_state
    pooled = states[torch.arange(len(ids)), mask.sum(1) - 1]
    return torch.nn.functional.normalize(pooled, dim=-1)


def finetune_retriever(base: Path, out: Path, tokenizer, pairs, steps: int = 120, seed: int = 0):
    """A retriever from Θ: in-batch-negative contrastive training on domain-A pairs."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM.from_pretrained(base).model  # Θ's body: a retriever has no LM head
    optim = torch.optim.AdamW(model.parameters(), lr=1e-3)
    rng = random.Random(seed)
    model.train()
    for _ in range(steps):
        batch = rng.sample(pairs, 32)
        q = _last_token(model, tokenizer, [f"query: {a}" for a, _ in batch])
        p = _last_token(model, tokenizer, [f"passage: {b}" for _, b in batch])
        loss = torch.nn.functional.cross_entropy(q @ p.T / 0.05, torch.arange(len(batch)))
        loss.backward()
        optim.step()
        optim.zero_grad()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


RECIPES = {
    "_common.yaml": {
        "base": "models/base",
        "retriever": {
            "source": "models/retriever",
            "family": "repllama",
            "encoding": {"max_query_length": 64, "max_passage_length": 96},
        },
        "corpus": "data/species",
        "adapter": DEMO_ADAPTER,
    },
    "retriever-alone.yaml": {"extends": "_common.yaml", "readapt": {"alpha": 0.0, "beta": 1.0}},
    "readapted.yaml": {"extends": "_common.yaml", "readapt": {"alpha": 0.5, "beta": 1.0}},
}


def make_workspace(directory: Path, seed: int = 0) -> Path:
    """Models, data and recipes of the demo in a fresh git + DVC repository."""
    import yaml

    rng = random.Random(seed)
    root = Path(directory)
    root.mkdir(parents=True)
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    for key, value in (("user.name", "readaptir demo"), ("user.email", "demo@localhost")):
        subprocess.run(["git", "config", key, value], cwd=root, check=True)
    workspace.init(root)

    pairs = domain_a(rng, 600)
    corpus, queries, qrels = domain_b(rng, 120)
    general = [p for _, p in pairs] + [q for q, _ in pairs]
    species_text = [f"{d['title']}. {d['text']}" for d in corpus]
    LOG.info("demo: training a tokenizer, pretraining Θ, fine-tuning the retriever")
    tokenizer = tiny.train_tokenizer(general + species_text, vocab_size=600)
    base = pretrain_base(root / "models" / "base", tokenizer, general, seed=seed)
    finetune_retriever(base, root / "models" / "retriever", tokenizer, pairs, seed=seed)
    write_collection(root / "data" / "species", corpus, queries, qrels)
    for name, body in RECIPES.items():
        (root / "recipes" / name).write_text(yaml.safe_dump(body, sort_keys=False))
    return root


def run_demo(directory: Path, force: bool = False) -> str:
    """Make the workspace, build, ``dvc repro``, and return the report table."""
    directory = Path(directory)
    if directory.exists():
        if not force:
            raise FileExistsError(f"{directory} exists; pass --force to replace it")
        demo_made = all((directory / "recipes" / name).is_file() for name in RECIPES)
        if not directory.is_dir() or not (demo_made or not any(directory.iterdir())):
            raise FileExistsError(
                f"{directory} is not a demo workspace (no recipes/{', recipes/'.join(RECIPES)}): "
                "--force replaces only those; give another folder"
            )
        shutil.rmtree(directory)
    root = make_workspace(directory)
    dvcfile.write(plan_recipes(load_recipes(root / "recipes"), root), root)
    LOG.info("demo: dvc repro")
    workspace.dvc(root, "repro")
    subprocess.run(["git", "add", "-A"], cwd=root, check=True)
    subprocess.run(["git", "commit", "-qm", "demo: built"], cwd=root, check=True)
    table = report.table(report.load(root)[1], kind="recipes")
    return f"{table}\n\nworkspace: {root.resolve()}  (try: cd {root} && dvc metrics show)"
