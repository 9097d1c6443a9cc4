"""Claims on member batches, so that several jobs filling one store share the work.

Before a group samples a batch its lead rank claims it: a file ``ITEM-START.json`` in the
folder ``STORE.claims`` beside the store, created atomically (``O_EXCL``) and naming the job.
Another job skips a batch claimed by a live job and comes back to it at the end: by then it
is done, or its claimant died and the batch is taken over. A job is alive while its
heartbeat file (touched every ``HEARTBEAT_S`` by a thread on the job's first rank) is younger
than ``STALE_S``; on the same host a claimant whose process is gone is dead at once, so a job
killed and rerun at once does not wait. Claims are only a way to share: ``done`` in the store
stays the one record of what is written, so a claim is never trusted over it.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import threading
import time
import uuid
from pathlib import Path

from pipeline.errors import naming, thread_failed
from pipeline.processes import process_alive

HEARTBEAT_S = 10.0
STALE_S = 60.0
LOCK_POLL_S = 0.05  # a lock is held for one metadata update: look again soon
WRITE_S = 10.0  # a claim file is written, and a takeover done, within milliseconds
LOCKS = ("replace", "finalize")  # the locks held in a claims folder besides batch claims
# What piadm makes in a claims folder: heartbeats (and their drafts), and locks and batch
# claims (ITEM-START), each with its takeover lock (KEY.JOB.takeover in piadm before 0.2) and a
# taker's draft (KEY.JOB.tmp)
_KEY = rf"(?:\d+-\d+|{'|'.join(LOCKS)})"
_OURS = re.compile(rf"job-.+\.alive(?:\.\d+\.tmp)?|{_KEY}\.(?:json|takeover)"
                   rf"|{_KEY}\..+\.(?:tmp|takeover)")


def claims_dir(store: str | Path) -> Path:
    """The folder of claims on ``store``'s batches (beside it, never inside; the same for
    every name of the store: a link, a trailing slash)."""
    return Path(f"{os.path.realpath(store)}.claims")


def ours(name: str) -> bool:
    """Whether a file of this name in a claims folder is one piadm makes there."""
    return _OURS.fullmatch(name) is not None


def strange_entries(folder: Path) -> tuple[list[str], bool]:
    """The entries of the claims folder ``folder`` that piadm does not make (a store or a
    folder of the user's that happens to bear the name), sorted, and whether piadm's own
    are there too; ([], False) where it is absent. Hidden files (``.DS_Store``, an NFS
    client's ``.nfsXXXX`` of a file removed while open) are let be: never among piadm's,
    never removed."""
    try:
        with os.scandir(folder) as entries:
            found = [(e.name, e.is_dir(follow_symlinks=False)) for e in entries]
    except (FileNotFoundError, NotADirectoryError):
        return [], False
    strange = sorted(name for name, is_dir in found
                     if not name.startswith(".") and (is_dir or not ours(name)))
    return strange, any(ours(name) and not is_dir for name, is_dir in found)


def _in_folder(folder: Path, act):
    """``act()`` with ``folder`` made first, and made and done again once where the folder
    vanished in between: another job's ``Heartbeat.stop`` removes it when it is empty."""
    for again in (True, False):
        folder.mkdir(parents=True, exist_ok=True)
        try:
            return act()
        except FileNotFoundError:
            if not again:
                raise


def new_job_id(folder: Path | None = None, *, unique: bool = False) -> str:
    """An id for this run: the SLURM job, its step and task (a requeued job keeps them, so it
    finds its claims its own; two steps or tasks side by side do not share one), else, or
    with ``unique``, this host, process and a random suffix. Two piadm commands of one step
    on one host (started in one batch script) would share the SLURM id, and each take the
    other's claims and locks for its own: the id is taken by creating its heartbeat file in
    ``folder``, and a command that finds it held by another live process on this host, or
    being created, gets a unique id. (A heartbeat of the id from another host is taken for
    this job's own earlier run, requeued elsewhere.)"""
    own = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    slurm = os.environ.get("SLURM_JOB_ID")  # an array task's own: unique among its tasks
    if unique or not slurm:
        return own
    step, task = os.environ.get("SLURM_STEP_ID"), os.environ.get("SLURM_PROCID", "0")
    job = f"slurm-{slurm}" + (f".{step}" if step else "") + (f".p{task}" if task != "0" else "")
    if folder is None:
        return job
    try:  # atomic: of two commands starting at once, one creates it
        _in_folder(folder, lambda: os.close(os.open(_beat_file(folder, job),
                                                    os.O_CREAT | os.O_EXCL | os.O_WRONLY)))
        return job
    except FileExistsError:
        return f"{job}-{own}" if _beating_here(folder, job) else job


def _beat_file(folder: Path, job: str) -> Path:
    """The heartbeat file of ``job`` in the claims folder ``folder``."""
    return folder / f"job-{job}.alive"


def _running_here(info: dict) -> bool | None:
    """Whether the process a heartbeat's ``info`` names runs, where it ran on this host (a
    process gone needs no waiting for its heartbeat to age); None for another host's."""
    if info.get("host") != socket.gethostname():
        return None
    return process_alive(int(info["pid"]))


def _beating_here(folder: Path, job: str) -> bool:
    """Whether another live process on this host beats for ``job`` in ``folder``, or is
    creating its heartbeat this instant."""
    beat = _beat_file(folder, job)
    try:
        info = json.loads(beat.read_text())
        return int(info["pid"]) != os.getpid() and bool(_running_here(info))
    except ValueError:  # empty: just created by another command, unless left long ago
        try:
            return time.time() - beat.stat().st_mtime < WRITE_S
        except OSError:
            return False
    except (OSError, KeyError, TypeError):
        return False


class Heartbeat:
    """Touches ``job-ID.alive`` in the claims folder every ``HEARTBEAT_S`` from a thread."""

    def __init__(self, folder: Path, job: str):
        self.path = _beat_file(folder, job)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="piadm-heartbeat", daemon=True)

    def _beat(self) -> None:
        # written aside and renamed over: a reader never sees the file empty or cut short
        # (rewritten in place it is, for an instant, and the job would read as dead)
        aside = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")

        def write():
            aside.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
            os.replace(aside, self.path)

        with naming(self.path):  # a full disk's error names the file
            _in_folder(self.path.parent, write)

    def _run(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self._beat()
            except OSError:  # a full disk: the run's own writes say so; beat again next time
                pass

    def start(self) -> "Heartbeat":
        """Beat once now, then every ``HEARTBEAT_S`` on a daemon thread; OutOfMemory
        (``errors.thread_failed``), leaving no beat file, where the thread cannot start. A
        Ctrl-C while it starts leaves neither a beat file nor a thread to write one: a beat
        outliving its run (in a notebook's process) would keep the store busy."""
        try:
            self._beat()
            try:
                self._thread.start()
            except RuntimeError as err:  # "can't start new thread"
                raise thread_failed("the claims' heartbeat thread", err) from None
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop beating and remove the beat file: the job holds no claim from now on. The
        claims folder goes too once nothing is left in it (a finished store's). Also for a
        heartbeat that never started, or did not finish starting."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self.path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # not empty: another job's, or claims still held
            self.path.parent.rmdir()


def _alive(folder: Path, owner: dict) -> bool:
    beat = _beat_file(folder, owner.get("job"))
    try:
        age = time.time() - beat.stat().st_mtime
    except FileNotFoundError:
        return False  # no heartbeat: stopped, or never started
    except OSError:  # unknown (a network file system's transient error): not taken as dead
        return True
    try:
        info = json.loads(beat.read_text())
    except (OSError, ValueError):  # unreadable (an older piadm's, being rewritten): its age
        return age < STALE_S
    return _running_here(info) is not False and age < STALE_S


def claim(folder: Path, key: str, job: str) -> bool:
    """Claim batch ``key`` for ``job``; True when it is ours (new, already ours, or taken
    over from a dead job), False while a live job holds it."""
    path = folder / f"{key}.json"
    record = json.dumps({"job": job, "time": time.time()})
    try:
        fd = _in_folder(folder, lambda: os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY,
                                                0o644))
    except FileExistsError:
        owner = _owner(path)
        if owner is None:  # being written this instant: leave it to its writer
            return False
        if owner.get("job") == job:
            return True
        if _alive(folder, owner):
            return False
        return _take_over(folder, key, owner, job, record)
    try:
        with naming(path), os.fdopen(fd, "w") as f:
            f.write(record)
    except OSError:  # a full disk: leave no empty claim behind for others to age out
        path.unlink(missing_ok=True)
        raise
    return True


def clear_batch_claims(folder: Path) -> int:
    """Remove every batch claim (``ITEM-START.json``) in ``folder``: for a store whose members
    are all done (a job still running finds every batch done and claims none), or one being
    replaced (its batches are gone). Locks and heartbeats stay. The claims removed."""
    removed = 0
    for path in folder.glob("*-*.json"):
        item, _, start = path.stem.partition("-")
        if item.isdigit() and start.isdigit():
            with contextlib.suppress(OSError):
                path.unlink()
                removed += 1
    return removed


def batch_key(item: int, start: int) -> str:
    """The claim key of the store's batch of item index ``item`` from member ``start``."""
    return f"{item}-{start}"


def holds(folder: Path, key: str, job: str) -> bool:
    """Whether ``job`` still holds claim ``key``: another job takes a claim over when its
    holder's heartbeat looks dead, which a slow file system can make a live job's look."""
    owner = _owner(folder / f"{key}.json")
    return owner is not None and owner.get("job") == job


def _owner(path: Path) -> dict | None:
    """The record of claim ``path``; None while it may still be being written. A claim left
    empty or cut short (its job killed between creating and writing it, or a full disk) for
    longer than ``WRITE_S`` reads as a dead job's."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        try:
            age = time.time() - path.stat().st_mtime
        except OSError:  # gone: given back meanwhile
            return None
        return {"job": "(unwritten)"} if age > WRITE_S else None


def _take_over(folder: Path, key: str, owner: dict, job: str, record: str) -> bool:
    """Take claim ``key`` from its dead ``owner``. One taker at a time holds the takeover
    lock, checks the claim is still the dead job's (another taker may have come first),
    replaces it and gives the lock back: a job id that comes back (a requeued SLURM job)
    may be taken over from again. A holder giving the claim back holds the same lock."""
    lock = folder / f"{key}.takeover"
    if not _lock_takeover(lock):
        return False
    try:
        now = _owner(folder / f"{key}.json") or {}
        if now.get("job") != owner.get("job") or _alive(folder, now):  # taken, or back
            return False
        tmp = folder / f"{key}.{job}.tmp"
        tmp.write_text(record)
        os.replace(tmp, folder / f"{key}.json")
        return True
    finally:
        lock.unlink(missing_ok=True)


def _lock_takeover(lock: Path) -> bool:
    """Create the takeover lock ``lock``; False while another holds it (one left by a taker
    killed holding it is removed once it is older than ``WRITE_S``: a takeover, or a give
    back, takes milliseconds)."""
    try:
        os.close(os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        return True
    except FileExistsError:
        try:
            if time.time() - lock.stat().st_mtime > WRITE_S:
                lock.unlink(missing_ok=True)
        except OSError:
            pass
        return False


def clear_left_by_dead(folder: Path) -> int:
    """Remove what dead jobs (killed, so never stopped) left in the claims folder ``folder``:
    their heartbeats and locks, and files being written (``.tmp``) or takeover locks older
    than ``STALE_S``. For a store whose members are all done, whose claims folder goes with
    the last live job's heartbeat only once nothing else is left in it. The files removed."""
    removed = 0
    for path in folder.iterdir() if folder.is_dir() else ():
        if not ours(path.name):  # never another's file (checked before the run, too)
            continue
        if path.name.startswith("job-") and path.name.endswith(".alive"):
            dead = not _alive(folder, {"job": path.name[4:-len(".alive")]})
        elif path.suffix in (".tmp", ".takeover"):
            dead = _age(path) > STALE_S
        elif path.suffix == ".json":  # a lock (the batch claims are cleared before)
            removed += _remove_dead_lock(folder, path.stem)
            continue
        else:
            continue
        if dead:
            with contextlib.suppress(OSError):
                path.unlink()
                removed += 1
    return removed


def _remove_dead_lock(folder: Path, key: str) -> int:
    """Remove lock ``key`` where its owner is dead, under its takeover lock (a job taking it
    over meanwhile keeps it); 1 when removed."""
    try:
        if not _lock_takeover(folder / f"{key}.takeover"):
            return 0  # being taken over, or given back, this instant
    except OSError:
        return 0
    try:
        owner = _owner(folder / f"{key}.json")
        if owner is None or _alive(folder, owner):
            return 0
        (folder / f"{key}.json").unlink()
        return 1
    except OSError:
        return 0
    finally:
        with contextlib.suppress(OSError):
            (folder / f"{key}.takeover").unlink(missing_ok=True)


def _age(path: Path) -> float:
    """Seconds since ``path`` was written (0 where it is gone)."""
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return 0.0


def live_jobs(folder: Path) -> list[str]:
    """The jobs with a live heartbeat in ``folder``."""
    names = (beat.name.removeprefix("job-").removesuffix(".alive")
             for beat in folder.glob("job-*.alive"))
    return sorted(job for job in names if _alive(folder, {"job": job}))


@contextlib.contextmanager
def holding(folder: Path, name: str, job: str):
    """Hold the lock ``name`` for ``job`` while the block runs: a claim that is given back
    on leaving, so that jobs finishing together update shared metadata one at a time (a
    dead holder's lock is taken over like a dead job's batch)."""
    while not claim(folder, name, job):
        time.sleep(LOCK_POLL_S)
    try:
        yield
    finally:
        release(folder, name, job)


def release(folder: Path, key: str, job: str) -> None:
    """Remove claim ``key`` when ``job`` still holds it (one taken over meanwhile is
    another's now): a lock's on leaving it, a batch's once it is written and marked done
    (the store's record tells every job so from then on; kept, the claims of finished
    batches piled up a file a batch until the store was complete). Under the takeover
    lock: a takeover between the look and the removal would otherwise lose the taker's
    claim. A folder that cannot be reached (a lost mount) leaves the claim, to be taken
    over as a dead job's, rather than hide the error the block may be leaving with."""
    try:
        while not _lock_takeover(folder / f"{key}.takeover"):
            time.sleep(LOCK_POLL_S)
    except OSError:
        return
    try:
        if holds(folder, key, job):
            (folder / f"{key}.json").unlink(missing_ok=True)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            (folder / f"{key}.takeover").unlink(missing_ok=True)
