"""Run a Pipeline over a GraphModule with instruments: timing, the verifier, dumps, reproducers.

Contracts (fxquant/analysis.py): before the first pass, every step's required analyses must be
provided by an earlier step or already be in `ctx.analyses` (else ConfigError naming the missing
pass and the fixed pipeline); after each pass, its declared analyses must be there, and when it
changed the graph, the analyses it does not preserve are invalidated.

Example:
    >>> import torch, fxquant
    >>> gm = fxquant.capture(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout()),
    ...                      (torch.randn(2, 4),))
    >>> pm = PassManager("cleanup,propagate-shapes")
    >>> gm = pm.run(gm, PassContext(example_inputs=(torch.randn(2, 4),)))
    >>> [t.name for t in pm.timings]
    ['cleanup', 'propagate-shapes']
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch.fx as fx

from . import ir
from .analysis import check_pipeline
from .dump import table_text, write_dumps
from .errors import FxQuantError, PassFailure, PipelineError
from .pipeline import Pipeline
from .registry import PassContext, PassResult

DUMP_MODES = ("all", "changed", "failure")


@dataclass
class PassTiming:
    name: str
    seconds: float
    changed: bool
    message: str


class PassManager:
    """Runs passes in order; verifies after each; dumps per `dump_mode`; writes a reproducer on failure."""

    def __init__(self, pipeline: Pipeline | str | list, dump_dir: str | os.PathLike | None = None,
                 dump_mode: str = "all", verify: bool = True):
        self.pipeline = Pipeline.coerce(pipeline)
        if dump_mode not in DUMP_MODES:
            raise PipelineError(f"dump_mode must be one of {DUMP_MODES}, got {dump_mode!r}")
        self.dump_dir = Path(dump_dir) if dump_dir else None
        self.dump_mode = dump_mode
        self.verify = verify
        self.timings: list[PassTiming] = []

    def check(self, ctx: PassContext | None = None) -> None:
        """ConfigError when a step needs an analysis that no earlier step (nor ctx.analyses) provides."""
        available = ctx.analyses.available() if ctx is not None else ()
        check_pipeline([(str(step), step.info.contract) for step in self.pipeline], available)

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
        self.check(ctx)
        staging = self._open_staging()
        ctx.dump_dir = self.dump_dir
        done: list[str] = []
        try:
            if staging is not None and self.dump_mode == "all":
                write_dumps(gm, staging, "00-captured")
            for index, step in enumerate(self.pipeline, start=1):
                before_code, before_table = gm.code, table_text(gm, include_get_attr=True)
                ctx.options = step.build_options()
                start = time.perf_counter()
                try:
                    result = step.info.fn(gm, ctx)
                    if not isinstance(result, PassResult):
                        raise TypeError(f"pass {step.name!r} returned {type(result).__name__}; "
                                        f"a pass must return fxquant.PassResult")
                    if result.graph_module is not None:
                        gm = result.graph_module
                    gm.recompile()
                    if self.verify:
                        ir.verify(gm)
                    self._settle_analyses(step, ctx, result.changed or gm.code != before_code)
                except FxQuantError as exc:
                    exc.add_note(f"raised by pass {step.name!r} (step {index} of '{self.pipeline}'); "
                                 f"passes before it: {', '.join(done) or 'none'}")
                    raise
                except Exception as exc:
                    repro = self._write_reproducer(before_table, before_code, step.name, index, exc)
                    raise PassFailure(
                        f"pass {step.name!r} (step {index} of pipeline '{self.pipeline}') raised "
                        f"{type(exc).__name__}: {exc}\n  passes before it: {', '.join(done) or 'none'}\n"
                        f"  reproducer (graph before the pass + pipeline text): {repro}") from exc
                seconds = time.perf_counter() - start
                self.timings.append(PassTiming(step.name, seconds, result.changed, result.message))
                done.append(step.name)
                if staging is not None and (self.dump_mode == "all" or
                                            (self.dump_mode == "changed" and result.changed)):
                    write_dumps(gm, staging, f"{index:02d}-{step.name}")
        except BaseException:
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)
            raise
        self._commit_staging(staging)
        return gm

    @staticmethod
    def _settle_analyses(step, ctx: PassContext, changed: bool) -> None:
        """Check the pass provided what it declared; invalidate what a graph change made stale."""
        contract = step.info.contract
        missing = [k.__name__ for k in contract.provides if ctx.analyses.cached(k) is None]
        if missing:
            raise PipelineError(f"pass {step.name!r} declares provides={missing} but did not store them; "
                                f"call ctx.analyses.set(...) in the pass")
        if changed:
            ctx.analyses.invalidate(step.name, contract.preserved)

    # -- dumps are staged in a hidden folder and moved into place only when the whole run succeeds
    def _open_staging(self) -> Path | None:
        if self.dump_dir is None or self.dump_mode == "failure":
            return None
        self.dump_dir.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=".staging-", dir=self.dump_dir))

    def _commit_staging(self, staging: Path | None) -> None:
        if staging is None:
            return
        for path in sorted(staging.iterdir()):
            os.replace(path, self.dump_dir / path.name)
        staging.rmdir()

    def _needed_from_before(self, index: int) -> str:
        """Analyses the steps from `index` on require but do not provide themselves (with their providers)."""
        provided, needed = set(), {}
        for step in list(self.pipeline)[index - 1:]:
            contract = step.info.contract
            needed.update({k: k.provider for k in contract.requires if k not in provided})
            provided |= set(contract.provides)
        return ", ".join(f"{k.__name__} ({p})" for k, p in needed.items())

    def _write_reproducer(self, table: str, code: str, name: str, index: int, exc: BaseException) -> Path:
        """A new folder: dump_dir/reproducer-NN-pass (a fresh suffix if taken), or a private mkdtemp one."""
        stem = f"reproducer-{index:02d}-{name}"
        if self.dump_dir is not None:
            self.dump_dir.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=".repro-", dir=self.dump_dir))
        else:
            tmp = Path(tempfile.mkdtemp(prefix=f"fxquant-{stem}-"))
        remaining = ",".join(str(s) for s in list(self.pipeline)[index - 1 :])
        (tmp / "pipeline.txt").write_text(f"{self.pipeline}\n")
        (tmp / "failing_pipeline.txt").write_text(f"{remaining}\n")
        (tmp / "graph_before.py").write_text(code)
        (tmp / "error.txt").write_text("".join(traceback.format_exception(exc)))
        (tmp / "graph_before.txt").write_text(table)
        needs = self._needed_from_before(index)
        (tmp / "README.txt").write_text(
            f"Pass {name!r} failed. graph_before.* is the graph it received; failing_pipeline.txt is the\n"
            f"pipeline from that pass on. Reproduce with fxquant.PassManager(failing_pipeline) on that graph"
            + (f",\nafter the passes that provide the analyses it needs: {needs}.\n" if needs else ".\n")
        )
        if self.dump_dir is None:
            return tmp  # mkdtemp made it ours alone
        for attempt in range(1000):
            final = self.dump_dir / (stem if attempt == 0 else f"{stem}-{attempt + 1}")
            try:
                os.mkdir(final)  # claims the name; never replaces a folder that exists
            except FileExistsError:
                continue
            os.rmdir(final)
            try:
                os.rename(tmp, final)  # fails rather than replacing if another process claimed it meanwhile
                return final
            except OSError:
                continue
        return tmp
