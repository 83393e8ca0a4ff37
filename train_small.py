"""Train a small model for anytime reasoning with BRPO (AnytimeReasoner), on one GPU.

    python train_small.py                                  # Qwen2.5-0.5B-Instruct, GSM8K, preset ar-uniform
    python train_small.py --preset grpo                    # the final-answer GRPO baseline
    python train_small.py --model Qwen/Qwen3-0.6B          # native thinking, </think> is one token
    python train_small.py --data-dir ../shared/gsm8k       # local GSM8K (else downloaded once)
    python train_small.py --resume out/ckpt                # continue exactly where a run stopped
    python train_small.py --eval-only --model Qwen/Qwen3-0.6B  # the anytime curve of a model, no training
    python train_small.py --demo                           # CPU, offline, ~3 minutes: see the effect
    python train_small.py --demo --ablation                # the paper's 8 runs x 3 seeds, ~30 minutes
    torchrun --standalone --nproc_per_node 8 train_small.py  # one run on 8 GPUs (README: When one GPU is not enough)
    python train_small.py --help                           # every flag, its unit, default and demo value

The algorithm lives in anytime_reasoner.py; this file is plumbing (arguments,
data, model loading, checkpoints, logging) around one training loop, `train`.
"""
from __future__ import annotations

import argparse
import atexit
import contextlib
import datetime
import functools
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
    model: str = arg("Qwen/Qwen2.5-0.5B-Instruct",  # two KV heads: small KV cache, big generation batches
                     "Hugging Face hub name (NAME or ORG/NAME) or local model folder; read as a folder "
                     "when it exists or cannot be a hub name (starts with /, . or ~, or has two /)")
    preset: str = arg("ar-uniform", "a run of the paper, see the README's table: " + ", ".join(ar.PRESETS))
    budgets: list[int] | None = arg(None, "thinking budgets in tokens, comma-separated and increasing, "
                                    "e.g. 128,256,384,512 [default: the preset's number of budgets, "
                                    "evenly spaced up to --max-think]")
    prior: str | None = arg(None, "weights of the budgets in the objective: uniform, linear or base "
                            "[default: the preset's]")
    num_summaries: int | None = arg(None, "A, summaries sampled per (trace, budget) [default: the preset's]")
    thinking_method: str | None = arg(None, "baseline of the thinking tokens: brpo, grpo (V2 only), v1 or "
                                      "none [default: the preset's]")
    summary_method: str | None = arg(None, "advantage of the summaries: brpo (decoupled, every budget) or "
                                     "grpo (last budget only) [default: the preset's]")
    # rollout. Qwen2.5-0.5B-Instruct solves GSM8K in ~100-300 tokens, so 512 thinking tokens
    # cover nearly every trace while the 128-token budget cuts most of them short.
    max_think: int = arg(512, "thinking tokens per trace at most, = the last budget")
    questions_per_step: int = arg(16, "B, training questions per step (the paper: 64 on 8 GPUs)")
    traces: int = arg(8, "G, thinking traces sampled per question (the paper: 8)")
    summary_max_tokens: int = arg(64, "tokens per summary at most; summaries run to EOS. A recap sentence + "
                                  "\\boxed{} + EOS takes <= 60 Qwen2.5 tokens for 99 in 100 GSM8K answers "
                                  "(bench.py --only summary; the authors: 118)")
    temperature: float = arg(1.0, "sampling temperature of the training rollouts; must be > 0, "
                             "the loss assumes sampled traces (the paper: 1.0)")
    stop_at_box: bool = arg(False, "stop each summary as soon as its \\boxed{} closes (faster; "
                            "the authors run summaries to EOS)")
    # optimisation
    steps: int = arg(200, "RL steps in all; a resumed run keeps its own unless given")
    lr: float = arg(1e-6, "AdamW learning rate, constant (the paper: 1e-6)")
    weight_decay: float = arg(0.01, "AdamW weight decay (the authors: 0.01)")
    updates_per_rollout: int = arg(2, "PPO mini-batches (optimiser updates) per rollout; the old log-probs "
                                   "are computed once before them (the authors: 2)")
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
    fsdp: bool = arg(False, "under torchrun: shard the fp32 weights, gradients and AdamW state over the "
                     "ranks (FSDP2); the weights are gathered whole for each rollout and update")
    # the run
    out_dir: str = arg("out", "folder for metrics, evaluations, the figure and the checkpoint "
                       "(--eval-only: out-eval)")
    save_every: int = arg(25, "save a checkpoint every N steps, after the last, and on Ctrl-C")
    overwrite: bool = arg(False, "start afresh in an --out-dir that already holds a run, or with "
                          "--eval-only replace an earlier evaluation (the demo always starts afresh)")
    resume: str | None = arg(None, "checkpoint folder to continue exactly from, e.g. out/ckpt")
    eval_only: bool = arg(False, "no training: evaluate --model, or the --resume checkpoint, as training "
                          "does (same grid and settings) and write eval.jsonl, the figure and the table")
    data_dir: str | None = arg(None, "folder with GSM8K's train.jsonl and test.jsonl [default: "
                               "downloaded once into ~/.cache/anytime_reasoner/gsm8k]")
    device: str = arg("auto", "cpu, cuda, cuda:1 or mps; auto: a GPU if there is one")
    threads: int = arg(2, "demo only: CPU threads of torch. A seed's result depends on the count: 1 and 2 "
                       "give the same, 3 or more another (torch 2.13-2.14, AVX2); 1 is faster on a busy machine")
    demo: bool = arg(False, "offline CPU demo, ~3 minutes: a tiny model built in code learns a "
                     "synthetic task, then AnytimeReasoner and GRPO train it from the same start")
    ablation: bool = arg(False, "the paper's ablation on the demo task (implies --demo), ~30 minutes on 2 cores: "
                         "all 8 presets from one warm-up per seed, each evaluated after its last step; a table "
                         "and two figures in out-ablation/ unless --out-dir. Run again, it keeps the finished runs")
    ablation_seeds: int = arg(3, "seeds of the ablation: --seed, --seed + 1, ...")


# The demo's own values (--help shows them): a tiny model, a synthetic task where thinking helps.
DEMO = dict(model="(built in code)", max_think=24, summary_max_tokens=6, lr=3e-4,
            weight_decay=0.0, updates_per_rollout=1, warmup_steps=800, eval_every=10, eval_grid=3,
            steps=40, save_every=20, micro_batch=64, summary_batch=1024, chunk_size=4096,
            out_dir="out-demo")


def die(msg: str):
    """One clear line and a non-zero exit; no traceback for a user's mistake."""
    if LOCAL_RANK == 0:  # distributed: every rank stops, one of each machine says why
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
    notes = ([f"default: {show(f.default)}"] if shown else []) + ([f"demo: {show(DEMO[f.name])}"] if f.name in DEMO else [])
    return f.metadata["help"] + (f" [{'; '.join(notes)}]" if notes else "")


