"""Tests import the project's flat scripts from the repo root, whatever the working directory.
One torch thread per process: the suite runs subprocesses (torchrun with 2 ranks) on 2 cores, and
oversubscribed threads make CPU kernels many times slower."""
import os
import re
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("PYTHONFAULTHANDLER", "1")  # a subprocess killed by a native abort prints every thread's stack
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest  # noqa: E402
import torch  # noqa: E402

import judge  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(autouse=True)
def clean_judge_env(monkeypatch):
    """A judge configured on the machine running the tests must not leak into them (judge.Judge.from_env)."""
    for k in ("LLM_AS_A_JUDGE_BASE", "OPENAI_BASE_URL", "OPENAI_API_KEY", "OPENAI_MODEL_NAME"):
        monkeypatch.delenv(k, raising=False)
    judge._ENV_JUDGES.clear()
    yield
    judge._ENV_JUDGES.clear()


def run_ranks(cmd, **kw):
    """subprocess.run(cmd, capture_output=True, text=True, **kw) for a torchrun command, run a second time when
    a rank died by a signal (a native abort, not a Python error): CI once saw one rank of a 2-rank eval end by
    SIGABRT with no Python traceback, and it did not reproduce in 31 local runs. The first failure is reported
    as a warning with the ranks' own output (the stacks PYTHONFAULTHANDLER printed); a second failure fails."""
    import subprocess
    import warnings
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if r.returncode != 0 and re.search(r"Signal \d+ \(SIG(ABRT|SEGV|BUS)\)", r.stderr):
        warnings.warn(f"a rank died by a signal; running again. Its output:\n{ranks_output(r)}")
        r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    return r


def ranks_output(r, limit=4000):
    """The ranks' own stdout/stderr of a finished torchrun (its launcher traceback and summary cut off)."""
    err = r.stderr
    cut = err.find('Traceback (most recent call last):\n  File "<frozen runpy>"')
    return (r.stdout[-limit // 4:] + "\n" + (err[:cut] if cut >= 0 else err))[-limit:]
