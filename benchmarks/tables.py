"""Render benchmarks/results/*.json as the markdown tables in benchmarks/README.md.

A result file may carry ``"tables": [{"title", "columns", "rows"}]`` (rendered as is);
otherwise its ``"summary"`` (a dict, or a dict of dicts) is rendered. Every section
names the command that produced it and the machine it ran on.
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

INTRO = """# Benchmarks

Scripts, not tests: each measures side by side in one run and writes `results/NAME.json`.
`python -m benchmarks` runs them all (about 10-20 minutes on a 2-core CPU) and rebuilds this page
from the JSON; `python -m benchmarks --smoke` runs tiny versions (CI does); `python -m benchmarks
--table` only rebuilds this page. Every figure below comes from the committed results file named
in its section, produced by the command shown there. The GPU section (`gpu`) appears when
`benchmarks/gpu.py` has been run on a machine with CUDA; without CUDA it writes nothing.
`benchmarks/masks.py` also cuts the places where a masker and the cloud mask disagree into a contact
sheet, `results/sheets/masks_<image>.png`, for a person to judge; it is not committed (it holds
crops of the input images).
"""


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _markdown(columns, rows) -> str:
    head = "| " + " | ".join(map(str, columns)) + " |\n|" + "---|" * len(columns) + "\n"
    return head + "".join("| " + " | ".join(_cell(c) for c in row) + " |\n" for row in rows)


def _accuracy_tables(d: dict) -> list[dict]:
    cols = ["route", "deep recall (mean / min)", "3-10% recall", "dark features touched", "deep flat err median",
            "deep flat err p90", "residual dust (median / worst run)", "exactly 1.0"]
    rows = []
    for k, v in d["summary"].items():
        rows.append([k + (" (motion)" if k.startswith("auto") else " (median)"),
                     f"{v['deep_dust_recall']:.3f} / {v['min_deep_dust_recall']:.3f}",
                     round(v["medium_dust_recall_3_10pct"], 3), round(v["dark_feature_leakage"], 3),
                     f"{100 * v['deep_dust_flat_error_median']:.2f} %", f"{100 * v['deep_dust_flat_error_p90']:.2f} %",
                     f"{100 * v['deep_dust_residual_median']:.2f} % / {100 * v['max_deep_dust_residual_median']:.2f} %",
                     round(v["fraction_flat_exactly_one"], 3)])
    c = d["config"]
    title = (f"simulator, {c['size'][0]} x {c['size'][1]} x {c['frames']} frames, seeds {c['seeds']}, "
             "with and without central obstruction (means over the videos)")
    return [{"title": title, "columns": cols, "rows": rows}]


def _flats_tables(d: dict) -> list[dict]:
    cols = ["method", "deep med %", "deep p90 %", "3-10% med %", "rim med %", "spot max %", "spots hit",
            "recall >10%", "recall 3-10%", "exact 1.0", "time s", "peak MB"]
    rows = []
    for k, v in d["summary"].items():
        def g(key, scale=100):
            return None if v.get(key) is None else round(scale * v[key], 3)
        rows.append([k, g("deep_median"), g("deep_p90"), g("faint_median"), g("halo_median"), g("dark_max"),
                     g("leak", 1), g("recall_deep", 1), g("recall_faint", 1), g("exact_one", 1), g("time_s", 1),
                     g("peak_mb", 1)])
    c = d["config"]
    tables = [{"title": f"simulator, {c['size'][0]} x {c['size'][1]} x {c['frames']} frames, seeds {c['seeds']}, "
                        f"variants: {', '.join(c['variants'])} (means)", "columns": cols, "rows": rows}]
    if d.get("speed"):
        tables.append({
            "title": "motion route at full size (1920 x 1200 x 200 frames, 16-bit)",
            "columns": ["frames used", "total s", "peak RSS MB", "deep med %", "deep p90 %", "exact 1.0"],
            "rows": [[s["frames_used"], s["times_s"]["total"], round(s["peak_rss_mb"]), round(100 * s["deep_median"], 3),
                      round(100 * s["deep_p90"], 3), round(s["exact_one"], 3)] for s in d["speed"]],
        })
    return tables


def _masks_tables(d: dict) -> list[dict]:
    tables = []
    for pair in d.get("pairs", []):
        h, w = pair["shape"]
        tables.append({
            "title": f"against the cloud mask: {Path(pair['reference']).name} ({w} x {h}); the cloud mask is a "
                     "reference, not the truth",
            "columns": ["masker", "pixel IoU", "Dice", "objects found", "object precision", "F1", "s / MP",
                        "cloud objects missed", "objects not in cloud"],
            "rows": [[name, round(r["pixel_iou"], 3), round(r["dice"], 3),
                      f"{r['object_n_ref_found']}/{r['object_n_ref']}", round(r["object_precision"], 3),
                      round(r["object_f1"], 3), round(r["seconds_per_mp"], 2) if "seconds_per_mp" in r else "-",
                      pair["disagreements"][name]["cloud_missed"], pair["disagreements"][name]["not_in_cloud"]]
                     for name, r in pair["maskers"].items()],
        })
    setup = d["simulator_setup"]
    sim_cols = ["masker", "IoU >10%", "Dice >10%", "IoU all dust", "recall >10%", "recall 3-10%", "precision",
                "F1", "dark features masked", "s / MP"]

    def row(name, p):
        return [name, round(p["iou_deep"], 3), round(p["dice_deep"], 3), round(p["iou_dust"], 3),
                round(p["recall_deep"], 3), round(p["recall_3_10pct"], 3), round(p["precision"], 3),
                round(p["f1"], 3), round(p["dark_features_masked"], 3), round(p["seconds_per_mp"], 2)]

    conditions = list(d["simulator"])
    tables.append({
        "title": f"simulator truth, all {len(conditions)} conditions pooled ({setup['size'][0]} x {setup['size'][1]} "
                 f"x {setup['frames']} frames, seeds {setup['seeds']}; +frames: the masker also sees the frames). "
                 "The truth is each shadow's extent where the true flat departs from 1 by more than 1 %; "
                 "`motion` masks every pixel whose gain departs from 1 beyond its noise (down to about 0.2 %, "
                 "which its flat corrects), so its masks are wider than that extent: IoU >10 % counts the "
                 "difference against it, IoU all dust less",
        "columns": sim_cols, "rows": [row(n, p) for n, p in d["simulator_all_conditions"].items()]})
    maskers = list(d["simulator_all_conditions"])
    tables.append({
        "title": "simulator truth by condition: IoU >10% / recall >10% / dark features masked",
        "columns": ["condition", *maskers],
        "rows": [[c] + [f"{m['iou_deep']:.2f} / {m['recall_deep']:.2f} / {m['dark_features_masked']:.2f}"
                        for m in (d["simulator"][c]["maskers"][n]["pooled"] for n in maskers)] for c in conditions]})
    if d.get("skipped"):
        tables.append({"title": "maskers not run", "columns": ["masker", "why"],
                       "rows": [[k, v] for k, v in d["skipped"].items()]})
    return tables


DERIVED = {"accuracy": _accuracy_tables, "flats": _flats_tables, "masks": _masks_tables}


def render(name: str, result: dict) -> str:
    machine = result.get("machine", {})
    out = [f"## {name}\n", f"`{result.get('command', '')}` -> `results/{name}.json`  \n",
           f"machine: {machine.get('platform', '?')}, {machine.get('cpu_count', '?')} CPUs, "
           f"{machine.get('date', '?')}\n"]
    tables = result.get("tables") or (DERIVED[name](result) if name in DERIVED else None)
    if tables:
        for t in tables:
            out.append(f"\n**{t.get('title', '')}**\n\n" + _markdown(t["columns"], t["rows"]))
    elif isinstance(result.get("summary"), dict):
        summary = result["summary"]
        if all(isinstance(v, dict) for v in summary.values()):
            keys = sorted({k for v in summary.values() for k in v})
            out.append("\n" + _markdown(["", *keys], [[n, *[v.get(k, "") for k in keys]] for n, v in summary.items()]))
        else:
            out.append("\n" + _markdown(["metric", "value"], list(summary.items())))
    return "".join(out)


def _load(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def headline() -> list[str]:
    """A few figures for the top-level README, each from a committed results file (named in the line)."""
    lines = []
    speed = _load("speed")
    for case in (speed or {}).get("cases", []):
        c, r, q = case["config"], case["results"], case["ratios"]
        e2e = r.get("e2e", {})
        run = (f"; whole `aiflat-local run` {e2e['seconds']:.0f} s, peak {e2e['peak_rss_mb']:.0f} MiB"
               if "seconds" in e2e and "skipped" not in e2e else "")
        lines.append(f"- {c['width']} x {c['height']} x {c['frames']}-frame 16-bit SER ({c['size_mib']:.0f} MiB): "
                     f"exact temporal median {q['median_speedup_vs_numpy']:.1f}x faster than a list + `np.median`, "
                     f"{100 * q['median_peak_rss_fraction_of_numpy']:.0f} % of its memory{run} "
                     f"(`results/speed.json`).")
    masks = _load("masks")
    if masks:
        for pair in masks.get("pairs", []):
            parts = [f"{n} {r['object_n_ref_found']}/{r['object_n_ref']} objects, IoU {r['pixel_iou']:.3f}"
                     for n, r in pair["maskers"].items()]
            lines.append(f"- Real case against the cloud mask ({Path(pair['reference']).name}): "
                         + "; ".join(parts) + " (`results/masks.json`; the cloud mask misses many faint shadows).")
        pooled = masks.get("simulator_all_conditions", {})
        if pooled:
            parts = [f"{n} {p['iou_deep']:.2f} / {p['iou_dust']:.2f} / {p['recall_deep']:.3f} / "
                     f"{100 * p['dark_features_masked']:.0f} %" for n, p in pooled.items()]
            lines.append(f"- Simulator truth, {len(masks['simulator'])} conditions pooled, IoU with dust deeper than "
                         "10 % / IoU with all dust / recall of dust deeper than 10 % / dark solar features masked: "
                         + "; ".join(parts) + " (`results/masks.json`; `motion` masks down to its noise, about "
                         "0.2 %, wider than the 1 % extent of the truth).")
    dustnet = _load("dustnet")
    if dustnet:
        sim = dustnet["simulator"]
        parts = [f"{n} IoU {sim[n]['pooled']['iou_deep']:.3f}, recall {sim[n]['pooled']['recall_deep']:.3f}, "
                 f"dark features {100 * sim[n]['pooled']['dark_features_masked']:.0f} %"
                 for n in ("dustnet", "dustnet+frames") if n in sim]
        lines.append("- dustnet on held-out simulator seeds: " + "; ".join(parts) + " (`results/dustnet.json`).")
    flats = _load("flats")
    if flats and "motion CG" in flats.get("summary", {}):
        m = flats["summary"]["motion CG"]
        full = (flats.get("speed") or [{}])[0]
        lines.append(f"- Flat from the video's motion: error in dust deeper than 10 % {100 * m['deep_median']:.3f} % "
                     f"(median), {100 * m['deep_p90']:.2f} % (p90); sunspots touched {m['leak']:.0%}; pixels exactly "
                     f"1.0 {m['exact_one']:.1%} (the true flat departs from 1 by > 0.3 % on "
                     f"{m['true_beyond_0p3']:.1%} of them)"
                     + (f", {full['exact_one']:.1%} at full size" if "exact_one" in full else "")
                     + " (`results/flats.json`).")
    accuracy = _load("accuracy")
    if accuracy:
        summary = accuracy["summary"]
        parts = [f"{k} {100 * v['deep_dust_residual_median']:.2f} %" for k, v in summary.items()
                 if "deep_dust_residual_median" in v]
        lines.append("- Dust left after calibration (median over deep shadows), by route/inpainter: "
                     + "; ".join(parts) + " (`results/accuracy.json`).")
    return lines


README_START, README_END = "<!-- benchmarks:start -->", "<!-- benchmarks:end -->"


def update_top_readme(path: Path = HERE.parent / "README.md") -> bool:
    """Replace the block between the markers in the top-level README with :func:`headline`."""
    try:
        text = path.read_text()
    except OSError:
        return False
    if README_START not in text or README_END not in text:
        return False
    head, rest = text.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    block = "\n".join(["", "Latest figures (regenerated by `python -m benchmarks --table`):", "", *headline(), ""])
    path.write_text(head + README_START + block + "\n" + README_END + tail)
    return True


def write_readme() -> Path:
    parts = [INTRO]
    for path in sorted(RESULTS.glob("*.json")):
        try:
            parts.append(render(path.stem, json.loads(path.read_text())))
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            parts.append(f"## {path.stem}\n\n(unreadable result file: {exc})\n")
    readme = HERE / "README.md"
    readme.write_text("\n".join(parts))
    update_top_readme()
    return readme
