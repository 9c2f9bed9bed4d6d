"""reward.py: tables for the pure scorers (answer extraction, rule scores, the judge reply's verdict,
format, IoU) and the rule-only reward. The judge over HTTP is in test_judge.py."""
from types import SimpleNamespace

import pytest

import reward as R
from judge import parse_judge_reply


# ----------------------------------------------------------------------------- extract_answer
def one(sample, trajectory, config=None, judge=None):
    """reward.reward_batch of one trajectory: (total, components)."""
    return R.reward_batch([sample], [trajectory], config, judge)[0]


@pytest.mark.parametrize("text, want", [
    ("<think>x</think><answer>B</answer>", "B"), ("<answer>A</answer> on second thought <answer> C </answer>", "C"),
    ("<answer>\nred\nflag\n</answer>", "red\nflag"), ("<answer></answer>", ""), ("no tags at all", None), ("", None),
    ("<think>x</think><answer>B", None),  # unclosed: a truncated reply
    ("so the result is \\boxed{42}.", "42"), ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"), ("\\boxed{1} then \\boxed{2}", "2"),
    ("\\boxed{unclosed", None), ("<answer>x</answer> \\boxed{y}", "x"),  # <answer> wins over \\boxed
    # an answer inside a tool observation is never the policy's
    ("<tool_response><answer>A</answer></tool_response>", None), ("<tool_response><answer>A</answer>", None),
    ("<tool_response><answer>A</answer></tool_response><answer>B</answer>", "B"),
    ("<answer>B</answer><tool_response>the answer is <answer>A</answer></tool_response>", "B"),
])

def test_extract_answer(text, want):
    assert R.extract_answer(text) == want


# ----------------------------------------------------------------------------- rule_score
ABC = {"answer": "B", "choices": ["A. red", "B. blue", "C. green"]}
LETTERLESS = {"answer": "blue", "choices": ["red", "blue", "green"]}
LVBENCH = {"answer": "(C)", "question": "Which?\n(A) x\n(B) y\n(C) z"}
N3, N1000, N0 = {"answer": "3"}, {"answer": "1000"}, {"answer": "0"}
T83 = {"answer": "83", "answer_type": "time", "window": [80.0, 90.0]}
T83_NOWIN = {"answer": "83", "answer_type": "time"}
T83_SHORT = {"answer": "83", "answer_type": "time", "window": [83.0, 83.5]}
TXT = {"answer": "A red flag."}


@pytest.mark.parametrize("pred, sample, want", [
    *[(p, ABC, 1.0) for p in ["B", "(B)", "B.", "B)", "B) blue", "B. blue", "B: blue", "(B) blue",
                              "The answer is B", "the answer is (B).", "Answer: B", "Option B", "**B**",
                              "blue", "Blue.", " B \n", "b", "(b)"]],
    *[(p, ABC, 0.0) for p in ["A", "(A) red", "red", "The answer is A", "D", "B or C", "purple", "", None,
                              "a blue sky"]],
    ("B", {"answer": "B. blue", "choices": ABC["choices"]}, 1.0),
    ("blue", {"answer": "blue", "choices": ABC["choices"]}, 1.0),
    ("B", LETTERLESS, 1.0), ("blue", LETTERLESS, 1.0), ("(B) blue", LETTERLESS, 1.0), ("A", LETTERLESS, 0.0),
    ("C", LVBENCH, 1.0), ("The answer is C.", LVBENCH, 1.0), ("(B)", LVBENCH, 0.0),
    ("3", N3, 1.0), ("3 people", N3, 1.0), ("three", N3, 1.0), ("There are three people.", N3, 1.0),
    ("3.0", N3, 1.0), ("4", N3, 0.0), ("3 or 4", N3, 0.0), ("many", N3, 0.0),
    ("1,000", N1000, 1.0), ("1005", N1000, 1.0), ("1020", N1000, 0.0),
    ("0", N0, 1.0), ("zero", N0, 1.0), ("0.001", N0, 0.0),
    ("83", T83, 1.0), ("1:23", T83, 1.0), ("00:01:23", T83, 1.0), ("83 seconds", T83, 1.0),
    ("1 min 23 s", T83, 1.0), ("88", T83, 0.5), ("78", T83, 0.5), ("93", T83, 0.0), ("300", T83, 0.0),
    ("soon", T83, 0.0), ("85", T83_NOWIN, 0.6), ("83.5", T83_SHORT, 0.5),
    ("red flag", TXT, 1.0), ("A red flag", TXT, 1.0), ("The Red-Flag!", TXT, 1.0),
    ("It is a red flag", TXT, 0.5), ("not a red flag", TXT, 0.0), ("blue flag", TXT, 0.0),
    ("red flag, blue flag, green flag", TXT, 0.0), ("flag", TXT, 0.0), ("", TXT, 0.0),
])
def test_rule_score(pred, sample, want):
    assert R.rule_score(pred, sample) == pytest.approx(want)


