"""Atomic file writes: write to a temporary file in the same folder, fsync, rename.
A crash or kill leaves either the old file or the new one, never half of one."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

from namedmask.errors import BadInputError, OutputStateError

# The name pattern of atomic_path's temporaries: ".<name>.<random>.tmp<suffix>".
_TEMPORARY_GLOB = ".*.tmp*"
_LOCK_FILE = ".namedmask.lock"


class OutputFolderError(OutputStateError):
    """An output folder that a stage may not write into (not ours, locked, unwritable),
    or an output path that escapes its folder. The message names the path."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path next to `path`; renamed onto `path` if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        # mkstemp makes 0600, and writers that recreate the file (safetensors) do too:
        # give the finished file the usual mode just before it takes its name.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        try:
            with open(tmp, "wb") as f:  # (the module's `open`: every write of ours goes through it)
                f.write(data)
        except OSError as exc:  # a full disk: Python's message names no file
            raise OSError(exc.errno, f"{exc.strerror or exc}: cannot write {path}") from None


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    write_text(path, json.dumps(obj, indent=indent, sort_keys=False, allow_nan=True) + "\n")


def fingerprint(obj: Any) -> str:
    """sha256 of obj's canonical JSON: equal settings, equal fingerprint, across runs."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


class InputFileError(BadInputError):
    """A user's input file that cannot be read as text; the message names it."""


def read_user_text(path: str | os.PathLike, error: type = InputFileError) -> str:
    """The UTF-8 text of a user's file (every word list, category, template and config file is
    read here); a leading byte-order mark (editors' "UTF-8 with BOM") is dropped, so the first
    name is not "\ufeffcat"; undecodable bytes are an `error` naming the file and the byte
    offset (Python's own message names neither)."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise error(f"{path}: not a UTF-8 text file (byte {exc.start}: {exc.object[exc.start:exc.start + 1]!r}); "
                    f"save it as UTF-8") from None
    except OSError as exc:
        raise error(f"{path}: cannot read ({exc.strerror})") from None


def safetensors_bytes(tensors: dict, metadata: dict | None = None) -> bytes:
    """safetensors' serialisation, byte-identical for equal inputs: the library writes the
    metadata keys in a per-process hash order, so the header is rewritten with them sorted
    (same JSON, same length; only the order of the keys changes)."""
    import struct

    from safetensors.torch import save

    data = bytearray(save(tensors, metadata=metadata))
    if not metadata or len(metadata) < 2:
        return bytes(data)
    (size,) = struct.unpack("<Q", data[:8])
    raw = bytes(data[8:8 + size])
    header = json.loads(raw)
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    if len(text) != len(raw.rstrip(b" ")):
        return bytes(data)  # not the serialisation this expects: keep the library's bytes
    data[8:8 + size] = text + b" " * (size - len(text))
    return bytes(data)


def save_safetensors(tensors: dict, path: str | os.PathLike, metadata: dict | None = None) -> None:
    """Writes a safetensors file atomically and byte-identically for equal inputs (see
    safetensors_bytes). The bytes go through Python's file writes, so a full disk is an OSError
    naming the file (one line in the CLI), not the library's SafetensorError; nothing is left
    half-written."""
    write_bytes(path, safetensors_bytes(tensors, metadata))


def save_torch(obj: Any, path: str | os.PathLike) -> None:
    """torch.save, atomically and byte-identical for equal objects. torch.save to a path names
    the records inside its zip archive after the file, and atomic_path's temporary file has a
    random name, so every write differed; saved to memory the archive is named `archive`
    whatever the file is called (torch.load does not care), then written atomically. A write
    that fails (a full disk) is an OSError naming the file, and nothing is left half-written."""
    import io as _io

    import torch

    buffer = _io.BytesIO()
    torch.save(obj, buffer)
    try:
        write_bytes(path, buffer.getbuffer())
    except OSError as exc:
        raise OSError(exc.errno, f"{exc.strerror or exc}: cannot write {path}") from None


def read_json(path: str | os.PathLike, error: type, missing: str) -> Any:
    """JSON from `path`; a missing or malformed file raises `error` naming the file
    (`missing` tells the user what to do when it does not exist)."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise error(f"{path}: not found; {missing}") from None
    except json.JSONDecodeError as exc:
        raise error(f"{path}: not valid JSON ({exc})") from exc


def save_png(path: str | os.PathLike, image, palette: list[int] | None = None) -> None:
    """Saves a PIL image or a uint8 numpy array (HxW label map or HxWx3 RGB) as PNG."""
    import numpy as np
    from PIL import Image

    img = Image.fromarray(np.asarray(image)) if not isinstance(image, Image.Image) else image
    if palette is not None:
        img = img.convert("P") if img.mode != "P" else img
        img.putpalette(palette)
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")


