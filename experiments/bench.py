"""Speed and memory of the cache policies (docs/method.md §2-6), printed as tables with the command that made them.

  1. Rollout: tokens/s and peak memory against generation length for `full`, `window` and `pte` at one cache
     budget, eager and with the compiled decode step (`-compiled`: rollout.compiled_step, its compile time in the
     first call beside it), beside `transformers`' `generate` (full cache, greedy, same model, batch, dtype and token
     count), the ratio ours `full` / transformers, and each column's share of its memory floor: the tokens/s if every
     forward read only what it must (every weight byte, and the keys and values of the slots its rows attend to: the
     prompt and the thought tokens in the window) once, at the copy bandwidth measured here.
  2. Training step (`score` with checkpointed segments + GRPO loss + backward, no rollout): time and peak memory
     against rollout length for `full` (LoRA, `score` checkpointed in chunks of m tokens) and `pte`, same budget,
     with exact gradients and with `--truncate` (each segment back-propagated at once: memory fixed by the budget).
  3. GRPO steps as train.py takes them (generate, reward, update; random rewards: random weights answer nothing)
     for full, window, pte and pte --truncate side by side: rollout tokens/s, step time and peak memory of the
     second of two steps (the first warms up), at paper settings scaled down (`--prompts` x `--group` rows).
  `--gpu`: the GPU acceptance (ACCEPTANCE below): the compile toolchain, a 4-layer smoke test at `--gpu-model`'s
     shapes, the toy's training and resume, every layer's prefill and decode at 512 rows against train.py's memory
     plan and the bandwidth floor, two GRPO steps; each part in a subprocess under its own time limit, within 8
     minutes, its log and result in `--out`. `--gpu --tables 1,2,3`: the tables at `--gpu-model`'s real shapes
     with random bf16 weights on cuda instead.
  Every table is followed by train.py's memory plan for the same settings beside the measured peaks.

Rollouts decode exactly `length` tokens (no EOS) from random prompts of `--prompt-len` tokens, timed over the whole
`generate` call (prefill included) after a 4-token warm-up (which compiles the step for `-compiled`: the timed call
may not compile again). `full` and `window` run the bare model, as transformers does; `pte` needs its adapter
(rank 32 on q, k, v, o; B = 0, so it decodes the base model's tokens at the adapter's cost), and `lora_c` is `window`
with the same adapter and S = I (the paper's LoRA_c): pte / lora_c is the thought encoder's cost. The training step
scores a rollout built without decoding: random tokens, all valid, the eviction schedule that generate records (its
cost does not depend on the token values).
Memory: on the CPU the peak resident memory (VmHWM) of a fresh subprocess per configuration, counted from the
loaded model on (Linux clear_refs), beside its resident memory just after loading (the weights-only baseline);
on cuda torch.cuda.max_memory_allocated beside torch.cuda.memory_allocated after loading.
Table 2's subprocesses run with glibc's mmap threshold fixed at 128 KiB (MALLOC_MMAP_THRESHOLD_): with glibc's
sliding default the heap keeps every segment's freed activations and the RSS grows with the number of segments,
whatever they hold. Table 1 keeps the default (a fixed threshold adds page faults to every decode step).

  python experiments/bench.py --quick                # about a minute: small lengths and batch
  python experiments/bench.py                        # tables 1 and 2: SmolLM2-135M, fp32, CPU (long)
  python experiments/bench.py --gpu                  # the GPU acceptance, at most 8 minutes
  python experiments/bench.py --gpu --device cpu --gpu-model toy --quick --compile-backend eager   # its CPU dry run
"""
import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: the core modules
from model import resolve  # noqa: E402

# full-plain: `full` through F.linear, without the blocked weights; -compiled: through rollout.compiled_step;
# lora_c: the paper's LoRA_c, `window` with the same adapter as pte's but S = I, so pte / lora_c is the encoder's cost
POLICIES = ("full", "window", "lora_c", "pte", "full-plain", "full-compiled", "window-compiled", "lora_c-compiled",
            "pte-compiled")
FIXED_MMAP = {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}


# ---------------------------------------------------------------------------------------------------- one configuration

