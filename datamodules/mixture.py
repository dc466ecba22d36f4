"""Dataset mixtures: ``data`` as a list of weighted sources (`DataSource`), each read in its own format, held out
apart and combined into one training list (`mix_sources`) that the resumable sampler then serves like any other.

Example (YAML)::

    data:
      - {path: builtin:sft, weight: 1.0}
      - {path: other.jsonl, weight: 0.5, source_format: prompt_response}
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class DataSource:
    """One source of a mixture.

    Args:
        path: what the module's ``data`` takes (a local file, a hub id, ``builtin:...``).
        weight: the fraction of the source's usable training rows used per epoch: ``2.0`` every row twice, ``0.5`` a
            seeded half, ``1.5`` every row once and a seeded half again (whole copies for the integer part, a subset
            drawn once from the module's ``seed`` for the fraction). Must be > 0.
        source_format: this source's format (None: the module's ``source_format``).
        split: the split read from it (None: the module's ``split``).
        max_rows: read only its first ``max_rows`` rows (None: the module's ``max_rows``).
    """

    path: str
    weight: float = 1.0
    source_format: str | None = None
    split: str | None = None
    max_rows: int | None = None


FIELDS = tuple(f.name for f in dataclasses.fields(DataSource))


def check_sources(owner: str, data: Any, formats: Sequence[str]) -> list[DataSource] | None:
    """``data`` as a list of checked `DataSource` (None for a plain string: one source, read as before mixtures).

    Accepts `DataSource` objects and mappings with its fields (what a checkpoint or Python code holds). Raises a
    ValueError naming the module, the source (``data[1] 'other.jsonl'``) and the field: an empty list, a missing
    path, an unknown field, a weight that is not a number > 0, a ``source_format`` the module does not read, a
    ``max_rows`` below 1."""
    if isinstance(data, str):
        return None
    if not isinstance(data, Sequence) or not data:
        raise ValueError(f"{owner}: data is {data!r}; give a source (a path, hub id or builtin:...) or a non-empty "
                         "list of sources, e.g. [{path: a.jsonl, weight: 1.0}, {path: b.jsonl, weight: 0.5}]")
    sources = []
    for k, item in enumerate(data):
        where = f"{owner}: data[{k}]"
        if isinstance(item, Mapping):
            unknown = sorted(set(item) - set(FIELDS))
            if unknown:
                raise ValueError(f"{where} {item.get('path', '')!r} has unknown field(s) {', '.join(unknown)}; a "
                                 f"source has {', '.join(FIELDS)}")
            if "path" not in item:
                raise ValueError(f"{where} has no path; give each source a path (a file, hub id or builtin:...)")
            item = DataSource(**item)
        if not isinstance(item, DataSource):
            raise ValueError(f"{where} is {item!r}; a source is a mapping with {', '.join(FIELDS)}")
        where += f" {item.path!r}"
        if not isinstance(item.path, str) or not item.path:
            raise ValueError(f"{where}: path must be a non-empty string")
        weight = item.weight
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight <= 0:
            raise ValueError(f"{where}: weight is {weight!r}; it must be a number > 0 (the fraction of the source's "
                             "rows used per epoch; leave the source out instead of weighting it 0)")
        if item.source_format is not None and item.source_format not in formats:
            raise ValueError(f"{where}: source_format {item.source_format!r} is not one of {', '.join(formats)}")
        if item.max_rows is not None and (isinstance(item.max_rows, bool) or not isinstance(item.max_rows, int)
                                          or item.max_rows < 1):
            raise ValueError(f"{where}: max_rows is {item.max_rows!r}; it must be an integer >= 1 (or null: all)")
        sources.append(dataclasses.replace(item, weight=float(weight)))
    return sources


def as_plain(data: Any, sources: list[DataSource] | None) -> Any:
    """What a module keeps in its hyperparameters for ``data``: the string, or the sources as plain dicts (so a
    checkpoint loads with ``torch.load(weights_only=True)``, as LightningCLI's ``--ckpt_path`` does)."""
    return data if sources is None else [dataclasses.asdict(s) for s in sources]


def resolve(source: str | DataSource, source_format: Any, split: Any, max_rows: int | None) -> DataSource:
    """``source`` as a `DataSource` whose unset fields take the module's values (a plain path: all of them)."""
    if isinstance(source, str):
        source = DataSource(source)
    return dataclasses.replace(
        source, source_format=source.source_format if source.source_format is not None else source_format,
        split=source.split if source.split is not None else split,
        max_rows=source.max_rows if source.max_rows is not None else max_rows)


def weighted(rows: Sequence[T], weight: float, rng: random.Random) -> list[T]:
    """``rows`` ``int(weight)`` times, then a ``rng``-drawn subset of ``round(frac(weight) * len(rows))`` of them (in
    file order). Every returned row is a shallow copy, so per-split fields set later (``index``) stay apart."""
    whole = int(weight)
    extra = sorted(rng.sample(range(len(rows)), round((weight - whole) * len(rows))))
    return [copy.copy(r) for _ in range(whole) for r in rows] + [copy.copy(rows[i]) for i in extra]


def mix_sources(sources: Sequence[DataSource], read: Callable[[DataSource], list[T]], seed: int,
                holdout: Callable[[list[T], DataSource], tuple[list[T], list[T]]] | None = None,
                ) -> tuple[list[T], list[T], dict[str, int]]:
    """Read every source, hold out its validation rows (``holdout``; None: none), weight its training rows
    (`weighted`, seeded by ``seed`` and the source's position) and concatenate them in source order.

    Returns ``(train, validation, counts)``; ``counts`` holds, per source ``data[k] <path>``, its usable rows
    (``rows read``), those held out and the training rows used per epoch (``rows used``), also logged. Validation
    rows are never weighted (each counts once) and a training row's copies never reach validation."""
    train: list[T] = []
    val: list[T] = []
    counts: dict[str, int] = {}
    for k, source in enumerate(sources):
        rows = read(source)
        fit, held = holdout(rows, source) if holdout is not None else (rows, [])
        used = weighted(fit, source.weight, random.Random(f"mixture:{seed}:{k}"))
        name = f"data[{k}] {source.path}"
        counts.update({f"{name}: rows read": len(rows), f"{name}: rows held out": len(held),
                       f"{name}: rows used": len(used)})
        log.info("Mixture %s: %d usable rows, %d held out, %d training rows per epoch (weight %g)", name, len(rows),
                 len(held), len(used), source.weight)
        if not used:
            log.warning("Mixture %s: weight %g uses none of its %d training rows", name, source.weight, len(fit))
        train += used
        val += held
    if not train:
        raise ValueError(f"the mixture has no training rows: {counts}; raise the weights")
    return train, val, counts
