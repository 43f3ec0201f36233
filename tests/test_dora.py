import copy

import pytest
import torch
from peft.tuners.lora.dora import DoraLinearLayer
from peft.tuners.lora.layer import Linear as LoraLinear
from transformers import BertConfig, BertForMaskedLM, LlamaForCausalLM

from readaptir import tiny
from readaptir.dora import (
    DoraOutput,
    InputDropout,
    LowRankDoraLinear,
    LowRankNormDora,
    low_rank_row_norm,
    use_fast_dora,
)
from readaptir.lora import dora_update, lora_product
from readaptir.training import attach_adapter

# the layer's own autograd functions run on a GPU too where there is one (bench/device.sh)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def test_low_rank_row_norm_is_the_row_norm_of_w_plus_sba():
    torch.manual_seed(0)
    weight = (torch.randn(96, 64) * 0.02).bfloat16()
    a, b = torch.randn(8, 64) * 0.05, torch.randn(96, 8) * 0.05
    exact = torch.linalg.vector_norm(weight.double() + 1.5 * b.double() @ a.double(), dim=1)
    norm = low_rank_row_norm(weight, a, b, 1.5)
    assert norm.dtype == torch.float32
    torch.testing.assert_close(norm.double(), exact, rtol=1e-6, atol=0)
    # B = 0, as PEFT initialises it: the base weight's own row norms
    start = low_rank_row_norm(weight, a, torch.zeros_like(b), 1.5)
    torch.testing.assert_close(start, torch.linalg.vector_norm(weight.float(), dim=1))


def test_low_rank_row_norm_keeps_float32_under_autocast():
    torch.manual_seed(0)
    weight = (torch.randn(512, 1024) * 0.02).bfloat16()
    a = torch.nn.Linear(1024, 16, bias=False)
    b = torch.nn.Linear(16, 512, bias=False)
    torch.nn.init.normal_(b.weight, std=0.05)
    update = 2 * b.weight.double() @ a.weight.double()
    exact = torch.linalg.vector_norm(weight.double() + update, dim=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = low_rank_row_norm(weight, a.weight, b.weight, 2.0)
        peft = DoraLinearLayer(False)
        peft_norm = peft.get_weight_norm(weight.float(), peft.get_lora_weight(a, b).float(), 2.0)
    ours_error = ((ours.double() - exact) / exact).abs().max()
    peft_error = ((peft_norm.double() - exact) / exact).abs().max()
    assert ours_error < 1e-6 and ours_error < peft_error / 10  # PEFT rounds B·A to bf16


def _train(model, batches, objective_inputs):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    model.train()
    for step, batch in enumerate(batches):
        torch.manual_seed(100 + step)  # dropout draws, the same for both models
        loss = model(**objective_inputs(batch)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _pair(base, **adapter):
    models = []
    for fast in (False, True):
        torch.manual_seed(1)  # the same LoRA A initialisation
        model = attach_adapter(copy.deepcopy(base), method="dora", r=4, lora_alpha=8,
                               fast_dora=fast, **adapter)  # fmt: skip
        models.append(model)
    kinds = [
        {type(m) for m in model.modules() if isinstance(m, DoraLinearLayer | LoraLinear)}
        for model in models
    ]
    assert kinds == [{DoraLinearLayer, LoraLinear}, {LowRankNormDora, LowRankDoraLinear}]
    return models


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_low_rank_norm_trains_peft_s_dora_adapter(tokenizer, dropout):
    torch.manual_seed(0)
    base = LlamaForCausalLM(tiny.llama_config(tokenizer))
    targets = ["q_proj", "v_proj", "down_proj"]
    peft_model, ours = _pair(base, objective="causal", dropout=dropout, target_modules=targets)
    seeds = [torch.Generator().manual_seed(s) for s in range(4)]
    batches = [torch.randint(3, len(tokenizer), (2, 16), generator=g) for g in seeds]
    want = _train(peft_model, batches, lambda ids: dict(input_ids=ids, labels=ids))
    got = _train(ours, batches, lambda ids: dict(input_ids=ids, labels=ids))
    assert want.keys() == got.keys()
    assert any("lora_magnitude_vector" in k for k in got)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5)
    assert ours.state_dict().keys() == peft_model.state_dict().keys()


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_low_rank_norm_on_linear_layers_with_bias(dropout):
    torch.manual_seed(0)
    config = BertConfig(vocab_size=200, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)  # fmt: skip
    base = BertForMaskedLM(config)
    for module in base.modules():
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.normal_(module.bias, std=0.5)  # zero as initialised, which hides them
    targets = ["query", "value", "dense"]
    peft_model, ours = _pair(base, objective="masked", dropout=dropout, target_modules=targets)
    ids = torch.randint(5, 200, (2, 12), generator=torch.Generator().manual_seed(1))
    batches = [ids, ids.flip(0)]
    want = _train(peft_model, batches, lambda x: dict(input_ids=x, labels=x))
    got = _train(ours, batches, lambda x: dict(input_ids=x, labels=x))
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5)


