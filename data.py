"""The view config, the global view, and the ONE chat renderer used by SFT, rollout and eval (samples come from
readers.py; the synthetic needle benchmark is written by `python needle.py`).

Rendering convention (Qwen ChatML, hermes tool calls):
    <|im_start|>system\n{system + tool schema}<|im_end|>\n<|im_start|>user\n{global view}{question}<|im_end|>\n
    <|im_start|>assistant\n{think + tool_call}                                   <- policy tokens (mask 1)
    <|im_end|>\n<|im_start|>user\n<tool_response>{frames}{text}</tool_response><|im_end|>\n<|im_start|>assistant\n
    {think + answer}<|im_end|>                                                    <- policy tokens (mask 1)
A tool-call turn ends at `</tool_call>` (the rollout stops there), so the `<|im_end|>` after it belongs to
the observation chunk (mask 0); the final turn's `<|im_end|>` is the policy's own stop token (mask 1).
"""
import json
import math
import os
import re
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch

from model import rope_index
from tools import CROP_VIDEO_SCHEMA
from video import VideoError, decode_frames, fmt_time, video_info


@dataclass
class ViewConfig:
    visual_format: str = "video"  # "video" (temporal patches, fewer tokens) | "images" (one image per frame, LongVT)
    timestamps: bool = True       # a text timestamp before each frame group (off in LongVT-compatible mode)
    tools: bool = True            # put the crop_video schema in the system prompt (off: the no-tool baseline)
    global_frames: int = 64       # frame budget of the global view
    global_fps: float = 0.1       # fps cap of the global view (one frame per 10 s at most)
    time_grid: float = 5.0        # global-view frames at multiples of a step that is a multiple of this many seconds
                                  # (0: at the centres of equal slices); see global_times
    max_pixels: int = 56 * 56     # pixel budget per global-view frame
    crop_fps: float = 1.0         # fps cap of a crop (LongVT: 1)
    crop_max_frames: int = 16     # frame budget of a crop (LongVT: 128); 16 makes a wide crop too sparse to catch
                                  # the needle benchmark's 3-s flash (needle.py), a narrow one always catches it
    crop_min_frames: int = 4      # at least this many frames per crop
    crop_max_pixels: int = 56 * 56  # pixel budget per cropped frame
    protocol: str = "ours"        # "ours" | "longvt" (LongVT's RL strings, separators and tool checks, for its
                                  # checkpoints) | "longvt_eval" (the same with LongVT's eval user text)

    def __post_init__(self):  # every view and every script's Config (they inherit it) is checked here
        if self.visual_format not in ("video", "images"):
            raise ValueError(f"visual_format must be 'video' or 'images', got {self.visual_format!r}")
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {self.protocol!r}")


PROTOCOLS = ("ours", "longvt", "longvt_eval")


def view_from(cfg) -> ViewConfig:
    """The ViewConfig of a script's Config (eval.py, train_sft.py and train_grpo.py inherit ViewConfig, so its fields
    are their flat --key=value flags)."""
    return ViewConfig(**{f.name: getattr(cfg, f.name) for f in fields(ViewConfig)})


VIEW_FIELDS = {f.name for f in fields(ViewConfig)}
VIEW_FILE = "view.json"  # in a checkpoint dir: the ViewConfig it was trained with
LAYOUT_FIELDS = ("visual_format", "timestamps", "time_grid", "protocol")


def save_view(view: ViewConfig, out_dir):
    """Write the view a checkpoint was trained with next to its weights (the trainers call this)."""
    with open(os.path.join(out_dir, VIEW_FILE), "w") as f:
        json.dump(asdict(view), f, indent=1)


def follow_layout(model_dir, view: dict, given=(), log=print):
    """The prompt layout `model_dir` was trained with (its view.json), for a run from it: {field: trained value}
    for each layout field that differs from `view` (a dict of ViewConfig fields) and is not in `given` (the flags
    the user passed: those win, with a warning). Nothing when it has no readable view.json (HF ids, older
    checkpoints). Frame budgets and the tool schema may differ on purpose (longer videos, the no-tool baseline)."""
    path = os.path.join(str(model_dir), VIEW_FILE)
    try:
        with open(path) as f:
            trained = json.load(f)
    except (OSError, ValueError):
        return {}
    now = asdict(ViewConfig(**{k: v for k, v in view.items() if k in VIEW_FIELDS}))
    out = {}
    for k in (k for k in LAYOUT_FIELDS if k in trained and trained[k] != now[k]):
        if k in given:
            log(f"warning: {model_dir} was trained with {k}={trained[k]}, this run uses {k}={now[k]}: the prompt "
                f"differs from training (--{k}={str(trained[k]).lower()} matches it)")
        else:
            out[k] = trained[k]
            log(f"{k}={trained[k]}: as {model_dir} was trained (its view.json; --{k}= overrides)")
    return out


