"""ZIP-FIT selection on a Ray cluster through Ray Data (the engine of curation pipelines such as NeMo
Curator, DataTrove and DCLM).

The pipeline::

    files ──from_items──▶ read (a task per file: lmkern.data.readers, so keys and bad-record rules
                          │    are those of the local engine)   rows: key int64, text bytes
                          ▼
          map_batches(_ZipFitActor, concurrency=N)   a stateful actor per worker holds the targets
                          │    compressed once (a lmkern.ncd.Scorer over _core.NcdScorer) and scores
                          │    each batch in Rust; it returns only its batch's top k as (key, score)
                          ▼    and one count row
          driver: exact global top-k merge (TopK: score desc, key asc), then one streaming pass
                  over the files to fetch the k winning records

Only (key, score) pairs travel back to the driver, never texts. The result is the local engine's,
bit for bit: the same Rust scorer, the same keys, the same tie rule.

Source paths must be readable from every Ray node (a shared file system); each actor holds one copy
of the targets and uses lmkern's threads (Ray gives each actor `actor_cpus` CPUs; lmkern follows
torch's thread count, which Ray sets from it).
"""
from __future__ import annotations

import time
from typing import Iterable, Sequence

import numpy as np

from .. import ncd as _ncd
from .local import DEFAULT_BATCH, Progress, Selection, TopK, fetch_records
from .readers import PathLike, Reader, list_files


def _read_files(batch: dict, text_field: str, bad_records: str, rows_per_batch: int):
    """Ray Data UDF: read the files of `batch` (usually one) and yield {key, text} batches."""
    for path, fi in zip(batch["path"], batch["file_index"]):
        reader = Reader([str(path)], text_field, bad_records)
        keys: list[int] = []
        texts: list[bytes] = []
        for rec in reader:
            keys.append(rec.key + (int(fi) << 40))  # the reader numbered this file 0: shift to its index
            texts.append(rec.text)
            if len(keys) >= rows_per_batch:
                yield _rows(keys, texts)
                keys, texts = [], []
        if keys:
            yield _rows(keys, texts)


def _rows(keys: list[int], texts: list[bytes]) -> dict:
    t = np.empty(len(texts), dtype=object)
    t[:] = texts
    return {"key": np.asarray(keys, dtype=np.int64), "text": t}


class _ZipFitActor:
    """A Ray Data callable class: one per actor, holding the compressed targets."""

    def __init__(self, targets: list[bytes], level: int, k: int):
        import warnings

        with warnings.catch_warnings():  # the driver already warned about level 0
            warnings.simplefilter("ignore", _ncd.Level0Warning)
            self.scorer = _ncd.Scorer(targets, level)
        self.k = k

    def __call__(self, batch: dict) -> dict:
        keys = np.asarray(batch["key"], dtype=np.int64)
        scores = self.scorer.alignment(list(batch["text"]))
        best = np.lexsort((keys, -scores))[: self.k]  # the batch's own top k, score desc, key asc
        # One extra row carries the batch's size (key -1) so the driver can count sources.
        return {
            "key": np.concatenate([keys[best], np.array([-1], dtype=np.int64)]),
            "score": np.concatenate([scores[best], np.array([np.nan])]),
            "n": np.concatenate([np.zeros(len(best), dtype=np.int64), np.array([len(keys)], dtype=np.int64)]),
        }


def _user_error(e: BaseException) -> BaseException | None:
    """The lmkern error (DataError, ValueError, TypeError, OSError) that a Ray task raised, unwrapped
    from Ray's exceptions, or None when the failure is Ray's own."""
    import ray.exceptions

    seen = 0
    while e is not None and seen < 20:
        seen += 1
        if not isinstance(e, ray.exceptions.RayError) and isinstance(e, (ValueError, TypeError, OSError)):
            return e
        e = getattr(e, "cause", None) or e.__cause__
    return None


def select_ray(
    source: PathLike | Sequence[PathLike],
    targets: Iterable[_ncd.Text],
    k: int,
    *,
    level: int = 9,
    text_field: str = "text",
    batch_size: int = DEFAULT_BATCH,
    bad_records: str = "error",
    num_actors: int | None = None,
    actor_cpus: float = 1.0,
    address: str | None = None,
    progress: bool | Progress | None = None,
    fetch: bool = True,
) -> Selection:
    """ZIP-FIT selection of the k records of `source` best aligned to `targets`, on Ray Data.

    Uses the running Ray instance, or connects to `address`, or starts a local one (shut down
    again at the end). `num_actors` scoring actors (default: the cluster's CPUs less one for the
    readers, at least 1), each asking for `actor_cpus` CPUs. With fetch=False only keys and scores
    come back (records=None). Same result as :func:`lmkern.data.select_local`. With
    bad_records="skip" the read tasks skip bad records but do not report how many (skipped = 0).
    """
    import ray

    k = _ncd._check_k(k)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected an int >= 1; got {batch_size!r}")
    # Check everything on the driver first: clear errors here, not inside a Ray task.
    target_bytes = _ncd.encode_texts(targets, "target")
    level = _ncd._check_level(level)
    if not target_bytes:
        raise ValueError("target: expected at least one target text (the alignment is a mean over targets); got none")
    files = list_files(source, "source")
    Reader(files, text_field, bad_records)  # validates text_field and bad_records

    started = False
    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=False, include_dashboard=False)
        started = True
    try:
        if num_actors is None:
            cpus = int(ray.cluster_resources().get("CPU", 1))
            num_actors = max(1, cpus - 1)
        if isinstance(num_actors, bool) or not isinstance(num_actors, int) or num_actors < 1:
            raise ValueError(f"num_actors: expected an int >= 1; got {num_actors!r}")
        t0 = time.perf_counter()
        files_ds = ray.data.from_items(
            [{"path": p, "file_index": i} for i, p in enumerate(files)], override_num_blocks=len(files)
        )
        records = files_ds.map_batches(
            _read_files, batch_size=1, num_cpus=0.5,
            fn_kwargs={"text_field": text_field, "bad_records": bad_records, "rows_per_batch": batch_size},
        )
        scored = records.map_batches(
            _ZipFitActor, batch_size=batch_size, batch_format="numpy", num_cpus=actor_cpus,
            compute=ray.data.ActorPoolStrategy(size=num_actors),
            fn_constructor_kwargs={"targets": target_bytes, "level": level, "k": k},
        )
        if progress is True:
            progress = Progress(len(target_bytes), len(files))
        top = TopK(k)
        n_sources = 0
        try:
            for out in scored.iter_batches(batch_format="numpy", batch_size=None):
                count = out["key"] < 0
                n = int(out["n"][count].sum())
                n_sources += n
                real = ~count
                top.push_many(out["score"][real], out["key"][real])
                if progress and n:
                    progress.update(n, len(files) - 1)
        except Exception as e:
            cause = _user_error(e)
            if cause is None:
                raise
            raise cause from None  # the reader's own message (file:line), not Ray's wrapping of it
        if progress:
            progress.close(len(files) - 1)
        items = top.items()
        keys = np.array([key for _, key, _ in items], dtype=np.int64)
        sel = Selection(
            keys=keys,
            scores=np.array([s for s, _, _ in items], dtype=np.float64),
            records=None,
            n_sources=n_sources,
            n_targets=len(target_bytes),
            seconds=time.perf_counter() - t0,
            files=files,
        )
    finally:
        if started:
            ray.shutdown()
    if fetch:
        sel.records = fetch_records(files, sel.keys.tolist(), text_field, bad_records)
    return sel
