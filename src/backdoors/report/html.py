"""HTML building blocks for the report: one self-contained page, images as data URIs.

Every text given to these helpers is escaped; `code` spans in notes (`like this`) become
<code>. Nothing refers to anything outside the page.
"""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Iterable, Sequence

CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #222;
       max-width: 1100px; margin: 2em auto; padding: 0 1em; }
h1 { margin-bottom: .2em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: .2em;
     margin-top: 2em; } h3 { margin-bottom: .3em; }
.meta { color: #555; } nav a { margin-right: 1em; }
table { border-collapse: collapse; margin: .6em 0 1em; font-size: 13px; }
th, td { border: 1px solid #ddd; padding: .25em .5em; text-align: left; vertical-align: top; }
th { background: #f4f4f4; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.ok { color: #1a7f37; font-weight: 600; } .bad { color: #c62828; font-weight: 600; }
.note { background: #fff8e1; border-left: 4px solid #f0b400; padding: .5em .8em; margin: .6em 0; }
.error { background: #fdecea; border-left: 4px solid #c62828; }
figure { margin: 1em 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #555; font-size: 13px; }
code { background: #f2f2f2; padding: 0 .25em; border-radius: 3px; }
ul.checks { margin: 0; padding-left: 1.2em; }
"""


class Html(str):
    """Markup that is already safe (not escaped again)."""


def esc(value: object) -> Html:
    return value if isinstance(value, Html) else Html(html.escape(str(value), quote=True))


def inline(text: str) -> Html:
    """Escaped text with `code` spans."""
    parts = re.split(r"`([^`]+)`", text)
    return Html("".join(f"<code>{esc(p)}</code>" if i % 2 else esc(p)
                        for i, p in enumerate(parts)))


def note(text: str, *, error: bool = False) -> Html:
    return Html(f'<p class="note{" error" if error else ""}">{inline(text)}</p>')


def para(text: str, cls: str | None = None) -> Html:
    return Html(f"<p{f' class={cls!r}' if cls else ''}>{inline(text)}</p>")


def status(ok: bool | None, yes: str = "passed", no: str = "FAILED") -> Html:
    if ok is None:
        return Html("-")
    return Html(f'<span class="{"ok" if ok else "bad"}">{esc(yes if ok else no)}</span>')


def figure(png: bytes, alt: str, caption: str | None = None) -> Html:
    data = base64.b64encode(png).decode("ascii")
    cap = f"<figcaption>{inline(caption)}</figcaption>" if caption else ""
    return Html(f'<figure><img alt="{esc(alt)}" src="data:image/png;base64,{data}">{cap}</figure>')


def table(headers: Sequence[str], rows: Iterable[Sequence[object]],
          numeric: Sequence[int] = ()) -> Html:
    """A table; cells are escaped unless Html; columns in `numeric` align right."""
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = []
    for row in rows:
        cells = "".join(f'<td{" class=num" if i in numeric else ""}>{esc(c)}</td>'
                        for i, c in enumerate(row))
        body.append(f"<tr>{cells}</tr>")
    return Html(f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>")


def section(anchor: str, title: str, parts: Iterable[str]) -> Html:
    return Html(f'<section id="{esc(anchor)}"><h2>{esc(title)}</h2>{"".join(parts)}</section>')


def page(title: str, parts: Iterable[str]) -> str:
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{esc(title)}</title><style>{CSS}</style></head><body>"
            f"{''.join(parts)}</body></html>\n")
