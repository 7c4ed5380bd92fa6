"""Export ``IFairyForCausalLM`` to GGUF for ifairy.cpp (EmbroiderSnow/ifairy.cpp, the llama.cpp fork for iFairy),
its linears in that fork's ``GGML_TYPE_IFAIRY``, with the PyPI ``gguf`` package.

The IFAIRY type (ifairy.cpp ``ggml/include/ggml.h``: ``GGML_TYPE_IFAIRY = 40``; ``ggml/src/ggml-common.h``
``block_ifairy``; ``ggml/src/ggml-quants.c`` ``quantize_row_ifairy_ref`` / ``dequantize_row_ifairy``), per row of a
weight ``(out, in)``, ``in`` a multiple of 256, one 68-byte block per 256 weights:

    uint8 qs[64]; fp16 d_real; fp16 d_imag          (little-endian, no padding)

Weight ``idx`` (0..255) of a block sits in ``qs[(idx / 64) * 16 + idx % 16]`` at bits ``2 * ((idx / 16) % 4)``,
with the codes of our format (0 = −1, 1 = +1, 2 = −i, 3 = +i); ``d_real`` / ``d_imag`` are the per-tensor scales
``s_re`` / ``s_im`` in fp16, repeated in every block (its dot product reads the first block's).

**Type id.** The PyPI ``gguf`` package (0.19) does not know this type: upstream llama.cpp later gave id 40 to
``NVFP4`` (ifairy.cpp's own gguf-py calls 40 ``F16_I2``). We write the raw id 40 and the logical shape
``(out, in)`` into the tensor info and the block bytes as data; to read such a file with ``gguf.GGUFReader``,
open it with :func:`read_ifairy_gguf`, which gives id 40 IFAIRY's block size (256 weights in 68 bytes) while
the reader parses.

**The rest of the file** follows ifairy.cpp's converter (``gguf-py/convert_ifairy.py``): architecture
``ifairy``, ``general.file_type`` 40 (its ``MOSTLY_IFAIRY``); ``token_embd`` is the real and imaginary
embeddings as bf16 pairs in an F32 container (low 16 bits real, high 16 bits imaginary), ``(V, H)``;
norm weights are F32 ``cat([real, imag])``; ``output`` is the F32 head ``(V, 2H)``. Tensor names are the fork's
``LLM_ARCH_IFAIRY`` list (``src/llama-arch.cpp``): ``token_embd``, ``output_norm``, ``output``,
``blk.N.{attn_norm, attn_q, attn_k, attn_v, attn_output, attn_sub_norm, ffn_norm, ffn_gate, ffn_up, ffn_down,
ffn_sub_norm}``; the block's ``pre_layernorm`` / ``post_layernorm`` go to ``attn_norm`` / ``ffn_norm`` and the
``attn_layernorm`` (before ``o_proj``) / ``ffn_layernorm`` (before ``down_proj``) to the two sub-norms, by role
(the fork's HF-name mapping table was not available to check). We also write ``ifairy.attention.scale`` (the
softmax scale; ifairy.cpp defaults to ``1/√head_dim``, the checkpoints were trained with ``1/√(2·head_dim)``).

Not expressible: a linear whose ``in_features`` is not a multiple of 256 (the 1.3B model's ``down_proj``,
in 5460) raises; ifairy.cpp's converter pads the FFN to 5632, which changes the ``ffn_layernorm`` statistics.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import torch

from lowrank.nn.ifairy import IFairyLinear
from lowrank.nn.ifairy_model import IFairyForCausalLM

__all__ = ["IFAIRY_TYPE", "ifairy_blocks", "ifairy_codes_from_blocks", "export_ifairy_gguf", "read_ifairy_gguf",
           "load_ifairy_gguf"]

IFAIRY_TYPE = 40        # ifairy.cpp GGML_TYPE_IFAIRY
IFAIRY_FILE_TYPE = 40   # ifairy.cpp LlamaFileType.MOSTLY_IFAIRY
BLOCK = 256             # weights per block
BLOCK_BYTES = 68

# ours (IFairyBlock) -> GGUF tensor names of one block
_LINEARS = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
            "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
            "mlp.down_proj": "ffn_down"}
_NORMS = {"input_layernorm": "attn_norm", "self_attn.attn_layernorm": "attn_sub_norm",
          "post_attention_layernorm": "ffn_norm", "mlp.ffn_layernorm": "ffn_sub_norm"}


def _codes(layer: IFairyLinear) -> torch.Tensor:
    packed = layer.packed.cpu().long()
    codes = torch.stack([(packed >> (2 * j)) & 3 for j in range(4)], -1).flatten(1)
    return codes[:, :layer.in_features]


def ifairy_blocks(layer: IFairyLinear) -> np.ndarray:
    """The layer's weight as IFAIRY blocks: uint8 ``(out, in / 256 * 68)``."""
    out, inn = layer.out_features, layer.in_features
    if inn % BLOCK:
        raise ValueError(f"ifairy_blocks: in_features {inn} is not a multiple of {BLOCK}: ifairy.cpp's IFAIRY "
                         "blocks hold 256 weights of one row")
    nb = inn // BLOCK
    # (out, block, chunk, part, lane) -> byte chunk*16 + lane holds the 4 parts at bits 2*part
    codes = _codes(layer).view(out, nb, 4, 4, 16)
    shifts = (2 * torch.arange(4)).view(1, 1, 1, 4, 1)
    qs = (codes << shifts).sum(3).view(out, nb, 64).to(torch.uint8)
    scales = layer.scales.cpu().to(torch.float16).view(torch.uint8)  # [d_real, d_imag], little-endian
    blocks = torch.cat([qs, scales.expand(out, nb, 4)], -1)
    return blocks.reshape(out, nb * BLOCK_BYTES).numpy()


