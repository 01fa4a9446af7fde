"""The decode graphs' host-side input staging (the copies and replays themselves need a GPU: tests/gpu)."""

import torch

from stepserve.engine.cuda_graph import _StepInputs


def test_fill_writes_rows_and_resets_padding():
    x = _StepInputs(8, 5, torch.device("cpu"))
    # A larger earlier step leaves placeholder ids (-1) and real slots / lengths in rows 2..3.
    x.fill([5, -1, -1, 7], [10, 11, 12, 13], [40, 41, 42, 43], [11, 12, 13, 14], [[1, 2], [3], [4], [0, 1, 2]],
           [1, 2, 0, 1], padded=4, scratch_slot=99)
    x.fill([-1, 6], [20, 30], [50, 60], [21, 31], [[4, 3, 2], [1]], [0, 3], padded=4, scratch_slot=99)
    assert x.input_ids[:4].tolist() == [-1, 6, 0, 0]  # row 0 is filled on the device from the sampled ids
    assert x.positions[:4].tolist() == [20, 30, 0, 0]
    assert x.slot_mapping[:4].tolist() == [50, 60, 99, 99]
    assert x.kv_lens[:4].tolist() == [21, 31, 1, 1]
    assert x.pending[:2].tolist() == [0, 3]
    assert x.block_tables[0, :3].tolist() == [4, 3, 2] and x.block_tables[1, 0].item() == 1
    # One byte buffer holds every per-row field: a single copy moves them.
    assert x.kv_lens.untyped_storage().data_ptr() == x.rows.untyped_storage().data_ptr()
    assert x.input_ids.untyped_storage().data_ptr() == x.rows.untyped_storage().data_ptr()
