"""Remote inputs (issue 21 §4): `inspect` of a remote sharded ~4 GB model transfers ≤ 1.1× the
bytes of its headers and index; `filter --keep` of one layer transfers ≤ 1.05× that layer's bytes
+ the headers. Also timed, against a baseline in the same session: `convert` of one whole remote
shard vs `curl` of it followed by `sync` of the file (every ckptsurgery output is made durable before
it is renamed into place), and the local commands on the same files.

The model, built once in WORKDIR/remote/org/model (bench/out/, git-ignored): a Llama-shaped bf16
state dict (hidden 4096, ffn 11008, vocab 32000, --layers 9 by default: 4.2 GB) in four shards
with a `model.safetensors.index.json`, as `save_pretrained` writes it. The values are not random
(ones: what is measured is bytes and time, not arithmetic), so building takes seconds.

Served by tests/remote_server.py (Python's ThreadingHTTPServer with Range support, on 127.0.0.1;
it playing the Hub: `hf://org/model` resolved with HF_ENDPOINT pointed at it, redirected to its
/cdn/ path) in a process of its own; it counts the body bytes it sends (`/__served`). The bytes
below are the server's count, which the command's own `--json` `fetched.bytes` must equal.

Run: .venv/bin/python bench/bench_remote.py --runs 3 [--workdir DIR] [--layers 9]"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request

from common import CLI, HERE, REPO

BUILD = """
import json, os, sys, torch
from safetensors.torch import save_file
folder, layers = sys.argv[1], int(sys.argv[2])
h, ff, vocab = 4096, 11008, 32000
names = {"model.embed_tokens.weight": (vocab, h)}
for i in range(layers):
    p = f"model.layers.{i}."
    for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
        names[p + f"self_attn.{n}.weight"] = (h, h)
    names[p + "mlp.gate_proj.weight"] = (ff, h); names[p + "mlp.up_proj.weight"] = (ff, h)
    names[p + "mlp.down_proj.weight"] = (h, ff)
    names[p + "input_layernorm.weight"] = (h,); names[p + "post_attention_layernorm.weight"] = (h,)
names["model.norm.weight"] = (h,); names["lm_head.weight"] = (vocab, h)
keys = list(names)
shards, per = 4, -(-len(keys) // 4)
weight_map = {}
for s in range(shards):
    shard = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
    part = keys[s * per:(s + 1) * per]
    save_file({k: torch.ones(names[k], dtype=torch.bfloat16) for k in part}, os.path.join(folder, shard),
              metadata={"format": "pt"})
    weight_map.update({k: shard for k in part})
with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f, indent=2)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def served(url: str) -> dict:
    with urllib.request.urlopen(f"{url}/__served") as answer:
        return json.load(answer)


