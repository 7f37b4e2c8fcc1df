"""MetaSchedule's own search space for `convgen tune --method meta|both` (CPU).

TVM 0.27's MetaSchedule, set up for a 2-core build machine:

  * `tvm.s_tir.tensor_intrin` is imported by every TuneContext and every stock
    builder worker (seconds each: the stock LocalBuilder timed out on most
    candidates on 2 cores). float32 convolutions never tensorize, so the package is
    stubbed and only its x86 part loaded (0.1 s), and candidates are built in
    this process without that import.
  * Candidates are measured in this process too, one at a time, after the batch
    is built (no cloudpickle worker pool; nothing else compiles meanwhile).
  * The database is a JSONDatabase in the work dir, appended after every batch:
    rerunning the same command resumes without re-measuring, and Ctrl-C (or the
    time budget) ends the run after the batch in flight, whose results are kept.
  * The cost model is XGBoost when installed (trained on stored records when
    resuming), else random: the evolutionary search is then a random search
    that never measures a schedule twice.

MetaSchedule's space needs many more trials than convgen's template grid to
reach the same speed (benchmarks/NOTES.md), so the grid runs first and this
space is an extra that must beat it to win the record. Its best trace is then
timed by the grid's own measurement (a median), so the two compare like with
like: MetaSchedule's run_secs are means of a differently configured evaluator.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
import signal
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any

import numpy as np

from convgen.compiler.schedule.trace import workload
from convgen.compiler.targets import TargetInfo
from convgen.runtime.cores import available_cores
from convgen.runtime.timing import gflops
from convgen.spec import ConvSpec


def _light_tensor_intrin() -> None:
    """Make `import tvm.s_tir.tensor_intrin` a no-op, then load just its x86 part."""
    name = "tvm.s_tir.tensor_intrin"
    if name in sys.modules:
        return
    found = importlib.util.find_spec(name)  # locates the package without running it
    assert found is not None and found.submodule_search_locations is not None
    pkg = types.ModuleType(name)
    pkg.__path__ = list(found.submodule_search_locations)
    pkg.__spec__ = found
    sys.modules[name] = pkg
    importlib.import_module(name + ".x86")


def _plain(obj: Any) -> Any:
    """Trace JSON holds TVM IntImm/FloatImm: turn them into Python numbers."""
    import tvm

    if isinstance(obj, (list, tuple)):
        return [_plain(x) for x in obj]
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, tvm.tirx.IntImm):
        return int(obj.value)
    if isinstance(obj, tvm.tirx.FloatImm):
        return float(obj.value)
    return obj


def _builder_class() -> Any:
    """A PyBuilder that builds every candidate in this process (see the module doc)."""
    import tvm
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.builder import BuilderResult, PyBuilder

    @derived_object
    class InProcessBuilder(PyBuilder):
        def build(self, build_inputs: list[Any]) -> list[Any]:
            from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock
            from tvm.support.tar import tar

            results = []
            for inp in build_inputs:
                try:
                    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(inp.mod)
                    lib = tvm.tirx.build(mod, target=inp.target)
                    path = os.path.join(tempfile.mkdtemp(prefix="convgen_ms_"),
                                        "tvm_tmp_mod." + tar.output_format)
                    lib.export_library(path, fcompile=tar)
                    results.append(BuilderResult(path, None))
                except Exception as err:  # a failed candidate: infinitely slow, run goes on
                    results.append(BuilderResult(None, f"build: {err}"))
            return results

    return InProcessBuilder


def _runner_class() -> Any:
    """A PyRunner that measures the built candidates in this process, one at a time."""
    import tvm
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.runner import PyRunner

    @derived_object
    class InProcessRunner(PyRunner):
        def __init__(self, config: Any) -> None:
            super().__init__()
            self.config = config

        def run(self, runner_inputs: list[Any]) -> list[Any]:
            from tvm.s_tir.meta_schedule.runner.local_runner import (
                LocalRunnerFuture,
                default_alloc_argument,
            )
            from tvm.s_tir.meta_schedule.runner.utils import run_evaluator_common

            dev = tvm.cpu(0)
            futures = []
            for inp in runner_inputs:
                try:
                    rt_mod = tvm.runtime.load_module(str(inp.artifact_path))
                    args = default_alloc_argument(
                        dev, tuple(a.as_json() for a in inp.args_info), 1)
                    costs = run_evaluator_common(rt_mod, dev, self.config, args)
                    futures.append(LocalRunnerFuture(res=costs))
                except Exception as err:
                    futures.append(LocalRunnerFuture(error_message=f"run: {err}"))
            return futures

    return InProcessRunner


def _budget_class() -> Any:
    """A measure callback: progress after every batch, and an end at the deadline or on
    Ctrl-C."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback

    @derived_object
    class Budget(PyMeasureCallback):
        """After every measured batch: progress, and an end at the deadline or on Ctrl-C
        (the batch in flight is kept). Never on the last batch: the scheduler ends
        that task itself, and ending it twice fails an internal check."""

        def __init__(self, spec: ConvSpec, max_trials: int, deadline: float | None,
                     progress: Any) -> None:
            self.spec, self.max_trials, self.deadline = spec, max_trials, deadline
            self.progress = progress
            self.trials, self.best = 0, math.inf
            self.interrupted = False
            self._old = signal.signal(signal.SIGINT, self._on_sigint)

        def _on_sigint(self, *_: Any) -> None:
            self.interrupted = True
            signal.signal(signal.SIGINT, signal.default_int_handler)  # twice: abort now

        def restore(self) -> None:
            signal.signal(signal.SIGINT, self._old)

        def apply(self, scheduler: Any, task_id: int, candidates: Any, builds: Any,
                  runs: Any) -> None:
            for b, r in zip(builds, runs):
                if not b.error_msg and not r.error_msg and r.run_secs:
                    self.best = min(self.best, float(np.median([float(s) for s in r.run_secs])))
            self.trials += len(candidates)
            if self.progress:
                self.progress(self.spec, self.trials, self.max_trials,
                              gflops(self.spec.flops, self.best))
            over = self.deadline is not None and time.monotonic() > self.deadline
            last = self.trials >= self.max_trials
            task = scheduler.tasks_[task_id]
            if (over or self.interrupted) and not last and not task.is_terminated:
                scheduler.terminate_task(task_id)

    return Budget


