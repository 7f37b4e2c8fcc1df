"""The record library and tuning runs: round trip, atomic writes, corrupt files,
exact matching, resume and Ctrl-C."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from convgen.compiler.build import build_artifact
from convgen.compiler.records import (
    Record,
    RecordedSchedule,
    RecordError,
    find_record,
    read_record,
    record_spec,
    write_record,
)
from convgen.compiler.schedule import schedule_for
from convgen.spec import make_spec
from convgen.tuning.grid import TuneOptions, candidates_for, tune_specs

SPEC = make_spec(mode="conv", input="1x8x12x16", kernel="16x8x3x3", padding=1)


def _record(spec, target):
    import tvm

    return Record(record_spec(spec, target), target.key(), tvm.__version__,
                  RecordedSchedule("cpu_wvec", {"lanes": 8, "kb": 4}),
                  {"gflops": 1.0}, {"method": "test"})


def test_record_round_trip_and_atomic_write(tmp_path, cpu_target):
    rec = _record(SPEC, cpu_target)
    path = write_record(rec, tmp_path)
    assert path == tmp_path / cpu_target.key() / f"{record_spec(SPEC, cpu_target).name()}.json"
    assert read_record(path) == rec
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left
    assert find_record(SPEC, cpu_target, tmp_path) == rec


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"format": "other"}',
                                     '{"format": "convgen-record", "spec": {}}'])
def test_corrupt_record_is_a_clear_error(tmp_path, cpu_target, content):
    path = tmp_path / cpu_target.key() / f"{record_spec(SPEC, cpu_target).name()}.json"
    path.parent.mkdir(parents=True)
    path.write_text(content)
    with pytest.raises(RecordError, match=r"^record: .*" + record_spec(SPEC, cpu_target).name()):
        find_record(SPEC, cpu_target, tmp_path)


def test_record_for_other_tvm_or_spec_is_ignored(tmp_path, cpu_target):
    rec = _record(SPEC, cpu_target)
    path = write_record(rec, tmp_path)
    data = json.loads(path.read_text())
    data["tvm_version"] = "0.1.0"
    path.write_text(json.dumps(data))
    assert find_record(SPEC, cpu_target, tmp_path) is None


def test_build_uses_the_record(tmp_path, cpu_target, monkeypatch):
    write_record(_record(SPEC, cpu_target), tmp_path / "lib")
    art = build_artifact(SPEC, cpu_target, tmp_path / "out", verify=True,
                         library=tmp_path / "lib")
    sched = art.manifest.schedule
    assert sched.kind == "record" and sched.knobs == {"lanes": 8, "kb": 4}
    assert sched.record == f"{cpu_target.key()}/{record_spec(SPEC, cpu_target).name()}.json"
    assert art.manifest.verification.passed
    # the environment variable names a library too
    monkeypatch.setenv("CONVGEN_SCHEDULES", str(tmp_path / "lib"))
    assert schedule_for(SPEC, cpu_target)[1].kind == "record"
    # without a record: the template heuristic
    _, choice = schedule_for(SPEC, cpu_target, library=tmp_path / "empty")
    assert choice.kind == "heuristic"


def test_cpu_modes_share_one_record(tmp_path, cpu_target):
    """On CPU conv's flip is packed into the weights, so the bound kernels of both modes
    run the same code: one record (kept under corr) serves both, and tuning both modes
    measures it once."""
    corr = dataclasses.replace(SPEC, mode="corr")
    assert record_spec(SPEC, cpu_target) == record_spec(corr, cpu_target) == corr
    write_record(_record(corr, cpu_target), tmp_path)
    assert find_record(SPEC, cpu_target, tmp_path) == find_record(corr, cpu_target, tmp_path)
    opts = TuneOptions(trials=2, repeats=3, min_repeat_ms=1, library=tmp_path / "lib",
                       work_dir=tmp_path / "work")
    results = tune_specs([SPEC, corr], cpu_target, opts)
    assert len(results) == 1
    assert [p.name for p in (tmp_path / "lib" / cpu_target.key()).iterdir()] == [
        f"{corr.name()}.json"]


@pytest.mark.parametrize(("schedule", "want"), [
    ({"kind": "template", "name": "cpu_kvec", "knobs": {"lanes": 8, "nkv": 2, "pw": 4}},
     RecordedSchedule("cpu_kvec", {"lanes": 8, "nkv": 2, "pw": 4})),
    ({"kind": "fallback"}, RecordedSchedule("cpu_generic")),
    ({"kind": "trace", "trace": [[], []]}, RecordedSchedule("meta_schedule", trace=[[], []])),
])
def test_format_1_records_still_read(tmp_path, cpu_target, schedule, want):
    """Records written before the schedule vocabulary was unified keep working."""
    rec = _record(SPEC, cpu_target)
    path = write_record(rec, tmp_path)
    data = json.loads(path.read_text())
    data.update(format_version=1, schedule=schedule)
    path.write_text(json.dumps(data))
    assert read_record(path).schedule == want


def test_chooser_falls_back_where_no_template_applies(cpu_target):
    odd = make_spec(mode="corr", input="1x3x5x3", kernel="2x3x3x3")  # width 1 output
    _, choice = schedule_for(odd, cpu_target, use_records=False)
    assert choice.kind == "fallback"


def test_tune_writes_a_record_and_resumes(tmp_path, cpu_target):
    opts = TuneOptions(trials=2, repeats=3, min_repeat_ms=1, library=tmp_path / "lib",
                       work_dir=tmp_path / "work")
    [first] = tune_specs([SPEC], cpu_target, opts)
    assert first.measured == 2 and first.gflops > 0
    assert find_record(SPEC, cpu_target, tmp_path / "lib") is not None
    log = next((tmp_path / "work").rglob("*.jsonl"))
    assert len(log.read_text().splitlines()) == 2
    more = TuneOptions(**{**opts.__dict__, "trials": 4})
    [second] = tune_specs([SPEC], cpu_target, more)
    assert second.measured == 4
    assert len(log.read_text().splitlines()) == 4  # only the two new ones were measured
    record = find_record(SPEC, cpu_target, tmp_path / "lib")
    assert record.schedule.knobs == second.best.candidate.knobs
    assert "alternating rounds" in record.tuner["confirmed"]


def test_a_residual_is_measured_where_a_spec_sharing_the_record_reads_one(tmp_path,
                                                                       cpu_target):
    """Bias and activation do not move the best tile; a residual read can: the record,
    kept without the epilogue, is tuned on the residual form where one spec has it."""
    plain = dataclasses.replace(SPEC, mode="corr", bias=True)
    with_residual = dataclasses.replace(SPEC, residual=True, activation="relu")
    opts = TuneOptions(trials=1, repeats=3, min_repeat_ms=1, library=tmp_path / "lib",
                       work_dir=tmp_path / "work")
    [result] = tune_specs([plain, with_residual], cpu_target, opts)
    assert result.spec.residual and not result.spec.bias and result.spec.mode == "corr"
    record = find_record(plain, cpu_target, tmp_path / "lib")
    assert record is not None and record.spec == record_spec(with_residual, cpu_target)
    assert not record.spec.residual


def test_cli_tune_reports_a_residual_spec_under_its_record(tmp_path, cpu_target):
    from click.testing import CliRunner

    from convgen.cli import main

    args = ["tune", "--mode", "corr", "--input", "1x6x6x8", "--kernel", "16x1x1x8",
            "--layout", "NHWC", "--bias", "--residual", "--trials", "1",
            "--library", str(tmp_path / "lib"), "--work-dir", str(tmp_path / "work")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "[1/1] corr2d_nhwc_float32_n1c8i6x6_k16r1x1" in result.output
    spec = make_spec(mode="corr", input="1x6x6x8", kernel="16x1x1x8", layout="NHWC")
    assert find_record(spec, cpu_target, tmp_path / "lib") is not None


def test_changed_schedule_code_does_not_resume_old_timings(tmp_path, cpu_target, monkeypatch):
    """Timings measured with other schedule code (or another TVM) say nothing about
    the new kernels: a run after a change measures every candidate again."""
    import convgen.tuning.grid as tune_mod

    opts = TuneOptions(trials=2, repeats=3, min_repeat_ms=1, library=tmp_path / "lib",
                       work_dir=tmp_path / "work")
    [first] = tune_specs([SPEC], cpu_target, opts)
    monkeypatch.setattr(tune_mod, "code_fingerprint", lambda: "changed")
    [again] = tune_specs([SPEC], cpu_target, opts)
    logs = list((tmp_path / "work").rglob("*.jsonl"))
    assert len(logs) == 2  # one log per code version, each with both candidates timed
    assert [len(log.read_text().splitlines()) for log in logs] == [2, 2]
    assert first.measured == again.measured == 2


def test_confirm_rounds_decide_between_the_fastest(tmp_path, cpu_target, monkeypatch):
    """The grid's fastest few are re-timed back to back: a candidate that won the grid
    by a burst of noise loses the record to the one that is faster when re-timed."""
    import convgen.tuning.grid as tune_mod

    cands = candidates_for(SPEC, cpu_target)[:4]
    grid = dict(zip((c.key() for c in cands), (1.0, 1.1, 1.2, 5.0)))
    again = dict(zip((c.key() for c in cands), (1.3, 1.05, 1.2, 0.1)))
    monkeypatch.setattr(tune_mod, "_compile", lambda spec, target, cand: cand)
    monkeypatch.setattr(tune_mod, "_measure", lambda cand, spec, target, options, check=True:
                        (grid if check else again)[cand.key()])
    opts = TuneOptions(trials=4, library=tmp_path / "lib", work_dir=tmp_path / "work")
    [result] = tune_specs([SPEC], cpu_target, opts)
    assert result.best.candidate == cands[1] and result.best.seconds == 1.05  # not the 4th
    record = find_record(SPEC, cpu_target, tmp_path / "lib")
    assert record.schedule.knobs == cands[1].knobs


def test_candidates_are_timed_on_data_where_numpy_puts_it(cpu_target):
    """A bound kernel takes a caller's numpy array in place, and numpy starts its arrays
    16 or 48 bytes past a cache line, where row-vector loads straddle lines: the tuner
    times every candidate on its data placed so."""
    from convgen.runtime.kernel import CACHE_LINE, NUMPY_PLACEMENT
    from convgen.tuning import grid

    spec = make_spec(mode="corr", input="1x16x8x8", kernel="16x16x1x1")
    cand = grid.Candidate("cpu_wvec", {"lanes": 8, "kb": 4, "rows": 2, "k_inner": False})
    built = grid._compile(spec, cpu_target, cand)
    seen: list[int] = []

    class Lib:
        """The compiled module, noting where each call's data lies."""

        mod = built.lib.mod

        def __getitem__(self, name: str):
            def call(*args):
                if name != grid.PACK_ENTRY:  # (the pack entry's first argument: weights)
                    seen.append(args[0].__array_interface__["data"][0] % CACHE_LINE)
                return built.lib[name](*args)
            return call

    seconds = grid._measure(grid.Built(Lib(), built.packing), spec, cpu_target,
                            TuneOptions(repeats=2))
    assert seconds > 0 and seen == [NUMPY_PLACEMENT]


