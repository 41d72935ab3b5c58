"""Where the bytes go: the kernels of one compiled optimizer step and the memory each touches.

Compiles one (tree, pipeline, impl) step from ``update_step.py`` and lists every kernel
(fusion or unfused op) of XLA's optimized HLO with the bytes of its operands and outputs,
in units of *passes* (one pass = one float32 read or write of the whole tree). Summed,
that is the traffic the compiled program moves if each operand is read once; compare it
with the minimum the math requires (``update_step.PASSES``) to see which intermediates
XLA materialises.

    python bench/hlo_report.py --tree single16 --pipeline robust_adamw --impl adaptx
    python bench/hlo_report.py --pipeline clip+adamw --impl optax --size 1048576

>>> rows = kernel_rows(
...     "ENTRY %main (a: f32[8]) -> f32[8] {\\n"
...     "  %a = f32[8]{0} parameter(0)\\n"
...     "  ROOT %f = f32[8]{0} fusion(%a), kind=kLoop, calls=%c\\n}\\n")
>>> [(r["name"], r["in_bytes"], r["out_bytes"]) for r in rows]
[('f', 32, 32)]
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
_SIZES = {
    "f32": 4,
    "s32": 4,
    "u32": 4,
    "f16": 2,
    "bf16": 2,
    "f64": 8,
    "s64": 8,
    "u64": 8,
    "pred": 1,
    "s8": 1,
    "u8": 1,
    "s16": 2,
    "u16": 2,
}
_ARRAY = re.compile(r"\b(pred|[fsu]\d+|bf16)\[([\d,]*)\]")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(.*?)\s+([\w\-]+)\((.*?)\)(.*)$")


def _bytes(type_text: str) -> int:
    total = 0
    for dt, dims in _ARRAY.findall(type_text):
        n = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
        total += n * _SIZES.get(dt, 4)
    return total


def _computations(hlo: str) -> dict[str, str]:
    """Fused computation name -> its body text."""
    out = {}
    for m in re.finditer(r"^%([\w.\-]+) \(.*?\{\n(.*?)\n\}", hlo, re.S | re.M):
        out[m.group(1)] = m.group(2)
    return out


def kernel_rows(hlo: str) -> list[dict]:
    """One row per ENTRY instruction that runs as a kernel, with its operand/output bytes.

    An operand is counted in full, except in a kernel that slices (``slice``,
    ``dynamic-slice``): there an operand larger than the kernel's output is counted as
    the output's size, since only a slice of it is read.
    """
    bodies = _computations(hlo)
    start = hlo.find("ENTRY")
    body = hlo[start:]
    body = body[: body.find("\n}") + 1] if "\n}" in body else body
    shapes: dict[str, str] = {}
    rows = []
    free = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast"}
    for line in body.splitlines()[1:]:
        m = _INSTR.match(line)
        if not m:
            continue
        name, out_type, op, operands, rest = m.groups()
        shapes[name] = out_type
        if op in free:
            continue
        names = re.findall(r"%([\w.\-]+)", operands)
        calls = re.search(r"calls=%([\w.\-]+)", rest)
        body = bodies.get(calls.group(1), "") if calls else ""
        slicing = op in ("slice", "dynamic-slice") or " slice(" in body or "dynamic-slice(" in body
        out_bytes = _bytes(out_type)
        in_bytes = sum(
            min(_bytes(shapes.get(n, "")), out_bytes) if slicing else _bytes(shapes.get(n, ""))
            for n in names
        )
        rows.append(
            {
                "name": name,
                "op": op,
                "kind": (re.search(r"kind=(\w+)", rest) or [""])[0],
                "calls": calls.group(1) if calls else "",
                "out_type": out_type,
                "in_bytes": in_bytes,
                "out_bytes": out_bytes,
                "operands": len(names),
            }
        )
    return rows


def _load_update_step():
    spec = importlib.util.spec_from_file_location(
        "adaptx_bench_update_step_hlo", HERE / "update_step.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def report(tree: str, pipeline: str, impl: str, size: int | None = None, show: int = 40):
    import jax

    us = _load_update_step()
    shapes = {"w": (size,)} if size else us.tree_shapes(tree, quick=False)
    leaves = jax.tree.leaves(shapes, is_leaf=us._is_shape)
    n = sum(math.prod(s) for s in leaves)
    desc, factory = us.jax_variants(pipeline, len(leaves), [impl])[impl]
    np_p = us.make_numpy_tree(shapes, 0, 0.02)
    v = us.JaxVariant(impl, desc, factory, np_p, jax.tree.map(jax.numpy.asarray, np_p))
    with us.quiet():
        hlo = v.fn.lower(*v.spec).compile().as_text()
    rows = kernel_rows(hlo)
    unit = 4 * n
    print(f"{pipeline} / {impl} ({desc}) on {len(leaves)} leaves, {n:,} params")
    print(f"{len(rows)} kernels, {sum(r['op'] == 'fusion' for r in rows)} fusions")
    big = [r for r in rows if r["in_bytes"] + r["out_bytes"] >= unit // 4]
    print(f"kernels touching >= 1/4 pass ({len(big)}), in passes of {unit / 2**20:.0f} MiB:")
    for r in big[:show]:
        print(
            f"  {r['name']:<32} {r['op']:<10} in {r['in_bytes'] / unit:5.2f}  out "
            f"{r['out_bytes'] / unit:5.2f}  {r['out_type'][:60]}"
        )
    tin = sum(r["in_bytes"] for r in rows) / unit
    tout = sum(r["out_bytes"] for r in rows) / unit
    need = us.PASSES.get(pipeline, us.PASSES["clip+adamw"])
    print(
        f"total: reads {tin:.2f} + writes {tout:.2f} = {tin + tout:.2f} passes "
        f"(the math needs {need})"
    )
    return {
        "kernels": len(rows),
        "passes_read": tin,
        "passes_written": tout,
        "rows": rows,
        "hlo": hlo,
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tree", default="single16")
    p.add_argument("--size", type=int, default=None, help="one leaf of this size instead")
    p.add_argument("--pipeline", default="clip+adamw")
    p.add_argument("--impl", default="adaptx")
    p.add_argument("--show", type=int, default=40)
    p.add_argument("--dump", default=None, help="write the optimized HLO text here")
    a = p.parse_args(argv)
    r = report(a.tree, a.pipeline, a.impl, a.size, a.show)
    if a.dump:
        Path(a.dump).write_text(r["hlo"])


if __name__ == "__main__":
    main()
