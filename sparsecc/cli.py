"""The `sparsecc` command: compile, eval, simulate, sweep, list, export, inspect.

Results go to stdout (JSON with --json); progress and logs to stderr. Errors a user can fix
print one line and exit 2; -v adds tracebacks.
"""
from __future__ import annotations

import argparse
import difflib
import os
import sys
import tempfile
from pathlib import Path

# Light imports only: --version, --help and usage errors answer before onnx_ir, ONNX Runtime,
# numpy or matplotlib are loaded (tests/test_cli.py checks); the commands import the rest.
from sparsecc import __version__, config as cfg, pipeline as pipelines, progress, signals
from sparsecc import report as reports
from sparsecc.errors import SparseccError
from sparsecc.flag_configs import FLAG_CONFIGS

def _add_common(p: argparse.ArgumentParser, top: bool = False) -> None:
    """-v/-q/--json work before or after the subcommand (the subcommand's never reset the top's)."""
    unset = {} if top else {"default": argparse.SUPPRESS}
    p.add_argument("-v", "--verbose", action="count", help="more detail; tracebacks on errors",
                   **({"default": 0} if top else unset))
    p.add_argument("-q", "--quiet", action="store_true", help="no progress or logs on stderr", **unset)
    p.add_argument("--json", action="store_true", help="print results as JSON on stdout, nothing else", **unset)


def _add_data(p: argparse.ArgumentParser, flag: str, help: str, windows_help: str) -> None:
    p.add_argument(flag, dest="data", metavar="PATH", help=help)
    p.add_argument("--tokenizer", metavar="PATH", help="tokenizer.json, a folder holding one, or a .gguf file")
    p.add_argument("--seq-len", type=int, metavar="N", help="tokens per window, BOS included (default 256)")
    p.add_argument("--windows", type=int, metavar="N", help=windows_help)


