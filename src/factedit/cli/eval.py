"""``factedit eval`` and ``factedit summarize`` (registered by :mod:`factedit.cli`)."""

from __future__ import annotations

import json
import sys

from .common import add_model_options, arch_spec, layer_arg, layers_arg, load, method_names, stats_options

__all__ = ["add_parsers", "eval_config", "cmd_eval", "cmd_summarize"]

SUMMARY_KEYS = ("n", "ES", "PS", "NS", "S", "EM", "PM", "NM", "GE", "gen_ES", "gen_PS", "gen_NS", "gen_leak",
                "seconds_per_edit")


def add_parsers(sub) -> None:
    """Add the ``eval`` and ``summarize`` subcommands."""
    e = sub.add_parser("eval", help="evaluate a method on CounterFact / zsRE (resumable)")
    e.add_argument("--method", default="r-rome", help=method_names(baseline="none (the unedited baseline)"))
    e.add_argument("--dataset", required=True, help="CounterFact (original or KnowEdit layout) or zsRE file, or a URL")
    e.add_argument("--dataset-sha256", default=None, help="expected SHA-256 of the dataset file (checked)")
    e.add_argument("--limit", type=int, default=None, help="evaluate N records")
    e.add_argument("--offset", type=int, default=0, help="skip the first K records")
    e.add_argument("--batch-size", type=int, default=1, help="cases per edit (memit, emmet, alphaedit, ft)")
    e.add_argument("--sequential", action="store_true", help="keep every edit: the model accumulates them")
    e.add_argument("--downstream-every", type=int, default=None,
                   help="with --sequential: downstream tasks and all earlier edits re-scored every K edits")
    e.add_argument("--retention-sample", type=int, default=0,
                   help="with --downstream-every: re-score at most N of the earlier edits at each checkpoint, evenly "
                        "spaced in edit order, first and latest included (default 0: all; a long run needs a sample)")
    e.add_argument("--downstream", default=None, help="directory of the downstream task files (sst2.jsonl, ...)")
    e.add_argument("--ppl-corpus", default=None,
                   help="with --downstream-every: track the perplexity on this held-out text file (e.g. WikiText-2 "
                        "test when the statistics read its validation split)")
    e.add_argument("--ppl-tokens", type=int, default=20_000, help="tokens of --ppl-corpus scored (default 20,000)")
    e.add_argument("--knowns", default=None,
                   help="with --downstream-every: track the share of these known facts (known_1000.json) that the "
                        "unedited model answers (first token) and the edited one still does")
    e.add_argument("--downstream-n", type=int, default=100, help="examples per downstream task (default 100)")
    e.add_argument("--downstream-shots", type=int, default=3, help="few-shot demonstrations (default 3)")
    e.add_argument("--ge-length", type=int, default=100,
                   help="tokens per generation for GE, prompt included (ROME: 100); 0 skips GE")
    e.add_argument("--ge-prompts", type=int, default=10, help="generation prompts per case (default all, ≤ 10)")
    e.add_argument("--chat", action="store_true",
                   help="generation-based scores ask every prompt as a user message through the model's chat template "
                        "(edits and teacher-forced scores stay on the raw prompts)")
    e.add_argument("--gen-tokens", type=int, default=50,
                   help="generation-based scores (gen_ES/gen_PS/gen_NS/gen_leak): greedy answers of at most this "
                        "many tokens, cut at the first sentence (default 50); 0 skips them")
    e.add_argument("--score-batch", type=int, default=64, help="rows per forward pass when scoring")
    e.add_argument("--chunk", type=int, default=25,
                   help="single-edit runs: cases edited (each from the original weights) and scored together (default 25)")
    e.add_argument("--prefetch-batch", type=int, default=1,
                   help="ROME variants, single-edit runs: targets optimised together (independent; default 1: "
                   "slower on CPU, meant for GPUs)")
    e.add_argument("--guard", action="store_true", help="run the collapse guard (off: measure raw method behaviour)")
    e.add_argument("--verify", action="store_true",
                   help="retry edits that do not take on their own prompt (off: the raw method; each case records "
                   "whether its edit took either way)")
    e.add_argument("--layer", type=layer_arg, default=None,
                   help="a layer number or 'traced' (default: from the model depth, as `factedit edit`)")
    e.add_argument("--layers", type=layers_arg, default=None, help="span of a multi-layer method, e.g. 4,5,6,7,8")
    e.add_argument("--steps", type=int, default=None, help="max optimisation steps")
    e.add_argument("--set", action="append", default=None, metavar="KEY=VALUE",
                   help="any field of the method's config, e.g. norm_constraint=0.01 (ft) or value.lr=0.1; repeatable")
    e.add_argument("--seed", type=int, default=0, help="seed of the context templates and of GE sampling")
    e.add_argument("--out", required=True, help="run directory (per-case JSONL, summary.json, config.json)")
    add_model_options(e)

    s = sub.add_parser("summarize", help="compare evaluation runs: table and plots of sequential runs")
    s.add_argument("runs", nargs="+", help="run directories written by factedit eval")
    s.add_argument("--plots", default=None, help="where to write PNG plots (default: beside the runs)")
    s.add_argument("--json", action="store_true", help="print the summaries as a JSON list")


