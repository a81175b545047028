"""What differs between the two tasks: data, loss, and scoring at the original resolution."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .config import EvalConfig
from .datasets import read_aflw19, read_lapa
from .heads import heatmap_nll, soft_argmax
from .metrics import AFLW_NUM_POINTS, LAPA_CLASSES, alignment_metrics, parsing_metrics, update_confusion
from .transforms import IGNORE, AlignmentData, ParsingData, load_label


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

    def train_data(self):
        recs = read_aflw19(self.cfg.data, "train", self.tc)
        return AlignmentData(recs, self.size, self.mean, self.std, self.cfg.crop_scale, self.cfg.augment, self.cfg.seed)

    def test_records(self):
        recs = read_aflw19(self.cfg.data, self.cfg.eval_split, self.tc)
        return recs[: self.cfg.max_test] if self.cfg.max_test else recs

    def loss(self, model, batch, device):
        x, pts = batch["image"].to(device), batch["points"].to(device)
        hm = model(x)
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
        ds = AlignmentData(recs, self.size, self.mean, self.std, self.cfg.crop_scale)
        preds = np.zeros((len(recs), AFLW_NUM_POINTS, 2))
        for b in _loader(ds, self.cfg.eval_batch_size or self.cfg.batch_size, self.cfg.workers):
            with autocast():
                hm = model(b["image"].to(device))
            crop = soft_argmax(hm.float(), model.stride).double().cpu()
            inv = torch.linalg.inv(b["matrix"].double())
            # back to the original image: p = inv(M) [x, y, 1]
            orig = crop @ inv[:, :2, :2].transpose(1, 2) + inv[:, None, :2, 2]
            preds[b["index"].numpy()] = orig.numpy()
        gt = np.stack([r.landmarks for r in recs])
        boxes = np.stack([r.box for r in recs])
        m = alignment_metrics(preds, gt, boxes)
        frontal = np.array([r.visible.all() for r in recs])
        if self.cfg.eval_split == "test" and frontal.any():
            mf = alignment_metrics(preds[frontal], gt[frontal], boxes[frontal])
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

    def train_data(self):
        return ParsingData(read_lapa(self.cfg.data, "train"), self.size, self.mean, self.std,
                           self.cfg.augment, self.cfg.seed)

    def test_records(self):
        recs = read_lapa(self.cfg.data, self.cfg.eval_split)
        return recs[: self.cfg.max_test] if self.cfg.max_test else recs

    def loss(self, model, batch, device):
        x, y = batch["image"].to(device), batch["label"].to(device)
        logits = F.interpolate(model(x).float(), size=y.shape[-2:], mode="bilinear", align_corners=False)
        ce = F.cross_entropy(logits, y, ignore_index=IGNORE)
        return ce, {"ce": ce}

    @torch.no_grad()
    def evaluate(self, model, device, num_viz: int, autocast):
        recs = self.test_records()
        ds = ParsingData(recs, self.size, self.mean, self.std, with_label=False)
        conf = torch.zeros(len(LAPA_CLASSES), len(LAPA_CLASSES), dtype=torch.int64)
        viz = []
        for b in _loader(ds, self.cfg.eval_batch_size or self.cfg.batch_size, self.cfg.workers):
            with autocast():
                logits = model(b["image"].to(device))
            for j, i in enumerate(b["index"].tolist()):
                h, w = b["orig_size"][j].tolist()
                # The logit grid spans the whole squeezed image, so resizing it to (h, w) is the exact
                # inverse of the input resize (corner-aligned coordinates on both sides).
                up = F.interpolate(logits[j: j + 1].float(), size=(h, w), mode="bilinear", align_corners=False)
                pred = up[0].argmax(0).cpu()
                gt = torch.from_numpy(np.asarray(load_label(recs[i].label, (h, w)), np.int64))
                update_confusion(conf, pred, gt, ignore_index=IGNORE)
                if len(viz) < num_viz:
                    viz.append((recs[i].image, gt.numpy(), pred.numpy()))
        m = parsing_metrics(conf)
        m["num_images"] = len(recs)
        m["confusion"] = conf.tolist()
        return m, viz


TASK_CLASSES = {"alignment": AlignmentTask, "parsing": ParsingTask}
