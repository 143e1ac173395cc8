"""Box arithmetic of Caffe-SSD (weiliu89/caffe ``bbox_util.cpp``) in plain torch.

Boxes are ``[xmin, ymin, xmax, ymax]`` in the last dimension, normalised coordinates (no +1
in widths, unlike pixel boxes). Every function works on any device and batch shape, in
float32 like Caffe, so the detection layers and the detection evaluation agree with Caffe to
the last bit where Caffe's arithmetic allows it.
"""

from __future__ import annotations

import torch

# PriorBoxParameter.CodeType of caffe.proto.
CORNER = 1
CENTER_SIZE = 2
CORNER_SIZE = 3
CODE_TYPES = {"CORNER": CORNER, "CENTER_SIZE": CENTER_SIZE, "CORNER_SIZE": CORNER_SIZE}


def box_size(boxes: torch.Tensor) -> torch.Tensor:
    """Area of normalised boxes; 0 for an inverted box (Caffe's ``BBoxSize``)."""
    w = boxes[..., 2] - boxes[..., 0]
    h = boxes[..., 3] - boxes[..., 1]
    return torch.where((w < 0) | (h < 0), torch.zeros_like(w), w * h)


def jaccard(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise IoU of broadcastable box tensors ``(..., 4)`` (Caffe's ``JaccardOverlap``).

    Boxes that only touch, or that do not intersect, overlap 0; an inverted box has area 0.
    """
    iw = torch.minimum(a[..., 2], b[..., 2]) - torch.maximum(a[..., 0], b[..., 0])
    ih = torch.minimum(a[..., 3], b[..., 3]) - torch.maximum(a[..., 1], b[..., 1])
    inter = iw * ih
    union = box_size(a) + box_size(b) - inter
    overlap = inter / union
    return torch.where((iw > 0) & (ih > 0), overlap, torch.zeros_like(overlap))


def iou_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of every box of ``a (..., Na, 4)`` with every box of ``b (..., Nb, 4)``:
    ``(..., Na, Nb)``."""
    return jaccard(a.unsqueeze(-2), b.unsqueeze(-3))


def decode_boxes(loc: torch.Tensor, priors: torch.Tensor, variances: torch.Tensor | None,
                 code_type: int = CORNER, variance_encoded_in_target: bool = False,
                 clip: bool = False) -> torch.Tensor:
    """Caffe-SSD ``DecodeBBox``: location predictions ``(..., P, 4)`` against priors ``(P, 4)``
    and their variances ``(P, 4)`` (unused, may be None, when the targets encode them). The
    detection layer calls it with ``clip=False`` (Caffe's
    DetectionOutput does not clip), so boxes may leave [0, 1]."""
    px0, py0, px1, py1 = priors.unbind(-1)
    lx0, ly0, lx1, ly1 = loc.unbind(-1)
    if variance_encoded_in_target:
        v0 = v1 = v2 = v3 = None
    else:
        v0, v1, v2, v3 = variances.unbind(-1)

    def scaled(v, x):
        return x if v is None else v * x

    if code_type == CORNER:
        out = torch.stack([px0 + scaled(v0, lx0), py0 + scaled(v1, ly0),
                           px1 + scaled(v2, lx1), py1 + scaled(v3, ly1)], dim=-1)
    elif code_type == CENTER_SIZE:
        pw = px1 - px0
        ph = py1 - py0
        pcx = (px0 + px1) / 2
        pcy = (py0 + py1) / 2
        cx = scaled(v0, lx0) * pw + pcx
        cy = scaled(v1, ly0) * ph + pcy
        w = torch.exp(scaled(v2, lx1)) * pw
        h = torch.exp(scaled(v3, ly1)) * ph
        out = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)
    elif code_type == CORNER_SIZE:
        pw = px1 - px0
        ph = py1 - py0
        out = torch.stack([px0 + scaled(v0, lx0) * pw, py0 + scaled(v1, ly0) * ph,
                           px1 + scaled(v2, lx1) * pw, py1 + scaled(v3, ly1) * ph], dim=-1)
    else:
        raise ValueError(f"unknown code_type {code_type}")
    return out.clamp(0, 1) if clip else out


def top_k_candidates(scores: torch.Tensor, score_threshold: float, top_k: int = -1
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Caffe's ``GetMaxScoreIndex`` for each row of ``scores (G, P)``.

    Keeps the entries strictly above ``score_threshold``, sorted by score descending with ties
    in index order (``std::stable_sort``), at most ``top_k`` of them (-1: all). Returns
    ``order (G, K)``, the prior indices, and ``valid (G, K)``, False past a row's count.
    """
    G, P = scores.shape
    above = scores > score_threshold
    masked = scores.masked_fill(~above, float("-inf"))
    order = torch.sort(masked, dim=1, descending=True, stable=True).indices
    count = above.sum(1)
    if top_k > -1:
        count = count.clamp(max=top_k)
    K = int(count.max()) if G else 0
    order = order[:, :K]
    valid = torch.arange(K, device=scores.device) < count[:, None]
    return order, valid


def greedy_nms(boxes: torch.Tensor, valid: torch.Tensor, nms_threshold: float,
               eta: float = 1.0) -> torch.Tensor:
    """Caffe-SSD ``ApplyNMSFast`` on candidates already in score order, one group per row.

    ``boxes (G, K, 4)``, ``valid (G, K)``. A candidate is kept if its IoU with every box kept
    before it is <= the adaptive threshold, which is multiplied by ``eta`` after each kept box
    while it is above 0.5. Loops once per kept box (all groups at once): between two kept boxes
    neither the threshold nor the kept set changes, so the next kept box is simply the first
    undecided candidate whose largest IoU with the kept boxes is within the threshold.
    Each kept box costs one IoU pass over its group's K candidates, so without a top_k on
    thousands of candidates that barely overlap this is slow, as it is in Caffe.
    Returns ``keep (G, K)`` bool.
    """
    G, K = valid.shape
    device = boxes.device
    keep = torch.zeros(G, K, dtype=torch.bool, device=device)
    if G == 0 or K == 0:
        return keep
    positions = torch.arange(K, device=device)
    undecided = valid.clone()
    max_overlap = torch.zeros(G, K, dtype=boxes.dtype, device=device)
    threshold = torch.full((G,), nms_threshold, dtype=torch.float32, device=device)
    eta32 = torch.tensor(eta, dtype=torch.float32, device=device)
    while True:
        eligible = undecided & (max_overlap <= threshold[:, None])
        found = eligible.any(1)
        if not bool(found.any()):
            break
        first = torch.where(eligible, positions, K).amin(1).clamp(max=K - 1)
        keep |= (positions == first[:, None]) & found[:, None]
        undecided &= ~((positions <= first[:, None]) & found[:, None])
        best = boxes.gather(1, first[:, None, None].expand(G, 1, 4))
        overlap = jaccard(best, boxes)
        max_overlap = torch.where(found[:, None], torch.maximum(max_overlap, overlap),
                                  max_overlap)
        if eta < 1:
            shrink = found & (threshold > 0.5)
            threshold = torch.where(shrink, threshold * eta32, threshold)
    return keep


def batched_nms_fast(boxes: torch.Tensor, scores: torch.Tensor, score_threshold: float,
                     nms_threshold: float, eta: float = 1.0, top_k: int = -1,
                     box_group: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``ApplyNMSFast`` for many independent groups (one image and class each).

    ``scores (G, P)``; ``boxes (B, P, 4)`` with ``box_group (G,)`` naming the box set of each
    group (default: group g uses ``boxes[g]``), so classes that share locations need not copy
    them. Returns ``order (G, K)`` and ``keep (G, K)``: row g keeps the prior indices
    ``order[g][keep[g]]``, in Caffe's output order (score descending).
    """
    order, valid = top_k_candidates(scores, score_threshold, top_k)
    if box_group is None:
        box_group = torch.arange(scores.shape[0], device=scores.device)
    K = order.shape[1]
    cand = boxes[box_group[:, None].expand(-1, K), order]  # (G, K, 4)
    return order, greedy_nms(cand, valid, nms_threshold, eta)


def nms_fast(boxes: torch.Tensor, scores: torch.Tensor, score_threshold: float,
             nms_threshold: float, eta: float = 1.0, top_k: int = -1) -> torch.Tensor:
    """``ApplyNMSFast`` on one set: ``boxes (P, 4)``, ``scores (P,)``; kept indices, best first."""
    order, keep = batched_nms_fast(boxes[None], scores[None], score_threshold, nms_threshold,
                                   eta, top_k)
    return order[0][keep[0]]
