"""Train a small model for anytime reasoning with BRPO (AnytimeReasoner), on one GPU.

    python train_small.py                                  # Qwen2.5-0.5B-Instruct, GSM8K, preset ar-uniform
    python train_small.py --preset grpo --out-dir out-grpo # the final-answer GRPO baseline
    python train_small.py --model Qwen/Qwen3-0.6B          # native thinking, </think> is one token
    python train_small.py --data-dir path/to/gsm8k         # local train.jsonl and test.jsonl (else downloaded once)
    python train_small.py --resume out/ckpt                # continue exactly where a run stopped
    python train_small.py --eval-only --model Qwen/Qwen3-0.6B  # the anytime curve of a model, no training
    python train_small.py --demo                           # CPU, offline, minutes: see the effect
    torchrun --standalone --nproc_per_node 8 train_small.py  # one run on 8 GPUs (docs/multi-gpu.md)
    python train_small.py --help                           # every flag, its unit, default and demo value

The algorithm lives in anytime_reasoner.py. This file reads top to bottom: the flags (Args), the
training loop (rl_step: one step; train: the loop), the entry points (main, --eval-only), the demo
(its task, tiny model and two runs), then the plumbing, apart from the loop: flag checks, GSM8K data,
evaluation and figures, checkpoints and logs, and torchrun (in one process every distributed helper
does nothing). Nothing here imports experiments/, which builds on this file.
"""
from __future__ import annotations

import argparse
import atexit
import contextlib
import copy
import datetime
import functools
import importlib.util
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import torch
import torch.distributed as dist

import anytime_reasoner as ar

try:  # optional extras
    from tqdm.auto import tqdm
except ImportError:  # pragma: no cover
    tqdm = None


# ----------------------------------------------------------------------------
# Hyperparameters: one dataclass is the flags, their defaults and help, and args.json
# ----------------------------------------------------------------------------


