"""AnytimeReasoner with Budget Relative Policy Optimization (BRPO), in one file.

A minimal, single-GPU reimplementation of

    Optimizing Anytime Reasoning via Budget Relative Policy Optimization
    Qi, Liu, Pang, Du, Lee, Lin, 2025, arXiv 2505.13438

The model thinks once per question (up to the largest budget); the thinking is cut at every
budget b_s, a short summary ("**Final Answer** ... \\boxed{}") is sampled after each cut, and
every summary is scored. Thinking tokens are then rewarded for how good the answers at *all
later budgets* are (weighted by a budget prior), against a baseline that mixes the trace's own
progress so far (V1) with the group mean (V2). That is BRPO. Summaries get their own,
decoupled advantage, and one PPO-clip loss trains both (anytime_loss).

Run it:
    python train_small.py                      # one GPU, Qwen2.5-0.5B-Instruct on GSM8K
    python train_small.py --demo               # CPU, offline, minutes
    python -m experiments.worked_example       # BRPO's numbers on a hand-made case, seconds
    python -m pytest -q test_anytime_reasoner.py

Reading order: top to bottom is the algorithm, in the order data flows:
    1 prompts -> 2 budget prior -> 3 rollout -> 4 rewards -> 5 advantages (thinking_advantages:
    BRPO; summary_advantages: decoupled) -> 6 packed log-probs -> 7 the loss (anytime_loss, the
    whole objective) -> 8 evaluation -> 9 the paper's runs (PRESETS).
Then the engineering, to skip on a first read: appendix A, the answer checker (long only because
it must be safe on model text: no eval, bounded time; its interface is extract_answer and
answers_match); B, the sampling engine (generate(): Hugging Face `generate` with the stopping
rules, and the reuse of the thinking's KV cache, the keys and values of the tokens already read,
for the summaries). The input checks sit above section 1. To copy one piece, take everything
above section 1 and the piece's section: torch alone (the checker sympy; transformers only generation).

Shapes used throughout (letters defined once, here):
    B questions, G thinking traces per question, S budgets, A summaries per
    (trace, budget), N = B*G traces, T tokens of a packed sequence.
Every public function checks the rank of its tensors and that the letters agree
between its arguments; a wrong shape is a ValueError that names the expected one.

The objective and its loss, as in the README (b_s the budgets, s = 0..S-1, b_{-1} = 0, p_s the
prior; at s = 0 the baseline is V2 alone):
    J       = sum_s p_s * E[score of the answer given after the thinking is cut at b_s]
    score   = 1 iff the last box of the summary's first paragraph is right and it adds no </think>
    r[g,s]  = mean score of trace g's summaries at budget s; budgets that share one summary prompt
              (a trace closed before both) pool: the mean of all their k*A scores
    R[g,s]  = sum_{k>=s} p_k r[g,k]          return of thinking segment (b_{s-1}, b_s]
    V2[g,s] = mean over the G traces of R[.,s]    the group baseline, as in GRPO
    prev    = sum_{k<s} 2^k r[g,k] / sum_{k<s} 2^k,   V1[g,s] = prev * sum_{k>=s} p_k
    A[g,s]  = R[g,s] - (s * V1[g,s] + (S - s) * V2[g,s]) / S        BRPO
    A_sum   = score - mean score of its siblings (same trace, same prompt): the decoupled summary
              advantage; with A = 1 (no siblings), score - mean over the G traces at budget s
    loss    = 1/Z sum_i max(-A_i ratio_i, -A_i clip(ratio_i, 1-eps, 1+eps))   PPO-clip, over the
              trained tokens i; ratio_i = pi(i) / pi_old(i), Z = traces in the update x b_{S-1},
              A_i = A[g,s] for a thinking token of segment s, A_sum for a summary's tokens
    row     = one per trace: prompt, thinking, its S*A summary blocks; a summary attends to the
              prompt, the thinking up to its cut, and itself (the mask: section 6)
Tokens of segment s can only change the answers at budgets s and later, hence k >= s. V1
predicts those answers from the ones the trace already gave, weighted 2^k: an answer at a later
budget comes from a longer thought, so it is better evidence of where the trace stands now, and
outweighs all earlier ones together. Early on, V1 rests on few answers and V2 is the better
guess; late, the trace's own history is: hence the weights s/S and (S-s)/S. The paper shows this
mix has a lower variance than either baseline alone (variance_diagnostics measures it). At ratio
1 (on-policy) the loss's gradient is REINFORCE's, -A * grad log pi. sdpa and eager, Hugging
Face's two attention implementations, both take the packed mask.

Where this departs from the paper, which follows the authors' code (a verl fork,
vLLM, 8 GPUs) where the two differ; the reasons are in docs/departures.md:
 1. Rollouts use Hugging Face `generate`, not vLLM; summaries run to EOS or
    summary_max_tokens (stop_at_box=True stops them at their box: opt-in).
 2. Budgets that share one summary prompt share the mean of all its k*A samples
    (the authors: each budget the mean of its own A).
 3. The loss divides by a constant, traces in the update x largest budget.
 4. The answer checker never evals: its own parser, box lists ("6 and 8" is not
    8), rounded decimals within 1e-6, blank lines around the answer paragraph.
 5. summary_method "grpo" with A > 1 trains all A summaries of the last budget
    (the authors: only the last of them; no paper run uses that combination).
As the authors, where the paper leaves room: a trace ending in EOS is cut like
a running one and scores 0 where its EOS is in the summary prompt; 2 PPO updates
per rollout against old log-probs computed once (train_small.py); the loss uses
log softmax(logits / temperature), the distribution the rollout sampled from.
"""
from __future__ import annotations

import bisect
import functools
import math
import operator
import re
import time
import warnings
from dataclasses import dataclass, field
from fractions import Fraction
from types import SimpleNamespace
from typing import Tuple, Union

import torch
from torch.utils.checkpoint import checkpoint


# ----------------------------------------------------------------------------
# Input checks, used by sections 2-8 (engineering: skip on a first read)
# ----------------------------------------------------------------------------

_LETTERS = {"B": "questions", "G": "traces per question", "S": "budgets", "A": "summaries per (trace, budget)",
            "N": "traces", "T": "tokens"}


def _check(*args, known: dict | None = None) -> dict:
    """Check the (name, x, "B,G,S") tensors of one call (x None: not given; known: {letter: (size, whose)})
    for one dimension per letter, one size per letter, a prior that is a distribution, a prompt_index of
    budget indices, float log-probs. A ValueError names the argument that differs from the rest."""
    votes, wants = {d: [(n, whose)] for d, (n, whose) in (known or {}).items()}, {}
    for name, x, dims in args:
        if x is None:
            continue
        letters, is_tensor = dims.split(","), isinstance(x, torch.Tensor)
        wants[name] = f"[{', '.join(letters)}] ({', '.join(_LETTERS[d] for d in letters)})"
        if not is_tensor or x.dim() != len(letters):
            one = is_tensor and letters[0] == "B" and x.dim() == len(letters) - 1
            hint = "; for a single question use x[None]" if one else ""
            got = f"{x.dim()}-D shape {tuple(x.shape)}" if is_tensor else type(x).__name__
            raise ValueError(f"{name} must have shape {wants[name]}, got {got}{hint}")
        for d, n in zip(letters, x.shape):
            votes.setdefault(d, []).append((n, name))
    for d, vs in votes.items():
        most = max((n for n, _ in vs), key=[n for n, _ in vs].count)   # the size most arguments have
        for n, name in (v for v in vs if v[0] != most):
            rest = [whose for m, whose in vs if m == most]
            raise ValueError(f"{name} {'has' if name in wants else 'have'} {d} = {n} ({_LETTERS[d]}) where "
                             f"{' and '.join(rest)} {'has' if len(rest) == 1 and rest[0] in wants else 'have'} "
                             f"{d} = {most}" + (f"; expected shape {wants[name]}" if name in wants else ""))
    for name, x, _ in (a for a in args if a[1] is not None):
        # budget_prior's p = w / sum(w) rounds each p_s once (<= eps/2 of it), so S of them sum to 1
        # within S eps/2: S eps allowed, eps of float32 or of a coarser dtype (a cast keeps float32's)
        eps = max(torch.finfo(x.dtype).eps if x.is_floating_point() else 0.0, torch.finfo(torch.float32).eps)
        if name == "prior" and ((x < 0).any() or abs(x.double().sum().item() - 1) > x.numel() * eps):
            raise ValueError(f"prior must be >= 0 and sum to 1 (a distribution over the budgets), got "
                             f"{[round(p, 4) for p in x.tolist()]}; see budget_prior")
        S = votes["S"][0][0] if "S" in votes else 0
        if name == "prompt_index" and (x.is_floating_point() or x.dtype == torch.bool
                                       or x.numel() and (x.min() < 0 or x.max() >= S)):
            raise ValueError(f"prompt_index must be integer budget indices 0..{S - 1} (S = {S}), got {x.dtype} "
                             f"{x.min().item()}..{x.max().item()}")
        if name.endswith("logprobs") and not x.is_floating_point():
            raise ValueError(f"{name} must be floating-point log-probabilities, got dtype {x.dtype}")
    return {d: vs[0][0] for d, vs in votes.items()}


def _check_normaliser(z) -> None:
    try:
        ok = not isinstance(z, (str, bytes, bool)) and float(z) > 0 and math.isfinite(float(z))
    except (TypeError, ValueError, RuntimeError):   # not a number, or a tensor of many
        ok = False
    if not ok:
        raise ValueError(f"normaliser must be a positive number (traces in the update x largest budget), got {z!r}")


def _floats(x: torch.Tensor) -> torch.Tensor:
    """Scores may come as 0/1 integers or bools; the formulas take them as floats."""
    return x if x.is_floating_point() else x.float()


# ----------------------------------------------------------------------------
# 1. Prompts and text format
# ----------------------------------------------------------------------------

THINK_END = "</think>"
ANSWER_HEADING = "**Final Answer**"
# Text inserted after the thinking before each summary; it is never trained.
TRUNCATED_INSERT = "...\n\n...\n\n" + THINK_END + "\n\n" + ANSWER_HEADING + "\n"  # trace cut short
CLOSED_INSERT = "\n\n" + ANSWER_HEADING + "\n"                                 # trace closed by itself

INSTRUCTION = (
    "Think step by step inside <think> </think>. After </think>, write "
    "'**Final Answer**' and then the final answer in \\boxed{}."
)


def format_prompt(tokenizer, question: str) -> str:
    """Chat-formatted prompt whose assistant turn opens with `<think>`."""
    content = question.strip() + "\n\n" + INSTRUCTION
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True)
        if text.rstrip().endswith("<think>"):  # DeepSeek-R1-Distill templates open it already
            return text.rstrip() + "\n"
        return text + "<think>\n"
    return content + "\n<think>\n"


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def insert_ids(tokenizer) -> dict[bool, list[int]]:
    """Token ids of the inserted (never trained) text, keyed by `truncated`."""
    return {True: encode(tokenizer, TRUNCATED_INSERT), False: encode(tokenizer, CLOSED_INSERT)}


def stop_ids(tokenizer) -> list[int]:
    """Token ids that end a generation: EOS (and the chat end-of-turn token if any)."""
    ids = {tokenizer.eos_token_id}
    for name in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>"):
        tid = tokenizer.convert_tokens_to_ids(name) if name in tokenizer.get_vocab() else None
        if tid is not None:
            ids.add(tid)
    return sorted(i for i in ids if i is not None)


# ----------------------------------------------------------------------------
# 2. Budgets and the budget prior
# ----------------------------------------------------------------------------

def evenly_spaced_budgets(max_think: int, num_budgets: int) -> list[int]:
    """b_s = max_think * (s+1) / S, s = 0..S-1 (rounded to whole tokens)."""
    if max_think < 1 or num_budgets < 1 or num_budgets > max_think:
        raise ValueError(f"need 1 <= num_budgets <= max_think, got {num_budgets}, {max_think}")
    return [round(max_think * (s + 1) / num_budgets) for s in range(num_budgets)]


def check_budgets(budgets) -> list[int]:
    """The S budgets as a list of ints: positive, strictly increasing. Takes a list, a
    tuple, a 1-D tensor or a 1-D numpy array of whole numbers."""
    if hasattr(budgets, "tolist"):                       # a tensor or an array
        if getattr(budgets, "ndim", 1) != 1:
            raise ValueError(f"budgets must be 1-D, [S] token counts; got shape {tuple(budgets.shape)}")
        budgets = budgets.tolist()
    budgets = list(budgets)
    if not budgets:
        raise ValueError("budgets must not be empty")
    try:
        if any(isinstance(b, bool) for b in budgets):
            raise TypeError
        budgets = [operator.index(b) for b in budgets]   # ints, numpy ints; not 1.5, not 128.0
    except TypeError:
        raise ValueError(f"budgets must be positive integers, got {budgets}") from None
    if any(b <= 0 for b in budgets):
        raise ValueError(f"budgets must be positive integers, got {budgets}")
    if any(b2 <= b1 for b1, b2 in zip(budgets, budgets[1:])):
        raise ValueError(f"budgets must be strictly increasing (sorted, no duplicates), got {budgets}")
    return budgets