def parse_args(argv=None) -> Args:
    """Args from the command line. Later wins: defaults < demo values < a resumed run's args.json
    < the preset < flags given. Bad values end here, in one line, before anything heavy loads."""
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] + "\nThe defaults are for one 24 GB GPU; --demo switches to "
        "the demo's values, shown as 'demo: N'.", epilog=__doc__.split("\n\n")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter)
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

    cfg = asdict(Args())
    if given.get("ablation"):  # on the demo task, each preset as it is, evaluated after its last step
        given["demo"] = True
        for k in ("preset", "budgets", "prior", "num_summaries", "thinking_method", "summary_method", "eval_every"):
            if k in given:
                die(f"--ablation runs every preset as it is and evaluates after the last step; "
                    f"drop --{k.replace('_', '-')}")
    if given.get("demo"):
        if "resume" in given:
            die("--demo does not resume; it takes a few minutes, run it again")
        for k in ("model", "data_dir"):
            if k in given:
                die(f"--demo builds its own model and data; drop --{k.replace('_', '-')}")
        if "eval_only" in given:
            die("--demo trains its own model; drop --eval-only")
        cfg.update(DEMO, **({"out_dir": "out-ablation"} if given.get("ablation") else {}))
    resumed = {}
    if "resume" in given:
        given["resume"] = find_checkpoint(given["resume"])
        with open(os.path.join(given["resume"], "args.json")) as f:
            resumed = json.load(f)
        if resumed.get("demo"):
            die(f"--resume {given['resume']}: a checkpoint of the demo, which does not resume; "
                f"run `python train_small.py --demo` again")
        if "model" in given:
            die(f"--resume {given['resume']} holds its own model (trained from {resumed.get('model')}); "
                f"drop --model")
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

    # checks, all before anything heavy loads
    for k, choices in (("prior", ar.PRIORS), ("thinking_method", ar.THINKING_METHODS),
                       ("summary_method", ar.SUMMARY_METHODS)):
        if cfg[k] not in choices:
            die(f"unknown {k.replace('_', ' ')} {cfg[k]!r}; choose one of {', '.join(choices)}")
    for k in ("max_think", "questions_per_step", "traces", "num_summaries", "summary_max_tokens", "steps",
              "updates_per_rollout", "micro_batch", "think_batch", "summary_batch", "chunk_size",
              "eval_size", "eval_every", "eval_grid", "save_every", "ablation_seeds", "threads"):
        if cfg[k] < 1 and not (k == "steps" and cfg["eval_only"]):
            hint = " (to evaluate without training: --eval-only)" if k == "steps" else ""
            die(f"--{k.replace('_', '-')} must be at least 1, got {cfg[k]}{hint}")
    if cfg["warmup_steps"] < 0:
        die(f"--warmup-steps must be at least 0, got {cfg['warmup_steps']}")
    why = {"temperature": " (the loss assumes sampled traces)", "eval_temperature": " (0 = greedy)"}
    for k in ("lr", "temperature", "clip_eps"):
        if not (cfg[k] > 0 and math.isfinite(cfg[k])):  # also NaN and inf
            die(f"--{k.replace('_', '-')} must be > 0{why.get(k, '')}, got {cfg[k]}")
    for k in ("eval_temperature", "weight_decay", "kl_coef"):
        if not (cfg[k] >= 0 and math.isfinite(cfg[k])):
            die(f"--{k.replace('_', '-')} must be >= 0{why.get(k, '')}, got {cfg[k]}")
    if "budgets" in given:
        try:
            budgets = ar.check_budgets(given["budgets"])
        except ValueError as e:
            die(f"--budgets: {e}")
        if budgets[-1] > cfg["max_think"]:
            die(f"--budgets: {budgets[-1]} is beyond the maximum thinking length --max-think {cfg['max_think']}")
    elif resumed and not {"preset", "max_think"} & given.keys():
        budgets = resumed["budgets"]
    else:
        if preset.num_budgets > cfg["max_think"]:
            die(f"{preset.num_budgets} budgets do not fit in --max-think {cfg['max_think']}")
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
    if cfg["device"] != "auto":
        try:
            device = torch.device(cfg["device"])
        except RuntimeError:
            die(f"--device {cfg['device']}: not a device; use auto, cpu, cuda, cuda:1 or mps")
        if device.type == "cuda" and not torch.cuda.is_available():
            die(f"--device {cfg['device']}: no CUDA GPU here (torch {torch.__version__}); use --device cpu")
    return Args(**cfg)


