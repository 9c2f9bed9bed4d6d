"""Tests import the project's flat scripts from the repo root, whatever the working directory.
One torch thread per process: the suite runs subprocesses (torchrun with 2 ranks) on 2 cores, and
oversubscribed threads make CPU kernels many times slower."""
import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
