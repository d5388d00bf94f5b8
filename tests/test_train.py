"""train.py end to end on the toy: a short run, exact resume, what resume and --out refuse, logs and checkpoints that
survive kills and damage, Ctrl-C and SIGTERM, flags checked before the model loads, bad input, the DDP update."""
import json
import mmap
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import data
import train
from conftest import ROOT

# distillation has a gradient from the first step (the window differs from the full cache), GRPO only once a
# group's rewards differ, so the checks of "an update happened" use it
FAST = ["--model", "toy", "--objective", "distill", "--steps", "2", "--prompts-per-step", "4", "--group", "4",
        "--eval-size", "0", "--threads", "1"]


def weights(run, name="adapter"):
    return load_file(str(run / name / "adapter.safetensors"))


def logged_steps(run, log="metrics.jsonl"):
    return [json.loads(line)["step"] for line in (run / log).read_text().splitlines()]


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
    """4 steps in one go and 2 + `--resume DIR --steps 4` give identical adapter weights: the resumed run takes its
    settings from settings.json (not the defaults), and the one safe change is recorded there."""
    common = FAST[:FAST.index("--steps")] + FAST[FAST.index("--steps") + 2:] + ["--save-every", "2"]
    one = train.main(common + ["--steps", "4", "--out", str(tmp_path / "one")])
    two = train.main(common + ["--steps", "2", "--out", str(tmp_path / "two")])
    train.main(["--resume", str(two), "--steps", "4"])
    assert logged_steps(two) == [1, 2, 3, 4]  # nothing logged twice
    a, b = weights(one), weights(two)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(a[k].abs().sum() > 0 for k in a if k.startswith("B."))
    settings = json.loads((two / "settings.json").read_text())
    assert [settings[k] for k in ("prompts_per_step", "group", "objective", "steps")] == [4, 4, "distill", 4]
    assert settings["resumed"] == [dict(changed=dict(steps=[2, 4]), at_step=2)]


def refused(capsys, argv):
    """train.main's argparse error (exit 2) as text."""
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


def test_resume_refuses_flags_that_change_the_run(tmp_path, capsys):
    run = train.main(FAST + ["--steps", "1", "--out", str(tmp_path / "run")])
    before = (run / "settings.json").read_text()
    message = refused(capsys, ["--resume", str(run), "--lr", "0.5", "--cache", "30", "--alpha", "2", "--seed", "1",
                               "--evict", "0.5", "--beta", "0.1", "--rank", "8", "--steps", "3"])
    for difference in ("--lr 0.5 (the run has 0.001)", "--cache 30 (the run has 27)", "--alpha 2.0 (the run has 128.0)",
                       "--seed 1 (the run has 0)", "--evict 0.5 (the run has 0.25)", "--beta 0.1 (the run has 0.05)",
                       "--rank 8 (the run has 16)"):
        assert difference in message
    assert "--steps" not in message.split("would change the run:")[1].split(". Drop")[0]  # a safe change
    assert "continues in its own folder" in refused(capsys, ["--resume", str(run), "--out", str(tmp_path / "x")])
    assert "no settings.json" in refused(capsys, ["--resume", str(tmp_path)])
    assert (run / "settings.json").read_text() == before and (run / "latest").read_text() == "step-000001"


def test_resume_refuses_a_checkpoint_of_another_adapter_shape(tmp_path):
    run = train.main(FAST + ["--steps", "1", "--out", str(tmp_path / "run")])
    settings = json.loads((run / "settings.json").read_text())
    (run / "settings.json").write_text(json.dumps(dict(settings, rank=8)))  # settings.json and checkpoint disagree
    with pytest.raises(ValueError, match="rank: checkpoint 16, now 8"):
        train.main(["--resume", str(run), "--steps", "2"])


def test_out_is_new_or_empty(tmp_path, monkeypatch):
    """--out holding a run, or anything else (an exported adapter/), or naming a file, is refused before any work
    and left as it was; an empty folder is fine."""
    run = train.main(FAST + ["--steps", "1", "--out", str(tmp_path / "run")])
    metrics = (run / "metrics.jsonl").read_bytes()
    with pytest.raises(ValueError, match=re.escape(f"holds a run already: continue it with --resume {run}, or name "
                                                   "another --out")):
        train.main(FAST + ["--out", str(run)])
    assert (run / "metrics.jsonl").read_bytes() == metrics and (run / "latest").read_text() == "step-000001"
    monkeypatch.setattr(train, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    shutil.copytree(run / "adapter", tmp_path / "export" / "adapter")
    with pytest.raises(ValueError, match="export is not empty .adapter. and holds no run of train.py: name a new"):
        train.main(FAST + ["--out", str(tmp_path / "export")])
    assert data.contents(tmp_path / "export") == ["adapter"] and not (tmp_path / "export" / ".lock").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="file: not a folder"):
        train.main(FAST + ["--out", str(tmp_path / "file")])
    monkeypatch.undo()
    (tmp_path / "empty").mkdir()
    assert train.main(FAST + ["--steps", "1", "--out", str(tmp_path / "empty")]) == tmp_path / "empty"  # empty: fine


