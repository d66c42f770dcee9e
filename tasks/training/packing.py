"""Padding-free packing (training.packing): the examples of a micro-batch are packed into
as few rows of data.max_length tokens as fit (first-fit, longest first), each example's
position_ids restarting at 0 and no attention_mask. transformers reads the restarts as
sequence boundaries and masks attention block-diagonally, so no token attends across
examples; the first label of each example is -100, so no example is trained to predict
the next one's first token. The loss is then the loss of the same examples unpacked
(tests/unit/test_packing.py), computed over far fewer padding tokens.
"""
from __future__ import annotations


def pack_rows(lengths: list[int], row_length: int) -> list[list[int]]:
    """Example indices per row: first-fit over the examples sorted longest first."""
    rows: list[list[int]] = []
    free: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        size = min(lengths[index], row_length)
        for r, space in enumerate(free):
            if size <= space:
                rows[r].append(index)
                free[r] -= size
                break
        else:
            rows.append([index])
            free.append(row_length - size)
    return rows


class PackingCollator:
    """Collates features {input_ids, labels} into packed rows of `row_length` tokens
    (the end of a row is padding: pad_token_id, label -100)."""

    def __init__(self, row_length: int, pad_token_id: int):
        self.row_length, self.pad_token_id = row_length, pad_token_id

    def __call__(self, features: list[dict]) -> dict:
        import torch

        lengths = [min(len(f["input_ids"]), self.row_length) for f in features]
        rows = pack_rows(lengths, self.row_length)
        ids = torch.full((len(rows), self.row_length), self.pad_token_id, dtype=torch.long)
        labels = torch.full_like(ids, -100)
        positions = torch.zeros_like(ids)
        for r, members in enumerate(rows):
            at = 0
            for index in members:
                n = lengths[index]
                feature = features[index]
                ids[r, at:at + n] = torch.as_tensor(feature["input_ids"][:n])
                example_labels = torch.as_tensor(feature.get("labels", feature["input_ids"])[:n])
                labels[r, at:at + n] = example_labels
                labels[r, at] = -100  # never learn an example's first token from the previous one
                positions[r, at:at + n] = torch.arange(n)
                at += n
            # Padding positions count on from the last example (not 0), so they are not
            # read as the start of another sequence; their labels are -100.
            positions[r, at:] = torch.arange(self.row_length - at) + (positions[r, at - 1] + 1
                                                                       if at else 0)
        # use_cache=False: transformers reads position_ids as packing only when no KV
        # cache is passed, and a model whose config says use_cache makes one.
        return {"input_ids": ids, "labels": labels, "position_ids": positions,
                "use_cache": False}
