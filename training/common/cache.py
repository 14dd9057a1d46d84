"""The encoding pass: every row encoded once, before the transformer loads, into safetensors shards on disk.

A trainer encodes with the text encoder and the VAE, frees them, and only then loads the transformer, so the
encoders are never resident beside it (at real size the text encoder alone is 15 GiB in bf16). What it encodes
goes to ``<cache_dir>/<kind>-<key>/``:

- ``shard_00000.safetensors``, …: the tensors of ``SHARD_ROWS`` consecutive rows, named ``<row>.<tensor>``, and each
  row's small metadata (layouts, token counts) as JSON in the file's header. A shard is written to a temporary
  name and renamed, so a crash leaves whole shards only and the next run encodes just the missing ones.
- ``cache.json``: what the tensors depend on (the encoders' fingerprint, the sizes, every row's inputs), written
  last: a folder without it is incomplete. ``<key>`` is a hash of the same, so a cache of another model, stage or
  data set is never read; a later run with the same ones reuses it.

Processes share the work: process r encodes the shards s with s % world == r, then all wait for each other.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch

CACHE_VERSION = 1
SHARD_ROWS = 64


class ShardCache:
    """One kind of encoding (prompts, or one stage's latents) of every row, on disk."""

    def __init__(self, root, kind: str, key: dict):
        self.key = {"version": CACHE_VERSION, "kind": kind, **key}
        digest = hashlib.sha256(json.dumps(self.key, sort_keys=True, default=str).encode()).hexdigest()[:16]
        self.folder = Path(root) / f"{kind}-{digest}"
        self._handles: dict[int, object] = {}
        self._meta: dict[int, dict] = {}

    @property
    def ready(self) -> bool:
        marker = self.folder / "cache.json"
        if not marker.is_file():
            return False
        try:
            return json.loads(marker.read_text()) == json.loads(json.dumps(self.key, default=str))
        except ValueError:
            return False

    def _shard(self, s: int) -> Path:
        return self.folder / f"shard_{s:05d}.safetensors"

    def build(
        self,
        n_rows: int,
        encode: Callable[[int], tuple[dict[str, torch.Tensor], dict]],
        rank: int = 0,
        world: int = 1,
        barrier: Callable[[], None] = lambda: None,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        """Encode every row not yet on disk: ``encode(i)`` → (tensors, metadata) of row i."""
        from safetensors.torch import save_file

        if not self.ready:
            self.folder.mkdir(parents=True, exist_ok=True)
            for s in range(rank, -(-n_rows // SHARD_ROWS), world):
                if self._shard(s).is_file():
                    continue  # written by an earlier, interrupted run
                tensors, meta = {}, {}
                for i in range(s * SHARD_ROWS, min((s + 1) * SHARD_ROWS, n_rows)):
                    row_tensors, meta[str(i)] = encode(i)
                    tensors.update(
                        {f"{i}.{name}": t.detach().to("cpu").contiguous() for name, t in row_tensors.items()}
                    )
                    if progress is not None:
                        progress(1)
                tmp = self._shard(s).with_suffix(f".tmp{os.getpid()}")
                save_file(tensors, tmp, metadata={"rows": json.dumps(meta)})
                os.replace(tmp, self._shard(s))
            barrier()
            if rank == 0:
                tmp = self.folder / f"cache.json.tmp{os.getpid()}"
                tmp.write_text(json.dumps(self.key, indent=1, default=str))
                os.replace(tmp, self.folder / "cache.json")
        barrier()

    def get(self, i: int) -> tuple[dict[str, torch.Tensor], dict]:
        """Row i's tensors (on the CPU) and metadata."""
        from safetensors import safe_open

        s = i // SHARD_ROWS
        if s not in self._handles:
            handle = safe_open(self._shard(s), "pt")
            self._handles[s] = handle
            self._meta.update({int(k): v for k, v in json.loads(handle.metadata()["rows"]).items()})
        handle, prefix = self._handles[s], f"{i}."
        tensors = {k[len(prefix) :]: handle.get_tensor(k) for k in handle.keys() if k.startswith(prefix)}
        return tensors, self._meta[i]


def rows_digest(rows) -> str:
    """A hash of what the rows' encodings depend on: their images (path, size, modification time) and text."""
    h = hashlib.sha256()
    for row in rows:
        for path in [*row.references, row.target]:
            st = Path(path).stat()
            h.update(f"{path}:{st.st_size}:{st.st_mtime_ns}".encode())
        h.update(row.instruction.encode())
    return h.hexdigest()[:16]
