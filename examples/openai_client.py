"""Talks to the router with the official `openai` client: a chat, then a streamed chat.

python examples/openai_client.py --url http://127.0.0.1:30000
"""

from __future__ import annotations

import argparse

import openai


def main(url: str) -> None:
    client = openai.OpenAI(base_url=url + "/v1", api_key="not-needed-without-api-key")
    messages = [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "Name three prime numbers."},
    ]
    raw = client.chat.completions.with_raw_response.create(
        model="default",
        messages=messages,
        max_tokens=16,  # type: ignore[arg-type]
    )
    reply = raw.parse()
    print("worker:", raw.headers.get("x-sglang-dp-worker"))
    print("answer:", reply.choices[0].message.content)
    print("streamed:", end="", flush=True)
    stream = client.chat.completions.create(
        model="default",
        messages=messages,  # type: ignore[arg-type]
        max_tokens=16,
        stream=True,
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            print(chunk.choices[0].delta.content, end="", flush=True)
    print()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:30000")
    main(parser.parse_args().url.rstrip("/"))
