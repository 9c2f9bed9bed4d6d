"""Rewards for LongVT-style tool-integrated video reasoning: one place for scoring, used by
train_grpo.py (GRPO rewards) and eval.py (metrics), so training and evaluation can never disagree.

    total = w_accuracy * accuracy + w_format * format + w_iou * iou      (LongVT: 1 + 1 + 1)

- accuracy: the last <answer> of the policy's own text, scored by rules (choice letter, number,
  time, normalized text) and/or an LLM judge (judge.py: fully / partially / not consistent -> 1 / 0.5 / 0).
- format: tags in the order think, (tool_call, think)*, answer, balanced, no nesting.
- iou: temporal IoU of the last (or best) crop_video window with the evidence window.

Departures from LongVT: the same answer extraction (the LAST <answer>) in training and eval; a
judge request that finally fails falls back to the rule scorer and is counted (judge_failures),
never a silent 0; answers longer than max_answer_chars get 0 accuracy and 0 format. rules="longvt" scores
format, answer, length and IoU by LongVT's rules instead (../shared/FORMATS.md; the README lists the differences).
"""
import ast
import math
import re
from dataclasses import dataclass

from judge import Judge, config_judge


@dataclass
class RewardConfig:
    w_accuracy: float = 1.0  # weight of answer accuracy in the total
    w_format: float = 1.0  # weight of the format reward
    w_iou: float = 1.0  # weight of the temporal IoU reward
    accuracy: str = "auto"  # "rule" | "judge" | "both" (rule first, judge for the rest) | "auto" (judge if configured)
    rules: str = "ours"  # "ours" | "longvt": LongVT's format, answer, length and IoU rules (../FORMATS.md, README)
    iou_mode: str = "last"  # "last" crop window (LongVT) | "best" crop window of the episode
    max_answer_chars: int = 1000  # longer answers get 0 accuracy and 0 format (stops answer-spraying)
    judge_timeout: float = 30.0  # seconds per judge HTTP request
    judge_retries: int = 3  # extra attempts after the first failed one
    judge_backoff: float = 0.5  # base seconds of the exponential backoff between attempts
    judge_workers: int = 16  # concurrent judge requests per batch


# ----------------------------------------------------------------------------- answer extraction
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.S)
_BOXED = "\\boxed{"
# Observations are not the policy's text; strip them in case a caller passes the full transcript,
# so an answer that a tool (or a forged observation) "says" can never be credited.
_OBSERVATION = re.compile(r"<tool_response>.*?(?:</tool_response>|$)", re.S)


def extract_answer(text: str) -> str | None:
    """The last <answer>...</answer> of `text`, stripped. Fallback: the last \\boxed{...} (brace
    matched), for models that answer the math way. An unclosed <answer> counts as no answer (the
    reply was truncated). None when nothing is found."""
    if not text:
        return None
    text = _OBSERVATION.sub("", text)
    found = _ANSWER.findall(text)
    if found:
        return found[-1].strip()
    start = text.rfind(_BOXED)
    if start < 0:
        return None
    depth, i = 1, start + len(_BOXED)
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j].strip()
    return None


# ----------------------------------------------------------------------------- rule scorer
NUMBER_REL_TOL = 0.01  # a number scores 1 within 1% of the reference (counts below 100: exact)
TIME_TOL_S = 5.0  # time answers without a known window: score decays linearly to 0 at 5 s off
_NUM = re.compile(r"[-+]?\d+(?:,\d{3})*(?:\.\d+)?")
_WORD_NUMBERS = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen twenty".split())}
_ARTICLES = re.compile(r"\b(?:a|an|the)\b")
_NEGATIONS = {"not", "no", "never", "neither", "nor", "none"}


def normalize_text(s: str) -> str:
    """Lowercase, punctuation -> space, drop articles, collapse whitespace."""
    s = re.sub(r"[^\w\s]", " ", s.lower()).replace("_", " ")
    return " ".join(_ARTICLES.sub(" ", s).split())


def parse_number(s: str) -> float | None:
    """The number a short answer states; None when none, or when it hedges between several."""
    found = [float(m.replace(",", "")) for m in _NUM.findall(s)]
    if not found:  # "three people": number words only when no digits are present
        found = [float(_WORD_NUMBERS[w]) for w in normalize_text(s).split() if w in _WORD_NUMBERS]
    return found[0] if found and all(math.isclose(x, found[0], rel_tol=1e-9) for x in found) else None


