"""A body-size-limited front for a real registry: the 413 of ACR and of proxies.

Registries in the wild are often reached through something that caps request
bodies, and a multi-GB layer sent as one `PUT` draws `413 Request Entity Too
Large`:

- nginx's `client_max_body_size` (default 1m) answers 413 as soon as the
  declared Content-Length is above the limit, then keeps reading and
  discarding the body for a while ("lingering close") so the client sees the
  answer (https://nginx.org/en/docs/http/ngx_http_core_module.html#client_max_body_size,
  #lingering_time). The registry's own nginx recipe sets it to 0 for this
  reason (https://docs.docker.com/registry/recipes/nginx/#setting-things-up);
- Harbor users replicating to Azure Container Registry report 413 on large
  layers (https://github.com/goharbor/harbor/issues/21640), as do users of
  registries behind Cloudflare (https://github.com/cloudflare/serverless-registry/issues/67)
  and Azure Application Gateway
  (https://github.com/Azure/application-gateway-kubernetes-ingress/issues/968);
- the way through is the OCI distribution spec's chunked upload: `PATCH`es
  with `Content-Range`, each under the limit, then `PUT ?digest=`
  (https://github.com/opencontainers/distribution-spec/blob/main/spec.md#pushing-a-blob-in-chunks).

`AcrFront` is a FaultProxy (so it can also cut a PATCH mid-body,
`cut_request(n, method="PATCH")`, or fail one) that answers 413 with nginx's
HTML body to any request whose body is above `max_body` bytes, the way nginx
does: at once for a declared Content-Length, after draining the body; a
chunked (streamed) body is refused once it passes the limit. Everything
else reaches the real registry. `refused` lists the sizes it turned away.

The lingering read matters: a front that closes right after its 413 with the
body still arriving makes the kernel reset the connection, and the client
sees a reset (httpx ReadError) instead of the 413, so nothing can learn the
limit from it (measured here without `_linger`); such sites need
`limits.chunk_size`.
"""

from __future__ import annotations

import asyncio
import time

from tests.harness.fault_proxy import (
    Fault,
    FaultProxy,
    Record,
    _body,
    _request_framing,
)

_HTML_413 = (
    b"<html>\r\n<head><title>413 Request Entity Too Large</title></head>\r\n"
    b"<body>\r\n<center><h1>413 Request Entity Too Large</h1></center>\r\n"
    b"<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n"
)
LINGERING_TIME = 30.0  # nginx's default: how long a refused body is still read and dropped


class AcrFront(FaultProxy):
    def __init__(
        self, upstream_host: str, upstream_port: int, max_body: int, port: int | None = None
    ) -> None:
        super().__init__(upstream_host, upstream_port, port)
        self.max_body = max_body
        self.refused: list[int] = []  # body sizes answered with 413 (declared or seen)

    async def _exchange(
        self,
        head: bytes,
        rec: Record,
        fault: Fault | None,
        creader: asyncio.StreamReader,
        cwriter: asyncio.StreamWriter,
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None,
    ) -> bool:
        kind, length = _request_framing(head)
        if kind == "length" and length > self.max_body:
            await self._refuse(rec, length, cwriter)
            await self._linger(creader, (kind, length), rec)
            return False
        if kind == "chunked":
            # Read up to the limit to decide, then pass the body on, re-framed as one chunk.
            data = bytearray()
            async for piece in _body(creader, (kind, 0)):
                data += piece
                if len(data) > self.max_body:
                    await self._refuse(rec, len(data), cwriter)
                    return False  # and close, as nginx does with a streamed body
            replay = asyncio.StreamReader()
            replay.feed_data((b"%x\r\n%s\r\n" % (len(data), data) if data else b"") + b"0\r\n\r\n")
            replay.feed_eof()
            if upstream is None:
                upstream = await asyncio.open_connection(*self.upstream)
            return await super()._exchange(head, rec, fault, replay, cwriter, upstream)
        return await super()._exchange(head, rec, fault, creader, cwriter, upstream)

    async def _refuse(self, rec: Record, size: int, cwriter: asyncio.StreamWriter) -> None:
        with self._lock:
            self.refused.append(size)
        rec.status = 413
        rec.fault = "body_limit"
        lines = [
            "HTTP/1.1 413 Request Entity Too Large",
            "Content-Type: text/html",
            f"Content-Length: {len(_HTML_413)}",
            "Connection: close",
        ]
        cwriter.write(("\r\n".join(lines) + "\r\n\r\n").encode() + _HTML_413)
        await cwriter.drain()

    @staticmethod
    async def _linger(creader: asyncio.StreamReader, framing: tuple[str, int], rec: Record) -> None:
        """Read and drop the refused body (for at most LINGERING_TIME), so the client
        finishes sending and reads the 413 instead of a reset connection."""
        deadline = time.monotonic() + LINGERING_TIME
        try:
            async for piece in _body(creader, framing):
                rec.request_bytes += len(piece)
                if time.monotonic() > deadline:
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
