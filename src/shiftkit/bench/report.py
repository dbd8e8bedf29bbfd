"""Results tables and self-contained HTML reports (inline SVG charts, no plotting library).

``table_rows`` / ``learn_section_html`` / ``render_html`` / ``write_report`` serve the learn section of
``shiftkit demo`` (one training domain);
``suite_table_rows`` / ``render_suite_html`` / ``write_suite_report`` serve the ``shiftkit bench`` suites,
whose payload holds one run per training domain under ``"runs"``.

Every piece of text that reaches the HTML goes through :func:`html.escape`; files are written atomically.

Example:
    >>> rows, columns = table_rows(payload)
    >>> write_report("runs/demo", payload)   # results.json + report.html
"""

from __future__ import annotations

import html
import json
import math
import os
from pathlib import Path
from typing import Any

from shiftkit._fileio import atomic_write_text
from shiftkit._text import format_table

__all__ = [
    "CSS",
    "accuracy_chart_svg",
    "environment",
    "footer",
    "format_table",
    "html_table",
    "human_bytes",
    "human_count",
    "learn_section_html",
    "params_chart_svg",
    "render_html",
    "render_suite_html",
    "suite_table_rows",
    "table_rows",
    "write_report",
    "write_suite_report",
]

# colour-blind-safe palette (Okabe & Ito), then Paul Tol's muted scheme for suites with more rows
PALETTE: tuple[str, ...] = (
    *("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000"),
    *("#332288", "#88CCEE", "#44AA99", "#117733", "#999933", "#DDCC77", "#CC6677", "#882255"),
)


def write_suite_outputs(
    out: str | os.PathLike[str], payload: dict[str, Any], report_html: str, json_path: str | None = None
) -> None:
    """Write a suite's ``results.json`` and ``report.html`` into ``out`` (atomically), and the JSON again to
    ``json_path`` when given; print where they went and the run's total time."""
    folder = Path(out)
    text = json.dumps(payload, indent=2, default=str) + "\n"
    atomic_write_text(folder / "results.json", text)
    atomic_write_text(folder / "report.html", report_html)
    print(f"finished in {payload['timings']['total_seconds']:.0f} s; report: {folder / 'report.html'}")
    if json_path:
        atomic_write_text(json_path, text)
        print(f"wrote {json_path}")


def suite_page(title: str, intro: str, payload: dict[str, Any], body: str = "") -> str:
    """A suite's report page: the title, an introduction (plain text, escaped), ``body`` (the table and
    charts, HTML), the payload's verdict and the footer."""
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1><p>{html.escape(intro)}</p>"
        f"{body}<p>{html.escape(str(payload.get('verdict', '')))}</p>{footer(payload)}</body></html>"
    )


def human_count(n: float) -> str:
    """``22566146 -> '22.6M'``, ``74498 -> '74.5k'``."""
    for size, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= size:
            return f"{n / size:.1f}{unit}"
    return f"{n:.0f}"


def human_bytes(n: float) -> str:
    """``300544 -> '293.5 KiB'``."""
    for size, unit in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def table_rows(payload: dict[str, Any]) -> tuple[list[dict[str, str]], list[str]]:
    """The results table as formatted strings: ``(rows, columns)``.

    Columns: method, trainable params (and % of full fine-tuning), accuracy in-domain and on each other
    domain, mean cross-domain accuracy, training time, max |folded - attached| output, shift file size.
    """
    train_dom = payload["train_domain"]
    others = [d for d in payload["domains"] if d != train_dom]
    full = next((r["trainable_params"] for r in payload["methods"] if r["method"] == "full"), None)
    columns = ["method", "trainable", "% of full", f"{train_dom} (in)", *others, "cross mean", "train s"]
    columns += ["max fold diff", "file"]
    rows = []
    for r in payload["methods"]:
        pct = 100.0 * r["trainable_params"] / full if full else r["trainable_pct_of_full"]
        row = {
            "method": r["method"],
            "trainable": human_count(r["trainable_params"]),
            "% of full": f"{pct:.3g}%",
            f"{train_dom} (in)": f"{r['in_domain']:.3f}",
            "cross mean": f"{r['cross_domain_mean']:.3f}",
            "train s": f"{r['train_seconds']:.1f}",
            "max fold diff": f"{r['max_fold_diff']:.1e}",
            "file": human_bytes(r["file_bytes"]),
        }
        row.update({d: f"{r['accuracy'][d]:.3f}" for d in others})
        rows.append(row)
    return rows, columns


def _svg_text(x: float, y: float, text: str, **attrs: Any) -> str:
    extra = " ".join(f'{k.replace("_", "-")}="{html.escape(str(v))}"' for k, v in attrs.items())
    return f'<text x="{x:.1f}" y="{y:.1f}" {extra}>{html.escape(text)}</text>'


