"""train.py's run folder as a demanding user meets it: one writer per folder (real processes), --out new or empty,
every folder a run leaves resumable, an interrupted evaluation redone, nothing non-finite saved, every value checked
wherever it comes from, file-system errors in one line."""
import json
import math
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

import train
from conftest import ROOT
from encoder import Adapter, AdapterConfig, param_groups
from model import load
from test_train import FAST, logged_steps, refused, weights

ENV = dict(os.environ, OMP_NUM_THREADS="1")
TIMING = ("tokens_per_s", "peak_memory_gb", "step_seconds", "wall_seconds")  # what differs between two equal runs


def start(log, *argv):
    """train.py as a process of its own, its output in the file `log` (a pipe left unread could fill and block it)."""
    with open(log, "w") as f:
        return subprocess.Popen([sys.executable, "train.py", *argv], cwd=ROOT, env=ENV, stdout=f, stderr=f)


def wait_for_steps(run, process, n):
    """Until `process` has logged n training steps in run/metrics.jsonl."""
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        log = run / "metrics.jsonl"
        if log.exists() and sum('"reward"' in line for line in log.read_text().splitlines()) >= n:
            return
        time.sleep(0.1)
    raise AssertionError(f"no step {n} logged (exit {process.poll()})")


def refused_by(holder, *commands):
    """Run the train.py `commands` ((flag, argv) each) at once; each is refused, naming the holder's PID."""
    contenders = [(flag, subprocess.Popen([sys.executable, "train.py", *argv], cwd=ROOT, env=ENV, text=True,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)) for flag, argv in commands]
    for flag, process in contenders:
        err = process.communicate(timeout=120)[1]
        assert process.returncode == 1 and err.strip().splitlines()[-1].startswith(  # one line, no traceback
            f"train.py: error: {flag} ") and f"is in use by another process (PID {holder.pid}): wait for" in err, err


def test_one_writer_per_folder(tmp_path):
    """A second train.py on a live run's --out, a --resume of a live run, and a second of two resumes are refused at
    once, naming the holder's PID; the log holds every step once."""
    run = tmp_path / "run"
    holder = start(tmp_path / "holder.log", *FAST, "--steps", "1000", "--save-every", "1", "--out", str(run))
    wait_for_steps(run, holder, 1)
    refused_by(holder, ("--out", [*FAST, "--out", str(run)]), ("--resume", ["--resume", str(run)]))
    holder.send_signal(signal.SIGTERM)
    assert holder.wait(60) == 143
    first = start(tmp_path / "first.log", "--resume", str(run))
    wait_for_steps(run, first, len(logged_steps(run)) + 1)
    refused_by(first, ("--resume", ["--resume", str(run)]))
    first.send_signal(signal.SIGTERM)
    assert first.wait(60) == 143, (tmp_path / "first.log").read_text()[-2000:]
    steps = logged_steps(run)
    assert steps == list(range(1, len(steps) + 1))


def test_an_interrupted_evaluation_is_redone_on_resume(tmp_path, monkeypatch):
    """SIGTERM during step 2's held-out evaluation: the step's checkpoint is kept and the resumed run evaluates it
    first, so metrics.jsonl is the uninterrupted run's (timings aside)."""
    argv = FAST + ["--steps", "4", "--eval-size", "8", "--eval-every", "2", "--save-every", "10"]
    whole = train.main(argv + ["--out", str(tmp_path / "whole")])
    calls, real = [], train.evaluate

    def evaluate(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)
    monkeypatch.setattr(train, "evaluate", evaluate)
    with pytest.raises(SystemExit) as e:
        train.main(argv + ["--out", str(tmp_path / "cut")])
    assert e.value.code == 143 and (tmp_path / "cut" / "latest").read_text() == "step-000002"
    monkeypatch.setattr(train, "evaluate", real)
    train.main(["--resume", str(tmp_path / "cut")])

    def records(run):
        return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
                for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("held_out_accuracy") is not None for r in records(whole)] == [False, False, True, False, False, True]
    assert records(tmp_path / "cut") == records(whole)


def test_non_finite_steps_are_skipped_and_three_in_a_row_stop_the_run(tmp_path, monkeypatch, capsys):
    """A NaN loss at step 2 skips its update (logged, warned, the weights unchanged); NaN from step 2 on stops the
    run after step 4 with a clear message, and no checkpoint holds a NaN."""
    real, calls, bad = train.Objective.forward, [], set()

    def forward(self, *args):
        loss, stats, logp = real(self, *args)
        calls.append(1)
        return (loss * math.nan if len(calls) in bad else loss), stats, logp
    monkeypatch.setattr(train.Objective, "forward", forward)
    bad.update({2})
    run = train.main(FAST + ["--steps", "2", "--save-every", "1", "--out", str(tmp_path / "one")])
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["skipped"] for m in metrics] == [False, True] and metrics[1]["loss"] is None
    assert "WARNING step 2: the loss (nan) or gradient norm" in capsys.readouterr().err
    a, b = weights(run, "step-000001"), weights(run, "step-000002")
    assert all(torch.equal(a[k], b[k]) for k in a) and any(a[k].abs().sum() > 0 for k in a if k.startswith("B."))
    calls.clear()
    bad.update({3, 4, 5, 6})
    with pytest.raises(ValueError, match=r"steps 2-4: the loss or the gradient norm was not finite 3 times in a row: "
                                         r"stopped .* Nothing non-finite was saved: .*step-000004 is the last good"):
        train.main(FAST + ["--steps", "6", "--save-every", "1", "--out", str(tmp_path / "three")])
    run = tmp_path / "three"
    assert logged_steps(run) == [1, 2, 3, 4] and (run / "latest").read_text() == "step-000004"
    assert all(torch.isfinite(t).all() for t in weights(run, "step-000004").values())


