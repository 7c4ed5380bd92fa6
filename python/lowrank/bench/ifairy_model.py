"""iFairy model rows: tokens/s of ``IFairyForCausalLM`` decoding, 700M- and 1.3B-shaped, on 1 and 2 CPU threads.

Random weights, built packed (random codes drawn as bytes, never a float latent weight: the 1.3B shape holds
302 MB of packed linears plus float32 embeddings and head, 1.35 GB in all). A 16-token prompt is prefilled,
two steps warm up, then 16 one-token steps (W2A8, KV cache) are timed one by one; ``ours ms`` is their
median, the shape column names tokens/s = 1000 / that. Everything a step does is timed: embeddings, the
168 packed linears, attention over the cache, norms, the float32 ``lm_head`` (``Linear(2·hidden, 32000)``:
262 MB at 1.3B, read once per token) and the Python between them. The check compares cached steps'
logits with a full recomputation of the same sequence on the same model with float activations (max |diff| /
max |logit| <= 1e-4; ``cache_check`` says why not W2A8).
The shape column also gives two parts of a step timed alone: the 168 linears and the head. The "bf16 head"
rows hold ``lm_head`` in bfloat16 (``model.lm_head.bfloat16()``, the example's ``--bf16-head``: half the bytes of
the largest tensor a step reads, read by ``torch.mv``; its dot products round to bfloat16, so these logits are
not the float head's); everything else is the same model. Their cache check runs before the head is cast (with
the float32 head): a one-row step reads the bf16 head with ``torch.mv`` and the full recomputation with a GEMM,
which round differently (about 3e-3 of the logit range), while the check is after cache errors.

The anchor is ifairy.cpp's published decode speed of the 700M model, 76.2 tokens/s (LUT path; 46.6 direct)
on 8 threads of a Ryzen 7 H 255 (llama-bench tg128); it is quoted in the README, not run here. CUDA: no
rows (the CUDA kernels have not run on a GPU yet).
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from lowrank.nn import IFairyConfig, IFairyForCausalLM

from . import Rows

PROMPT, WARMUP, STEPS = 16, 2, 16


@dataclass(frozen=True)
class Case:
    label: str
    config: IFairyConfig
    threads: int
    head: torch.dtype = torch.float32


def cases(device: str, quick: bool) -> list[Case]:
    if device.startswith("cuda"):
        return []
    if quick:
        small = IFairyConfig(hidden_size=256, intermediate_size=512, num_heads=4, vocab_size=1000,
                             num_hidden_layers=2)
        return [Case("tiny", small, 1)]
    return [Case(label, cfg, t, head) for head in (torch.float32, torch.bfloat16)
            for label, cfg in (("700M", IFairyConfig.ifairy_700m()), ("1.3B", IFairyConfig.ifairy_1p3b()))
            for t in (1, 2)]


def decode_step_ms(model: IFairyForCausalLM, prompt_len: int = PROMPT, warmup: int = WARMUP,
                   steps: int = STEPS, seed: int = 0) -> list[float]:
    """Milliseconds of each timed one-token step (greedy, KV cache)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (1, prompt_len), generator=gen)
    times = []
    with torch.inference_mode():
        cache = model.new_cache(1, prompt_len + warmup + steps)
        logits = model(ids, cache)[:, -1]
        for i in range(warmup + steps):
            token = logits.argmax(-1, keepdim=True)
            start = time.perf_counter()
            logits = model(token, cache)[:, -1]
            if i >= warmup:
                times.append((time.perf_counter() - start) * 1e3)
    return times


