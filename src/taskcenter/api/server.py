"""The uvicorn configuration ``taskcenter serve`` runs the API with: a request uvicorn cannot parse is answered
with problem+json like every other error, not uvicorn's plain text."""

from __future__ import annotations

from typing import Any

import orjson
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from taskcenter.api.problems import PROBLEM_BASE, PROBLEM_MEDIA_TYPE

_MALFORMED = orjson.dumps(
    {
        "type": PROBLEM_BASE + "bad-request",
        "title": "Bad request",
        "status": 400,
        "detail": "the request is not valid HTTP/1.1 (request line, headers or chunked body)",
    }
)


class ProblemHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol (what its ``http="auto"`` picks when httptools is installed, as here).

    uvicorn has no option for the answer to a request its parser refuses — a bad request line, a malformed
    header, broken chunked encoding — and answers it in plain text before the application sees anything. So
    this overrides the one method that writes it, ``send_400_response``: not a documented hook, but the same
    name and signature since uvicorn 0.11; ``tests/test_api_server.py`` checks it is still called. It writes
    what uvicorn writes (its default headers — ``date``, ``server`` — then close), with a problem+json body.
    """

    def send_400_response(self, msg: str) -> None:
        head = [b"HTTP/1.1 400 Bad Request\r\n"]
        for name, value in self.server_state.default_headers:
            head += [name, b": ", value, b"\r\n"]
        head += [
            b"content-type: " + PROBLEM_MEDIA_TYPE.encode() + b"\r\n",
            b"content-length: " + str(len(_MALFORMED)).encode() + b"\r\n",
            b"connection: close\r\n\r\n",
        ]
        self.transport.write(b"".join(head) + _MALFORMED)
        self.transport.close()


def uvicorn_config(app: Any, *, host: str, port: int, **options: Any) -> uvicorn.Config:
    """A ``uvicorn.Config`` for the API: our logging, no access log, no lifespan, :class:`ProblemHttpProtocol`."""
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        http=ProblemHttpProtocol,
        log_config=None,
        access_log=False,
        lifespan="off",
        **options,
    )