def prompts(s, vocab):
    g = torch.Generator().manual_seed(0)
    # (B, P) random ids, no pads
    return torch.randint(min(100, vocab // 2), vocab, (s["batch"], s["prompt_len"]), generator=g)


def timed(fn, device):
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    t0 = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - t0


def load_hf(s):
    import transformers
    transformers.logging.set_verbosity_error()
    return transformers.AutoModelForCausalLM.from_pretrained(s["model"], dtype=getattr(torch, s["dtype"])).eval()


def rollout_hf(s, hf):
    ids = prompts(s, hf.config.vocab_size)

    @torch.no_grad()
    def run(n):
        return hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, pad_token_id=0)
    run(4)
    out, seconds = timed(lambda: run(s["length"]), s["device"])
    return dict(seconds=seconds, tokens=out[:, ids.shape[1]:].numel())


def rollout_ours(s, model):
    from encoder import Adapter, AdapterConfig
    from rollout import CachePolicy, Sampling, generate
    name, _, variant = s["policy"].partition("-")
    policy, compile = CachePolicy("window" if name == "lora_c" else name, s["budget"]), variant == "compiled"
    adapter = (Adapter(model.config, AdapterConfig("pte" if name == "pte" else "lora")).to(s["device"])
               if name in ("pte", "lora_c") else None)
    batch = prompts(s, model.config.vocab_size).tolist()
    warm = generate(model, batch, policy, Sampling(4, eos_ids=[]), adapter, compile=compile)
    torch._dynamo.config.error_on_recompile = True  # the timed call reuses the warm-up's graph, whatever its length
    cpu = time.process_time()
    out, seconds = timed(lambda: generate(model, batch, policy, Sampling(s["length"], eos_ids=[]), adapter,
                                          compile=compile), s["device"])
    cfg = model.config
    return dict(seconds=seconds, tokens=int(out.mask.sum()), compile_s=warm.stats["first_step_s"],
                cpu_s=time.process_time() - cpu,  # this process's CPU time, which other jobs inflate least
                kv_bytes_per_slot=2 * cfg.n_layers * cfg.kv_dim * model.embed_tokens.weight.element_size())


def train_step(s, model):
    """score + GRPO loss + backward on a rollout of `length` tokens built without decoding."""
    from encoder import Adapter, AdapterConfig
    from grpo import grpo_loss
    from rollout import CachePolicy, Rollout, score
    policy, dev = CachePolicy(s["policy"], s["budget"]), s["device"]
    adapter = Adapter(model.config, AdapterConfig("lora" if s["policy"] == "full" else "pte")).to(dev)
    B, P, T = s["batch"], s["prompt_len"], s["length"]
    g = torch.Generator().manual_seed(1)
    valid = torch.ones(B, T, dtype=torch.bool, device=dev)
    rollout = Rollout(prompts(s, model.config.vocab_size).to(dev), torch.full((B,), P, device=dev),
                      torch.randint(100, model.config.vocab_size, (B, T), generator=g).to(dev),
                      torch.zeros(B, T, device=dev), valid, valid[:, 0], [policy.schedule([P], T).steps(0, T - 1)] * B)

    def step():
        logp = score(model, rollout, policy, adapter, truncate=s.get("truncate", False))  # (B, T)
        loss, _ = grpo_loss(logp, logp.detach(), torch.randn(B, generator=g).to(dev), rollout.mask)
        loss.backward()
    return dict(seconds=timed(step, dev)[1], tokens=B * T)


def grpo_steps(s, model):
    """Two GRPO steps of train.py's (generate, random rewards, train.update); the numbers of the second."""
    import argparse
    import train
    from encoder import Adapter, AdapterConfig, trainable
    from grpo import group_advantages
    from rollout import CachePolicy, Sampling, generate
    policy, dev = s["policy"].removesuffix("-trunc"), s["device"]
    args = argparse.Namespace(**{**train.PAPER_DEFAULTS, "objective": "grpo", "epochs": 1, "top_p": 1.0,
                                 "no_std": False, "kl_estimator": "k3", "truncate": s["policy"].endswith("-trunc"),
                                 "checkpoint": True,
                                 "cache": s["budget"], "max_new": s["length"], "group": s["group"],
                                 "micro_batch": s["batch"]})
    adapter = Adapter(model.config, AdapterConfig("lora" if policy != "pte" else "pte")).to(dev)
    cache_policy = CachePolicy(policy, s["budget"])
    objective = train.Objective(model, adapter, args, cache_policy,
                                CachePolicy("window" if policy == "pte" else policy, s["budget"]))
    optimizer = torch.optim.AdamW(trainable(adapter), lr=args.lr)
    g = torch.Generator(dev).manual_seed(0)
    rows = [p for p in prompts(dict(s, batch=s["prompts"]), model.config.vocab_size).tolist()
            for _ in range(s["group"])]
    for _ in range(2):
        train.reset_peak_memory(torch.device(dev))
        t0 = time.perf_counter()
        ro = generate(model, rows, cache_policy, Sampling(args.max_new, args.temperature), adapter, g)
        rewards = torch.randint(0, 2, (len(rows),), generator=g, device=dev).float()
        train.update(objective, optimizer, ro, group_advantages(rewards, s["group"]), args, world=1)
        if dev.startswith("cuda"):
            torch.cuda.synchronize()
    return dict(seconds=time.perf_counter() - t0, tokens=int(ro.mask.sum()),
                rollout_tokens_per_s=ro.stats["tokens_per_s"])


def sdpa_backend(device, dtype, heads, kv_heads, head_dim):
    """The first of PyTorch's SDPA kernels that runs model.attend_masked at these shapes (with its explicit mask)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    import model
    q = torch.randn(1, heads, 64, head_dim, device=device, dtype=dtype)
    kv = torch.randn(1, kv_heads, 96, head_dim, device=device, dtype=dtype)
    mask = torch.zeros(1, 1, 64, 96, device=device, dtype=dtype)
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                    SDPBackend.MATH):
        try:
            with sdpa_kernel([backend]):
                model.attend_masked(q, kv, kv, mask)
            return backend.name
        except RuntimeError:
            continue
    return "none"


def planned(s):
    """What train.py's memory plan predicts for this configuration, before anything loads: (its peak, its runtime and
    weights) in MiB. Rollouts: the bare model under full and window, pte's adapter; training: the adapter without
    AdamW's states (table 2 takes no optimizer step)."""
    import model
    from encoder import AdapterConfig
    from train import MemorySettings, _status_kib, memory_plan, plan_model, plan_peaks
    name, cuda = s["policy"].removesuffix("-trunc").partition("-")[0], s["device"].startswith("cuda")
    cfg, _ = plan_model(s["model"])
    e, rows = torch.finfo(getattr(torch, s["dtype"])).bits // 8, s.get("prompts", 1) * s.get("group", s["batch"])
    adapter = (AdapterConfig("pte") if name == "pte" else None) if s["kind"] == "rollout" else \
        AdapterConfig("pte" if name == "pte" else "lora")
    settings = MemorySettings(
        policy=name, cache=s["budget"], max_new=s["length"], longest_prompt=s["prompt_len"],
        shortest_prompt=s["prompt_len"], rows=rows, rollout_rows=rows, prefill_rows=rows, micro_batch=s["batch"],
        truncate=s.get("truncate", False) or s["policy"].endswith("-trunc"), adapter=adapter,
        optimizer=s["kind"] == "grpo", device="cuda" if cuda else "cpu", dtype_bytes=e,
        packed=model.ONEDNN and not cuda and e == 4 and not s["policy"].endswith("-plain"),
        runtime=0 if cuda else _status_kib("VmRSS")[0] * 1024)  # cuda: the allocator's count, no context
    plan = memory_plan(cfg, settings)
    peak = plan_peaks(plan)[dict(rollout="rollout", train="score", grpo="total")[s["kind"]]]
    return peak / 2**20, (plan["runtime"] + plan["weights"]) / 2**20


