"""The plan a store keeps: an ``"auto"`` run records its choice in the store's attributes
(``planner.planned_config``), and a resumed run takes it again. Here: which store is this
configuration's plan's (``stored_plan``), the refusal of one that is not
(``check_unplannable_store``), and what a resume on other ranks or at another batch size
takes of the stored choice.
"""
from __future__ import annotations

import json

from pipeline.config import ConfigError, with_settings
from pipeline.identity import growth, store_digests
from pipeline.settings import AUTO_METHODS, EQUAL_QUALITY, Config
from pipeline.store import ASKED, StoreExists
from pipeline.store_attrs import read_attrs

# The settings a plan chooses (``planner.settings``): a store made with others than the config's in
# any other key is no plan's (sampler.steps too, but for auto-quality, which picks steps)
PLAN_KEYS = ("sampler.method", "parallel.time_slices", "ensemble.batch_size", "sampler.window",
             "sampler.block_size", "sampler.window_split", "sampler.tol")


def check_unplannable_store(cfg: Config) -> None:
    """Rank 0, before an ``"auto"`` run's plan, when the store at output.path is not one this
    configuration's plan made (``stored_plan``): refuse it, naming the settings in which its
    config differs from ``cfg`` (those a plan picks only when no other differs). Planned
    first, the run was refused only after every measurement, naming the plan's settings."""
    from pipeline.identity import check_untold
    from pipeline.stored import differences_of, format_differences, stored_settings

    attrs = {} if cfg.output.overwrite else read_attrs(cfg.output.path) or {}
    text = str(attrs.get("config", ""))
    if not text:  # none, or not a piadm store: the run's own checks say what to do
        return
    chosen = PLAN_KEYS + (("sampler.steps",) if cfg.sampler.method == EQUAL_QUALITY else ())
    read = stored_settings(text, attrs)
    every = [] if read is None else differences_of(cfg, read)
    check_untold(cfg, read)
    # where only plan keys differ, the store's own pick of a key set to "auto" is no change
    differ = ([d for d in every if d[0] not in chosen]
              or [d for d in every if d[2] not in ("auto", *AUTO_METHODS)] or every)
    if differ:
        raise StoreExists(
            f"output {cfg.output.path} was made by a different configuration (it differs in "
            f"{'; '.join(format_differences(differ))}): rerun its own "
            "config to resume it, choose another output.path, or set output.overwrite = true "
            "to replace it")


# Not a store attribute: what ``plan_config_sha256`` reads for a config that names its model
# files where they are now rather than as its store does (``Config.stored_as``), which a
# store replaced by the run records instead (``run_start._prepare``)
PLAN_KEY_ANEW = "plan_config_sha256 of the files where they are"


def stored_plan(cfg: Config) -> tuple[dict, int | None] | None:
    """The plan the store at output.path was made with, when it is this ``"auto"``
    configuration's store: (its settings, the batch size the config asked then; None when
    not known); else None."""
    attrs = read_attrs(cfg.output.path) or {}
    if "plan_settings" not in attrs:
        return None
    plan, key = json.loads(attrs["plan_settings"]), attrs.get("plan_config_sha256")
    if key == cfg.store_digest:
        return plan, attrs.get(ASKED)
    grown = growth(cfg)  # other members: growing keeps the plan; fewer are refused as such
    if key is not None and grown is not None and key == grown.digest:
        return plan, attrs.get(ASKED)
    # an older piadm's store: its key counted the batch size the config asked then
    asked = next((b for b in (cfg.ensemble.batch_size, *range(1, OLDER_ASKED + 1))
                  if cfg.legacy_store_digest(b) == key), None)
    if asked is not None:
        return plan, asked
    # asked a size past those: the plan is this config's when, applied to it, it gives the
    # store's digest (an older piadm's, or this version's once another run brought it up to date)
    try:
        made = with_settings(cfg, plan)
    except ConfigError:  # a plan this config cannot take is not its own
        return None
    # under any digest of the store's that names the planned config's settings: an older
    # piadm's, one made before keys added since, or fewer members to grow (``identity``)
    return (plan, None) if attrs.get("piadm_store_digest") in store_digests(made) else None


class PlannedElsewhere(StoreExists):
    """Another job of this ``"auto"`` configuration made the store at ``path`` while this one
    planned, with a plan of its own (plans made at once pick by timings, so may pick apart):
    the sample command starts again (``on_the_stores_plan``), and takes the store's plan.
    Raised by every rank together."""

    def __init__(self, path):
        self.path = path
        super().__init__(self.said("rerun to take that plan"), collective=True)

    def __reduce__(self):  # made again from its path (its message is made from it), as a copy
        return type(self), (self.path,), self.__dict__  # or another rank's unpickling makes it

    def said(self, then: str) -> str:
        """What happened, and ``then`` what follows."""
        return (f"output {self.path} was made meanwhile by another job of this configuration, "
                f"on a plan of its own (plans made at once pick by timings): {then}")


def on_the_stores_plan(run, say):
    """``run()`` (a sample command's whole run), started once more where it raised
    PlannedElsewhere, said with ``say``: it then takes the store's plan."""
    try:
        return run()
    except PlannedElsewhere as err:
        say(err.said("starting again on that plan"))
        return run()


def planned_apart(path, attrs: dict) -> bool:
    """Rank 0, where the store step refused the store at ``path``: whether it was made by a
    plan of the same configuration as this run's (its ``attrs``: ``planner.planned_config``'s
    record) that chose otherwise."""
    held = read_attrs(path) or {}
    return (bool(attrs.get("plan_settings")) and held.get("plan_settings") is not None
            and held.get("plan_config_sha256") == attrs.get("plan_config_sha256")
            and held.get("plan_settings") != attrs["plan_settings"])


OLDER_ASKED = 1024  # the batch sizes an older store's plan key is tried at (0.1 ms each)


def resumed_batch_size(cfg: Config, stored: tuple[dict, int | None]) -> int:
    """The ensemble.batch_size a resumed ``"auto"`` run of ``cfg`` samples at: the stored
    plan's, unless the config asks another than when the plan was made."""
    chosen, asked = stored
    if cfg.ensemble.batch_size != asked:  # asked None: not known, so the config's
        return cfg.ensemble.batch_size
    return chosen["ensemble.batch_size"]


def resumed_time_slices(cfg: Config, chosen: dict, ranks: int) -> int:
    """The time slices a resumed ``"auto"`` run on ``ranks`` ranks takes: the config's when it
    names them, else the plan's ``chosen``, or the most below them that divide the ranks
    (the layout is not the store's identity: a resume may run on other ranks)."""
    if cfg.parallel.time_slices != "auto":
        return cfg.parallel.time_slices
    planned = chosen["parallel.time_slices"]
    return max(t for t in range(1, planned + 1) if ranks % t == 0)
