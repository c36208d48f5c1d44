"""Tables as Markdown and CSV (the comparison and the scripts' tables), and comparison.html: one
self-contained file (plots embedded as base64 PNG) to send or archive."""

import base64
import csv
from collections.abc import Sequence
from html import escape
from pathlib import Path


def markdown_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(str(row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def write_csv(path: str | Path, rows: Sequence[dict], columns: Sequence[str]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 14px; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: right; }
th { background: #f3f3f3; }
td:first-child, th:first-child { text-align: left; }
img { max-width: 100%; display: block; margin: 1em 0; }
.note { color: #555; font-size: 14px; }
"""


def html_table(rows: list[dict], columns: list[str]) -> str:
    head = "".join(f"<th>{escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{escape(str(r[c]))}</td>" for c in columns) + "</tr>\n" for r in rows)
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}</tbody>\n</table>"


def embedded_png(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{escape(alt)}" src="data:image/png;base64,{data}">'


def render_html(
    *, title: str, described: str, table: str, note: str, unfair: list[str], fair_note: str, runs: str, plots: dict
) -> str:
    unfair_html = (
        "<ul>" + "".join(f"<li><code>{escape(u)}</code></li>" for u in unfair) + "</ul>"
        if unfair
        else f"<p>{escape(fair_note)}</p>"
    )
    figures = "\n".join(embedded_png(path, name) for name, path in plots.items())
    return f"""<!DOCTYPE html>
<html lang="en">
<head><meta charset="utf-8"><title>{escape(title)}</title><style>{STYLE}</style></head>
<body>
<h1>{escape(title)}</h1>
<p>{escape(described)}</p>
{table}
<p class="note">{escape(note)}</p>
<h2>Unfair comparisons</h2>
{unfair_html}
<h2>Plots</h2>
{figures}
<h2>Runs</h2>
{runs}
</body>
</html>
"""
