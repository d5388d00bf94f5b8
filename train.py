"""GRPO training of the adapters and thought encoder under a fixed-size cache: `python train.py --model qwen2.5-3b`.

Each step: take the next prompts, `generate` G rollouts of each without autograd under the cache policy,
grade them, compute group advantages, replay them with `score` (segment-checkpointed, gradients through
the cache and the chain of S), and take one AdamW step on the adapter and encoder parameters (the base
model is frozen). One update per batch, so the PPO ratio is 1 and the clip is inert unless --epochs > 1.
Several GPUs or nodes: `torchrun --nproc_per_node N train.py ...` (DistributedDataParallel over the adapter;
each rank rolls out its share of the prompts; rank 0 alone writes). Checkpoints are written atomically
(a temporary folder, renamed) and `--resume DIR` continues exactly, with the run's own settings.json: every step
reseeds its sampler from (seed, step, rank) and derives its prompts from (seed, step), so no generator state has
to be carried over. Ctrl-C or SIGTERM stop with a checkpoint of the last completed step (a step whose update has
not begun is dropped). Prompts that leave the cache too few thought slots are set aside when the data is loaded.

Choices the paper leaves open (SPEC section 5): group 8, temperature 1.0, beta 0.02 for the toy (it breaks
without a KL anchor) and 0 for real models (the usual LoRA-free recipes), token-mean loss.
Our extension beyond the paper: `--objective distill` trains the cache-constrained policy to match the
full-cache base model's next-token distribution (forward KL) on its own rollouts.
"""
import argparse
import json
import os
import random
import resource
import shlex
import shutil
import signal
import sys
import threading
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm

import data
import grade
import plot
from encoder import Adapter, AdapterConfig, load_adapter, param_groups, save_adapter, trainable
from eval import device_name, evaluate, number
from grpo import group_advantages, grpo_loss
from cache import MIN_THOUGHT_SLOTS
from model import load, load_tokenizer, resolve
from rollout import CachePolicy, Rollout, generate, score

PAPER_DEFAULTS = dict(policy="pte", cache=1024, evict=0.25, rank=32, globals=32, targets="q,k,v,o", lr=1e-5,
                      grad_clip=1.0, max_new=3072, group=8, prompts_per_step=64, steps=200, temperature=1.0, beta=0.0,
                      loss="token-mean", micro_batch=8, eval_every=50, eval_size=64, save_every=25, data="math_train")
SHAPE_KEYS = ("model", "policy", "rank", "globals", "targets")  # a checkpoint must agree on these to be resumed
SAFE_ON_RESUME = ("steps", "save_every", "eval_every", "log_samples_every", "micro_batch", "threads", "device",
                  "data_dir", "compile", "checkpoint")  # how long, how often, on what: not what the run computes
NOT_SETTINGS = ("resume", "out")  # where the run lives, not how it runs
TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


def target_names(text):
    if not text or not set(text.split(",")) <= set(TARGETS):
        raise argparse.ArgumentTypeError(f"{text!r}: comma-separated names from {','.join(TARGETS)}")
    return text


def is_run(folder: Path):
    return any((folder / name).exists() for name in ("settings.json", "metrics.jsonl", "latest"))