def arg(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class Args:
    # what to train
    model: str = arg("Qwen/Qwen2.5-0.5B-Instruct", "Hugging Face hub name (NAME or ORG/NAME) or local model "
                     "folder; a folder when it exists or cannot be a hub name (starts with /, . or ~, has two /)")
    preset: str = arg("ar-uniform", "a run of the paper (docs/training.md, 'Presets'): " + ", ".join(ar.PRESETS))
    budgets: list[int] | None = arg(None, "thinking budgets in tokens, comma-separated and increasing, e.g. "
                                    "128,256,384,512 [default: the preset's S, evenly spaced up to --max-think]. "
                                    "BRPO weighs V1 by s/S, the paper by b_{s-1}/b_{S-1}: the same only when evenly "
                                    "spaced")
    prior: str | None = arg(None, "weights of the budgets in the objective: uniform, linear or base "
                            "[default: the preset's]")
    num_summaries: int | None = arg(None, "A, summaries sampled per (trace, budget) [default: the preset's]")
    thinking_method: str | None = arg(None, "baseline of the thinking: brpo, grpo (V2), v1 or none "
                                      "[default: the preset's]")
    summary_method: str | None = arg(None, "advantage of the summaries: brpo (decoupled, every budget) or grpo "
                                     "(last budget only) [default: the preset's]")
    # rollout (Qwen2.5-0.5B-Instruct solves GSM8K in ~100-300 tokens: 512 cover nearly every trace)
    max_think: int = arg(512, "thinking tokens per trace at most, = the last budget")
    questions_per_step: int = arg(16, "B, training questions per step (the paper: 64 on 8 GPUs)")
    traces: int = arg(8, "G, thinking traces sampled per question (the paper: 8)")
    summary_max_tokens: int = arg(64, "tokens per summary at most; summaries run to EOS. A recap sentence + "
                                  "\\boxed{} + EOS takes <= 60 Qwen2.5 tokens for 99 in 100 GSM8K answers "
                                  "(docs/performance.md; the authors: 118)")
    temperature: float = arg(1.0, "sampling temperature of the training rollouts, > 0 (the paper: 1.0)")
    stop_at_box: bool = arg(False, "stop each summary once its \\boxed{} closes (faster; the authors run them to EOS)")
    # optimisation
    steps: int = arg(200, "RL steps in all; a resumed run keeps its own unless given")
    lr: float = arg(1e-6, "AdamW learning rate, constant (the paper: 1e-6)")
    weight_decay: float = arg(0.01, "AdamW weight decay (the authors: 0.01)")
    updates_per_rollout: int = arg(2, "PPO mini-batches (optimiser updates) per rollout, against old "
                                   "log-probs computed once before them (the authors: 2)")
    clip_eps: float = arg(0.2, "PPO clip range: the ratio is clipped to [1 - eps, 1 + eps]")
    kl_coef: float = arg(0.0, "weight of a KL penalty to the starting model; 0: no reference model is loaded")
    warmup_steps: int = arg(0, "demo only: supervised warm-up steps (batches of 32) before RL")
    seed: int = arg(0, "random seed of the data order, the sampling and the demo's model")
    # evaluation
    eval_temperature: float = arg(0.6, "sampling temperature of the evaluations; 0 = greedy (the paper: 0.6)")
    eval_size: int = arg(200, "held-out questions per evaluation (GSM8K: the first N of the test set)")
    eval_every: int = arg(25, "evaluate every N steps, and after the last")
    eval_grid: int = arg(64, "evaluate at every N thinking tokens up to --max-think")
    # memory and speed only: no effect on the result
    micro_batch: int = arg(4, "traces per forward/backward pass (packed rows)")
    think_batch: int = arg(128, "sequences per generate() call for thinking")
    summary_batch: int = arg(512, "sequences per generate() call for summaries")
    chunk_size: int = arg(1024, "positions per chunk of the output layer in the loss")
    fsdp: bool = arg(False, "under torchrun: shard the fp32 weights, gradients and AdamW state over the processes "
                     "(FSDP2), gathered whole for each rollout and update")
    # the run
    out_dir: str = arg("out", "folder for metrics, evaluations, the figure and the checkpoint (--eval-only: out-eval)")
    save_every: int = arg(25, "save a checkpoint every N steps, after the last, and on Ctrl-C")
    tensorboard: bool = arg(False, "also log each step's metrics and each evaluation for TensorBoard, into "
                            "--out-dir/tensorboard (pip install tensorboard; view: tensorboard --logdir OUT_DIR)")
    overwrite: bool = arg(False, "start afresh in an --out-dir that holds a run, replace a finished demo, "
                          "or with --eval-only replace an earlier evaluation")
    resume: str | None = arg(None, "checkpoint folder to continue exactly from, e.g. out/ckpt")
    eval_only: bool = arg(False, "no training: evaluate --model, or the --resume checkpoint, as training "
                          "does (same grid and settings) and write eval.jsonl, the figure and the table")
    data_dir: str | None = arg(None, "folder with GSM8K's train.jsonl and test.jsonl [default: downloaded once "
                               "into ~/.cache/anytime_reasoner/gsm8k]")
    device: str = arg("auto", "cpu, cuda, cuda:1 or mps; auto: a GPU if there is one")
    threads: int = arg(0, "demo only: CPU threads of torch; 1 and 2 give the same result, 3 or more another. "
                       "0: 2 on a quiet machine, 1 on a busy one (where 2 threads wait for each other)")
    demo: bool = arg(False, "offline CPU demo, minutes (the README gives its time): a tiny model built in code learns a "
                     "synthetic task, then AnytimeReasoner and GRPO train it from the same start")


# The demo's own values (--help shows them): a tiny model, a synthetic task where thinking helps.
DEMO = dict(model="(built in code)", max_think=24, summary_max_tokens=6, lr=3e-4,
            weight_decay=0.0, updates_per_rollout=1, warmup_steps=800, eval_every=10, eval_grid=3,
            steps=40, save_every=20, micro_batch=64, summary_batch=1024, chunk_size=4096,
            out_dir="out-demo")


# ----------------------------------------------------------------------------
# The training loop: rl_step (one step) and train (the loop)
# ----------------------------------------------------------------------------

def rl_step(model, tokenizer, optimizer, prompts, truths, args: Args, prior, device,
            ref_model=None) -> dict:
    """One AnytimeReasoner/BRPO step: rollout, scores, advantages, then PPO updates. The N = B*G traces
    make `updates_per_rollout` mini-batches, one optimiser update each (the authors: 512 traces, 256
    per update), all against old log-probs computed once before the first: from the second update on
    the ratio differs from 1 and the clip acts. Under torchrun each process rolls out and trains its
    share of the questions; the update is the whole step's."""
    B, G, S, A = len(prompts), args.traces, len(args.budgets), args.num_summaries
    mine = list(range(RANK, B, WORLD))  # distributed: this process's questions; one process: all
    t0 = time.time()
    # 1. rollout: G traces per question, cut at every budget, A summaries after each cut
    model.eval()
    with progress_bar(B * G * (1 + S * A), "rollout") as update, autocast(device), whole_weights(model):
        ro = ar.rollout(model, tokenizer, [prompts[b] for b in mine], args.budgets, G, A, args.temperature,
                        args.summary_max_tokens, args.think_batch, args.summary_batch,
                        stop_at_box=args.stop_at_box, progress=update)
    t_score = time.time()
    # 2. scores and both advantages; row i*G + g of thinking_adv / summary_adv is trace (mine[i], g)
    scores = ar.score_rollout(ro, [truths[b] for b in mine])                       # B,G,S,A
    thinking_adv, summary_adv = ar.rollout_advantages(ro, scores, prior, args.thinking_method,
                                                      args.summary_method)          # N,S  N,S,A
    t_update = time.time()
    # 3. mini-batches of the whole step's traces; this process's traces of each, in micro-batches
    traces = [(b, g) for b in range(B) for g in range(G)]
    U = min(args.updates_per_rollout, len(traces))
    minibatches = [traces[u * len(traces) // U:(u + 1) * len(traces) // U] for u in range(U)]
    micro = [my_traces(mb, args.micro_batch, RANK, WORLD) for mb in minibatches]
    packed = {m: ar.pack_rollout(ro, tokenizer, list(m)) for mbs in micro for m in mbs}
    rows = {m: torch.tensor([i * G + g for i, g in m]) for m in packed}
    mask_dtype = torch.bfloat16 if device.type == "cuda" else None  # match autocast's dtype
    # 4. old (and reference) log-probs, once per rollout, before any update
    old, ref = {}, {}
    with torch.no_grad(), autocast(device), whole_weights(model):
        for m in packed:
            if U > 1:  # with one update the loss is on-policy: old = current, no extra forward
                old[m] = ar.packed_logprobs(model, packed[m], args.chunk_size, mask_dtype, args.temperature)
            if ref_model is not None:  # only when --kl-coef > 0
                ref[m] = ar.packed_logprobs(ref_model, packed[m], args.chunk_size, mask_dtype, args.temperature)

    def loss_of(m, normaliser):  # ar.anytime_loss: decoupled advantages, PPO-clip, one packed forward
        with autocast(device):
            return ar.anytime_loss(model, packed[m], thinking_adv[rows[m]], summary_adv[rows[m]], normaliser,
                                   old.get(m), ref.get(m), args.clip_eps, args.kl_coef, args.temperature,
                                   args.chunk_size, mask_dtype)
    # 5. the updates: one optimiser step per mini-batch
    model.train()
    stats, grad_norms = {"clipfrac": 0.0, "approx_kl": 0.0, "tokens": 0}, []
    for mbs, mb in zip(micro, minibatches):
        optimizer.zero_grad(set_to_none=True)
        normaliser = len(mb) * args.budgets[-1]  # a constant: traces in this update (all processes) x largest budget
        with whole_weights(model):
            for m in mbs:
                loss, st = loss_of(m, normaliser)
                loss.backward()
                for k in ("clipfrac", "approx_kl"):
                    stats[k] += st[k] * st["tokens"]
                stats["tokens"] += st["tokens"]
            for _ in range(fsdp_idle_passes(model, mb, args.micro_batch)):  # distributed --fsdp only
                (loss_of(next(iter(packed)), normaliser)[0] * 0).backward()
        sum_gradients(model)  # distributed: the gradient of the whole update on every process
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        grad_norms.append(float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm))  # --fsdp: a DTensor
        optimizer.step()
    seconds = {"s_think": ro.seconds["think"], "s_summary": ro.seconds["summary"], "s_score": t_update - t_score,
               "s_update": time.time() - t_update, "s_per_step": time.time() - t0}  # float() waited for the device
    return step_metrics(ro, scores, mine, B, prior, args.budgets, stats, grad_norms, seconds)


def train(args: Args, model, tokenizer, train_set, eval_set, make_prompt, device, tag="", optimizer=None,
          start_step=0, data_pos=0, stop_hint=None) -> tuple[dict | None, dict | None]:
    """The RL loop: evaluate, then rl_step x steps, evaluating and checkpointing every N steps, stopping
    cleanly on Ctrl-C (stop_hint: what to say then). Returns the first and the last evaluation."""
    metrics_path, eval_path, ckpt_path = (os.path.join(args.out_dir, f"{name}{tag}{ext}")
                                          for name, ext in (("metrics", ".jsonl"), ("eval", ".jsonl"), ("ckpt", "")))
    start_logs((metrics_path, eval_path), start_step)
    prior = ar.budget_prior(args.prior, args.budgets)
    grid, eval_prompts = eval_grid(args), [make_prompt(x["question"]) for x in eval_set]
    optimizer = optimizer or torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    board = tensorboard_writer(args, start_step)  # --tensorboard only
    # the figure, redrawn at every evaluation (the demo draws its own at its end)
    figure = None if args.demo else os.path.join(args.out_dir, "anytime_accuracy.png")
    title = figure_title(args.model, args.preset, len(eval_set), args.eval_temperature)
    # --kl-coef > 0: a frozen copy of the starting weights; never made when KL is off
    ref_model = copy.deepcopy(model).eval().requires_grad_(False) if args.kl_coef > 0 else None
    order = np.random.default_rng(args.seed).permutation(len(train_set))  # a fixed data order: resumable

    def run_eval(step):
        r = evaluate_model(model, tokenizer, eval_prompts, [x["answer"] for x in eval_set], args, grid)
        append_jsonl(eval_path, {"step": step, **r})
        print(format_table({f"step {step}": r}))
        if board:
            board_scalars(board, step, {"anytime_score": r["anytime_score"], "think_len": r["mean_think_len"],
                                        "accuracy": r["accuracy"]}, r["budgets"], "eval/")
        if figure and RANK == 0:  # the curve so far against the one before training
            plot_curves({**({"before": first} if step and first else {}), f"step {step}": r}, figure, title)
        return r
    # a resumed run's "before" is the step-0 evaluation its first run logged (None if not there)
    first = run_eval(0) if start_step == 0 else logged_eval(eval_path, 0) if RANK == 0 else None
    result = first if start_step == 0 else None
    step = saved = start_step
    with CtrlC(None if args.demo else ckpt_path, start_step) as ctrl_c:
        while step < args.steps and not any_rank(ctrl_c.pressed):  # distributed: all stop after the same step
            idx = [int(order[(data_pos + i) % len(order)]) for i in range(args.questions_per_step)]
            data_pos += args.questions_per_step
            if WORLD > 1:  # distributed: each process samples from its own stream, set by (seed, step, rank)
                torch.manual_seed(rank_seed(args.seed, step, RANK))
            m = rl_step(model, tokenizer, optimizer, [make_prompt(train_set[i]["question"]) for i in idx],
                        [train_set[i]["answer"] for i in idx], args, prior, device, ref_model)
            step += 1
            append_jsonl(metrics_path, {"step": step, **m, "questions": idx})  # indices into train_set
            if board:
                board_scalars(board, step, {k: m[k] for k in ("reward", "acc", "think_len", "clipfrac", "approx_kl",
                                                              "grad_norm", "gen_tok_s", "s_per_step")}, args.budgets)
            print(f"{tag.strip('-') or 'step'} {step:4d} | reward {m['reward']:.3f} | acc/budget "
                  + " ".join(f"{a:.2f}" for a in m["acc"]) + f" | think {m['think_len']:.0f} tok | clip "
                  f"{m['clipfrac']:.3f} | kl {m['approx_kl']:.1e} | {m['gen_tok_s']:.0f} gen tok/s | "
                  f"{m['s_per_step']:.1f} s/step", flush=True)
            if step % args.eval_every == 0 or step == args.steps:
                result = run_eval(step)
            stopped = any_rank(ctrl_c.pressed)
            if step % args.save_every == 0 or step == args.steps or (stopped and not args.demo):
                save_checkpoint(ckpt_path, model, tokenizer, optimizer, step, data_pos, args)
                ctrl_c.saved = saved = step
        stopped = any_rank(ctrl_c.pressed)
        if stopped and saved != step and not args.demo:  # Ctrl-C came after the step's save check
            save_checkpoint(ckpt_path, model, tokenizer, optimizer, step, data_pos, args)
    if board:
        board.close()
    if stopped:
        launch = "python" if WORLD == 1 else "torchrun --nproc_per_node N"  # any N
        print(f"stopped at step {step}; " + (stop_hint or f"continue with: {launch} train_small.py --resume {ckpt_path}"))
        leave_together()
        sys.exit(130)
    return (first, result) if RANK == 0 else (None, None)  # distributed: rank 0 draws the figure


# ----------------------------------------------------------------------------
# Entry points: training on GSM8K (the demo: next section), --eval-only
# ----------------------------------------------------------------------------

def main(argv=None):
    args = parse_args(argv)
    check_out_dir(args)
    check_distributed(args)                               # distributed: torchrun's own checks
    device = init_distributed(pick_device(args.device))   # distributed: one GPU (or CPU) per process
    if args.demo:  # the synthetic task and its two runs, on this file's loop (section "The demo")
        return main_demo(args, device)
    if args.resume and not args.eval_only:  # the logs and the step, before anything heavy loads
        start_step = checkpoint_step(args.resume)
        if start_step >= args.steps:
            print(f"nothing to do: the checkpoint is at step {start_step}; pass --steps N with N > {start_step}")
            return
        start_logs([os.path.join(args.out_dir, name) for name in ("metrics.jsonl", "eval.jsonl")], start_step)
    offline = check_hub_model(args.resume or args.model)
    if args.eval_only:
        return main_eval_only(args, device, offline)
    with machine_rank_zero_first():                       # distributed: one download per machine
        train_set, eval_set = load_gsm8k("train", args.data_dir), load_gsm8k("test", args.data_dir)[:args.eval_size]
    seed_everything(args.seed)
    model, tokenizer = load_model(args.resume or args.model, torch.device("cpu") if args.fsdp else device, offline)
    # recompute activations in backward: memory for speed (transformers 5 renamed the method)
    (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    model.config.use_cache = True  # generate() still uses the KV cache in eval mode
    print(f"{args.model}: {millions(model)} parameters on {device}; preset {args.preset}, budgets {args.budgets}, "
          f"prior {args.prior}")
    if args.fsdp:
        shard_model(model, device)                        # distributed: 1/N of the weights on each GPU
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    start_step, data_pos = (resume_state(args, model, optimizer) if args.resume else (0, 0))
    before, after = train(args, model, tokenizer, train_set, eval_set, lambda q: ar.format_prompt(tokenizer, q),
                          device, optimizer=optimizer, start_step=start_step, data_pos=data_pos)
    if before and after:
        results = {"before": before, "after": after}
        print(format_table(results))
        title = figure_title(args.model, args.preset, len(eval_set), args.eval_temperature)
        print(f"wrote {plot_curves(results, os.path.join(args.out_dir, 'anytime_accuracy.png'), title)}")
    leave_together()


def main_eval_only(args: Args, device, offline: bool) -> dict:
    """--eval-only: the anytime curve of --model or of the --resume checkpoint, evaluated as in training."""
    eval_set = load_gsm8k("test", args.data_dir)[:args.eval_size]
    seed_everything(args.seed)
    model, tokenizer = load_model(args.resume or args.model, device, offline)
    step, grid = checkpoint_step(args.resume) if args.resume else 0, eval_grid(args)
    print(f"{args.model}" + (f" trained to step {step} ({args.resume})" if args.resume else "")
          + f": {millions(model)} parameters on {device}; {len(eval_set)} questions at budgets {grid}", flush=True)
    r = evaluate_model(model, tokenizer, [ar.format_prompt(tokenizer, x["question"]) for x in eval_set],
                       [x["answer"] for x in eval_set], args, grid, plain_progress=True)
    if RANK == 0:  # distributed: only rank 0 writes files
        os.makedirs(args.out_dir, exist_ok=True)
        with open(os.path.join(args.out_dir, "eval.jsonl"), "w") as f:
            f.write(json.dumps({"step": step, "model": args.model, "checkpoint": args.resume, **r}) + "\n")
        print(format_table({f"step {step}": r}))
        title = figure_title(args.model, f"{args.preset}, step {step}" if args.resume else "not trained",
                             len(eval_set), args.eval_temperature)
        print(f"wrote {plot_curves({f'step {step}': r}, os.path.join(args.out_dir, 'anytime_accuracy.png'), title)}")
    leave_together()
    return r


# ----------------------------------------------------------------------------
# The demo (--demo): a tiny model, a synthetic task where thinking helps, and its two runs
# ----------------------------------------------------------------------------

# The demo task: count the steps from one letter to another along a fixed cycle
# of 12 letters. "d>i" is answered by thinking "1e2f3g4h5i" (a step number and
# the next letter, until the target) and then \boxed{5}. Each thinking token is
# easy (the step before plus one) but the count cannot be read off the question
# by a tiny model, so an answer is only right once the thinking has reached the
# target. Warm-up traces start with a random amount of filler ("~"), so cutting
# the thinking at a small budget often loses the count. The anytime objective
# should learn to drop the filler; final-answer GRPO has no reason to (every
# trace finishes within the largest budget).
DEMO_NODES = "abcdefghijkl"
DEMO_FILLER_MAX = 8  # <= 8 filler + 2 x 7 steps + </think> = 23 <= 24, the last budget


def main_demo(args: Args, device):
    """Warm up a tiny model, then train AnytimeReasoner and GRPO from the same start, same steps.

    The runs write into out_dir/partial. Only once both are done do their files replace the
    previous demo's in out_dir (which needs --overwrite, checked before anything runs): a demo
    stopped early never destroys a finished one. The warm-up is kept in out_dir and reused by
    the next demo of the same seed."""
    print(cpu_threads(args.threads))
    seed_everything(args.seed)
    tokenizer = tiny_tokenizer()
    train_set, eval_set = demo_data(args)
    os.makedirs(args.out_dir, exist_ok=True)
    staging = os.path.join(args.out_dir, "partial")
    if os.path.isdir(staging):  # what a stopped demo left (the demo does not resume), and anything else there
        shutil.rmtree(staging)
    start = warmed_up_model(args, tokenizer, device, args.out_dir)
    if os.path.isfile(os.path.join(args.out_dir, "demo_results.json")):
        print(f"{args.out_dir} holds a finished demo; --overwrite replaces it once this one is done (in {staging})")
    runs = {args.preset: args, "grpo": preset_args(args, "grpo")} if args.preset != "grpo" else {"grpo": args}
    results = {}
    for name, run_args in runs.items():
        from transformers import AutoModelForCausalLM
        seed_everything(args.seed)
        with no_hf_bars():
            model = AutoModelForCausalLM.from_pretrained(start).to(device)
        print(f"\n=== {name}: S={len(run_args.budgets)} budgets {run_args.budgets}, A={run_args.num_summaries}, "
              f"prior {run_args.prior}, thinking {run_args.thinking_method}, summary {run_args.summary_method}")
        before, results[name] = train(Args(**{**asdict(run_args), "out_dir": staging}), model, tokenizer,
                                      train_set, eval_set, demo_prompt, device, tag="-" + name,
                                      stop_hint="the demo does not resume: run `" + demo_command(args.out_dir)
                                      + "` again (it reuses the warm-up)")
        results = {"before": before, **results} if "before" not in results else results
    title = figure_title("tiny demo model", " vs ".join(runs), len(eval_set), args.eval_temperature)
    print("\n" + title.replace("\n", ": ") + "\n" + format_table(results))
    figure = plot_curves(results, os.path.join(staging, "anytime_accuracy.png"), title)  # prints a text chart
    write_json(os.path.join(staging, "demo_results.json"), {"seed": args.seed, "steps": args.steps, **results})
    publish_demo(staging, args.out_dir)
    print(f"wrote {args.out_dir}: demo_results.json, {os.path.basename(figure)}, and per run metrics-*.jsonl, "
          f"eval-*.jsonl, ckpt-*")
    return results


def demo_problem(rng: random.Random) -> dict:
    start, steps = rng.randrange(12), rng.randint(2, 7)
    letters = [DEMO_NODES[(start + k) % 12] for k in range(steps + 1)]
    path = "".join(f"{k}{letters[k]}" for k in range(1, steps + 1))
    return {"question": f"{letters[0]}>{letters[-1]}", "answer": str(steps), "path": path}


def demo_prompt(question: str) -> str:
    return question + "\n<think>\n"


def tiny_tokenizer(think_end_special: bool = True):
    """A character-level tokenizer built in code (no download). `</think>` is one
    special token, like Qwen3/DeepSeek-R1, or 8 ordinary characters, like Qwen2.5."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    chars = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 \n.,:;!?+-*/=()[]{}<>\\$%#_^'\"|&~"
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    for c in chars:
        vocab.setdefault(c, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    t = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                unk_token="<unk>")
    t.add_tokens(["<think>", "**Final Answer**", "\\boxed{", "..."])  # whole words, not characters
    if think_end_special:
        t.add_special_tokens({"additional_special_tokens": ["</think>"]})
    return t


def tiny_model(tokenizer, hidden: int = 128, layers: int = 2, seed: int = 0, attn: str = "sdpa"):
    """A random-initialised Qwen2 causal LM of any size, built from a config (no download)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    cfg = Qwen2Config(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=1024, tie_word_embeddings=True,
                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                      bos_token_id=tokenizer.eos_token_id, attn_implementation=attn)
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(cfg)


def demo_warmup(model, tokenizer, steps: int, seed: int, device, log=print):
    """Supervised warm-up so the tiny model can produce the format: filler, the chain,
    </think>, **Final Answer**, \\boxed{end}. A third of the examples are cut short
    with the "..." insert and answer with the last node reached (a guess)."""
    rng = random.Random(seed + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    model.train()
    for step in range(steps):
        seqs, starts = [], []
        for _ in range(32):
            pb = demo_problem(rng)
            think = "~" * rng.randint(0, DEMO_FILLER_MAX) + pb["path"]
            if rng.random() < 1 / 3:
                cut = rng.randint(0, len(think))
                seen = [c for c in think[:cut] if c.isdigit()]
                guess = seen[-1] if seen else str(rng.randint(1, 7))
                body = ar.encode(tokenizer, think[:cut] + ar.TRUNCATED_INSERT + "\\boxed{" + guess + "}")
            else:
                body = ar.encode(tokenizer, think + ar.THINK_END + ar.CLOSED_INSERT
                                 + "\\boxed{" + pb["answer"] + "}")
            prompt = ar.encode(tokenizer, demo_prompt(pb["question"]))
            seqs.append(prompt + body + [tokenizer.eos_token_id])
            starts.append(len(prompt))
        T = max(map(len, seqs))
        ids = torch.full((len(seqs), T), tokenizer.pad_token_id)
        labels = torch.full((len(seqs), T), -100)
        for i, (s, p) in enumerate(zip(seqs, starts)):
            ids[i, :len(s)] = torch.tensor(s)
            labels[i, p:len(s)] = torch.tensor(s[p:])
        loss = model(input_ids=ids.to(device), labels=labels.to(device)).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"warm-up {step:4d}/{steps}  loss {loss.item():.3f}")
    model.eval()


def demo_data(args: Args) -> tuple[list[dict], list[dict]]:
    """The demo's training problems (drawn from the seed) and its held-out ones (fixed)."""
    rng = random.Random(args.seed)
    train_set = [demo_problem(rng) for _ in range(20000)]
    eval_set = [demo_problem(random.Random(10_000 + i)) for i in range(args.eval_size)]
    return train_set, eval_set


def warmed_up_model(args: Args, tokenizer, device, folder: str) -> str:
    """The folder of the warmed-up model for args.seed, made once and then reused. It is written
    under a temporary name and renamed when complete, so a warm-up stopped midway is never used."""
    path = os.path.join(folder, f"warmup-seed{args.seed}-{args.warmup_steps}steps")
    if os.path.isdir(path):
        print(f"using the warmed-up model in {path}")
        return path
    model = tiny_model(tokenizer, seed=args.seed).to(device)
    print(f"tiny model: {millions(model)} parameters")
    demo_warmup(model, tokenizer, args.warmup_steps, args.seed, device)
    if os.path.isdir(path + ".tmp"):
        shutil.rmtree(path + ".tmp")
    with no_hf_bars():
        model.save_pretrained(path + ".tmp")
    os.replace(path + ".tmp", path)
    return path


def preset_args(args: Args, name: str) -> Args:
    """args with preset `name`'s algorithm and its evenly spaced budgets up to args.max_think."""
    preset = ar.PRESETS[name]
    return Args(**{**asdict(args), **{k: v for k, v in asdict(preset).items() if k != "num_budgets"},
                   "preset": name, "budgets": ar.evenly_spaced_budgets(args.max_think, preset.num_budgets)})


def is_demo_file(name: str) -> bool:
    """Files that one demo run writes into its folder (not the warm-ups, which are shared)."""
    return (name in ("demo_results.json", "anytime_accuracy.png", "anytime_accuracy.txt")
            or name.startswith(("metrics-", "eval-", "ckpt-")))


def publish_demo(staging: str, out: str):
    """Replace the demo in `out` by the finished one in `staging`, all files or none: the old
    demo's files (those of any preset) move out first, its demo_results.json before the rest,
    and the new demo's demo_results.json comes in last. A folder holds a finished demo exactly
    when it holds a demo_results.json."""
    old = os.path.join(out, "previous")
    if os.path.isdir(old):
        shutil.rmtree(old)
    os.makedirs(old)
    for name in sorted(filter(is_demo_file, os.listdir(out)), key=lambda n: n != "demo_results.json"):
        os.replace(os.path.join(out, name), os.path.join(old, name))
    for name in sorted(os.listdir(staging), key=lambda n: n == "demo_results.json"):
        os.replace(os.path.join(staging, name), os.path.join(out, name))
    os.rmdir(staging)
    shutil.rmtree(old)


def cpu_threads(threads: int) -> str:
    """Set torch's CPU threads (the demo: not one per core, the result depends on the count); 0 picks
    2 when two cores are free (1-minute load average below cores - 1.5), else 1. Returns what to say."""
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    n = threads or (2 if load < cores - 1.5 else 1)
    torch.set_num_threads(n)
    why = "--threads" if threads else (f"{'quiet' if n == 2 else 'busy'} machine: 1-minute load {load:.2f} "
                                       f"{'<' if n == 2 else '>='} {cores - 1.5:g} = {cores} cores - 1.5")
    return f"{n} CPU thread{'s' * (n > 1)} ({why}; 1 and 2 give the same result)"


# ----------------------------------------------------------------------------
# Plumbing. Flags: the command line, and every check before anything heavy loads
# ----------------------------------------------------------------------------

def demo_command(out_dir: str) -> str:
    """The command that runs the demo again into out_dir (with --overwrite if a finished demo is there)."""
    same = os.path.abspath(out_dir) == os.path.abspath(DEMO["out_dir"])
    return ("python train_small.py --demo" + ("" if same else f" --out-dir {out_dir}")
            + (" --overwrite" if os.path.isfile(os.path.join(out_dir, "demo_results.json")) else ""))


def die(msg: str):
    """One clear line and a non-zero exit; no traceback for a user's mistake."""
    if LOCAL_RANK == 0:  # distributed: every process stops, one of each machine says why
        print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def comma_ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated integers, got {text!r}") from None


# --help lists the flags in these groups, each starting at the named field
HELP_GROUPS = {"model": "what to train", "max_think": "rollout", "steps": "optimisation",
               "eval_temperature": "evaluation", "micro_batch": "memory and speed (no effect on the result)",
               "out_dir": "the run"}


def flag_help(f) -> str:
    """A field's help with its default and demo value: '... [default: 512; demo: 24]'."""
    def show(v):
        return ("on" if v else "off") if isinstance(v, bool) else v
    shown = f.default is not None and (f.default is not False or f.name in DEMO)  # not "--demo [default: off]"
    notes = [f"default: {show(f.default)}"] * shown + [f"demo: {show(DEMO.get(f.name))}"] * (f.name in DEMO)
    return f.metadata["help"] + (f" [{'; '.join(notes)}]" if notes else "")


def parse_args(argv=None) -> Args:
    """Args from the command line. Later wins: defaults < demo values < a resumed run's args.json
    < the preset < flags given. Bad values end here, in one line, before anything heavy loads."""
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] + "\nThe defaults are for one 24 GB GPU; --demo switches to "
        "the demo's values, shown as 'demo: N'.", epilog=__doc__.split("\n\n")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)  # --budget is not --budgets
    p.error = lambda msg: die(f"{msg} (see --help)")  # one line, not argparse's usage + error
    kinds = {"int": dict(type=int, metavar="N"), "int | None": dict(type=int, metavar="N"),
             "float": dict(type=float, metavar="X"), "list[int] | None": dict(type=comma_ints, metavar="B,B,.."),
             "bool": dict(action="store_true")}
    group = p
    for f in fields(Args):
        group = p.add_argument_group(HELP_GROUPS[f.name]) if f.name in HELP_GROUPS else group
        kind = kinds.get(f.type, dict(metavar=f.name.split("_")[-1].upper()))
        group.add_argument("--" + f.name.replace("_", "-"), default=None, help=flag_help(f), **kind)
    given = {k: v for k, v in vars(p.parse_args(argv)).items() if v is not None}

    cfg, resumed = asdict(Args()), {}
    if given.get("demo"):
        for k in ("resume", "model", "data_dir", "eval_only"):
            if k in given:
                die({"resume": "--demo does not resume; it takes a few minutes, run it again",
                     "eval_only": "--demo trains its own model; drop --eval-only"}.get(
                    k, f"--demo builds its own model and data; drop --{k.replace('_', '-')}"))
        cfg.update(DEMO)
    if "resume" in given:
        given["resume"] = find_checkpoint(given["resume"])
        with open(os.path.join(given["resume"], "args.json")) as f:
            resumed = json.load(f)
        if resumed.get("demo"):
            die(f"--resume {given['resume']}: a checkpoint of the demo, which does not resume; run "
                f"`{demo_command(os.path.dirname(os.path.abspath(given['resume'])))}` again")
        if "model" in given:
            die(f"--resume {given['resume']} holds its own model (trained from {resumed.get('model')}); drop --model")
        # --eval-only writes into a folder of its own, not into the run's
        kept = ("resume", "overwrite", "eval_only") + (("out_dir",) if given.get("eval_only") else ())
        cfg.update({k: v for k, v in resumed.items() if k in cfg and k not in kept})
    if given.get("eval_only"):
        cfg["out_dir"] = "out-eval"
    name = given.get("preset", cfg["preset"])
    if name not in ar.PRESETS:
        die(f"unknown preset {name!r}; choose one of {', '.join(ar.PRESETS)}")
    preset = ar.PRESETS[name]
    if "preset" in given or not resumed:  # a resumed run keeps its own algorithm settings
        cfg.update({k: v for k, v in asdict(preset).items() if k != "num_budgets"})
    cfg.update(given)

    for k, choices in (("prior", ar.PRIORS), ("thinking_method", ar.THINKING_METHODS),
                       ("summary_method", ar.SUMMARY_METHODS)):
        if cfg[k] not in choices:
            die(f"unknown {k.replace('_', ' ')} {cfg[k]!r}; choose one of {', '.join(choices)}")
    for k in ("max_think", "questions_per_step", "traces", "num_summaries", "summary_max_tokens", "steps",
              "updates_per_rollout", "micro_batch", "think_batch", "summary_batch", "chunk_size",
              "eval_size", "eval_every", "eval_grid", "save_every"):
        if cfg[k] < 1 and not (k == "steps" and cfg["eval_only"]):
            hint = " (to evaluate without training: --eval-only)" if k == "steps" else ""
            die(f"--{k.replace('_', '-')} must be at least 1, got {cfg[k]}{hint}")
    for k in ("warmup_steps", "threads"):
        if cfg[k] < 0:
            die(f"--{k.replace('_', '-')} must be at least 0, got {cfg[k]}")
    why = {"temperature": " (the loss assumes sampled traces)", "eval_temperature": " (0 = greedy)"}
    for k, low in (("lr", 0), ("temperature", 0), ("clip_eps", 0), ("eval_temperature", None),
                   ("weight_decay", None), ("kl_coef", None)):  # also NaN and inf
        if not (math.isfinite(cfg[k]) and (cfg[k] > 0 if low == 0 else cfg[k] >= 0)):
            die(f"--{k.replace('_', '-')} must be {'>' if low == 0 else '>='} 0{why.get(k, '')}, got {cfg[k]}")
    if "budgets" in given:
        try:
            budgets = ar.check_budgets(given["budgets"])
        except ValueError as e:
            die(f"--budgets: {e}")
        if budgets[-1] > cfg["max_think"]:
            die(f"--budgets: {budgets[-1]} is beyond the maximum thinking length --max-think {cfg['max_think']}")
    elif resumed and not {"preset", "max_think"} & given.keys():
        budgets = resumed["budgets"]
    elif preset.num_budgets > cfg["max_think"]:
        die(f"{preset.num_budgets} budgets do not fit in --max-think {cfg['max_think']}")
    else:
        budgets = ar.evenly_spaced_budgets(cfg["max_think"], preset.num_budgets)
    cfg["budgets"], cfg["max_think"] = budgets, budgets[-1]
    if cfg["data_dir"] is not None:
        if not os.path.isdir(cfg["data_dir"]):
            die(f"--data-dir {cfg['data_dir']}: no such folder")
        for split in ("test",) if cfg["eval_only"] else ("train", "test"):
            if not os.path.isfile(os.path.join(cfg["data_dir"], f"{split}.jsonl")):
                die(f"--data-dir {cfg['data_dir']}: no {split}.jsonl there (GSM8K's train.jsonl and test.jsonl)")
    if not cfg["demo"] and not cfg["resume"] and is_local_path(cfg["model"]):  # a hub name: checked in main
        cfg["model"] = folder = os.path.expanduser(cfg["model"])
        if not os.path.exists(folder):
            die(f"--model {folder}: no such folder")
        if not os.path.isdir(folder):
            die(f"--model {folder} is a file; pass the model's folder")
        if not os.path.isfile(os.path.join(folder, "config.json")):
            die(f"--model {folder}: no config.json there, so not a Hugging Face model folder")
    if cfg["tensorboard"] and (cfg["demo"] or cfg["eval_only"]):
        die("--tensorboard logs a training run; drop it with --demo or --eval-only")
    if cfg["tensorboard"] and importlib.util.find_spec("tensorboard") is None:
        die("--tensorboard needs the tensorboard package: pip install tensorboard")
    if cfg["device"] != "auto":
        try:
            device = torch.device(cfg["device"])
        except RuntimeError:
            die(f"--device {cfg['device']}: not a device; use auto, cpu, cuda, cuda:1 or mps")
        if device.type == "cuda" and not torch.cuda.is_available():
            die(f"--device {cfg['device']}: no CUDA GPU here (torch {torch.__version__}); use --device cpu")
    return Args(**cfg)


def check_out_dir(args: Args):
    """--out-dir must be a folder we can write, and a new run must not mix its files with an earlier
    run's: a fresh run refuses a folder that holds a run, the demo one that holds a finished demo,
    and --eval-only any run or an earlier evaluation, unless --overwrite (--eval-only never writes
    into a run's folder). Called before anything heavy loads."""
    out = args.out_dir
    if os.path.exists(out) and not os.path.isdir(out):
        die(f"--out-dir {out} is a file, not a folder")
    parent, missing = os.path.abspath(out), []  # the folders we would create, outermost last
    while not os.path.exists(parent):
        missing.append(parent)
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        die(f"--out-dir {out}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        die(f"--out-dir {out}: {parent} is not writable")
    # os.access says yes to root everywhere, knows nothing of read-only file systems or /proc: make the folders
    # and a file in them, then remove them. Rank 0 only: two processes doing it race; the others never write.
    try:
        if RANK == 0:
            os.makedirs(os.path.abspath(out), exist_ok=True)
            fd, probe = tempfile.mkstemp(dir=out, prefix=".write-test-")
            os.close(fd)
            os.remove(probe)
    except OSError as e:
        die(f"--out-dir {out}: " + (f"cannot create a folder in {os.path.dirname(e.filename)}" if e.filename in missing
                                    else "cannot write a file there") + f" ({e.strerror})")
    finally:
        for folder in missing if RANK == 0 else ():  # innermost first
            with contextlib.suppress(OSError):
                os.rmdir(folder)
    if args.resume and not args.eval_only:
        return
    # what a run leaves: logs (metrics*.jsonl, eval*.jsonl), checkpoints (ckpt*), the demo's results, the figure
    held = sorted(n for n in (os.listdir(out) if os.path.isdir(out) else [])
                  if re.fullmatch(r"(metrics.*|eval.*)\.jsonl|ckpt.*|demo_results\.json|anytime_accuracy\..*", n))
    if args.demo:
        if "demo_results.json" in held and not args.overwrite:
            die(f"--out-dir {out} holds a finished demo (demo_results.json); add --overwrite to replace it once "
                f"this one is done, or choose another --out-dir")
    elif args.eval_only:
        others = [n for n in held if n not in ("eval.jsonl", "anytime_accuracy.png", "anytime_accuracy.txt")]
        if others:
            die(f"--out-dir {out} holds a run ({', '.join(others)}); --eval-only writes into a folder of its "
                f"own: choose another --out-dir")
        if held and not args.overwrite:
            die(f"--out-dir {out} already holds an evaluation ({', '.join(held)}); choose another --out-dir, "
                f"or add --overwrite to replace it")
    elif held and not args.overwrite:
        hint = f"continue it with --resume {os.path.join(out, 'ckpt')}, " if "ckpt" in held else ""
        die(f"--out-dir {out} already holds a run ({', '.join(held)}); {hint}choose another --out-dir, "
            f"or add --overwrite to start afresh there")


# ----------------------------------------------------------------------------
# Plumbing. Data: GSM8K, from a local folder or downloaded once
# ----------------------------------------------------------------------------

GSM8K_URL = "https://raw.githubusercontent.com/openai/grade-school-math/master/grade_school_math/data/{}.jsonl"
CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "anytime_reasoner", "gsm8k")


def json_error(e: ValueError, line: str) -> str:
    """json's message without its own line and column, which count within the one line parsed."""
    if not isinstance(e, json.JSONDecodeError):
        return str(e)
    where = "at the end of the line" if e.pos >= len(line.rstrip("\r\n")) else f"at column {e.pos + 1}"
    return f"not JSON ({e.msg} {where})"


def parse_gsm8k(path: str) -> list[dict]:
    """[{question, answer}] from a GSM8K JSONL file; the answer follows the last '####', commas removed
    ('#### 1,234' -> '1234'). Blank lines are skipped; a bad line is an error naming file and line."""
    rows = []
    with open(path, "rb") as f:  # bytes, so that a bad byte is reported with its line
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{n}: not UTF-8 text ({e.reason} at byte {e.start} of the line)") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{path}:{n}: malformed GSM8K line: {json_error(e, line)}") from None
            if not (isinstance(obj, dict) and isinstance(obj.get("question"), str)
                    and isinstance(obj.get("answer"), str)):
                raise ValueError(f'{path}:{n}: malformed GSM8K line: not an object with text fields '
                                 f'"question" and "answer"')
            answer = obj["answer"].rpartition("####")[2].strip().replace(",", "")
            if "####" not in obj["answer"] or not answer:
                raise ValueError(f"{path}:{n}: malformed GSM8K line: " + ("nothing after '####'" if "####" in
                                 obj["answer"] else "no '####' before the final answer"))
            rows.append({"question": obj["question"], "answer": answer})
    return rows


