"""A TCP forwarder on 127.0.0.1 that can be paused: an object-store outage without stopping the store.

Clients (s3fs, botocore) talk to the proxy's port; the proxy relays bytes to the real endpoint. `pause()` cuts every
open connection and answers new ones with a reset, which is what a client sees when a store or the network in
front of it goes away; `resume()` forwards again. The store itself keeps running, so nothing it holds is lost and a
paused endpoint differs from a crashed one only in what the client sees. Used by scripts/soak.py and the tests.
"""

from __future__ import annotations

import socket
import struct
import threading


class PausableProxy:
    def __init__(self, target_port: int, target_host: str = "127.0.0.1"):
        self.target = (target_host, target_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._paused = threading.Event()
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self.connections_cut = 0
        threading.Thread(target=self._accept, name="proxy-accept", daemon=True).start()

    @property
    def paused(self) -> bool:
        return self._paused.is_set()

    def pause(self) -> None:
        """From now on, no byte reaches the store: open connections are reset, new ones refused."""
        self._paused.set()
        with self._lock:
            sockets, self._open = list(self._open), set()
        for sock in sockets:
            self.connections_cut += 1
            _reset(sock)

    def resume(self) -> None:
        self._paused.clear()

    def close(self) -> None:
        self._closed.set()
        self.pause()
        self._listener.close()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self._paused.is_set():
                _reset(client)
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                _reset(client)
                continue
            with self._lock:
                self._open.update((client, upstream))
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                if self._paused.is_set():
                    break
                sink.sendall(data)
        except OSError:
            pass
        finally:
            with self._lock:
                self._open.discard(source)
                self._open.discard(sink)
            end = _reset if self._paused.is_set() else _close
            for sock in (source, sink):
                end(sock)


def _reset(sock: socket.socket) -> None:
    """Close with SO_LINGER 0: the peer gets a TCP reset, as from a host that dropped the connection."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    _close(sock)


def _close(sock: socket.socket) -> None:
    try:
        sock.close()
    except OSError:
        pass
