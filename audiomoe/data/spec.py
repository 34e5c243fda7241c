"""The ``data:`` section of a config: sources, sampling, batching and augmentation, validated strictly.

Example (YAML)::

    data:
      sample_rate: 16000
      max_seconds: 60          # audio seconds per batch (padded length x items)
      sampling: {mode: temperature, alpha: 0.5}
      augment: {p: 0.5, snr_db: [5, 20], gain_db: [-6, 6], reverb: 0.3}
      sources:
        asr:     {path: corpus/asr.jsonl, task: asr, weight: 2}
        speaker: {type: hf, path: my_hf_dataset, task: speaker, target_column: label}

Each source has the common keys below (``type`` names a registered ``data_source``, default
``manifest``); every other key is validated against that source's own ``Params``. Like model specs,
every problem is reported at once with its dotted key (``data.sources.asr.weight``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Mapping, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from audiomoe.core.errors import ConfigError, ConfigProblem

COMMON = ("type", "task", "weight", "domain")


class SamplingSpec(BaseModel):
    """How items are drawn across sources/tasks/datasets each epoch.

    - ``natural``: every item once per epoch, shuffled.
    - ``weights``: a group's share of the epoch is its source ``weight`` (normalised).
    - ``temperature``: a group's share is ``weight * n ** alpha`` (``alpha=1`` natural, ``0`` uniform).
    - ``balanced``: a fixed seeded subset of ``per_group`` items from each group (UniMoE-Audio stage 2).
    """

    model_config = ConfigDict(extra="forbid")
    mode: Literal["natural", "weights", "temperature", "balanced"] = "natural"
    alpha: float = Field(0.5, ge=0.0, le=1.0, description="temperature exponent: p ~ n**alpha")
    group_by: Literal["source", "task", "dataset", "domain"] = Field("source", description="what a group is")
    per_group: int = Field(100, ge=1, description="balanced: items per group")
    epoch_items: Optional[int] = Field(None, ge=1, description="items per epoch for weights/temperature (default: all)")


class AugmentSpec(BaseModel):
    """On-the-fly augmentation, seeded per item and epoch; each effect applies with probability ``p``."""

    model_config = ConfigDict(extra="forbid")
    p: float = Field(0.5, ge=0.0, le=1.0, description="probability of each effect")
    snr_db: Optional[tuple[float, float]] = Field(None, description="additive noise at an SNR drawn in this range")
    gain_db: Optional[tuple[float, float]] = Field(None, description="gain drawn in this range")
    reverb: float = Field(0.0, ge=0.0, le=2.0, description="max reverb decay time in seconds (0: off)")


class SourceSpec(BaseModel):
    """The keys every source has; the rest belong to the source type's ``Params``."""

    model_config = ConfigDict(extra="allow")
    type: str = Field("manifest", description="registered data_source name")
    task: Optional[str] = Field(None, description="task of every item (overrides the items' own)")
    weight: float = Field(1.0, gt=0.0, description="sampling weight (modes weights / temperature)")
    domain: Optional[str] = Field(None, description="domain label used by group_by: domain")


class DataSpec(BaseModel):
    """The whole ``data:`` section (see the module docstring for an example)."""

    model_config = ConfigDict(extra="forbid")
    sources: dict[str, SourceSpec] = Field(description="named sources")
    sample_rate: int = Field(16000, ge=1000, description="every clip is resampled to this rate")
    max_seconds: float = Field(60.0, gt=0.0, description="padded audio seconds per batch")
    max_items: Optional[int] = Field(None, ge=1, description="cap on items per batch")
    max_clip_seconds: Optional[float] = Field(
        None, gt=0.0, description="crop longer clips (random window) of the crop_tasks"
    )
    crop_tasks: Optional[list[str]] = Field(
        None, description="tasks whose clips may be cropped (clip-level labels); None: every task"
    )
    bucket_batches: int = Field(50, ge=1, description="batches formed together by length (bucketing window)")
    num_workers: int = Field(2, ge=0, description="DataLoader worker processes")
    seed: int = 0
    tasks: Optional[list[str]] = Field(None, description="known task names; an item naming another is an error")
    skip_bad: bool = Field(False, description="skip bad items (counted in a warning) instead of raising")
    sampling: SamplingSpec = Field(default_factory=SamplingSpec)
    augment: Optional[AugmentSpec] = None

    @model_validator(mode="after")
    def _some_source(self) -> "DataSpec":
        if not self.sources:
            raise ValueError("at least one source is needed")
        return self


def _problems(exc: ValidationError, prefix: str) -> list[ConfigProblem]:
    out = []
    for err in exc.errors():
        key = ".".join([prefix] + [str(x) for x in err["loc"]]).strip(".")
        out.append(ConfigProblem(key, err["msg"], err.get("input"), "input" in err and err["type"] != "missing"))
    return out


def load_data_spec(
    config: Any, base_dir: Optional[str | Path] = None, registry: Any = None
) -> tuple[DataSpec, dict[str, Any]]:
    """Validate a ``data:`` mapping (or a YAML path holding one); return the spec and built sources.

    Relative source paths are taken from ``base_dir`` (default: the YAML file's folder). Raises
    :class:`ConfigError` with every problem, each under its dotted key.
    """
    from audiomoe.core.composer import component_builder
    from audiomoe.core.registry import get_registry

    if isinstance(config, (str, Path)):
        import yaml

        base_dir = base_dir or Path(config).parent
        with open(config, encoding="utf-8") as fh:
            config = yaml.safe_load(fh) or {}
    if isinstance(config, Mapping) and set(config) == {"data"}:
        config = config["data"]
    base = Path(base_dir or ".")
    problems: list[ConfigProblem] = []
    spec = None
    try:
        spec = DataSpec.model_validate(config)
    except ValidationError as exc:
        problems += _problems(exc, "data")
    raw_sources = config.get("sources") if isinstance(config, Mapping) else None
    built: dict[str, Any] = {}
    reg = registry or get_registry()
    for name, raw in (raw_sources or {}).items() if isinstance(raw_sources, Mapping) else ():
        if not isinstance(raw, Mapping):
            continue  # already reported by DataSpec
        key = f"data.sources.{name}"
        params = {k: v for k, v in raw.items() if k not in COMMON}
        if isinstance(params.get("path"), str):
            params["path"] = str(base / params["path"])
        try:
            source = component_builder("data_source", {"name": raw.get("type", "manifest"), "params": params}, reg)()
        except ConfigError as exc:  # re-key "data_source.x" problems under this source
            problems += [
                ConfigProblem(key + p.key[len("data_source") :], p.message, p.value, p.has_value) for p in exc.problems
            ]
            continue
        problems += [ConfigProblem(f"{key}.{k}", m) for k, m in source.problems()]
        built[name] = source
    if problems:
        raise ConfigError(problems, source="data config")
    return spec, built
