"""A store's recorded config as this piadm reads it: the settings an older piadm's config
lacks (keys added since) read as that piadm ran without them, and how a store's settings
differ from a run's (for the messages that refuse it)."""
from __future__ import annotations

import functools
import tomllib
from typing import NamedTuple

from pipeline.config import config_from_dict
from pipeline.settings import Config

# pc-window's revision 2 (the rebuild's lag scaled by theta = J_max) landed then, an hour
# before sampler.theta: a store made before it lagged the whole step (theta = "one")
THETA_J_MAX_SINCE = "2026-12-03T04:47:09Z"
UNTOLD = object()  # what an older piadm did cannot be told from the store's attributes


def _theta_before(attrs: dict):
    if attrs.get("sampler_method") == "pc-window" and _created(attrs) < THETA_J_MAX_SINCE:
        return "one"
    return None


def _tf32_before(attrs: dict):
    """cuDNN's convolutions took TensorFloat-32 by default on a GPU before ``model.tf32``,
    and stores then recorded no device: a network's store is read with it off only where its
    torch was a CPU build, and told as unknown otherwise."""
    if attrs.get("model_kind") in ("grf", "gmm"):  # no convolution: the key changes nothing
        return None
    return None if str(attrs.get("torch_version", "")).endswith("+cpu") else UNTOLD


def _created(attrs: dict) -> str:
    """When the store was made (ISO 8601, UTC), "" where it does not say (the oldest)."""
    return str(attrs.get("created", ""))


# Store-deciding keys added since stores were first made whose default does not do what an
# older piadm did without them, and that value from the store's attributes (None: the
# default does it; UNTOLD: the attributes cannot tell). Every other key added since defaults
# to what piadm did before it: a key added later whose default changes members belongs here.
AS_BEFORE = {("sampler", "theta"): _theta_before, ("model", "tf32"): _tf32_before}


class Stored(NamedTuple):
    """A store's config as read by this piadm (``config``), the store-deciding keys its text
    lacks ("section.key": made before they existed: ``lacked``), and those of them whose
    value then its attributes cannot tell (``untold``)."""

    config: Config
    lacked: list[str]
    untold: list[str]


def stored_settings(text: str, attrs: dict | None = None) -> Stored | None:
    """The store's config TOML ``text`` read as this piadm reads it, each store-deciding key
    it lacks read as the older piadm that made it ran without it (``AS_BEFORE``, from the
    store's ``attrs``); None where it does not read as a config of this version."""
    try:
        tree = tomllib.loads(text)
        lacked, untold = [], []
        for name, table in _defaults().store_settings().items():
            for key in table:  # a key a config's text leaves out when empty is no sign
                if key in tree.get(name, {}) or key not in _written().get(name, {}):
                    continue
                lacked.append(f"{name}.{key}")
                before = AS_BEFORE.get((name, key), lambda _: None)(attrs or {})
                if before is UNTOLD:
                    untold.append(f"{name}.{key}")
                elif before is not None:
                    tree.setdefault(name, {})[key] = before
        return Stored(config_from_dict(tree), lacked, untold)
    except (ValueError, TypeError, KeyError, AttributeError):  # ConfigError, TOMLDecodeError
        return None


@functools.cache
def _defaults() -> Config:
    return config_from_dict({})


@functools.cache
def _written() -> dict:
    """The keys this version writes into a config's text, {section: {key: value}}."""
    return tomllib.loads(_defaults().text)


def differences_of(cfg: Config, read: Stored) -> list[tuple[str, object, object]]:
    """The store-deciding settings (``Config.store_settings``) in which a store's config as
    read (``stored_settings``: how an older piadm ran without a key comes from its
    attributes) differs from ``cfg``, as ("section.key", theirs, ours), ensemble.members
    left out."""
    theirs, ours = read.config.store_settings(), cfg.store_settings()
    # another ensemble.members alone makes a store grow (or be refused as cut), never
    # another configuration's: naming it here would ask the user to match it; a key whose
    # value then cannot be told is said apart (``untold_message``), not as the default
    return [(f"{name}.{key}", theirs[name][key], value)
            for name, table in ours.items() for key, value in table.items()
            if theirs.get(name, {}).get(key) != value and (name, key) != ("ensemble", "members")
            and f"{name}.{key}" not in read.untold]


def untold_message(path, untold: list[str]) -> str:
    """The refusal of the store at ``path`` that an older piadm made before the keys
    ``untold``, whose values then its attributes cannot tell."""
    them = "them" if len(untold) > 1 else "it"
    return (f"output {path} was made by an older piadm, before {', '.join(untold)} existed, "
            f"and records nothing that tells how it ran without {them} (a torch build with "
            "CUDA, no device recorded): piadm cannot tell whether it is this configuration's; "
            "read it "
            "as it is, sample into another output.path, or set output.overwrite = true to "
            "replace it")


def format_differences(differences, most: int = 4) -> list[str]:
    """``differences_of`` as "key: theirs -> ours", the first ``most`` and a count of
    the rest."""
    out = [f"{key}: {theirs!r} -> {ours!r}" for key, theirs, ours in differences]
    return out[:most] + ([f"and {len(out) - most} more"] if len(out) > most else [])


