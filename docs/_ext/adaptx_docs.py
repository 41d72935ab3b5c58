"""Sphinx extension for the adaptx docs.

* ``.. adaptx-api::`` writes the API reference from ``adaptx.__all__`` at build time,
  one family of the library (recipes, clipping, adaptive scaling, momentum, guards,
  composing, telemetry, switching optimizers) per page with ``:section:``; a name goes to
  the family of the module that defines it, so a name added to ``__all__`` appears without
  editing the docs, and one in no known family goes to "Other". ``adaptx.report`` (the
  stability report) is documented when it can be imported. The build warns about a name
  of ``__all__`` that no page documents. ``.. adaptx-api-overview::`` lists the families
  and their names, each family linked to its page.
* ``.. measured-table:: PATH`` copies a Markdown table out of a file of the repository
  (a results file under ``bench/measured/``, a README), so the figures on a page are
  the measured ones, character for character, and change when the file does.
  ``.. measured-text::`` quotes a paragraph of such a file (the one that says how a table
  was measured), and ``.. measured-setup:: FILE.json ...`` tabulates the ``meta`` entry
  of results files: date, commit, hardware, versions, command.
* Every Python code block outside the API reference must be one that the doctest
  builder runs (``.. doctest::``, ``.. testcode::``); anything else is a warning, which
  ``-W`` turns into an error.
* No built page loads a script, stylesheet or image from another host (MathJax is served
  from ``docs/_static/mathjax/``): the site works offline.
"""

from __future__ import annotations

import importlib
import inspect
import json
import re
import sys
from pathlib import Path
from typing import Any, NamedTuple

from docutils import nodes
from docutils.parsers.rst import directives
from sphinx import addnodes
from sphinx.application import Sphinx
from sphinx.errors import PycodeError
from sphinx.pycode import ModuleAnalyzer
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]

# ---------------------------------------------------------------------------------------
# The API reference.


class Part(NamedTuple):
    """A group of names under its own heading: those defined in modules under ``prefixes``."""

    title: str
    intro: str
    prefixes: tuple[str, ...]


class Family(NamedTuple):
    """A part of the library, one page of the API reference (``:section:`` selects it by
    ``title``). Its names are those of its own ``prefixes``, or of its ``parts``, each with
    a heading of its own."""

    title: str
    intro: str
    prefixes: tuple[str, ...] = ()
    parts: tuple[Part, ...] = ()


#: The parts of the library, in the order of the API reference. A name goes to the family
#: (or part) with the longest prefix of the module that defines it (so
#: ``adaptx._clipping.zclip`` is an adaptive threshold, any other ``adaptx._clipping``
#: module a fixed one); a name that no prefix matches goes to "Other".
FAMILIES: list[Family] = [
    Family(
        "Recipes",
        "Whole optimizers, built from the parts on the other pages. Start here: "
        ":func:`adaptx.robust_adamw` is AdamW with every defense that acts only when "
        "something is wrong, :func:`adaptx.adamw` and :func:`adaptx.sgd` are optax's "
        "numbers with global-norm clipping.",
        ("adaptx._recipes",),
    ),
    Family(
        "Clipping",
        "Bound the gradient before it reaches the optimizer.",
        parts=(
            Part("Fixed thresholds", "Clipping by a number you choose.", ("adaptx._clipping",)),
            Part(
                "Adaptive thresholds",
                "Clipping whose threshold follows the run's own recent norms.",
                (
                    "adaptx._clipping.spike_clip",
                    "adaptx._clipping.zclip",
                    "adaptx._clipping.autoclip",
                    "adaptx._clipping.adagc",
                ),
            ),
        ),
    ),
    Family(
        "Adaptive scaling",
        "Adam-, RMS- and Adagrad-style scaling, with SPAM and StableAdamW's update "
        "clipping as options.",
        ("adaptx._scaling",),
    ),
    Family("Momentum", "Momentum and moving averages.", ("adaptx._momentum",)),
    Family("Guards", "Skip, undo or rescale a bad step.", ("adaptx._guards", "adaptx._nnx")),
    Family(
        "Composing",
        "Chain transforms into one program that honours a guard's skip and folds a global "
        "clip into the Adam-family step after it.",
        ("adaptx._chain", "adaptx._clipping.scalar_clip"),
    ),
    Family(
        "Telemetry",
        "What the transforms measured, read out of any optimizer state, and what it says "
        "about the run.",
        ("adaptx._telemetry", "adaptx._monitor", "adaptx._check", "adaptx._writer"),
    ),
    Family(
        "Switching optimizers",
        "Carry a run's moments and step counts over to another optimizer.",
        ("adaptx._adopt",),
    ),
]
OTHER = Family("Other", "Public names in no section above.")
#: ``adaptx.report``, the stability report: a module of its own, not in ``adaptx.__all__``.
REPORT = Family(
    "Stability report",
    "``python -m adaptx.report RUN`` and the functions behind it: a report of the events "
    "of a run from its ``metrics.jsonl`` (numpy and matplotlib, no JAX).",
)
SECTION_NAMES = [f.title for f in [*FAMILIES, REPORT, OTHER]]

