"""Checkpoints of trained U-Nets: tensors (``torch.save``, loaded with ``weights_only``: no
pickle) and a JSON sidecar ``PATH.json`` with the metadata (architecture, normalisation,
data-covariance bound, training grid, config). ``pipeline.train`` writes them; score models
load them."""
from __future__ import annotations

import json
import io
from pathlib import Path

import torch

from models.unet import Denoiser, UNetConfig
from pipeline.processes import replace_file


# what every sidecar piadm train or export writes holds, and loading a checkpoint reads
SIDECAR_KEYS = ("unet", "shape", "variable", "mean", "std")


def sidecar(path: Path) -> Path:
    """The metadata file of checkpoint ``path``."""
    return path.with_suffix(path.suffix + ".json")


def save_sidecar(path: Path, meta: dict) -> None:
    """Write checkpoint ``path``'s JSON sidecar atomically (temp file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    replace_file(sidecar(path), lambda tmp: tmp.write_text(json.dumps(meta, indent=2)))


def _units(meta: dict) -> str:
    """What of the metadata the weights were trained in: the normalisation and the network
    (its sigma_data among them), as text the tensors keep too."""
    return json.dumps({k: meta.get(k) for k in ("mean", "std", "unet")}, sort_keys=True)


def save_checkpoint(path: Path, state: dict, meta: dict) -> None:
    """Write the JSON sidecar, then the tensors, each atomically (temp file, then rename).
    In that order a run killed in between never leaves a new checkpoint's tensors without a
    sidecar; a resumed run's sidecar may be a save ahead (its step is read from the tensors),
    so the tensors keep the units they were trained in (``load_denoiser`` compares them). A
    write that fails (a full disk) raises its OSError naming the file, with the sidecar that
    was there before put back."""
    data = io.BytesIO()  # torch's own file writer reports a full disk as a RuntimeError
    torch.save({**state, "units": _units(meta)}, data)
    before = sidecar(path).read_text() if sidecar(path).exists() else None
    save_sidecar(path, meta)
    try:
        replace_file(path, lambda tmp: tmp.write_bytes(data.getvalue()))  # no view left open
    except OSError:
        try:  # the tensors stay the last save's: so does what describes them
            if before is None or not path.exists():  # no tensors (a save anew removed them)
                sidecar(path).unlink(missing_ok=True)
            else:
                replace_file(sidecar(path), lambda tmp: tmp.write_text(before))
        except OSError:
            pass  # the disk refuses that too: the step is read from the tensors anyway
        raise


def load_denoiser(path: str | Path, device="cpu") -> tuple[Denoiser, dict]:
    """The EMA denoiser of a checkpoint and its metadata (no pickle: tensors only). Raises
    ConfigError when the sidecar's units are not those the weights were trained in: a save
    cut short between its two files, after the data changed (train.extra added on resume)."""
    from pipeline.errors import ConfigError

    path = Path(path)
    meta = json.loads(sidecar(path).read_text())
    missing = [key for key in SIDECAR_KEYS if key not in meta] if isinstance(meta, dict) else \
        ["every key"]
    if missing:
        raise ValueError(f"its metadata {sidecar(path).name} lacks {', '.join(missing)}")
    den = Denoiser(UNetConfig.from_dict(meta["unet"]))
    # on the host: the whole training state (both Adam moments too) need not visit the GPU;
    # the network filled there goes to its device once (not its initial weights, then these)
    state = torch.load(path, map_location="cpu", weights_only=True)
    problem = units_problem(path, state, meta)
    if problem:
        raise ConfigError(problem)
    try:
        den.load_state_dict(state["ema"])
    except RuntimeError as err:  # sizes or keys: the second line names the first that differs
        raise ConfigError(f"checkpoint {path}: its weights do not fit the network its metadata "
                          f"{sidecar(path)} describes ({_first_misfit(err)}): put back the "
                          ".json that came with them") from None
    return den.to(device).eval(), meta


def _first_misfit(err: RuntimeError) -> str:
    """The first key or size that load_state_dict's ``err`` names, on one line."""
    lines = [line.strip() for line in str(err).splitlines()[1:] if line.strip()]
    if not lines:
        return "its tensors do not fit"
    first = lines[0].rstrip(".")
    if first.startswith(("Missing key(s)", "Unexpected key(s)")):  # "...: "a", "b", ...
        head, _, keys = first.partition(": ")
        named = keys.split(", ")
        more = f" and {len(named) - 1} more" if len(named) > 1 else ""
        return f"{head}: {named[0]}{more}"
    return first[:240]


def units_problem(path: Path, state: dict, meta: dict) -> str | None:
    """Why checkpoint ``path``'s sidecar ``meta`` does not go with its tensors ``state``: a
    save cut short between the two after the normalisation changed, or a sidecar that is not
    theirs (edited, or another checkpoint's); None when they agree (or the tensors, an older
    piadm's, keep no units)."""
    if state.get("units", _units(meta)) == _units(meta):
        return None
    if "opt" in state and _step(meta) > _step(state):  # the sidecar of a later save
        return (f"checkpoint {path}: its metadata {sidecar(Path(path))} is from a later save "
                "than its weights (the save was cut short), with another normalisation: "
                "resume the training to save both again")
    try:
        kept = json.loads(state["units"])
    except (TypeError, ValueError):
        kept = {}
    differ = [k for k in ("mean", "std", "unet") if kept.get(k) != meta.get(k)] or ["units"]
    return (f"checkpoint {path}: its metadata {sidecar(Path(path))} does not go with its "
            f"weights (its {', '.join('network' if k == 'unet' else k for k in differ)} "
            "differ from those they were trained with: edited, or another checkpoint's): put "
            "back the .json that came with them")


def _step(record: dict) -> int:
    """The step a sidecar or a checkpoint's tensors record; -1 where none is."""
    try:
        return int(record.get("step", -1))
    except (TypeError, ValueError):
        return -1