def test_nothing_non_finite_is_saved(tmp_path):
    """save_checkpoint refuses an adapter or optimizer state that holds an infinity, naming it, and leaves the
    checkpoint before it as it was."""
    model = load("toy")
    adapter = Adapter(model.config, AdapterConfig("pte", 4, 4.0, 2, ["o"]))
    optimizer = torch.optim.AdamW(param_groups(adapter, 1e-3), lr=1e-3)
    sum(p.sum() for p in adapter.parameters()).backward()
    optimizer.step()
    settings = dict(cache_policy="pte", model="toy")
    train.save_checkpoint(tmp_path, 1, adapter, optimizer, settings)
    before = (tmp_path / "step-000001" / "adapter.safetensors").read_bytes()
    with torch.no_grad():
        adapter.q_g[0, 0, 0] = math.inf
    with pytest.raises(ValueError, match="step 2: adapter q_g holds NaN or infinite values: not saved"):
        train.save_checkpoint(tmp_path, 2, adapter, optimizer, settings)
    with torch.no_grad():
        adapter.q_g[0, 0, 0] = 0.0
    next(iter(optimizer.state.values()))["exp_avg"][0] = math.nan
    with pytest.raises(ValueError, match="step 2: optimizer exp_avg of .* holds NaN or infinite values"):
        train.save_checkpoint(tmp_path, 2, adapter, optimizer, settings)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-000001"]
    assert (tmp_path / "step-000001" / "adapter.safetensors").read_bytes() == before


def test_every_folder_resumes(tmp_path, capsys):
    """A run that stopped before its first checkpoint resumes from step 0 with its settings, to the same weights; a
    missing, empty, garbled or stale `latest` falls back to the newest intact step-*, whatever the folder's name
    (an empty one once resolved to the run folder itself, whose name then decided)."""
    run = train.main(FAST + ["--steps", "3", "--save-every", "1", "--out", str(tmp_path / "aaa")])
    final = weights(run)
    for path in [run / "latest", run / "metrics.jsonl", *run.glob("step-*")]:
        shutil.rmtree(path) if path.is_dir() else path.unlink()  # what a kill before the first checkpoint leaves
    capsys.readouterr()
    train.main(["--resume", str(run)])
    assert "no checkpoint yet: starting from step 0 with its settings" in capsys.readouterr().err
    assert logged_steps(run) == [1, 2, 3] and all(torch.equal(final[k], weights(run)[k]) for k in final)
    shutil.copytree(run, tmp_path / "zzz")
    for folder, latest, why in ((run, None, "aaa/latest is missing"), (run, "", "aaa/latest names ''"),
                                (tmp_path / "zzz", "", "zzz/latest names ''"),
                                (run, "step-0\x00", "aaa/latest names 'step-0"),
                                (run, "step-000002", "aaa/latest names 'step-000002'")):  # a stop before its update
        (folder / "latest").unlink(missing_ok=True)
        if latest is not None:
            (folder / "latest").write_text(latest)
        train.main(["--resume", str(folder)])
        err = capsys.readouterr().err
        assert why in err and "Resuming from step-000003, the newest intact checkpoint" in err, err
        assert logged_steps(folder) == [1, 2, 3] and (folder / "latest").read_text() == "step-000003"


def test_resume_never_goes_back(tmp_path, capsys):
    run = train.main(FAST + ["--steps", "2", "--out", str(tmp_path / "run")])
    settings = (run / "settings.json").read_text()
    with pytest.raises(ValueError, match="--steps 1: the run has completed 2 steps already"):
        train.main(["--resume", str(run), "--steps", "1"])
    assert (run / "settings.json").read_text() == settings


@pytest.mark.parametrize("content, message", [
    ({"steps": -3}, "steps: must be >= 1, got -3"), ({"evict": 5}, "evict: must be > 0 and <= 1, got 5"),
    ({"cache": "x"}, "cache: invalid int value 'x'"), ({"rank": 2.5}, "rank: must be an integer, got 2.5"),
    ({"lr": True}, "lr: must be a number, got True"), ({"checkpoint": "no"}, "checkpoint: must be true or false"),
    ({"policy": "lru"}, "policy: must be one of pte, window"), ({"targets": 5}, "targets: must be a string, got 5"),
    ({"out": "x"}, "out: not a training flag"), ([1, 2], "expected a JSON object, got list"),
    ("{bad", "malformed JSON"), ({"cache": 100}, "--cache 100: more than the model's 64 positions")])
