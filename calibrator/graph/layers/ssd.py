"""The SSD layers of weiliu89/caffe: Normalize, PriorBox and DetectionOutput.

Each follows the Caffe-SSD source (``normalize_layer.cpp``, ``prior_box_layer.cpp``,
``detection_output_layer.cpp`` and ``bbox_util.cpp``), including its quirks: PriorBox truncates
min/max sizes to int, DetectionOutput does not clip boxes, and an empty result is one fake
row of -1 per image.
"""

from __future__ import annotations

import numpy as np
import torch

from calibrator.detection import boxes as bx
from calibrator.graph.layer import Layer, as_parameter, register
from calibrator.limits import check_memory

FLT_MAX = float(np.finfo(np.float32).max)


def _legacy_hw(shape) -> tuple[int, int]:
    """Caffe's ``height()``/``width()`` of a blob: axes 2 and 3, 1 where the blob is shorter."""
    height = shape[2] if len(shape) > 2 else 1
    width = shape[3] if len(shape) > 3 else 1
    return int(height), int(width)


@register("Normalize")
class Normalize(Layer):
    """L2 normalisation then a learned scale (ParseNet, SSD's conv4_3_norm).

    The norm is ``sqrt(sum x^2 + eps)`` over C,H,W per sample (across_spatial) or over C per
    position, with eps inside the square root as in Caffe-SSD's CPU and GPU code.
    """

    num_tops = 1

    def __init__(self, param, bottom_shapes):
        super().__init__(param, bottom_shapes)
        p = param.norm_param
        self.across_spatial = p.across_spatial
        self.channel_shared = p.channel_shared
        self.eps = float(p.eps)
        shape = self.bottom_shapes[0]
        if len(shape) < 2:
            raise self.error(f"needs a bottom with at least 2 axes, got {shape}")
        self.channels = int(shape[1])
        self.scale = None

    def blob_shapes(self):
        return [(1,)] if self.channel_shared else [(self.channels,)]

    def load_blobs(self, blobs):
        if len(blobs) != 1:
            raise self.error(f"takes 1 scale blob, found {len(blobs)}")
        expected = 1 if self.channel_shared else self.channels
        if blobs[0].size != expected:
            raise self.error(f"scale blob has {blobs[0].size} values, expected {expected}")
        self.scale = as_parameter(np.asarray(blobs[0]).reshape(-1))

    def forward(self, x):
        if self.scale is None:
            raise self.error("scale blob not loaded")
        n = x.shape[0]
        flat = x.reshape(n, self.channels, -1)
        sq = flat * flat
        if self.across_spatial:
            norm = torch.sqrt(sq.sum(dim=(1, 2), keepdim=True) + self.eps)
            out = flat * (1.0 / norm)  # Caffe scales by the reciprocal here
        else:
            norm = torch.sqrt(sq.sum(dim=1, keepdim=True) + self.eps)
            out = flat / norm
        scale = self.scale.to(x.device)
        out = out * (scale if self.channel_shared else scale.view(1, -1, 1))
        return (out.reshape(x.shape),)


