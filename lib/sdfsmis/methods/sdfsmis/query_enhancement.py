"""Query Enhancement (QE): a query prototype from the query pixels that look like the support
foreground, appended to the query latent as 4 extra channels (model.md step 4)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_mean(features: torch.Tensor, weights: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """[B, C, H, W] x [B, 1, H, W] -> [B, C]."""
    return (features * weights).sum(dim=(2, 3)) / (weights.sum(dim=(2, 3)) + eps)


def query_prototype(
    support_latent: torch.Tensor,
    support_mask: torch.Tensor,
    query_latent: torch.Tensor,
    threshold: float = 0.7,
    topk: int = 10,
) -> torch.Tensor:
    """The mean of query-latent pixels whose foreground probability exceeds ``threshold``;
    the ``topk`` most foreground-like pixels where none does.

    ``support_mask`` is a binary mask at any resolution; it is area-resized to the latent grid.
    Returns [B, C].
    """
    weights = F.interpolate(support_mask.float(), size=support_latent.shape[-2:], mode="area")
    foreground = masked_mean(support_latent, weights)
    background = masked_mean(support_latent, 1 - weights)
    query = query_latent.float()
    similarity = torch.stack(
        [
            F.cosine_similarity(query, background[..., None, None].float(), dim=1),
            F.cosine_similarity(query, foreground[..., None, None].float(), dim=1),
        ],
        dim=1,
    )
    p_foreground = similarity.softmax(dim=1)[:, 1].flatten(1)  # [B, HW]
    selected = p_foreground > threshold
    k = min(topk, p_foreground.shape[1])
    fallback = torch.zeros_like(selected).scatter_(1, p_foreground.topk(k, dim=1).indices, True)
    selected = torch.where(selected.any(dim=1, keepdim=True), selected, fallback)
    weights = selected.float().view(query.shape[0], 1, *query.shape[-2:])
    return masked_mean(query, weights).to(query_latent.dtype)


def enhance_query(query_latent: torch.Tensor, prototype: torch.Tensor) -> torch.Tensor:
    """Concatenate the broadcast prototype to the query latent: 4 -> 8 channels."""
    return torch.cat([query_latent, prototype[..., None, None].expand_as(query_latent)], dim=1)