def ifairy_codes_from_blocks(blocks: np.ndarray, in_features: int) -> tuple[np.ndarray, np.ndarray]:
    """Decode IFAIRY blocks ``(out, in / 256 * 68)``: codes uint8 ``(out, in)`` and fp16 scales
    ``(out, in / 256, 2)`` (``d_real, d_imag`` of every block)."""
    out = blocks.shape[0]
    nb = in_features // BLOCK
    b = np.ascontiguousarray(blocks).reshape(out, nb, BLOCK_BYTES)
    qs = b[..., :64].reshape(out, nb, 4, 1, 16)
    codes = (qs >> (2 * np.arange(4, dtype=np.uint8)).reshape(1, 1, 1, 4, 1)) & 3
    scales = np.ascontiguousarray(b[..., 64:]).view(np.float16)
    return codes.reshape(out, nb * BLOCK).astype(np.uint8), scales


def _bf16_pairs(real: torch.Tensor, imag: torch.Tensor) -> np.ndarray:
    def bits(t):
        return t.detach().cpu().to(torch.bfloat16).view(torch.int16).to(torch.int32) & 0xFFFF
    return ((bits(imag) << 16) | bits(real)).view(torch.float32).numpy()


def _norm(norm) -> np.ndarray:
    return torch.cat([norm.weight_real, norm.weight_imag]).detach().cpu().float().numpy()


