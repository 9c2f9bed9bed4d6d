"""report.html of eval.py: one self-contained page showing, per trajectory, where the model looked and whether it
was right. Built from predictions (eval.py) by re-decoding the frames the model saw:

    from report import write_report
    write_report("runs/sft/eval/report.html", summary, predictions[:20], ViewConfig(**summary["view"]))

Per trajectory: a verdict badge, answer vs reference, the reward components; a timeline of the whole video with
the global-view thumbnails (the frames of data.global_times, at most `max_thumbs`), the ground-truth window
(green band) and every crop window (striped orange boxes, numbered in call order); the frames of each crop
(tools.crop_video with the view's crop budget, at most `max_crop_frames` shown); the text of every turn.
Thumbnails are inlined as base64 JPEG (PIL); no JavaScript framework, only a three-line self-check that counts
the images the browser failed to decode (data-broken-images on <body>).
"""
import base64
import html
import io
import json
import math
import os

import numpy as np
from tqdm import tqdm

from data import ViewConfig, global_times
from checkpoint import write_text
from tools import ToolError, crop_video
from video import VideoError, decode_frames, fmt_time

CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:16px 24px;color:#222;background:#fafafa}
h1{font-size:20px;margin:0 0 8px} h2{font-size:16px;margin:0 0 6px}
table.sum{border-collapse:collapse;margin:4px 16px 8px 0;display:inline-table;vertical-align:top}
table.sum td{border:1px solid #ddd;padding:2px 8px;background:#fff} table.sum td:first-child{color:#666}
.legend span{display:inline-block;width:14px;height:10px;margin:0 4px 0 12px;vertical-align:middle}
.index a{display:inline-block;margin:2px 6px 2px 0;text-decoration:none;padding:0 5px;border-radius:3px;color:#fff}
section.sample{background:#fff;border:1px solid #ddd;border-radius:6px;padding:10px 14px;margin:14px 0}
.badge{display:inline-block;padding:1px 8px;border-radius:10px;color:#fff;font-weight:600;margin-right:6px}
.correct{background:#1a9c4a}.partial{background:#d89a00}.wrong{background:#d0302f}.skipped{background:#888}
.qa{margin:4px 0} .qa b{color:#555;font-weight:600}
.chips span{display:inline-block;background:#eef;border-radius:3px;padding:0 6px;margin:2px 4px 2px 0;font-size:12px}
.tl{position:relative;margin:10px 0 4px} .strip{display:flex;height:44px;border:1px solid #999}
.strip img{flex:1 1 0;min-width:0;height:44px;object-fit:cover;display:block}
.gt{position:absolute;top:-3px;bottom:14px;border:2px solid #1a9c4a;background:rgba(26,156,74,.18);
box-sizing:border-box}
.gt i{position:absolute;top:-15px;left:0;font:11px sans-serif;color:#1a9c4a;white-space:nowrap}
.track{position:relative;margin-top:3px} .crop{position:absolute;height:15px;border:1px solid #6b3a00;
background:repeating-linear-gradient(135deg,#f28c28 0 6px,#c46a12 6px 9px);box-sizing:border-box;color:#fff;
font:bold 11px/13px sans-serif;text-align:center;overflow:hidden;border-radius:2px}
.crop b{background:#6b3a00;padding:0 4px;border-radius:2px}
.axis{position:relative;height:14px;font-size:10px;color:#666}
.axis span{position:absolute;transform:translateX(-50%)} .call{margin:6px 0}.call .err{color:#d0302f}
.frames{display:flex;flex-wrap:wrap;gap:3px;margin-top:3px}
.frames figure{margin:0;text-align:center;font-size:10px;color:#666}.frames img{height:44px;display:block}
.turn{margin:4px 0}.turn pre{white-space:pre-wrap;word-break:break-word;margin:2px 0;padding:6px;background:#f3f3f7;
border-radius:4px;font:12px/1.35 ui-monospace,monospace} .turn.tool pre{background:#fff4e6}
"""
SELF_CHECK = ("<script>addEventListener('load',()=>{document.body.dataset.brokenImages=[...document.images]"
              ".filter(i=>!i.complete||i.naturalWidth===0).length;});</script>")


def jpeg_uri(frame, max_side=96, quality=85):
    """(H, W, 3) uint8 -> a data: URI of a JPEG at most max_side pixels wide and high (keeps the page small)."""
    from PIL import Image
    img = Image.fromarray(np.asarray(frame, dtype=np.uint8))
    img.thumbnail((max_side, max_side))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def evenly(n, k):
    """At most k indices of range(n), evenly spread, first and last included."""
    return np.unique(np.linspace(0, n - 1, min(n, k)).round().astype(int)).tolist()


def verdict(p):
    if p["stop_reason"] == "skipped":
        return "skipped", "skipped"
    s = p["score"]
    if s >= 1:
        return "correct", "✓ correct"
    return ("partial", f"½ partial ({s:g})") if s > 0 else ("wrong", "✗ wrong")


def esc(x):
    return html.escape("" if x is None else str(x))


def pct(t, duration):
    return 100.0 * min(max(t / duration, 0.0), 1.0)


def timeline(p, frames):
    """Thumbnails of the global view, the ground-truth band, one row of boxes per crop, a time axis."""
    dur = p["duration"]
    imgs = "".join(f'<img src="{jpeg_uri(f)}" title="{fmt_time(t)}s" alt="{fmt_time(t)}s">' for f, t in frames)
    gt = ""
    if p.get("window"):
        a, b = p["window"]
        gt = (f'<div class="gt" style="left:{pct(a, dur):.2f}%;width:{max(pct(b, dur) - pct(a, dur), 0.3):.2f}%">'
              f'<i>evidence {fmt_time(a)}–{fmt_time(b)}s</i></div>')
    crops = [(i, c["window"]) for i, c in enumerate(p.get("tool_calls") or []) if c["window"]]
    boxes = "".join(
        f'<div class="crop" style="left:{pct(w[0], dur):.2f}%;width:{max(pct(w[1], dur) - pct(w[0], dur), 0.5):.2f}%;'
        f'top:{18 * row}px" title="crop {i + 1}: {fmt_time(w[0])}–{fmt_time(w[1])}s"><b>{i + 1}</b></div>'
        for row, (i, w) in enumerate(crops))
    step = next(s for s in (10, 30, 60, 120, 300, 600, 1800, 3600, 1e9) if dur / s <= 12)
    ticks = "".join(f'<span style="left:{pct(t, dur):.2f}%">{int(t // 60)}:{int(t % 60):02d}</span>'
                    for t in np.arange(0, dur + 1e-6, step))
    return (f'<div class="tl"><div class="strip">{imgs}</div>{gt}'
            f'<div class="track" style="height:{18 * len(crops)}px">{boxes}</div><div class="axis">{ticks}</div></div>')


def crop_frames(p, view: ViewConfig, max_crop_frames):
    """Per tool call: its window and the frames the model got (re-decoded), or its error."""
    out = []
    for i, c in enumerate(p.get("tool_calls") or []):
        if c["error"] or not c["window"]:
            out.append(f'<div class="call"><b>call {i + 1}</b> <span class="err">error: {esc(c["error"])}</span></div>')
            continue
        a, b = c["window"]
        try:
            clip = crop_video(p["video"], a, b, fps=view.crop_fps, max_frames=view.crop_max_frames,
                              min_frames=view.crop_min_frames, max_pixels=view.crop_max_pixels)
            n = len(clip.frames)
            keep = evenly(n, max_crop_frames)
            figs = "".join(f'<figure><img src="{jpeg_uri(clip.frames[k])}" alt="frame"><figcaption>'
                           f'{fmt_time(clip.timestamps[k])}s</figcaption></figure>' for k in keep)
            body = f'{n} frames{f" ({len(keep)} shown)" if len(keep) < n else ""}<div class="frames">{figs}</div>'
        except ToolError as e:
            body = f'<span class="err">frames unavailable: {esc(e)}</span>'
        out.append(f'<div class="call"><b>crop {i + 1}</b>: {fmt_time(a)}–{fmt_time(b)}s · {body}</div>')
    return "".join(out)


def turns_html(p, max_chars=4000):
    """Assistant turns interleaved with what each tool call returned."""
    out, calls = [], p.get("tool_calls") or []
    for i, text in enumerate(p.get("turns") or []):
        text = text if len(text) <= max_chars else text[:max_chars] + f"… [{len(text) - max_chars} more chars]"
        out.append(f'<div class="turn"><b>assistant {i + 1}</b><pre>{esc(text)}</pre></div>')
        if i < len(calls):
            c = calls[i]
            obs = (f"Tool execution failed: {c['error']}" if c["error"] else
                   f"frames of {fmt_time(c['window'][0])}–{fmt_time(c['window'][1])}s")
            out.append(f'<div class="turn tool"><b>tool response {i + 1}</b><pre>{esc(obs)}</pre></div>')
    return "".join(out)


def sample_section(i, p, view: ViewConfig, max_crop_frames, max_thumbs):
    kind, label = verdict(p)
    draw = f" (draw {p['draw'] + 1})" if p.get("draw") else ""
    head = (f'<section class="sample" id="s{i}"><h2><span class="badge {kind}">{label}</span>'
            f'#{i + 1} {esc(p["id"])}{draw}</h2>'
            f'<div class="qa"><b>Q:</b> {esc(p["question"])}'
            + "".join(f"<br>{esc(c)}" for c in p.get("choices") or []) + "</div>")
    if kind == "skipped":
        return head + f'<div class="qa"><b>skipped:</b> {esc(p["error"])}</div></section>'
    comp = p["components"]
    chips = [f"reward {p['reward']:.2f}", f"accuracy {comp['accuracy']:g}", f"format {comp['format']:g}",
             f"IoU {comp['iou']:.2f}", f"{len(p['tool_calls'])} tool calls", f"stop: {p['stop_reason']}",
             f"{p['tokens']} generated / {p['total_tokens']} tokens", f"{p['latency']:.1f}s"]
    if comp.get("judge_used"):
        chips.append(f"judge {comp['judge']:g}")
    if comp.get("judge_failures"):
        chips.append("judge failed: rule score")
    try:
        times = global_times(p["duration"], view)  # the global view's frames, at most max_thumbs of them
        times = [times[k] for k in evenly(len(times), max_thumbs)]
        frames, ts = decode_frames(p["video"], times, min(view.max_pixels, 112 * 112))
        tl = timeline(p, list(zip(frames, ts)))
    except VideoError as e:
        tl = f'<div class="qa">global view unavailable: {esc(e)}</div>'
    return (head + f'<div class="qa"><b>answer:</b> {esc(p["answer"])} &nbsp; <b>reference:</b> {esc(p["reference"])}'
            f'</div><div class="chips">{"".join(f"<span>{esc(c)}</span>" for c in chips)}</div>'
            + tl + crop_frames(p, view, max_crop_frames) + turns_html(p) + "</section>")


def summary_html(summary):
    def fmt(v):
        return "-" if v is None else f"{v:.4g}" if isinstance(v, float) else esc(v)
    keys = ["model", "data", "n", "scored", "accuracy"] + [k for k in summary if k.startswith("pass@")] + [
        "format_rate", "mean_iou", "tool_calls_per_episode", "tool_error_rate", "judge_failures", "mean_tokens",
        "seconds_per_sample", "skipped"]
    main = "".join(f"<tr><td>{k}</td><td>{fmt(summary.get(k))}</td></tr>" for k in keys if k in summary)
    by_len = "".join(f"<tr><td>{k}</td><td>{fmt(v['accuracy'])} (n={v['n']})</td></tr>"
                     for k, v in summary.get("accuracy_by_length", {}).items())
    v = summary.get("view", {})
    setup = (f"tools {'on' if v.get('tools') else 'off'}, {v.get('visual_format')}, timestamps "
             f"{'on' if v.get('timestamps') else 'off'}, {v.get('global_frames')} global frames")
    skipped = (f"<p><b>skipped:</b> {esc(', '.join(summary['skipped_names']))}</p>"
               if summary.get("skipped_names") else "")
    return (f'<table class="sum">{main}</table><table class="sum"><tr><td>accuracy by length</td><td></td></tr>'
            f'{by_len}</table><p>{esc(setup)}</p>{skipped}')


def write_report(path, summary, predictions, view: ViewConfig, max_crop_frames=48, max_thumbs=96):
    """One self-contained HTML page: the summary, an index of verdicts, then a section per prediction."""
    index = "".join(f'<a class="{verdict(p)[0]}" href="#s{i}">{i + 1}</a>' for i, p in enumerate(predictions))
    sections = [sample_section(i, p, view, max_crop_frames, max_thumbs)
                for i, p in enumerate(tqdm(predictions, desc="report", unit="sample", leave=False))]
    page = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>eval report</title>'
            f'<style>{CSS}</style></head><body><h1>Evaluation report</h1>{summary_html(summary)}'
            f'<div class="legend">timeline: <span style="background:rgba(26,156,74,.4);border:1px solid #1a9c4a">'
            f'</span>ground-truth evidence window <span class="crop" style="position:static"></span>'
            f'crop_video windows, '
            f'numbered in call order; thumbnails = the global view the model saw</div>'
            f'<div class="index">first {len(predictions)} trajectories: {index}</div>'
            + "".join(sections) + SELF_CHECK + "</body></html>")
    write_text(path, page)


def write_curve(out, smooth=5):
    """<out>/reward_curve.svg from metrics.jsonl: reward, accuracy and IoU per GRPO step, each raw (thin, light)
    and as a centred moving average over `smooth` steps (thick), with axes, ticks and a legend (no plotting
    dependency)."""
    rows = [m for m in map(json.loads, open(os.path.join(out, "metrics.jsonl"))) if "reward" in m]
    W, H, L, R, T, B = 640, 340, 48, 16, 30, 58  # size and the plot's margins
    top = max([1.0] + [r["reward"] for r in rows])
    top = math.ceil(top * 2) / 2  # the y axis ends on a half
    steps = [r["step"] for r in rows] or [1]
    s0, s1 = steps[0], max(steps[-1], steps[0] + 1)
    x = lambda s: L + (W - L - R) * (s - s0) / (s1 - s0)  # noqa: E731
    y = lambda v: H - B - (H - B - T) * v / top  # noqa: E731
    p = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
         f'<rect width="{W}" height="{H}" fill="white"/>',
         f'<text x="{L}" y="18">GRPO rollouts per step: raw (thin) and a {smooth}-step moving average (thick)</text>',
         f'<rect x="{L}" y="{T}" width="{W - L - R}" height="{H - B - T}" fill="none" stroke="#999"/>']
    for k in range(int(top * 2) + 1):  # y ticks every 0.5, with grid lines
        v = k / 2
        p += [f'<line x1="{L - 4}" x2="{W - R}" y1="{y(v):.1f}" y2="{y(v):.1f}" stroke="#eee"/>',
              f'<text x="{L - 6}" y="{y(v) + 4:.1f}" text-anchor="end">{v:g}</text>']
    every = max(1, round((s1 - s0) / 7))
    for s in range(s0, s1 + 1, every):  # x ticks: step numbers
        p += [f'<line x1="{x(s):.1f}" x2="{x(s):.1f}" y1="{H - B}" y2="{H - B + 5}" stroke="#444"/>',
              f'<text x="{x(s):.1f}" y="{H - B + 18}" text-anchor="middle">{s}</text>']
    p.append(f'<text x="{(L + W - R) / 2}" y="{H - B + 34}" text-anchor="middle">step</text>')
    for i, (key, colour) in enumerate((("reward", "#d62728"), ("accuracy", "#1f77b4"), ("iou", "#2ca02c"))):
        vals = [r[key] for r in rows]
        near = [vals[max(0, j - smooth // 2):j + smooth // 2 + 1] for j in range(len(vals))]
        avg = [sum(v) / len(v) for v in near]
        for series, width, alpha in ((vals, 1, 0.35), (avg, 2.5, 1)):
            pts = " ".join(f"{x(s):.1f},{y(v):.1f}" for s, v in zip(steps, series))
            p.append(f'<polyline fill="none" stroke="{colour}" stroke-opacity="{alpha}" stroke-width="{width}" '
                     f'points="{pts}"/>')
        lx = L + 10 + 110 * i
        p += [f'<line x1="{lx}" x2="{lx + 20}" y1="{H - 10}" y2="{H - 10}" stroke="{colour}" stroke-width="2.5"/>',
              f'<text x="{lx + 26}" y="{H - 6}">{key}</text>']
    write_text(os.path.join(out, "reward_curve.svg"), "\n".join(p + ["</svg>"]))
