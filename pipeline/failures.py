"""How a command's failure is told: the one line a user error prints (an I/O failure naming
its file, a setting from PIADM_SET saying so), which errors are the user's, and a user's own
model code failing past its probe, told as the line that failed."""
from __future__ import annotations

from collections.abc import Sequence

from pipeline.environment import from_environment
from pipeline.errors import FailedElsewhere, NetworkFailed, PiadmError, is_out_of_memory


def in_users_code(err: Exception, command: str) -> Exception | None:
    """``err`` raised in a user's own code (a network's forward past its 2-item probe, in a
    bench, a calibration or a plan) as one line naming that line, else None: piadm's own
    failures keep their traceback. ``sample`` names the call that failed itself."""
    if isinstance(err, (*user_errors(), FailedElsewhere)) or command not in MODEL_COMMANDS:
        return None  # said as they are (a full disk's OSError names its file)
    from models.user_code import one_line, raised_at

    where = raised_at(err)
    if not where or is_out_of_memory(err):
        return None
    return NetworkFailed(f"{command}: the model's code failed ({one_line(err, where)}): fix "
                         "the code at that line")


MODEL_COMMANDS = ("sample", "bench", "calibrate", "plan")  # those that call a model


def user_errors() -> tuple:
    """The errors a user's input causes: one line each, no traceback. Only light modules
    (no torch, xarray or dask), so that the error of a light command prints at once."""
    # every PiadmError (a refused config, store or input, a divergence, a failed write, ...)
    # and the OSErrors of files a user named
    return (PiadmError, OSError)


def explain(err: Exception, sets: Sequence[str] = ()) -> str:
    """The one line a user error prints: an I/O failure names its file and what to check; a
    setting that came from PIADM_SET (not overridden by ``sets``, the --set items) says so."""
    if not isinstance(err, OSError) or type(err).__module__.startswith("pipeline"):
        text = str(err)
        if text.startswith(("PIADM_SET:", "--set ")):  # the message names its item already
            return text
        return f"{text}{from_environment(text, sets)}"
    if type(err).__module__.startswith("zarr"):  # nothing found to read; the message names where
        return f"cannot read a Zarr store: {err}: check that the path is the store it should be"
    where = f" {err.filename}" if err.filename else ""
    return (f"cannot use{where}: {err.strerror or err}: check that the path exists, that you "
            "may write there and that its disk has space")