def test_logs_survive_a_kill_and_a_torn_line(tmp_path, capsys):
    """Killed after step 3 was logged but before its checkpoint, with the last metrics line torn: resume warns, drops
    the torn line, and logs steps 1-3 once each in metrics.jsonl and samples.jsonl."""
    run = train.main(FAST + ["--steps", "3", "--save-every", "2", "--log-samples-every", "1",
                             "--out", str(tmp_path / "run")])
    (run / "latest").write_text("step-000002")
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "rew')
    capsys.readouterr()
    train.main(["--resume", str(run)])
    assert "metrics.jsonl: dropped its torn last line (16 characters)" in capsys.readouterr().err
    assert logged_steps(run) == [1, 2, 3] and logged_steps(run, "samples.jsonl") == [1] * 4 + [2] * 4 + [3] * 4
    # a broken line that is not the last is damage, not a kill: named, not dropped
    (run / "metrics.jsonl").write_text('{"step": 1}\n{"st\n{"step": 2}\n')
    with pytest.raises(ValueError, match="metrics.jsonl, line 2"):
        train.trim_log(run / "metrics.jsonl", 2)


def test_log_rewrite_is_atomic(tmp_path, monkeypatch):
    """A kill while metrics.jsonl is rewritten (here: the write truncates, then fails) leaves the old file whole."""
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 1}\n{"step": 2}\n')

    def killed(self, *args, **kwargs):
        open(self, "w").close()
        raise OSError("killed mid-write")
    monkeypatch.setattr(Path, "write_text", killed)
    with pytest.raises(OSError, match="killed"):
        train.trim_log(log, 1)
    assert log.read_bytes() == b'{"step": 1}\n{"step": 2}\n'


@pytest.mark.parametrize("when, kept", [("before", 1), ("after", 2)])
def test_ctrl_c_keeps_every_completed_step(tmp_path, monkeypatch, capsys, when, kept):
    """SIGINT during step 2: before its optimizer step the step is dropped at once; once the update has begun, the step
    finishes and is logged. Either way the checkpoint holds the last completed step, exit 130, the resume command."""
    real_update = train.update

    def update(objective, optimizer, *args):
        if optimizer.state and when == "before":  # step 2: the optimizer has state from step 1
            os.kill(os.getpid(), signal.SIGINT)
        stats = real_update(objective, optimizer, *args)
        if when == "after" and next(iter(optimizer.state.values()))["step"] == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return stats
    monkeypatch.setattr(train, "update", update)
    run = tmp_path / "run"
    ignored = signal.signal(signal.SIGINT, signal.default_int_handler)  # a background job starts with SIGINT ignored
    try:
        with pytest.raises(SystemExit) as e:
            train.main(FAST + ["--steps", "5", "--save-every", "10", "--out", str(run)])
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handlers are restored
    finally:
        signal.signal(signal.SIGINT, ignored)
    assert e.value.code == 130
    assert (run / "latest").read_text() == f"step-{kept:06d}"
    assert logged_steps(run) == list(range(1, kept + 1))
    err = capsys.readouterr().err
    assert f"SIGINT: stopped; the checkpoint of step {kept} is in" in err and f"python train.py --resume {run}\n" in err
    monkeypatch.setattr(train, "update", real_update)
    train.main(["--resume", str(run), "--steps", str(kept + 1)])
    assert logged_steps(run) == list(range(1, kept + 2))


def test_sigterm_stops_a_process_cleanly(tmp_path):
    """A real process: SIGTERM after the first logged step exits 143 without a traceback and prints the command
    that continues the run from a checkpoint of its last completed step."""
    run = tmp_path / "run"
    command = [sys.executable, "train.py", *FAST, "--steps", "1000", "--save-every", "500", "--out", str(run)]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=dict(os.environ, OMP_NUM_THREADS="1"))
    deadline = time.time() + 120
    while not ((run / "metrics.jsonl").exists() and (run / "metrics.jsonl").read_text()) and time.time() < deadline:
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    time.sleep(0.3)  # a late second signal, on the way out, is no traceback either
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 143 and "Traceback" not in err, err[-2000:]
    done = len((run / "metrics.jsonl").read_text().splitlines())
    assert (run / "latest").read_text() == f"step-{done:06d}"
    checkpoint = run / f"step-{done:06d}"
    assert (f"the checkpoint of step {done} is in {checkpoint}. Continue with:\n"
            f"  python train.py --resume {run}\n") in err


