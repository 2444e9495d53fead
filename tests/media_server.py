"""A local HTTP server on loopback for image-fetch tests: images, a URL that never answers, an
oversized body (with and without Content-Length), redirect chains, redirects elsewhere, errors.
Serves from a thread; stop() ends it and releases the never-answering handlers."""
from __future__ import annotations

import io
import select
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from tests.tiny_vlm import random_image


def png_bytes(width: int = 64, height: int = 48, seed: int = 0) -> bytes:
    buf = io.BytesIO()
    random_image(width, height, seed).save(buf, format="PNG")
    return buf.getvalue()


class MediaServer:
    def __init__(self, max_bytes: int = 1 << 20) -> None:
        self.release = threading.Event()
        self.images = {"/img.png": png_bytes(), "/img2.png": png_bytes(40, 60, 1)}
        self.max_bytes = max_bytes
        self.num_requests = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                server.num_requests += 1
                server.route(self)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def route(self, h: BaseHTTPRequestHandler) -> None:
        path = h.path
        if path in self.images:
            return self._send(h, 200, self.images[path], "image/png")
        if path == "/slow":            # accepts the connection, never answers
            self.release.wait(60)
            return None
        if path == "/big":             # declares more than any cap
            h.send_response(200)
            h.send_header("Content-Length", str(1 << 36))
            h.end_headers()
            return None
        if path == "/big-chunked":     # no length; keeps sending past the cap
            h.send_response(200)
            h.end_headers()
            chunk = b"\0" * 65536
            try:
                for _ in range(self.max_bytes * 4 // len(chunk)):
                    h.wfile.write(chunk)
            except OSError:
                pass
            return None
        if path.startswith("/redirect/"):   # /redirect/N -> /redirect/N-1 -> ... -> /img.png
            n = int(path.rsplit("/", 1)[1])
            return self._redirect(h, "/img.png" if n <= 1 else f"/redirect/{n - 1}")
        if path.startswith("/to?"):         # /to?URL redirects to URL
            return self._redirect(h, path[4:])
        if path == "/text":
            return self._send(h, 200, b"hello, not an image", "text/plain")
        return self._send(h, 404, b"not found", "text/plain")

    @staticmethod
    def _send(h: BaseHTTPRequestHandler, status: int, body: bytes, ctype: str) -> None:
        h.send_response(status)
        h.send_header("Content-Type", ctype)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    @staticmethod
    def _redirect(h: BaseHTTPRequestHandler, location: str) -> None:
        h.send_response(302)
        h.send_header("Location", location)
        h.send_header("Content-Length", "0")
        h.end_headers()

    def stop(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


class DripServer:
    """A host that answers headers at once, then one body byte every `interval` seconds up to
    `num_bytes` (issue 36: a slow host held every fetch thread). Counts connections open at once
    and those the client cut before the drip ended."""

    def __init__(self, interval: float = 0.05, num_bytes: int = 400) -> None:
        import socket

        self.interval, self.num_bytes = interval, num_bytes
        self.lock = threading.Lock()
        self.num_open = self.max_open = self.num_cut = self.num_finished = 0
        self.stopped = threading.Event()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, path: str = "/drip.png", host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def _accept(self) -> None:
        while not self.stopped.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._drip, args=(conn,), daemon=True).start()

    def _drip(self, conn) -> None:
        with self.lock:
            self.num_open += 1
            self.max_open = max(self.max_open, self.num_open)
        try:
            conn.recv(65536)     # the request's headers
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\n"
                         + f"Content-Length: {self.num_bytes}\r\n\r\n".encode())
            for _ in range(self.num_bytes):
                if self.stopped.is_set():
                    break
                # wait for the next byte's time, or see the client's close as soon as it comes
                # (a send after the close may still succeed: the count would lag the cut)
                readable, _, _ = select.select([conn], [], [], self.interval)
                if readable and not conn.recv(1):
                    raise ConnectionResetError("the client closed the connection")
                conn.sendall(b"\0")
            else:
                with self.lock:
                    self.num_finished += 1
        except OSError:          # the client cut the connection mid-drip
            with self.lock:
                self.num_cut += 1
        finally:
            conn.close()
            with self.lock:
                self.num_open -= 1

    def stop(self) -> None:
        self.stopped.set()
        self.sock.close()