def header_bytes(path: str) -> int:
    with open(path, "rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--workdir", default=os.path.join(HERE, "out"))
    parser.add_argument("--layers", type=int, default=9)
    args = parser.parse_args()
    root = os.path.join(args.workdir, "remote")
    model = os.path.join(root, "org", "model")
    os.makedirs(model, exist_ok=True)
    index = os.path.join(model, "model.safetensors.index.json")
    if not os.path.exists(index):
        subprocess.run([sys.executable, "-c", BUILD, model, str(args.layers)], check=True)
    shards = sorted(n for n in os.listdir(model) if n.endswith(".safetensors"))
    total = sum(os.path.getsize(os.path.join(model, n)) for n in shards)
    headers = sum(header_bytes(os.path.join(model, n)) for n in shards) + os.path.getsize(index)
    with open(index) as f:
        weight_map = json.load(f)["weight_map"]
    layer = "model.layers.3."  # the keys counted; --keep takes the module name
    layer_shards = {weight_map[k] for k in weight_map if k.startswith(layer)}
    from safetensors import safe_open

    layer_bytes = 0
    for name in layer_shards:
        with safe_open(os.path.join(model, name), "np") as f:
            layer_bytes += sum(2 * _numel(f.get_slice(k).get_shape()) for k in f.keys() if k.startswith(layer))  # bf16

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, os.path.join(REPO, "tests", "remote_server.py"), root, str(port)])
    env = dict(os.environ, HF_ENDPOINT=url)
    out = os.path.join(args.workdir, "remote-out")
    os.makedirs(out, exist_ok=True)
    try:
        for _ in range(100):
            try:
                served(url)
                break
            except OSError:
                time.sleep(0.05)
        big = shards[1]
        cases = {
            "inspect hf://org/model --json": [*CLI, "inspect", "hf://org/model", "--json"],
            "inspect (local folder) --json": [*CLI, "inspect", model, "--json"],
            f"filter hf://org/model --keep {layer}": [*CLI, "filter", "hf://org/model", "--keep", layer[:-1], "-o",
                                                       os.path.join(out, "layer.safetensors"), "--force", "--json"],
            f"filter (local) --keep {layer}": [*CLI, "filter", model, "--keep", layer[:-1], "-o",
                                               os.path.join(out, "layer-local.safetensors"), "--force"],
            f"convert hf://org/model/{big}": [*CLI, "convert", f"hf://org/model/{big}", "-o",
                                              os.path.join(out, "shard.safetensors"), "--force", "--json"],
            # the baseline: the same bytes downloaded, and made durable as every ckptsurgery output is
            f"curl {big} && sync": ["sh", "-c", f"curl -s -o {out}/shard-curl {url}/cdn/org/model/{big} && "
                                                f"sync {out}/shard-curl"],
        }
        times = {k: [] for k in cases}
        peaks = {k: [] for k in cases}
        transferred: dict[str, list[int]] = {k: [] for k in cases}
        fetched: dict[str, int] = {}
        for _ in range(args.runs):
            for name, command in cases.items():
                served(url)
                os.sync()
                started = time.perf_counter()
                result = subprocess.run(["/usr/bin/time", "-f", "%M", *command], env=env, capture_output=True,
                                        text=True, check=True)
                times[name].append(time.perf_counter() - started)
                peaks[name].append(int(result.stderr.strip().splitlines()[-1]) * 1024)
                transferred[name].append(served(url)["bytes"])
                if "--json" in command and name.startswith(("inspect hf", "filter hf", "convert hf")):
                    fetched[name] = json.loads(result.stdout)["fetched"]["bytes"]
    finally:
        server.terminate()
        server.wait()
        for name in os.listdir(out):
            os.unlink(os.path.join(out, name))
    print(f"model: {len(weight_map)} tensors, {total / 1e9:.2f} GB in {len(shards)} shards; headers + index "
          f"{headers:,} B; {layer}*: {layer_bytes:,} B in {len(layer_shards)} shard(s)\n")
    print("| case | median wall (s) | peak RSS (MB) | bytes served |")
    print("|---|---:|---:|---:|")
    for name in cases:
        print(f"| {name} | {statistics.median(times[name]):.3f} | {max(peaks[name]) / 1e6:.0f} | "
              f"{max(transferred[name]):,} |")
    inspect_bytes = max(transferred["inspect hf://org/model --json"])
    filter_bytes = max(transferred[f"filter hf://org/model --keep {layer}"])
    shard_time = statistics.median(times[f"convert hf://org/model/{big}"])
    curl_time = statistics.median(times[f"curl {big} && sync"])
    print("\n| ratio | value | target |")
    print("|---|---:|---:|")
    print(f"| inspect: bytes / (headers + index) | {inspect_bytes / headers:.3f} | ≤ 1.1 |")
    print(f"| filter one layer: bytes / (layer + headers + index) | "
          f"{filter_bytes / (layer_bytes + headers):.4f} | ≤ 1.05 |")
    print(f"| convert one shard / curl of it + sync (time) | {shard_time / curl_time:.2f} | (none) |")
    print(f"\nthe commands' own --json fetched.bytes: {fetched}")


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


if __name__ == "__main__":
    main()
