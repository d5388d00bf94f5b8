"""GRPO training of the adapters and thought encoder under a fixed-size cache: `python train.py --model qwen2.5-3b`.

Each step: take the next prompts, `generate` G rollouts of each without autograd under the cache policy,
grade them, compute group advantages, replay them with `score` (segment-checkpointed, gradients through
the cache and the chain of S), and take one AdamW step on the adapter and encoder parameters (the base
model is frozen). One update per batch, so the PPO ratio is 1 and the clip is inert unless --epochs > 1.
Several GPUs or nodes: `torchrun --nproc_per_node N train.py ...` (DistributedDataParallel over the adapter;
each rank rolls out its share of the prompts; rank 0 alone writes). Checkpoints are written atomically
(a temporary folder, renamed) and `--resume DIR` continues exactly: every step reseeds its sampler from
(seed, step, rank) and derives its prompts from (seed, step), so no generator state has to be carried over.

Choices the paper leaves open (SPEC section 5): group 8, temperature 1.0, beta 0.02 for the toy (it breaks
without a KL anchor) and 0 for real models (the usual LoRA-free recipes), token-mean loss.
Our extension beyond the paper: `--objective distill` trains the cache-constrained policy to match the
full-cache base model's next-token distribution (forward KL) on its own rollouts.
"""
import argparse
import json
import math
import os
import random
import resource
import shutil
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm

import data
import grade
from encoder import Adapter, AdapterConfig, load_adapter, save_adapter, trainable
from grpo import group_advantages, grpo_loss
from model import load, load_tokenizer, resolve
from rollout import CachePolicy, Rollout, generate, score

PAPER_DEFAULTS = dict(policy="pte", cache=1024, evict=0.25, rank=32, globals=32, targets="q,k,v,o", lr=1e-5, grad_clip=1.0,
                      max_new=3072, group=8, prompts_per_step=64, steps=200, temperature=1.0, beta=0.0, loss="token-mean",
                      micro_batch=8, eval_every=50, eval_size=64, save_every=25, data="math_train")
