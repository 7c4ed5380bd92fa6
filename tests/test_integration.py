"""Real-model integration: autocast, converters, deterministic SLTrain supports, save/load of converted models.

Models are tiny ``transformers`` LLaMAs built from a config (nothing is downloaded). Autocast results are
checked two ways: exactly against the same op run on inputs cast by hand (what autocast must do), and
within bf16 rounding against the float64 reference on the bf16-rounded inputs.
"""
from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from torch import nn

import lowrank
from lowrank.nn import (MonarchLinear, SLTrainLinear, convert_to_monarch, convert_to_sltrain, load_converted,
                        save_converted)
from lowrank.nn.convert import count_parameters, layer_seed
from lowrank.nn.sltrain import draw_support

from conftest import devices

transformers = pytest.importorskip("transformers")


def tiny_llama(seed: int = 0, tie: bool = True, vocab: int = 64):
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=tie)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg)


def _layers(device):
    torch.manual_seed(1)
    sl = SLTrainLinear(40, 24, rank=6, density=0.1, alpha=12.0, bias=True, device=device)
    with torch.no_grad():
        sl.B.normal_(0, 0.3)  # B starts at zero; make the low-rank path count
    return {
        "monarch": MonarchLinear(48, 80, nblocks=4, device=device, save_middle=False),
        "monarch_saving": MonarchLinear(300, 140, nblocks=4, device=device),  # blocks > 128: keeps the middle on CPU
        "monarch_padded": MonarchLinear(30, 22, nblocks=4, device=device),
        "sltrain": sl,
    }


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# --------------------------------------------------------------------------------------------------------------
# 1. Autocast
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("kind", ["monarch", "monarch_saving", "monarch_padded", "sltrain"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_autocast_module_casts_like_linear(kind, device, dtype):
    layer = _layers(device)[kind]
    x = torch.randn(3, 5, layer.in_features, device=device)
    g = torch.randn(3, 5, layer.out_features, device=device)
    with torch.autocast(device, dtype=dtype):
        y = layer(x)
        lin = nn.Linear(layer.in_features, layer.out_features, device=device)(x)
    assert y.dtype == lin.dtype == dtype
    (y.float() * g).sum().backward()
    grads = {n: p.grad for n, p in layer.named_parameters()}
    assert all(gr.dtype == torch.float32 for gr in grads.values()), {n: gr.dtype for n, gr in grads.items()}

    # exactly what a hand cast gives: the module run in `dtype` on x in `dtype`
    low = copy.deepcopy(layer).to(dtype)
    for p in low.parameters():
        p.grad = None
    y_low = low(x.to(dtype))
    (y_low.float() * g).sum().backward()
    # bit-exact on the CPU; CUDA reductions may be ordered differently between two runs
    exact = {"rtol": 0, "atol": 0} if device == "cpu" else {}
    torch.testing.assert_close(y, y_low, **exact)
    for n, p in low.named_parameters():
        torch.testing.assert_close(grads[n], p.grad.float(), **exact, msg=n)

    # and the float64 reference on the rounded inputs, within low-precision rounding
    ref = copy.deepcopy(low).double()
    for p in ref.parameters():
        p.grad = None
    xr = x.to(dtype).double().requires_grad_()
    bias = ref.bias if ref.bias is not None else 0.0
    y_ref = xr @ ref.to_dense().T + bias
    (y_ref * g.double()).sum().backward()
    err = _rel(y, y_ref)
    print(f"{kind} {dtype}: output rel err {err:.2e}")
    assert err < 1e-2
    for n, p in ref.named_parameters():
        if n == "indices":
            continue
        e = _rel(grads[n], p.grad)
        print(f"  grad {n}: rel err {e:.2e}")
        assert e < 3e-2, n


def test_autocast_op_level_rules():
    """The op's floating inputs follow the region dtype; float64 and integer inputs are left alone, as
    at::autocast's cached_cast does; outside a region nothing is cast."""
    x, w1, w2 = torch.randn(4, 8), torch.randn(2, 4, 4), torch.randn(2, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert lowrank.monarch_matmul(x, w1, w2).dtype == torch.bfloat16
        assert lowrank.monarch_matmul(x.double(), w1.double(), w2.double()).dtype == torch.float64
        A, B, v = torch.randn(2, 8), torch.randn(6, 2), torch.randn(5)
        idx = torch.tensor([0, 7, 9, 20, 47], dtype=torch.int32)
        out = lowrank.sltrain_linear(x, A, B, v, idx, 0.5, torch.randn(6))
        assert out.dtype == torch.bfloat16
        by_keyword = torch.ops.lowrank.sltrain_linear(x, A, B, v, idx, 0.5, bias=torch.randn(6), check=False)
        assert by_keyword.dtype == torch.bfloat16
    assert lowrank.monarch_matmul(x, w1, w2).dtype == torch.float32
    for op in ("monarch_matmul", "monarch_matmul_forward_saving", "sltrain_linear"):
        for key in ("AutocastCPU", "AutocastCUDA"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"lowrank::{op}", key), (op, key)


@pytest.mark.parametrize("kind", ["monarch", "monarch_saving", "sltrain"])
def test_autocast_compiled_fullgraph_equals_eager(kind):
    layer = _layers("cpu")[kind]
    x = torch.randn(2, 7, layer.in_features)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        yc = compiled(x)
    assert yc.dtype == torch.bfloat16
    torch.testing.assert_close(yc, y, rtol=0, atol=0)
    yc.float().sum().backward()
    assert all(p.grad.dtype == torch.float32 for p in layer.parameters())


def test_autocast_tiny_llama_trains():
    model = tiny_llama()
    convert_to_sltrain(model, rank=4, density=0.1, alpha=8.0, target=["self_attn"], seed=0)
    convert_to_monarch(model, nblocks=4, target=["mlp"])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(8):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(ids, labels=ids).loss
        loss.backward()
        assert all(p.grad.dtype == torch.float32 for p in model.parameters() if p.grad is not None)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    print("losses", [f"{v:.3f}" for v in losses])
    assert losses[-1] < losses[0] - 0.2


# --------------------------------------------------------------------------------------------------------------
# 2. Converters
# --------------------------------------------------------------------------------------------------------------
def test_convert_to_monarch_from_dense_keeps_a_monarch_weight():
    """A dense weight that is itself a Monarch matrix is reproduced exactly (the projection is optimal)."""
    src = MonarchLinear(32, 48, nblocks=4)
    model = nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 16))
    with torch.no_grad():
        model[0].weight.copy_(src.to_dense())
    x = torch.randn(5, 32)
    before = model(x)
    report = convert_to_monarch(model, nblocks=4, target=["0"])
    assert isinstance(model[0], MonarchLinear) and isinstance(model[2], nn.Linear)
    assert list(report.replaced) == ["0"] and report.replaced["0"]["type"] == "MonarchLinear"
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)