PRIORS = ("uniform", "linear", "base")


def budget_prior(kind: str, budgets) -> torch.Tensor:
    """p, the weight of each of the S budgets in the objective; sums to 1.  -> S

    uniform: p_s = 1/S;  linear: p_s = b_s / sum(b);  base: all mass on the last
    budget (plain final-answer RL). The prior only weights rewards: every budget is
    evaluated for every trace, none is sampled.
    """
    budgets = check_budgets(budgets)
    b = torch.tensor(budgets, dtype=torch.float32)  # S
    if kind == "uniform":
        p = torch.ones_like(b)
    elif kind == "linear":
        p = b.clone()
    elif kind == "base":
        p = torch.zeros_like(b)
        p[-1] = 1.0
    else:
        raise ValueError(f"unknown prior {kind!r}; choose one of {', '.join(PRIORS)}")
    return p / p.sum()


# ----------------------------------------------------------------------------
# 3. Rollout: think once, cut at every budget, summarise after every cut
# ----------------------------------------------------------------------------

@dataclass
class Rollout:
    """Everything one rollout produced; the loss and the evaluation read this."""
    budgets: list[int]                   # S
    prompt_ids: list[list[int]]          # B token lists (no padding)
    think_ids: list[list[list[int]]]     # B x G thinking tokens, incl. the closing </think> or EOS
    closed: torch.Tensor                 # B,G bool: thinking ended with </think>
    ended_eos: torch.Tensor              # B,G bool: thinking ended with EOS
    cuts: torch.Tensor                   # B,G,S long: thinking tokens the summary at budget s sees
    truncated: torch.Tensor              # B,G,S bool: the summary prompt got the "..." insert
    prompt_index: torch.Tensor           # B,G,S long: budget whose summary prompt s shares (pooling)
    summary_ids: list = field(default_factory=list)   # B x G x S x A token lists
    summary_text: list = field(default_factory=list)  # B x G x S x A strings
    seconds: dict = field(default_factory=dict)       # wall-clock: {"think": s, "summary": s}

    @property
    def think_len(self) -> torch.Tensor:  # B,G
        return torch.tensor([[len(t) for t in row] for row in self.think_ids])

    @property
    def cut_has_eos(self) -> torch.Tensor:  # B,G,S: the summary prompt holds the trace's EOS
        return self.ended_eos[..., None] & (self.cuts == self.think_len[..., None])


def summary_prompts(length: int, why: str, budgets: list[int]) -> tuple[list[int], list[bool], list[int]]:
    """Where each budget's summary prompt cuts one trace of `length` tokens that stopped
    for `why` ('think': `</think>`, 'eos', 'max': it reached the last budget).

    Returns (cuts[S], truncated[S], prompt_index[S]). A trace that closed with
    `</think>` within b_s is shown whole, with no ellipsis; otherwise it is cut
    at b_s and gets the "..." insert. A trace that ended in EOS is cut like a
    running one, so from the budget that reaches its EOS on, the cut includes
    that EOS (as the authors do; those budgets score 0, see score_rollout).
    Budgets whose prompts come out identical point (prompt_index) at the first.
    """
    cuts, truncated, index = [], [], []
    for s, b in enumerate(budgets):
        whole = why == "think" and length <= b
        cuts.append(length if whole else min(b, length))
        truncated.append(not whole)
        same = [k for k in range(s) if cuts[k] == cuts[s] and truncated[k] == truncated[s]]
        index.append(same[0] if same else s)
    return cuts, truncated, index


def rollout(model, tokenizer, prompts: list[str], budgets: list[int], num_traces: int,
            num_summaries: int, temperature: float = 1.0, summary_max_tokens: int = 64,
            think_batch_size: int = 64, summary_batch_size: int = 256, stop_at_box: bool = False,
            progress=None, reuse_cache: bool = True) -> Rollout:
    """Think once, cut at every budget, summarise after every cut.

    1. G thinking traces per prompt, each at most b_{S-1} tokens, stopping at `</think>` or EOS.
    2. For each trace and budget b_s a summary prompt: prompt + thinking[:b_s] + "...\n\n...\n\n
       </think>\n\n**Final Answer**\n" if the trace was still running at b_s, or prompt + the
       whole thinking + "\n\n**Final Answer**\n" if it closed with `</think>` within b_s.
    3. A summaries per (trace, budget), at the same temperature; they stop at EOS.
    The sampling itself is generate() (appendix B).

    The summaries start from the thinking's KV cache: a summary prompt is the trace's own
    prompt + thinking[:cut] + an insert, so only the insert is encoded again
    (`reuse_cache=False` re-encodes every summary prompt: the same distribution, slower).
    The thinking cache of all B*G traces stays in memory until the summaries are done
    (Qwen2.5-0.5B in bf16, 128 traces of ~650 tokens: about 1 GB).
    `progress(n)` is called with the number of rows finished, if given.
    """
    budgets = check_budgets(budgets)
    if isinstance(prompts, str) or not prompts or num_traces < 1 or num_summaries < 1:
        raise ValueError(f"need a non-empty list of prompts, num_traces >= 1 and num_summaries >= 1; got "
                         f"{type(prompts).__name__} of {len(prompts)}, {num_traces}, {num_summaries}")
    t0 = time.perf_counter()
    B, G, S, A = len(prompts), num_traces, len(budgets), num_summaries
    think_end, eos = encode(tokenizer, THINK_END), set(stop_ids(tokenizer))
    prompt_ids = [encode(tokenizer, p) for p in prompts]

    # 1. thinking: B*G rows, at most b_{S-1} new tokens; its KV cache is kept for step 3
    flat, why, kv = generate(model, tokenizer, [p for p in prompt_ids for _ in range(G)], budgets[-1],
                             temperature, think_batch_size, think_end=think_end, keep_cache=True,
                             progress=progress)
    think_ids = [flat[b * G:(b + 1) * G] for b in range(B)]
    t1 = time.perf_counter()  # generate() ends reading its tokens back: the device is done

    # 2. one summary prompt per distinct (trace, cut, insert)
    cuts = torch.zeros(B, G, S, dtype=torch.long)
    truncated = torch.zeros(B, G, S, dtype=torch.bool)
    prompt_index = torch.zeros(B, G, S, dtype=torch.long)
    closed = torch.zeros(B, G, dtype=torch.bool)
    ended_eos = torch.zeros(B, G, dtype=torch.bool)
    inserts = insert_ids(tokenizer)
    jobs = []  # (b, g, budgets sharing the prompt, token ids, tokens shared with the trace)
    for b in range(B):
        for g in range(G):
            think, n = think_ids[b][g], b * G + g
            closed[b, g], ended_eos[b, g] = why[n] == "think", why[n] == "eos"
            c, t, idx = summary_prompts(len(think), why[n], budgets)
            cuts[b, g], truncated[b, g], prompt_index[b, g] = torch.tensor(c), torch.tensor(t), torch.tensor(idx)
            for s in sorted(set(idx)):
                shared = [k for k in range(S) if idx[k] == s]
                jobs.append((b, g, shared, prompt_ids[b] + think[:c[s]] + inserts[t[s]], len(prompt_ids[b]) + c[s]))

    # 3. A summaries per budget; a prompt shared by k budgets is sampled k*A times and
    #    encoded once (generate() shares the KV cache of identical rows). Every prompt starts
    #    with its trace's prompt + thinking[:cut]: those keys and values come from the
    #    thinking's cache (same tokens, same positions), only the insert is encoded.
    rows, owner, reused = [], [], []  # per summary row: its prompt, its trace, tokens shared with it
    for b, g, shared, ids, cached in jobs:
        k = len(shared) * A
        rows += [ids] * k
        owner += [b * G + g] * k
        reused += [cached] * k
    sampled = generate(model, tokenizer, rows, summary_max_tokens, temperature, summary_batch_size,
                       stop_at_box=stop_at_box, prefix=(kv, owner, reused) if reuse_cache else None,
                       progress=progress)
    del kv  # the thinking's cache: not needed any more
    summary_ids = [[[[None] * A for _ in range(S)] for _ in range(G)] for _ in range(B)]
    summary_text = [[[[None] * A for _ in range(S)] for _ in range(G)] for _ in range(B)]
    it = iter(sampled)
    for b, g, shared, _, _ in jobs:
        for s in shared:
            for a in range(A):
                ids = next(it)
                summary_ids[b][g][s][a] = ids
                text_ids = [t for t in ids if t not in eos]
                summary_text[b][g][s][a] = tokenizer.decode(text_ids, skip_special_tokens=False)
    return Rollout(budgets, prompt_ids, think_ids, closed, ended_eos, cuts, truncated, prompt_index,
                   summary_ids, summary_text, {"think": t1 - t0, "summary": time.perf_counter() - t1})


# ----------------------------------------------------------------------------
# 4. Rewards (answers read by extract_answer and compared by answers_match: appendix A)
# ----------------------------------------------------------------------------

def score_summary(summary_text: str, truth: str, cut_has_eos: bool = False) -> float:
    """1.0 if the answer is right AND exactly one `</think>` was seen, else 0.

    The summary is the text sampled after the `**Final Answer**` heading; its answer
    is the last box of its first paragraph (extract_answer), compared with the truth
    by answers_match. Both summary prompts already hold exactly one `</think>` (the
    trace's own or the inserted one), so a summary is well formatted iff it adds
    none. A summary whose prompt holds the trace's EOS (a trace that ended in EOS,
    at the budgets that reach it) scores 0; budgets cut before that EOS are graded
    normally.
    """
    if cut_has_eos or THINK_END in summary_text:
        return 0.0
    return float(answers_match(extract_answer(ANSWER_HEADING + "\n" + summary_text), truth))


def completion_reward(completions: list, answer: list, **kwargs) -> list[float]:
    """score_summary's rule for whole completions, as a TRL `reward_funcs` function.

    A completion scores 1.0 iff it holds exactly one `</think>` and the text after
    it holds the right answer: the last box of its `**Final Answer**` paragraph, or,
    if no heading follows `</think>`, the last box of all the text after it. The
    thinking is never read as the answer. `<think>` is not looked for: the prompt
    may open it (format_prompt does, and so do R1-style chat templates) or the
    completion may. completions: strings, or per completion a list of chat messages
    ({"role", "content"}), as TRL passes for conversational datasets. answer: the
    dataset column, one truth per completion; GSM8K's raw solutions count ("...
    #### 1,234" is 1234). Other keyword arguments (prompts, other columns) are
    ignored. Returns one float per completion. Warns once if a batch holds boxed
    answers but no `</think>` (a trainer that decoded with skip_special_tokens).
    """
    if isinstance(completions, str) or isinstance(answer, str):
        raise TypeError("completion_reward takes lists, one completion per answer: completion_reward([text], "
                        f"[truth]); got {type(completions).__name__} and {type(answer).__name__}")
    if len(completions) != len(answer):
        raise ValueError(f"completion_reward: {len(completions)} completions but {len(answer)} answers")
    try:
        texts = [c if isinstance(c, str) else "".join(m["content"] for m in c) for c in completions]
    except (TypeError, KeyError):
        raise TypeError("completion_reward: each completion must be a string or a list of chat messages "
                        "with a 'content' key") from None
    if any("\\boxed" in t for t in texts) and not any(THINK_END in t for t in texts):
        _think_end_dropped_warning()  # </think> decoded away (a special token), or never written
    rewards = []
    for text, truth in zip(texts, answer):
        truth = str(truth)
        if "####" in truth:  # GSM8K: reasoning, then "#### 1,234" (answers_match reads 1,234 as 1234)
            truth = truth.rpartition("####")[2]
        after = text.partition(THINK_END)[2]
        at = after.find(ANSWER_HEADING)
        # After the heading: a summary. No heading: all the text is one paragraph.
        summary = after[at + len(ANSWER_HEADING):] if at != -1 else after.replace("\n", " ")
        rewards.append(score_summary(summary, truth) if text.count(THINK_END) == 1 else 0.0)
    return rewards


