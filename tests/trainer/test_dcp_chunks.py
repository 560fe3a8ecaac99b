"""A split tensor's piece as blocks of the whole tensor: each block is the whole tensor's elements at its offsets."""

import torch

from trainer.strategy.dcp_chunks import split_chunks


def _check(whole: torch.Tensor, piece: torch.Tensor, dim: int, indices: torch.Tensor, blocks: int) -> None:
    chunks = split_chunks(piece, dim, indices, whole.shape[dim])
    assert chunks.shape == whole.shape and len(chunks.blocks) == blocks
    covered = 0
    for block, offsets in chunks.blocks:
        expected = whole
        for d, (start, length) in enumerate(zip(offsets, block.shape)):
            expected = expected.narrow(d, start, length)
        torch.testing.assert_close(block, expected, rtol=0, atol=0)
        assert block.untyped_storage().data_ptr() == piece.untyped_storage().data_ptr()  # a view: loads write through
        covered += block.numel()
    assert covered == piece.numel()


def test_fused_rows_become_one_block_per_run():
    """Rank 1 of tp=2 on a GQA [q|k|v] weight (q 8 rows, k and v 4 each): rows 4-7, 10-11, 14-15."""
    whole = torch.arange(16 * 3, dtype=torch.float32).view(16, 3)
    indices = torch.cat([torch.arange(4, 8), torch.arange(10, 12), torch.arange(14, 16)])
    _check(whole, whole.index_select(0, indices), 0, indices, blocks=3)


def test_columns():
    """Columns 0 and 2-3 of 4 (a row-parallel weight's split): two blocks, non-contiguous views of the piece."""
    whole = torch.arange(3 * 4, dtype=torch.float32).view(3, 4)
    indices = torch.tensor([0, 2, 3])
    _check(whole, whole.index_select(1, indices), 1, indices, blocks=2)