def test_weights_past_l2_are_timed_as_a_model_finds_them(cpu_target):
    """In a model a layer's weights larger than L2 come from L3 or memory at every
    call: such candidates are timed one call a sample, each after enough other traffic
    to evict them, and the others back to back. (The size is the packed weights':
    a Winograd layer's U is 4x its weights at F(2x2) and more.)"""
    from convgen.tuning import grid

    def timed_with(spec):
        cand = grid.candidates_for(spec, cpu_target)[0]
        built = grid._compile(spec, cpu_target, cand)
        settings: list[dict] = []

        class Mod:
            def time_evaluator(self, *args, **kwargs):
                settings.append(kwargs)
                return built.lib.mod.time_evaluator(*args, **kwargs)

        class Lib:
            mod = Mod()

            def __getitem__(self, name: str):
                return built.lib[name]

        assert grid._measure(grid.Built(Lib(), built.packing), spec, cpu_target,
                             TuneOptions(repeats=2)) > 0
        [kwargs] = settings
        return kwargs.get("cache_flush_bytes", 0), built.packing

    l2_floats = cpu_target.l2_bytes // 4
    small = make_spec(mode="corr", input="1x2x2x64", kernel="64x1x1x64", layout="NHWC")
    c = 256  # a 1 x 1 layer of C x K floats just past L2
    big = make_spec(mode="corr", input=f"1x2x2x{c}", kernel=f"{l2_floats // c + 8}x1x1x{c}",
                    layout="NHWC")
    assert timed_with(small)[0] == 0
    flushed, packing = timed_with(big)
    assert flushed >= grid.COLD_FLUSH_BYTES > 2 * cpu_target.l2_bytes
    assert grid._weights_outgrow_l2(big, cpu_target, packing)


