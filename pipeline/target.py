"""What a run does with its output path: create a store, resume its own, grow its own made
with fewer members, replace another configuration's, or refuse; and the coordination that
replacing and growing need with other jobs.

The store's contents and I/O are ``pipeline.store``; here are the decisions around it. A
store is resumed only by the configuration (digest) and model files that made it, grown only
by the same settings with more members, deleted only when piadm made it and
``output.overwrite`` asks, never through a symbolic link, and neither grown nor deleted while
a live job (a heartbeat in its claims folder, ``pipeline.claims``) still fills it. Jobs
replacing or growing one store take turns under a lock in the claims folder.
"""
from __future__ import annotations

import errno
import glob
import os
import shutil
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Callable, NamedTuple

import pipeline
from pipeline.claims import (Heartbeat, claims_dir, clear_batch_claims, holding, live_jobs,
                             new_job_id, strange_entries)
from pipeline.errors import ConfigError
from pipeline.settings import Config
from pipeline.store import (ASKED, StoreExists, StoreSpec, consolidate, create, enclosing_store,
                            finalize, fit_members, grow, members_fit, nearest_existing,
                            try_new_entry)
from pipeline.store_attrs import (MEMBER_BATCH, check_unedited, member_batch, member_chunk_of,
                                  read_attrs)


REPLACER = "replacing-"  # the job ids of runs waiting to replace a store: they write nothing
# A replaced store is moved aside as .NAME.REPLACER-JOB.deleting, then deleted
DELETING = ".deleting"

# What a grown store takes from the configuration that grows it: its identity, and the
# config it now holds (``grow``)
GROWN_ATTRS = ("piadm_store_digest", "store_sha256", "config", "config_sha256",
               "plan_config_sha256")


class Growth(NamedTuple):
    """A store of a run's settings made with another ensemble.members: the digest the run's
    settings have at the store's count (``made``), and the count the run asks."""

    digest: str
    made: int
    asked: int


@contextmanager
def _replacing(path: str | Path, *locks: str):
    """Hold the claims folder's ``locks`` (in this order, the same in every caller) as a new
    replacer job of the store at ``path``, beating while it holds them (a live holder: waiting
    jobs never take its locks); yields the job id."""
    folder, job = claims_dir(path), f"{REPLACER}{new_job_id(unique=True)}"
    beat = Heartbeat(folder, job)
    try:
        beat.start()
        with ExitStack() as held:
            for lock in locks:
                held.enter_context(holding(folder, lock, job))
            yield job
    finally:
        beat.stop()


def _fate(path: str | Path, digest: str, overwrite: bool, model: str | None,
          legacy: str | None, grown: Growth | None) -> tuple[str, str | None]:
    if not Path(path).exists():
        return "create", None
    attrs = read_attrs(path) or {}
    found = attrs.get("piadm_store_digest")
    if found is None:
        check_unedited(path, replaceable=False)  # its mark edited: said, never deleted
        return "foreign", None
    made_with = attrs.get("model_sha256") if model else None
    if legacy is not None and found == legacy and made_with in (None, model):
        return "upgrade", found
    if found == digest and made_with in (None, model):
        return "resume", found
    ours = (digest, legacy) + ((grown.digest,) if grown is not None else ())
    if grown is not None and found == grown.digest and made_with in (None, model):
        return ("grow" if grown.made < grown.asked else "replace" if overwrite
                else "fewer"), found
    if found in ours:  # the same settings, but the model's files have changed since
        return ("replace" if overwrite else "weights"), made_with
    return ("replace" if overwrite else "other"), found


def check_path_walk(path: str | Path, key: str = "output.path") -> None:
    """Refuse a path that steps back (``..``) out of a folder that does not exist: making the
    store would make that folder, and the store's name would read as two places at once."""
    parts = Path(path).parts
    for i, part in enumerate(parts):
        if part == ".." and i and not Path(*parts[:i]).exists():
            raise ConfigError(f"config: {key} = {str(path)!r} steps back out of "
                              f"{str(Path(*parts[:i]))!r}, which does not exist: write the path "
                              "without it")


def check_writable(path: str | Path) -> None:
    """Raise OSError naming the folder when a store cannot be made at ``path``: its nearest
    existing folder must take a new entry (tried with an empty folder, removed at once); and
    StoreExists when ``path`` lies inside another Zarr store."""
    store = enclosing_store(path)
    if store is not None:
        raise StoreExists(f"output {path} is inside the Zarr store {store}: choose an "
                          "output.path outside it")
    existing = nearest_existing(path)
    if not existing.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(existing))
    try:
        try_new_entry(existing)
    except OSError as err:  # /proc: a folder that exists says "no such file" to a new one
        raise OSError(err.errno, f"{err.strerror} on making a folder in it, so output.path "
                                 f"{path} cannot be made there", str(existing)) from None


