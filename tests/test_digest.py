"""A model's files are hashed once per process (models/digest.py), and again once changed."""
import hashlib
import os
from pathlib import Path

from models import digest
from models.digest import files_digest
from pipeline.cli import main


def test_the_digest_is_the_sha256_of_the_bytes_in_order_then_the_tail(tmp_path):
    # the value stores and calibrations recorded before the cache: it must not change
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    a.write_bytes(b"strong" * 1000)
    b.write_bytes(b"weak")
    assert files_digest([a]) == hashlib.sha256(a.read_bytes()).hexdigest()
    assert files_digest([a, b], b"1.8") == hashlib.sha256(
        a.read_bytes() + b.read_bytes() + b"1.8").hexdigest()


def test_a_changed_file_gets_a_new_digest(tmp_path):
    f = tmp_path / "w.pt"
    f.write_bytes(b"first")
    first = files_digest([f])
    f.write_bytes(b"second, longer")
    second = files_digest([f])
    assert second != first and second == hashlib.sha256(b"second, longer").hexdigest()
    # the same size, rewritten within the clock's resolution: mtime moved on by hand
    stamp = f.stat().st_mtime_ns
    f.write_bytes(b"SECOND, LONGER")
    os.utime(f, ns=(stamp + 1, stamp + 1))
    assert files_digest([f]) == hashlib.sha256(b"SECOND, LONGER").hexdigest()


def _counting_reads(monkeypatch) -> list[str]:
    """The names of the files hashed from now on, one entry per read."""
    reads, feed = [], digest._feed

    def counted(h, path):
        reads.append(Path(path).name)
        feed(h, path)

    monkeypatch.setattr(digest, "_feed", counted)
    digest._digest.cache_clear()
    return reads


def test_a_start_hashes_each_checkpoint_once(tmp_path, monkeypatch):
    # the store's check, its provenance and the dry run's look at the store all ask for the
    # guided pair's identity: each file is read once
    reads = _counting_reads(monkeypatch)
    sets = ["sampler.method=sequential-sde", "sampler.steps=2", "ensemble.members=1",
            "ensemble.batch_size=1", f"output.path={tmp_path / 'uncond.zarr'}"]
    args = ["sample", "jobs/configs/kolmogorov_uncond.toml", *sum((["--set", s] for s in sets), [])]
    assert main(args) == 0
    assert main(args + ["--dry-run"]) == 0
    assert sorted(reads) == ["kolmogorov_uncond.pt", "kolmogorov_uncond_guide.pt"]
