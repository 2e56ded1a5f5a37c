"""What the applications' servers share: error answers and reading a JSON body with an error that says what to send."""

from __future__ import annotations

import json

from fastapi import Request
from fastapi.responses import JSONResponse


def error(status: int, detail: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


async def json_body(request: Request, example: str) -> tuple[object, JSONResponse | None]:
    """(the parsed body, None), or (None, a 4xx answer) for a wrong Content-Type or a body that is not JSON;
    `example` is the body to send, quoted in the answer."""
    ctype = (request.headers.get("content-type") or "").split(";")[0].strip().lower()
    if ctype != "application/json":
        return None, error(415, f"Content-Type {ctype or 'missing'}; send application/json {example}")
    try:
        return json.loads(await request.body()), None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        return None, error(400, f"body is not valid JSON ({err})")
    except RecursionError:
        return None, error(400, "body is JSON nested too deeply")