class _OneLayer(torch.nn.Module):
    base_model_prefix = "body"

    def __init__(self, linear: type = torch.nn.Linear):
        super().__init__()
        self.body = torch.nn.ModuleDict({"up": linear(64, 96)})

    def forward(self, x):
        return self.body["up"](x)


class _OtherLinear(torch.nn.Linear):
    """A Linear whose weight may not be what it seems (as a quantized layer's)."""


def _one_dora_layer(dtype=torch.float32, dropout=0.1, trained=True):
    """``_OneLayer`` with a DoRA adapter, its DoRA ``Linear`` and magnitude; ``trained``: B ≠ 0
    and m ≠ ||W + sBA||, as after training."""
    torch.manual_seed(0)
    model = attach_adapter(_OneLayer().to(dtype), objective="masked", method="dora", r=4,
                           lora_alpha=8, dropout=dropout, target_modules=["up"])  # fmt: skip
    (dora,) = [m for m in model.modules() if hasattr(m, "lora_magnitude_vector")]
    magnitude = dora.lora_magnitude_vector["default"]
    torch.nn.init.normal_(dora.lora_B["default"].weight, std=0.05)
    if trained:
        magnitude.weight.data *= torch.rand(96, dtype=magnitude.weight.dtype) + 0.5
    return model, dora, magnitude


def _peft_then_ours(model, dora, magnitude, x, loss, autocast=None):
    """(output, [x's and the parameters' gradients]) under PEFT's classes, then under ours, with
    the same dropout draws; ``autocast``: the device type to compute under bf16 autocast."""
    results = []
    for layer, norm in ((LoraLinear, DoraLinearLayer), (LowRankDoraLinear, LowRankNormDora)):
        dora.__class__, magnitude.__class__ = layer, norm
        torch.manual_seed(1)
        with torch.autocast(autocast or "cpu", dtype=torch.bfloat16, enabled=bool(autocast)):
            out = model(x)
        loss(out).backward()
        grads = [p.grad.clone() for p in [x, *model.parameters()] if p.requires_grad]
        model.zero_grad()
        x.grad = None
        results.append((out, grads))
    return results


