import torch

from pipeline.memory import peak_since, start_peak


def test_peak_counts_a_temporary_allocation_above_the_baseline():
    cpu = torch.device("cpu")
    base = start_peak(cpu)
    x = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    del x
    assert peak_since(cpu, base) >= 60 * 2**20
    base = start_peak(cpu)
    assert peak_since(cpu, base) < 60 * 2**20  # the reset forgets the earlier peak
