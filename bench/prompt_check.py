"""What the trainer's construction-time prompt check costs on a large dataset.

Launch:  python -m bench.prompt_check [--rows 100000] [--chars 8 200]

Builds ``--rows`` random toy-task prompts (digits, ``+`` and ``=``) of each length in ``--chars`` and times
the steps ``GRPOTrainer`` runs on a training set before it trains: ``as_dataset`` (types, empty prompts,
reserved columns), ``prompt_lengths`` (every prompt encoded once, unknown-token text refused) and
``check_prompt_budget`` (truncation count, the model's positions). The toy tokenizer is character-level, so a
prompt of n characters is n tokens. Prints wall-clock seconds per step; run it on an idle machine.
"""

from __future__ import annotations

import argparse
import random
import time
import warnings

from grpo_fast.r1 import toy
from grpo_fast.trainer.inputs import as_dataset, check_prompt_budget, prompt_lengths


def time_check(rows: int, chars: int, seed: int = 0) -> dict[str, float]:
    rng = random.Random(seed)
    data = [{"prompt": "".join(rng.choice("0123456789+=") for _ in range(chars))} for _ in range(rows)]
    tok = toy.build_tokenizer()
    t0 = time.perf_counter()
    dataset = as_dataset(data, "train_dataset")
    t1 = time.perf_counter()
    lengths = prompt_lengths(tok, dataset, "train_dataset")
    t2 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the truncation warning is expected at 200 characters
        check_prompt_budget("train_dataset", lengths, 128, ("max_completion_length", 16), None)
    t3 = time.perf_counter()
    return {"as_dataset": t1 - t0, "prompt_lengths": t2 - t1, "check_prompt_budget": t3 - t2, "total": t3 - t0}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.prompt_check", description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=100_000, help="prompts per run (default 100000)")
    p.add_argument("--chars", type=int, nargs="+", default=[8, 200], help="prompt lengths in characters")
    args = p.parse_args(argv)
    for chars in args.chars:
        times = time_check(args.rows, chars)
        print(f"{args.rows} prompts of {chars} tokens: " + ", ".join(f"{k} {v:.2f} s" for k, v in times.items()))


if __name__ == "__main__":
    main()
