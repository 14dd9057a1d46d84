"""What the Comfy registry gets: the archive `comfy node pack` / `comfy node publish` upload and the metadata they
read from pyproject.toml.

The archive is built as comfy-cli 1.23's ``comfy_cli.file_utils.zip_files`` builds it: the files ``git ls-files``
lists, less those a pattern in .comfyignore matches (gitignore syntax; comfy-cli matches with pathspec's
"gitwildmatch", here git's own matcher reads the same file), plus the folders in [tool.comfy] includes. When
comfy-cli is installed, the first test checks that its archive holds exactly these files.

A user gets what the nodes, the CLI and the trainers load at run time, nothing from tests/, bench/, docs/ or
scripts/, and code that bandit finds no medium or high issue in.
"""

import ast
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import tomllib
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
COMFY = PYPROJECT["tool"]["comfy"]
DEVELOPMENT = ("tests/", "bench/", "docs/", "scripts/", ".ci/", "runs/", "data/", "requirements-dev.txt")
RUN_TIME = ("nodes/", "uniref_core/", "training/", "models/", "workflows/")  # every tracked file here ships
NODE_IDS = {"UniRefLoadModel", "UniRefLoadModelFiles", "UniRefReferenceBatch", "UniRefSelfEncode", "UniRefSampler"}
# The registry's rules for a node id (registry-backend, mapper/node.go IsValidNodeID) and comfy-cli's for a
# requires-comfyui part (comfy_cli/registry/config_parser.py validate_version).
NODE_ID = re.compile(r"^[a-zA-Z0-9](?:[a-zA-Z0-9._-]*[a-zA-Z0-9])?$")
VERSION_PART = re.compile(r"^(?:(==|>=|<=|!=|~=|>|<|<>|=)\s*)?(\d+\.\d+\.\d+(?:-[a-zA-Z0-9]+)?)?$")


