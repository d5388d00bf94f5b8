"""GRPO training of the adapters and thought encoder under a fixed-size cache: `python train.py --model qwen2.5-3b`.

Each step (docs/method.md §7): take the next prompts, `generate` G rollouts of each without autograd under the cache
policy (in calls of at most --rollout-batch rows), grade them, compute group advantages, replay them with `score`
(gradients through the cache and the chain of S, §6), and take one AdamW step on the adapter and encoder parameters
(the base model is frozen). One update per batch, so the PPO ratio is 1 and the clip is inert unless --epochs > 1.
Several GPUs or nodes: `torchrun --nproc_per_node N train.py ...` (DistributedDataParallel over the adapter; each rank
rolls out its share of the prompts and evaluates its share of the held-out problems; rank 0 alone writes).

The file reads top down: the settings (flags, a model folder's train_defaults.json, a resumed run's settings.json,
all through the same checks before anything is written); the data; the run folder (one writer, checkpoints, logs)
and its stops; the algorithm; the loop of named steps; the memory plan.
`--resume DIR` continues exactly, with the run's own settings: every step reseeds its sampler from (seed, step, rank)
and derives its prompts from (seed, step), so no generator state has to be carried over. Ctrl-C or SIGTERM stop with
a checkpoint of the last completed step (a step whose update has not begun is dropped; with several ranks they agree
on it inside the step). A step whose loss or gradient norm is not finite is skipped, and nothing non-finite is saved.

Choices the paper leaves open (docs/method.md §10): group 8, temperature 1.0, a KL anchor (beta) for the toy, which
breaks without one, and none for real models (the usual LoRA-free recipes), token-mean loss.
Our extension beyond the paper: `--objective distill` trains the cache-constrained policy to match the full-cache base
model's next-token distribution (forward KL, §8) on its own rollouts.
"""
import argparse
import json
import math
import os
import random
import resource
import shlex
import shutil
import signal
import sys
import time
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import data
import grade
from cache import MIN_THOUGHT_SLOTS, evict_count
from data import Stop, device_name, number, ranks, run_device
from encoder import TARGETS, Adapter, AdapterConfig, load_adapter, param_groups, save_adapter, trainable
from eval import evaluate, token_kl
from grpo import LossConfig, group_advantages, grpo_loss
from model import (ONEDNN, REGISTRY, Transformer, config_from_hf, load, load_tokenizer, read_config, read_json,
                   resolve)
from rollout import LOGIT_CHUNK, CachePolicy, Rollout, Sampling, generate, score

PAPER_DEFAULTS = dict(policy="pte", cache=1024, evict=0.25, rank=32, globals=32, targets="q,k,v,o", lr=1e-5,
                      grad_clip=1.0, max_new=3072, group=8, prompts_per_step=64, steps=200, temperature=1.0, beta=0.0,
                      loss="token-mean", micro_batch=8, rollout_batch=128, eval_every=50, eval_size=64, save_every=25,
                      data="math_train")
SHAPE_KEYS = ("model", "policy", "rank", "globals", "targets")  # a checkpoint must agree on these to be resumed
SAFE_ON_RESUME = ("steps", "save_every", "eval_every", "log_samples_every", "micro_batch", "rollout_batch", "threads",
                  "device", "data_dir", "compile", "checkpoint",
                  "prefill_rows")  # how long, how often, on what: not what is learned
NOT_SETTINGS = ("resume", "out", "plan")  # where the run lives, not how it runs
RECORDS = ("cache_policy", "set_aside", "resumed")  # what settings.json records beside the flags
BAD_STEPS = 3  # non-finite steps in a row that stop the run


# ---------------------------------------------------------------------------------------------------- the settings

def target_names(text):
    if not text or not set(text.split(",")) <= set(TARGETS):
        raise argparse.ArgumentTypeError(f"{text!r}: comma-separated names from {','.join(TARGETS)}")
    return text


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
    a("--cache", type=number(int, 1), help="cache budget N: prompt + thought slots (at most the model's positions)")
    a("--evict", type=number(float, 0, 1, above=True), help="share of the thought window evicted when it is full")
    a("--rank", type=number(int, 1), help="adapter rank r (at most the model's width)")
    a("--alpha", type=number(float, 0, above=True), help="adapter scale numerator (scale alpha/r); default: r")
    a("--globals", type=number(int, 1), help="global tokens of the encoder's initial state")
    a("--b-init", type=number(float, 0), default=0.0, help="adapter init: 0 is LoRA's (A random, B = 0); > 0: A = 0, "
      "B ~ N(0, b_init^2) (encoder.py)")
    a("--targets", type=target_names, help=f"adapted linears, comma-separated from {','.join(TARGETS)}")
    a("--lr", type=number(float, 0, above=True), help="AdamW learning rate")
    a("--encoder-lr", type=number(float, 0, above=True), help="AdamW learning rate of the thought encoder "
      "(W_Q, W_K, W_V, q_g, global tokens); default: --lr")
    a("--grad-clip", type=number(float, 0, above=True), help="max gradient norm")
    a("--max-new", type=number(int, 1), help="rollout token limit (at most the model's positions)")
    a("--group", type=number(int, 1, 1024), help="rollouts per prompt G")
    a("--prompts-per-step", type=number(int, 1), help="prompts per step, over all ranks (at most the training set)")
    a("--micro-batch", type=number(int, 1), help="rollout rows per score/backward pass (gradient accumulation)")
    a("--rollout-batch", type=number(int, 1), help="rows of one generate call: a step's rows are sorted by prompt "
      "length and generated in chunks of at most this many (the rollout's memory)")
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
      "the cache and S as constants (docs/method.md §6.4); memory fixed by --cache, not growing with the rollout")
    a("--data", help="training problems: comma-separated JSONL paths or names (math_train, gsm8k, dapo-math-17k, ...). "
      "The paper trained on DAPO-Math-17K (--data dapo-math-17k, fetched once from the Hugging Face hub); our default, "
      "math_train (MATH's training problems), also works offline from a local file")
    a("--data-dir", help="where names resolve: default $PTE_DATA, else data/")
    a("--eval-data", help="held-out problems from a data set of their own (its first --eval-size), not split off "
      "--data")
    a("--eval-size", type=number(int, 0), help="held-out problems for --eval-every and the closing table")
    a("--eval-every", type=number(int, 0), help="steps between held-out accuracy checks (0: never)")
    a("--save-every", type=number(int, 1), help="steps between checkpoints")
    a("--out", help="run folder, new or empty (default runs/<model>-<policy>-<time>)")
    a("--resume", help="run folder to continue from its newest checkpoint with its own settings (settings.json); "
      f"of the other flags only {', '.join('--' + k.replace('_', '-') for k in SAFE_ON_RESUME)} may change")
    a("--seed", type=number(int, 0, 2**32 - 1), default=0, help="seed of the adapter init, data order and sampling")
    a("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
      help="base model dtype (auto: checkpoint's on GPU, fp32 on CPU)")
    a("--device", type=device_name, default="auto", help="auto | cpu | cuda | cuda:N")
    a("--threads", type=number(int, 1, os.cpu_count()), help="CPU threads (torch.set_num_threads)")
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