def _y_axis(lo: float, hi: float, top: float, bottom: float, left: float, right: float) -> list[str]:
    parts = []
    steps = 5
    for i in range(steps + 1):
        v = lo + (hi - lo) * i / steps
        y = bottom - (bottom - top) * i / steps
        parts.append(f'<line x1="{left}" y1="{y:.1f}" x2="{right}" y2="{y:.1f}" stroke="#ddd"/>')
        parts.append(_svg_text(left - 6, y + 4, f"{v:.2f}", text_anchor="end", font_size=11))
    return parts


def accuracy_chart_svg(payload: dict[str, Any]) -> str:
    """Grouped bars: one group per domain, one bar per method; the axis starts at chance (0.5)."""
    methods = [r["method"] for r in payload["methods"]]
    domains = list(payload["domains"])
    accs = [[r["accuracy"][d] for d in domains] for r in payload["methods"]]
    flat = [a for row in accs for a in row] or [0.5]
    lo = min(0.5, math.floor(min(flat) * 10) / 10)
    hi = 1.0
    width, left, top, bottom = 720, 56, 40, 290
    height = 340 + _LEGEND_ROW * (_legend_rows(len(methods), left, width) - 1)
    right = width - 16
    group_w = (right - left) / max(1, len(domains))
    bar_w = group_w * 0.8 / max(1, len(methods))
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="accuracy per domain and method">',
        _svg_text(
            left,
            20,
            "Test accuracy per domain (trained on " + payload["train_domain"] + ")",
            font_size=14,
            font_weight="bold",
        ),
        *_y_axis(lo, hi, top, bottom, left, right),
    ]
    for gi, dom in enumerate(domains):
        gx = left + gi * group_w + group_w * 0.1
        label = dom + (" (train)" if dom == payload["train_domain"] else "")
        parts.append(_svg_text(gx + group_w * 0.4, bottom + 18, label, text_anchor="middle", font_size=12))
        for mi, method in enumerate(methods):
            a = accs[mi][gi]
            h = (bottom - top) * (max(a, lo) - lo) / (hi - lo)
            x = gx + mi * bar_w
            parts.append(
                f'<rect x="{x:.1f}" y="{bottom - h:.1f}" width="{bar_w * 0.92:.1f}" height="{h:.1f}" '
                f'fill="{PALETTE[mi % len(PALETTE)]}"><title>{html.escape(f"{method} on {dom}: {a:.3f}")}'
                "</title></rect>"
            )
    parts += _legend(methods, left, bottom + 34)
    parts.append("</svg>")
    return "\n".join(parts)


_LEGEND_W, _LEGEND_ROW = 110, 18