class _Parser(argparse.ArgumentParser):
    """Usage errors in the same one-line form as every other error, with the nearest valid
    flag, command or choice when one is close (difflib)."""

    words: list[str] = []   # the command line being parsed, for hints in errors

    def error(self, message: str):
        if message.startswith("the following arguments are required"):   # a mistyped flag may be why
            message += self._hint(_Parser.words)
        print(f"sparsecc: error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        raise SystemExit(2)

    def parse_args(self, args=None, namespace=None):
        _Parser.words = list(sys.argv[1:] if args is None else args)
        args, extra = self.parse_known_args(_Parser.words, namespace)
        if extra:
            parser = self._command_parser(args)
            parser.error(f"unrecognized arguments: {' '.join(extra)}{parser._hint(extra)}")
        return args

    def _hint(self, words: list[str]) -> str:
        """`; did you mean --calib?` for the words that look like flags this parser lacks."""
        flags = [f for action in self._actions for f in action.option_strings]
        typed = [w.split("=")[0] for w in words if w.startswith("-") and len(w) > 1]
        close = [m[0] for w in typed if not any(f.startswith(w) for f in flags)
                 if (m := difflib.get_close_matches(w, flags, n=1))]
        return f"; did you mean {', '.join(dict.fromkeys(close))}?" if close else ""

    def _command_parser(self, args) -> argparse.ArgumentParser:
        """The parser of the subcommand `args` ran (this one if none)."""
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction) and getattr(args, action.dest, None) in action.choices:
                return action.choices[getattr(args, action.dest)]
        return self

    def _check_value(self, action, value):
        try:
            super()._check_value(action, value)
        except argparse.ArgumentError as exc:
            close = difflib.get_close_matches(str(value), [str(c) for c in action.choices], n=1)
            if not close:
                raise
            raise argparse.ArgumentError(action, f"{exc.message}; did you mean {close[0]!r}?") from None


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sparsecc", description="Activation-sparsity compiler for event-driven hardware.")
    parser.add_argument("--version", action="version", version=f"sparsecc {__version__}")
    _add_common(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compile", help="insert and calibrate thresholds; write the compiled model and reports",
                       description="Run the pass pipeline on MODEL and write OUT/{model.onnx, report.json, report.md, report.html, config.yaml}.")
    c.add_argument("model", help="input ONNX model (opset 17+), or a compile output folder")
    c.add_argument("-o", "--out", required=True, help="output folder (replaced atomically)")
    c.add_argument("--pipeline", metavar="YAML", help="pipeline file; replaces the pass options below")
    c.add_argument("--target", default="ort", help="backend to lower to (see `sparsecc list backends`)")
    _add_data(c, "--calib", "calibration data: a text file, a folder of .txt files (read recursively), or an .npz of "
              "feeds", f"use N windows (or .npz samples) spread evenly over the data (default {pipelines.CALIB_WINDOWS}; "
              "a larger N than the data holds takes every one)")
    c.add_argument("--allow-test-split", action="store_true", default=None, help="calibrate on files named like a "
                   "test split (test.txt, a test/ folder) too; refused by default")
    c.add_argument("--cache-dir", type=Path, default=None, metavar="DIR", help="calibration cache (default $SPARSECC_CACHE_DIR, else ~/.cache/sparsecc)")
    c.add_argument("--no-cache", action="store_true", help="do not read or write the calibration cache")
    c.add_argument("--quant", choices=sorted(pipelines.QUANT), help="quantize weights first: w8 = int8 per output "
                   "channel, w4 = int4 in groups of 32 input channels (the quantize-weights pass); w8a8 = w8 and "
                   "int8 events (quantize-activations after the thresholds)")
    c.add_argument("--smooth", type=float, metavar="ALPHA", help="move the events' outliers into the weights before "
                   "int8 (SmoothQuant, smooth-activations; ALPHA in [0, 1], e.g. 0.5), folded into norms and up "
                   "projections; thresholds keep their decisions")
    s = c.add_argument_group("threshold search (see `sparsecc list passes -v` for each pass's options)")
    s.add_argument("--search", choices=pipelines.SEARCHES, help="the pass that sets the thresholds (default "
                   "calibrate-thresholds: one level for all); --sparsity and --refine go to it")
    s.add_argument("--search-option", action="append", default=[], metavar="KEY=VALUE",
                   help="an option of the --search pass, e.g. loss_inc=1.0005 or bands=3 (repeatable)")
    s.add_argument("--weight-scores", action="store_true", help="threshold |x| x weight-column norm (WINA; weight-scores)")
    s.add_argument("--compensate-rank", type=int, metavar="R", help="send what each threshold drops through a "
                   "rank-R factor of the weight (R-Sparse; compensate-lowrank); its MACs count in the target")
    s.add_argument("--finetune-steps", type=int, metavar="N", help="then learn every threshold for N steps at the "
                   "same model-wide sparsity (finetune-bands; needs torch)")
    s.add_argument("--distill-steps", type=int, metavar="N", help="then train the weights for N steps with the "
                   "thresholds in place, against the model with them open (distill; needs torch)")
    s.add_argument("--distill-option", action="append", default=[], metavar="KEY=VALUE",
                   help="an option of distill, e.g. samples=2000 or lr=5e-5 (repeatable)")
    c.add_argument("--calib-samples", dest="samples", type=int, metavar="N", help="add N windows sampled from the "
                   "model itself to the calibration data (or use them alone, without --calib; needs torch)")
    c.add_argument("--sample-temperature", type=float, metavar="T", help="temperature of those samples (default 1)")
    c.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="where the PyTorch-based "
                   "work runs (distill, sampling): auto takes a CUDA GPU when there is one (default auto)")
    c.add_argument("--dump-after", action="append", default=[], metavar="PASS",
                   help="write the IR as text after this pass (id or name) to OUT.dumps/")
    group = c.add_argument_group("pass options (from the passes' configs)")
    for name in pipelines.FLAG_PASSES:
        for f in cfg.fields(FLAG_CONFIGS[name]):
            flag = "--" + f.name.replace("_", "-")
            if f.type is bool:
                group.add_argument(flag, dest=f.name, action="store_true", default=None, help=f"[{name}] {f.doc}")
            else:
                group.add_argument(flag, dest=f.name, default=None, choices=f.choices, metavar=None if f.choices else f.type_name().upper(),
                                   help=f"[{name}] {f.doc} ({f'in {f.within}, ' if f.within else ''}default {f.default})")

    e = sub.add_parser("eval", help="perplexity, measured sparsity and output error in ONNX Runtime",
                       description="Evaluate MODEL with the ort backend. For a model written by `sparsecc compile`, the "
                                   "tokenizer, window length and reference (the uncompiled source) default to its config.yaml.")
    e.add_argument("model", nargs="+", help="ONNX model, or a compile output folder (OUT/ or OUT/model.onnx); several (e.g. compiled at different "
                   "targets): one report comparing them, with the sparsity/accuracy curve")
    _add_data(e, "--ppl", "evaluation text (file or folder) for perplexity, or an .npz of feeds",
              "use N windows spread evenly over the data (default: every one)")
    e.add_argument("--reference", metavar="MODEL", help="model (or compile output folder) to compare outputs with (default: the compiled model's source)")
    e.add_argument("--no-reference", action="store_true", help="skip the comparison")
    e.add_argument("-o", "--out", help="also write report.json, report.md and report.html to this folder")

    sm = sub.add_parser("simulate", help="run a seneca compile on the bundled instruction-level simulator",
                        description="Simulate DIR (written by `sparsecc compile ... --target seneca -o DIR`) on windows of "
                                    "--tokens tokens, sparse and dense baseline, checked against the ort backend; "
                                    "writes report.json, report.md and report.html to DIR/simulation (or -o).")
    sm.add_argument("dir", help="output folder of compile --target seneca (or its model.onnx)")
    sm.add_argument("--text", dest="data", metavar="PATH", required=True,
                    help="text file or folder to take the tokens from, or an .npz of feeds")
    sm.add_argument("--tokenizer", metavar="PATH", help="tokenizer (default: the one the model was compiled with)")
    sm.add_argument("--tokens", type=int, default=64, metavar="N", help="tokens per window, BOS included (default 64)")
    sm.add_argument("--windows", type=int, default=1, metavar="N", help="windows spread over the text (default 1)")
    sm.add_argument("--no-compare", action="store_true", help="skip the check against the ort backend")
    sm.add_argument("--positions", type=int, nargs="+", metavar="P",
                    help="step graphs: also the per-token cost at these context positions (state brought to P "
                         "with ONNX Runtime on the text's first tokens, then simulated)")
    sm.add_argument("--position-tokens", type=int, default=2, metavar="N",
                    help="tokens simulated at each of --positions (default 2)")
    sm.add_argument("-o", "--out", help="report folder (default DIR/simulation; replaced atomically)")

    ls = sub.add_parser("list", help="list passes, backends or targets")
    ls.add_argument("what", choices=["passes", "backends", "targets"])

    ex = sub.add_parser("export", help="export a transformers causal LM as an ONNX window or step graph",
                        description="Export MODEL (a transformers folder or a .gguf file: any causal LM that "
                                    "torch.onnx.export(dynamo=True) takes, e.g. Llama, Qwen2/3, Gemma 2/3, Phi-3, Mistral, "
                                    "GPT-2, OPT, GPT-NeoX, RWKV, Mamba, xLSTM) as an ONNX window graph (input_ids -> logits) "
                                    "or step graph (input_ids + state -> logits + new state; the KV cache for attention "
                                    "models), and check it against PyTorch; writes OUT/{model.onnx, report.json} and the "
                                    "tokenizer beside (needs the export extra).")
    ex.add_argument("model", help="transformers model folder (config.json + weights) or .gguf file")
    ex.add_argument("-o", "--out", required=True, help="output folder (replaced atomically)")
    ex.add_argument("--graph", choices=["window", "step"], default="step",
                    help="window: the whole sequence at once (what compile and eval take for any model); step: one token "
                         "with its state (default step)")
    ex.add_argument("--check-tokens", type=int, default=16, metavar="N",
                    help="tokens the ONNX Runtime vs PyTorch check runs on (a step graph: one at a time; default 16)")
    ex.add_argument("--check-text", metavar="PATH", help="take them from the start of this text (default: random tokens)")
    ins = sub.add_parser("inspect", help="sites, shapes, thresholds and placement of a model or a compile output",
                         description="Show what PATH holds without running it: every linear site (label, layer, shape, MACs "
                                     "per token, group, threshold and its t), and for a compile output folder the "
                                     "calibrated sparsity per threshold (report.json) and the cores of each site "
                                     "(placement.json). One `kind key=value` record per line; --json for one document.")
    ins.add_argument("path", help="an .onnx model, or the -o folder of `sparsecc compile`")
    sw = sub.add_parser("sweep", help="compile, evaluate (and simulate) a grid of configurations as Ray tasks",
                        description="Run every cell of SWEEP (a sweep file: models, data, eval settings, a grid or list "
                                    "of compile configurations) as a Ray task: compile, eval, and simulate for seneca. "
                                    "Each cell goes to OUT/cells/NAME (atomically; complete cells are skipped when run "
                                    "again), then OUT/report.{json,md,html}: one eval-sweep report with a row per cell. "
                                    "Needs the sweep extra (Ray). Exit 1 when a cell failed.")
    sw.add_argument("sweep", help="sweep file (YAML, schema sparsecc.sweep/1; see samples/sweep.yaml)")
    sw.add_argument("-o", "--out", required=True, help="output folder (kept between runs: complete cells are reused)")
    sw.add_argument("--address", metavar="ADDR", help="join this Ray cluster (e.g. auto, or HOST:6379) instead of "
                    "starting Ray on this machine")
    sw.add_argument("--cpus", type=int, metavar="N", help="CPUs of the Ray runtime started here (default: every core)")
    sw.add_argument("--cache-dir", type=Path, default=None, metavar="DIR", help="calibration cache the cells share "
                    "(default $SPARSECC_CACHE_DIR, else ~/.cache/sparsecc; a folder every node can reach, for a cluster)")
    sw.add_argument("--no-cache", action="store_true", help="do not read or write the calibration cache")
    for p in (c, e, sm, ls, ex, ins, sw):
        _add_common(p)
    return parser


