"""Bring your own network: ``model.kind = "module"``.

``model.target = "package.module:factory"`` names any importable callable that returns a
``torch.nn.Module``; it is called with the ``[model]`` keys piadm does not know as keyword
arguments, and ``model.weights`` (a ``.safetensors`` file, or a torch file of tensors only)
fills its state dict. The network is called as ``net(x_native, t_native)`` (and a bound
conditioning field as a third argument) and predicts ``model.prediction`` on the forward
process ``model.process``; ``models.adapters`` turns that into the score on the OU clock.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import os
import pickle
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import ClassVar

import torch

from models.adapters import NetworkAdapter
from models.conditioning import upsample_blocks
from models.digest import files_digest
from models.module_check import check_section
from models.user_code import details, first_line, import_target, one_line, raised_at
from pipeline.clock import (VE, DiscreteVP, Flow, VPCosine, VPLinear,
                            ddpm_alphas_cumprod)
from pipeline.errors import ConfigError, OutOfMemory, PiadmError, is_out_of_memory

# model.process: the continuous forward processes ("ddpm" is built from its own table)
CONTINUOUS = {"vp-linear": VPLinear, "vp-cosine": VPCosine, "ve": VE, "edm": VE, "flow": Flow}


def process_of(section):
    """The forward process of a ``[model]`` section (``pipeline.settings.ModelConfig``)."""
    name = section.process
    if name == "ddpm":
        table = ddpm_alphas_cumprod(section.beta_schedule, section.beta_start,
                                    section.beta_end, section.train_steps)
        return DiscreteVP(section.beta_start, section.beta_end, section.train_steps, table)
    return CONTINUOUS[name]()


def _too_large(what: str, where: str, err: BaseException) -> OutOfMemory:
    """A network that ran out of memory while piadm built it or probed it with 2 items
    (``where``: "on DEVICE ", or "" where the factory placed it itself): too large as it
    stands, whatever the run's batch."""
    return OutOfMemory(f"config: {what}: the network ran out of memory {where}before "
                       f"sampling ({first_line(err)}): free that memory (another process may "
                       "hold it) or take a smaller network")


def load_weights(net: torch.nn.Module, path: str, key: str = "model.weights") -> None:
    """Fill ``net``'s parameters from a safetensors file or a tensors-only torch file."""
    if not os.path.isfile(path):  # Path drops a trailing "/"
        raise ConfigError(f"config: {key} = {path!r} is not a file (looked for "
                          f"{Path(path).absolute()}): point it at the network's state dict "
                          "(.safetensors, or a torch file saved from state_dict())")
    if path.endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
        except ImportError:  # the file may be fine: say what is missing
            raise ConfigError(f"config: {key} = {path!r} needs the safetensors package: pip "
                              "install safetensors (or 'piadm[diffusers]')") from None
    try:
        if path.endswith(".safetensors"):
            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "safe_globals" not in str(err):  # no pickled class named: not torch at all
            raise ConfigError(f"config: {key} = {path!r} is not a readable state dict (not a "
                              "torch file, or a damaged one): save it with "
                              "torch.save(net.state_dict(), path) or safetensors") from None
        raise ConfigError(f"config: {key} = {path!r} holds pickled objects, not tensors alone "
                          "(a whole saved model?): save torch.save(net.state_dict(), path) "
                          "instead") from None
    except Exception as err:  # damaged, or not a torch or safetensors file at all
        raise ConfigError(f"config: {key} = {path!r} is not a readable state dict "
                          f"({type(err).__name__}: {first_line(err)}): save it with "
                          "torch.save(net.state_dict(), path) or safetensors") from None
    nested = [k for k, v in state.items() if isinstance(v, dict)] if isinstance(state, dict) else []
    if nested:
        raise ConfigError(f"config: {key} = {path!r} nests its tensors under {nested[0]!r}: "
                          f"save that dict alone (torch.save(ckpt[{nested[0]!r}], path))")
    _match_dtypes(net, state, path, key)
    try:
        net.load_state_dict(state)
    except Exception as err:  # keys or sizes that do not fit
        raise ConfigError(f"config: {key} = {path!r} does not load into the network "
                          f"({type(err).__name__}: {details(err)}): save it from this "
                          "network's state_dict(), with the same [model] arguments") from None


