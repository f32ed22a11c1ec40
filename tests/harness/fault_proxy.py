"""An HTTP/1.1-aware TCP proxy in front of a real registry, with switchable faults.

Only for faults a real registry cannot produce on demand: 429 with
Retry-After, 5xx, connections cut mid-body (request or response), a flipped
byte, a slow answer. It parses just enough HTTP (request/status line,
Content-Length, chunked) to act per request; everything else is forwarded
byte for byte. Runs its own event loop in a thread, so sync and async tests
can flip faults at run time. Every request is recorded (method, path, status,
body bytes in each direction) so tests count what really reached the wire.
"""

from __future__ import annotations

import asyncio
import re
import threading
from dataclasses import dataclass, field

from tests.harness.util import free_port


@dataclass
class Fault:
    kind: str  # respond | respond_after | cut_request | cut_response | flip | delay
    remaining: int
    method: str | None = None
    path: re.Pattern[str] | None = None
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    after_bytes: int = 0
    forward: bool = False  # cut_request: pass the partial body on to the registry
    position: int = 0  # flip: body offset of the byte to flip
    seconds: float = 0.0  # delay
    skip: int = 0  # let this many matching requests through first

    def matches(self, method: str, path: str) -> bool:
        return (
            self.remaining > 0
            and (self.method is None or self.method == method)
            and (self.path is None or bool(self.path.search(path)))
        )


@dataclass
class Record:
    method: str
    path: str
    status: int | None = None
    request_bytes: int = 0  # request body bytes received from the client
    response_bytes: int = 0  # response body bytes sent to the client
    fault: str | None = None


class _Cut(Exception):
    """Close both connections now."""