def _compile(args) -> dict:
    from sparsecc import compiler
    from sparsecc.calibration import default_cache_dir
    from sparsecc.data import tokenizer_file
    from sparsecc.model_io import check_output_dir, input_files, model_file

    named = ("search_options", "distill_options")
    flag_values = {name: getattr(args, name) for name in pipelines.option_names() if name not in named}
    flag_values["search_option"] = args.search_option or None
    flag_values["distill_option"] = args.distill_option or None
    flag_values["weight_scores"] = args.weight_scores or None
    flag_values = {k: v for k, v in flag_values.items() if v is not None and k != "quant"}
    if args.pipeline:
        if args.quant:
            flag_values["quant"] = args.quant
        if flag_values:
            raise SparseccError(f"--{next(iter(flag_values)).replace('_', '-')} conflicts with --pipeline; "
                                "set pass options in the pipeline file")
        passes, data = pipelines.load(args.pipeline)
    else:
        options = {name: getattr(args, name) for name in pipelines.option_names()
                   if name not in ("search_options", "distill_options")}
        options["search_options"] = _key_values(args.search_option, "--search-option")
        options["distill_options"] = _key_values(args.distill_option, "--distill-option")
        # no calibration data and no sparsity asked for: compile the model as it is (no thresholds)
        given = args.data is not None or args.samples is not None or args.sparsity is not None
        passes = pipelines.from_options(options, thresholds=given)
        data = {}
    flags = {key: getattr(args, "data" if key == "calib" else key) for key in pipelines.DATA_KEYS}
    data = compiler.resolved_data(data, flags)   # flags override the pipeline file's data
    cache = None if args.no_cache else (args.cache_dir or default_cache_dir())
    # the destination before any work (reading the data included); compile_model checks again
    reads = [*input_files(model_file(args.model)), *([args.pipeline] if args.pipeline else []),
             *([data["calib"]] if data.get("calib") else []), *([cache] if cache else []),
             *([tokenizer_file(data["tokenizer"])] if data.get("tokenizer") else [])]
    check_output_dir(Path(args.out), reads)
    source = compiler.data_source(data.get("calib"), data.get("tokenizer"), data["seq_len"], data.get("windows"),
                                  data.get("samples", 0), args.model, data.get("sample_temperature", 1.0),
                                  args.device, cache)
    result = compiler.compile_model(args.model, passes, source, out=args.out, target=args.target, data=data,
                                    cache_dir=cache, dump_after=tuple(args.dump_after), device=args.device,
                                    allow_test_split=bool(data.get("allow_test_split")))
    setters = [p for p in result.report["passes"] if "calibrated_model_sparsity" in p["details"]]
    if not args.json and setters:
        last = setters[-1]
        target = f"target {last['details']['target']:.0%}, " if "target" in last["details"] else ""
        searches = [f"; {'' if p is last else p['id'] + ': '}{text}" for p in setters if (text := reports.search_summary(p))]
        print(f"{last['pass']}: {target}calibrated model-wide sparsity "
              f"{last['details']['calibrated_model_sparsity']:.1%}{''.join(searches)} -> {Path(args.out) / 'model.onnx'}")
    return result.report


