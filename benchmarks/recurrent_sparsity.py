"""Small trained RWKV, Mamba and xLSTM step graphs: natural and induced sparsity per site type,
and the sequential loss-monitored search (seed 003) at several `loss_inc` values against
uniform thresholds at the same model-wide sparsity.

    python samples/recurrent/train.py                                    # once (~30 min)
    python benchmarks/recurrent_sparsity.py --arch rwkv --loss-inc 1.002 1.01

Calibration on evenly spread 256-token windows of WikiText-2 valid, perplexity on 256-token
windows of test, each window fed token by token through the step graph (state carried, from
the initial state). "Natural" is the exact-zero fraction of a site's input in the dense model,
"induced" the fraction after the search, both measured on test. A site type is a site's
position within its block (the graph's order; for RWKV the paper's order K, R, V, O; channel
mix R, K, and the ReLU-squared value input, which tests/test_step_graphs.py checks).
"""
from __future__ import annotations

import argparse
import collections
import json
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "wikitext-2"
MODELS = REPO / "build" / "recurrent"
RWKV_TYPES = ["time-mix key", "time-mix receptance", "time-mix value", "time-mix output",
              "channel-mix receptance", "channel-mix key", "channel-mix value (relu2)"]


def site_types(arch: str, sites: list[dict], layers: int) -> list[str]:
    """A label per body site: its position within its block."""
    per_block = len(sites) // layers
    if len(sites) != per_block * layers:
        raise SystemExit(f"{arch}: {len(sites)} body sites do not split into {layers} blocks")
    if arch == "rwkv" and per_block == len(RWKV_TYPES):
        return [RWKV_TYPES[i % per_block] for i in range(len(sites))]
    return [f"site {i % per_block} ({sites[i]['macs_per_token'] // 1024}K MACs)" for i in range(len(sites))]


def by_type(types: list[str], sites: list[dict]) -> dict[str, float]:
    """Mean measured sparsity of each site type over the blocks."""
    groups = collections.defaultdict(list)
    for label, site in zip(types, sites):
        groups[label].append(site["sparsity"])
    return {label: sum(v) / len(v) for label, v in groups.items()}


def main(argv=None) -> None:
    import sparsecc
    from sparsecc.calibration import default_cache_dir
    from sparsecc.passes import get

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", nargs="+", default=["rwkv", "mamba", "xlstm"])
    ap.add_argument("--loss-inc", type=float, nargs="+", default=[1.002, 1.01])
    ap.add_argument("--calib-windows", type=int, default=16)
    ap.add_argument("--search-windows", type=int, default=4, help="calibration windows the search's loss is measured on")
    ap.add_argument("--eval-windows", type=int, default=64)
    args = ap.parse_args(argv)
    summary = []
    for arch in args.arch:
        folder = MODELS / arch
        model = folder / "step" / "model.onnx"
        if not model.is_file():
            raise SystemExit(f"{model} not found: run python samples/recurrent/train.py --arch {arch} first")
        layers = json.loads((folder / "config.json").read_text())["num_hidden_layers"]
        calib = sparsecc.data_source(DATA / "valid.txt", folder / "step", 256, args.calib_windows)
        test = sparsecc.data_source(DATA / "test.txt", folder / "step", 256, args.eval_windows)
        dense = sparsecc.evaluate(model, test)["result"]
        body = [s for s in dense["sites"] if not s["head"]]
        types = site_types(arch, body, layers)
        columns = {"natural": by_type(types, body)}
        with tempfile.TemporaryDirectory() as tmp:
            for loss_inc in args.loss_inc:
                out = Path(tmp) / f"seq-{loss_inc}"
                start = time.perf_counter()
                result = sparsecc.compile_model(model, [get("discover-sites")(), get("insert-thresholds")(),
                                                        get("sequential-search")(loss_inc=loss_inc,
                                                                                 windows=args.search_windows)],
                                                calib, out=out, cache_dir=default_cache_dir())
                seconds = time.perf_counter() - start
                search = result.report["passes"][-1]["details"]["search"]
                r = sparsecc.evaluate(out / "model.onnx", test)["result"]
                sparsity = r["macs"]["body"]["sparsity"]
                columns[f"loss_inc {loss_inc}"] = by_type(types, [s for s in r["sites"] if not s["head"]])
                # the peer: one level for every threshold at the sparsity the search reached
                peer_out = Path(tmp) / f"uniform-{loss_inc}"
                sparsecc.compile_model(model, [get("discover-sites")(), get("insert-thresholds")(),
                                               get("calibrate-thresholds")(sparsity=round(sparsity, 4))],
                                       calib, out=peer_out, cache_dir=default_cache_dir())
                peer = sparsecc.evaluate(peer_out / "model.onnx", test)["result"]
                summary.append((arch, loss_inc, sparsity, r["perplexity"], dense["perplexity"], peer["perplexity"],
                                peer["macs"]["body"]["sparsity"], search["forward_passes"], seconds))
                print(f"{arch} loss_inc {loss_inc}: body {sparsity:.1%}, ppl {r['perplexity']:.3f} "
                      f"(dense {dense['perplexity']:.3f}); uniform {peer['perplexity']:.3f}; {seconds:.0f} s", flush=True)
        print(f"\n{arch}: sparsity of each site type's input (mean over {layers} blocks), measured on "
              f"{len(test)} x 256 tokens of test.txt")
        print("| site type | " + " | ".join(columns) + " |")
        print("|---|" + "---|" * len(columns))
        for label in columns["natural"]:
            print(f"| {label} | " + " | ".join(f"{col[label]:.1%}" for col in columns.values()) + " |")
        print(flush=True)
    print(f"Sequential search vs uniform thresholds at the same body sparsity (perplexity on {args.eval_windows} "
          "x 256 tokens of test.txt)")
    print("| model | loss_inc | body sparsity | ppl | vs dense | uniform ppl (body sparsity) | uniform vs dense "
          "| search passes | compile s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for arch, loss_inc, sparsity, ppl, dense_ppl, peer, peer_sparsity, passes, seconds in summary:
        print(f"| {arch} | {loss_inc} | {sparsity:.1%} | {ppl:.3f} | {ppl / dense_ppl - 1:+.1%} | "
              f"{peer:.3f} ({peer_sparsity:.1%}) | {peer / dense_ppl - 1:+.1%} | {passes} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