def tune_meta_schedule(
    spec: ConvSpec, target: TargetInfo, trials: int, work_dir: Path,
    deadline: float | None = None, progress: Any = None,
) -> tuple[list[Any] | None, bool]:
    """Search MetaSchedule's own space. Returns (the best trace as plain JSON or None,
    interrupted); the caller times it as it times grid candidates."""
    _light_tensor_intrin()
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.runner import EvaluatorConfig

    builder_cls, runner_cls, budget_cls = _builder_class(), _runner_class(), _budget_class()
    work_dir.mkdir(parents=True, exist_ok=True)
    mod = workload(spec, target)  # the module traces replay onto (compiler.schedule.trace)
    database = ms.database.JSONDatabase(work_dir=str(work_dir))
    ctx = ms.TuneContext(
        mod=mod, target=target.tvm_target(), space_generator=ms.space_generator.PostOrderApply(),
        # a smaller population than the default 512: the search itself competes with
        # measuring for the same 2 cores
        search_strategy=ms.search_strategy.EvolutionarySearch(
            population_size=128, init_min_unmeasured=32, genetic_num_iters=2),
        task_name="conv", num_threads=available_cores(),
    ).clone()
    try:
        import xgboost  # noqa: F401

        cost_model: Any = ms.cost_model.XGBModel(num_warmup_samples=16)
        stored = database.get_all_tuning_records()
        if stored:  # a resumed run: start from what was measured
            from tvm.s_tir.meta_schedule.runner import RunnerResult

            cost_model.update(ctx, [r.as_measure_candidate() for r in stored],
                              [RunnerResult(r.run_secs, None if r.run_secs else "failed")
                               for r in stored])
    except ImportError:
        cost_model = ms.cost_model.RandomModel()
    budget = budget_cls(spec, trials, deadline, progress)
    evaluator = EvaluatorConfig(number=3, repeat=3, min_repeat_ms=50,
                                enable_cpu_cache_flush=False)
    try:
        ms.tune.tune_tasks(
            tasks=[ctx], task_weights=[1.0], work_dir=str(work_dir),
            max_trials_global=trials, max_trials_per_task=trials,
            num_trials_per_iter=min(16, trials), builder=builder_cls(),
            runner=runner_cls(evaluator), database=database, cost_model=cost_model,
            measure_callbacks=[*ms.measure_callback.MeasureCallback.create("default"), budget],
            task_scheduler="round-robin",
        )
    except (KeyboardInterrupt, RuntimeError) as err:  # a second Ctrl-C lands as either
        if not budget.interrupted and not isinstance(err, KeyboardInterrupt):
            raise
        budget.interrupted = True
    finally:
        budget.restore()
    top = database.get_top_k(database.commit_workload(mod), 1)
    if not top:
        return None, budget.interrupted
    return _plain(top[0].trace.as_json(remove_postproc=False)), budget.interrupted