@register("PriorBox")
class PriorBox(Layer):
    """SSD default boxes for every cell of a feature map: ``(1, 2, H*W*num_priors*4)``, the
    normalised corners then their variances.

    Per cell and per min_size the order is: the min_size square, the sqrt(min*max) square when
    max_size is given, then one box per aspect ratio != 1 (in the order given, each followed by
    its reciprocal when flip). As in Caffe-SSD, min_size and max_size are truncated to int.
    Bottoms: the feature map and the image (its size is used unless img_size/img_h/img_w).
    """

    num_tops = 1

    def __init__(self, param, bottom_shapes):
        super().__init__(param, bottom_shapes)
        if len(self.bottom_shapes) != 2:
            raise self.error(f"takes 2 bottoms (feature map, image), got {len(bottom_shapes)}")
        p = param.prior_box_param
        if len(p.min_size) == 0:
            raise self.error("must provide min_size")
        self.min_sizes = [float(s) for s in p.min_size]
        self.max_sizes = [float(s) for s in p.max_size]
        numbers = [*self.min_sizes, *self.max_sizes, *p.aspect_ratio, *p.variance,
                   p.step, p.step_h, p.step_w, p.offset]
        if not all(np.isfinite(v) and abs(v) < 1e9 for v in numbers):
            raise self.error("min_size, max_size, aspect_ratio, variance, step and offset "
                             "must be finite numbers (below 1e9)")
        if any(s <= 0 for s in self.min_sizes):
            raise self.error("min_size must be positive")
        if self.max_sizes:
            if len(self.max_sizes) != len(self.min_sizes):
                raise self.error("needs as many max_size as min_size")
            if any(mx <= mn for mn, mx in zip(self.min_sizes, self.max_sizes)):
                raise self.error("max_size must be greater than min_size")
        ratios = [np.float32(1.0)]
        if any(ar <= 0 for ar in p.aspect_ratio):
            raise self.error("aspect_ratio must be positive")
        for ar in p.aspect_ratio:
            ar = np.float32(ar)
            if any(abs(float(ar) - float(r)) < 1e-6 for r in ratios):
                continue
            ratios.append(ar)
            if p.flip:
                ratios.append(np.float32(1.0 / float(ar)))
        self.aspect_ratios = ratios
        self.num_priors = len(ratios) * len(self.min_sizes) + len(self.max_sizes)
        self.clip = p.clip
        variance = [float(v) for v in p.variance]
        if len(variance) > 1 and len(variance) != 4:
            raise self.error("must give 1 or 4 variances")
        if any(v <= 0 for v in variance):
            raise self.error("variance must be positive")
        self.variance = variance or [0.1]
        if p.HasField("img_h") or p.HasField("img_w"):
            if p.HasField("img_size"):
                raise self.error("give either img_size or img_h/img_w, not both")
            self.img_h, self.img_w = int(p.img_h), int(p.img_w)
            if self.img_h <= 0 or self.img_w <= 0:
                raise self.error("img_h and img_w must be positive")
        elif p.HasField("img_size"):
            if p.img_size <= 0:
                raise self.error("img_size must be positive")
            self.img_h = self.img_w = int(p.img_size)
        else:
            self.img_h = self.img_w = 0
        if p.HasField("step_h") or p.HasField("step_w"):
            if p.HasField("step"):
                raise self.error("give either step or step_h/step_w, not both")
            self.step_h, self.step_w = float(p.step_h), float(p.step_w)
            if self.step_h <= 0 or self.step_w <= 0:
                raise self.error("step_h and step_w must be positive")
        elif p.HasField("step"):
            if p.step <= 0:
                raise self.error("step must be positive")
            self.step_h = self.step_w = float(p.step)
        else:
            self.step_h = self.step_w = 0.0
        self.offset = float(p.offset)
        self._cache: dict = {}
        self.priors(self.bottom_shapes[0], self.bottom_shapes[1])  # reject bad shapes early

    def priors(self, feature_shape, image_shape) -> np.ndarray:
        """The top blob for these bottom shapes, computed as Caffe does in float32 (centres
        and sizes in float, corners in double then stored as float)."""
        layer_h, layer_w = _legacy_hw(feature_shape)
        if self.img_h == 0 or self.img_w == 0:
            img_h, img_w = _legacy_hw(image_shape)
        else:
            img_h, img_w = self.img_h, self.img_w
        key = (layer_h, layer_w, img_h, img_w)
        if key in self._cache:
            return self._cache[key]
        if layer_h * layer_w == 0 or img_h * img_w == 0:
            raise self.error(f"empty feature map or image: {feature_shape}, {image_shape}")
        priors = layer_h * layer_w * self.num_priors
        # float64 corners, their float32 copy, the variances and the (1, 2, P*4) top
        check_memory(priors * 4 * (8 * 2 + 4 * 4), f"computing {priors} priors for a "
                     f"{layer_h}x{layer_w} map", self.error)
        f32 = np.float32
        if self.step_w == 0 or self.step_h == 0:
            step_w, step_h = f32(img_w) / f32(layer_w), f32(img_h) / f32(layer_h)
        else:
            step_w, step_h = f32(self.step_w), f32(self.step_h)
        cx = (np.arange(layer_w, dtype=f32) + f32(self.offset)) * step_w  # float math
        cy = (np.arange(layer_h, dtype=f32) + f32(self.offset)) * step_h
        sizes = []  # (width, height) of each prior of a cell, in order
        for s, min_size in enumerate(self.min_sizes):
            mn = int(min_size)
            sizes.append((f32(mn), f32(mn)))
            if self.max_sizes:
                mx = int(self.max_sizes[s])
                side = f32(np.sqrt(float(mn * mx)))
                sizes.append((side, side))
            for ar in self.aspect_ratios:
                if abs(float(ar) - 1.0) < 1e-6:
                    continue
                root = np.sqrt(float(ar))
                sizes.append((f32(mn * root), f32(mn / root)))
        bw = np.array([w for w, _ in sizes], dtype=f32).astype(np.float64)
        bh = np.array([h for _, h in sizes], dtype=f32).astype(np.float64)
        gx = cx.astype(np.float64)[None, :, None]  # (1, W, 1)
        gy = cy.astype(np.float64)[:, None, None]  # (H, 1, 1)
        shape = (layer_h, layer_w, len(sizes))
        corners = np.stack([
            np.broadcast_to((gx - bw / 2.0) / img_w, shape),
            np.broadcast_to((gy - bh / 2.0) / img_h, shape),
            np.broadcast_to((gx + bw / 2.0) / img_w, shape),
            np.broadcast_to((gy + bh / 2.0) / img_h, shape),
        ], axis=-1).astype(f32).reshape(-1)
        if self.clip:
            corners = np.clip(corners, f32(0), f32(1))
        variance = np.array(self.variance * 4 if len(self.variance) == 1 else self.variance,
                            dtype=f32)
        variances = np.broadcast_to(variance, (corners.size // 4, 4)).reshape(-1)
        out = np.stack([corners, variances])[None]  # (1, 2, H*W*num_priors*4)
        self._cache[key] = out
        return out

    def forward(self, feature, image):
        # a fresh tensor per call (never a cached one: it may be a fake tensor from shape
        # inference, and a later in-place layer must not alter the constant)
        out = self.priors(tuple(feature.shape), tuple(image.shape))
        return (torch.from_numpy(out.copy()).to(feature.device),)


@register("DetectionOutput")
class DetectionOutput(Layer):
    """SSD's decoding, per-class NMS and top-k selection.

    Bottoms: loc ``(N, P*L*4)`` (L = 1 when share_location, else num_classes), conf
    ``(N, P*C)`` (already softmaxed), priors ``(1, 2, P*4)``. Top ``(1, 1, D, 7)`` with rows
    ``[image, label, score, xmin, ymin, xmax, ymax]``: by image, then label ascending, then
    score descending; boxes are not clipped. When no image has a detection Caffe-SSD emits
    one row per image, ``[i, -1, -1, -1, -1, -1, -1]``; an image without detections among
    others that have some gets no row.
    """

    num_tops = 1

    def __init__(self, param, bottom_shapes):
        super().__init__(param, bottom_shapes)
        p = param.detection_output_param
        if not p.HasField("num_classes"):
            raise self.error("must specify num_classes")
        self.num_classes = int(p.num_classes)
        self.share_location = p.share_location
        self.num_loc_classes = 1 if self.share_location else self.num_classes
        self.background_label_id = int(p.background_label_id)
        self.code_type = int(p.code_type)
        if self.code_type not in bx.CODE_TYPES.values():
            raise self.error(f"unknown code_type {self.code_type}")
        self.variance_encoded_in_target = p.variance_encoded_in_target
        self.keep_top_k = int(p.keep_top_k)
        self.confidence_threshold = (float(p.confidence_threshold)
                                     if p.HasField("confidence_threshold") else -FLT_MAX)
        self.nms_threshold = float(p.nms_param.nms_threshold)
        if self.nms_threshold < 0:
            raise self.error("nms_threshold must be non negative")
        self.eta = float(p.nms_param.eta)
        if not 0 < self.eta <= 1:
            raise self.error("nms eta must be in (0, 1]")
        self.top_k = int(p.nms_param.top_k) if p.nms_param.HasField("top_k") else -1
        if len(self.bottom_shapes) < 3:
            raise self.error(f"takes 3 bottoms (loc, conf, prior), got {len(bottom_shapes)}")
        loc_shape, conf_shape, prior_shape = self.bottom_shapes[:3]
        # the variances (second channel) may be left out when the targets encode them
        channels = (1, 2) if self.variance_encoded_in_target else (2,)
        if len(prior_shape) != 3 or prior_shape[1] not in channels or prior_shape[2] % 4:
            raise self.error(f"prior bottom must be (1, 2, P*4), got {prior_shape}")
        self.num_priors = prior_shape[2] // 4
        loc_count = int(np.prod(loc_shape[1:]))
        conf_count = int(np.prod(conf_shape[1:]))
        if loc_count != self.num_priors * self.num_loc_classes * 4:
            raise self.error(f"{loc_count} location values per image for {self.num_priors} "
                             f"priors x {self.num_loc_classes} x 4")
        if conf_count != self.num_priors * self.num_classes:
            raise self.error(f"{conf_count} confidences per image for {self.num_priors} "
                             f"priors x {self.num_classes} classes")
        if loc_shape[0] != conf_shape[0]:
            raise self.error("loc and conf have different batch sizes")

    def decode(self, loc, conf, prior):
        """The NMS input: decoded boxes ``(N, P, L, 4)`` and scores ``(N, P, C)``."""
        n, p = loc.shape[0], self.num_priors
        prior = prior.reshape(prior.shape[0], -1, p, 4)[0]
        variances = None if self.variance_encoded_in_target else prior[1].unsqueeze(1)
        boxes = bx.decode_boxes(loc.reshape(n, p, self.num_loc_classes, 4),
                                prior[0].unsqueeze(1), variances,
                                self.code_type, self.variance_encoded_in_target, clip=False)
        return boxes, conf.reshape(n, p, self.num_classes)

    def forward(self, loc, conf, prior, *_):
        boxes, scores = self.decode(loc, conf, prior)
        n, p, c = scores.shape
        device = loc.device
        labels = torch.tensor([k for k in range(c) if k != self.background_label_id],
                              dtype=torch.long, device=device)
        images = torch.arange(n, device=device)
        # one NMS group per (image, label), in output order
        group_image = images.repeat_interleave(len(labels))
        group_label = labels.repeat(n)
        group_scores = scores.permute(0, 2, 1)[group_image, group_label]  # (G, P)
        box_sets = boxes.permute(0, 2, 1, 3).reshape(n * self.num_loc_classes, p, 4)
        box_group = group_image * self.num_loc_classes
        if not self.share_location:
            box_group = box_group + group_label
        order, keep = bx.batched_nms_fast(box_sets, group_scores, self.confidence_threshold,
                                          self.nms_threshold, self.eta, self.top_k, box_group)
        g, k = keep.nonzero(as_tuple=True)  # row-major: by group, then score order
        prior_idx = order[g, k]
        det_image = group_image[g]
        det_score = group_scores[g, prior_idx]
        det_box = box_sets[box_group[g], prior_idx]
        if self.keep_top_k > -1 and det_image.numel():
            # per image, the keep_top_k best scores over all labels (ties: first in output order)
            by_score = torch.sort(det_score, descending=True, stable=True).indices
            by_image = by_score[torch.sort(det_image[by_score], stable=True).indices]
            image_start = torch.searchsorted(det_image[by_image], det_image[by_image], right=False)
            rank = torch.arange(by_image.numel(), device=device) - image_start
            selected = torch.zeros_like(det_score, dtype=torch.bool)
            selected[by_image[rank < self.keep_top_k]] = True
            g, det_image, det_score, det_box = (g[selected], det_image[selected],
                                                det_score[selected], det_box[selected])
        if det_image.numel() == 0:
            out = torch.full((n, 7), -1.0, device=device)
            out[:, 0] = images.to(out.dtype)
            return (out.view(1, 1, n, 7),)
        rows = torch.cat([det_image.to(det_score.dtype)[:, None],
                          group_label[g].to(det_score.dtype)[:, None],
                          det_score[:, None], det_box], dim=1)
        return (rows.view(1, 1, -1, 7),)
