"""train.py under torchrun (2 ranks, gloo, on the CPU): every policy trains, including when no row of a micro-batch
evicts (the encoder then has no gradient, which DDP refuses unless told), and SIGINT to the torchrun agent stops the
ranks inside a step, with a checkpoint and the command that continues the run."""
import os
import signal
import subprocess
import sys
import time

import json

import pytest

import data
from conftest import ROOT
from test_train import logged_steps, weights

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
TINY = ["--model", "toy", "--objective", "distill", "--prompts-per-step", "2", "--group", "2", "--micro-batch", "2",
        "--max-new", "8", "--threads", "1"]
ENV = dict(os.environ, OMP_NUM_THREADS="1")


@pytest.fixture
def problems(tmp_path):
    """A few toy problems in a file: every rank loads its data, and the toy's generated sets are large."""
    path = tmp_path / "toy.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in data.make_problems(12, seed=0)))
    return ["--data", str(path), "--eval-data", str(path)]


@pytest.mark.slow
def test_every_policy_trains_on_two_ranks(tmp_path, problems):
    """At --cache 64 no toy rollout of 8 tokens evicts: pte and global-0 leave the encoder without a gradient (DDP
    stopped at step 2 with "Expected to have finished reduction in the prior iteration"). Two steps each, with a
    sharded held-out evaluation; the five runs go at once."""
    policies = ("pte", "global-0", "global-only", "window", "full")
    runs = {policy: subprocess.Popen([*TORCHRUN, "train.py", *TINY, *problems, "--policy", policy, "--cache", "64",
                                      "--steps", "2", "--eval-size", "3", "--eval-every", "1",
                                      "--out", str(tmp_path / policy)],
                                     cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for policy in policies}
    for policy, process in runs.items():
        out = process.communicate(timeout=600)[0]
        assert process.returncode == 0, f"{policy}:\n{out[-3000:]}"
        assert logged_steps(tmp_path / policy) == [1, 1, 2, 2]  # each step, then its held-out accuracy of 3 problems
        assert "evictions\": 0.0" in (tmp_path / policy / "metrics.jsonl").read_text()
        assert any(v.abs().sum() > 0 for k, v in weights(tmp_path / policy).items() if k.startswith("B."))


@pytest.mark.slow
def test_sigint_to_the_agent_stops_the_ranks_inside_a_step(tmp_path, problems):
    """Rank 0 sleeps in step 2's rollout while rank 1 waits for it in a collective. SIGINT to the agent: rank 0
    stops at once, the ranks agree to drop the step, rank 0 writes the checkpoint of step 1 and the resume command
    (had they run on, the agent would have killed them 30 s later, with nothing written)."""
    run = tmp_path / "run"
    agent = subprocess.Popen([*TORCHRUN, "tests/torchrun_slow.py", *TINY, *problems, "--steps", "3",
                              "--save-every", "10", "--eval-size", "0", "--out", str(run)], cwd=ROOT, env=ENV,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while not ((run / "metrics.jsonl").exists() and (run / "metrics.jsonl").read_text()) and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(1)  # into step 2's rollout
    agent.send_signal(signal.SIGINT)
    out = agent.communicate(timeout=120)[0]
    stopped = f"SIGINT: stopped; the checkpoint of step 1 is in {run / 'step-000001'}. Continue with:\n"
    assert stopped in out, out[-3000:]
    assert f"  torchrun --nproc_per_node 2 train.py --resume {run}\n" in out
    assert (run / "latest").read_text() == "step-000001" and logged_steps(run) == [1]