def _match_dtypes(net: torch.nn.Module, state: dict, path: str, key: str) -> None:
    """Refuse whole numbers for a floating parameter (load_state_dict casts them silently), and
    say where float64 weights fill float32 parameters: rounded there, a float64 run casts the
    rounded values up. The network is left in the factory's dtypes (a float32 run must not
    find float64 buffers it keeps on purpose cast down)."""
    own = net.state_dict()
    whole = [name for name, value in state.items() if torch.is_tensor(value) and name in own
             and own[name].is_floating_point() and not value.is_floating_point()]
    if whole:
        raise ConfigError(f"config: {key} = {path!r} holds {state[whole[0]].dtype} values for "
                          f"the floating parameter {whole[0]!r}: save the weights as floats "
                          "(the network's own state_dict())")
    rounded = [name for name, value in state.items() if torch.is_tensor(value) and name in own
               and value.dtype == torch.float64 and own[name].dtype == torch.float32]
    if rounded:
        warnings.warn(f"{key} = {path!r} holds float64 values for the factory's float32 "
                      f"parameters ({rounded[0]!r} among them), which keep them rounded: "
                      "have the factory build its network in float64 (e.g. return "
                      "net.double()) for a float64 run", stacklevel=2)


class _Net:
    """``net(x, t[, cond])`` in the dtype and device of its input, returning a tensor (a
    diffusers output's ``.sample``); ``channel``: add a channel axis around the call (a
    one-channel image network on (B, H, W) fields); ``variance``: the network answers twice
    its input's channels, its prediction then a learned variance (diffusers' variance_type
    "learned" or "learned_range"), as does a one-channel network given its channel axis."""

    def __init__(self, net: torch.nn.Module, channel: bool = False, variance: bool = False):
        self.net, self.channel, self.variance = net, channel, variance
        self.rounding_said = False  # whether a lower-precision answer was warned of

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None):
        param = next(self.net.parameters(), None)
        if param is not None and (param.dtype != x.dtype or param.device != x.device):
            # runs in the sampler's dtype (torch's own .to: diffusers' warns on any cast)
            torch.nn.Module.to(self.net, device=x.device, dtype=x.dtype)
        if cond is not None:  # the bound field comes in the input's dtype, as x does
            cond = cond.to(device=x.device, dtype=x.dtype)
        if self.channel:
            x = x[:, None]
            cond = None if cond is None else cond[:, None]
        out = self.net(x, t) if cond is None else self.net(x, t, cond)
        out = getattr(out, "sample", out)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"the network returned a {type(out).__name__}, not a tensor: have "
                            "it return its prediction alone")
        if ((self.channel or self.variance) and out.ndim == x.ndim >= 3
                and out.shape[1] == 2 * x.shape[1] and out.shape[2:] == x.shape[2:]):
            out = out[:, :x.shape[1]]  # the prediction, then the variance's channels
        if out.shape != x.shape:  # as the network gave it, before any adapter broadcasts it
            raise WrongShape(f"the network returns shape {list(out.shape)} for input "
                             f"{list(x.shape)}")
        if not out.is_floating_point():  # its prediction would be cut to whole numbers
            raise TypeError(f"the network returned {out.dtype} values: have it return its "
                            "prediction as floating point")
        if torch.finfo(out.dtype).bits < torch.finfo(x.dtype).bits and not self.rounding_said:
            self.rounding_said = True  # once a network: every call would say the same
            warnings.warn(f"the network answers in {out.dtype} for {x.dtype} input: its "
                          "prediction is rounded to that, which costs the parallel samplers "
                          "rounds and calls (the Picard changes do not fall below its rounding) "
                          "and the sequential path its precision; have it answer in its "
                          "input's dtype (e.g. out.to(x.dtype) before an autocast ends)",
                          stacklevel=2)
        out = out.to(x.dtype)  # a network that computes in float64 answers in the sampler's
        return out[:, 0] if self.channel else out


class WrongShape(PiadmError, ValueError):
    """A network's output is not its input's shape."""


@dataclass(frozen=True)
class UnitInput:
    """``process`` for a network that is given the state scaled to unit variance (the VP
    state, as EDM's c_in scales it) instead of the process's own state."""

    process: object

    def u_of_t(self, t: torch.Tensor) -> torch.Tensor:
        """The process's own clock map."""
        return self.process.u_of_t(t)

    def t_of_u(self, u: torch.Tensor) -> torch.Tensor:
        """The process's own inverse clock map."""
        return self.process.t_of_u(u)

    def input_scale(self, u: torch.Tensor) -> torch.Tensor:
        """Ones: the network sees the unit-variance VP state."""
        return torch.ones_like(u)


