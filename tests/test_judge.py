"""reward.py's LLM judge against a real OpenAI-compatible HTTP server on loopback (OS-chosen port) with
fault modes: 500, 429, 400, too slow, garbage, not JSON, connection refused, and a server that dies
mid-run; and the reward with that judge."""
import http.server
import json
import re
import socket
import threading
import time

import pytest

import reward as R

from test_reward import NEEDLE, T, traj


# ----------------------------------------------------------------------------- a fake judge server
class JSONHandler(http.server.BaseHTTPRequestHandler):
    """The plumbing of the tests' fake OpenAI-compatible servers (this file's and test_make_data's): quiet, a
    client that timed out is not an error, send() writes a text or JSON body."""

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


class FakeJudge:
    """/v1/models and /v1/chat/completions on 127.0.0.1. The verdict for "ok" replies: 1 when the
    prediction equals the reference (case, final dot ignored), 0.5 when one contains the other, else 0."""

    def __init__(self, mode="ok", delay=0.0, fail_first=0, die_after=None, reply="Score: {v}"):
        self.mode, self.delay, self.fail_first, self.die_after, self.reply = mode, delay, fail_first, die_after, reply
        self.chat_calls, self.in_flight, self.max_in_flight = 0, 0, 0
        self.prompts, self.auth, self.stopped, self.bodies = [], [], False, []
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
        m = re.search(r"\[Standard Answer\]: (.*)\n\[Model_answer\] : (.*)\nJudgement:$", prompt)  # LongVT's
        ref, pred = m.groups() if m else re.search(r"Reference: (.*)\nPrediction: (.*)\nScore:$", prompt).groups()
        ref, pred = ref.lower().strip(" ."), pred.lower().strip(" .")
        return "1" if ref == pred else "0.5" if ref in pred or pred in ref else "0"

    def _handler(self):
        fake = self

        class Handler(JSONHandler):
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
                    fake.bodies.append(body)
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


def one(sample, trajectory, config=None, judge=None):
    """reward.reward_batch of one trajectory: (total, components)."""
    return R.reward_batch([sample], [trajectory], config, judge)[0]


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
    total, c = one(NEEDLE, traj(T + "<answer>(B) blue</answer>"), R.RewardConfig(accuracy="judge"), judge)
    assert (c["accuracy"], c["rule"], c["judge_used"], c["judge_failures"], c["judge"]) == (1.0, 1.0, False, 1, None)
    assert total == 2.0  # accuracy from the rule scorer, format 1, no crop
    _, c = one(NEEDLE, traj(T + "<answer>A</answer>"), R.RewardConfig(accuracy="judge"), judge)
    assert (c["accuracy"], c["judge_failures"]) == (0.0, 1)  # the rule's 0, counted: not a silent 0


def test_reward_judge_sees_options_and_option_text(server):
    fake = server()
    judge = make_judge(fake.url)
    _, c = one(NEEDLE, traj(T + "<answer>B. blue</answer>"), R.RewardConfig(accuracy="judge"), judge)
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
    _, c = one(NEEDLE, traj(T + "<answer>B</answer>"))
    assert not c["judge_used"] and c["accuracy"] == 1.0  # nothing configured: rules
    fake = server(reply="The prediction is partially consistent.")
    monkeypatch.setenv("LLM_AS_A_JUDGE_BASE", fake.url)
    _, c = one({"question": "q", "answer": "red"}, traj(T + "<answer>red</answer>"))
    assert c["judge_used"] and c["accuracy"] == 0.5 and c["rule"] == 1.0
    assert fake.chat_calls == 1  # the model came from /v1/models


def test_a_failed_judge_falls_back_to_rules(server):
    judge = make_judge(server(mode="500").url, retries=0)
    cfg = R.RewardConfig(accuracy="judge")
    _, c = one({"question": "How many?", "answer": "3"}, traj(T + "<answer>three</answer>"), cfg, judge)
    assert c["accuracy"] == 1.0 and c["judge_failures"] == 1 and not c["judge_used"]
    _, c = one({"question": "Colour?", "answer": "red"}, traj(T + "<answer>blue</answer>"), cfg, judge)
    assert c["accuracy"] == 0.0 and judge.failures == 2


def test_longvt_rules_ask_and_parse_as_longvt(server):
    """rules=longvt: the request is LongVT's (its system message, the FORMATS.md prompt filled in, temperature 0.3, a
    seed), and its reply is read by LongVT's rule; the default rules keep our rubric and parser."""
    import hashlib
    from judge import LONGVT_JUDGE_PROMPT
    assert hashlib.sha256(LONGVT_JUDGE_PROMPT.encode()).hexdigest() == \
        "a74ef07071aa26d0d0e7d6424aa13cf4786efed28ed94376e9a1e8f8b9662ba2"  # FORMATS.md's bytes
    srv = server(reply="Judgement: {v}")
    judge = make_judge(srv.url)
    sample = dict(question="What colour {answer} flashes?", answer="Red.", answer_type="text")
    cfg = R.RewardConfig(accuracy="judge", rules="longvt")
    _, comps = zip(*R.reward_batch([sample], [traj("<think>a</think><answer>red</answer>")], cfg, judge))
    body = srv.bodies[-1]
    want = LONGVT_JUDGE_PROMPT.split("[Question]: {question}")[0] + \
        "[Question]: What colour {answer} flashes?\n[Standard Answer]: Red.\n[Model_answer] : red\nJudgement:"
    assert body["messages"] == [{"role": "system", "content": "You are a helpful assistant."},
                                {"role": "user", "content": want}]
    assert body["temperature"] == 0.3 and isinstance(body["seed"], int) and comps[0]["judge"] == 1.0
    R.reward_batch([sample], [traj("<think>a</think><answer>red</answer>")], R.RewardConfig(accuracy="judge"), judge)
    assert srv.bodies[-1]["temperature"] == 0.0 and len(srv.bodies[-1]["messages"]) == 1  # ours, unchanged


@pytest.mark.parametrize("reply,score", [("Judgement: 1", 1.0), ("Judgement: 0.5", 0.5), ("Judgement: 0", 0.0),
                                         ("Judgement: 0.1", 1.0), ("Judgement: 10", 1.0), ("Judgement: none", 0.0),
                                         ("Judgement: 1\nJudgement: 0", 0.0), ("  1  ", 1.0), ("0.5", 0.5),
                                         ("0", 0.0), ("1.0", 0.0), ("It is 1", 0.0), ("", 0.0), (None, 0.0)])
def test_longvt_verdict_rule(reply, score):
    """LongVT's reply rule, branch by branch: after the last "Judgement:" a "1" anywhere scores 1 (so "0.1" does), else
    "0.5" scores 0.5, else 0; without it only an exact "1", "0.5" or "0" counts, anything else is 0."""
    from judge import parse_longvt_reply
    assert parse_longvt_reply(reply) == score
