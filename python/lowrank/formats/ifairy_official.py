"""Load a released Fairy±i checkpoint (the official ``ComplexNetLM`` layout) into ``lowrank.nn.IFairyForCausalLM``.

The checkpoints hold the *latent* full-precision weights, as training leaves them (the model quantizes them in
its forward pass); loading runs PhaseQuant (``lowrank.ifairy_quantize``) on each complex linear, one at a time,
so memory peaks at the packed model plus one latent pair, never the whole fp32 model.

Layout (names and shapes from PKULab1806/Fairy-plus-minus-i ``model/modeling_Fairy_plus_minus_i.py``; H hidden,
F intermediate, V vocab, KV = num_key_value_heads · H / num_attention_heads):

    token_embeddings_real.weight, token_embeddings_imag.weight        (V, H)
    layer.{i}.pre_layernorm.weight_{real,imag}                        (H,)
    layer.{i}.self_attn.{q,o}_proj.weight_{real,imag}                 (H, H)
    layer.{i}.self_attn.{k,v}_proj.weight_{real,imag}                 (KV, H)
    layer.{i}.self_attn.attn_layernorm.weight_{real,imag}             (H,)
    layer.{i}.post_layernorm.weight_{real,imag}                       (H,)
    layer.{i}.mlp.{gate,up}_proj.weight_{real,imag}                   (F, H)
    layer.{i}.mlp.down_proj.weight_{real,imag}                        (H, F)
    layer.{i}.mlp.ffn_layernorm.weight_{real,imag}                    (F,)
    final_norm.weight_{real,imag}                                     (H,)
    lm_head.weight                                                    (V, 2H)

(``rotary_emb.inv_freq`` buffers are not persistent; if a file has them they are ignored.)
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

import lowrank
from lowrank.nn.ifairy_model import IFairyConfig, IFairyForCausalLM

__all__ = ["official_ifairy_layout", "load_official_ifairy"]

LINEARS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
# official block norm name -> ours (IFairyBlock keeps the Llama-style names of the example block)
BLOCK_NORMS = {"pre_layernorm": "input_layernorm", "post_layernorm": "post_attention_layernorm",
               "self_attn.attn_layernorm": "self_attn.attn_layernorm", "mlp.ffn_layernorm": "mlp.ffn_layernorm"}


def official_ifairy_layout(config: IFairyConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of an official checkpoint for ``config``, name -> shape."""
    h, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
    kv = config.num_key_value_heads * config.head_dim
    out = {"token_embeddings_real.weight": (v, h), "token_embeddings_imag.weight": (v, h)}
    linear_shapes = {"self_attn.q_proj": (h, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
                     "self_attn.o_proj": (h, h), "mlp.gate_proj": (f, h), "mlp.up_proj": (f, h),
                     "mlp.down_proj": (h, f)}
    norm_sizes = {"pre_layernorm": h, "post_layernorm": h, "self_attn.attn_layernorm": h, "mlp.ffn_layernorm": f}
    for i in range(config.num_hidden_layers):
        for name, size in norm_sizes.items():
            for part in ("real", "imag"):
                out[f"layer.{i}.{name}.weight_{part}"] = (size,)
        for name, shape in linear_shapes.items():
            for part in ("real", "imag"):
                out[f"layer.{i}.{name}.weight_{part}"] = shape
    out.update({"final_norm.weight_real": (h,), "final_norm.weight_imag": (h,), "lm_head.weight": (v, 2 * h)})
    return out


def _tensor_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return sorted({path / name for name in weight_map.values()})
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"load_official_ifairy: no *.safetensors in {path}")
    return files


def load_official_ifairy(path: str | Path, config: IFairyConfig | None = None, *, act_quant: bool = True,
                         dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> IFairyForCausalLM:
    """An ``IFairyForCausalLM`` from an official checkpoint: a directory (``config.json`` and
    ``model.safetensors`` or shards with ``model.safetensors.index.json``) or one ``.safetensors`` file.

    ``config`` defaults to the directory's ``config.json`` (``IFairyConfig.from_official``). Every tensor of the
    official layout must be present with its shape, and nothing else (besides rotary ``inv_freq``): a mismatch
    raises ``ValueError`` naming the tensors. ``dtype`` is the model's floating dtype (embeddings, norms, head,
    activations); the linears are packed at 2 bits with float32 scales.
    """
    from safetensors import safe_open

    path = Path(path)
    if config is None:
        config_file = (path if path.is_dir() else path.parent) / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"load_official_ifairy: no config given and no {config_file}")
        config = IFairyConfig.from_official(json.loads(config_file.read_text()), act_quant=act_quant)
    elif config.act_quant != act_quant:
        config = IFairyConfig(**{**config.__dict__, "act_quant": act_quant})
    layout = official_ifairy_layout(config)

    handles = [safe_open(str(f), framework="pt", device="cpu") for f in _tensor_files(path)]
    where = {name: h for h in handles for name in h.keys() if not name.endswith("inv_freq")}
    missing = sorted(set(layout) - set(where))
    unexpected = sorted(set(where) - set(layout))
    if missing or unexpected:
        raise ValueError(f"load_official_ifairy: {path} is not an official iFairy checkpoint for this config: "
                         f"missing {missing[:8]}{' ...' if len(missing) > 8 else ''}, "
                         f"unexpected {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")

    def get(name: str) -> torch.Tensor:
        tensor = where[name].get_tensor(name)
        if tuple(tensor.shape) != layout[name]:
            raise ValueError(f"load_official_ifairy: {name} has shape {tuple(tensor.shape)}, expected "
                             f"{layout[name]} for this config")
        return tensor

    with torch.device("meta"):
        model = IFairyForCausalLM(config)
    model = model.to_empty(device=device)
    with torch.no_grad():
        for ours, theirs in (("token_embeddings_real", "token_embeddings_real"),
                             ("token_embeddings_imag", "token_embeddings_imag"), ("lm_head", "lm_head")):
            getattr(model, ours).weight.copy_(get(f"{theirs}.weight"))
        _copy_norm(model.final_norm, get, "final_norm")
        for i, block in enumerate(model.layer):
            for theirs, ours in BLOCK_NORMS.items():
                _copy_norm(block.get_submodule(ours), get, f"layer.{i}.{theirs}")
            for name in LINEARS:
                layer = block.get_submodule(name)
                w_real, w_imag = get(f"layer.{i}.{name}.weight_real"), get(f"layer.{i}.{name}.weight_imag")
                packed, scales = lowrank.ifairy_quantize(w_real.to(device), w_imag.to(device))
                layer.packed.copy_(packed)
                layer.scales.copy_(scales)
                del w_real, w_imag, packed
    return model.to(dtype).eval()


def _copy_norm(norm, get, prefix: str) -> None:
    norm.weight_real.copy_(get(f"{prefix}.weight_real"))
    norm.weight_imag.copy_(get(f"{prefix}.weight_imag"))