def test_ctrl_c_keeps_what_was_measured(tmp_path, cpu_target, monkeypatch):
    import convgen.tuning.grid as tune_mod

    real, calls = tune_mod._measure, []

    def interrupt_second(lib, spec, target, options, check=True):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(lib, spec, target, options, check)

    monkeypatch.setattr(tune_mod, "_measure", interrupt_second)
    opts = TuneOptions(trials=3, repeats=3, min_repeat_ms=1, library=tmp_path / "lib",
                       work_dir=tmp_path / "work")
    other = make_spec(mode="corr", input="1x8x12x12", kernel="16x8x3x3", padding=1)
    results = tune_specs([SPEC, other], cpu_target, opts)
    assert len(results) == 1 and results[0].interrupted  # stopped, the next spec untouched
    assert results[0].record_path is not None and results[0].measured == 1
    # the record keeps the best so far and says it is of part of the grid
    record = find_record(SPEC, cpu_target, tmp_path / "lib")
    assert results[0].partial and "after 1 of 3" in record.tuner["partial"]
    assert "confirmed" not in record.tuner
    monkeypatch.setattr(tune_mod, "_measure", real)
    [resumed, _] = tune_specs([SPEC, other], cpu_target, opts)
    assert resumed.measured == 3 and not resumed.partial
    record = find_record(SPEC, cpu_target, tmp_path / "lib")
    assert "partial" not in record.tuner and "confirmed" in record.tuner


