"""Whether a batch's sampler state fits in the memory a rank has left: the refusal before a
run (or a calibration) starts, naming the setting to lower."""
from __future__ import annotations

from pipeline.errors import ConfigError
from pipeline.host_memory import format_bytes
from pipeline.memory import LEAST_FIELDS, available_bytes, field_bytes, sampler_floor
from pipeline.run import DTYPES
from pipeline.samplers import REGISTRY
from pipeline.samplers.options import REPLICABLE
from pipeline.settings import Config


class TooLarge(ConfigError):
    """A batch (or calibration batch) whose sampler state cannot fit in memory."""


def round_points(s) -> tuple[str, int]:
    """(setting, points) of the widest part of a round of sampler section ``s``."""
    return max(REGISTRY[s.method].points(s).items(), key=lambda kv: kv[1])


def _sequential_fix(s, points: int) -> str:
    """What lowers the state of sampler section ``s``'s sequential sampler, whose time slices
    do not split it: its block of ``points`` steps' noise where that is more than its
    fields, the field."""
    noise = REGISTRY[s.method].state * points > LEAST_FIELDS  # a block's noise held at once
    return ("lower sampler.block_size (the steps whose noise is drawn at once) or "
            if noise else "lower ") + "the field (model.shape)" + (
                ", or set sampler.dtype = 'float32'" if s.dtype == "float64" else "")


def check_memory(cfg: Config, shape, device, *, sharing: int = 1, time_slices: int = 1,
                 calibration: bool = False, batch: int | None = None,
                 setting: str | None = None) -> str:
    """Refuse a batch whose sampler state alone (``memory.sampler_floor``) cannot fit in what
    this rank may still allocate (``sharing`` ranks of the node sharing it), naming the
    setting to lower: better now than an allocation failure after the store is made (or
    after minutes of calibration: ``calibration``, the batch of calibrate.members on one
    rank). ``batch``: the members a call holds, when not the setting's (a store resumed in
    its smaller batches); ``setting``: the one that sets ``batch``, when another (the
    bench's ``bench.members``). Returns what it found, as text."""
    room = available_bytes(device, sharing)
    s = cfg.sampler
    key, n = round_points(s)
    members, named = ((cfg.calibrate.members, "calibrate.members") if calibration else
                      (cfg.ensemble.batch_size, "ensemble.batch_size"))
    batch, setting = batch or members, setting or named
    whole = s.window_split == "replicated" and s.method in REPLICABLE and time_slices > 1
    sequential = REGISTRY[s.method].reference == s.method
    if whole or sequential:  # every time slice keeps the whole window, or the whole path
        time_slices = 1
    need = sampler_floor(s.method, n, batch, field_bytes(shape, DTYPES[s.dtype]), time_slices,
                         s.theta)
    if room is None:
        return f"at least {format_bytes(need)} per rank for the sampler's state"
    if need <= room[0]:
        return (f"at least {format_bytes(need)} per rank for the sampler's state, of "
                f"{format_bytes(room[0])} {room[1]}")
    per_member = need // batch
    fits = room[0] // per_member if per_member else batch
    # the floor leaves out the model's own calls and the round's temporaries: the measured
    # peaks were 2.3 to 3.6 times the floor (grf 64x64 to 256x256, the window samplers), so a
    # quarter of what the floor allows is a first try, not a bound
    fix = (f"lower {setting}: at most {fits} would leave room for the state alone, and the "
           f"model's calls need more besides, so try {max(1, fits // 4)}" if fits >= 1 else
           f"lower sampler.{key} or the field" if calibration else
           f"lower sampler.{key} or the field, or run on more ranks (the bench's time slices)"
           if setting == "bench.members" else
           f"lower sampler.{key}, set sampler.window_split = 'slots' to split the window over "
           "the time slices, or use a sequential sampler" if whole else
           _sequential_fix(s, n) if sequential else
           f"lower sampler.{key}, add time slices (parallel.time_slices) or use a sequential "
           "sampler")
    raise TooLarge(
        f"config: {batch} member{'s' if batch > 1 else ''} "
        f"{'calibrating' if calibration else 'a batch of'} {s.method} "
        f"({n} points of sampler.{key}"
        + (f" over {time_slices} time slices" if time_slices > 1 else
           " on every time slice (sampler.window_split = 'replicated')" if whole else "")
        + f", {'x'.join(map(str, shape))} {s.dtype} fields) need at least "
        f"{format_bytes(need)} per rank for the sampler's state alone, and "
        f"{format_bytes(room[0])} is {room[1]}"
        + (f" for each of {sharing} ranks" if sharing > 1 else "") + f": {fix}")