# A store is refused where it would need more than this many times the free space of its
# disk: compressed, noisy float fields keep most of their bytes (grf stores: 0.93 to 0.95 of
# them), and a typo in ensemble.members (1e9) filled a disk for minutes before it failed
ROOM_FACTOR = 1.0
# What a file takes on disk at least: a store of many small chunks is mostly these
FILE_BLOCK = 4096


def check_room(path: str | Path, member_bytes: int, members: int, *, held: int = 0,
               files: int = 0, replaced: bool = False) -> None:
    """Raise ConfigError when a store of ``members`` members (the store's items x members)
    of ``member_bytes`` bytes each (a field and its per-member values), in ``files`` chunk
    files of at least ``FILE_BLOCK`` bytes, would need more than ``ROOM_FACTOR`` times the
    free space of the disk that ``path`` is on: less the ``held`` members a grown store has
    written already, and with the bytes of a ``replaced`` store (deleted before a field is
    written) counted free."""
    from pipeline.host_memory import format_bytes

    existing = nearest_existing(path)
    free = shutil.disk_usage(existing).free + (_bytes_under(path) if replaced else 0)
    needed = member_bytes * (members - held) + FILE_BLOCK * files
    if needed > ROOM_FACTOR * free:
        raise ConfigError(
            f"ensemble.members: the store at output.path {path} would hold {members} fields "
            f"({members - held} to write), {format_bytes(needed)} with their per-member values "
            f"and files, before compression (which keeps most of a field's bytes), where "
            f"{existing} has {format_bytes(free)} free"
            f"{' with the store it replaces' if replaced else ''}: lower ensemble.members (or "
            "select fewer items), or choose an output.path on a disk with room")


def _bytes_under(path: str | Path) -> int:
    """The disk space the files under the folder ``path`` take (their blocks, as a new
    store's are counted in ``check_room``)."""
    return sum(os.stat(os.path.join(root, name)).st_blocks * 512
               for root, _, names in os.walk(path) for name in names)


def upgrade_identity(path: str | Path, legacy: str, digest: str, *, plan: str | None = None,
                     asked: int | None = None, model: str | None = None,
                     completed: Config | None = None, lacked: tuple[str, ...] = ()) -> None:
    """Give a store that an older piadm made under the ``legacy`` digest (which counted
    ensemble.batch_size, or lacked keys added since) this version's ``digest``, its unit of
    work (``member_batch``: the batch size it was made with), for an ``"auto"`` run's store
    ``plan`` (the digest of the config whose plan it keeps) and ``asked`` (the batch size
    that config asked, when known), ``model``, an exact model's digest (its [model]
    section: keys added since change it) where given, and for a store whose config
    ``lacked`` keys added since, ``completed``, that config with them (``stored.Stored``), as
    its config; so that runs of any batch size resume it; its history says so. Only while no
    live job fills it (``check_idle``): an older job still writing would find its store
    changed, and stop; and under the claims folder's locks: a job finishing meanwhile would
    write its copy of the attributes back over the new identity."""
    # the replace lock too: a replacement must not delete the store (or these locks) meanwhile
    with _replacing(path, "replace", "finalize"):
        attrs = read_attrs(path) or {}
        if attrs.get("piadm_store_digest") != legacy:  # another job of this config came first
            return
        check_idle(path, "brings an older piadm's store up to date")
        changes = {key: digest for key in ("piadm_store_digest", "store_sha256")
                   if attrs.get(key) == legacy}
        if model is not None:
            changes["model_sha256"] = model
        if plan is not None and "plan_config_sha256" in attrs:
            changes["plan_config_sha256"] = plan
            if asked is not None:
                changes[ASKED] = asked
        unit = member_batch(path)
        if completed is not None:  # what its members were made with, keys added since too
            changes.update(config=completed.text, config_sha256=completed.digest)
        why = (f"its config lacked {', '.join(lacked)}, keys added since, read as the piadm "
               "that made it ran without them" if lacked else
               "the store's identity no longer counts ensemble.batch_size")
        finalize(path, f"piadm {pipeline.__version__}: {why}; its batches of {unit} stay its "
                       "unit of work", {**changes, MEMBER_BATCH: unit})


