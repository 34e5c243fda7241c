"""CSV of labels (+ a folder of audio files) -> JSONL manifest: ``audiomoe data from-csv``.

The CSV is what a spreadsheet writes: UTF-8 with or without a BOM (Excel's "CSV UTF-8"), a header
row, one item per row. Every row is validated by the manifest's own rules before anything is
written, each problem naming the CSV file and line; the manifest is then written atomically and
never over the CSV itself.
"""

from __future__ import annotations

import csv
import io
import math
import os
from pathlib import Path
from typing import Any, Optional

from audiomoe.core.atomic import check_output
from audiomoe.core.errors import AudioMoEError, short_repr
from audiomoe.data.manifest import Item, audio_info, read_text_file, resolve_path, validate_line, write_manifest

#: Columns copied into the manifest line as they are; any other column goes to ``meta``.
COPIED = ("split", "prompt", "dataset")


def read_csv_rows(csv_path: Path) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """``(header, [(line, row), ...])`` of a CSV file; undecodable bytes and broken quoting name the line."""
    text = read_text_file(csv_path, "CSV", "in a spreadsheet: Save As 'CSV UTF-8'")
    reader = csv.DictReader(io.StringIO(text, newline=""), strict=True)  # strict: an unclosed quote is no giant cell
    rows: list[tuple[int, dict[str, str]]] = []
    start = 1
    try:
        header = list(reader.fieldnames or [])
        start = reader.line_num + 1
        for row in reader:
            rows.append((reader.line_num, row))
            start = reader.line_num + 1
    except csv.Error as exc:
        raise AudioMoEError(
            f"{csv_path}:{start}: not a readable CSV row ({exc}); fix the quotes of the row starting on this line"
        ) from None
    return header, rows


def _seconds(origin: str, key: str, cell: Optional[str]) -> Optional[float]:
    """A time cell as seconds (empty: None); anything else than a finite number >= 0 is named."""
    if cell is None or not cell.strip():
        return None
    try:
        value = float(cell)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise AudioMoEError(
            f"{origin}: '{key}' must be a number of seconds >= 0, got {short_repr(cell)}; "
            "fix the cell or leave it empty"
        )
    return value


def manifest_from_csv(
    csv_path: str | os.PathLike,
    out: str | os.PathLike,
    *,
    audio_dir: Optional[str | os.PathLike] = None,
    task: str,
    audio_column: str = "file",
    target_column: str = "label",
) -> Path:
    """Turn a folder of audio files + a CSV of labels into a JSONL manifest (the "own data" path).

    The CSV has a header; ``audio_column`` holds file names relative to ``audio_dir`` (default: the
    CSV's folder), ``target_column`` the label or transcript. Columns ``split``, ``prompt``,
    ``dataset``, ``offset`` and ``duration`` are copied when present; any other column goes to ``meta``.
    ``out`` may not be the CSV itself, a directory, or a link loop (checked before the CSV is read).
    """
    csv_path, out = Path(csv_path), Path(out)
    check_output(out, inputs=[csv_path], what="output manifest", make_parent=True)
    base = Path(audio_dir) if audio_dir is not None else csv_path.parent
    header, rows = read_csv_rows(csv_path)
    twice = sorted({c for c in header if header.count(c) > 1})
    if twice:
        raise AudioMoEError(f"{csv_path}:1: column(s) {twice} appear more than once in the header; rename one")
    for col in (audio_column, target_column):
        if col not in header:
            raise AudioMoEError(
                f"{csv_path}: no column '{col}' (columns: {header}); name it with "
                f"--{'audio' if col == audio_column else 'target'}-column"
            )
    root = out.resolve().parent
    items = []
    for lineno, row in rows:
        origin = f"{csv_path}:{lineno}"
        if None in row:  # more cells than header names: DictReader files them under None
            cells = len(row[None]) + len(header)  # type: ignore[index]  # DictReader's None key holds the extra cells
            raise AudioMoEError(f"{origin}: {cells} cells for {len(header)} columns; quote cells that hold commas")
        row = {k: v or "" for k, v in row.items()}  # fewer cells than columns: the missing ones are empty
        audio, target = (row.pop(c).strip() for c in (audio_column, target_column))
        for col, value in ((audio_column, audio), (target_column, target)):
            if not value:  # checked before anything is written: no manifest with a half-read CSV
                raise AudioMoEError(f"{origin}: empty '{col}' cell; every row needs one (fill it or remove the row)")
        path = resolve_path(base, audio, origin)
        offset, duration = (_seconds(origin, k, row.pop(k, None)) for k in ("offset", "duration"))
        if not duration:  # an empty (or 0) cell: the rest of the file
            duration = audio_info(path, origin) - (offset or 0.0)
            if duration <= 0:
                raise AudioMoEError(f"{origin}: offset {offset} s is at or past the end of '{path}'; fix the offset")
        raw: dict[str, Any] = {
            "audio": path,
            "task": task,
            "target": target,
            "offset": offset or 0.0,
            "duration": duration,
            "meta": {k: v for k, v in row.items() if v and k not in COPIED},
        }
        raw.update({k: row[k] for k in COPIED if row.get(k)})
        it = validate_line(raw, root, origin, None, check_files=True)  # the manifest's own rules, with this row named
        items.append(
            Item(
                it.audio,
                task,
                target,
                it.offset,
                it.duration,
                it.prompt,
                it.dataset,
                row.get("split", ""),
                it.meta,
                origin,
            )
        )
    if not items:
        raise AudioMoEError(f"{csv_path}: no rows under the header; add one row per audio file")
    return write_manifest(items, out)


__all__ = ["manifest_from_csv", "read_csv_rows"]
