"""What the host lets this process allocate: the node's available memory within the cgroups'
limits (a SLURM job's --mem) and the process's own address-space limit (``ulimit -v``). No torch:
``piadm evaluate`` weighs a truth against it without loading torch."""
from __future__ import annotations

import resource
from pathlib import Path

_STATUS = Path("/proc/self/status")


def status_kib(field: str, path: Path = _STATUS) -> int | None:
    """A ``field: N kB`` line of a /proc file (this process's status by default), in KiB."""
    try:
        for line in path.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


# A cgroup v1 memory limit past this is no limit (the kernel's "unlimited" is 2^63 less a page)
NO_CGROUP_LIMIT = 1 << 60


def cgroup_room(proc: Path = Path("/proc/self/cgroup"),
                root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """What this process's cgroups (listed in ``proc``, mounted under ``root``) still let it
    allocate (a SLURM job's --mem): the least of limit less usage over its memory cgroup and
    those above it (usage less the inactive file cache, which the kernel reclaims), in cgroup
    v2 (the ``0::`` line, mounted at ``root`` or, on a hybrid host, its ``unified`` folder)
    and v1 (the ``memory`` controller's line); None where none limits it or none can be
    read."""
    try:
        lines = proc.read_text().splitlines()
    except OSError:
        return None
    places = []  # (folder, limit file, usage file)
    for line in lines:
        hierarchy, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        relative = Path(path.lstrip("/"))
        if hierarchy == "0" and not controllers:
            places += [(base / relative, "memory.max", "memory.current", "inactive_file")
                       for base in (root, root / "unified")]
        elif "memory" in controllers.split(","):
            places.append((root / "memory" / relative, "memory.limit_in_bytes",
                           "memory.usage_in_bytes", "total_inactive_file"))
    rooms = []
    for folder, limit_file, usage_file, cache_key in places:
        for group in (folder, *folder.parents):  # a parent's limit binds its children too
            if not str(group).startswith(str(root)):
                break
            try:
                limit = (group / limit_file).read_text().strip()
                usage = int((group / usage_file).read_text())
            except (OSError, ValueError):
                continue
            if limit.isdigit() and int(limit) < NO_CGROUP_LIMIT:
                rooms.append(int(limit) - usage + _stat(group / "memory.stat", cache_key))
    return min(rooms) if rooms else None


def _stat(path: Path, key: str) -> int:
    """``key``'s value in a cgroup's memory.stat (0 where absent): the file cache it counts
    as used but the kernel gives back on demand (an input just read, say)."""
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def host_room(sharing: int = 1) -> tuple[int, str] | None:
    """(bytes this process may still allocate on the host, where), with ``sharing`` ranks of
    the node sharing its memory evenly: the host's available memory within the cgroups'
    limits, and within the process's own address-space limit (``ulimit -v``, which each rank
    has whole); None when unknown."""
    free = status_kib("MemAvailable", Path("/proc/meminfo"))
    shared = [b for b in (None if free is None else 1024 * free, cgroup_room()) if b is not None]
    room = [max(0, min(shared)) // max(1, sharing)] if shared else []
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    size = status_kib("VmSize")
    if soft != resource.RLIM_INFINITY and size is not None:  # each process's own, not shared
        room.append(max(0, soft - 1024 * size))
    if not room:
        return None
    return min(room), "available on this node's host"


def format_bytes(n: float) -> str:
    """``n`` bytes as GiB, or MiB below one GiB."""
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"
