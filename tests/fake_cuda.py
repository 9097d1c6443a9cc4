"""A CUDA device faked on the CPU, to test the code paths only a GPU takes: inside
``FakeCuda()`` tensors made on (or moved to) ``"cuda"`` live on the CPU but say they are on
``cuda:0``, and what a real GPU refuses or pays for is recorded instead of raised: a host
tensor indexed by a device index, host and device tensors combined, ``.numpy()`` of a device
tensor (``problems``), and each copy from the host to the device (``uploads``), which makes
the host wait for the device's queued work. The tests run every sampler under it, and the
learned networks and training. A mode is its thread's: work in threads the code under test
starts is not watched. While it is on, what a CPU build of torch lacks for a GPU is stood in
for: a CUDA generator (made on the CPU), and ``torch.cuda``'s synchronisation and memory
figures (no-ops, a 16 GiB device)."""
from __future__ import annotations

import collections
import threading
import traceback

import torch
from torch.overrides import TorchFunctionMode

CUDA = torch.device("cuda", 0)
_T = torch.Tensor
_INDEXING = (_T.__getitem__, _T.__setitem__, _T.index_put_, _T.index_put)
_HOST_READS = (_T.item, _T.tolist, _T.__bool__, _T.__float__, _T.__int__, _T.__index__)


def on_device(t) -> bool:
    """Whether ``t`` is a tensor the fake device holds."""
    return isinstance(t, torch.Tensor) and getattr(t, "_fake_cuda", False)


def _mark(out, on: bool = True):
    if isinstance(out, torch.Tensor):
        out._fake_cuda = on
    elif isinstance(out, (tuple, list)):
        for o in out:
            _mark(o, on)
    return out


def _is_cuda(d) -> bool:
    return ((isinstance(d, torch.device) and d.type == "cuda")
            or (isinstance(d, str) and d.startswith("cuda")))


def _tensors(x, found: list) -> list:
    if isinstance(x, torch.Tensor):
        found.append(x)
    elif isinstance(x, (tuple, list)):
        for y in x:
            _tensors(y, found)
    elif isinstance(x, dict):
        for y in x.values():
            _tensors(y, found)
    return found


def _to_cpu(x):
    """``x`` (an argument) with every CUDA device in it the CPU."""
    if _is_cuda(x):
        return torch.device("cpu")
    if isinstance(x, (tuple, list)):
        return type(x)(_to_cpu(y) for y in x)
    return x


def _where() -> str:
    """The innermost piadm lines of the call under way, as file:line."""
    frames = [f for f in traceback.extract_stack()[:-3]
              if "/pipeline/" in f.filename or "/models/" in f.filename]
    return " <- ".join(f"{f.filename.rsplit('/', 2)[-2]}/{f.filename.rsplit('/', 1)[-1]}:"
                       f"{f.lineno}" for f in reversed(frames[-3:]))


# Calls passed through as they are: torch.device("cuda") itself (the mode would make its
# "cuda" the CPU), Module.to's parsing of its device, and a check Module.to makes
_PASSED = (torch.device, torch._C._nn._parse_to, torch._has_compatible_shallow_copy_type)


class _Generator:
    """``torch.Generator(device="cuda")``, which a CPU build lacks: a CPU generator."""

    def __new__(cls, device="cpu"):
        return _REAL_GENERATOR("cpu" if _is_cuda(device) else device)


_REAL_GENERATOR = torch.Generator
_CUDA_STANDINS = {"synchronize": lambda *a, **k: None, "empty_cache": lambda *a, **k: None,
                  "reset_peak_memory_stats": lambda *a, **k: None,
                  "memory_allocated": lambda *a, **k: 0,
                  "max_memory_allocated": lambda *a, **k: 0,
                  "memory_reserved": lambda *a, **k: 0,
                  "mem_get_info": lambda *a, **k: (16 << 30, 16 << 30),
                  "device_count": lambda: 1,
                  "get_device_properties": lambda *a, **k: type("Props", (), {
                      "uuid": "GPU-fake", "total_memory": 16 << 30, "name": "fake"})()}


def _parameter_copy(copy):
    def copied(self, memo):  # made by _make_subclass, which no torch function sees
        out = copy(self, memo)
        out._fake_cuda = on_device(self)
        return out

    return copied


_ENTERED = [0]  # modes on, in all threads (thread ranks enter one each)
_REAL: dict = {}
_LOCK = threading.Lock()


