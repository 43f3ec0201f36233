import csv
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import run_ranks, write_beir
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, BertConfig, LlamaConfig

from readaptir import tiny
from readaptir.artifacts import write_json
from readaptir.corpus import Passage, load_qrels
from readaptir.distributed import Ranks
from readaptir.objective import CAUSAL, MASKED, load_model, objective_for
from readaptir.packing import TokenStore
from readaptir.stages import adapter as adapter_module
from readaptir.stages.adapter import passage_filter, train_adapter
from readaptir.targets import base_linear_modules, resolve_targets, unmatched
from readaptir.training import (
    Meter,
    attach_adapter,
    autocast_dtype,
    checkpointed,
    disable_gradient_checkpointing,
    enable_gradient_checkpointing,
)

SMALL = dict(r=4, lora_alpha=8, batch_size=4, max_length=32, lr=1e-3, epochs=2)


def _train(tmp_path, name, base, corpus, **kwargs):
    out = tmp_path / name
    out.mkdir()
    summary = train_adapter(base, corpus, out, **{**SMALL, **kwargs})
    return summary, out, load_file(out / "adapter_model.safetensors")


def _log(out):
    return list(csv.DictReader((out / "training_log.csv").open()))


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    ("schedule", "rates"),
    [
        ({"warmup_ratio": 0.5}, [1 / 3, 2 / 3, 1, 2 / 3, 1 / 3, 0]),  # 3 of 6 steps warm up
        ({"scheduler": "cosine"}, [0.9330, 0.75, 0.5, 0.25, 0.0670, 0]),
        ({"scheduler": "constant"}, [1] * 6),
    ],
    ids=["warm-up", "cosine", "constant"],
)
def test_the_recipe_schedule_sets_each_step_rate(tmp_path, tiny_base, tiny_beir, schedule, rates):
    """The rate after each step's update, as the log gives it (lr 1e-3, 6 steps)."""
    _, out, _ = _train(
        tmp_path, "s", tiny_base, tiny_beir, packing=False, max_length=128, **schedule
    )
    got = [float(r["lr"]) for r in _log(out)]
    assert got == pytest.approx([1e-3 * rate for rate in rates], abs=1e-7)


def test_dora_adapter_trains_logs_and_loads(tmp_path, tiny_base, tiny_beir, monkeypatch):
    args = dict(max_length=128)  # no passage truncated: packed or not, the same tokens
    metered: list[int] = []  # what tokens/s counts
    monkeypatch.setattr(Meter, "add", lambda self, n: metered.append(n))
    summary, out, tensors = _train(tmp_path, "padded", tiny_base, tiny_beir, packing=False, **args)
    assert summary["steps"] == 6  # one passage per row: 12 passages / batch 4 × 2 epochs
    assert sum(metered) == summary["tokens"] and len(metered) == 6  # real tokens, no padding
    rows = _log(out)
    assert list(rows[0]) == ["step", "epoch", "loss", "lr", "tokens"]
    assert [int(r["step"]) for r in rows] == list(range(1, 7))
    assert all(float(r["loss"]) > 0 for r in rows)
    # the linear schedule, no warm-up: the rate after each step's update falls to 0 at the end
    linear = [1e-3 * (6 - k) / 6 for k in range(1, 7)]
    assert [float(r["lr"]) for r in rows] == pytest.approx(linear)
    assert any("lora_magnitude_vector" in k for k in tensors)
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in tensors.items())
    assert not any("lm_head" in k for k in tensors)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), out)
    assert model.peft_config["default"].use_dora
    # PEFT holds target_modules as a set, in the order of the process's string hashing: sorted,
    # a retrained adapter is the same bytes, which DVC takes for the same output
    config = json.loads((out / "adapter_config.json").read_text())
    # the paper's targets for a Llama-style base: attention's q/k/v and the MLP's up/down
    assert config["target_modules"] == ["down_proj", "k_proj", "q_proj", "up_proj", "v_proj"]

    # packed rows carry the same real tokens in fewer steps
    packed, out, _ = _train(tmp_path, "packed", tiny_base, tiny_beir, **args)
    assert packed["tokens"] == summary["tokens"] and packed["steps"] < summary["steps"]
    assert int(_log(out)[-1]["tokens"]) == packed["tokens"]


def test_the_adapter_learns_the_corpus(tmp_path, tiny_base, tiny_beir):
    """Judged by plain transformers and PEFT, outside readaptir's training code: the first logged
    loss is Θ's own next-token loss on the corpus, and the trained adapter's is well below it."""
    from transformers import AutoTokenizer

    from readaptir.corpus import load_corpus

    tok = AutoTokenizer.from_pretrained(tiny_base)
    texts = [f"{p.title} {p.text}" for p in load_corpus(tiny_beir)]
    # the whole corpus in one packed row and one step per epoch: the first step sees all of it
    _, out, _ = _train(tmp_path, "a", tiny_base, tiny_beir, max_length=512, batch_size=1, r=16,
                       dropout=0.0, lr=3e-2, epochs=30)  # fmt: skip

    def corpus_loss(model) -> float:
        total = count = 0.0
        with torch.no_grad():
            for text in texts:
                ids = torch.tensor([tok(text)["input_ids"] + [tok.eos_token_id]])
                n = ids.shape[1] - 1  # targets
                total += float(model(input_ids=ids, labels=ids).loss) * n
                count += n
        return total / count

    base = corpus_loss(AutoModelForCausalLM.from_pretrained(tiny_base).eval())
    first = float(_log(out)[0]["loss"])
    assert first == pytest.approx(base, rel=0.02)  # the same tokens and targets as trained on
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), out)
    assert corpus_loss(adapted.eval()) < 0.9 * base  # 4.91 against 5.74 when written


def test_same_seed_same_adapter_and_lora_option(tmp_path, tiny_base, tiny_beir):
    outs = [
        _train(tmp_path, f"a{i}", tiny_base, tiny_beir, method=method, max_steps=2)[2]
        for i, method in enumerate(("lora", "lora", "dora"))
    ]
    assert _same(outs[0], outs[1])
    assert not any("magnitude" in k for k in outs[0]) and any("magnitude" in k for k in outs[2])