def child(s):
    """Run one configuration in this fresh process: its numbers, and its memory in MiB just after loading and at
    peak (beside the memory plan's)."""
    import model
    from train import peak_memory_gb, reset_peak_memory
    torch.set_num_threads(s["threads"])
    if "part" in s:  # a part of the GPU acceptance
        compile_with(s["backend"])
        return PARTS[s["part"]](s)
    plan = planned(s) if s["impl"] == "ours" else None
    model.ONEDNN = model.ONEDNN and not s.get("policy", "").endswith("-plain")  # packed_weights becomes a no-op
    cuda = s["device"].startswith("cuda")
    if s["impl"] == "transformers":
        loaded = load_hf(s)
    elif s["random"]:
        loaded = random_model(s["model"], getattr(torch, s["dtype"]), s["device"])
    else:
        loaded = model.load(s["model"], dtype=getattr(torch, s["dtype"]), device=s["device"])
    reset_peak_memory(torch.device(s["device"]))
    unique = {p.data_ptr(): p for p in loaded.parameters()}.values()  # tied embeddings once
    out = dict(weight_bytes=sum(p.numel() * p.element_size() for p in unique),
               weights_mib=torch.cuda.memory_allocated() / 2**20 if cuda
               else peak_memory_gb(torch.device("cpu")) * 1024)
    if s["impl"] == "transformers":
        out.update(rollout_hf(s, loaded))
    else:
        out.update(dict(rollout=rollout_ours, train=train_step, grpo=grpo_steps)[s["kind"]](s, loaded))
    out["peak_mib"] = peak_memory_gb(torch.device(s["device"])) * 1024
    if plan:
        out["plan_mib"], out["plan_weights_mib"] = plan
    return out