def stored_config(path: str | Path) -> str:
    """The config TOML a piadm store at ``path`` was made with ('' when unreadable)."""
    return str((read_attrs(path) or {}).get("config", ""))


def check_claims_folder(path: str | Path) -> None:
    """Refuse a store whose claims folder (``STORE.claims``, beside it) is something piadm
    did not make: a file, or a folder holding others' files (another store named so, a
    user's folder), which piadm would write into and clean up after its runs."""
    folder = claims_dir(path)
    if folder.exists() and not folder.is_dir():
        raise StoreExists(f"output {path}: {folder} is a file, not piadm's folder of claims on "
                          "the store's batches: move it away (piadm keeps the store's claims "
                          "there), or choose another output.path")
    strange, claims = strange_entries(folder)
    if strange:
        more = f" and {len(strange) - 3} more" if len(strange) > 3 else ""
        # piadm's claims among them (jobs may be filling the store): the strangers go, not
        # the folder, whose heartbeats keep a replacement off a store being filled
        fix = ("remove what piadm did not make from it" if claims else
               "move it away (piadm keeps the store's claims there), or choose another "
               "output.path")
        raise StoreExists(f"output {path}: {folder} holds {', '.join(strange[:3])}{more}, "
                          f"which piadm did not make there: {fix}")


def check_target(path: str | Path, digest: str, *, overwrite: bool, model: str | None = None,
                 differs=(), legacy: str | None = None, grown: Growth | None = None) -> str:
    """Refuse, before any costly start-up work, an output that ``open_or_create`` would refuse;
    returns the fate otherwise: ``create`` it, ``resume`` this run's own store, ``upgrade``
    this run's own store made by an older piadm under the ``legacy`` digest
    (``upgrade_identity``, then resume it), ``grow`` this run's own store made with fewer
    members (``grown``: the digest of this run's settings at the members the store holds,
    those members and the run's; ``identity.growth``), or ``replace`` another configuration's
    or another model's (with ``overwrite``). Refused: ``foreign`` (not a piadm store: never
    deleted), ``other`` (another configuration's), ``fewer`` (this configuration's with more
    members than asked), ``weights`` (this configuration's with other model files), and a
    replacement through a symbolic link. ``model``: the run's model digest (None: not
    compared); ``differs``: a callable giving the settings in which another configuration's
    store differs, for the message."""
    check_claims_folder(path)
    fate, found = _fate(path, digest, overwrite, model, legacy, grown)
    if fate == "fewer":
        made, asked = grown.made, grown.asked
        raise StoreExists(
            f"output {path} holds {made} members of this configuration and this run asks "
            f"ensemble.members = {asked}: piadm grows a store but never cuts one: ask {made} or "
            f"more to resume or grow it, read its first {asked} members with xarray "
            f"(ds.isel(member=slice({asked}))), or set output.overwrite = true to replace it")
    if fate == "replace" and Path(path).is_symlink():
        raise StoreExists(f"output {path} is a symbolic link, and piadm does not replace a store "
                          "through a link: point output.path at the store itself")
    if fate == "weights":  # mixing two networks' members in one ensemble would go unseen
        raise StoreExists(
            f"output {path} was made by this configuration with other model files (model "
            f"digest {found[:12]}, now {model[:12]}): the checkpoint, guide or weights file "
            "has changed since; put the original back to resume it, choose another "
            "output.path, or set output.overwrite = true to replace it")
    if fate == "foreign":
        if Path(path).is_dir() and not any(Path(path).iterdir()):  # made ahead by a script
            remove = f"rm {path}" if Path(path).is_symlink() else f"rmdir {path}"
            raise StoreExists(f"output {path} is an empty folder, not a store: remove it "
                              f"({remove}) and piadm makes the store there")
        raise StoreExists(
            f"output {path} exists and is not a piadm store, and piadm deletes only stores it "
            "made (output.overwrite = true too): move it away, or choose another output.path")
    if fate == "other":
        changes = differs(stored_config(path)) if differs else []
        changed = "; ".join(changes)
        # other items of the same input: they cannot join the store (a member's noise is
        # keyed by its item's position), and a new store of the same seed repeats its noise
        items = changes and all(c.startswith(("input.items", "input.range")) for c in changes)
        raise StoreExists(
            f"output {path} was made by a different configuration (digest {found[:12]}, this "
            f"run {digest[:12]}" + (f"; it differs in {changed}" if changed else "") + "): "
            + ("items are not added to a store: sample the new ones into another output.path "
               "with a sampler.seed of its own, or set output.overwrite = true to replace it"
               if items else
               "rerun its own config to resume it, choose another output.path, or set "
               "output.overwrite = true to replace it"))
    return fate


