"""The output: one console line per cell, the Markdown tables, the JSON and MD files.

>>> format_line({"pipeline": "adamw", "impl": "torch", "status": "error", "reason": "x"})
'adamw         torch        error: x'
>>> _mb(None), _mb(3 * 2**20), _mb(30 * 2**20)
('', '3.00', '30')
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from bench.update.config import passes
from bench.update.targets import evaluate_targets

LEGEND = (
    ". **step ms**: median [min-max]. **x optax**, "
    "**x C**: median [min-max] of the per-round paired ratios. **compile s**: trace + "
    "lowering + XLA compile. **HLO passes**: bytes the compiled kernels read and write, in "
    "float32 passes over the tree (the math needs the number after the slash). **GB/s**: "
    "bytes the math needs / median time; **% ceil**: median per-round ratio to a donated "
    "in-place x*a+b over the same number of floats, run in the same rounds. **peak MB**: "
    "XLA static peak (arguments + outputs - donated + temporaries) / sampled RSS delta."
)
TABLE_HEAD = [
    "| pipeline | impl | step ms | x optax | x C | compile s | first call s "
    "| fusions | HLO passes | GB/s | % ceil | peak MB |",
    "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
]


def format_line(c: dict) -> str:
    head = f"{c['pipeline']:<13} {c['impl']:<12}"
    if c["status"] != "ok":
        return f"{head} {c['status']}: {c['reason']}"
    s = (
        f"{head} {c['median_ms']:9.3f} ms [{c['min_ms']:.3f}-{c['max_ms']:.3f}]"
        f" {c['gbps']:6.1f} GB/s ({100 * c['ceiling_ratio']:.0f}% ceil)"
    )
    if "vs_optax" in c:
        s += f"  x{c['vs_optax']['median']:.2f} optax"
    if "compile_s" in c:
        s += f"  compile {c['compile_s']:.2f}s, {c['fusions']} fusions"
    return s


def _ratio(c: dict, key: str) -> str:
    r = c.get(key)
    return "" if r is None else f"{r['median']:.2f} [{r['min']:.2f}-{r['max']:.2f}]"


def _mb(x):
    if x is None:
        return ""
    return f"{x / 2**20:.0f}" if abs(x) >= 10 * 2**20 else f"{x / 2**20:.2f}"


def _header(m: dict) -> list[str]:
    d = m["device"]
    return [
        f"Device: {d.get('cpu_model', d['device_kind'])} ({d['platform']}, "
        f"{d['cpu_count']} cores); "
        + ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v)
        + f"; {m['date']}; load average "
        f"{m.get('loadavg_start')} at start, {m.get('loadavg_end')} at end.",
        "",
        f"{m['reps']} timed interleaved rounds after {m['warmup']} warm-up rounds"
        + (" (--quick)" if m["quick"] else "")
        + LEGEND,
    ]


def _row(c: dict) -> str:
    if c["status"] != "ok":
        return f"| {c['pipeline']} | {c['impl']} | {c['status']}: {c['reason']} | | | | | | | | | |"
    comp = f"{c['compile_s']:.2f}" if "compile_s" in c else ""
    need = passes(c["pipeline"])
    hp = f"{c['hlo_passes']:.1f} / {need}" if "hlo_passes" in c else f"- / {need}"
    return (
        f"| {c['pipeline']} | {c['impl']} | {c['median_ms']:.2f} "
        f"[{c['min_ms']:.2f}-{c['max_ms']:.2f}] | {_ratio(c, 'vs_optax')} | "
        f"{_ratio(c, 'vs_c')} | {comp} | {c['first_call_s']:.2f} | "
        f"{c.get('fusions', '')} | {hp} | {c['gbps']:.1f} | "
        f"{100 * c['ceiling_ratio']:.0f} | {_mb(c.get('xla_peak_bytes'))} / "
        f"{_mb(c.get('rss_peak_delta_bytes'))} |"
    )


def _tree_section(results: dict, tree: str, cells: list[dict]) -> list[str]:
    t = results["trees"][tree]
    ceil = results["ceilings"].get(tree, {})
    cj = ceil.get("jax", {}).get("gbps")
    cc = ceil.get("c", {}).get("gbps")
    return [
        "",
        f"### {tree}: {t['leaves']} leaves, {t['params']:,} params",
        "",
        f"Ceiling measured before the cells: {cj:.1f} GB/s (JAX)"
        + (f", {cc:.1f} GB/s (C)" if cc else "")
        + ".",
        "",
        *TABLE_HEAD,
        *(_row(c) for c in cells),
    ]


def _targets_section(targets: list[dict]) -> list[str]:
    lines = ["", "### Targets", "", "| target | measured | met |", "| --- | --- | --- |"]
    for t in targets:
        met = {True: "yes", False: "**no**", None: "n/a"}[t["met"]]
        # (memory targets allow MEMORY_SLACK bytes: adaptx's scalar telemetry state)
        lines.append(f"| {t['target']} | {t['measured']} | {met} |")
    return lines


def markdown(results: dict) -> str:
    lines = _header(results["meta"])
    cells_by_tree: dict[str, list] = {}
    for c in results["cells"]:
        cells_by_tree.setdefault(c["tree"], []).append(c)
    for tree, cells in cells_by_tree.items():
        lines += _tree_section(results, tree, cells)
    if results.get("targets"):
        lines += _targets_section(results["targets"])
    return "\n".join(lines) + "\n"


def _json_default(x):
    if isinstance(x, np.generic):
        return x.item()
    return str(x)


def dump_json(results: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1, default=_json_default))


def write(results: dict, out: Path) -> str:
    """Checks the targets into ``results``; writes ``out``.json and .md; the Markdown."""
    results["targets"] = evaluate_targets(results)
    dump_json(results, out.with_suffix(".json"))
    md = markdown(results)
    out.with_suffix(".md").write_text(md)
    return md
