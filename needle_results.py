"""The needle pipeline's results table: every stage on both held-out sets, with 95% bootstrap intervals, the paired
bootstrap interval of GRPO - SFT on the same videos, the chance level, and an SVG of accuracy per stage.

    python needle_results.py runs 1234  # (needle_pipeline.sh runs it) reads runs/<stage>/eval*/predictions.jsonl,
                                       # writes runs/results.md and runs/results.svg; 1234 = wall seconds

Intervals: percentile bootstrap over the videos of a set (2,000 resamples, seed 0); the paired one resamples the
videos once for both stages, so it measures the difference on the same videos.
"""
import json
import os
import random
import sys

from checkpoint import write_text

CHANCE = 1 / 6  # six needle colours, drawn uniformly
STAGES = [("no-tool baseline", "rft/eval_notool"), ("SFT", "sft/eval"), ("GRPO", "grpo/eval"), ("RFT", "rft/eval")]
SETS = [("_short", "held-out videos of the training lengths, 3-5 min (the gate)"),
        ("", "held-out longer videos, 10-15 min (generalisation to length; the final model)")]


def scores(path):
    """{sample index: mean score over its draws} of a predictions.jsonl (skipped samples left out)."""
    by = {}
    for line in open(path):
        p = json.loads(line)
        if p.get("stop_reason") != "skipped" and p.get("score") is not None:
            by.setdefault(p["index"], []).append(p["score"])
    return {k: sum(v) / len(v) for k, v in by.items()}


def bootstrap(xs, n=2000, seed=0):
    """(low, high) 95% percentile interval of the mean of xs."""
    rng, k = random.Random(seed), len(xs)
    means = sorted(sum(xs[rng.randrange(k)] for _ in range(k)) / k for _ in range(n))
    return means[int(0.025 * n)], means[int(0.975 * n) - 1]


def svg(rows, path):
    """Bars of accuracy per stage and set, the interval as a whisker, the number right of the whisker's end, an
    axis with ticks, chance dashed."""
    w, top, bh = 620, 34, 18
    h, left, right = top + 26 * len(rows) + 34, 200, 70
    x = lambda v: left + v * (w - left - right)  # noqa: E731
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">',
           f'<rect width="{w}" height="{h}" fill="white"/>',
           f'<text x="{left}" y="18">accuracy per stage (95% bootstrap interval; dashed: chance {CHANCE:.3f})</text>']
    for i, (label, acc, lo, hi) in enumerate(rows):
        y = top + 26 * i
        out += [f'<text x="4" y="{y + 13}">{label}</text>',
                f'<rect x="{left}" y="{y}" width="{x(acc) - left:.1f}" height="{bh}" fill="#4a7bd0"/>',
                f'<line x1="{x(lo):.1f}" x2="{x(hi):.1f}" y1="{y + 9}" y2="{y + 9}" stroke="black" stroke-width="2"/>',
                f'<line x1="{x(lo):.1f}" x2="{x(lo):.1f}" y1="{y + 4}" y2="{y + 14}" stroke="black"/>',
                f'<line x1="{x(hi):.1f}" x2="{x(hi):.1f}" y1="{y + 4}" y2="{y + 14}" stroke="black"/>',
                f'<text x="{x(max(acc, hi)) + 6:.1f}" y="{y + 13}">{acc:.3f}</text>']
    axis = top + 26 * len(rows) + 4
    out.append(f'<line x1="{left}" x2="{x(1):.1f}" y1="{axis}" y2="{axis}" stroke="#444"/>')
    for v in (0, 0.25, 0.5, 0.75, 1):
        out += [f'<line x1="{x(v):.1f}" x2="{x(v):.1f}" y1="{axis}" y2="{axis + 5}" stroke="#444"/>',
                f'<text x="{x(v):.1f}" y="{axis + 18}" text-anchor="middle">{v:g}</text>']
    out += [f'<line x1="{x(CHANCE):.1f}" x2="{x(CHANCE):.1f}" y1="{top - 4}" y2="{axis}" stroke="red" '
            f'stroke-dasharray="4 3"/>', "</svg>"]
    write_text(path, "\n".join(out) + "\n")


def main(runs, secs):
    lines, bars = [], []
    for suffix, title in SETS:
        lines += [f"{title}:", "", "| stage | accuracy (95% CI) | mean IoU | tool calls / episode | format rate | n |",
                  "|---|---|---|---|---|---|"]
        per = {}
        for name, d in STAGES:
            d = os.path.join(runs, d + suffix)
            if not os.path.isfile(os.path.join(d, "summary.json")):
                continue
            s = json.load(open(os.path.join(d, "summary.json")))
            per[name] = scores(os.path.join(d, "predictions.jsonl"))
            lo, hi = bootstrap(list(per[name].values()))
            lines.append(f"| {name} | {s['accuracy']:.3f} ({lo:.3f}-{hi:.3f}) | {s['mean_iou']:.3f} | "
                         f"{s['tool_calls_per_episode']:.2f} | {s['format_rate']:.3f} | {s['n']} |")
            bars.append((f"{name}{' (3-5 min)' if suffix else ' (10-15 min)'}", s["accuracy"], lo, hi))
        if "SFT" in per and "GRPO" in per:
            common = sorted(set(per["SFT"]) & set(per["GRPO"]))
            diff = [per["GRPO"][i] - per["SFT"][i] for i in common]
            lo, hi = bootstrap(diff)
            lines.append(f"\nGRPO - SFT on the same {len(common)} videos: {sum(diff) / len(diff):+.3f} "
                         f"(paired 95% CI {lo:+.3f} to {hi:+.3f})")
        lines.append("")
    lines += [f"chance (six needle colours): {CHANCE:.3f}", f"pipeline wall time: {secs} s"]
    write_text(os.path.join(runs, "results.md"), "\n".join(lines) + "\n")
    svg(bars, os.path.join(runs, "results.svg"))
    print("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
