"""The report's blocks as Markdown and as one self-contained HTML page, and the table-cell formatting both use.

A block is a tuple: ``("h1" | "h2" | "h3", text)``, ``("p", text)``, ``("pre", text)``,
``("table", header, rows)`` or ``("img", png_path, caption)``. :func:`render` turns one list of them
into both documents (PNGs inlined as base64 in the HTML), so the two always say the same.
"""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

from audiomoe.core.atomic import write_text

CSS = """body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1300px;margin:2em auto;padding:0 1em;color:#222;line-height:1.45}
table{border-collapse:collapse;margin:.8em 0;font-size:12.5px}th,td{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f2f2f2}tr:nth-child(even) td{background:#fafafa}img{max-width:100%;border:1px solid #eee;margin:.4em 0}
figcaption{font-size:12px;color:#555;margin-bottom:1.2em}code,pre{background:#f6f6f6;padding:2px 4px;font-size:12px}pre{padding:8px;overflow-x:auto}
.holds{color:#1a7f37;font-weight:bold}.does-not-hold{color:#b42318;font-weight:bold}.not-resolved{color:#9a6700;font-weight:bold}.not-measured{color:#666;font-weight:bold}.scroll{overflow-x:auto}"""


def fmt(v: Any, digits: int = 3) -> str:
    """A table cell: floats to ``digits`` decimals (large ones with thousands separators), None/NaN as ``–``."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.{digits}f}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return str(v)


def ci_text(a: Mapping[str, Any], key: str, digits: int = 3) -> str:
    """``mean ± std [lo, hi]`` of aggregate row ``a`` for ``key`` (``mean`` alone with one seed)."""
    m, s, lo, hi = (a.get(f"{key}/{x}") for x in ("mean", "std", "ci_low", "ci_high"))
    if m is None or not math.isfinite(m):
        return "–"
    if s is None or not math.isfinite(s):
        return fmt(m, digits)
    if s == 0 and (a.get(f"{key}/n") or 0) >= 2:  # the same at every seed: a zero-width interval would claim certainty
        return f"{m:.{digits}f} (every seed)"
    return f"{m:.{digits}f} ± {s:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def render(blocks: Sequence[tuple], root: Path, title: str) -> tuple[str, str]:
    """``(markdown, html)`` of ``blocks``; image paths are relative to ``root``."""
    md, body = [], []
    for b in blocks:
        kind = b[0]
        if kind in ("h1", "h2", "h3"):
            md.append("#" * int(kind[1]) + " " + b[1])
            body.append(f"<{kind}>{html.escape(b[1])}</{kind}>")
        elif kind == "p":
            md.append(b[1])
            body.append(f"<p>{_inline(b[1])}</p>")
        elif kind == "pre":
            md.append("```\n" + b[1] + "\n```")
            body.append(f"<pre>{html.escape(b[1])}</pre>")
        elif kind == "table":
            header, rows = b[1], b[2]
            cell = lambda x: str(x).replace("|", "\\|").replace("\n", " ")
            md.append(
                "\n".join(
                    ["| " + " | ".join(map(cell, header)) + " |", "|" + "---|" * len(header)]
                    + ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows]
                )
            )
            th = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
            trs = "".join("<tr>" + "".join(_td(c) for c in r) + "</tr>" for r in rows)
            body.append(f'<div class="scroll"><table><thead><tr>{th}</tr></thead><tbody>{trs}</tbody></table></div>')
        elif kind == "img":
            path, caption = Path(b[1]), b[2]
            rel = path.relative_to(root).as_posix()
            md.append(f"![{caption}]({rel})\n\n*{caption}*")
            data = base64.b64encode(path.read_bytes()).decode("ascii")
            body.append(
                f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}"><figcaption>{html.escape(caption)}</figcaption></figure>'
            )
    page = (
        f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{CSS}</style></head><body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )
    return "\n\n".join(md) + "\n", page


def _inline(text: str) -> str:
    out, code = [], False
    for part in text.split("`"):
        out.append(f"<code>{html.escape(part)}</code>" if code else html.escape(part).replace("**", ""))
        code = not code
    return "".join(out)


def _td(c: Any) -> str:
    s = str(c)
    cls = {
        "holds": "holds",
        "does not hold": "does-not-hold",
        "not resolved": "not-resolved",
        "not measured": "not-measured",
    }.get(s)
    return f'<td class="{cls}">{html.escape(s)}</td>' if cls else f"<td>{_inline(s)}</td>"


def write(root: Path, blocks: Sequence[tuple], title: str, stem: str = "report") -> tuple[Path, Path]:
    """Write ``root/<stem>.md`` and ``root/<stem>.html``."""
    md, page = render(blocks, root, title)
    write_text(root / f"{stem}.md", md, what="report")
    write_text(root / f"{stem}.html", page, what="report")
    return root / f"{stem}.md", root / f"{stem}.html"
