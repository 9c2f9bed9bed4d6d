"""The rollout's KV cache, written in place, and the pieces a long chunk enters it in (rollout.py uses both;
memory.py sizes the cache with `capacity`).

KVCache is an HF Cache whose layers keep K and V in buffers (B, H, capacity, D) grown in blocks, so decoding never
concatenates the whole cache per token; rows can be copied in (put), dropped (batch_select_indices) and compacted
(compact: each row's columns moved up, the holes dropped). split_points / piece_vision cut a rendered chunk into
pieces of at most a limit of tokens, never inside an image or a video's temporal patch, each with its own vision
inputs: the vision tower attends within a temporal patch, so a piece's features equal the whole chunk's.
"""
import numpy as np
import torch
from transformers.cache_utils import Cache, DynamicLayer

from data import Rendered


# --------------------------------------------------------------------------- the KV cache, written in place
def capacity(tokens):
    """Columns a cache layer allocates to hold `tokens`: 1/8 headroom, at least 256, rounded up to 256, so a
    growing cache is copied O(log) times, not once per token (memory.py sizes the cache with this)."""
    return -(-(tokens + max(256, tokens // 8)) // 256) * 256


class InPlaceLayer(DynamicLayer):
    """One layer's K and V in buffers (B, H, capacity, D); keys/values are views of the filled columns."""

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.alloc(key_states, key_states.shape[0], key_states.shape[-2])
        self.write(key_states, value_states, slice(None), self.n)
        return self.keys, self.values

    def alloc(self, like, batch, tokens):
        """Empty buffers of `batch` rows and capacity(tokens) columns, shaped and typed as `like` (b, H, n, D)."""
        self.dtype, self.device, self.is_initialized, self.n = like.dtype, like.device, True, 0
        shape = (batch, like.shape[1], capacity(tokens), like.shape[3])
        self.kbuf, self.vbuf = like.new_zeros(shape), like.new_zeros(shape)  # zeros: a hole never holds NaN

    def write(self, k, v, rows, at):
        """Write k, v (b, H, n, D) into `rows` of the buffers at columns [at, at + n); grow when needed."""
        need = at + k.shape[-2]
        if need > self.kbuf.shape[-2]:
            old, n = (self.kbuf, self.vbuf), self.n
            self.alloc(k, old[0].shape[0], need)
            self.kbuf[:, :, :n], self.vbuf[:, :, :n], self.n = old[0][:, :, :n], old[1][:, :, :n], n
        self.kbuf[rows, :, at:need] = k
        self.vbuf[rows, :, at:need] = v
        self.n = max(self.n, need)
        self.keys, self.values = self.kbuf[:, :, :self.n], self.vbuf[:, :, :self.n]

    def get_seq_length(self):
        return self.n if self.is_initialized else 0

    def batch_select_indices(self, indices):
        if self.is_initialized:
            self.kbuf, self.vbuf = self.kbuf[indices], self.vbuf[indices]
            self.keys, self.values = self.kbuf[:, :, :self.n], self.vbuf[:, :, :self.n]


class KVCache(Cache):
    """An HF Cache of InPlaceLayer layers (what the model's attention calls update() on)."""

    def __init__(self):
        super().__init__(layer_class_to_replicate=InPlaceLayer)

    def put(self, rows, src, batch):
        """Copy a one-row cache `src` into `rows` (a list) of this cache of `batch` rows, at columns [0, its length)."""
        while len(self.layers) < len(src.layers):
            self.layers.append(InPlaceLayer())
        for dst, s in zip(self.layers, src.layers):
            if not dst.is_initialized:
                dst.alloc(s.keys, batch, s.n)
            dst.write(s.keys, s.values, rows, 0)

    def compact(self, att):
        """Move each row's cached columns (att == 1, in order) to the front of its buffers and drop the holes; returns
        the new attention mask (B, n). Positions were applied to K before caching, so nothing else changes."""
        keep = [torch.nonzero(a).squeeze(-1) for a in att]
        n = max(len(k) for k in keep)
        for x in self.layers:
            for b, k in enumerate(keep):  # per row: a temporary of one row's layer, never of the whole cache
                x.kbuf[b, :, :len(k)] = x.kbuf[b, :, k]
                x.vbuf[b, :, :len(k)] = x.vbuf[b, :, k]
                x.kbuf[b, :, len(k):n] = 0
                x.vbuf[b, :, len(k):n] = 0
            x.n = n
            x.keys, x.values = x.kbuf[:, :, :n], x.vbuf[:, :, :n]
        return (torch.arange(n, device=att.device)[None] < torch.tensor([len(k) for k in keep],
                                                                          device=att.device)[:, None]).long()

    def nbytes(self):
        return sum(x.kbuf.nbytes + x.vbuf.nbytes for x in self.layers if x.is_initialized)


# --------------------------------------------------------------------------- pieces of a long chunk
def split_points(r: Rendered, merge, limit):
    """Token offsets [0, ..., len] cutting r into pieces of at most `limit` tokens, never inside an image or a video's
    temporal patch (one vision-tower item; a larger one is a piece of its own)."""
    T = len(r.input_ids)
    ok = np.ones(T + 1, bool)
    for s, e, grid in vision_items(r, merge):
        unit = int(grid[1] * grid[2]) // merge  # one temporal patch (an image has one)
        for a in range(s, e, unit):
            ok[a + 1:a + unit] = False
    allowed = np.flatnonzero(ok)
    cuts, cur = [0], 0
    while cur < T:
        i = np.searchsorted(allowed, cur + limit, side="right") - 1
        nxt = allowed[i] if allowed[i] > cur else allowed[np.searchsorted(allowed, cur, side="right")]
        cuts.append(int(nxt))
        cur = int(nxt)
    return cuts


def vision_items(r: Rendered, merge):
    """(start, end, grid_thw) of each vision item's pad run, in order."""
    mm = r.mm_token_type_ids
    grids = {1: iter(r.vision.get("image_grid_thw", [])), 2: iter(r.vision.get("video_grid_thw", []))}
    i, T = 0, len(mm)
    while i < T:
        if mm[i]:
            kind, s = mm[i], i
            grid = next(grids[kind])
            i += int(grid.prod()) // merge
            yield s, i, grid
        else:
            i += 1


def piece_vision(r: Rendered, merge, a, b):
    """The vision inputs of tokens [a, b) of r (cut by split_points): whole images, and each video's temporal patches
    in the piece as a video of its own (the vision tower attends within a temporal patch, so this is exact)."""
    out = {"pixel_values": [], "image_grid_thw": [], "pixel_values_videos": [], "video_grid_thw": []}
    rows = {1: 0, 2: 0}  # pixel rows consumed so far per kind
    for s, e, grid in vision_items(r, merge):
        kind = r.mm_token_type_ids[s]
        t, h, w = grid.tolist()
        per = h * w // merge  # tokens per temporal patch
        lo, hi = max(a, s), min(b, e)
        if lo < hi:
            t0, t1 = (lo - s) // per, (hi - s) // per
            px, g = ("pixel_values", "image_grid_thw") if kind == 1 else ("pixel_values_videos", "video_grid_thw")
            out[px].append(r.vision[px][rows[kind] + t0 * h * w: rows[kind] + t1 * h * w])
            out[g].append(torch.tensor([[t1 - t0, h, w]], dtype=grid.dtype))
        rows[kind] += t * h * w
    return {k: v[0] if len(v) == 1 else torch.cat(v) for k, v in out.items() if v}  # a slice is a view: no copy