#: The order of the README's tables; names not listed follow, alphabetically.
ORDER = [
    "clip_by_global_norm",
    "clip_by_value",
    "clip_by_block_rms",
    "adaptive_grad_clip",
    "clip_spikes",
    "zclip",
    "autoclip",
    "adagc",
    "scale_by_adam",
    "scale_by_rms",
    "scale_by_adagrad",
    "momentum",
    "ema",
    "guard",
    "rewind",
    "dynamic_loss_scale",
    "loss_scale",
    "adamw",
    "sgd",
    "stable_adamw",
    "spam",
    "robust_adamw",
    "telemetry",
    "check",
]

REPORT_MODULE = "adaptx.report"
REPORT_NAMES = ("summarize", "read_metrics", "plot")


def _ranker(order: list[str]):
    def rank(name: str) -> tuple[int, str]:
        return (order.index(name), "") if name in order else (len(order), name)

    return rank


def _entries(names: list[str], objs: dict[str, Any], order: list[str] = ORDER) -> list[str]:
    """autodoc directives for ``names``: each function (in ``order``, then alphabetically)
    followed by the classes defined in its module, then any class left over."""
    funcs = sorted((n for n in names if not inspect.isclass(objs[n])), key=_ranker(order))
    classes = sorted(n for n in names if inspect.isclass(objs[n]))
    out: list[str] = []
    done: set[str] = set()

    def emit(name: str) -> None:
        obj = objs[name]
        if inspect.isclass(obj):
            out.extend([f".. autoclass:: {name}", "   :members:", ""])
        elif inspect.ismodule(obj):
            out.extend([f".. automodule:: {obj.__name__}", ""])
        elif inspect.isroutine(obj):
            out.extend([f".. autofunction:: {name}", ""])
        else:
            out.extend(_data(name, obj))
        done.add(name)

    for f in funcs:
        emit(f)
        module = getattr(objs[f], "__module__", None)
        for c in classes:
            if c not in done and getattr(objs[c], "__module__", None) == module:
                emit(c)
    for c in classes:
        if c not in done:
            emit(c)
    return out


def _data(name: str, obj: Any) -> list[str]:
    """A constant. Its ``#:`` comment lives in the module that defines it, not in the one
    that re-exports it (where autodoc would fall back on the docstring of its type, e.g.
    ``dict``'s), so it is documented under the defining module."""
    for modname in sorted(m for m in sys.modules if m == "adaptx" or m.startswith("adaptx.")):
        module = sys.modules[modname]
        if module is None or vars(module).get(name) is not obj:
            continue
        try:
            documented = ("", name) in ModuleAnalyzer.for_module(modname).find_attr_docs()
        except PycodeError:
            documented = False
        if documented:
            return [f".. autodata:: {modname}.{name}", ""]
    value = repr(obj)
    value = value if len(value) <= 80 else value[:77] + "..."
    return [f".. py:data:: {name}", f"   :value: {value}", ""]


def _summary(names: list[str], objs: dict[str, Any], order: list[str] = ORDER) -> list[str]:
    funcs = sorted((n for n in names if not inspect.isclass(objs[n])), key=_ranker(order))
    classes = sorted(n for n in names if inspect.isclass(objs[n]))
    # Functions and classes; a constant's one-line summary would be its type's docstring.
    listed = [n for n in funcs + classes if inspect.isclass(objs[n]) or inspect.isroutine(objs[n])]
    if not listed:
        return []
    return [".. autosummary::", "   :nosignatures:", ""] + [f"   {n}" for n in listed] + [""]


def _module_of(obj: Any) -> str:
    if inspect.ismodule(obj):
        return obj.__name__
    return getattr(obj, "__module__", None) or ""


def _section_of(module: str) -> str:
    """The title of the family or part whose prefix of ``module`` is longest; "Other" if
    none."""
    best, length = OTHER.title, -1
    for family in FAMILIES:
        for title, prefixes in [(family.title, family.prefixes)] + [
            (p.title, p.prefixes) for p in family.parts
        ]:
            for p in prefixes:
                if (module == p or module.startswith(p + ".")) and len(p) > length:
                    best, length = title, len(p)
    return best


