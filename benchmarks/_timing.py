"""Interleaved timing: every candidate runs once per round, rounds repeat, and each
candidate's median over rounds is reported with its ratio to a baseline. Machines
are shared and noisy: compare ratios within one run, not absolute times."""

import statistics
import time
from collections.abc import Callable

import jax


def interleaved(
    candidates: dict[str, Callable[[], object]], rounds: int = 30, warmup: int = 3
) -> dict[str, float]:
    """Median seconds per call of each (already compiled) zero-argument callable."""
    for fn in candidates.values():
        for _ in range(warmup):
            jax.block_until_ready(fn())
    times: dict[str, list[float]] = {name: [] for name in candidates}
    names = list(candidates)
    for r in range(rounds):
        # Rotate the order each round, so that no candidate always runs first.
        for name in names[r % len(names) :] + names[: r % len(names)]:
            fn = candidates[name]
            start = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def compile_seconds(jitted, *args) -> tuple[float, object]:
    """Seconds to lower and compile, and the compiled program."""
    start = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    return time.perf_counter() - start, compiled


def temp_bytes(compiled) -> int:
    """Peak temporary memory of a compiled program, from XLA's memory analysis."""
    analysis = compiled.memory_analysis()
    return int(getattr(analysis, "temp_size_in_bytes", 0)) if analysis else 0


def table(rows: list[list[str]], head: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head))]

    def line(r):
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"

    return "\n".join(
        [line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
        + [line(r) for r in rows]
    )