SYSTEM = "You are a helpful assistant."
TOOLS_TEXT = ("\n\n# Tools\n\nYou may call a function to look at the video more closely. Its signature is inside "
              "<tools></tools>:\n<tools>\n{schema}\n</tools>\n\nTo call it, reply with <tool_call>{{\"name\": "
              "<function-name>, \"arguments\": <args-json-object>}}</tool_call>.")
INSTRUCTION_TOOLS = ("\nThink first inside <think></think>. If you need a closer look, call crop_video with a "
                     "start_time and end_time in seconds. Then give the final answer inside <answer></answer>.")
INSTRUCTION_NO_TOOLS = "\nThink first inside <think></think>, then give the final answer inside <answer></answer>."
LAST_TURN_NOTE = "No more tool calls are available: answer now."
# LongVT's strings (protocol="longvt*", from its repository): its template's system turn with its tool schema, the
# RL and eval user texts after the question, its observation; no newline between turns.
LONGVT_SCHEMA = ('{"type": "function", "function": {"name": "crop_video", "description": "Crop a video to a specified '
                 'duration.", "parameters": {"type": "object", "properties": {"video_path": {"type": "string", '
                 '"description": "Path to the video file", "enum": null}, "start_time": {"type": "number", '
                 '"description": "Start time in seconds", "enum": null}, "end_time": {"type": "number", '
                 '"description": "End time in seconds, must be > start_time", "enum": null}}, "required": []}, '
                 '"strict": false}}')
LONGVT_TOOLS = ("\n# Tools\nYou may call one or more functions to assist with the user query.\nYou are provided with "
                "function signatures within <tools></tools> XML tags:\n<tools>" + LONGVT_SCHEMA + "</tools>\nFor each "
                "function call, return a json object with function name and arguments within <tool_call></tool_call> "
                "XML tags:\n<tool_call>{\"name\": <function-name>, \"arguments\": <args-json-object>}</tool_call>")
LONGVT_FORMAT = (" Think first, call **crop_video** if needed, then answer. Format strictly as:  <think>...</think>  "
                 "<tool_call>...</tool_call> (if tools needed)  <answer>...</answer>")
LONGVT_RL = (" You FIRST think about the reasoning process as an internal monologue and then provide the final answer."
             + LONGVT_FORMAT + " \n The Video path for this video is: {path}")
LONGVT_EVAL = LONGVT_FORMAT + ".\nVideo 0 has video path: {path}"


# --------------------------------------------------------------------------- global view
def sample_duration(sample):
    """The sample's duration: its `duration` field, checked against the video's own length (off by more than 2 s
    and 2% is a VideoError naming both: the global view and the crops would sample times the video does not have),
    or the video's when the row has none."""
    real = video_info(sample["video"])["duration"]
    d = sample.get("duration")
    if d and abs(d - real) > max(2.0, 0.02 * real):
        raise VideoError(f"duration {d} s in the row, but the video {sample['video']} is {real:.1f} s long")
    return d or real


def global_view(video, view: ViewConfig, duration=None):
    """(frames (N, H, W, 3) uint8, timestamps) at global_times(duration, view), decoded by seeking (memory: N
    frames); the timestamps are the decoded frames' own."""
    duration = duration or video_info(video)["duration"]
    return decode_frames(video, global_times(duration, view), view.max_pixels)