def _stand_in(entering: bool) -> None:
    """Put the stand-ins in place as the first mode is entered, the real ones back as the
    last is left (one thread's exit must not undo another's)."""
    with _LOCK:
        _ENTERED[0] += 1 if entering else -1
        if entering and _ENTERED[0] == 1:
            _REAL.update({name: getattr(torch.cuda, name) for name in _CUDA_STANDINS},
                         deepcopy=torch.nn.Parameter.__deepcopy__)
            for name, standin in _CUDA_STANDINS.items():
                setattr(torch.cuda, name, standin)
            # train's EMA copy of a network: the copies keep their device
            torch.nn.Parameter.__deepcopy__ = _parameter_copy(_REAL["deepcopy"])
            torch.Generator = _Generator
        elif not entering and _ENTERED[0] == 0:
            for name in _CUDA_STANDINS:
                setattr(torch.cuda, name, _REAL[name])
            torch.nn.Parameter.__deepcopy__ = _REAL["deepcopy"]
            torch.Generator = _REAL_GENERATOR


class FakeCuda(TorchFunctionMode):
    """The fake device's mode: ``problems`` {(what, where): count}, ``uploads`` and
    ``host_reads`` {where: count}."""

    def __init__(self):
        super().__init__()
        self.problems = collections.Counter()
        self.uploads = collections.Counter()
        self.host_reads = collections.Counter()

    def __enter__(self):
        _stand_in(True)
        return super().__enter__()

    def __exit__(self, *exc):
        _stand_in(False)
        return super().__exit__(*exc)

    def _moved(self, func, args, kwargs):
        tensor, rest, target = args[0], list(args[1:]), None
        for i, a in enumerate(rest):
            if isinstance(a, torch.Tensor):  # to(other): its dtype and device
                target, rest[i] = on_device(a), a.dtype
            elif _is_cuda(a):
                target, rest[i] = True, torch.device("cpu")
            elif isinstance(a, (torch.device, str)):
                target = False
        if "device" in kwargs:
            target = _is_cuda(kwargs["device"])
            if target:
                kwargs["device"] = "cpu"
        out = func(tensor, *rest, **kwargs)
        target = on_device(tensor) if target is None else target
        if target != on_device(tensor) and out is tensor:
            out = out.clone()
        if target and not on_device(tensor):
            self.uploads[_where()] += 1
        return out if out is tensor else _mark(out, target)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in _PASSED:
            return func(*args, **kwargs)
        if func == _T.data.__set__:  # Module.to's param.data = moved: the parameter follows
            out = func(*args, **kwargs)
            args[0]._fake_cuda = on_device(args[1])
            return out
        if func == _T.device.__get__:
            return CUDA if on_device(args[0]) else torch.device("cpu")
        if func == _T.is_cuda.__get__:
            return on_device(args[0])
        if func in (_T.numpy, _T.__array__):
            if on_device(args[0]):
                self.problems[("numpy() of a device tensor", _where())] += 1
            return func(*args, **kwargs)
        if func in _HOST_READS:
            if on_device(args[0]):
                self.host_reads[_where()] += 1
            return func(*args, **kwargs)
        if func is _T.cpu:
            out = func(*args, **kwargs)
            out = out.clone() if out is args[0] and on_device(args[0]) else out
            return _mark(out, False)
        if func is _T.to:
            return self._moved(func, args, kwargs)
        made_there = "device" in kwargs and _is_cuda(kwargs["device"])
        if made_there:
            kwargs["device"] = "cpu"
        found = _tensors(list(args), []) + _tensors(kwargs, [])
        device = [t for t in found if on_device(t)]
        host = [t for t in found if not on_device(t) and t.dim() > 0]
        name = getattr(func, "__name__", str(func))
        if func in _INDEXING:
            index = _tensors([args[1]] if len(args) > 1 else [], [])
            values = _tensors(list(args[2:]), [])
            if not on_device(args[0]) and any(on_device(i) for i in index):
                self.problems[("a host tensor indexed by a device index", _where())] += 1
            if not on_device(args[0]) and any(on_device(v) for v in values):
                self.problems[("device values stored into a host tensor", _where())] += 1
            if on_device(args[0]) and any(not on_device(v) and v.dim() > 0 for v in values):
                if any(i.dtype in (torch.bool, torch.long) for i in index):
                    self.problems[("host values stored at a device tensor's index",
                                   _where())] += 1
                self.uploads[_where()] += 1
        elif name == "copy_":
            if on_device(args[0]) and not on_device(args[1]):
                self.uploads[_where()] += 1
        elif device and host:
            self.problems[(f"host and device tensors in {name}", _where())] += 1
        if made_there and name in ("tensor", "as_tensor", "asarray"):
            self.uploads[_where()] += 1  # a device tensor made of host data
        out = func(*_to_cpu(list(args)), **kwargs)
        if func is _T.__setitem__ or (name.endswith("_") and not name.startswith("__")):
            return out  # in place: the tensor keeps its device
        if made_there or device:
            if not (isinstance(out, torch.Tensor) and any(out is t for t in found)):
                _mark(out)
        return out
