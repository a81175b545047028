"""The offline downstream chain: synthetic AFLW-19 + LaPa -> fine-tune a pre-trained encoder and the
same architecture from scratch -> one table.

    python -m benchmarks.eval_chain --encoder RUN/encoder.safetensors --out DIR [--steps 300 --num 800 ...]

Both runs of a task share everything but the encoder weights: data, seed (so the head starts from the
same weights and sees the same batches), steps, schedule, input size. The scratch encoder takes its
architecture from the pre-trained encoder's encoder.json. Without --encoder the demo pre-training's
export (runs/demo/encoder.safetensors, where `python -m mcf_fast.pretrain` writes it) is used if
present; `--tiny-encoder` instead writes an untrained tiny encoder, which only checks that the chain
runs (its "pre-trained" row means nothing). Writes DIR/chain.json and DIR/chain.md and prints the table.
"""
from __future__ import annotations

import sys

if __name__ == "__main__" and not __package__:  # run as a file: the package's imports need `python -m`
    sys.stderr.write("error: run it as a module from the repository root: python -m benchmarks.eval_chain\n")
    raise SystemExit(2)

import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402

from .cli import Parser  # noqa: E402

DEMO_ENCODER = os.path.join("runs", "demo", "encoder.safetensors")
HEADLINE = {"alignment": ("nme_diag", "lower"), "parsing": ("f1_mean", "higher")}
EXTRA = {"alignment": ("nme_box", "nme_inter_ocular", "auc_box_7", "fr_box_7"), "parsing": ()}