def load_gsm8k(split: str, data_dir: str | None) -> list[dict]:
    """GSM8K `split` ('train' or 'test') from data_dir, or downloaded once into CACHE_DIR."""
    path = os.path.join(data_dir or CACHE_DIR, f"{split}.jsonl")
    if data_dir is None and not os.path.isfile(path):
        os.makedirs(CACHE_DIR, exist_ok=True)
        url = GSM8K_URL.format(split)
        print(f"downloading GSM8K {split} from {url} into {CACHE_DIR}")
        try:  # a timeout: a stalled connection is an error, not a hang
            with urllib.request.urlopen(url, timeout=60) as r, open(path + ".part", "wb") as f:
                shutil.copyfileobj(r, f)
        except OSError as e:  # URLError, HTTPError and timeouts are all OSErrors
            die(f"could not download GSM8K {split} from {url} ({e}); download train.jsonl and "
                f"test.jsonl by hand and pass --data-dir with their folder")
        os.replace(path + ".part", path)
    if not os.path.isfile(path):
        die(f"{path} not found: --data-dir must hold GSM8K's train.jsonl and test.jsonl")
    try:
        return parse_gsm8k(path)
    except ValueError as e:
        die(str(e))


# ----------------------------------------------------------------------------
# Plumbing. Evaluation: the anytime accuracy table, its JSONL row and a figure
# ----------------------------------------------------------------------------

