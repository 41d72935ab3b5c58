"""What XLA compiled: kernels, the bytes they move, its static memory and cost analysis.

>>> count_fusions("HloModule m\\n\\nENTRY %main (a: f32[2]) -> f32[2] {\\n"
...               "  %a = f32[2]{0} parameter(0)\\n"
...               "  ROOT %f = f32[2]{0} fusion(%a), kind=kLoop\\n}\\n")
{'fusions': 1, 'entry_ops': 1}
"""

from __future__ import annotations

from bench.hlo_report import kernel_rows


def count_fusions(hlo: str) -> dict[str, int]:
    """Kernel-level counts in the ENTRY computation of optimized HLO text."""
    start = hlo.find("\nENTRY")
    entry = hlo[start:] if start >= 0 else hlo
    end = entry.find("\n}")
    entry = entry[:end] if end >= 0 else entry
    instrs = [ln.split(" = ", 1)[1] for ln in entry.splitlines()[1:] if " = " in ln]
    skip = (" parameter(", " constant(", " tuple(", " get-tuple-element(", " bitcast(")
    ops = [i for i in instrs if not any(k in " " + i.split("{", 1)[-1] for k in skip)]
    return {"fusions": sum(" fusion(" in i for i in instrs), "entry_ops": len(ops)}


def hlo_traffic(hlo: str, unit: int) -> dict:
    """The kernels' reads and writes summed, in passes of ``unit`` bytes, and their count."""
    rows = kernel_rows(hlo)
    return {
        "hlo_passes": sum(r["in_bytes"] + r["out_bytes"] for r in rows) / unit,
        "hlo_kernels": len(rows),
    }


def xla_memory(compiled) -> dict:
    """XLA's static memory analysis: temporaries, and arguments + outputs - aliases + temps."""
    try:
        ma = compiled.memory_analysis()
        return {
            "xla_temp_bytes": int(ma.temp_size_in_bytes),
            "xla_peak_bytes": int(
                ma.argument_size_in_bytes
                + ma.output_size_in_bytes
                - ma.alias_size_in_bytes
                + ma.temp_size_in_bytes
            ),
        }
    except Exception:  # noqa: BLE001 - not every backend implements it
        return {}


def xla_cost(compiled) -> dict:
    """The bytes XLA's cost analysis says the program accesses."""
    try:
        ca = compiled.cost_analysis()
        ca = ca[0] if isinstance(ca, list | tuple) else ca
        return {"xla_bytes_accessed": float(ca["bytes accessed"])}
    except Exception:  # noqa: BLE001
        return {}


def program_info(compiled, unit: int) -> dict:
    """Everything above for one compiled step; ``unit``: bytes of one pass over the tree."""
    hlo = compiled.as_text()
    info = count_fusions(hlo)
    info.update(hlo_traffic(hlo, unit))
    info.update(xla_memory(compiled))
    info.update(xla_cost(compiled))
    return info