def inside(root: str | os.PathLike, relative: str | os.PathLike) -> Path:
    """root / relative, proven to stay inside root (no '..' escape, no absolute path,
    no symlinked folder leading out); raises OutputFolderError naming the path otherwise."""
    root = Path(root)
    candidate = root / relative
    if Path(relative).is_absolute() or not _is_within(candidate, root):
        raise OutputFolderError(f"{relative}: leads outside {root} (a '..', an absolute path or a symlinked folder); "
                                f"paths must stay inside it")
    return candidate


def _is_within(path: Path, root: Path) -> bool:
    root_real = os.path.realpath(root)
    real = os.path.realpath(path)
    return real == root_real or real.startswith(root_real.rstrip(os.sep) + os.sep)


def check_writable_dir(folder: str | os.PathLike) -> Path:
    """Creates `folder` if needed and proves it is a writable folder before any work
    starts (not after: a stage must not compute for an hour, then fail to save)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputFolderError(f"{folder}: exists and is not a folder; choose another --out")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-probe.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutputFolderError(f"{folder}: not writable ({exc.strerror}); choose another --out") from None
    return folder


def claim_output_dir(folder: str | os.PathLike, marker: str | tuple) -> Path:
    """A stage writes only into a folder it owns: one that is empty (or new), or one that
    already holds the stage's own `marker` file (its manifest, from an earlier run; a tuple
    names several accepted markers). Anything else — a dataset root, a folder of the user's
    files — is refused."""
    folder = check_writable_dir(folder)
    markers = (marker,) if isinstance(marker, str) else tuple(marker)
    if any((folder / m).is_file() for m in markers):
        return folder
    foreign = sorted(p.name for p in folder.iterdir() if not p.name.startswith(".") and p.name not in markers)
    if foreign:
        shown = ", ".join(foreign[:3]) + (" …" if len(foreign) > 3 else "")
        raise OutputFolderError(
            f"{folder}: holds files this stage did not make ({shown}); use an empty or new --out folder")
    return folder


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Deletes atomic_path temporaries left under `folder` by a killed run. Call it only
    while holding the folder's OutputLock: then no live writer owns any of them."""
    removed = []
    for tmp in Path(folder).rglob(_TEMPORARY_GLOB):
        if tmp.is_file() and not tmp.is_symlink():
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
                removed.append(tmp)
    return removed


class OutputLock:
    """One writer per output folder: an exclusive, non-blocking flock on FOLDER/.namedmask.lock.
    The kernel releases it when the process dies (kill -9 included), so a stale lock file
    never blocks a rerun. A second writer gets an error naming the process that holds it."""

    def __init__(self, folder: str | os.PathLike):
        self.path = Path(folder) / _LOCK_FILE
        self._fd: int | None = None

    def __enter__(self) -> "OutputLock":
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise OutputFolderError(
                f"{self.path.parent}: in use by pid {holder}; wait for it or choose another --out") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing releases the flock; the file stays (harmless, reused)
            self._fd = None


def stage_marker(stage: str) -> str:
    return f".namedmask-{stage}"


@contextlib.contextmanager
def output_folder(folder: str | os.PathLike, stage: str, legacy: tuple = (), enabled: bool = True) -> Iterator[Path]:
    """The one way a stage takes its output folder, before any work: proven writable, owned
    (empty/new, or marked as this stage's by `.namedmask-<stage>` or a `legacy` file of
    runs made before the marker existed), locked against a second writer, and cleaned of
    the temporaries a killed run left. `enabled=False` (non-zero DDP ranks) does nothing."""
    folder = Path(folder)
    if not enabled:
        yield folder
        return
    marker = stage_marker(stage)
    claim_output_dir(folder, (marker, *legacy))
    with OutputLock(folder):
        if not (folder / marker).is_file():
            write_text(folder / marker, f"{stage}\n")
        removed = remove_stale_temporaries(folder)
        if removed:
            import logging

            logging.getLogger(__name__).info("%s: removed %d temporary file(s) of an interrupted run",
                                             folder, len(removed))
        yield folder


def offline_reason(host: str | None) -> str | None:
    """Why nothing can be downloaded from `host` (HF_HUB_OFFLINE set, or no connection), else
    None; a missing model file then fails at once instead of after a minute of hub retries."""
    import socket

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set"
    host = host or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=3).close()
    except OSError as exc:
        return f"{host} is unreachable: {exc}"
    return None
