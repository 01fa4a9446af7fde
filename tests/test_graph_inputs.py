"""The step graphs' host-side input staging (the copies and replays themselves need a GPU: tests/gpu)."""

import torch

from stepserve.engine.cuda_graph import _PrefillInputs, _StepInputs, prefill_token_counts


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


def test_prefill_fill_pads_tokens_and_empties_the_sequences_past_the_step():
    x = _PrefillInputs(32, 6, 4, torch.device("cpu"))
    x.fill(list(range(20)), list(range(100, 120)), [3, 17], [40, 17], [[1, 2, 3], [4, 5]], padded=32, scratch_slot=99)
    # A smaller step after it: its padding overwrites the older step's tokens and sequences.
    x.fill([7, 8, 9, 10, 11], [50, 51, 52, 53, 54], [1, 4], [8, 4], [[6], [0]], padded=16, scratch_slot=99)
    assert x.positions[:16].tolist() == [7, 8, 9, 10, 11] + [0] * 11
    assert x.slot_mapping[:16].tolist() == [50, 51, 52, 53, 54] + [99] * 11
    assert x.cu_q_lens.tolist() == [0, 1, 5, 5, 5, 5, 5]  # sequences 2..5 are empty: the kernel gives them no tiles
    assert x.kv_lens[:2].tolist() == [8, 4]
    assert x.block_tables[0, 0].item() == 6 and x.block_tables[1, :2].tolist() == [0, 5]
    # Every per-token and per-sequence field is a view of one byte buffer (one copy), int32 fields 16-byte aligned.
    base = x.rows.untyped_storage().data_ptr()
    for t in (x.positions, x.slot_mapping, x.cu_q_lens, x.kv_lens):
        assert t.untyped_storage().data_ptr() == base and (t.data_ptr() - base) % 16 == 0


def test_prefill_token_counts_pad_by_less_than_128_above_128():
    assert prefill_token_counts(2048)[:5] == [16, 32, 64, 128, 256]
    assert prefill_token_counts(2048)[-1] == 2048 and prefill_token_counts(300) == [16, 32, 64, 128, 256]
    sizes = prefill_token_counts(2048)
    assert all(b - a <= 128 for a, b in zip(sizes, sizes[1:]))