def test_failing_candidates_count_as_infinitely_slow(tmp_path, cpu_target, monkeypatch):
    import convgen.tuning.grid as tune_mod

    real = tune_mod._compile

    def broken_first(spec, target, cand):
        if cand.knobs == candidates_for(spec, target)[0].knobs:
            raise RuntimeError("LLVM fell over")
        return real(spec, target, cand)

    monkeypatch.setattr(tune_mod, "_compile", broken_first)
    opts = TuneOptions(trials=2, repeats=3, min_repeat_ms=1, library=tmp_path / "lib",
                       work_dir=tmp_path / "work")
    [result] = tune_specs([SPEC], cpu_target, opts)
    rows = [json.loads(line) for line in next((tmp_path / "work").rglob("*.jsonl")).open()]
    assert rows[0]["seconds"] is None and "LLVM fell over" in rows[0]["error"]
    assert math.isfinite(result.best.seconds)


def test_meta_schedule_trace_record_replays(tmp_path, cpu_target, monkeypatch):
    """MetaSchedule's own space: its best trace is stored as plain JSON in the record
    and replayed by `convgen build`, which then verifies."""
    small = make_spec(mode="conv", input="1x8x10x10", kernel="8x8x3x3", padding=1)
    opts = TuneOptions(trials=8, method="meta", library=tmp_path / "lib",
                       work_dir=tmp_path / "work")
    [result] = tune_specs([small], cpu_target, opts)
    record = find_record(small, cpu_target, tmp_path / "lib")
    assert record is not None and record.schedule.template == "meta_schedule"
    assert record.schedule.trace
    json.dumps(record.schedule.to_dict())  # plain JSON, no TVM objects
    art = build_artifact(small, cpu_target, tmp_path / "out", verify=True,
                         library=tmp_path / "lib")
    assert art.manifest.schedule.name == "meta_schedule"
    assert art.manifest.verification.passed
    assert result.gflops > 0