def git_files(*args: str) -> list[str]:
    out = subprocess.run(["git", "ls-files", "-z", *args], cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip(f"not a git checkout: {out.stderr.strip()}")
    return [f for f in out.stdout.split("\0") if f]


@functools.cache
def archive_files() -> tuple[str, ...]:
    ignored = set(git_files("--cached", "--ignored", "--exclude-from=.comfyignore"))
    forced = [inc.strip("/") for inc in COMFY.get("includes", [])]

    def force_included(path: str) -> bool:
        return any(path == inc or path.startswith(inc + "/") for inc in forced)

    files = {f for f in git_files() if f not in ignored or force_included(f)}
    for inc in forced:  # included folders ship whole, tracked or not
        found = [ROOT / inc] if (ROOT / inc).is_file() else (ROOT / inc).rglob("*")
        files |= {p.relative_to(ROOT).as_posix() for p in found if p.is_file()}
    return tuple(sorted(files))


@pytest.fixture(scope="module")
def archive_dir(tmp_path_factory):
    """The archive's files, copied (not linked: the pack finds its models next to its own files) into a folder
    named as a registry install names it: custom_nodes/<node id> (comfy-cli's registry_install)."""
    folder = tmp_path_factory.mktemp("archive") / PYPROJECT["project"]["name"]
    for name in archive_files():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(ROOT / name, folder / name)
    return folder


def test_archive_is_what_comfy_cli_packs(tmp_path, monkeypatch):
    file_utils = pytest.importorskip("comfy_cli.file_utils", reason="comfy-cli is not installed")
    monkeypatch.chdir(ROOT)  # comfy-cli packs the current directory
    file_utils.zip_files(tmp_path / "node.zip", includes=COMFY.get("includes", []))
    assert tuple(sorted(zipfile.ZipFile(tmp_path / "node.zip").namelist())) == archive_files()


def test_archive_leaves_development_files_out():
    shipped = [f for f in archive_files() if f.startswith(DEVELOPMENT)]
    assert not shipped, f"development files in the archive: {shipped[:10]}"
    assert ".comfyignore" in git_files(), ".comfyignore must be committed: comfy-cli reads it from the checkout"
    assert not any(line.startswith("!") for line in (ROOT / ".comfyignore").read_text().splitlines()), (
        '.comfyignore has a "!" re-include, where git and comfy-cli can disagree'
    )


def test_archive_holds_what_the_pack_loads_at_run_time():
    archive = set(archive_files())
    needed = {"__init__.py", "pyproject.toml", "requirements.txt", "README.md"}
    needed |= {f for f in git_files() if f.startswith(RUN_TIME)}  # code, the built-in models, the templates
    needed |= {f"assets/{p.name}" for p in (ROOT / "assets").glob("*.png")}  # what nodes/examples.py copies
    assert needed <= archive, f"missing from the archive: {sorted(needed - archive)[:10]}"
    for model in ("uniref-default", "uniref-default-sft"):
        assert f"models/{model}/transformer/diffusion_pytorch_model.safetensors" in archive


def _is_module(parts: list[str], files: set[str]) -> bool:
    path = "/".join(parts)
    return f"{path}.py" in files or (f"{path}/__init__.py" if path else "__init__.py") in files


def _imports_of_our_code(source: str, package: list[str], ours: set[str]):
    """(module, names) for each import of our own code, relative ones made absolute; module None where a relative
    import climbs above the pack's folder."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            yield from ((a.name.split("."), []) for a in node.names if a.name.split(".")[0] in ours)
        elif isinstance(node, ast.ImportFrom) and node.level:
            up = node.level - 1
            module = None if up > len(package) else package[: len(package) - up] + (node.module or "").split(".")
            yield [p for p in module if p] if module else None, [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module.split(".")[0] in ours:
            yield node.module.split("."), [a.name for a in node.names]


def test_every_import_of_our_own_code_resolves_inside_the_archive():
    """Static, so it also covers nodes/ (which needs a ComfyUI host to import) and imports inside functions: each
    module imported is in the archive, and so is each name imported from a package that is one of our modules."""
    tracked, archive = set(git_files()), set(archive_files())
    ours = {Path(f).parts[0].removesuffix(".py") for f in tracked if f.endswith(".py")} - {"__init__"}
    missing = []
    for name in sorted(f for f in archive if f.endswith(".py")):
        package = list(Path(name).parent.parts)  # the pack's folder is itself a package in ComfyUI
        for module, names in _imports_of_our_code((ROOT / name).read_text(encoding="utf-8"), package, ours):
            if module is None or not _is_module(module, archive):
                missing.append(f"{name}: {'.'.join(module or ['<above the pack>'])}")
            missing += [
                f"{name}: {'.'.join(module + [n])}"
                for n in names
                if _is_module(module + [n], tracked) and not _is_module(module + [n], archive)
            ]
    assert not missing, f"imports of files the archive lacks: {missing}"


def test_pack_and_its_libraries_import_from_the_archive_alone(archive_dir):
    """uniref_core and the trainers import from the archive's copy (no repository on the path); the pack's
    entry point loads. nodes/ imports ComfyUI's modules: test_nodes_load_in_comfyui_from_the_archive."""
    modules = sorted(
        ".".join(Path(f).with_suffix("").parts).removesuffix(".__init__")
        for f in archive_files()
        if f.startswith(("uniref_core/", "training/")) and f.endswith(".py") and not f.endswith("__main__.py")
    )
    probe = (
        "import importlib, importlib.util, pathlib, sys\n"
        "root = pathlib.Path.cwd()\n"
        "sys.path.insert(0, str(root))\n"
        "spec = importlib.util.spec_from_file_location('pack', root / '__init__.py', "
        "submodule_search_locations=[str(root)])\n"
        "pack = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(pack)\n"
        "assert callable(pack.comfy_entrypoint)\n"
        "files = [importlib.import_module(m).__file__ for m in sys.argv[1:]]\n"
        "print([f for f in files if not pathlib.Path(f).resolve().is_relative_to(root)])\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-I", "-c", probe, *modules], cwd=archive_dir, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "[]", f"imported from outside the archive: {proc.stdout}"


@pytest.mark.comfy
@pytest.mark.skipif(os.environ.get("UNIREF_SKIP_COMFY") == "1", reason="UNIREF_SKIP_COMFY=1")
def test_nodes_load_in_comfyui_from_the_archive(archive_dir):
    from comfyhost import ComfyHost

    with ComfyHost("0.30.0", archive_dir) as host:
        assert not host.import_failed(), host.log_tail()
        info = host.object_info()
        assert NODE_IDS <= set(info), f"nodes missing: {sorted(NODE_IDS - set(info))}\n{host.log_tail()}"
        models = info["UniRefLoadModel"]["input"]["required"]["model"]
        options = models[1]["options"] if models[0] == "COMBO" else models[0]
        assert "uniref-default (built-in)" in options  # the archive's own models/ folder


def test_shipped_code_has_no_medium_or_high_bandit_finding():
    files = [f for f in archive_files() if f.endswith(".py")]
    proc = subprocess.run(
        [sys.executable, "-m", "bandit", "-q", "-f", "json", *files], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.stdout.lstrip().startswith("{"), f"bandit did not run: {proc.stderr[-2000:]}"
    report = json.loads(proc.stdout)
    found = [
        f"{r['filename']}:{r['line_number']} {r['test_id']} ({r['issue_severity']}): {r['issue_text']}"
        for r in report["results"]
        if r["issue_severity"] in ("MEDIUM", "HIGH")
    ]
    totals = {k: v for k, v in report["metrics"]["_totals"].items() if k.startswith("SEVERITY.")}
    assert not found, f"bandit on {len(files)} shipped files, {totals}:\n" + "\n".join(found)


def test_pyproject_has_what_the_registry_reads():
    project = PYPROJECT["project"]
    assert NODE_ID.match(project["name"]) and len(project["name"]) < 100
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"])
    assert 0 < len(project["description"]) <= 1000  # the registry refuses longer ones
    assert COMFY["PublisherId"] and COMFY["DisplayName"]
    assert all(VERSION_PART.match(p.strip()) for p in COMFY["requires-comfyui"].split(","))
    urls = [*project.get("urls", {}).values(), COMFY["Icon"], COMFY.get("Banner", "")]
    assert all(u.startswith("https://") for u in urls if u), urls
    for inc in COMFY["includes"]:
        assert (ROOT / inc).exists(), f"[tool.comfy] includes names {inc}, which does not exist"
    icon = Image.open(ROOT / "assets" / "icon" / "icon.png")
    assert icon.width == icon.height <= 400  # the registry's limit for an icon