def evaluate_model(model, tokenizer, prompts, truths, args: Args, grid: list[int], plain_progress=False) -> dict:
    """ar.evaluate on its own fixed random stream: comparable across steps, training's stream untouched."""
    model.eval()
    device = next(model.parameters()).device
    with progress_bar(len(prompts) * (1 + len(grid)), "eval", plain_progress) as update, autocast(device), \
            torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(args.seed + 12345)
        evaluate_on = ar.evaluate if WORLD == 1 else evaluate_split  # distributed: the prompts split over the processes
        return evaluate_on(model, tokenizer, prompts, truths, grid, args.eval_temperature,
                           args.summary_max_tokens, args.think_batch, args.summary_batch, update)


def eval_grid(args: Args) -> list[int]:
    """Every args.eval_grid tokens up to the largest budget, which is always included."""
    grid = list(range(args.eval_grid, args.max_think + 1, args.eval_grid))
    return grid if grid and grid[-1] == args.max_think else grid + [args.max_think]


def format_table(results: dict[str, dict]) -> str:
    """Budgets as columns, one row per named evaluation, plus the anytime score."""
    grid = next(iter(results.values()))["budgets"]
    lines = [f"{'budget':>20} " + " ".join(f"{b:>6}" for b in grid) + "  anytime  think_len"]
    for name, r in results.items():
        lines.append(f"{name:>20} " + " ".join(f"{a:6.3f}" for a in r["accuracy"])
                     + f"  {r['anytime_score']:7.3f}  {r['mean_think_len']:9.1f}")
    return "\n".join(lines)


