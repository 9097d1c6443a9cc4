"""Export the EMA weights of a training checkpoint for shipping: python -m models.export SRC DST.

The result holds only the EMA state (a few MB) and the JSON sidecar, and loads with
``torch.load(weights_only=True)`` like any piadm checkpoint."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch


def export(src: str | Path, dst: str | Path) -> None:
    """Copy the EMA weights of ``src`` and its sidecar to ``dst``."""
    src, dst = Path(src), Path(dst)
    state = torch.load(src, map_location="cpu", weights_only=True)
    dst.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"ema": state["ema"], "step": state["step"]}, dst)
    meta = json.loads(Path(str(src) + ".json").read_text())
    Path(str(dst) + ".json").write_text(json.dumps(meta, indent=2))


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m models.export TRAINING_CHECKPOINT SHIPPED_CHECKPOINT")
    export(sys.argv[1], sys.argv[2])