def open_or_create(spec: StoreSpec, *, overwrite: bool,
                   growth: Callable[[], Growth | None] = lambda: None,
                   stale: Callable[[], str] = lambda: "", differs=()) -> str:
    """Create the store (metadata only) or check an existing one is this run's; returns what
    it did: ``created``, ``resumed``, ``replaced`` or ``grown from M to N members``. Creation
    is built aside and renamed into place, so the path is either absent or complete, and two
    runs racing to create it agree on one. With ``overwrite`` another configuration's store
    (or one made with other model files) is replaced: moved aside in one step, deleted once
    the new one stands (what a kill left is deleted by the next run); this configuration's own is
    resumed (a requeued job, or a second job sharing its batches, must not delete the work),
    and grown to more members rather than replaced: its members are the ones a new store's
    would be, each member's noise keyed by its index. ``growth`` tells, from the store as it
    is when asked, whether it is this run's settings at another member count (see
    ``check_target``; asked again under the lock, since another job may grow it first).
    ``stale`` tells why this configuration's store must be made anew, "" where it need not
    (other network code or input: ``store_match.is_stale``): with ``overwrite`` it is
    replaced too, and ``replaced (WHY)`` says so. ``differs``: as ``check_target``'s, for
    a store another configuration's run made first."""
    delete_leftovers(spec.path)
    # never delete what we did not make
    fate = check_target(spec.path, spec.digest, overwrite=overwrite,
                        model=spec.attrs.get("model_sha256"), grown=growth(), differs=differs)
    if fate in ("resume", "grow") and overwrite and stale():
        return _replace(spec, stale, growth)
    if fate == "resume":
        if not members_fit(spec.path, spec.members):  # another config's growth cut short
            return _grow(spec, growth, overwrite, stale)
        return "resumed"
    if fate == "grow":
        return _grow(spec, growth, overwrite, stale)
    return (_replace(spec) if fate == "replace"
            else _create(spec, overwrite, differs, growth, stale))


def _grow(spec: StoreSpec, growth: Callable[[], Growth | None], overwrite: bool,
          stale: Callable[[], str] = lambda: "") -> str:
    """Grow this configuration's store to ``spec.members``, or fit its arrays back to them
    after another configuration's growth was cut short, one job at a time (the claims
    folder's locks: as for replacing, and against a job finishing, which rewrites the
    attributes). Growing is refused while a job fills the store: a job of the smaller
    configuration would find its store changed, and stop. Fitting back is not: those jobs
    write only below the count, and nothing past it is done. When another job grew (or
    replaced) the store first, it is opened as ``open_or_create`` finds it now."""
    with _replacing(spec.path, "replace", "finalize"):
        grown = growth()  # as it is now: another job may have grown it meanwhile
        fate = check_target(spec.path, spec.digest, overwrite=overwrite,
                            model=spec.attrs.get("model_sha256"), grown=grown)
        if fate == "resume":  # the arrays of a growth cut short: none of theirs is done
            fit_members(spec.path, spec.members)
            consolidate(spec.path)  # the metadata too, which a fit cut short left behind
            return "resumed"
        if fate == "grow":
            check_idle(spec.path, "grows a store")
            attrs = {key: spec.attrs[key] for key in GROWN_ATTRS if key in spec.attrs}
            unit = member_batch(spec.path)
            chunk = member_chunk_of(spec.path)
            if unit % chunk:  # an older piadm cut the chunks of a store smaller than a batch
                attrs[MEMBER_BATCH] = chunk  # batches of whole chunks: writers never share
            grow(spec.path, spec.members,
                 f"piadm {pipeline.__version__}: grown from {grown.made} to {spec.members} "
                 "members (ensemble.members)", {**attrs, "piadm_store_digest": spec.digest})
            return f"grown from {grown.made} to {spec.members} members"
    return open_or_create(spec, overwrite=overwrite, growth=growth, stale=stale)


