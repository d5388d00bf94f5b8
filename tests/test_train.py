"""train.py end to end on the toy: a short run, exact resume, the DDP update, bad input."""
import json
import mmap
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train
from conftest import ROOT

# distillation has a gradient from the first step (the window differs from the full cache), GRPO only once a
# group's rewards differ, so the checks of "an update happened" use it
FAST = ["--model", "toy", "--objective", "distill", "--steps", "2", "--prompts-per-step", "4", "--group", "4",
        "--eval-size", "0", "--threads", "1"]


def weights(run, name="adapter"):
    return load_file(str(run / name / "adapter.safetensors"))


def test_short_run_learns_something_and_logs(tmp_path):
    out = train.main(FAST + ["--out", str(tmp_path / "run"), "--save-every", "1", "--lr", "1e-2"])
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    for key in ("reward", "accuracy", "zero_std_groups", "length_mean", "length_max", "truncated", "evictions", "kl",
                "clip_frac", "grad_norm", "tokens_per_s", "peak_memory_gb", "wall_seconds"):
        assert key in metrics[0], key
    assert metrics[0]["evictions"] > 0  # the toy's budget forces evictions
    # B starts at zero: a non-zero B means an update happened
    assert any(v.abs().sum() > 0 for k, v in weights(out).items() if k.startswith("B."))
    assert (out / "latest").read_text() == "step-000002"


def test_resume_is_exact(tmp_path):
    """4 steps in one go and 2 + resume + 2 give identical adapter weights."""
    common = FAST[:FAST.index("--steps")] + FAST[FAST.index("--steps") + 2:] + ["--save-every", "2"]
    one = train.main(common + ["--steps", "4", "--out", str(tmp_path / "one")])
    two = train.main(common + ["--steps", "2", "--out", str(tmp_path / "two")])
    train.main(common + ["--steps", "4", "--resume", str(two)])
    steps = [json.loads(line)["step"] for line in (two / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]  # nothing logged twice
    a, b = weights(one), weights(two)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(a[k].abs().sum() > 0 for k in a if k.startswith("B."))


def test_resume_refuses_another_adapter_shape(tmp_path):
    run = train.main(FAST + ["--steps", "1", "--out", str(tmp_path / "run")])
    with pytest.raises(ValueError, match="rank: checkpoint 16, now 8"):
        train.main(FAST + ["--rank", "8", "--resume", str(run)])
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train.main(FAST + ["--resume", str(tmp_path)])


def test_bad_input_is_refused(tmp_path):
    with pytest.raises(SystemExit):
        train.parse_args(["--model", "toy", "--group", "1"])
    with pytest.raises(ValueError, match="unknown model"):
        train.main(["--model", "no-such-model", "--out", str(tmp_path / "x")])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"problem": "1+1", "answer": "2"}\n{not json\n')
    with pytest.raises(ValueError, match="bad.jsonl.*2"):
        train.main(FAST + ["--data", str(bad), "--out", str(tmp_path / "y")])
    with pytest.raises(ValueError, match="thought slots"):
        train.main(FAST + ["--cache", "20", "--out", str(tmp_path / "z")])


@pytest.mark.slow
@pytest.mark.parametrize("truncate", [[], ["--truncate"]])
def test_torchrun_two_ranks_equal_one_process_on_the_union(tmp_path, truncate):
    """DDP over gloo: 2 ranks with 2 prompts each make the same update as 1 process with all 4. Greedy rollouts
    and the distillation objective make the rollouts independent of the batch split and the gradient non-zero.
    --truncate sums the gradients by hand instead of through DDP's hooks."""
    args = ["train.py", "--model", "toy", "--objective", "distill", "--temperature", "0", "--steps", "1",
            "--prompts-per-step", "4", "--group", "2", "--micro-batch", "2", "--eval-size", "0", "--threads", "1", "--lr", "1e-2",
            *truncate]
    env = dict(os.environ, OMP_NUM_THREADS="1")

    def run(*command, out, tries=1):
        for i in range(tries):
            folder = tmp_path / f"{out}-{i}"
            done = subprocess.run([sys.executable, *command, "--out", str(folder)], cwd=ROOT, env=env, capture_output=True, text=True)
            if done.returncode == 0:
                return weights(folder)
        raise AssertionError(f"{' '.join(command)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")

    # this test failed once in about 20 runs here, cause not captured: a failed launch gets one retry, and two show the output
    ddp = run("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args, out="ddp", tries=2)
    one = run(*args, out="one")
    assert any(one[k].abs().sum() > 0 for k in one if k.startswith("B."))
    if truncate:  # the flag reached the gradient: the exact update is another one
        exact = run(*[x for x in args if x != "--truncate"], out="exact")
        assert not all(torch.allclose(exact[k], one[k]) for k in one)
    for k in one:
        torch.testing.assert_close(ddp[k], one[k], atol=1e-6, rtol=1e-5)


def resident_peak(n_bytes):
    """Map n_bytes afresh and write every page, then unmap: resident memory peaks n_bytes above its present size
    (a torch tensor would not do: malloc may hand back freed heap pages that are already resident)."""
    buf = mmap.mmap(-1, n_bytes)
    torch.frombuffer(buf, dtype=torch.uint8).fill_(1)
    buf.close()


def test_peak_memory_is_per_step(monkeypatch):
    """metrics.jsonl's peak is the step's, not the process's: a 256 MiB peak before the reset is not seen.
    reset_peak_memory says whether the reset worked (found out here on our own), and a kernel that ignores it is caught."""
    cpu, status = torch.device("cpu"), Path("/proc/self/status")
    if not Path("/proc/self/clear_refs").exists():
        assert not train.reset_peak_memory(cpu)
        return

    def hwm_minus_rss():  # KiB
        s = status.read_text()
        return int(re.search(r"VmHWM:\s+(\d+)", s)[1]) - int(re.search(r"VmRSS:\s+(\d+)", s)[1])

    resident_peak(2**28)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        honoured = hwm_minus_rss() < 16 * 1024  # this kernel forgets the old peak
    except OSError:
        honoured = False
    resident_peak(2**28)
    with monkeypatch.context() as m:  # a kernel that ignores the write
        m.setattr(train, "open", lambda *a, **k: open(os.devnull, "w"), raising=False)
        assert not train.reset_peak_memory(cpu)
    assert train.reset_peak_memory(cpu) == honoured
    if not honoured:
        return
    before = train.peak_memory_gb(cpu)
    resident_peak(2**28)
    during = train.peak_memory_gb(cpu)
    assert train.reset_peak_memory(cpu)
    after = train.peak_memory_gb(cpu)
    assert during - before > 0.2
    assert after < during - 0.2
