"""Files in and out: JSON/JSONL loading with file:line errors, atomic writes, run metadata."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import ConfigError, DataError


def _read_text(path: Path) -> str:
    if not path.exists():
        raise DataError(f"{path}: data file not found")
    if path.is_dir():
        raise DataError(f"{path}: is a folder, expected a data file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start})") from None
    if not text.strip():
        raise DataError(f"{path}: data file is empty")
    return text


def check_output_dir(path: str | os.PathLike, key: str = "output_dir") -> Path:
    """Refuse, before any work, an output folder that cannot be one: an existing file, a path under a file, or
    a folder that is not writable. Creates nothing."""
    p = Path(path)
    if not str(path).strip():
        raise ConfigError(f"config key '{key}': empty path")
    for q in (p, *p.parents):
        if q.exists() or q.is_symlink():
            if not q.is_dir():
                what = "is an existing file" if q == p else f"is under {q}, an existing file"
                raise ConfigError(f"config key '{key}': {path} {what}, not a folder")
            if not os.access(q, os.W_OK | os.X_OK):
                raise ConfigError(f"config key '{key}': {q} is not writable")
            break
    return p


def load_json(path: str | os.PathLike) -> Any:
    """One JSON document (e.g. a card), with a one-line DataError naming the file when it is not one."""
    p = Path(path)
    try:
        return json.loads(_read_text(p))
    except json.JSONDecodeError as e:
        raise DataError(f"{p}: not JSON (line {e.lineno}: {e.msg})") from None


def _dataset_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a Hugging Face `datasets` folder (`save_to_disk`: one split, or a DatasetDict whose `train`
    split or only split is read) or a parquet file; each row's `__line__` is its row number (from 1)."""
    try:
        if path.is_dir():
            import datasets

            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                split = "train" if "train" in ds else next(iter(ds)) if len(ds) == 1 else None
                if split is None:
                    raise DataError(f"{path}: a DatasetDict with splits {', '.join(ds)}; give one split's folder "
                                    f"({path}/<split>)")
                ds = ds[split]
            rows = ds.to_list()
        else:
            import pyarrow.parquet as pq

            rows = pq.read_table(str(path)).to_pylist()
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - a user's broken file
        kind = "a Hugging Face datasets folder" if path.is_dir() else "a parquet file"
        raise DataError(f"{path}: not readable as {kind} ({type(e).__name__}: {str(e).splitlines()[0][:160]})") from None
    if not rows:
        raise DataError(f"{path}: the data set has no rows")
    # a column a row has no value in is null there (columnar formats): the field is missing from that row
    return [{**{k: v for k, v in r.items() if v is not None}, "__line__": i} for i, r in enumerate(rows, start=1)]


def load_records(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Load a JSONL file (one object per line), a JSON file (a list, or an object with a list under
    `examples`/`data`/`rows`), a parquet file, or a Hugging Face `datasets` folder (`save_to_disk`). A bad row
    raises DataError naming the file and line (row)."""
    path = Path(path)
    if path.suffix == ".parquet" and path.is_file() or path.is_dir() and (
            (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists() or (path / "state.json").exists()):
        return _dataset_rows(path)
    text = _read_text(path)
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
        if isinstance(data, dict):
            for key in ("examples", "data", "rows"):
                if isinstance(data.get(key), list):
                    data = data[key]
                    break
            else:
                raise DataError(f"{path}: expected a list of rows or an object with 'examples'")
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise DataError(f"{path}: expected a list of JSON objects")
        return data
    rows = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: malformed JSON line ({e.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
        row["__line__"] = lineno
        rows.append(row)
    return rows


def require_field(row: dict, field: str, path: str | os.PathLike, kind: type | tuple = str) -> Any:
    """Return row[field], or raise DataError naming file, line and field."""
    where = f"{path}:{row.get('__line__', '?')}"
    if field not in row:
        raise DataError(f"{where}: missing field '{field}'")
    value = row[field]
    if not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise DataError(f"{where}: field '{field}' should be {names}, got {type(value).__name__}")
    return value


def _fsync_tree(target: Path) -> None:
    """fsync every file under `target` (a file or a folder) and the folders holding them: what is renamed into
    place afterwards is on the disk, not only in the page cache (a power cut keeps the last complete output)."""
    files = [target] if target.is_file() else [p for p in target.rglob("*") if p.is_file()]
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    for d in {f.parent for f in files} | {target.parent}:
        with contextlib.suppress(OSError):  # (some filesystems refuse fsync of a folder)
            fd = os.open(d, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


DISK_FULL = (28, 122)  # ENOSPC, EDQUOT


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling path; on success fsync it and rename it over `path` (file or folder).
    A crash, a kill or a full disk inside the block leaves the old `path` untouched (or no `path`) and no
    half-written file; a full disk raises OutputError naming the folder and what was being written."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    except OSError as e:
        raise _output_error(e, path) from None
    target = tmp / path.name
    try:
        yield target
        _fsync_tree(target)
        if path.exists() and path.is_dir() and not path.is_symlink():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(target, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(target, path)
    except Exception as e:  # (safetensors reports a full disk as its own error type, naming os error 28)
        if disk_full(e):
            raise _output_error(OSError(28, str(e)), path) from None
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def disk_full(e: BaseException) -> bool:
    """A write failed because the device (or the quota) is full."""
    if isinstance(e, OSError) and e.errno in DISK_FULL:
        return True
    text = str(e)
    return "No space left on device" in text or "os error 28" in text or "Disk quota exceeded" in text


def _output_error(e: OSError, path: Path):
    from .errors import OutputError

    if e.errno in DISK_FULL:
        return OutputError(f"{path.parent}: no space left on the device while writing {path.name}; nothing of it was "
                           "written (free space and rerun: finished stages are reused)")
    return e


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=_json_default) + "\n", encoding="utf-8")


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_jsonl(path: str | os.PathLike, rows: list[dict]) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, default=_json_default) + "\n")


def append_jsonl(path: str | os.PathLike, row: dict) -> None:
    """Append one line, whole or not at all: on a failed write (a full disk) the file is cut back to its size
    before, and a full disk raises OutputError."""
    data = (json.dumps(row, default=_json_default) + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    size = os.fstat(fd).st_size
    try:
        written = 0
        while written < len(data):
            written += os.write(fd, data[written:])
    except OSError as e:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, size)
        raise _output_error(e, Path(path)) from None
    finally:
        os.close(fd)


def save_figure(fig, path: str | os.PathLike, dpi: int = 110) -> None:
    """A matplotlib figure as PNG, written whole or not at all; the figure is closed."""
    import matplotlib.pyplot as plt

    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=dpi, format="png")
    finally:
        plt.close(fig)


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def versions() -> dict[str, str]:
    import torch
    import transformers

    from . import __version__

    return {
        "distillability": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
    }
