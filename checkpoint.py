"""Checkpoints and files that are never left half-written, written once for both trainers (and eval's outputs).

A checkpoint is a directory: HF layout (save_pretrained of model + processor), trainer_state.pt (optimizer, per-rank
RNG states, step, the trainer's own position fields, config, world size), view.json and metrics.jsonl so far. It is
written to a temp dir and swapped in (atomic_dir), so a kill mid-save keeps the previous one; a kill between the
swap's two renames leaves `<out>.old`, which loading (model.resolve_checkpoint) and resuming (recover) take
back.

    save(out, model, processor, net, optimizer, state, view, d)   # collective: every rank calls it
    state = resume(out, net, optimizer, d, config)                # optimizer and this rank's RNG restored
    metrics = Metrics(out, step, d, config, wandb="")              # metrics.jsonl cut to the steps <= step

Resume is exact: the same parameters and metrics as an uninterrupted run (tests). With another world size the
per-rank RNG streams cannot continue: a warning says so and the RNG is not restored (the one rule for both).
"""
import errno
import json
import os
import random
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed as dist

from data import save_view
from model import all_gather_obj, resolve_checkpoint

STATE = "trainer_state.pt"
METRICS = "metrics.jsonl"


# --------------------------------------------------------------------------- files
@contextmanager
def replaced(path):
    """Yield a temp path beside `path` (same extension); when the block ends without an error it replaces `path`,
    so a crash or a full disk never leaves a truncated file under the final name."""
    root, ext = os.path.splitext(str(path))
    tmp = f"{root}.tmp{ext}"
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text(path, text):
    with replaced(path) as tmp, open(tmp, "w") as f:
        f.write(text)


def write_jsonl(path, rows):
    """One JSON object a line, atomically (see replaced)."""
    with replaced(path) as tmp, open(tmp, "w") as f:
        for row in rows:
            f.write(json.dumps(row, default=str) + "\n")


def complete_lines(path):
    """The lines of an append-only file up to its last newline ([] when there is none): a kill mid-append leaves a
    cut last line, which is left out so that its item is done again."""
    text = open(path).read() if os.path.exists(path) else ""
    return text[:text.rfind("\n") + 1].splitlines()


def check_writable(out_dir, flag="--out"):
    """Create out_dir and write a probe file in it, so that an output that cannot be written fails before any work
    (a read-only or impossible path would otherwise be found after all the rollouts or steps)."""
    try:
        os.makedirs(out_dir, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out_dir, prefix=".write_check_"):
            pass
    except OSError as e:
        raise SystemExit(f"{flag}={out_dir}: cannot write there ({type(e).__name__}: {e})") from None


# --------------------------------------------------------------------------- directories, swapped in whole
def atomic_dir(final_dir, write):
    """Call write(tmp_dir), then swap tmp_dir into place, so a crash mid-write leaves the previous checkpoint intact
    (temp dirs that killed saves of the same checkpoint left are removed first; a full disk is said so).
    Subdirectories of the previous dir that the new one does not have (eval.py's default <checkpoint>/eval, GRPO's
    rollouts/ and eval/) are moved over after the swap, renamed, not copied; top-level files are the checkpoint's
    own and are replaced. A `.old` dir left by a crash during an earlier swap gives its subdirectories back too."""
    parent = os.path.dirname(os.path.abspath(final_dir))
    os.makedirs(parent, exist_ok=True)
    old = final_dir.rstrip("/") + ".old"
    prefix = f".tmp_ckpt_{os.path.basename(os.path.abspath(final_dir))}_"
    for name in os.listdir(parent):  # temp dirs of this checkpoint's earlier saves that a kill left behind
        if name.startswith(prefix) and os.path.isdir(os.path.join(parent, name)):
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
    tmp = tempfile.mkdtemp(prefix=prefix, dir=parent)
    try:
        try:
            write(tmp)
        except (OSError, RuntimeError) as e:  # torch.save on a full disk says "unexpected pos ..."
            free = shutil.disk_usage(parent).free
            if getattr(e, "errno", None) != errno.ENOSPC and free >= 64 * 2**20:
                raise
            raise OSError(errno.ENOSPC, f"disk full while writing the checkpoint {final_dir} ({free / 2**20:.1f} MiB "
                          f"free in {parent}); the previous checkpoint there is kept. ({type(e).__name__}: {e})") from e
        if os.path.exists(final_dir):
            if os.path.isdir(old):  # an earlier swap crashed after its first rename: keep what only it holds
                _move_subdirs(old, final_dir)
            shutil.rmtree(old, ignore_errors=True)
            os.rename(final_dir, old)
        os.rename(tmp, final_dir)
        if os.path.isdir(old):
            _move_subdirs(old, final_dir)
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _move_subdirs(src, dst):
    """Move each subdirectory of src that dst lacks into dst (a rename: same filesystem)."""
    for name in sorted(os.listdir(src)):
        if os.path.isdir(os.path.join(src, name)) and not os.path.exists(os.path.join(dst, name)):
            os.rename(os.path.join(src, name), os.path.join(dst, name))


