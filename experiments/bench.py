"""Speed and memory of the cache policies (SPEC sections 2-4), printed as tables with the command that made them.

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
  `--gpu`: tables 1 to 3 (no peer) at the real shapes of `--gpu-model` (qwen2.5-3b) with random bf16 weights
     on cuda: rollouts of 3,072 tokens at budget 1,024, batch 8 and 64 (table 1; -compiled: CUDA graphs), one
     training step at that length, and two GRPO steps of 4 prompts x 8 rollouts of up to 2,048 tokens; it prints
     which SDPA kernel the masked attention ran.

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

  python experiments/bench.py --quick                                    # about a minute: small lengths and batch
  python experiments/bench.py                                            # tables 1 and 2: SmolLM2-135M, fp32, CPU (long)
  python experiments/bench.py --gpu                                      # table 3 on cuda
  python experiments/bench.py --gpu --device cpu --gpu-model smollm2-135m --quick   # dry run of --gpu on the CPU (fp32)
"""
import argparse
import json
import os
import shlex
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
    from rollout import CachePolicy, generate
    name, _, variant = s["policy"].partition("-")
    policy, compile = CachePolicy("window" if name == "lora_c" else name, s["budget"]), variant == "compiled"
    adapter = (Adapter(model.config, AdapterConfig("pte" if name == "pte" else "lora")).to(s["device"])
               if name in ("pte", "lora_c") else None)
    batch = prompts(s, model.config.vocab_size).tolist()
    warm = generate(model, batch, policy, 4, adapter, eos_ids=[], compile=compile)
    torch._dynamo.config.error_on_recompile = True  # the timed call reuses the warm-up's graph, whatever its length
    cpu = time.process_time()
    out, seconds = timed(lambda: generate(model, batch, policy, s["length"], adapter, eos_ids=[], compile=compile),
                         s["device"])
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
    from rollout import CachePolicy, generate
    policy, dev = s["policy"].removesuffix("-trunc"), s["device"]
    args = argparse.Namespace(**{**train.PAPER_DEFAULTS, "objective": "grpo", "epochs": 1, "top_p": 1.0,
                                 "no_std": False, "truncate": s["policy"].endswith("-trunc"), "checkpoint": True,
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
        ro = generate(model, rows, cache_policy, args.max_new, adapter, args.temperature, generator=g)
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


def child(s):
    """Run one configuration in this fresh process: its numbers, and its memory in MiB just after loading and at
    peak."""
    import model
    from train import peak_memory_gb, reset_peak_memory
    torch.set_num_threads(s["threads"])
    model.ONEDNN = model.ONEDNN and not s.get("policy", "").endswith("-plain")  # packed_weights becomes a no-op
    cuda = s["device"].startswith("cuda")
    if s["impl"] == "transformers":
        loaded = load_hf(s)
    else:
        loaded = model.load(s["model"], dtype=getattr(torch, s["dtype"]), device=s["device"],
                            random_weights=s["random"])
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
    mib = []
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
    yardstick = a.lengths.index(512) if 512 in a.lengths[:-1] else 0  # the issue's: 4,096 tokens against 512
    evicting = [i for i, n in enumerate(a.lengths[:-1])
                if n > a.budget - a.prompt_len]  # the window has evicted by then
    for ref in dict.fromkeys([yardstick, *evicting[:1]]) if len(mib) > 1 else []:
        print(f"\npeak memory at {a.lengths[-1]} new tokens against {a.lengths[ref]}: "
              + ", ".join(f"{k} {100 * (mib[-1][k] / mib[ref][k] - 1):+.1f}%" for k in mib[0]))


def train_table(a, base):
    env = None if a.device.startswith("cuda") else FIXED_MMAP
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


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small lengths, budget and batch: about a minute")
    ap.add_argument("--gpu", action="store_true", help="table 3: --gpu-model with random bf16 weights on --device")
    ap.add_argument("--gpu-model", default="qwen2.5-3b",
                    help="registry name for --gpu (smollm2-135m for a CPU dry run)")
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
    t0 = time.perf_counter()
    for batch in (batches or [a.batch]) if "1" in a.tables else []:
        rollout_table(argparse.Namespace(**dict(vars(a), batch=batch)), dict(base, batch=batch), peer)
    if "2" in a.tables:
        train_table(a, base)
    if "3" in a.tables:
        grpo_table(a, base)
    if a.gpu:
        cfg = model_config(a.gpu_model)
        print(f"\nmasked attention (score, prefill) ran SDPA's "
              f"{sdpa_backend(a.device, torch.bfloat16, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim)} kernel "
              f"on {a.device}")
    print(f"\n(bench wall time {time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