def parser():
    """The flags, each with argparse default None (so that a flag given can be told from one left unset), and the
    built-in defaults of those outside PAPER_DEFAULTS."""
    p = argparse.ArgumentParser(
        prog="train.py", description=__doc__.split("\n\n")[0],
        epilog="A model folder that holds train_defaults.json (toy/ does) replaces the paper defaults with its own.")
    builtin = {}

    def a(flag, **kw):  # the help shows the paper default of a flag left unset, else the built-in default
        key = flag[2:].replace("-", "_")
        builtin[key] = kw.pop("default", False if kw.get("action") == "store_true" else None)
        default = PAPER_DEFAULTS.get(key, builtin[key])
        kw["help"] += "" if default is None or default is False else f" (default: {default})"
        p.add_argument(flag, default=None, **kw)
    a("--model", default="toy",
      help="registry name (qwen2.5-3b, r1-llama-8b, smollm2-135m, toy, ...) or Hugging Face folder")
    a("--policy", choices=["pte", "window", "full", "global-0", "global-only"],
      help="cache policy: pte | window (LoRA_c) | full (LoRA) | global-0 | global-only (pte ablations)")
    a("--objective", default="grpo", choices=["grpo", "distill"],
      help="distill: our extension, KL to the full-cache base model")
    a("--cache", type=number(int, 1), help="cache budget N: prompt slots + thought window")
    a("--evict", type=number(float, 0, 1, above=True), help="share of the thought window evicted when it is full")
    a("--rank", type=number(int, 1), help="adapter rank r")
    a("--alpha", type=number(float, 0, above=True), help="adapter scale numerator (scale alpha/r); default: r")
    a("--globals", type=number(int, 1), help="global tokens of the encoder's initial state")
    a("--b-init", type=number(float, 0), default=0.0, help="adapter init: 0 is LoRA's (A random, B = 0); > 0: A = 0, "
      "B ~ N(0, b_init^2) (encoder.py)")
    a("--targets", type=target_names, help=f"adapted linears, comma-separated from {','.join(TARGETS)}")
    a("--lr", type=number(float, 0, above=True), help="AdamW learning rate")
    a("--encoder-lr", type=number(float, 0, above=True), help="AdamW learning rate of the thought encoder "
      "(W_Q, W_K, W_V, q_g, global tokens); default: --lr")
    a("--grad-clip", type=number(float, 0, above=True), help="max gradient norm")
    a("--max-new", type=number(int, 1), help="rollout token limit")
    a("--group", type=number(int, 1), help="rollouts per prompt G")
    a("--prompts-per-step", type=number(int, 1), help="prompts per step, over all ranks")
    a("--micro-batch", type=number(int, 1), help="rollout rows per score/backward pass (gradient accumulation)")
    a("--epochs", type=number(int, 1), default=1, help="PPO updates per batch, each an optimizer step over all its "
      "rollouts (1: the ratio is exactly 1 and the clip is inert)")
    a("--steps", type=number(int, 1), help="optimizer steps")
    a("--temperature", type=number(float, 0), help="sampling temperature of the rollouts")
    a("--top-p", type=number(float, 0, 1, above=True), default=1.0, help="nucleus sampling of the rollouts")
    a("--beta", type=number(float, 0), help="k3 KL coefficient to the base model (adapter off, same cache policy)")
    a("--kl-estimator", default="k3", choices=["k3", "k3-ratio"], help="the KL penalty's estimator: k3's gradient is "
      "that of KL(ref || pi); k3-ratio (k3 times pi / pi_old)'s that of KL(pi || ref) (grpo.py)")
    a("--loss", choices=["token-mean", "seq-mean", "constant"], help="loss aggregation (DAPO, GRPO, Dr. GRPO)")
    a("--no-std", action="store_true", help="advantages r - mean without std normalisation (Dr. GRPO)")
    a("--checkpoint", action=argparse.BooleanOptionalAction, default=True, help="score with gradient checkpoints "
      "(each segment and layer recomputed in backward: memory of one segment, one more forward); --no-checkpoint "
      "keeps every activation: the same gradients, faster where memory is no object (the toy)")
    a("--truncate", action="store_true", help="truncated backprop: each segment back-propagates at once against "
      "the cache and S as constants (PAPER Q7); memory fixed by --cache instead of growing with the rollout")
    a("--data", help="training problems: comma-separated JSONL paths or names (math_train, gsm8k, dapo-math-17k, ...). "
      "The paper trained on DAPO-Math-17K (--data dapo-math-17k, fetched once from the Hugging Face hub); our default, "
      "math_train (MATH's training problems), also works offline from a local file")
    a("--data-dir", help="where names resolve: default $PTE_DATA, else data/")
    a("--eval-data", help="held-out problems from a data set of their own (its first --eval-size), "
      "not split off --data")
    a("--eval-size", type=number(int, 0), help="held-out problems for --eval-every and the closing table")
    a("--eval-every", type=number(int, 0), help="steps between held-out accuracy checks (0: never)")
    a("--save-every", type=number(int, 1), help="steps between checkpoints")
    a("--out", help="run folder, new or empty (default runs/<model>-<policy>-<time>)")
    a("--resume", help="run folder to continue from its latest checkpoint with its own settings (settings.json); "
      f"of the other flags only {', '.join('--' + k.replace('_', '-') for k in SAFE_ON_RESUME)} may change")
    a("--seed", type=int, default=0, help="seed of the adapter init, the data order and the sampling")
    a("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
      help="base model dtype (auto: checkpoint's on GPU, fp32 on CPU)")
    a("--device", type=device_name, default="auto", help="auto | cpu | cuda | cuda:N")
    a("--threads", type=number(int, 1), help="CPU threads (torch.set_num_threads)")
    a("--compile", action=argparse.BooleanOptionalAction,
      help="decode through the compiled step (rollout.compiled_step; default: on cuda, off on the CPU)")
    a("--log-samples-every", type=number(int, 0), default=10,
      help="steps between sample completions written to samples.jsonl")
    return p, builtin


