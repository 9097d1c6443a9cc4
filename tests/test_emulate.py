"""The emulated accelerator: the base model's answers, at least the emulated wall time."""
import time

import torch

from models import build_model
from models.emulate import Emulated
from models.grf import GaussianRandomField
from pipeline.comm import SerialComm
from pipeline.config import load_config


def test_a_call_of_n_items_lasts_latency_plus_n_per_item_and_answers_as_the_base():
    base = GaussianRandomField((8, 8))
    model = Emulated(base, 20.0, 5.0)
    x, u = torch.randn(6, 8, 8), torch.full((6,), 0.5)
    start = time.perf_counter()
    out = model(x, u)
    elapsed = time.perf_counter() - start
    assert torch.equal(out, base(x, u))
    assert 0.050 <= elapsed < 0.050 + 0.5  # 20 + 6 x 5 ms, then no more than scheduling noise
    assert model.shape == base.shape and model.data_bound == base.data_bound


def test_the_config_key_wraps_any_model_and_is_off_by_default():
    assert not isinstance(build_model(load_config(None, []).model), Emulated)
    model = build_model(load_config(None, ["model.emulate_ms=[5, 1]", "model.shape=[8, 8]"]).model)
    assert isinstance(model, Emulated) and model.seconds(65) == (5 + 65) / 1000


def test_bench_reports_the_exact_w2_of_the_model_itself_when_emulating(monkeypatch):
    # the W2 is the law's: it must not run its impulse responses through the emulated device
    from pipeline.bench import bench_shape

    calls = []  # the batch size of every emulated call; none sleeps, so this is no timing
    pad = Emulated.seconds
    monkeypatch.setattr(Emulated, "seconds", lambda self, n: calls.append(n) or pad(self, n))
    monkeypatch.setattr("models.emulate.time.sleep", lambda s: None)
    sets = ["model.shape=[8, 8]", "sampler.steps=40", "bench.members=1",
            'bench.methods=["sequential-sde"]']
    plain = bench_shape(load_config(None, sets), (8, 8), comm=SerialComm())[0]
    assert calls == []
    emulated = bench_shape(load_config(None, sets + ["model.emulate_ms=[20, 1]"]), (8, 8),
                           comm=SerialComm())[0]
    # the timed run's own 40 calls and nothing else; the W2's impulse runs would add more
    assert len(calls) == emulated["model_calls"] == 40
    assert emulated["w2"] == plain["w2"] and plain["w2"] is not None


def test_one_calibration_serves_every_timing_of_the_emulated_accelerator():
    """Its waits change no value the model returns: the tolerance is the model's own. (The
    store's identity keeps the timing, as stores made with it have always had it.)"""
    from pipeline.calibrate import calibration_key
    from pipeline.run import model_digest

    plain = load_config("jobs/configs/grf.toml", ["model.shape=[8, 8]"])
    for timing in ("[5, 1]", "[6, 0]"):
        emulated = load_config("jobs/configs/grf.toml",
                               ["model.shape=[8, 8]", f"model.emulate_ms={timing}"])
        assert calibration_key(emulated, model_digest(emulated), "cpu") == \
            calibration_key(plain, model_digest(plain), "cpu")
    other = load_config("jobs/configs/grf.toml", ["model.shape=[8, 8]", "model.length=3.0",
                                                  "model.emulate_ms=[5, 1]"])
    assert calibration_key(other, model_digest(other), "cpu") != \
        calibration_key(plain, model_digest(plain), "cpu")
