"""Generate with an iFairy (Fairy±i) model on the CPU and print tokens/s.

    python examples/ifairy_generate.py --size 700m --threads 1            # random weights, 700M-shaped
    python examples/ifairy_generate.py --size 1.3b --threads 2 --new-tokens 64
    python examples/ifairy_generate.py --checkpoint DIR --prompt "Once upon a time"   # a released checkpoint
    python examples/ifairy_generate.py --gguf model.gguf                   # a GGUF written by export_ifairy_gguf
    python examples/ifairy_generate.py --checkpoint DIR --export-gguf out.gguf

A random model is built packed (2-bit codes drawn as bytes; no float latent weights), so the 1.3B shape needs
about 1.4 GB. ``--checkpoint`` takes an official Fairy±i directory (config.json + safetensors of the latent
weights, quantized with PhaseQuant at load); text prompts need its tokenizer (``--tokenizer``, default the
checkpoint directory, loaded with transformers). Decode speed is prefill excluded: the one-token steps after
the prompt, each a full model step (168 packed linears, attention over the KV cache, the float32 head).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from lowrank.bench.ifairy_model import step_parts_ms
from lowrank.nn import IFairyConfig, IFairyForCausalLM
from lowrank.nn.ifairy_model import next_token

SIZES = {"700m": IFairyConfig.ifairy_700m, "1.3b": IFairyConfig.ifairy_1p3b,
         "tiny": lambda: IFairyConfig(hidden_size=256, intermediate_size=512, num_heads=4, vocab_size=1000,
                                      num_hidden_layers=2)}


def build(args) -> IFairyForCausalLM:
    if args.checkpoint:
        from lowrank.formats import load_official_ifairy
        return load_official_ifairy(args.checkpoint, act_quant=not args.float_activations)
    if args.gguf:
        from lowrank.formats import load_ifairy_gguf
        return load_ifairy_gguf(args.gguf, act_quant=not args.float_activations)
    torch.manual_seed(args.seed)
    cfg = SIZES[args.size]()
    cfg.act_quant = not args.float_activations
    return IFairyForCausalLM(cfg).eval()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--size", choices=sorted(SIZES), default="700m", help="random weights of this shape")
    src.add_argument("--checkpoint", type=Path, help="official Fairy±i checkpoint directory")
    src.add_argument("--gguf", type=Path, help="GGUF written by lowrank.formats.export_ifairy_gguf")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--prompt", help="text (needs a tokenizer); default: --prompt-len random token ids")
    p.add_argument("--tokenizer", type=Path, help="tokenizer directory (default: the checkpoint directory)")
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--float-activations", action="store_true", help="act_quant=False (not iFairy's W2A8)")
    p.add_argument("--export-gguf", type=Path, help="also write the model as an ifairy.cpp GGUF")
    p.add_argument("--bf16-head", action="store_true",
                   help="hold lm_head in bfloat16 (half its bytes, faster decode; not the official float head)")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model = build(args)
    cfg = model.config
    if args.bf16_head:
        model.lm_head.bfloat16()
    packed = sum(b.numel() for n, b in model.named_buffers() if n.endswith("packed"))
    total = sum(t.numel() * t.element_size() for t in model.state_dict().values() if isinstance(t, torch.Tensor))
    print(f"model: hidden {cfg.hidden_size}, ffn {cfg.intermediate_size}, {cfg.num_hidden_layers} layers, "
          f"{cfg.num_heads} heads, vocab {cfg.vocab_size}; packed linears {packed / 2**20:.1f} MiB, "
          f"{total / 2**30:.2f} GiB in all; built in {time.perf_counter() - start:.1f} s; "
          f"{torch.get_num_threads()} thread(s)")
    if args.export_gguf:
        from lowrank.formats import export_ifairy_gguf
        export_ifairy_gguf(model, args.export_gguf)
        print(f"wrote {args.export_gguf}")

    tokenizer = None
    if args.prompt is not None:
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(str(args.tokenizer or args.checkpoint))
        ids = tokenizer(args.prompt, return_tensors="pt").input_ids
    else:
        ids = torch.randint(0, cfg.vocab_size, (1, args.prompt_len), generator=torch.Generator().manual_seed(1))

    gen = torch.Generator().manual_seed(args.seed)
    steps = []
    with torch.inference_mode():
        cache = model.new_cache(1, ids.shape[1] + args.new_tokens)
        start = time.perf_counter()
        logits = model(ids, cache)[:, -1]
        prefill = time.perf_counter() - start
        out = ids
        for _ in range(args.new_tokens):
            token = next_token(logits, args.sample, args.temperature, args.top_k, gen)
            out = torch.cat([out, token[:, None]], 1)
            start = time.perf_counter()
            logits = model(token[:, None], cache)[:, -1]
            steps.append(time.perf_counter() - start)
    print(f"prefill: {ids.shape[1]} tokens in {prefill * 1e3:.1f} ms ({ids.shape[1] / prefill:.1f} tokens/s)")
    if steps:
        print(f"decode: {len(steps)} tokens, {len(steps) / sum(steps):.2f} tokens/s "
              f"(median step {statistics.median(steps) * 1e3:.1f} ms)")
        parts = step_parts_ms(model)
        rest = statistics.median(steps) * 1e3 - parts["linears_ms"] - parts["head_ms"]
        print(f"  a step, parts timed alone: packed linears {parts['linears_ms']:.1f} ms, "
              f"{str(model.lm_head.weight.dtype).replace('torch.', '')} lm_head "
              f"{parts['head_ms']:.1f} ms, the rest (attention, norms, Python) about {rest:.1f} ms")
    new = out[0, ids.shape[1]:].tolist()
    print("generated:", tokenizer.decode(new) if tokenizer is not None else new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
