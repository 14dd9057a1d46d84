"""Drive a real ComfyUI host from tests: start it on a fresh base directory, talk HTTP and websocket.

    with ComfyHost("0.30.0", pack_dir, models={"uniref/tiny": tiny}) as host:
        assert not host.import_failed()
        with host.listen() as ws:
            prompt_id = host.queue(prompt, ws.client_id)
            entry = host.wait(prompt_id)
            ws.wait_for("execution_success")

The hosts come from scripts/comfy_hosts.py (built once, cached). Only the standard library is used
here (and PIL, already in the dev venv, to open a saved image), so the dev venv needs nothing extra.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import hashlib
import importlib.util
import io
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _load_hosts_module():
    """scripts/ is not a package; load scripts/comfy_hosts.py by path (once per process)."""
    if "comfy_hosts" in sys.modules:
        return sys.modules["comfy_hosts"]
    spec = importlib.util.spec_from_file_location("comfy_hosts", ROOT / "scripts" / "comfy_hosts.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["comfy_hosts"] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


comfy_hosts = _load_hosts_module()
VERSIONS = comfy_hosts.VERSIONS
PACK_NAME = comfy_hosts.PACK_NAME


class HostError(RuntimeError):
    """The host failed to start or answered unexpectedly; the message ends with its log tail."""


class ComfyHost:
    """One ComfyUI server process on a fresh base directory; a context manager."""

    def __init__(
        self,
        version: str,
        pack_dir: Path | None = None,
        models: dict[str, Path] | None = None,
        *,
        pack_name: str | None = None,
        base_dir: Path | None = None,
        extra_args: tuple[str, ...] = (),
        start_timeout: float = 90.0,
        extra_packs: dict[str, Path] | None = None,
    ):
        self.version = version
        self.pack_dir = Path(pack_dir).resolve() if pack_dir else None
        if pack_name is None and self.pack_dir is not None:
            pack_name = comfy_hosts.pack_folder_name(self.pack_dir)
        self.pack_name = pack_name
        self.models = dict(models or {})
        self._own_base = base_dir is None
        self.base_dir = Path(base_dir) if base_dir else None
        self.extra_args = tuple(extra_args)
        self.start_timeout = start_timeout
        self.extra_packs = dict(extra_packs or {})  # more custom_nodes/<name> folders (test-only shims)
        self.install = None
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None
        self.startup_s: float | None = None
        self._t0 = 0.0

    # ------------------------------------------------------------ life cycle

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.base_dir / "host.log"

    @property
    def input_dir(self) -> Path:
        return self.base_dir / "input"

    @property
    def output_dir(self) -> Path:
        return self.base_dir / "output"

    def start(self) -> ComfyHost:
        """launch() and wait_ready()."""
        return self.launch().wait_ready()

    def launch(self) -> ComfyHost:
        """Start the server process without waiting (start several hosts, then wait for each)."""
        self.install = comfy_hosts.ensure_host(self.version)
        if self.base_dir is None:
            self.base_dir = Path(tempfile.mkdtemp(prefix=f"comfy-{self.version}-"))
        packs = {**({self.pack_name: self.pack_dir} if self.pack_dir else {}), **self.extra_packs}
        comfy_hosts.make_base_dir(self.base_dir, packs, self.models)
        self.port = comfy_hosts.free_port()
        self._t0 = time.perf_counter()
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                self.install.command(self.base_dir, self.port, *self.extra_args),
                cwd=self.install.comfy_dir,
                env=comfy_hosts.host_env(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        atexit.register(self.stop)  # no orphaned server if a test run ends abruptly
        return self

    def wait_ready(self) -> ComfyHost:
        """Block until GET /system_stats answers; fail with the log tail if the process dies or
        start_timeout passes."""
        deadline = self._t0 + self.start_timeout
        while True:
            if self.proc is None or self.proc.poll() is not None:
                code = None if self.proc is None else self.proc.returncode
                self._fail(f"ComfyUI {self.version} exited with {code} while starting")
            try:
                self._request("GET", "/system_stats", timeout=2)
                break
            except OSError:
                if time.perf_counter() > deadline:
                    self.stop()
                    self._fail(f"ComfyUI {self.version} not ready after {self.start_timeout:.0f} s")
                time.sleep(0.2)
        self.startup_s = time.perf_counter() - self._t0
        return self

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def cleanup(self) -> None:
        """stop(), then remove the base directory if this object created it."""
        self.stop()
        if self._own_base and self.base_dir is not None:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def __enter__(self) -> ComfyHost:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.cleanup()

    # ------------------------------------------------------------ logs

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except (OSError, TypeError):
            return ""

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def import_failed(self, pack_name: str | None = None) -> bool:
        """True if the log shows that this pack (not the host's own audio nodes) failed to load."""
        if not (pack_name or self.pack_name):
            raise ValueError("import_failed() needs a pack name (this host has no pack)")
        name = re.escape(pack_name or self.pack_name)
        patterns = (
            rf"\(IMPORT FAILED\): .*custom_nodes[/\\]{name}\s*$",
            rf"Cannot import .*custom_nodes[/\\]{name} module for custom nodes",
            rf"comfy_entrypoint in .*custom_nodes[/\\]{name}\b",
            rf"Skip .*custom_nodes[/\\]{name} module for custom nodes",
        )
        text = self.log_text()
        return any(re.search(p, text, re.MULTILINE) for p in patterns)

    def _fail(self, message: str):
        raise HostError(f"{message}\n--- log tail ({self.log_path}) ---\n{self.log_tail()}")

    # ------------------------------------------------------------ HTTP API

    def _request(self, method: str, path: str, body=None, timeout: float = 30) -> bytes:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.read()

    def get_json(self, path: str, timeout: float = 30):
        return json.loads(self._request("GET", path, timeout=timeout))

    def object_info(self, node: str | None = None) -> dict:
        """All node definitions, or one node's definition (not wrapped in {node: ...})."""
        if node is None:
            return self.get_json("/object_info")
        info = self.get_json("/object_info/" + urllib.parse.quote(node))
        if node not in info:
            raise KeyError(f"ComfyUI {self.version} has no node {node!r}")
        return info[node]

    def queue(self, prompt: dict, client_id: str | None = None) -> str | dict:
        """POST /prompt. Returns the prompt id, or the host's error JSON when it rejects the prompt
        (HTTP 400: {"error": {...}, "node_errors": {...}}) so tests can assert on node errors."""
        body = {"prompt": prompt, "client_id": client_id or uuid.uuid4().hex}
        try:
            answer = json.loads(self._request("POST", "/prompt", body))
        except urllib.error.HTTPError as e:
            if e.code == 400:
                return json.loads(e.read())
            raise
        return answer["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 60) -> dict:
        """The history entry once the prompt finished (success or error)."""
        deadline = time.perf_counter() + timeout
        while True:
            history = self.get_json("/history/" + prompt_id)
            if prompt_id in history:
                return history[prompt_id]
            if self.proc is None or self.proc.poll() is not None:
                self._fail(f"ComfyUI {self.version} is gone while waiting for {prompt_id}")
            if time.perf_counter() > deadline:
                self._fail(f"prompt {prompt_id} not finished after {timeout:.0f} s")
            time.sleep(0.1)

    def run(self, prompt: dict, timeout: float = 60, client_id: str | None = None) -> dict:
        """queue() + wait(); raises with the node errors or the execution error instead of returning."""
        prompt_id = self.queue(prompt, client_id)
        if isinstance(prompt_id, dict):
            raise HostError(f"prompt rejected: {json.dumps(prompt_id, indent=1)}")
        entry = self.wait(prompt_id, timeout)
        status = entry.get("status", {})
        if status.get("status_str") != "success":
            self._fail(f"prompt failed: {json.dumps(status.get('messages'), indent=1)}")
        return entry

    def interrupt(self) -> None:
        self._request("POST", "/interrupt", {})

    def view(self, filename: str, subfolder: str = "", type: str = "output") -> bytes:
        query = urllib.parse.urlencode({"filename": filename, "subfolder": subfolder, "type": type})
        return self._request("GET", "/view?" + query)

    def output_image(self, entry: dict, index: int = 0):
        """The ``index``-th image a finished prompt's history entry saved, as a PIL image."""
        from PIL import Image

        meta = output_images(entry)[index]
        return Image.open(io.BytesIO(self.view(meta["filename"], meta["subfolder"], meta["type"])))

    def templates(self) -> dict:
        """GET /api/workflow_templates: {pack name: [workflow file stems]}."""
        return self.get_json("/api/workflow_templates")

    def template(self, pack_name: str, name: str) -> dict:
        """One pack workflow as the frontend's template browser fetches it. Note: ComfyUI serves
        only the FIRST existing folder of example_workflows, example, examples, workflow,
        workflows, even though the listing above covers all of them."""
        path = f"{urllib.parse.quote(pack_name)}/{urllib.parse.quote(name)}.json"
        return self.get_json("/api/workflow_templates/" + path)

    def listen(self, client_id: str | None = None) -> WsListener:
        """A websocket listener for this client id (pass the same id to queue())."""
        return WsListener("127.0.0.1", self.port, client_id or uuid.uuid4().hex)


@contextlib.contextmanager
def running(*hosts: ComfyHost):
    """Start several hosts at once (they boot in parallel); cleanup() them all at the end."""
    try:
        for host in hosts:  # set-up first (one-time, minutes on a fresh machine), then boot all
            comfy_hosts.ensure_host(host.version)
        for host in hosts:
            host.launch()
        for host in hosts:
            host.wait_ready()
        yield hosts
    finally:
        for host in hosts:
            host.cleanup()


def output_images(entry: dict) -> list[dict]:
    """All {filename, subfolder, type} images in a history entry's outputs."""
    return [img for out in entry.get("outputs", {}).values() for img in out.get("images", [])]


class WsListener:
    """A minimal RFC 6455 client (text and binary frames, ping/pong, close) that collects the
    host's messages on a background thread. Text messages are kept as parsed JSON dicts
    ({"type": ..., "data": ...}); binary ones (previews) as {"type": "binary", "data": bytes}."""

    _GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

    def __init__(self, host: str, port: int, client_id: str, timeout: float = 10):
        self.client_id = client_id
        self.messages: list[dict] = []
        self._cond = threading.Condition()
        self._closed = False
        self._sock = socket.create_connection((host, port), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        self._sock.sendall(
            (
                f"GET /ws?clientId={urllib.parse.quote(client_id)} HTTP/1.1\r\n"
                f"Host: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = self._sock.recv(4096)
            if not chunk:
                raise ConnectionError("websocket handshake: connection closed")
            buf += chunk
        head, self._buf = buf.split(b"\r\n\r\n", 1)
        accept = base64.b64encode(hashlib.sha1((key + self._GUID).encode()).digest()).decode()
        if b" 101 " not in head.split(b"\r\n", 1)[0] or accept.encode() not in head:
            raise ConnectionError(f"websocket handshake refused: {head.decode(errors='replace')}")
        self._sock.settimeout(None)
        self._thread = threading.Thread(target=self._reader, daemon=True)
        self._thread.start()

    # -- frames
    def _read(self, n: int) -> bytes:
        while len(self._buf) < n:
            chunk = self._sock.recv(65536)
            if not chunk:
                raise ConnectionError("websocket closed")
            self._buf += chunk
        out, self._buf = self._buf[:n], self._buf[n:]
        return out

    def _send(self, opcode: int, payload: bytes = b"") -> None:
        mask = os.urandom(4)  # client frames must be masked
        n = len(payload)
        if n < 126:
            header = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
        elif n < 1 << 16:
            header = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
        else:
            header = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self._sock.sendall(header + mask + masked)

    def _reader(self) -> None:
        message, message_op = b"", 0
        try:
            while True:
                b0, b1 = self._read(2)
                opcode, n = b0 & 0x0F, b1 & 0x7F
                if n == 126:
                    n = struct.unpack("!H", self._read(2))[0]
                elif n == 127:
                    n = struct.unpack("!Q", self._read(8))[0]
                mask = self._read(4) if b1 & 0x80 else None
                payload = self._read(n)
                if mask:
                    payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
                if opcode == 0x8:  # close
                    break
                if opcode == 0x9:  # ping
                    self._send(0xA, payload)
                    continue
                if opcode in (0x1, 0x2):
                    message, message_op = payload, opcode
                elif opcode == 0x0:
                    message += payload
                else:
                    continue
                if b0 & 0x80:  # FIN: a whole message
                    if message_op == 0x1:
                        msg = json.loads(message.decode())
                    else:
                        msg = {"type": "binary", "data": message}
                    with self._cond:
                        self.messages.append(msg)
                        self._cond.notify_all()
        except (OSError, ConnectionError, ValueError):
            pass
        finally:
            with self._cond:
                self._closed = True
                self._cond.notify_all()

    # -- queries
    def types(self) -> list[str]:
        with self._cond:
            return [m.get("type") for m in self.messages]

    def of_type(self, *types: str) -> list[dict]:
        with self._cond:
            return [m for m in self.messages if m.get("type") in types]

    def wait_for(self, *types: str, prompt_id: str | None = None, timeout: float = 30) -> dict:
        """The first message of one of these types (and this prompt, if given); waits for it."""

        def match(m):
            if m.get("type") not in types:
                return False
            return prompt_id is None or (m.get("data") or {}).get("prompt_id") == prompt_id

        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = next((m for m in self.messages if match(m)), None)
                if found is not None:
                    return found
                left = deadline - time.monotonic()
                if left <= 0 or self._closed:
                    seen = [m.get("type") for m in self.messages]
                    raise TimeoutError(f"no websocket message {types} within {timeout} s; saw {seen}")
                self._cond.wait(left)

    def close(self) -> None:
        try:
            self._send(0x8, struct.pack("!H", 1000))
        except OSError:
            pass
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        self._thread.join(timeout=5)

    def __enter__(self) -> WsListener:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@contextlib.contextmanager
def uniref_host(
    version: str,
    tiny_model: Path,
    default_model: Path | None = None,
    extra_models: dict | None = None,
    extra_packs: dict | None = None,
):
    """A host with this pack and a tiny model as `models/uniref/tiny` and, unless ``default_model`` is
    given, as the built-in default too (the shipped workflows name the built-in model, and a random model
    makes the tests fast); the shipped, trained default model is there too, as `models/uniref/shipped`,
    once the repository has it. ``extra_models`` adds more (``{"loras/x.safetensors": path}``), ``extra_packs``
    more custom node folders (``{"name": path}``)."""
    old = os.environ.get("UNIREF_DEFAULT_MODEL")
    os.environ["UNIREF_DEFAULT_MODEL"] = str(default_model or tiny_model)
    try:
        models = {"uniref/tiny": tiny_model, **(extra_models or {})}
        shipped = ROOT / "models" / "uniref-default"
        if (shipped / "model_index.json").is_file():
            models["uniref/shipped"] = shipped
        with ComfyHost(version, ROOT, models=models, extra_packs=extra_packs) as h:
            yield h
    finally:
        if old is None:
            os.environ.pop("UNIREF_DEFAULT_MODEL", None)
        else:
            os.environ["UNIREF_DEFAULT_MODEL"] = old
