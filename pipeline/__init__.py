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
    import subprocess
    import time
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    if not (root / ".git").exists():  # an installed copy, or a tree without its history
        return installed

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()

    try:
        commit = git("rev-parse", "--short=9", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
        try:  # commits since the last release's tag, as setuptools-scm counts them
            count = git("describe", "--tags", "--long", "--match", "v[0-9]*").split("-")[-2]
        except subprocess.CalledProcessError:  # no tag yet: every commit
            count = git("rev-list", "--count", "HEAD")
    except (OSError, subprocess.SubprocessError):  # no git here: what the install said
        return installed
    release = installed.split("+")[0].split(".dev")[0]
    if release == "0":  # never installed: the fallback of pyproject.toml's setuptools-scm
        release = "0.2.1"
    local = f"g{commit}" + (time.strftime(".d%Y%m%d") if dirty else "")
    return f"{release}.dev{count}+{local}"
