"""Tests of lowrank.nn.IFairyForCausalLM: the whole model against complex arithmetic, KV-cached decoding against
full recomputation, greedy and sampled generation, the in_features record of IFairyLinear, and the sizes of the
700M / 1.3B shapes (built on the meta device: nothing allocated).
"""
from __future__ import annotations

import io
import math

import pytest
import torch

from lowrank.nn import IFairyConfig, IFairyForCausalLM, IFairyLinear
from lowrank.nn.ifairy_model import next_token

from ifairy_complex128 import block_complex128, norm

TINY = dict(hidden_size=32, intermediate_size=48, num_heads=4, vocab_size=50, num_hidden_layers=2,
            max_position_embeddings=64)


def tiny_model(dtype=torch.float64, act_quant=True, seed=0, **overrides) -> IFairyForCausalLM:
    torch.manual_seed(seed)
    model = IFairyForCausalLM(IFairyConfig(**{**TINY, "act_quant": act_quant, **overrides})).to(dtype)
    with torch.no_grad():  # norms away from 1, head larger: every part of the model shows in the logits
        for name, p in model.named_parameters():
            if "weight_real" in name or "weight_imag" in name:
                p.uniform_(0.5, 1.5)
        model.lm_head.weight.normal_(0, 1)
    return model.eval()


def model_complex128(model: IFairyForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    """The same model in torch's complex128 arithmetic, written from the official model (act_quant=False)."""
    cfg = model.config
    x = torch.complex(model.token_embeddings_real.weight.double()[ids],
                      model.token_embeddings_imag.weight.double()[ids])
    for blk in model.layer:
        x = block_complex128(blk, x, cfg.num_heads, cfg.num_key_value_heads, cfg.rope_theta)
    x = norm(model.final_norm, x)
    return torch.cat([x.real, x.imag], -1) @ model.lm_head.weight.double().T


@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
def test_model_matches_complex_arithmetic(kv_heads):
    model = tiny_model(act_quant=False, num_key_value_heads=kv_heads)
    ids = torch.randint(0, 50, (2, 7))
    with torch.inference_mode():
        got = model(ids)
    want = model_complex128(model, ids)
    print("max |logits - complex128|:", (got - want).abs().max().item())
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_default_softmax_scale_is_flash_attentions():
    cfg = IFairyConfig(**TINY)
    assert cfg.softmax_scale == (2 * 8) ** -0.5  # head_dim 8 complex = width 16 in the real attention
    assert IFairyConfig(**TINY, attention_scale=0.25).softmax_scale == 0.25


# (dtype, act_quant, tolerance relative to max |logit|): float64 is exact up to rounding; float32 W2A8 may move
# an int8 activation code by one where the two paths round a value on the other side of .5
DECODE_CASES = [(torch.float64, False, 1e-12), (torch.float64, True, 1e-12), (torch.float32, True, 1e-4)]


@pytest.mark.parametrize("dtype,act_quant,tol", DECODE_CASES, ids=["f64", "f64-W2A8", "f32-W2A8"])
@pytest.mark.parametrize("kv_heads", [4, 1], ids=["mha", "gqa"])
def test_cached_decode_equals_full_recompute(dtype, act_quant, tol, kv_heads):
    model = tiny_model(dtype, act_quant, num_key_value_heads=kv_heads)
    ids = torch.randint(0, 50, (3, 11))
    with torch.inference_mode():
        full = model(ids)
        cache = model.new_cache(3, 16)
        # prefill, a multi-token chunk after cached positions (shifted mask), then one-token steps
        steps = [model(ids[:, :5], cache), model(ids[:, 5:8], cache)]
        steps += [model(ids[:, i:i + 1], cache) for i in range(8, 11)]
    assert cache.length == 11
    inc = torch.cat(steps, 1)
    err = ((inc - full).abs().max() / full.abs().max()).item()
    print(f"{dtype} act_quant={act_quant}: max |cached - full| / max |full| = {err:.2e}")
    assert err <= tol
    assert not torch.equal(full[:, 0], full[:, 1]), "logits must depend on the token"


def test_bfloat16_head():
    """A head held in bfloat16: logits within bfloat16 rounding of the float32 head's, in the activations' dtype,
    the cache still in that dtype, one-token steps (torch.mv) agreeing with the full forward (F.linear)."""
    model = tiny_model(torch.float32)
    ids = torch.randint(0, 50, (2, 6))
    with torch.inference_mode():
        want = model(ids)
        model.lm_head.bfloat16()
        got = model(ids)
        cache = model.new_cache(1, 8)
        steps = torch.cat([model(ids[:1, :5], cache), model(ids[:1, 5:], cache)], 1)
    assert got.dtype == torch.float32 and cache.keys[0].dtype == torch.float32
    err = ((got - want).abs().max() / want.abs().max()).item()
    step_err = ((steps - got[:1]).abs().max() / got.abs().max()).item()
    print(f"bf16 head vs float32 head: {err:.1e}; cached steps vs full: {step_err:.1e}")
    assert 0 < err < 2e-2 and step_err < 1e-2


def test_greedy_generate_equals_argmax_loop_over_full_recomputes():
    model = tiny_model(torch.float64)
    prompt = torch.randint(0, 50, (2, 4))
    got = model.generate(prompt, 12)
    ids = prompt
    with torch.inference_mode():
        for _ in range(12):
            ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], 1)
    assert got.shape == (2, 16) and torch.equal(got[:, :4], prompt)
    assert torch.equal(got, ids)
    assert len(set(got[0, 4:].tolist())) > 1, "a random model should not repeat one token (test sanity)"


