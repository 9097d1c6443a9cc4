"""Where a training run starts: resumed from ``train.checkpoint`` once its sidecar shows it
was trained as this run would train (``RESUME_MUST_MATCH``), or from the EMA weights of
``train.init``; refused, naming the fix, where it may not (another file, an exported
checkpoint, another network or target, weights trained on this run's held-out times).
"""
from __future__ import annotations

import json
import os
import pickle
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from models.checkpoint import sidecar
from models.fingerprint import same_probe
from models.unet import Denoiser, UNetConfig
from pipeline.errors import ConfigError, InputError
from pipeline.settings import TrainConfig
from pipeline.train_data import check_init_trained_apart


def start_from(den: Denoiser, ema: Denoiser, init: str, ucfg: UNetConfig, device,
               residual: bool = False) -> dict:
    """Load the EMA weights of checkpoint ``init`` into both networks, and return its
    sidecar; raises InputError when it is not a checkpoint of this architecture, or learned
    the other target (``residual``: the remainder of the upsampled coarse field, not the
    field)."""
    from models.checkpoint import load_denoiser

    if not Path(init).is_file():
        raise InputError(f"train.init = {init!r} is not a file: give a piadm checkpoint to "
                         "start from, or leave it empty")
    try:
        trained, meta = load_denoiser(init, device)
    except ConfigError as err:  # its sidecar a save ahead: it names the fix
        raise InputError(f"train.init = {init!r}: {err}") from None
    except (FileNotFoundError, RuntimeError, ValueError, KeyError, TypeError, OSError) as err:
        raise InputError(f"train.init = {init!r} is not a readable piadm checkpoint with its "
                         f".json sidecar ({type(err).__name__}: {str(err)[:120]}): point it at "
                         "one") from None
    if bool(meta.get("residual", False)) != residual:
        learned = "the remainder" if meta.get("residual") else "the field itself"
        raise InputError(f"train.init = {init!r} learned {learned} (train.residual = "
                         f"{str(bool(meta.get('residual'))).lower()}), this run "
                         f"{'the remainder' if residual else 'the field itself'}: set "
                         "train.residual to match it, or start from another checkpoint")
    # a residual's sigma_data is measured from the data, which fine-tuning may add to: this
    # run's own is kept (as on resuming), not a setting the user could match
    theirs = replace(trained.cfg, sigma_data=ucfg.sigma_data)
    adds_mix = ucfg.global_modes > 0 and theirs == replace(ucfg, global_modes=0)
    if theirs != ucfg and not adds_mix:
        raise InputError(f"train.init = {init!r} is a U-Net {trained.cfg.to_dict()}, this "
                         f"run's is {ucfg.to_dict()}: set train.channels, condition and "
                         "global_modes to match it")
    # a new GlobalMix keeps its own initialisation, whose zero output projection leaves the
    # trained function unchanged
    for net in (den, ema):
        missing, unexpected = net.load_state_dict(trained.state_dict(), strict=not adds_mix)
        assert not unexpected and all(k.startswith("net.mix.") for k in missing), missing
    return meta


# What a resumed run must share with its checkpoint, by sidecar key and the setting it comes
# from: the network (the weights and optimiser state must fit it) and what it learns (the
# variable, its condition and residual, the data and its fields' shape, the held-out share:
# a new share would validate on times already trained on). What resuming is for may change:
# train.steps and train.lr (more steps, annealing), train.extra (more data), batch_size,
# ema, seed, p_mean, p_std; train.init is ignored. The normalisation and a residual's
# sigma_data follow the data (train.extra moves them), so they are not compared.
RESUME_MUST_MATCH = {"channels": "train.channels", "global_modes": "train.global_modes",
                     "embed": "the U-Net's embedding width", "variable": "train.variable",
                     "condition": "train.condition", "cond_channels": "train.condition",
                     "residual": "train.residual", "data": "train.data",
                     "shape": "the shape of train.variable's fields",
                     "validation": "train.validation",
                     "data_made": "what train.data holds (made anew at its path since?)",
                     "data_probe": "what train.data holds (its first and last fields: made "
                                   "anew at its path since?)"}


def recorded_settings(path: Path) -> dict:
    """The settings the sidecar of checkpoint ``path`` records, flat (the U-Net's with the
    rest); raises InputError when there is no readable sidecar."""
    try:
        meta = json.loads(sidecar(path).read_text())
        return {**meta, **UNetConfig.from_dict(meta["unet"]).to_dict()}
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise InputError(f"train.checkpoint {path} is not a piadm train checkpoint: its sidecar "
                         f"{sidecar(path).name} is missing or unreadable ({type(err).__name__}):"
                         " choose another train.checkpoint, or move the file away") from None


