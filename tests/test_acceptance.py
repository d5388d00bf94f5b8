"""`python experiments/bench.py --gpu`, the GPU acceptance, dry-run on the CPU at tiny sizes (the toy's shapes,
torch.compile's "eager" backend): every part runs in its subprocess, writes its log and result, and the table is saved.
On the CPU every check can pass (the rollout's peak is compared with the plan on cuda only), so every part must pass
here, and report its values."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_acceptance_dry_run_on_the_cpu(tmp_path):
    out = tmp_path / "acceptance"
    done = subprocess.run([sys.executable, str(ROOT / "experiments" / "bench.py"), "--gpu", "--device", "cpu",
                           "--gpu-model", "toy", "--quick", "--compile-backend", "eager", "--threads", "1",
                           "--out", str(out)],
                          capture_output=True, text=True, cwd=tmp_path, env=dict(os.environ, PTE_QWEN_TOKENIZER=""))
    results = {r["part"]: r for r in json.loads((out / "acceptance.json").read_text())}
    assert list(results) == ["toolchain", "smoke", "toy", "rollout", "grpo"]
    assert all(r["status"] == "pass" for r in results.values()), {k: r["summary"] for k, r in results.items()}
    assert done.returncode == 0, done.stderr[-3000:]
    smoke = results["smoke"]
    assert smoke["tokens_equal"] and smoke["grads_ok"] and smoke["score_gap"] < 1e-4
    # the CPU counts the ops that would sync: 4 in a call of 16 steps (the done check, the call's closing stats), none
    # at the rows' eviction events
    assert smoke["recompiles"] == 0 and smoke["syncs_per_step"] == 4 / 16
    assert results["toy"]["steps"] == [1, 2, 3]
    rollout = results["rollout"]
    assert rollout["plan_gib"] > 0 and rollout["peak_gib"] > 0 and rollout["decode_tokens_per_s"] > 0
    assert "recorded" in rollout["prompts"]  # no tokenizer here: the recorded prompt lengths
    assert results["grpo"]["step_s"] > 0
    table = (out / "acceptance.md").read_text()
    assert table.count("\n| ") == 6 and all((out / f"{part}.log").exists() for part in results)
    assert "saved in" in done.stdout