def model_defaults(p, name):
    """The train_defaults.json of the model's folder ({} without one): flag names (with _) to values."""
    try:
        path = resolve(name) / "train_defaults.json"
    except (ValueError, FileNotFoundError) as e:
        p.error(f"--model: {e}")
    if not path.exists():
        return {}
    defaults = json.loads(path.read_text())
    unknown = [k for k in defaults if k not in vars(p.parse_args([])) or k in NOT_SETTINGS]
    if unknown:
        p.error(f"{path}: not training flags: {', '.join(unknown)}")
    return defaults


def resumed_settings(p, run: Path, given):
    """The run's settings.json, with the safe flags among `given` applied; any other flag that differs is refused."""
    path = run / "settings.json"
    if not path.exists():
        p.error(f"--resume {run}: no settings.json there: not a run folder of train.py")
    settings = json.loads(path.read_text())
    if "out" in given:
        p.error(f"--out with --resume: the run continues in its own folder {run}")
    changed = {k: v for k, v in given.items() if k in settings and settings[k] != v}
    refused = [f"--{k.replace('_', '-')} {v} (the run has {settings[k]})" for k, v in changed.items()
               if k not in SAFE_ON_RESUME]
    if refused:
        p.error(f"--resume {run}: these flags would change the run: {'; '.join(refused)}. Drop them to continue it "
                f"as it was, or start a new run with --out (only {', '.join(SAFE_ON_RESUME)} may change on resume)")
    resumed = settings.get("resumed", []) + [dict(changed={k: [settings[k], v] for k, v in changed.items()})]
    return {**settings, **changed, "resumed": resumed}


def parse_args(argv=None):
    """Flags -> args: a new run's from the flags given, the model folder's train_defaults.json and PAPER_DEFAULTS;
    a resumed run's from its settings.json. Every check runs here, before any model loads."""
    p, builtin = parser()
    args = p.parse_args(argv)
    given = {k: v for k, v in vars(args).items() if v is not None and k != "resume"}
    if args.resume:  # a flag newer than the run keeps its built-in default
        defaults = {**builtin, **resumed_settings(p, Path(args.resume), given)}
    else:
        if args.out and is_run(Path(args.out)):
            p.error(f"--out {args.out} holds a run already: continue it with --resume {args.out}, "
                    "or name another --out")
        defaults = {**builtin, **PAPER_DEFAULTS, **model_defaults(p, args.model or builtin["model"])}
    for k, v in defaults.items():
        if k in vars(args) and k not in NOT_SETTINGS and getattr(args, k) is None:
            setattr(args, k, v)
    args.resumed = defaults.get("resumed", [])
    args.alpha = args.alpha or float(args.rank)
    if args.objective == "grpo" and args.group < 2:
        p.error("--group 1 gives every rollout advantage 0 (no learning signal): use 2 or more")
    if args.objective == "grpo" and args.temperature == 0:
        p.error("--temperature 0: greedy rollouts of a group are all the same (no learning signal)")
    return args


# ---------------------------------------------------------------------------------------------------- the data

def load_problems(args):
    """(training problems, held-out problems): --data, and the first --eval-size of --eval-data or else of --data."""
    problems = [p for name in args.data.split(",") for p in data.load_problems(name, args.data_dir, args.seed)]
    if args.eval_data:
        return problems, data.load_problems(args.eval_data, args.data_dir, args.seed)[:args.eval_size]
    random.Random(args.seed).shuffle(problems)
    held_out, train = problems[:args.eval_size], problems[args.eval_size:]
    if not train:
        raise ValueError(f"--data {args.data}: no problems left for training after holding out {args.eval_size}")
    return train, held_out