def _public() -> tuple[dict[str, Any], Any]:
    """``adaptx.__all__``'s objects, and ``adaptx.report`` (None if it cannot be imported)."""
    import adaptx

    objs: dict[str, Any] = {}
    missing: list[str] = []
    for name in adaptx.__all__:
        try:
            objs[name] = getattr(adaptx, name)
        except AttributeError:
            missing.append(name)
    if missing:
        logger.warning(
            "adaptx.__all__ names %s, which adaptx does not define",
            ", ".join(missing),
            type="adaptx",
            subtype="api",
        )
    try:
        report = importlib.import_module(REPORT_MODULE)
    except ImportError:
        report = None
    return objs, report


def _heading(title: str, underline: str | None) -> list[str]:
    return [title, underline * len(title), ""] if underline else []


def _family_lines(
    family: Family,
    members: dict[str, list[str]],
    objs: dict[str, Any],
    underline: str | None,
    part_underline: str,
) -> list[str]:
    """One family: its title (none if ``underline`` is None: the page has it), its intro,
    then its names, or each part with names under a heading of its own."""
    lines = [*_heading(family.title, underline), family.intro, ""]
    names = members.get(family.title, [])
    lines.extend(_summary(names, objs))
    lines.extend(_entries(names, objs))
    for part in family.parts:
        names = members.get(part.title, [])
        if names:
            lines.extend([*_heading(part.title, part_underline), part.intro, ""])
            lines.extend(_summary(names, objs))
            lines.extend(_entries(names, objs))
    return lines


def _report_lines(report: Any, underline: str | None) -> tuple[list[str], dict[str, Any]]:
    """The stability report: its module docstring (what counts as an event), then the three
    functions a user calls, then the rest of what it exports."""
    report_objs: dict[str, Any] = {}
    if report is not None:
        exported = [n for n in getattr(report, "__all__", ()) if n not in REPORT_NAMES]
        for n in [*REPORT_NAMES, *exported]:
            if hasattr(report, n):
                report_objs[n] = getattr(report, n)
    if not report_objs:
        return [], {}
    lines = [*_heading(REPORT.title, underline), REPORT.intro, ""]
    lines.extend([f".. automodule:: {REPORT_MODULE}", ""])
    order = list(report_objs)
    lines.extend(_summary(order, report_objs, order))
    lines.extend(_entries(order, report_objs, order))
    lines.extend([".. currentmodule:: adaptx", ""])
    return lines, report_objs


def api_lines(section: str | None = None) -> tuple[list[str], list[str], list[str]]:
    """The reST of the API reference, or of one of its sections (a family, the stability
    report, or "Other"), without the section's title, which the page gives; the source
    files it depends on; and the names of ``adaptx.__all__`` it documents."""
    import adaptx

    objs, report = _public()
    members: dict[str, list[str]] = {}
    for name, obj in objs.items():
        if report is not None and obj is report:
            continue  # documented with the stability report
        members.setdefault(_section_of(_module_of(obj)), []).append(name)

    lines = [".. currentmodule:: adaptx", ""]
    documented: list[str] = []
    report_objs: dict[str, Any] = {}
    for family in [*FAMILIES, REPORT, OTHER]:
        if section is not None and family.title != section:
            continue
        underline, part_underline = ("-", "~") if section is None else (None, "-")
        if family is REPORT:
            more, report_objs = _report_lines(report, underline)
            lines.extend(more)
            continue
        titles = [family.title, *(p.title for p in family.parts)]
        names = [n for t in titles for n in members.get(t, [])]
        if names or section is not None:
            lines.extend(_family_lines(family, members, objs, underline, part_underline))
        documented.extend(names)

    deps = {adaptx.__file__}
    for obj in [*objs.values(), *report_objs.values()]:
        try:
            source = inspect.getsourcefile(obj)
        except TypeError:
            source = None
        if source:
            deps.add(source)
    return lines, sorted(deps), documented


def _section(argument: str) -> str:
    """``:section:``'s value: the title of a family, "Stability report" or "Other"."""
    for title in SECTION_NAMES:
        if argument.strip().lower() == title.lower():
            return title
    raise ValueError(f"{argument!r} is none of {', '.join(map(repr, SECTION_NAMES))}")


def _slug(title: str) -> str:
    return "adaptx-api-" + re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")


