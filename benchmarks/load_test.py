"""Bounded loopback load test of a running `gemma4 serve`: requests/s, tokens/s, latency percentiles.

    python benchmarks/load_test.py --url http://127.0.0.1:8000 --requests 64 --concurrency 16 --max-tokens 32
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

try:
    import httpx2 as httpx
except ImportError:  # pragma: no cover
    import httpx


async def one(client, args, i, latencies, tokens):
    start = time.perf_counter()
    r = await client.post("/v1/completions", json={
        "model": args.model, "prompt": f"Request {i}: tell me a story about", "max_tokens": args.max_tokens,
        "temperature": 0, "ignore_eos": True})
    r.raise_for_status()
    latencies.append(time.perf_counter() - start)
    tokens.append(r.json()["usage"]["completion_tokens"])


async def main(args) -> dict:
    if not args.url.startswith(("http://127.0.0.1", "http://localhost")):
        raise SystemExit("load_test only targets loopback servers")
    latencies, tokens = [], []
    semaphore = asyncio.Semaphore(args.concurrency)
    async with httpx.AsyncClient(base_url=args.url, timeout=args.timeout) as client:
        if args.model is None:
            args.model = (await client.get("/v1/models")).json()["data"][0]["id"]

        async def bounded(i):
            async with semaphore:
                await one(client, args, i, latencies, tokens)

        start = time.perf_counter()
        await asyncio.gather(*(bounded(i) for i in range(args.requests)))
        elapsed = time.perf_counter() - start
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else latencies * 99
    report = {"requests": len(latencies), "seconds": round(elapsed, 3),
              "requests_per_s": round(len(latencies) / elapsed, 2), "tokens_per_s": round(sum(tokens) / elapsed, 1),
              "latency_p50_s": round(q[49], 3), "latency_p90_s": round(q[89], 3), "latency_p99_s": round(q[98], 3)}
    for key, value in report.items():
        print(f"{key:>16}: {value}")
    return report


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", default=None)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--timeout", type=float, default=300)
    asyncio.run(main(parser.parse_args()))