def figure_title(model: str, preset: str, num_questions: int, temperature: float) -> str:
    return f"{model}, {preset}\naccuracy on {num_questions} held-out questions, temperature {temperature}"


def plot_curves(results: dict[str, dict], path: str, title: str) -> str:
    """Accuracy against budget, like the paper's curve figure: a PNG at `path` with matplotlib, else a
    text chart in the same place, ending .txt, also printed. Returns the file written."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        width, lines = 40, [title.replace("\n", ": "), "(a text chart; pip install matplotlib for a PNG)"]
        for name, r in results.items():
            lines += [name] + [f"  {b:>6} |{'#' * round(a * width):<{width}}| {a:.3f}"
                               for b, a in zip(r["budgets"], r["accuracy"])]
        path = path.replace(".png", ".txt")
        with open(path, "w") as f:
            f.write("\n".join(lines) + "\n")
        print("\n".join(lines))
        return path
    plt.figure(figsize=(5.5, 4))
    plt.title(title, fontsize=9)
    for name, r in results.items():
        plt.plot(r["budgets"], r["accuracy"], marker="o", label=f"{name} (anytime {r['anytime_score']:.3f})")
    plt.xlabel("thinking budget (tokens)")
    plt.ylabel("accuracy")
    plt.legend()
    plt.grid(alpha=0.3)
    plt.tight_layout()
    plt.savefig(path, dpi=120)
    plt.close()
    return path


# ----------------------------------------------------------------------------
# Plumbing. Device, seeding, model loading, checkpoints, logs, progress, Ctrl-C
# ----------------------------------------------------------------------------

def pick_device(name: str) -> torch.device:
    if name == "auto":  # the device is chosen here, once
        mps = getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()
        name = "cuda" if torch.cuda.is_available() else "mps" if mps else "cpu"
    return torch.device(name)


def autocast(device: torch.device):
    """bf16 autocast on a GPU (weights stay fp32 for AdamW); plain fp32 elsewhere."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def seed_everything(seed: int):  # python, numpy and torch (every device)
    random.seed(seed), np.random.seed(seed), torch.manual_seed(seed)


