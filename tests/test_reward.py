"""reward.py: tables for the pure scorers, and the LLM judge against a real OpenAI-compatible HTTP
server on loopback (OS-chosen port) with fault modes: 500, 429, 400, too slow, garbage, not JSON,
connection refused, and a server that dies mid-run."""
import http.server
import json
import re
import socket
import threading
import time
from types import SimpleNamespace

import pytest

import reward as R


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    # a judge configured on the machine running the tests must not leak into them
    for k in ("LLM_AS_A_JUDGE_BASE", "OPENAI_BASE_URL", "OPENAI_API_KEY", "OPENAI_MODEL_NAME"):
        monkeypatch.delenv(k, raising=False)
    R._ENV_JUDGES.clear()
    yield
    R._ENV_JUDGES.clear()


# ----------------------------------------------------------------------------- a fake judge server
class FakeJudge:
    """/v1/models and /v1/chat/completions on 127.0.0.1. The verdict for "ok" replies: 1 when the
    prediction equals the reference (case, final dot ignored), 0.5 when one contains the other, else 0."""

    def __init__(self, mode="ok", delay=0.0, fail_first=0, die_after=None, reply="Score: {v}"):
        self.mode, self.delay, self.fail_first, self.die_after, self.reply = mode, delay, fail_first, die_after, reply
        self.chat_calls, self.in_flight, self.max_in_flight = 0, 0, 0
        self.prompts, self.auth, self.stopped = [], [], False
        self.lock = threading.Lock()
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads, self.server.block_on_close = True, False
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()

    def stop(self):
        with self.lock:
            if self.stopped:
                return
            self.stopped = True
        self.server.shutdown()
        self.server.server_close()  # the port now refuses connections

    def verdict(self, prompt):
        ref, pred = re.search(r"Reference: (.*)\nPrediction: (.*)\nScore:$", prompt).groups()
        ref, pred = ref.lower().strip(" ."), pred.lower().strip(" .")
        return "1" if ref == pred else "0.5" if ref in pred or pred in ref else "0"

    def _handler(self):
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def handle(self):
                try:
                    super().handle()
                except (BrokenPipeError, ConnectionResetError):  # the client timed out first
                    pass

            def send(self, status, body):
                data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if fake.mode in ("500", "garbage_models"):
                    return self.send(500 if fake.mode == "500" else 200, "<html>oops</html>")
                self.send(200, {"object": "list", "data": [{"id": "judge-1"}, {"id": "judge-2"}]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with fake.lock:
                    fake.chat_calls += 1
                    n = fake.chat_calls
                    fake.in_flight += 1
                    fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
                    fake.auth.append(self.headers.get("Authorization"))
                    fake.prompts.append(body["messages"][-1]["content"])
                try:
                    response = self.respond(n, body)
                finally:
                    # out of the in-flight count before the bytes go out: the client may send its next request as
                    # soon as it reads them, and that one must not count as a 17th concurrent request
                    with fake.lock:
                        fake.in_flight -= 1
                if response is not None:
                    self.send(*response)

            def respond(self, n, body):
                """(status, body) of the n-th chat request, or None for no reply."""
                if fake.die_after is not None and n > fake.die_after:
                    fake.stop()  # dies mid-run: this request gets no reply, later ones are refused
                    self.close_connection = True
                    return None
                time.sleep(fake.delay)
                if n <= fake.fail_first or fake.mode in ("500", "429", "400"):
                    return 500 if n <= fake.fail_first else int(fake.mode), {"error": "fault injected"}
                if fake.mode == "notjson":
                    return 200, "<html>502 bad gateway</html>"
                content = "The weather is lovely today." if fake.mode == "garbage" else \
                    fake.reply.format(v=fake.verdict(body["messages"][-1]["content"]))
                return 200, {"choices": [{"message": {"role": "assistant", "content": content}}]}

        return Handler


@pytest.fixture
def server():
    made = []

    def make(**kw):
        made.append(FakeJudge(**kw))
        return made[-1]
    yield make
    for s in made:
        s.stop()


def make_judge(url, **kw):
    kw = {"model": "judge-1", "timeout": 2.0, "retries": 3, "backoff": 0.01, **kw}
    judge = R.Judge(url, **kw)
    judge.sleeps = []
    judge.sleep = judge.sleeps.append  # record the backoff instead of waiting
    return judge


def dead_url():
    with socket.socket() as s:  # a port that was free a moment ago and now has no listener
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


def assert_backoff(sleeps, base, n):
    assert len(sleeps) == n
    for k, d in enumerate(sleeps):  # delay_k = base * 2^k * (1 + jitter in [0, 0.5))
        assert base * 2 ** k <= d < 1.5 * base * 2 ** k


# ----------------------------------------------------------------------------- extract_answer
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
    assert R.parse_judge_reply(reply) == want


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
    total, c = R.reward(NEEDLE, traj(T + C, T + "<answer>B</answer>", windows=[[40, 50]]), R.RewardConfig(accuracy="rule"))
    assert total == pytest.approx(3.0) and c["total"] == total
    assert (c["accuracy"], c["format"], c["iou"], c["answer"]) == (1.0, 1.0, 1.0, "B")
    assert (c["judge_used"], c["judge_failures"], c["answer_too_long"]) == (False, 0, False)
    total, c = R.reward(NEEDLE, traj(T + C, T + "<answer>A</answer>", windows=[[45, 50], None]),
                        R.RewardConfig(w_accuracy=2.0, w_format=0.5, w_iou=4.0))
    assert (c["accuracy"], c["iou"], c["tool_calls"], c["tool_errors"]) == (0.0, 0.5, 2, 1)
    assert total == pytest.approx(0.5 + 4.0 * 0.5)


def test_reward_no_answer_observation_answer_and_too_long():
    _, c = R.reward(NEEDLE, traj(T + C, windows=[[0, 10]]))
    assert (c["answer"], c["accuracy"], c["format"], c["iou"]) == (None, 0.0, 0.0, 0.0)
    # a plain string is a one-turn trajectory; the answer a tool "says" is not the policy's
    _, c = R.reward(NEEDLE, T + "<tool_response><answer>B</answer></tool_response>")
    assert c["answer"] is None and c["accuracy"] == 0.0
    long = "B " + "x" * 1000
    total, c = R.reward(NEEDLE, traj(T + C, T + f"<answer>{long}</answer>", windows=[[40, 50]]))
    assert c["answer_too_long"] and (c["accuracy"], c["format"], c["iou"]) == (0.0, 0.0, 1.0) and total == 1.0
    _, c = R.reward(NEEDLE, traj(T + f"<answer>{long}</answer>"), R.RewardConfig(max_answer_chars=5000))
    assert not c["answer_too_long"] and c["format"] == 1.0


def test_reward_config_errors():
    with pytest.raises(RuntimeError, match="needs a judge"):
        R.reward(NEEDLE, traj(T + A), R.RewardConfig(accuracy="judge"))
    with pytest.raises(ValueError):
        R.reward(NEEDLE, traj(T + A), R.RewardConfig(accuracy="vibes"))
    with pytest.raises(ValueError):
        R.reward(NEEDLE, traj(T + A), R.RewardConfig(iou_mode="mean"))
    with pytest.raises(RuntimeError, match="no LLM judge"):
        R.judge_score("q", "red", "red")


# ----------------------------------------------------------------------------- the judge over HTTP
def test_from_env(monkeypatch):
    assert R.Judge.from_env() is None
    monkeypatch.setenv("OPENAI_BASE_URL", "http://openai-like:8000/")
    j = R.Judge.from_env(timeout=3.0)
    assert (j.base_url, j.model, j.api_key, j.timeout) == ("http://openai-like:8000/v1", None, None, 3.0)
    monkeypatch.setenv("LLM_AS_A_JUDGE_BASE", "http://judge:18901/v1")  # LongVT's name wins
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    monkeypatch.setenv("OPENAI_MODEL_NAME", "qwen-judge")
    j = R.Judge.from_env()
    assert (j.base_url, j.model, j.api_key) == ("http://judge:18901/v1", "qwen-judge", "sk-test")
    assert R.Judge("https://x.example/v1beta/openai").base_url == "https://x.example/v1beta/openai"


def test_health_check_discovers_model_and_sends_key(server):
    fake = server()
    judge = make_judge(fake.url, model=None, api_key="sk-test")
    judge.health_check()
    assert judge.model == "judge-1"
    assert judge.score("q", "red", "red") == (1.0, False)
    assert fake.auth == ["Bearer sk-test"]
    judge = make_judge(fake.url, model=None)  # without a health check, the first score discovers the model
    assert judge.score("q", "red", "red flag") == (0.5, False) and judge.model == "judge-1"


def test_health_check_fails_fast_with_clear_message(server):
    url = dead_url()
    with pytest.raises(RuntimeError, match="unreachable at " + re.escape(url + "/models")):
        make_judge(url).health_check()
    with pytest.raises(RuntimeError, match="HTTP 500"):
        make_judge(server(mode="500").url).health_check()
    with pytest.raises(RuntimeError, match="unexpected model list"):
        make_judge(server(mode="garbage_models").url).health_check()
    with pytest.raises(RuntimeError, match="does not serve model 'other'"):
        make_judge(server().url, model="other").health_check()


@pytest.mark.parametrize("mode", ["500", "429", "garbage", "notjson"])
def test_retries_with_backoff_then_failure(server, mode):
    fake = server(mode=mode)
    judge = make_judge(fake.url, retries=3, backoff=0.01)
    assert judge.score("q", "red", "red") == (None, False)
    assert fake.chat_calls == 4 and judge.failures == 1
    assert_backoff(judge.sleeps, 0.01, 3)
    assert judge.last_error


def test_backoff_with_real_sleep_is_bounded(server):
    fake = server(mode="429")
    judge = R.Judge(fake.url, model="judge-1", retries=2, backoff=0.02)
    t0 = time.monotonic()
    assert judge.score("q", "a", "a") == (None, False)
    elapsed = time.monotonic() - t0
    assert fake.chat_calls == 3 and 0.02 + 0.04 <= elapsed < 5.0  # at least the two minimum delays


def test_non_retryable_4xx_fails_at_once_and_transient_errors_recover(server):
    fake = server(mode="400")
    judge = make_judge(fake.url)
    assert judge.score("q", "red", "red") == (None, False)
    assert fake.chat_calls == 1 and judge.sleeps == [] and judge.failures == 1 and "HTTP 400" in judge.last_error

    fake = server(fail_first=2)  # two 500s, then fine
    judge = make_judge(fake.url)
    assert judge.score("q", "red", "blue") == (0.0, False)
    assert fake.chat_calls == 3 and judge.failures == 0
    assert_backoff(judge.sleeps, 0.01, 2)


def test_timeout_is_a_retryable_failure(server):
    fake = server(delay=1.0)
    judge = make_judge(fake.url, timeout=0.2, retries=1)
    t0 = time.monotonic()
    assert judge.score("q", "red", "red") == (None, False)
    # two attempts cut at 0.2 s each; waiting for the slow replies would take 2 s
    assert time.monotonic() - t0 < 1.5 and fake.chat_calls == 2 and judge.failures == 1
    assert "Timeout" in judge.last_error


def test_connection_refused():
    judge = make_judge(dead_url(), retries=2)
    assert judge.score("q", "red", "red") == (None, False)
    assert judge.failures == 1 and "ConnectionError" in judge.last_error and len(judge.sleeps) == 2


def test_cache_hits_and_failures_are_not_cached(server):
    fake = server()
    judge = make_judge(fake.url)
    assert judge.score("q", "red", "red") == (1.0, False)
    assert judge.score("q", "red", "red") == (1.0, True)
    assert judge.score("q2", "red", "red") == (1.0, False)  # the question is part of the key
    assert fake.chat_calls == 2
    fake.mode = "500"
    assert judge.score("q", "red", "blue") == (None, False)
    fake.mode = "ok"
    assert judge.score("q", "red", "blue") == (0.0, False)  # asked again, not a cached failure
    calls = fake.chat_calls  # duplicates in one batch are asked once, not raced
    assert judge.score_many([("d", "a", "a")] * 5 + [("d", "a", "b")]) == [1.0] * 5 + [0.0]
    assert fake.chat_calls == calls + 2
    small = make_judge(fake.url, cache_size=2)
    for pred in ["a", "b", "c"]:
        small.score("q", "a", pred)
    assert len(small._cache) == 2 and ("q", "a", "a") not in small._cache  # the oldest went


def test_64_concurrent_requests_score_correctly(server):
    fake = server(delay=0.05, reply="Judgement: {v}")
    judge = make_judge(fake.url, workers=16)
    refs = [f"colour {i}" for i in range(64)]
    preds = [r if i % 3 == 0 else f"{r} and more" if i % 3 == 1 else "nothing" for i, r in enumerate(refs)]
    items = [(f"question {i}", r, p) for i, (r, p) in enumerate(zip(refs, preds))]
    assert judge.score_many(items) == [[1.0, 0.5, 0.0][i % 3] for i in range(64)]
    assert fake.chat_calls == 64 and judge.failures == 0
    assert 1 < fake.max_in_flight <= 16  # concurrent, and bounded by the pool
    assert judge.score_many(items + items[:3]) == judge.score_many(items) + [1.0, 0.5, 0.0]
    assert fake.chat_calls == 64  # all from the cache now
    assert judge.score_many([]) == []


# ----------------------------------------------------------------------------- reward with the judge
def test_reward_judge_fallback_counts_failures(server):
    judge = make_judge(server(mode="500").url, retries=1)
    total, c = R.reward(NEEDLE, traj(T + "<answer>(B) blue</answer>"), R.RewardConfig(accuracy="judge"), judge)
    assert (c["accuracy"], c["rule"], c["judge_used"], c["judge_failures"], c["judge"]) == (1.0, 1.0, False, 1, None)
    assert total == 2.0  # accuracy from the rule scorer, format 1, no crop
    _, c = R.reward(NEEDLE, traj(T + "<answer>A</answer>"), R.RewardConfig(accuracy="judge"), judge)
    assert (c["accuracy"], c["judge_failures"]) == (0.0, 1)  # the rule's 0, counted: not a silent 0


def test_reward_judge_sees_options_and_option_text(server):
    fake = server()
    judge = make_judge(fake.url)
    _, c = R.reward(NEEDLE, traj(T + "<answer>B. blue</answer>"), R.RewardConfig(accuracy="judge"), judge)
    assert (c["accuracy"], c["judge_used"], c["judge"]) == (1.0, True, 1.0)
    assert "Reference: B. blue\nPrediction: B. blue" in fake.prompts[-1] and "C. green" in fake.prompts[-1]


def test_reward_both_mode_judges_only_imperfect_rule_scores(server):
    fake = server()
    judge = make_judge(fake.url)
    samples = [{"question": "q", "answer": "red flag"}] * 3
    trajs = [traj(T + f"<answer>{p}</answer>") for p in ["red flag", "the red flag waving high", "blue"]]
    out = R.reward_batch(samples, trajs, R.RewardConfig(accuracy="both"), judge)
    assert [c["judge_used"] for _, c in out] == [False, True, True]
    assert [c["accuracy"] for _, c in out] == [1.0, 0.5, 0.0] and fake.chat_calls == 2
    out = R.reward_batch(samples, trajs, R.RewardConfig(accuracy="rule"), judge)
    assert not any(c["judge_used"] for _, c in out) and fake.chat_calls == 2
    # no answer or an over-long one: nothing is sent to the judge
    out = R.reward_batch(samples[:2], [traj(T), traj(T + "<answer>" + "x" * 2000 + "</answer>")],
                         R.RewardConfig(accuracy="judge"), judge)
    assert [c["accuracy"] for _, c in out] == [0.0, 0.0] and fake.chat_calls == 2


def test_reward_batch_server_dies_mid_run(server):
    fake = server(die_after=3)
    judge = make_judge(fake.url, workers=1, timeout=0.5, retries=1)  # one at a time: a known order
    samples = [{"question": f"q{i}", "answer": "red flag"} for i in range(6)]
    trajs = [traj(T + "<answer>red flag waving</answer>") for _ in range(6)]
    out = R.reward_batch(samples, trajs, R.RewardConfig(accuracy="judge"), judge)
    assert [c["judge_used"] for _, c in out] == [True] * 3 + [False] * 3
    assert [c["judge_failures"] for _, c in out] == [0] * 3 + [1] * 3 and judge.failures == 3
    assert all(c["accuracy"] == 0.5 for _, c in out)  # judge 0.5; after it died, the rule's 0.5


def test_auto_mode_uses_the_env_judge(server, monkeypatch):
    _, c = R.reward(NEEDLE, traj(T + "<answer>B</answer>"))
    assert not c["judge_used"] and c["accuracy"] == 1.0  # nothing configured: rules
    fake = server(reply="The prediction is partially consistent.")
    monkeypatch.setenv("LLM_AS_A_JUDGE_BASE", fake.url)
    _, c = R.reward({"question": "q", "answer": "red"}, traj(T + "<answer>red</answer>"))
    assert c["judge_used"] and c["accuracy"] == 0.5 and c["rule"] == 1.0
    assert R.judge_score("q", "red", "red") == 0.5  # the convenience function finds it too
    assert fake.chat_calls == 1  # the model came from /v1/models; judge_score hit the same cache


def test_judge_score_falls_back_to_rules(server):
    judge = make_judge(server(mode="500").url, retries=0)
    assert R.judge_score("How many?", "3", "three", judge) == 1.0
    assert R.judge_score("Colour?", "red", "blue", judge) == 0.0
    assert judge.failures == 2
