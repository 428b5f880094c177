"""The `lmkern` command.

  lmkern --version
  lmkern info                                   version, torch, CUDA status, threads
  lmkern bench [--device cpu|cuda|all] [--quick] [--op NAME] [--threads N] [--json PATH]
  lmkern convert SRC DST --to rms|crms [--recenter-writers] [--dtype D] [--no-check]
  lmkern zipfit --source S [S ...] --target T [T ...] -k K --out O [--level L] [--text-field F]
                [--engine local|ray] [--batch-size N] [--bad-records error|skip] [--threads N]

`bench` checks every op against its float64 reference and times it against its peer (see
lmkern.bench); it exits 1 when an op fails or exceeds its tolerance, 2 when --device cuda is asked
for and lmkern's CUDA path is unavailable. `convert` (lmkern.convert) reads a saved model directory
(save_pretrained), writes the converted one, and checks its logits against the original's on random
tokens; it exits 1 when they differ by more than the dtype's tolerance, 2 when the model is unsupported.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys


def _version() -> str:
    try:  # the installed distribution's version (importing lmkern for it is the fallback)
        from importlib.metadata import version

        return version("lmkern")
    except Exception:
        import lmkern

        return lmkern.__version__


def _info(_args) -> int:
    import torch

    import lmkern

    status = lmkern.cuda_status()
    print(f"lmkern        {lmkern.__version__}  ({os.path.dirname(lmkern.__file__)})")
    print(f"torch         {torch.__version__}  (CUDA {torch.version.cuda or 'none'})")
    print(f"python        {platform.python_version()}  {platform.machine()}  {platform.system()}")
    print(f"cuda_status   {'available' if status is None else status}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            print(f"cuda:{i}        {p.name}, {p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}")
    print(f"threads       lmkern {lmkern.get_num_threads()}, torch {torch.get_num_threads()}, cpus {os.cpu_count()}")
    print(f"cpu_isa       {lmkern.cpu_isa()}")
    print(f"cpu_pool      {lmkern.cpu_pool()}")
    return 0


def _bench(args) -> int:
    import torch

    import lmkern
    from lmkern import bench

    if args.threads:
        torch.set_num_threads(args.threads)
        lmkern.set_num_threads(args.threads)
    if args.json and os.path.isdir(args.json):  # found before the run, not after it
        print(f"lmkern bench: --json {args.json!r} is a directory; give a file path", file=sys.stderr)
        return 2
    status = lmkern.cuda_status()
    devices = []
    if args.device in ("cpu", "all"):
        devices.append("cpu")
    if args.device in ("cuda", "all"):
        if status is None:
            devices.append("cuda")
        elif args.device == "cuda":
            print(f"lmkern bench: lmkern's CUDA path is unavailable here: {status}", file=sys.stderr)
            return 2
        else:
            print(f"(cuda skipped: {status})")
    print(
        f"lmkern {lmkern.__version__}, torch {torch.__version__}, threads {lmkern.get_num_threads()}, "
        f"{'quick' if args.quick else 'full'} run; error = ||out - ref|| / ||ref|| vs float64; "
        "times are medians, interleaved with the peer; speedup = peer time / lmkern time",
        flush=True,
    )
    progress = None if args.no_progress else (lambda line: print("  " + line, file=sys.stderr, flush=True))
    results = bench.run(devices, quick=args.quick, only=args.op, progress=progress)
    if args.json:
        try:
            os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
            with open(args.json, "w") as f:
                json.dump(
                    {"lmkern": lmkern.__version__, "torch": torch.__version__, "quick": args.quick,
                     "threads": lmkern.get_num_threads(), "results": [r.as_dict() for r in results]},
                    f, indent=1, allow_nan=False,
                )
        except OSError as e:
            print(f"lmkern bench: cannot write --json {args.json!r}: {e}", file=sys.stderr)
            return 2
    if not results:
        print("lmkern bench: nothing ran", file=sys.stderr)
        return 1
    return 0 if all(r.ok for r in results) else 1


def _convert(args) -> int:
    from . import convert

    return convert.cli_main(args)


def _zipfit(args) -> int:
    import time

    from lmkern import data as D
    from lmkern.data.local import output_format
    from lmkern.data.readers import Reader, pyarrow_modules

    def fail(msg: str) -> int:
        print(f"lmkern zipfit: error: {msg}", file=sys.stderr)
        return 2

    if args.threads:
        import lmkern

        lmkern.set_num_threads(args.threads)
    try:
        if output_format(args.out) == "parquet":
            pyarrow_modules(args.out)  # before scoring the corpus, not after
        target_reader = Reader(D.list_files(args.target, "target"), args.text_field, args.bad_records)
        targets = [r.text for r in target_reader]
        if not targets:
            return fail(f"target: no records in {', '.join(args.target)}")
        kw = dict(level=args.level, text_field=args.text_field, batch_size=args.batch_size,
                  bad_records=args.bad_records, progress=not args.no_progress)
        if args.engine == "ray":
            kw.update(num_actors=args.num_actors, address=args.ray_address)
        t0 = time.perf_counter()
        sel = D.select(args.source, targets, args.k, engine=args.engine, **kw)
        fmt = D.write_records(args.out, sel.rows())
    except (D.DataError, FileNotFoundError, ValueError, TypeError, ImportError) as e:
        return fail(str(e))
    dt = time.perf_counter() - t0
    best = f", best {sel.scores[0]:.6f}, worst kept {sel.scores[-1]:.6f}" if len(sel.scores) else ""
    skipped = f", {sel.skipped} bad source records skipped" if sel.skipped else ""
    if target_reader.skipped:  # the target set shrank: every score depends on it
        skipped += f", {target_reader.skipped} bad target records skipped (first: {target_reader.first_skipped})"
    print(f"lmkern zipfit: {len(sel.keys)} of {sel.n_sources:,} sources selected against {sel.n_targets:,} targets "
          f"({sel.pairs:,} pairs, {sel.pairs / max(dt, 1e-9):,.0f} pairs/s, {dt:.1f} s{best}{skipped}) -> {args.out} ({fmt})")
    return 0


def _positive_int(text: str) -> int:
    """argparse type of a count >= 1 (argparse reports the ValueError as a usage error, exit 2)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1; got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1; got {value}")
    return value