def global_times(duration, view: ViewConfig):
    """Frame times of the global view: about N = min(global_frames, duration * global_fps) frames (>= 2).
    With time_grid g > 0: 0, s, 2s, ... below the duration, s = the spacing duration / N rounded up to a multiple of g,
    so the timestamps shown (and the crop windows read off them) are round numbers: a tiny model learns to copy
    them much sooner (docs/studies.md). With g = 0: the centres of N equal slices, rounded to whole seconds."""
    n = int(max(2, min(view.global_frames, duration * view.global_fps)))
    if view.time_grid > 0 and duration > 0:
        g = view.time_grid
        spacing = max(duration / view.global_frames, 1 / view.global_fps) if n > 2 else duration / 2
        step = math.ceil(spacing / g - 1e-9) * g
        k = min(view.global_frames, max(2, math.ceil(duration / step - 1e-9)))
        return [float(min(i * step, max(duration - 0.5, 0))) for i in range(k)]
    return [float(min(round((i + 0.5) * duration / n), max(duration - 0.5, 0))) for i in range(n)]


# --------------------------------------------------------------------------- renderer
@dataclass
class Rendered:
    """A token sequence with its loss mask, modality types and the vision inputs of its frames, in order."""
    input_ids: list
    policy_mask: list
    mm_token_type_ids: list  # 0 text, 1 image pad, 2 video pad (what get_rope_index needs)
    vision: dict             # pixel_values/image_grid_thw, pixel_values_videos/video_grid_thw/second_per_grid_ts

    def __add__(self, other):
        return Rendered.join([self, other])

    @staticmethod
    def join(parts):
        """Concatenate many parts at once (vision tensors copied once, not once per part)."""
        return Rendered([i for p in parts for i in p.input_ids], [m for p in parts for m in p.policy_mask],
                        [t for p in parts for t in p.mm_token_type_ids], cat_vision([p.vision for p in parts]))


def cat_vision(parts):
    """Concatenate vision inputs of several sequences/chunks in order (the order their pad tokens appear in)."""
    out = {}
    for k in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts"):
        ts = [p[k] for p in parts if p.get(k) is not None]
        if ts:
            out[k] = ts[0] if len(ts) == 1 else torch.cat(ts)  # one part: shared, not copied
    return out


def model_vision(vision, device=None):
    """The vision inputs of a forward pass with explicit position ids: everything but second_per_grid_ts (only
    get_rope_index needs it, and collate/positions already ran that), moved to `device` when given."""
    return {k: v if device is None else v.to(device) for k, v in vision.items() if k != "second_per_grid_ts"}


def batch_to(batch, device):
    """A collate() batch with every tensor, the vision dict's too, on `device`."""
    return {k: ({kk: vv.to(device) for kk, vv in v.items()} if k == "vision" else v.to(device))
            for k, v in batch.items()}