@functools.lru_cache(maxsize=1)  # the body runs once: the warning is said once per process
def _think_end_dropped_warning():
    warnings.warn("completion_reward: some completions hold a \\boxed answer but none holds </think>, so all "
                  "score 0. Either the model never closed its thinking (then 0 is right), or </think> is a "
                  "special token of your tokenizer that your trainer removed when decoding (TRL decodes with "
                  "skip_special_tokens=True). Fix for the second: score the token ids, decoded with it kept: "
                  "reward_funcs=lambda completion_ids, answer, **kw: "
                  "ar.completion_reward(tokenizer.batch_decode(completion_ids), answer)", stacklevel=3)


def score_rollout(ro: Rollout, truths: list[str]) -> torch.Tensor:
    """Score of every summary by score_summary, Tensor[B, G, S, A] of 0/1."""
    has_eos = ro.cut_has_eos                                                    # B,G,S
    return torch.tensor([[[[score_summary(text, truths[b], bool(has_eos[b, g, s])) for text in per_budget]
                           for s, per_budget in enumerate(per_trace)]
                          for g, per_trace in enumerate(per_question)]
                         for b, per_question in enumerate(ro.summary_text)])


# ----------------------------------------------------------------------------
# 5. Advantages: BRPO for the thinking, decoupled for the summaries
# ----------------------------------------------------------------------------

def pooled_scores(scores: torch.Tensor, prompt_index: torch.Tensor | None = None) -> torch.Tensor:
    """r[b,g,s]: mean score of the summaries at budget s, pooled over budgets sharing a prompt.

    scores: B,G,S,A.  prompt_index: B,G,S (budget whose prompt s uses) or None  ->  B,G,S
    """
    _check(("scores", scores, "B,G,S,A"), ("prompt_index", prompt_index, "B,G,S"))
    scores = _floats(scores)
    if prompt_index is None:
        return scores.mean(-1)
    # scatter_add: slot k sums the scores and counts of every budget whose prompt is k; gather: each
    # budget reads its prompt's slot. prompt_index [0, 1, 2, 2]: r[2] = r[3] = mean of all 2A scores
    sums = torch.zeros(scores.shape[:-1], dtype=scores.dtype).scatter_add_(-1, prompt_index, scores.sum(-1))
    counts = torch.zeros_like(sums).scatter_add_(-1, prompt_index, torch.full_like(sums, float(scores.shape[-1])))
    return (sums / counts.clamp(min=1)).gather(-1, prompt_index)          # B,G,S