def _legend_rows(n: int, x0: float, width: float) -> int:
    return max(1, math.ceil(n / max(1, int((width - x0) // _LEGEND_W))))


def _legend(methods: list[str], x0: float, y: float, width: float = 720) -> list[str]:
    per_row = max(1, int((width - x0) // _LEGEND_W))  # wraps onto more rows when the methods do not fit
    parts = []
    for mi, method in enumerate(methods):
        x = x0 + (mi % per_row) * _LEGEND_W
        yy = y + (mi // per_row) * _LEGEND_ROW
        parts.append(
            f'<rect x="{x}" y="{yy - 10}" width="12" height="12" fill="{PALETTE[mi % len(PALETTE)]}"/>'
        )
        parts.append(_svg_text(x + 16, yy, method, font_size=12))
    return parts


def params_chart_svg(payload: dict[str, Any]) -> str:
    """Trainable parameters (log scale) against accuracy: filled = in-domain, hollow = cross-domain mean."""
    rows = payload["methods"]
    width, height, left, top, bottom = 720, 340, 56, 40, 280
    right = width - 24
    counts = [max(1, r["trainable_params"]) for r in rows] or [1]
    xlo, xhi = math.floor(math.log10(min(counts))), math.ceil(math.log10(max(counts)) + 1e-9)
    xhi = max(xhi, xlo + 1)
    accs = [a for r in rows for a in (r["in_domain"], r["cross_domain_mean"])] or [0.5]
    lo, hi = min(0.5, math.floor(min(accs) * 10) / 10), 1.0

    def px(n: float) -> float:
        return left + (right - left) * (math.log10(max(1, n)) - xlo) / (xhi - xlo)

    def py(a: float) -> float:
        return bottom - (bottom - top) * (a - lo) / (hi - lo)

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="trainable parameters against accuracy">',
        _svg_text(
            left,
            20,
            "Trainable parameters vs accuracy (filled: in-domain, hollow: cross-domain mean)",
            font_size=14,
            font_weight="bold",
        ),
        *_y_axis(lo, hi, top, bottom, left, right),
    ]
    for e in range(xlo, xhi + 1):
        x = px(10**e)
        parts.append(f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{bottom}" stroke="#eee"/>')
        tick = human_count(10**e).replace(".0", "")  # "10k", not "10.0k"
        parts.append(_svg_text(x, bottom + 16, tick, text_anchor="middle", font_size=11))
    parts.append(
        _svg_text(
            (left + right) / 2,
            bottom + 34,
            "trainable parameters (log scale)",
            text_anchor="middle",
            font_size=12,
        )
    )
    for mi, r in enumerate(rows):
        colour = PALETTE[mi % len(PALETTE)]
        x = px(r["trainable_params"])
        tip = html.escape(
            f"{r['method']}: {r['trainable_params']:,} params, in-domain {r['in_domain']:.3f}, "
            f"cross-domain {r['cross_domain_mean']:.3f}"
        )
        parts.append(
            f'<circle cx="{x:.1f}" cy="{py(r["in_domain"]):.1f}" r="6" fill="{colour}"><title>{tip}'
            "</title></circle>"
        )
        parts.append(
            f'<circle cx="{x:.1f}" cy="{py(r["cross_domain_mean"]):.1f}" r="6" fill="white" '
            f'stroke="{colour}" stroke-width="2"><title>{tip}</title></circle>'
        )
        parts.append(_svg_text(x + 9, py(r["in_domain"]) - 6, r["method"], font_size=11))
    parts.append("</svg>")
    return "\n".join(parts)


CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 60em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-variant-numeric: tabular-nums; }
th, td { border-bottom: 1px solid #ddd; padding: 0.3em 0.7em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
code, pre { background: #f6f6f6; padding: 0.1em 0.3em; }
.note { color: #555; font-size: 0.9em; }
"""


def html_table(rows: list[dict[str, str]], columns: list[str]) -> str:
    esc = html.escape
    head = "".join(f"<th>{esc(c)}</th>" for c in columns)
    body = "\n".join(
        "<tr>" + "".join(f"<td>{esc(r.get(c, ''))}</td>" for c in columns) + "</tr>" for r in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>\n{body}\n</tbody></table>"


def _settings_list(methods: list[dict[str, Any]]) -> str:
    esc = html.escape
    items = "".join(
        f"<li><b>{esc(r['method'])}</b>: {esc(r.get('notes', ''))}; lr {r['lr']:g}, {r['epochs']} epoch(s), "
        f"batch {r['batch_size']}, {r['steps']} steps</li>"
        for r in methods
    )
    return f"<ul>{items}</ul>"


def footer(payload: dict[str, Any]) -> str:
    esc = html.escape
    env = payload.get("environment", {})
    t = payload.get("timings", {})
    return (
        f'<p class="note">torch {esc(str(env.get("torch", "?")))}, '
        f"shiftkit {esc(str(env.get('shiftkit', '?')))},"
        f"\n{esc(str(env.get('threads', '?')))} threads; whole run {t.get('total_seconds', 0.0):.0f} s.</p>"
    )


def _data_sentence(s: dict[str, Any], trained_on: str) -> str:
    esc = html.escape
    return (
        f"<p>Model <code>{esc(str(s['model']))}</code>;\n"
        f"VADER binary sentiment (|score| &gt; {esc(str(s['threshold']))}),\n"
        f"trained on <b>{esc(trained_on)}</b> ({esc(str(s['n_train']))} balanced sentences) and tested on\n"
        f"{esc(str(s['n_test']))} held-out sentences of each domain. Seed {esc(str(s['seed']))}.</p>"
    )


def learn_section_html(payload: dict[str, Any]) -> str:
    """The learn table with its data sentence, note, two charts and the method settings (an HTML fragment).

    Example:
        >>> fragment = learn_section_html(payload)
    """
    esc = html.escape
    s = payload["settings"]
    return f"""{_data_sentence(s, payload["train_domain"])}
{html_table(*table_rows(payload))}
<p class="note">“max fold diff”: the shift was saved, loaded onto the base and folded into its weights
(for full fine-tuning and the probe: their task vector added); the number is the largest absolute
difference of its logits from the trained model's, on {esc(str(s["fold_check"]))} test sentences.
“file”: size of the saved shift file.</p>
{accuracy_chart_svg(payload)}
{params_chart_svg(payload)}
<h3>Settings</h3>{_settings_list(payload["methods"])}"""


def render_html(payload: dict[str, Any]) -> str:
    """A learn payload's whole report as one HTML string (no external resources).

    Example:
        >>> html = render_html(payload)
    """
    esc = html.escape
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{esc(payload["title"])}</title>
<style>{CSS}</style></head><body>
<h1>{esc(payload["title"])}</h1>
{learn_section_html(payload)}
{footer(payload)}
</body></html>
"""


def suite_table_rows(run: dict[str, Any]) -> tuple[list[dict[str, str]], list[str]]:
    """One training domain's rows of a suite (``peft-vader``): the demo's columns plus memory and folding.

    Extra columns: ``peak RSS`` (the method's worker process), ``train mem`` (growth of its resident set
    while training), ``foldable`` and ``max Δ`` (folded, or for a non-foldable method re-attached, from the
    saved file, against the trained model's logits).

    Example:
        >>> rows, columns = suite_table_rows(payload["runs"][0])
        >>> print(format_table(rows, columns))
    """
    rows, columns = table_rows(run)
    columns = [c for c in columns if c != "max fold diff"]
    columns += ["peak RSS", "train mem", "foldable", "max Δ"]
    for row, r in zip(rows, run["methods"]):
        row["peak RSS"] = f"{r['peak_rss_mb']:.0f} MiB" if r.get("peak_rss_mb") is not None else "n/a"
        row["train mem"] = f"{r['train_mem_mb']:.0f} MiB" if r.get("train_mem_mb") is not None else "n/a"
        row["foldable"] = "yes" if r.get("foldable") else "no"
        row["max Δ"] = f"{r['max_fold_diff']:.1e}"
    return rows, columns


def render_suite_html(payload: dict[str, Any]) -> str:
    """A suite's report: per training domain a table, the skipped/failed methods and the two charts.

    Example:
        >>> html = render_suite_html(json.loads(Path("runs/peft-vader/results.json").read_text()))
        >>> html.count("<svg")
        2
    """
    esc = html.escape
    s = payload["settings"]
    sections = []
    for run in payload["runs"]:
        missing = [f"<li>skipped {esc(x['method'])}: {esc(x['reason'])}</li>" for x in run.get("skipped", [])]
        missing += [f"<li>FAILED {esc(x['method'])}: {esc(x['error'])}</li>" for x in run.get("failed", [])]
        charts = f"{accuracy_chart_svg(run)}\n{params_chart_svg(run)}" if run["methods"] else ""
        sections.append(
            f"<h2>Trained on {esc(run['train_domain'])}</h2>\n{_data_sentence(s, run['train_domain'])}\n"
            f"{html_table(*suite_table_rows(run))}\n<ul>{''.join(missing)}</ul>\n{charts}"
        )
    first: list[dict[str, Any]] = next((run["methods"] for run in payload["runs"] if run["methods"]), [])
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{esc(payload["title"])}</title>
<style>{CSS}</style></head><body>
<h1>{esc(payload["title"])}</h1>
{"".join(sections)}
<p class="note">“max Δ”: the shift was saved, loaded onto the base and folded into its weights (methods that
cannot be folded: re-attached; full fine-tuning and the probe: their task vector added); the number is the
largest absolute difference of its logits from the trained model's, on {esc(str(s["fold_check"]))} test
sentences. “file”: size of the saved shift file. Memory: {esc(str(payload.get("memory", "")))}.</p>
<h2>Settings</h2>{_settings_list(first)}
{footer(payload)}
</body></html>
"""


def write_suite_report(out_dir: str | os.PathLike[str], payload: dict[str, Any]) -> tuple[Path, Path]:
    """Write a suite's ``results.json`` and ``report.html`` into ``out_dir`` (each atomically).

    Example:
        >>> results, report = write_suite_report("runs/peft-vader", payload)
    """
    out = Path(out_dir)
    results, report = out / "results.json", out / "report.html"
    atomic_write_text(results, json.dumps(payload, indent=2, default=str) + "\n")
    atomic_write_text(report, render_suite_html(payload))
    return results, report


def write_report(out_dir: str | os.PathLike[str], payload: dict[str, Any]) -> tuple[Path, Path]:
    """Write ``results.json`` and ``report.html`` into ``out_dir`` (each atomically).

    Returns:
        The two paths.
    """
    out = Path(out_dir)
    results, report = out / "results.json", out / "report.html"
    atomic_write_text(results, json.dumps(payload, indent=2, default=str) + "\n")
    atomic_write_text(report, render_html(payload))
    return results, report


def environment() -> dict[str, Any]:
    """Versions and threads, for the results payload.

    Example:
        >>> environment()["threads"]
        2
    """
    import platform

    import torch

    from shiftkit._version import __version__

    return {
        "torch": torch.__version__,
        "shiftkit": __version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
    }