class Renderer:
    """Messages -> Rendered, for one processor and view config."""

    def __init__(self, processor, view: ViewConfig):
        self.proc, self.view = processor, view
        self.tok = processor.tokenizer
        self.image_id = self.tok.convert_tokens_to_ids("<|image_pad|>")
        self.video_id = self.tok.convert_tokens_to_ids("<|video_pad|>")
        self.im_end = self.tok.convert_tokens_to_ids("<|im_end|>")
        self.merge = processor.image_processor.merge_size ** 2
        self.tps = getattr(processor.video_processor, "temporal_patch_size", 2)
        specials = sorted((t.content for t in self.tok.added_tokens_decoder.values() if t.special), key=len,
                          reverse=True)
        self.special = re.compile("|".join(map(re.escape, specials)))

    def text(self, s, train=0):
        """Text that may come from data (questions, choices, SFT turns, tool texts): a special token written in it
        (`<|im_end|>`, `<|video_pad|>`, ...) is encoded as the characters it is made of, so no row can forge a chat
        turn or a vision placeholder. The tool protocol's own tags (`<tool_call>`, `<answer>`, ...) are not special
        tokens and still encode as themselves."""
        ids, pos = [], 0
        for m in self.special.finditer(s):  # (not split_special_tokens=True: it flips the shared tokenizer's state,
            t = m.group(0)                  # a race between the threads that render samples)
            ids += self._enc(s[pos:m.start()]) + self._enc(t[0]) + self._enc(t[1:])  # "<", "|im_end|>": not special
            pos = m.end()
        ids += self._enc(s[pos:])
        return Rendered(ids, [train] * len(ids), [0] * len(ids), {})

    def _enc(self, s):
        return self.tok.encode(s, add_special_tokens=False) if s else []

    def mark(self, s):
        """The renderer's own markup: special tokens in it are the real ones."""
        ids = self.tok.encode(s, add_special_tokens=False)
        return Rendered(ids, [0] * len(ids), [0] * len(ids), {})

    def visual(self, frames, timestamps):
        """Frames as one video (timestamps off), one video per temporal patch with its time before it (on), or one
        image per frame ('images' format)."""
        frames = np.asarray(frames)
        if self.view.visual_format == "images":
            groups = [(frames[i:i + 1], timestamps[i]) for i in range(len(frames))]
        else:
            if len(frames) % self.tps:  # pad to whole temporal patches by repeating the last frame
                frames = np.concatenate([frames, frames[-1:].repeat(self.tps - len(frames) % self.tps, 0)])
                timestamps = list(timestamps) + [timestamps[-1]] * (len(frames) - len(timestamps))
            step = self.tps if self.view.timestamps else len(frames)
            groups = [(frames[i:i + step], timestamps[i]) for i in range(0, len(frames), step)]
        parts = []
        for g, t in groups:
            stamp = [self.text(f"{fmt_time(t)}s")] if self.view.timestamps else []
            block = [self._vision_block(g, timestamps)]
            parts += stamp + block
        return Rendered.join(parts)

    def _vision_block(self, frames, all_ts):
        if self.view.visual_format == "images":
            v = self.proc.image_processor(images=[frames[0]], return_tensors="pt")
            n, pad, kind = int(v["image_grid_thw"].prod()) // self.merge, self.image_id, 1
            vision = {"pixel_values": v["pixel_values"], "image_grid_thw": v["image_grid_thw"]}
        else:
            v = self.proc.video_processor(videos=[frames], return_tensors="pt", do_sample_frames=False)
            n, pad, kind = int(v["video_grid_thw"].prod()) // self.merge, self.video_id, 2
            spacing = (all_ts[-1] - all_ts[0]) / max(len(all_ts) - 1, 1) or 1.0  # seconds between frames
            vision = {"pixel_values_videos": v["pixel_values_videos"], "video_grid_thw": v["video_grid_thw"],
                      "second_per_grid_ts": torch.tensor([spacing * self.tps])}
        start, end = self.mark("<|vision_start|>"), self.mark("<|vision_end|>")
        return start + Rendered([pad] * n, [0] * n, [kind] * n, vision) + end

    @property
    def longvt(self):
        return self.view.protocol.startswith("longvt")

    def system_text(self):
        if not self.view.tools:
            return SYSTEM
        return SYSTEM + (LONGVT_TOOLS if self.longvt else TOOLS_TEXT.format(schema=json.dumps(CROP_VIDEO_SCHEMA)))

    def system_turn(self):
        """The system turn: the system prompt, with the tool schema when tools are on."""
        return (self.mark("<|im_start|>system\n") + self.text(self.system_text())
                + self.mark("<|im_end|>" + self.sep))

    @property
    def sep(self):  # between turns: LongVT's template has no newline
        return "" if self.longvt else "\n"

    def prompt(self, sample, frames, timestamps):
        """System + user (global view, instruction, question) + the assistant header. protocol longvt*: LongVT's
        turn, the view, the question, its text with the path."""
        q = sample["question"]
        if sample.get("choices"):
            q += "\n" + "\n".join(sample["choices"])
        if self.longvt:  # in-memory samples have no video: the path is left blank
            path = os.path.abspath(sample["video"]) if sample.get("video") else ""
            tail = LONGVT_EVAL if self.view.protocol == "longvt_eval" else LONGVT_RL
            return self.system_turn() + self.user(frames, timestamps, q + tail.format(path=path))
        instr = INSTRUCTION_TOOLS if self.view.tools else INSTRUCTION_NO_TOOLS
        # LongVT's user turn ends with the instruction; ours ends with the question, next to the assistant turn that
        # answers it: the tiny policy then answers the kind of question asked (README "The question last")
        return self.system_turn() + self.user(frames, timestamps, f"{instr.lstrip()}\n{q}")

    def user(self, frames, timestamps, text):
        """The user turn: the global view, then `text`, + the assistant header."""
        return (self.mark("<|im_start|>user\n") + self.visual(frames, timestamps) + self.text(text)
                + self.mark(f"<|im_end|>{self.sep}<|im_start|>assistant\n"))

    def observation(self, obs, last=False):
        """The chunk appended after a tool-call turn: closes the assistant turn, the tool response as a user
        turn, and opens the next assistant turn. obs: dict(frames, timestamps, text) (frames may be None)."""
        out = self.mark("<|im_end|><|im_start|>user<tool_response>\n" if self.longvt
                        else "<|im_end|>\n<|im_start|>user\n<tool_response>")
        if obs.get("frames") is not None and len(obs["frames"]):
            out = out + self.visual(obs["frames"], obs["timestamps"])
        note = f"\n{LAST_TURN_NOTE}" if last and not self.longvt else ""  # LongVT just ends at its 5th call
        tail = self.text(f"{obs['text']}</tool_response>{note}")
        return out + tail + self.mark(f"<|im_end|>{self.sep}<|im_start|>assistant\n")

    def assistant(self, text, final):
        """An assistant turn as the policy would emit it (mask 1), incl. <|im_end|> on the final turn."""
        r = self.text(text, train=1)
        return r + Rendered([self.im_end], [1], [0], {}) if final else r

    def trajectory(self, sample, frames, timestamps, observe, max_turns=5):
        """An SFT row -> Rendered. observe(turn_index, turn_text) gives the observation dict of a tool turn
        (re-running the tool, or LongVT's stored frames). The max_turns-th observation carries the same
        no-more-calls note as in the rollout."""
        parts = [self.prompt(sample, frames, timestamps)]
        turns = sample["turns"]
        for i, t in enumerate(turns):
            final = i == len(turns) - 1
            parts.append(self.assistant(t, final))
            if not final:
                parts.append(self.observation(observe(i, t), last=i + 1 >= max_turns))
        return Rendered.join(parts)


