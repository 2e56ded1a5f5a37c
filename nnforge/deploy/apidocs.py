"""/docs: the API reference as one self-contained page built from the app's OpenAPI schema.

FastAPI's Swagger UI loads its scripts from a CDN, so it is blank on a server without internet access; this page
needs nothing but itself, like report.html.
"""

from __future__ import annotations

from nnforge.evaluation._html import esc, page


def _operation_row(path: str, method: str, op: dict) -> str:
    params = [f"{p['name']} ({p.get('in', '?')}{', required' if p.get('required') else ''})"
              for p in op.get("parameters", [])]
    bodies = list((op.get("requestBody") or {}).get("content", {}))
    responses = "<br>".join(f"<b>{esc(code)}</b> {esc(r.get('description', ''))}"
                            for code, r in op.get("responses", {}).items())
    cells = [f"<code>{esc(method.upper())}&nbsp;{esc(path)}</code>", esc(op.get("summary", "")),
             esc(", ".join(params)) or "-", esc(", ".join(bodies)) or "-", responses]
    return "<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>"


def api_reference_html(schema: dict) -> str:
    info = schema.get("info", {})
    rows = [_operation_row(path, method, op) for path, ops in schema.get("paths", {}).items()
            for method, op in ops.items()]
    body = (f"<p>{esc(info.get('description', ''))}</p>"
            "<p>The machine-readable schema is <a href=\"/openapi.json\">/openapi.json</a>.</p>"
            "<table><tr><th>endpoint</th><th>what it does</th><th>parameters</th><th>request body</th>"
            "<th>responses</th></tr>" + "".join(rows) + "</table>")
    return page(f"{info.get('title', 'nnforge')} API {info.get('version', '')}".strip(), body)