@pytest.mark.parametrize("fast_dora", [True, False])
def test_an_untrained_dora_adapter_over_a_bf16_base_changes_nothing(fast_dora):
    """PEFT starts a magnitude at ||W|| taken in bf16: σ = m / ||W + sBA|| would be off 1 by up
    to 2⁻⁸ per row before any step, Ψ a random rescaling of Θ that α carries into every merge."""
    torch.manual_seed(0)
    base = _OneLayer()
    base.body["up"].weight.data *= torch.rand(96, 1) * 4  # rows of different norms
    model = attach_adapter(base.to(torch.bfloat16), objective="masked", method="dora", r=4,
                           lora_alpha=8, dropout=0.0, target_modules=["up"],
                           fast_dora=fast_dora)  # fmt: skip
    (dora,) = [m for m in model.modules() if hasattr(m, "lora_magnitude_vector")]
    weight = dora.get_base_layer().weight.float()
    magnitude = dora.lora_magnitude_vector["default"].weight
    assert magnitude.dtype == torch.float32
    torch.testing.assert_close(magnitude, torch.linalg.vector_norm(weight, dim=1))
    lora = lora_product(dora.lora_A["default"].weight, dora.lora_B["default"].weight, 2.0, False)
    psi = dora_update(weight, lora, magnitude, embedding=False)
    assert psi.abs().max() <= 1e-6 * weight.abs().max()
    x = torch.randn(3, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        adapted = model(x)
        with model.disable_adapter():
            plain = model(x)
    torch.testing.assert_close(adapted.float(), plain.float(), rtol=0.0, atol=1e-2)


def test_linear_subclasses_keep_peft_s_forward():
    model = attach_adapter(_OneLayer(_OtherLinear), objective="masked", method="dora", r=4,
                           lora_alpha=8, dropout=0.0, target_modules=["up"])  # fmt: skip
    kinds = {type(m) for m in model.modules() if isinstance(m, DoraLinearLayer)}
    assert kinds == {DoraLinearLayer}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("train", [True, False])
def test_low_rank_norm_under_bf16_autocast(monkeypatch, train, device):
    # the 7B path: a bf16 base, float32 adapter weights (PEFT copies x to float32 for them, ours
    # keeps it bf16), bf16 compute; in training, dropout makes the layer recompute W·x. PEFT rounds
    # B·A to bf16 before its norm; with that product taken in float32 the two forwards must agree.
    if train and device != "cpu":
        pytest.skip("PEFT's dropout draws on a GPU (torch's fused kernel) are not ours")

    def lora_weight_in_float32(self, lora_A, lora_B, adapter_name=None):
        with torch.autocast(device, enabled=False):
            return lora_B.weight @ lora_A.weight

    monkeypatch.setattr(DoraLinearLayer, "get_lora_weight", lora_weight_in_float32)
    model, dora, magnitude = _one_dora_layer(torch.bfloat16)
    model.train(train).to(device)
    x = torch.randn(2, 5, 64, dtype=torch.bfloat16, device=device, requires_grad=True)
    results = _peft_then_ours(
        model, dora, magnitude, x, lambda out: out.float().square().sum() / 100, autocast=device
    )
    (want, want_grads), (got, got_grads) = results
    assert got.dtype == want.dtype == torch.bfloat16
    # one bf16 rounding of the same float32 sum, taken in another order
    torch.testing.assert_close(got.float(), want.float(), rtol=2**-8, atol=1e-6)
    assert (got == want).float().mean() > 0.95
    x_grad, *param_grads = zip(got_grads, want_grads, strict=True)
    torch.testing.assert_close(*x_grad, rtol=2**-7, atol=1e-4)
    for g, w in param_grads:
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def test_dora_output_gradients():
    torch.manual_seed(0)
    shape = (3, 4, 6)
    result, plain, lora = (torch.randn(shape, dtype=torch.float64, requires_grad=True)
                           for _ in range(3))  # fmt: skip
    sigma = (torch.rand(6, dtype=torch.float64) + 0.5).requires_grad_()
    with_plain = DoraOutput.apply(result, plain, lora, sigma, 1.7)
    torch.testing.assert_close(with_plain, result + (sigma - 1) * plain + sigma * 1.7 * lora)
    assert torch.autograd.gradcheck(
        lambda r, p, lo, s: DoraOutput.apply(r, p, lo, s, 1.7), (result, plain, lora, sigma)
    )
    # no plain product: it is the result itself
    without = DoraOutput.apply(result, None, lora, sigma, 1.7)
    torch.testing.assert_close(without, result + (sigma - 1) * result + sigma * 1.7 * lora)
    assert torch.autograd.gradcheck(
        lambda r, lo, s: DoraOutput.apply(r, None, lo, s, 1.7), (result, lora, sigma)
    )


@pytest.mark.parametrize("device", DEVICES)
def test_dora_output_rounds_once_from_float32(device):
    torch.manual_seed(0)
    result, plain, lora = (torch.randn(64, 96).bfloat16().to(device) for _ in range(3))
    sigma = (torch.rand(96) + 0.5).to(device)
    out = DoraOutput.apply(result, plain, lora, sigma, 2.0)
    exact = (result.double() + (sigma.double() - 1) * plain.double()
             + sigma.double() * 2 * lora.double())  # fmt: skip
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), exact, rtol=2**-8, atol=0)
    # the float32 sum differs from the exact one by float32 rounding: only ties round apart
    assert (out == exact.bfloat16()).float().mean() > 0.99


def test_disabled_or_merged_adapters_take_peft_s_forward():
    model, dora, _ = _one_dora_layer(dropout=0.0, trained=False)
    assert type(dora) is LowRankDoraLinear
    x = torch.randn(3, 64)
    plain = dora.get_base_layer()(x)
    adapted = model(x)
    assert not torch.allclose(adapted, plain)
    with model.disable_adapter():
        torch.testing.assert_close(model(x), plain, rtol=0, atol=0)
    dora.merge()
    torch.testing.assert_close(model(x), adapted, rtol=1e-5, atol=1e-6)


