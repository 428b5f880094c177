"""A deterministic real-text corpus made without network: Python's own documentation (pydoc's topics
and the standard library's docstrings), cut into pieces of about 1 KB. For benchmarks of gzip-NCD / ZIP-FIT, whose cost and
compression ratios depend on the text being real (random bytes do not compress; repeated words
compress too well).

The text depends only on the Python version's stdlib (files read in sorted order, docstrings in
source order, pieces shuffled with a fixed seed).
"""
from __future__ import annotations

import functools
import inspect
import os
import random
import re
import sysconfig


_TRIPLE = re.compile(r'(?s)("""|\'\'\')(.*?)\1')


@functools.lru_cache(maxsize=2)
def stdlib_texts(min_chars: int = 100) -> tuple[str, ...]:
    """Real English prose shipped with Python: the reference documentation of pydoc's topics
    (pydoc_data.topics, sorted by topic), then every triple-quoted string (docstrings, help texts)
    of at least `min_chars` characters in the stdlib's .py files (site-packages left out,
    files in sorted order), each cleaned by inspect.cleandoc. About 3 MB with CPython 3.11."""
    out: list[str] = []
    try:
        from pydoc_data.topics import topics

        out += [topics[k].strip() for k in sorted(topics)]
    except ImportError:  # some distributions strip pydoc_data
        pass
    root = sysconfig.get_paths()["stdlib"]
    for dirpath, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in ("site-packages", "__pycache__"))
        for name in sorted(files):
            if not name.endswith(".py") or (dirpath == os.path.join(root, "pydoc_data")):
                continue
            try:
                with open(os.path.join(dirpath, name), encoding="utf-8") as f:
                    src = f.read()
            except (UnicodeDecodeError, OSError):
                continue
            for m in _TRIPLE.finditer(src):
                doc = inspect.cleandoc(m.group(2))
                if len(doc) >= min_chars:
                    out.append(doc)
    return tuple(out)


def pieces(piece_chars: int = 1024) -> list[str]:
    """The docstrings joined and cut into pieces of about `piece_chars` characters, each ending at a
    whitespace (so words stay whole), in source order."""
    text = "\n\n".join(stdlib_texts())
    out, i = [], 0
    while i < len(text):
        j = min(len(text), i + piece_chars)
        if j < len(text):
            cut = text.rfind(" ", i + piece_chars // 2, j)
            cut = max(cut, text.rfind("\n", i + piece_chars // 2, j))
            j = cut + 1 if cut > i else j
        piece = text[i:j].strip()
        if piece:
            out.append(piece)
        i = j
    return out


def sources_and_targets(n_sources: int, n_targets: int, piece_chars: int = 1024, seed: int = 0) -> tuple[list[str], list[str]]:
    """Disjoint real-text sources and targets of about `piece_chars` characters each (shuffled pieces
    with `seed`; pieces are reused, in another order, only if the stdlib has too few)."""
    ps = pieces(piece_chars)
    rng = random.Random(seed)
    order = list(range(len(ps)))
    rng.shuffle(order)
    need = n_sources + n_targets
    while len(order) < need:  # not expected for the sizes used (the stdlib gives ~10k 1 KB pieces)
        more = list(range(len(ps)))
        rng.shuffle(more)
        order += more
    picked = [ps[i] for i in order[:need]]
    return picked[n_targets:], picked[:n_targets]