def test_convert_to_monarch_fresh_init_and_report():
    model = nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 16, bias=False))
    before = count_parameters(model)
    report = convert_to_monarch(model, nblocks=2, from_dense=False)
    assert report.model is model and set(report.replaced) == {"0", "2"} and not report.skipped
    assert model[2].bias is None and model[0].bias is not None and model[0].nblocks == 2
    assert report.params_before == before and report.params_after == count_parameters(model) < before
    assert "replaced 2 linear layers by MonarchLinear" in str(report)


@pytest.mark.parametrize("convert", ["monarch", "sltrain"])
def test_converters_skip_tied_lm_head(convert):
    model = tiny_llama(tie=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    run = {"monarch": lambda m, **kw: convert_to_monarch(m, nblocks=4, **kw),
           "sltrain": lambda m, **kw: convert_to_sltrain(m, rank=4, density=0.1, seed=0, **kw)}[convert]
    report = run(model)
    assert isinstance(model.lm_head, nn.Linear) and model.lm_head.weight is model.model.embed_tokens.weight
    assert list(report.skipped) == ["lm_head"] and "embed_tokens" in report.skipped["lm_head"]
    assert len(report.replaced) == 2 * 7 and "lm_head" not in report.replaced
    print(report)
    untied = tiny_llama(tie=False)
    assert "lm_head" in run(untied).replaced
    forced = tiny_llama(tie=True)
    assert "lm_head" in run(forced, skip_tied=False).replaced
    assert isinstance(forced.model.embed_tokens, nn.Embedding)


def test_converter_skips_multihead_attention_out_proj():
    model = nn.ModuleDict({"attn": nn.MultiheadAttention(16, 2), "fc": nn.Linear(16, 16)})
    report = convert_to_sltrain(model, rank=2, density=0.1)
    assert set(report.replaced) == {"fc"} and "attn.out_proj" in report.skipped


# --------------------------------------------------------------------------------------------------------------
# 3. Deterministic SLTrain support
# --------------------------------------------------------------------------------------------------------------
def test_seeded_support_is_a_pure_function_of_seed_and_shape():
    torch.manual_seed(0)
    a = SLTrainLinear(40, 30, 4, density=0.1, seed=7)
    torch.manual_seed(123)
    torch.randn(1000)
    b = SLTrainLinear(40, 30, 4, density=0.1, seed=7)
    assert torch.equal(a.indices, b.indices)
    assert torch.equal(a.indices, draw_support(30, 40, 0.1, seed=7))
    assert not torch.equal(a.indices, SLTrainLinear(40, 30, 4, density=0.1, seed=8).indices)
    wider = SLTrainLinear(41, 30, 4, density=0.1, seed=7).indices
    assert wider.shape == (123,) and not torch.equal(a.indices, wider[:120])
    # the global RNG is neither read nor advanced by a seeded draw
    torch.manual_seed(5)
    state = torch.random.get_rng_state()
    draw_support(30, 40, 0.1, seed=7)
    assert torch.equal(torch.random.get_rng_state(), state)
    # reset_parameters redraws the same support
    with torch.no_grad():
        a.indices.zero_()
    a.reset_parameters()
    assert torch.equal(a.indices, b.indices)


def test_layer_seed_is_stable():
    """Pinned: the per-layer seed must not change across processes, Python runs or releases (hash() would)."""
    assert layer_seed(0, "model.layers.0.self_attn.q_proj") == layer_seed(0, "model.layers.0.self_attn.q_proj")
    assert layer_seed(0, "a") != layer_seed(0, "b") and layer_seed(0, "a") != layer_seed(1, "a")
    assert layer_seed(42, "model.layers.0.mlp.up_proj") == 5169550288482539431
    assert 0 <= layer_seed(2**40, "x") < 2**63


def test_convert_with_seed_gives_the_same_supports_under_any_global_seed():
    m1, m2 = tiny_llama(seed=1), tiny_llama(seed=2)
    convert_to_sltrain(m1, rank=4, density=0.1, seed=11)
    torch.manual_seed(99)
    convert_to_sltrain(m2, rank=4, density=0.1, seed=11)
    s1 = {n: m.indices for n, m in m1.named_modules() if isinstance(m, SLTrainLinear)}
    s2 = {n: m.indices for n, m in m2.named_modules() if isinstance(m, SLTrainLinear)}
    assert s1.keys() == s2.keys() and len(s1) == 14
    assert all(torch.equal(s1[n], s2[n]) for n in s1)
    q0, q1 = s1["model.layers.0.self_attn.q_proj"], s1["model.layers.1.self_attn.q_proj"]
    assert not torch.equal(q0, q1), "layers of one shape must get different supports"


def test_meta_build_to_empty_reset_parameters_gives_a_valid_support():
    with torch.device("meta"):
        model = tiny_llama()
        convert_to_sltrain(model, rank=4, density=0.1, target=["mlp"], seed=3)
    layer = model.model.layers[0].mlp.up_proj
    assert layer.indices.is_meta
    model.to_empty(device="cpu")
    ids = torch.randint(0, 64, (1, 5))
    with pytest.raises(RuntimeError, match="support is uninitialized"):
        model(ids)
    for m in model.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    eager = tiny_llama()
    convert_to_sltrain(eager, rank=4, density=0.1, target=["mlp"], seed=3)
    assert torch.equal(layer.indices, eager.model.layers[0].mlp.up_proj.indices)
    # (the model's own forward would still see to_empty's garbage in buffers such as LLaMA's rotary inv_freq)
    for m in model.modules():
        if isinstance(m, SLTrainLinear):
            assert m(torch.randn(2, m.in_features)).isfinite().all()


def test_unseeded_meta_layer_needs_reset_or_load():
    layer = SLTrainLinear(16, 12, 2, density=0.2, device="meta").to_empty(device="cpu")
    with pytest.raises(RuntimeError, match="uninitialized"):
        layer(torch.randn(2, 16))
    layer.load_state_dict(SLTrainLinear(16, 12, 2, density=0.2).state_dict())
    assert layer(torch.randn(2, 16)).shape == (2, 12)


def test_moving_a_valid_layer_keeps_it_usable():
    layer = SLTrainLinear(16, 12, 2, density=0.2, seed=1)
    moved = copy.deepcopy(layer).to(torch.float64)
    assert moved(torch.randn(2, 16, dtype=torch.float64)).dtype == torch.float64
    with torch.no_grad():
        layer.indices[1] = layer.indices[0]
    clone = copy.deepcopy(layer)
    clone._apply(lambda t: t.clone())  # a move that makes new tensors re-validates the support
    with pytest.raises(RuntimeError, match="unique"):
        clone(torch.randn(2, 16))


# --------------------------------------------------------------------------------------------------------------
# 4. Save and reload
# --------------------------------------------------------------------------------------------------------------
def _converted_llama():
    model = tiny_llama(seed=0)
    convert_to_sltrain(model, rank=4, density=0.1, alpha=8.0, target=["self_attn"], seed=5)
    convert_to_monarch(model, nblocks=4, target=["mlp"])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)  # a step, so nothing is at its init value
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    model(ids, labels=ids).loss.backward()
    opt.step()
    return model, ids


