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
from dataclasses import dataclass, field
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
from cache import MIN_THOUGHT_SLOTS, evict_count
from model import ONEDNN, REGISTRY, Transformer, config_from_hf, load, load_tokenizer, read_config, resolve
from rollout import LOGIT_CHUNK, CachePolicy, Rollout, generate, score

PAPER_DEFAULTS = dict(policy="pte", cache=1024, evict=0.25, rank=32, globals=32, targets="q,k,v,o", lr=1e-5,
                      grad_clip=1.0, max_new=3072, group=8, prompts_per_step=64, steps=200, temperature=1.0, beta=0.0,
                      loss="token-mean", micro_batch=8, eval_every=50, eval_size=64, save_every=25, data="math_train")
SHAPE_KEYS = ("model", "policy", "rank", "globals", "targets")  # a checkpoint must agree on these to be resumed
SAFE_ON_RESUME = ("steps", "save_every", "eval_every", "log_samples_every", "micro_batch", "threads", "device",
                  "data_dir", "compile", "checkpoint",
                  "prefill_rows")  # how long, how often, on what: not what the run computes
NOT_SETTINGS = ("resume", "out", "plan")  # where the run lives, not how it runs
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
    a("--prefill-rows", type=number(int, 1), default=32, help="rows of one prefill forward in generate: its "
      "activations grow with rows x prompt length")
    a("--plan", nargs="?", const=True, type=number(float, 0, above=True), help="print the memory plan of each phase "
      "for these flags and exit, loading no weights: for this machine's device, or --plan GIB for a cuda device of "
      "GIB GiB (a run refuses to start when its plan exceeds the device's memory)")
    return p, builtin


def model_defaults(p, name, plan=False):
    """The train_defaults.json of the model's folder ({} without one): flag names (with _) to values. --plan takes a
    registry model's shapes without its folder (a Hugging Face repository holds no train_defaults.json)."""
    if plan and REGISTRY.get(name, (None, None))[1] is not None:
        return {}
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
        defaults = {**builtin, **PAPER_DEFAULTS, **model_defaults(p, args.model or builtin["model"], args.plan)}
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


# ---------------------------------------------------------------------------------------------------- the memory plan
# The peak memory of each phase of a step, from the model's shapes and the flags alone (nothing is loaded but the
# config), so that a run that cannot fit is refused before it starts. docs/method.md §9 derives each term; e is the
# model dtype's bytes, kv_tok = 2 L d_kv e the keys and values of one token over all layers, R the rows of one
# generate call, P the longest prompt, T = --max-new, b = --micro-batch, n the longest segment score replays.

CUDA_CONTEXT_BYTES = 2**30  # the CUDA context and the libraries' workspaces: device memory the allocator never counts
DEFAULT_ROLLOUT_BATCH = 128  # rows of one generate call when the flags do not say


@dataclass
class MemorySettings:
    """One rank's step as the memory plan sees it."""
    policy: str = "pte"  # pte | window | full | global-0 | global-only
    objective: str = "grpo"
    cache: int = 1024
    evict: float = 0.25
    max_new: int = 3072
    longest_prompt: int = 1024 - MIN_THOUGHT_SLOTS  # the cache's rows, the prefill and `full` are sized by it
    shortest_prompt: int = 1  # the widest window, hence the longest segment of score
    rows: int = 512  # rollouts of one step on this rank
    rollout_rows: int = DEFAULT_ROLLOUT_BATCH  # rows of one generate call
    prefill_rows: int = 32  # rows of one prefill forward
    micro_batch: int = 8
    checkpoint: bool = True
    truncate: bool = False
    beta: float = 0.0
    adapter: AdapterConfig | None = field(default_factory=AdapterConfig)  # None: the bare model
    device: str = "cuda"
    dtype_bytes: int = 2
    optimizer: bool = True  # AdamW's states stay between steps (bench's rollouts have none)
    packed: bool = False  # CPU fp32: generate holds oneDNN's blocked copy of the linears (model.packed_weights)
    runtime: int = CUDA_CONTEXT_BYTES  # what the process holds before any weight


def plan_counts(cfg, adapter_cfg):
    """(model parameters, of which in nn.Linear weights (lm_head counted even when tied), adapter parameters),
    counted on the meta device: no memory, no weights."""
    with torch.device("meta"):
        model = Transformer(cfg)
        adapter = Adapter(cfg, adapter_cfg) if adapter_cfg is not None else None
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    return (sum(p.numel() for p in model.parameters()), linear,
            sum(p.numel() for p in adapter.parameters()) if adapter is not None else 0)


