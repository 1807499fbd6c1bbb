"""Digit recognizer WER on held-out speakers: train on 5 FSDD speakers, test on the sixth, rotated.

Command (needs ../shared/data/fsdd; ~50-60 min wall at one thread on the shared 2-core machine):

    cd /work/main && OMP_NUM_THREADS=1 nice -n 10 python benchmarks/bench_digits_heldout.py

For each of the six FSDD speakers (`fxquant.datasets.heldout_speaker_folds`):
- train a fresh `DigitsCTC` (the committed digit model's architecture and recipe, scripts/train_digits.py:
  AdamW + one-cycle LR 3e-3, batch 32, on-the-fly augmented digit strings, SpecAugment) on the *train takes
  (5-49) of the other five speakers*, for `--steps` steps (default 300, a quarter of the committed model's
  1200, to keep the whole six-fold run under about 60 min wall at one thread on the shared machine);
- score it, fp32 and compiled with `fxquant.compile_lowbit` (W8A8, mixed avg 4 bits, mixed avg 3 bits; default
  `--target reference`, the kernels' exact semantics), calibrated on 32 untouched digit strings of the five
  training speakers only (train takes), on
  - "held-out": connected-digit strings made of *all 500 takes* of the held-out speaker, each take used exactly
    once (`digit_strings_covering`, 1-7 digits per string, no augmentation);
  - "seen": strings made of the test takes (0-4) of the five training speakers, each used once: same speakers
    as in training, unseen takes (the setting of the committed model's own WER table), for comparison at the
    same training budget.
WER is greedy CTC, batch 1 (no padding effects). The script writes benchmarks/DIGITS-HELDOUT.md (and .json)
itself, after every fold (so a partial run keeps what it measured): per-fold WER, the mean, median and pooled
WER over folds, training time and the load average. `--ckpt-dir DIR` keeps each fold's trained model and
reuses it on a re-run with the same training settings (e.g. when a compile failed mid-run).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch
from tabulate import tabulate

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

DEFAULT_VARIANTS = "fp32,W8A8,mixed-4.0,mixed-3.0"


def train_fold(builder, steps: int, args) -> tuple[torch.nn.Module, float, float]:
    """A fresh DigitsCTC trained on `builder`'s speakers (the scripts/train_digits.py recipe): model, wall s, CPU s."""
    from train_digits import train_step

    from fxquant.models.digits import BLANK, DigitsConfig, DigitsCTC

    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    gen = torch.Generator().manual_seed(args.seed + 1)
    model = DigitsCTC(DigitsConfig())
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=steps, pct_start=0.15)
    ctc = torch.nn.CTCLoss(blank=BLANK, zero_infinity=True)
    t0, c0 = time.time(), time.process_time()
    model.train()
    loss_sum = 0.0
    for step in range(steps):
        loss_sum += train_step(model, builder, rng, gen, args.batch_size, ctc, opt, sched)
        if (step + 1) % 100 == 0 or step + 1 == steps:
            print(f"  step {step + 1}/{steps} loss {loss_sum / 100:.4f} {time.time() - t0:.0f}s", file=sys.stderr,
                  flush=True)
            loss_sum = 0.0
    return model.eval(), time.time() - t0, time.process_time() - c0


def word_errors(module, strings, config) -> tuple[int, int]:
    from fxquant.models.digits import transcribe_batch
    from fxquant.wer import word_errors as count

    hyps = transcribe_batch(module, [w for w, _ in strings], config, batch_size=1)
    return count([r for _, r in strings], hyps)


