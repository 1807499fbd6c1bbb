"""Train the connected-digit CTC recognizer (fxquant.models.digits) on FSDD digit strings.

Command (the committed checkpoint):
    python scripts/train_digits.py --epochs 12 --seed 0 --out fxquant/models/weights/digits.pt
Result (seed 0): 573,259 params, fp32 test WER 1.17 % (14 edits / 1198 words, 300 strings);
train time 39.6 min wall with 1 thread on the shared 2-core machine under load average ~5 (~27 min
of CPU); about 0.75-0.9 s per step uncontended, i.e. ~15-18 min for the 1200 steps.

Training strings are generated on the fly from FSDD train takes 5-49 (1-7 digits of one speaker,
speed/gain/noise augmentation, light SpecAugment); the test WER is measured on
`digit_test_set(300, seed=0)` (test takes 0-4 only, no augmentation). CPU only, --threads (default 1).
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fxquant.datasets import DigitStringBuilder, digit_test_set  # noqa: E402
from fxquant.models.digits import (BLANK, VOCAB, DigitsConfig, DigitsCTC, batch_features,  # noqa: E402
                                   save_digits_model, transcribe_batch)
from fxquant.wer import wer  # noqa: E402


def spec_augment(feats: torch.Tensor, lengths: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Two frequency masks (<= 8 bands) and two time masks (<= 6 frames) per utterance, in place."""
    n_mels = feats.shape[1]
    for i in range(feats.shape[0]):
        for _ in range(2):
            w = int(torch.randint(0, 9, (), generator=gen))
            f0 = int(torch.randint(0, n_mels - w + 1, (), generator=gen))
            feats[i, f0:f0 + w, :] = 0.0
            w = int(torch.randint(0, 7, (), generator=gen))
            t0 = int(torch.randint(0, max(1, int(lengths[i]) - w), (), generator=gen))
            feats[i, :, t0:t0 + w] = 0.0
    return feats


def train_step(model, builder, rng, gen, batch_size: int, ctc, opt, sched) -> float:
    """One CTC step on a fresh batch of augmented digit strings (SpecAugment, clipped gradients); the loss."""
    batch = [builder.sample(rng, augment=True) for _ in range(batch_size)]
    feats, lengths = batch_features([w for w, _ in batch])
    feats = spec_augment(feats, lengths, gen)
    targets = torch.tensor([VOCAB.index(word) for _, words in batch for word in words])
    target_lengths = torch.tensor([len(words) for _, words in batch])
    log_probs = model(feats)                                   # (B, T', V)
    loss = ctc(log_probs.transpose(0, 1), targets, model.output_lengths(lengths), target_lengths)
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
    opt.step()
    sched.step()
    return float(loss.detach())


def evaluate(model, test_set) -> float:
    model.eval()
    hyps = transcribe_batch(model, [w for w, _ in test_set], batch_size=1)
    return wer([r for _, r in test_set], hyps)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--steps-per-epoch", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--weight-decay", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--channels", type=int, default=DigitsConfig.channels)
    p.add_argument("--test-strings", type=int, default=300)
    p.add_argument("--out", type=Path, default=Path("fxquant/models/weights/digits.pt"))
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    gen = torch.Generator().manual_seed(args.seed + 1)
    t_start, cpu_start = time.time(), time.process_time()
    builder = DigitStringBuilder("train")
    test_set = digit_test_set(args.test_strings, seed=0)
    model = DigitsCTC(DigitsConfig(channels=args.channels))
    n_params = sum(p.numel() for p in model.parameters())
    print(f"params: {n_params}, vocab: {VOCAB}", flush=True)
    total_steps = args.epochs * args.steps_per_epoch
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=total_steps, pct_start=0.15)
    ctc = torch.nn.CTCLoss(blank=BLANK, zero_infinity=True)

    for epoch in range(args.epochs):
        model.train()
        t_epoch, loss_sum = time.time(), 0.0
        for _ in range(args.steps_per_epoch):
            loss_sum += train_step(model, builder, rng, gen, args.batch_size, ctc, opt, sched)
        quick = evaluate(model, test_set[:50])
        print(f"epoch {epoch + 1}/{args.epochs} loss {loss_sum / args.steps_per_epoch:.4f} "
              f"WER(50 test strings) {100 * quick:.2f}% {time.time() - t_epoch:.0f}s", flush=True)

    train_time, cpu_time = time.time() - t_start, time.process_time() - cpu_start
    test_wer = evaluate(model, test_set)
    n_words = sum(len(r) for _, r in test_set)
    summary = (f"params {n_params}, test WER {100 * test_wer:.2f}% on {len(test_set)} strings "
               f"({n_words} words), train time {train_time / 60:.1f} min wall / {cpu_time / 60:.1f} min CPU "
               f"with {args.threads} thread(s)")
    print(summary, flush=True)
    save_digits_model(
        model,
        args.out,
        meta={
            "test_wer": test_wer,
            "train_seconds": train_time,
            "cpu_seconds": cpu_time,
            "params": n_params,
            "argv": " ".join(sys.argv[1:]),
        },
    )
    print(f"saved {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