# --------------------------------------------------------------------------- RNG
def rng_state():
    """Every RNG a rank draws from (python, numpy, torch CPU, CUDA when present), for trainer_state.pt."""
    s = dict(python=random.getstate(), numpy=np.random.get_state(), torch=torch.get_rng_state())
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state()
    return s


def set_rng_state(s):
    """Restore what rng_state() returned (a CUDA state is skipped on a machine without CUDA)."""
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state(s["cuda"])


def _barrier():
    if dist.is_initialized():
        dist.barrier()


# --------------------------------------------------------------------------- the trainers' checkpoints
def save_model(out, model, processor, view=None, extra=None, state_dict=None):
    """One process: `out` in HF layout (model + processor), view.json when `view` is given (eval.py and the next stage
    render prompts the way this one trained) and `extra` {filename: str (written as text) or object (torch.save)},
    written to a temp dir and swapped in. `state_dict`: the full one, gathered beforehand under FSDP2."""
    def write(tmp):
        model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        processor.save_pretrained(tmp)
        if view is not None:
            save_view(view, tmp)
        for name, obj in (extra or {}).items():
            if isinstance(obj, str):
                with open(os.path.join(tmp, name), "w") as f:
                    f.write(obj)
            else:
                torch.save(obj, os.path.join(tmp, name))
    atomic_dir(out, write)


def save(out, model, processor, net, optimizer, state, view, d):
    """Collective: every rank calls it. `model` the bare HF model, `net` the module the optimizer was built on (DDP
    or FSDP2-wrapped, or the plain module). Full (CPU) model and optimizer state dicts, written by rank 0 into a temp
    dir with view.json and metrics.jsonl so far, then swapped in. `state`: the trainer's position fields (step, ...)
    and its config (a dataclass)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)  # FSDP2: gathered to each rank's CPU
    sd = None
    if d.world > 1 and any(hasattr(p, "full_tensor") for p in model.parameters()):  # sharded (DTensor) weights
        named = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
        sd = {k: v for k, v in get_model_state_dict(model, options=opts).items() if k in named}  # tied ones once
    state = dict(state, config=asdict(state["config"]), world=d.world, rng=all_gather_obj(rng_state()),
                 optimizer=get_optimizer_state_dict(net, optimizer, options=opts))
    if d.is_main:
        extra = {STATE: state}
        if os.path.exists(os.path.join(out, METRICS)):  # the log so far (atomic_dir moves rollouts/, eval/ over)
            extra[METRICS] = open(os.path.join(out, METRICS)).read()
        save_model(out, model, processor, view, extra, state_dict=sd)
    _barrier()


def recover(out, d):
    """Before a resume: a kill between atomic_dir's two renames left only `<out>.old`; move it back (rank 0)."""
    if d.is_main and resolve_checkpoint(out) != out:
        os.rename(resolve_checkpoint(out), out)
    _barrier()
    if not os.path.exists(os.path.join(out, STATE)):
        raise SystemExit(f"--resume: no checkpoint in {out}")


def resume(out, net, optimizer, d, config, log=print):
    """trainer_state.pt of `out`: the optimizer restored (each rank keeps its shard), this rank's RNG restored when
    the world size is the checkpoint's, config changes named. Returns the state dict (step and the trainer's
    fields)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    state = torch.load(os.path.join(out, STATE), map_location="cpu", weights_only=False)
    set_optimizer_state_dict(net, optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True))
    if len(state["rng"]) == d.world:
        set_rng_state(state["rng"][d.rank])
    elif d.is_main:
        log(f"warning: checkpoint written by {len(state['rng'])} ranks, resuming with {d.world}: the RNG streams "
            f"start afresh (the run goes on, not as the uninterrupted one would)")
    now = asdict(config)
    changed = {k: (v, now[k]) for k, v in state["config"].items()
               if k in now and k not in ("resume", "stop_at", "save_every") and now[k] != v}
    if changed and d.is_main:
        log(f"warning: resuming with a changed config (was, now): {changed}")
    return state


class Metrics:
    """The trainers' log: <out>/metrics.jsonl (rank 0 appends a row per step), holding exactly the steps <= `step`
    (those of the checkpoint resumed from; none on a fresh start), and with a `wandb` project name the same rows
    sent to Weights & Biases too (an optional import: only a run that asks for it needs the package)."""

    def __init__(self, out, step, d, config, wandb=""):
        self.path, self.main, self.run = os.path.join(out, METRICS), d.is_main, None
        if not self.main:
            return
        os.makedirs(out, exist_ok=True)
        old = complete_lines(self.path) if step else []
        write_text(self.path, "".join(line + "\n" for line in old if line.strip() and json.loads(line)["step"] <= step))
        if wandb:
            try:
                import wandb as wb
            except ImportError:
                raise SystemExit("--wandb needs the wandb package: pip install wandb") from None
            self.run = wb.init(project=wandb, name=os.path.basename(os.path.abspath(out)), config=asdict(config))

    def log(self, row):
        """Append one step's row (reopened each time: a save swaps the directory) and send it to wandb."""
        if self.main:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
            if self.run is not None:
                self.run.log(row, step=row["step"])

    def close(self):
        if self.run is not None:
            self.run.finish()