def step_prompts(problems, step, args, rank, world):
    """This rank's share of the step's prompts: a seeded permutation per epoch, so the order follows from the step."""
    n, per_rank = len(problems), args.prompts_per_step // world
    picks = []
    for i in range(step * args.prompts_per_step + rank * per_rank,
                   step * args.prompts_per_step + (rank + 1) * per_rank):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(args.seed * 1_000_003 + i // n))
        picks.append(problems[int(order[i % n])])
    return picks


# ---------------------------------------------------------------------------------------------------- one step

def take(ro: Rollout, rows):
    """The rollout's rows, trimmed to their own longest prompt and completion: less padding to replay (each row's
    window depends on its own prompt only, so the trim changes no value)."""
    P, T = int(ro.prompt_lens[rows].max()), int(ro.mask[rows].sum(1).max())
    return Rollout(ro.prompts[rows, ro.prompts.shape[1] - P:], ro.prompt_lens[rows], ro.tokens[rows, :T],
                   ro.logprobs[rows, :T], ro.mask[rows, :T], ro.truncated[rows],
                   [ro.evictions[i] for i in rows.tolist()], ro.stats)


class Objective(nn.Module):
    """What DistributedDataParallel wraps: the adapter (the only trainable parameters) and the loss of a
    micro-batch. The frozen model is kept out of the module tree so that DDP neither syncs nor broadcasts it."""

    def __init__(self, model, adapter, args, policy, ref_policy):
        super().__init__()
        self.adapter, self.args, self.policy, self.ref_policy = adapter, args, policy, ref_policy
        object.__setattr__(self, "model", model)

    def forward(self, ro, adv, old_logp, n_rows, n_tokens):
        """(loss, stats, the learner's detached log-probs (b, T) or None). old_logp None: this is the batch's first
        pass, and the PPO "old" log-probs are the learner's own replay (ratio exactly 1 in any dtype), not
        generate's."""
        a = self.args
        if a.objective == "distill":  # forward KL(full-cache base || cache-constrained policy) per token
            with torch.no_grad():  # the teacher's (b, T, V) log-probs, one micro-batch at a time
                teacher = score(self.model, ro, CachePolicy("full", a.cache, a.evict), None,
                                token_fn=lambda logits, _, span: torch.log_softmax(logits.float(), -1))
            per_token = score(self.model, ro, self.policy, self.adapter, truncate=a.truncate,
                              use_checkpoint=a.checkpoint, token_fn=lambda logits, _, span: (
                                  teacher[:, span[0]:span[1]].exp()
                                  * (teacher[:, span[0]:span[1]] - torch.log_softmax(logits.float(), -1))).sum(-1))
            loss = torch.where(ro.mask, per_token, 0).sum() / n_tokens
            return loss, dict(kl=loss.item() * n_tokens / max(int(ro.mask.sum()), 1), clip_frac=0.0), None
        ref_logp = None
        if a.beta > 0:  # the base model (adapter off) under the same cache, this micro-batch only: (b, T)
            with torch.no_grad():
                ref_logp = score(self.model, ro, self.ref_policy, None, a.temperature)
        logp = score(self.model, ro, self.policy, self.adapter, a.temperature, truncate=a.truncate,
                     use_checkpoint=a.checkpoint)  # (b, T)
        old = logp.detach() if old_logp is None else old_logp
        loss, stats = grpo_loss(logp, old, adv, ro.mask, ref_logp, a.beta, how=a.loss, max_new=a.max_new, n_rows=n_rows,
                                n_tokens=n_tokens, kl_estimator=a.kl_estimator)
        return loss, stats, logp.detach()


def update(objective, optimizer, ro, adv, args, world):
    """--epochs optimizer steps on a rank's rollouts (PPO updates per batch), micro-batched; the normalisers count
    all ranks' rows and tokens, and DDP averages the gradients, hence the factor `world`. --truncate accumulates
    each parameter's gradient once per segment, which DDP's hooks refuse: there they are summed by hand.
    The first pass's log-probs are the "old" ones of every later epoch, and their distance to generate's is the
    sampler-learner gap (mean and max |delta log p| over the completion tokens)."""
    counts = torch.tensor([ro.mask.shape[0], ro.mask.sum()], dtype=torch.float64, device=ro.mask.device)
    if world > 1:
        dist.all_reduce(counts)
    n_rows, n_tokens = counts.tolist()
    chunks = torch.arange(ro.mask.shape[0], device=ro.mask.device).split(args.micro_batch)
    params = trainable(objective.module.adapter if world > 1 else objective.adapter)
    old, gaps, stats, norms = [None] * len(chunks), [], [], []
    for epoch in range(args.epochs):
        for i, rows in enumerate(chunks):
            part = take(ro, rows)
            sync = nullcontext() if world == 1 or (i == len(chunks) - 1 and not args.truncate) else objective.no_sync()
            with sync:
                loss, s, logp = objective(part, adv[rows], old[i], n_rows, n_tokens)
                (loss * world).backward()
            if epoch == 0 and logp is not None:
                old[i] = logp
                gaps.append((logp - part.logprobs).abs()[part.mask])  # (tokens,)
            stats.append(dict(s, loss=loss.item(), rows=len(rows)))
        if world > 1 and args.truncate:
            for p in params:
                p.grad = torch.zeros_like(p) if p.grad is None else p.grad
                dist.all_reduce(p.grad)
                p.grad /= world
        norms.append(torch.nn.utils.clip_grad_norm_(params, args.grad_clip).item())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    total = sum(s["rows"] for s in stats)
    out = {k: sum(s[k] * s["rows"] for s in stats) / total for k in ("kl", "clip_frac")}
    gap = torch.cat(gaps) if gaps else None
    return dict(out, loss=sum(s["loss"] for s in stats) / args.epochs, grad_norm=sum(norms) / len(norms),
                sampler_gap_mean=gap.mean().item() if gap is not None and gap.numel() else None,
                sampler_gap_max=gap.max().item() if gap is not None and gap.numel() else None)


# ---------------------------------------------------------------------------------------------------- checkpoints

def save_checkpoint(out: Path, step, adapter, optimizer, settings, keep=2):
    """out/step-NNNNNN written as a temporary folder and renamed, then out/latest updated by an atomic rename."""
    final, tmp = out / f"step-{step:06d}", out / f".step-{step:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_adapter(adapter, tmp, policy=settings["cache_policy"], settings=settings)
    torch.save(dict(step=step, optimizer=optimizer.state_dict(), settings=settings), tmp / "state.pt")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    (out / "latest.tmp").write_text(final.name)
    os.replace(out / "latest.tmp", out / "latest")
    for old in sorted(out.glob("step-*"))[:-keep]:
        shutil.rmtree(old)


def read_checkpoint(ckpt: Path, model_cfg, device):
    """(state, adapter) of one checkpoint folder; ValueError or FileNotFoundError naming the damaged file."""
    if not ckpt.is_dir():
        raise FileNotFoundError(f"{ckpt} is missing")
    try:
        state = torch.load(ckpt / "state.pt", map_location=device, weights_only=False)
    except Exception as e:  # truncated or corrupt zip, missing file: torch raises several kinds
        raise ValueError(f"{ckpt / 'state.pt'} is unreadable, truncated or corrupt ({type(e).__name__}: {e})") from None
    return state, load_adapter(ckpt, model_cfg, device)


def load_checkpoint(run: Path, settings, model_cfg, device):
    """(step, adapter, optimizer state) of the checkpoint that run/latest names, refused when its settings differ.
    When it is damaged, the newest intact checkpoint before it is used, with a warning."""
    if not (run / "latest").exists():
        raise FileNotFoundError(f"--resume {run}: no checkpoint there (no 'latest' file)")
    latest = run / (run / "latest").read_text().strip()
    older = sorted((c for c in run.glob("step-*") if c.name < latest.name), reverse=True)
    errors = []
    for ckpt in [latest, *older]:
        try:
            state, adapter = read_checkpoint(ckpt, model_cfg, device)
        except (ValueError, FileNotFoundError) as e:
            errors.append(str(e))
            continue
        if errors:
            tqdm.write(f"WARNING: {run / 'latest'} names a damaged checkpoint: {errors[0]}. Resuming from {ckpt.name}, "
                       "the newest intact one before it.", file=sys.stderr)
        break
    else:
        raise ValueError(f"--resume {run}: no intact checkpoint: {'; '.join(errors)}")
    diff = [f"{k}: checkpoint {state['settings'].get(k)!r}, now {settings[k]!r}" for k in SHAPE_KEYS
            if state["settings"].get(k) != settings[k]]
    if diff:
        raise ValueError(f"--resume {run}: the checkpoint does not match this run ({'; '.join(diff)})")
    return state["step"], adapter, state["optimizer"]


def trim_log(path: Path, last_step):
    """Keep the records of steps up to last_step (the steps after it run again), rewritten atomically (a temporary
    file, then a rename). A torn last line (a kill or a full disk mid-write) is dropped with a warning."""
    if not path.exists():
        return
    lines, kept = path.read_text(encoding="utf-8", errors="replace").splitlines(True), []
    for n, line in enumerate(lines, start=1):
        try:
            if json.loads(line)["step"] <= last_step:
                kept.append(line if line.endswith("\n") else line + "\n")
        except (ValueError, KeyError, TypeError):
            if n < len(lines):
                raise ValueError(f"{path}, line {n}: not a record of train.py; repair or delete it") from None
            tqdm.write(f"WARNING: {path}: dropped its torn last line ({len(line)} characters)", file=sys.stderr)
    data.atomic_write(path, lambda p: p.write_text("".join(kept), encoding="utf-8"))


class Stop(Exception):
    """SIGINT or SIGTERM arrived while the step in progress had changed nothing yet: it is dropped."""


@contextmanager
def stop_on_signals(raise_at_once):
    """Within: SIGINT (Ctrl-C) and SIGTERM set request["signal"], and raise Stop at once when `raise_at_once` (a single
    process: the step in progress is dropped) unless request["committing"] is set: train sets it from the optimizer
    step until the step is logged, so that an update is never torn, and raises Stop itself at the step's end."""
    request = dict(signal=None, committing=False)

    def handle(signum, frame):
        request["signal"] = signum
        if raise_at_once and not request["committing"]:
            raise Stop(signum)
    main_thread = threading.current_thread() is threading.main_thread()  # handlers can only be set there
    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)
                if main_thread and signal.getsignal(sig) is not signal.SIG_IGN}  # an ignored signal stays ignored
    try:
        yield request
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# ---------------------------------------------------------------------------------------------------- main