def _key_values(items: list[str], flag: str) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SparseccError(f"{flag} takes KEY=VALUE (got {item!r}), e.g. {flag} loss_inc=1.0005")
        out[key.strip()] = value.strip()
    return out


def _eval(args) -> dict:
    from sparsecc import compiler
    from sparsecc.data import tokenizer_file
    from sparsecc.model_io import check_output_dir, input_files, model_file

    if args.data is None:
        raise SparseccError("eval needs data: pass --ppl TEXT (with --tokenizer) or --ppl FEEDS.npz")
    plans = []
    for path in args.model:
        model = model_file(path)   # a compile output folder names its model.onnx
        saved = compiler.compiled_config(model)
        reference = None if args.no_reference else (args.reference or saved.get("source"))
        if reference is not None and Path(reference).resolve() == model.resolve():
            named = "--reference names" if args.reference else f"its {compiler.CONFIG} names (compiled into its own folder)"
            raise SparseccError(f"{model}: {named} the model itself as the reference, so the comparison would "
                                "be with itself; pass --reference SOURCE.onnx (the uncompiled model) or --no-reference")
        plans.append((model, saved, reference))
    if args.out:  # before the long part, not after it; never over what the eval reads
        reads = [f for model, _, reference in plans for m in (model, reference) if m is not None
                 for f in input_files(m)]
        check_output_dir(Path(args.out), reads + [args.data] + ([tokenizer_file(args.tokenizer)] if args.tokenizer else []))
    runs = []
    for model, saved, reference in plans:
        data = saved.get("data", {})
        source = compiler.data_source(args.data, args.tokenizer or data.get("tokenizer"),
                                      args.seq_len or data.get("seq_len", 256), args.windows)
        runs.append(compiler.evaluate(model, source, reference))
    # several models: one report comparing them (report_page draws their sparsity/accuracy curve)
    result = runs[0] if len(runs) == 1 else {"schema": reports.SCHEMA, "kind": "eval-sweep", "sparsecc": __version__,
                                             "runs": runs}
    if args.out:
        compiler.write_eval_report(args.out, result)
    if not args.json:
        for run in runs:
            label = f"{run['model']}: " if len(runs) > 1 else ""
            print(label + reports.eval_summary(run["result"]).replace("\n", "; " if label else "\n"))
    return result