class FaultProxy:
    def __init__(self, upstream_host: str, upstream_port: int, port: int | None = None):
        self.upstream = (upstream_host, upstream_port)
        self.port = port or free_port()
        self._faults: list[Fault] = []
        self._records: list[Record] = []
        self._lock = threading.Lock()
        self._inflight = 0
        self.max_inflight = 0
        self.connections = 0  # client connections accepted so far
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    # --- lifecycle ------------------------------------------------------------------
    def start(self) -> FaultProxy:
        loop = asyncio.new_event_loop()
        ready = threading.Event()
        errors: list[BaseException] = []

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                self._server = loop.run_until_complete(
                    asyncio.start_server(self._on_client, "127.0.0.1", self.port)
                )
            except BaseException as exc:  # report bind errors to start()
                errors.append(exc)
                ready.set()
                return
            ready.set()
            loop.run_forever()

        self._loop = loop
        self._thread = threading.Thread(target=run, name="fault-proxy", daemon=True)
        self._thread.start()
        ready.wait(10)
        if errors:
            raise errors[0]
        return self

    def stop(self) -> None:
        loop = self._loop
        if not loop or not self._thread:
            return

        async def shutdown() -> None:
            if self._server:
                self._server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(shutdown(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        self._thread.join(10)
        loop.close()
        self._loop = self._thread = None

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- faults (callable from any thread) ------------------------------------------
    def _add(self, fault: Fault) -> Fault:
        with self._lock:
            self._faults.append(fault)
        return fault

    @staticmethod
    def _rx(path: str | None) -> re.Pattern[str] | None:
        return re.compile(path) if path else None

    def respond(
        self,
        status: int,
        count: int = 1,
        *,
        headers: dict[str, str] | None = None,
        body: bytes = b"",
        method: str | None = None,
        path: str | None = None,
        skip: int = 0,
    ) -> Fault:
        """Answer the next `count` matching requests with `status` instead of the registry."""
        return self._add(
            Fault(
                "respond",
                count,
                method,
                self._rx(path),
                status=status,
                headers=headers or {},
                body=body,
                skip=skip,
            )
        )

    def respond_after(
        self,
        status: int,
        count: int = 1,
        *,
        method: str | None = None,
        path: str | None = None,
        skip: int = 0,
    ) -> Fault:
        """Let the registry carry out the next `count` matching requests, then answer the
        client with `status` instead of the registry's answer (a 500 after the work was
        done, as distribution 2.8 answers a manifest DELETE whose tag lookup failed)."""
        return self._add(
            Fault("respond_after", count, method, self._rx(path), status=status, skip=skip)
        )

    def too_many_requests(
        self,
        retry_after: str | float | None,
        count: int = 1,
        *,
        method: str | None = None,
        path: str | None = None,
        skip: int = 0,
    ) -> Fault:
        headers = {"Retry-After": str(retry_after)} if retry_after is not None else {}
        body = b'{"errors":[{"code":"TOOMANYREQUESTS","message":"slow down"}]}'
        return self.respond(
            429,
            count,
            headers={**headers, "Content-Type": "application/json"},
            body=body,
            method=method,
            path=path,
            skip=skip,
        )

    def cut_request(
        self,
        after_bytes: int,
        count: int = 1,
        *,
        forward: bool = False,
        method: str | None = None,
        path: str | None = None,
        skip: int = 0,
    ) -> Fault:
        """Drop the connection after `after_bytes` of a request body. With `forward`, the
        registry sees the head and the partial body; without, it sees nothing."""
        return self._add(
            Fault(
                "cut_request",
                count,
                method,
                self._rx(path),
                after_bytes=after_bytes,
                forward=forward,
                skip=skip,
            )
        )

    def cut_response(
        self,
        after_bytes: int,
        count: int = 1,
        *,
        method: str | None = None,
        path: str | None = None,
        skip: int = 0,
    ) -> Fault:
        """Forward the response head and `after_bytes` of its body, then drop the connection."""
        return self._add(
            Fault("cut_response", count, method, self._rx(path), after_bytes=after_bytes, skip=skip)
        )

    def flip_byte(
        self,
        count: int = 1,
        *,
        position: int = 0,
        method: str | None = None,
        path: str | None = None,
        skip: int = 0,
    ) -> Fault:
        """XOR one byte (at body offset `position`) of matching responses."""
        return self._add(Fault("flip", count, method, self._rx(path), position=position, skip=skip))

    def delay(
        self,
        seconds: float,
        count: int = 1,
        *,
        method: str | None = None,
        path: str | None = None,
        skip: int = 0,
    ) -> Fault:
        """Hold matching responses for `seconds` before forwarding them."""
        return self._add(Fault("delay", count, method, self._rx(path), seconds=seconds, skip=skip))

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    # --- observation -----------------------------------------------------------------
    @property
    def records(self) -> list[Record]:
        with self._lock:
            return list(self._records)

    def count(self, method: str | None = None, path: str | None = None) -> int:
        rx = self._rx(path)
        return sum(
            1
            for r in self.records
            if (method is None or r.method == method) and (rx is None or rx.search(r.path))
        )

    def reset_counts(self) -> None:
        with self._lock:
            self._records.clear()
            self.max_inflight = 0

    def _take_fault(self, method: str, path: str) -> Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.matches(method, path):
                    if fault.skip > 0:
                        fault.skip -= 1
                        continue
                    fault.remaining -= 1
                    return fault
        return None

    # --- the proxy ---------------------------------------------------------------------
    async def _on_client(
        self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        with self._lock:
            self.connections += 1
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        try:
            while True:
                head = await _read_head(creader)
                if head is None:
                    return
                method, target = head.split(b" ", 2)[:2]
                rec = Record(method.decode(), target.decode().split("?", 1)[0])
                fault = self._take_fault(rec.method, rec.path)
                rec.fault = fault.kind if fault else None
                with self._lock:
                    self._records.append(rec)
                    self._inflight += 1
                    self.max_inflight = max(self.max_inflight, self._inflight)
                try:
                    if upstream is None and not (fault and fault.kind == "respond"):
                        upstream = await asyncio.open_connection(*self.upstream)
                    keep = await self._exchange(head, rec, fault, creader, cwriter, upstream)
                finally:
                    with self._lock:
                        self._inflight -= 1
                if not keep:
                    return
        except (_Cut, ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            self._tasks.discard(task)
            for w in (cwriter, upstream[1] if upstream else None):
                if w is not None:
                    w.close()

    async def _exchange(
        self,
        head: bytes,
        rec: Record,
        fault: Fault | None,
        creader: asyncio.StreamReader,
        cwriter: asyncio.StreamWriter,
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None,
    ) -> bool:
        req_framing = _request_framing(head)
        if fault and fault.kind == "respond":
            async for piece in _body(creader, req_framing):
                rec.request_bytes += len(piece)
            rec.status = fault.status
            lines = [
                f"HTTP/1.1 {fault.status} Injected",
                f"Content-Length: {len(fault.body)}",
                "Connection: close",
                *[f"{k}: {v}" for k, v in fault.headers.items()],
            ]
            cwriter.write(("\r\n".join(lines) + "\r\n\r\n").encode() + fault.body)
            await cwriter.drain()
            return False
        assert upstream is not None
        ureader, uwriter = upstream
        if fault and fault.kind == "cut_request":
            if fault.forward:
                uwriter.write(head)
            async for piece in _body(creader, req_framing, raw=True):
                take = piece[: max(0, fault.after_bytes - rec.request_bytes)]
                rec.request_bytes += len(take)
                if fault.forward and take:
                    uwriter.write(take)
                    await uwriter.drain()
                if rec.request_bytes >= fault.after_bytes:
                    break
            raise _Cut
        uwriter.write(head)
        async for piece in _body(creader, req_framing, raw=True):
            rec.request_bytes += len(piece)
            uwriter.write(piece)
            await uwriter.drain()
        await uwriter.drain()
        resp_head = await _read_head(ureader)
        if resp_head is None:
            raise _Cut
        rec.status = int(resp_head.split(b" ", 2)[1])
        if fault and fault.kind == "respond_after":
            async for _ in _body(ureader, _response_framing(resp_head, rec.method, rec.status)):
                pass
            rec.status = fault.status
            cwriter.write(
                f"HTTP/1.1 {fault.status} Injected\r\nContent-Length: 0\r\n"
                "Connection: close\r\n\r\n".encode()
            )
            await cwriter.drain()
            return False
        if fault and fault.kind == "delay":
            await asyncio.sleep(fault.seconds)
        cwriter.write(resp_head)
        framing = _response_framing(resp_head, rec.method, rec.status)
        sent = 0
        async for piece in _body(ureader, framing):
            if fault and fault.kind == "cut_response":
                piece = piece[: max(0, fault.after_bytes - sent)]
            if fault and fault.kind == "flip" and sent <= fault.position < sent + len(piece):
                i = fault.position - sent
                piece = piece[:i] + bytes([piece[i] ^ 0x01]) + piece[i + 1 :]
            if framing[0] == "chunked" and piece:
                cwriter.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            else:
                cwriter.write(piece)
            sent += len(piece)
            rec.response_bytes = sent
            await cwriter.drain()
            if fault and fault.kind == "cut_response" and sent >= fault.after_bytes:
                raise _Cut
        if framing[0] == "chunked":
            cwriter.write(b"0\r\n\r\n")
        await cwriter.drain()
        if fault and fault.kind == "cut_response":
            raise _Cut
        return framing[0] != "close" and b"connection: close" not in resp_head.lower()


async def _read_head(reader: asyncio.StreamReader) -> bytes | None:
    try:
        return await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise
        return None


def _header(head: bytes, name: bytes) -> bytes | None:
    for line in head.split(b"\r\n")[1:]:
        key, sep, value = line.partition(b":")
        if sep and key.strip().lower() == name:
            return value.strip()
    return None


def _request_framing(head: bytes) -> tuple[str, int]:
    te = _header(head, b"transfer-encoding")
    if te and b"chunked" in te.lower():
        return "chunked", 0
    return "length", int(_header(head, b"content-length") or 0)


def _response_framing(head: bytes, method: str, status: int) -> tuple[str, int]:
    if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
        return "length", 0
    te = _header(head, b"transfer-encoding")
    if te and b"chunked" in te.lower():
        return "chunked", 0
    length = _header(head, b"content-length")
    return ("length", int(length)) if length is not None else ("close", 0)


async def _body(reader: asyncio.StreamReader, framing: tuple[str, int], raw: bool = False):
    """Yield body pieces. Chunked bodies yield decoded data, or raw framing when `raw`."""
    kind, length = framing
    if kind == "length":
        left = length
        while left > 0:
            piece = await reader.read(min(left, 256 * 1024))
            if not piece:
                raise asyncio.IncompleteReadError(b"", left)
            left -= len(piece)
            yield piece
    elif kind == "chunked":
        while True:
            line = await reader.readuntil(b"\r\n")
            size = int(line.split(b";", 1)[0].strip(), 16)
            if size == 0:
                trailer = await reader.readuntil(b"\r\n")
                while trailer != b"\r\n":
                    trailer = await reader.readuntil(b"\r\n")
                if raw:
                    yield b"0\r\n\r\n"
                return
            data = await reader.readexactly(size)
            await reader.readexactly(2)
            yield (line + data + b"\r\n") if raw else data
    else:
        while True:
            piece = await reader.read(256 * 1024)
            if not piece:
                return
            yield piece