def _method_options(args) -> tuple:
    from ..edit.methods.options import parse_options

    opts = {**stats_options(args), "seed": args.seed}
    if args.layers is not None:
        opts["layers"] = args.layers
    elif args.layer is not None:
        opts["layer"] = args.layer
    if args.steps is not None:
        opts["steps"] = args.steps
    if args.set:
        opts["options"] = parse_options(args.set)
    return tuple(sorted((k, v) for k, v in opts.items() if v is not None))


def eval_config(args):
    """The :class:`~factedit.evaluation.EvalConfig` of parsed ``factedit eval`` arguments."""
    from ..evaluation import DownstreamConfig, EvalConfig, GenerationConfig
    from ..evaluation.ability import AbilityConfig

    return EvalConfig(
        method=args.method, dataset=args.dataset, dataset_sha256=args.dataset_sha256, limit=args.limit,
        offset=args.offset, batch_size=args.batch_size, sequential=args.sequential,
        downstream_dir=args.downstream, downstream_every=args.downstream_every,
        downstream=DownstreamConfig(n=args.downstream_n, shots=args.downstream_shots),
        retention_sample=args.retention_sample,
        generation=GenerationConfig(length=args.ge_length, max_prompts=args.ge_prompts, seed=args.seed),
        ability=AbilityConfig(ppl_corpus=args.ppl_corpus, ppl_tokens=args.ppl_tokens, knowns=args.knowns),
        score_batch=args.score_batch, gen_tokens=args.gen_tokens, gen_chat=args.chat, chunk=args.chunk, prefetch_batch=args.prefetch_batch, guard=args.guard,
        verify=args.verify,
        method_options=_method_options(args))


def cmd_eval(args) -> int:
    from ..editor import Editor
    from ..evaluation import run_eval

    cfg = eval_config(args)
    cfg.check()  # before loading the model
    from ..core.distributed import World

    model, tok = load(args)
    editor = Editor(model, tok, arch=arch_spec(args.arch_spec), prompt_prefix=args.prompt_prefix, progress=not args.json and sys.stderr.isatty())
    world = World.from_env(editor.adapter.input_device)  # size 1 unless started by torchrun
    show = (args.verbose or sys.stderr.isatty()) and world.main

    def progress(done: int, total: int) -> None:
        if show:
            print(f"\rfactedit eval {args.method}: {done}/{total} edits", end="", file=sys.stderr, flush=True)

    summary = run_eval(editor, cfg, args.out, on_group=progress, world=world)
    world.close()
    if show:
        print(file=sys.stderr)
    if not world.main:
        return 0  # rank 0 reports the merged run
    if args.json:
        print(json.dumps({**{k: summary.get(k) for k in SUMMARY_KEYS}, **summary}))
        return 0
    from ..evaluation.summarize import load_run, table

    print(table([load_run(args.out)]))
    print(f"\nper-case records, summary and configuration in {args.out}")
    return 0


def cmd_summarize(args) -> int:
    from ..evaluation.summarize import checkpoint_table, default_plot_dir, load_run, plot_runs, sequential_table, table

    runs = [load_run(d) for d in args.runs]
    plot_dir = args.plots or default_plot_dir(runs)
    plots = plot_runs(runs, plot_dir) if plot_dir else []
    if args.json:
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
    for p in plots:
        print(f"plot: {p}")
    return 0