def test_batch_tokens_sets_rows_per_step(tmp_path, tiny_base, tiny_beir):
    by_rows = _train(tmp_path, "rows", tiny_base, tiny_beir, batch_size=2, max_steps=2)[2]
    by_tokens = _train(tmp_path, "tokens", tiny_base, tiny_beir, batch_tokens=64 + 31, max_steps=2)
    assert _same(by_rows, by_tokens[2])


RESUMABLE = dict(method="dora", packing=False, epochs=3, batch_size=3)  # 12 steps over 3 epochs


def _killed_at_step_7(tmp_path, base, corpus) -> Path:
    """The checkpoint folder of a run killed at step 7, with checkpoints every 3 steps."""
    ckpt = tmp_path / "ckpt"

    def kill_at_7(step: int) -> None:
        if step == 7:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path, "killed", base, corpus, **RESUMABLE,
               checkpoint_dir=ckpt, checkpoint_every=3, on_step=kill_at_7)  # fmt: skip
    assert (ckpt / "checkpoint.pt").is_file()
    return ckpt


def test_killed_run_resumes_to_the_same_adapter(tmp_path, tiny_base, tiny_beir, monkeypatch):
    args = RESUMABLE
    _, whole_out, whole = _train(tmp_path, "whole", tiny_base, tiny_beir, **args)
    ckpt = _killed_at_step_7(tmp_path, tiny_base, tiny_beir)
    assert (ckpt / adapter_module.TOKENS_MANIFEST).is_file()

    def tokenize(*args, **kwargs):
        raise AssertionError("a resumed run tokenized the corpus again")

    with monkeypatch.context() as patch:  # the killed run's tokens are read back
        patch.setattr(adapter_module, "_tokenize", tokenize)
        summary, out, resumed = _train(tmp_path, "resumed", tiny_base, tiny_beir, **args,
                                       checkpoint_dir=ckpt, checkpoint_every=3)  # fmt: skip
    assert summary["resumed_from"] == 6 and summary["steps"] == 12
    assert _same(whole, resumed)
    assert _log(out) == _log(whole_out)
    # the run's caller removes the checkpoint once it has kept the adapter: killed before then,
    # the next run resumes from the last checkpoint, to the same adapter
    summary, _, again = _train(tmp_path, "again", tiny_base, tiny_beir, **args,
                               checkpoint_dir=ckpt, checkpoint_every=3)  # fmt: skip
    assert summary["resumed_from"] == 9 and _same(whole, again)


def test_a_diverging_run_stops_at_the_first_non_finite_loss(tmp_path, tiny_base, tiny_beir):
    """An infinite rate makes every adapter weight inf or nan after the first update: the run
    stops at step 2 with no adapter written, where it went on for every step left before."""
    ckpt = tmp_path / "ckpt"
    with pytest.raises(adapter_module.TrainingDiverged, match=r"^step 2: the training loss is nan"):
        _train(tmp_path, "diverged", tiny_base, tiny_beir, **RESUMABLE, lr=float("inf"),
               checkpoint_dir=ckpt, checkpoint_every=1)  # fmt: skip
    assert not list((tmp_path / "diverged").iterdir())
    assert torch.load(ckpt / "checkpoint.pt", weights_only=False)["progress"]["step"] == 1


def test_saved_tokens_of_other_settings_are_made_again(tmp_path, tiny_base, tiny_beir, monkeypatch):
    ckpt = _killed_at_step_7(tmp_path, tiny_base, tiny_beir)
    calls = []
    tokenize = adapter_module._tokenize
    monkeypatch.setattr(
        adapter_module, "_tokenize", lambda *a, **k: calls.append(a[2]) or tokenize(*a, **k)
    )
    args = {**RESUMABLE, "max_length": 16}  # shorter passages: other tokens, another run
    fresh = _train(tmp_path, "fresh", tiny_base, tiny_beir, **args)[2]
    summary, _, other = _train(tmp_path, "other", tiny_base, tiny_beir, **args,
                               checkpoint_dir=ckpt, checkpoint_every=3)  # fmt: skip
    assert calls == [16, 16] and summary["resumed_from"] == 0
    assert _same(fresh, other)


def test_a_corpus_file_changed_since_the_tokens_were_saved_is_tokenized_again(
    tmp_path, tiny_base, tiny_beir, monkeypatch
):
    ckpt = _killed_at_step_7(tmp_path, tiny_base, tiny_beir)
    calls = []
    tokenize = adapter_module._tokenize
    monkeypatch.setattr(
        adapter_module, "_tokenize", lambda *a, **k: calls.append(a[2]) or tokenize(*a, **k)
    )
    corpus = tiny_beir / "corpus.jsonl"
    later = corpus.stat().st_mtime_ns + 2 * 10**9  # rewritten in place: its size may not change
    os.utime(corpus, ns=(later, later))
    _train(tmp_path, "touched", tiny_base, tiny_beir, **RESUMABLE,
           checkpoint_dir=ckpt, checkpoint_every=3)  # fmt: skip
    assert len(calls) == 1  # untouched, the saved tokens are read back (test above)


@pytest.mark.parametrize("changed", ["corpus", "base"])
def test_a_checkpoint_of_another_corpus_or_base_is_not_resumed(
    tmp_path, tokenizer, tiny_base, tiny_beir, changed
):
    """Rewritten with the same counts (each passage's words reversed) or rebuilt with other
    weights, the input makes another run, which starts over."""
    base = shutil.copytree(tiny_base, tmp_path / "base")
    ckpt = _killed_at_step_7(tmp_path, base, tiny_beir)
    if changed == "corpus":
        corpus = tiny_beir / "corpus.jsonl"
        lines = [json.loads(line) for line in corpus.read_text().splitlines()]
        for line in lines:
            line["text"] = " ".join(reversed(line["text"].split()))
        corpus.write_text("".join(json.dumps(line) + "\n" for line in lines))
    else:
        tiny.make_llama(base, tokenizer, seed=1)
    fresh = _train(tmp_path, "fresh", base, tiny_beir, **RESUMABLE)[2]
    summary, _, other = _train(tmp_path, "other", base, tiny_beir, **RESUMABLE,
                               checkpoint_dir=ckpt, checkpoint_every=3)  # fmt: skip
    assert summary["resumed_from"] == 0 and _same(fresh, other)


