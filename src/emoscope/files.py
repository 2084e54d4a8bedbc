"""Small file I/O every long job shares: atomic writes, append-only JSONL, run-folder identity.

Readers must only ever see complete files, a crash or Ctrl-C must lose nothing already written,
and a folder must never mix two different runs. Everything here serves one of those three rules,
so no other module needs its own copy.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import torch

from emoscope.errors import RunDirectoryError


def default_mode(directory: bool = False) -> int:
    """The mode a plain ``open(..., "w")`` (or ``mkdir``) would give a new file (or folder).

    Temporary files and folders are created private (0600/0700); whatever is renamed into place
    gets this mode instead, so it is as readable as anything else written under the umask.
    """
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


def _umask_mode() -> int:
    return default_mode()


@contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one step.

    The new file gets the mode an ordinary write would give it (not the temporary file's 0600),
    so another user on a shared machine can read a bank exactly as they could any other file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(fd)
    partial = Path(name)
    try:
        yield partial
        os.chmod(partial, _umask_mode())
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def atomic_write_text(path: Path | str, text: str) -> Path:
    with atomic_path(path) as partial:
        partial.write_text(text, encoding="utf-8")
    return Path(path)


def atomic_write_json(path: Path | str, data: Any) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=1, ensure_ascii=False, default=float))


@contextmanager
def atomic_open(path: Path | str) -> Iterator[IO[str]]:
    """A text file handle whose content appears at ``path`` only once the block completes."""
    with atomic_path(path) as partial, partial.open("w", encoding="utf-8") as handle:
        yield handle


def atomic_save_tensors(
    tensors: Mapping[str, torch.Tensor], path: Path | str, metadata: dict[str, str] | None = None
) -> Path:
    """Write a safetensors file so that readers only ever see a complete one."""
    from safetensors.torch import save_file

    with atomic_path(path) as partial:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(partial), metadata=metadata)
    return Path(path)


def read_json(path: Path | str, what: str = "file") -> Any:
    """Parse a JSON file, turning a missing or corrupt file into :class:`RunDirectoryError`."""
    path = Path(path)
    try:
        return json.loads(path.read_text("utf-8"))
    except FileNotFoundError:
        raise RunDirectoryError(f"No such {what}: {path}") from None
    except ValueError as exc:
        raise RunDirectoryError(
            f"{path} is not valid JSON ({exc}); remove it to start over."
        ) from None


def append_jsonl(path: Path | str, records: Iterable[Mapping[str, Any]]) -> None:
    """Append whole lines and flush them to disk, so a kill loses at most what is in flight.

    A torn last line from an earlier crash is terminated first so that it cannot swallow the
    first new record.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = "".join(json.dumps(r, ensure_ascii=False, default=float) + "\n" for r in records)
    if not payload:
        return
    with path.open("a+b") as f:
        if f.tell() > 0:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")
        f.write(payload.encode("utf-8"))
        f.flush()
        os.fsync(f.fileno())


def iter_complete_jsonl(path: Path | str) -> Iterator[dict[str, Any]]:
    """Yield the objects of an append-only log, skipping a torn final line left by a crash."""
    if not Path(path).exists():
        return
    with Path(path).open(encoding="utf-8") as f:
        for raw in f:
            if not raw.endswith("\n"):
                return
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError:
                continue
            if isinstance(obj, dict):
                yield obj


def claim_folder(
    out: Path | str,
    identity: Mapping[str, Any],
    record_name: str = "run.json",
    describe: Callable[[list[str], Mapping[str, Any]], str] | None = None,
    owned_files: Iterable[str] = (),
) -> None:
    """Create ``out`` or confirm it already holds this same run; never mix two runs in one folder.

    ``identity`` is what the folder's contents depend on; it is written to ``record_name`` on
    first use and compared on every later one. A folder that is neither empty nor marked as a
    run (``owned_files`` may name files that also prove it is one, without a record) is refused.
    """
    out = Path(out)
    record = out / record_name
    if record.exists():
        previous = read_json(record, "run record")
        if not isinstance(previous, dict):
            raise RunDirectoryError(f"{record} is not a run record; remove {out} to start over.")
        changed = [k for k in identity if previous.get(k) != identity[k]]
        if changed:
            detail = (
                describe(changed, previous) if describe else f"differs in: {', '.join(changed)}"
            )
            raise RunDirectoryError(
                f"{out} holds a different run ({detail}). Choose another --out, or delete that "
                "folder to start over."
            )
        return
    if out.exists() and not out.is_dir():
        raise RunDirectoryError(f"{out} is a file, not a folder; choose another --out.")
    if out.exists() and any(out.iterdir()):
        stray = [name for name in owned_files if (out / name).exists()]
        hint = f" (it has {', '.join(stray)} but no {record_name})" if stray else ""
        raise RunDirectoryError(
            f"{out} is not empty and is not an emoscope run folder{hint}; choose another --out."
        )
    from emoscope import __version__

    atomic_write_json(record, dict(identity, emoscope_version=__version__))