SHAPE_KEYS = ("model", "policy", "rank", "globals", "targets")  # a checkpoint must agree on these to be resumed


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="--model toy replaces some paper defaults with the toy's (toy.TOY_DEFAULTS).")

    def a(flag, **kw):  # the help shows the paper default of a flag left unset, else the argparse default
        key = flag[2:].replace("-", "_")
        default = PAPER_DEFAULTS.get(key, kw.get("default"))
        kw["help"] += "" if default is None or default is False else f" (default: {default})"
        p.add_argument(flag, **kw)
    a("--model", default="toy", help="registry name (qwen2.5-3b, r1-llama-8b, smollm2-135m, toy, ...) or Hugging Face folder")
    a("--policy", help="cache policy: pte | window (LoRA_c) | full (LoRA) | global-0 | global-only (pte ablations)")
    a("--objective", default="grpo", choices=["grpo", "distill"], help="distill: our extension, KL to the full-cache base model")
    a("--cache", type=int, help="cache budget N: prompt slots + thought window")
    a("--evict", type=float, help="share of the thought window evicted when it is full")
    a("--rank", type=int, help="adapter rank r")
    a("--alpha", type=float, help="adapter scale numerator (scale alpha/r); default: r")
    a("--globals", type=int, help="global tokens of the encoder's initial state")
    a("--targets", help="adapted linears, comma-separated from q,k,v,o,gate,up,down")
    a("--lr", type=float, help="AdamW learning rate")
    a("--grad-clip", type=float, help="max gradient norm")
    a("--max-new", type=int, help="rollout token limit")
    a("--group", type=int, help="rollouts per prompt G")
    a("--prompts-per-step", type=int, help="prompts per step, over all ranks")
    a("--micro-batch", type=int, help="rollout rows per score/backward pass (gradient accumulation)")
    a("--steps", type=int, help="optimizer steps")
    a("--temperature", type=float, help="sampling temperature of the rollouts")
    a("--top-p", type=float, default=1.0, help="nucleus sampling of the rollouts")
    a("--beta", type=float, help="k3 KL coefficient to the base model (adapter off, same cache policy)")
    a("--loss", choices=["token-mean", "seq-mean", "constant"], help="loss aggregation (DAPO, GRPO, Dr. GRPO)")
    a("--no-std", action="store_true", help="advantages r - mean without std normalisation (Dr. GRPO)")
    a("--truncate", action="store_true", help="truncated backprop: each segment back-propagates at once against "
      "the cache and S as constants (PAPER Q7); memory fixed by --cache instead of growing with the rollout")
    a("--data", help="training problems: comma-separated JSONL paths or names (math_train, gsm8k, dapo-math-17k, ...)")
    a("--data-dir", help="where names resolve: default $PTE_DATA, else data/")
    a("--eval-size", type=int, help="held-out problems for --eval-every and the closing table (split off the training data)")
    a("--eval-every", type=int, help="steps between held-out accuracy checks (0: never)")
    a("--save-every", type=int, help="steps between checkpoints")
    a("--out", help="run folder (default runs/<model>-<policy>-<time>)")
    a("--resume", help="run folder to continue from its latest checkpoint")
    a("--seed", type=int, default=0, help="seed of the adapter init, the data order and the sampling")
    a("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"], help="base model dtype (auto: checkpoint's on GPU, fp32 on CPU)")
    a("--device", default="auto", help="auto | cpu | cuda")
    a("--threads", type=int, help="CPU threads (torch.set_num_threads)")
    a("--compile", action=argparse.BooleanOptionalAction, help="decode through the compiled step (rollout.compiled_step; "
      "default: on cuda, off on the CPU)")
    a("--log-samples-every", type=int, default=10, help="steps between sample completions written to samples.jsonl")
    args = p.parse_args(argv)
    if args.model == "toy":
        from toy import TOY_DEFAULTS
        defaults = {**PAPER_DEFAULTS, "data": None, **TOY_DEFAULTS}
    else:
        defaults = PAPER_DEFAULTS
    for k, v in defaults.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    args.alpha = args.alpha or float(args.rank)
    if args.policy not in ("pte", "window", "full", "global-0", "global-only"):
        p.error(f"--policy {args.policy!r}: choose pte, window, full, global-0 or global-only")
    if args.group < 2 and args.objective == "grpo":
        p.error("--group 1 gives every rollout advantage 0 (no learning signal): use 2 or more")
    return args


# ---------------------------------------------------------------------------------------------------- the data

def load_problems(args):
    """(training problems, held-out problems). The toy makes its own; others read --data and split off --eval-size."""
    if args.model == "toy" and args.data is None:
        from toy import EVAL_SEED, make_problems
        return make_problems(20_000, seed=args.seed), make_problems(args.eval_size, seed=EVAL_SEED)  # a pool that does not depend on --steps
    problems = [p for name in args.data.split(",") for p in data.read_problems(data.resolve_data(name, args.data_dir))]
    random.Random(args.seed).shuffle(problems)
    held_out, train = problems[:args.eval_size], problems[args.eval_size:]
    if not train:
        raise ValueError(f"--data {args.data}: no problems left for training after holding out {args.eval_size}")
    return train, held_out