def test_a_rank_waiting_for_rank_0_s_tokens_says_so_and_reads_them(tmp_path, monkeypatch, caplog):
    made = TokenStore.from_chunks([[[5, 6, 7], [8]]])
    polls = []

    def sleep(seconds):  # rank 0 finishes after the third look
        polls.append(seconds)
        if len(polls) == 3:
            made.save(
                tmp_path / adapter_module.TOKENS_IDS, tmp_path / adapter_module.TOKENS_OFFSETS
            )
            write_json(tmp_path / adapter_module.TOKENS_MANIFEST, {"files": []})

    monkeypatch.setattr(adapter_module.time, "sleep", sleep)
    monkeypatch.setattr(adapter_module, "TOKENS_WAIT_LOG_SECONDS", 0.0)
    with caplog.at_level("INFO", logger="readaptir.stages.adapter"):
        store = adapter_module._shared_tokens(
            tmp_path, {"files": []}, Ranks(1, 2), lambda: pytest.fail("rank 1 tokenized")
        )
    assert len(polls) == 3 and caplog.text.count("rank 1: waited") == 3
    assert "if rank 0 has stopped, stop this run too" in caplog.text
    assert store.ids.tolist() == [5, 6, 7, 8] and store.offsets.tolist() == [0, 3, 4]


def test_a_checkpoint_of_other_settings_is_not_resumed(tmp_path, tiny_base, tiny_beir, caplog):
    args = RESUMABLE
    ckpt = _killed_at_step_7(tmp_path, tiny_base, tiny_beir)
    fresh = _train(tmp_path, "fresh", tiny_base, tiny_beir, **args, lr=5e-4)[2]
    with caplog.at_level("WARNING", logger="readaptir.checkpoints"):
        summary, _, other = _train(tmp_path, "other", tiny_base, tiny_beir, **args, lr=5e-4,
                                   checkpoint_dir=ckpt, checkpoint_every=3)  # fmt: skip
    assert summary["resumed_from"] == 0 and "other settings" in caplog.text
    assert _same(fresh, other)  # started over, as a run with these settings does


def test_bf16_base_trains_float32_adapter_weights(tmp_path, tiny_base, tiny_beir):
    # At lr 2e-4 an AdamW step (≈ lr) is below half a bf16 spacing of the DoRA magnitudes
    # (≈ 0.16 here): bf16 adapter weights would never move them.
    args = dict(dtype="bfloat16", gradient_checkpointing=True, max_steps=4)
    start = _train(tmp_path, "start", tiny_base, tiny_beir, **args, lr=0.0)[2]
    _, _, trained = _train(tmp_path, "bf16", tiny_base, tiny_beir, **args, lr=2e-4)
    assert {v.dtype for v in trained.values()} == {torch.float32}
    magnitudes = [k for k in trained if "lora_magnitude_vector" in k]
    moved = sum(int((trained[k] != start[k]).sum()) for k in magnitudes)
    assert moved > 0.9 * sum(trained[k].numel() for k in magnitudes)