def hub_reachable(timeout: float = 3.0) -> bool:
    """Can we reach the Hugging Face hub? (Saves a minute of retries when offline.)"""
    import socket
    from urllib.parse import urlparse
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def is_local_path(name: str) -> bool:
    """Is --model a local folder? Yes when something exists there, or when it cannot be a hub name:
    NAME or ORG/NAME, each part of letters, digits, '-', '_' and '.', not starting with '.' or '-'."""
    return os.path.exists(name) or re.fullmatch(r"\w[\w.-]*(/\w[\w.-]*)?", name) is None


def cannot_load(name: str, why: str):
    here = os.path.dirname(name)
    also = f"; there is no folder {name} here either" if here and os.path.isdir(here) else ""
    die(f"could not load model {name!r} ({why}{also}). Check the name, or on a machine with "
        f"internet run `hf download {name} --local-dir FOLDER` and pass --model FOLDER.")


def check_hub_model(name: str) -> bool:
    """A hub name must be reachable or cached (checked before anything heavy). Returns: load offline?"""
    if is_local_path(name) or hub_reachable():
        return False
    try:
        from huggingface_hub import try_to_load_from_cache
        cached = isinstance(try_to_load_from_cache(name, "config.json"), str)
    except Exception:  # not a valid hub name, or an older huggingface_hub: let from_pretrained say
        cached = True
    if not cached:
        cannot_load(name, "no internet and not in the local Hugging Face cache")
    return True


def load_model(name: str, device: torch.device, offline: bool | None = None):
    """from_pretrained (from the local cache when offline), or one clear message that says what to do."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    dtype = torch.float32  # fp32 master weights; the loss runs under bf16 autocast on a GPU
    if offline is None:
        offline = not is_local_path(name) and not hub_reachable()
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=offline)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, local_files_only=offline)
    except Exception as e:  # OSError, ValueError, connection errors...: all mean "not loadable"
        cannot_load(name, "no internet and not in the local Hugging Face cache" if offline else
                    f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device), tokenizer


@contextlib.contextmanager
def no_hf_bars():
    """Without transformers' "Writing model shards" / "Loading weights" bars (saves between steps)."""
    from transformers.utils import logging as hf_logging
    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            hf_logging.enable_progress_bar()


def save_checkpoint(path: str, model, tokenizer, optimizer, step: int, data_pos: int, args: Args):
    """Weights, tokenizer, optimiser, step, RNG, data position: all it takes to continue exactly. Never
    leaves the run without a complete checkpoint: written into path.tmp (args.json last: complete),
    then path -> path.old, path.tmp -> path; after a crash between, find_checkpoint puts it back."""
    weights, optimizer_state = full_state(model, optimizer)  # distributed --fsdp: gathered on rank 0
    if RANK != 0:  # distributed: only rank 0 writes
        return
    tmp, old = path + ".tmp", path + ".old"
    if os.path.isdir(tmp):  # half written by a crash
        shutil.rmtree(tmp)
    with no_hf_bars():
        model.save_pretrained(tmp, state_dict=weights)  # weights None: the model's own
    tokenizer.save_pretrained(tmp)
    rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
           **({"cuda": torch.cuda.get_rng_state_all()} if torch.cuda.is_available() else {})}
    torch.save({"optimizer": optimizer_state or optimizer.state_dict(), "step": step, "data_pos": data_pos,
                "rng": rng}, os.path.join(tmp, "trainer_state.pt"))
    write_json(os.path.join(tmp, "args.json"), asdict(args))
    if os.path.isdir(path):
        if os.path.isdir(old):
            shutil.rmtree(old)
        os.replace(path, old)
    os.replace(tmp, path)
    if os.path.isdir(old):
        shutil.rmtree(old)


def find_checkpoint(path: str) -> str:
    """The checkpoint to resume from; one that a crash while saving left in path.tmp or path.old is
    moved back into place (and said)."""
    def checkpoint_complete(path):
        return os.path.isfile(os.path.join(path, "args.json"))  # written last (save_checkpoint)
    if checkpoint_complete(path):
        return path
    spares = [p for p in (path + ".tmp", path + ".old") if checkpoint_complete(p)]  # newest first
    if spares and not os.path.exists(path):
        os.replace(spares[0], path)
        print(f"--resume {path}: not there, but a complete checkpoint was in {spares[0]} "
              f"(a crash while saving); moved it back to {path}")
        return path
    if spares:
        die(f"--resume {path}: incomplete (no args.json), but {spares[0]} is a complete checkpoint; "
            f"resume from that")
    inside = os.path.join(path, "ckpt")
    hint = f"--resume {inside}" if checkpoint_complete(inside) else "a checkpoint folder written by this script"
    die(f"--resume {path}: no checkpoint there (no args.json); pass {hint}")


def checkpoint_step(path: str) -> int:
    """The step a checkpoint was saved at, read without loading its optimiser state (mmap)."""
    return torch.load(os.path.join(path, "trainer_state.pt"), mmap=True, weights_only=False)["step"]