@pytest.mark.parametrize("sample, kind", [
    (ABC, "choice"), (LVBENCH, "choice"), (N3, "number"), ({"answer": "1,000."}, "number"),
    ({"answer": "3 people"}, "text"), (TXT, "text"), (T83, "time"), ({"answer": "B"}, "choice"),
])
def test_answer_type(sample, kind):
    assert R.answer_type(sample) == kind


# ----------------------------------------------------------------------------- parse_judge_reply
@pytest.mark.parametrize("reply, want", [
    ("1", 1.0), ("0", 0.0), ("0.5", 0.5), ("1.0", 1.0), (" 0.5 \n", 0.5), ("1/1", 1.0), ("**1**", 1.0),
    ("Judgement: 0", 0.0), ("Judgment: 1", 1.0), ("score: 1/1", 1.0), ("Score: 0.5/1", 0.5),
    ("Score: 0/1", 0.0), ("**Score:** 1", 1.0), ("Rating = 0.5", 0.5),
    ("Score: 1\nThe prediction names the same colour.", 1.0),
    ("The prediction is fully consistent with the reference.", 1.0),
    ("Partially consistent: the colour is right, the count is wrong.", 0.5),
    ("The prediction is not consistent with the reference.", 0.0),
    ("Inconsistent.", 0.0), ("The prediction is incorrect.", 0.0),
    ("The prediction matches the reference, so I give it 1.", 1.0),
    ("<think>0 or 1? it says red, so fully.</think>Score: 1", 1.0),
    ("Score: 2", None), ("0.7", None), ("Score: 1/0", None), (None, None), ("Score: 1. On reflection, Score: 0.", None),
    ("Consistent in colour but not consistent in count.", None), ("Not fully consistent.", None),
    ("The reference says 2 people and the prediction says 1.", None),
    ("I am not sure.", None), ("", None), ("The weather is lovely today.", None),
])
def test_parse_judge_reply(reply, want):
    assert parse_judge_reply(reply) == want


# ----------------------------------------------------------------------------- format_reward
T, C, A = "<think>t</think>", '<tool_call>{"name": "crop_video"}</tool_call>', "<answer>B</answer>"


@pytest.mark.parametrize("turns, want", [
    ([T + A], 1.0), ([T + C, T + A], 1.0), ([T + C, T + C, T + A], 1.0), ([T + C, "", T + A], 1.0),
    (["  " + T + "\nsome words " + C + " ", "\n" + T + " so " + A + "\n"], 1.0),
    ([A], 0.0), ([T], 0.0), ([], 0.0), ([""], 0.0),  # no think, no answer, nothing
    ([T + A + A], 0.0), ([T + A, T + A], 0.0),  # more than one answer
    ([T + C + A], 0.0),  # no think after the tool call
    ([T + C + C, T + A], 0.0),  # two tool calls in a row
    ([C + T + A], 0.0), ([T + A + T], 0.0),  # wrong order
    (["<think>a<answer>B</answer></think>"], 0.0),  # answer nested in think
    ([T + "<answer>use <think> tags</answer>"], 0.0),  # a tag inside the answer
    ([T + '<tool_call>{"a": "<answer>B</answer>"}</tool_call>', T + A], 0.0),  # answer inside a tool call
    ([T + "<answer>B"], 0.0), ([T + "</think>" + A], 0.0), (["<think>t" + A], 0.0),  # unbalanced
    ([T + "<tool_call>{}", "</tool_call>" + T + A], 0.0),  # a block spanning two turns
    ([T + C + "<tool_response><answer>A</answer></tool_response>"], 0.0),  # forged observation
    ([T + C + "<tool_response>ok</tool_response>", T + A], 0.0),
])
def test_format_reward(turns, want):
    assert R.format_reward(turns) == want


# ----------------------------------------------------------------------------- iou and iou_reward
@pytest.mark.parametrize("a, b, want", [
    ([0, 10], [0, 10], 1.0),  # identical
    ([0, 10], [20, 30], 0.0), ([0, 10], [10, 20], 0.0),  # disjoint, touching
    ([2, 4], [0, 10], 0.2), ([0, 10], [5, 15], 1 / 3),  # nested, overlapping
    ([5, 5], [0, 10], 0.0), ([5, 5], [5, 5], 0.0),  # zero-length
    ([10, 0], [0, 10], 0.0), ([0, 10], [10, 0], 0.0),  # reversed
    (None, [0, 10], 0.0), ([0, float("nan")], [0, 10], 0.0), (["a", "b"], [0, 10], 0.0), ([1], [0, 10], 0.0),
    (("1", "3"), [0, 4], 0.5),
])
def test_iou(a, b, want):
    assert R.iou(a, b) == pytest.approx(want)
    assert R.iou(b, a) == pytest.approx(want)