def export_ifairy_gguf(model: IFairyForCausalLM, path: str | Path, name: str = "ifairy") -> None:
    """Write ``model`` to ``path`` as an ifairy.cpp GGUF (module docstring: layout and what cannot be written)."""
    import gguf

    cfg = model.config
    bad = [(n, m.in_features) for n, m in model.named_modules()
           if isinstance(m, IFairyLinear) and m.in_features % BLOCK]
    if bad:
        raise ValueError(f"export_ifairy_gguf: ifairy.cpp's IFAIRY blocks hold 256 weights of one row; these "
                         f"linears have in_features not a multiple of 256: {bad[:4]}")
    writer = gguf.GGUFWriter(str(path), arch="ifairy")
    writer.add_name(name)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_attention_scale(cfg.softmax_scale)
    writer.add_uint32("general.file_type", IFAIRY_FILE_TYPE)
    if cfg.bos_token_id is not None:
        writer.add_bos_token_id(cfg.bos_token_id)
    if cfg.eos_token_id is not None:
        writer.add_eos_token_id(cfg.eos_token_id)

    writer.add_tensor("token_embd", _bf16_pairs(model.token_embeddings_real.weight,
                                                model.token_embeddings_imag.weight))
    for i, block in enumerate(model.layer):
        for ours, theirs in _NORMS.items():
            writer.add_tensor(f"blk.{i}.{theirs}", _norm(block.get_submodule(ours)))
        for ours, theirs in _LINEARS.items():
            layer = block.get_submodule(ours)
            # int8 view: the writer keeps the given (out, in) shape for non-uint8 data and writes the raw type id
            writer.add_tensor(f"blk.{i}.{theirs}", ifairy_blocks(layer).view(np.int8),
                              raw_shape=(layer.out_features, layer.in_features), raw_dtype=IFAIRY_TYPE)
    writer.add_tensor("output_norm", _norm(model.final_norm))
    writer.add_tensor("output", model.lm_head.weight.detach().cpu().float().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@contextlib.contextmanager
def _ifairy_block_size():
    """While open, ``gguf`` sizes type id 40 as IFAIRY (256 weights in 68 bytes) instead of NVFP4."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    key = GGMLQuantizationType(IFAIRY_TYPE)
    saved = GGML_QUANT_SIZES[key]
    GGML_QUANT_SIZES[key] = (BLOCK, BLOCK_BYTES)
    try:
        yield
    finally:
        GGML_QUANT_SIZES[key] = saved


def read_ifairy_gguf(path: str | Path):
    """``gguf.GGUFReader`` of an ifairy.cpp GGUF; IFAIRY tensors come as uint8 ``(out, in / 256 * 68)`` blocks
    (their ``tensor_type`` prints as the package's name for id 40)."""
    import gguf

    with _ifairy_block_size():
        return gguf.GGUFReader(str(path))


def _field(reader, key: str):
    field = reader.fields[key]
    return field.contents() if hasattr(field, "contents") else field.parts[field.data[0]][0]


def load_ifairy_gguf(path: str | Path, act_quant: bool = True) -> IFairyForCausalLM:
    """An ``IFairyForCausalLM`` from a GGUF written by :func:`export_ifairy_gguf` (scales come back rounded to
    fp16, embeddings to bf16: what ifairy.cpp runs)."""
    from lowrank.nn.ifairy_model import IFairyConfig

    reader = read_ifairy_gguf(path)
    arch = "ifairy"
    cfg = IFairyConfig(
        hidden_size=int(_field(reader, f"{arch}.embedding_length")),
        intermediate_size=int(_field(reader, f"{arch}.feed_forward_length")),
        num_heads=int(_field(reader, f"{arch}.attention.head_count")),
        num_key_value_heads=int(_field(reader, f"{arch}.attention.head_count_kv")),
        num_hidden_layers=int(_field(reader, f"{arch}.block_count")),
        vocab_size=int(_field(reader, f"{arch}.vocab_size")),
        max_position_embeddings=int(_field(reader, f"{arch}.context_length")),
        rms_norm_eps=float(_field(reader, f"{arch}.attention.layer_norm_epsilon")),
        rope_theta=float(_field(reader, f"{arch}.rope.freq_base")),
        attention_scale=float(_field(reader, f"{arch}.attention.scale")), act_quant=act_quant)
    tensors = {t.name: t for t in reader.tensors}
    with torch.device("meta"):
        model = IFairyForCausalLM(cfg)
    model = model.to_empty(device="cpu")

    def array(name):
        return torch.from_numpy(np.array(tensors[name].data))

    def norm(module, name):
        both = array(name)
        module.weight_real.copy_(both[:both.numel() // 2])
        module.weight_imag.copy_(both[both.numel() // 2:])

    with torch.no_grad():
        pairs = array("token_embd").view(torch.int32)
        for module, bits in ((model.token_embeddings_real, pairs << 16),
                             (model.token_embeddings_imag, pairs & ~0xFFFF)):
            module.weight.copy_(bits.view(torch.float32))  # bf16 in the high half of a float32 is that value
        model.lm_head.weight.copy_(array("output"))
        norm(model.final_norm, "output_norm")
        for i, block in enumerate(model.layer):
            for ours, theirs in _NORMS.items():
                norm(block.get_submodule(ours), f"blk.{i}.{theirs}")
            for ours, theirs in _LINEARS.items():
                layer = block.get_submodule(ours)
                codes, scales = ifairy_codes_from_blocks(np.array(tensors[f"blk.{i}.{theirs}"].data), layer.in_features)
                codes = torch.from_numpy(codes.astype(np.int64)).view(layer.out_features, -1, 4)
                layer.packed.copy_((codes << (2 * torch.arange(4))).sum(-1).to(torch.uint8))
                layer.scales.copy_(torch.from_numpy(scales[0, 0].astype(np.float32)))
    return model.eval()