def resume_state(args: Args, model, optimizer) -> tuple[int, int]:
    """AdamW's state, the random streams, the step and the data position of the --resume checkpoint."""
    state = torch.load(os.path.join(args.resume, "trainer_state.pt"), weights_only=False,
                       map_location="cpu")  # distributed: every process reads it, not all onto one GPU
    load_optimizer_state(model, optimizer, state["optimizer"])  # distributed --fsdp: each process its shard
    for group in optimizer.param_groups:  # the saved ones, unless --lr or --weight-decay was given
        group.update(lr=args.lr, weight_decay=args.weight_decay)
    random.setstate(state["rng"]["python"])
    np.random.set_state(state["rng"]["numpy"])
    torch.set_rng_state(state["rng"]["torch"])
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    print(f"resumed from {args.resume} at step {state['step']} of {args.steps}")
    return state["step"], state["data_pos"]


def drop_torn_line(path: str):
    """Drop (and say so) the half line a run killed while logging left at the end; a whole row gets its newline."""
    if not os.path.isfile(path):
        return
    with open(path, "rb") as f:
        data = f.read()
    if not data or data.endswith(b"\n"):
        return
    kept, _, last = data.rpartition(b"\n")
    try:
        json.loads(last)
    except ValueError:  # also a UnicodeDecodeError: a character cut in two
        with open(path, "wb") as f:
            f.write(kept + b"\n" if kept else b"")
        shown = last[:40].decode("utf-8", "replace") + ("..." if len(last) > 40 else "")
        print(f"{path}: dropped its last line, cut short when the run was stopped: {shown}")
        return
    with open(path, "ab") as f:
        f.write(b"\n")


def read_jsonl(path: str) -> list[dict]:
    """The rows of one of this script's JSONL logs ([] if none); a bad line is an error naming it."""
    if not os.path.isfile(path):
        return []
    rows = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                die(f"{path}:{n}: {json_error(e, line)}; remove that line or start afresh with --overwrite")
            if not isinstance(row, dict) or not isinstance(row.get("step"), int):
                die(f"{path}:{n}: not a row of this script's log (no step); remove that line")
            rows.append(row)
    return rows


def drop_rows_after(path: str, step: int):
    """Keep the rows of steps <= step (a run killed between two saves logged steps it will redo)."""
    if not os.path.isfile(path):
        return
    drop_torn_line(path)
    rows = [row for row in read_jsonl(path) if row["step"] <= step]
    with open(path, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)


def logged_eval(path: str, step: int) -> dict | None:
    """The evaluation logged at `step` in an eval.jsonl, without its step; None if not there."""
    row = next((r for r in read_jsonl(path) if r["step"] == step), None)
    return row and {k: v for k, v in row.items() if k != "step"}


def tensorboard_writer(args: Args, start_step: int):
    """--tensorboard: a SummaryWriter into --out-dir/tensorboard on rank 0; None without the flag. A fresh
    run empties the folder; a resumed one hides what was logged after its checkpoint (purge_step), as it
    drops those rows of its logs."""
    if not args.tensorboard or RANK != 0:
        return None
    from torch.utils.tensorboard import SummaryWriter  # only here: tensorboard is optional
    folder = os.path.join(args.out_dir, "tensorboard")
    if start_step == 0:
        shutil.rmtree(folder, ignore_errors=True)
    return SummaryWriter(folder, purge_step=start_step + 1 if start_step else None, flush_secs=30)


def board_scalars(board, step: int, row: dict, budgets: list[int], prefix: str = ""):
    """A log row's numbers as TensorBoard scalars at `step`; a list of one number per budget as
    NAME/budget_B (zero-padded, so that TensorBoard sorts them by budget)."""
    for name, value in row.items():
        for b, x in zip(budgets, value) if isinstance(value, list) else [(None, value)]:
            board.add_scalar(prefix + name + ("" if b is None else f"/budget_{b:04d}"), x, step)


def write_json(path: str, obj):
    """Written under a temporary name, then renamed: the file is complete or absent."""
    with open(path + ".part", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".part", path)


def append_jsonl(path: str, row: dict):
    if RANK == 0:  # distributed: only rank 0 writes files
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")


@contextlib.contextmanager
def progress_bar(total: int, desc: str, plain: bool = False):
    """Yields update(n): a tqdm bar on a terminal (tqdm installed, one process); else, if `plain`, a line on
    stderr at every tenth of `total` (rank 0); else nothing."""
    if tqdm is not None and sys.stderr.isatty() and WORLD == 1:
        with tqdm(total=total, desc=desc, leave=False) as bar:
            yield bar.update
        return
    done, shown = 0, 0

    def update(n):
        nonlocal done, shown
        done += n
        if plain and RANK == 0 and done * 10 // total > shown:
            shown = done * 10 // total
            print(f"{desc}: {done} of at most {total} sequences generated", file=sys.stderr, flush=True)
    yield update


class CtrlC:
    """The first Ctrl-C asks to stop after the step in flight (`pressed`), and to save unless ckpt is None
    (the demo, which does not resume); a second one stops at once."""
    def __init__(self, ckpt: str | None, saved: int):
        self.ckpt, self.saved, self.pressed = ckpt, saved, False

    def __enter__(self):
        self.old = signal.signal(signal.SIGINT, self.on_sigint)
        return self

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self.old)

    def on_sigint(self, signum, frame):
        if self.pressed:
            where = "" if self.ckpt is None else f", without saving; {self.ckpt} holds step {self.saved}" \
                if self.saved else ", without saving; no checkpoint was saved"
            if RANK == 0:
                print(f"\nCtrl-C again: stopped at once{where}", file=sys.stderr)
            raise SystemExit(130)
        self.pressed = True
        print("\nCtrl-C: " + ("stopping after this step (the demo does not resume)" if self.ckpt is None else
                              "saving a checkpoint after this step") + "; press again to stop at once", flush=True)


def start_logs(paths: list[str], start_step: int):
    """A fresh run starts its logs afresh, never after an earlier run's; a resumed run drops the rows
    of steps done after its checkpoint (a run killed between two saves): each step is logged once."""
    os.makedirs(os.path.dirname(paths[0]) or ".", exist_ok=True)
    for path in paths if RANK == 0 else ():  # distributed: only rank 0 writes
        if start_step == 0:
            open(path, "w").close()
        else:
            drop_rows_after(path, start_step)


def step_metrics(ro, scores, mine, B, prior, budgets, stats, grad_norms, seconds) -> dict:
    """rl_step's log row, over the whole step (distributed: every process's questions, in order)."""
    gen_tokens = int(ro.think_len.sum()) + sum(len(x) for q in ro.summary_ids for t in q for s in t for x in s)
    clipfrac, approx_kl, n, gen_tokens = all_sum(stats["clipfrac"], stats["approx_kl"], stats["tokens"], gen_tokens)
    scores, prompt_index, think_len = gather_rows(mine, B, scores, ro.prompt_index, ro.think_len)
    r = ar.pooled_scores(scores, prompt_index)                                  # B,G,S
    var = ar.variance_diagnostics(r.double(), prior.double(), think_len, budgets)
    return {"reward": round(scores.mean().item(), 4), "acc": [round(x, 3) for x in r.mean((0, 1)).tolist()],
            "think_len": round(think_len.float().mean().item(), 1),
            "clipfrac": round(clipfrac / max(n, 1), 4), "approx_kl": round(approx_kl / max(n, 1), 6),  # per token
            "grad_norm": round(sum(grad_norms) / len(grad_norms), 4), "updates": len(grad_norms),
            "gen_tokens": int(gen_tokens),  # sampled (thinking + summaries): each is trained once
            "gen_tok_s": round(gen_tokens / (seconds["s_think"] + seconds["s_summary"]), 1),
            # where the time went: thinking, summaries, scoring + advantages, PPO updates, all of the step
            **{k: round(v, 3) for k, v in seconds.items()},
            # Var[R - V] / Var[R] per budget for V = V1, V2, BRPO (None: too few traces reach it)
            **{k: [round(x, 4) if x == x else None for x in v.tolist()] for k, v in var.items()
               if k.startswith("var_ratio")}}


def millions(model) -> str:
    return f"{sum(p.numel() for p in model.parameters()) / 1e6:.3g}M"


# ----------------------------------------------------------------------------
# Plumbing. Distributed: `torchrun --nproc_per_node N train_small.py` (one process: helpers do nothing)
# ----------------------------------------------------------------------------
# torchrun starts N copies of this script, each with its RANK (0..N-1), LOCAL_RANK (its GPU on its
# machine) and WORLD_SIZE (N). Rank r rolls out questions r, r + N, ...; the PPO mini-batches are the
# one-process ones and the gradients are summed over the ranks, so every rank makes the one-process
# update. Only rank 0 prints and writes files. The whole story: docs/multi-gpu.md.

RANK = int(os.environ.get("RANK", "0"))
LOCAL_RANK = int(os.environ.get("LOCAL_RANK", "0"))
WORLD = int(os.environ.get("WORLD_SIZE", "1"))


def check_distributed(args: Args):
    """What torchrun needs, one line each, before anything heavy loads."""
    if args.fsdp and WORLD == 1:
        die("--fsdp shards the model over the processes of torchrun: "
            "torchrun --nproc_per_node N train_small.py --fsdp ...")
    if WORLD == 1:
        return
    if args.demo:
        die("--demo runs in one process: python train_small.py --demo")
    if args.questions_per_step % WORLD:
        die(f"--questions-per-step {args.questions_per_step} must be a multiple of the {WORLD} processes "
            f"(each takes the same number of questions)")
    if args.device not in ("auto", "cpu", "cuda"):
        die(f"--device {args.device}: under torchrun use auto, cuda (one GPU per process) or cpu")
    if args.fsdp and args.kl_coef > 0:
        die("--fsdp with --kl-coef > 0: the reference model is not sharded; use --kl-coef 0 or drop --fsdp")


