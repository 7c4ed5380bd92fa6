"""Tests of lowrank.formats for iFairy: the official checkpoint layout (a random latent model saved as the official
code names and shapes it, loaded with PhaseQuant, checked against the official forward written here from the
latent tensors) and the GGUF export in ifairy.cpp's IFAIRY block type (written with the gguf package, read back
with gguf.GGUFReader, blocks decoded and compared code for code; the byte positions checked against the layout
of ifairy.cpp's ggml-quants.c written out independently below; a padded FFN checked to compute our MLP's function
by an emulation of ifairy.cpp's FFN on the file's tensors).
"""
from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import lowrank
from lowrank.formats import (IFAIRY_TYPE, export_ifairy_gguf, ifairy_blocks, ifairy_codes_from_blocks,
                             load_ifairy_gguf, load_official_ifairy, read_ifairy_gguf)
from lowrank.nn import IFairyConfig, IFairyForCausalLM, IFairyLinear

OFFICIAL_CONFIG = {"model_type": "complexnet", "vocab_size": 40, "hidden_size": 32, "intermediate_size": 48,
                   "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                   "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
                   "hidden_act": "relu2", "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2}


def official_latent_state_dict(cfg: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random ``ComplexNetLM`` state dict: names and shapes as the official modeling code creates them."""
    g = torch.Generator().manual_seed(seed)
    h, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = cfg["num_key_value_heads"] * h // cfg["num_attention_heads"]
    sd = {"token_embeddings_real.weight": torch.randn(v, h, generator=g),
          "token_embeddings_imag.weight": torch.randn(v, h, generator=g)}

    def linear(name, out, inn):
        for part in ("real", "imag"):
            sd[f"{name}.weight_{part}"] = torch.randn(out, inn, generator=g) * 0.02

    def norm(name, size):
        for part in ("real", "imag"):
            sd[f"{name}.weight_{part}"] = torch.rand(size, generator=g) + 0.5

    for i in range(cfg["num_hidden_layers"]):
        p = f"layer.{i}"
        norm(f"{p}.pre_layernorm", h)
        linear(f"{p}.self_attn.q_proj", h, h)
        linear(f"{p}.self_attn.k_proj", kv, h)
        linear(f"{p}.self_attn.v_proj", kv, h)
        linear(f"{p}.self_attn.o_proj", h, h)
        norm(f"{p}.self_attn.attn_layernorm", h)
        norm(f"{p}.post_layernorm", h)
        linear(f"{p}.mlp.gate_proj", f, h)
        linear(f"{p}.mlp.up_proj", f, h)
        linear(f"{p}.mlp.down_proj", h, f)
        norm(f"{p}.mlp.ffn_layernorm", f)
    norm("final_norm", h)
    sd["lm_head.weight"] = torch.randn(v, 2 * h, generator=g)
    return sd


def official_logits(sd: dict, cfg: dict, ids: torch.Tensor, act_quant: bool) -> torch.Tensor:
    """ComplexNetLM's forward from its latent state dict, float64: PhaseQuant (DirectionQuantSTE), per-token
    per-part 8-bit fake activation quantization, complex RoPE, Re(q·conj(k)) attention at flash-attention's
    scale, ReLU² gating, the two sub-norms, the real head on cat([re, im])."""
    sd = {k: v.double() for k, v in sd.items()}
    h, heads, kvh = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d, eps = h // heads, cfg["rms_norm_eps"]

    def phase_quant(wr, wi):
        phase = torch.atan2(wi, wr)
        re_pos = (phase >= -math.pi / 4) & (phase < math.pi / 4)
        re_neg = (phase >= 3 * math.pi / 4) | (phase < -3 * math.pi / 4)
        im_pos = (phase >= math.pi / 4) & (phase < 3 * math.pi / 4)
        im_neg = (phase >= -3 * math.pi / 4) & (phase < -math.pi / 4)
        s_re = wr[re_pos | re_neg].abs().mean().clamp(min=1e-5)
        s_im = wi[im_pos | im_neg].abs().mean().clamp(min=1e-5)
        return ((re_pos.double() - re_neg.double()) * s_re, (im_pos.double() - im_neg.double()) * s_im)

    def act(x):
        if not act_quant:
            return x
        a = 127.0 / x.float().abs().amax(-1, keepdim=True).clamp(min=1e-5)
        return ((x.float() * a).round().clamp(-128, 127) / a).double()

    def linear(name, xr, xi):
        wr, wi = phase_quant(sd[f"{name}.weight_real"], sd[f"{name}.weight_imag"])
        xr, xi = act(xr), act(xi)
        return xr @ wr.T + xi @ wi.T, xr @ wi.T - xi @ wr.T

    def norm(name, xr, xi):
        inv = torch.rsqrt((xr ** 2 + xi ** 2).mean(-1, keepdim=True) + eps)
        return sd[f"{name}.weight_real"] * xr * inv, sd[f"{name}.weight_imag"] * xi * inv

    b, t = ids.shape
    xr, xi = sd["token_embeddings_real.weight"][ids], sd["token_embeddings_imag.weight"][ids]
    theta = torch.arange(t, dtype=torch.float64)[:, None] / cfg["rope_theta"] ** (torch.arange(d) / d)
    cos, sin = theta.cos(), theta.sin()
    for i in range(cfg["num_hidden_layers"]):
        p = f"layer.{i}"
        nr, ni = norm(f"{p}.pre_layernorm", xr, xi)

        def split(pair, n):
            return [z.view(b, t, n, d).transpose(1, 2).repeat_interleave(heads // n, 1) for z in pair]

        qr, qi = split(linear(f"{p}.self_attn.q_proj", nr, ni), heads)
        kr, ki = split(linear(f"{p}.self_attn.k_proj", nr, ni), kvh)
        vr, vi = split(linear(f"{p}.self_attn.v_proj", nr, ni), kvh)
        qr, qi = qr * cos - qi * sin, qr * sin + qi * cos
        kr, ki = kr * cos - ki * sin, kr * sin + ki * cos
        scores = (qr @ kr.transpose(-1, -2) + qi @ ki.transpose(-1, -2)) / math.sqrt(2 * d)
        probs = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
        o = [(probs @ z).transpose(1, 2).reshape(b, t, h) for z in (vr, vi)]
        ar, ai = linear(f"{p}.self_attn.o_proj", *norm(f"{p}.self_attn.attn_layernorm", *o))
        xr, xi = xr + ar, xi + ai
        nr, ni = norm(f"{p}.post_layernorm", xr, xi)
        gr, gi = linear(f"{p}.mlp.gate_proj", nr, ni)
        both_neg = (gr < 0) & (gi < 0)
        gr, gi = gr.masked_fill(both_neg, 0) ** 2, gi.masked_fill(both_neg, 0) ** 2
        ur, ui = linear(f"{p}.mlp.up_proj", nr, ni)
        mr, mi = linear(f"{p}.mlp.down_proj", *norm(f"{p}.mlp.ffn_layernorm", gr * ur + gi * ui, gr * ui - gi * ur))
        xr, xi = xr + mr, xi + mi
    xr, xi = norm("final_norm", xr, xi)
    return torch.cat([xr, xi], -1) @ sd["lm_head.weight"].T


def write_official(tmp_path, sd, cfg=OFFICIAL_CONFIG, shards: int = 1):
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    if shards == 1:
        save_file(sd, str(tmp_path / "model.safetensors"))
        return tmp_path
    names = sorted(sd)
    weight_map = {}
    for s in range(shards):
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: sd[n] for n in names[s::shards]}
        save_file(part, str(tmp_path / file))
        weight_map.update({n: file for n in part})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return tmp_path


# (load dtype, act_quant, tolerance relative to max |logit|): float32 W2A8 can move an activation code by one
LOAD_CASES = [(torch.float64, False, 1e-5), (torch.float32, True, 2e-3)]


@pytest.mark.parametrize("dtype,act_quant,tol", LOAD_CASES, ids=["f64", "f32-W2A8"])
@pytest.mark.parametrize("shards", [1, 2], ids=["single", "sharded"])
def test_official_checkpoint_loads_and_matches_official_forward(tmp_path, dtype, act_quant, tol, shards):
    sd = official_latent_state_dict(OFFICIAL_CONFIG)
    files = dict(sd, **{"layer.0.self_attn.rotary_emb.inv_freq": torch.ones(4)})  # non-persistent: ignored
    model = load_official_ifairy(write_official(tmp_path, files, shards=shards), act_quant=act_quant, dtype=dtype)
    assert model.config.num_key_value_heads == 2 and model.config.act_quant == act_quant
    for i, block in enumerate(model.layer):
        for name in ("self_attn.q_proj", "self_attn.k_proj", "mlp.down_proj"):
            layer = block.get_submodule(name)
            packed, scales = lowrank.ifairy_quantize(sd[f"layer.{i}.{name}.weight_real"],
                                                     sd[f"layer.{i}.{name}.weight_imag"])
            assert torch.equal(layer.packed, packed) and torch.equal(layer.scales, scales)
            assert layer.state_dict()["_extra_state"].tolist() == [sd[f"layer.{i}.{name}.weight_real"].shape[1]]
        assert torch.equal(block.input_layernorm.weight_real, sd[f"layer.{i}.pre_layernorm.weight_real"].to(dtype))
        assert torch.equal(block.post_attention_layernorm.weight_imag,
                           sd[f"layer.{i}.post_layernorm.weight_imag"].to(dtype))
    ids = torch.randint(0, 40, (2, 6))
    with torch.inference_mode():
        got = model(ids)
    want = official_logits(sd, OFFICIAL_CONFIG, ids, act_quant)
    err = ((got.double() - want).abs().max() / want.abs().max()).item()
    print(f"loaded {dtype} act_quant={act_quant}: max |logits - official| / max = {err:.2e}")
    assert err <= tol


def test_official_loader_rejects_wrong_checkpoints(tmp_path):
    sd = official_latent_state_dict(OFFICIAL_CONFIG)
    cases = {
        "missing": ({k: v for k, v in sd.items() if k != "layer.1.mlp.up_proj.weight_imag"},
                    "layer.1.mlp.up_proj.weight_imag"),
        "unexpected": ({**sd, "layer.0.extra.weight": torch.zeros(2)}, "layer.0.extra.weight"),
        "shape": ({**sd, "layer.0.self_attn.k_proj.weight_real": torch.zeros(32, 32)}, "k_proj"),
    }
    for case, (bad, name) in cases.items():
        path = tmp_path / case
        path.mkdir()
        with pytest.raises(ValueError, match=name):
            load_official_ifairy(write_official(path, bad))
    with pytest.raises(FileNotFoundError):
        load_official_ifairy(tmp_path / "no_such_dir")


# ----------------------------------------------------------------------------------------------------- GGUF
def ggml_ifairy_position(idx: int) -> tuple[int, int]:
    """(byte offset in the row, bit shift) of weight ``idx`` of a row, from ifairy.cpp ggml-quants.c
    (quantize_row_ifairy_ref: chunk = idx/64, part = (idx/16)%4, lane = idx%16, qs[chunk*16 + lane] <<= 2*part;
    68-byte blocks of 256 weights: qs[64], fp16 d_real, fp16 d_imag)."""
    block, within = divmod(idx, 256)
    return block * 68 + (within // 64) * 16 + within % 16, 2 * ((within // 16) % 4)


def layer_with_codes(codes: torch.Tensor, scales=(0.375, 1.25)) -> IFairyLinear:
    out, inn = codes.shape
    layer = IFairyLinear(inn, out)
    padded = torch.nn.functional.pad(codes, (0, (-inn) % 4)).view(out, -1, 4)
    layer.packed.copy_((padded << (2 * torch.arange(4))).sum(-1).to(torch.uint8))
    layer.scales.copy_(torch.tensor(scales))
    return layer


def test_ifairy_block_bytes_follow_ggml_layout():
    codes = torch.randint(0, 4, (3, 512))
    blocks = ifairy_blocks(layer_with_codes(codes))
    assert blocks.dtype == np.uint8 and blocks.shape == (3, 2 * 68)
    for row in range(3):
        for idx in range(512):
            byte, shift = ggml_ifairy_position(idx)
            assert (blocks[row, byte] >> shift) & 3 == codes[row, idx], (row, idx)
    for block in range(2):
        d = blocks[:, block * 68 + 64: block * 68 + 68].copy().view(np.float16)
        assert (d == np.array([0.375, 1.25], dtype=np.float16)).all()
    decoded, scales = ifairy_codes_from_blocks(blocks, 512)
    assert np.array_equal(decoded, codes.numpy()) and scales.shape == (3, 2, 2)
    with pytest.raises(ValueError, match="256"):
        ifairy_blocks(IFairyLinear(5460, 4))


def tiny_gguf_model(seed=0, **overrides) -> IFairyForCausalLM:
    """Random, with what ifairy.cpp computes: softmax scale 1/√head_dim (64 here), RoPE base 10000."""
    torch.manual_seed(seed)
    cfg = dict(hidden_size=256, intermediate_size=512, num_heads=4, num_key_value_heads=2, vocab_size=48,
               num_hidden_layers=2, max_position_embeddings=128, attention_scale=1 / 8)
    model = IFairyForCausalLM(IFairyConfig(**{**cfg, **overrides}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "weight_real" in name or "weight_imag" in name:
                p.uniform_(0.5, 1.5)
        for layer in (m for m in model.modules() if isinstance(m, IFairyLinear)):
            layer.scales.uniform_(0.01, 0.1)
    return model.eval()


def test_gguf_export_reads_back_code_for_code(tmp_path):
    model = tiny_gguf_model()
    path = tmp_path / "tiny.gguf"
    export_ifairy_gguf(model, path, name="tiny")
    reader = read_ifairy_gguf(path)

    def field(key):
        f = reader.fields[key]
        return f.contents()

    assert field("general.architecture") == "ifairy" and field("general.name") == "tiny"
    assert field("general.file_type") == 40
    assert (field("ifairy.embedding_length"), field("ifairy.feed_forward_length"), field("ifairy.block_count"),
            field("ifairy.attention.head_count"), field("ifairy.attention.head_count_kv"),
            field("ifairy.vocab_size")) == (256, 512, 2, 4, 2, 48)
    assert field("ifairy.attention.scale") == pytest.approx(model.config.softmax_scale)
    tensors = {t.name: t for t in reader.tensors}
    names = {"token_embd", "output_norm", "output"} | {f"blk.{i}.{n}" for i in range(2) for n in (
        "attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "attn_sub_norm", "ffn_norm", "ffn_gate",
        "ffn_up", "ffn_down", "ffn_sub_norm")}
    assert set(tensors) == names
    linears = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
               "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
               "ffn_down": "mlp.down_proj"}
    norms = {"attn_norm": "input_layernorm", "attn_sub_norm": "self_attn.attn_layernorm",
             "ffn_norm": "post_attention_layernorm", "ffn_sub_norm": "mlp.ffn_layernorm"}
    for i, block in enumerate(model.layer):
        for theirs, ours in linears.items():
            t, layer = tensors[f"blk.{i}.{theirs}"], block.get_submodule(ours)
            assert int(t.tensor_type) == IFAIRY_TYPE
            assert list(t.shape) == [layer.in_features, layer.out_features]  # ggml order: ne0 = row length
            codes, scales = ifairy_codes_from_blocks(np.array(t.data), layer.in_features)
            unpacked = torch.stack([(layer.packed.long() >> (2 * j)) & 3 for j in range(4)], -1).flatten(1)
            assert np.array_equal(codes, unpacked[:, :layer.in_features].numpy()), f"blk.{i}.{theirs} codes"
            want = layer.scales.to(torch.float16).numpy()
            assert (scales == want).all(), f"blk.{i}.{theirs} scales"
        for theirs, ours in norms.items():
            norm = block.get_submodule(ours)
            assert np.array_equal(np.array(tensors[f"blk.{i}.{theirs}"].data),
                                  torch.cat([norm.weight_real, norm.weight_imag]).detach().numpy())
    pairs = np.array(tensors["token_embd"].data).view(np.uint32)
    assert pairs.shape == (48, 256)
    for part, bits in (("real", pairs & 0xFFFF), ("imag", pairs >> 16)):
        got = torch.from_numpy(bits.astype(np.int32)).to(torch.int16).view(torch.bfloat16)
        emb = getattr(model, f"token_embeddings_{part}").weight.detach().to(torch.bfloat16)
        assert torch.equal(got, emb), part
    assert np.array_equal(np.array(tensors["output"].data), model.lm_head.weight.detach().numpy())


def test_gguf_round_trip_model(tmp_path):
    """export -> load gives the model ifairy.cpp runs: ours with scales in fp16 and embeddings in bf16."""
    model = tiny_gguf_model()
    export_ifairy_gguf(model, tmp_path / "m.gguf")
    back = load_ifairy_gguf(tmp_path / "m.gguf")
    as_in_file(model)
    ours, theirs = model.state_dict(), back.state_dict()
    assert set(ours) == set(theirs)
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
    ids = torch.randint(0, 48, (1, 5))
    with torch.inference_mode():
        assert torch.equal(back(ids), model(ids))


def as_in_file(model):
    """``model`` with its scales rounded to fp16 and embeddings to bf16, as the GGUF holds them."""
    with torch.no_grad():
        for layer in (m for m in model.modules() if isinstance(m, IFairyLinear)):
            layer.scales.copy_(layer.scales.half().float())
        for emb in (model.token_embeddings_real, model.token_embeddings_imag):
            emb.weight.copy_(emb.weight.bfloat16().float())
    return model


def unpacked(layer):
    return torch.stack([(layer.packed.long() >> (2 * j)) & 3 for j in range(4)], -1).flatten(1)[:, :layer.in_features]


def test_gguf_padded_ffn_header_and_tensors(tmp_path):
    """intermediate_size 300 -> 512 in the file: extra gate/up rows with zero scales in every block, extra down
    columns, ffn_sub_norm weights times √(300/512) and zero-padded, the true width recorded."""
    model = tiny_gguf_model(intermediate_size=300, num_hidden_layers=1)
    export_ifairy_gguf(model, tmp_path / "p.gguf")
    reader = read_ifairy_gguf(tmp_path / "p.gguf")
    assert reader.fields["ifairy.feed_forward_length"].contents() == 512
    assert reader.fields["lowrank.ifairy.intermediate_size"].contents() == 300
    tensors = {t.name: t for t in reader.tensors}
    mlp = model.layer[0].mlp
    for theirs, layer in (("ffn_gate", mlp.gate_proj), ("ffn_up", mlp.up_proj)):
        t = tensors[f"blk.0.{theirs}"]
        assert list(t.shape) == [256, 512]
        codes, scales = ifairy_codes_from_blocks(np.array(t.data), 256)
        assert np.array_equal(codes[:300], unpacked(layer).numpy())
        assert (scales[:300] == layer.scales.half().numpy()).all() and (scales[300:] == 0).all(), theirs
    t = tensors["blk.0.ffn_down"]
    assert list(t.shape) == [512, 256]
    codes, scales = ifairy_codes_from_blocks(np.array(t.data), 512)
    assert np.array_equal(codes[:, :300], unpacked(mlp.down_proj).numpy())
    assert (scales == mlp.down_proj.scales.half().numpy()).all()
    sub = np.array(tensors["blk.0.ffn_sub_norm"].data)
    factor = math.sqrt(300 / 512)
    assert sub.shape == (1024,)
    for part, w in ((0, mlp.ffn_layernorm.weight_real), (512, mlp.ffn_layernorm.weight_imag)):
        assert np.array_equal(sub[part:part + 300], (w.detach().double() * factor).float().numpy())
        assert (sub[part + 300:part + 512] == 0).all()
    attn_sub = np.array(tensors["blk.0.attn_sub_norm"].data)  # hidden-sized norms are not touched
    assert attn_sub.shape == (512,) and attn_sub[0] == model.layer[0].self_attn.attn_layernorm.weight_real[0].item()


def ifairy_cpp_ffn(tensors, eps, xr, xi, sub_norm_factor=1.0):
    """ifairy.cpp's FFN on the file's tensors, float64: every IFAIRY block dequantized with its own scales (as
    every ifairy.cpp consumer does), the RMS norm over the file's width with the file's ffn_sub_norm weights
    (times ``sub_norm_factor``). The complex arithmetic is our model's (y = W·conj(x), ReLU² gate,
    conj(g) ⊙ up): this checks the padding, not ifairy.cpp's complex conventions."""
    def weight(name):
        blocks = np.array(tensors[name].data)
        codes, scales = ifairy_codes_from_blocks(blocks, blocks.shape[1] // 68 * 256)
        c = torch.from_numpy(codes.astype(np.int64))
        d = torch.from_numpy(scales.astype(np.float64)).repeat_interleave(256, 1)  # (out, in, 2): block scales
        return d[..., 0] * ((c == 1).double() - (c == 0).double()), d[..., 1] * ((c == 3).double() - (c == 2).double())

    def linear(name, xr, xi):
        wr, wi = weight(name)
        return xr @ wr.T + xi @ wi.T, xr @ wi.T - xi @ wr.T

    gr, gi = linear("blk.0.ffn_gate", xr, xi)
    keep = ~((gr < 0) & (gi < 0))
    gr, gi = (gr * keep) ** 2, (gi * keep) ** 2
    ur, ui = linear("blk.0.ffn_up", xr, xi)
    hr, hi = gr * ur + gi * ui, gr * ui - gi * ur
    w = torch.from_numpy(np.array(tensors["blk.0.ffn_sub_norm"].data)).double() * sub_norm_factor
    inv = torch.rsqrt((hr ** 2 + hi ** 2).mean(-1, keepdim=True) + eps)
    return linear("blk.0.ffn_down", w[:w.numel() // 2] * hr * inv, w[w.numel() // 2:] * hi * inv)


def test_gguf_padded_ffn_computes_our_mlp(tmp_path):
    """The padded FFN as ifairy.cpp runs it (emulated in float64 on the file's tensors) is our MLP with eps
    scaled by F_pad/F, up to float32 rounding of the sub-norm weights; without the √(F/F_pad) on them it would
    not be."""
    model = as_in_file(tiny_gguf_model(intermediate_size=300, num_hidden_layers=1, act_quant=False))
    export_ifairy_gguf(model, tmp_path / "p.gguf")
    tensors = {t.name: t for t in read_ifairy_gguf(tmp_path / "p.gguf").tensors}
    mlp = model.layer[0].mlp.double()
    eps = mlp.ffn_layernorm.eps
    g = torch.Generator().manual_seed(1)
    xr, xi = torch.randn(2, 3, 256, dtype=torch.float64, generator=g), torch.randn(2, 3, 256, dtype=torch.float64,
                                                                                   generator=g)
    theirs = torch.cat(ifairy_cpp_ffn(tensors, eps, xr, xi), -1)

    def ours(eps):
        mlp.ffn_layernorm.eps = eps
        with torch.no_grad():
            return torch.cat(mlp(xr, xi), -1)

    def rel(a, b):
        return ((a - b).abs().max() / b.abs().max()).item()

    exact, plain = rel(theirs, ours(eps * 512 / 300)), rel(theirs, ours(eps))
    naive = rel(torch.cat(ifairy_cpp_ffn(tensors, eps, xr, xi, math.sqrt(512 / 300)), -1), ours(eps))
    print(f"padded FFN vs ours: eps*F_pad/F {exact:.1e}, eps {plain:.1e}, without the sub-norm factor {naive:.1e}")
    # exact: only the float32 rounding of the file's w·√(F/F_pad); plain: the eps change
    assert exact <= 2.5e-7 and plain <= 1e-5 and naive > 0.1


@pytest.mark.parametrize("act_quant,tol", [(False, 1e-5), (True, 2e-3)], ids=["f32", "W2A8"])
def test_gguf_padded_round_trip(tmp_path, act_quant, tol):
    """A padded file loads back to the model (codes and scales equal; ffn_layernorm within float32 rounding)."""
    model = as_in_file(tiny_gguf_model(intermediate_size=300, act_quant=act_quant))
    export_ifairy_gguf(model, tmp_path / "p.gguf")
    back = load_ifairy_gguf(tmp_path / "p.gguf", act_quant=act_quant)
    assert back.config.intermediate_size == 300
    ours, theirs = model.state_dict(), back.state_dict()
    assert set(ours) == set(theirs)
    for key in ours:
        if "ffn_layernorm" in key:
            torch.testing.assert_close(theirs[key], ours[key], rtol=2.5e-7, atol=0, msg=key)
        else:
            assert torch.equal(ours[key], theirs[key]), key
    ids = torch.randint(0, 48, (1, 5))
    with torch.inference_mode():
        got, want = back(ids), model(ids)
    assert ((got - want).abs().max() / want.abs().max()).item() <= tol


def test_gguf_f16_head(tmp_path):
    model = tiny_gguf_model(num_hidden_layers=1)
    export_ifairy_gguf(model, tmp_path / "h.gguf", output_dtype="f16")
    head = {t.name: t for t in read_ifairy_gguf(tmp_path / "h.gguf").tensors}["output"]
    assert np.array(head.data).dtype == np.float16
    back = load_ifairy_gguf(tmp_path / "h.gguf")
    assert torch.equal(back.lm_head.weight, model.lm_head.weight.detach().half().float())
    with pytest.raises(ValueError, match="output_dtype"):
        export_ifairy_gguf(model, tmp_path / "x.gguf", output_dtype="bf16")


def test_gguf_export_refuses_hidden_size_and_mismatched_models(tmp_path):
    model = IFairyForCausalLM(IFairyConfig(hidden_size=320, intermediate_size=512, num_heads=4, vocab_size=8,
                                           num_hidden_layers=1))
    with pytest.raises(ValueError, match="export_ifairy_gguf: hidden_size 320"):
        export_ifairy_gguf(model, tmp_path / "x.gguf")
    model = tiny_gguf_model(num_hidden_layers=1)
    model.config.intermediate_size = 300  # the layers are 512 wide
    with pytest.raises(ValueError, match="does not match its config.*down_proj"):
        export_ifairy_gguf(model, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


def test_gguf_export_warns_where_ifairy_cpp_differs(tmp_path):
    """ifairy.cpp ignores attention.scale (uses 1/√head_dim) and rope.freq_base (uses 10000)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        export_ifairy_gguf(tiny_gguf_model(num_hidden_layers=1), tmp_path / "ok.gguf")
    trained = tiny_gguf_model(num_hidden_layers=1, attention_scale=None)  # 1/√(2·head_dim), as trained
    with pytest.warns(UserWarning, match="softmax scale is 0.0883883.*1/sqrt\\(head_dim\\) = 0.125"):
        export_ifairy_gguf(trained, tmp_path / "a.gguf")
    with pytest.warns(UserWarning, match="rope_theta is 500000.*uses 10000"):
        export_ifairy_gguf(tiny_gguf_model(num_hidden_layers=1, rope_theta=5e5), tmp_path / "r.gguf")