def test_checkpointing_a_share_of_the_layers_recomputes_those_alone(tokenizer):
    from transformers import LlamaForCausalLM

    assert checkpointed(4, 0.5) == [False, True, False, True]
    assert checkpointed(8, 0.25) == [False, False, False, True] * 2
    assert checkpointed(3, 1.0) == [True] * 3
    assert checkpointed(6, 0.1) == [False] * 5 + [True]  # rounded, but never none
    assert sum(checkpointed(100, 0.29)) == 29
    with pytest.raises(ValueError, match=r"\(0, 1\], not 1.5"):
        checkpointed(4, 1.5)
    model = LlamaForCausalLM(tiny.llama_config(tokenizer, layers=4)).train()
    enable_gradient_checkpointing(model, share=0.5)
    calls = [0] * 4
    for i, layer in enumerate(model.model.layers):  # the MLP runs inside the layer's forward
        # (a pre-hook: the recomputation stops once the saved tensors are back, before the MLP's
        # forward returns)
        layer.mlp.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    ids = torch.randint(3, 100, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    assert calls == [1, 2, 1, 2]  # checkpointed layers run again in the backward pass
    disable_gradient_checkpointing(model)
    calls[:] = [0] * 4
    model(input_ids=ids, labels=ids).loss.backward()
    assert calls == [1, 1, 1, 1]


def test_checkpointing_leaves_the_adapter_unchanged(tmp_path, tiny_base, tiny_beir, monkeypatch):
    # Non-reentrant checkpointing recomputes with the same dropout masks: the same adapter.
    from readaptir.stages import adapter as stage

    shares = []  # what reached the model: the setting is not dropped on the way

    def enable(model, share=1.0):
        shares.append(share)
        enable_gradient_checkpointing(model, share=share)

    monkeypatch.setattr(stage, "enable_gradient_checkpointing", enable)
    args = dict(max_steps=3, dropout=0.1)
    plain = _train(tmp_path, "plain", tiny_base, tiny_beir, **args, gradient_checkpointing=False)
    auto = _train(tmp_path, "auto", tiny_base, tiny_beir, **args)  # auto: off on the CPU
    assert shares == [] and _same(plain[2], auto[2])
    for share in (True, 0.5):
        again = _train(tmp_path, f"ckpt-{share}", tiny_base, tiny_beir, **args,
                       gradient_checkpointing=share)  # fmt: skip
        assert shares.pop() == float(share)
        assert _same(plain[2], again[2])


def test_encoder_base_trains_masked_lm_adapter(tmp_path, tokenizer, tiny_beir, caplog):
    base = tiny.make_bert(tmp_path / "bert", tokenizer)  # no MLM head: one is made for training
    with caplog.at_level("WARNING", logger="readaptir.objective"):
        summary, out, tensors = _train(tmp_path, "mlm", base, tiny_beir, max_steps=3)
    assert "no masked-LM head" in caplog.text and "cls.predictions" in caplog.text
    model = load_model(base, MASKED, torch.bfloat16)
    model = attach_adapter(model, objective=MASKED, method="dora", r=4, lora_alpha=8,
                           dropout=0.0, target_modules=["query"])  # fmt: skip
    fresh = {n: p for n, p in model.named_parameters() if p.requires_grad and "lora" not in n}
    assert fresh and all(".cls.predictions." in n for n in fresh)  # the random head trains too
    assert {p.dtype for p in fresh.values()} == {torch.float32}
    assert autocast_dtype(model) is torch.bfloat16  # the frozen bf16 weights compute in bf16
    plain = attach_adapter(load_model(base, MASKED, torch.float32), objective=MASKED,
                           method="dora", r=4, lora_alpha=8, dropout=0.0,
                           target_modules=["query"])  # fmt: skip
    assert autocast_dtype(plain) is None  # a float32 base computes in float32
    assert summary["objective"] == MASKED and summary["steps"] == 3
    targets = {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in tensors}
    assert targets == {"query", "key", "value", "dense"}
    assert not any(k.startswith("base_model.model.cls") for k in tensors)  # the head is not Ψ
    model = PeftModel.from_pretrained(AutoModelForMaskedLM.from_pretrained(base), out)
    assert model.peft_config["default"].use_dora
    # the largest seed a recipe takes: each step's masking seed, derived from it, outgrows
    # torch's range and is brought back into it (it was an overflow error)
    summary = _train(tmp_path, "big-seed", base, tiny_beir, max_steps=1, seed=2**64 - 1)[0]
    assert summary["steps"] == 1
    again = _train(tmp_path, "mlm2", base, tiny_beir, max_steps=3)[2]
    assert _same(tensors, again)


def test_objective_by_architecture_and_target_errors(
    tokenizer, tiny_base, tiny_beir, tmp_path, monkeypatch
):
    assert objective_for(LlamaConfig()) == CAUSAL
    assert objective_for(BertConfig()) == MASKED
    assert objective_for(BertConfig(is_decoder=True)) == CAUSAL
    body = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    assert resolve_targets(body, ["lm_head"], ["q_proj"]) == []
    head = ["cls.predictions.transform.dense"]
    assert resolve_targets(["bert.encoder.layer.0.output.dense"], head, ["dense"]) == head
    listed = r"match none of the base model's Linear modules, which are: .*self_attn\.q_proj"
    with pytest.raises(ValueError, match=listed):
        resolve_targets(body, [], ["query"])
    with pytest.raises(ValueError, match=r"target_modules \['qproj'\] match none"):
        resolve_targets(body, [], ["q_proj", "qproj"])  # each name must name something
    # defaults of which some match would adapt part of what the paper adapts (Phi-3: down_proj)
    partly = r"^the default .*\['up_proj'\] match none.* adapt \['q_proj'\] alone: set adapter"
    with pytest.raises(ValueError, match=partly):
        resolve_targets(body, [], ["q_proj", "up_proj"], every=False)
    with pytest.raises(ValueError, match=r"^the default .*set adapter\.target_modules"):
        resolve_targets(body, [], ["query", "key"], every=False)  # defaults that match nothing
    with monkeypatch.context() as patch, pytest.raises(ValueError, match="up_proj"):
        # before the corpus is tokenised: minutes at MS MARCO's size
        patch.setattr(adapter_module, "_training_tokens", None)
        _train(tmp_path, "bad", tiny_base, tiny_beir, target_modules=["query"], max_steps=1)
    with pytest.raises(ValueError, match=r"\['qproj'\] match none"):
        _train(
            tmp_path, "bad2", tiny_base, tiny_beir, target_modules=["q_proj", "qproj"], max_steps=1
        )


def test_the_build_sees_the_module_names_training_will_have(tmp_path, tokenizer, tiny_base):
    # a headless encoder stores encoder.layer.*; the masked-LM model it trains as says bert.encoder
    bert = tiny.make_bert(tmp_path / "bert", tokenizer)
    body, head = base_linear_modules(bert)
    model = attach_adapter(load_model(bert, MASKED, None), objective=MASKED, method="lora", r=2,
                           lora_alpha=4, dropout=0.0, target_modules=["query"])  # fmt: skip
    wrapped = {
        n.removeprefix("base_model.model.")
        for n, m in model.named_modules()
        if hasattr(m, "lora_A")
    }
    assert wrapped == {n for n in body if n.endswith(".query")}
    assert "bert.encoder.layer.0.attention.self.query" in body
    assert set(head) == {"cls.predictions.transform.dense", "cls.predictions.decoder"}
    assert unmatched(["bert.encoder.layer.0.attention.self.query"], body) is None
    assert (
        unmatched(["lm_head"], base_linear_modules(tiny_base)[0]) is not None
    )  # a head is no target
    assert not any(p.device.type == "meta" for p in model.parameters())


def test_a_tokenizer_larger_than_the_bases_embeddings_fails_before_training(
    tmp_path, tiny_base, tiny_beir
):
    import shutil

    from readaptir.models import load_tokenizer

    base = tmp_path / "base"
    shutil.copytree(tiny_base, base)
    tok = load_tokenizer(base)
    tok.add_tokens(["zebrafish"])  # past the embeddings: fine until a passage holds it
    tok.save_pretrained(base)
    _train(tmp_path, "unused", base, tiny_beir, max_steps=1)
    corpus = tiny_beir / "corpus.jsonl"
    corpus.write_text(corpus.read_text() + '{"_id": "z", "text": "a zebrafish"}\n')
    with pytest.raises(ValueError, match=r"base: the tokenizer gives the corpus token id \d+, but"):
        _train(tmp_path, "used", base, tiny_beir, max_steps=1)  # not at the step that meets it
    corpus.write_text(corpus.read_text().replace("a zebrafish", "a fish"))
    tok.add_special_tokens({"pad_token": "<added-pad>"})  # every padded row would hold it
    tok.save_pretrained(base)
    with pytest.raises(ValueError, match=r"the tokenizer gives padding id \d+, but the model's"):
        _train(tmp_path, "pad", base, tiny_beir, max_steps=1, packing=False)


def test_passage_selection_by_judgments(tmp_path, tiny_base, tiny_beir):
    passages = [Passage(f"d{i}", "", f"text {i}") for i in range(5)]
    qrels = {"q0": {"d0": 1, "d1": 0}, "q1": {"d3": 2, "d9": 1}}

    def chosen(selection, judgments):
        return [p.id for p in passages if passage_filter(selection, judgments)(p)]

    assert chosen("judged", qrels) == ["d0", "d3"]
    assert chosen("unjudged", qrels) == ["d1", "d2", "d4"]
    assert chosen("all", None) == [p.id for p in passages]
    with pytest.raises(ValueError, match="needs the judgments"):
        passage_filter("judged", None)
    with pytest.raises(ValueError, match="expected one of"):
        passage_filter("some", qrels)
    (tiny_beir / "qrels" / "dev.tsv").write_text("q0\tnowhere\t1\n")  # judges no passage
    with pytest.raises(ValueError, match="passages='judged' leaves no passage with text"):
        _train(tmp_path, "none", tiny_base, tiny_beir, passages="judged", qrels_split="dev")

    judged = {d for docs in load_qrels(tiny_beir, "test").values() for d in docs}
    summary = _train(tmp_path, "judged", tiny_base, tiny_beir, passages="judged", max_steps=1)[0]
    assert summary["passages"] == len(judged) == 5
    summary = _train(
        tmp_path, "unjudged", tiny_base, tiny_beir, passages="unjudged", qrels_dir=tiny_beir,
        qrels_split="test", max_steps=1,
    )[0]  # fmt: skip
    assert summary["passages"] == 12 - 5


def test_decoder_base_without_lm_head_or_in_float16_is_refused(tmp_path, tokenizer, tiny_beir):
    bare = tiny.make_llama(tmp_path / "bare", tokenizer, causal_lm=False)
    with pytest.raises(ValueError, match=r"lacks 1 tensors.*lm_head\.weight.*with its LM head"):
        _train(tmp_path, "bare-out", bare, tiny_beir, max_steps=1)
    with pytest.raises(ValueError, match="float16 needs loss scaling"):
        _train(tmp_path, "fp16-out", bare, tiny_beir, max_steps=1, dtype="float16")
    pointer = tmp_path / "pointer"
    shutil.copytree(bare, pointer)
    (pointer / "model.safetensors").write_text("version https://git-lfs.github.com/spec/v1\n")
    with pytest.raises(ValueError, match=r"pointer/model\.safetensors .*git-lfs pointer"):
        _train(tmp_path, "pointer-out", pointer, tiny_beir, max_steps=1)  # named before loading
    untokenized = tmp_path / "untokenized"
    shutil.copytree(bare, untokenized)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (untokenized / name).unlink(missing_ok=True)
    with pytest.raises(FileNotFoundError, match=r"no tokenizer files in .*untokenized"):
        _train(tmp_path, "untokenized-out", untokenized, tiny_beir, max_steps=1)


def test_one_eos_closes_each_passage_even_if_the_tokenizer_adds_one():
    from readaptir.stages.adapter import _tokenize

    class AddsEos:  # a tokenizer whose post-processor already ends some sequences with EOS
        eos_token_id = 2

        def __call__(self, texts, **kwargs):
            return {"input_ids": [[1, 5, 2], [1, 6]][: len(texts)]}

    store = _tokenize(AddsEos(), ["a", "b"], max_length=8, append_eos=True)
    assert [list(map(int, store[i])) for i in range(2)] == [[1, 5, 2], [1, 6, 2]]


def test_checkpoint_keeps_each_ranks_random_state(tmp_path, caplog):
    from transformers import get_scheduler

    from readaptir.checkpoints import load_checkpoint, restore_checkpoint, save_checkpoint

    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    schedule = get_scheduler("constant", optimizer)
    progress = {"step": 3, "fingerprint": "f"}
    expected = {}
    for rank in (1, 0):  # each rank at its own place in its dropout stream
        torch.manual_seed(100 + rank)
        save_checkpoint(tmp_path, model, optimizer, schedule, progress, rank)
        expected[rank] = torch.rand(3)
    for rank in (0, 1):
        torch.manual_seed(7)
        restore_checkpoint(load_checkpoint(tmp_path, "f", rank), model, optimizer, schedule)
        assert torch.equal(torch.rand(3), expected[rank])
    # a rank whose state is from another step (killed before saving it) says so and goes on
    save_checkpoint(tmp_path, model, optimizer, schedule, {**progress, "step": 6}, rank=0)
    with caplog.at_level("WARNING", logger="readaptir.checkpoints"):
        state = load_checkpoint(tmp_path, "f", rank=1)
    assert state["rng"] is None and "no random-number state of rank 1 at step 6" in caplog.text
    other_world = load_checkpoint(tmp_path, "f", rank=0, world=2)  # made by one process
    assert other_world["rng"] is None


def test_a_kill_between_a_random_state_and_its_checkpoint_resumes_exactly(tmp_path, monkeypatch):
    from transformers import get_scheduler

    from readaptir import checkpoints
    from readaptir.checkpoints import load_checkpoint, restore_checkpoint, save_checkpoint

    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    schedule = get_scheduler("constant", optimizer)
    torch.manual_seed(5)
    for step in (2, 4):
        save_checkpoint(tmp_path, model, optimizer, schedule, {"step": step, "fingerprint": "f"})
    expected = torch.rand(3)  # the draws after step 4's checkpoint

    def killed(model):  # rank 0 dies once its step-6 random state is on disk
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoints, "trainable_state", killed)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, model, optimizer, schedule, {"step": 6, "fingerprint": "f"})
    state = load_checkpoint(tmp_path, "f")
    assert state["progress"]["step"] == 4 and state["rng"] is not None
    torch.manual_seed(7)
    restore_checkpoint(state, model, optimizer, schedule)
    assert torch.equal(torch.rand(3), expected)
    # a finished save keeps this step's state and the one before, not older ones
    monkeypatch.undo()
    save_checkpoint(tmp_path, model, optimizer, schedule, {"step": 8, "fingerprint": "f"})
    kept = sorted(p.name for p in tmp_path.glob("rng-rank0-*"))
    assert kept == ["rng-rank0-step6.pt", "rng-rank0-step8.pt"]
    # a run started afresh beside an abandoned one's later states keeps its own
    save_checkpoint(tmp_path, model, optimizer, schedule, {"step": 2, "fingerprint": "g"})
    assert [p.name for p in tmp_path.glob("rng-rank0-*")] == ["rng-rank0-step2.pt"]


