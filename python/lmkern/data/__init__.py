"""ZIP-FIT data selection over corpora: pick the k source records whose text is best
aligned to a target set, 1 − mean_j NCD(source, target_j), computed by lmkern's Rust scorer.

- :func:`select` / :func:`select_local`: stream files (JSON Lines, Parquet, plain text: one line per
  record; see :mod:`lmkern.data.readers`) in batches through one scorer, with a bounded top-k heap:
  memory O(k + batch), whatever the corpus size.
- :func:`select_ray`: the same selection on a Ray cluster through Ray Data (``pip install
  "lmkern[ray]"``): a stateful scoring actor per worker, only (key, score) pairs travel, a global
  top-k merge. Same result as the local engine.
- :func:`read_texts` loads a target set; :func:`write_records` writes a selection's rows (``.parquet``
  → Parquet, anything else → JSON Lines).

The `lmkern zipfit` command wraps these.
"""
from __future__ import annotations

from .local import Selection, TopK, fetch_records, select_local, write_records
from .readers import DataError, Record, iter_records, list_files, read_texts

__all__ = [
    "DataError", "Record", "Selection", "TopK", "fetch_records", "iter_records", "list_files", "read_texts",
    "select", "select_local", "select_ray", "write_records",
]


def select_ray(*args, **kwargs) -> Selection:
    """ZIP-FIT selection on Ray Data; see :func:`lmkern.data.ray_engine.select_ray` (needs ray[data])."""
    try:
        import ray.data  # noqa: F401
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(f"engine 'ray' needs Ray Data: pip install 'lmkern[ray]' ({e})") from e
    from .ray_engine import select_ray as impl

    return impl(*args, **kwargs)


def select(source, targets, k: int, *, engine: str = "local", **kwargs) -> Selection:
    """ZIP-FIT selection with the local engine (default) or engine="ray"; see select_local / select_ray."""
    if engine == "local":
        return select_local(source, targets, k, **kwargs)
    if engine == "ray":
        return select_ray(source, targets, k, **kwargs)
    raise ValueError(f"engine: expected 'local' or 'ray'; got {engine!r}")