ZEN4 = '{"kind": "llvm", "mcpu": "znver4", "num-cores": 2}'  # AVX-512: 32 vector registers
ZEN3 = '{"kind": "llvm", "mcpu": "znver3", "num-cores": 2}'  # AVX2: 16


@pytest.mark.parametrize(("flags", "template"), [
    # channels-last, long reduction: output channels blocked in the packed weights,
    # the last vector partly past K where it must; where groups forbid that (output
    # channels per group no multiple of 4), vectors of input channels
    (dict(input="1x7x7x512", kernel="512x3x3x512", padding=1, layout="NHWC"), "cpu_kvec"),
    (dict(input="1x7x7x256", kernel="6x3x3x256", padding=1, layout="NHWC"), "cpu_kvec"),
    (dict(input="1x7x7x256", kernel="6x3x3x128", padding=1, groups=2, layout="NHWC"),
     "cpu_cvec"),
    # channels-first, rows of whole vectors: the GEMM-shaped row tile (a 56-wide row
    # is 7 vectors of 8 but no whole number of 16: there, vectors of output channels);
    # unpadded, its row vectors would load from the caller's array, which numpy starts
    # 16 or 48 bytes past a cache line: vectors of output channels there too
    (dict(input="1x64x56x56", kernel="64x64x5x5", padding=2),
     {"avx2": "cpu_wvec", "avx512": "cpu_kvec"}),
    (dict(input="1x64x56x56", kernel="256x64x1x1"), "cpu_kvec"),
    (dict(input="1x64x64x64", kernel="64x64x1x1"), "cpu_kvec"),
    (dict(input="1x256x28x28", kernel="256x1x3x3", padding=1, groups=256), "cpu_wvec"),
    # a short row and 49 pixels per weight: no repack beats whole vectors
    (dict(input="1x512x7x7", kernel="512x512x3x3", padding=1), "cpu_wvec"),
    # rows of partial vectors, stride 2, channels-last short reductions: vectors of
    # output channels
    (dict(input="1x128x28x28", kernel="128x128x3x3", padding=1), "cpu_kvec"),
    (dict(input="1x3x224x224", kernel="64x3x7x7", padding=3, stride=2), "cpu_kvec"),
    (dict(input="1x56x56x64", kernel="64x3x3x64", padding=1, layout="NHWC"), "cpu_kvec"),
])
@pytest.mark.parametrize("target", [ZEN4, ZEN3], ids=["avx512", "avx2"])
def test_heuristic_picks_the_template_and_fits_the_registers(flags, template, target):
    from convgen.compiler.schedule import cpu
    from convgen.compiler.targets import resolve_target

    spec, tinfo = make_spec(mode="conv", **flags), resolve_target(target)
    if isinstance(template, dict):
        template = template[tinfo.vector_isa()]
    direct = [t for t in cpu.FAMILY.templates if t.algorithm == "direct"]
    chosen = next(t for t in direct if t.heuristic(spec, tinfo) is not None)
    assert chosen.name == template
    # dense 3x3 stride-1 layers go to Winograd first, with tiles enough to reuse U
    winograd = cpu.FAMILY.templates[0]
    expect = {"1x128x28x28": 4, "1x7x7x512": 2, "1x512x7x7": 2, "1x56x56x64": 4}
    knobs = winograd.heuristic(spec, tinfo)
    assert (knobs.tile if knobs else None) == expect.get(flags["input"])
    tile = cpu.register_tile(chosen.heuristic(spec, tinfo), tinfo)
    budget = cpu.accumulator_budget(tinfo)
    assert budget == (14 if target == ZEN4 else 8)
    # big enough to hide the FMA latency, no spill (16 registers: a long windowed
    # reduction's 2 x 6 in 15)
    limit = cpu.LONG_WINDOW_TILE if target == ZEN3 and cpu.long_window(spec) else budget + 2
    assert budget // 2 <= tile <= limit


