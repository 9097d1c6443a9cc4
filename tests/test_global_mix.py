"""The U-Net's global mixing (``train.global_modes``): whole-field, band-limited, periodic, and
added to a trained network without changing its function."""
import pytest
import torch

from models.checkpoint import load_denoiser
from models.unet import Denoiser, GlobalMix, UNetConfig
from pipeline.cli import main
from tests.test_train import _train_args, dataset  # noqa: F401  (fixture)


def _live_mix(modes=2, c=8):
    torch.manual_seed(0)
    mix = GlobalMix(c, modes, embed=4, width=6)
    torch.nn.init.normal_(mix.out.weight)  # a trained projection, not the zero it starts at
    return mix


def test_the_mix_reaches_the_whole_field_through_its_low_modes_only():
    mix, m = _live_mix(), 2
    h, emb = torch.randn(1, 8, 16, 16), torch.randn(1, 4)
    with torch.no_grad():
        delta = mix(h, emb) - h
        bumped = h.clone()
        bumped[0, :, 0, 0] += 1.0
        moved = mix(bumped, emb) - mix(h, emb)
    # a bump at one corner moves the point farthest from it (a 3x3 convolution would not)
    assert moved[0, :, 8, 8].abs().max() > 1e-3
    power = torch.fft.fft2(delta).abs()
    k = torch.fft.fftfreq(16, 1 / 16).abs()
    outside = (k[:, None] > m) | (k[None, :] > m)
    assert power[..., outside].max() < 1e-4 * power.max()


def test_the_mix_commutes_with_periodic_shifts():
    mix = _live_mix()
    h, emb = torch.randn(2, 8, 16, 16), torch.randn(2, 4)
    with torch.no_grad():
        a = mix(torch.roll(h, (3, -5), (2, 3)), emb)
        b = torch.roll(mix(h, emb), (3, -5), (2, 3))
    assert torch.allclose(a, b, atol=1e-5)


def test_the_inverse_fft_is_given_a_real_fields_spectrum(monkeypatch):
    """Mixed per mode, the k_x = 0 column need not be Hermitian in k_y, and what an inverse
    real FFT makes of that is the library's choice (the CPU's takes the Hermitian part, cuFFT
    leaves it undefined): the mix hands it the Hermitian part itself, the CPU's answer."""
    mix, given = _live_mix(), []
    inverse = torch.fft.irfft2
    monkeypatch.setattr(torch.fft, "irfft2", lambda g, **kw: given.append(g) or inverse(g, **kw))
    h, emb = torch.randn(2, 8, 16, 16), torch.randn(2, 4)
    with torch.no_grad():
        out = mix(h, emb)
    column = given[0][..., 0]
    assert torch.allclose(column, torch.roll(column.flip(-1), 1, -1).conj(), atol=1e-6)
    # by a complex inverse FFT of the whole spectrum, which no library may answer otherwise
    half = given[0]
    full = torch.cat([half, torch.roll(half[..., 1:8].flip(-2, -1), 1, -2).conj()], -1)
    z = torch.fft.ifft2(full, norm="ortho")
    assert z.imag.abs().max() < 1e-5
    assert torch.allclose(mix.out(z.real) + h, out, atol=1e-5)


def test_a_new_mix_leaves_the_network_unchanged_and_old_sidecars_load():
    plain = Denoiser(UNetConfig(channels=(8, 16), embed=8))
    mixed = Denoiser(UNetConfig(channels=(8, 16), embed=8, global_modes=2))
    missing, _ = mixed.load_state_dict(plain.state_dict(), strict=False)
    assert missing and all(k.startswith("net.mix.") for k in missing)
    x, s = torch.randn(2, 16, 16), torch.tensor([0.3, 30.0])
    with torch.no_grad():
        assert torch.equal(plain(x, s), mixed(x, s))
    old = {k: v for k, v in plain.cfg.to_dict().items() if k != "global_modes"}
    assert UNetConfig.from_dict(old) == plain.cfg


def test_training_adds_the_mix_to_a_checkpoint_without_it(tmp_path, dataset):  # noqa: F811
    from models.export import export

    first, shipped, tuned = tmp_path / "first.pt", tmp_path / "ship.pt", tmp_path / "tuned.pt"
    assert main(_train_args(dataset, first)) == 0
    export(first, shipped)
    assert main(_train_args(dataset, tuned, f"train.init={shipped}", "train.global_modes=2",
                            "train.steps=1", "train.lr=1e-12")) == 0
    a, _ = load_denoiser(shipped)
    b, meta = load_denoiser(tuned)
    assert meta["unet"]["global_modes"] == 2 and b.net.mix is not None
    x, s = torch.randn(2, 16, 16), torch.tensor([0.5, 2.0])
    with torch.no_grad():
        assert torch.allclose(a(x, s), b(x, s), atol=1e-6)
    # and it learns from there: a real step moves the mix's zero projection
    assert main(_train_args(dataset, tmp_path / "more.pt", f"train.init={shipped}",
                            "train.global_modes=2")) == 0
    c, _ = load_denoiser(tmp_path / "more.pt")
    assert c.net.mix.out.weight.abs().max() > 0


@pytest.mark.parametrize("sets, key", [
    (["train.global_modes=4"], "train.global_modes = 4 needs a coarsest grid of at least 9"),
    (["train.global_modes=-1"], "train.global_modes = -1 must be in [0, 16]"),
])
def test_a_mix_the_grid_cannot_hold_is_a_one_line_error(tmp_path, dataset, sets, key, capsys):  # noqa: F811
    ckpt = tmp_path / "bad.pt"
    assert main(_train_args(dataset, ckpt, *sets)) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()  # no banner before it
    assert key in line
    assert not ckpt.exists()


def test_a_checkpoint_with_another_mix_is_refused_as_init(tmp_path, dataset, capsys):  # noqa: F811
    mixed = tmp_path / "mixed.pt"
    assert main(_train_args(dataset, mixed, "train.global_modes=2", "train.steps=1")) == 0
    assert main(_train_args(dataset, tmp_path / "t.pt", f"train.init={mixed}",
                            "train.global_modes=1")) == 2
    assert "global_modes" in capsys.readouterr().err
    assert main(_train_args(dataset, tmp_path / "t.pt", f"train.init={mixed}")) == 2