def _layer_bytes(cfg, s, rows, n, ctx, part):
    """One decoder layer over n query tokens of each of `rows` rows against ctx key slots a row.
    "forward": its largest set of live activations without autograd (the attention's or the MLP's, and the mask);
    "saved": what autograd keeps for its backward (the norms' fp32 inputs, the adapters' inputs, q and the attention
    output, the MLP's three F-wide tensors; the keys, values and mask the attention kernel read);
    "backward": the saved and the gradients in flight (the MLP's, the norms', the keys' and values').
    On cuda attend_masked expands the KV heads: H heads of keys and values, one copy."""
    e, d, F, q_dim, kv = s.dtype_bytes, cfg.dim, cfg.ffn_dim, cfg.n_heads * cfg.head_dim, cfg.kv_dim
    mlp_adapted = bool(s.adapter) and bool({"gate", "up", "down"} & set(s.adapter.targets))
    heads_dim = q_dim if s.device == "cuda" else kv
    tokens, mask = rows * n, rows * n * ctx * e
    if part == "forward":
        attention = 2 * d + 3 * q_dim + 2 * kv + 2 * (heads_dim - kv) * (s.device == "cuda")
        return tokens * max(attention, 2 * d + (3 + mlp_adapted) * F) * e + mask
    saved = (tokens * (2 * d * max(e, 4) + (d + 3 * q_dim + 3 * F + mlp_adapted * (d + F)) * e)
             + rows * ctx * 2 * heads_dim * e + mask)
    if part == "saved":
        return saved
    return saved + tokens * (3 * F * e + 2 * d * 4) + rows * ctx * 2 * heads_dim * e


