"""The Ray Data engine (lmkern.data.select_ray, `lmkern zipfit --engine ray`) returns the local
engine's selection exactly. One local Ray instance (ray.init(num_cpus=2)) serves the whole module
and is shut down after it; Ray's start costs ~10 s here, so the cases share it."""
from __future__ import annotations

import json
import random

import pytest

ray = pytest.importorskip("ray", reason="the Ray engine needs ray[data] (in the test extra)")
pa = pytest.importorskip("pyarrow", reason="Parquet needs pyarrow (in the test extra)")
import pyarrow.parquet as pq  # noqa: E402
pytest.importorskip("ray.data")

from lmkern import cli  # noqa: E402
from lmkern import data as D  # noqa: E402

WORDS = "proof lemma theorem def return class import data model the of and a λ 数据".split()


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ray")
    rng = random.Random(77)

    def t(lo=1, hi=50):
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))

    (tmp / "src").mkdir()
    with open(tmp / "src" / "a.jsonl", "w") as f:
        for i in range(150):
            f.write(json.dumps({"id": i, "text": t() if i % 10 else "proof lemma theorem"}) + "\n")  # ties
    pq.write_table(pa.table({"text": [t() for _ in range(90)]}), tmp / "src" / "b.parquet", row_group_size=16)
    (tmp / "src" / "c.txt").write_text("\n".join(t() for _ in range(60)) + "\n")
    targets = [t(20, 60) for _ in range(4)]
    (tmp / "targets.txt").write_text("\n".join(targets) + "\n")
    return tmp, targets


@pytest.mark.parametrize("k, batch_size", [(25, 32)])  # several batches per actor, 2 actors
def test_ray_equals_local(local_ray, corpus, k, batch_size):
    tmp, targets = corpus
    local = D.select_local(tmp / "src", targets, k, batch_size=batch_size)
    dist = D.select_ray(tmp / "src", targets, k, batch_size=batch_size, num_actors=2, actor_cpus=0.5)
    assert dist.keys.tolist() == local.keys.tolist()
    assert dist.scores.tolist() == local.scores.tolist()  # bit-identical
    assert [r.data for r in dist.records] == [r.data for r in local.records]
    assert dist.n_sources == local.n_sources == 300
    assert len(dist.keys) == min(k, 300)


def test_cli_engine_ray(local_ray, corpus, tmp_path, capsys):
    tmp, targets = corpus
    out_l, out_r = tmp_path / "l.jsonl", tmp_path / "r.jsonl"
    common = ["zipfit", "--source", str(tmp / "src"), "--target", str(tmp / "targets.txt"), "-k", "17",
              "--level", "6", "--no-progress", "--batch-size", "50"]
    assert cli.main(common + ["--out", str(out_l)]) == 0
    assert cli.main(common + ["--out", str(out_r), "--engine", "ray", "--num-actors", "1"]) == 0
    assert out_l.read_text() == out_r.read_text()
    assert len(out_r.read_text().splitlines()) == 17


def test_ray_bad_input_is_reported_on_the_driver(local_ray, corpus):
    tmp, targets = corpus
    with pytest.raises(ValueError, match="target: expected at least one target"):
        D.select_ray(tmp / "src", [], 3)
    with pytest.raises(FileNotFoundError, match="missing"):
        D.select_ray(tmp / "missing", targets, 3)
    with pytest.raises(ValueError, match="num_actors"):
        D.select_ray(tmp / "src", targets, 3, num_actors=0)


def test_ray_bad_record_in_a_worker_is_the_readers_error(local_ray, corpus, tmp_path):
    """A bad record met inside a Ray task surfaces as the reader's DataError (file:line), unwrapped."""
    _, targets = corpus
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "no text field"}\n')
    with pytest.raises(D.DataError, match=r"^.*bad\.jsonl:2: no field 'text'") as e:
        D.select_ray(bad, targets, 1, num_actors=1, actor_cpus=0.5)
    assert "ray::" not in str(e.value)