class AdaptxApi(SphinxDirective):
    """``.. adaptx-api::``: the API reference generated from ``adaptx.__all__``.

    ``:section: Clipping`` writes one family (its intro and its names, without its title,
    which the page gives) and a label ``adaptx-api-clipping`` to link it by; without the
    option, every family under a heading of its own. Every name of ``adaptx.__all__`` must
    be on some page: the build warns about a name that no ``adaptx-api`` documents, and
    about a section written on two pages.
    """

    has_content = False
    option_spec = {"section": _section}

    def run(self) -> list[nodes.Node]:
        section = self.options.get("section")
        lines, deps, documented = api_lines(section)
        for dep in deps:
            self.env.note_dependency(dep)
        docs = getattr(self.env, "adaptx_api_docs", set())
        docs.add(self.env.docname)
        self.env.adaptx_api_docs = docs
        sections = getattr(self.env, "adaptx_api_sections", {})
        sections.setdefault(self.env.docname, []).append(section or "")
        self.env.adaptx_api_sections = sections
        names = getattr(self.env, "adaptx_api_names", {})
        names.setdefault(self.env.docname, set()).update(documented)
        self.env.adaptx_api_names = names
        if section is not None:
            lines = [f".. _{_slug(section)}:", "", *lines]
        self.state_machine.insert_input(lines, self.get_source_info()[0])
        return []


class AdaptxApiOverview(SphinxDirective):
    """``.. adaptx-api-overview::``: one line per family, its title linked to its page
    (the label that ``adaptx-api`` with ``:section:`` writes) and its names, from
    ``adaptx.__all__`` as the pages have them."""

    has_content = False

    def run(self) -> list[nodes.Node]:
        objs, report = _public()
        members: dict[str, list[str]] = {}
        for name, obj in objs.items():
            if report is None or obj is not report:
                members.setdefault(_section_of(_module_of(obj)), []).append(name)
        lines = [".. currentmodule:: adaptx", ""]
        for family in [*FAMILIES, OTHER]:
            titles = [family.title, *(p.title for p in family.parts)]
            names = [n for t in titles for n in members.get(t, [])]
            if not names:
                continue
            # Functions, and the classes that are not a transform's state (listed with it).
            funcs = sorted((n for n in names if not inspect.isclass(objs[n])), key=_ranker(ORDER))
            classes = sorted(
                n for n in names if inspect.isclass(objs[n]) and not hasattr(objs[n], "_fields")
            )
            refs = ", ".join(f":obj:`{n}`" for n in [*funcs, *classes])
            lines.extend([f"* :ref:`{family.title} <{_slug(family.title)}>`: {refs}", ""])
        if report is not None:
            lines.extend(
                [
                    f"* :ref:`{REPORT.title} <{_slug(REPORT.title)}>`: "
                    + ", ".join(f":func:`{REPORT_MODULE}.{n}`" for n in REPORT_NAMES),
                    "",
                ]
            )
        self.state_machine.insert_input(lines, self.get_source_info()[0])
        return []


def _api_outdated(app, env, added, changed, removed) -> list[str]:
    # Names may have been added to adaptx.__all__ (or adaptx.report may have appeared)
    # without any file the page depends on changing: read the page again every build.
    return sorted(d for d in getattr(env, "adaptx_api_docs", set()) if d in env.found_docs)


def _api_purge(app, env, docname) -> None:
    getattr(env, "adaptx_api_docs", set()).discard(docname)
    getattr(env, "adaptx_api_sections", {}).pop(docname, None)
    getattr(env, "adaptx_api_names", {}).pop(docname, None)


def _api_merge(app, env, docnames, other) -> None:
    docs = getattr(env, "adaptx_api_docs", set())
    docs |= getattr(other, "adaptx_api_docs", set()) & set(docnames)
    env.adaptx_api_docs = docs
    for attr in ("adaptx_api_sections", "adaptx_api_names"):
        mine = getattr(env, attr, {})
        for docname, value in getattr(other, attr, {}).items():
            if docname in docnames:
                mine[docname] = value
        setattr(env, attr, mine)


def _api_coverage(app, env) -> None:
    """Every name of ``adaptx.__all__`` is on some page, and no section is on two."""
    import adaptx

    names: dict[str, set[str]] = getattr(env, "adaptx_api_names", {})
    if not names:
        return  # no API page in this project (or in this partial build)
    documented = set().union(*names.values())
    missing = sorted(set(adaptx.__all__) - documented)
    if missing:
        sections = sorted({_section_of(_module_of(getattr(adaptx, n))) for n in missing})
        logger.warning(
            "no page documents %s (adaptx.__all__): add '.. adaptx-api::' with ':section: %s' "
            "to a page under docs/api/",
            ", ".join(missing),
            " / ".join(s for s in sections),
            type="adaptx",
            subtype="api",
        )
    where: dict[str, list[str]] = {}
    for docname, sections in getattr(env, "adaptx_api_sections", {}).items():
        for section in sections:
            where.setdefault(section or "(all)", []).append(docname)
    for section, docnames in sorted(where.items()):
        if len(docnames) > 1:
            logger.warning(
                "the API section %r is written on %d pages: %s",
                section,
                len(docnames),
                ", ".join(sorted(docnames)),
                type="adaptx",
                subtype="api",
            )