def cache_check(model: IFairyForCausalLM, prompt_len: int = 4, steps: int = 2) -> float:
    """max |cached - full| / max |full| of the logits of ``steps`` one-token steps after a prompt, with float
    activations: W2A8's int8 rounding of a value that the two paths compute a rounding error apart can move a
    code by one, and a deep random model amplifies that, so W2A8 would test chaos, not the cache (the tests
    check W2A8 on small models)."""
    from lowrank.nn import IFairyLinear

    linears = [m for m in model.modules() if isinstance(m, IFairyLinear)]
    saved = [m.act_quant for m in linears]
    ids = torch.randint(0, model.config.vocab_size, (1, prompt_len + steps), generator=torch.Generator().manual_seed(2))
    try:
        for m in linears:
            m.act_quant = False
        with torch.inference_mode():
            cache = model.new_cache(1, prompt_len + steps)
            cached = [model(ids[:, :prompt_len], cache)[:, -1]]
            cached += [model(ids[:, i:i + 1], cache)[:, -1] for i in range(prompt_len, prompt_len + steps)]
            full = model(ids)[:, prompt_len - 1:]
    finally:
        for m, q in zip(linears, saved):
            m.act_quant = q
    cached = torch.stack(cached, 1)
    return ((cached - full).abs().max() / full.abs().max().clamp_min(1e-30)).item()


def step_parts_ms(model: IFairyForCausalLM, reps: int = 5) -> dict[str, float]:
    """Median ms of the parts of one decode step run alone: all packed linears (one call each, W2A8, one token)
    and the head; the rest of a step is attention, norms, embeddings and Python."""
    from lowrank.nn import IFairyLinear

    gen = torch.Generator().manual_seed(1)
    linears = [(m, torch.randn(1, 1, m.in_features, generator=gen), torch.randn(1, 1, m.in_features, generator=gen))
               for m in model.modules() if isinstance(m, IFairyLinear)]
    head_x = torch.randn(1, 1, model.lm_head.in_features, generator=gen,
                         dtype=model.token_embeddings_real.weight.dtype)

    def median_ms(fn) -> float:
        fn()
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)

    with torch.inference_mode():
        return {"linears_ms": median_ms(lambda: [m(xr, xi) for m, xr, xi in linears]),
                "head_ms": median_ms(lambda: model.logits(head_x))}


def measure(case: Case) -> dict:
    cfg = case.config
    packed = sum(o * ((i + 3) // 4) for o, i in _linear_shapes(cfg)) * cfg.num_hidden_layers
    head = "" if case.head == torch.float32 else ", bf16 head"
    row = {"op": "IFairyForCausalLM", "shape": f"{case.label}-shaped decode{head}, {case.threads} thread(s)",
           "dtype": "float32", "mode": "W2A8", "ours_ms": None, "gbps": None, "max_err": None, "tol": 1e-4,
           "ok": False, "error": None, "threads": case.threads, "tokens_per_s": None, "packed_bytes": packed}
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(case.threads)
        torch.manual_seed(0)
        model = IFairyForCausalLM(cfg).eval()
        row["max_err"] = err = cache_check(model)  # float32 head (see the module docstring)
        row["ok"] = err <= row["tol"]
        model.lm_head.to(case.head)
        row["ours_ms"] = statistics.median(decode_step_ms(model))
        row["tokens_per_s"] = 1e3 / row["ours_ms"]
        row.update(step_parts_ms(model))
        row["gbps"] = packed / (row["ours_ms"] * 1e-3) / 1e9  # packed linears only
        row["shape"] += (f": {row['tokens_per_s']:.3g} tok/s (linears {row['linears_ms']:.0f} ms, head "
                         f"{row['head_ms']:.0f} ms a step)")
    except Exception as e:  # noqa: BLE001 -- one broken row must not hide the others
        row["error"] = f"{type(e).__name__}: {e}".splitlines()[0][:200]
    finally:
        torch.set_num_threads(saved)
    return row


def _linear_shapes(cfg: IFairyConfig) -> list[tuple[int, int]]:
    h, f, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_key_value_heads * cfg.head_dim
    return [(h, h), (kv, h), (kv, h), (h, h), (f, h), (f, h), (h, f)]


def rows(device: str, quick: bool) -> Rows:
    return Rows(cases(device, quick), measure)
