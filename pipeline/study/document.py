"""A report as a list of blocks, rendered to Markdown and to a standalone HTML page."""

from __future__ import annotations

import html
from dataclasses import dataclass, field

STYLE = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;line-height:1.45}"
         "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #bbb;padding:3px 8px;text-align:right}"
         "td:first-child,th:first-child{text-align:left}img{max-width:100%;border:1px solid #ddd}"
         "code{background:#f3f3f3;padding:0 3px}")


@dataclass
class Document:
    title: str
    blocks: list[tuple[str, object]] = field(default_factory=list)

    def heading(self, text: str) -> None:
        self.blocks.append(("heading", text))

    def paragraph(self, text: str) -> None:
        self.blocks.append(("paragraph", text))

    def bullets(self, items: list[str]) -> None:
        self.blocks.append(("bullets", items))

    def table(self, header: list[str], rows: list[list[str]]) -> None:
        self.blocks.append(("table", (header, rows)))

    def image(self, path: str, caption: str) -> None:
        self.blocks.append(("image", (path, caption)))

    def markdown(self) -> str:
        out = [f"# {self.title}", ""]
        for kind, value in self.blocks:
            if kind == "heading":
                out += [f"## {value}", ""]
            elif kind == "paragraph":
                out += [str(value), ""]
            elif kind == "bullets":
                out += [f"- {item}" for item in value] + [""]
            elif kind == "table":
                header, rows = value
                out += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                out += ["| " + " | ".join(row) + " |" for row in rows] + [""]
            else:
                path, caption = value
                out += [f"![{caption}]({path})", ""]
        return "\n".join(out)

    def html(self) -> str:
        e = html.escape
        out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{e(self.title)}</title>"
               f"<style>{STYLE}</style></head><body><h1>{e(self.title)}</h1>"]
        for kind, value in self.blocks:
            if kind == "heading":
                out.append(f"<h2>{e(str(value))}</h2>")
            elif kind == "paragraph":
                out.append(f"<p>{e(str(value))}</p>")
            elif kind == "bullets":
                out.append("<ul>" + "".join(f"<li>{e(item)}</li>" for item in value) + "</ul>")
            elif kind == "table":
                header, rows = value
                out.append("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>"
                           + "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in rows)
                           + "</table>")
            else:
                path, caption = value
                out.append(f"<figure><img src='{e(path)}' alt='{e(caption)}'><figcaption>{e(caption)}"
                           "</figcaption></figure>")
        return "\n".join(out) + "\n</body></html>\n"
