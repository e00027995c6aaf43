"""A fault-injecting HTTP proxy in front of an S3 endpoint (the moto server in the tests).

    with FaultProxy(moto_endpoint, rate=0.1, seed=7, stall_seconds=5) as proxy:
        env["AWS_ENDPOINT_URL"] = proxy.endpoint
        ...
        proxy.faults  # Counter[(kind, operation)]: what it did
        proxy.requests  # Counter[operation]: every request it saw

Each request is, with probability `rate` (a seeded RNG, so a run is repeatable up to thread
scheduling), answered with one of these instead of the store's own answer, the kinds taken
in turn per operation (truncate first where it applies), so that every operation faulted
at least len(kinds) times has met every kind:

  500        500 InternalError, before the store saw the request
  503        503 ServiceUnavailable, before the store saw the request
  slowdown   503 SlowDown (S3's throttling answer), before the store saw the request
  close      the connection closed without a response (FIN)
  rst        the connection reset without a response (SO_LINGER 0, so an RST)
  stall      the store's response held back for `stall_seconds`, then sent (a client whose
             read timeout is shorter gives up first)
  truncate   the store's response with its Content-Length, but only part of the body, then
             the connection closed. Only operations whose answer has a body (GET, LIST,
             multipart create and complete, DeleteObjects) are truncated; the others draw from
             the remaining kinds, and a bodiless answer that slips through (a DeleteObject's
             204) is reset instead and counted as "rst"

The first request of each operation named in `fault_first` is faulted whatever the rate.

`close` and `rst` happen, at random, either before the request reaches the store or after
the store applied it (the lost-answer case: the PUT is stored, the client does not know;
`after_store_share` of them, half by default);
`stall` and `truncate` always happen after. `after_store` counts the faults of that second
sort per kind.

Operations, from path-style S3 requests: PUT, UPLOAD_PART, CREATE_MULTIPART,
COMPLETE_MULTIPART, ABORT_MULTIPART, GET, LIST, HEAD, HEAD_BUCKET, DELETE (DeleteObject and
DeleteObjects), CREATE_BUCKET, OTHER. Faults hit every operation alike unless `operations`
names the ones to fault.
"""

from __future__ import annotations

import http.client
import random
import socket
import struct
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType

KINDS = ("500", "503", "slowdown", "close", "rst", "stall", "truncate")

# Headers that belong to one hop, not to the request or response (RFC 9110, section 7.6.1).
_HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization",
                         "te", "trailer", "transfer-encoding", "upgrade", "expect"})
_UPSTREAM_TIMEOUT = 120.0
# Operations whose successful answer has a body (the others' answers are headers only).
_BODY_OPERATIONS = frozenset({"GET", "LIST", "CREATE_MULTIPART", "COMPLETE_MULTIPART",
                              "DELETE"})

_ERROR_BODIES = {
    "500": (500, "Internal Server Error", "InternalError",
            "We encountered an internal error. Please try again."),
    "503": (503, "Service Unavailable", "ServiceUnavailable",
            "Service is unable to handle request."),
    "slowdown": (503, "Slow Down", "SlowDown", "Please reduce your request rate."),
}


def classify(method: str, target: str) -> str:
    """The S3 operation of a path-style request, e.g. ("PUT", "/b/k?partNumber=1&...")."""
    parsed = urllib.parse.urlsplit(target)
    query = urllib.parse.parse_qs(parsed.query, keep_blank_values=True)
    has_key = "/" in parsed.path.strip("/")
    if method == "HEAD":
        return "HEAD" if has_key else "HEAD_BUCKET"
    if method == "GET":
        return "GET" if has_key else "LIST"
    if method == "PUT":
        if not has_key:
            return "CREATE_BUCKET"
        return "UPLOAD_PART" if "partNumber" in query else "PUT"
    if method == "POST":
        if "delete" in query:
            return "DELETE"
        if "uploads" in query:
            return "CREATE_MULTIPART"
        if "uploadId" in query:
            return "COMPLETE_MULTIPART"
    if method == "DELETE":
        return "ABORT_MULTIPART" if "uploadId" in query else "DELETE"
    return "OTHER"