def _status_kib(*keys):
    """Lines of Linux's /proc/self/status, in KiB: VmHWM (the resident peak), VmRSS (resident now)."""
    lines = Path("/proc/self/status").read_text().split("\n")
    return [int(next(line for line in lines if line.startswith(k + ":")).split()[1]) for k in keys]


def reset_peak_memory(device):
    """Start a new peak: the allocator's on cuda; on Linux the resident-set high-water mark (clear_refs).
    Returns whether the next peak_memory_gb is this interval's (not where clear_refs is missing or ignored)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        hwm, rss = _status_kib("VmHWM", "VmRSS")
    except (OSError, StopIteration):
        return False  # not Linux: only the peak since the process started
    return hwm - rss < 16 * 1024  # the old peak is gone, or near enough to the present size not to matter


def peak_memory_gb(device):
    """Peak since reset_peak_memory: allocated tensors on cuda, resident memory (VmHWM) on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        return _status_kib("VmHWM")[0] / 2**20
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux, the whole life's peak


def held_out_table(model, tokenizer, problems, family, adapter, cache_policy, args):
    rows = [("base, full cache", None, CachePolicy("full", args.cache, args.evict))]
    if cache_policy.policy != "full":
        rows.append((f"base, {'window' if cache_policy.policy == 'pte' else cache_policy.policy}", None,
                     CachePolicy("window", args.cache, args.evict)))
    rows.append((f"trained, {args.policy}", adapter, cache_policy))
    print(f"\nHeld-out accuracy ({len(problems)} problems, greedy, cache {args.cache}, max {args.max_new} tokens):")
    for name, ad, pol in rows:
        summary, _ = evaluate(model, tokenizer, problems, pol, adapter=ad, family=family, max_new=args.max_new,
                              batch_size=max(args.micro_batch, 16), progress=False)
        print(f"  {name:<28} {summary['accuracy']:6.3f}")