def test_save_converted_load_converted_round_trip(tmp_path):
    model, ids = _converted_llama()
    save_converted(model, tmp_path)
    recipe = json.loads((tmp_path / "lowrank_recipe.json").read_text())
    assert recipe["modules"]["model.layers.1.self_attn.o_proj"]["type"] == "SLTrainLinear"
    assert recipe["modules"]["model.layers.1.self_attn.o_proj"]["seed"] == layer_seed(5, "model.layers.1.self_attn.o_proj")
    assert recipe["modules"]["model.layers.0.mlp.down_proj"] == {
        "type": "MonarchLinear", "in_features": 48, "out_features": 32, "nblocks": 4, "bias": False,
        "save_middle": None}
    fresh = tiny_llama(seed=9)
    assert load_converted(fresh, tmp_path) is fresh
    assert fresh.lm_head.weight is fresh.model.embed_tokens.weight, "tied weights stay tied"
    for (n, a), (m, b) in zip(model.state_dict().items(), fresh.state_dict().items()):
        assert n == m and torch.equal(a, b), n
    torch.testing.assert_close(fresh(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_load_converted_refuses_another_architecture(tmp_path):
    model, _ = _converted_llama()
    save_converted(model, tmp_path)
    other = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2))
    with pytest.raises(ValueError, match="should be an nn.Linear"):
        load_converted(other, tmp_path)


def test_from_pretrained_alone_does_not_restore_a_converted_model(tmp_path):
    """What the README says: save_pretrained + from_pretrained gives the dense architecture back, with the
    converted layers' weights missing (randomly initialized) — load_converted is the way back."""
    model, ids = _converted_llama()
    model.save_pretrained(tmp_path)
    reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path)
    assert isinstance(reloaded.model.layers[0].mlp.up_proj, nn.Linear)
    assert not torch.allclose(reloaded(ids).logits, model(ids).logits, atol=1e-3)
    fresh = load_converted(transformers.LlamaForCausalLM(model.config), _save(model, tmp_path / "lowrank"))
    torch.testing.assert_close(fresh(ids).logits, model(ids).logits, rtol=0, atol=0)


def _save(model, path):
    save_converted(model, path)
    assert sorted(os.listdir(path)) == ["lowrank_recipe.json", "model.safetensors"]
    return path
