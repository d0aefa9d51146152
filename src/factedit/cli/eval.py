"""``factedit eval``, ``factedit summarize`` and ``factedit capacity`` (registered by :mod:`factedit.cli`)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .common import show_progress

__all__ = ["eval_config", "cmd_eval", "cmd_summarize", "cmd_capacity"]

SUMMARY_KEYS = ("n", "ES", "PS", "NS", "S", "EM", "PM", "NM", "GE", "gen_ES", "gen_PS", "gen_NS", "gen_leak",
                "seconds_per_edit")


def eval_config(settings):
    """The :class:`~factedit.evaluation.EvalConfig` of ``factedit eval``'s settings."""
    return settings.eval


def cmd_eval(settings) -> int:
    from ..core.distributed import World
    from ..evaluation import run_eval

    cfg = eval_config(settings)
    cfg.check()  # before loading the model
    model, tok = settings.model.load()
    editor = settings.model.editor(model, tok, progress=show_progress(settings))
    world = World.from_env(editor.adapter.input_device)  # size 1 unless started by torchrun
    show = (settings["verbose"] or sys.stderr.isatty()) and world.main

    def progress(done: int, total: int) -> None:
        if show:
            print(f"\rfactedit eval {cfg.method}: {done}/{total} edits", end="", file=sys.stderr, flush=True)

    out = settings["out"]
    with world:  # leaves the process group on every path, errors included
        summary = run_eval(editor, cfg, out, on_group=progress, world=world)
    if show:
        print(file=sys.stderr)
    if not world.main:
        return 0  # rank 0 reports the merged run
    if settings["json"]:
        print(json.dumps({**{k: summary.get(k) for k in SUMMARY_KEYS}, **summary}))
        return 0
    from ..evaluation.summarize import load_run, table

    run = load_run(out)
    print(f"mode: {run.mode_text}\n")
    print(table([run]))
    print(f"\nper-case records, summary and configuration in {out}")
    return 0


def cmd_summarize(settings) -> int:
    from ..evaluation.summarize import (
        batch_table,
        checkpoint_table,
        default_plot_dir,
        load_run,
        plot_runs,
        sequential_table,
        table,
    )

    runs = [load_run(d) for d in settings["runs"]]
    if settings["wear_limits"]:
        return _wear_limits(settings)
    plot_dir = settings["plots"] or default_plot_dir(runs)
    plots = plot_runs(runs, plot_dir) if plot_dir else []
    if settings["json"]:
        print(json.dumps([{"run": str(r.path), **r.summary} for r in runs] if not plots else
                         {"runs": [{"run": str(r.path), **r.summary} for r in runs], "plots": [str(p) for p in plots]}))
        return 0
    print(table(runs))
    seq = sequential_table(runs)
    if seq:
        print("\nSequential runs (ES/PS/NS at end: the earlier edits re-scored on the final weights, all of them "
              "unless the run sampled them):\n")
        print(seq)
        for r in runs:
            if r.sequential and len(r.downstream) > 1:
                print(f"\nCheckpoints of {r.name}:\n")
                print(checkpoint_table(r))
    batch = batch_table(runs)
    if batch:
        print("\nOne-batch runs (scored: the cases scored right after the batch; verified: of all its requests; "
              "perplexity and known recall after it; seconds of the edit's phases):\n")
        print(batch)
    for p in plots:
        print(f"plot: {p}")
    return 0


def cmd_capacity(settings) -> int:
    """``factedit capacity RUNS``: each sequential run's curve, and how many more edits before it passes the
    threshold (:mod:`factedit.evaluation.capacity`)."""
    from ..evaluation.capacity import ascii_chart, capacity, plot_capacity, render
    from ..evaluation.summarize import default_plot_dir, load_run

    runs = [load_run(d) for d in settings["runs"]]
    ests = [capacity(r, settings["quantity"], settings["threshold"], settings["level"], settings["fit_from"])
            for r in runs]
    plot_dir = settings["plots"] or default_plot_dir(runs)
    plot = plot_capacity(ests, Path(plot_dir) / f"capacity_{settings['quantity']}.png") if plot_dir else None
    if settings["json"]:
        print(json.dumps({"estimates": [e.to_dict() for e in ests], "plot": str(plot) if plot else None}))
        return 0
    print(ascii_chart(ests))
    print()
    for e in ests:
        print(render(e))
    if plot:
        print(f"\nplot: {plot}")
    return 0


def _wear_limits(settings) -> int:
    """``factedit summarize RUNS --wear-limits FILE``: calibrate the guard's wear warnings from the runs."""
    from ..core.errors import FactEditError
    from ..core.paths import atomic_write_text
    from ..evaluation.wear_limits import calibrate, limits_table

    cal = calibrate(settings["runs"])
    if not cal["limits"]:
        raise FactEditError("no run to calibrate from: the wear warnings need sequential runs with checkpoints "
                            "(--downstream-every with --knowns / --ppl-corpus) that degraded and recorded the wear "
                            "meter; nothing was written")
    atomic_write_text(settings["wear_limits"], json.dumps(cal, indent=1) + "\n")
    if settings["json"]:
        print(json.dumps(cal))
    else:
        print(limits_table(cal))
        print(f"\nwear limits written to {settings['wear_limits']}")
    return 0