def _simulate(args) -> dict:
    from sparsecc import backends, compiler
    from sparsecc.backends.seneca.simulation import check_compiled, simulate
    from sparsecc.data import tokenizer_file
    from sparsecc.model_io import check_output_dir, input_files, model_file

    folder = Path(args.dir)
    folder = model_file(folder).parent if folder.is_file() else folder   # the compile output folder, or its model.onnx
    if not folder.is_dir():
        raise SparseccError(f"{folder} is not a folder; pass the -o folder of `sparsecc compile ... --target seneca`")
    check_compiled(folder)
    if args.tokens < 2 or args.windows < 1:
        raise SparseccError("--tokens must be at least 2 and --windows at least 1")
    out = Path(args.out) if args.out else folder / "simulation"
    saved = compiler.compiled_config(folder / "model.onnx").get("data", {})
    tokenizer = args.tokenizer or saved.get("tokenizer")
    # DIR's own files (model, placement, target, ...) and the text: -o DIR would replace them
    reads = [*(p for p in folder.iterdir() if p.is_file()), *input_files(folder / "model.onnx"), args.data]
    check_output_dir(out, reads + ([tokenizer_file(tokenizer)] if tokenizer else []))
    source = compiler.data_source(args.data, tokenizer, args.tokens, args.windows)
    positions = tuple(args.positions or ())
    if positions and (min(positions) < 0 or args.position_tokens < 1):
        raise SparseccError("--positions must be 0 or more and --position-tokens at least 1")
    # one window long enough to reach the last position (BOS included)
    at = compiler.data_source(args.data, tokenizer, max(positions) + args.position_tokens, 1) if positions else None
    result = simulate(folder, source, compare=not args.no_compare, positions=positions, position_source=at,
                      position_tokens=args.position_tokens)
    speed = compiler.write_simulation_report(out, result)
    if not args.json:
        print(backends.report_section(result).summary(result, speed))
    return result


