"""The repository stands alone: nothing in it points at files outside it."""
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUTSIDE = ("../shared", "STYLE.md", "ALGORITHM.md")


def test_no_file_refers_to_documents_outside_the_repository():
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
    hits = []
    for name in files:
        path = ROOT / name
        if path.suffix in (".pt", ".png", ".zarr") or not path.is_file():
            continue
        text = path.read_text(errors="ignore")
        hits += [f"{name}: {word}" for word in OUTSIDE if word in text and name != __file__]
    hits = [h for h in hits if not h.startswith("tests/test_repository.py")]
    assert hits == []
