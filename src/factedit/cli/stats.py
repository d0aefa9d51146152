"""``factedit stats``: compute and cache the key statistics ahead of time."""

from __future__ import annotations

import json
import time

from .common import show_progress

__all__ = ["cmd_stats"]


def cmd_stats(settings) -> int:
    from ..core.distributed import World
    from ..edit.methods.base import default_layer, default_stats_tokens
    from ..stats.layer import accumulator_bytes, check_stats_options, layer_stats

    opts = settings.method  # the statistics options, as an edit takes them
    seq_len = 256 if opts.stats_seq_len is None else opts.stats_seq_len
    dtype = opts.stats_dtype or "float64"
    check_stats_options(seq_len, dtype)
    model, tok = settings.model.load()
    adapter = settings.model.adapter(model, tok)
    world = World.from_env(adapter.input_device)  # size 1 unless started by torchrun
    with world:  # leaves the process group on every path, errors included
        layers = settings["stats_layers"] or [default_layer(adapter.n_layers)]
        for layer in layers:
            adapter.check_layer(layer)
        n_tokens = opts.stats_tokens or default_stats_tokens(adapter.d_ff)
        report = []
        for layer in layers:
            t = time.perf_counter()
            st = layer_stats(adapter, layer, corpus=opts.stats_corpus, n_tokens=n_tokens, force=settings["force"],
                             progress=show_progress(settings), world=world, seq_len=seq_len, dtype=dtype)
            dt = time.perf_counter() - t
            report.append({"layer": layer, "tokens": st.count, "corpus": st.meta.get("corpus"), "seconds": round(dt, 2),
                           "trace": float(st.mom2.trace()), "seq_len": int(st.meta.get("seq_len", seq_len)),
                           "accumulator": dtype, "memory_bytes": accumulator_bytes(adapter.d_ff, dtype, 8 * seq_len),
                           "device": str(adapter.w_out_device(layer))})
    if not world.main:
        return 0  # rank 0 reports for the world
    if settings["json"]:
        print(json.dumps({"layers": report, "world_size": world.size}))
    else:
        for r in report:
            mem = r["memory_bytes"]
            print(f"layer {r['layer']}: {r['tokens']} tokens from {r['corpus']} ({r['seconds']} s"
                  + (f", {world.size} processes" if world.distributed else "") + f"); on {r['device']}: "
                  f"{r['accumulator']} sum {mem['sum'] / 2**30:.3g} GiB + C {mem['mom2'] / 2**30:.3g} GiB + keys of a "
                  f"batch {mem['keys'] / 2**20:.3g} MiB")
    return 0