def _score_bytes(cfg, s):
    """One micro-batch's score and backward, or the pass without autograd before it (the reference's under --beta,
    the teacher's under distill) where that holds more."""
    e, b, T, V, P, L = s.dtype_bytes, s.micro_batch, s.max_new, cfg.vocab_size, s.longest_prompt, cfg.n_layers
    kv_tok, distill = 2 * L * cfg.kv_dim * e, s.objective == "distill"
    n = evict_count(max(s.cache - s.shortest_prompt, MIN_THOUGHT_SLOTS), s.evict)  # segments: at most the widest m
    ctx = P + T if s.policy == "full" else s.cache + 2 * n  # a segment's keys: prompt, window, the last m, its own
    kept = b * (P + T if s.policy == "full" or not s.truncate else ctx) * kv_tok  # exact: every segment's, for backward
    per_logit = e + 8 + 4 * (e < 4) + (e + 16) * distill  # logits, fp32 log-softmax, its gradients; the teacher's
    logits = b * min(LOGIT_CHUNK, n) * V * per_logit  # one checkpointed chunk of positions
    teacher = b * T * cfg.dim * e * distill  # its final hidden states, kept for the student's chunks
    before = 0  # the pass without autograd: its keys and values, a layer, a chunk of logits
    if distill or s.beta:
        before = (b * (P + T if distill else ctx) * kv_tok + _layer_bytes(cfg, s, b, n, ctx, "forward")
                  + b * min(LOGIT_CHUNK, n) * V * (e + 8) + teacher)
    fold = L * b * n * cfg.kv_dim * 4 * 3 if s.policy in ("pte", "global-0") else 0  # the encoder's fp32 inputs
    grads = 0 if s.truncate else b * ctx * kv_tok  # gradients of the keys and values a segment read
    if not s.checkpoint:  # every activation of every segment (of one segment under --truncate) until backward
        segments = 1 if s.truncate else -(-(P + T) // n)
        mean_ctx = P + T // 2 if s.policy == "full" else ctx
        saved = segments * (L * _layer_bytes(cfg, s, b, n, mean_ctx, "saved") + fold + b * n * V * 4)
        in_flight = _layer_bytes(cfg, s, b, n, ctx, "backward") - _layer_bytes(cfg, s, b, n, ctx, "saved")
        return max(before, kept + grads + saved + in_flight + teacher)
    segment = L * b * n * cfg.dim * e + b * n * kv_tok + fold  # each layer's input, the new keys and values
    return max(before, kept + grads + segment + max(_layer_bytes(cfg, s, b, n, ctx, "backward"), logits) + teacher)


def memory_plan(cfg, s: MemorySettings):
    """Bytes of each phase of a step (docs/method.md §9): what stays (runtime, weights, adapter and AdamW states) and
    what each phase adds while it runs. plan_peaks adds them up."""
    e, V = s.dtype_bytes, cfg.vocab_size
    params, linear, adapter = plan_counts(cfg, s.adapter)
    kv_tok = 2 * cfg.n_layers * cfg.kv_dim * e
    R, Rp, P, T = min(s.rollout_rows, s.rows), min(s.prefill_rows, s.rollout_rows, s.rows), s.longest_prompt, s.max_new
    slots = P + T if s.policy == "full" else s.cache
    m = evict_count(max(s.cache - s.shortest_prompt, MIN_THOUGHT_SLOTS), s.evict)
    fold = R * m * cfg.kv_dim * (2 * e + 24) if s.policy not in ("window", "full") else 0  # gathered, un-rotated
    attend = R * cfg.n_heads * slots * (2 * e + 8) + R * slots * e  # decode: scores, their fp32 softmax, the mask
    return dict(
        runtime=s.runtime,
        weights=params * e,
        adapter=adapter * 4 * (3 if s.optimizer else 1),  # fp32 parameters and AdamW's two states
        packed_weights=linear * 4 if s.packed else 0,
        rollout_cache=R * slots * (kv_tok + 8) + R * T * 13,  # keys, values, slot positions; tokens, log-probs, mask
        prefill=_layer_bytes(cfg, s, Rp, P, P, "forward") + R * V * e,  # one layer at a time; the last logits
        decode_step=R * V * (e + 16) + max(fold, attend),  # logits and sample's fp32 passes; fold or attention
        step_rollouts=s.rows * (P * 8 + T * 13),  # the step's rollouts, kept while it trains
        score=_score_bytes(cfg, s),
        gradients=adapter * 4,
        optimizer_step=adapter * 4 * 2 if s.device == "cuda" else 0)  # foreach AdamW's temporaries


def plan_peaks(plan):
    """The peak of each part of a step and of the whole (phases run one after another; what stays adds to each)."""
    stays = plan["runtime"] + plan["weights"] + plan["adapter"]
    rollout = stays + plan["packed_weights"] + plan["rollout_cache"] + max(plan["prefill"], plan["decode_step"])
    score = stays + plan["step_rollouts"] + plan["gradients"] + plan["score"]
    optimizer = stays + plan["gradients"] + plan["optimizer_step"]
    return dict(rollout=rollout, score=score, optimizer=optimizer, total=max(rollout, score, optimizer))


def plan_model(name):
    """(ModelConfig, bytes per element of the checkpoint's dtype) without loading a weight: a registry name's shapes,
    else the folder's config.json."""
    if REGISTRY.get(name, (None, None))[1] is not None:
        return config_from_hf(REGISTRY[name][1]), 2  # the registry's models ship in bf16
    folder = resolve(name)
    hf = json.loads((folder / "config.json").read_text())
    return read_config(folder), 4 if (hf.get("torch_dtype") or hf.get("dtype")) == "float32" else 2


def plan_settings(args, device, dtype_bytes, longest_prompt=None, shortest_prompt=1):
    """The MemorySettings of a run's flags on `device` (a torch.device); prompts default to the longest the cache
    admits (`--plan` reads no data) and a one-token shortest."""
    cuda = device.type == "cuda"
    e = dict(bf16=2, fp16=2, fp32=4).get(args.dtype, dtype_bytes if cuda else 4)  # auto: the checkpoint's on cuda
    try:
        resident = _status_kib("VmRSS")[0] * 1024
    except (OSError, StopIteration):
        resident = 0
    return MemorySettings(
        policy=args.policy, objective=args.objective, cache=args.cache, evict=args.evict, max_new=args.max_new,
        longest_prompt=longest_prompt or args.cache - MIN_THOUGHT_SLOTS, shortest_prompt=shortest_prompt,
        rows=args.prompts_per_step * args.group // int(os.environ.get("WORLD_SIZE", 1)),
        rollout_rows=getattr(args, "rollout_batch", None) or DEFAULT_ROLLOUT_BATCH, prefill_rows=args.prefill_rows,
        micro_batch=args.micro_batch, checkpoint=args.checkpoint, truncate=args.truncate, beta=args.beta,
        adapter=AdapterConfig({"global-0": "global-0", "global-only": "global-only", "pte": "pte"}.get(
            args.policy, "lora"), args.rank, args.alpha, args.globals, args.targets.split(",")),
        device=device.type, dtype_bytes=e, packed=not cuda and e == 4 and ONEDNN,
        runtime=CUDA_CONTEXT_BYTES if cuda else resident)


def device_memory(device):
    """Bytes a run may use: a cuda device's total memory; on the CPU the available RAM and what this process holds
    already (the plan's runtime counts it). None where the system does not say."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        meminfo = Path("/proc/meminfo").read_text().splitlines()
        available = int(next(line for line in meminfo if line.startswith("MemAvailable:")).split()[1])
        return (available + _status_kib("VmRSS")[0]) * 1024
    except (OSError, StopIteration):
        return None


def plan_advice(plan, s):
    """The phase at the peak, and the flags that shrink it."""
    peaks = plan_peaks(plan)
    if peaks["total"] == peaks["rollout"]:
        if plan["prefill"] > max(plan["decode_step"], plan["rollout_cache"]):
            return "prefill", "lower --prefill-rows (rows of one prefill forward)"
        return "rollout", "lower --rollout-batch (rows of one generate call: the cache grows with it)"
    if peaks["total"] == peaks["score"]:
        fixes = ["lower --micro-batch"] + ["score with --checkpoint"] * (not s.checkpoint) + \
                ["use --truncate (memory fixed by --cache)"] * (not s.truncate and s.policy != "full")
        return "score", ", or ".join(fixes)
    return "optimizer step", "lower --rank or fewer --targets"


def print_plan(cfg, s, memory=None, where=""):
    """The plan as a table: each phase, what it holds, its GiB, and the peak while it runs."""
    plan, gib = memory_plan(cfg, s), lambda x: f"{x / 2**30:.2f}"
    peaks = plan_peaks(plan)
    R, Rp, P, T = min(s.rollout_rows, s.rows), min(s.prefill_rows, s.rollout_rows, s.rows), s.longest_prompt, s.max_new
    stays = plan["runtime"] + plan["weights"] + plan["adapter"]
    below = stays + plan["packed_weights"] + plan["rollout_cache"]
    mode = (("--truncate" if s.truncate else "exact") + ", " + ("checkpointed" if s.checkpoint else "--no-checkpoint"))
    rows = [("runtime", "CUDA context, workspaces" if s.device == "cuda" else "this process before any weight",
             plan["runtime"], None),
            ("weights", f"{s.dtype_bytes}-byte elements", plan["weights"], None),
            ("adapter", "fp32 parameters and AdamW's two states", plan["adapter"], stays),
            ("packed weights", "oneDNN's blocked copy while generate runs", plan["packed_weights"], None),
            ("rollout cache", f"{R} rows x {P + T if s.policy == 'full' else s.cache} slots, the outputs",
             plan["rollout_cache"], below),
            ("prefill", f"{Rp} rows x {P} tokens at a time", plan["prefill"], below + plan["prefill"]),
            ("decode step", f"{R} rows: logits, sampling, fold or attention", plan["decode_step"],
             below + plan["decode_step"]),
            ("score micro-batch", f"{s.micro_batch} rows x {P} + {T} tokens, {mode}, {s.objective}",
             plan["score"] + plan["step_rollouts"], peaks["score"]),
            ("optimizer step", "gradients, AdamW's temporaries", plan["gradients"] + plan["optimizer_step"],
             peaks["optimizer"])]
    print(f"memory plan{where}: policy {s.policy}, {s.rows} rollouts of up to {T} tokens on this rank, generate "
          f"calls of {R} rows, prompts up to {P} tokens\n\n| phase | holds | GiB | peak while it runs, GiB |\n"
          "|---|---|---|---|")
    for name, what, size, peak in rows:
        if size:
            print(f"| {name} | {what} | {gib(size)} | {gib(peak) if peak else ''} |")
    phase, fix = plan_advice(plan, s)
    verdict = "" if memory is None else f" of {gib(memory)} GiB: " + ("fits" if peaks["total"] <= memory else
                                                                     f"does not fit; {fix}")
    print(f"\ntotal peak {gib(peaks['total'])} GiB ({phase}){verdict}")
    return plan


def show_plan(args):
    """--plan: print the plan for this machine's device, or for a cuda device of --plan GiB; load nothing."""
    device = torch.device("cuda") if args.plan is not True else torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    cfg, dtype_bytes = plan_model(args.model)
    memory = args.plan * 2**30 if args.plan is not True else device_memory(device)
    print_plan(cfg, plan_settings(args, device, dtype_bytes), memory, f" ({args.model} on {device.type})")


def check_memory(args, device, prompt_ids):
    """Before the model loads: refuse a run whose plan exceeds the device's memory, naming the flag to change."""
    memory = device_memory(device)
    cfg, dtype_bytes = plan_model(args.model)
    lengths = [len(ids) for ids in prompt_ids]
    s = plan_settings(args, device, dtype_bytes, max(lengths), min(lengths))
    plan = memory_plan(cfg, s)
    total = plan_peaks(plan)["total"]
    if memory is not None and total > memory:
        phase, fix = plan_advice(plan, s)
        raise ValueError(f"the memory plan needs {total / 2**30:.1f} GiB at its peak ({phase}), more than the "
                         f"{memory / 2**30:.1f} GiB of {device}: {fix}; `python train.py ... --plan` prints each phase")
    return plan


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
    check_memory(args, device, train_ids)  # before the weights load: a run that cannot fit stops here
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
    if args.plan:
        return show_plan(args)
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
