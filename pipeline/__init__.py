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
    globals()["__version__"] = value
    return value