def test_a_peft_dora_forward_with_other_arguments_is_kept(tokenizer, monkeypatch, caplog):
    def forward(self, x, *, lora_A, lora_B, scaling, base_layer, base_result=None, gate=None):
        raise AssertionError("not called here")

    monkeypatch.setattr(DoraLinearLayer, "forward", forward)
    base = LlamaForCausalLM(tiny.llama_config(tokenizer))
    with caplog.at_level("WARNING", logger="readaptir.dora"):
        model = attach_adapter(base, objective="causal", method="dora", r=4, lora_alpha=8,
                               dropout=0.0, target_modules=["q_proj"])  # fmt: skip
    assert "gate" in caplog.text and "not the low-rank norm" in caplog.text
    kinds = {type(m) for m in model.modules() if isinstance(m, DoraLinearLayer)}
    assert kinds == {DoraLinearLayer}


@pytest.mark.parametrize("device", DEVICES)
def test_input_dropout_gives_peft_s_bf16_inputs(device):
    # PEFT drops out a float32 copy of the input, which autocast rounds to bf16 for each product
    x = torch.randn(4, 50, 64, dtype=torch.bfloat16, device=device, requires_grad=True)
    torch.manual_seed(1)
    want = torch.nn.functional.dropout(x.float(), 0.1, training=True).bfloat16()
    torch.manual_seed(1)
    got = InputDropout.apply(x, 0.1)
    assert got.dtype == torch.bfloat16
    kept = got != 0
    assert 0.05 < 1 - kept.float().mean() < 0.15
    # the values PEFT's float32 dropout gives (not 1/(1 − p) rounded to bf16, which differs)
    assert torch.equal(got[kept], (x.float()[kept] * (1 / 0.9)).bfloat16())
    if device == "cpu":  # the same draws as PEFT's too
        assert torch.equal(got, want)
    got.backward(torch.ones_like(got))
    scale = torch.tensor(1 / 0.9).bfloat16()
    assert torch.equal(x.grad, torch.where(kept, scale.to(device), 0).bfloat16())


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_fast_forward_without_autocast_is_peft_s(dtype, dropout):
    # float64 throughout; or a bf16 model whose float32 adapters get a float32 copy of the input
    model, dora, magnitude = _one_dora_layer(dtype, dropout)
    model.train()
    x = torch.randn(2, 5, 64, dtype=dtype, requires_grad=True)
    results = _peft_then_ours(model, dora, magnitude, x, lambda out: out.double().square().sum())
    (want, want_grads), (got, got_grads) = results
    assert got.dtype == want.dtype == dtype
    tolerance = (
        dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=2**-7, atol=1e-5)
    )
    torch.testing.assert_close(got, want, **tolerance)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, **tolerance)


def test_a_dropout_module_in_eval_mode_drops_nothing():
    model, dora, _ = _one_dora_layer(torch.bfloat16, dropout=0.5, trained=False)
    x = torch.randn(2, 5, 64, dtype=torch.bfloat16)
    model.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        evaluated = model(x)
        model.train()
        dora.lora_dropout["default"].eval()  # the layer trains, its dropout does not
        trained = model(x)
    torch.testing.assert_close(trained, evaluated, rtol=2**-7, atol=1e-6)  # one bf16 rounding


def test_several_active_adapters_take_peft_s_layer_forward_with_the_low_rank_norm():
    # PEFT's layer forward sums each active adapter's DoRA term; ours computes each term's norm
    from peft import LoraConfig

    model, dora, magnitude = _one_dora_layer(torch.float64, dropout=0.0)
    model.add_adapter("other", LoraConfig(r=2, lora_alpha=4, target_modules=["up"], use_dora=True))
    torch.nn.init.normal_(dora.lora_B["other"].weight, std=0.05)
    model.base_model.set_adapter(["default", "other"])
    assert use_fast_dora(model) == 1  # the new adapter's magnitude
    other = dora.lora_magnitude_vector["other"]
    x = torch.randn(2, 5, 64, dtype=torch.float64)
    got = model(x)
    magnitude.__class__ = other.__class__ = DoraLinearLayer
    torch.testing.assert_close(got, model(x), rtol=1e-10, atol=1e-12)