def render_sft(renderer: Renderer, sample, max_turns=5):
    """An SFT row (with `turns`) -> Rendered. Tool observations come from re-running each call with the same
    tool code the rollout uses (so SFT data and rollouts tokenize identically), or, for LongVT's rows, from
    the stored frames (`observations`). Raises video.VideoError when the video cannot be read."""
    from tools import observe
    view = renderer.view
    s = dict(sample)
    s["duration"] = sample_duration(s)
    frames, ts = global_view(s["video"], view, s["duration"])
    stored = s.get("observations")

    def obs(i, text):
        if stored:
            from PIL import Image
            o = stored[i]
            imgs = [np.asarray(Image.open(p).convert("RGB")) for p in o["images"]]
            return dict(frames=np.stack(imgs) if imgs else None, timestamps=[0.0] * len(imgs),
                        text=o["text"].replace("<tool_response>", "").replace("</tool_response>", ""))
        return observe(text, s["video"], s["duration"], fps=view.crop_fps, max_frames=view.crop_max_frames,
                       min_frames=view.crop_min_frames, max_pixels=view.crop_max_pixels, protocol=view.protocol)
    return renderer.trajectory(s, frames, ts, obs, max_turns)


def positions(model, r: Rendered):
    """M-RoPE position ids (3, T) of one rendered sequence, from the model's own get_rope_index."""
    if not r.vision:  # text only: the three axes are plain 0..T-1
        return torch.arange(len(r.input_ids)).expand(3, -1)
    ids = torch.tensor([r.input_ids])
    return rope_index(model, ids, torch.tensor([r.mm_token_type_ids]), r.vision.get("image_grid_thw"),
                      r.vision.get("video_grid_thw"), r.vision.get("second_per_grid_ts"))[:, 0]


def collate(model, rendered, pad_id):
    """Right-padded batch: input_ids, attention_mask, policy_mask (B, T), position_ids (3, B, T), vision."""
    T = max(len(r.input_ids) for r in rendered)
    B = len(rendered)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    att = torch.zeros(B, T, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.long)
    pos = torch.zeros(3, B, T, dtype=torch.long)
    for b, r in enumerate(rendered):
        n = len(r.input_ids)
        ids[b, :n] = torch.tensor(r.input_ids)
        att[b, :n] = 1
        mask[b, :n] = torch.tensor(r.policy_mask)
        pos[:, b, :n] = positions(model, r)
    return dict(input_ids=ids, attention_mask=att, policy_mask=mask, position_ids=pos,
                vision=cat_vision([r.vision for r in rendered]))