def _list(args) -> dict:
    from sparsecc import backends, passes

    if args.what == "passes":
        rows = {name: {"summary": cls.summary(), "options": cfg.schema(cls.Config)}
                for name, cls in sorted(passes.registry().items())}
    elif args.what == "backends":
        rows = {name: {"summary": cls.description} for name, cls in backends.registry().items()}
    else:
        from sparsecc.backends.seneca.target import builtin, load_target

        rows = {}
        for name in builtin():
            t = load_target(name)
            rows[name] = {"summary": f"{t.cores} cores ({t['mesh']['rows']}x{t['mesh']['cols']}): {t.description}",
                          "file": str(t.path), "assumed": t.assumptions()}
    if not args.json:
        for name, row in rows.items():
            print(f"{name:24} {row['summary']}")
            if args.verbose and args.what == "passes":
                for f in cfg.fields(passes.get(name).Config):
                    print(f"    {f.name} ({f.kind()}, default {f.default}): {f.doc}")
            if args.verbose and args.what == "targets":
                print(f"    file: {row['file']}\n    assumed (not published): {', '.join(row['assumed'])}")
    return rows


def _export(args) -> dict:
    from sparsecc.export import export

    report = export(args.model, args.out, graph=args.graph, check_tokens=args.check_tokens, text=args.check_text)
    if not args.json:
        check = report["check"]
        if report["graph"] == "step":
            growth = (f"+{report['state_bytes_per_token']} bytes per token" if report["state_grows"]
                      else f"{report['state_bytes']} bytes, constant")
            form = f"step graph, {report['states']} states ({growth})"
        else:
            form = "window graph"
        print(f"{report['arch']} {form}; ONNX Runtime = PyTorch over "
              f"{check['tokens']} tokens (max |diff| {check['max_abs_diff']:.2g}) -> {Path(args.out) / 'model.onnx'}")
    return report


def _inspect(args) -> dict:
    from sparsecc.inspection import inspect_path, to_text

    doc = inspect_path(args.path)
    if not args.json:
        sys.stdout.write(to_text(doc))
    return doc


def _sweep(args) -> dict:
    from sparsecc.calibration import default_cache_dir
    from sparsecc.sweep import run_sweep

    if args.cpus is not None and (args.cpus < 1 or args.address):
        raise SparseccError("--cpus must be at least 1, and sets the Ray runtime started here: drop it with --address")
    cache = None if args.no_cache else (args.cache_dir or default_cache_dir())
    report = run_sweep(args.sweep, args.out, address=args.address, cpus=args.cpus, cache_dir=cache)
    if not args.json:
        s = report["sweep"]
        print(f"{s['ok']} of {s['cells']} cells complete, {s['failed']} failed -> {Path(args.out) / 'report.html'}")
        for row in report["cells"]:
            if row["status"] != "ok":
                print(f"{row['cell']}: failed: {row['error']}")
    return report


def main(argv: list[str] | None = None) -> int:
    signals.install(("SIGTERM", "SIGHUP"))  # unwind like Ctrl-C (the entry point handles SIGINT too)
    try:
        with signals.as_interrupt():
            args = build_parser().parse_args(argv)   # imports every pass: a while
    except KeyboardInterrupt:
        print("sparsecc: interrupted while starting; no output written", file=sys.stderr)
        return signals.exit_code()
    progress.set_verbosity(0 if args.quiet or args.json else 1 + args.verbose)
    try:
        with signals.as_interrupt():
            result = {"compile": _compile, "eval": _eval, "simulate": _simulate, "list": _list,
                      "export": _export, "inspect": _inspect, "sweep": _sweep}[args.command](args)
    except SparseccError as exc:
        if args.verbose:
            raise
        print(f"sparsecc: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        kept = "the complete cells are kept; run it again to go on" if args.command == "sweep" else "no output written"
        print(f"sparsecc: interrupted; {kept}", file=sys.stderr)
        return signals.exit_code()
    except BrokenPipeError:  # stdout closed early (e.g. piped into `head`): not an error
        sys.stdout = open(os.devnull, "w")
        return 0
    except OSError as exc:  # a write outside the output folder (TMPDIR's model copy, the cache) failed
        from sparsecc.model_io import write_error

        error = write_error(exc, "a temporary file", within=Path(tempfile.gettempdir()), fix=f"free some space or raise the limit "
                            f"(temporary files go to {tempfile.gettempdir()}: set TMPDIR to move them)")
        if error is None or args.verbose:
            raise
        print(f"sparsecc: error: {error}", file=sys.stderr)
        return error.exit_code
    if args.json:
        print(reports.dumps(result), end="")
    return 1 if args.command == "sweep" and result["sweep"]["failed"] else 0


if __name__ == "__main__":
    from sparsecc.__main__ import main as entry

    sys.exit(entry())