def _skip_member(app, what, name, obj, skip, options):
    """A NamedTuple state lists its fields in its docstring's "Attributes:" section; autodoc
    would list them a second time, as the tuple's field accessors ("Alias for field ...")."""
    if what == "class" and type(obj).__name__ == "_tuplegetter":
        return True
    return None


# ---------------------------------------------------------------------------------------
# Measured tables, copied out of Markdown files.

_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_INLINE = re.compile(
    r"(?P<bold>\*\*(?P<bold_text>.+?)\*\*)"
    r"|(?P<code>(?P<ticks>`+)(?P<code_text>.+?)(?P=ticks))"
    r"|(?P<link>\[(?P<link_text>[^\]]+)\]\((?P<link_url>[^)\s]+)\))"
    r"|(?P<em>(?<![\w*])\*(?P<em_text>[^*\s][^*]*?)\*(?![\w*]))"
)
_ESCAPE = re.compile(r"\\([\\`*_{}\[\]()#+\-.!|<>~])")


def _unescape(text: str) -> str:
    return _ESCAPE.sub(r"\1", text)


def inline(text: str) -> list[nodes.Node]:
    """Docutils nodes for one Markdown table cell: bold, code, emphasis and links."""
    out: list[nodes.Node] = []
    pos = 0
    for m in _INLINE.finditer(text):
        if m.start() > pos:
            out.append(nodes.Text(_unescape(text[pos : m.start()])))
        if m.group("bold"):
            out.append(nodes.strong("", "", *inline(m.group("bold_text"))))
        elif m.group("code"):
            code = m.group("code_text")
            if code.startswith(" ") and code.endswith(" ") and code.strip():
                code = code[1:-1]
            out.append(nodes.literal(code, code))
        elif m.group("link"):
            # Links point at files of the repository, not at pages of these docs.
            out.extend(inline(m.group("link_text")))
        else:
            out.append(nodes.emphasis("", "", *inline(m.group("em_text"))))
        pos = m.end()
    if pos < len(text):
        out.append(nodes.Text(_unescape(text[pos:])))
    return out


def split_row(line: str) -> list[str]:
    """The cells of one Markdown table row; ``\\|`` is a literal bar, not a separator."""
    line = line.strip()
    if line.startswith("|"):
        line = line[1:]
    if line.endswith("|") and not line.endswith("\\|"):
        line = line[:-1]
    cells, cur, i = [], [], 0
    while i < len(line):
        ch = line[i]
        if ch == "\\" and i + 1 < len(line):
            cur.append(line[i : i + 2])
            i += 2
            continue
        if ch == "|":
            cells.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
        i += 1
    cells.append("".join(cur).strip())
    return cells


def find_table(
    text: str, heading: str | None, after: str | None, index: int
) -> tuple[list[str], list[list[str]], int]:
    """Header, rows and line number (1-based) of a table in a Markdown text.

    ``heading``: the table is in the section whose heading starts with this text (up to
    the next heading of the same or a higher level). ``after``: the first table after a
    line containing this text. ``index``: the n-th such table (1-based).
    """
    lines = text.splitlines()
    start, end = 0, len(lines)
    if heading is not None:
        found = None
        for i, line in enumerate(lines):
            m = _HEADING.match(line)
            if m and m.group(2).startswith(heading):
                found = (i, len(m.group(1)))
                break
        if found is None:
            raise ValueError(f"no heading starting with {heading!r}")
        start = found[0] + 1
        for j in range(start, len(lines)):
            m = _HEADING.match(lines[j])
            if m and len(m.group(1)) <= found[1]:
                end = j
                break
    if after is not None:
        for i in range(start, end):
            if after in lines[i]:
                start = i + 1
                break
        else:
            raise ValueError(f"no line containing {after!r}")
    tables: list[tuple[int, list[str]]] = []
    i = start
    while i < end:
        if lines[i].lstrip().startswith("|"):
            j = i
            while j < end and lines[j].lstrip().startswith("|"):
                j += 1
            tables.append((i, lines[i:j]))
            i = j
        else:
            i += 1
    if len(tables) < index:
        raise ValueError(f"{len(tables)} table(s) found where table {index} was asked for")
    lineno, block = tables[index - 1]
    if len(block) < 2 or not re.fullmatch(r"[\s|:\-]+", block[1]):
        raise ValueError(f"line {lineno + 2}: not a Markdown table (no | --- | line)")
    header = split_row(block[0])
    rows = [split_row(r) for r in block[2:]]
    for k, row in enumerate(rows):
        if len(row) != len(header):
            raise ValueError(
                f"line {lineno + 3 + k}: {len(row)} cells in a table of {len(header)} columns"
            )
    return header, rows, lineno + 1


