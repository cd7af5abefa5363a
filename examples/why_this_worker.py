"""Asks the router why a prompt would go where it goes (a dry run: nothing changes).

The same data as `sglang-dp inspect-tree --prompt ...`, from `POST /debug/route`.

    python examples/why_this_worker.py --url http://127.0.0.1:30000 "Your prompt here"
"""

from __future__ import annotations

import argparse
import json
import urllib.request


def main(url: str, prompt: str) -> None:
    body = json.dumps({"text": prompt}).encode()
    request = urllib.request.Request(url + "/debug/route?path=/generate", body)
    with urllib.request.urlopen(request, timeout=10) as reply:
        route = json.load(reply)
    decision = route["decision"]
    print(
        f"→ {decision['worker']} ({decision['reason']}, policy {decision['policy']}): "
        f"matches {decision['matched']} of {route['key_length']} characters"
    )
    for worker in route["workers"]:
        print(
            f"  {worker['url']}: matched {worker['matched']}, {worker['load']} in flight, "
            f"{worker['pending']} uncached characters pending"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:30000")
    parser.add_argument("prompt", nargs="?", default="Hello, who are you?")
    args = parser.parse_args()
    main(args.url.rstrip("/"), args.prompt)