def step_prompts(problems, step, args, rank, world):
    """This rank's share of the step's prompts: a seeded permutation per epoch, so the order follows from the step."""
    n, per_rank = len(problems), args.prompts_per_step // world
    picks = []
    for i in range(step * args.prompts_per_step + rank * per_rank, step * args.prompts_per_step + (rank + 1) * per_rank):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(args.seed * 1_000_003 + i // n))
        picks.append(problems[int(order[i % n])])
    return picks


# ---------------------------------------------------------------------------------------------------- one step

def take(ro: Rollout, rows):
    return Rollout(ro.prompts[rows], ro.prompt_lens[rows], ro.tokens[rows], ro.logprobs[rows], ro.mask[rows],
                   ro.truncated[rows], [ro.evictions[i] for i in rows.tolist()], ro.stats)


class Objective(nn.Module):
    """What DistributedDataParallel wraps: the adapter (the only trainable parameters) and the loss of a
    micro-batch. The frozen model is kept out of the module tree so that DDP neither syncs nor broadcasts it."""

    def __init__(self, model, adapter, args, policy):
        super().__init__()
        self.adapter, self.args, self.policy = adapter, args, policy
        object.__setattr__(self, "model", model)

    def forward(self, ro, adv, ref_logp, n_rows, n_tokens):
        a = self.args
        if a.objective == "distill":  # forward KL(full-cache base || cache-constrained policy) per token
            with torch.no_grad():  # the teacher's (b, T, V) log-probs, one micro-batch at a time
                teacher = score(self.model, ro, CachePolicy("full", a.cache, a.evict), None,
                                token_fn=lambda logits, _, span: torch.log_softmax(logits.float(), -1))
            per_token = score(self.model, ro, self.policy, self.adapter, truncate=a.truncate, token_fn=lambda logits, _, span: (
                teacher[:, span[0]:span[1]].exp() * (teacher[:, span[0]:span[1]] - torch.log_softmax(logits.float(), -1))).sum(-1))
            loss = torch.where(ro.mask, per_token, 0).sum() / n_tokens
            return loss, dict(kl=loss.item() * n_tokens / max(int(ro.mask.sum()), 1), clip_frac=0.0)
        logp = score(self.model, ro, self.policy, self.adapter, a.temperature, truncate=a.truncate)  # (b, T)
        return grpo_loss(logp, ro.logprobs, adv, ro.mask, ref_logp, a.beta, how=a.loss, max_new=a.max_new, n_rows=n_rows, n_tokens=n_tokens)


def update(objective, optimizer, ro, adv, ref_logp, args, world):
    """One optimizer step on a rank's rollouts, micro-batched; the normalisers count all ranks' rows and tokens,
    and DDP averages the gradients, hence the factor `world`. --truncate accumulates each parameter's gradient
    once per segment, which DDP's hooks refuse: there the gradients are summed by hand after the last micro-batch."""
    counts = torch.tensor([ro.mask.shape[0], ro.mask.sum()], dtype=torch.float64, device=ro.mask.device)
    if world > 1:
        dist.all_reduce(counts)
    n_rows, n_tokens = counts.tolist()
    chunks = torch.arange(ro.mask.shape[0], device=ro.mask.device).split(args.micro_batch)
    stats = []
    for i, rows in enumerate(chunks):
        sync = nullcontext() if world == 1 or (i == len(chunks) - 1 and not args.truncate) else objective.no_sync()
        with sync:
            loss, s = objective(take(ro, rows), adv[rows], None if ref_logp is None else ref_logp[rows], n_rows, n_tokens)
            (loss * world).backward()
        stats.append(dict(s, loss=loss.item(), rows=len(rows)))
    params = trainable(objective.module.adapter if world > 1 else objective.adapter)
    if world > 1 and args.truncate:
        for p in params:
            p.grad = torch.zeros_like(p) if p.grad is None else p.grad
            dist.all_reduce(p.grad)
            p.grad /= world
    grad_norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip).item()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    total = sum(s["rows"] for s in stats)
    out = {k: sum(s[k] * s["rows"] for s in stats) / total for k in ("kl", "clip_frac")}
    return dict(out, loss=sum(s["loss"] for s in stats), grad_norm=grad_norm)


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