def test_training_defaults_are_checked_like_flags(tmp_path, monkeypatch, capsys, content, message):
    folder = Path(shutil.copytree(ROOT / "toy", tmp_path / "model"))
    (folder / "train_defaults.json").write_text(content if isinstance(content, str) else json.dumps(content))
    monkeypatch.setattr(train, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    err = refused(capsys, ["--model", str(folder), "--out", str(tmp_path / "run")])
    assert message in err and (message.startswith("--") or f"{folder / 'train_defaults.json'}" in err)
    assert not (tmp_path / "run").exists()


def test_settings_and_model_files_are_checked(tmp_path, monkeypatch, capsys):
    """A resumed run's settings.json of the wrong shape or values, a model's malformed config.json and a damaged
    tokenizer.json are named before any model loads."""
    run = train.main(FAST + ["--steps", "1", "--out", str(tmp_path / "run")])
    settings = json.loads((run / "settings.json").read_text())
    monkeypatch.setattr(train, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    for edit, message in (([settings], "expected a JSON object, got list"), (dict(settings, lr=math.inf),
                          "lr: must be > 0, got inf"), (dict(settings, resumed=5), "resumed: expected a list"),
                          (dict(settings, group=None), "group: must be an integer, got None")):
        (run / "settings.json").write_text(json.dumps(edit))
        err = refused(capsys, ["--resume", str(run)])
        assert f"{run / 'settings.json'}" in err and message in err, err
    folder = Path(shutil.copytree(ROOT / "toy", tmp_path / "model"))
    (folder / "config.json").write_text('{"vocab_size": 27,')
    assert f"{folder / 'config.json'}: malformed JSON" in refused(capsys, FAST + ["--model", str(folder)])
    shutil.copy(ROOT / "toy" / "config.json", folder / "config.json")
    (folder / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "Nothing"}}')
    with pytest.raises(ValueError, match=re.escape(f"{folder / 'tokenizer.json'}: unreadable tokenizer")):
        train.main(FAST + ["--model", str(folder), "--out", str(tmp_path / "new")])
    assert not (tmp_path / "new").exists()


def test_values_that_need_the_data_are_checked_before_any_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(train, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    for flags, message in ((["--prompts-per-step", "1000000000"], "more than the 20000 training problems"),
                           (["--eval-size", "5000"], "--eval-size 5000: more than the 4096 problems of --eval-data")):
        with pytest.raises(ValueError, match=re.escape(message)):
            train.main(FAST + flags + ["--out", str(tmp_path / "run")])
        assert not (tmp_path / "run").exists()


def mounted(tmp_path, script, options):
    """`script` (sh) run with a tmpfs of `options` mounted at tmp_path/disk, in a mount namespace of its own (the
    mount ends with it); skipped where this machine allows none."""
    disk = tmp_path / "disk"
    disk.mkdir()
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o {options} tmpfs {disk}"],
                           capture_output=True)
    if probe.returncode:
        pytest.skip(f"no tmpfs mount here (unshare -rm): {probe.stderr.decode()[:200]}")
    return subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o {options} tmpfs {disk} && {script}"],
                          cwd=ROOT, env=ENV, capture_output=True, text=True)


def test_a_read_only_out_is_one_line_before_the_model_loads(tmp_path):
    command = " ".join([sys.executable, "train.py", *FAST, "--out", str(tmp_path / "disk" / "run")])
    done = mounted(tmp_path, command, "ro")
    assert done.returncode == 1 and "trainable parameters" not in done.stdout  # printed once the model is loaded
    assert done.stderr.strip().splitlines()[-1] == (f"train.py: error: --out {tmp_path / 'disk' / 'run'}: cannot write "
                                                    "there (Read-only file system)")


def test_a_full_disk_keeps_the_checkpoint_before_it(tmp_path):
    """A 200 KiB disk holds the first checkpoint but not a second beside it: one line names the path and the cause,
    and the first checkpoint stays whole (the listing is taken inside the namespace, before the disk goes)."""
    run = tmp_path / "disk" / "run"
    command = (" ".join([sys.executable, "train.py", *FAST, "--steps", "3", "--save-every", "1", "--out", str(run)])
               + f"; echo rc=$?; ls -a {run}; cat {run}/latest; echo; {sys.executable} -c \"import torch; "
               f"print(sorted(torch.load('{run}/step-000001/state.pt', weights_only=False)))\"")
    done = mounted(tmp_path, command, "size=200k")
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"train.py: error: {run}/.step-000002.tmp: the checkpoint of step 2 could not be "
                           "written (") and last.endswith("); the ones before it are kept"), done.stderr[-2000:]
    assert re.search(r"No space left on device|the disk is full", last), last
    listing = done.stdout.split("rc=1\n")[1].splitlines()
    assert ".step-000002.tmp" not in listing and listing[-3:] == ["step-000001", "step-000001",  # ls, then latest
                                                                  "['optimizer', 'settings', 'step']"], done.stdout