def make_data(root: str, fmt: str, num: int, size: int, seed: int, generator: str) -> str:
    """Write one synthetic set with the project generator (or the eval tests' toy writer), once."""
    path = os.path.join(root, fmt)
    if os.path.exists(os.path.join(path, ".done")):
        return path
    use_project = generator == "project"
    if generator == "auto":
        try:
            import mcf_fast.data.formats  # noqa: F401
            use_project = True
        except ImportError:
            use_project = False
    if use_project:
        from mcf_fast.data.synthetic import main as synthetic
        if synthetic(["--out", path, "--num", str(num), "--size", str(size), "--format", fmt, "--seed", str(seed)]):
            raise SystemExit(f"writing the synthetic {fmt} set to {path} failed (see above)")
    else:
        from mcf_fast.eval import toydata
        if fmt == "aflw19":
            toydata.write_aflw19(path, num, size, seed, train_count=int(num * 0.8))
        else:
            toydata.write_lapa(path, {"train": int(num * 0.8), "val": max(1, num // 20),
                                      "test": num - int(num * 0.8)}, size, seed)
    open(os.path.join(path, ".done"), "w").close()
    return path


def tiny_encoder(out: str, img_size: int) -> str:
    import torch

    from mcf_fast.model.vit import VisionTransformer, save_encoder
    torch.manual_seed(12345)
    enc = VisionTransformer(img_size=img_size, patch_size=8, embed_dim=96, depth=4, num_heads=3)
    st, _ = save_encoder(enc, os.path.join(out, "tiny_encoder"))
    return st


def main(argv=None) -> int:
    ap = Parser(__doc__, "python -m benchmarks.eval_chain")
    ap.add_argument("--encoder", default="", help=f"pre-trained encoder.safetensors (default: {DEMO_ENCODER})")
    ap.add_argument("--tiny-encoder", action="store_true", help="smoke test: an untrained tiny encoder")
    ap.add_argument("--out", required=True)
    ap.add_argument("--data-dir", default="", help="where the synthetic sets go / are reused (default OUT/data)")
    ap.add_argument("--tasks", default="alignment,parsing")
    ap.add_argument("--num", type=int, default=800, help="faces per synthetic set")
    ap.add_argument("--size", type=int, default=96, help="synthetic image side")
    ap.add_argument("--img-size", type=int, default=0, help="network input (0 = the encoder's)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--protocol", choices=("simple", "farl"), default="simple",
                    help="simple = square-crop / resize-whole with the light head; farl = FaRL's")
    ap.add_argument("--lr", type=float, default=0.0, help="head lr (0 = the protocol's)")
    ap.add_argument("--head-width", type=int, default=0, help="head channels (0 = the protocol's)")
    ap.add_argument("--freeze-backbone", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--generator", choices=("auto", "project", "toy"), default="auto")
    a = ap.parse_args(argv)

    os.makedirs(a.out, exist_ok=True)
    enc = a.encoder or (DEMO_ENCODER if os.path.exists(DEMO_ENCODER) else "")
    if a.tiny_encoder:
        enc = tiny_encoder(a.out, a.img_size or 64)
    if not enc:
        ap.error(f"no --encoder given and {DEMO_ENCODER} does not exist; run `python -m mcf_fast.pretrain "
                 "--out /work/runs/demo` first, or pass --tiny-encoder for a smoke test")
    arch_json = os.path.join(os.path.dirname(os.path.abspath(enc)) if not os.path.isdir(enc) else enc, "encoder.json")

    from mcf_fast.eval.config import EvalConfig
    from mcf_fast.eval.train import run

    rows, results = [], {}
    for task in [t.strip() for t in a.tasks.split(",") if t.strip()]:
        fmt = "aflw19" if task == "alignment" else "lapa"
        data = make_data(a.data_dir or os.path.join(a.out, "data"), fmt, a.num, a.size, a.seed, a.generator)
        for name, encoder, arch in (("pretrained", enc, ""), ("scratch", "random", arch_json)):
            proto = a.protocol if a.protocol == "farl" else ("square-crop" if task == "alignment" else "resize-whole")
            cfg = EvalConfig(task=task, data=data, encoder=encoder, arch=arch, out=os.path.join(a.out, task, name),
                             protocol=proto,
                             img_size=a.img_size, batch_size=a.batch_size, max_steps=a.steps, lr=a.lr,
                             freeze_backbone=a.freeze_backbone, head_width=a.head_width, seed=a.seed,
                             workers=a.workers, device=a.device, progress=False,
                             ckpt_every=max(50, a.steps // 4), log_every=max(1, a.steps // 50))
            t0 = time.time()
            m = run(cfg)
            results[f"{task}/{name}"] = {**m, "wall_s": round(time.time() - t0, 1)}
        key, better = HEADLINE[task]
        p, s = results[f"{task}/pretrained"], results[f"{task}/scratch"]
        wins = p[key] < s[key] if better == "lower" else p[key] > s[key]
        rows.append((task, key, p[key], s[key], "yes" if wins else "NO", p["wall_s"], s["wall_s"]))
        for k in EXTRA[task]:
            rows.append((task, k, p[k], s[k], "", "", ""))

    import torch
    dev = "cuda: " + torch.cuda.get_device_name(0) if torch.cuda.is_available() and a.device != "cpu" else \
        f"cpu ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"
    lines = [f"encoder: {os.path.abspath(enc)}; protocol {a.protocol}; steps {a.steps}, batch {a.batch_size}, "
             f"lr {a.lr or 'the protocol default'}, "
             f"{a.num} faces/set at {a.size}px, seed {a.seed}, freeze_backbone {a.freeze_backbone}; device {dev}", "",
             "| task | metric | pre-trained | scratch | pre-trained better | time pre-trained (s) | time scratch (s) |",
             "| --- | --- | ---: | ---: | :---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r[0]} | {r[1]} | {r[2]:.4f} | {r[3]:.4f} | {r[4]} | {r[5]} | {r[6]} |")
    table = "\n".join(lines)
    print(table)
    with open(os.path.join(a.out, "chain.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(a.out, "chain.json"), "w") as f:
        json.dump({"args": vars(a), "encoder": os.path.abspath(enc), "device": dev, "results": results}, f, indent=2,
                  default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