def load_checkpoint(run: Path, settings, model_cfg, device):
    """(step, adapter, optimizer state) of run's latest checkpoint, refused when its settings differ."""
    if not (run / "latest").exists():
        raise FileNotFoundError(f"--resume {run}: no checkpoint there (no 'latest' file)")
    ckpt = run / (run / "latest").read_text().strip()
    state = torch.load(ckpt / "state.pt", map_location=device, weights_only=False)
    diff = [f"{k}: checkpoint {state['settings'].get(k)!r}, now {settings[k]!r}" for k in SHAPE_KEYS if state["settings"].get(k) != settings[k]]
    if diff:
        raise ValueError(f"--resume {run}: the checkpoint does not match this run ({'; '.join(diff)})")
    return state["step"], load_adapter(ckpt, model_cfg, device), state["optimizer"]


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
    from eval import evaluate
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


def main(argv=None):
    args = parse_args(argv)
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
    dtype = dict(auto=None, bf16=torch.bfloat16, fp16=torch.float16, fp32=torch.float32)[args.dtype]
    model = load(args.model, dtype=dtype, device=device)
    tokenizer, family = load_tokenizer(args.model), data.chat_family(resolve(args.model))
    train_set, held_out = load_problems(args)
    mode = {"pte": "pte", "global-0": "global-0", "global-only": "global-only"}.get(args.policy, "lora")
    cache_policy = CachePolicy("pte" if mode != "lora" else args.policy, args.cache, args.evict)
    ref_policy = CachePolicy("window" if cache_policy.policy == "pte" else cache_policy.policy, args.cache, args.evict)
    settings = dict(model=args.model, policy=args.policy, cache_policy=cache_policy.policy, rank=args.rank, globals=args.globals,
                    targets=args.targets, **{k: v for k, v in vars(args).items() if k not in ("model", "policy", "rank", "globals", "targets")})
    torch.manual_seed(args.seed)
    adapter = Adapter(model.config, AdapterConfig(mode, args.rank, args.alpha, args.globals, args.targets.split(","))).to(device)
    optimizer = torch.optim.AdamW(trainable(adapter), lr=args.lr, weight_decay=0.0)
    start = 0
    out = Path(args.resume or args.out or f"runs/{Path(str(args.model)).name}-{args.policy}-{time.strftime('%Y%m%d-%H%M%S')}")
    if args.resume:
        start, adapter, opt_state = load_checkpoint(out, settings, model.config, device)
        optimizer = torch.optim.AdamW(trainable(adapter), lr=args.lr, weight_decay=0.0)
        optimizer.load_state_dict(opt_state)
        log = out / "metrics.jsonl"
        if rank == 0 and log.exists():  # drop what was logged after the checkpoint: those steps run again
            log.write_text("".join(line for line in log.read_text().splitlines(True) if json.loads(line)["step"] <= start))
    objective = Objective(model, adapter, args, cache_policy)
    if world > 1:
        objective = nn.parallel.DistributedDataParallel(objective, device_ids=[device.index] if device.type == "cuda" else None)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "settings.json").write_text(json.dumps(settings, indent=1))
        print(f"{args.model}: {sum(p.numel() for p in trainable(adapter)):,} trainable parameters ({mode} adapter), "
              f"policy {args.policy}, cache {args.cache}, {len(train_set)} training problems, {world} rank(s), run folder {out}")
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, disable=rank != 0, desc="train")
    t_start = time.perf_counter()
    for step in bar:
        t0 = time.perf_counter()
        per_step_peak = reset_peak_memory(device)
        problems = step_prompts(train_set, step, args, rank, world)
        prompts = [tokenizer.encode(data.format_prompt(p["problem"], family), add_special_tokens=False).ids for p in problems for _ in range(args.group)]
        gen = torch.Generator(device).manual_seed(args.seed * 1_000_003 + step * 1009 + rank)  # a function of the step: resumable
        ro = generate(model, prompts, cache_policy, args.max_new, adapter, args.temperature, args.top_p, generator=gen,
                      compile=args.compile)
        if step == start and ro.stats.get("first_step_s"):
            tqdm.write(f"compiled decode step: first call {ro.stats['first_step_s']:.1f} s (compiling included)")
        texts = [tokenizer.decode(row[m].tolist(), skip_special_tokens=True) for row, m in zip(ro.tokens, ro.mask)]
        rewards = torch.tensor([grade.score(t, p["answer"]) for t, p in zip(texts, (p for p in problems for _ in range(args.group)))], device=device)
        adv = group_advantages(rewards, args.group, std_norm=not args.no_std) if args.objective == "grpo" else rewards
        with torch.no_grad():
            ref_logp = score(model, ro, ref_policy, None, args.temperature) if args.beta > 0 and args.objective == "grpo" else None
        stats = update(objective, optimizer, ro, adv, ref_logp, args, world)
        lengths = ro.mask.sum(1).float()
        metrics = dict(step=step + 1, reward=rewards.mean().item(), accuracy=rewards.mean().item(),
                       zero_std_groups=(rewards.view(-1, args.group).amax(1) == rewards.view(-1, args.group).amin(1)).float().mean().item(),
                       length_mean=lengths.mean().item(), length_max=lengths.max().item(), truncated=ro.truncated.float().mean().item(),
                       evictions=ro.stats["evictions"], window_min=min(ro.stats["windows"]),
                       window_mean=sum(ro.stats["windows"]) / len(ro.stats["windows"]), s_update_ratio=ro.stats["s_update_ratio"], **stats,
                       tokens_per_s=ro.stats["tokens_per_s"], peak_memory_gb=peak_memory_gb(device) if per_step_peak else None,
                       step_seconds=time.perf_counter() - t0, wall_seconds=time.perf_counter() - t_start)
        if world > 1:  # the logged rollout metrics are rank 0's share; the loss and the update cover all ranks
            dist.barrier()
        if rank != 0:
            continue
        bar.set_postfix(reward=f"{metrics['reward']:.3f}", kl=f"{metrics['kl']:.4f}", tok_s=f"{metrics['tokens_per_s']:.0f}")
        with open(out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(metrics) + "\n")
        if metrics["truncated"] > 0.9:
            tqdm.write(f"WARNING step {step + 1}: {metrics['truncated']:.0%} of the rollouts hit --max-new {args.max_new} "
                       "without an answer: their reward is 0. Raise --max-new or check the prompt format.")
        if args.log_samples_every and (step + 1) % args.log_samples_every == 0:
            with open(out / "samples.jsonl", "a") as f:
                for i in range(0, len(texts), args.group)[:4]:
                    f.write(json.dumps(dict(step=step + 1, problem=problems[i // args.group]["problem"], answer=problems[i // args.group]["answer"],
                                            completion=texts[i], reward=rewards[i].item())) + "\n")
        if (step + 1) % args.save_every == 0 or step + 1 == args.steps:
            save_checkpoint(out, step + 1, adapter, optimizer, settings)
        if args.eval_every and (step + 1) % args.eval_every == 0 and held_out:
            from eval import evaluate
            summary, _ = evaluate(model, tokenizer, held_out, cache_policy, adapter=adapter, family=family, max_new=args.max_new,
                                  batch_size=max(args.micro_batch, 16), progress=False, compile=args.compile)
            tqdm.write(f"step {step + 1}: held-out accuracy {summary['accuracy']:.3f} ({len(held_out)} problems)")
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(dict(step=step + 1, held_out_accuracy=summary["accuracy"])) + "\n")
    if rank == 0:
        save_adapter(adapter, out / "adapter", policy=cache_policy.policy, settings=settings)
        print(f"done: {args.steps - start} steps in {time.perf_counter() - t_start:.0f} s; adapter in {out / 'adapter'}")
        if held_out and args.eval_size:
            held_out_table(model, tokenizer, held_out, family, adapter, cache_policy, args)
    if world > 1:
        dist.destroy_process_group()
    return out


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"train.py: error: {e}")