_CLOCK = re.compile(r"\b(?:(\d+):)?(\d{1,2}):(\d{2}(?:\.\d+)?)\b")
_UNIT = re.compile(r"(\d+(?:\.\d+)?)\s*(hours?|hrs?|h|minutes?|mins?|m|seconds?|secs?|s)\b", re.I)


def parse_seconds(s: str) -> float | None:
    """Seconds from "83", "83.5 s", "1:23", "01:02:03", "1 min 23 s"; None when unparseable."""
    m = _CLOCK.search(s)
    if m:
        return float(m.group(1) or 0) * 3600 + float(m.group(2)) * 60 + float(m.group(3))
    parts = _UNIT.findall(s)
    return sum(float(n) * {"h": 3600, "m": 60, "s": 1}[u[0].lower()] for n, u in parts) if parts else parse_number(s)


def _choice_map(choices: list[str]) -> dict[str, str]:
    """letter -> option text; options without a letter prefix ("red") get A, B, C... by position."""
    out = {}
    for i, c in enumerate(choices):
        m = re.match(r"^\s*\(?([A-Z])[.):]\s*(.*)$", c, re.S)
        out[m.group(1) if m else chr(ord("A") + i)] = m.group(2) if m else c
    return out


# The letter must stand alone: "B", "(B)", "B.", "B) text", "B: text", "answer is B", "option (B)".
# Lowercase only for a bare letter ("b"): elsewhere "a" is the article.
_LETTER_PATTERNS = [
    re.compile(r"^\(?([A-Za-z])\)?[.:)]?$"),
    re.compile(r"^(?:\(([A-Z])\)|([A-Z])[.):])\s"),
    re.compile(r"(?i:answer(?:\s+is)?|option|choice)\s*[:\-]?\s*\(?([A-Z])(?![A-Za-z])"),
]


def parse_choice(prediction: str, choices: list[str] | None = None) -> str | None:
    """The option letter a prediction picks, or None. Falls back to matching an option's text."""
    s = prediction.strip().strip("*\"'` ")
    options = _choice_map(choices or [])
    for m in filter(None, (pattern.search(s) for pattern in _LETTER_PATTERNS)):
        letter = next(g for g in m.groups() if g).upper()
        if not options or letter in options:  # "D" when there are only A-C is no pick
            return letter
    norm = normalize_text(s)
    hits = [k for k, body in options.items() if norm and normalize_text(body) == norm]
    return hits[0] if len(hits) == 1 else None


def answer_type(sample: dict) -> str:
    """The sample's answer_type, else inferred. A lone capital letter counts as a choice answer
    too: LVBench keeps its options inside the question and answers with a letter."""
    if sample.get("answer_type"):
        return sample["answer_type"]
    ref = str(sample.get("answer", "")).strip()
    if sample.get("choices") or re.fullmatch(r"\(?[A-Z]\)?\.?", ref):
        return "choice"
    return "number" if _NUM.fullmatch(ref.rstrip(".").replace(" ", "")) else "text"


def rule_score(prediction: str | None, sample: dict) -> float:
    """Score in [0, 1] by rules. choice: the same letter (1) else 0. number: within NUMBER_REL_TOL.
    time (seconds): 1 - |error| / max(window length, 1), or / TIME_TOL_S without a window.
    text: normalized equality = 1; partial 0.5 when the reference appears as whole words in a
    prediction at most 2 words longer and without a negation ("it is red"), since a longer list
    of guesses must not pay."""
    if not prediction or not prediction.strip():
        return 0.0
    ref, kind = str(sample.get("answer", "")), answer_type(sample)
    if kind == "choice":
        choices = sample.get("choices")
        want = parse_choice(ref, choices)
        return float(want is not None and parse_choice(prediction, choices) == want)
    if kind == "number":
        p, r = parse_number(prediction), parse_number(ref)
        return float(p is not None and r is not None and abs(p - r) <= NUMBER_REL_TOL * abs(r))
    if kind == "time":
        p, r = parse_seconds(prediction), parse_seconds(ref)
        if p is None or r is None:
            return 0.0
        w = sample.get("window")
        scale = max(float(w[1]) - float(w[0]), 1.0) if w else TIME_TOL_S
        return max(0.0, 1.0 - abs(p - r) / scale)
    p, r = normalize_text(prediction), normalize_text(ref)
    if not r or p == r:
        return float(p == r and bool(r))
    pw = p.split()
    return 0.5 if len(pw) <= len(r.split()) + 2 and f" {r} " in f" {p} " and not _NEGATIONS & set(pw) else 0.0