def train(args, stop):
    """The run: load, train, checkpoint, log, and the closing table. Returns the run folder."""
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if world > 1:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if args.prompts_per_step % world:
            raise ValueError(f"--prompts-per-step {args.prompts_per_step} must be divisible by the {world} ranks")
    tokenizer, family = load_tokenizer(args.model), data.chat_family(resolve(args.model))
    train_set, held_out = load_problems(args)  # the data before the model: its errors come at once
    budget = None if args.policy == "full" else args.cache
    train_set, train_ids, set_aside = data.encode_prompts(train_set, tokenizer, family, budget)
    held_out, _, held_out_set_aside = data.encode_prompts(held_out, tokenizer, family, budget)
    if not train_set:
        raise ValueError(f"--cache {args.cache}: every training prompt leaves fewer than {MIN_THOUGHT_SLOTS} "
                         "thought slots")
    train_set = [dict(p, prompt_ids=ids) for p, ids in zip(train_set, train_ids)]
    dtype = dict(auto=None, bf16=torch.bfloat16, fp16=torch.float16, fp32=torch.float32)[args.dtype]
    model = load(args.model, dtype=dtype, device=device)
    mode = {"pte": "pte", "global-0": "global-0", "global-only": "global-only"}.get(args.policy, "lora")
    cache_policy = CachePolicy("pte" if mode != "lora" else args.policy, args.cache, args.evict)
    ref_policy = CachePolicy("window" if cache_policy.policy == "pte" else cache_policy.policy, args.cache, args.evict)
    settings = dict(model=args.model, policy=args.policy, cache_policy=cache_policy.policy, rank=args.rank,
                    globals=args.globals, targets=args.targets,
                    set_aside=dict(training=set_aside, held_out=held_out_set_aside,
                                   min_thought_slots=MIN_THOUGHT_SLOTS),
                    **{k: v for k, v in vars(args).items() if k not in (*SHAPE_KEYS, *NOT_SETTINGS)})
    torch.manual_seed(args.seed)
    adapter = Adapter(model.config, AdapterConfig(mode, args.rank, args.alpha, args.globals, args.targets.split(","),
                                                  args.b_init)).to(device)
    optimizer = torch.optim.AdamW(param_groups(adapter, args.lr, args.encoder_lr), lr=args.lr, weight_decay=0.0)
    start = 0
    out = Path(args.resume or args.out
               or f"runs/{Path(str(args.model)).name}-{args.policy}-{time.strftime('%Y%m%d-%H%M%S')}")
    if args.resume:
        start, adapter, opt_state = load_checkpoint(out, settings, model.config, device)
        optimizer = torch.optim.AdamW(param_groups(adapter, args.lr, args.encoder_lr), lr=args.lr, weight_decay=0.0)
        optimizer.load_state_dict(opt_state)
        settings["resumed"][-1]["at_step"] = start
        if rank == 0:  # drop what was logged after the checkpoint: those steps run again
            trim_log(out / "metrics.jsonl", start)
            trim_log(out / "samples.jsonl", start)
    objective = Objective(model, adapter, args, cache_policy, ref_policy)
    if world > 1:
        objective = nn.parallel.DistributedDataParallel(
            objective, device_ids=[device.index] if device.type == "cuda" else None)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        data.atomic_write(out / "settings.json", lambda p: p.write_text(json.dumps(settings, indent=1)))
        aside = (f" ({set_aside} set aside: prompt leaves fewer than {MIN_THOUGHT_SLOTS} thought slots at cache "
                 f"{args.cache})" if set_aside or held_out_set_aside else "")
        print(f"{args.model}: {sum(p.numel() for p in trainable(adapter)):,} trainable parameters ({mode} adapter), "
              f"policy {args.policy}, cache {args.cache}, {len(train_set)} training problems{aside}, "
              f"{len(held_out)} held out{f' ({held_out_set_aside} set aside)' if held_out_set_aside else ''}, "
              f"{world} rank(s), run folder {out}")
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, disable=rank != 0, desc="train")
    t_start, done = time.perf_counter(), start  # done: the steps whose update is applied and logged

    def checkpoint_done():  # what a stop keeps
        if rank == 0 and not (out / f"step-{done:06d}").is_dir():
            save_checkpoint(out, done, adapter, optimizer, settings)
        return out, done
    stop["on_stop"] = checkpoint_done
    optimizer.register_step_pre_hook(lambda *_: stop.update(committing=True))
    for step in bar:
        done = step
        if world > 1:  # the ranks agree to stop at a step boundary
            signals = torch.tensor([stop["signal"] or 0], device=device)
            dist.all_reduce(signals, dist.ReduceOp.MAX)
            if signals.item():
                raise Stop(int(signals.item()))
        t0 = time.perf_counter()
        per_step_peak = reset_peak_memory(device)
        problems = step_prompts(train_set, step, args, rank, world)
        prompts = [p["prompt_ids"] for p in problems for _ in range(args.group)]
        # a function of the step: resumable
        gen = torch.Generator(device).manual_seed(args.seed * 1_000_003 + step * 1009 + rank)
        ro = generate(model, prompts, cache_policy, args.max_new, adapter, args.temperature, args.top_p, generator=gen,
                      compile=args.compile)
        if step == start and ro.stats.get("first_step_s"):
            tqdm.write(f"compiled decode step: first call {ro.stats['first_step_s']:.1f} s (compiling included)")
        texts = [tokenizer.decode(row[m].tolist(), skip_special_tokens=True) for row, m in zip(ro.tokens, ro.mask)]
        rewards = torch.tensor([grade.score(t, p["answer"]) for t, p in
                                zip(texts, (p for p in problems for _ in range(args.group)))], device=device)
        adv = group_advantages(rewards, args.group, std_norm=not args.no_std) if args.objective == "grpo" else rewards
        stats = update(objective, optimizer, ro, adv, args, world)
        lengths = ro.mask.sum(1).float()
        metrics = dict(step=step + 1, reward=rewards.mean().item(), accuracy=rewards.mean().item(),
                       zero_std_groups=(rewards.view(-1, args.group).amax(1)
                                        == rewards.view(-1, args.group).amin(1)).float().mean().item(),
                       length_mean=lengths.mean().item(), length_max=lengths.max().item(),
                       truncated=ro.truncated.float().mean().item(),
                       evictions=ro.stats["evictions"], window_min=min(ro.stats["windows"]),
                       window_mean=sum(ro.stats["windows"]) / len(ro.stats["windows"]),
                       s_update_ratio=ro.stats["s_update_ratio"], **stats,
                       tokens_per_s=ro.stats["tokens_per_s"],
                       peak_memory_gb=peak_memory_gb(device) if per_step_peak else None,
                       step_seconds=time.perf_counter() - t0, wall_seconds=time.perf_counter() - t_start)
        if world > 1:  # the logged rollout metrics are rank 0's share; the loss and the update cover all ranks
            dist.barrier()
        if rank != 0:
            continue
        bar.set_postfix(reward=f"{metrics['reward']:.3f}", kl=f"{metrics['kl']:.4f}",
                        tok_s=f"{metrics['tokens_per_s']:.0f}")
        with open(out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(metrics) + "\n")
        if metrics["truncated"] > 0.9:
            tqdm.write(f"WARNING step {step + 1}: {metrics['truncated']:.0%} of the rollouts hit "
                       f"--max-new {args.max_new} without an answer: their reward is 0. "
                       "Raise --max-new or check the prompt format.")
        if args.log_samples_every and (step + 1) % args.log_samples_every == 0:
            with open(out / "samples.jsonl", "a") as f:
                for i in range(0, len(texts), args.group)[:4]:
                    f.write(json.dumps(dict(step=step + 1, problem=problems[i // args.group]["problem"],
                                            answer=problems[i // args.group]["answer"],
                                            completion=texts[i], reward=rewards[i].item())) + "\n")
        done, stop["committing"] = step + 1, False
        if stop["signal"] and world == 1:  # it came during the update: the step is kept
            raise Stop(stop["signal"])
        if (step + 1) % args.save_every == 0 or step + 1 == args.steps:
            save_checkpoint(out, step + 1, adapter, optimizer, settings)
        if args.eval_every and (step + 1) % args.eval_every == 0 and held_out:
            summary, _ = evaluate(model, tokenizer, held_out, cache_policy, adapter=adapter, family=family,
                                  max_new=args.max_new, batch_size=max(args.micro_batch, 16), progress=False,
                                  compile=args.compile)
            tqdm.write(f"step {step + 1}: held-out accuracy {summary['accuracy']:.3f} ({len(held_out)} problems)")
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(dict(step=step + 1, held_out_accuracy=summary["accuracy"])) + "\n")
    if rank == 0:
        save_adapter(adapter, out / "adapter", policy=cache_policy.policy, settings=settings)
        print(f"done: {args.steps - start} steps in {time.perf_counter() - t_start:.0f} s; "
              f"adapter in {out / 'adapter'}; reward curve in {plot.reward_curve(out)}")
        if held_out and args.eval_size:
            held_out_table(model, tokenizer, held_out, family, adapter, cache_policy, args)
    if world > 1:
        dist.destroy_process_group()
    return out


def main(argv=None):
    """train.py's command line. SIGINT (Ctrl-C) or SIGTERM stop the run with a checkpoint of the last completed step
    and exit 130 or 143 after printing the command that continues it."""
    args = parse_args(argv)
    with stop_on_signals(raise_at_once=int(os.environ.get("WORLD_SIZE", 1)) == 1) as stop:
        try:
            return train(args, stop)
        except Stop as e:
            signum = e.args[0]
            if "on_stop" not in stop:
                print(f"\n{signal.Signals(signum).name}: stopped before the first step: nothing to save",
                      file=sys.stderr)
            else:
                stop["committing"] = True  # a second signal must not tear the checkpoint
                out, done = stop["on_stop"]()
                world = int(os.environ.get("WORLD_SIZE", 1))
                launcher = "python" if world == 1 else f"torchrun --nproc_per_node {world}"
                if int(os.environ.get("RANK", 0)) == 0:
                    print(f"\n{signal.Signals(signum).name}: stopped; the checkpoint of step {done} is in "
                          f"{out / f'step-{done:06d}'}. Continue with:\n"
                          f"  {launcher} train.py --resume {shlex.quote(str(out))}", file=sys.stderr)
            raise SystemExit(128 + signum) from None


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"train.py: error: {e}")