def test_sampled_generate_equals_sampling_loop_over_full_recomputes():
    model = tiny_model(torch.float64)
    prompt = torch.randint(0, 50, (2, 3))
    kwargs = dict(do_sample=True, temperature=0.8, top_k=20)
    got = model.generate(prompt, 10, generator=torch.Generator().manual_seed(7), **kwargs)
    gen, ids = torch.Generator().manual_seed(7), prompt
    with torch.inference_mode():
        for _ in range(10):
            ids = torch.cat([ids, next_token(model(ids)[:, -1], generator=gen, **kwargs)[:, None]], 1)
    assert torch.equal(got, ids)
    again = model.generate(prompt, 10, generator=torch.Generator().manual_seed(7), **kwargs)
    other = model.generate(prompt, 10, generator=torch.Generator().manual_seed(8), **kwargs)
    assert torch.equal(got, again) and not torch.equal(got, other)
    top1 = model.generate(prompt, 10, do_sample=True, top_k=1, generator=torch.Generator().manual_seed(8))
    assert torch.equal(top1, model.generate(prompt, 10)), "top_k=1 sampling is greedy"


def test_next_token_top_k_never_leaves_the_top_k():
    logits = torch.randn(64, 30, dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    picks = next_token(logits.repeat(20, 1), do_sample=True, temperature=5.0, top_k=3, generator=gen)
    allowed = logits.topk(3, -1).indices.repeat(20, 1)
    assert (picks[:, None] == allowed).any(-1).all()
    with pytest.raises(ValueError, match="temperature"):
        next_token(logits, do_sample=True, temperature=0.0)


def test_generate_stops_at_eos():
    model = tiny_model(torch.float64)
    prompt = torch.randint(0, 50, (2, 3))
    free = model.generate(prompt, 8)
    eos = int(free[0, 5])  # row 0 makes this token at step 3
    got = model.generate(prompt, 8, eos_token_id=eos)
    row0 = got[0, 3:].tolist()
    first = row0.index(eos)
    assert first <= 2 and all(t == eos for t in row0[first:])
    assert torch.equal(got[:, :3 + first + 1], free[:, :3 + first + 1])
    assert torch.equal(model.generate(prompt, 0), prompt)


def test_bad_calls_raise():
    model = tiny_model(torch.float64)
    cache = model.new_cache(1, 4)
    with pytest.raises(ValueError, match="max_len"):
        model(torch.zeros(1, 5, dtype=torch.long), cache)
    with pytest.raises(ValueError, match="batch"):
        model(torch.zeros(2, 1, dtype=torch.long), cache)
    with pytest.raises(ValueError, match="input_ids"):
        model(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(torch.zeros(1, 2, dtype=torch.long), -1)
    with pytest.raises(ValueError, match="num_heads"):
        IFairyConfig(hidden_size=30, num_heads=4)
    with pytest.raises(ValueError, match="num_key_value_heads"):
        IFairyConfig(hidden_size=32, num_heads=4, num_key_value_heads=3)


def test_model_state_dict_roundtrip():
    model = tiny_model(torch.float32)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    fresh = tiny_model(torch.float32, seed=1)
    fresh.load_state_dict(torch.load(buf))
    ids = torch.randint(0, 50, (1, 6))
    with torch.inference_mode():
        assert torch.equal(fresh(ids), model(ids))


# ------------------------------------------------------------------------------------ in_features in the state
def test_in_features_is_recorded_and_checked_on_load():
    sd = IFairyLinear(130, 8).state_dict()  # packed (8, 33): the same buffer shape as a 129- or 131-input layer
    assert sd["_extra_state"].tolist() == [130]
    for inn in (129, 131, 132):
        layer = IFairyLinear(inn, 8)
        before = layer.packed.clone()
        with pytest.raises(ValueError, match="in_features"):
            layer.load_state_dict(sd)
        assert torch.equal(layer.packed, before), "a refused load must change nothing"
    IFairyLinear(130, 8).load_state_dict(sd)


def test_state_dict_without_in_features_record_still_loads():
    """State dicts saved before the record existed: loaded (strict) with the buffer-shape check only."""
    src = IFairyLinear(130, 8)
    old = {k: v for k, v in src.state_dict().items() if k != "_extra_state"}
    dst = IFairyLinear(130, 8)
    result = dst.load_state_dict(old)
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(dst.packed, src.packed)
    with pytest.raises(ValueError, match="packed"):
        IFairyLinear(135, 8).load_state_dict(old)  # 34 bytes a row: the shape check still holds


def test_random_init_draws_all_codes_and_keeps_padding_zero():
    layer = IFairyLinear(4 * 64 + 3, 64)
    codes = torch.stack([(layer.packed.long() >> (2 * j)) & 3 for j in range(4)], -1).flatten(1)
    assert codes[:, -1].eq(0).all(), "the one padding code of each row is 0"
    counts = torch.bincount(codes[:, :259].flatten(), minlength=4)
    assert (counts > 0.2 * codes[:, :259].numel()).all(), f"codes drawn unevenly: {counts.tolist()}"


# --------------------------------------------------------------------------------------- the released shapes
@pytest.mark.parametrize("name,config,linear_weights", [
    ("700M", IFairyConfig.ifairy_700m(), 679.5e6), ("1.3B", IFairyConfig.ifairy_1p3b(), 1.208e9)])
def test_released_shapes_fit_in_memory(name, config, linear_weights):
    """The complex-weight counts of the two released models, and the bytes our packed model holds: the 1.3B one
    must fit this 24 GiB machine with room to spare (the benchmark builds it packed, never in fp32)."""
    with torch.device("meta"):
        model = IFairyForCausalLM(config)
    linears = [m for m in model.modules() if isinstance(m, IFairyLinear)]
    complex_weights = sum(m.in_features * m.out_features for m in linears)
    assert abs(complex_weights - linear_weights) / linear_weights < 2e-3, complex_weights
    nbytes = sum(t.numel() * t.element_size() for t in model.state_dict().values() if isinstance(t, torch.Tensor))
    packed = sum(m.packed.numel() for m in linears)
    print(f"{name}: {complex_weights / 1e6:.1f}M complex weights, {packed / 2**20:.0f} MiB packed, "
          f"{nbytes / 2**30:.2f} GiB in all (fp32 embeddings and head)")
    assert packed == sum(m.out_features * math.ceil(m.in_features / 4) for m in linears)
    assert nbytes < 2 * 2**30


def test_config_from_official_json():
    official = {"vocab_size": 32002, "hidden_size": 2048, "intermediate_size": 5460, "num_hidden_layers": 24,
                "num_attention_heads": 32, "num_key_value_heads": 32, "rms_norm_eps": 1e-5, "rope_theta": 10000,
                "max_position_embeddings": 2048, "hidden_act": "relu2", "model_type": "complexnet",
                "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False}
    cfg = IFairyConfig.from_official(official)
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_heads, cfg.num_key_value_heads, cfg.head_dim) == \
        (32002, 2048, 32, 32, 64)
    assert IFairyConfig.from_official({}).hidden_size == 1536, "missing keys take ComplexNetConfig's defaults"
    with pytest.raises(ValueError, match="relu2"):
        IFairyConfig.from_official({**official, "hidden_act": "silu"})
    with pytest.raises(ValueError, match="tie_word_embeddings"):
        IFairyConfig.from_official({**official, "tie_word_embeddings": True})


# ------------------------------------------------------------------------------- the bench row and the example
def test_bench_quick_row_and_example_run(capsys):
    import importlib.util
    from pathlib import Path

    from lowrank.bench import family_rows

    rows = list(family_rows("ifairy_model", "cpu", quick=True))
    assert len(rows) == 1 and rows[0]["ok"] and rows[0]["tokens_per_s"] > 0, rows
    assert rows[0]["linears_ms"] > 0 and rows[0]["head_ms"] > 0
    assert list(family_rows("ifairy_model", "cuda", quick=True)) == []
    path = Path(__file__).parent.parent / "examples" / "ifairy_generate.py"
    spec = importlib.util.spec_from_file_location("ifairy_generate", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    threads = torch.get_num_threads()
    try:
        assert example.main(["--size", "tiny", "--new-tokens", "3", "--sample", "--threads", "1"]) == 0
    finally:
        torch.set_num_threads(threads)  # the example sets it for the process
    out = capsys.readouterr().out
    assert "decode: 3 tokens" in out and "tokens/s" in out and "generated: [" in out
