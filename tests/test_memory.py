import pytest
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


def test_after_keep_freed_memory_a_freed_model_buffer_stays_for_the_next_call():
    from pipeline.memory import _status_kib, keep_freed_memory

    if not keep_freed_memory():
        pytest.skip("not glibc: the allocator is left as it is")
    x = torch.ones(48 * 2**20 // 4)  # 48 MiB touched: above glibc's largest default threshold
    held = _status_kib("VmRSS")
    del x
    # kept for reuse, not handed back to the kernel (to be faulted in again by the next call)
    assert _status_kib("VmRSS") > held - 8 * 1024