@pytest.mark.slow
def test_two_rank_run_with_dropout_resumes_to_the_same_adapter(tmp_path, tiny_base, tiny_beir):
    """Each rank draws its own dropout masks: a resumed multi-process run must draw them again."""
    script = (
        "import os, sys, json; from pathlib import Path\n"
        "from readaptir.stages.adapter import train_adapter\n"
        "base, corpus, out, ckpt, kill = sys.argv[1:6]\n"
        "def on_step(step):\n"
        "    if kill == 'kill' and step == 7:\n"
        "        os._exit(3)\n"
        "s = train_adapter(Path(base), Path(corpus), Path(out), r=4, lora_alpha=8, batch_size=4,\n"
        "                  max_length=32, lr=1e-3, epochs=3, packing=False, dropout=0.1,\n"
        "                  checkpoint_every=3, device='cpu', on_step=on_step,\n"
        "                  checkpoint_dir=None if ckpt == '-' else Path(ckpt))\n"
        "print(json.dumps(s))\n"
    )
    script = (
        "import readaptir.stages.adapter as stage\n"
        "tokenize = stage._tokenize\n"
        "stage._tokenize = lambda *a, **k: print('tokenized', flush=True) or tokenize(*a, **k)\n"
        + script
    )

    def run(name: str, ckpt: str, kill: str = "") -> list[tuple[int, str]]:
        out = tmp_path / name
        return run_ranks(script, lambda rank: [tiny_base, tiny_beir, out / str(rank), ckpt, kill])

    whole = run("whole", "-")
    assert [code for code, _ in whole] == [0, 0]
    ckpt = str(tmp_path / "ckpt")
    killed = run("killed", ckpt, "kill")
    assert [code for code, _ in killed] == [3, 3]
    # with a work folder rank 0 alone tokenizes, once: the other rank and the resumed run read it
    assert [out.count("tokenized") for _, out in whole + killed] == [1, 1, 1, 0]
    resumed = run("resumed", ckpt)
    assert [out.count("tokenized") for _, out in resumed] == [0, 0]
    assert json.loads(resumed[0][1].strip().splitlines()[-1])["resumed_from"] == 6
    weights = [
        load_file(tmp_path / n / "0" / "adapter_model.safetensors") for n in ("whole", "resumed")
    ]
    assert _same(*weights)