@dataclass(frozen=True)
class NetworkModel:
    """A user's network as a score model (``models.contract``) on fields of ``shape``.

    net: ``_Net``; process: its forward process (``UnitInput`` when it sees unit-variance
    states); prediction: what it outputs; cond: a bound conditioning field (1, *shape).
    Its fields and its condition are in the network's own units, the input's as stored
    (``own_units``): piadm rescales neither, so an item's members do not depend on which
    other items a run takes.
    """

    own_units: ClassVar[bool] = True

    net: object
    shape: tuple[int, ...]
    process: object
    prediction: str
    cond: torch.Tensor | None = None
    data_bound: float = float("inf")
    grid: dict = field(default_factory=dict)
    scheduler_u: object = None  # steps -> u (steps + 1,): the grid of sampler.grid = "scheduler"
    _adapter: object = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        net, cond = self.net, self.cond

        def call(x_native: torch.Tensor, t_native: torch.Tensor) -> torch.Tensor:
            c = None if cond is None else cond.expand(x_native.shape[0], *cond.shape[1:])
            return net(x_native, t_native, c)

        # built once per binding (conditioned() makes a new model), not per call
        object.__setattr__(self, "_adapter", NetworkAdapter(call, self.process, self.prediction,
                                                            tuple(self.shape)))

    def __call__(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return self._adapter(x, u)

    def conditioned(self, coarse: torch.Tensor) -> "NetworkModel":
        """Bind a coarse field (h, w) in model units, upsampled by blocks to the model's grid
        (H, W) and shaped like one input (a channel axis of 1 kept): cond (1, *shape)."""
        return replace(self, cond=upsample_blocks(coarse, self.shape).reshape(self.shape)[None])


def check_output(model, shape: tuple[int, ...], what: str, takes: str = "(x, t)") -> None:
    """Call ``model`` once on zeros (2, *shape) at a middle noise level: a network that fails,
    or returns another shape than its input's, is a one-line error now, not mid-run (``takes``:
    the call it must take, for the message). Two states, not one: a convolution takes a batch
    of one 1-channel field, (1, H, W), for one unbatched 1-channel image, so a shape without
    its channel axis would pass."""
    # in the network's own dtype and device: a call in another moves it there, and float64
    # weights taken through float32 would come back rounded
    param = next(iter(getattr(getattr(model, "net", None), "net", torch.nn.Module()).parameters()),
                 None)
    floating = param is not None and param.is_floating_point()
    x = torch.zeros((2, *shape), dtype=param.dtype if floating else torch.float32,
                    device=param.device if floating else "cpu")
    try:
        # a clock per state, as sampling calls it (models.contract): a network may embed t
        # per sample (t.reshape(B, 1)) and must not be refused for a broadcast probe
        out = model(x, torch.full((2,), 1.0, dtype=torch.float64, device=x.device))
    except ConfigError:
        raise
    except WrongShape as err:
        raise ConfigError(f"config: {what}: {err}: it must return its input's shape (check "
                          "model.shape and its channels)") from None
    except Exception as err:
        if is_out_of_memory(err):  # the device's memory, not a mistake in the network
            raise _too_large(what, f"on {x.device} ", err) from None
        said = first_line(err)
        if "does not require grad" in said:  # a score as an energy's gradient
            advice = ("piadm calls the network under torch.no_grad(): wrap the autograd in "
                      "its forward in torch.enable_grad()")
        elif "indices" in said or "Long" in said:  # an embedding table of whole DDPM timesteps
            advice = ("piadm calls it at fractional timesteps (a float t between the "
                      "training's whole steps): have it take a float t, e.g. through a "
                      "sinusoidal embedding")
        else:
            advice = (f"check model.shape (with its channel axis, e.g. [1, H, W]) and that it "
                      f"takes {takes}")
        where = raised_at(err)
        if where:  # a line of the user's own: the bug may be there, whatever the shape
            advice = f"fix the code at that line, or {advice}"
        dims = ", ".join(map(str, shape))
        raise ConfigError(f"config: {what}: calling the network on a (2, {dims}) "
                          f"input failed ({one_line(err, where)}): "
                          f"{advice}") from None
    if tuple(out.shape) != tuple(x.shape):
        raise ConfigError(f"config: {what}: the network returns shape {list(out.shape)} for input "
                          f"{list(x.shape)}: it must return its input's shape (check model.shape "
                          "and its channels)")
    if not bool(torch.isfinite(out).all()):
        raise ConfigError(f"config: {what}: the network returns NaN/Inf on a zero input")


def load_module(section, device="cpu") -> NetworkModel:
    """The ``model.kind = "module"`` model of a validated ``[model]`` section."""
    check_section(section)
    factory = import_target(section.target)
    try:
        # a network without model.weights keeps its initial weights: seeded, so that every run
        # and every rank samples the same network (its store then resumes and splits safely)
        with torch.random.fork_rng(devices=[]):  # the CPU generator, given back after
            torch.default_generator.manual_seed(0)
            net = factory(**section.args)
    except Exception as err:
        if is_out_of_memory(err):
            raise _too_large(f"model.target = {section.target!r}", "", err) from None
        given = ", ".join(section.args) or "none"
        raise ConfigError(f"config: model.target = {section.target!r} raised "
                          f"{one_line(err)} (keyword "
                          f"arguments from "
                          f"[model]: {given}): fix the factory or those keys") from None
    if not isinstance(net, torch.nn.Module):
        raise ConfigError(f"config: model.target = {section.target!r} returned "
                          f"{type(net).__name__}, not a torch.nn.Module")
    if not source_file(section):  # a notebook's own cell, say: nothing to hash
        warnings.warn(f"model.target = {section.target!r} is defined in no file piadm can "
                      "read, so a store it makes cannot tell, when resumed or grown, whether "
                      "the network's code changed meanwhile: define it in a .py file",
                      stacklevel=2)
    if any(t.is_meta for t in (*net.parameters(), *net.buffers())):
        raise ConfigError(f"config: model.target = {section.target!r} returned a network of "
                          "meta tensors (shapes without values, as accelerate's "
                          "init_empty_weights makes): build it on the CPU, or load its weights "
                          "in the factory with load_state_dict(..., assign=True)")
    if section.weights:
        load_weights(net, section.weights)
    net.to(device).eval()
    process = process_of(section)
    if section.input_scale == "unit":
        process = UnitInput(process)
    model = NetworkModel(_Net(net), tuple(section.shape), process, section.prediction)
    if section.condition == "none":
        what = f"model.target = {section.target!r}" + (
            f" with model.weights = {section.weights!r}" if section.weights else "")
        check_output(model, tuple(section.shape), what)
    return model


# The [model] keys that set a module model's noise schedule and input: they change its score
# but not its files (``module_digest``), so what is measured on the model (a calibrated
# tolerance) is keyed by them too (``pipeline.calibrate.calibration_key``)
SCHEDULE_KEYS = ("beta_schedule", "beta_start", "beta_end", "train_steps", "input_scale")


def source_file(section) -> str:
    """The file that defines model.target's factory (a package's re-export and a decorator
    followed to it: diffusers:UNet2DModel is diffusers/models/unets/unet_2d.py), else that of
    the module it names; "" where there is no file."""
    try:
        origin = inspect.getsourcefile(inspect.unwrap(import_target(section.target)))
    except (ConfigError, TypeError):  # not importable here, or built in: its module's file
        try:
            origin = getattr(importlib.util.find_spec(section.target.partition(":")[0]),
                             "origin", None)
        except (ImportError, ValueError):
            origin = None
    return origin if origin and Path(origin).is_file() else ""


def source_digest(section) -> str:
    """SHA-256 of ``source_file`` ("" without one): the weights' hash misses an edit of the
    code, and a network without model.weights is made by the code alone."""
    origin = source_file(section)
    return files_digest([origin]) if origin else ""


def module_digest(section) -> str:
    """What identifies a module model: its target, arguments and weights."""
    text = f"{section.target}|{sorted(section.args.items())}|{section.prediction}|{section.process}"
    weights = [section.weights] if section.weights and os.path.isfile(section.weights) else []
    return hashlib.sha256((text + files_digest(weights)).encode()).hexdigest()