class FaultProxy:
    """A threaded HTTP proxy to `upstream` that injects faults at `rate` (0.0 to 1.0)."""

    def __init__(
        self,
        upstream: str,
        *,
        rate: float = 0.0,
        seed: int = 0,
        kinds: Iterable[str] = KINDS,
        stall_seconds: float = 3.0,
        operations: Iterable[str] | None = None,
        after_store_share: float = 0.5,
        limit: int | None = None,
        fault_first: Iterable[str] = (),
    ) -> None:
        parsed = urllib.parse.urlsplit(upstream)
        if parsed.scheme != "http" or not parsed.hostname or not parsed.port:
            raise ValueError(f"upstream must be http://host:port, not {upstream!r}")
        self.upstream_host: str = parsed.hostname
        self.upstream_port: int = parsed.port
        self._kinds = list(dict.fromkeys(kinds))
        unknown = set(self._kinds) - set(KINDS)
        if unknown or not self._kinds:
            raise ValueError(f"unknown fault kinds {sorted(unknown)}; known: {KINDS}")
        self.rate = rate
        self.stall_seconds = stall_seconds
        self.operations = frozenset(operations) if operations is not None else None
        self.after_store_share = after_store_share
        # At most this many faults in all (None: no limit), e.g. 1 to fail one request only.
        self.limit = limit
        self._decided = 0
        self._next_kind: dict[str, int] = {}
        # Operations whose first request is faulted whatever the rate: a run makes only a
        # handful of some requests (LIST, DeleteObjects, multipart completes), too few for a
        # 10% rate to reach reliably.
        self._fault_first = set(fault_first)
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self.requests: Counter[str] = Counter()
        self.faults: Counter[tuple[str, str]] = Counter()
        self.after_store: Counter[str] = Counter()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_class(self))
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        """The URL clients use instead of the upstream's, e.g. "http://127.0.0.1:40001"."""
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> FaultProxy:
        """Serve in a background thread."""
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        name="fault-proxy", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the listening socket."""
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def decide(self, operation: str) -> tuple[str | None, bool]:
        """(fault kind or None, whether a close/rst happens after the store applied the
        request); counts the request."""
        with self._lock:
            self.requests[operation] += 1
            if self.operations is not None and operation not in self.operations:
                return None, False
            forced = operation in self._fault_first
            self._fault_first.discard(operation)
            if not forced and (self.rate <= 0 or self._rng.random() >= self.rate):
                return None, False
            if self.limit is not None and self._decided >= self.limit:
                return None, False
            self._decided += 1
            kinds = [k for k in self._kinds if k != "truncate"]
            if "truncate" in self._kinds and (operation in _BODY_OPERATIONS or not kinds):
                # First where it applies: few operations have a body to truncate.
                kinds.insert(0, "truncate")
            # Each operation cycles through its kinds, so that an operation faulted n times
            # has met min(n, len(kinds)) different kinds.
            turn = self._next_kind.get(operation, 0)
            self._next_kind[operation] = turn + 1
            kind = kinds[turn % len(kinds)]
            after = kind in ("stall", "truncate") or (
                kind in ("close", "rst") and self._rng.random() < self.after_store_share)
            return kind, after

    def record(self, kind: str, operation: str, *, after: bool) -> None:
        """Count a fault that was injected."""
        with self._lock:
            self.faults[(kind, operation)] += 1
            if after:
                self.after_store[kind] += 1

    def total_faults(self) -> int:
        """How many faults were injected so far."""
        with self._lock:
            return sum(self.faults.values())

    def by_kind(self) -> Counter[str]:
        """Faults per kind."""
        with self._lock:
            counts: Counter[str] = Counter()
            for (kind, _), n in self.faults.items():
                counts[kind] += n
            return counts

    def by_operation(self) -> Counter[str]:
        """Faults per operation."""
        with self._lock:
            counts: Counter[str] = Counter()
            for (_, operation), n in self.faults.items():
                counts[operation] += n
            return counts

    def summary(self) -> str:
        """One line of figures, for test output and notes."""
        requests = sum(self.requests.values())
        kinds = ", ".join(f"{k} {n}" for k, n in sorted(self.by_kind().items()))
        ops = ", ".join(f"{k} {n}" for k, n in sorted(self.by_operation().items()))
        seen = ", ".join(f"{k} {n}" for k, n in sorted(self.requests.items()))
        after = ", ".join(f"{k} {n}" for k, n in sorted(self.after_store.items()))
        return (f"{requests} requests ({seen}); {self.total_faults()} faults by kind: {kinds}; "
                f"by operation: {ops}; after the store applied the request: {after}")


def _handler_class(proxy: FaultProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(_ProxyHandler):
        owner = proxy

    return Handler


class _ProxyHandler(BaseHTTPRequestHandler):
    """One client connection: requests are read whole, forwarded, answered (or faulted)."""

    owner: FaultProxy
    protocol_version = "HTTP/1.1"  # keep-alive, as botocore's connection pool expects

    def log_message(self, format: str, *args: object) -> None:
        pass  # quiet: the counters are the record

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _handle(self) -> None:
        body = self._read_body()
        operation = classify(self.command, self.path)
        kind, after = self.owner.decide(operation)
        if kind in _ERROR_BODIES:
            self.owner.record(kind, operation, after=False)
            self._send_error(kind)
            return
        if kind in ("close", "rst") and not after:
            self.owner.record(kind, operation, after=False)
            self._drop(rst=kind == "rst")
            return
        status, reason, headers, payload = self._forward(body)
        if kind in ("close", "rst"):
            self.owner.record(kind, operation, after=True)
            self._drop(rst=kind == "rst")
            return
        if kind == "truncate" and (self.command == "HEAD" or len(payload) < 2):
            self.owner.record("rst", operation, after=True)
            self._drop(rst=True)
            return
        if kind == "stall":
            self.owner.record(kind, operation, after=True)
            time.sleep(self.owner.stall_seconds)
        if kind == "truncate":
            self.owner.record(kind, operation, after=True)
            self._send(status, reason, headers, payload[: len(payload) // 2],
                       length=len(payload))
            self._drop(rst=False)
            return
        self._send(status, reason, headers, payload, length=len(payload))

    def _forward(self, body: bytes) -> tuple[int, str, list[tuple[str, str]], bytes]:
        conn = http.client.HTTPConnection(self.owner.upstream_host, self.owner.upstream_port,
                                          timeout=_UPSTREAM_TIMEOUT)
        try:
            conn.putrequest(self.command, self.path, skip_host=True,
                            skip_accept_encoding=True)
            for name, value in self.headers.items():
                if name.lower() not in _HOP_BY_HOP and name.lower() != "content-length":
                    conn.putheader(name, value)
            if body or self.command in ("PUT", "POST"):
                conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body or None)
            response = conn.getresponse()
            # Whole responses in memory: the tests' objects are a few MiB at most, and a
            # known length is what lets `truncate` promise more than it sends.
            payload = response.read() if self.command != "HEAD" else b""
            headers = [(k, v) for k, v in response.getheaders()
                       if k.lower() not in _HOP_BY_HOP]
            return response.status, response.reason, headers, payload
        finally:
            conn.close()

    def _send(self, status: int, reason: str, headers: list[tuple[str, str]], payload: bytes,
              *, length: int) -> None:
        lines = [f"HTTP/1.1 {status} {reason}"]
        for name, value in headers:
            if name.lower() != "content-length" or self.command == "HEAD":
                lines.append(f"{name}: {value}")
        if self.command != "HEAD":
            lines.append(f"Content-Length: {length}")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        try:
            self.wfile.write(head + payload)
            self.wfile.flush()
        except OSError:
            self.close_connection = True  # the client gave up (a stall it timed out on)

    def _send_error(self, kind: str) -> None:
        status, reason, code, message = _ERROR_BODIES[kind]
        xml = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
               f"<Message>{message}</Message><Resource>{self.path}</Resource>"
               "<RequestId>fault-proxy</RequestId></Error>").encode()
        payload = b"" if self.command == "HEAD" else xml
        headers = [("Content-Type", "application/xml"), ("x-amz-request-id", "fault-proxy")]
        if self.command == "HEAD":
            headers.append(("Content-Length", "0"))
        self._send(status, reason, headers, payload, length=len(payload))

    def _drop(self, *, rst: bool) -> None:
        self.close_connection = True
        if rst:
            # Linger on with a zero timeout: close() sends an RST instead of a FIN.
            try:
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                           struct.pack("ii", 1, 0))
                self.connection.close()
            except OSError:
                pass
        else:
            try:
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def do_GET(self) -> None:
        self._handle()

    def do_PUT(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def do_HEAD(self) -> None:
        self._handle()

    def do_DELETE(self) -> None:
        self._handle()