def from_file(p, builtin, path, values, records=()):
    """The values of a JSON file of flags (names with _), each through its flag's own checks; None only where the
    flag's default is None; keys in `records` pass as they are, any other key is refused."""
    actions, checked = {a.dest: a for a in p._actions}, {}
    for key, value in values.items():
        if key in records:
            checked[key] = value
        elif key not in builtin or key in NOT_SETTINGS:
            p.error(f"{path}: {key}: not a training flag")
        elif value is None and PAPER_DEFAULTS.get(key, builtin[key]) is None:
            checked[key] = None
        else:
            try:
                checked[key] = data.file_value(actions[key], value)
            except argparse.ArgumentTypeError as e:
                p.error(f"{path}: {key}: {e}")
    return checked


def model_defaults(p, builtin, name):
    """The train_defaults.json of the model's folder ({} without one): flag names (with _) to values."""
    try:
        path = resolve(name) / "train_defaults.json"
        return from_file(p, builtin, path, read_json(path)) if path.exists() else {}
    except (ValueError, FileNotFoundError) as e:
        p.error(f"--model: {e}")


def resumed_settings(p, builtin, run: Path, given):
    """The run's settings.json, with the safe flags among `given` applied; any other flag that differs is refused."""
    path = run / "settings.json"
    if not path.is_file():
        p.error(f"--resume {run}: no settings.json there: not a run folder of train.py")
    try:
        settings = from_file(p, builtin, path, read_json(path), RECORDS)
    except ValueError as e:
        p.error(str(e))
    if not isinstance(settings.get("resumed", []), list):
        p.error(f"{path}: resumed: expected a list")
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


def check_model_bounds(p, args):
    """The flags that the model bounds: a cache or a rollout beyond its positions, a rank beyond its width."""
    try:
        folder = resolve(args.model)
        width = read_config(folder).dim  # config.json checked here, before anything is written
        error = data.beyond_positions(folder, cache=None if args.policy == "full" else args.cache,  # full: no budget
                                      max_new=args.max_new, globals=args.globals)
    except (ValueError, FileNotFoundError) as e:
        p.error(f"--model {args.model}: {e}")
    if error or args.rank > width:
        p.error(error or f"--rank {args.rank}: more than the model's width {width}")


def parse_args(argv=None):
    """Flags -> args: a new run's from the flags given, the model folder's train_defaults.json and PAPER_DEFAULTS;
    a resumed run's from its settings.json. Every value, wherever it comes from, is checked here, before anything is
    written or loaded (those that need the data: load_data)."""
    p, builtin = parser()
    args = p.parse_args(argv)
    given = {k: v for k, v in vars(args).items() if v is not None and k != "resume"}
    if args.resume:  # a flag newer than the run keeps its built-in default
        defaults = {**builtin, **resumed_settings(p, builtin, Path(args.resume), given)}
    else:  # --plan of a registry name: its shapes alone (a Hugging Face repository holds no train_defaults.json)
        shapes_only = args.plan and REGISTRY.get(args.model, (None, None))[1] is not None
        defaults = {**builtin, **PAPER_DEFAULTS,
                    **({} if shapes_only else model_defaults(p, builtin, args.model or builtin["model"]))}
    for k, v in defaults.items():
        if k in vars(args) and k not in NOT_SETTINGS and getattr(args, k) is None:
            setattr(args, k, v)
    args.resumed = defaults.get("resumed", [])
    args.alpha = args.alpha or float(args.rank)
    if not args.resume:
        args.out = args.out or f"runs/{Path(str(args.model)).name}-{args.policy}-{time.strftime('%Y%m%d-%H%M%S')}"
    if args.objective == "grpo" and args.group < 2:
        p.error("--group 1 gives every rollout advantage 0 (no learning signal): use 2 or more")
    if args.objective == "grpo" and args.temperature == 0:
        p.error("--temperature 0: greedy rollouts of a group are all the same (no learning signal)")
    if not (args.plan and REGISTRY.get(args.model, (None, None))[1] is not None):
        check_model_bounds(p, args)
    return args


# ---------------------------------------------------------------------------------------------------- the data

@dataclass
class Problems:
    tokenizer: object
    family: str | None  # chat template (data.chat_family)
    train: list  # {"id", "problem", "answer", "prompt_ids"}
    held_out: list
    set_aside: dict  # prompts that leave fewer than MIN_THOUGHT_SLOTS thought slots, counted


def load_problems(args):
    """(training problems, held-out problems): --data, and the first --eval-size of --eval-data or else of --data."""
    problems = [p for name in args.data.split(",") for p in data.load_problems(name, args.data_dir, args.seed)]
    if args.eval_data:
        held_out = data.load_problems(args.eval_data, args.data_dir, args.seed)
        if args.eval_size > len(held_out):
            raise ValueError(f"--eval-size {args.eval_size}: more than the {len(held_out)} problems of --eval-data")
        return problems, held_out[:args.eval_size]
    random.Random(args.seed).shuffle(problems)
    held_out, train = problems[:args.eval_size], problems[args.eval_size:]
    if not train:
        raise ValueError(f"--data {args.data}: no problems left for training after holding out {args.eval_size}")
    return train, held_out


def load_data(args, world):
    """The tokenizer and the problems with their prompts, every check on them done: before any folder is written or
    model loaded."""
    folder = resolve(args.model)
    tokenizer, family = load_tokenizer(folder), data.chat_family(folder)
    train, held_out = load_problems(args)
    budget = None if args.policy == "full" else args.cache
    train, train_ids, aside = data.encode_prompts(train, tokenizer, family, budget)
    held_out, _, held_out_aside = data.encode_prompts(held_out, tokenizer, family, budget)
    if not train:
        raise ValueError(f"--cache {args.cache}: every training prompt leaves fewer than {MIN_THOUGHT_SLOTS} "
                         "thought slots")
    if args.prompts_per_step > len(train) or args.prompts_per_step % world:
        raise ValueError(f"--prompts-per-step {args.prompts_per_step}: more than the {len(train)} training problems"
                         if args.prompts_per_step > len(train) else
                         f"--prompts-per-step {args.prompts_per_step} must be divisible by the {world} ranks")
    return Problems(tokenizer, family, [dict(p, prompt_ids=ids) for p, ids in zip(train, train_ids)], held_out,
                    dict(training=aside, held_out=held_out_aside, min_thought_slots=MIN_THOUGHT_SLOTS))


