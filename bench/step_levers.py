"""Engine step levers, each A/B'd in the same run on the same engine: before vs after.

- bind: kernel ops dispatched and validated per call (the module's ops) vs bound once per model;
- tables: block tables rebuilt from Python lists every step vs kept on the device (micro: 64
  sequences x 2,048 blocks, plus a decode step);
- write_through: KV-tier snapshot copies on the step thread vs in the background (host cache);
- compile: eager MLPs vs EngineConfig.torch_compile.

Timings are CPU time of this process (or of the step thread for write-through), which is far
steadier than wall time on a shared machine; rounds interleave A and B and keep the best.
The last line is one JSON object of ratios (after / before speed, > 1 = faster).

    python bench/step_levers.py                  # tiny model
    python bench/step_levers.py --model PATH.gguf --levers bind,compile
"""

from __future__ import annotations

import argparse
import json
import time
import types

import torch
import tusk.kernels as K
from tusk.worker.block_tables import DeviceBlockTables
from tusk.worker.engine import LLMEngine
from tusk.worker.sequence import SamplingParams

from tusk.config import EngineConfig, KVTierConfig


def _engine(model: str, seqs: int, prompt_len: int, block_size: int = 16, **extra) -> LLMEngine:
    blocks = seqs * -(-(prompt_len + 400) // block_size) + 16
    config = EngineConfig(
        num_kv_blocks=blocks,
        block_size=block_size,
        max_num_seqs=max(64, seqs),
        max_num_batched_tokens=max(4096, seqs),
    )
    engine = LLMEngine(model, config, **extra)
    for i in range(seqs):
        prompt = [(7 * i + j) % 1000 + 3 for j in range(prompt_len)]
        engine.add_request(f"r{i}", prompt, SamplingParams(max_tokens=100000, ignore_eos=True))
    while any(s.num_computed < len(s.prompt) for s in engine.scheduler.running) or engine.scheduler.waiting:
        engine.step()
    return engine


def _ab(engine: LLMEngine, variants: dict, rounds: int, steps: int) -> dict[str, float]:
    """Best per-step CPU seconds of each variant, rounds interleaved."""
    best = dict.fromkeys(variants, float("inf"))
    for _ in range(rounds):
        for name, apply in variants.items():
            apply()
            engine.step()
            start = time.process_time()
            for _ in range(steps):
                engine.step()
            best[name] = min(best[name], (time.process_time() - start) / steps)
    return best


def _line(label: str, before: str, after: str, best: dict[str, float]) -> float:
    ratio = best[before] / best[after]
    print(
        f"{label:36s} {before} {best[before] * 1e3:8.2f} ms  {after} {best[after] * 1e3:8.2f} ms  {ratio:5.3f}x"
    )
    return ratio


def lever_bind(model: str, rounds: int) -> dict:
    out = {}
    for seqs in (1, 16):
        engine = _engine(model, seqs, 64)
        bound = engine.model.ops

        def per_call(e=engine):
            e.model.ops = K

        def once(e=engine, b=bound):
            e.model.ops = b

        best = _ab(engine, {"per_call": per_call, "bound": once}, rounds, 4)
        out[f"{seqs}_seqs"] = _line(f"bind, decode {seqs} seqs", "per_call", "bound", best)
        engine.close()
    return out


class _Seq:
    def __init__(self, blocks: list[int]) -> None:
        self.block_table = blocks


def _rebuild(self, items, rows):
    context = [s.seq.num_computed + s.num_tokens for s in items]
    width = max(len(s.seq.block_table) for s in items)
    padded = [s.seq.block_table + [0] * (width - len(s.seq.block_table)) for s in items]
    return torch.tensor(context, dtype=torch.int32), torch.tensor(padded, dtype=torch.int32)


def lever_tables(model: str, rounds: int) -> dict:
    seqs = [_Seq(list(range(i * 2048, (i + 1) * 2048))) for i in range(64)]
    tables = DeviceBlockTables("cpu")

    def rebuild():
        width = max(len(s.block_table) for s in seqs)
        return torch.tensor(
            [s.block_table + [0] * (width - len(s.block_table)) for s in seqs], dtype=torch.int32
        )

    def incremental():
        return tables.select(tables.rows_for(seqs), max(len(s.block_table) for s in seqs))

    assert torch.equal(rebuild(), incremental())
    best = {"rebuild": float("inf"), "incremental": float("inf")}
    for r in range(rounds):
        for name, fn in (("rebuild", rebuild), ("incremental", incremental)):
            start = time.process_time()
            for k in range(5):
                seqs[(5 * r + k) % 64].block_table.append(7)  # a new block here and there
                fn()
            best[name] = min(best[name], (time.process_time() - start) / 5)
    out = {"64x2048_tables": _line("tables, 64 seqs x 2,048 blocks", "rebuild", "incremental", best)}
    engine = _engine(model, 64, 256, block_size=4)
    runner = engine.runner
    rows_for, tables_fn = runner.block_tables.rows_for, runner._tables

    def old(r=runner):
        r.block_tables.rows_for = lambda s: [0] * len(s)
        r._tables = types.MethodType(_rebuild, r)

    def new(r=runner):
        r.block_tables.rows_for, r._tables = rows_for, tables_fn

    best = _ab(engine, {"rebuild": old, "incremental": new}, rounds, 3)
    out["decode_64_seqs"] = _line("tables, decode 64 seqs x 64 blocks", "rebuild", "incremental", best)
    engine.close()
    return out


def lever_write_through(model: str, rounds: int) -> dict:
    tier = KVTierConfig(url=None, host_cache_blocks=8192, max_inflight_bytes=4 << 30)
    engine = LLMEngine(model, EngineConfig(num_kv_blocks=1024, block_size=16), kv_tier=tier)
    connector = engine.connector
    spent: list[float] = []
    save = connector.save

    def timed_save(*args, **kwargs):
        start = time.thread_time()
        save(*args, **kwargs)
        spent.append(time.thread_time() - start)

    connector.save = timed_save
    best = {"on_step_thread": float("inf"), "background": float("inf")}
    n = 0
    for _ in range(rounds):
        for name in best:
            connector.copies_in_background = name == "background"
            n += 1
            prompt = [(n * 7919 + j * 31) % 30000 + 5 for j in range(512)]
            engine.add_request(f"w{n}", prompt, SamplingParams(max_tokens=1, ignore_eos=True))
            spent.clear()
            while engine.has_unfinished():
                engine.step()
            best[name] = min(best[name], sum(spent))
            time.sleep(0.2)  # let the background copy finish outside the next sample
            engine.step()
    engine.close()
    return {
        "512_token_prompt": _line("write-through, step-thread time", "on_step_thread", "background", best)
    }


def lever_compile(model: str, rounds: int) -> dict:
    from tusk.worker.compiled import compile_model

    engine = _engine(model, 16, 64)
    compile_model(engine.model)
    compiled = engine.model._mlp
    for _ in range(3):
        engine.step()  # compile and warm up

    def eager(e=engine):
        e.model.__dict__.pop("_mlp", None)

    def comp(e=engine, c=compiled):
        e.model._mlp = c

    best = _ab(engine, {"eager": eager, "compiled": comp}, rounds, 4)
    engine.close()
    return {"16_seqs": _line("torch.compile MLPs, decode 16 seqs", "eager", "compiled", best)}


LEVERS = {
    "bind": lever_bind,
    "tables": lever_tables,
    "write_through": lever_write_through,
    "compile": lever_compile,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model folder or .gguf (default: the tiny model)")
    parser.add_argument(
        "--levers", default=",".join(LEVERS), help=f"comma-separated subset of {list(LEVERS)}"
    )
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.model is None:
        from tusk.tiny_model import tiny_model_dir

        args.model = str(tiny_model_dir())
    results = {"model": args.model, "threads": args.threads, "device": "cpu"}
    for name in args.levers.split(","):
        results[name] = LEVERS[name](args.model, args.rounds)
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
