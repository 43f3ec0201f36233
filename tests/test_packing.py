import random

import numpy as np
import pytest
import torch
from transformers import BertConfig, BertForMaskedLM, LlamaForCausalLM

from readaptir import tiny
from readaptir.packing import (
    IGNORE,
    TokenStore,
    block_mask,
    budget_steps,
    causal_inputs,
    check_packed_attention,
    layout,
    mask_tokens,
    masked_inputs,
    pack_boundaries,
    pack_row,
    plan_epoch,
    total_steps,
)
from readaptir.training import position_offset


def _passages(n: int, seed: int, lo: int = 1, hi: int = 40, vocab: int = 250) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(5, vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def test_packing_keeps_every_token_once_in_order_with_positions_reset():
    passages = _passages(300, seed=1)
    bounds = pack_boundaries([len(p) for p in passages], max_length=64)
    assert bounds[0] == 0 and bounds[-1] == len(passages)
    stream = []
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        ids, positions, segments = pack_row(passages[start:end])
        assert len(ids) <= 64
        if end < len(passages):  # greedy: the next passage would not have fitted
            assert len(ids) + len(passages[end]) > 64
        stream.extend(ids)
        for k, passage in enumerate(passages[start:end]):
            at = segments.index(k)
            assert positions[at : at + len(passage)] == list(range(len(passage)))
    assert stream == [t for p in passages for t in p]
    with pytest.raises(ValueError, match="more than max_length"):
        pack_boundaries([3, 65], max_length=64)


def test_token_store_and_epoch_plans():
    passages = _passages(50, seed=2)
    store = TokenStore.from_chunks([passages[:20], passages[20:]])
    assert len(store) == 50 and [store[i].tolist() for i in range(50)] == passages
    lengths = store.lengths
    plan = plan_epoch(lengths, seed=0, epoch=0, max_length=64, rows_per_step=3, packing=True)
    again = plan_epoch(lengths, seed=0, epoch=0, max_length=64, rows_per_step=3, packing=True)
    other = plan_epoch(lengths, seed=0, epoch=1, max_length=64, rows_per_step=3, packing=True)
    assert np.array_equal(plan.order, again.order) and not np.array_equal(plan.order, other.order)
    seen = [int(i) for k in range(plan.steps) for row in plan.step_rows(k) for i in row]
    assert seen == plan.order.tolist() and plan.steps == -(-plan.rows // 3)
    padded = plan_epoch(lengths, seed=0, epoch=0, max_length=64, rows_per_step=4, packing=False)
    assert padded.steps == 13 and all(len(row) == 1 for row in padded.step_rows(0))
    assert total_steps([padded, padded], epochs=1.5, max_steps=None) == 13 + 7
    assert total_steps([padded, padded], epochs=2, max_steps=5) == 5


def _forward(model, **inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_llama_equals_passages_run_alone(tokenizer, attention):
    torch.manual_seed(0)
    config = tiny.llama_config(tokenizer, attn_implementation=attention)
    model = LlamaForCausalLM(config).eval()
    passages = _passages(5, seed=3, lo=3, hi=12, vocab=len(tokenizer))
    rows = [passages[:3], passages[3:]]  # the second row ends in padding
    lay = layout(rows, tokenizer.pad_token_id)
    packed = causal_inputs(lay, packed=True)
    assert "attention_mask" not in packed
    inputs = {k: v for k, v in packed.items() if k != "labels"}
    logits = _forward(model, **inputs)
    for r, row in enumerate(rows):
        at = 0
        for passage in row:
            alone = _forward(model, input_ids=torch.tensor([passage]))[0]
            torch.testing.assert_close(logits[r, at : at + len(passage)], alone, atol=1e-5, rtol=0)
            at += len(passage)
    # the loss over a packed batch is the loss over the same passages padded one per row
    loss = model(**packed).loss
    padded = causal_inputs(layout([[p] for p in passages], tokenizer.pad_token_id), packed=False)
    torch.testing.assert_close(loss, model(**padded).loss, atol=1e-5, rtol=0)
    # controls: without the position reset, or with a KV cache, later passages see earlier ones
    cached = _forward(model, **dict(inputs, use_cache=True))
    assert not torch.allclose(cached[0, len(passages[0]) :], logits[0, len(passages[0]) :])
    plain = _forward(model, input_ids=packed["input_ids"], use_cache=False)
    assert not torch.allclose(plain[0, len(passages[0]) :], logits[0, len(passages[0]) :])


def _tiny_encoder(config_class, model_class, tokenizer, positions: int) -> torch.nn.Module:
    torch.manual_seed(0)
    config = config_class(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=positions,
        pad_token_id=tokenizer.pad_token_id,
    )
    return model_class(config).eval()


def test_packed_bert_with_block_mask_equals_passages_run_alone(tokenizer):
    model = _tiny_encoder(BertConfig, BertForMaskedLM, tokenizer, positions=128)
    passages = _passages(4, seed=4, lo=3, hi=12, vocab=len(tokenizer))
    rows = [passages, passages[2:]]  # the second row is padded: no passage sees its padding
    lay = layout(rows, tokenizer.pad_token_id)
    mask = block_mask(lay.segments, torch.float32)
    logits = _forward(model, input_ids=lay.ids, position_ids=lay.positions, attention_mask=mask)
    for r, row in enumerate(rows):
        at = 0
        for passage in row:
            alone = _forward(model, input_ids=torch.tensor([passage]))[0]
            got = logits[r, at : at + len(passage)]
            torch.testing.assert_close(got, alone, atol=1e-5, rtol=0)
            at += len(passage)


def test_packed_roberta_numbers_positions_from_its_padding_index(tokenizer):
    from transformers import RobertaConfig, RobertaForMaskedLM

    model = _tiny_encoder(RobertaConfig, RobertaForMaskedLM, tokenizer, positions=130)
    assert position_offset(model) == tokenizer.pad_token_id + 1
    passages = _passages(3, seed=5, lo=3, hi=12, vocab=len(tokenizer))
    lay = layout([passages], tokenizer.pad_token_id)
    inputs = masked_inputs(
        lay,
        True,
        special_ids=[tokenizer.pad_token_id],
        mask_id=4,
        vocab_size=len(tokenizer),
        generator=torch.Generator().manual_seed(0),
        position_offset=position_offset(model),
    )
    inputs.pop("labels")
    logits = _forward(model, **inputs)
    at = 0
    for passage in passages:  # alone, RoBERTa numbers the positions itself
        alone = _forward(model, input_ids=inputs["input_ids"][:, at : at + len(passage)])[0]
        torch.testing.assert_close(logits[0, at : at + len(passage)], alone, atol=1e-5, rtol=0)
        at += len(passage)


def test_mask_tokens_is_seeded_and_follows_bert():
    ids = torch.randint(10, 1000, (64, 256))
    maskable = torch.rand(ids.shape, generator=torch.Generator().manual_seed(1)) < 0.9
    args = dict(mask_id=3, vocab_size=1000)
    inputs, labels = mask_tokens(ids, maskable, generator=torch.Generator().manual_seed(0), **args)
    again, _ = mask_tokens(ids, maskable, generator=torch.Generator().manual_seed(0), **args)
    assert torch.equal(inputs, again)
    chosen = labels != IGNORE
    assert not (chosen & ~maskable).any() and torch.equal(labels[chosen], ids[chosen])
    assert torch.equal(inputs[~chosen], ids[~chosen])
    share = chosen.sum() / maskable.sum()
    assert 0.14 < share < 0.16
    masked = (inputs[chosen] == 3).float().mean()
    kept = (inputs[chosen] == ids[chosen]).float().mean()
    assert 0.78 < masked < 0.82 and 0.08 < kept < 0.12
    # never a target-free batch
    one = torch.zeros((1, 4), dtype=torch.bool)
    one[0, 2] = True
    _, labels = mask_tokens(ids[:1, :4], one, generator=torch.Generator().manual_seed(0), **args)
    assert (labels != IGNORE).tolist() == [[False, False, True, False]]


def test_padded_steps_under_a_token_budget():
    # rows padded to the step's longest: 3 rows of ≤ 10 fit 30; 40 then starts a step alone
    assert budget_steps([10, 8, 9, 40, 5, 5, 5], 30).tolist() == [0, 3, 4, 7]
    assert budget_steps([50, 5], 30).tolist() == [0, 1, 2]  # an over-long row still makes a step
    assert budget_steps([], 30).tolist() == [0]  # no rows, no step
    lengths = np.asarray([len(p) for p in _passages(50, seed=3)])
    plan = plan_epoch(lengths, seed=0, epoch=0, max_length=64, rows_per_step=4, packing=False,
                      batch_tokens=100)  # fmt: skip
    seen = []
    for k in range(plan.steps):
        rows = plan.step_rows(k)
        assert len(rows) * max(int(lengths[r].sum()) for r in rows) <= 100 or len(rows) == 1
        seen += [int(i) for row in rows for i in row]
    assert sorted(seen) == list(range(50))


def test_fractional_epochs_take_their_share_of_steps_despite_float_error():
    plans = [plan_epoch(np.full(10, 8), seed=0, epoch=e, max_length=8, rows_per_step=1,
                        packing=True) for e in range(3)]  # fmt: skip
    assert plans[0].steps == 10
    assert total_steps(plans[:2], 1.1, None) == 11  # 1.1 - 1 is 0.10000000000000009
    assert total_steps(plans[:1], 0.3, None) == 3  # 0.3 × 10 is 3.0000000000000004
    assert total_steps(plans[:2], 1.15, None) == 12  # a started step still counts
    assert total_steps(plans, 2.7, None) == 27 and total_steps(plans, 2.7, 5) == 5


def test_flash_attention_takes_one_packed_row_a_step():
    for implementation in ("flash_attention_2", "kernels-community/flash-attn3"):
        with pytest.raises(ValueError, match="need one row a step, not 2"):
            check_packed_attention(implementation, 2)
        check_packed_attention(implementation, 1)  # position ids mark the passages (varlen)
    check_packed_attention("sdpa", 4)
    check_packed_attention(None, 4)