class Recorder:
    """A tokenizer that records what it is asked to encode."""

    eos_token_id = 2

    def __init__(self):
        self.texts = []

    def __call__(self, texts, **kwargs):
        self.texts += texts
        return {"input_ids": [[1, 5] for _ in texts]}


TRAIN_CORPUS = [
    {"_id": "a", "title": "Alpha", "text": "first"},
    {"_id": "b", "title": "", "text": "second"},
    {"_id": "c", "title": "Only a title", "text": ""},
    {"_id": "d", "title": "", "text": "  "},
]


def test_training_text_is_title_and_text_of_the_selected_passages(tmp_path):
    from readaptir.stages.adapter import _training_tokens

    queries = [{"_id": "q", "text": "x"}]
    train = write_beir(tmp_path / "train", TRAIN_CORPUS, queries, [("q", "a", 1)])
    evaluated = write_beir(tmp_path / "eval", TRAIN_CORPUS, queries, [("q", "b", 1), ("q", "c", 1)])
    tok = Recorder()
    store = _training_tokens(tok, train, "all", None, "test", 16, CAUSAL)
    # title and text, no stray space for an empty title; a title alone is text; blank is not
    assert tok.texts == ["Alpha first", "second", "Only a title"]
    assert [list(map(int, store[i])) for i in range(len(store))] == [[1, 5, 2]] * 3
    tok = Recorder()
    _training_tokens(tok, train, "judged", None, "test", 16, CAUSAL)
    assert tok.texts == ["Alpha first"]  # qrels_dir defaults to the training corpus
    tok = Recorder()
    _training_tokens(tok, train, "judged", evaluated, "test", 16, CAUSAL)
    assert tok.texts == ["second", "Only a title"]  # judged in the evaluated collection
    tok = Recorder()
    _training_tokens(tok, train, "unjudged", evaluated, "test", 16, CAUSAL)
    assert tok.texts == ["Alpha first"]


@pytest.mark.parametrize("objective", [CAUSAL, MASKED])
def test_training_tokens_start_with_bos_and_fit_max_length(tmp_path, tokenizer, objective, caplog):
    from readaptir.stages.adapter import _training_tokens

    long = " ".join(["word"] * 200)
    corpus = [{"_id": "a", "title": "T", "text": long}, {"_id": "b", "text": "short one"}]
    root = write_beir(tmp_path / "c", corpus, [{"_id": "q", "text": "x"}], [("q", "a", 1)])
    with caplog.at_level("INFO", logger="readaptir.encoding"):
        store = _training_tokens(tokenizer, root, "all", None, "test", 16, objective)
    assert "1 of 2 passages (50.0%) fill max_length=16 tokens; any longer were cut" in caplog.text
    rows = [list(map(int, store[i])) for i in range(len(store))]
    assert len(rows[0]) == 16  # truncated to max_length (EOS included for causal)
    assert all(r[0] == tokenizer.bos_token_id for r in rows)
    eos = tokenizer.eos_token_id
    if objective == CAUSAL:
        assert all(r[-1] == eos and r.count(eos) == 1 for r in rows)
    else:
        assert all(eos not in r for r in rows)


