"""Compile time, load time and resident memory: issue 12's "Done when" items, each measured in a fresh process.

    python benchmarks/bench_compile.py                          # everything, tiny.en (several minutes)
    python benchmarks/bench_compile.py --quick --artifact DIR   # reuse a compiled Whisper artifact, skip (c)
    python benchmarks/bench_compile.py --models whisper-tiny.en,whisper-base --parts c,d

Parts (--parts, default all):
  a  six nn.Linear(4096, 4096) compiled by compile_lowbit(bits=4) with a cold kernel cache (a fresh
     FXQUANT_CACHE_DIR per round): compile seconds and the per-pass times the compiled module records
     (CompiledModule.timings, the table of `report(passes=True)`); then cm.save().
  b  that artifact loaded by fxquant.load in a fresh process (same kernel cache) and called once: load seconds
     and resident growth (VmRSS after the call - VmRSS before the load) vs the packed weight bytes.
  c  `fxquant compile MODEL --avg-bits 4 --out D`: wall time and peak RSS of the whole process, per --models.
  d  `fxquant transcribe F --artifact D`: one LJ Speech file, whole process (start-up, load, transcribe).
  e  peak RSS (the child's ru_maxrss) of `fxquant transcribe F1..FN --artifact D --batch-size B` vs CTranslate2
     int8 on the same files and checkpoint at the same batch size, B = 8 and 1 (benchmarks/bench_transcribe.py's
     CT2_SCRIPT: numpy features, no torch).
Every child runs at --threads (torch.set_num_threads / OMP_NUM_THREADS / intra_threads). Medians over --rounds
fresh processes. Writes benchmarks/COMPILE.md and COMPILE.json (goal / measured / met, load averages).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

HERE = Path(__file__).resolve().parent
N_LINEAR, WIDTH = 6, 4096
WHISPER_GOAL_S = {"whisper-tiny.en": 60.0, "whisper-base": 120.0}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="a,b,c,d,e", help="which measurements (a-e, see above)")
    p.add_argument("--models", default="whisper-tiny.en", help="Whisper models for c-e (first one for d, e)")
    p.add_argument("--artifact", help="use this compiled Whisper artifact for d and e (skips c)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=0, help="fresh processes per figure (default 3, --quick 1)")
    p.add_argument("--files", type=int, default=0, help="LJ Speech files for e (default 24, --quick 8)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--work", default=None, help="scratch folder (default: a new temporary folder)")
    p.add_argument("--out", default=str(HERE / "COMPILE.md"))
    p.add_argument("--child", nargs=2, metavar=("KIND", "DIR"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.files = args.files or (8 if args.quick else 24)
    bad = set(args.parts.split(",")) - set("abcde")
    if bad:
        p.error(f"unknown parts {sorted(bad)}; choose from a,b,c,d,e")
    return args


# -- children -----------------------------------------------------------------------------------------------
def _vmrss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def child(kind: str, folder: Path, threads: int) -> None:
    import torch

    import fxquant

    torch.set_num_threads(threads)
    x = torch.randn(1, WIDTH, generator=torch.Generator().manual_seed(1))
    if kind == "compile":
        torch.manual_seed(0)
        model = torch.nn.Sequential(*[torch.nn.Linear(WIDTH, WIDTH) for _ in range(N_LINEAR)]).eval()
        start = time.perf_counter()
        cm = fxquant.compile_lowbit(model, (x,), bits=4)
        compile_s = time.perf_counter() - start
        start = time.perf_counter()
        cm.save(folder)
        s = cm.summary()
        harness.print_result({"compile_s": compile_s, "save_s": time.perf_counter() - start,
                              "passes": {t.name: t.seconds for t in cm.timings}, "packed_bytes": s["model_bytes"],
                              "resident_bytes": s.get("resident_bytes")})
    else:
        rss0 = _vmrss_mib()
        start = time.perf_counter()
        m = fxquant.load(folder)
        load_s = time.perf_counter() - start
        with torch.no_grad():
            m(x)
        harness.print_result({"load_s": load_s, "call_s": time.perf_counter() - start - load_s,
                              "rss_before_mib": rss0, "rss_growth_mib": _vmrss_mib() - rss0})


# -- parent -------------------------------------------------------------------------------------------------
class Runner:
    """Runs children, keeps every result and the load average around each block."""

    def __init__(self, args, work: Path):
        self.args, self.work, self.raw, self.conditions = args, work, {}, []
        self.env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
        self.me = [sys.executable, str(Path(__file__).resolve())]
        self.fxq = [sys.executable, "-m", "fxquant.cli"]

    def block(self, name: str, fn):
        cond = harness.Condition(self.args.threads, False, harness.load_average(), wait_policy=harness.wait_policies())
        print(f"[{name}] load {cond.load_before:.2f} ...", file=sys.stderr, flush=True)
        out = fn()
        cond.load_after = harness.load_average()
        self.conditions.append(cond)
        self.raw[name] = {"load": [cond.load_before, cond.load_after], "result": out}
        print(f"[{name}] {json.dumps(out, default=str)[:400]}", file=sys.stderr, flush=True)
        return out

    def run(self, cmd, env=None, check=True) -> harness.Child:
        c = harness.run_child(cmd, env=env or self.env, cwd=self.work)  # not the checkout: PYTHONPATH wins
        if check and c.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd[:6])} ... failed ({c.returncode}):\n{c.stderr[-3000:]}")
        return c

    def linear(self) -> tuple[list, list]:
        """Parts a and b: rounds x (cold compile + save, then fresh-process load)."""
        comp, load = [], []
        for r in range(self.args.rounds):
            cache, folder = self.work / f"kcache{r}", self.work / f"six-linear{r}"
            env = dict(self.env, FXQUANT_CACHE_DIR=str(cache))
            comp.append(self.run([*self.me, "--child", "compile", str(folder), "--threads", str(self.args.threads)],
                                 env).result())
            if "b" in self.args.parts:
                load.append(self.run([*self.me, "--child", "load", str(folder), "--threads",
                                      str(self.args.threads)], env).result())
            shutil.rmtree(cache, ignore_errors=True)
        return comp, load

    def whisper_compile(self, model: str) -> dict:
        out = self.work / f"{model}-avg4"
        c = self.run([*self.fxq, "compile", model, "--avg-bits", "4", "--out", str(out)])
        return {"seconds": c.seconds, "peak_rss_mib": c.peak_rss_mib, "artifact": str(out)}

    def transcribe_one(self, artifact: str, path: str) -> dict:
        runs = [self.run([*self.fxq, "transcribe", path, "--artifact", artifact, "--format", "tsv"])
                for _ in range(self.args.rounds)]
        return {"seconds": [c.seconds for c in runs], "peak_rss_mib": [c.peak_rss_mib for c in runs],
                "text": runs[-1].stdout.strip()}

    def peak_rss(self, artifact: str, model: str, files: list[str]) -> dict:
        from bench_transcribe import CT2_SCRIPT

        from fxquant.models.whisper_ckpt import resolve_model_dir

        cmds = {}
        for batch in (8, 1):
            cmds[f"fxquant (artifact, batch {batch})"] = [*self.fxq, "transcribe", *files, "--artifact", artifact,
                                                          "--format", "tsv", "--batch-size", str(batch)]
            cmds[f"ct2-int8 (batch {batch})"] = [sys.executable, "-c", CT2_SCRIPT, str(self.args.threads), str(batch),
                                                 str(resolve_model_dir(model)), *files]
        out = {}
        for name, cmd in cmds.items():
            c = self.run(cmd)
            out[name] = {"peak_rss_mib": c.peak_rss_mib, "seconds": c.seconds, "lines": len(c.stdout.splitlines())}
        return out


def main(args) -> None:
    from tabulate import tabulate

    from fxquant.asr.data import ljspeech

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="fxquant-bench-compile-"))
    work.mkdir(parents=True, exist_ok=True)
    run, parts, rows = Runner(args, work), set(args.parts.split(",")), []
    models = args.models.split(",")
    med = statistics.median

    def load_of(name):
        a, b = run.raw[name]["load"]
        return f"{a:.1f} -> {b:.1f}"

    if parts & {"a", "b"}:
        comp, load = run.block("six-linear", run.linear)
        packed = comp[0]["packed_bytes"] / 2**20
        passes = {k: med([c["passes"][k] for c in comp]) for k in comp[0]["passes"]}
        cs = med([c["compile_s"] for c in comp])
        passes["capture and the rest"] = cs - sum(passes.values())
        top = ", ".join(f"{k} {v:.2f}" for k, v in sorted(passes.items(), key=lambda kv: -kv[1])[:5])
        rows.append(["a", f"compile_lowbit({N_LINEAR} x Linear({WIDTH}, {WIDTH}), bits=4), cold kernel cache, s",
                     "<= 5", f"{cs:.1f} (passes, s: {top}; save {med([c['save_s'] for c in comp]):.1f})",
                     cs <= 5, load_of("six-linear")])
        if load:
            grow, goal = med([x["rss_growth_mib"] for x in load]), 1.5 * packed + 64
            load_s, call_s = med([x["load_s"] for x in load]), med([x["call_s"] for x in load])
            rows.append(["b", f"RSS growth after fxquant.load + one call, MiB ({packed:.1f} MiB packed)",
                         f"<= {goal:.0f}", f"{grow:.0f} ({grow / packed:.1f}x packed; load {load_s:.2f} s, call "
                         f"{call_s:.2f} s)", grow <= goal, load_of("six-linear")])
    artifact = args.artifact
    if "c" in parts and not args.artifact:
        for model in models:
            r = run.block(f"compile {model}", lambda m=model: run.whisper_compile(m))
            artifact = artifact or r["artifact"]
            rows.append(["c", f"`fxquant compile {model} --avg-bits 4 --out D`, s", f"<= {WHISPER_GOAL_S.get(model)}",
                         f"{r['seconds']:.1f} (peak RSS {r['peak_rss_mib']:.0f} MiB)",
                         r["seconds"] <= WHISPER_GOAL_S.get(model, float("inf")), load_of(f"compile {model}")])
    if parts & {"d", "e"} and artifact is None:
        raise SystemExit("parts d and e need a compiled Whisper artifact: run part c or pass --artifact DIR")
    lj = [str(u.path) for u in ljspeech(args.files)]
    if "d" in parts:
        r = run.block("transcribe one", lambda: run.transcribe_one(artifact, lj[0]))
        s = med(r["seconds"])
        rows.append(["d", f"`fxquant transcribe F --artifact D`, whole process, s ({Path(lj[0]).name})", "<= 5",
                     f"{s:.2f} (peak RSS {med(r['peak_rss_mib']):.0f} MiB)", s <= 5, load_of("transcribe one")])
    if "e" in parts:
        r = run.block("peak rss", lambda: run.peak_rss(artifact, models[0], lj))
        for batch in (8, 1):
            ours, ct2 = r[f"fxquant (artifact, batch {batch})"], r[f"ct2-int8 (batch {batch})"]
            rows.append(["e", f"peak RSS transcribing {len(lj)} LJ files, MiB, batch {batch}",
                         f"<= CT2 int8 batch {batch} ({ct2['peak_rss_mib']:.0f})", f"{ours['peak_rss_mib']:.0f} "
                         f"({ours['seconds']:.1f} s; CT2 {ct2['seconds']:.1f} s)",
                         ours["peak_rss_mib"] <= ct2["peak_rss_mib"], load_of("peak rss")])
    table = tabulate([[*r[:4], "yes" if r[4] else "no", r[5]] for r in rows],
                     ["part", "figure", "goal", "measured", "met", "load"], tablefmt="github")
    span = harness.Condition(args.threads, False, run.conditions[0].load_before, run.conditions[-1].load_after,
                             run.conditions[0].wait_policy)
    text = harness.header("Compile time, load time and resident memory (issue 12)", [span],
                          times=f"Each figure: median over {args.rounds} fresh process(es) (c and e: one run); "
                                f"{args.threads} threads; artifact for d, e: {artifact or '-'}; the load column "
                                f"is the 1-minute load average before -> after that block.")
    text += "\n" + table + "\n"
    print(text)
    harness.write_results(Path(args.out), text, {"machine": harness.machine(), "args": vars(args), "raw": run.raw})
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    ARGS = parse_args()
    if ARGS.child:
        child(ARGS.child[0], Path(ARGS.child[1]), ARGS.threads)
    else:
        main(ARGS)