def test_a_damaged_checkpoint_is_named_and_the_one_before_used(tmp_path, capsys):
    run = train.main(FAST + ["--steps", "2", "--save-every", "1", "--out", str(tmp_path / "run")])
    state = run / "step-000002" / "state.pt"
    state.write_bytes(state.read_bytes()[:100])  # truncated
    capsys.readouterr()
    train.main(["--resume", str(run), "--steps", "3"])
    err = capsys.readouterr().err
    assert f"{state} is unreadable, truncated or corrupt" in err and "Resuming from step-000001" in err
    assert logged_steps(run) == [1, 2, 3]
    (run / "latest").write_text("step-000009")  # names a step that is not there
    train.main(["--resume", str(run), "--steps", "4"])
    assert f"{run / 'latest'} names 'step-000009'. Resuming from step-000003" in capsys.readouterr().err
    for step in (3, 4):  # keep=2: both checkpoints damaged
        adapter = run / f"step-{step:06d}" / "adapter.safetensors"
        adapter.write_bytes(adapter.read_bytes()[:50])
    with pytest.raises(ValueError, match=r"no intact checkpoint: .*step-000004/adapter.safetensors is unreadable"):
        train.main(["--resume", str(run), "--steps", "5"])


@pytest.mark.parametrize("flag, value, message", [
    ("--grad-clip", "-1", "must be > 0"), ("--grad-clip", "0", "must be > 0"),
    ("--temperature", "-0.5", "must be >= 0"), ("--steps", "-2", "must be >= 1"), ("--alpha", "0", "must be > 0"),
    ("--save-every", "-1", "must be >= 1"), ("--save-every", "0", "must be >= 1"),
    ("--eval-every", "-1", "must be >= 0"), ("--max-new", "0", "must be >= 1"), ("--micro-batch", "0", "must be >= 1"),
    ("--top-p", "0", "must be > 0 and <= 1"), ("--eval-size", "-1", "must be >= 0"),
    ("--threads", "-1", "must be >= 1"), ("--device", "tpu", "unknown device 'tpu'"), ("--lr", "nan", "must be > 0"),
    ("--evict", "1.5", "must be > 0 and <= 1"), ("--targets", "q,x", "comma-separated names from q,k,v,o,gate,up,down"),
    ("--model", "no-such-model", "unknown model 'no-such-model'"),
    # no infinity either: it would train NaN weights and save them
    ("--lr", "inf", "must be > 0, got inf"), ("--encoder-lr", "inf", "must be > 0, got inf"),
    ("--alpha", "inf", "must be > 0, got inf"), ("--b-init", "inf", "must be >= 0, got inf"),
    ("--beta", "inf", "must be >= 0, got inf"), ("--beta", "nan", "must be >= 0, got nan"),
    # sane upper bounds: 1e9 is refused at once, not after minutes of allocation
    ("--cache", "1000000000", "--cache 1000000000: more than the model's 64 positions"),
    ("--max-new", "1000000000", "--max-new 1000000000: more than the model's 64 positions"),
    ("--globals", "1000000000", "--globals 1000000000: more than the model's 64 positions"),
    ("--rank", "1000000000", "--rank 1000000000: more than the model's width 64"),
    ("--group", "1000000000", "must be >= 1 and <= 1024"), ("--prompts-per-step", "1e9", "invalid int value: '1e9'"),
    ("--threads", str(os.cpu_count() + 1), f"must be >= 1 and <= {os.cpu_count()}"),
    ("--seed", "-1", "must be >= 0"), ("--seed", str(2**32), "must be >= 0 and <= 4294967295"),
])
def test_flags_are_checked_before_any_model_loads(flag, value, message, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(train, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    assert message in refused(capsys, FAST + ["--out", str(tmp_path / "run"), flag, value])
    assert not (tmp_path / "run").exists()


def test_bad_input_is_refused(tmp_path, capsys):
    assert "--group 1 gives every rollout advantage 0" in refused(capsys, ["--model", "toy", "--group", "1"])
    assert "--temperature 0: greedy rollouts" in refused(capsys, ["--model", "toy", "--temperature", "0"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"problem": "1+1", "answer": "2"}\n{not json\n')
    with pytest.raises(ValueError, match="bad.jsonl.*2"):
        train.main(FAST + ["--data", str(bad), "--out", str(tmp_path / "y")])
    words = tmp_path / "words.jsonl"
    words.write_text('{"problem": "<bos> 1 2 <sep>", "answer": "3"}\n'
                     '{"problem": "<bos> 1 seven <sep>", "answer": "8"}\n')
    with pytest.raises(ValueError, match="problem 'words/2': word.s. 'seven' outside the tokenizer's vocabulary"):
        train.main(FAST + ["--data", str(words), "--out", str(tmp_path / "w")])
    with pytest.raises(ValueError, match="every training prompt leaves fewer than 4 thought slots"):
        train.main(FAST + ["--cache", "20", "--out", str(tmp_path / "z")])


def test_prompts_that_leave_too_few_thought_slots_are_set_aside_and_counted(tmp_path, capsys):
    """At --cache 24 a 19-token toy prompt leaves 5 thought slots and a 21-token one 3 (< 4): the 3 long problems
    are set aside when the data is loaded, counted in the first log line and in settings.json, never trained on."""
    short = [dict(id=f"s{i}", problem=p["problem"], answer=p["answer"]) for i, p in enumerate(data.make_problems(8, 1))]
    long = [dict(id=f"l{i}", problem=p["problem"].replace("<sep>", "0 0 <sep>"), answer=p["answer"])
            for i, p in enumerate(data.make_problems(3, 2))]
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in short + long))
    run = train.main(FAST + ["--data", str(path), "--cache", "24", "--steps", "1", "--log-samples-every", "1",
                             "--out", str(tmp_path / "run")])
    out = capsys.readouterr().out
    assert "8 training problems (3 set aside: prompt leaves fewer than 4 thought slots at cache 24)" in out
    settings = json.loads((run / "settings.json").read_text())
    assert settings["set_aside"] == dict(training=3, held_out=0, min_thought_slots=4)
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert samples and all("0 0 <sep>" not in sample["problem"] for sample in samples)


def test_train_does_not_know_the_toy():
    """No cycle: train.py reads the toy's defaults from toy/train_defaults.json and its problems through data.py."""
    done = subprocess.run([sys.executable, "-c", "import sys, train; print('toy' in sys.modules)"], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.stdout.strip() == "False", done.stderr
    assert "toy" not in re.findall(r"^(?:from|import) (\w+)", (ROOT / "train.py").read_text(), re.M)


def test_a_model_folder_brings_its_training_defaults(tmp_path, capsys):
    defaults = json.loads((ROOT / "toy" / "train_defaults.json").read_text())
    args = train.parse_args(["--model", "toy"])
    assert {k: getattr(args, k) for k in defaults} == defaults
    assert args.data == "toy-train" and train.parse_args(["--model", "toy", "--lr", "0.5"]).lr == 0.5  # a flag wins
    folder = Path(shutil.copytree(ROOT / "toy", tmp_path / "mine"))
    (folder / "train_defaults.json").write_text(json.dumps(dict(defaults, rank=4)))
    assert train.parse_args(["--model", str(folder)]).rank == 4
    (folder / "train_defaults.json").unlink()  # the paper's defaults: a cache beyond the toy's positions
    assert "--cache 1024: more than the model's 64 positions" in refused(capsys, ["--model", str(folder)])
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(config, max_position_embeddings=4096)))
    paper = train.parse_args(["--model", str(folder)])
    assert {k: getattr(paper, k) for k in train.PAPER_DEFAULTS} == train.PAPER_DEFAULTS
    train_set, held_out = train.load_problems(train.parse_args(["--model", "toy", "--seed", "3"]))
    assert train_set == data.make_problems(20_000, 3) and held_out == data.make_problems(256, data.EVAL_SEED)


@pytest.mark.slow
@pytest.mark.parametrize("truncate", [[], ["--truncate"]])
def test_torchrun_two_ranks_equal_one_process_on_the_union(tmp_path, truncate):
    """DDP over gloo: 2 ranks with 2 prompts each make the same update as 1 process with all 4. Greedy rollouts
    and the distillation objective make the rollouts independent of the batch split and the gradient non-zero.
    --truncate sums the gradients by hand instead of through DDP's hooks."""
    args = ["train.py", "--model", "toy", "--objective", "distill", "--temperature", "0", "--steps", "1",
            "--prompts-per-step", "4", "--group", "2", "--micro-batch", "2", "--eval-size", "0", "--threads", "1",
            "--lr", "1e-2", *truncate]
    env = dict(os.environ, OMP_NUM_THREADS="1")

    def run(*command, out, tries=1):
        for i in range(tries):
            folder = tmp_path / f"{out}-{i}"
            done = subprocess.run([sys.executable, *command, "--out", str(folder)], cwd=ROOT, env=env,
                                  capture_output=True, text=True)
            if done.returncode == 0:
                return weights(folder)
        raise AssertionError(f"{' '.join(command)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")

    # this test failed once in about 20 runs here, cause not captured: a failed launch gets one retry,
    # and two show the output
    ddp = run("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args, out="ddp", tries=2)
    one = run(*args, out="one")
    assert any(one[k].abs().sum() > 0 for k in one if k.startswith("B."))
    if truncate:  # the flag reached the gradient: the exact update is another one
        exact = run(*[x for x in args if x != "--truncate"], out="exact")
        assert not all(torch.allclose(exact[k], one[k]) for k in one)
    for k in one:
        torch.testing.assert_close(ddp[k], one[k], atol=1e-5, rtol=1e-5)  # sums in another order (3.5e-6 seen)


def resident_peak(n_bytes):
    """Map n_bytes afresh and write every page, then unmap: resident memory peaks n_bytes above its present size
    (a torch tensor would not do: malloc may hand back freed heap pages that are already resident)."""
    buf = mmap.mmap(-1, n_bytes)
    torch.frombuffer(buf, dtype=torch.uint8).fill_(1)
    buf.close()


def test_peak_memory_is_per_step(monkeypatch):
    """metrics.jsonl's peak is the step's, not the process's: a 256 MiB peak before the reset is not seen.
    reset_peak_memory says whether the reset worked (found out here on our own), and a kernel that ignores it is
    caught."""
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


def test_rollouts_in_chunks_train_alike(tmp_path):
    """--rollout-batch 3 against one generate call a step: 4 problems of prompts of 19 and 21 tokens, 4 greedy rollouts
    each, in 6 chunks sorted by prompt length: the same metrics (the chunk count and timings aside, and the fold ratio,
    a mean over eviction events that chunks group otherwise) and the same update."""
    problems = [dict(p, problem=p["problem"].replace("<sep>", "0 0 <sep>") if i % 2 else p["problem"])
                for i, p in enumerate(data.make_problems(4, 1))]
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in problems))
    common = FAST + ["--data", str(path), "--temperature", "0", "--save-every", "1"]
    one = train.main(common + ["--out", str(tmp_path / "one")])
    chunked = train.main(common + ["--rollout-batch", "3", "--out", str(tmp_path / "chunked")])
    skip = ("tokens_per_s", "peak_memory_gb", "step_seconds", "wall_seconds", "rollout_chunks", "s_update_ratio")
    records = {run: [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
               for run in (one, chunked)}
    assert [[r["rollout_chunks"] for r in records[run]] for run in (one, chunked)] == [[1, 1], [6, 6]]
    for a, b in zip(records[one], records[chunked]):
        assert ({k: pytest.approx(v, rel=1e-5) if isinstance(v, float) else v for k, v in a.items() if k not in skip}
                == {k: v for k, v in b.items() if k not in skip})
    assert records[one][0]["evictions"] > 0 and records[one][0]["window_min"] == 27 - 21
    a, b = weights(one), weights(chunked)
    assert any(a[k].abs().sum() > 0 for k in a if k.startswith("B."))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-7)


def test_reward_curve(tmp_path):
    """train.reward_curve's SVG: the per-step line at the top (reward 1) and the bottom (0) of the plot, the 10-step
    mean of 0, 1, 0, 1 halfway at step 4, the steps spread over the width."""
    import xml.etree.ElementTree as ET
    records = [dict(step=i + 1, reward=r) for i, r in enumerate([0, 1, 0, 1])] + [dict(step=4, held_out_accuracy=0.5)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    root = ET.fromstring(train.reward_curve(tmp_path).read_text())
    lines = {e.get("data-label"): [tuple(map(float, p.split(","))) for p in e.get("points").split()]
             for e in root.iter("{http://www.w3.org/2000/svg}polyline")}
    top, bottom = 30, 300 - 40
    assert lines["per step"] == [(50, bottom), (226.7, top), (403.3, bottom), (580, top)]  # 530 px wide, a third a step
    assert lines["10-step mean"][3][1] == (top + bottom) / 2 and lines["10-step mean"][0][1] == bottom
