"""Interleaved timing: every candidate runs once per round in a random order, rounds
repeat, each candidate's median over rounds is reported, and ratios are medians of
the per-round ratios. Machines are shared and noisy: compare ratios within one run,
not absolute times."""

import argparse
import math
import os
import random
import re
import statistics
import tempfile
import time
from collections.abc import Callable

import jax


def interleaved(
    candidates: dict[str, Callable[[], object]],
    rounds: int = 30,
    warmup: int = 3,
    calls: int = 1,
) -> dict[str, list[float]]:
    """Seconds per call of each (already compiled) zero-argument callable, one
    sample per round; in each round every candidate runs once, in a random order.

    With `calls > 1` a sample is `calls` calls in a row with one wait at the end,
    divided by `calls`: on an accelerator the calls are queued while the device
    runs, so the sample is the device's time per call rather than one call's
    dispatch and wait."""
    for fn in candidates.values():
        for _ in range(warmup):
            jax.block_until_ready(fn())
    times: dict[str, list[float]] = {name: [] for name in candidates}
    names = list(candidates)
    rng = random.Random(0)
    for _ in range(rounds):
        # A new order each round: a call runs faster after some programs than after
        # others (a cheap one leaves the caches and threads warm), so no candidate
        # may always follow the same one, as a fixed rotation would make it.
        for name in rng.sample(names, len(names)):
            fn = candidates[name]
            start = time.perf_counter()
            for _ in range(calls - 1):
                fn()
            jax.block_until_ready(fn())
            times[name].append((time.perf_counter() - start) / calls)
    return times


def median(samples: list[float]) -> float:
    return statistics.median(samples)


def ratio(times: dict[str, list[float]], a: str, b: str) -> float:
    """The median over rounds of a's time over b's in the same round: paired, so a
    change in the machine's load between rounds cancels."""
    return statistics.median(ta / tb for ta, tb in zip(times[a], times[b]))


def compile_seconds(jitted, *args) -> tuple[float, object]:
    """Seconds to lower and compile, and the compiled program."""
    start = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    return time.perf_counter() - start, compiled


def temp_bytes(compiled) -> int:
    """Peak temporary memory of a compiled program, from XLA's memory analysis."""
    analysis = compiled.memory_analysis()
    return int(getattr(analysis, "temp_size_in_bytes", 0)) if analysis else 0


def kernel_lines(compiled) -> list[str]:
    """Top-level instructions of the compiled program's entry computation, other
    than parameters, constants, tuples and bitcasts: the kernels XLA runs."""
    text = compiled.as_text()
    entry = text[text.index("\nENTRY ") :]
    entry = entry[: entry.index("\n}")]
    # The op follows the output shape, which for a tuple has spaces in it.
    skip = re.compile(r"[\]})] (parameter|constant|tuple|get-tuple-element|bitcast)\(")
    return [
        line.strip()
        for line in entry.splitlines()[1:]
        if " = " in line and not skip.search(line.split(" = ", 1)[1])
    ]


def kernels(compiled) -> int:
    """The number of kernels XLA runs for a compiled program (`kernel_lines`)."""
    return len(kernel_lines(compiled))


def table(rows: list[list[str]], head: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head))]

    def line(r):
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"

    return "\n".join(
        [line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
        + [line(r) for r in rows]
    )


def positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not at least 1")
    return value


def parse_shape(text: str) -> tuple[int, ...]:
    """An argparse type: a shape written as comma-separated sizes, e.g. 64,512."""
    try:
        return tuple(positive_int(size) for size in text.split(","))
    except argparse.ArgumentTypeError as error:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a shape such as 64,512 ({error})"
        ) from None


# The most elements one benchmark array may hold: a bigger shape is a typo.
MAX_ELEMENTS = 2**31 - 1


def parse_batch_shape(text: str) -> tuple[int, ...]:
    """An argparse type: a batch shape `N,C[,spatial...]` (batch size, channels,
    then any spatial sizes) with a batch variance (at least two values per
    channel) and at most `MAX_ELEMENTS` elements, e.g. 64,512 or 256,64,56,56."""
    shape = parse_shape(text)
    if len(shape) < 2:
        raise argparse.ArgumentTypeError(
            f"{text!r} has {len(shape)} size; a batch shape is N,C[,spatial...], "
            "e.g. 64,512 or 256,64,56,56"
        )
    values_per_channel = shape[0] * math.prod(shape[2:])
    if values_per_channel < 2:
        raise argparse.ArgumentTypeError(
            f"{text!r} has one value per channel, so no batch variance; use a "
            "batch of at least 2 (e.g. 2,512) or spatial sizes"
        )
    if math.prod(shape) > MAX_ELEMENTS:
        raise argparse.ArgumentTypeError(
            f"{text!r} has {math.prod(shape)} elements, more than {MAX_ELEMENTS}"
        )
    return shape


def at_least_two(text: str) -> int:
    """An argparse type: a whole number of at least 2 (a batch with a variance)."""
    value = positive_int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(
            f"{value} is below 2: a batch of one has no batch variance"
        )
    return value


def writable_folder(text: str) -> str:
    """An argparse type: an existing folder that this process can write into."""
    if not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not an existing folder")
    try:
        with tempfile.TemporaryFile(dir=text):
            pass
    except OSError as error:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not writable ({error.strerror})"
        ) from None
    return text


def refuse_repeats(parser: argparse.ArgumentParser, flag: str, values) -> None:
    """An argparse error naming `flag` if `values` holds one value twice."""
    seen = []
    for value in values:
        if value in seen:
            parser.error(f"argument {flag}: {value!r} is given twice; give each once")
        seen.append(value)


def rounds_parser(description: str) -> argparse.ArgumentParser:
    """A parser that shows its defaults, with the `--rounds` every timing has."""
    parser = argparse.ArgumentParser(
        description=description,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--rounds", type=positive_int, default=30, help="interleaved rounds"
    )
    return parser
