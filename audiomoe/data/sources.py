"""Data sources: where items come from. Registered as components of kind ``data_source``.

A source turns its params into a list of :class:`~audiomoe.data.manifest.Item`. Built-ins:
``manifest`` (a JSONL manifest, see :mod:`audiomoe.data.manifest`) and ``hf`` (a local Hugging
Face dataset saved with ``save_to_disk``, or an ``audiofolder`` directory, with an ``Audio``
column; the anchor is ``datasets``' own ``Audio`` feature). A plugin adds a source (lhotse cuts,
webdataset shards) exactly like any component::

    @audiomoe.hookimpl
    def audiomoe_register_components(register):
        register("data_source", "lhotse", "acme_data.lhotse:LhotseSource", "lhotse CutSet manifests")

Its class subclasses :class:`DataSource`, declares a pydantic ``Params`` and implements ``items``.
Nothing is downloaded: ``hf`` reads local directories only.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Optional

from pydantic import Field

from audiomoe.core.errors import AudioMoEError, did_you_mean
from audiomoe.core.specs import Params
from audiomoe.data.manifest import Item, read_manifest


class DataSource:
    """Base class of a data source: ``items(...)`` returns its items and the problems it skipped."""

    kind = "data_source"
    Params = Params

    def __init__(self, params: Optional[Params] = None) -> None:
        self.params = params if params is not None else self.Params()

    def problems(self) -> list[tuple[str, str]]:
        """``(key, message)`` for params that are valid types but unusable (a missing path)."""
        return []

    def items(
        self, *, task: Optional[str], tasks: Optional[Iterable[str]], skip_bad: bool
    ) -> tuple[list[Item], list[str]]:
        """Every item (``task`` overrides the items' own; ``tasks`` are the known names)."""
        raise NotImplementedError


def _path_problems(path: Optional[str]) -> list[tuple[str, str]]:
    if not path:
        return [("path", "required: the manifest file or dataset directory")]
    if not os.path.exists(path):
        return [("path", f"'{path}' does not exist")]
    return []


class ManifestSource(DataSource):
    """A JSONL manifest (one item per line; ``audio`` relative to the manifest file)."""

    class Params(Params):
        path: Optional[str] = Field(None, description="the .jsonl manifest (relative to the data config's folder)")
        split: Optional[str] = Field(None, description="keep only lines of this split (train, test, ...)")
        only_tasks: Optional[list[str]] = Field(None, description="keep only lines of these tasks")

    def problems(self) -> list[tuple[str, str]]:
        """A missing or absent manifest path."""
        return _path_problems(self.params.path)

    def items(
        self, *, task: Optional[str], tasks: Optional[Iterable[str]], skip_bad: bool
    ) -> tuple[list[Item], list[str]]:
        """Read the manifest (every problem names the file and line)."""
        p = self.params
        return read_manifest(p.path, task=task, tasks=tasks, split=p.split, only_tasks=p.only_tasks, skip_bad=skip_bad)


class HFSource(DataSource):
    """A local Hugging Face dataset with an ``Audio`` column (``load_from_disk`` dir or an audiofolder)."""

    class Params(Params):
        path: Optional[str] = Field(None, description="directory written by save_to_disk, or an audiofolder directory")
        split: str = Field("train", description="split of a DatasetDict (or of the audiofolder)")
        audio_column: str = Field("audio", description="the Audio column")
        target_column: Optional[str] = Field("label", description="the target column (class labels become their names)")
        task_column: Optional[str] = Field(None, description="a column naming each row's task (else the source's task)")
        prompt_column: Optional[str] = Field(None, description="a column with the text prompt")

    def problems(self) -> list[tuple[str, str]]:
        """A missing or absent dataset directory."""
        return _path_problems(self.params.path)

    def _load(self) -> tuple[list[str], Iterable[dict[str, Any]], Any]:
        """``(columns, rows, label names or None)``; rows carry the audio as ``{"bytes", "path"}``."""
        p = self.params
        if Path(p.path, "dataset_info.json").exists() or Path(p.path, "dataset_dict.json").exists():
            import datasets

            check_saved_dataset(Path(p.path))
            ds = datasets.load_from_disk(p.path)
            if isinstance(ds, datasets.DatasetDict):
                if p.split not in ds:
                    raise AudioMoEError(
                        f"{p.path}: no split '{p.split}'.{did_you_mean(p.split, ds)} Splits: {', '.join(ds)}"
                    )
                ds = ds[p.split]
            if p.audio_column in ds.column_names:
                ds = ds.cast_column(p.audio_column, datasets.Audio(decode=False))  # decode in the workers
            label = ds.features.get(p.target_column) if p.target_column else None
            return ds.column_names, ds, label.names if isinstance(label, datasets.ClassLabel) else None
        return _audiofolder(Path(p.path), p.split)

    def items(
        self, *, task: Optional[str], tasks: Optional[Iterable[str]], skip_bad: bool
    ) -> tuple[list[Item], list[str]]:
        """One item per row; audio stays encoded (decoded in the loader's workers)."""
        import io

        import soundfile as sf

        p = self.params
        columns, rows, names = self._load()
        for col in (p.audio_column, p.target_column, p.task_column, p.prompt_column):
            if col is not None and col not in columns:
                raise AudioMoEError(
                    f"{p.path}: unknown column '{col}'.{did_you_mean(col, columns)} Columns: {', '.join(columns)}"
                )
        known = set(tasks) if tasks is not None else None
        items: list[Item] = []
        bad: list[str] = []
        for row_i, row in enumerate(rows):
            origin = f"{p.path}[{row_i}]"
            try:
                audio = row[p.audio_column] or {}
                blob, path = audio.get("bytes"), audio.get("path")
                if blob is None and (not path or not os.path.exists(path)):
                    raise AudioMoEError(f"{origin}: audio file '{path}' does not exist")
                row_task = task or (row[p.task_column] if p.task_column else None)
                if not row_task:
                    raise AudioMoEError(f"{origin}: no task (set 'task' on the source or 'task_column')")
                if known is not None and row_task not in known:
                    raise AudioMoEError(f"{origin}: unknown task '{row_task}'.{did_you_mean(row_task, known)}")
                try:
                    info = sf.info(io.BytesIO(blob)) if blob is not None else sf.info(path)
                except Exception as exc:
                    raise AudioMoEError(f"{origin}: cannot read audio (corrupt or unsupported): {exc}") from exc
                if info.frames == 0:
                    raise AudioMoEError(f"{origin}: zero-length clip")
                target = row[p.target_column] if p.target_column else None
                if names is not None and target is not None:
                    target = names[target]
                prompt = row[p.prompt_column] if p.prompt_column else None
                items.append(
                    Item(
                        None if blob is not None else path,
                        row_task,
                        target,
                        0.0,
                        info.frames / info.samplerate,
                        prompt,
                        origin=origin,
                        blob=blob,
                    )
                )
            except AudioMoEError as exc:
                if not skip_bad:
                    raise
                bad.append(str(exc))
        if not items:
            raise AudioMoEError(f"{p.path}: dataset is empty ({len(bad)} bad rows skipped)")
        return items, bad


#: The JSON files ``save_to_disk`` writes, at the top and in each split's folder.
_HF_JSON = ("dataset_info.json", "dataset_dict.json", "state.json")


def check_saved_dataset(root: Path) -> None:
    """Refuse a ``save_to_disk`` folder whose JSON files are corrupt, naming the file (``datasets`` names none)."""
    import json

    for folder in [root] + sorted(d for d in root.iterdir() if d.is_dir()):
        for name in _HF_JSON:
            f = folder / name
            if not f.is_file():
                continue
            try:
                json.loads(f.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
                raise AudioMoEError(
                    f"{f}: corrupt dataset file ({exc}); save the dataset again with save_to_disk"
                ) from None


_AUDIO_EXT = (".wav", ".flac", ".ogg", ".mp3", ".opus")


def _audiofolder(root: Path, split: str) -> tuple[list[str], list[dict[str, Any]], Any]:
    """Read the ``audiofolder`` layout directly (``datasets``' builder would need torchcodec).

    ``root[/split]/metadata.csv`` (or ``metadata.jsonl``) with a ``file_name`` column and any
    others; without metadata, labels are the names of class sub-folders.
    """
    import csv
    import json

    base = root / split if (root / split).is_dir() else root
    rows: list[dict[str, Any]] = []
    if (base / "metadata.jsonl").exists():
        with open(base / "metadata.jsonl", encoding="utf-8") as fh:
            rows = [json.loads(line) for line in fh if line.strip()]
    elif (base / "metadata.csv").exists():
        with open(base / "metadata.csv", newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
    else:
        files = sorted(f for f in base.rglob("*") if f.suffix.lower() in _AUDIO_EXT)
        rows = [{"file_name": str(f.relative_to(base)), "label": f.parent.name} for f in files]
    columns = ["audio"] + sorted({k for r in rows for k in r} - {"file_name"})
    out = [
        {
            **{k: v for k, v in r.items() if k != "file_name"},
            "audio": {"bytes": None, "path": str(base / r.get("file_name", ""))},
        }
        for r in rows
    ]
    return columns, out, None