def _columns(spec: str, n: int) -> list[int]:
    out: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        if "-" in part:
            a, b = part.split("-")
            out.extend(range(int(a), int(b) + 1))
        elif part:
            out.append(int(part))
    for c in out:
        if not 1 <= c <= n:
            raise ValueError(f"column {c} asked for in a table of {n} columns")
    return [c - 1 for c in out]


class MeasuredTable(SphinxDirective):
    """``.. measured-table:: bench/measured/stability.md`` (a path from the repository root).

    Options: ``:heading:`` (the section, by the start of its heading), ``:after:`` (the
    first table after a line containing this text), ``:index:`` (the n-th table, default 1),
    ``:columns:`` (1-based, e.g. ``1,2,9-12``; default all), ``:rows:`` (keep only rows
    whose first cell contains one of these ``;``-separated texts).
    """

    required_arguments = 1
    has_content = False
    option_spec = {
        "heading": directives.unchanged,
        "after": directives.unchanged,
        "index": directives.positive_int,
        "columns": directives.unchanged,
        "rows": directives.unchanged,
    }

    def run(self) -> list[nodes.Node]:
        rel = self.arguments[0]
        path = ROOT / rel
        self.env.note_dependency(str(path))
        try:
            text = path.read_text(encoding="utf-8")
            header, rows, _ = find_table(
                text,
                self.options.get("heading"),
                self.options.get("after"),
                self.options.get("index", 1),
            )
            cols = (
                _columns(self.options["columns"], len(header))
                if "columns" in self.options
                else list(range(len(header)))
            )
            if "rows" in self.options:
                wanted = [w.strip() for w in self.options["rows"].split(";") if w.strip()]
                kept = [r for r in rows if any(w in r[0] for w in wanted)]
                for w in wanted:
                    if not any(w in r[0] for r in rows):
                        raise ValueError(f"no row whose first cell contains {w!r}")
                rows = kept
        except (OSError, ValueError) as e:
            logger.warning(
                "measured-table %s: %s",
                rel,
                e,
                location=self.get_location(),
                type="adaptx",
                subtype="table",
            )
            return []

        table = nodes.table(classes=["measured"])
        title = nodes.title("", "From ", nodes.literal(rel, rel))
        if "heading" in self.options:
            title += nodes.Text(f", “{self.options['heading']}”")
        table += title
        tgroup = nodes.tgroup(cols=len(cols))
        table += tgroup
        for _ in cols:
            tgroup += nodes.colspec(colwidth=1)

        def row_node(cells: list[str]) -> nodes.row:
            row = nodes.row()
            for c in cols:
                entry = nodes.entry()
                entry += nodes.paragraph("", "", *inline(cells[c]))
                row += entry
            return row

        thead = nodes.thead()
        thead += row_node(header)
        tgroup += thead
        tbody = nodes.tbody()
        for r in rows:
            tbody += row_node(r)
        tgroup += tbody
        return [table]


def _section_lines(text: str, heading: str | None) -> tuple[list[str], int]:
    """The lines of the section whose heading starts with ``heading`` (all lines if None)
    and the index of its first line. Lines in fenced code blocks are never headings."""
    lines = text.splitlines()
    if heading is None:
        return lines, 0
    fenced, found, level = False, None, 0
    for i, line in enumerate(lines):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        m = None if fenced else _HEADING.match(line)
        if m is None:
            continue
        if found is None and m.group(2).startswith(heading):
            found, level = i + 1, len(m.group(1))
        elif found is not None and len(m.group(1)) <= level:
            return lines[found:i], found
    if found is None:
        raise ValueError(f"no heading starting with {heading!r}")
    return lines[found:], found


def find_paragraph(
    text: str, heading: str | None, starts_with: str, end_before: str | None = None
) -> str:
    """The Markdown paragraph (up to the next blank line) that starts with ``starts_with``,
    in the section under ``heading``, joined into one line; with ``end_before``, only what
    comes before that text in it."""
    lines, _ = _section_lines(text, heading)
    for i, line in enumerate(lines):
        if line.startswith(starts_with):
            j = i
            while j < len(lines) and lines[j].strip():
                j += 1
            paragraph = " ".join(x.strip() for x in lines[i:j])
            if end_before is not None:
                if end_before not in paragraph:
                    raise ValueError(f"{end_before!r} is not in the paragraph")
                paragraph = paragraph[: paragraph.index(end_before)].rstrip()
            return paragraph
    raise ValueError(f"no paragraph starting with {starts_with!r}")