def _thread_count(text: str) -> int:
    """argparse type of --threads: 1 to lmkern.MAX_THREADS."""
    from . import MAX_THREADS

    value = _positive_int(text)
    if value > MAX_THREADS:
        raise argparse.ArgumentTypeError(f"expected at most {MAX_THREADS} threads; got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lmkern", description="lmkern: fused numeric kernels as torch custom ops")
    p.add_argument("--version", action="version", version=f"lmkern {_version()}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    info = sub.add_parser("info", help="version, torch, CUDA status and threads")
    info.set_defaults(func=_info)
    b = sub.add_parser("bench", help="check every op against its float64 reference and time it against its peer")
    b.add_argument("--device", choices=("cpu", "cuda", "all"), default="all",
                   help="where to run (default all: cpu, and cuda when lmkern's CUDA path works)")
    b.add_argument("--quick", action="store_true", help="smaller shapes and fewer rounds")
    b.add_argument("--op", metavar="NAME", help="only ops whose name contains NAME (e.g. crms, residual)")
    b.add_argument("--threads", type=_thread_count, metavar="N", help="CPU threads for torch and lmkern")
    b.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    b.add_argument("--no-progress", action="store_true", help="print only the final table")
    b.set_defaults(func=_bench)
    c = sub.add_parser("convert", help="convert a saved Pre-LN model to Pre-RMSNorm or Pre-CRMSNorm")
    c.add_argument("src", help="a directory written by save_pretrained (GPT-2, GPT-NeoX, lmkern.models.Transformer)")
    c.add_argument("dst", help="the directory to write the converted model into")
    c.add_argument("--to", choices=("rms", "crms"), required=True, help="Pre-RMSNorm or Pre-CRMSNorm")
    c.add_argument("--recenter-writers", action="store_true", help="rms: re-center stream writers on every forward (for training)")
    c.add_argument("--dtype", choices=("float32", "float64", "bfloat16", "float16"), help="dtype to load and save (default: as saved)")
    c.add_argument("--no-check", action="store_true", help="skip comparing the converted model's outputs to the original's")
    c.set_defaults(func=_convert)

    z = sub.add_parser(
        "zipfit", help="select the K source records best aligned to a target set (gzip-NCD, ZIP-FIT)",
        description="ZIP-FIT: score every source record by 1 - mean NCD to the target records and write the K "
                    "best, best first, with their scores (zipfit_score, zipfit_rank, zipfit_source). Files: JSON "
                    "Lines (.jsonl/.ndjson/.json), Parquet (.parquet/.pq), plain text (.txt/.text: one line per "
                    "record, blank lines skipped), .gz of the line formats, and directories of them. Sources are "
                    "streamed (memory: K records + a batch).")
    z.add_argument("--source", nargs="+", required=True, metavar="S", help="source files or directories")
    z.add_argument("--target", nargs="+", required=True, metavar="T", help="target files or directories")
    z.add_argument("-k", type=int, required=True, metavar="K", help="how many records to select")
    z.add_argument("--out", required=True, metavar="O", help="output file: .parquet/.pq -> Parquet, else JSON Lines")
    z.add_argument("--level", type=int, default=9, choices=range(10), metavar="L", help="gzip level 0-9 (default 9)")
    z.add_argument("--text-field", default="text", metavar="F", help="JSON field / Parquet column of the text (default text)")
    z.add_argument("--engine", choices=("local", "ray"), default="local", help="local (default) or ray (Ray Data)")
    z.add_argument("--batch-size", type=_positive_int, default=1024, metavar="N", help="sources per scorer call (default 1024)")
    z.add_argument("--bad-records", choices=("error", "skip"), default="error",
                   help="a record that cannot be read: stop with an error (default) or skip it and count it")
    z.add_argument("--threads", type=_thread_count, metavar="N", help="lmkern CPU threads (local engine)")
    z.add_argument("--num-actors", type=_positive_int, metavar="N", help="ray: scoring actors (default: cluster CPUs - 1)")
    z.add_argument("--ray-address", metavar="ADDR", help="ray: cluster address (default: the running one or a new local one)")
    z.add_argument("--no-progress", action="store_true", help="no progress line on stderr")
    z.set_defaults(func=_zipfit)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if not getattr(args, "func", None):
        _parser().print_help()
        return 0
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
