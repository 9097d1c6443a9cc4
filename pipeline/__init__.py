"""piadm: block-parallel Picard sampling of diffusion models for ensembles of physics fields."""


def __getattr__(name: str):
    # looked up at first use, not at import: importlib.metadata takes 25 ms, which the command
    # line spends before it can take over Ctrl-C and stop signals (``signals.defer_early``)
    if name != "__version__":
        raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
    from importlib.metadata import PackageNotFoundError, version

    try:
        value = version("piadm")
    except PackageNotFoundError:  # running from a source tree without installation
        value = "0+src"
    value = _checked_out(value)
    globals()["__version__"] = value
    return value


def _checked_out(installed: str) -> str:
    """``installed``, the version the install recorded, or where this code runs from a git
    checkout, the version of the commit checked out now, as setuptools-scm numbers it
    (``0.2.1.dev1290+g1a2b3c4d5``, ``.dYYYYMMDD`` after it with uncommitted changes): an
    editable install (``jobs/local/setup.sh`` makes one) keeps the version of its last
    set-up, which would name another commit than the code that runs."""
    import os
    import subprocess
    import time
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    if not (root / ".git").exists():  # an installed copy, or a tree without its history
        return installed

    # this checkout's git, whatever a hook or script exported; and no index refresh, whose
    # lock would fail a user's own git command at that moment
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}

    def git(*args: str) -> str:
        return subprocess.run(["git", "--no-optional-locks", "-C", str(root), *args],
                              capture_output=True, text=True, timeout=10, check=True,
                              env=env).stdout.strip()

    try:
        commit = git("rev-parse", "--short=9", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
        try:  # the last release's tag and the commits since, as setuptools-scm counts them
            tag, count, _ = git("describe", "--tags", "--long", "--match",
                                "v[0-9]*").rsplit("-", 2)
        except subprocess.CalledProcessError:  # no release tagged yet: every commit
            tag, count = "", git("rev-list", "--count", "HEAD")
    except (OSError, subprocess.SubprocessError):  # no git here: what the install said
        return installed
    if tag and count == "0" and not dirty:
        return tag.removeprefix("v")
    release = _next(tag.removeprefix("v")) if tag else FIRST_RELEASE
    local = f"g{commit}" + (time.strftime(".d%Y%m%d", time.gmtime()) if dirty else "")
    return f"{release}.dev{count}+{local}"


# The release setuptools-scm counts towards before the first tag: the next after the
# ``fallback_version`` of pyproject.toml
FIRST_RELEASE = "0.2.1"


def _next(release: str) -> str:
    """The release after ``release`` (its last number one more), as setuptools-scm guesses."""
    head, _, last = release.rpartition(".")
    return f"{head}.{int(last) + 1}" if last.isdigit() and head else f"{release}.1"