class MeasuredText(SphinxDirective):
    """``.. measured-text:: examples/text_classifier/README.md``: quotes a paragraph of a
    Markdown file, such as the one that says on what machine and with which versions a
    table was measured, so that the page says what the file says.

    Options: ``:heading:`` (the section, by the start of its heading), ``:starts-with:``
    (the paragraph that starts with this text; required) and ``:end-before:`` (quote the
    paragraph only up to this text).
    """

    required_arguments = 1
    has_content = False
    option_spec = {
        "heading": directives.unchanged,
        "starts-with": directives.unchanged_required,
        "end-before": directives.unchanged_required,
    }

    def run(self) -> list[nodes.Node]:
        rel = self.arguments[0]
        path = ROOT / rel
        self.env.note_dependency(str(path))
        try:
            if "starts-with" not in self.options:
                raise ValueError("the :starts-with: option is required")
            paragraph = find_paragraph(
                path.read_text(encoding="utf-8"),
                self.options.get("heading"),
                self.options["starts-with"],
                self.options.get("end-before"),
            )
        except (OSError, ValueError) as e:
            logger.warning(
                "measured-text %s: %s",
                rel,
                e,
                location=self.get_location(),
                type="adaptx",
                subtype="text",
            )
            return []
        quote = nodes.block_quote(classes=["measured-text"])
        quote += nodes.paragraph("", "", *inline(paragraph))
        source = nodes.attribution("", "", nodes.literal(rel, rel))
        if "heading" in self.options:
            source += nodes.Text(f", “{self.options['heading']}”")
        quote += source
        return [quote]


def _meta_fields(meta: dict[str, Any]) -> dict[str, str]:
    """What a results file's ``meta`` says about how it was measured, in words; a fact it
    does not record is "not recorded"."""
    none = "not recorded"
    date = str(meta.get("date", "")) or none
    if date != none:
        date = date.replace("T", " ")[:16] + " UTC"
    git = meta.get("git") or {}
    commit = git.get("commit") or meta.get("commit") or none
    if git.get("adaptx_local_changes"):
        commit += ", with uncommitted changes"
    device = meta.get("device")
    if isinstance(device, dict):
        cores = device.get("cpu_count")
        parts = [
            str(device.get("cpu_model") or device.get("device_kind") or ""),
            f"{cores} cores" if cores else "",
            f"JAX {device.get('platform')} backend" if device.get("platform") else "",
            f"{device.get('jax_device_count')} device(s)" if device.get("jax_device_count") else "",
        ]
        hardware = ", ".join(p for p in parts if p) or none
    else:
        parts = [str(device or ""), str(meta.get("machine") or "")]
        hardware = ", ".join(p for p in parts if p) or none
    versions = dict(meta.get("versions") or {})
    for key in ("python", "jax", "jaxlib", "optax", "numpy", "adaptx", "torch"):
        if key in meta and isinstance(meta[key], str):
            versions.setdefault(key, meta[key])
    version_text = ", ".join(f"{k} {v}" for k, v in versions.items() if v) or none
    script = meta.get("script")
    command = (
        " ".join(["python", str(script), *map(str, meta.get("argv") or [])]) if script else none
    )
    return {
        "measured": date,
        "commit": commit,
        "hardware": hardware,
        "versions": version_text,
        "command": command,
    }


class MeasuredSetup(SphinxDirective):
    """``.. measured-setup:: bench/measured/recipes.json bench/measured/many_small.json``:
    how each results file was measured (date, commit, hardware, versions, command), read
    from its ``meta`` entry: what all the files record alike as a field list, then one
    item per file with the rest."""

    required_arguments = 1
    optional_arguments = 50
    has_content = False

    def run(self) -> list[nodes.Node]:
        rows: list[tuple[str, dict[str, str]]] = []
        for rel in self.arguments:
            path = ROOT / rel
            self.env.note_dependency(str(path))
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
                meta = data.get("meta") if isinstance(data, dict) else None
                if not isinstance(meta, dict):
                    raise ValueError("no 'meta' entry")
            except (OSError, ValueError) as e:
                logger.warning(
                    "measured-setup %s: %s",
                    rel,
                    e,
                    location=self.get_location(),
                    type="adaptx",
                    subtype="setup",
                )
                continue
            rows.append((rel, _meta_fields(meta)))
        if not rows:
            return []

        def cell(key: str, value: str) -> nodes.Node:
            literal = key in ("file", "command") and value != "not recorded"
            return nodes.literal(value, value) if literal else nodes.Text(value)

        # What every file records alike (the machine, most versions) is said once, as a
        # field list; then one item per file with the rest (date, commit, command, and
        # any version that not every file has).
        records = [{"file": rel, **fields} for rel, fields in rows]
        version_lists = [r["versions"].split(", ") for r in records]
        common_versions = [v for v in version_lists[0] if all(v in vs for vs in version_lists)]
        for record, versions in zip(records, version_lists, strict=True):
            rest = [v for v in versions if v not in common_versions]
            record["versions"] = ", ".join(rest) if rest else ""
        keys = [k for k in records[0] if k != "file"]
        same = [k for k in keys if len({r[k] for r in records}) == 1 and k != "versions"]
        shared = {k: records[0][k] for k in same}
        if common_versions:
            shared["versions"] = ", ".join(common_versions)
        if len(records) == 1:
            shared = {"file": rows[0][0], **rows[0][1]}
        out: list[nodes.Node] = []
        fields_node = nodes.field_list(classes=["measured-setup"])
        for key, value in shared.items():
            field = nodes.field()
            name = f"{key} (every file)" if len(records) > 1 else key
            field += nodes.field_name(name, name)
            body = nodes.field_body()
            body += nodes.paragraph("", "", cell(key, value))
            field += body
            fields_node += field
        out.append(fields_node)
        if len(records) == 1:
            return out

        items = nodes.bullet_list(classes=["measured-setup"])
        for record in records:
            para = nodes.paragraph("", "", cell("file", record["file"]), nodes.Text(": "))
            parts = [k for k in keys if k not in same and record[k]]
            for i, key in enumerate(parts):
                if i:
                    para += nodes.Text("; ")
                para += nodes.Text("with " if key == "versions" else f"{key} ")
                para += cell(key, record[key])
            items += nodes.list_item("", para)
        out.append(items)
        return out