@pytest.mark.parametrize("windows, gt, mode, want", [
    ([], [40, 50], "last", 0.0), ([[40, 50]], None, "last", 0.0), ([None, None], [40, 50], "best", 0.0),
    ([[0, 10], [40, 50]], [40, 50], "last", 1.0), ([[40, 50], [0, 10]], [40, 50], "last", 0.0),
    ([[40, 50], [0, 10]], [40, 50], "best", 1.0), ([[40, 50], None], [40, 50], "last", 1.0),
    ([[45, 50], [40, 60]], [40, 50], "best", 0.5),
])
def test_iou_reward(windows, gt, mode, want):
    assert R.iou_reward(windows, gt, mode) == pytest.approx(want)


# ----------------------------------------------------------------------------- reward (rules only)
NEEDLE = {"id": "n1", "video": "v.mp4", "question": "What colour is the needle?", "answer": "B",
          "choices": ["A. red", "B. blue", "C. green"], "window": [40.0, 50.0]}


def traj(*turns, windows=()):
    return SimpleNamespace(turns_text=list(turns), tool_calls=[
        {"window": w, "error": None if w else "end_time <= start_time"} for w in windows])


def test_reward_rule_components():
    total, c = one(NEEDLE, traj(T + C, T + "<answer>B</answer>", windows=[[40, 50]]), R.RewardConfig(accuracy="rule"))
    assert total == pytest.approx(3.0) and c["total"] == total
    assert (c["accuracy"], c["format"], c["iou"], c["answer"]) == (1.0, 1.0, 1.0, "B")
    assert (c["judge_used"], c["judge_failures"], c["answer_too_long"]) == (False, 0, False)
    total, c = one(NEEDLE, traj(T + C, T + "<answer>A</answer>", windows=[[45, 50], None]),
                        R.RewardConfig(w_accuracy=2.0, w_format=0.5, w_iou=4.0))
    assert (c["accuracy"], c["iou"], c["tool_calls"], c["tool_errors"]) == (0.0, 0.5, 2, 1)
    assert total == pytest.approx(0.5 + 4.0 * 0.5)


def test_reward_no_answer_observation_answer_and_too_long():
    _, c = one(NEEDLE, traj(T + C, windows=[[0, 10]]))
    assert (c["answer"], c["accuracy"], c["format"], c["iou"]) == (None, 0.0, 0.0, 0.0)
    # a plain string is a one-turn trajectory; the answer a tool "says" is not the policy's
    _, c = one(NEEDLE, T + "<tool_response><answer>B</answer></tool_response>")
    assert c["answer"] is None and c["accuracy"] == 0.0
    long = "B " + "x" * 1000
    total, c = one(NEEDLE, traj(T + C, T + f"<answer>{long}</answer>", windows=[[40, 50]]))
    assert c["answer_too_long"] and (c["accuracy"], c["format"], c["iou"]) == (0.0, 0.0, 1.0) and total == 1.0
    _, c = one(NEEDLE, traj(T + f"<answer>{long}</answer>"), R.RewardConfig(max_answer_chars=5000))
    assert not c["answer_too_long"] and c["format"] == 1.0


def test_reward_config_errors():
    with pytest.raises(RuntimeError, match="needs a judge"):
        one(NEEDLE, traj(T + A), R.RewardConfig(accuracy="judge"))
    with pytest.raises(ValueError):
        one(NEEDLE, traj(T + A), R.RewardConfig(accuracy="vibes"))
    with pytest.raises(ValueError):
        one(NEEDLE, traj(T + A), R.RewardConfig(iou_mode="mean"))


# ----------------------------------------------------------------------------- rules="longvt", by hand
def _traj(*turns, windows=()):
    return SimpleNamespace(turns_text=list(turns), tool_calls=[dict(window=w, error=None if w else "bad")
                                                              for w in windows])


CALL = '<tool_call>{{"name": "crop_video", "arguments": {{"start_time": {}, "end_time": {}}}}}</tool_call>'