# ----------------------------------------------------------------------------- format and IoU
# <tool_response> is the environment's tag: in the policy's own text it is a forged observation
_TAG = re.compile(r"</?(?:think|tool_call|answer|tool_response)>")
# the whole tag stream: think, (tool_call, think)*, answer; each block closed before the next opens
_FORMAT = re.compile(r"<think></think>(?:<tool_call></tool_call><think></think>)*<answer></answer>")


def format_reward(turns: list[str]) -> float:
    """1.0 when the policy's turns, read in order, hold exactly think, (tool_call, think)*, answer,
    with every tag closed in the turn that opened it and no tag nested inside another; else 0.0.
    Tags inside an answer or a tool call, and any <tool_response> the policy writes, break it."""
    stream = []
    for turn in turns:
        tags = _TAG.findall(turn or "")
        if len(tags) % 2 or any(tags[i + 1] != tags[i].replace("<", "</") for i in range(0, len(tags), 2)):
            return 0.0  # a block left open across turns, or closed by the wrong tag
        stream += tags
    return float(_FORMAT.fullmatch("".join(stream)) is not None)


def iou(a, b) -> float:
    """Temporal IoU of two [start, end] windows in seconds. Reversed (end < start), zero-length,
    missing or non-finite windows score 0: crop_video rejects end <= start, so such a window
    selects nothing, and a point has no extent to overlap."""
    try:
        (s1, e1), (s2, e2) = [(float(w[0]), float(w[1])) for w in (a, b)]
    except (TypeError, ValueError, IndexError):
        return 0.0
    if not all(map(math.isfinite, (s1, e1, s2, e2))) or e1 <= s1 or e2 <= s2:
        return 0.0
    inter = max(0.0, min(e1, e2) - max(s1, s2))
    return inter / ((e1 - s1) + (e2 - s2) - inter)


def iou_reward(windows: list, gt_window, mode: str = "last") -> float:
    """IoU of the last valid crop window (invalid calls, None, produced no crop) or, with
    mode="best", of the best one; 0 when there is no ground-truth window or no crop."""
    if mode not in ("last", "best"):
        raise ValueError(f"iou_mode must be 'last' or 'best', got {mode!r}")
    valid = [w for w in windows or [] if w is not None]
    if gt_window is None or not valid:
        return 0.0
    return iou(valid[-1], gt_window) if mode == "last" else max(iou(w, gt_window) for w in valid)


# ----------------------------------------------------------------------------- LongVT's rules (rules="longvt")
_SPECIAL = re.compile(r"<\|[a-z_]+\|>")
_OPENING = re.compile(r"<(think|tool_call|answer)>")
_CALL_BODY = re.compile(r"<tool_call>(.*?)</tool_call>", re.S)
_NO_TOOLS = re.compile(r"^\s*<think>.*?</think>\s*<answer>.*?</answer>\s*$", re.S)


def longvt_response(turns: list[str]) -> str:
    """The decoded response LongVT's rules read: the policy's turns, each tool observation between two of them
    (its frames and text do not matter to the rules), special tokens dropped."""
    return "user<tool_response>\n</tool_response>assistant\n".join(_SPECIAL.sub("", t or "") for t in turns)


def longvt_format(resp: str) -> float:
    """LongVT's format rule: balanced think (at least one), tool_call and answer (exactly one) tags; without calls
    the whole response is think then answer; with n calls it starts with <think>, ends with </answer> and opens
    think, (tool_call, think) x n, answer."""
    c = resp.count
    if c("<think>") != c("</think>") or not c("<think>") or c("<tool_call>") != c("</tool_call>") \
            or c("<answer>") != c("</answer>") or c("<answer>") != 1:
        return 0.0
    n, s = c("<tool_call>"), resp.strip()
    if not n:
        return float(_NO_TOOLS.match(resp) is not None)
    want = ["think"] + ["tool_call", "think"] * n + ["answer"]
    return float(s.startswith("<think>") and s.endswith("</answer>") and _OPENING.findall(s) == want)


def longvt_answer(resp: str) -> str | None:
    """LongVT's split: when the response holds an <answer> and a </answer> anywhere, the text after the last <answer>
    up to the first </answer> after it, or to the end (so `<answer>blue</answer> <answer>red` answers "red"),
    stripped; else None."""
    if "<answer>" not in resp or "</answer>" not in resp:
        return None
    return resp.split("<answer>")[-1].split("</answer>")[0].strip()