ZEN5 = '{"kind": "llvm", "mcpu": "znver5", "num-cores": 2}'  # AVX-512, 512-bit FMA units


@pytest.mark.parametrize(("flags", "zen4", "zen3", "zen5"), [
    # a dense layer pads its last vector (1000 -> 1008) rather than halve every one
    (dict(input="1x13x13x512", kernel="1000x1x1x512"), 16, 8, 16),
    # ... but not by more than an eighth of K (24 -> 32), unless whole vectors run
    # twice the lanes a cycle (Zen 5's 512-bit FMAs; AVX2's 256-bit ones against
    # 128-bit half vectors, K12 -> 16)
    (dict(input="1x56x56x16", kernel="24x1x1x16"), 8, 8, 16),
    (dict(input="1x28x28x16", kernel="12x1x1x16"), 8, 8, 16),
    # ... and not where padding doubles K (8 -> 16): no faster
    (dict(input="1x28x28x16", kernel="8x1x1x16"), 8, 8, 8),
    # a depthwise layer pads only where half a vector does not divide its channels
    (dict(input="1x56x56x72", kernel="72x3x3x1", padding=1, groups=72), 8, 8, 8),
    (dict(input="1x14x14x116", kernel="116x3x3x1", padding=1, groups=116), 16, 4, 16),
])
def test_channel_vector_width(flags, zen4, zen3, zen5):
    from convgen.compiler.schedule import cpu
    from convgen.compiler.targets import resolve_target

    spec = make_spec(mode="corr", layout="NHWC", **flags)
    assert cpu.kvec_lanes(spec, resolve_target(ZEN4)) == zen4
    assert cpu.kvec_lanes(spec, resolve_target(ZEN3)) == zen3
    assert cpu.kvec_lanes(spec, resolve_target(ZEN5)) == zen5


@pytest.mark.parametrize("flags", [
    dict(input="1x17x17x192", kernel="192x1x7x192", padding=(0, 3)),  # Inception-v3's
    dict(input="1x35x35x288", kernel="384x3x3x288", stride=2),  # 17 outputs a row
])
@pytest.mark.parametrize("target", [ZEN4, ZEN3], ids=["avx512", "avx2"])
def test_a_prime_row_is_widened_rather_than_tiled_by_single_pixels(flags, target):
    """17 pixels: no tile but 1 divides the row, and a tile of one pixel loads a weight
    vector per FMA. Widened to 18 (one output in eighteen thrown away), tiles of
    several pixels fit; on 16 registers the image's 289 pixels run as one row
    (flat), 2 x 6 on 294."""
    from convgen.compiler.schedule import cpu
    from convgen.compiler.targets import resolve_target

    tinfo = resolve_target(target)
    knobs = cpu.kvec_heuristic(make_spec(mode="corr", layout="NHWC", **flags), tinfo)
    assert knobs is not None and knobs.pw > 1
    if target == ZEN3:
        assert knobs.flat and (289 + knobs.wide) % knobs.pw == 0
    else:
        assert not knobs.flat and knobs.wide == 1 and 18 % knobs.pw == 0
    spec = make_spec(mode="corr", layout="NHWC", **flags)
    limit = (cpu.LONG_WINDOW_TILE if target == ZEN3 and cpu.long_window(spec)
             else cpu.accumulator_budget(tinfo) + 2)
    assert knobs.nkv * knobs.pw <= limit


def test_tuning_tries_a_grid_where_the_heuristic_declines(cpu_target):
    """NCHW C256 14x14: cpu_wvec's heuristic leaves 14-wide rows to cpu_kvec, but its
    grid is measured there (and tied cpu_kvec in the shipped records' tuning)."""
    from convgen.compiler.schedule import cpu

    spec = make_spec(mode="conv", input="1x256x14x14", kernel="256x256x3x3", padding=1)
    assert cpu.FAMILY.template("cpu_wvec").heuristic(spec, cpu_target) is None
    assert "cpu_wvec" in {c.template for c in candidates_for(spec, cpu_target)}