def check_out_dir(args: Args):
    """--out-dir must be a folder we can write, and a fresh run must not mix its logs and checkpoint
    with an earlier run's (the demo always starts afresh). --eval-only writes eval.jsonl and the
    figure into a folder of its own: never one that holds a training run or the demo's results.
    Called before anything heavy loads."""
    out = args.out_dir
    if os.path.exists(out) and not os.path.isdir(out):
        die(f"--out-dir {out} is a file, not a folder")
    parent = os.path.abspath(out)
    missing = []  # the folders we would create, outermost last
    while not os.path.exists(parent):
        missing.append(parent)
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        die(f"--out-dir {out}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        die(f"--out-dir {out}: {parent} is not writable")
    # os.access says yes to root everywhere, and knows nothing of read-only file systems or /proc:
    # create the folder and a file in it, then remove them again
    made = []
    try:
        for folder in reversed(missing):
            try:
                os.mkdir(folder)
            except OSError as e:
                die(f"--out-dir {out}: cannot create a folder in {os.path.dirname(folder)} ({e.strerror})")
            made.append(folder)
        try:
            fd, probe = tempfile.mkstemp(dir=out, prefix=".write-test-")
            os.close(fd)
            os.remove(probe)
        except OSError as e:
            die(f"--out-dir {out}: cannot write a file there ({e.strerror})")
    finally:
        for folder in reversed(made):
            with contextlib.suppress(OSError):
                os.rmdir(folder)
    if args.demo or (args.resume and not args.eval_only):
        return
    # what a run leaves: logs (metrics*.jsonl, eval*.jsonl), checkpoints (ckpt*), the demo's
    # results and the figure
    held = sorted(n for n in (os.listdir(out) if os.path.isdir(out) else [])
                  if re.fullmatch(r"(metrics.*|eval.*)\.jsonl|ckpt.*|demo_results\.json|anytime_accuracy\..*", n))
    if args.eval_only:
        others = [n for n in held if n not in ("eval.jsonl", "anytime_accuracy.png", "anytime_accuracy.txt")]
        if others:
            die(f"--out-dir {out} holds a run ({', '.join(others)}); --eval-only writes into a folder of its "
                f"own: choose another --out-dir")
        if held and not args.overwrite:
            die(f"--out-dir {out} already holds an evaluation ({', '.join(held)}); choose another --out-dir, "
                f"or add --overwrite to replace it")
        return
    if held and not args.overwrite:
        hint = f"continue it with --resume {os.path.join(out, 'ckpt')}, " if "ckpt" in held else ""
        die(f"--out-dir {out} already holds a run ({', '.join(held)}); {hint}choose another --out-dir, "
            f"or add --overwrite to start afresh there")


# ----------------------------------------------------------------------------
# Data: GSM8K (local folder or a one-time download) and the demo task
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
    """[{question, answer}] from a GSM8K JSONL file; the answer is what follows the last '####',
    commas removed ('#### 1,234' -> '1234'). Blank lines are skipped; a bad line is an error
    that names the file and the line."""
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
            if "####" not in obj["answer"]:
                raise ValueError(f"{path}:{n}: malformed GSM8K line: no '####' before the final answer")
            answer = obj["answer"].split("####")[-1].strip().replace(",", "")
            if not answer:
                raise ValueError(f"{path}:{n}: malformed GSM8K line: nothing after '####'")
            rows.append({"question": obj["question"], "answer": answer})
    return rows


def load_gsm8k(split: str, data_dir: str | None) -> list[dict]:
    """GSM8K `split` ('train' or 'test') from data_dir, or downloaded once into CACHE_DIR."""
    if data_dir is None:
        data_dir = CACHE_DIR
        path = os.path.join(data_dir, f"{split}.jsonl")
        if not os.path.isfile(path):
            os.makedirs(data_dir, exist_ok=True)
            url = GSM8K_URL.format(split)
            print(f"downloading GSM8K {split} from {url} into {data_dir}")
            try:  # a timeout: a stalled connection is an error, not a hang
                with urllib.request.urlopen(url, timeout=60) as r, open(path + ".part", "wb") as f:
                    shutil.copyfileobj(r, f)
            except OSError as e:  # URLError, HTTPError and timeouts are all OSErrors
                die(f"could not download GSM8K {split} from {url} ({e}); download train.jsonl and "
                    f"test.jsonl by hand and pass --data-dir with their folder")
            os.replace(path + ".part", path)
    path = os.path.join(data_dir, f"{split}.jsonl")
    if not os.path.isfile(path):
        die(f"{path} not found: --data-dir must hold GSM8K's train.jsonl and test.jsonl")
    try:
        return parse_gsm8k(path)
    except ValueError as e:
        die(str(e))


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
    print(f"tiny model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
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


# ----------------------------------------------------------------------------
# Plumbing: device, seeding, model loading, checkpoints, logging
# ----------------------------------------------------------------------------

def pick_device(name: str) -> torch.device:
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def autocast(device: torch.device):
    """bf16 autocast on a GPU (weights stay fp32 for AdamW); plain fp32 elsewhere."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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
    """Is --model a local folder rather than a Hugging Face hub name? Yes when something exists
    at that path, or when the name cannot be a hub name. Hub names are NAME or ORG/NAME, each
    part of letters, digits, '-', '_' and '.', not starting with '.' or '-'; so a name that
    starts with '/', '.' or '~', has a second '/', or holds any other character (a backslash,
    a space, a colon) is a path. An ORG/NAME that is not there locally is always a hub name."""
    return os.path.exists(name) or re.fullmatch(r"\w[\w.-]*(/\w[\w.-]*)?", name) is None


def cannot_load(name: str, why: str):
    here = os.path.dirname(name)
    also = f"; there is no folder {name} here either" if here and os.path.isdir(here) else ""
    die(f"could not load model {name!r} ({why}{also}). Check the name, or on a machine with "
        f"internet run `hf download {name} --local-dir FOLDER` and pass --model FOLDER.")


def check_hub_model(name: str) -> bool:
    """Before anything heavy loads: a hub name must be reachable or in the local cache.
    Returns whether to load offline (from the cache)."""
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
    """Without transformers' "Writing model shards" / "Loading weights" bars, for the saves and
    loads that happen between steps (our own log says what was saved)."""
    from transformers.utils import logging as hf_logging
    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            hf_logging.enable_progress_bar()


def save_checkpoint(path: str, model, tokenizer, optimizer, step: int, data_pos: int, args: Args):
    """Everything needed to continue exactly: weights, tokenizer, optimiser, step, RNG, data position.

    Never leaves the run without a complete checkpoint: written into path.tmp (args.json last,
    which marks it complete), then path -> path.old, path.tmp -> path, path.old removed. After
    a crash between the two renames, find_checkpoint takes the newest complete one back."""
    weights, optimizer_state = full_state(model, optimizer)  # distributed --fsdp: gathered on rank 0
    if RANK != 0:  # distributed: only rank 0 writes
        return
    tmp, old = path + ".tmp", path + ".old"
    if os.path.isdir(tmp):  # half written by a crash
        shutil.rmtree(tmp)
    with no_hf_bars():
        model.save_pretrained(tmp, state_dict=weights)  # weights None: the model's own
    tokenizer.save_pretrained(tmp)
    torch.save({"optimizer": optimizer_state or optimizer.state_dict(), "step": step, "data_pos": data_pos,
                "rng": rng_state()}, os.path.join(tmp, "trainer_state.pt"))
    with open(os.path.join(tmp, "args.json.part"), "w") as f:
        json.dump(asdict(args), f, indent=1)
    os.replace(os.path.join(tmp, "args.json.part"), os.path.join(tmp, "args.json"))
    if os.path.isdir(path):
        if os.path.isdir(old):
            shutil.rmtree(old)
        os.replace(path, old)
    os.replace(tmp, path)
    if os.path.isdir(old):
        shutil.rmtree(old)


def checkpoint_complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "args.json"))  # written last (save_checkpoint)


def find_checkpoint(path: str) -> str:
    """The checkpoint folder to resume from. If a crash while saving left the newest complete
    checkpoint in path.tmp or path.old instead of path, move it back into place and say so."""
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


def drop_torn_line(path: str):
    """A run killed while appending to a JSONL log can leave half a line at its end, with no
    newline: drop it, and say so. A whole last row only missing its newline gets it back."""
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
    """The rows of a JSONL log written by this script ([] if there is none); a bad line is one
    error naming the file and the line."""
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
    """Keep the JSONL rows of steps <= step: a run killed between two checkpoints has logged
    steps that its resumed run will do again."""
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


def write_json(path: str, obj):
    """Written under a temporary name, then renamed: the file is complete or absent."""
    with open(path + ".part", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".part", path)


def append_jsonl(path: str, row: dict):
    if RANK != 0:  # distributed: only rank 0 writes files
        return
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def progress_bar(total: int, desc: str, plain: bool = False):
    """A tqdm bar when tqdm is installed and we are on a terminal; else, if `plain`, a line on
    stderr at every tenth of `total`; else nothing (and nothing on the other ranks of torchrun).
    Returns (bar or None, update(n))."""
    if tqdm is not None and sys.stderr.isatty() and WORLD == 1:
        bar = tqdm(total=total, desc=desc, leave=False)
        return bar, bar.update
    if not plain or RANK != 0:
        return None, lambda n: None
    done, shown = 0, 0

    def update(n):
        nonlocal done, shown
        done += n
        if done * 10 // total > shown:
            shown = done * 10 // total
            print(f"{desc}: {done} of at most {total} sequences generated", file=sys.stderr, flush=True)
    return None, update


# ----------------------------------------------------------------------------
# Evaluation: anytime accuracy table, JSONL and a plot
# ----------------------------------------------------------------------------

def evaluate_model(model, tokenizer, prompts, truths, args: Args, grid: list[int], plain_progress=False) -> dict:
    """ar.evaluate on its own fixed random stream: evaluations are comparable across steps,
    and the training stream is untouched (so a resumed run continues exactly)."""
    bar, update = progress_bar(len(prompts) * (1 + len(grid)), "eval", plain_progress)
    model.eval()
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), autocast(device):
        torch.manual_seed(args.seed + 12345)
        evaluate_on = ar.evaluate if WORLD == 1 else evaluate_split  # distributed: the prompts split over the ranks
        result = evaluate_on(model, tokenizer, prompts, truths, grid, args.eval_temperature,
                             args.summary_max_tokens, args.think_batch, args.summary_batch, update)
    if bar:
        bar.close()
    return result


def eval_grid(args: Args) -> list[int]:
    """Every args.eval_grid tokens up to the largest budget, which is always included."""
    grid = list(range(args.eval_grid, args.max_think + 1, args.eval_grid))
    return grid if grid and grid[-1] == args.max_think else grid + [args.max_think]


def format_table(results: dict[str, dict]) -> str:
    """Budgets as columns, one row per named evaluation, plus the anytime score."""
    grid = next(iter(results.values()))["budgets"]
    head = f"{'budget':>20} " + " ".join(f"{b:>6}" for b in grid) + "  anytime  think_len"
    lines = [head]
    for name, r in results.items():
        lines.append(f"{name:>20} " + " ".join(f"{a:6.3f}" for a in r["accuracy"])
                     + f"  {r['anytime_score']:7.3f}  {r['mean_think_len']:9.1f}")
    return "\n".join(lines)


def figure_title(model: str, preset: str, num_questions: int, temperature: float) -> str:
    return f"{model}, {preset}\naccuracy on {num_questions} held-out questions, temperature {temperature}"


def plot_curves(results: dict[str, dict], path: str, title: str) -> str:
    """Accuracy against budget, like the paper's curve figure: a PNG at `path` with matplotlib,
    else a text chart in the same place, ending .txt. Returns what to print."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        width = 40
        lines = [title.replace("\n", ": "), "(a text chart; pip install matplotlib for a PNG)"]
        for name, r in results.items():
            lines.append(name)
            for b, a in zip(r["budgets"], r["accuracy"]):
                lines.append(f"  {b:>6} |{'#' * round(a * width):<{width}}| {a:.3f}")
        text = "\n".join(lines)
        with open(path.replace(".png", ".txt"), "w") as f:
            f.write(text + "\n")
        return text + f"\nwrote {path.replace('.png', '.txt')}"
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
    return f"wrote {path}"


# ----------------------------------------------------------------------------
# Distributed: `torchrun --nproc_per_node N train_small.py ...` (in one process every helper does nothing)
# ----------------------------------------------------------------------------
# torchrun starts N copies of this script and gives each its RANK (0..N-1), LOCAL_RANK (its GPU on
# its machine) and WORLD_SIZE (N). A step's B questions are dealt out: rank r takes b = r, r + N, ...
# It rolls them out, scores them and computes their advantages (all per question). The PPO
# mini-batches are the one-process ones, cut from the step's whole trace list; each rank trains its
# own traces of each, with the same normaliser, and the gradients are summed over the ranks before
# clipping and the optimiser step: every rank makes the one-process update. The metrics are computed
# on the gathered batch; only rank 0 prints and writes files.

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
    atexit.register(dist.destroy_process_group)
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


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_sum(*values: float) -> list[float]:
    """Each value summed over the ranks."""
    if WORLD == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    return t.tolist()


def any_rank(flag: bool) -> bool:
    """True on every rank if it is True on one (Ctrl-C: all ranks stop after the same step)."""
    if WORLD == 1:
        return flag
    t = torch.tensor([int(flag)], device=_comm_device())
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
    """The traces (b, g) of a mini-batch of the whole step that `rank` of `world` trains, as (row
    among its own questions, g), in micro-batches: question b is its row b // world. One process:
    all of them, as they are."""
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
    """--fsdp: FSDP2 (fully_shard) on each decoder layer and on the rest (embeddings, output layer):
    each rank keeps 1/N of the fp32 weights, their gradients and AdamW state, on `device`.
    whole_weights gathers the weights for a rollout or an update; the gradients are summed over
    the ranks as without --fsdp (not averaged)."""
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
    """--fsdp: every rank holds all the weights inside (generation and the loss read them as one
    model; the backward passes still sum the gradients into each rank's shard); sharded again on
    the way out. Without --fsdp: nothing."""
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
    """--fsdp: the whole weights and AdamW state, gathered onto rank 0 (all ranks must call), the
    optimiser's in the one-process format, so that a run with any N, with or without --fsdp,
    resumes from it. (None, None) without --fsdp: save the model and optimiser as they are."""
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


# ----------------------------------------------------------------------------
# The training loop
# ----------------------------------------------------------------------------

def rl_step(model, tokenizer, optimizer, prompts, truths, args: Args, prior, device,
            ref_model=None) -> dict:
    """One AnytimeReasoner/BRPO step: rollout, score, advantages, then PPO updates.

    The rollout's N = B*G traces are split into `updates_per_rollout` mini-batches and
    each gets one optimiser update (the authors: 512 traces, 256 per update). The old
    log-probs are computed once, before the first update, so from the second update on
    the ratio differs from 1 and the clip can act. With one update, old = current
    detached: ratio 1 and no extra forward pass. The loss itself is ar.anytime_loss.
    Under torchrun this rank rolls out and trains its share of the questions (the Distributed
    section above); the update and the metrics are those of the whole step.
    """
    B, G, S, A = len(prompts), args.traces, len(args.budgets), args.num_summaries
    mine = list(range(RANK, B, WORLD))  # distributed: this rank's questions; one process: all
    t0 = time.time()
    # 1. rollout: G traces per question, cut at every budget, A summaries after each cut
    model.eval()
    bar, update = progress_bar(B * G * (1 + S * A), "rollout")
    with autocast(device), whole_weights(model):
        ro = ar.rollout(model, tokenizer, [prompts[b] for b in mine], args.budgets, G, A, args.temperature,
                        args.summary_max_tokens, args.think_batch, args.summary_batch,
                        stop_at_box=args.stop_at_box, progress=update)
    if bar:
        bar.close()
    t_gen = time.time() - t0
    gen_tokens = int(ro.think_len.sum()) + sum(len(x) for q in ro.summary_ids for t in q for s in t for x in s)

    # 2. scores and both advantages; row n = i*G + g of thinking_adv / summary_adv is trace (mine[i], g)
    t_score = time.time()
    scores = ar.score_rollout(ro, [truths[b] for b in mine])                   # B,G,S,A
    thinking_adv, summary_adv = ar.rollout_advantages(ro, scores, prior, args.thinking_method,
                                                      args.summary_method)      # N,S  N,S,A
    t_update = time.time()

    # 3. mini-batches of the step's traces (one optimiser update each); this rank's traces of
    #    each (all of them in one process), cut into micro-batches of packed rows
    traces = [(b, g) for b in range(B) for g in range(G)]
    U = min(args.updates_per_rollout, len(traces))
    minibatches = [traces[u * len(traces) // U:(u + 1) * len(traces) // U] for u in range(U)]
    micro = [my_traces(mb, args.micro_batch, RANK, WORLD) for mb in minibatches]
    packed = {m: ar.pack_rollout(ro, tokenizer, list(m)) for mb in micro for m in mb}
    rows = {m: torch.tensor([i * G + g for i, g in m]) for m in packed}
    mask_dtype = torch.bfloat16 if device.type == "cuda" else None  # match autocast's dtype

    # 4. old (and reference) log-probs, once per rollout, before any update
    old, ref = {}, {}
    with torch.no_grad(), autocast(device), whole_weights(model):
        for m in packed:
            if U > 1:   # with one update the loss is on-policy: old = current, no extra forward
                old[m] = ar.packed_logprobs(model, packed[m], args.chunk_size, mask_dtype, args.temperature)
            if ref_model is not None:  # only when --kl-coef > 0
                ref[m] = ar.packed_logprobs(ref_model, packed[m], args.chunk_size, mask_dtype, args.temperature)

    # 5. the updates
    model.train()

    def loss_of(m, normaliser):
        with autocast(device):
            return ar.anytime_loss(model, packed[m], thinking_adv[rows[m]], summary_adv[rows[m]], normaliser,
                                   old.get(m), ref.get(m), args.clip_eps, args.kl_coef, args.temperature,
                                   args.chunk_size, mask_dtype)
    stats, n_tokens, grad_norms = {"clipfrac": 0.0, "approx_kl": 0.0}, 0, []
    for mb_micro, mb in zip(micro, minibatches):
        optimizer.zero_grad(set_to_none=True)
        normaliser = len(mb) * args.budgets[-1]   # a constant: traces in this update (all ranks) x largest budget
        with whole_weights(model):
            for m in mb_micro:
                loss, st = loss_of(m, normaliser)
                loss.backward()
                for k in stats:
                    stats[k] += st[k] * st["tokens"]
                n_tokens += st["tokens"]
            for _ in range(fsdp_idle_passes(model, mb, args.micro_batch)):  # distributed --fsdp only
                (loss_of(next(iter(packed)), normaliser)[0] * 0).backward()
        sum_gradients(model)  # distributed: the gradient of the whole update on every rank
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        grad_norms.append(float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm))  # --fsdp: a DTensor
        optimizer.step()
    t_end = time.time()  # float(clip_grad_norm_) waited for the device

    # distributed: the metrics of the whole step, from every rank's questions in question order
    clipfrac, approx_kl, n_tokens, gen_tokens = all_sum(stats["clipfrac"], stats["approx_kl"], n_tokens, gen_tokens)
    stats = {"clipfrac": clipfrac / max(n_tokens, 1), "approx_kl": approx_kl / max(n_tokens, 1)}  # per trained token
    scores, prompt_index, think_len = gather_rows(mine, B, scores, ro.prompt_index, ro.think_len)
    r = ar.pooled_scores(scores, prompt_index)                                  # B,G,S
    acc = r.mean((0, 1))                                                        # S
    var = ar.variance_diagnostics(r.double(), prior.double(), think_len, args.budgets)
    dt = time.time() - t0
    return {"reward": round(scores.mean().item(), 4), "acc": [round(x, 3) for x in acc.tolist()],
            "think_len": round(think_len.float().mean().item(), 1),
            "clipfrac": round(stats["clipfrac"], 4), "approx_kl": round(stats["approx_kl"], 6),
            "grad_norm": round(sum(grad_norms) / len(grad_norms), 4), "updates": U,
            "gen_tokens": int(gen_tokens),   # sampled (thinking + summaries): each is trained once
            "gen_tok_s": round(gen_tokens / t_gen, 1), "s_per_step": round(dt, 2),
            # where the step's time went: rollout (thinking, summaries), scoring + advantages,
            # PPO updates (packing, old/ref log-probs, forward, backward, optimiser)
            "s_think": round(ro.seconds["think"], 3), "s_summary": round(ro.seconds["summary"], 3),
            "s_score": round(t_update - t_score, 3), "s_update": round(t_end - t_update, 3),
            # Var[R - V] / Var[R] per budget for V = V1, V2, BRPO (NaN: too few traces reach it)
            **{k: [round(x, 4) if x == x else None for x in v.tolist()]
               for k, v in var.items() if k.startswith("var_ratio")}}


def train(args: Args, model, tokenizer, train_set, eval_set, make_prompt, device, tag="",
          optimizer=None, start_step=0, data_pos=0) -> tuple[dict | None, dict | None]:
    """The RL loop: evaluate, then (rollout -> advantages -> update) x steps, evaluating and
    checkpointing every N steps and on Ctrl-C. Returns the first and the last evaluation."""
    os.makedirs(args.out_dir, exist_ok=True)
    metrics_path = os.path.join(args.out_dir, f"metrics{tag}.jsonl")
    eval_path = os.path.join(args.out_dir, f"eval{tag}.jsonl")
    ckpt_path = os.path.join(args.out_dir, f"ckpt{tag}")
    # A fresh run starts its logs afresh, never after an earlier run's; a resumed run drops the
    # rows of steps done after its checkpoint (by a run killed between two saves): each step once.
    for path in (metrics_path, eval_path) if RANK == 0 else ():  # distributed: only rank 0 writes
        if start_step == 0:
            open(path, "w").close()
        else:
            drop_rows_after(path, start_step)
    prior = ar.budget_prior(args.prior, args.budgets)
    grid = eval_grid(args)
    eval_prompts = [make_prompt(x["question"]) for x in eval_set]
    eval_truths = [x["answer"] for x in eval_set]
    optimizer = optimizer or torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    ref_model = None
    if args.kl_coef > 0:  # a frozen copy of the starting weights; never loaded when KL is off
        import copy
        ref_model = copy.deepcopy(model).eval().requires_grad_(False)
    order = np.random.default_rng(args.seed).permutation(len(train_set))  # fixed data order: resumable

    def run_eval(step):
        r = evaluate_model(model, tokenizer, eval_prompts, eval_truths, args, grid)
        append_jsonl(eval_path, {"step": step, **r})
        print(format_table({f"step {step}": r}))
        return r

    first = result = None
    if start_step == 0:
        first = result = run_eval(0)
    elif RANK == 0:  # resumed: "before" is the step-0 evaluation its first run logged (None if not there)
        first = logged_eval(eval_path, 0)
    step = saved = start_step
    interrupted = False

    def on_sigint(signum, frame):  # the first Ctrl-C: finish the step in flight, save, then stop
        nonlocal interrupted
        if interrupted:  # the second: stop at once
            if RANK == 0:
                print("\nCtrl-C again: stopped at once, without saving; "
                      + (f"{ckpt_path} holds step {saved}" if saved else "no checkpoint was saved"), file=sys.stderr)
            raise SystemExit(130)
        interrupted = True
        print("\nCtrl-C: saving a checkpoint after this step (press again to stop at once)", flush=True)
    old_handler = signal.signal(signal.SIGINT, on_sigint)
    try:
        # distributed: any_rank(interrupted) is the same on every rank, so all stop after the same step
        while step < args.steps and not any_rank(interrupted):
            idx = [int(order[(data_pos + i) % len(order)]) for i in range(args.questions_per_step)]
            data_pos += args.questions_per_step
            batch = [train_set[i] for i in idx]
            if WORLD > 1:  # distributed: each rank samples from its own stream, set by (seed, step, rank)
                torch.manual_seed(rank_seed(args.seed, step, RANK))
            m = rl_step(model, tokenizer, optimizer, [make_prompt(x["question"]) for x in batch],
                        [x["answer"] for x in batch], args, prior, device, ref_model)
            step += 1
            append_jsonl(metrics_path, {"step": step, **m, "questions": idx})  # indices into train_set
            print(f"{tag.strip('-') or 'step'} {step:4d} | reward {m['reward']:.3f} | acc/budget "
                  + " ".join(f"{a:.2f}" for a in m["acc"]) + f" | think {m['think_len']:.0f} tok"
                  f" | clip {m['clipfrac']:.3f} | kl {m['approx_kl']:.1e} | {m['gen_tok_s']:.0f} gen tok/s"
                  f" | {m['s_per_step']:.1f} s/step", flush=True)
            if step % args.eval_every == 0 or step == args.steps:
                result = run_eval(step)
            if step % args.save_every == 0 or step == args.steps or any_rank(interrupted):
                save_checkpoint(ckpt_path, model, tokenizer, optimizer, step, data_pos, args)
                saved = step
        stopped = any_rank(interrupted)
        if stopped and saved != step:  # Ctrl-C came between the save check and the loop's
            save_checkpoint(ckpt_path, model, tokenizer, optimizer, step, data_pos, args)
    finally:
        signal.signal(signal.SIGINT, old_handler)
    if stopped:
        launch = "python" if WORLD == 1 else "torchrun --nproc_per_node N"  # any N
        demo = "this run starts afresh when the ablation runs again" if args.ablation else \
            "the demo does not resume: run `python train_small.py --demo` again (it reuses the warm-up)"
        print(f"stopped at step {step}; " + (demo if args.demo else
              f"continue with: {launch} train_small.py --resume {ckpt_path}"))
        sys.exit(130)
    return (first, result) if RANK == 0 else (None, None)  # distributed: rank 0 draws the figure


# ----------------------------------------------------------------------------
# Entry points
# ----------------------------------------------------------------------------

def main_demo(args: Args, device):
    """Warm up a tiny model, then train AnytimeReasoner and GRPO from the same start, same steps.

    The runs write into out_dir/partial. Only once both are done do their files replace the
    previous demo's in out_dir: a demo stopped early never destroys a finished one. The
    warm-up is kept in out_dir and reused by the next demo of the same seed."""
    torch.set_num_threads(args.threads)  # not one per core: the result depends on the count
    seed_everything(args.seed)
    tokenizer = tiny_tokenizer()
    train_set, eval_set = demo_data(args)
    os.makedirs(args.out_dir, exist_ok=True)
    start = warmed_up_model(args, tokenizer, device, args.out_dir)
    staging = os.path.join(args.out_dir, "partial")
    if os.path.isdir(staging):  # a demo stopped early: the demo does not resume
        shutil.rmtree(staging)
    if os.path.isfile(os.path.join(args.out_dir, "demo_results.json")):
        print(f"{args.out_dir} holds a finished demo; it stays there until this one is done (in {staging})")
    runs = {args.preset: args, "grpo": preset_args(args, "grpo")} if args.preset != "grpo" else {"grpo": args}
    results = {}
    for name, run_args in runs.items():
        from transformers import AutoModelForCausalLM
        seed_everything(args.seed)
        with no_hf_bars():
            model = AutoModelForCausalLM.from_pretrained(start).to(device)
        print(f"\n=== {name}: S={len(run_args.budgets)} budgets {run_args.budgets}, "
              f"A={run_args.num_summaries}, prior {run_args.prior}, thinking {run_args.thinking_method}, "
              f"summary {run_args.summary_method}")
        before, results[name] = train(Args(**{**asdict(run_args), "out_dir": staging}), model, tokenizer,
                                      train_set, eval_set, demo_prompt, device, tag="-" + name)
        results = {"before": before, **results} if "before" not in results else results
    title = figure_title("tiny demo model", " vs ".join(runs), len(eval_set), args.eval_temperature)
    print("\n" + title.replace("\n", ": "))
    print(format_table(results))
    chart = plot_curves(results, os.path.join(staging, "anytime_accuracy.png"), title)
    if not chart.startswith("wrote"):  # the text chart, without matplotlib
        print(chart)
    write_json(os.path.join(staging, "demo_results.json"), {"seed": args.seed, "steps": args.steps, **results})
    publish_demo(staging, args.out_dir)
    figure = next(n for n in ("anytime_accuracy.png", "anytime_accuracy.txt")
                  if os.path.isfile(os.path.join(args.out_dir, n)))
    print(f"wrote {args.out_dir}: demo_results.json, {figure}, and per run metrics-*.jsonl, eval-*.jsonl, ckpt-*")
    return results


def main_eval_only(args: Args, device, offline: bool) -> dict:
    """--eval-only: the anytime curve of --model (or of the --resume checkpoint), no training.
    The same evaluation as training's: grid, settings, its own fixed random stream."""
    eval_set = load_gsm8k("test", args.data_dir)[:args.eval_size]
    seed_everything(args.seed)
    model, tokenizer = load_model(args.resume or args.model, device, offline)
    step = checkpoint_step(args.resume) if args.resume else 0
    grid = eval_grid(args)
    print(f"{args.model}" + (f" trained to step {step} ({args.resume})" if args.resume else "")
          + f": {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters on {device}; "
          f"{len(eval_set)} questions at budgets {grid}", flush=True)
    r = evaluate_model(model, tokenizer, [ar.format_prompt(tokenizer, x["question"]) for x in eval_set],
                       [x["answer"] for x in eval_set], args, grid, plain_progress=True)
    if RANK != 0:  # distributed: only rank 0 writes files
        return r
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, "eval.jsonl"), "w") as f:
        f.write(json.dumps({"step": step, "model": args.model, "checkpoint": args.resume, **r}) + "\n")
    print(format_table({f"step {step}": r}))
    title = figure_title(args.model, f"{args.preset}, step {step}" if args.resume else "not trained",
                         len(eval_set), args.eval_temperature)
    print(plot_curves({f"step {step}": r}, os.path.join(args.out_dir, "anytime_accuracy.png"), title))
    return r


# ----------------------------------------------------------------------------
# The paper's ablation at toy scale: every preset, several seeds, on the demo task
# ----------------------------------------------------------------------------

# The paper's runs in the order of its argument: GRPO, each ingredient added to it, then
# AnytimeReasoner with each prior.
ABLATION = ("grpo", "grpo+linear", "grpo+decouple", "grpo+vr", "grpo+vr+decouple", "ar-base", "ar-linear",
            "ar-uniform")
# Flags that do not make another ablation: where it is written, its seeds, whether to start afresh.
NOT_SETTINGS = ("out_dir", "overwrite", "resume", "seed", "ablation_seeds")
# The variance figure: this many traces for each of this many held-out questions; a budget
# reached by fewer traces than one question's has no ratio (too few for a variance).
VARIANCE_QUESTIONS, VARIANCE_TRACES = 32, 32


def ablation_settings(args: Args) -> dict:
    return {k: v for k, v in asdict(args).items() if k not in NOT_SETTINGS}


def variance_on_rollouts(model, tokenizer, eval_set: list[dict], args: Args) -> dict:
    """The paper's variance figure for one model: VARIANCE_TRACES traces for each of the first
    VARIANCE_QUESTIONS held-out questions, sampled at the training temperature, cut at 4 budgets
    with 4 summaries each (ar-uniform's rollout); Var[R - V] / Var[R] per budget for V = V1, V2
    and BRPO under the uniform prior, over the traces that reach each segment (`reaching`);
    None where fewer than VARIANCE_TRACES traces reach it or their returns are all equal."""
    budgets = ar.evenly_spaced_budgets(args.max_think, 4)
    questions = eval_set[:VARIANCE_QUESTIONS]
    model.eval()
    with torch.random.fork_rng(), torch.no_grad():  # its own random stream, as the evaluations
        torch.manual_seed(args.seed + 54321)
        ro = ar.rollout(model, tokenizer, [demo_prompt(q["question"]) for q in questions], budgets,
                        VARIANCE_TRACES, 4, args.temperature, args.summary_max_tokens, args.think_batch,
                        args.summary_batch)
    r = ar.pooled_scores(ar.score_rollout(ro, [q["answer"] for q in questions]), ro.prompt_index)  # B,G,S
    var = ar.variance_diagnostics(r.double(), ar.budget_prior("uniform", budgets).double(), ro.think_len, budgets)
    reaching = (ro.think_len[..., None] > torch.tensor([0] + budgets[:-1])).sum((0, 1))  # S
    return {"budgets": budgets, "questions": len(questions), "traces": VARIANCE_TRACES, "reaching": reaching.tolist(),
            **{k[len("var_ratio_"):]: [round(x, 4) if math.isfinite(x) and n >= VARIANCE_TRACES else None
                                       for x, n in zip(v.tolist(), reaching.tolist())]
               for k, v in var.items() if k.startswith("var_ratio_")}}


def ablation_run(args: Args, name: str, start: str, folder: str, train_set, eval_set, tokenizer, device) -> dict:
    """One preset from the warm-up in `start`, into folder/name; its result.json, written last,
    marks it finished. Compute is reported beside the score: seconds (wall and CPU; with
    --threads 1 the CPU seconds are about the wall seconds of a quiet machine) and tokens generated."""
    from transformers import AutoModelForCausalLM
    run_dir = os.path.join(folder, name)
    if os.path.isdir(run_dir):  # stopped midway: runs do not resume, start it again
        shutil.rmtree(run_dir)
    run_args = Args(**{**asdict(preset_args(args, name)), "out_dir": run_dir, "eval_every": args.steps})
    seed_everything(args.seed)
    with no_hf_bars():
        model = AutoModelForCausalLM.from_pretrained(start).to(device)
    print(f"\n=== seed {args.seed}, {name}: S={len(run_args.budgets)} budgets {run_args.budgets}, "
          f"A={run_args.num_summaries}, prior {run_args.prior}, thinking {run_args.thinking_method}, "
          f"summary {run_args.summary_method}", flush=True)
    wall, cpu = time.time(), time.process_time()
    before, after = train(run_args, model, tokenizer, train_set, eval_set, demo_prompt, device)
    wall, cpu = time.time() - wall, time.process_time() - cpu
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        steps = [json.loads(line) for line in f if line.strip()]
    result = {"preset": name, "seed": args.seed, "steps": len(steps), "before": before, "after": after,
              "wall_seconds": round(wall, 1), "cpu_seconds": round(cpu, 1),
              "step_seconds": round(sum(m["s_per_step"] for m in steps), 1),
              "generated_tokens": sum(m["gen_tokens"] for m in steps),   # thinking + summaries
              "loadavg": [round(x, 2) for x in os.getloadavg()]}  # how busy the machine was
    write_json(os.path.join(run_dir, "result.json"), result)
    return result


def summarise_ablation(runs: list[dict], variance: dict[str, list[dict]]) -> dict:
    """Per preset over seeds: accuracy per budget (mean), anytime score (mean, min, max),
    thinking tokens, seconds and tokens per run (mean); the variance figure's ratios (mean,
    min, max over seeds) for each model measured (variance: label -> one result per seed)."""
    def mean(xs):
        return sum(xs) / len(xs)

    def spread(lists):  # per budget: mean, min, max over seeds (None where a seed has none)
        cols = [[x for x in col if x is not None and math.isfinite(x)] for col in zip(*lists)]
        return {"mean": [round(mean(c), 4) if c else None for c in cols],
                "min": [min(c) if c else None for c in cols], "max": [max(c) if c else None for c in cols]}

    rows = {"before": [r["before"] for r in runs if r["preset"] == ABLATION[0]]}
    rows.update({name: [r["after"] for r in runs if r["preset"] == name] for name in ABLATION})
    table = {}
    for name, evals in rows.items():
        scores = [e["anytime_score"] for e in evals]
        table[name] = {"budgets": evals[0]["budgets"],
                       "accuracy": [round(mean(c), 4) for c in zip(*(e["accuracy"] for e in evals))],
                       "anytime_score": round(mean(scores), 4), "min": min(scores), "max": max(scores),
                       "mean_think_len": round(mean([e["mean_think_len"] for e in evals]), 1), "seeds": len(evals)}
        done = [r for r in runs if r["preset"] == name]
        for k in ("wall_seconds", "cpu_seconds", "step_seconds", "generated_tokens"):
            if done and name != "before":
                table[name][k] = round(mean([r[k] for r in done]), 1)
    variance = {label: {"budgets": v[0]["budgets"], **{k: spread([x[k] for x in v]) for k in ("v1", "v2", "brpo")},
                        "reaching": [sum(x["reaching"][i] for x in v) / len(v) for i in range(len(v[0]["budgets"]))]}
                for label, v in variance.items() if v}
    return {"table": table, "variance": variance}


def ablation_table(summary: dict) -> str:
    """The table as Markdown: budgets as columns, one row per preset."""
    table = summary["table"]
    grid = table["before"]["budgets"]
    lines = ["| run | " + " | ".join(map(str, grid)) + " | anytime score: mean (min–max) | thinking tokens "
             "| wall s / run | CPU s / run | tokens generated / run |",
             "|---" * (len(grid) + 6) + "|"]
    for name, t in table.items():
        tokens = t.get("generated_tokens", 0)
        compute = [f"{t['wall_seconds']:.0f}", f"{t['cpu_seconds']:.0f}",
                   f"{tokens / 1e3:.0f}k" if tokens >= 1e4 else f"{tokens:.0f}"] if "wall_seconds" in t else ["–"] * 3
        lines.append(f"| {name} | " + " | ".join(f"{a:.2f}" for a in t["accuracy"])
                     + f" | **{t['anytime_score']:.3f}** ({t['min']:.3f}–{t['max']:.3f}) | {t['mean_think_len']:.1f} | "
                     + " | ".join(compute) + " |")
    for label, v in summary["variance"].items():
        lines += ["", f"Var[R - V] / Var[R] per budget, {label} (mean over seeds, min–max):", "",
                  "| baseline | " + " | ".join(map(str, v["budgets"])) + " |", "|---" * (len(v["budgets"]) + 1) + "|"]
        for k in ("v1", "v2", "brpo"):
            cells = [f"{m:.3f} ({lo:.3f}–{hi:.3f})" if m is not None else "–"
                     for m, lo, hi in zip(v[k]["mean"], v[k]["min"], v[k]["max"])]
            lines.append(f"| {k.upper() if k != 'brpo' else 'BRPO'} | " + " | ".join(cells) + " |")
        lines.append("| traces reaching the segment | " + " | ".join(f"{n:.0f}" for n in v["reaching"]) + " |")
    return "\n".join(lines)


def plot_ablation(summary: dict, folder: str, title: str) -> list[str]:
    """ablation_curves (accuracy against budget per preset, seeds' mean) and ablation_variance
    (Var[R - V] / Var[R] per budget, seeds' mean with min-max bars): PNGs with matplotlib, else
    text charts. Returns the paths written."""
    table, variance = summary["table"], summary["variance"]
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        width = 40
        lines = [title, "(a text chart; pip install matplotlib for a PNG)"]
        for name, t in table.items():
            lines.append(f"{name} (anytime {t['anytime_score']:.3f})")
            lines += [f"  {b:>6} |{'#' * round(a * width):<{width}}| {a:.3f}" for b, a in zip(t["budgets"], t["accuracy"])]
        curves = os.path.join(folder, "ablation_curves.txt")
        with open(curves, "w") as f:
            f.write("\n".join(lines) + "\n")
        lines = [f"Var[R - V] / Var[R] per budget (mean over seeds; {VARIANCE_TRACES} traces per question; "
                 "bars end at 1.5)",
                 "(a text chart; pip install matplotlib for a PNG)"]
        for label, v in variance.items():
            lines.append(label)
            for i, b in enumerate(v["budgets"]):  # budget by budget, the three baselines side by side
                lines += [f"  {b:>4} {k:>4} |{'#' * round(min(v[k]['mean'][i], 1.5) * width):<{round(1.5 * width)}}| "
                          f"{v[k]['mean'][i]:.3f}" for k in ("v1", "v2", "brpo") if v[k]["mean"][i] is not None]
        path = os.path.join(folder, "ablation_variance.txt")
        with open(path, "w") as f:
            f.write("\n".join(lines) + "\n")
        return [curves, path]
    plt.figure(figsize=(7, 4.5))
    plt.title(title.replace(": ", ":\n", 1), fontsize=9)
    for name, t in table.items():
        style = ":" if name == "before" else "--" if name.startswith("grpo") else "-"
        plt.plot(t["budgets"], t["accuracy"], style, marker="o", markersize=3,
                 label=f"{name} ({t['anytime_score']:.3f}, {t['min']:.3f}–{t['max']:.3f})")
    plt.xlabel("thinking budget (tokens)")
    plt.ylabel("accuracy (mean over seeds)")
    plt.legend(fontsize=7, title="anytime score: mean, min–max", title_fontsize=7)
    plt.grid(alpha=0.3)
    plt.tight_layout()
    curves = os.path.join(folder, "ablation_curves.png")
    plt.savefig(curves, dpi=100)
    plt.close()
    fig, axes = plt.subplots(1, len(variance), figsize=(3.5 * len(variance), 3.5), squeeze=False)
    for ax, (label, v) in zip(axes[0], variance.items()):
        for k, name in (("v1", "V1"), ("v2", "V2"), ("brpo", "BRPO")):
            keep = [i for i, m in enumerate(v[k]["mean"]) if m is not None]
            m = [v[k]["mean"][i] for i in keep]
            err = [[max(0, m[j] - v[k]["min"][i]) for j, i in enumerate(keep)],  # the mean is rounded
                   [max(0, v[k]["max"][i] - m[j]) for j, i in enumerate(keep)]]
            ax.errorbar([v["budgets"][i] for i in keep], m, yerr=err, marker="o", markersize=3, capsize=2, label=name)
        ax.axhline(1, color="grey", linewidth=0.8)  # above 1 the baseline adds variance
        ax.set_title(label, fontsize=9)
        ax.set_xticks(v["budgets"])
        ax.set_xlabel("budget (end of segment)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("Var[R - V] / Var[R]")
    axes[0][0].legend(fontsize=8)
    plt.tight_layout()
    path = os.path.join(folder, "ablation_variance.png")
    plt.savefig(path, dpi=100)
    plt.close()
    return [curves, path]


def prepare_ablation_folder(args: Args):
    """A folder holds one ablation: its settings are in ablation.json, and an ablation with other
    settings is refused (one line) unless --overwrite, which removes what an ablation writes
    (seedN/ folders, ablation* files) and nothing else."""
    out = args.out_dir
    manifest = os.path.join(out, "ablation.json")
    settings = ablation_settings(args)
    if os.path.isfile(manifest) and not args.overwrite:
        with open(manifest) as f:
            held = json.load(f)["settings"]
        differ = [f"--{k.replace('_', '-')} {held.get(k)} there, {settings.get(k)} now"
                  for k in sorted(set(held) | set(settings)) if held.get(k) != settings.get(k)]
        if differ:
            die(f"{out} holds an ablation with other settings ({'; '.join(differ)}); choose another "
                f"--out-dir, or add --overwrite to start afresh there")
    if args.overwrite:  # only what an ablation writes: never the rest of the folder
        for name in os.listdir(out) if os.path.isdir(out) else []:
            path = os.path.join(out, name)
            if name.startswith("seed") and name[4:].isdigit() and os.path.isdir(path):
                shutil.rmtree(path)
            elif name.startswith("ablation") and os.path.isfile(path):
                os.remove(path)
    os.makedirs(out, exist_ok=True)
    if not os.path.isfile(manifest):
        import transformers
        write_json(manifest, {"settings": settings, "torch": torch.__version__,
                              "transformers": transformers.__version__})


def main_ablation(args: Args, device):
    """Every preset of the paper, for seeds --seed .. --seed + n - 1, each seed's presets from one
    warm-up with the same questions and steps; then one table and two figures. A finished run
    keeps its folder (seedN/preset/ with result.json, written last) and is not redone when the
    ablation runs again; a folder holds the runs of one ablation only (ablation.json)."""
    torch.set_num_threads(args.threads)  # not one per core: the result depends on the count
    prepare_ablation_folder(args)
    out = args.out_dir
    tokenizer = tiny_tokenizer()
    seeds = list(range(args.seed, args.seed + args.ablation_seeds))
    runs, variance, kept = [], {"warmed-up model": [], "after ar-uniform": []}, 0
    t0 = time.time()
    for seed in seeds:
        seed_args = Args(**{**asdict(args), "seed": seed})
        folder = os.path.join(out, f"seed{seed}")
        os.makedirs(folder, exist_ok=True)
        train_set, eval_set = demo_data(seed_args)
        start = warmed_up_model(seed_args, tokenizer, device, folder)
        for name in ABLATION:
            path = os.path.join(folder, name, "result.json")
            if os.path.isfile(path):
                with open(path) as f:
                    runs.append(json.load(f))
                kept += 1
                continue
            try:
                runs.append(ablation_run(seed_args, name, start, folder, train_set, eval_set, tokenizer, device))
            except SystemExit as e:  # Ctrl-C: train() has said so
                if e.code == 130:
                    print(f"the ablation continues where it stopped (the finished runs are kept) when run "
                          f"again: python train_small.py {' '.join(sys.argv[1:])}")
                raise
        # the variance figure, on the warmed-up model and on the model ar-uniform trained
        for label, name, model_dir in (("warmed-up model", "warmup", start),
                                       ("after ar-uniform", "ar-uniform", os.path.join(folder, "ar-uniform", "ckpt"))):
            path = os.path.join(folder, f"variance-{name}.json")
            if not os.path.isfile(path):
                from transformers import AutoModelForCausalLM
                with no_hf_bars():
                    model = AutoModelForCausalLM.from_pretrained(model_dir).to(device)
                write_json(path, variance_on_rollouts(model, tokenizer, eval_set, seed_args))
            with open(path) as f:
                variance[label].append(json.load(f))
    if kept:
        print(f"\nkept {kept} runs finished earlier in {out}")
    summary = summarise_ablation(runs, variance)
    title = (f"tiny demo model, {len(seeds)} seeds x {len(ABLATION)} presets, {args.steps} steps: "
             f"accuracy on {args.eval_size} held-out questions, temperature {args.eval_temperature}")
    table = ablation_table(summary)
    print("\n" + title + "\n\n" + table)
    with open(os.path.join(out, "ablation_table.md"), "w") as f:
        f.write(title + "\n\n" + table + "\n")
    write_json(os.path.join(out, "ablation_results.json"), {"seeds": seeds, **summary})
    figures = plot_ablation(summary, out, title)
    print(f"\nwrote {os.path.join(out, 'ablation_table.md')}, ablation_results.json, "
          + ", ".join(os.path.basename(p) for p in figures) + f" ({time.time() - t0:.0f} s)")
    return summary


def main(argv=None):
    args = parse_args(argv)
    check_out_dir(args)
    check_distributed(args)                               # distributed: torchrun's own checks
    device = init_distributed(pick_device(args.device))   # distributed: one GPU (or CPU) per process
    if args.demo:
        return main_ablation(args, device) if args.ablation else main_demo(args, device)
    if args.resume and not args.eval_only:  # the logs and the step, before anything heavy loads
        start_step = checkpoint_step(args.resume)
        if start_step >= args.steps:
            print(f"nothing to do: the checkpoint is at step {start_step}; pass --steps N with N > {start_step}")
            return
        if RANK == 0:  # distributed: only rank 0 writes files
            for name in ("metrics.jsonl", "eval.jsonl"):
                drop_rows_after(os.path.join(args.out_dir, name), start_step)
    offline = check_hub_model(args.resume or args.model)
    if args.eval_only:
        return main_eval_only(args, device, offline)
    with machine_rank_zero_first():                       # distributed: one download per machine
        train_set = load_gsm8k("train", args.data_dir)
        eval_set = load_gsm8k("test", args.data_dir)[:args.eval_size]
    seed_everything(args.seed)
    model, tokenizer = load_model(args.resume or args.model, torch.device("cpu") if args.fsdp else device, offline)
    # recompute activations in backward: memory for speed (transformers 5 renamed the method)
    (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    model.config.use_cache = True  # generate() still uses the KV cache in eval mode
    print(f"{args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters on {device}; "
          f"preset {args.preset}, budgets {args.budgets}, prior {args.prior}")
    if args.fsdp:
        shard_model(model, device)                        # distributed: 1/N of the weights on each GPU
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    start_step, data_pos = 0, 0
    if args.resume:
        state = torch.load(os.path.join(args.resume, "trainer_state.pt"), weights_only=False,
                           map_location="cpu")  # distributed: every rank reads it, not all onto one GPU
        load_optimizer_state(model, optimizer, state["optimizer"])  # distributed --fsdp: each rank its shard
        for group in optimizer.param_groups:  # the saved ones, unless --lr or --weight-decay was given
            group.update(lr=args.lr, weight_decay=args.weight_decay)
        start_step, data_pos = state["step"], state["data_pos"]
        set_rng_state(state["rng"])
        print(f"resumed from {args.resume} at step {start_step} of {args.steps}")

    def make_prompt(q):
        return ar.format_prompt(tokenizer, q)
    before, after = train(args, model, tokenizer, train_set, eval_set, make_prompt, device,
                  optimizer=optimizer, start_step=start_step, data_pos=data_pos)
    if before and after:
        print(format_table({"before": before, "after": after}))
        title = figure_title(args.model, args.preset, len(eval_set), args.eval_temperature)
        print(plot_curves({"before": before, "after": after}, os.path.join(args.out_dir, "anytime_accuracy.png"),
                          title))


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # Ctrl-C outside the training loop (loading, warm-up, first evaluation)
        if LOCAL_RANK == 0:  # distributed: one line per machine
            print("\ninterrupted (Ctrl-C)", file=sys.stderr)
        sys.exit(130)
