"""The examples run, at a tiny size: single process in-process, and under torchrun (2 CPU processes, gloo)
where the loss curve must equal the single-process one on the same global batches."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "pretrain_llama.py"
TINY = ["--size", "tiny", "--steps", "5", "--batch-size", "4", "--seq-len", "32"]


def load_example():
    spec = importlib.util.spec_from_file_location("pretrain_llama", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def example():
    return load_example()


# SLTrain's factors at tiny size are 16 x 64: GaLore rank 8 so that Fira projects them; bf16 autocast
@pytest.mark.parametrize("layer,optim,extra", [("dense", "galore", []), ("sltrain", "fira", ["--galore-rank", "8", "--amp"])])
def test_single_process_against_dense(example, layer, optim, extra, tmp_path, capsys):
    out = tmp_path / "r.json"
    example.main([*TINY, "--layer", layer, "--optim", optim, *extra, "--json", str(out)])
    printed = capsys.readouterr().out
    assert "params+grads+opt+act MB" in printed and "step ms" in printed
    runs = json.loads(out.read_text())["runs"]
    ours, dense = runs[0], runs[-1]
    assert (ours["layer"], ours["optim"]) == (layer, optim) and (dense["layer"], dense["optim"]) == ("dense", "adamw")
    for r in runs:
        assert len(r["losses"]) == 5 and r["losses"][-1] < r["losses"][0] - 0.3, r["losses"]
        assert r["step_ms"] > 0 and all(v >= 0 for v in r["memory_bytes"].values())
        assert r["memory_bytes"]["activations"] > 0 and r["memory_bytes"]["optimizer"] > 0
    if layer != "dense":
        assert ours["params"] < dense["params"]
        state = lambda r: sum(r["memory_bytes"][k] for k in ("params", "grads", "optimizer"))  # noqa: E731
        assert state(ours) < state(dense)
    # GaLore / Fira keep rank-r moments for the projected matrices: less than AdamW's two full moments
    adamw_state = 2 * 4 * ours["params"]
    print(f"{layer}+{optim}: optimizer state {ours['memory_bytes']['optimizer']} B, AdamW's {adamw_state} B")
    assert ours["memory_bytes"]["optimizer"] < 0.8 * adamw_state


@pytest.mark.parametrize("parallel,layer,optim", [("fsdp", "sltrain", "adamw"), ("ddp", "monarch", "adamw"),
                                                   ("fsdp", "dense", "galore")])
def test_torchrun_matches_single_process(example, parallel, layer, optim, tmp_path):
    args = [*TINY, "--layer", layer, "--optim", optim, "--no-baseline"]
    single = example.main(args)[0]["losses"]
    out = tmp_path / "r.json"
    import lowrank  # the processes import the lowrank this test runs (installed, or a tree on PYTHONPATH)

    here = str(Path(lowrank.__file__).resolve().parents[1])
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([here, os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(SCRIPT),
           *args, "--parallel", parallel, "--json", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["world"] == 2 and result["parallel"] == parallel
    got = result["runs"][0]["losses"]
    print(f"{parallel}: {got}\nsingle: {single}")
    assert got == pytest.approx(single, rel=1e-4, abs=1e-4)
