"""What differs between the two tasks: data, loss, and scoring at the original resolution."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .config import EvalConfig
from .datasets import read_aflw19, read_lapa
from .farl import frame_shift, from_input, warp_to_original
from .farl_data import FarlAlignmentData, FarlParsingData
from .heads import heatmap_nll, soft_argmax
from .metrics import AFLW_NUM_POINTS, LAPA_CLASSES, alignment_metrics, parsing_metrics, update_confusion
from .transforms import IGNORE, AlignmentData, ParsingData, load_label
from .uper import farl_alignment_loss, heatmap_points


def _loader(ds, batch_size, workers):
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=workers)


class AlignmentTask:
    """AFLW-19: 19 heatmaps, soft-argmax to crop pixels, L1 on coordinates (+ heatmap cross-entropy)."""
    name = "alignment"
    out_channels = AFLW_NUM_POINTS
    headline = ("nme_diag", "lower")

    def __init__(self, cfg: EvalConfig, size: int, mean, std):
        self.cfg, self.size, self.mean, self.std = cfg, size, mean, std
        self.tc = cfg.train_count or None
        self.shift = frame_shift(cfg.warp_frame or "centre", size)

    @property
    def farl(self) -> bool:
        return self.cfg.protocol == "farl"

    def _data(self, recs, augment: bool):
        if self.farl:
            return FarlAlignmentData(recs, self.size, self.mean, self.std, augment, self.cfg.seed, self.cfg.warp_factor,
                                     self.shift)
        return AlignmentData(recs, self.size, self.mean, self.std, self.cfg.crop_scale, augment, self.cfg.seed)

    def train_data(self):
        return self._data(read_aflw19(self.cfg.data, "train", self.tc), self.cfg.augment)

    def points(self, hm, stride):
        """Heatmaps -> input pixels: FaRL's sigmoid-weighted mean, or the simple protocol's soft-argmax."""
        return heatmap_points(hm, stride) if self.farl else soft_argmax(hm, stride)

    def test_records(self):
        recs = read_aflw19(self.cfg.data, self.cfg.eval_split, self.tc)
        return recs[: self.cfg.max_test] if self.cfg.max_test else recs

    def loss(self, model, batch, device):
        x, pts = batch["image"].to(device), batch["points"].to(device)
        hm = model(x)
        if self.farl:
            return farl_alignment_loss(hm, pts, self.size, model.stride, self.cfg.heatmap_weight)
        pred = soft_argmax(hm, model.stride)
        # Coordinates in units of the input size: an NME-like number, comparable across --img-size.
        l1 = (pred - pts).abs().mean() / self.size
        loss = l1
        logs = {"l1": l1}
        if self.cfg.heatmap_weight > 0:
            h = heatmap_nll(hm, pts, model.stride)
            loss = loss + self.cfg.heatmap_weight * h
            logs["heatmap"] = h
        return loss, logs

    @torch.no_grad()
    def evaluate(self, model, device, num_viz: int, autocast):
        recs = self.test_records()
        ds = self._data(recs, False)
        preds = np.zeros((len(recs), AFLW_NUM_POINTS, 2))
        wf = self.cfg.warp_factor if self.farl else 0.0
        for b in _loader(ds, self.cfg.eval_batch_size or self.cfg.batch_size, self.cfg.workers):
            with autocast():
                hm = model(b["image"].to(device))
            crop = self.points(hm.float(), model.stride).double().cpu().numpy()
            # back to the original image through the exact inverse of the input warp
            for j, i in enumerate(b["index"].tolist()):
                preds[i] = from_input(crop[j], b["matrix"][j].numpy(), self.size, wf, self.shift)
        gt = np.stack([r.landmarks for r in recs])
        boxes = np.stack([r.box for r in recs])
        grid = self.cfg.auc_grid or "farl"
        m = alignment_metrics(preds, gt, boxes, grid)
        frontal = np.array([r.visible.all() for r in recs])
        if self.cfg.eval_split == "test" and frontal.any():
            mf = alignment_metrics(preds[frontal], gt[frontal], boxes[frontal], grid)
            m.update({f"{k}_frontal": v for k, v in mf.items() if k.startswith("nme") or k == "num_images"})
        viz = [(recs[i].image, recs[i].box, gt[i], preds[i]) for i in range(min(num_viz, len(recs)))]
        return m, viz


class ParsingTask:
    """LaPa: 11-class logits at stride p/4, cross-entropy at input size; F1 at the original resolution."""
    name = "parsing"
    out_channels = len(LAPA_CLASSES)
    headline = ("f1_mean", "higher")

    def __init__(self, cfg: EvalConfig, size: int, mean, std):
        self.cfg, self.size, self.mean, self.std = cfg, size, mean, std
        self.shift = frame_shift(cfg.warp_frame or "centre", size)

    @property
    def farl(self) -> bool:
        return self.cfg.protocol == "farl"

    def _data(self, recs, augment: bool, with_label: bool):
        if self.farl:
            return FarlParsingData(recs, self.size, self.mean, self.std, augment, self.cfg.seed,
                                   self.cfg.warp_factor, with_label, self.shift)
        return ParsingData(recs, self.size, self.mean, self.std, augment, self.cfg.seed, with_label)

    def _records(self, split: str):
        recs = read_lapa(self.cfg.data, split)
        missing = [r.image for r in recs if not r.landmarks] if self.farl else []
        if missing:  # checked up front: a worker would otherwise fail mid-run
            raise FileNotFoundError(f"FaRL's LaPa protocol aligns faces with the 106 landmarks, but {len(missing)} "
                                    f"{split} images have no landmarks/<stem>.txt (e.g. {missing[0]}); add them or "
                                    "use --protocol resize-whole")
        return recs

    def train_data(self):
        return self._data(self._records("train"), self.cfg.augment, True)

    def test_records(self):
        recs = self._records(self.cfg.eval_split)
        return recs[: self.cfg.max_test] if self.cfg.max_test else recs

    def loss(self, model, batch, device):
        x, y = batch["image"].to(device), batch["label"].to(device)
        # FaRL: logits upsampled to the warped input's size, cross-entropy averaged over every pixel
        # (face_parsing/network.py, task.py); labels warped in from outside the image are background there.
        logits = F.interpolate(model(x).float(), size=y.shape[-2:], mode="bilinear", align_corners=False)
        ce = F.cross_entropy(logits, y, ignore_index=IGNORE)
        return ce, {"ce": ce}

    @torch.no_grad()
    def evaluate(self, model, device, num_viz: int, autocast):
        recs = self.test_records()
        ds = self._data(recs, False, False)
        conf = torch.zeros(len(LAPA_CLASSES), len(LAPA_CLASSES), dtype=torch.int64)
        viz = []
        for b in _loader(ds, self.cfg.eval_batch_size or self.cfg.batch_size, self.cfg.workers):
            with autocast():
                logits = model(b["image"].to(device))
            for j, i in enumerate(b["index"].tolist()):
                lab = load_label(recs[i].label)
                h, w = lab.height, lab.width
                pred = self._to_original(logits[j].float().cpu(), b, j, (h, w))
                gt = torch.from_numpy(np.asarray(load_label(recs[i].label, (h, w)), np.int64))
                update_confusion(conf, pred, gt, ignore_index=IGNORE)
                if len(viz) < num_viz:
                    viz.append((recs[i].image, gt.numpy(), pred.numpy()))
        m = parsing_metrics(conf, absent=self.cfg.absent_class or "nan")
        m["num_images"] = len(recs)
        m["confusion"] = conf.tolist()
        return m, viz


    def _to_original(self, logits: torch.Tensor, b: dict, j: int, hw: tuple[int, int]) -> torch.Tensor:
        """[C, h, w] logits on the input's grid -> [H, W] class map at the original resolution."""
        if self.farl:
            # FaRL (lapa/test_post.yaml): logits at the warped size, taken back through the inverted warp
            # (bilinear), then argmax.
            up = F.interpolate(logits[None], size=(self.size, self.size), mode="bilinear", align_corners=False)[0]
            return warp_to_original(up, b["matrix"][j].numpy(), self.size, self.cfg.warp_factor, hw,
                                    shift=self.shift).argmax(0)
        # The logit grid spans the whole squeezed image, so resizing it to (h, w) is the exact inverse of
        # the input resize (corner-aligned coordinates on both sides).
        up = F.interpolate(logits[None], size=hw, mode="bilinear", align_corners=False)
        return up[0].argmax(0)


TASK_CLASSES = {"alignment": AlignmentTask, "parsing": ParsingTask}