def test_a_blank_title_does_not_drop_the_text(tmp_path):
    from readaptir.stages.adapter import _training_tokens

    corpus = [{"_id": "a", "title": " ", "text": "text"}, {"_id": "b", "title": " ", "text": " "}]
    root = write_beir(tmp_path / "c", corpus, [{"_id": "q", "text": "x"}], [("q", "a", 1)])
    tok = Recorder()
    _training_tokens(tok, root, "all", None, "test", 16, CAUSAL)
    assert tok.texts == ["text"]


def test_weight_decay_and_gradient_clipping_reach_the_training(
    tmp_path, tiny_base, tiny_beir, monkeypatch
):
    decays, clips = [], []

    class AdamW(torch.optim.AdamW):
        def __init__(self, params, **kwargs):
            decays.append(kwargs["weight_decay"])
            super().__init__(params, **kwargs)

    clip = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.optim, "AdamW", AdamW)
    monkeypatch.setattr(
        torch.nn.utils, "clip_grad_norm_", lambda p, n: clips.append(n) or clip(p, n)
    )
    _train(tmp_path, "default", tiny_base, tiny_beir, max_steps=2)
    assert decays == [0.0] and clips == [1.0, 1.0]  # the HF Trainer's defaults, as the paper's
    _train(tmp_path, "set", tiny_base, tiny_beir, max_steps=1, weight_decay=0.1, max_grad_norm=0.5)
    _train(tmp_path, "unclipped", tiny_base, tiny_beir, max_steps=1, max_grad_norm=None)
    assert decays == [0.0, 0.1, 0.0] and clips == [1.0, 1.0, 0.5]


def test_train_step_clips_the_gradient_before_the_update():
    from transformers import get_scheduler

    from readaptir.training import train_step

    class Linear(torch.nn.Linear):  # a model that takes keyword inputs and returns its loss
        def forward(self, x):
            return type("Output", (), {"loss": (super().forward(x) * 100).sum()})

    def update(max_grad_norm):
        torch.manual_seed(0)
        model = Linear(3, 2)
        before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        schedule = get_scheduler("constant", optimizer)
        train_step(model, {"x": torch.ones(4, 3)}, optimizer, schedule, "cpu",
                   max_grad_norm=max_grad_norm)  # fmt: skip
        after = torch.cat([p.detach().flatten() for p in model.parameters()])
        return float((after - before).norm())

    assert update(None) > 100 and update(0.5) == pytest.approx(0.5, rel=1e-4)


def test_masked_lm_noise_stays_inside_the_embedding(tmp_path, tokenizer, tiny_beir):
    """A tokenizer may hold more tokens than the model's embedding has rows (tokens added
    after training); random replacement tokens are drawn among the rows."""
    from transformers import AutoTokenizer

    base = tiny.make_bert(tmp_path / "bert", tokenizer, masked_lm=True)
    larger = AutoTokenizer.from_pretrained(base)
    larger.add_tokens([f"<unused{i}>" for i in range(5000)])  # never in the passages
    larger.save_pretrained(base)
    summary = _train(tmp_path, "mlm", base, tiny_beir, max_steps=3, epochs=1)[0]
    assert summary["steps"] == 3


def test_checkpoints_are_synced_to_disk_and_a_truncated_one_is_named(tmp_path, monkeypatch, caplog):
    import os

    from transformers import get_scheduler

    from readaptir.checkpoints import load_checkpoint, save_checkpoint

    synced = []
    fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    schedule = get_scheduler("constant", optimizer)
    path = save_checkpoint(tmp_path, model, optimizer, schedule, {"step": 3, "fingerprint": "f"})
    names = [Path(s).name for s in synced]
    assert any(n.startswith(".tmp-checkpoint.pt") for n in names)  # before the rename
    assert any(n.startswith(".tmp-rng-rank0-step3.pt") for n in names)
    assert names.count(tmp_path.name) == 2  # the folder, after each rename
    rng = tmp_path / "rng-rank0-step3.pt"
    rng.write_bytes(rng.read_bytes()[:100])  # what a power loss can leave
    resumed = load_checkpoint(tmp_path, "f")  # the random state alone: fresh draws
    assert resumed is not None and resumed["rng"] is None
    assert "no random-number state of rank 0 at step 3" in caplog.text
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(RuntimeError, match=r"checkpoint\.pt: a damaged checkpoint.*delete the"):
        load_checkpoint(tmp_path, "f")


def test_flash_attention_with_several_packed_rows_is_refused(
    tmp_path, tiny_base, tiny_beir, monkeypatch
):
    from readaptir.stages import adapter

    def flash(*args):
        model = load_model(*args)
        model.config._attn_implementation = "flash_attention_2"
        return model

    monkeypatch.setattr(adapter, "load_model", flash)
    with pytest.raises(ValueError, match="flash_attention_2 attention need one row a step, not 4"):
        _train(tmp_path, "flash", tiny_base, tiny_beir, max_steps=1)


