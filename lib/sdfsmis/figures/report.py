"""``report.html``: an evaluation on one page, to open from the output folder or a file share:
the table, then every figure, embedded by relative link (the folder moves as a whole). Only files
that exist are linked."""

from __future__ import annotations

import html
import os
from pathlib import Path
from urllib.parse import quote

import markdown

REPORT_NAME = "report.html"
STYLE = (
    "body{font-family:sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse}"
    "td,th{border:1px solid #ccc;padding:.2em .6em}img{max-width:100%;border:1px solid #ccc}"
    "figure{margin:1em 0}figcaption{font-size:.9em;color:#555}"
)


def _link(output: Path, path: Path) -> str:
    return quote(Path(os.path.relpath(path, output)).as_posix())


def write_html_report(
    output: Path, title: str, table: str, sections: list[tuple[str, list[Path]]], files: list[Path]
) -> Path:
    """``output/report.html`` with ``table`` (markdown), each section's figures (heading, PNGs)
    and links to ``files`` (results.json, ...); missing files and empty sections are left out."""
    parts = [
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
        f"<style>{STYLE}</style></head><body><h1>Evaluation report</h1>",  # the table's own heading follows
        markdown.markdown(table, extensions=["tables"]),
    ]
    for heading, figures in sections:
        figures = [f for f in figures if f.is_file()]
        if not figures:
            continue
        parts.append(f"<h2>{html.escape(heading)}</h2>")
        for figure in figures:
            link, name = _link(output, figure), html.escape(figure.name, quote=True)
            parts.append(
                f"<figure><a href='{link}'><img src='{link}' alt='{name}' loading='lazy'></a>"
                f"<figcaption>{html.escape(os.path.relpath(figure, output))}</figcaption></figure>"
            )
    present = [f for f in files if f.is_file()]
    if present:
        links = " · ".join(f"<a href='{_link(output, f)}'>{html.escape(f.name)}</a>" for f in present)
        parts.append(f"<h2>Data</h2><p>{links}</p>")
    parts.append("</body></html>\n")
    path = output / REPORT_NAME
    path.write_text("\n".join(parts))
    return path