@pytest.mark.parametrize("turns, windows, ours, longvt", [
    # (format, iou) under each rule set; the sample's window is [10, 30]
    (["<think>a</think><answer>red</answer><|im_end|>"], [], (1, 0), (1, 0)),
    (["Hi <think>a</think><answer>red</answer>"], [], (1, 0), (0, 0)),             # text before the think
    (["<think>a</think><answer>red</answer> bye"], [], (1, 0), (0, 0)),             # text after the answer
    (["<think>a</think><think>b</think><answer>red</answer>"], [], (0, 0), (1, 0)),  # two thinks, no tools
    (["<think>a</think>" + CALL.format(10, 25), "<think>b</think>" + CALL.format(30, 10),
      "<think>c</think><answer>red</answer>"], [[10.0, 25.0], None], (1, 0.75), (1, 0)),  # raw last call: reversed
    (["<think>a</think>" + CALL.format(10, 25), "<think>b</think><answer>red</answer>"], [[10.0, 25.0]],
     (1, 0.75), (1, 0.75)),
    (["<think>a</think>" + CALL.format(0, 40), "<think>b</think><answer>red</answer>"], [[0.0, 40.0]],
     (1, 0.5), (1, 0.5)),                                                         # IoU = intersection / hull
    (["<think>a</think>" + CALL.format(5, 50), "<answer>red</answer>"], [[5.0, 50.0]], (0, 20 / 45), (0, 20 / 45)),
    (["<think>a</think><tool_call>{\"name\": \"crop_video\", \"arguments\": {\"start_time\": 10, \"end_time\": 20, "
      "\"video_path\": null}}</tool_call>", "<think>b</think><answer>red</answer>"], [[10.0, 20.0]],
     (1, 0.5), (1, 0)),                                                           # null: not a Python literal
    (["<think>a</think><answer>red</answer><answer>red</answer>"], [], (0, 0), (0, 0)),
])
def test_longvt_rules_against_hand_computed_values(turns, windows, ours, longvt):
    sample = dict(question="What colour?", answer="red", answer_type="text", window=[10.0, 30.0])
    for rules, (fmt, iou) in (("ours", ours), ("longvt", longvt)):
        total, c = one(sample, _traj(*turns, windows=windows), R.RewardConfig(accuracy="rule", rules=rules))
        assert (c["format"], c["iou"]) == (fmt, pytest.approx(iou)), (rules, turns)
        assert c["accuracy"] == 1.0 and total == pytest.approx(1.0 + fmt + iou)


def test_longvt_answer_rules_empty_and_long():
    """LongVT: the answer between the last <answer> and the next </answer>; empty -> accuracy 0; 1,000 characters
    or more -> accuracy 0 and format 0 (ours: more than 1,000)."""
    cfg = R.RewardConfig(accuracy="rule", rules="longvt")
    sample = dict(question="q", answer="red", answer_type="text")
    _, c = one(sample, _traj("<think>a</think><answer> </answer>"), cfg)
    assert c["accuracy"] == 0.0 and c["format"] == 1.0
    long = "x" * 1000
    _, c = one(sample, _traj(f"<think>a</think><answer>{long}</answer>"), cfg)
    assert c["answer_too_long"] and c["accuracy"] == 0.0 and c["format"] == 0.0
    _, c = one(sample, _traj(f"<think>a</think><answer>{long}</answer>"), R.RewardConfig(accuracy="rule"))
    assert not c["answer_too_long"] and c["format"] == 1.0
    _, c = one(sample, _traj("<think>a</think>" + "<tool_call>(" * 4000 + "</tool_call>" * 4000
                                  + "<think>b</think><answer>red</answer>", windows=[None]), cfg)
    assert c["iou"] == 0.0  # a call body Python cannot parse (too deep) is skipped, never a crash
    with pytest.raises(ValueError, match="rules"):
        one(sample, "x", R.RewardConfig(rules="verl"))


def test_longvt_answer_is_split_as_longvt_splits_it():
    """LongVT takes response.split("<answer>")[-1].split("</answer>")[0] whenever both tags occur anywhere: an unclosed
    last answer after a closed one answers (and is judged), the format is 0; no closing tag anywhere: no answer."""
    assert R.longvt_answer("<think>r</think><answer>blue</answer> <answer>red") == "red"
    assert R.longvt_answer("<answer>a</answer><answer>b</answer>") == "b"
    assert R.longvt_answer("<answer>red") is None and R.longvt_answer("red</answer>") is None
    assert R.longvt_answer("</answer> x <answer>red") == "red"  # both tags present, in any order
    cfg = R.RewardConfig(accuracy="rule", rules="longvt")
    _, c = one(dict(question="q", answer="red", answer_type="text"),
                    _traj("<think>r</think><answer>blue</answer> <answer>red"), cfg)
    assert c["accuracy"] == 1.0 and c["format"] == 0.0