def returns_to_go(scores: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
    """R[g,s] = sum_{k>=s} p_k r[g,k].   scores: B,G,S;  prior: S  ->  B,G,S"""
    _check(("scores", scores, "B,G,S"), ("prior", prior, "S"))
    return (_floats(scores) * prior).flip(-1).cumsum(-1).flip(-1)  # cumsum from the right: sum over k >= s


def v2_baseline(returns: torch.Tensor) -> torch.Tensor:
    """V2[g,s] = mean over the G traces of R[.,s] (trace itself included); 0 when G = 1.

    returns: B,G,S  ->  B,G,S"""
    _check(("returns", returns, "B,G,S"))
    returns = _floats(returns)
    if returns.shape[1] == 1:
        return torch.zeros_like(returns)
    return returns.mean(1, keepdim=True).expand_as(returns)


def v1_baseline(scores: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
    """V1[g,s] = prev[g,s] * sum_{k>=s} p_k, prev = sum_{k<s} 2^k r[g,k] / sum_{k<s} 2^k; V1[g,0] = 0.

    scores: B,G,S;  prior: S  ->  B,G,S.  The trace's own answers so far, later ones weighted
    more (each budget twice the one before: the module docstring says why).
    """
    _check(("scores", scores, "B,G,S"), ("prior", prior, "S"))
    scores, S = _floats(scores), scores.shape[-1]
    w = 2.0 ** torch.arange(S, dtype=scores.dtype)                 # S
    num = (scores * w).cumsum(-1) - scores * w                     # sum over k < s (exclusive)
    den = w.cumsum(-1) - w                                         # 0 at s = 0
    prev = num / den.clamp(min=1.0)                                # prev[.., 0] = 0 / 1 = 0
    tail = prior.flip(-1).cumsum(-1).flip(-1)                      # sum_{k>=s} p_k, S
    return prev * tail


def brpo_baseline(scores: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
    """(s * V1[g,s] + (S - s) * V2[g,s]) / S: the group early, the trace's own history late.

    scores: B,G,S;  prior: S  ->  B,G,S.  (The paper writes b_{s-1}/b_{S-1} for s/S: the
    same for evenly spaced budgets.)
    """
    _check(("scores", scores, "B,G,S"), ("prior", prior, "S"))
    scores, S = _floats(scores), scores.shape[-1]
    s = torch.arange(S, dtype=scores.dtype)                        # S
    return (s * v1_baseline(scores, prior) + (S - s) * v2_baseline(returns_to_go(scores, prior))) / S


THINKING_METHODS = ("brpo", "grpo", "v1", "none")


def thinking_advantages(scores: torch.Tensor, prior: torch.Tensor, method: str = "brpo",
                        normalize_std: bool = False) -> torch.Tensor:
    """A[g,s] = R[g,s] - baseline[g,s]: the advantage of thinking segment (b_{s-1}, b_s].

    scores: B,G,S (r, the mean summary score of trace g at budget s);  prior: S  ->  B,G,S
    baseline: brpo (s*V1 + (S-s)*V2)/S | grpo V2 | v1 V1 | none 0.
    No division by a standard deviation unless normalize_std (off, as the authors).
    One question's G traces are scores[None]: the group mean V2 is taken over dim 1.
    """
    _check(("scores", scores, "B,G,S"), ("prior", prior, "S"))
    R = returns_to_go(scores, prior)
    if method == "brpo":
        baseline = brpo_baseline(scores, prior)
    elif method == "grpo":
        baseline = v2_baseline(R)
    elif method == "v1":
        baseline = v1_baseline(scores, prior)
    elif method == "none":
        baseline = torch.zeros_like(R)
    else:
        raise ValueError(f"unknown thinking method {method!r}; choose one of {THINKING_METHODS}")
    adv = R - baseline
    if normalize_std:
        adv = adv / (R.std(1, keepdim=True, unbiased=False) + 1e-6)
    return adv


SUMMARY_METHODS = ("brpo", "grpo")


def summary_advantages(scores: torch.Tensor, method: str = "brpo",
                       prompt_index: torch.Tensor | None = None) -> torch.Tensor:
    """The decoupled advantage of every summary: its score minus a baseline.  scores: B,G,S,A  ->  B,G,S,A

    A > 1: baseline = mean of the sibling summaries of the same prompt (pooled
    over budgets that share the prompt when prompt_index, B,G,S, is given).
    A == 1: baseline = mean over the G traces of the score in that budget slot,
    each slot's own sample, not pooled (as the authors; with G = 1 the advantage is 0).
    brpo (decoupled): every budget's summaries learn, unweighted by the prior, so
    summaries learn at every budget even under the base prior.
    grpo: only the last budget's summaries get an advantage; the others get 0.
    """
    _check(("scores", scores, "B,G,S,A"), ("prompt_index", prompt_index, "B,G,S"))
    scores = _floats(scores)
    if method not in SUMMARY_METHODS:
        raise ValueError(f"unknown summary method {method!r}; choose one of {SUMMARY_METHODS}")
    A = scores.shape[-1]
    if A > 1:
        baseline = pooled_scores(scores, prompt_index)                   # B,G,S
    else:
        baseline = scores[..., 0].mean(1, keepdim=True)                  # B,1,S
    adv = scores - baseline.unsqueeze(-1)
    if method == "grpo":  # only the last budget's summaries learn; the others get 0 (not -0.)
        adv[:, :, :-1] = 0.0
    return adv


def rollout_advantages(ro: Rollout, scores: torch.Tensor, prior: torch.Tensor,
                       thinking_method: str, summary_method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Both advantages of a scored rollout, one row per trace n = b*G + g.

    scores: B,G,S,A (score_rollout);  prior: S  ->  (thinking_adv N,S, summary_adv N,S,A)
    """
    _check(("scores", scores, "B,G,S,A"), known={"B": (len(ro.think_ids), "the rollout"),
                                                 "S": (len(ro.budgets), "the rollout")})
    r = pooled_scores(scores, ro.prompt_index)                          # B,G,S
    thinking_adv = thinking_advantages(r, prior, thinking_method)
    summary_adv = summary_advantages(scores, summary_method, ro.prompt_index)
    return thinking_adv.flatten(0, 1), summary_adv.flatten(0, 1)


# ----------------------------------------------------------------------------
# 6. Packed sequences and their log-probs
# ----------------------------------------------------------------------------
#
# One row per trace: [prompt][thinking][insert_1 summary_1][insert_2 summary_2]...
# Each summary block sees the prompt, the thinking up to its cut, and itself
# causally; nothing of the other blocks. Here the prompt is P, the thinking
# t1..t4, block 1 is cut after t2 (i1 s1), block 2 after t4 (i2 s2):
#
#              keys ->  P  t1 t2 t3 t4 i1 s1 i2 s2
#   queries  P          x
#            t1         x  x
#            t2         x  x  x
#            t3         x  x  x  x
#            t4         x  x  x  x  x
#            i1         x  x  x  .  .  x            <- block 1: prefix P t1 t2,
#            s1         x  x  x  .  .  x  x            then itself
#            i2         x  x  x  x  x  .  .  x      <- block 2: prefix P..t4
#            s2         x  x  x  x  x  .  .  x  x
#
# Row i may attend to key j iff  j < prefix_len[i]  or  block_start[i] <= j <= i.
# Trunk rows: prefix_len = i+1 (plain causal).  Block rows: prefix_len = P + cut.
# Position ids of a block continue from its cut: P + cut, P + cut + 1, ...
# Trainable tokens (thinking, summaries) are predicted by the logits one
# position to their left, which is always in the same branch of the tree.

@dataclass
class Packed:
    """Packed rows, right-padded to a common T. Token i is trained iff adv_index[n, i] >= 0."""
    input_ids: torch.Tensor     # N,T
    position_ids: torch.Tensor  # N,T
    prefix_len: torch.Tensor    # N,T
    block_start: torch.Tensor   # N,T
    adv_index: torch.Tensor     # N,T: index into [thinking_adv (S) | summary_adv (S*A)], -1 = not trained
    num_budgets: int | None = None     # S and A of the rows, so that token_advantages can check
    num_summaries: int | None = None   # the advantages it is given (None: not checked)


def pack_trace(prompt: list[int], think: list[int], budgets: list[int], cuts: list[int],
               inserts: list[list[int]], summaries: list[list[list[int]]]) -> dict:
    """One trace as a packed row (lists). inserts: S token lists; summaries: S x A token lists."""
    S, A = len(budgets), len(summaries[0])
    P, L = len(prompt), len(think)
    ids, pos = prompt + think, list(range(P + L))
    prefix, start = list(range(1, P + L + 1)), list(range(1, P + L + 1))
    # the thinking's token j + 1 (j counts from 0) is in segment s iff b_{s-1} < j + 1 <= b_s
    adv = [-1] * P + [bisect.bisect_right(budgets, j) for j in range(L)]
    for s in range(S):
        for a in range(A):
            block = inserts[s] + summaries[s][a]
            begin = len(ids)
            ids += block
            pos += range(P + cuts[s], P + cuts[s] + len(block))
            prefix += [P + cuts[s]] * len(block)
            start += [begin] * len(block)
            adv += [-1] * len(inserts[s]) + [S + s * A + a] * len(summaries[s][a])
    return dict(input_ids=ids, position_ids=pos, prefix_len=prefix, block_start=start, adv_index=adv)


def pack_rollout(ro: Rollout, tokenizer, traces: list[tuple[int, int]] | None = None) -> Packed:
    """Pack the given (b, g) traces (all by default) into one right-padded batch."""
    inserts = insert_ids(tokenizer)
    B, G = len(ro.think_ids), len(ro.think_ids[0])
    traces = traces if traces is not None else [(b, g) for b in range(B) for g in range(G)]
    rows = [pack_trace(ro.prompt_ids[b], ro.think_ids[b][g], ro.budgets, ro.cuts[b, g].tolist(),
                       [inserts[bool(t)] for t in ro.truncated[b, g]], ro.summary_ids[b][g])
            for b, g in traces]
    T = max(len(r["input_ids"]) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def stack(key, fill):
        out = torch.full((len(rows), T), fill, dtype=torch.long)
        for n, r in enumerate(rows):
            out[n, :len(r[key])] = torch.tensor(r[key])
        return out

    prefix_len, block_start = stack("prefix_len", 0), stack("block_start", 0)
    # padding rows attend to themselves only (a fully masked row would give NaN)
    is_pad = torch.arange(T) >= torch.tensor([len(r["input_ids"]) for r in rows])[:, None]
    block_start = torch.where(is_pad, torch.arange(T).expand(len(rows), T), block_start)
    return Packed(stack("input_ids", pad), stack("position_ids", 0), prefix_len, block_start,
                  stack("adv_index", -1), len(ro.budgets), len(ro.summary_ids[0][0][0]))


def packed_attention_mask(prefix_len: torch.Tensor, block_start: torch.Tensor,
                          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Additive 4-D mask N,1,T,T (0 = attend, dtype min = blocked); works with eager and sdpa.

    prefix_len, block_start: N,T. Row i attends to key j iff j < prefix_len[i] or
    block_start[i] <= j <= i (the diagram above)."""
    _check(("prefix_len", prefix_len, "N,T"), ("block_start", block_start, "N,T"))
    T = prefix_len.shape[-1]
    j = torch.arange(T, device=prefix_len.device)                    # key index
    i = j[:, None]                                                   # query index
    allowed = (j < prefix_len[..., None]) | ((j >= block_start[..., None]) & (j <= i))  # N,T,T
    mask = torch.zeros(allowed.shape, dtype=dtype, device=prefix_len.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


def _chunk_logprobs(lm_head, hidden: torch.Tensor, tokens: torch.Tensor,
                    temperature: float = 1.0) -> torch.Tensor:
    logits = lm_head(hidden).float()                                 # C,V (only C rows at a time)
    if temperature != 1.0:
        logits = logits / temperature  # the policy that sampled: softmax(logits / T) (the authors too)
    return logits.gather(-1, tokens[:, None]).squeeze(-1) - logits.logsumexp(-1)


def token_logprobs(model, input_ids: torch.Tensor, position_ids: torch.Tensor,
                   attention_mask: torch.Tensor, trained: torch.Tensor,
                   chunk_size: int = 1024, temperature: float = 1.0) -> torch.Tensor:
    """log pi(token i | its branch) at every trained position, 0 elsewhere.  -> N,T

    pi = softmax(logits / temperature), the distribution the rollout sampled from.
    One forward of the base model gives hidden states H; the output layer and
    log-softmax run on `chunk_size` trained positions at a time under
    activation checkpointing, so no N x T x V float32 tensor ever exists.
    input_ids, position_ids, trained: N,T;  attention_mask: N,1,T,T (additive) or N,T.
    """
    sizes = _check(("input_ids", input_ids, "N,T"), ("position_ids", position_ids, "N,T"),
                   ("trained", trained, "N,T"))
    if attention_mask.dim() not in (2, 4) or attention_mask.shape[0] != sizes["N"] or \
            attention_mask.shape[-1] != sizes["T"]:
        raise ValueError(f"attention_mask must have shape [N, 1, T, T] or [N, T] with N, T = {sizes['N']}, "
                         f"{sizes['T']}, got {tuple(attention_mask.shape)}")
    base = getattr(model, model.base_model_prefix)
    hidden = base(input_ids=input_ids, attention_mask=attention_mask,
                  position_ids=position_ids, use_cache=False).last_hidden_state   # N,T,H
    sel = trained[:, 1:]                                             # token i predicted at i-1
    h = hidden[:, :-1][sel]                                          # M,H
    tok = input_ids[:, 1:][sel]                                      # M
    lm_head = model.get_output_embeddings()
    parts = [checkpoint(_chunk_logprobs, lm_head, h[c:c + chunk_size], tok[c:c + chunk_size],
                        temperature, use_reentrant=False) if torch.is_grad_enabled()
             else _chunk_logprobs(lm_head, h[c:c + chunk_size], tok[c:c + chunk_size], temperature)
             for c in range(0, h.shape[0], chunk_size)]
    out = torch.zeros(input_ids.shape, dtype=torch.float32, device=input_ids.device)
    out[:, 1:] = out[:, 1:].masked_scatter(sel, torch.cat(parts) if parts else h.new_zeros(0).float())
    return out


def packed_logprobs(model, packed: Packed, chunk_size: int = 1024,
                    mask_dtype: torch.dtype | None = None, temperature: float = 1.0) -> torch.Tensor:
    """token_logprobs for a Packed batch on the model's device.  -> N,T"""
    device = next(model.parameters()).device
    dtype = mask_dtype or next(model.parameters()).dtype
    mask = packed_attention_mask(packed.prefix_len.to(device), packed.block_start.to(device), dtype)
    return token_logprobs(model, packed.input_ids.to(device), packed.position_ids.to(device), mask,
                          (packed.adv_index >= 0).to(device), chunk_size, temperature)


def token_advantages(packed: Packed, thinking_adv: torch.Tensor,
                     summary_adv: torch.Tensor) -> torch.Tensor:
    """Per-token advantage: a thinking token gets its segment's A[g,s], a summary token its summary's.

    thinking_adv: N,S;  summary_adv: N,S,A  ->  N,T (0 where not trained)
    """
    known = {d: (n, "the packed rows") for d, n in (("S", packed.num_budgets), ("A", packed.num_summaries))
             if n is not None}
    _check(("packed.adv_index", packed.adv_index, "N,T"), ("thinking_adv", thinking_adv, "N,S"),
           ("summary_adv", summary_adv, "N,S,A"), known=known)
    table = torch.cat([thinking_adv, summary_adv.flatten(1)], dim=1)        # N, S + S*A
    idx = packed.adv_index
    return torch.where(idx >= 0, table.gather(1, idx.clamp(min=0)), 0.0)  # 0, not -0., where not trained


# ----------------------------------------------------------------------------
# 7. The loss: the whole objective in one function (anytime_loss)
# ----------------------------------------------------------------------------

def anytime_loss(model, packed: Packed, thinking_adv: torch.Tensor, summary_adv: torch.Tensor,
                 normaliser: float, old_logprobs: torch.Tensor | None = None,
                 ref_logprobs: torch.Tensor | None = None, clip_eps: float = 0.2, kl_coef: float = 0.0,
                 temperature: float = 1.0, chunk_size: int = 1024,
                 mask_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, dict]:
    """The AnytimeReasoner loss of N packed traces: decoupled advantages, then PPO-clip.

        loss = 1/Z * sum over trained tokens i of  max(-A_i * ratio_i, -A_i * clip(ratio_i, 1-eps, 1+eps))
               [+ kl_coef * 1/Z * sum_i KL_i]        ratio_i = pi(token i | its branch) / pi_old(...)

    A_i is decoupled: a thinking token in segment (b_{s-1}, b_s] of trace n gets the
    BRPO advantage thinking_adv[n, s]; a token of summary a at budget s gets that
    summary's own advantage summary_adv[n, s, a]; prompts and inserted text are not
    trained. Z = normaliser, a constant: traces in the whole update x largest budget,
    so that micro-batches of one update add up to the loss of the whole update.
    pi = softmax(logits / temperature), read in one forward over the packed rows.
    old_logprobs (N,T, from before the first update of this rollout) make the ratio;
    None means on-policy: old = current, detached, ratio 1, the REINFORCE gradient.
    ref_logprobs (N,T) and kl_coef > 0 add a KL penalty to a reference model.

    thinking_adv: N,S;  summary_adv: N,S,A  ->  (loss, stats: clipfrac, approx_kl,
    tokens [, ref_kl]); stats are per trained token of this micro-batch.
    """
    advantages = token_advantages(packed, thinking_adv, summary_adv)    # N,T: the decoupled A_i
    logprobs = packed_logprobs(model, packed, chunk_size, mask_dtype, temperature)   # N,T
    old = logprobs.detach() if old_logprobs is None else old_logprobs
    mask = (packed.adv_index >= 0).to(logprobs.device)                  # N,T: trained tokens
    return policy_loss(logprobs, old, advantages.to(logprobs.device), mask, normaliser, clip_eps,
                       ref_logprobs, kl_coef)


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, normaliser: float, clip_eps: float = 0.2,
                ref_logprobs: torch.Tensor | None = None, kl_coef: float = 0.0):
    """PPO-clip with token-level aggregation: sum over trained tokens / a constant normaliser.

    logprobs, old_logprobs, advantages, mask (and ref_logprobs): N,T.  Returns (loss, stats).
    With old_logprobs = logprobs.detach(), ratio is 1, nothing is clipped, and the
    gradient is the REINFORCE one, -sum A grad log pi / normaliser. Any per-token
    log-probs work (one row per completion is N,T too), so this copies into other trainers.
    """
    _check(("logprobs", logprobs, "N,T"), ("old_logprobs", old_logprobs, "N,T"),
           ("advantages", advantages, "N,T"), ("mask", mask, "N,T"), ("ref_logprobs", ref_logprobs, "N,T"))
    _check_normaliser(normaliser)
    mask = mask.to(logprobs.dtype)
    logratio = logprobs - old_logprobs
    ratio = logratio.exp()
    pg_loss1 = -advantages * ratio
    pg_loss2 = -advantages * ratio.clamp(1 - clip_eps, 1 + clip_eps)
    loss = (torch.max(pg_loss1, pg_loss2) * mask).sum() / normaliser
    n = mask.sum().clamp(min=1)
    stats = {
        "clipfrac": (((ratio - 1).abs() > clip_eps).float() * mask).sum().item() / n.item(),
        # k3 estimator of KL(old || new), http://joschu.net/blog/kl-approx.html
        "approx_kl": (((ratio - 1) - logratio) * mask).sum().item() / n.item(),
        "tokens": int(mask.sum().item()),
    }
    if ref_logprobs is not None and kl_coef > 0:  # off by default: no reference model is loaded
        d = ref_logprobs - logprobs
        kl = d.exp() - d - 1                      # k3 estimate of KL(pi || ref), >= 0 per token
        loss = loss + kl_coef * (kl * mask).sum() / normaliser
        stats["ref_kl"] = (kl * mask).sum().item() / n.item()
    return loss, stats


# ----------------------------------------------------------------------------
# 8. Evaluation and diagnostics
# ----------------------------------------------------------------------------

def anytime_accuracy(scores: torch.Tensor, prompt_index: torch.Tensor | None = None) -> torch.Tensor:
    """Accuracy at each budget; its mean over budgets is the anytime score.  scores: B,G,S,A  ->  S"""
    return pooled_scores(scores.float(), prompt_index).mean((0, 1))


def evaluate(model, tokenizer, prompts: list[str], truths: list[str], budgets,
             temperature: float = 0.6, summary_max_tokens: int = 64, think_batch_size: int = 64,
             summary_batch_size: int = 256, progress=None) -> dict:
    """Anytime accuracy of one trace and one summary per prompt at every budget of a grid:
    {"budgets", "accuracy" (one per budget), "anytime_score" (their mean), "mean_think_len"}."""
    if len(prompts) != len(truths):
        raise ValueError(f"one truth per prompt: got {len(prompts)} prompts and {len(truths)} truths")
    ro = rollout(model, tokenizer, prompts, budgets, 1, 1, temperature, summary_max_tokens,
                 think_batch_size, summary_batch_size, progress=progress)
    acc = anytime_accuracy(score_rollout(ro, truths), ro.prompt_index)
    return {"budgets": list(ro.budgets), "accuracy": [round(x, 4) for x in acc.tolist()],
            "anytime_score": round(acc.mean().item(), 4),
            "mean_think_len": round(ro.think_len.float().mean().item(), 1)}


def _masked_var(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    n = m.sum(0)
    mean = (x * m).sum(0) / n
    return (((x - mean) ** 2) * m).sum(0) / n


def variance_diagnostics(scores: torch.Tensor, prior: torch.Tensor, think_len: torch.Tensor,
                         budgets) -> dict[str, torch.Tensor]:
    """Var[R - V] / Var[R] and corr(V, R) per budget, for V = V1, V2, BRPO (each S).

    scores: B,G,S (r);  prior: S;  think_len: B,G;  budgets: S.  Only traces that reach
    segment s (longer than b_{s-1}) count at budget s. NaN where a budget has < 2 such
    traces or Var[R] = 0. The paper's variance figure: a lower ratio is a better baseline.
    """
    sizes = _check(("scores", scores, "B,G,S"), ("prior", prior, "S"), ("think_len", think_len, "B,G"))
    scores = _floats(scores)
    budgets = check_budgets(budgets)
    if len(budgets) != sizes["S"]:
        raise ValueError(f"budgets has {len(budgets)} entries where scores has S = {sizes['S']}")
    S = scores.shape[-1]
    R = returns_to_go(scores, prior)
    values = {"v1": v1_baseline(scores, prior), "v2": v2_baseline(R), "brpo": brpo_baseline(scores, prior)}
    starts = torch.tensor([0] + budgets[:-1])
    m = (think_len[..., None] > starts).reshape(-1, S).to(scores.dtype)  # N,S: trace reaches segment s
    m = torch.where(m.sum(0) >= 2, m, torch.full_like(m, float("nan")))
    Rf = R.reshape(-1, S)
    var_r = _masked_var(Rf, m)
    var_r = torch.where(var_r > 0, var_r, torch.full_like(var_r, float("nan")))   # Var[R] = 0: no ratio
    out = {}
    for name, V in values.items():
        Vf = V.reshape(-1, S)
        out[f"var_ratio_{name}"] = _masked_var(Rf - Vf, m) / var_r
        cov = (_masked_var(Rf + Vf, m) - var_r - _masked_var(Vf, m)) / 2
        out[f"corr_{name}"] = cov / (var_r * _masked_var(Vf, m)).sqrt()
    return out


# ----------------------------------------------------------------------------
# 9. The paper's runs
# ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Preset:
    num_summaries: int    # A, summaries per (trace, budget)
    summary_method: str   # "brpo" (decoupled, all budgets) or "grpo" (last budget only)
    num_budgets: int      # S
    prior: str            # "uniform", "linear" or "base"
    thinking_method: str  # "brpo", "grpo", "v1" or "none"


# The paper's runs. Its final-answer baseline, then AnytimeReasoner with three priors, then
# its ablation: one ingredient at a time added to GRPO (linear prior; decoupled summaries
# with A = 4; "vr", the BRPO variance-reduced baseline); grpo+vr+decouple is ar-base (one run).
# The authors: 64 questions x 8 traces per step, lr 1e-6, temperature 1.0, evaluation at 0.6.
PRESETS = {
    "grpo":             Preset(num_summaries=1, summary_method="grpo", num_budgets=1,
                               prior="base", thinking_method="grpo"),
    "ar-uniform":       Preset(num_summaries=4, summary_method="brpo", num_budgets=4,
                               prior="uniform", thinking_method="brpo"),
    "ar-linear":        Preset(num_summaries=4, summary_method="brpo", num_budgets=4,
                               prior="linear", thinking_method="brpo"),
    "ar-base":          Preset(num_summaries=4, summary_method="brpo", num_budgets=4,
                               prior="base", thinking_method="brpo"),
    "grpo+linear":      Preset(num_summaries=1, summary_method="grpo", num_budgets=4,
                               prior="linear", thinking_method="grpo"),
    "grpo+decouple":    Preset(num_summaries=4, summary_method="brpo", num_budgets=4,
                               prior="base", thinking_method="grpo"),
    "grpo+vr":          Preset(num_summaries=1, summary_method="grpo", num_budgets=4,
                               prior="base", thinking_method="brpo"),
    "grpo+vr+decouple": Preset(num_summaries=4, summary_method="brpo", num_budgets=4,
                               prior="base", thinking_method="brpo"),
}


# ----------------------------------------------------------------------------
# Appendix A. The answer checker (sympy, never eval): extract_answer, answers_match
# ----------------------------------------------------------------------------
#
# extract_answer: the last box (with the boxes joined to it by "," / "and" / "or")
#   of the "**Final Answer**" paragraph.
# answers_match: both answers go through the same three stages.
#   A2. _RULES, string rewrites applied in the order listed: LaTeX noise, units,
#       "and" lists, thousands separators, mixed numbers, \pm, matrices ...
#   A4. _parse, a small recursive-descent parser that builds sympy values itself
#       (never eval/sympify/parse_expr): numbers, + - * / ^, \frac, \sqrt, \pi,
#       tuples, sets, intervals, ratios and relations.
#   A5. _values_equal: structure first, then expressions at rational sample points.
#       Integers and fractions compare exactly ("1000001" is not 1000000). A written
#       decimal may be rounded, never wrong: it matches a value within half a unit of
#       its last written digit and within 1e-6 of it, relative ("0.333333" is 1/3,
#       "0.333" is not; nor are "1000001.0" and "999999.5" 1000000); two decimals match
#       only if equal ("2.50" is 2.5). The rule is _close (and _numbers_close).
# Every stage has a size bound, so any input is checked in well under a second.

import sympy  # noqa: E402 (here, so that only the checker needs it)

# A parsed answer: a sympy expression, or a group (kind, items). Kinds: "()" tuple,
# "[]" "[)" "(]" interval, "{}" set, "list" a bare comma list, "ratio" (b/a, c/a)
# for a:b:c, and "rel <= <" for a relation chain (items: its sides, a <= x < b).
Value = Union[sympy.Expr, Tuple[str, Tuple["Value", ...]]]

_HEADING = "**Final Answer**"  # ANSWER_HEADING of section 1, repeated so this appendix copies alone
_MAX_RAW_CHARS = 10_000     # longer answers are only compared as exact strings
_MAX_PARSE_CHARS = 500      # longer answers skip the sympy stage
_MAX_DEPTH = 40             # parser nesting limit, far below Python's recursion limit
_MAX_EXPONENT = 1000        # |p| in x^(p/q)
_MAX_ROOT = 100             # q in x^(p/q)
_MAX_BITS = 20_000          # bound on the size of any number we may create
_MAX_ROOT_BITS = 1024       # bound on all radicands together (sympy factors them)
_MAX_ITEMS = 16             # longest tuple or set we compare
_MAX_SYMBOLS = 6
_SYMBOL_BITS = 10           # sample values below have numerator, denominator < 32
_REL_TOL = Fraction(1, 10**6)  # a rounded decimal must still be this close, relative
_ROUNDING = sympy.Rational(1, 10**20)  # irrational values are compared at 30 digits
_SAMPLES = tuple(sympy.Rational(p, q) for p, q in [
    (13, 17), (23, 19), (7, 11), (29, 31), (17, 5), (11, 29), (31, 13), (5, 23), (19, 7), (3, 17),
    (25, 11), (9, 31), (27, 19), (11, 3), (15, 29), (21, 13), (29, 9), (7, 27), (23, 5), (13, 29)])


class _ParseError(Exception):
    """Raised inside the parser for anything outside the supported grammar."""


# A1. extraction

_BRACE_RE = re.compile(r"\\.|[{}]", re.S)   # an escaped char, or a brace
_BLANK_LINE_RE = re.compile(r"\n[ \t]*\n")
_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])( *)(\{?)")
_BOX_TOKEN_RE = re.compile(r"[^\s$]+")      # "\boxed 5"
_BOX_GAP_RE = re.compile(r"[\s$,;]*(?:(?:\\text\{ *)?\b(?:and|or)\b *\}?)?[\s$,;]*")  # ", and"


def extract_answer(text: str) -> str | None:
    """The answer boxed in the "**Final Answer**" paragraph, else None.

    The paragraph starts after the first heading (leading whitespace skipped)
    and ends at the next blank line; without a heading the whole text is used.
    The answer is its last box, with the boxes joined to it by ",", "and" or "or"
    ("\\boxed{6} and \\boxed{8}" gives "6, 8"). An unclosed last box or an empty
    answer gives None.
    """
    try:
        text = text.replace("\r\n", "\n")
        start = text.find(_HEADING)
        if start != -1:
            text = text[start + len(_HEADING):].lstrip()
            blank = _BLANK_LINE_RE.search(text)
            text = text[:blank.start()] if blank else text
        return ", ".join(c.strip() for c in _last_boxes(text) if c.strip()) or None
    except Exception:
        return None


def _last_boxes(text: str) -> list[str]:
    """Contents of the last \\boxed{...}/\\fbox{...} and of the boxes joined to it by
    ",", "and" or "or"; [] if there is none or the last one never closes."""
    run, pos, run_end = [], 0, -1
    while m := _BOX_RE.search(text, pos):
        if m.group(2):
            end = _closing_brace(text, m.end() - 1)
            if end == -1:
                return []  # the last box never closes
            content, pos = text[m.end():end], end + 1
        elif m.group(1) and (tok := _BOX_TOKEN_RE.match(text, m.end())):
            content, pos = tok.group(), tok.end()
        else:
            pos = m.end()
            continue
        if run_end < 0 or not _BOX_GAP_RE.fullmatch(text, run_end, m.start()):
            run = []  # text between the boxes: a new answer starts
        run.append(content)
        run_end = pos
    return run


def _closing_brace(text: str, open_at: int) -> int:
    """Index of the brace closing text[open_at], or -1; one linear pass, no recursion."""
    depth = 0
    for m in _BRACE_RE.finditer(text, open_at):
        if m.group() == "{":
            depth += 1
        elif m.group() == "}":
            depth -= 1
            if depth == 0:
                return m.start()
    return -1


# A2. string rules, in the order they are applied (the table _RULES below)

_MATRIX_RE = re.compile(r"\\begin\{([pbB]?matrix)\}(.*?)\\end\{\1\}", re.S)  # not vmatrix: a determinant


def _matrix_rows(s: str) -> str:
    """Any matrix environment -> ((a, b), (c, d)); a column or row vector -> (a, b)."""
    def rows(m: re.Match[str]) -> str:
        cells = [r.replace("&", ",") for r in m.group(2).split("\\\\") if r.strip()]
        return "(" + ", ".join(f"({r})" for r in cells) + ")"
    return _MATRIX_RE.sub(rows, s) if len(s) <= _MAX_PARSE_CHARS else s


_REPLACEMENTS = [  # in order: "\\dfrac" -> "\\frac" before the \frac rules, "\\$" before "$"
    ("\r", ""), ("\\!", ""), ("\\,", " "), ("\\;", " "), ("\\:", " "), ("\\ ", " "), ("~", " "),
    ("\\quad", " "), ("\\$", ""), ("$", ""), ("\\%", "%"), ("\\displaystyle", ""),
    ("\\left", ""), ("\\right", ""), ("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"), ("\\cfrac", "\\frac"),
    ("^{\\circ}", ""), ("^\\circ", ""), ("\\circ", ""), ("\u00b0", ""), ("{,}", ","),
    ("\u2212", "-"), ("\u00d7", "*"), ("\\div", "/"), ("\u00f7", "/"), ("\u03c0", "\\pi"), ("\u221e", "\\infty"),
    ("\u2264", "<="), ("\u2265", ">="), ("\u2260", "!="), ("\u00b1", "\\pm"), ("==", "="),
]
_RELATIONS = {"geqslant": ">=", "geq": ">=", "ge": ">=", "leqslant": "<=", "leq": "<=", "le": "<=",
              "neq": "!=", "ne": "!=", "gt": ">", "lt": "<"}
_RELATION_RE = re.compile(r"\\(" + "|".join(_RELATIONS) + r")(?![A-Za-z])")


def _replace_all(s: str) -> str:
    """Spacing, \\left/\\right, dollars, degrees, \\dfrac, relation symbols, escapes."""
    for old, new in _REPLACEMENTS:
        s = s.replace(old, new)
    s = re.sub(r"\\\\(?=[A-Za-z])", r"\\", s)  # a doubly escaped command
    s = re.sub(r"_\{(\w)\}", r"_\1", s)  # 4210_{7} is 4210_7
    return _RELATION_RE.sub(lambda m: _RELATIONS[m.group(1)], s)


def _drop_approx(s: str) -> str:
    """"\\frac{\\sqrt3}{3} \\approx 0.577" -> the exact value before the \\approx."""
    exact, _, approx = s.partition("\\approx")
    return exact if exact.strip() else approx


_TEXT_RE = re.compile(r"\\(?:text|textbf|textit|textrm|mathrm|mathbf|mbox) ?\{([^{}]*)\}(\^\{?\d\}?)?")
_UNIT_RE = re.compile(r"[A-Za-z][A-Za-z .]*(?:/[A-Za-z .]+)?(?:\^\{?\d\}?)?")


def _unwrap_text(s: str) -> str:
    """\\text{...}: a unit after a value goes (never gluing "2 \\text{h} 30" into 230),
    "and"/"or" and other words stay as words."""
    def unwrap(m: re.Match[str]) -> str:
        content = m.group(1).strip()
        if content not in ("and", "or") and s[:m.start()].strip() and _UNIT_RE.fullmatch(content):
            return " "
        return " " + content + (m.group(2) or "") + " "
    return _TEXT_RE.sub(unwrap, s)


def _join_words(s: str) -> str:
    """"6 and 8", "x = 1 or x = 2", "1, 2, and 3" -> a comma list (compared as a set)."""
    return re.sub(r" ?,? ?\b(?:and|or)\b ?", ", ", s)


_TRAILING_UNIT_RE = re.compile(r"(.*\d%?) (?:[A-Za-z]{2,}|[A-Za-z]+/[A-Za-z]+)(?:[ /]+[A-Za-z]+)*(?:\^\{?\d\}?)?\.?")


def _drop_trailing_unit(s: str) -> str:
    """"18 dollars", "50 km/h", "5 cm^2" -> the value; one letter stays ("5 m" may be 5m)."""
    m = _TRAILING_UNIT_RE.fullmatch(s.strip())
    return m.group(1) if m else s


_GROUPED_RE = re.compile(r"((?:[A-Za-z] ?= ?)?)([-+]?\d{1,3}(?:(?:, ?| )\d{3})+(?:\.\d+)?)")


def _drop_thousands(s: str) -> str:
    """"1,000", "1, 000", "1 000", "x = 32,\\! 349" -> digits. Only a whole answer made of
    groups of three is read this way: "1,0000" and "(1,000)" stay lists of numbers."""
    m = _GROUPED_RE.fullmatch(s.strip())
    return m.group(1) + re.sub("[, ]", "", m.group(2)) if m else s


def _mixed_numbers(s: str) -> str:
    """Digits followed at once by a numeric fraction are a mixed number: 918\\frac{1}{2}
    and "918 1/2" are 918 + 1/2 (not 918 * 1/2); "x^2\\frac12" is still a product."""
    s = re.sub(r"\\frac ?(\d)(\d)", r"\\frac{\1}{\2}", s)  # \frac12
    s = re.sub(r"(?<![\w.^_{}\\])(\d+) ?\\frac ?\{(\d+)\} ?\{(\d+)\}", r"(\1+\2/\3)", s)
    return re.sub(r"(?<![\w.^_/])(\d+) (\d+)/(\d+)(?![\w.])", r"(\1+\2/\3)", s)


def _drop_defined_name(s: str) -> str:
    """"f(x) = 2x+3" -> "2x+3"; "x \\in [1, 2]" -> "[1, 2]": the left side only names the answer."""
    m = re.match(r" ?(?:[A-Za-z] ?\( ?[A-Za-z] ?\) ?=|[A-Za-z] ?\\in(?![A-Za-z]))", s)
    return s[m.end():] if m else s


def _plus_minus(s: str) -> str:
    """"1 \\pm \\sqrt2" -> "1 + \\sqrt2, 1 - \\sqrt2": both values, as a list."""
    if "\\pm" not in s and "\\mp" not in s:
        return s
    return s.replace("\\pm", "+").replace("\\mp", "-") + ", " + s.replace("\\pm", "-").replace("\\mp", "+")


def _choice_letter(s: str) -> str:
    """Multiple choice: "(A)" or "C. x = 42" -> the letter."""
    m = re.fullmatch(r" ?(?:\(([A-Z])\)|([A-E])[.)] .*) ?", s)
    return (m.group(1) or m.group(2)) if m else s


_RULES = [  # applied to both answers in this order; whitespace is collapsed after each
    _matrix_rows,          # \begin{pmatrix} 1 & 2 \\ 3 & 4 \end{pmatrix} -> ((1, 2), (3, 4))
    _replace_all,          # "\$1{,}000", "\dfrac", "\geq" -> "1,000", "\frac", ">="
    _drop_approx,          # "a \approx 0.57" -> "a"
    _unwrap_text,          # "18 \text{ cm}" -> "18", "\text{odd}" -> "odd"
    _join_words,           # "6 and 8" -> "6, 8"
    _drop_trailing_unit,   # "50 km/h" -> "50"
    _drop_thousands,       # "1,000" / "1, 000" / "1 000" -> "1000"
    _mixed_numbers,        # "918\frac{1}{2}" -> "(918+1/2)"
    _drop_defined_name,    # "f(x) = 2x" -> "2x"
    _plus_minus,           # "1 \pm 2" -> "1 + 2, 1 - 2"
    _choice_letter,        # "(A)" -> "A"
]


def _normalise(s: str) -> str:
    for rule in _RULES:
        s = " ".join(rule(s).split())  # single spaces keep every regex above linear
    return s.rstrip(".\\").strip()


# A3. matching

_NUMBER_RE = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d{1,3})?")
_TIME_RE = re.compile(r"(?:[01]?\d|2[0-4]):[0-5]\d")   # "3:30" is a time, not the ratio 1:10


def answers_match(given: str | None, truth: str) -> bool:
    """True if the extracted answer equals the ground truth (string, numeric or symbolic)."""
    if given is None:
        return False
    try:
        return _match(given, truth)
    except Exception:  # last resort only: the guards below should make this unreachable
        return False


def _match(given: str, truth: str) -> bool:
    """Normalise both, then compare each reading of one with each reading of the other."""
    given, truth = given.strip(), truth.strip()
    if not given or given == truth or len(given) > _MAX_RAW_CHARS or len(truth) > _MAX_RAW_CHARS:
        return bool(given) and given == truth
    g_num, t_num = _as_number(given), _as_number(truth)
    if g_num is not None and t_num is not None:  # plain numbers (most of GSM8K): no rules needed
        return _close(g_num, t_num, _tolerance(given, truth))
    g, t = _normalise(given), _normalise(truth)
    if not g or not t:
        return False
    tol = _tolerance(g, t)
    return any(_readings_equal(a, b, tol) for a in _readings(g) for b in _readings(t))


_DECIMAL_RE = re.compile(r"(?<![\d.])\d*\.(\d+)(?:[eE]([-+]?\d{1,3}))?")  # "2.50", ".5", "1.5e3"; not "7."


def _tolerance(g: str, t: str) -> Fraction:
    """Half a unit of the last written digit of the finest decimal in either answer
    ("2.50": 0.005, "1.5e3": 50), or 0 (exact) if neither has one: integers and
    fractions compare exactly, and "7." is the integer 7 followed by a full stop."""
    places = [len(m.group(1)) - int(m.group(2) or 0) for m in _DECIMAL_RE.finditer(g + " " + t)]
    return Fraction(1, 2) / Fraction(10) ** max(places) if places else Fraction(0)


def _readings(s: str) -> list[str]:
    """"10%" is read both as 10 and as 10/100; any other answer has one reading."""
    return [s.replace("%", ""), s.replace("%", "/100")] if "%" in s else [s]


def _readings_equal(g: str, t: str, tol: Fraction) -> bool:
    """(a) equal strings, (b) plain numbers, (c) parsed values."""
    if _squash(g) == _squash(t):
        return True
    g_num, t_num = _as_number(_squash(g)), _as_number(_squash(t))
    if g_num is not None and t_num is not None:
        return _close(g_num, t_num, tol)
    if max(len(g), len(t)) > _MAX_PARSE_CHARS or _TIME_RE.fullmatch(g) or _TIME_RE.fullmatch(t):
        return False
    g_val, t_val = _parse(g), _parse(t)
    return g_val is not None and t_val is not None and _values_equal(g_val, t_val, tol)


def _squash(s: str) -> str:
    """Drop spaces, except between two word characters: "1 2" is not "12"."""
    return re.sub(r" (?!\w)|(?<!\w) ", "", s)


def _as_number(s: str) -> Fraction | None:
    """Parse "12", "-0.5", "1e6" or "3/4" exactly; None for anything else."""
    parts = s.split("/")
    if len(s) > _MAX_PARSE_CHARS or len(parts) > 2 or not all(_NUMBER_RE.fullmatch(p) for p in parts):
        return None
    den = Fraction(parts[1]) if len(parts) == 2 else Fraction(1)
    return Fraction(parts[0]) / den if den else None


def _close(a: Fraction, b: Fraction, tol: Fraction) -> bool:
    """The tolerance rule: |a - b| <= min(tol, 1e-6 * max(|a|, |b|)), tol from _tolerance.
    A decimal matches a value it is rounded from, to at least about six significant
    digits; with tol = 0 (no decimal written) only equal values match."""
    return abs(a - b) <= min(tol, _REL_TOL * max(abs(a), abs(b)))


# A4. a restricted parser that builds sympy objects (never eval)

_TOKEN_RE = re.compile(r"\s*(\d+(?:\.\d*)?(?:[eE][-+]?\d{1,3}(?!\d))?|\.\d+|\\[A-Za-z]+|\\[{}]|"
                       r"[A-Za-z]_(?:\{[A-Za-z0-9]+\}|[A-Za-z0-9])|[A-Za-z]+|[<>!]=|[-+*/^()\[\]{},=<>:])")
_GREEK = {"\\" + g for g in "alpha beta gamma delta epsilon theta lambda mu rho sigma tau phi omega".split()}
_COMMANDS = {"\\frac", "\\sqrt", "\\pi", "\\infty", "\\cup", "\\{", "\\}", "\\cdot", "\\times"} | _GREEK
_OPENERS = {"(": ")", "[": "]", "{": "}", "\\{": "\\}"}
_KINDS = {"(": "()", "[": "[]", "{": "{}", "\\{": "{}"}
_RELOPS = {"=", "<", ">", "<=", ">=", "!="}
_OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv}


def _tokenize(s: str) -> list[str] | None:
    """Numbers, single letters, x_1, known commands and operators; None if anything else."""
    tokens, pos, s = [], 0, s.rstrip()
    while pos < len(s):
        m = _TOKEN_RE.match(s, pos)
        if not m:
            return None
        tok, pos = m.group(1), m.end()
        if tok[0] == "\\":
            if tok not in _COMMANDS:
                return None
            tokens.append("*" if tok in ("\\cdot", "\\times") else tok)
        elif "_" in tok:
            tokens.append(tok.replace("{", "").replace("}", ""))  # x_{1} is x_1
        elif tok[0].isalpha():
            if len(tok) > 2:
                return None  # a word, not maths: "yes" must not equal "sey"
            tokens.extend(tok)  # "xy" is x*y
        else:
            tokens.append(tok)
    return tokens


def _parse(text: str) -> Value | None:
    """Parse restricted LaTeX/plain maths into a sympy value; None if unsupported or unsafe."""
    tokens = _tokenize(text)
    if not tokens:
        return None
    pos = 0

    def peek() -> str:
        return tokens[pos] if pos < len(tokens) else ""

    def take(expected: str = "") -> str:
        nonlocal pos
        if pos >= len(tokens) or (expected and tokens[pos] != expected):
            raise _ParseError(f"expected {expected or 'more input'}")
        pos += 1
        return tokens[pos - 1]

    def items(depth: int) -> list[Value]:  # relation (("," | "\cup") relation)*
        out = [relation(depth)]
        while peek() in (",", "\\cup"):
            take()
            out.append(relation(depth))
        if len(out) > _MAX_ITEMS:
            raise _ParseError("too many items")
        return out

    def relation(depth: int) -> Value:  # ratio (relop ratio)*, a chain such as a < x <= b
        sides, ops = [ratio(depth)], []
        while peek() in _RELOPS:
            ops.append(take())
            sides.append(ratio(depth))
        return _relation(sides, ops) if ops else sides[0]

    def ratio(depth: int) -> Value:  # expr (":" expr)*
        parts = [expr(depth)]
        while peek() == ":":
            take()
            parts.append(expr(depth))
        return ("ratio", tuple(_binary(p, parts[0], "/") for p in parts[1:])) if parts[1:] else parts[0]

    def expr(depth: int) -> Value:  # term (("+" | "-") term)*
        left = term(depth)
        while peek() in ("+", "-"):
            op = take()
            left = _binary(left, term(depth), op)
        return left

    def term(depth: int) -> Value:  # unary (("*" | "/") unary | implicit product)*
        left = unary(depth)
        while tok := peek():
            if tok in ("*", "/"):
                take()
                left = _binary(left, unary(depth), tok)
            elif tok[0].isalpha() or tok in _GREEK or tok in ("\\frac", "\\sqrt", "\\pi", "(", "{"):
                left = _binary(left, power(depth), "*")  # 2x, 2\pi, 3\sqrt{2}, x(x+1)
            else:
                break
        return left

    def unary(depth: int) -> Value:  # ("-" | "+") unary | power
        if depth > _MAX_DEPTH:
            raise _ParseError("too deeply nested")
        if peek() in ("-", "+"):
            sign, value = take(), _scalar(unary(depth + 1))
            return -value if sign == "-" else value
        return power(depth)

    def power(depth: int) -> Value:  # atom ("^" unary)?: right-associative
        base = atom(depth)
        if peek() != "^":
            return base
        take()
        return _power(base, unary(depth + 1))

    def atom(depth: int) -> Value:
        if depth > _MAX_DEPTH:
            raise _ParseError("too deeply nested")
        tok = take()
        if tok[0].isdigit() or tok[0] == ".":
            f = Fraction(tok)  # exact: "0.5" is 1/2, "1e6" is 10^6
            return sympy.Rational(f.numerator, f.denominator)
        if tok[0].isalpha() or tok in _GREEK:
            return sympy.Symbol(tok.lstrip("\\"))
        if tok in ("\\pi", "\\infty"):
            return sympy.pi if tok == "\\pi" else sympy.oo
        if tok in _OPENERS:
            values = items(depth + 1)
            close = take()
            if tok in "([" and close in ")]" and len(values) == 2:
                return (tok + close, tuple(values))  # a tuple, or an interval [a, b), (a, b]
            if close != _OPENERS[tok]:
                raise _ParseError(f"expected {_OPENERS[tok]}")
            if len(values) == 1 and tok != "\\{":
                return values[0]  # plain grouping
            return (_KINDS[tok], tuple(values))
        if tok == "\\frac":
            numerator = arg(depth + 1)
            return _binary(numerator, arg(depth + 1), "/")
        if tok == "\\sqrt":
            index: Value = sympy.Integer(2)
            if peek() == "[":
                take()
                index = expr(depth + 1)
                take("]")
            if not (isinstance(index, sympy.Integer) and 2 <= index <= _MAX_ROOT):
                raise _ParseError("bad root index")
            return _power(arg(depth + 1), sympy.Rational(1, int(index)))
        raise _ParseError(f"unexpected {tok}")

    def arg(depth: int) -> Value:  # {...}, or a single digit or letter as in \sqrt2
        tok = peek()
        if tok[:1].isdigit() and len(tok) > 1:
            tokens[pos] = tok[1:]  # leave the other digits for the next argument
            return sympy.Integer(int(tok[0]))
        return atom(depth)

    try:
        values = items(0)
        if pos != len(tokens):
            return None
        value: Value = values[0] if len(values) == 1 else ("list", tuple(values))
        return value if _finite(value) else None
    except (_ParseError, RecursionError, ZeroDivisionError, ValueError, TypeError):
        return None


def _relation(sides: list[Value], ops: list[str]) -> Value:
    """A relation chain, turned to face "<" ("5 >= x" is "x <= 5"). An equation between
    constants that holds, such as "6/2 = 3", is just its value."""
    sides = [_scalar(s) for s in sides]
    if all(op[0] == ">" for op in ops):
        sides, ops = sides[::-1], [op.replace(">", "<") for op in reversed(ops)]
    if set(ops) == {"="} and not any(s.free_symbols for s in sides) and \
            all(_exprs_equal(sides[0], s, Fraction(0)) for s in sides[1:]):
        return sides[0]
    return ("rel " + " ".join(ops), tuple(sides))


def _scalar(v: Value) -> sympy.Expr:
    """The value as an expression; tuples and sets cannot take part in arithmetic."""
    if isinstance(v, sympy.Expr):
        return v
    raise _ParseError("arithmetic on a collection")


def _binary(a: Value, b: Value, op: str) -> sympy.Expr:
    """a op b, after checking the result stays small enough to evaluate cheaply."""
    a, b = _scalar(a), _scalar(b)
    (a_bits, a_roots), (b_bits, b_roots) = _size(a), _size(b)
    # Sums of bounds bound the result; products of roots are merged by sympy,
    # so the radicand budget is shared by the whole expression.
    if a_bits + b_bits > _MAX_BITS or a_roots + b_roots > _MAX_ROOT_BITS:
        raise _ParseError("too large")
    return _OPS[op](a, b)


def _power(base: Value, exponent: Value) -> sympy.Expr:
    """base ** exponent for rational exponents only, refusing astronomically large results."""
    base, exponent = _scalar(base), _scalar(exponent)
    if not exponent.is_Rational:
        raise _ParseError("only numeric rational exponents")
    p, q = abs(int(exponent.p)), int(exponent.q)
    if p > _MAX_EXPONENT or q > _MAX_ROOT:
        raise _ParseError("exponent out of range")
    bits, roots = _pow_size(_size(base), p, q)
    if bits > _MAX_BITS or roots > _MAX_ROOT_BITS:
        raise _ParseError("too large")  # checked before sympy evaluates: 9^9^9 stops here
    return sympy.Pow(base, exponent)


def _pow_size(base_size: tuple[int, int], p: int, q: int) -> tuple[int, int]:
    """Size bound of base^(p/q): bits grow with p; a root makes the whole base a radicand."""
    bits, roots = base_size
    return bits * max(p, 1), roots * max(p, 1) + (bits if q > 1 else 0)


def _size(e: sympy.Expr) -> tuple[int, int]:
    """Upper bounds (bits of the value, bits of all radicands) at any sample point."""
    if e.is_Rational:
        return int(e.p).bit_length() + int(e.q).bit_length(), 0
    if e.is_Symbol:
        return _SYMBOL_BITS, 0
    if e.is_Atom:
        return 2, 0  # pi, oo
    if e.is_Pow and e.exp.is_Rational:
        return _pow_size(_size(e.base), abs(int(e.exp.p)), int(e.exp.q))
    if e.is_Add or e.is_Mul:
        sizes = [_size(a) for a in e.args]
        return sum(s[0] for s in sizes) + 1, sum(s[1] for s in sizes)
    return _MAX_BITS + 1, _MAX_ROOT_BITS + 1  # anything else is refused


def _finite(v: Value) -> bool:
    """False if the value holds a division by zero or NaN (e.g. from 0^-1); oo is allowed."""
    if isinstance(v, tuple):
        return all(_finite(item) for item in v[1])
    return not v.has(sympy.zoo, sympy.nan)


# A5. equality

def _values_equal(a: Value, b: Value, tol: Fraction) -> bool:
    """Relations as relations, tuples in order, sets in any order, expressions symbolically."""
    a_kind, b_kind = (v[0] if isinstance(v, tuple) else "" for v in (a, b))
    if a_kind.startswith("rel") and b_kind.startswith("rel"):
        return _relations_equal(a, b, tol)
    if a_kind.startswith("rel") or b_kind.startswith("rel"):  # "x = 5" vs 5, "x > 1" vs (1, oo)
        rel, other = (a, b) if a_kind.startswith("rel") else (b, a)
        meaning = _named_value(rel)
        meaning = _as_interval(rel) if meaning is None else meaning
        return meaning is not None and _values_equal(meaning, other, tol)
    if a_kind in ("{}", "list") and len(a[1]) == 1 and not b_kind:
        return _values_equal(a[1][0], b, tol)  # a one-element set is its element
    if b_kind in ("{}", "list") and len(b[1]) == 1 and not a_kind:
        return _values_equal(a, b[1][0], tol)
    if not a_kind or not b_kind:
        return not a_kind and not b_kind and _exprs_equal(a, b, tol)
    if {a_kind, b_kind} <= {"{}", "list"}:  # sets: each item of one side is in the other
        return all(any(_values_equal(x, y, tol) for y in b[1]) for x in a[1]) and \
            all(any(_values_equal(x, y, tol) for x in a[1]) for y in b[1])
    if a_kind == b_kind or {a_kind, b_kind} == {"()", "list"}:  # a bare list matches a tuple in order
        return len(a[1]) == len(b[1]) and all(_values_equal(x, y, tol) for x, y in zip(a[1], b[1]))
    return False


def _named_value(rel: Value) -> Value | None:
    """"x = 5" or "5 = x" names the value 5. "a + 3z = 0" names nothing: it never equals 0."""
    if rel[0] != "rel =" or len(rel[1]) != 2:
        return None
    left, right = rel[1]
    return right if left.is_Symbol else left if right.is_Symbol else None


def _as_interval(rel: Value) -> Value | None:
    """"x > 1" is (1, oo), "1 < x <= 2" is (1, 2]: the values of a lone variable."""
    ops, sides = rel[0].split()[1:], rel[1]
    if not set(ops) <= {"<", "<="} or sum(s.is_Symbol for s in sides) != 1 or \
            any(s.free_symbols for s in sides if not s.is_Symbol):
        return None
    if len(sides) == 2 and sides[0].is_Symbol:   # x < c
        sides, ops = (-sympy.oo, *sides), ["<", *ops]
    elif len(sides) == 2:                        # c < x
        sides, ops = (*sides, sympy.oo), [*ops, "<"]
    if not sides[1].is_Symbol:
        return None
    return ("(" if ops[0] == "<" else "[") + (")" if ops[1] == "<" else "]"), (sides[0], sides[2])


def _relations_equal(a: Value, b: Value, tol: Fraction) -> bool:
    """Same relation and the same sides, or for two-sided ones the same side differences:
    "y = 2x - 3" is "2x - y = 3"; "x - y = 2" is "y - x = -2" (only "=" and "!=" flip)."""
    if a[0] != b[0] or len(a[1]) != len(b[1]):
        return False
    if all(_exprs_equal(x, y, tol) for x, y in zip(a[1], b[1])):
        return True
    if len(a[1]) != 2:
        return False
    diff_a, diff_b = a[1][0] - a[1][1], b[1][0] - b[1][1]
    return _exprs_equal(diff_a, diff_b, tol) or (a[0] in ("rel =", "rel !=") and _exprs_equal(diff_a, -diff_b, tol))


def _exprs_equal(a: sympy.Expr, b: sympy.Expr, tol: Fraction) -> bool:
    """Equal if structurally equal, or equal at three rational sample points.

    Evaluating at points replaces simplify()/expand(), whose cost is unbounded;
    the size bounds above keep every evaluation cheap.
    """
    if a == b:
        return True
    symbols = sorted(a.free_symbols | b.free_symbols, key=str)
    if not symbols:
        return _numbers_close(a, b, tol)
    if len(symbols) > _MAX_SYMBOLS:
        return False
    checked = 0
    for k in range(3):
        point = {s: _SAMPLES[k + 3 * i] for i, s in enumerate(symbols)}  # distinct values
        va, vb = a.xreplace(point), b.xreplace(point)
        if not (_finite(va) and _finite(vb)):
            continue  # the point is a pole, e.g. of 1/(17x-13) at x = 13/17
        if not _numbers_close(va, vb, tol):
            return False
        checked += 1
    return checked >= 2


def _numbers_close(a: sympy.Expr, b: sympy.Expr, tol: Fraction) -> bool:
    """Two constants by the rule of _close: rationals exactly (or within tol), others
    ("1.41421356" against sqrt 2) evaluated to 30 digits, so also within 1e-20 of each
    other, relative or absolute, for rounding at 30 digits; oo is only oo."""
    if a.is_Rational and b.is_Rational:
        return _close(Fraction(int(a.p), int(a.q)), Fraction(int(b.p), int(b.q)), tol)
    if not (a.is_number and b.is_number and a.is_finite and b.is_finite):
        return a == b
    da, db = sympy.N(a, 30, chop=True), sympy.N(b, 30, chop=True)  # chop: a 0 below 30 digits is 0
    diff, scale = sympy.Abs(da - db), sympy.Max(sympy.Abs(da), sympy.Abs(db))
    rule = sympy.Min(sympy.Rational(tol.numerator, tol.denominator),
                     sympy.Rational(_REL_TOL.numerator, _REL_TOL.denominator) * scale)
    return bool(diff <= sympy.Max(rule, _ROUNDING * scale, _ROUNDING))


# ----------------------------------------------------------------------------
# Appendix B. The sampling engine: generate(), its stopping rules, KV-cache reuse
# ----------------------------------------------------------------------------
#
# rollout() calls generate() twice: once for the thinking (keeping its KV cache), once for the
# summaries (starting from that cache). Everything here is about doing that fast and exactly;
# none of it changes what is sampled. Skip it on a first read.

def _first_stop(tokens: list[int], eos: set[int], think_end: list[int],
                tokenizer=None) -> tuple[int, str]:
    """Length up to and including the first stop, and why it stopped ('think', 'eos', 'max').

    `</think>` is matched on ids; when it is several ordinary tokens and a tokenizer is
    given, also on text, since a sampled trace may spell it with other merges (">\n\n").
    """
    k = len(think_end)
    pieces = tokenizer.convert_ids_to_tokens(tokens) if tokenizer is not None and k > 1 else None
    for i, t in enumerate(tokens):
        if t in eos:
            return i + 1, "eos"
        if k and t == think_end[-1] and i + 1 >= k and tokens[i + 1 - k:i + 1] == think_end:
            return i + 1, "think"
        if pieces and ">" in (pieces[i] or "") and \
                THINK_END in tokenizer.decode(tokens[max(0, i - k - 2):i + 1]):
            return i + 1, "think"
    return len(tokens), "max"


class _ThinkEndStop:
    """Stops a row once its new tokens spell a multi-token `</think>` (a StoppingCriteria)."""
    def __init__(self, tokenizer, think_end: list[int], prompt_len: int):
        self.tokenizer, self.k, self.prompt_len = tokenizer, len(think_end), prompt_len

    def __call__(self, input_ids, scores, **kwargs):
        # `</think>` can only end on a token that holds a ">": decode just those rows' tails.
        start = max(self.prompt_len, input_ids.shape[1] - self.k - 2)
        newest = self.tokenizer.convert_ids_to_tokens(input_ids[:, -1].tolist())
        done = [">" in (piece or "") and THINK_END in self.tokenizer.decode(input_ids[r, start:])
                for r, piece in enumerate(newest)]
        return torch.tensor(done, device=input_ids.device)


class _BoxedStop:
    """Stops a summary row as soon as a `\\boxed{...}` in it is closed, and remembers
    where (`stop_len`), so the padding generate() appends afterwards is never kept."""
    def __init__(self, tokenizer, prompt_len: int, rows: int):
        self.tokenizer, self.prompt_len = tokenizer, prompt_len
        self.stop_len = [None] * rows

    def __call__(self, input_ids, scores, **kwargs):
        # A box can only close on a token that holds a "}": decode just those rows, not all.
        newest = self.tokenizer.convert_ids_to_tokens(input_ids[:, -1].tolist())
        for r, piece in enumerate(newest):
            if self.stop_len[r] is None and "}" in (piece or "") and \
                    _boxed_closed(self.tokenizer.decode(input_ids[r, self.prompt_len:])):
                self.stop_len[r] = input_ids.shape[1] - self.prompt_len
        return torch.tensor([n is not None for n in self.stop_len], device=input_ids.device)


def _boxed_closed(text: str) -> bool:
    i = text.rfind("\\boxed{")
    if i < 0:
        return False
    depth = 0
    for ch in text[i + 6:]:
        depth += (ch == "{") - (ch == "}")
        if depth == 0:
            return True
    return False


@dataclass
class KVCache:
    """Keys and values that generate() computed, kept to be reused.

    layers[l] = (keys, values), each (rows, heads, width, head_dim). Token t of sequence i
    (its prompt, then its new tokens) sits in row[i], column start[i] + t, for t < length[i]
    (a batch's last sampled token is never fed to the model, so it has no keys yet).
    """
    layers: list[tuple[torch.Tensor, torch.Tensor]]
    row: torch.Tensor      # N
    start: torch.Tensor    # N
    length: torch.Tensor   # N


@functools.lru_cache(maxsize=None)
def _hf() -> SimpleNamespace:
    """transformers and what generate() takes from it, imported on first use: the rest of this
    file (advantages, loss, checker) runs with torch and sympy alone."""
    try:
        import transformers
        from transformers import DynamicCache, GenerationConfig
        from transformers.cache_utils import DynamicLayer
    except ImportError as e:
        raise ImportError(f"generation needs transformers 5 (pip install 'transformers>=5,<6'): {e}") from None

    class _Buffered(DynamicLayer):
        """A DynamicLayer that writes each step's keys and values into a buffer with room for
        `capacity` positions, where DynamicLayer concatenates, copying the whole cache at every
        step. The same keys and values, with spare room after them (experiments/bench.py, CPU: rollout 1.3-1.5x)."""

        def __init__(self, capacity: int):
            super().__init__()
            self.capacity, self.buffers = capacity, None

        def update(self, key_states, value_states, *args, **kwargs):
            n, q = self.get_seq_length(), key_states.shape[-2]
            if self.buffers is None or self.keys.data_ptr() != self.buffers[0].data_ptr() \
                    or self.keys.shape[0] != key_states.shape[0] or n + q > self.buffers[0].shape[-2]:
                # first call, or keys replaced (batch_select_indices) or outgrown: a new buffer
                B, H, _, D = key_states.shape
                self.buffers = [x.new_empty(B, H, max(self.capacity, n + q), D) for x in (key_states, value_states)]
                if n:
                    self.buffers[0][..., :n, :], self.buffers[1][..., :n, :] = self.keys, self.values
                self.is_initialized, self.device = True, key_states.device
            self.buffers[0][..., n:n + q, :], self.buffers[1][..., n:n + q, :] = key_states, value_states
            self.keys, self.values = (b[..., :n + q, :] for b in self.buffers)
            return self.keys, self.values

        def batch_select_indices(self, indices: torch.Tensor):
            """Copy the chosen rows with their spare room: one copy, and the next update is in place."""
            if self.buffers is None or self.keys.data_ptr() != self.buffers[0].data_ptr():
                return super().batch_select_indices(indices)
            n = self.get_seq_length()
            self.buffers = [b[indices] for b in self.buffers]
            self.keys, self.values = (b[..., :n, :] for b in self.buffers)

    # transformers 5.24 renamed the `past_key_values` argument (and output) of generate() and the
    # models to `cache`; the old name warns on every call.
    version = tuple(int(x) for x in transformers.__version__.split(".")[:2] if x.isdigit())
    return SimpleNamespace(DynamicCache=DynamicCache, DynamicLayer=DynamicLayer, Buffered=_Buffered,
                           GenerationConfig=GenerationConfig,
                           cache_key="cache" if version >= (5, 24) else "past_key_values")


def _new_cache(model, capacity: int, layers=()):
    """An empty model cache (or one holding `layers`' keys and values) with _Buffered layers."""
    hf = _hf()
    cache = hf.DynamicCache(config=model.config)
    cache.layers = [hf.Buffered(capacity) if type(x) is hf.DynamicLayer else x for x in cache.layers]
    for layer, (k, v) in zip(cache.layers, layers):
        layer.update(k, v)
    return cache


@torch.inference_mode()  # lighter than no_grad (about 10 % on a CPU); nothing here is trained on
def generate(model, tokenizer, seqs: list[list[int]], max_new_tokens: int, temperature: float,
             batch_size: int, think_end: list[int] | None = None, stop_at_box: bool = False,
             progress=None, prefix: tuple[KVCache, list[int], list[int]] | None = None,
             keep_cache: bool = False):
    """Sample a continuation of every sequence with HF `generate`, `batch_size` rows at a time.

    Rows are sorted by length (less padding), left-padded, and stop at EOS, at
    `think_end` if given, or after `max_new_tokens`. Returns the new tokens of
    each row, cut after its first stop token, in the input order; with
    `keep_cache`, returns (tokens, why, kv): also each row's stop reason
    ('think', 'eos', 'max', as _first_stop) and the KVCache of every row.

    Work is shared, exactly (same tokens at the same positions):
    - identical sequences (the G traces of a question, the k*A summaries of a
      summary prompt) are encoded once per batch; their cache is copied to each row;
    - with prefix = (kv, owner, shared), the first shared[i] tokens of seqs[i]
      are the first tokens of sequence owner[i] of `kv`: their keys and values
      are taken from there (see _cache_from).
    """
    hf = _hf()  # transformers, imported here on first use
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = stop_ids(tokenizer)
    eos_set, eos_for_gen = set(eos), eos + (think_end if think_end and len(think_end) == 1 else [])
    order = sorted(range(len(seqs)), key=lambda i: (-len(seqs[i]), seqs[i]))  # copies side by side
    out: list[list[int]] = [[] for _ in seqs]
    why: list[str] = [""] * len(seqs)
    kept, where = [], [None] * len(seqs)  # keep_cache: each batch's keys/values; (row, start, length)
    device = next(model.parameters()).device
    # Plain sampling from softmax(logits / T), as the loss assumes: a fresh config, so a
    # checkpoint's own defaults (Qwen2.5: top_k 20, top_p 0.8, repetition_penalty 1.05) are off.
    config = hf.GenerationConfig(
        do_sample=temperature > 0, temperature=temperature if temperature > 0 else None,
        top_k=0 if temperature > 0 else None, top_p=1.0 if temperature > 0 else None,
        repetition_penalty=1.0, max_new_tokens=max_new_tokens, eos_token_id=eos_for_gen,
        pad_token_id=pad, return_dict_in_generate=keep_cache)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        distinct: dict[tuple, int] = {}  # sequence -> its row in ids
        copy_of = [distinct.setdefault(tuple(seqs[i]), len(distinct)) for i in rows]
        width = max(map(len, distinct))
        ids = torch.full((len(distinct), width), pad, dtype=torch.long)
        mask = torch.zeros((len(distinct), width), dtype=torch.long)
        for r, seq in enumerate(distinct):  # left padding: generation continues at the right edge
            ids[r, width - len(seq):] = torch.tensor(seq)
            mask[r, width - len(seq):] = 1
        ids, mask = ids.to(device), mask.to(device)
        layers, done = (), 0  # the keys and values of ids[:, :done]
        if prefix is not None:
            kv, owner, shared = prefix
            src = [rows[copy_of.index(r)] for r in range(len(distinct))]  # row of ids -> index in seqs
            layers, done = _cache_from(kv, [owner[i] for i in src], [shared[i] for i in src],
                                       [len(seqs[i]) for i in src], width)
        cache = _new_cache(model, width + max_new_tokens, layers)
        copy_of = torch.tensor(copy_of, device=device)
        if len(distinct) < len(rows):  # encode all but the last token once, then copy the cache
            if done < width - 1:
                cache = _prefill(model, ids[:, done:-1], mask[:, :-1], cache)
            cache.batch_select_indices(copy_of)
        ids, mask = ids[copy_of], mask[copy_of]
        criteria = []
        if think_end and len(think_end) > 1:
            criteria.append(_ThinkEndStop(tokenizer, think_end, width))
        box = _BoxedStop(tokenizer, width, len(rows)) if stop_at_box else None
        if box:
            criteria.append(box)
        gen = model.generate(input_ids=ids, attention_mask=mask, generation_config=config,
                             stopping_criteria=criteria or None, **{hf.cache_key: cache})
        if keep_cache:  # token t of seqs[i] is in row start + r, column width - len(seqs[i]) + t
            gen, cache = gen.sequences, gen[hf.cache_key]
            kept.append([(layer.keys, layer.values) for layer in cache.layers])
            for r, i in enumerate(rows):
                where[i] = (start + r, width - len(seqs[i]), cache.get_seq_length() - width + len(seqs[i]))
        for r, (i, new) in enumerate(zip(rows, gen[:, width:].tolist())):
            n, why[i] = _first_stop(new, eos_set, think_end or [], tokenizer)
            if box and box.stop_len[r] is not None:
                n = min(n, box.stop_len[r])
            out[i] = new[:n]
        if progress is not None:
            progress(len(rows))
    if not keep_cache:
        return out
    if len(kept) > 1:  # one tensor per layer: the batches' caches, right-padded to one width, stacked
        T = max(k.shape[2] for k, _ in (batch[0] for batch in kept))
        stack = lambda xs: torch.cat([torch.nn.functional.pad(x, (0, 0, 0, T - x.shape[2])) for x in xs])
        kept = [[(stack([b[l][0] for b in kept]), stack([b[l][1] for b in kept])) for l in range(len(kept[0]))]]
    row, start, length = torch.tensor(where, device=device).T
    return out, why, KVCache(kept[0], row, start, length)


def _cache_from(kv: KVCache, owner: list[int], shared: list[int], lengths: list[int],
                width: int) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], int]:
    """A cache for the first C columns of R rows left-padded to `width`, copied from `kv`.

    Row j holds lengths[j] tokens; its first shared[j] tokens are the first tokens of
    sequence owner[j] of kv. Each row still encodes its own tail, the U = max(lengths - reused)
    last columns, and C = width - U:

        kv, row of owner[j]:      [pads|prompt  thinking ...........]
                                       ^ start
        row j of the new batch:   [pads ...|prompt  thinking[:cut]|insert]
                                  |<---- C: copied ---->|<--- U: encoded -->|

    Exact: a copied column holds the same token at the same position (positions count the
    unmasked tokens before it, as generate() computes them from the attention mask), so its
    keys and values are those a fresh forward pass would compute (up to float rounding).
    The tail may re-encode a few tokens that kv holds: harmless, same tokens, same positions.
    Returns (keys and values per layer, C).
    """
    device = kv.row.device
    own, L = torch.tensor(owner, device=device), torch.tensor(lengths, device=device)   # R, R
    reused = torch.minimum(torch.tensor(shared, device=device), kv.length[own])        # R
    U = max(1, int((L - reused).max()))
    C = width - U
    # Column x of row j holds token x - (width - L[j]), found at column start + that in kv.
    # Columns left of the row's first token are padding, masked: any finite values do there.
    cols = (kv.start[own] - (width - L))[:, None] + torch.arange(C, device=device)    # R,C
    gather = lambda x: x[kv.row[own][:, None], :, cols.clamp(min=0)].transpose(1, 2)  # R,heads,C,dim
    return [(gather(k), gather(v)) for k, v in kv.layers], C


def _prefill(model, ids: torch.Tensor, mask: torch.Tensor, cache):
    """Keys and values of left-padded ids (R,U) appended to `cache` (which holds the first
    columns of mask (R,C+U)), with the position ids `generate` gives them."""
    position_ids = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)[:, -ids.shape[1]:]
    base = getattr(model, model.base_model_prefix)  # no output layer: no R x U x V logits
    return base(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=True,
                **{_hf().cache_key: cache})[_hf().cache_key]
