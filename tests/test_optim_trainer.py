"""GaLoreAdamW with transformers.Trainer: clipping, LR schedule and checkpoint/resume (regular and per-layer),
and param groups from optim_target_modules-style patterns. A tiny LLaMA built from a config, offline."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from lowrank.optim import GaLoreAdamW  # noqa: E402
from lowrank.optim.trainer import PerLayerTrainerOptimizer, galore_param_groups, galore_trainer_optimizers  # noqa: E402

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate (scripts/setup.sh installs it)")

TARGETS = [r".*attn.*", r".*mlp.*"]
GALORE = {"rank": 8, "update_proj_gap": 2, "scale": 0.5}
STEPS = 4


def tiny_llama():
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config)


def dataset(n=8, length=12):
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 64, (n, length), generator=gen)
    return [{"input_ids": row, "labels": row.clone()} for row in ids]


def arguments(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=STEPS, learning_rate=5e-3,
                lr_scheduler_type="linear", warmup_steps=1, weight_decay=0.1, max_grad_norm=0.05, use_cpu=True,
                report_to=[], save_strategy="no", logging_strategy="no", disable_tqdm=True, seed=7,
                dataloader_num_workers=0)
    base.update(kw)
    return transformers.TrainingArguments(**base)


def train_with_trainer(args, per_layer=False, resume=None, **galore):
    model = tiny_llama()
    optimizers = galore_trainer_optimizers(model, args, TARGETS, per_layer=per_layer, **{**GALORE, **galore})
    trainer = transformers.Trainer(model=model, args=args, train_dataset=dataset(), optimizers=optimizers)
    trainer.train(resume_from_checkpoint=resume)
    return model, trainer


def params_of(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def max_rel(a: dict, b: dict) -> float:
    return max(((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-30)).item() for k in a)


def manual_loop(clip: float | None):
    """What Trainer should do: full batch each step, clip, step, linear schedule with 1 warm-up step."""
    model = tiny_llama()
    opt = GaLoreAdamW(galore_param_groups(model, TARGETS, **GALORE), lr=5e-3, betas=(0.9, 0.999), eps=1e-8,
                      weight_decay=0.1)
    sched = transformers.get_scheduler("linear", opt, num_warmup_steps=1, num_training_steps=STEPS)
    batch = dataset()
    ids = torch.stack([b["input_ids"] for b in batch])
    for _ in range(STEPS):
        model(input_ids=ids, labels=ids).loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        sched.step()
        opt.zero_grad()
    return params_of(model)


ACCUMULATE = dict(max_grad_norm=0.0, per_device_train_batch_size=4, gradient_accumulation_steps=2)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Trainer runs shared by the tests (each checkpoints at step 2, which does not change its training):
    regular with clipping; regular and per-layer with 2 micro-batches per step and no clipping."""
    root = tmp_path_factory.mktemp("trainer")
    out = {}
    for name, per_layer, kw in (("clipped", False, {}), ("regular_acc", False, ACCUMULATE),
                                ("per_layer_acc", True, ACCUMULATE)):
        args = arguments(root / name, save_strategy="steps", save_steps=2, **kw)
        model, trainer = train_with_trainer(args, per_layer=per_layer)
        out[name] = (params_of(model), args, trainer)
    return out


def test_regular_trainer_clips_and_schedules(runs):
    got, _, trainer = runs["clipped"]
    assert isinstance(getattr(trainer.optimizer, "optimizer", trainer.optimizer), GaLoreAdamW)
    want, unclipped = manual_loop(0.05), manual_loop(None)
    err, without = max_rel(got, want), max_rel(got, unclipped)
    print(f"Trainer vs clipped manual loop {err:.2e}; vs unclipped {without:.2e}")
    assert err <= 1e-4
    assert without > 10 * max(err, 1e-6)  # clipping was really applied


@pytest.mark.parametrize("name", ["clipped", "per_layer_acc"])
def test_trainer_resume_equals_uninterrupted(runs, name):
    full, args, _ = runs[name]
    resumed, _ = train_with_trainer(args, per_layer=name.startswith("per_layer"),
                                    resume=os.path.join(args.output_dir, "checkpoint-2"))
    err = max_rel(params_of(resumed), full)
    print(f"resumed vs uninterrupted {err:.2e}")
    assert err <= 1e-6


def test_per_layer_trainer_equals_regular_with_accumulation(runs):
    """Per-layer with 2 micro-batches per step and a warm-up + linear schedule against regular GaLoreAdamW
    under the same Trainer settings (no clipping in both)."""
    regular, per_layer = runs["regular_acc"][0], runs["per_layer_acc"][0]
    trainer = runs["per_layer_acc"][2]
    inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    assert isinstance(inner, PerLayerTrainerOptimizer)
    lrs = {g["lr"] for opt in inner.per_layer.optimizers for g in opt.param_groups}
    assert lrs == {0.0}  # the linear schedule reached its end in every per-layer optimizer
    err = max_rel(per_layer, regular)
    print(f"per-layer vs regular Trainer {err:.2e}")
    assert err <= 1e-5
    assert max_rel(regular, params_of(tiny_llama())) > 1e-3


def test_per_layer_trainer_refuses_clipping(tmp_path):
    with pytest.raises(ValueError, match="max_grad_norm"):
        galore_trainer_optimizers(tiny_llama(), arguments(tmp_path), TARGETS, per_layer=True)


def test_param_groups_from_patterns():
    model = tiny_llama()
    names = {id(p): n for n, p in model.named_parameters()}
    projected = galore_param_groups(model, TARGETS)[0]["params"]
    got = sorted(names[id(p)] for p in projected)
    assert len(got) == 2 * 7 and all(n.endswith("_proj.weight") for n in got)
    only_q = galore_param_groups(model, ["q_proj"], rank=4)  # list entries match as substrings
    assert [names[id(p)] for p in only_q[0]["params"]] == [f"model.layers.{i}.self_attn.q_proj.weight" for i in (0, 1)]
    assert only_q[0]["rank"] == 4 and len(only_q[1]["params"]) == len(names) - 2
    regex = galore_param_groups(model, r"model\.layers\.1\.mlp\..*")  # a string is one full-match regex
    assert len(regex[0]["params"]) == 3
    assert galore_param_groups(model, ["embed_tokens", "q_proj"])[0]["params"].__len__() == 2  # not nn.Linear
    with pytest.raises(ValueError, match="no nn.Linear"):
        galore_param_groups(model, ["nothing"])