def _tiny_decoder(out: Path, tokenizer, model_type: str) -> Path:
    """A random-init OPT or BLOOM: decoders whose attention mask ignores restarting positions."""
    from transformers import AutoConfig

    sizes = {
        "opt": dict(hidden_size=32, ffn_dim=64, word_embed_proj_dim=32, num_attention_heads=4),
        "bloom": dict(hidden_size=32, n_head=4),
    }[model_type]
    config = AutoConfig.for_model(
        model_type,
        vocab_size=len(tokenizer),
        num_hidden_layers=2,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **sizes,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.mark.parametrize(
    "model_type, targets", [("opt", ["q_proj", "v_proj", "fc1"]), ("bloom", ["query_key_value"])]
)
def test_packing_is_refused_where_packed_passages_would_attend_to_each_other(
    tmp_path, tokenizer, tiny_beir, model_type, targets
):
    base = _tiny_decoder(tmp_path / model_type, tokenizer, model_type)
    kw = dict(target_modules=targets, max_steps=2)
    with pytest.raises(
        ValueError,
        match=rf"a {model_type} model lets a packed passage attend.*"
        r"set adapter\.packing: false",
    ):
        _train(tmp_path, "packed", base, tiny_beir, **kw)
    summary, _, weights = _train(tmp_path, "padded", base, tiny_beir, packing=False, **kw)
    assert summary["steps"] == 2 and weights


def _tiny_encoder(out: Path, tokenizer, model_type: str) -> Path:
    """A random-init DeBERTa-v2 (which takes no packed block mask), ModernBERT (whose local
    attention layers would ignore their window under one) or DistilBERT, with a masked-LM head."""
    from transformers import AutoConfig, AutoModelForMaskedLM

    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    sizes = {
        "deberta-v2": dict(relative_attention=True, position_buckets=32, max_relative_positions=-1,
                           pos_att_type=["p2c", "c2p"], position_biased_input=False),
        "modernbert": dict(global_attn_every_n_layers=2, local_attention=8, cls_token_id=bos,
                           sep_token_id=eos, bos_token_id=bos, eos_token_id=eos),
        "distilbert": dict(hidden_dim=64),
        "nomic_bert": {},
    }[model_type]  # fmt: skip
    config = AutoConfig.for_model(
        model_type,
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
        **sizes,
    )
    torch.manual_seed(0)
    AutoModelForMaskedLM.from_config(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.mark.parametrize(
    "model_type, targets, refusal",
    [
        ("deberta-v2", ["query_proj", "value_proj"], "fails on packed rows"),
        ("modernbert", ["Wqkv", "Wi"], "sliding-window"),
    ],
)
def test_packing_is_refused_where_an_encoder_cannot_take_a_packed_mask(
    tmp_path, tokenizer, tiny_beir, model_type, targets, refusal
):
    base = _tiny_encoder(tmp_path / model_type, tokenizer, model_type)
    kw = dict(target_modules=targets, max_steps=2)
    with pytest.raises(
        ValueError, match=rf"a {model_type} model.*{refusal}.*set adapter\.packing: false"
    ):
        _train(tmp_path, "packed", base, tiny_beir, **kw)
    summary, _, weights = _train(tmp_path, "padded", base, tiny_beir, packing=False, **kw)
    assert summary["steps"] == 2 and weights


@pytest.mark.parametrize(
    "model_type, targets",
    [
        ("distilbert", {"q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"}),
        ("modernbert", {"Wqkv", "Wo", "Wi"}),
    ],
)
def test_encoders_bert_names_miss_have_default_targets_of_their_own(
    tmp_path, tokenizer, tiny_beir, model_type, targets
):
    base = _tiny_encoder(tmp_path / model_type, tokenizer, model_type)
    _, _, tensors = _train(tmp_path, "default", base, tiny_beir, packing=False, max_steps=2)
    assert {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in tensors} == targets


def test_an_adapter_on_weights_stored_under_other_names_is_refused_before_training(
    tmp_path, tokenizer, tiny_beir
):
    """nomic-bert stores attn.Wqkv, which transformers splits into q/k/v_proj on loading: Ψ of
    q_proj could not be merged into what Θ stores, so the stage fails before a step."""
    from transformers import CONFIG_MAPPING

    if "nomic_bert" not in CONFIG_MAPPING:
        pytest.skip("this transformers has no nomic_bert")
    base = _tiny_encoder(tmp_path / "nomic", tokenizer, "nomic_bert")
    with pytest.raises(ValueError, match=r"stores no .*q_proj\.weight.*attn\.Wqkv.*alpha: 0"):
        _train(tmp_path, "fused", base, tiny_beir, target_modules=["q_proj"], packing=False)
    assert not (tmp_path / "fused" / "adapter_model.safetensors").exists()


def test_a_model_that_fails_unpacked_too_is_not_blamed_on_packing():
    from types import SimpleNamespace

    from readaptir.packing import causal_inputs
    from readaptir.training import check_passages_kept_apart

    class Broken(torch.nn.Module):
        config = SimpleNamespace(model_type="broken")

        def forward(self, **inputs):
            raise RuntimeError("a device-side assert")

    with pytest.raises(RuntimeError, match="^a device-side assert$"):
        check_passages_kept_apart(Broken(), lambda lay: causal_inputs(lay, True),
                                  vocab_size=50, pad_id=0, device="cpu")  # fmt: skip


def test_the_packing_probe_leaves_training_as_it_was(tmp_path, tiny_base, tiny_beir, monkeypatch):
    """Llama keeps packed passages apart: the probe passes, and the adapter is the one trained
    without it (no random draw, no mode or weight change)."""
    probed = []
    real = adapter_module.check_passages_kept_apart
    monkeypatch.setattr(
        adapter_module, "check_passages_kept_apart", lambda *a, **k: probed.append(real(*a, **k))
    )
    _, _, with_probe = _train(tmp_path, "probed", tiny_base, tiny_beir, dropout=0.1, max_steps=3)
    monkeypatch.setattr(adapter_module, "check_passages_kept_apart", lambda *a, **k: None)
    _, _, without = _train(tmp_path, "unprobed", tiny_base, tiny_beir, dropout=0.1, max_steps=3)
    assert probed == [None] and _same(with_probe, without)


def test_disabling_checkpointing_removes_every_input_gradient_hook(tokenizer):
    """Enabling checkpointing adds a hook, PEFT wrapping the checkpointed model another, and
    transformers keeps the handle of the last one only: disabling leaves none of them."""
    model = AutoModelForCausalLM.from_config(tiny.llama_config(tokenizer))
    for _ in range(2):
        enable_gradient_checkpointing(model)
        wrapped = attach_adapter(model, objective=CAUSAL, method="dora", r=4, lora_alpha=8,
                                 dropout=0.0, target_modules=["q_proj"])  # fmt: skip
        assert len(model.get_input_embeddings()._forward_hooks) == 2
        model = wrapped.unload()
        disable_gradient_checkpointing(model)
        assert not model.get_input_embeddings()._forward_hooks