def longvt_iou(resp: str, gt_window) -> float:
    """IoU (intersection / hull) of the raw window of the last call whose body is a Python literal naming
    crop_video with both times, even if the tool failed; 0 without a tool response in the response."""
    if gt_window is None or "<tool_response>" not in resp:
        return 0.0
    for body in reversed(_CALL_BODY.findall(resp)):
        try:
            call = ast.literal_eval(body.strip()) if len(body) < 10_000 else None
            args = call["arguments"] if call.get("name") == "crop_video" else {}
            s, e, gs, ge = (float(x) for x in (args["start_time"], args["end_time"], *gt_window))
        except Exception:  # noqa: BLE001 -- whatever the policy wrote: not a usable call, look further back
            continue
        hull = max(e, ge) - min(s, gs)
        return max(0.0, min(e, ge) - max(s, gs)) / hull if hull > 0 and math.isfinite(hull) else 0.0
    return 0.0


# ----------------------------------------------------------------------------- the reward
def _judge_inputs(sample: dict, answer: str) -> tuple[str, str, str]:
    question, reference = str(sample.get("question", "")), str(sample.get("answer", ""))
    choices = sample.get("choices")
    if choices:  # the judge must see the options, and the option's text rather than a bare letter
        question += "\n" + "\n".join(choices)
        options = _choice_map(choices)
        letter = parse_choice(reference, choices)
        if letter in options:
            reference = f"{letter}. {options[letter]}"
    return question, reference, answer


def reward_batch(samples: list[dict], trajectories: list, config: RewardConfig | None = None,
                 judge: Judge | None = None) -> list[tuple[float, dict]]:
    """reward() for a batch; the judge requests of the whole batch run concurrently."""
    cfg = config or RewardConfig()
    if cfg.rules not in ("ours", "longvt"):
        raise ValueError(f"rules must be 'ours' or 'longvt', got {cfg.rules!r}")
    if cfg.accuracy not in ("rule", "judge", "both", "auto"):
        raise ValueError(f"accuracy must be rule, judge, both or auto, got {cfg.accuracy!r}")
    if cfg.accuracy == "rule":
        judge = None
    elif judge is None:  # the judge_* fields configure a judge built from the environment only
        judge = config_judge(cfg)
        if judge is None and cfg.accuracy != "auto":
            raise RuntimeError(f"accuracy={cfg.accuracy!r} needs a judge: set LLM_AS_A_JUDGE_BASE "
                               "or OPENAI_BASE_URL, or pass judge=")
    comps, to_judge = [], []
    for i, (sample, traj) in enumerate(zip(samples, trajectories, strict=True)):
        # a plain string is a one-turn, tool-free trajectory (handy for text-only evaluation)
        turns = [traj] if isinstance(traj, str) else list(traj.turns_text)
        calls = [] if isinstance(traj, str) else list(getattr(traj, "tool_calls", None) or [])
        if cfg.rules == "longvt":
            resp = longvt_response(turns)
            answer = longvt_answer(resp)
            too_long = answer is not None and len(answer) >= cfg.max_answer_chars
            fmt, iou_ = longvt_format(resp), longvt_iou(resp, sample.get("window"))
        else:  # turn by turn from the end, so that an <answer> can never span two turns
            answer = next((a for a in map(extract_answer, reversed(turns)) if a is not None), None)
            too_long = answer is not None and len(answer) > cfg.max_answer_chars
            fmt = format_reward(turns)
            iou_ = iou_reward([call.get("window") for call in calls], sample.get("window"), cfg.iou_mode)
        rule = 0.0 if too_long else rule_score(answer, sample)
        c = {"accuracy": rule, "rule": rule, "judge": None, "judge_used": False, "judge_failures": 0,
             "format": 0.0 if too_long else fmt, "iou": iou_,
             "answer": answer, "answer_too_long": too_long, "tool_calls": len(calls),
             "tool_errors": sum(1 for call in calls if call.get("error"))}
        comps.append(c)
        # nothing to judge without an answer; in "both" mode full rule marks are final
        if judge is not None and answer and not too_long and not (cfg.accuracy == "both" and rule == 1.0):
            to_judge.append(i)
    scores = judge.score_many([_judge_inputs(samples[i], comps[i]["answer"]) for i in to_judge],
                              style=cfg.rules) if to_judge else []  # rules="longvt": LongVT's request and verdict
    for i, value in zip(to_judge, scores):
        if value is None:  # final failure: the rule score stands, and the failure is counted
            comps[i]["judge_failures"] = 1
        else:
            comps[i].update(accuracy=value, judge=value, judge_used=True)
    for c in comps:
        c["total"] = cfg.w_accuracy * c["accuracy"] + cfg.w_format * c["format"] + cfg.w_iou * c["iou"]
    return [(c["total"], c) for c in comps]