# ---------------------------------------------------------------------------------------
# Every Python example outside the API reference is executed.

#: Languages of blocks that are not Python and so need not run (commands, output).
NOT_PYTHON = {"bash", "console", "shell", "sh", "text", "none", "json", "toml", "ini", "rst"}


def _check_code_is_tested(app: Sphinx, doctree: nodes.document) -> None:
    if app.env.docname in getattr(app.env, "adaptx_api_docs", set()):
        return  # docstrings: their examples run under pytest (--doctest-modules)

    def in_api(node: nodes.Node) -> bool:
        parent = node.parent
        while parent is not None:
            if isinstance(parent, addnodes.desc):
                return True
            parent = parent.parent
        return False

    for node in doctree.findall(nodes.doctest_block):
        if not in_api(node):
            logger.warning(
                "a plain '>>>' block is not run by the doctest builder; write it as '.. doctest::'",
                location=node,
                type="adaptx",
                subtype="untested",
            )
    for node in doctree.findall(nodes.literal_block):
        if node.get("testnodetype") or in_api(node):
            continue
        language = node.get("language", "default")
        if language not in NOT_PYTHON:
            logger.warning(
                "a %r code block is not run by the doctest builder; write it as "
                "'.. testcode::' or '.. doctest::' (or mark a command 'bash')",
                language,
                location=node,
                type="adaptx",
                subtype="untested",
            )


# ---------------------------------------------------------------------------------------
# The site works offline: no page loads anything from another host.

_REMOTE = re.compile(
    r"<(?:script|img|iframe|source)\b[^>]*\bsrc=\"(?:https?:)?//[^\"]*\""
    r"|<link\b[^>]*\bhref=\"(?:https?:)?//[^\"]*\"[^>]*>",
    re.IGNORECASE,
)


def _check_offline(app: Sphinx, exception: Exception | None) -> None:
    """A script, stylesheet, image or frame that a page loads from another host (a CDN) is
    a warning: the pages must work with no network, as the build does."""
    if exception is not None or app.builder.format != "html":
        return
    for page in sorted(Path(app.outdir).rglob("*.html")):
        for m in _REMOTE.finditer(page.read_text(encoding="utf-8")):
            tag = m.group(0)
            loaded = re.search(r"rel=\"(stylesheet|preload|icon)", tag)
            if tag[:5].lower() == "<link" and not loaded:
                continue  # a link to another site, not something the page loads
            logger.warning(
                "%s loads %s from another host; serve it from docs/_static",
                page.relative_to(app.outdir),
                tag[:120],
                type="adaptx",
                subtype="offline",
            )


def setup(app: Sphinx) -> dict[str, Any]:
    app.add_directive("adaptx-api", AdaptxApi)
    app.add_directive("adaptx-api-overview", AdaptxApiOverview)
    app.add_directive("measured-table", MeasuredTable)
    app.add_directive("measured-text", MeasuredText)
    app.add_directive("measured-setup", MeasuredSetup)
    app.connect("env-get-outdated", _api_outdated)
    app.connect("env-purge-doc", _api_purge)
    app.connect("env-merge-info", _api_merge)
    app.connect("env-check-consistency", _api_coverage)
    app.connect("autodoc-skip-member", _skip_member)
    app.connect("doctree-read", _check_code_is_tested)
    app.connect("build-finished", _check_offline)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