def _check_same_training(path: Path, meta: dict) -> None:
    """Raise InputError naming each setting of ``RESUME_MUST_MATCH`` in which this run
    (``meta``) differs from checkpoint ``path``; a setting its sidecar lacks (an older
    checkpoint's) is not compared."""
    theirs, ours = recorded_settings(path), {**meta, **meta["unet"]}
    # the probe is of train.variable's fields: another variable's tell nothing of the data
    probed = "data_probe" in theirs and theirs.get("variable") == ours["variable"]
    differ = {}
    for key, setting in RESUME_MUST_MATCH.items():
        if key not in theirs or setting in differ:
            continue
        if key == "data":  # the same path, or (typed from another folder, or the data
            # moved) the same fields: a relative path names another store elsewhere
            same = (os.path.realpath(theirs[key]) == os.path.realpath(ours[key])
                    or (probed and same_probe(theirs["data_probe"], ours["data_probe"])))
        elif key == "data_probe":
            same = not probed or same_probe(theirs["data_probe"], ours["data_probe"])
        else:
            same = theirs[key] == ours[key]
        if not same:  # the probe's figures (sums of fields) would mean nothing to a reader
            differ[setting] = setting + ("" if key == "data_probe" else
                                         f" (checkpoint {theirs[key]!r}, this run {ours[key]!r})")
    if differ:
        raise InputError(f"train.checkpoint {path} cannot be resumed by this run, which differs "
                         f"in {'; '.join(differ.values())}: rerun with the checkpoint's settings, "
                         "choose another train.checkpoint, or set train.resume = false to start "
                         "anew, replacing it")


STATE = ("model", "ema", "opt", "step", "history")  # what a training checkpoint holds


def _check_replaceable(path: Path) -> None:
    """Starting anew replaces a training checkpoint, never another file: not one without a
    sidecar, nor an exported (shipped) one, which holds the EMA weights alone."""
    recorded_settings(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, EOFError, RuntimeError, OSError, ValueError):
        return  # a training checkpoint cut short by a kill: a new run may replace it
    if not isinstance(state, dict) or not all(key in state for key in STATE):
        raise InputError(f"train.checkpoint {path} is an exported checkpoint (the EMA weights "
                         "alone), not a training one, and train.resume = false would replace "
                         f"it: choose another train.checkpoint (train.init = {str(path)!r} "
                         "starts from its weights)")


def _resume(path: Path, meta: dict, den, ema, opt, device) -> dict:
    """Load checkpoint ``path`` into the networks and optimiser after checking it was trained
    as this run (``meta``) would; its state. Raises InputError when it cannot be resumed."""
    recorded_settings(path)  # a file of another kind (no sidecar) is said so before it is read
    try:
        # on the host: load_state_dict copies each tensor to its parameter's device, and
        # keeps Adam's step counts where a fresh run keeps them (on a GPU each would cost
        # its update a sync)
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, EOFError, RuntimeError, OSError, ValueError) as err:
        raise InputError(f"train.checkpoint {path} is not a readable piadm train checkpoint "
                         f"({type(err).__name__}): choose another train.checkpoint, or move "
                         "the file away") from None
    if not isinstance(state, dict) or not all(key in state for key in STATE):
        raise InputError(f"train.checkpoint {path} holds no training state (an exported "
                         "checkpoint keeps the EMA weights alone): start from it with "
                         "train.init and another train.checkpoint")
    # after the state: an exported checkpoint is not offered train.resume = false below
    _check_same_training(path, meta)
    try:
        den.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
    except (RuntimeError, ValueError, KeyError) as err:
        raise InputError(f"train.checkpoint {path} does not fit this run's U-Net "
                         f"({type(err).__name__}): rerun with the settings in its sidecar, or "
                         "set train.resume = false to start anew, replacing it") from None
    return state


def restore(t: TrainConfig, meta: dict, den, ema, opt, device,
            held: np.ndarray) -> tuple[int, list[float]]:
    """Resume from ``train.checkpoint`` (with ``train.resume``), or start from the EMA weights
    of ``train.init``, refused where they were trained on the ``held`` out times of
    train.data; the step reached and the loss history."""
    path = Path(t.checkpoint)
    if path.is_dir():
        raise InputError(f"train.checkpoint {path} is a folder: give a file path in it, e.g. "
                         f"{path / 'unet.pt'}")
    if path.exists() and not t.resume:
        _check_replaceable(path)
    if not path.exists() and sidecar(path).exists():  # another's file: replaced at the first save
        try:  # piadm's own, left by a run killed between its first save's two files: replaced
            recorded_settings(path)
        except InputError:
            raise InputError(f"train.checkpoint {path}: {sidecar(path)}, where its sidecar goes, "
                             "is another file, not a piadm sidecar, which training would replace: "
                             "move it away, or choose another train.checkpoint") from None
    if t.resume and path.exists():
        state = _resume(path, meta, den, ema, opt, device)
        for group in opt.param_groups:  # train.lr wins, so a resumed run can anneal
            group["lr"] = t.lr
        return int(state["step"]), state["history"].tolist()
    if t.init:
        trained = start_from(den, ema, t.init, UNetConfig.from_dict(meta["unet"]), device,
                             t.residual)
        check_init_trained_apart(t, trained, held)
    return 0, []