def render(rows: list[dict], variants: list[str], meta: dict) -> str:
    """The markdown results file."""
    done = [r for r in rows if r.get("wer")]
    lines = [f"# Digit recognizer: WER on held-out speakers (leave one FSDD speaker out)", "",
             f"- Command: `{meta['command']}` (this file is written by that script; "
             f"{len(done)}/{meta['n_folds']} folds measured{'' if len(done) == meta['n_folds'] else ', run incomplete'})",
             f"- Machine: {meta['cpu']}, {meta['cores']} cores (shared with other jobs); torch {meta['torch']} at "
             f"{meta['threads']} thread(s), Python {meta['python']}; started {meta['date']}",
             f"- 1-minute load average per fold (before training -> after scoring): " +
             "; ".join(f"{r['held']}: {r['load_before']:.1f} -> {r['load_after']:.1f}" for r in done),
             f"- Training budget per fold: {meta['steps']} steps x batch {meta['batch_size']} "
             f"({meta['steps'] * meta['batch_size']} augmented strings), one-cycle LR {meta['lr']}, seed {meta['seed']}; "
             f"the committed digit model (fxquant/models/weights/digits.pt) had 1200 steps on all six speakers",
             f"- Compiled variants: `fxquant.compile_lowbit(..., target={meta['target']!r})`, calibrated on "
             f"{meta['calib']} strings of the training speakers' train takes",
             f"- Wall time: {meta.get('total_min', float('nan')):.1f} min in all; training "
             + ", ".join(f"{r['train_s'] / 60:.1f}" for r in done) + " min per fold", ""]
    for split, title in (("held", "Held-out speaker: all 500 takes of the speaker left out of training"),
                         ("seen", "Seen speakers: test takes 0-4 of the five training speakers (same models)")):
        lines += [f"## {title}", ""]
        body = []
        for r in done:
            words = r["words"][split]
            body.append([r["held"], r["strings"][split], words] +
                         [f"{100 * r['wer'][v][split][0] / words:.2f}" for v in variants])
        for label, fn in (("mean", statistics.mean), ("median", statistics.median)):
            if done:
                body.append([f"**{label}**", "", ""] + [
                    f"{fn([100 * r['wer'][v][split][0] / r['words'][split] for r in done]):.2f}" for v in variants])
        if done:
            errs = {v: sum(r["wer"][v][split][0] for r in done) for v in variants}
            words = sum(r["words"][split] for r in done)
            body.append(["**pooled**", sum(r["strings"][split] for r in done), words] +
                        [f"{100 * errs[v] / words:.2f}" for v in variants])
        lines += [tabulate(body, headers=["held-out speaker", "strings", "words"] + [f"{v} WER %" for v in variants],
                           tablefmt="github", disable_numparse=True), ""]
    lines += ["Rows are folds, named by the held-out speaker (the seen-speaker rows are scored by the same fold's "
              "model, on the other five speakers). mean / median = over the folds' WER; pooled = all word errors / "
              "all reference words.", ""]
    body = []
    for r in done:
        body.append([r["held"]] + [f"{r['bytes'][v] / 1024:.1f} KiB, {r['bits'][v]:.2f} b, {r['compile_s'][v]:.0f} s"
                                   for v in variants])
    lines += ["## Model size, average weight bits and compile time per fold", "",
              tabulate(body, headers=["held-out speaker"] + variants, tablefmt="github", disable_numparse=True), ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=300, help="training steps per fold (batch --batch-size)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--variants", default=DEFAULT_VARIANTS,
                    help="comma list: fp32 and fxquant.evaluate.FXQUANT_VARIANTS names (W8A8, W4, mixed-4.0, ...)")
    ap.add_argument("--target", default="reference", help="compile_lowbit target (reference or native)")
    ap.add_argument("--calib", type=int, default=32, help="calibration strings from the training speakers")
    ap.add_argument("--folds", default="", help="comma list of held-out speakers to run (default: all six)")
    ap.add_argument("--ckpt-dir", type=Path, default=None, help="keep / reuse each fold's trained model here")
    ap.add_argument("--out", default=str(HERE / "DIGITS-HELDOUT.md"), help="results file ('' = print only)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from harness import machine

    from fxquant.datasets import (DigitStringBuilder, digit_strings_covering, fsdd_speakers, heldout_speaker_folds,
                                  speaker_builder)
    from fxquant.evaluate import build_variant, weight_stats
    from fxquant.models import digits as dg

    variants = args.variants.split(",")
    t_start = time.time()
    meta = {**machine(), "threads": args.threads, "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
            "seed": args.seed, "target": args.target, "calib": args.calib}
    folds = heldout_speaker_folds(fsdd_speakers())
    if args.folds:
        wanted = args.folds.split(",")
        folds = [f for f in folds if f[1] in wanted]
        if len(folds) != len(wanted):
            raise SystemExit(f"unknown speakers in --folds {args.folds!r}")
    meta["n_folds"] = len(folds)
    train_all, test_all, every = DigitStringBuilder("train"), DigitStringBuilder("test"), DigitStringBuilder("all")
    rows: list[dict] = []
    for k, (train_speakers, held) in enumerate(folds):
        row = {"held": held, "train_speakers": train_speakers, "load_before": os.getloadavg()[0]}
        print(f"fold {k + 1}/{len(folds)}: train on {', '.join(train_speakers)}; hold out {held}", file=sys.stderr,
              flush=True)
        builder = speaker_builder(train_all, train_speakers)
        ckpt = None if args.ckpt_dir is None else (
            args.ckpt_dir / f"digits-heldout-{held}-s{args.steps}-b{args.batch_size}-seed{args.seed}.pt")
        if ckpt is not None and ckpt.is_file():
            model = dg.load_digits_model(ckpt)
            row["train_s"], row["train_cpu_s"] = model.meta["train_seconds"], model.meta["cpu_seconds"]
            row["reused_checkpoint"] = str(ckpt)
        else:
            model, row["train_s"], row["train_cpu_s"] = train_fold(builder, args.steps, args)
            if ckpt is not None:
                dg.save_digits_model(model, ckpt, meta={"train_seconds": row["train_s"], "cpu_seconds": row["train_cpu_s"],
                                                        "train_speakers": ",".join(train_speakers), "held": held})
        strings = {"held": digit_strings_covering(speaker_builder(every, [held]), seed=k),
                   "seen": digit_strings_covering(speaker_builder(test_all, train_speakers), seed=100 + k)}
        row["strings"] = {s: len(v) for s, v in strings.items()}
        row["words"] = {s: sum(len(r) for _, r in v) for s, v in strings.items()}
        rng = random.Random(1234 + k)
        calib_waves = [builder.sample(rng, augment=False)[0] for _ in range(args.calib)]
        calibration = [(dg.batch_features(calib_waves[i:i + 8], model.config)[0],)
                       for i in range(0, len(calib_waves), 8)]
        example = (calibration[0][0][:2],)
        row.update(wer={}, bytes={}, bits={}, compile_s={})
        for v in variants:
            module, secs = build_variant(v, model, example, calibration, target=args.target)
            row["wer"][v] = {s: word_errors(module, strings[s], model.config) for s in strings}
            row["bytes"][v], row["bits"][v] = weight_stats(module)
            row["compile_s"][v] = secs
            print(f"  {v}: held-out WER {100 * row['wer'][v]['held'][0] / row['words']['held']:.2f} %, seen "
                  f"{100 * row['wer'][v]['seen'][0] / row['words']['seen']:.2f} %", file=sys.stderr, flush=True)
        row["load_after"] = os.getloadavg()[0]
        rows.append(row)
        meta["total_min"] = (time.time() - t_start) / 60
        text = render(rows, variants, meta)
        if args.out:
            Path(args.out).write_text(text)
            Path(args.out).with_suffix(".json").write_text(json.dumps({"meta": meta, "folds": rows}, indent=1))
    print(text)
    if args.out:
        print(f"wrote {args.out} and {Path(args.out).with_suffix('.json').name}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