def spawn(s, env=None):
    done = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", json.dumps(s)], capture_output=True,
                          text=True, env=dict(os.environ, **(env or {})))
    if done.returncode != 0:
        raise SystemExit(f"bench child {json.dumps(s)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------------- tables

def model_config(name):
    import model
    return model.config_from_hf(model.REGISTRY[name][1])


def copy_bandwidth(threads, device, mib=256):
    """Bytes per second of one large tensor copy (the bytes counted once), the best of five."""
    torch.set_num_threads(threads)
    src = torch.ones(mib * 2**18, device=device)
    dst = torch.empty_like(src)
    return src.numel() * 4 / min(timed(lambda: dst.copy_(src), device)[1] for _ in range(5))


def floor_tokens_per_s(a, policy, n, weight_bytes, kv_bytes_per_slot, bandwidth):
    """Tokens/s if each of the n forwards of a rollout (the prefill, then one a token) read every weight byte and the
    keys and values of the slots its rows attend to (the prompt and the thought tokens the policy keeps) once."""
    window = n if policy.startswith("full") else a.budget - a.prompt_len
    slots = sum(a.prompt_len + min(t, window) for t in range(n))  # a row's, over the n forwards
    return a.batch * n * bandwidth / (n * weight_bytes + a.batch * slots * kv_bytes_per_slot)


def header(title, a, lines, cols):
    print(f"\n### {title}\ncommand: python experiments/bench.py {' '.join(map(shlex.quote, sys.argv[1:]))}")
    print(f"settings: {a.model_name} ({a.dtype}, {a.device}{', random weights' if a.gpu else ''}), batch {a.batch}, "
          f"prompt {a.prompt_len} tokens, cache budget {a.budget}, evict 0.25, threads {a.threads}, "
          f"torch {torch.__version__}")
    print("\n".join(lines) + "\n\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols), flush=True)


def row(cells):
    print("| " + " | ".join(cells) + " |", flush=True)


def ratio(slow, fast, device):
    """Time a token of `slow` over `fast`: on the CPU their processes' CPU time, which other jobs on a shared machine
    inflate least; on cuda wall time."""
    key = "seconds" if device.startswith("cuda") else "cpu_s"
    return (slow[key] / slow["tokens"]) / (fast[key] / fast["tokens"])


def rollout_table(a, base, peer):
    peer = peer and "full" in a.policies  # the peer is a full cache: it stands beside ours `full`
    encoder = "pte" in a.policies and "lora_c" in a.policies  # pte / lora_c: the thought encoder's cost
    impls = [("ours", p) for p in a.policies] + ([("transformers", "full")] if peer else [])
    compiled = [p for p in a.policies if p.endswith("-compiled")]
    mib, measured = [], []
    for i, n in enumerate(a.lengths):
        runs = [{p if impl == "ours" else impl: spawn(dict(base, impl=impl, kind="rollout", policy=p, length=n))
                 for impl, p in impls} for _ in range(a.repeats)]  # interleaved; the fastest of each counts
        r = {k: min((run[k] for run in runs), key=lambda v: v.get("cpu_s" if a.device == "cpu" else "seconds",
                                                                     v["seconds"])) for k in runs[0]}
        tps = {k: v["tokens"] / v["seconds"] for k, v in r.items()}
        if i == 0:
            w, kv = r[a.policies[0]]["weight_bytes"], r[a.policies[0]]["kv_bytes_per_slot"]
            bandwidth = copy_bandwidth(a.threads, a.device)
            lines = ["weights only (each subprocess just after loading): "
                     + ", ".join(f"{k} {v['weights_mib']:.0f} MiB" for k, v in r.items())]
            if not a.device.startswith("cuda"):
                lines.append("ours: generate adds a blocked copy of the fp32 weights while it decodes "
                             "(model.packed_weights), counted in its MiB")
            lines.append(f"(% of floor): of the tokens/s if each forward read once, at the copy bandwidth "
                         f"({bandwidth / 1e9:.1f} GB/s), the weights ({w / 2**20:.0f} MiB) and the keys and values "
                         f"of the slots its rows attend to ({kv / 2**10:.0f} KiB a slot): the prompt's and the "
                         "thought tokens kept (`full`: all, else at most the window); -compiled attends over every "
                         "slot of the preallocated cache under the mask")
            header("Rollout: tokens/s and peak memory (MiB) against generation length", a, lines,
                   ["new tokens"] + [f"{k} tok/s" + (" (% of floor)" if k != "transformers" else "") for k in r]
                   + (["full / transformers"] if peer else [])
                   + ([f"pte / lora_c {'time' if a.device.startswith('cuda') else 'CPU time'}"] if encoder else [])
                   + [f"{k} compile s" for k in compiled]
                   + [f"{k} MiB" for k in r])
        floor = {p: floor_tokens_per_s(a, p, n, w, kv, bandwidth) for p in a.policies}
        row([str(n)] + [f"{v:.1f}" + (f" ({100 * v / floor[k]:.0f}%)" if k in floor else "") for k, v in tps.items()]
            + ([f"{tps['full'] / tps['transformers']:.2f}"] if peer else [])
            + ([f"{ratio(r['pte'], r['lora_c'], a.device):.3f}"] if encoder else [])
            + [f"{r[k]['compile_s']:.0f}" for k in compiled]
            + [f"{v['peak_mib']:.0f}" for v in r.values()])
        mib.append({k: v["peak_mib"] for k, v in r.items()})
        measured += [(f"rollout, {k}, batch {a.batch}", n, v) for k, v in r.items() if "plan_mib" in v]
    yardstick = a.lengths.index(512) if 512 in a.lengths[:-1] else 0  # memory at the longest length against 512 tokens
    evicting = [i for i, n in enumerate(a.lengths[:-1])
                if n > a.budget - a.prompt_len]  # the window has evicted by then
    for ref in dict.fromkeys([yardstick, *evicting[:1]]) if len(mib) > 1 else []:
        print(f"\npeak memory at {a.lengths[-1]} new tokens against {a.lengths[ref]}: "
              + ", ".join(f"{k} {100 * (mib[-1][k] / mib[ref][k] - 1):+.1f}%" for k in mib[0]))
    return measured


def train_table(a, base):
    env, measured = None if a.device.startswith("cuda") else FIXED_MMAP, []
    for i, n in enumerate(a.lengths):
        f, p, t = (spawn(dict(base, impl="ours", kind="train", policy=k, truncate=trunc, length=n), env)
                   for k, trunc in (("full", False), ("pte", False), ("pte", True)))
        if i == 0:
            header("Training step (score + GRPO loss + backward): seconds and peak memory (MiB) against "
                   "rollout length", a,
                   [f"weights only (each subprocess just after loading): {f['weights_mib']:.0f} MiB; full: LoRA, score "
                    "checkpointed in chunks of m tokens; pte: its adapter, exact gradients; pte-trunc: --truncate"],
                   ["rollout tokens", "full s", "pte s", "pte-trunc s", "full MiB", "pte MiB", "pte-trunc MiB",
                    "pte / full", "pte-trunc / full", "same, above weights"])
        above = max(f["peak_mib"] - f["weights_mib"], 1)
        row([str(n)] + [f"{r['seconds']:.1f}" for r in (f, p, t)] + [f"{r['peak_mib']:.0f}" for r in (f, p, t)]
            + [f"{p['peak_mib'] / f['peak_mib']:.2f}", f"{t['peak_mib'] / f['peak_mib']:.2f}",
               f"{(p['peak_mib'] - p['weights_mib']) / above:.2f}, {(t['peak_mib'] - t['weights_mib']) / above:.2f}"])
        measured += [(f"training step, {k}, batch {a.batch}", n, r)
                     for k, r in (("full", f), ("pte", p), ("pte-trunc", t))]
    return measured


def grpo_table(a, base):
    rows = {p: spawn(dict(base, impl="ours", kind="grpo", policy=p, length=a.max_new, prompts=a.prompts, group=a.group))
            for p in ("full", "window", "pte", "pte-trunc")}
    header("GRPO steps (generate + random rewards + train.update), the second of two", a,
           [f"{a.prompts} prompts x {a.group} rollouts of up to {a.max_new} tokens, micro-batch {a.batch}; "
            "pte-trunc: --truncate"],
           ["policy", "rollout tok/s", "step s", "peak MiB", "weights MiB"])
    for p, r in rows.items():
        row([p, f"{r['rollout_tokens_per_s']:.1f}", f"{r['seconds']:.1f}", f"{r['peak_mib']:.0f}",
             f"{r['weights_mib']:.0f}"])
    return [(f"GRPO step, {p}, {a.prompts} x {a.group} rows", a.max_new, r) for p, r in rows.items()]


def plan_table(a, measured):
    """train.py's memory plan beside the peaks the tables measured: the whole and the part above the weights."""
    header("Memory plan (`train.py --plan`'s model) against the measured peaks (MiB)", a,
           ["plan: the same settings through train.memory_plan, computed in each subprocess before it loads "
            "(its runtime term: that process's resident memory then; on cuda 0, as the allocator counts)"],
           ["configuration", "tokens", "measured", "plan", "plan / measured", "above the weights: measured",
            "plan", "plan / measured"])
    for label, n, r in measured:
        above, planned_above = r["peak_mib"] - r["weights_mib"], r["plan_mib"] - r["plan_weights_mib"]
        row([label, str(n), f"{r['peak_mib']:.0f}", f"{r['plan_mib']:.0f}", f"{r['plan_mib'] / r['peak_mib']:.2f}",
             f"{above:.0f}", f"{planned_above:.0f}", f"{planned_above / max(above, 1):.2f}"])


# ---------------------------------------------------------------------------------------------------- GPU acceptance
# `python bench.py --gpu`: the parts below in order, each in a subprocess under its own time limit, within
# ACCEPTANCE_SECONDS in all; each writes its log and result into --out, and the table at the end is saved beside them.

ACCEPTANCE_SECONDS = 480
ACCEPTANCE = (  # name, time limit (s), what it checks
    ("toolchain", 45, "torch.compile builds and runs a kernel (inductor; CUDA graphs on cuda)"),
    ("smoke", 120, "4 layers at --gpu-model's shapes, fp32: compiled == eager tokens, graphs compiled over calls of "
                   "other batch sizes, prompts, budgets and without an adapter, host syncs a step, score + backward"),
    ("toy", 90, "train.py --model toy for 2 steps, then --resume for a third"),
    ("rollout", 180, "every layer, --rows rows of math_train's prompt lengths, pte, compiled: the peak against "
                     "train.py's memory plan; decode tokens/s against the bandwidth floor"),
    ("grpo", 120, "two GRPO steps of train.py's (generate, random rewards, update): the second's time and peak"),
)
# prompt tokens of math_train's problems under the Qwen2.5 chat template at quantiles 0, 1/32, ..., 1: the mix the
# rollout part draws from where the data and the tokenizer are not on the machine
MATH_TRAIN_PROMPT_QUANTILES = (51, 59, 62, 65, 68, 70, 72, 74, 76, 78, 80, 82, 84, 86, 88, 90, 93, 95, 98, 101, 104,
                               108, 113, 118, 124, 131, 141, 153, 172, 199, 248, 331, 1698)


def random_model(name, dtype, device, layers=None):
    """A model at the shapes of a registry name or a folder's config.json, with random weights; `layers`: at most
    that many of its layers."""
    import model as M
    from train import plan_model
    cfg, _ = plan_model(name)
    cfg.n_layers = min(layers or cfg.n_layers, cfg.n_layers)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in its dtype: no fp32 copy of a 3B model on the way
    try:
        with torch.device(device):
            torch.manual_seed(0)
            model = M.Transformer(cfg)
            for p in model.parameters():
                torch.nn.init.normal_(p, std=0.02) if p.dim() > 1 else torch.nn.init.ones_(p)
    finally:
        torch.set_default_dtype(default)
    return model.eval().requires_grad_(False)


def prompt_lengths(n, budget, seed=0):
    """n prompt lengths drawn from math_train under the Qwen2.5 template ($PTE_DATA and $PTE_QWEN_TOKENIZER), else
    from MATH_TRAIN_PROMPT_QUANTILES; those that leave the cache fewer than 4 thought slots are left out, as train.py
    sets them aside. Returns (lengths, where they came from)."""
    g = torch.Generator().manual_seed(seed)
    folder = os.environ.get("PTE_QWEN_TOKENIZER")
    try:
        import data
        from tokenizers import Tokenizer
        if not folder:
            raise FileNotFoundError("PTE_QWEN_TOKENIZER is not set")
        tok = Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
        problems = data.load_problems("math_train", os.environ.get("PTE_DATA"))
        _, ids, _ = data.encode_prompts(problems, tok, "qwen2.5", budget)
        pool, where = torch.tensor([len(i) for i in ids]), "math_train, Qwen2.5 template"
    except Exception:  # no tokenizer or no data (tokenizers and torch raise several kinds): the recorded quantiles
        q = torch.tensor(MATH_TRAIN_PROMPT_QUANTILES, dtype=torch.float)
        u = torch.rand(20_000, generator=g) * (len(q) - 1)
        lo = u.long().clamp(max=len(q) - 2)
        pool = (q[lo] + (u - lo) * (q[lo + 1] - q[lo])).round().long()
        pool, where = pool[pool <= budget - 4], "math_train quantiles recorded in bench.py"
    return pool[torch.randint(len(pool), (n,), generator=g)].tolist(), where


def count_syncs(fn, device):
    """(fn's result, host syncs while it ran): cuda's sync debug mode; on the CPU, where nothing syncs, the ops that
    would (a tensor's value read on the host, boolean-mask indexing)."""
    import warnings
    from torch.utils._python_dispatch import TorchDispatchMode
    if device.startswith("cuda"):
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                out = fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
        return out, sum("synchroniz" in str(w.message) for w in caught)
    aten, count = torch.ops.aten, [0]
    syncing = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default}

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            count[0] += func in syncing
            return func(*args, **(kwargs or {}))
    with Count():
        out = fn()
    return out, count[0]


def compile_with(backend):
    """--compile-backend eager (a dry run): torch.compile traces with dynamo and generates no code."""
    if backend != "inductor":
        import functools
        plain = torch.compile
        torch.compile = functools.partial(lambda fn=None, mode=None, **kw: plain(fn, **kw), backend=backend)


def part_toolchain(s):
    fn = torch.compile(lambda x: torch.sin(x) * 2 + 1, dynamic=False,
                       **({"mode": "reduce-overhead"} if s["device"].startswith("cuda") else {}))
    x = torch.randn(256, device=s["device"])
    ok = all(torch.allclose(fn(x), torch.sin(x) * 2 + 1) for _ in range(3))
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    name = torch.cuda.get_device_name() if s["device"].startswith("cuda") else "cpu"
    return dict(ok=ok, summary=f"{name}; torch {torch.__version__}, CUDA {torch.version.cuda}, "
                               f"triton {triton_version}, backend {s['backend']}")


def part_smoke(s):
    """Greedy pte rollouts with B random, eager then compiled; three more compiled calls that must reuse the graph
    (batch 1, other prompts and budget, window without an adapter); score and backward of the compiled rollout."""
    from torch._dynamo.utils import counters
    from encoder import Adapter, AdapterConfig
    from rollout import CachePolicy, Sampling, generate, score
    dev, rows, n = s["device"], s["smoke_rows"], s["smoke_tokens"]
    model = random_model(s["model"], torch.float32, dev, layers=4)
    torch.manual_seed(1)
    adapter = Adapter(model.config, AdapterConfig("pte")).to(dev)
    with torch.no_grad():
        for b in adapter.B.values():
            b.normal_(0, 0.02)  # B != 0: the cores S change the tokens
    lengths = [40 + 3 * i for i in range(rows)]
    prompts = [torch.randint(3, model.config.vocab_size, (k,)).tolist() for k in lengths]
    policy = CachePolicy("pte", max(lengths) + n // 4)  # windows of n/4 to n/4 + 3 (rows - 1): every row evicts
    run = lambda c, p=prompts, pol=policy, ad=adapter: generate(model, p, pol, Sampling(n, eos_ids=[]), ad,  # noqa
                                                                compile=c)
    cuda = dev.startswith("cuda")
    eager = run(False)
    torch._dynamo.reset()
    counters.clear()
    compiled = run(True)
    first = counters["stats"]["unique_graphs"]
    _, syncs = count_syncs(lambda: run(cuda), dev)  # compiled, after its compile; the CPU counts eager's ops
    for p, pol, ad in ((prompts[:1], policy, adapter), (prompts[1:][::-1], CachePolicy("pte", policy.budget + 8),
                                                          adapter), (prompts[:3], CachePolicy("window", 64), None)):
        run(True, p, pol, ad)
    # a recompile is a graph whose guards failed; the call without an adapter compiles a variant of its own
    recompiles = sum(map(len, torch._dynamo.utils.guard_failures.values()))
    logp = score(model, compiled, policy, adapter)  # (B, T)
    (logp * compiled.mask).sum().backward()
    grads = [p.grad for p in adapter.parameters() if p.grad is not None]
    grads_ok = bool(grads) and all(torch.isfinite(g).all() for g in grads) and any(g.abs().max() > 0 for g in grads)
    same = torch.equal(eager.tokens, compiled.tokens)
    gap = (logp.detach() - compiled.logprobs)[compiled.mask].abs().max().item()
    return dict(ok=same and recompiles == 0 and grads_ok, tokens_equal=same, recompiles=recompiles,
                syncs_per_step=syncs / compiled.stats["steps"], score_gap=gap, grads_ok=grads_ok,
                summary=f"tokens {'equal' if same else 'DIFFER'}; {first} graph(s), {recompiles} recompile(s) over 3 "
                        f"more calls; {syncs / compiled.stats['steps']:.2f} host syncs a step"
                        f"{'' if cuda else ' (cpu: eager, the ops that would sync)'}; score - generate "
                        f"{gap:.1e}; gradients {'finite' if grads_ok else 'BROKEN'}")


def part_toy(s):
    """train.main twice in this process: 2 steps, then --resume to a third (the stop and resume of a real run)."""
    import train
    run_dir = os.path.join(s["out"], "toy-run")
    shutil.rmtree(run_dir, ignore_errors=True)
    flags = ["--model", "toy", "--device", s["device"], "--save-every", "1", "--eval-size", str(s["toy_eval"])]
    flags += ["--prompts-per-step", str(s["toy_prompts"])] if s["toy_prompts"] else []
    train.main([*flags, "--steps", "2", "--out", run_dir])
    train.main([*flags, "--steps", "3", "--resume", run_dir])
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        steps = [json.loads(line)["step"] for line in f if "reward" in line]
    return dict(ok=steps == [1, 2, 3], steps=steps, summary=f"steps logged {steps}")


def part_rollout(s):
    """Warm-up (compiles), a prefill alone (max_new 1), then the timed call: decode tokens/s from their difference."""
    from encoder import Adapter, AdapterConfig
    from rollout import CachePolicy, Sampling, generate
    from train import MemorySettings, memory_plan, peak_memory_gb, plan_peaks, reset_peak_memory, _status_kib
    dev, rows, n, budget = s["device"], s["rows"], s["tokens"], s["budget"]
    cuda, dtype = dev.startswith("cuda"), torch.bfloat16 if dev.startswith("cuda") else torch.float32
    runtime = 0 if cuda else _status_kib("VmRSS")[0] * 1024  # cuda: what the allocator counts
    model = random_model(s["model"], dtype, dev)
    adapter = Adapter(model.config, AdapterConfig("pte")).to(dev)
    group = min(8, rows)
    lengths, where = prompt_lengths(rows // group, budget)
    lengths = [k for k in lengths for _ in range(group)]
    prompts = [torch.randint(3, model.config.vocab_size, (k,)).tolist() for k in lengths]
    kw = dict(compile=True, prefill_rows=s["prefill_rows"])
    policy, g = CachePolicy("pte", budget), torch.Generator(dev).manual_seed(0)
    weights = torch.cuda.memory_allocated() if cuda else 0
    reset_peak_memory(torch.device(dev))
    sampled = lambda n: Sampling(n, 1.0, eos_ids=[])  # noqa: E731
    warm = generate(model, prompts, policy, sampled(4), adapter, g, **kw)
    prefill_s = timed(lambda: generate(model, prompts, policy, sampled(1), adapter, g, **kw), dev)[1]
    out, seconds = timed(lambda: generate(model, prompts, policy, sampled(n), adapter, g, **kw), dev)
    peak = peak_memory_gb(torch.device(dev)) * 2**30
    cfg, e = model.config, dtype.itemsize
    settings = MemorySettings(
        policy="pte", cache=budget, max_new=n, longest_prompt=max(lengths), shortest_prompt=min(lengths), rows=rows,
        rollout_rows=rows, prefill_rows=s["prefill_rows"], adapter=AdapterConfig("pte"),
        optimizer=False, device="cuda" if cuda else "cpu", dtype_bytes=e, packed=not cuda and e == 4, runtime=runtime)
    plan = plan_peaks(memory_plan(cfg, settings))["rollout"]
    decode = rows * (out.stats["steps"] - 1) / max(seconds - prefill_s, 1e-9)
    weight_bytes = sum(p.numel() for p in model.parameters()) * e
    kv_bytes = rows * budget * 2 * cfg.n_layers * cfg.kv_dim * e  # the compiled step attends every slot
    floor = rows * copy_bandwidth(s["threads"], dev, s["bandwidth_mib"]) / (weight_bytes + kv_bytes)
    ratio = peak / plan  # checked on cuda; the CPU's resident peak holds the compiler's own memory too
    return dict(ok=abs(ratio - 1) <= 0.25 or not cuda, peak_gib=peak / 2**30, plan_gib=plan / 2**30,
                weights_gib=weights / 2**30, decode_tokens_per_s=decode, floor_tokens_per_s=floor,
                compile_s=warm.stats["first_step_s"], prompts=where, prefill_rows=s["prefill_rows"],
                summary=f"{rows} rows, prompts {min(lengths)}-{max(lengths)} tokens ({where}), prefill "
                        f"in chunks of {s['prefill_rows']} rows"
                        f": peak {peak / 2**30:.2f} GiB, plan {plan / 2**30:.2f} GiB ({ratio:.2f}x); decode "
                        f"{decode:.0f} tok/s, {100 * decode / floor:.0f}% of the floor ({floor:.0f})")


def part_grpo(s):
    model = random_model(s["model"], torch.bfloat16 if s["device"].startswith("cuda") else torch.float32, s["device"])
    from train import peak_memory_gb
    r = grpo_steps(dict(s, policy="pte", budget=s["budget"], length=s["grpo_tokens"], batch=s["grpo_micro_batch"],
                        prompts=s["grpo_prompts"], group=s["grpo_group"]), model)
    peak = peak_memory_gb(torch.device(s["device"]))
    return dict(ok=True, step_s=r["seconds"], rollout_tokens_per_s=r["rollout_tokens_per_s"], peak_gib=peak,
                summary=f"{s['grpo_prompts']} x {s['grpo_group']} rollouts of up to {s['grpo_tokens']} tokens, pte: "
                        f"second step {r['seconds']:.1f} s, rollout {r['rollout_tokens_per_s']:.0f} tok/s, "
                        f"peak {peak:.2f} GiB")


PARTS = dict(toolchain=part_toolchain, smoke=part_smoke, toy=part_toy, rollout=part_rollout, grpo=part_grpo)


def run_part(name, s, limit):
    """One part in a subprocess under `limit` seconds: (status, seconds, its result); its output goes to NAME.log."""
    t0 = time.perf_counter()
    cmd = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(dict(s, part=name))]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=limit)
        log, code = done.stdout + done.stderr, done.returncode
    except subprocess.TimeoutExpired as e:
        log, code = f"{e.stdout or ''}{e.stderr or ''}\n(killed after {limit:.0f} s)", None
    log = log.decode() if isinstance(log, bytes) else log
    with open(os.path.join(s["out"], f"{name}.log"), "w") as f:
        f.write(log)
    seconds = time.perf_counter() - t0
    if code is None:
        return "timeout", seconds, dict(summary=f"over its {limit:.0f} s")
    if code:
        return "error", seconds, dict(summary=log.strip().splitlines()[-1][:200] if log.strip() else f"exit {code}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return ("pass" if result["ok"] else "FAIL"), seconds, result


def acceptance(a):
    """The parts in order within ACCEPTANCE_SECONDS; the table printed and saved (acceptance.md, acceptance.json)."""
    out = os.path.abspath(a.out or os.path.join("runs", f"acceptance-{time.strftime('%Y%m%d-%H%M%S')}"))
    os.makedirs(out, exist_ok=True)
    quick = a.quick
    s = dict(device=a.device, model=a.gpu_model, out=out, backend=a.compile_backend, threads=a.threads,
             budget=a.budget or 1024, rows=a.rows or (8 if quick else 512), tokens=16 if quick else 128,
             prefill_rows=32, smoke_rows=3 if quick else 8, smoke_tokens=16 if quick else 48,
             toy_prompts=4 if quick else None, toy_eval=0 if quick else 64,
             grpo_prompts=a.prompts or (2 if quick else 4),
             grpo_group=a.group or (2 if quick else 8), grpo_tokens=a.max_new or (8 if quick else 512),
             grpo_micro_batch=a.batch or (2 if quick else 8), prompt_len=16 if quick else 128,
             bandwidth_mib=16 if quick else 256)
    deadline, results = time.perf_counter() + ACCEPTANCE_SECONDS, []
    print(f"acceptance of {a.gpu_model} on {a.device} into {out} (at most {ACCEPTANCE_SECONDS} s)", flush=True)
    for i, (name, limit, what) in enumerate(ACCEPTANCE, 1):
        left = deadline - time.perf_counter()
        status, seconds, result = ("skipped", 0.0, dict(summary="no time left")) if left < 20 else \
            run_part(name, s, min(limit, left))
        results.append(dict(part=name, what=what, limit=limit, status=status, seconds=seconds, **result))
        print(f"{i}. {name}: {status} in {seconds:.0f} s: {result['summary']}", flush=True)
    lines = [f"## GPU acceptance: {a.gpu_model} on {a.device}, {time.strftime('%Y-%m-%d %H:%M')}",
             f"command: python bench.py {' '.join(map(shlex.quote, sys.argv[1:]))}", "",
             "| # | part | status | s (limit) | result |", "|---|---|---|---|---|"]
    lines += [f"| {i} | {r['part']} | {r['status']} | {r['seconds']:.0f} ({r['limit']}) | {r['summary']} |"
              for i, r in enumerate(results, 1)]
    print("\n" + "\n".join(lines))
    with open(os.path.join(out, "acceptance.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(out, "acceptance.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(f"\nsaved in {out}")
    return 0 if all(r["status"] in ("pass", "skipped") for r in results) else 1


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small lengths, budget and batch: about a minute")
    ap.add_argument("--gpu", action="store_true", help="the GPU acceptance (ACCEPTANCE, at most 8 minutes on one "
                    "H100) of --gpu-model with random weights on --device; with --tables, those tables at its shapes")
    ap.add_argument("--gpu-model", default="qwen2.5-3b",
                    help="registry name or model folder for --gpu (toy or smollm2-135m for a CPU dry run)")
    ap.add_argument("--out", help="--gpu: the folder of the parts' logs and results (default runs/acceptance-<time>)")
    ap.add_argument("--rows", type=int, default=None, help="--gpu: rows of the rollout part (default 512, --quick 8)")
    ap.add_argument("--compile-backend", default="inductor", choices=["inductor", "aot_eager", "eager"],
                    help="--gpu: torch.compile's backend (eager: a dry run that traces and generates no code)")
    ap.add_argument("--device", default=None, help="default: cuda with --gpu, else cpu")
    ap.add_argument("--tables", default=None, help="which of 1 (rollout), 2 (training step) and 3 (GRPO steps) to run "
                    "(default 1,2; --gpu 1,2,3)")
    ap.add_argument("--prompts", type=int, default=None, help="table 3: prompts a step (default 4; --quick 2)")
    ap.add_argument("--group", type=int, default=None, help="table 3: rollouts a prompt (default 8; --quick 2)")
    ap.add_argument("--max-new", type=int, default=None, help="table 3: rollout token limit (default 2048; --quick 64)")
    ap.add_argument("--policies", default="full,full-compiled,window,lora_c,pte,pte-compiled",
                    help="table 1's policies (transformers runs beside full; lora_c: window with pte's adapter at "
                    "S = I, the paper's LoRA_c; full-plain: full through F.linear, to measure "
                    "model.packed_weights; -compiled: through the compiled decode step)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads in every subprocess")
    ap.add_argument("--repeats", type=int, default=1, help="table 1: runs of each configuration, interleaved; the "
                    "fastest counts (by CPU time on the CPU, which other jobs on a shared machine inflate least)")
    ap.add_argument("--batch", type=int, default=None, help="default 8 (--quick: 4; --gpu: 8, and 64 in table 1; "
                    "--gpu --quick: 2)")
    ap.add_argument("--budget", type=int, default=None, help="cache budget, prompt included (default 1024, --quick 48)")
    ap.add_argument("--prompt-len", type=int, default=None, help="default 128 (--quick 16)")
    ap.add_argument("--lengths", default=None,
                    help="comma-separated lengths (default 256,...,4096; --gpu 3072; --quick 32,64)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(json.loads(a.child))))
        return
    a.device = a.device or ("cuda" if a.gpu else "cpu")
    if a.gpu and a.tables is None:
        sys.exit(acceptance(a))
    a.policies = [p for p in a.policies.split(",") if p]
    if not a.policies or set(a.policies) - set(POLICIES):
        ap.error(f"--policies {','.join(a.policies)}: choose from {','.join(POLICIES)}")
    batches = [8, 64] if a.gpu and not (a.quick or a.batch) else None  # table 1's
    a.batch = a.batch or (2 if a.quick and a.gpu else 4 if a.quick else 8)
    a.tables = a.tables or ("1,2,3" if a.gpu else "1,2")
    a.prompts, a.group = a.prompts or (2 if a.quick else 4), a.group or (2 if a.quick else 8)
    a.max_new = a.max_new or (64 if a.quick else 2048)
    a.budget = a.budget or (48 if a.quick else 1024)
    a.prompt_len = a.prompt_len or (16 if a.quick else 128)
    a.lengths = [int(x) for x in
                 (a.lengths or ("32,64" if a.quick else "3072" if a.gpu else "256,512,1024,2048,4096")).split(",")]
    if a.gpu:
        a.model_name, a.dtype, path = a.gpu_model, "bfloat16" if a.device.startswith("cuda") else "float32", a.gpu_model
    else:
        a.model_name, a.dtype = "SmolLM2-135M-Instruct", "float32"
        path = os.environ.get("PTE_SMOLLM2") or "smollm2-135m"  # a folder, else the registry name (Hugging Face cache)
        try:
            path = str(resolve(path))
        except (ValueError, FileNotFoundError) as e:
            ap.error(f"the CPU tables run the real SmolLM2-135M-Instruct: set PTE_SMOLLM2 to its folder ({e})")
    base = dict(model=path, random=a.gpu, dtype=a.dtype, device=a.device, threads=a.threads, batch=a.batch,
                budget=a.budget, prompt_len=a.prompt_len)
    peer = not a.gpu
    try:
        import transformers  # noqa: F401  (a test-only dependency)
    except ImportError:
        print("transformers is not installed: the peer columns are left out", file=sys.stderr)
        peer = False
    t0, measured = time.perf_counter(), []
    for batch in (batches or [a.batch]) if "1" in a.tables else []:
        measured += rollout_table(argparse.Namespace(**dict(vars(a), batch=batch)), dict(base, batch=batch), peer)
    if "2" in a.tables:
        measured += train_table(a, base)
    if "3" in a.tables:
        measured += grpo_table(a, base)
    plan_table(a, measured)
    if a.gpu:
        cfg = model_config(a.gpu_model)
        print(f"\nmasked attention (score, prefill) ran SDPA's "
              f"{sdpa_backend(a.device, torch.bfloat16, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim)} kernel "
              f"on {a.device}")
    print(f"\n(bench wall time {time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
