"""``factedit stats``: compute and cache the key statistics ahead of time."""

from __future__ import annotations

import json
import sys
import time

from .common import add_model_options, arch_spec, layers_arg, load

__all__ = ["add_parser", "cmd_stats"]


def add_parser(sub) -> None:
    s = sub.add_parser("stats", help="compute and cache the key statistics C ahead of time")
    s.add_argument("--layers", type=layers_arg, default=None, help="comma-separated layers (default: the default edit layer)")
    s.add_argument("--force", action="store_true", help="recompute even if cached")
    add_model_options(s)



def cmd_stats(args) -> int:
    from ..core.arch import ModelAdapter
    from ..edit.methods.base import default_layer, default_stats_tokens
    from ..core.distributed import World
    from ..stats.layer import accumulator_bytes, layer_stats

    model, tok = load(args)
    adapter = ModelAdapter(model, tok, arch_spec(args.arch_spec), args.prompt_prefix)
    world = World.from_env(adapter.input_device)  # size 1 unless started by torchrun
    layers = args.layers or [default_layer(adapter.n_layers)]
    for l in layers:
        adapter.check_layer(l)
    n_tokens = args.stats_tokens or default_stats_tokens(adapter.d_ff)
    seq_len = 256 if args.stats_seq_len is None else args.stats_seq_len  # layer_stats checks both
    dtype = args.stats_dtype or "float64"
    report = []
    for l in layers:
        t = time.perf_counter()
        st = layer_stats(adapter, l, corpus=args.corpus, n_tokens=n_tokens, force=args.force,
                         progress=not args.json and sys.stderr.isatty(), world=world, seq_len=seq_len, dtype=dtype)
        dt = time.perf_counter() - t
        report.append({"layer": l, "tokens": st.count, "corpus": st.meta.get("corpus"), "seconds": round(dt, 2),
                       "trace": float(st.mom2.trace()), "seq_len": int(st.meta.get("seq_len", seq_len)),
                       "accumulator": dtype, "memory_bytes": accumulator_bytes(adapter.d_ff, dtype, 8 * seq_len),
                       "device": str(adapter.w_out_device(l))})
    world.close()
    if not world.main:
        return 0  # rank 0 reports for the world
    if args.json:
        print(json.dumps({"layers": report, "world_size": world.size}))
    else:
        for r in report:
            mem = r["memory_bytes"]
            print(f"layer {r['layer']}: {r['tokens']} tokens from {r['corpus']} ({r['seconds']} s"
                  + (f", {world.size} processes" if world.distributed else "") + f"); on {r['device']}: "
                  f"{r['accumulator']} sum {mem['sum'] / 2**30:.3g} GiB + C {mem['mom2'] / 2**30:.3g} GiB + keys of a "
                  f"batch {mem['keys'] / 2**20:.3g} MiB")
    return 0
