"""A sampling command's start on its ranks, one sequence for the CLI and the Python API: the
config agreed across ranks, the rank's device, the planner's choice where ``"auto"`` is asked,
and the rank grid."""
from __future__ import annotations

import math

from pipeline.config import SAMPLING_PATHS, check_same_config
from pipeline.console import on_every_rank, on_rank0
from pipeline.errors import raised_by_every_rank
from pipeline.value_checks import check_path_links


def start(comm, cfg, who: str, *, mode: str = "", paths: tuple[str, ...] = SAMPLING_PATHS,
          stored: bool = False, plan: bool = False, layout: bool = True, stop=None):
    """(cfg, ranks, device, attrs) for a run of ``cfg`` on ``comm``'s ranks.

    ``who`` names the command or function in messages; ``mode`` its other options, which
    every rank must share as it shares the config; ``paths`` the settings naming files the
    command reads (compared across ranks' working folders). ``stored``: the config in the
    store's own spelling of its files (a sampling run), and a warning of settings its method
    does not read. ``plan``: resolve ``"auto"`` sampler and time slices
    (``pipeline.planner``), ``attrs`` then records the choice for the store; otherwise
    ``"auto"`` time slices run as one group of every rank. Without ``layout`` (a
    command that does not sample on this launch's ranks) ``ranks`` is None and the time
    slices are not checked against the launch. ``stop``: a stop request that ends the
    planning between its measurements (``pipeline.signals.Stopped``)."""
    from pipeline.settings import needs_plan

    check_same_config(comm, cfg, who, mode=mode, paths=paths)
    on_every_rank(comm, check_path_links, cfg, paths)
    # torch only now: ranks refused above said so in a fraction of a second, not after its
    # seconds of imports on every rank
    from pipeline.identity import as_stored
    from pipeline.layout import check_threads, place_rank, rank_grid
    from pipeline.planner import resolve_plan
    from pipeline.run_items import check_unread_settings

    if stored:
        cfg = on_rank0(comm, as_stored, cfg)
        # of the settings asked, before a plan picks a method that may not read them
        on_rank0(comm, check_unread_settings, cfg)

    on_every_rank(comm, check_threads, cfg.parallel.threads)  # one line, said by rank 0
    device = place_rank(comm, cfg.parallel.threads, math.prod(cfg.model.shape),
                        cfg.parallel.keep_freed, cfg.parallel.wait, cfg.model.tf32)
    attrs = {}
    if plan and needs_plan(cfg):
        cfg, attrs = resolve_plan(cfg, comm, device, stopped=lambda: bool(stop))
    slices = comm.size if cfg.parallel.time_slices == "auto" else cfg.parallel.time_slices
    with raised_by_every_rank():
        ranks = rank_grid(comm, slices) if layout else None
    return cfg, ranks, device, attrs