def init_distributed(device: torch.device) -> torch.device:
    """Join the other processes (NCCL between GPUs, gloo on CPUs), one GPU each; only rank 0 prints."""
    if WORLD == 1:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", LOCAL_RANK)
        torch.cuda.set_device(device)
    # a rank may wait for the others' rollouts or rank 0's checkpoint: 30 minutes, not NCCL's 10
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(minutes=30),
                            device_id=device if device.type == "cuda" else None)
    atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())  # an error's exit
    if RANK != 0:
        sys.stdout = open(os.devnull, "w")
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    return device


@contextlib.contextmanager
def machine_rank_zero_first():
    """The first process of each machine runs the block (a download) before the others."""
    if WORLD > 1 and LOCAL_RANK != 0:
        dist.barrier()
    yield
    if WORLD > 1 and LOCAL_RANK == 0:
        dist.barrier()


def rank_seed(*keys: int) -> int:
    """A seed from integers, e.g. (seed, step, rank): independent streams for the ranks."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1)[0])


def all_sum(*values: float) -> list[float]:
    """Each value summed over the ranks."""
    if WORLD == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t)
    return t.tolist()


def leave_together():
    """A clean end: every rank waits until all are done (rank 0 writes last), then all leave the group."""
    if WORLD > 1 and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def any_rank(flag: bool) -> bool:
    """True on every rank if it is True on one (Ctrl-C: all ranks stop after the same step)."""
    if WORLD == 1:
        return flag
    t = torch.tensor([int(flag)], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def gather_rows(mine: list[int], total: int, *tensors: torch.Tensor) -> list[torch.Tensor]:
    """Each rank holds rows `mine` (of `total`) of every tensor; every rank gets all the rows, in order."""
    if WORLD == 1:
        return list(tensors)
    parts = [None] * WORLD
    dist.all_gather_object(parts, (mine, [t.cpu() for t in tensors]))
    rows = [i for idx, _ in parts for i in idx]
    assert sorted(rows) == list(range(total)), "each row must come from exactly one rank"
    order = torch.tensor(rows).argsort()
    return [torch.cat([p[1][k] for p in parts])[order] for k in range(len(tensors))]


def my_traces(minibatch: list[tuple[int, int]], micro_batch: int, rank: int, world: int) -> list[tuple]:
    """The traces (b, g) of a mini-batch of the whole step that `rank` of `world` trains, in micro-batches,
    as (its row b // world, g). One process: all of them, as they are."""
    own = [(b // world, g) for b, g in minibatch if b % world == rank]
    return [tuple(own[i:i + micro_batch]) for i in range(0, len(own), micro_batch)]


def sum_gradients(model):
    """Every gradient summed over the ranks (a rank with no traces in this update adds zeros): each
    rank then holds the gradient of the whole update. --fsdp sums them itself (shard_model)."""
    if WORLD == 1 or fsdp_parts(model):
        return
    for p in model.parameters():
        if p.requires_grad:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)


def fsdp_parts(model) -> list:
    """The parts of the model that --fsdp sharded; [] without it."""
    if WORLD == 1:
        return []
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch < 2.6: no FSDP2, and --fsdp says so
        return []
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def shard_model(model, device: torch.device):
    """--fsdp: FSDP2 (fully_shard) on each decoder layer and on the rest: each rank keeps 1/N of the fp32
    weights, gradients and AdamW state. Gradients are summed over the ranks, as without --fsdp."""
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import FSDPModule, fully_shard
    except ImportError:
        die(f"--fsdp needs torch >= 2.6 (FSDP2's fully_shard); this is torch {torch.__version__}")
    for method in ("set_gradient_divide_factor", "set_force_sum_reduction_for_comms"):
        if not hasattr(FSDPModule, method):
            die(f"--fsdp needs a torch whose FSDP2 has {method} (tested: 2.13); this is torch {torch.__version__}")
    mesh = init_device_mesh(device.type, (WORLD,))
    layers = getattr(model, "_no_split_modules", None) or ()  # transformers names its decoder layers
    for m in list(model.modules()):
        if type(m).__name__ in layers:
            fully_shard(m, mesh=mesh, reshard_after_forward=False)
    fully_shard(model, mesh=mesh, reshard_after_forward=False)
    for part in fsdp_parts(model):  # gathered and sharded again only by whole_weights
        part.set_reshard_after_backward(False)
        part.set_gradient_divide_factor(1.0)  # the sum over the ranks, not the mean
        part.set_force_sum_reduction_for_comms(True)  # a plain sum (gloo has no pre-multiplied one)
    # transformers' generate() steps in lockstep with the other ranks for a sharded model (synced_gpus);
    # each rollout here holds the weights whole (whole_weights), so each rank generates on its own
    model.generate = functools.partial(model.generate, synced_gpus=False)
    with torch.no_grad(), whole_weights(model):  # FSDP wants its first forward through the whole model
        model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=device))


@contextlib.contextmanager
def whole_weights(model):
    """--fsdp: every rank holds all the weights inside (for generation and the loss), sharded again on
    the way out; the gradients still go to each rank's shard. Without --fsdp: nothing."""
    parts = fsdp_parts(model)
    for part in parts:
        part.unshard()
    try:
        yield
    finally:
        for part in parts:
            part.reshard()


def fsdp_idle_passes(model, minibatch: list[tuple[int, int]], micro_batch: int) -> int:
    """--fsdp: every rank runs as many backward passes as the busiest one (each pass sums the
    gradients over all ranks); these extra passes add zero. 0 without --fsdp."""
    if not fsdp_parts(model):
        return 0
    busiest = max(len(my_traces(minibatch, micro_batch, r, WORLD)) for r in range(WORLD))
    return busiest - len(my_traces(minibatch, micro_batch, RANK, WORLD))


def full_state(model, optimizer) -> tuple[dict | None, dict | None]:
    """--fsdp: the whole weights and AdamW state on rank 0 (all ranks call), in the one-process format:
    any N resumes from it, with or without --fsdp. (None, None) without --fsdp: save them as they are."""
    if not fsdp_parts(model):
        return None, None
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(model, options=options)
    state = get_optimizer_state_dict(model, optimizer, options=options)
    if RANK != 0:
        return None, None
    index = {name: i for i, (name, _) in enumerate(model.named_parameters())}  # the one-process keys
    buffers = {name for name, _ in model.named_buffers()}
    weights = {k: v for k, v in weights.items() if k in index or k in buffers}  # tied copies once, as save_pretrained
    return weights, {"state": {index[k]: v for k, v in state["state"].items()},
                     "param_groups": optimizer.state_dict()["param_groups"]}  # numbered, as in one process


def load_optimizer_state(model, optimizer, saved: dict):
    """optimizer.load_state_dict(saved); with --fsdp each rank takes its shard of it."""
    if not fsdp_parts(model):
        return optimizer.load_state_dict(saved)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    names = [name for name, _ in model.named_parameters()]
    full = {"state": {names[i]: v for i, v in saved["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in saved["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, full, options=StateDictOptions(full_state_dict=True))
    for group, saved_group in zip(optimizer.param_groups, saved["param_groups"]):  # as saved (betas a tuple)
        group.update({k: v for k, v in saved_group.items() if k != "params"})


def evaluate_split(model, tokenizer, prompts, truths, budgets, temperature, summary_max_tokens,
                   think_batch_size, summary_batch_size, progress=None) -> dict:
    """ar.evaluate with the prompts dealt out over the ranks (b = rank, rank + N, ...) and the
    scores gathered: the same result on every rank, computed as ar.evaluate does."""
    torch.manual_seed(rank_seed(torch.initial_seed(), RANK))  # a stream of its own for each rank
    budgets, mine = ar.check_budgets(budgets), list(range(RANK, len(prompts), WORLD))
    S = len(budgets)
    scores, index, think_len = torch.zeros(0, 1, S, 1), torch.zeros(0, 1, S, dtype=torch.long), \
        torch.zeros(0, 1, dtype=torch.long)                      # a rank may have no prompts
    with whole_weights(model):
        if mine:
            ro = ar.rollout(model, tokenizer, [prompts[b] for b in mine], budgets, 1, 1, temperature,
                            summary_max_tokens, think_batch_size, summary_batch_size, progress=progress)
            scores, index, think_len = ar.score_rollout(ro, [truths[b] for b in mine]), ro.prompt_index, ro.think_len
    scores, index, think_len = gather_rows(mine, len(prompts), scores, index, think_len)
    acc = ar.anytime_accuracy(scores, index)
    return {"budgets": budgets, "accuracy": [round(x, 4) for x in acc.tolist()],
            "anytime_score": round(acc.mean().item(), 4),
            "mean_think_len": round(think_len.float().mean().item(), 1)}


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # Ctrl-C outside the training loop (loading, warm-up, first evaluation)
        if LOCAL_RANK == 0:  # distributed: one line per machine
            print("\ninterrupted (Ctrl-C)", file=sys.stderr)
        sys.exit(130)
