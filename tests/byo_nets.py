"""Networks a user would bring, for tests/test_byo.py: importable by ``model.target``."""
import torch


def small_unet(init: int = 0, channels: int = 8, out: int = 1):
    """A small randomly initialised diffusers UNet2DModel on 16x16 one-channel fields (``out``
    2: with a learned variance's channel)."""
    from diffusers import UNet2DModel

    torch.manual_seed(init)
    return UNet2DModel(sample_size=16, in_channels=1, out_channels=out, layers_per_block=1,
                       block_out_channels=(channels, 2 * channels),
                       down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4)


class EDMDenoiser(torch.nn.Module):
    """An EDM-style denoiser D(x, sigma) = c_skip x + c_out F(c_in x, c_noise) around a small
    random convolutional F, on (B, H, W) fields (Karras et al. 2022's preconditioning)."""

    def __init__(self, seed: int = 0, sigma_data: float = 0.5):
        super().__init__()
        torch.manual_seed(seed)
        self.sigma_data = sigma_data
        self.f = torch.nn.Sequential(torch.nn.Conv2d(2, 8, 3, padding=1), torch.nn.SiLU(),
                                     torch.nn.Conv2d(8, 1, 3, padding=1))

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        sd = self.sigma_data
        sigma = sigma.reshape(-1, 1, 1)
        c_skip = sd**2 / (sigma**2 + sd**2)
        c_out = sigma * sd / (sigma**2 + sd**2).sqrt()
        c_in = 1 / (sigma**2 + sd**2).sqrt()
        c_noise = (sigma.log() / 4).expand_as(x)
        return c_skip * x + c_out * self.f(torch.stack([c_in * x, c_noise], 1))[:, 0]


class _Conv(torch.nn.Module):
    """One convolution of (B, 1, H, W) fields to ``out`` channels, t ignored."""

    def __init__(self, out: int):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, out, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def wrong_shape():
    """A network whose output is not its input's shape: two channels out of one."""
    return _Conv(2)


def one_channel():
    """A convolution on (B, 1, H, W) fields, which also takes one unbatched (1, H, W) field."""
    return _Conv(1)


def raising(**kwargs):
    raise RuntimeError("no GPU found")


class _Typo(torch.nn.Module):
    """A network whose forward has a bug of its own (a name misspelt)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 1, 1)

    def forward(self, x, t):
        return self.conv(x) * t.scael


def typo():
    return _Typo()


def out_of_memory(**kwargs):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def build_plugin(section, device):
    """A model kind an installed package registers (entry point ``piadm.models``): an exact
    Gaussian field whose spectral slope comes from a key piadm does not know."""
    from models.grf import GaussianRandomField

    return GaussianRandomField(tuple(section.shape), slope=float(section.args["steepness"]),
                               device=device)


def build_bad_plugin(section, device):
    """A package's model kind whose score is wrong as ``model.fault`` says: ``shape`` (a
    column short), ``tuple`` (the score and more), ``nonfinite``, ``int``, ``none`` (no
    model); ``float64``: right, in float64 arithmetic whatever its input."""
    from models.grf import GaussianRandomField

    exact = GaussianRandomField(tuple(section.shape), slope=3.0, device=device)
    fault = section.args["fault"]
    if fault == "none":  # a builder that forgot its return
        return None

    class Faulty:
        shape = exact.shape

        def __call__(self, x, u):
            score = exact(x, u)
            return {"shape": lambda: score[..., :-1], "tuple": lambda: (score, u),
                    "nonfinite": lambda: score * float("nan"), "int": lambda: score.long(),
                    # float64 arithmetic whatever it is given: the contract in float64 only
                    "float64": lambda: exact(x.double(), u.double())}[fault]()

    return Faulty()


class Conditional(torch.nn.Module):
    """A conditional network net(x, t, cond) that predicts eps = cond: what it was given is
    what it returns, so a test sees the bound field."""

    def __init__(self):
        super().__init__()
        self.unused = torch.nn.Linear(1, 1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        # as a convolution would, it takes cond only in x's dtype and layout
        if cond.dtype != x.dtype or cond.shape != x.shape:
            raise RuntimeError(f"cond {cond.dtype} {list(cond.shape)}, x {x.dtype} {list(x.shape)}")
        return cond


class Unseeded(torch.nn.Module):
    """A network whose factory leaves its initial weights to torch's global generator."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 1, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class _Float64(_Conv):
    """Computes and answers in float64 whatever its input's dtype."""

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return super().forward(x, t).double()


def float64_out():
    return _Float64(1)


class _Half(_Conv):
    """Answers in float16 (a forgotten autocast's output, say)."""

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return super().forward(x, t).half()


def float16_out():
    return _Half(1)


class _Whole(_Conv):
    """Answers whole numbers: its prediction rounded to int64."""

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return super().forward(x, t).round().long()


def int64_out():
    return _Whole(1)


class _Pair(_Conv):
    def forward(self, x: torch.Tensor, t: torch.Tensor):
        return super().forward(x, t), t


def meta_net():
    """A network of shapes without values, as accelerate's init_empty_weights builds one."""
    with torch.device("meta"):
        return _Conv(1)


class _Energy(torch.nn.Module):
    """A score as minus the gradient of an energy: autograd inside its forward."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x = x.detach().requires_grad_(True)
        energy = 0.5 * self.scale * (x ** 2).sum()
        return -torch.autograd.grad(energy, x)[0]


def energy_score():
    return _Energy()


def tuple_out():
    """A network that returns its prediction with something else."""
    return _Pair(1)


class _Flat(_Conv):
    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return super().forward(x, t).flatten(1)


def flat_out():
    """A network that answers (B, H * W) for (B, 1, H, W)."""
    return _Flat(1)


def float64_params():
    """A network whose weights are float64, for runs of sampler.dtype = "float64"."""
    return _Conv(1).double()


class _PerSampleTime(_Conv):
    """Embeds its timestep per sample, as t.reshape(B, 1): a t of one value for a batch of
    several is no call it takes."""

    def __init__(self):
        super().__init__(1)
        self.embed = torch.nn.Linear(1, 1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        scale = self.embed(t.reshape(x.shape[0], 1).to(x.dtype) / 1000)
        return super().forward(x, t) * scale[:, :, None, None]


def per_sample_time():
    return _PerSampleTime()


class ConditionPlusOne(torch.nn.Module):
    """An EDM denoiser D(x, sigma, cond) = cond + 1: its samples are the condition plus one,
    in whatever units the condition comes."""

    def __init__(self):
        super().__init__()
        self.unused = torch.nn.Linear(1, 1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return cond + 1.0


class _WholeStepEmbedding(_Conv):
    """Looks its timestep up in a table of whole DDPM steps: an integer t alone."""

    def __init__(self):
        super().__init__(1)
        self.table = torch.nn.Embedding(1000, 1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return super().forward(x, t) * self.table(t)[:, :, None, None]


def whole_step_embedding():
    return _WholeStepEmbedding()


class _LateFailure(_Conv):
    """A network that fails on batches larger than the 2-item probe's."""

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > 2:
            raise RuntimeError(f"boom at batch {x.shape[0]}")
        return self.conv(x)


def late_failure():
    return _LateFailure(1)
