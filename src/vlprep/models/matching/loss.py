"""Maria's sentence-level training loss and validation recall (``xmatching/loss.py``, ``metric.py``)."""

from __future__ import annotations

import torch


def sent_paired_hinge_rank_loss(lang: torch.Tensor, visn: torch.Tensor, margin: float = 0.5) -> torch.Tensor:
    """Paired hinge rank loss, summed (not averaged) over the batch.

    The batch (B even) is split in halves; the negative of pair i in one half is pair i of the other
    half. Loss = sum over both halves of max(0, margin - <l_i, v_i> + <l_i, v_neg>).
    """
    batch = lang.shape[0]
    if batch % 2 or batch != visn.shape[0] or margin <= 0:
        raise ValueError(f"need an even batch of paired outputs and margin > 0 (got {batch}, {visn.shape[0]}, {margin})")
    half = batch // 2
    pos_lang, neg_lang = lang[:half], lang[half:]
    pos_visn, neg_visn = visn[:half], visn[half:]
    pos = torch.clamp(margin - (pos_lang * pos_visn).sum(-1) + (pos_lang * neg_visn).sum(-1), min=0.0)
    neg = torch.clamp(margin - (neg_lang * neg_visn).sum(-1) + (neg_lang * pos_visn).sum(-1), min=0.0)
    return pos.sum() + neg.sum()


def sent_batchwise_recall(lang: torch.Tensor, visn: torch.Tensor, recalls=(1, 5, 10)) -> dict[int, float]:
    """Upstream's in-batch "R@k": the fraction of sentences whose own image scores at least the
    ``(batch - k)``-th smallest score of the row, i.e. ranks within the top k + 1 (upstream's definition)."""
    scores = lang @ visn.t()  # (sentences, images)
    positive = scores.diagonal()
    batch = scores.shape[0]
    out = {}
    for k in recalls:
        kth = torch.kthvalue(scores, batch - k, dim=1).values if k < batch else scores.min(dim=1).values
        out[k] = float((positive >= kth).float().mean())
    return out
