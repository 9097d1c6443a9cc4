"""A store's record of finished members (its ``done`` array) and the writing of a batch into
it: reading the record chunk by chunk (naming damaged chunks), the members of a batch still
to write, and a claimed batch's fields and per-member arrays, marked done last.

Completion lives in ``done``, written after the data: a member killed mid-write is not done,
and Zarr's atomic chunk writes mean a rerun simply rewrites it.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import zarr

from pipeline.errors import PiadmError, is_system_error
from pipeline.store import RESIDUAL_DTYPE, StoreExists
from pipeline.store_attrs import NOT_A_GROUP


class DamagedRecord(PiadmError):
    """The store's ``done`` array, its record of the members finished, cannot be read (a
    chunk cut short or overwritten after writing): the message names the chunks and the fix."""


# What mends a store whose arrays' metadata is damaged: nothing in piadm rewrites it
ARRAYS_FIX = ("restore the store from a copy, or move it away and rerun the sample command to "
              "sample it anew")


def read_done_record(done: zarr.Array) -> tuple[np.ndarray, list[tuple[slice, slice]]]:
    """The ``done`` record (a store's ``done`` array) read chunk by chunk: (items, members)
    bool flags, False in the chunks that fail to decode, and those chunks' (items, members)
    regions (empty for a sound record). A chunk file deleted reads as not done (the fill
    value), not as damaged."""
    whole = from_chunk_files(done)
    if whole is not None:  # every chunk decoded: none is damaged
        return whole == 1, []
    rows, cols = done.chunks
    flags, bad = np.zeros(done.shape, bool), []
    for i in range(0, done.shape[0], rows):
        for j in range(0, done.shape[1], cols):
            region = (slice(i, min(i + rows, done.shape[0])),
                      slice(j, min(j + cols, done.shape[1])))
            try:
                flags[region] = done[region] == 1
            except Exception as err:  # a codec's error on damaged bytes
                if is_system_error(err):
                    raise
                bad.append(region)
    return flags, bad


def from_chunk_files(done: zarr.Array) -> np.ndarray | None:
    """The whole ``done`` array (items, members) int8, read from its chunk files directly:
    one per (item, store batch), 100,000 on a store of 100,000 items, which zarr reads at
    130 to 250 us each (13 to 25 s) and this at about 12 us (1.2 s). Only for the layout
    piadm writes (``_direct``); None for any other, or where a chunk file does not decode to
    its shape: zarr reads it then, and names what is damaged. A chunk without a file holds
    the fill value, 0: not done (zarr writes no chunk equal to it, so a file's absence says
    nothing else)."""
    direct = _direct(done)
    if direct is None:
        return None
    folder, decode = direct
    rows, cols = done.chunks
    flags = np.zeros(done.shape, np.int8)
    try:
        for i, j, data in _chunk_files(folder):
            chunk = np.frombuffer(decode(data), np.int8).reshape(rows, cols)
            block = flags[i * rows:(i + 1) * rows, j * cols:(j + 1) * cols]
            block[...] = chunk[:block.shape[0], :block.shape[1]]
    except (ValueError, RuntimeError, NotADirectoryError, IsADirectoryError):
        return None  # a chunk that does not decode, a folder where a chunk's file goes
    return flags


def row_from_chunk_files(done: zarr.Array, item: int, members: slice) -> np.ndarray | None:
    """``done[item, members]`` (a batch's flags, read twice a batch as its claim is made)
    from the chunk files that hold it, as ``from_chunk_files`` reads them: 20 to 50 us where
    zarr takes about 2 ms. None where ``from_chunk_files`` would give None."""
    direct = _direct(done)
    if direct is None or not 0 <= item < done.shape[0]:
        return None
    folder, decode = direct
    rows, cols = done.chunks
    lo, hi, _ = members.indices(done.shape[1])
    flags = np.zeros(max(hi - lo, 0), np.int8)
    i, r = divmod(item, rows)
    for j in range(lo // cols, (hi - 1) // cols + 1 if hi > lo else 0):
        try:
            data = Path(folder, str(i), str(j)).read_bytes()
        except FileNotFoundError:
            continue  # the fill value: not done
        except (NotADirectoryError, IsADirectoryError):
            return None
        try:
            chunk = np.frombuffer(decode(data), np.int8).reshape(rows, cols)
        except (ValueError, RuntimeError):
            return None
        a, b = max(lo, j * cols), min(hi, (j + 1) * cols)
        flags[a - lo:b - lo] = chunk[r, a - j * cols:b - j * cols]
    return flags


def _direct(done: zarr.Array):
    """(the folder of ``done``'s chunk files, their decoder) for the layout piadm writes (a
    local folder, default chunk keys, raw bytes or Zstandard, no sharding, int8 of fill value
    0, format 3); None for any other."""
    meta = done.metadata
    if getattr(meta, "zarr_format", None) != 3:  # a format 2 array: other keys and codecs
        return None
    codecs = [type(c).__name__ for c in meta.codecs]
    root = getattr(done.store, "root", None)
    encoding = meta.chunk_key_encoding
    if (root is None or codecs not in (["BytesCodec"], ["BytesCodec", "ZstdCodec"])
            or type(encoding).__name__ != "DefaultChunkKeyEncoding" or encoding.separator != "/"
            or np.dtype(done.dtype) != np.int8 or meta.fill_value != 0 or done.ndim != 2):
        return None
    import numcodecs

    return Path(root, done.path, "c"), numcodecs.Zstd().decode if len(codecs) == 2 else bytes


def _chunk_files(folder: Path):
    """(i, j, bytes) of each chunk file ``folder/i/j`` of a 2-d array; none where the folder
    is not (no chunk written). A chunk removed while it is listed (a repair writing zeros,
    which zarr stores as no file) holds the fill value, as zarr reads it: it is skipped."""
    try:
        rows = os.scandir(folder)
    except FileNotFoundError:
        return
    with rows:
        for row in rows:
            if not row.name.isdigit():
                continue
            try:
                cells = os.scandir(row.path)
            except FileNotFoundError:
                continue
            with cells:
                for cell in cells:
                    if not cell.name.isdigit():
                        continue  # a write's temporary file, or another tool's: not a chunk
                    try:
                        with open(cell.path, "rb") as f:
                            data = f.read()
                    except FileNotFoundError:
                        continue
                    yield int(row.name), int(cell.name), data


# Opened groups and arrays, each kept with the bytes of the metadata files it was made from
# (the group's zarr.json, and for the done array its own): a batch's write or claim re-reads
# those small files (microseconds) instead of parsing the consolidated metadata and making the
# arrays again (1.5 to 2 ms each time, twice a batch). What the files hold now is what a fresh
# open would see: a store replaced, grown or deleted reads other bytes, or none.
_OPENED: dict = {}
_OPENED_MOST = 16  # stores one process writes at a time: a few


def _metadata_bytes(path: str | Path, files: tuple[str, ...]) -> tuple[bytes, ...] | None:
    """The bytes of ``files`` (paths within the store at ``path``); None where one cannot be
    read."""
    try:
        return tuple(Path(path, name).read_bytes() for name in files)
    except OSError:
        return None


def _opened(path: str | Path, kind: str, files: tuple[str, ...], make):
    """``make()``, an open of the store at ``path``, or the one made before from metadata
    ``files`` that still hold the same bytes; a new one is kept only where the files did not
    change while it was made. Any failure is ``make``'s own."""
    key = (os.fspath(path), kind)
    before = _metadata_bytes(path, files)
    kept = _OPENED.get(key)
    if before is not None and kept is not None and kept[0] == before:
        return kept[1]
    made = make()
    if before is not None and _metadata_bytes(path, files) == before:
        if len(_OPENED) >= _OPENED_MOST and key not in _OPENED:
            _OPENED.clear()
        _OPENED[key] = (before, made)
    return made


def _writable(path: str | Path) -> tuple[zarr.Group, dict]:
    """The store at ``path`` opened for writing, and its arrays by name (``_opened``)."""
    def make():
        group = zarr.open_group(path, mode="r+")
        return group, dict(group.arrays())

    return _opened(path, "r+", ("zarr.json",), make)


def _read_done(path: str | Path, region=slice(None)) -> np.ndarray:
    """``done[region]``, or DamagedRecord naming the damaged chunks and the repair."""
    try:
        # its own metadata, not the consolidated copy: a done array deleted since read as all
        # fill value there, a store "incomplete: rerun" that the rerun then refused
        done = _opened(path, "done", ("zarr.json", "done/zarr.json"), lambda: zarr.open_group(
            path, mode="r", use_consolidated=False)["done"])
    except (FileNotFoundError, zarr.errors.GroupNotFoundError):
        raise  # the store itself is gone: the caller says what that means for it
    except Exception as err:  # zarr's errors for unreadable metadata are many
        raise DamagedRecord(f"store {path}: its record of finished members (the done array) "
                            f"cannot be opened ({type(err).__name__}): {ARRAYS_FIX}") from None
    if region == slice(None):
        whole = from_chunk_files(done)
    else:  # a batch's: (item, members)
        whole = row_from_chunk_files(done, *region)
    if whole is not None:
        return whole
    try:
        return done[region]
    except Exception as err:
        _, bad = read_done_record(done)
        if not bad:
            raise
        where = ", ".join(f"items {r.start}..{r.stop - 1} members {c.start}..{c.stop - 1}"
                          for r, c in bad[:3])
        more = f" and {len(bad) - 3} more chunks" if len(bad) > 3 else ""
        said = str(err).strip().splitlines()[0] if str(err).strip() else "cannot decode"
        raise DamagedRecord(
            f"store {path}: its record of finished members (the done array) is damaged at "
            f"{where}{more} ({type(err).__name__}: {said}): run `piadm status --verify "
            f"--repair {path}` to mark those members not done, then rerun the sample command "
            "to sample them again") from None


def done_members(path: str | Path) -> np.ndarray:
    """(items, members) bool: which members are completely written; DamagedRecord where the
    record cannot be read."""
    return _read_done(path) == 1


def members_left(path: str | Path, item: int, members) -> tuple[int, ...]:
    """The members of ``members`` (consecutive) of item index ``item`` not yet written;
    StoreExists where the store is gone (another run replaced it meanwhile)."""
    try:
        done = _read_done(path, (item, slice(members[0], members[-1] + 1)))
    except (FileNotFoundError, zarr.errors.GroupNotFoundError):
        raise StoreExists(f"output {path} was replaced or deleted by another run while this "
                          "one worked on it: this run's remaining members are not written; "
                          "rerun it once the other run is done, or on another output.path"
                          ) from None
    return tuple(m for m, flag in zip(members, done) if flag != 1)


def still_ours(path: str | Path, digest: str, model: str | None):
    """The store at ``path`` opened for writing, after checking it is still the one this run
    writes: made by the configuration with ``digest`` and the model with digest ``model``.
    Raises StoreExists when another run replaced (or deleted) it meanwhile."""
    return _ours(path, digest, model)[0]


def _ours(path: str | Path, digest: str, model: str | None) -> tuple[zarr.Group, dict]:
    """``still_ours``'s group, and its arrays by name."""
    try:
        group, arrays = _writable(path)
        attrs = group.attrs
        ours = (attrs.get("piadm_store_digest") == digest
                and (model is None or attrs.get("model_sha256") in (None, model)))
    except NOT_A_GROUP:
        ours = False
    if not ours:
        raise StoreExists(f"output {path} was replaced, grown or deleted by another run while "
                          "this one wrote to it: this run's remaining members are not written; "
                          "rerun it once the other run is done, or on another output.path")
    return group, arrays


class BatchTaken(StoreExists):
    """Another job took over the batch this one was writing (its heartbeat looked dead)."""


def write_batch(path: str | Path, *, variable: str, item: int, start: int, field: np.ndarray,
                seed: np.ndarray, rounds: float, model_calls: float,
                residuals: tuple[float, ...] = (), digest: str = "",
                model: str | None = None, owned=None) -> None:
    """Write members [start, start + len(field)) of item index ``item``, then mark them done.
    Within one of the store's batches (``store_attrs.member_batch``: whole chunks) that the caller has
    claimed, and writes to one batch in order, so writers on other ranks or in other jobs
    never share a chunk, nor one writer's part-chunk writes overlap. With
    ``digest`` the store must still be this run's (``still_ours``) when the writing starts
    and again before the members are marked done; so must the batch's claim, with ``owned``
    (a callable: whether this job still holds it), since a second writer's part-chunk writes
    into the same chunks would lose one of the two."""
    _check_owned(owned, path, item, start)
    arrays = (_ours(path, digest, model) if digest else _writable(path))[1]
    stop = start + field.shape[0]
    arrays[variable][item, start:stop] = field
    arrays["seed"][item, start:stop] = seed
    arrays["rounds"][item, start:stop] = rounds
    arrays["model_calls"][item, start:stop] = model_calls
    if "residual" in arrays:
        kept = arrays["residual"].shape[-1]
        history = np.full(kept, np.nan, dtype=RESIDUAL_DTYPE)
        history[: min(kept, len(residuals))] = np.sqrt(residuals[:kept])  # tol's units
        arrays["residual"][item, start:stop] = np.broadcast_to(history, (stop - start, kept))
    if digest:
        arrays = _ours(path, digest, model)[1]
    _check_owned(owned, path, item, start)
    arrays["done"][item, start:stop] = 1  # last: only now do these members count as done


def _check_owned(owned, path, item: int, start: int) -> None:
    if owned is not None and not owned():
        raise BatchTaken(f"output {path}: another job took over the batch of item index {item} "
                         f"from member {start} (this job's heartbeat looked dead to it): this "
                         "job stops writing; rerun it once the other is done to finish the rest")