def _create(spec: StoreSpec, overwrite: bool, differs=(),
            growth: Callable[[], Growth | None] = lambda: None,
            stale: Callable[[], str] = lambda: "") -> str:
    """Create the store; when another run created it first, use theirs if it is this
    configuration's, growing it where it holds fewer members than this run asks
    (``check_target`` refuses any other, naming how it ``differs``, or that it holds more)."""
    if create(spec):
        return "created"
    grown = growth()
    fate, _ = _fate(spec.path, spec.digest, False, spec.attrs.get("model_sha256"), None, grown)
    if fate == "grow":
        return _grow(spec, growth, overwrite, stale)
    if overwrite and fate in ("other", "weights", "fewer"):
        # the other run is filling it now: replacing it would lose its members
        raise StoreExists(f"output {spec.path} was made just now by another job (another "
                          "configuration, other model files, or more members), which is filling "
                          "it: output.overwrite replaces a store only when no job writes to it: "
                          "wait for that job to end (or stop it), then rerun")
    check_target(spec.path, spec.digest, overwrite=False,  # never "resume" another config's
                 model=spec.attrs.get("model_sha256"), differs=differs, grown=grown)
    return "resumed"


def filling_jobs(path: str | Path) -> list[str]:
    """The live jobs filling the store at ``path`` (heartbeats in its claims folder; not the
    runs waiting to replace or grow it, which write nothing)."""
    return [job for job in live_jobs(claims_dir(path)) if not job.startswith(REPLACER)]


def replacing_jobs(path: str | Path) -> list[str]:
    """The live runs replacing (or growing) the store at ``path``: it is theirs to remake."""
    return [job.removeprefix(REPLACER) for job in live_jobs(claims_dir(path))
            if job.startswith(REPLACER)]


def check_idle(path: str | Path, what: str = "replaces a store") -> None:
    """Raise StoreExists while a live job fills the store at ``path`` (a heartbeat in its
    claims folder): replacing it then would let that job's members land in the new store,
    marked done. ``what`` piadm would do, for the message."""
    busy = filling_jobs(path)
    if busy:
        raise StoreExists(f"output {path} is being filled by a live job ({', '.join(busy)}); "
                          f"piadm {what} only when no job writes to it: wait for that job to "
                          "end (or stop it), then rerun")


def _doomed(path: Path, job: str) -> Path:
    """Where replacement ``job`` moves the store at ``path`` to delete it."""
    return path.with_name(f".{path.name}.{job}{DELETING}")


def delete_leftovers(path: str | Path) -> None:
    """Delete what replacements killed while deleting left of the stores they replaced at
    ``path``: those whose job is no longer alive (``.NAME.bak.REPLACER...`` is another
    store's, NAME.bak's)."""
    path = Path(path)
    prefix = f".{path.name}."
    leftovers = list(path.parent.glob(f"{glob.escape(prefix + REPLACER)}*{DELETING}"))
    if not leftovers:
        return
    live = set(live_jobs(claims_dir(path)))
    for left in leftovers:
        if left.name[len(prefix):-len(DELETING)] not in live:
            shutil.rmtree(left, ignore_errors=True)


def _replace(spec: StoreSpec, stale: Callable[[], str] = lambda: "",
             growth: Callable[[], Growth | None] = lambda: None) -> str:
    """Delete another configuration's store (or this one's, at this or another member count
    (``growth``), where ``stale`` says why: made from other files) and create this one's, one
    job at a time (a lock in the claims folder): two jobs of one configuration started
    together both find the old store, and the second must resume the first's new store, not
    delete it."""
    with _replacing(spec.path, "replace") as job:
        fate = check_target(spec.path, spec.digest, overwrite=True,  # as it is now
                            model=spec.attrs.get("model_sha256"), grown=growth())
        why = stale() if fate in ("resume", "grow") else ""
        if why:
            fate = "replace"
        if fate == "resume":
            return "resumed"
        if fate == "replace":
            return _moved_aside(spec, job, why)
        if fate != "grow":  # (not grown under this lock: _grow takes it)
            return _create(spec, overwrite=True)
    # this configuration's at fewer members, made anew meanwhile: grown, under its own lock
    return _grow(spec, growth, True, stale)


def _moved_aside(spec: StoreSpec, job: str, why: str) -> str:
    """``_replace``'s replacement, under its lock (``job``): the store at ``spec.path`` made
    anew, ``why`` said (this configuration's, stale) or not (another's)."""
    check_idle(spec.path)
    # moved aside in one step, deleted once the new store stands: a kill part way
    # through deleting it in place would leave a folder without its zarr.json, no
    # longer recognisably a piadm store, which piadm would never delete or use
    doomed = _doomed(Path(spec.path), job)
    os.rename(spec.path, doomed)
    clear_batch_claims(claims_dir(spec.path))  # claims on the old store's batches
    made = _create(spec, overwrite=True)
    shutil.rmtree(doomed, ignore_errors=True)
    return (f"replaced ({why})" if why else "replaced") if made == "created" else made
