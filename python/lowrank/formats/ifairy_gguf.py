"""Export ``IFairyForCausalLM`` to GGUF for ifairy.cpp (EmbroiderSnow/ifairy.cpp, the llama.cpp fork for iFairy),
its linears in that fork's ``GGML_TYPE_IFAIRY``, with the PyPI ``gguf`` package.

The IFAIRY type (ifairy.cpp ``ggml/include/ggml.h``: ``GGML_TYPE_IFAIRY = 40``; ``ggml/src/ggml-common.h``
``block_ifairy``; ``ggml/src/ggml-quants.c`` ``quantize_row_ifairy_ref`` / ``dequantize_row_ifairy``), per row of a
weight ``(out, in)``, ``in`` a multiple of 256, one 68-byte block per 256 weights:

    uint8 qs[64]; fp16 d_real; fp16 d_imag          (little-endian, no padding)

Weight ``idx`` (0..255) of a block sits in ``qs[(idx / 64) * 16 + idx % 16]`` at bits ``2 * ((idx / 16) % 4)``,
with the codes of our format (0 = −1, 1 = +1, 2 = −i, 3 = +i); ``d_real`` / ``d_imag`` are the per-tensor scales
``s_re`` / ``s_im`` in fp16, repeated in every block (its CPU dot product reads the first block's; the rows
added by FFN padding, below, hold 0).

**Type id.** The PyPI ``gguf`` package (0.19) does not know this type: upstream llama.cpp later gave id 40 to
``NVFP4`` (ifairy.cpp's own gguf-py calls 40 ``F16_I2``). We write the raw id 40 and the logical shape
``(out, in)`` into the tensor info and the block bytes as data; to read such a file with ``gguf.GGUFReader``,
open it with :func:`read_ifairy_gguf`, which gives id 40 IFAIRY's block size (256 weights in 68 bytes) while
the reader parses.

**The rest of the file** follows ifairy.cpp's converter (``gguf-py/convert_ifairy.py``): architecture
``ifairy``, ``general.file_type`` 40 (its ``MOSTLY_IFAIRY``); ``token_embd`` is the real and imaginary
embeddings as bf16 pairs in an F32 container (low 16 bits real, high 16 bits imaginary), ``(V, H)``;
norm weights are F32 ``cat([real, imag])``; ``output`` is the head ``(V, 2H)``, F32 (``output_dtype="f16"``:
F16, as ifairy.cpp's converter writes it). Tensor names and the four norms of a block are the fork's
``LLM_ARCH_IFAIRY`` list (``src/llama-arch.cpp``): ``token_embd``, ``output_norm``, ``output``,
``blk.N.{attn_norm, attn_q, attn_k, attn_v, attn_output, attn_sub_norm, ffn_norm, ffn_gate, ffn_up, ffn_down,
ffn_sub_norm}``; the block's ``pre_layernorm`` / ``post_layernorm`` go to ``attn_norm`` / ``ffn_norm``, the
``attn_layernorm`` (before ``o_proj``) to ``attn_sub_norm`` and the ``ffn_layernorm`` (before ``down_proj``,
width 2F) to ``ffn_sub_norm``.

**FFN padding.** Every IFAIRY routine of ifairy.cpp needs rows of a multiple of 256 weights, and its loader reads
``feed_forward_length`` and wants exactly these tensors. When ``intermediate_size`` F is not a multiple of 256 (the
1.3B model: 5460), the file holds the same function at width F_pad = ceil(F/256)·256 (5632): ``ffn_gate`` /
``ffn_up`` get F_pad − F extra rows with ``d_real = d_imag = 0`` in every block (every ifairy.cpp consumer of
IFAIRY blocks takes the scales from the row's own blocks, so those outputs are exactly 0, and ReLU²(0)·up = 0);
``ffn_down`` gets F_pad − F extra input columns (any code: they meet zeros); ``ffn_sub_norm`` (RMS over the width
it is given) sees S/F_pad instead of S/F of the F true values, so its first F real and imaginary weights are
written times √(F/F_pad) and the padding weights as 0: ifairy.cpp then computes h·w / √(S/F + eps·F_pad/F), our
``ffn_layernorm`` with eps times F_pad/F (1.03 for the 1.3B model). ``feed_forward_length`` is F_pad;
``lowrank.ifairy.intermediate_size`` records F, from which :func:`load_ifairy_gguf` undoes the padding. A hidden
size that is not a multiple of 256 cannot be padded this way (embeddings, norms and the head would change) and
raises.

**What ifairy.cpp reads differently.** We write ``ifairy.attention.scale`` (our softmax scale) and
``ifairy.rope.freq_base``, but ifairy.cpp ignores both: its softmax scale is always ``1/√head_dim`` (complex
head dim, hidden/heads; the released checkpoints were trained at ``1/√(2·head_dim)``, our default) and its RoPE
base is hard-coded 10000; export warns when the model differs, because ifairy.cpp then computes a different
model. Its activation quantization is per 256-block (absmax to 127, real and imaginary parts separately), ours
per token, so its results are close to ours, not bit-identical.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from pathlib import Path

import numpy as np
import torch

from lowrank.nn.ifairy import IFairyLinear
from lowrank.nn.ifairy_model import IFairyForCausalLM
from lowrank.reference.ifairy import ifairy_pack_codes

__all__ = ["IFAIRY_TYPE", "ifairy_blocks", "ifairy_codes_from_blocks", "export_ifairy_gguf", "read_ifairy_gguf",
           "load_ifairy_gguf"]

IFAIRY_TYPE = 40        # ifairy.cpp GGML_TYPE_IFAIRY
IFAIRY_FILE_TYPE = 40   # ifairy.cpp LlamaFileType.MOSTLY_IFAIRY
BLOCK = 256             # weights per block
BLOCK_BYTES = 68
ROPE_BASE = 10000.0     # ifairy.cpp's hard-coded RoPE base
FFN_KEY = "lowrank.ifairy.intermediate_size"  # the model's F when the file's feed_forward_length is padded

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
    if layer.in_features % BLOCK:
        raise ValueError(f"ifairy_blocks: in_features {layer.in_features} is not a multiple of {BLOCK}: ifairy.cpp's "
                         "IFAIRY blocks hold 256 weights of one row")
    return _padded_blocks(layer, layer.out_features, layer.in_features)


def _padded_blocks(layer: IFairyLinear, rows: int, cols: int) -> np.ndarray:
    """IFAIRY blocks ``(rows, cols / 256 * 68)`` holding the layer's weight in the top-left corner; the extra
    columns get code 1 (+1), the extra rows code 1 and ``d_real = d_imag = 0`` in every block (FFN padding,
    module docstring)."""
    out, inn = layer.out_features, layer.in_features
    nb = cols // BLOCK
    codes = torch.ones(rows, cols, dtype=torch.long)
    codes[:out, :inn] = _codes(layer)
    # (row, block, chunk, part, lane) -> byte chunk*16 + lane holds the 4 parts at bits 2*part
    shifts = (2 * torch.arange(4)).view(1, 1, 1, 4, 1)
    qs = (codes.view(rows, nb, 4, 4, 16) << shifts).sum(3).view(rows, nb, 64).to(torch.uint8)
    scales = torch.zeros(rows, 2, dtype=torch.float16)
    scales[:out] = layer.scales.cpu().to(torch.float16)
    scales = scales.view(torch.uint8).view(rows, 1, 4)  # [d_real, d_imag], little-endian
    return torch.cat([qs, scales.expand(rows, nb, 4)], -1).reshape(rows, nb * BLOCK_BYTES).numpy()


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


def _norm(norm, width: int | None = None, factor: float = 1.0) -> np.ndarray:
    """F32 ``cat([real, imag])``, each part times ``factor`` (in float64) and zero-padded to ``width``."""
    parts = [w.detach().cpu().double() * factor for w in (norm.weight_real, norm.weight_imag)]
    return torch.cat([torch.nn.functional.pad(w, (0, (width or w.numel()) - w.numel())) for w in parts]).float().numpy()


def _check(model: IFairyForCausalLM, output_dtype: str) -> None:
    """Raise unless the file can be written; warn where ifairy.cpp will compute something else (module docstring)."""
    cfg = model.config
    h, f, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_key_value_heads * cfg.head_dim
    if output_dtype not in ("f32", "f16"):
        raise ValueError(f"export_ifairy_gguf: output_dtype must be 'f32' or 'f16', got {output_dtype!r}")
    if h % BLOCK:
        raise ValueError(f"export_ifairy_gguf: hidden_size {h} is not a multiple of {BLOCK}: ifairy.cpp's IFAIRY "
                         "blocks hold 256 weights of one row, and padding the hidden size would change the "
                         "embeddings, norms and head (only intermediate_size is padded)")
    want = {"self_attn.q_proj": (h, h), "self_attn.k_proj": (h, kv), "self_attn.v_proj": (h, kv),
            "self_attn.o_proj": (h, h), "mlp.gate_proj": (h, f), "mlp.up_proj": (h, f), "mlp.down_proj": (f, h)}
    bad = [f"layer.{i}.mlp.ffn_layernorm width {block.mlp.ffn_layernorm.weight_real.numel()}, want {f}"
           for i, block in enumerate(model.layer) if block.mlp.ffn_layernorm.weight_real.numel() != f]
    for i, block in enumerate(model.layer):
        for ours, shape in want.items():
            layer = block.get_submodule(ours)
            if (layer.in_features, layer.out_features) != shape:
                bad.append(f"layer.{i}.{ours} (in, out) {(layer.in_features, layer.out_features)}, want {shape}")
    if bad:
        raise ValueError(f"export_ifairy_gguf: model does not match its config (hidden_size {h}, intermediate_size "
                         f"{f}, {cfg.num_key_value_heads} kv heads): {bad[:4]}")
    if not math.isclose(cfg.softmax_scale, cfg.head_dim ** -0.5, rel_tol=1e-6):
        warnings.warn(f"export_ifairy_gguf: the model's softmax scale is {cfg.softmax_scale:.6g}, ifairy.cpp ignores "
                      f"ifairy.attention.scale and uses 1/sqrt(head_dim) = {cfg.head_dim ** -0.5:.6g}: it will "
                      "compute a different model", UserWarning, stacklevel=3)
    if cfg.rope_theta != ROPE_BASE:
        warnings.warn(f"export_ifairy_gguf: the model's rope_theta is {cfg.rope_theta:g}, ifairy.cpp ignores "
                      f"ifairy.rope.freq_base and uses {ROPE_BASE:g}: it will compute a different model",
                      UserWarning, stacklevel=3)


def export_ifairy_gguf(model: IFairyForCausalLM, path: str | Path, name: str = "ifairy",
                       output_dtype: str = "f32") -> None:
    """Write ``model`` to ``path`` as an ifairy.cpp GGUF, the head ``output`` in ``output_dtype`` ("f32" or
    "f16"). Module docstring: the layout, the FFN padding when ``intermediate_size`` is not a multiple of 256,
    what raises (a hidden size not a multiple of 256, a model that does not match its config) and what warns
    (a softmax scale or RoPE base that ifairy.cpp does not use)."""
    import gguf

    _check(model, output_dtype)
    cfg = model.config
    f = cfg.intermediate_size
    f_pad = -(-f // BLOCK) * BLOCK
    writer = gguf.GGUFWriter(str(path), arch="ifairy")
    writer.add_name(name)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(f_pad)
    writer.add_uint32(FFN_KEY, f)
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
            pad = (f_pad, math.sqrt(f / f_pad)) if ours == "mlp.ffn_layernorm" else ()
            writer.add_tensor(f"blk.{i}.{theirs}", _norm(block.get_submodule(ours), *pad))
        for ours, theirs in _LINEARS.items():
            layer = block.get_submodule(ours)
            rows = f_pad if ours in ("mlp.gate_proj", "mlp.up_proj") else layer.out_features
            cols = f_pad if ours == "mlp.down_proj" else layer.in_features
            # int8 view: the writer keeps the given (out, in) shape for non-uint8 data and writes the raw type id
            writer.add_tensor(f"blk.{i}.{theirs}", _padded_blocks(layer, rows, cols).view(np.int8),
                              raw_shape=(rows, cols), raw_dtype=IFAIRY_TYPE)
    writer.add_tensor("output_norm", _norm(model.final_norm))
    head = model.lm_head.weight.detach().cpu()
    writer.add_tensor("output", (head.half() if output_dtype == "f16" else head.float()).numpy())
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
    fp16, embeddings to bf16, an F16 head to fp16: what ifairy.cpp runs). A padded FFN is cut back to the
    ``lowrank.ifairy.intermediate_size`` recorded in the file (extra rows and columns dropped, the
    ``ffn_layernorm`` weights divided by √(F/F_pad) again: they come back within float32 rounding of the
    exported ones, not bit for bit)."""
    from lowrank.nn.ifairy_model import IFairyConfig

    reader = read_ifairy_gguf(path)
    arch = "ifairy"
    f_pad = int(_field(reader, f"{arch}.feed_forward_length"))
    f = int(_field(reader, FFN_KEY)) if FFN_KEY in reader.fields else f_pad
    cfg = IFairyConfig(
        hidden_size=int(_field(reader, f"{arch}.embedding_length")),
        intermediate_size=f,
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

    def norm(module, name, factor=1.0):
        both = array(name).double() / factor
        n = module.weight_real.numel()
        module.weight_real.copy_(both[:n])
        module.weight_imag.copy_(both[both.numel() // 2:][:n])

    with torch.no_grad():
        pairs = array("token_embd").view(torch.int32)
        for module, bits in ((model.token_embeddings_real, pairs << 16),
                             (model.token_embeddings_imag, pairs & ~0xFFFF)):
            module.weight.copy_(bits.view(torch.float32))  # bf16 in the high half of a float32 is that value
        model.lm_head.weight.copy_(array("output"))
        norm(model.final_norm, "output_norm")
        for i, block in enumerate(model.layer):
            for ours, theirs in _NORMS.items():
                norm(block.get_submodule(ours), f"blk.{i}.{theirs}",
                     math.sqrt(f / f_pad) if ours == "mlp.ffn_layernorm" else 1.0)
            for ours, theirs in _LINEARS.items():
                layer = block.get_submodule(ours)
                blocks = np.array(tensors[f"blk.{i}.{theirs}"].data)
                codes, scales = ifairy_codes_from_blocks(blocks, blocks.shape[1] // BLOCK_BYTES * BLOCK)
                codes = torch.from_numpy(codes[:layer.out_features, :layer.in_features])
                layer.packed.copy_(ifairy_pack_codes(codes))
                layer.scales.copy_(torch.from_numpy(scales[0, 0].astype(np.float32)))
    return model.eval()
