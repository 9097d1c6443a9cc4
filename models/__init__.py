"""Score models behind one contract (``models.contract``): exact Gaussian models and adapters.

``MODELS`` maps ``model.kind`` to a builder taking the model section of the configuration and
the torch device the sampler runs on. This module imports no torch: each builder imports its
model when it is called, so that checking a configuration's ``model.kind`` (``piadm config``,
``--help``) takes a fraction of a second instead of torch's second and a half.
"""
from __future__ import annotations


def _grf(c, device):
    from models.grf import GaussianRandomField

    return GaussianRandomField(tuple(c.shape), slope=c.slope, length=c.length, device=device)


def _gmm(c, device):
    from models.gmm import GaussianMixture

    # a small exact model: its float64 parameters stay on the CPU whatever the device
    return GaussianMixture.random(tuple(c.shape), components=c.components, spread=c.spread,
                                  std=c.std, seed=c.seed, weights=list(c.weights) or None)


def _unet(c, device):
    from models.learned import load_unet

    return load_unet(c.checkpoint, tuple(c.shape), device, c.guide, c.guidance, c.condition)


def _module(c, device):
    from models.module import load_module  # bring your own network: model.target

    return load_module(c, device)


def _diffusers(c, device):
    from models.pretrained import load_pretrained  # a diffusers save_pretrained folder

    return load_pretrained(c, device)


MODELS = {"grf": _grf, "gmm": _gmm, "unet": _unet, "module": _module, "diffusers": _diffusers}

# model.kind values whose model.shape may lead with channel axes before the field's own
CHANNEL_KINDS = ("module", "diffusers")
# model.kind values of a user's own network: it works in its own units, its code is theirs
OWN_KINDS = ("module", "diffusers")
# model.kind values that are networks (piadm's U-Net or a user's), not exact models
NETWORK_KINDS = ("unet", *OWN_KINDS)


def exact_kind(kind: str) -> bool:
    """Whether ``kind`` is one of piadm's exact models (``grf``, ``gmm``): a law known in
    closed form, defined whole by its [model] section, with no network and no channel axis."""
    return kind in MODELS and kind not in NETWORK_KINDS


def __getattr__(name: str):
    """``STAT_ERRORS``, imported on first use (it needs torch): the error of an ensemble's
    statistics against an exact model's target,
    ``STAT_ERRORS[kind](model, x (B, *shape), u_min, denoised) -> float``."""
    if name == "STAT_ERRORS":
        from models.gmm import weight_error
        from models.grf import spectrum_error

        return {"grf": spectrum_error, "gmm": weight_error}
    raise AttributeError(f"module 'models' has no attribute {name!r}")


def plugin_kinds() -> dict:
    """model.kind -> builder(section, device) that installed packages register in the
    entry-point group ``piadm.models`` (their [model] keys piadm does not know come in
    ``section.args``)."""
    from importlib.metadata import entry_points

    return {ep.name: ep for ep in entry_points(group="piadm.models") if ep.name not in MODELS}


def plugin_digest(section) -> str:
    """What identifies a plugin kind's model beyond its ``[model]`` keys (SHA-256 hex): its
    entry point and the version of the package that registers it, the source file of its
    builder, and the bytes of every file its arguments name, so that weights retrained in
    place or an edited builder make another model."""
    import hashlib
    import importlib.util
    import json
    import os

    from models.digest import files_digest

    entry = plugin_kinds().get(section.kind)
    if entry is None:
        return ""
    spec = importlib.util.find_spec(entry.module)
    origin = spec.origin if spec is not None and spec.has_location else None
    named = sorted({v for v in _strings(section.args) if os.path.isfile(v)})
    said = {"entry_point": entry.value, "version": entry.dist.version if entry.dist else "",
            "source": files_digest([origin]) if origin else "",
            "files": {name: files_digest([name]) for name in named}}
    return hashlib.sha256(json.dumps(said, sort_keys=True).encode()).hexdigest()


def _strings(value):
    """Every string in a plugin's arguments, at any depth."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _strings(v)


def model_kinds() -> list[str]:
    """Every model.kind this installation can build."""
    return [*MODELS, *plugin_kinds()]


def build_model(section, device="cpu"):
    """The score model of a validated model section (``pipeline.settings.ModelConfig``), its
    tensors on ``device`` (the device of the states it will be called with); with
    ``emulate_ms = [latency, per_item]`` its calls take as long as an emulated accelerator's."""
    import torch

    from models.emulate import Emulated

    builder = MODELS.get(section.kind)
    model = (builder or _plugin(section.kind))(section, torch.device(device))
    if builder is None and section.condition != "coarse":  # a package's: checked once here
        from models.contract import check_score_model

        check_score_model(model, f"model.kind = {section.kind!r}", torch.device(device))
    if section.emulate_ms:
        model = Emulated(model, *section.emulate_ms)
    return model


def _plugin(kind: str):
    from pipeline.errors import ConfigError

    entry = plugin_kinds().get(kind)
    if entry is None:
        raise ConfigError(f"config: model.kind = {kind!r} is unknown: use one of "
                          f"{', '.join(model_kinds())}")
    try:
        return entry.load()
    except Exception as err:
        raise ConfigError(f"config: model.kind = {kind!r}: its entry point {entry.value!r} does "
                          f"not load ({type(err).__name__}: {err})") from None