def step_prompts(problems, step, args, rank, world):
    """This rank's share of the step's prompts: a seeded permutation per epoch, so the order follows from the step."""
    n, per_rank = len(problems), args.prompts_per_step // world
    picks = []
    for i in range(step * args.prompts_per_step + rank * per_rank,
                   step * args.prompts_per_step + (rank + 1) * per_rank):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(args.seed * 1_000_003 + i // n))
        picks.append(problems[int(order[i % n])])
    return picks


# ----------------------------------------------------------------------------------------- the run: folder, logs, stops

@contextmanager
def claim(args):
    """The run folder, held by this process alone (data.only_writer); a new run's must be new or empty."""
    out = Path(args.resume or args.out)
    is_run = lambda: any((out / name).exists() for name in ("settings.json", "metrics.jsonl", "latest"))  # noqa: E731
    if not args.resume and (held := data.contents(out)) and not is_run():
        raise ValueError(f"--out {out} is not empty ({', '.join(held[:3])}{' ...' if len(held) > 3 else ''}) and "
                         "holds no run of train.py: name a new or empty folder")
    with data.only_writer(out, "--resume" if args.resume else "--out"):
        if not args.resume and is_run():  # checked under the lock: a live run is refused by it, naming its PID
            raise ValueError(f"--out {out} holds a run already: continue it with --resume {out}, or name another --out")
        yield out


def check_finite(step, adapter, optimizer=None):
    """Refuse to save a NaN or an infinity: name the first adapter or optimizer tensor that holds one."""
    names = {p: name for name, p in adapter.named_parameters()}
    tensors = [(f"adapter {name}", t) for name, t in adapter.state_dict().items()]
    if optimizer is not None:
        tensors += [(f"optimizer {key} of {names.get(p, 'a parameter')}", t) for p, state in optimizer.state.items()
                    for key, t in state.items() if torch.is_tensor(t)]
    tensors = [(name, t) for name, t in tensors if t.is_floating_point()]
    finite = torch.stack([torch.isfinite(t).all() for _, t in tensors]).tolist() if tensors else []
    if not all(finite):
        raise ValueError(f"step {step}: {tensors[finite.index(False)][0]} holds NaN or infinite values: not saved, "
                         "the checkpoints before it are kept")


def save_checkpoint(out: Path, step, adapter, optimizer, settings, keep=2):
    """out/step-NNNNNN written as a temporary folder and renamed, then out/latest updated by an atomic rename. Refused
    when a value is not finite; a write that fails (a full disk) leaves the checkpoints before it as they were."""
    check_finite(step, adapter, optimizer)
    final, tmp = out / f"step-{step:06d}", out / f".step-{step:06d}.tmp"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        save_adapter(adapter, tmp, policy=settings["cache_policy"], settings=settings)
        torch.save(dict(step=step, optimizer=optimizer.state_dict(), settings=settings), tmp / "state.pt")
    except Exception as e:  # OSError, or torch's and safetensors' own errors, which hide the cause (a full disk)
        free = shutil.disk_usage(out).free
        cause = e.strerror if isinstance(e, OSError) and e.strerror else (
            f"the disk is full: {free / 2**20:.1f} MiB free" if free < 2**26 else str(e).strip().split("\n")[0][:200])
        shutil.rmtree(tmp, ignore_errors=True)
        raise OSError(f"{tmp}: the checkpoint of step {step} could not be written ({cause}); the ones before it "
                      "are kept") from None
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    data.atomic_write(out / "latest", lambda p: p.write_text(final.name))
    for old in checkpoints(out)[keep:]:
        shutil.rmtree(old)


def checkpoints(run: Path):
    """The run's step-NNNNNN folders, newest first (each is complete: it appears by a rename)."""
    return sorted((c for c in run.glob("step-*") if c.is_dir() and c.name[5:].isdigit()),
                  key=lambda c: int(c.name[5:]), reverse=True)


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
    """(step, adapter, optimizer state) of the newest intact checkpoint, or (0, None, None) where the run has none
    yet; refused when its settings differ in SHAPE_KEYS. `latest` names the newest one, but a damaged, missing or
    stale `latest` only warns: the folders are what counts."""
    errors = []
    for ckpt in checkpoints(run):
        try:
            state, adapter = read_checkpoint(ckpt, model_cfg, device)
            break
        except (ValueError, FileNotFoundError) as e:
            errors.append(str(e))
    else:
        if errors:
            raise ValueError(f"--resume {run}: no intact checkpoint: {'; '.join(errors)}")
        return 0, None, None
    latest = (run / "latest").read_text(errors="replace").strip() if (run / "latest").is_file() else None
    if errors or latest != ckpt.name:
        why = errors[0] if errors else f"{run / 'latest'} {'is missing' if latest is None else f'names {latest!r}'}"
        tqdm.write(f"WARNING: {why}. Resuming from {ckpt.name}, the newest intact checkpoint.", file=sys.stderr)
    diff = [f"{k}: checkpoint {state['settings'].get(k)!r}, now {settings[k]!r}" for k in SHAPE_KEYS
            if state["settings"].get(k) != settings[k]]
    if diff:
        raise ValueError(f"--resume {run}: the checkpoint does not match this run ({'; '.join(diff)})")
    return state["step"], adapter, state["optimizer"]


def trim_log(path: Path, last_step):
    """Keep the records of steps up to last_step (the steps after it run again), rewritten atomically; returns them.
    A torn last line (a kill or a full disk mid-write) is dropped with a warning."""
    if not path.exists():
        return []
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
    return [json.loads(line) for line in kept]


def append(path: Path, records):
    """Records appended to a JSONL log, NaN and infinity as null; a failed write names the file and its cause."""
    clean = lambda v: None if isinstance(v, float) and not math.isfinite(v) else v  # noqa: E731
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.writelines(json.dumps({k: clean(v) for k, v in r.items()}, ensure_ascii=False) + "\n" for r in records)
    except OSError as e:
        raise OSError(f"{path}: could not write ({e.strerror})") from None


def agree(run, *flags):
    """Where the ranks meet inside a step: each rank's pending signal and `flags`, the max over the ranks. A signal on
    any rank raises Stop on every rank (the step is dropped) unless the step's update has begun. Returns the flags."""
    values = torch.tensor([run.stop["signal"] or 0, *flags], dtype=torch.float64, device=run.device)
    if run.world > 1:
        dist.all_reduce(values, dist.ReduceOp.MAX)
    if values[0] and not run.stop.get("committed"):
        raise Stop(int(values[0]))
    return values[1:].tolist()


def local(run, fn, *args):
    """fn(*args): work without collectives (generation, grading), which a signal stops at once. With several ranks
    the Stop ends fn only (None comes back): the agree after it stops every rank, one blocked in a collective too."""
    before, run.stop["at_once"] = run.stop["at_once"], True
    try:
        if run.stop["signal"]:
            raise Stop(run.stop["signal"])
        return fn(*args)
    except Stop:
        if run.world == 1:
            raise
        return None
    finally:
        run.stop["at_once"] = before


def stopped(run, signum, world):
    """After a stop: rank 0 saves the last completed step (unless its checkpoint is there) and says how to go on."""
    name = signal.Signals(signum).name
    if run is None:
        print(f"\n{name}: stopped before the run began", file=sys.stderr)
        return
    if run.rank != 0:
        return
    if run.done and not (run.out / f"step-{run.done:06d}").is_dir():
        save_checkpoint(run.out, run.done, run.adapter, run.optimizer, run.settings)
    where = f"the checkpoint of step {run.done} is in {run.out / f'step-{run.done:06d}'}" if run.done else (
        "before its first step")
    launcher = "python" if world == 1 else f"torchrun --nproc_per_node {world}"
    print(f"\n{name}: stopped; {where}. Continue with:\n  {launcher} train.py --resume {shlex.quote(str(run.out))}",
          file=sys.stderr)


# ---------------------------------------------------------------------------------------------------- the algorithm

def adapter_mode(policy):
    """The adapter a cache policy trains: the thought encoder's under pte and its ablations, else plain LoRA."""
    return policy if policy in ("pte", "global-0", "global-only") else "lora"


def roll_out(model, prompts, policy, args, adapter, generator, pad_id):
    """`generate` in calls of at most --rollout-batch rows: the rows sorted by prompt length (less padding), chunked,
    and the chunks' Rollouts merged back into one in the original row order. One chunk: one call, rows as they are."""
    sampling = Sampling(args.max_new, args.temperature, args.top_p, pad_id=pad_id)
    run = partial(generate, model, policy=policy, sampling=sampling, adapter=adapter, generator=generator,
                  compile=args.compile, prefill_rows=args.prefill_rows)
    if len(prompts) <= (args.rollout_batch or len(prompts)):  # None: a run from before the flag, one call
        ro = run(prompts)
        return Rollout(**{**vars(ro), "stats": dict(ro.stats, chunks=1)})
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    chunks = [order[i:i + args.rollout_batch] for i in range(0, len(order), args.rollout_batch)]
    parts = [run([prompts[i] for i in rows]) for rows in chunks]
    return merge(parts, order, pad_id, policy.schedule([len(p) for p in prompts], args.max_new))


def merge(parts, order, pad_id, schedule):
    """Rollouts of the rows `order`, chunk after chunk -> one Rollout in the original row order: prompts left-padded
    and completions right-padded to the longest (a row's values are its own: padding changes none of them). Each
    row's evictions run on to the longest, as in one call, where every row's ring turns until the last row stops.
    The fold ratio is the chunks' mean weighted by rows (a mean over eviction events, which chunks group otherwise)."""
    P, T = max(r.prompts.shape[1] for r in parts), max(r.tokens.shape[1] for r in parts)
    back = torch.argsort(torch.tensor(order)).to(parts[0].tokens.device)

    def cat(field, width, fill, left=False):  # (B, width) in the original order
        pad = lambda x: (width - x.shape[1], 0) if left else (0, width - x.shape[1])  # noqa: E731
        return torch.cat([F.pad(getattr(r, field), pad(getattr(r, field)), value=fill) for r in parts])[back]
    ratios = [(len(r.prompt_lens), r.stats["s_update_ratio"]) for r in parts if r.stats["s_update_ratio"] is not None]
    seconds, tokens = sum(r.stats["seconds"] for r in parts), sum(r.stats["tokens"] for r in parts)
    evictions = [schedule.steps(i, T - 1) for i in range(len(back))]
    stats = dict(parts[0].stats, seconds=seconds, tokens=tokens, tokens_per_s=tokens / seconds,
                 steps=max(r.stats["steps"] for r in parts), evictions=sum(map(len, evictions)) / len(evictions),
                 s_update_ratio=sum(n * x for n, x in ratios) / sum(n for n, _ in ratios) if ratios else None,
                 cache_slots=max(r.stats["cache_slots"] for r in parts),
                 windows=[[w for r in parts for w in r.stats["windows"]][i] for i in back.tolist()], chunks=len(parts))
    return Rollout(cat("prompts", P, pad_id, left=True), torch.cat([r.prompt_lens for r in parts])[back],
                   cat("tokens", T, pad_id), cat("logprobs", T, 0.0), cat("mask", T, False),
                   torch.cat([r.truncated for r in parts])[back], evictions, stats)


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
        self.loss_cfg = LossConfig(args.loss, beta=args.beta, kl_estimator=args.kl_estimator, max_new=args.max_new)
        object.__setattr__(self, "model", model)

    def forward(self, ro, adv, old_logp, n_rows, n_tokens):
        """(loss, stats, the learner's detached log-probs (b, T) or None). old_logp None: the batch's first pass, whose
        PPO "old" log-probs are the learner's own replay (ratio exactly 1 in any dtype), not generate's."""
        a = self.args
        if a.objective == "distill":  # forward KL(full-cache base || cache-constrained policy) per token, §8
            per_token = token_kl(self.model, ro, self.policy, self.adapter, use_checkpoint=a.checkpoint,
                                 truncate=a.truncate)  # (b, T): the teacher keeps hidden states, not (b, T, V)
            loss = torch.where(ro.mask, per_token, 0).sum() / n_tokens
            return loss, dict(kl=loss.item() * n_tokens / max(int(ro.mask.sum()), 1), clip_frac=0.0), None
        ref_logp = None
        if a.beta > 0:  # the base model (adapter off) under the same cache, this micro-batch only: (b, T)
            with torch.no_grad():
                ref_logp = score(self.model, ro, self.ref_policy, None, a.temperature)
        logp = score(self.model, ro, self.policy, self.adapter, a.temperature, truncate=a.truncate,
                     use_checkpoint=a.checkpoint)  # (b, T)
        old = logp.detach() if old_logp is None else old_logp
        loss, stats = grpo_loss(logp, old, adv, ro.mask, ref_logp, self.loss_cfg, n_rows, n_tokens)
        return loss, stats, logp.detach()


def update(objective, optimizer, ro, adv, args, world, agree=lambda *flags: flags):
    """--epochs optimizer steps on a rank's rollouts, micro-batched; the normalisers count all ranks' rows and tokens,
    and DDP averages the gradients, hence the factor `world`. --truncate accumulates each parameter's gradient once per
    segment, which DDP's hooks refuse: there they are summed by hand. The first pass's log-probs are the "old" ones of
    every later epoch; their distance to generate's is the sampler-learner gap. `agree(*flags)` is where the ranks
    meet: before each micro-batch, and before each optimizer step with the flag "loss or gradient norm not finite",
    which skips it and those after it (stats["skipped"]). The loss is a mean over all the step's tokens, so each
    token's gradient is about 1 / tokens (1e-6 at the paper's step), which an fp16 model's activations flush to zero:
    backward runs on the loss times `scale`, a power of two near the token count (exact in binary floats: fp32 and
    bf16 get the very same gradients), and the gradients are divided by it before clipping."""
    counts = torch.tensor([ro.mask.shape[0], ro.mask.sum()], dtype=torch.float64, device=ro.mask.device)
    if world > 1:
        dist.all_reduce(counts)
    n_rows, n_tokens = counts.tolist()
    scale = 2.0 ** round(math.log2(max(n_tokens, 1)))
    chunks = torch.arange(ro.mask.shape[0], device=ro.mask.device).split(args.micro_batch)
    params = trainable(objective.module.adapter if world > 1 else objective.adapter)
    old, gaps, stats, norms, skipped = [None] * len(chunks), [], [], [], False
    for epoch in range(args.epochs):
        for i, rows in enumerate(chunks):
            agree()
            part = take(ro, rows)
            sync = nullcontext() if world == 1 or (i == len(chunks) - 1 and not args.truncate) else objective.no_sync()
            with sync:
                loss, s, logp = objective(part, adv[rows], old[i], n_rows, n_tokens)
                (loss * (world * scale)).backward()
            if epoch == 0 and logp is not None:
                old[i] = logp
                gaps.append((logp - part.logprobs).abs()[part.mask])  # (tokens,)
            stats.append(dict(s, loss=loss.item(), rows=len(rows)))
        for p in params:
            if world > 1 and args.truncate:
                p.grad = torch.zeros_like(p) if p.grad is None else p.grad
                dist.all_reduce(p.grad)
                p.grad /= world
            if p.grad is not None:
                p.grad /= scale
        norms.append(torch.nn.utils.clip_grad_norm_(params, args.grad_clip).item())
        loss = sum(s["loss"] for s in stats[-len(chunks):])
        (skipped,) = agree(float(not (math.isfinite(loss) and math.isfinite(norms[-1]))))
        if skipped:  # a NaN or an infinity would reach the weights and every checkpoint after them
            optimizer.zero_grad(set_to_none=True)
            break
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    total = sum(s["rows"] for s in stats)
    out = {k: sum(s[k] * s["rows"] for s in stats) / total for k in ("kl", "clip_frac")}
    gap = torch.cat(gaps) if gaps else torch.zeros(0)  # |delta log p| over the completion tokens
    return dict(out, loss=sum(s["loss"] for s in stats) / (epoch + 1), grad_norm=sum(norms) / len(norms),
                skipped=bool(skipped), sampler_gap_mean=gap.mean().item() if gap.numel() else None,
                sampler_gap_max=gap.max().item() if gap.numel() else None)


# ---------------------------------------------------------------------------------------------------- the loop

@dataclass
class Run:
    """What the steps share."""
    args: argparse.Namespace
    problems: Problems
    out: Path
    settings: dict
    device: torch.device
    world: int
    rank: int
    stop: dict  # data.stop_on_signals's request, and "committed": the step's update has begun
    start: int = 0  # the step the run resumes from
    done: int = 0  # steps whose update is applied and logged
    bad_steps: int = 0  # non-finite steps in a row
    model: nn.Module = None
    adapter: Adapter = None
    optimizer: torch.optim.Optimizer = None
    objective: nn.Module = None
    cache_policy: CachePolicy = None
    t_start: float = 0.0


@dataclass
class Batch:
    problems: list  # this rank's problems of the step
    rollout: Rollout  # G rows each, in their order
    texts: list  # the completions, decoded
    rewards: torch.Tensor  # (rows,)


def set_up(args, problems, stop):
    """Set-up: the device and the process group, the checkpoint to resume (before the model loads: a run that stopped
    before its first one starts at step 0), the logs trimmed to it, settings.json, then the model and the learner."""
    world, rank = ranks()
    if args.threads:
        torch.set_num_threads(args.threads)
    device, mode = run_device(args.device), adapter_mode(args.policy)
    if world > 1:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    cache_policy = CachePolicy("pte" if mode != "lora" else args.policy, args.cache, args.evict)
    settings = dict(model=args.model, policy=args.policy, cache_policy=cache_policy.policy, rank=args.rank,
                    globals=args.globals, targets=args.targets, set_aside=problems.set_aside,
                    **{k: v for k, v in vars(args).items() if k not in (*SHAPE_KEYS, *NOT_SETTINGS)})
    run = Run(args, problems, Path(args.resume or args.out), settings, device, world, rank, stop,
              cache_policy=cache_policy)
    run.start, adapter, opt_state = load_checkpoint(run.out, settings, read_config(resolve(args.model)), "cpu")
    if args.steps < run.start:
        raise ValueError(f"--resume {run.out} --steps {args.steps}: the run has completed {run.start} steps already")
    run.done, records = run.start, []
    if args.resume:
        settings["resumed"][-1]["at_step"] = run.start
        if run.start == 0 and rank == 0:
            tqdm.write(f"{run.out}: no checkpoint yet: starting from step 0 with its settings", file=sys.stderr)
    if rank == 0:  # drop what was logged after the checkpoint (those steps run again), name it in `latest`
        if run.start:
            data.atomic_write(run.out / "latest", lambda p: p.write_text(f"step-{run.start:06d}"))
        records = trim_log(run.out / "metrics.jsonl", run.start)
        trim_log(run.out / "samples.jsonl", run.start)
        data.atomic_write(run.out / "settings.json", lambda p: p.write_text(json.dumps(settings, indent=1)))
    stop["run"] = run
    build_learner(run, mode, adapter, opt_state)
    evaluated = any(r["step"] == run.start and "held_out_accuracy" in r for r in records)  # rank 0 reads the log
    return run, eval_due(run, run.start) and not agree(run, float(evaluated))[0]


def build_learner(run, mode, adapter, opt_state):
    """The model, the adapter (seeded, or the checkpoint's), its optimizer and the objective, under DDP on several
    ranks; from here on, with several ranks, a signal waits for the ranks to agree (agree)."""
    a = run.args
    dtype = dict(auto=None, bf16=torch.bfloat16, fp16=torch.float16, fp32=torch.float32)[a.dtype]
    run.model = load(a.model, dtype=dtype, device=run.device)
    torch.manual_seed(a.seed)
    run.adapter = Adapter(run.model.config, AdapterConfig(mode, a.rank, a.alpha, a.globals, a.targets.split(","),
                                                          a.b_init)).to(run.device)
    if adapter is not None:
        run.adapter = adapter.to(run.device)
    run.optimizer = torch.optim.AdamW(param_groups(run.adapter, a.lr, a.encoder_lr), lr=a.lr, weight_decay=0.0)
    if opt_state is not None:
        run.optimizer.load_state_dict(opt_state)
    run.optimizer.register_step_pre_hook(lambda *_: run.stop.update(at_once=False, committed=True))
    ref_policy = CachePolicy("window" if run.cache_policy.policy == "pte" else run.cache_policy.policy, a.cache,
                             a.evict)
    run.objective = Objective(run.model, run.adapter, a, run.cache_policy, ref_policy)
    run.stop["at_once"] = run.world == 1
    if run.world > 1:  # a micro-batch in which no row evicts leaves the encoder without a gradient
        run.objective = nn.parallel.DistributedDataParallel(
            run.objective, device_ids=[run.device.index] if run.device.type == "cuda" else None,
            find_unused_parameters=run.adapter.encodes)
    if run.rank == 0:
        p, aside = run.problems, run.problems.set_aside
        note = (f" ({aside['training']} set aside: prompt leaves fewer than {MIN_THOUGHT_SLOTS} thought slots at cache "
                f"{a.cache})" if aside["training"] or aside["held_out"] else "")
        held_out_note = f" ({aside['held_out']} set aside)" if aside["held_out"] else ""
        print(f"{a.model}: {sum(p.numel() for p in trainable(run.adapter)):,} trainable parameters ({mode} adapter), "
              f"policy {a.policy}, cache {a.cache}, {len(p.train)} training problems{note}, {len(p.held_out)} held "
              f"out{held_out_note}, {run.world} rank(s), run folder {run.out}")


def roll_out_and_grade(run, step):
    """Roll out and grade: this rank's prompts of the step, G rollouts each (sampled from a generator seeded by the
    step: resumable), their completions decoded and graded."""
    a = run.args
    problems = step_prompts(run.problems.train, step, a, run.rank, run.world)
    prompts = [p["prompt_ids"] for p in problems for _ in range(a.group)]
    gen = torch.Generator(run.device).manual_seed(a.seed * 1_000_003 + step * 1009 + run.rank)
    ro = roll_out(run.model, prompts, run.cache_policy, a, run.adapter, gen, (run.model.config.eos_ids or (0,))[0])
    if step == run.start and ro.stats.get("first_step_s"):
        tqdm.write(f"compiled decode step: first call {ro.stats['first_step_s']:.1f} s (compiling included)")
    texts = [run.problems.tokenizer.decode(row[m].tolist(), skip_special_tokens=True)
             for row, m in zip(ro.tokens, ro.mask)]
    rewards = torch.tensor([grade.score(t, p["answer"]) for t, p in
                            zip(texts, (p for p in problems for _ in range(a.group)))], device=run.device)
    return Batch(problems, ro, texts, rewards)


def update_step(run, batch):
    """Update: group advantages (distillation: none), then --epochs optimizer steps; a step whose loss or gradient
    norm is not finite changes nothing, is counted, and warned of."""
    a = run.args
    adv = (group_advantages(batch.rewards, a.group, std_norm=not a.no_std) if a.objective == "grpo"
           else batch.rewards)
    stats = update(run.objective, run.optimizer, batch.rollout, adv, a, run.world, partial(agree, run))
    run.stop.update(at_once=False, committed=True)  # applied or skipped: the step's record must not be torn
    run.bad_steps = run.bad_steps + 1 if stats["skipped"] else 0
    if stats["skipped"] and run.rank == 0:
        tqdm.write(f"WARNING step {run.done + 1}: the loss ({stats['loss']}) or gradient norm ({stats['grad_norm']}) "
                   f"is not finite: the update is skipped ({run.bad_steps} in a row)", file=sys.stderr)
    return stats


def log_step(run, step, batch, stats, t0, per_step_peak):
    """Log: the step's metrics (rank 0's rollouts; the loss and the update cover all ranks) and sample completions."""
    a, ro, rewards = run.args, batch.rollout, batch.rewards
    run.done = step + 1
    if run.rank != 0:
        return
    lengths, windows = ro.mask.sum(1).float(), ro.stats["windows"]
    metrics = dict(step=step + 1, reward=rewards.mean().item(), accuracy=rewards.mean().item(),
                   zero_std_groups=(rewards.view(-1, a.group).amax(1)
                                    == rewards.view(-1, a.group).amin(1)).float().mean().item(),
                   length_mean=lengths.mean().item(), length_max=lengths.max().item(),
                   truncated=ro.truncated.float().mean().item(), evictions=ro.stats["evictions"],
                   window_min=min(windows), window_mean=sum(windows) / len(windows),
                   s_update_ratio=ro.stats["s_update_ratio"], **stats, rollout_chunks=ro.stats["chunks"],
                   tokens_per_s=ro.stats["tokens_per_s"],
                   peak_memory_gb=peak_memory_gb(run.device) if per_step_peak else None,
                   step_seconds=time.perf_counter() - t0, wall_seconds=time.perf_counter() - run.t_start)
    append(run.out / "metrics.jsonl", [metrics])
    if metrics["truncated"] > 0.9:
        tqdm.write(f"WARNING step {step + 1}: {metrics['truncated']:.0%} of the rollouts hit --max-new {a.max_new} "
                   "without an answer: their reward is 0. Raise --max-new or check the prompt format.",
                   file=sys.stderr)
    if a.log_samples_every and (step + 1) % a.log_samples_every == 0:
        append(run.out / "samples.jsonl", [
            dict(step=step + 1, problem=batch.problems[i // a.group]["problem"],
                 answer=batch.problems[i // a.group]["answer"], completion=batch.texts[i], reward=rewards[i].item())
            for i in range(0, len(batch.texts), a.group)[:4]])


def checkpoint_step(run, step):
    """Checkpoint: every --save-every steps and at the last; then the step is done, and a signal that came during it
    stops the run now (one process) or at the ranks' next agreement."""
    if run.rank == 0 and (step % run.args.save_every == 0 or step == run.args.steps):
        save_checkpoint(run.out, step, run.adapter, run.optimizer, run.settings)
    if run.bad_steps == BAD_STEPS:
        newest = checkpoints(run.out)
        raise ValueError(f"steps {step - BAD_STEPS + 1}-{step}: the loss or the gradient norm was not finite "
                         f"{BAD_STEPS} times in a row: stopped (too high a learning rate?). Nothing non-finite was "
                         f"saved: {newest[0] if newest else run.out / 'settings.json'} is the last good state")
    run.stop.update(committed=False, at_once=run.world == 1)
    if run.world == 1 and run.stop["signal"]:
        raise Stop(run.stop["signal"])


def eval_due(run, step):
    return bool(run.args.eval_every and step and step % run.args.eval_every == 0 and run.problems.held_out)


def held_out_accuracy(run, policy, adapter):
    """Greedy accuracy on the held-out problems, each rank evaluating its share (no rank waits in a collective while
    another evaluates alone), the shares' counts summed."""
    share, a = run.problems.held_out[run.rank::run.world], run.args

    def correct():
        _, records = evaluate(run.model, run.problems.tokenizer, share, policy, adapter=adapter,
                              family=run.problems.family, max_new=a.max_new, batch_size=a.rollout_batch or len(share),
                              progress=False, compile=a.compile)
        return sum(r["correct"] for r in records)
    right = local(run, correct) if share else 0
    agree(run)
    counts = torch.tensor([right, len(share)], dtype=torch.float64, device=run.device)
    if run.world > 1:
        dist.all_reduce(counts)
    return (counts[0] / counts[1]).item()


def evaluate_step(run, step):
    """Evaluate: the held-out accuracy of a step --eval-every names, logged as the step's. A stop during it keeps the
    step's checkpoint, and the resumed run evaluates that step first (an evaluation belongs to its step)."""
    accuracy = held_out_accuracy(run, run.cache_policy, run.adapter)
    if run.rank == 0:
        tqdm.write(f"step {step}: held-out accuracy {accuracy:.3f} ({len(run.problems.held_out)} problems)")
        append(run.out / "metrics.jsonl", [dict(step=step, held_out_accuracy=accuracy)])


def finish(run):
    """The adapter, the reward curve and the closing table: the base model with and without its budget, and the
    trained policy, on the held-out problems."""
    a = run.args
    if run.rank == 0:
        check_finite(a.steps, run.adapter)
        save_adapter(run.adapter, run.out / "adapter", policy=run.cache_policy.policy, settings=run.settings)
        print(f"done: {a.steps - run.start} steps in {time.perf_counter() - run.t_start:.0f} s; adapter in "
              f"{run.out / 'adapter'}; reward curve in {reward_curve(run.out)}")
    if run.problems.held_out:
        rows = [("base, full cache", None, CachePolicy("full", a.cache, a.evict))]
        if run.cache_policy.policy != "full":
            rows.append((f"base, {'window' if run.cache_policy.policy == 'pte' else run.cache_policy.policy}", None,
                         CachePolicy("window", a.cache, a.evict)))
        rows.append((f"trained, {a.policy}", run.adapter, run.cache_policy))
        if run.rank == 0:
            print(f"\nHeld-out accuracy ({len(run.problems.held_out)} problems, greedy, cache {a.cache}, "
                  f"max {a.max_new} tokens):")
        for name, adapter, policy in rows:
            accuracy = held_out_accuracy(run, policy, adapter)
            if run.rank == 0:
                print(f"  {name:<28} {accuracy:6.3f}")


def train(args, problems, stop):
    """The run: set up, then each step roll out and grade, update, log, checkpoint and evaluate; then finish. Returns
    the run folder."""
    run, redo_evaluation = set_up(args, problems, stop)
    if redo_evaluation:  # a stop interrupted the evaluation of the step the run resumes from
        evaluate_step(run, run.start)
    run.t_start = time.perf_counter()
    for step in tqdm(range(run.start, args.steps), initial=run.start, total=args.steps, disable=run.rank != 0,
                     desc="train"):
        agree(run)  # the ranks stop together, at a step boundary or (below) inside the step
        t0, per_step_peak = time.perf_counter(), reset_peak_memory(run.device)
        batch = local(run, roll_out_and_grade, run, step)
        agree(run)
        stats = update_step(run, batch)
        log_step(run, step, batch, stats, t0, per_step_peak)
        checkpoint_step(run, step + 1)
        if eval_due(run, step + 1):
            evaluate_step(run, step + 1)
    finish(run)
    if run.world > 1:
        dist.destroy_process_group()
    return run.out


# ---------------------------------------------------------------------------------------------------- the memory plan
# The peak memory of each phase of a step, from the model's shapes and the flags alone (nothing is loaded but the
# config), so that a run that cannot fit is refused before it starts. docs/method.md §9 derives each term; e is the
# model dtype's bytes, kv_tok = 2 L d_kv e the keys and values of one token over all layers, R the rows of one
# generate call, P the longest prompt, T = --max-new, b = --micro-batch, n the longest segment score replays.

CUDA_CONTEXT_BYTES = 2**30  # the CUDA context and the libraries' workspaces: device memory the allocator never counts


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
    rollout_rows: int = 128  # rows of one generate call (--rollout-batch)
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
    """Bytes of each term of a step: what stays (runtime, weights, adapter and AdamW states) and what each phase adds
    while it runs."""
    e, V = s.dtype_bytes, cfg.vocab_size
    with torch.device("meta"):  # parameters counted, not allocated
        model = Transformer(cfg)
        adapter = sum(p.numel() for p in Adapter(cfg, s.adapter).parameters()) if s.adapter is not None else 0
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))  # lm_head even when tied
    kv_tok = 2 * cfg.n_layers * cfg.kv_dim * e
    R, Rp, P, T = min(s.rollout_rows, s.rows), min(s.prefill_rows, s.rollout_rows, s.rows), s.longest_prompt, s.max_new
    slots = P + T if s.policy == "full" else s.cache
    m = evict_count(max(s.cache - s.shortest_prompt, MIN_THOUGHT_SLOTS), s.evict)
    fold = R * m * cfg.kv_dim * (2 * e + 24) if s.policy not in ("window", "full") else 0  # gathered, un-rotated
    attend = R * cfg.n_heads * slots * (2 * e + 8) + R * slots * e  # decode: scores, their fp32 softmax, the mask
    return dict(
        runtime=s.runtime,
        weights=sum(p.numel() for p in model.parameters()) * e,
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
    """The peak of each phase of a step and of the whole (phases run one after another; what stays adds to each)."""
    stays = plan["runtime"] + plan["weights"] + plan["adapter"]
    rollout = stays + plan["packed_weights"] + plan["rollout_cache"] + max(plan["prefill"], plan["decode_step"])
    score = stays + plan["step_rollouts"] + plan["gradients"] + plan["score"]
    optimizer = stays + plan["gradients"] + plan["optimizer_step"]
    return dict(rollout=rollout, score=score, optimizer=optimizer, total=max(rollout, score, optimizer))


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


def plan_model(name):
    """(ModelConfig, bytes per element of the checkpoint's dtype) without loading a weight: a registry name's shapes,
    else the folder's config.json."""
    if REGISTRY.get(name, (None, None))[1] is not None:
        return config_from_hf(REGISTRY[name][1]), 2  # the registry's models ship in bf16
    path = resolve(name) / "config.json"
    hf = read_json(path)
    return config_from_hf(hf, str(path)), 4 if (hf.get("torch_dtype") or hf.get("dtype")) == "float32" else 2


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
        rows=args.prompts_per_step * args.group // ranks()[0],
        rollout_rows=args.rollout_batch or args.prompts_per_step * args.group, prefill_rows=args.prefill_rows,
        micro_batch=args.micro_batch, checkpoint=args.checkpoint, truncate=args.truncate, beta=args.beta,
        adapter=AdapterConfig(adapter_mode(args.policy), args.rank, args.alpha, args.globals, args.targets.split(",")),
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


def print_plan(s, plan, memory, where):
    """The plan as a table of its terms (what stays, what each phase adds while it runs), each phase's peak, and
    whether it fits in `memory` bytes."""
    peaks, (phase, fix), gib = plan_peaks(plan), plan_advice(plan, s), lambda x: f"{x / 2**30:.2f}"
    labels = dict(runtime="runtime: " + ("CUDA context, workspaces" if s.device == "cuda" else
                                         "this process before any weight"),
                  packed_weights="packed weights: oneDNN's copy while generate runs", score="score micro-batch")
    mode = ("--truncate" if s.truncate else "exact") + ", " + ("checkpointed" if s.checkpoint else "--no-checkpoint")
    print(f"memory plan{where}: policy {s.policy}, {s.rows} rollouts of up to {s.max_new} tokens on this rank, "
          f"generate calls of {min(s.rollout_rows, s.rows)} rows, prompts up to {s.longest_prompt} tokens, score "
          f"micro-batches of {s.micro_batch} rows ({mode}, {s.objective})\n\n| term | GiB |\n|---|---|")
    for key, size in plan.items():
        if size:
            print(f"| {labels.get(key, key.replace('_', ' '))} | {gib(size)} |")
    verdict = "" if memory is None else f" of {gib(memory)} GiB: " + (
        "fits" if peaks["total"] <= memory else f"does not fit; {fix}")
    print(f"\npeak while it runs: rollout {gib(peaks['rollout'])}, score {gib(peaks['score'])}, optimizer step "
          f"{gib(peaks['optimizer'])} GiB\ntotal peak {gib(peaks['total'])} GiB ({phase}){verdict}")


def check_memory(args, prompt_lens=None):
    """--plan: print the plan for these flags, for this machine's device or a cuda device of --plan GiB. A run (its
    prompts' lengths given): refuse it when its plan exceeds the device's memory, naming the flag to change. Either
    way before anything is written or loaded."""
    device = torch.device("cuda") if args.plan not in (None, True) else run_device(args.device)
    memory = args.plan * 2**30 if args.plan not in (None, True) else device_memory(device)
    cfg, dtype_bytes = plan_model(args.model)
    s = plan_settings(args, device, dtype_bytes, *((max(prompt_lens), min(prompt_lens)) if prompt_lens else ()))
    plan = memory_plan(cfg, s)
    if args.plan:
        return print_plan(s, plan, memory, f" ({args.model} on {device.type})")
    total = plan_peaks(plan)["total"]
    if memory is not None and total > memory:
        phase, fix = plan_advice(plan, s)
        raise ValueError(f"the memory plan needs {total / 2**30:.1f} GiB at its peak ({phase}), more than the "
                         f"{memory / 2**30:.1f} GiB of {device}: {fix}; `python train.py ... --plan` prints each phase")


# ---------------------------------------------------------------------------------------------------- memory, curve

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


def reward_curve(out: Path, smooth=10):
    """out/reward.svg from metrics.jsonl: the rollouts' mean reward per step (grey) and its trailing mean over
    `smooth` steps (blue), on a 0-1 axis. Plain SVG, no plotting library."""
    rewards = [r["reward"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "reward" in r]
    mean = [sum(rewards[max(0, i - smooth + 1):i + 1]) / min(i + 1, smooth) for i in range(len(rewards))]
    width, height, left, top, right, bottom = 600, 300, 50, 30, 20, 40
    x = lambda step: left + (width - left - right) * (step - 1) / max(len(rewards) - 1, 1)  # noqa: E731
    y = lambda r: top + (height - top - bottom) * (1 - r)  # noqa: E731
    every = next(k * 10**e for e in range(9) for k in (1, 2, 5) if len(rewards) / (k * 10**e) <= 8)
    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
           'font-size="11">', f'<rect width="{width}" height="{height}" fill="#fff"/>',
           f'<text x="{width / 2}" y="18" text-anchor="middle">reward of the rollouts: {out.name}</text>']
    for r in (0, 0.25, 0.5, 0.75, 1):
        svg += [f'<line x1="{left}" x2="{width - right}" y1="{y(r):.1f}" y2="{y(r):.1f}" stroke="#ddd"/>',
                f'<text x="{left - 6}" y="{y(r) + 4:.1f}" text-anchor="end">{r}</text>']
    for step in [1, *range(every, len(rewards) + 1, every)]:
        svg.append(f'<text x="{x(step):.1f}" y="{height - bottom + 16}" text-anchor="middle">{step}</text>')
    for color, values, label in (("#aaa", rewards, "per step"), ("#1f77b4", mean, f"{smooth}-step mean")):
        points = " ".join(f"{x(i + 1):.1f},{y(v):.1f}" for i, v in enumerate(values))
        svg.append(f'<polyline points="{points}" fill="none" stroke="{color}" stroke-width="2" data-label="{label}"/>')
    svg += [f'<text x="{width / 2}" y="{height - 6}" text-anchor="middle">step</text>', "</svg>\n"]
    (out / "reward.svg").write_text("\n".join(svg))
    return out / "reward.svg"


# ---------------------------------------------------------------------------------------------------- main

def main(argv=None):
    """train.py's command line: every value checked, the data loaded and checked, the run folder claimed (one writer),
    then the run. SIGINT (Ctrl-C) or SIGTERM stop it with a checkpoint of the last completed step and exit 130 or 143
    after printing the command that continues it."""
    world, rank = ranks()
    with data.stop_on_signals() as stop, ExitStack() as held:
        try:
            args = parse_args(argv)
            if args.plan:
                return check_memory(args)
            early = rank == 0 and Path(args.resume or args.out).exists()  # its holder can be refused now
            if early:
                held.enter_context(claim(args))
                args = parse_args(argv) if args.resume else args  # under the lock: a run just ended may have moved on
            problems = load_data(args, world)
            check_memory(args, [len(p["prompt_ids"]) for p in problems.train])  # before anything is written or loaded
            if rank == 0 and not early:  # a new folder is made only once the data passed its checks
                held.enter_context(claim(args))
            return train(args, problems, stop)
        except Stop as e:
            stop.update(at_once=False, committed=True)  # a second signal must not tear the checkpoint
            stopped(stop.get("run"), e.args[0], world)
            raise SystemExit(128 + e.args[0]) from None


if __name__ == "__main__":
    with data.quiet_exit():
        try:
            main()
        except (ValueError, OSError) as e:
            sys.exit(f"train.py: error: {e}")
