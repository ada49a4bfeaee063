"""Pipelines: an explicit, ordered list of passes, built in Python or read from YAML.

    schema: sparsecc.pipeline/1
    passes:
      - pass: discover-sites
      - pass: insert-thresholds
        per_consumer: false
      - pass: calibrate-thresholds
        id: calibrate-50          # optional; ids must be unique, so a pass can run twice
        sparsity: 0.5
    data:                         # optional: calibration data, as the CLI's --calib options
      calib: ../shared/data/wikitext-2/valid.txt
      tokenizer: samples/tiny_llama
      seq_len: 256
      windows: 64                 # default 128 (CALIB_WINDOWS)
      allow_test_split: false     # true: calibrate on files named like a test split too

The `config.yaml` that `sparsecc compile` writes next to its outputs is in this format, with
every option resolved, so it can be passed back with `--pipeline` to reproduce the run.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from sparsecc import config as cfg
from sparsecc.errors import SparseccError, excerpt
from sparsecc.flag_configs import FLAG_CONFIGS
from sparsecc.pass_manager import Pass

SCHEMA = "sparsecc.pipeline/1"
# Calibration windows (or .npz samples) compile takes when `windows` is not given, spread evenly
# over the data: on SmolLM2-135M, 128 x 256 tokens of WikiText-2 valid give thresholds within
# 1% of those of 384 windows (benchmarks/calibration_windows.py, RESULTS.md).
CALIB_WINDOWS = 128
DATA_KEYS = ("calib", "tokenizer", "seq_len", "windows", "samples", "sample_temperature", "allow_test_split")


# --quant choices -> quantize-weights options (and quantize-activations for int8 events)
QUANT = {"w8": {"bits": 8}, "w4": {"bits": 4, "group": 32}, "w8a8": {"bits": 8}}
EVENTS8 = {"w8a8"}


# Passes that set the thresholds (--search); calibrate-thresholds is the default.
SEARCHES = ("calibrate-thresholds", "allocate-sparsity", "greedy-blocks", "sequential-search")


def default_pipeline(sparsity: float = 0.5, mode: str = "mac-weighted", per_consumer: bool = False,
                     include_head: bool = False, refine: int = 1,
                     refine_every: int = FLAG_CONFIGS["calibrate-thresholds"].refine_every, quant: str | None = None,
                     thresholds: bool = True, search: str = "calibrate-thresholds",
                     search_options: dict[str, Any] | None = None, weight_scores: bool = False,
                     compensate_rank: int = 0, finetune_steps: int = 0, distill_steps: int = 0,
                     distill_options: dict[str, Any] | None = None, smooth: float | None = None) -> list[Pass]:
    """The standard sparsification pipeline; with `quant` ("w8", "w4", "w8a8"), weights are
    quantized first, so thresholds are calibrated on the quantized model; "w8a8" then
    quantizes the sites' inputs to int8 (raising thresholds to the quantizer's zero band).
    `thresholds=False`: no thresholds (a model compiled as it is, e.g. a QDQ model for the
    seneca backend).

    `search` names the pass that sets the thresholds (one of SEARCHES), with `sparsity`,
    `refine` and `refine_every` where it has them and `search_options` for the rest. `weight_scores` thresholds
    on |x| x weight-column norm (weight-scores), `compensate_rank` > 0 adds low-rank
    compensation (compensate-lowrank), `finetune_steps` > 0 learns the bands afterwards
    (finetune-bands) and `distill_steps` > 0 then trains the weights with the thresholds in
    place (distill, with `distill_options`). `smooth` (an alpha in [0, 1]) moves the events'
    outliers into the weights first (smooth-activations, SmoothQuant), between inserting the
    thresholds and quantizing the weights, for int8 events."""
    from sparsecc import passes

    if distill_options and not distill_steps:
        raise SparseccError("distill options given without distill steps: add --distill-steps N")
    if quant is not None and quant not in QUANT:
        raise SparseccError(f"unknown weight quantization {excerpt(quant)}; choose one of {', '.join(QUANT)}")
    if quant in EVENTS8 and not thresholds:
        raise SparseccError(f"--quant {quant} calibrates int8 events: pass --calib (text + --tokenizer, or an .npz)")
    extras = (weight_scores or compensate_rank or finetune_steps or distill_steps or search_options
              or search != SEARCHES[0])
    if smooth is not None and not thresholds:
        raise SparseccError("smoothing measures the events on calibration data: pass --calib (text + --tokenizer, "
                            "or an .npz)")
    if extras and not thresholds:
        raise SparseccError("a threshold search, weight scores, compensation or fine-tuning needs calibration "
                            "data: pass --calib (text + --tokenizer, or an .npz)")
    steps = [
        *([passes.get("weight-scores")()] if weight_scores else []),
        *([passes.get("compensate-lowrank")(rank=compensate_rank)] if compensate_rank else []),
        _search(search, sparsity, mode, refine, refine_every, search_options or {}),
        *([passes.get("finetune-bands")(steps=finetune_steps)] if finetune_steps else []),
        *([_distill(distill_steps, distill_options or {})] if distill_steps else []),
    ] if thresholds else []
    insert = [passes.get("insert-thresholds")(per_consumer=per_consumer, include_head=include_head)] if thresholds else []
    weights = [passes.get("quantize-weights")(**QUANT[quant])] if quant else []
    # smoothing changes the weights, so it comes before they are quantized; the thresholds it
    # rescales (keeping their decisions) are in place by then
    early = [*insert, passes.get("smooth-activations")(alpha=smooth), *weights] if smooth is not None else \
        [*weights, *insert]
    return [
        passes.get("discover-sites")(),
        *early,
        *steps,
        *([passes.get("quantize-activations")()] if quant in EVENTS8 else []),
    ]


def _distill(steps: int, options: dict[str, Any]) -> Pass:
    from sparsecc import passes

    cls = passes.get("distill")
    return cls(cfg.build(cls.Config, {"steps": steps} | options, "distill"))


def _search(name: str, sparsity: float, mode: str, refine: int, refine_every: int, options: dict[str, Any]) -> Pass:
    """The threshold-setting pass `name`, given the target and refinement where it takes them."""
    from sparsecc import passes

    if name not in SEARCHES:
        raise SparseccError(f"unknown search {excerpt(name)}; choose one of {', '.join(SEARCHES)}")
    cls = passes.get(name)
    known = {f.name for f in cfg.fields(cls.Config)}
    if mode != "mac-weighted" and "mode" not in known:
        raise SparseccError(f"--mode {mode} applies to calibrate-thresholds only; {name} meets a model-wide target")
    given = {"sparsity": sparsity, "refine": refine, "refine_every": refine_every, "mode": mode}
    values = {k: v for k, v in given.items() if k in known} | options
    return cls(cfg.build(cls.Config, values, name))


# The passes whose options are compile flags (--sparsity, --mode, ...; from their typed configs),
# and the other flags that shape the pipeline, with their types (for sweep files).
FLAG_PASSES = tuple(FLAG_CONFIGS)
PIPELINE_FLAGS = {"quant": str, "search": str, "search_options": dict, "weight_scores": bool,
                  "compensate_rank": int, "finetune_steps": int, "distill_steps": int, "distill_options": dict,
                  "smooth": float}


def option_names() -> list[str]:
    """Every compile option `from_options` takes: the FLAG_PASSES' config fields, then PIPELINE_FLAGS."""
    return [f.name for name in FLAG_PASSES for f in cfg.fields(FLAG_CONFIGS[name])] + list(PIPELINE_FLAGS)


def from_options(options: dict[str, Any], thresholds: bool, where: str = "") -> list[Pass]:
    """The pipeline that compile options describe (the compile flags, underscored: sparsity,
    mode, search, search_options, quant, ...; None = not given); `thresholds`: whether to
    threshold at all (compile does when given calibration data or a sparsity). `where`
    prefixes errors (a sweep file's cell)."""
    from sparsecc import passes

    at = f"{where}: " if where else ""
    unknown = sorted(set(options) - set(option_names()))
    if unknown:
        raise SparseccError(f"{at}unknown option {excerpt(unknown[0])}; valid options: {', '.join(option_names())}")
    for key, kind in PIPELINE_FLAGS.items():
        value = options.get(key)
        allowed = (int, float) if kind is float else kind   # an alpha of 1 is a number too
        if value is not None and (not isinstance(value, allowed) or (kind is not bool and isinstance(value, bool))):
            raise SparseccError(f"{at}{key} must be {'a mapping' if kind is dict else 'a number' if kind is float else kind.__name__} "
                                f"(got {excerpt(value)})")
    configs = {}
    for name in FLAG_PASSES:
        cls = passes.get(name)
        own = {f.name: options[f.name] for f in cfg.fields(cls.Config) if options.get(f.name) is not None}
        configs |= cfg.to_dict(cfg.build(cls.Config, own, at + name))  # validates early, under the pass's name
    if options.get("search") == "sequential-search" and options.get("sparsity") is not None:
        raise SparseccError(f"{at}sequential-search has no sparsity target: its knob is loss_inc "
                            "(search option loss_inc=1.0005); drop the sparsity")
    try:
        return default_pipeline(**configs, quant=options.get("quant"), thresholds=thresholds,
                                search=options.get("search") or SEARCHES[0], search_options=options.get("search_options"),
                                weight_scores=bool(options.get("weight_scores")),
                                compensate_rank=options.get("compensate_rank") or 0,
                                finetune_steps=options.get("finetune_steps") or 0,
                                distill_steps=options.get("distill_steps") or 0,
                                distill_options=options.get("distill_options"),
                                smooth=None if options.get("smooth") is None else float(options["smooth"]))
    except SparseccError as exc:
        if not where:
            raise
        raise SparseccError(f"{at}{exc}") from None


def from_spec(spec: Any, where: str = "pipeline") -> tuple[list[Pass], dict[str, Any]]:
    """Passes and data settings from a parsed pipeline document."""
    from sparsecc import passes

    if not isinstance(spec, dict) or not isinstance(spec.get("passes"), list):
        raise SparseccError(f"{where}: expected a mapping with a `passes:` list (schema {SCHEMA})")
    if spec.get("schema", SCHEMA) != SCHEMA:
        raise SparseccError(f"{where}: unsupported schema {excerpt(spec['schema'])}; this sparsecc reads {SCHEMA}")
    unknown = sorted(set(spec) - {"schema", "passes", "data", "sparsecc", "source"})
    if unknown:
        raise SparseccError(f"{where}: unknown key {excerpt(unknown[0])}; valid keys: schema, passes, data")
    built = []
    for i, item in enumerate(spec["passes"], 1):
        if isinstance(item, str):
            item = {"pass": item}
        if not isinstance(item, dict) or not isinstance(item.get("pass"), str):
            raise SparseccError(f"{where}: passes[{i}] needs a `pass:` name")
        if not isinstance(item.get("id", ""), (str, type(None))):
            raise SparseccError(f"{where}: passes[{i}]: `id` must be a string (got {excerpt(item['id'])})")
        options = {k: v for k, v in item.items() if k not in ("pass", "id")}
        cls = passes.get(item["pass"])
        built.append(cls(cfg.build(cls.Config, options, f"{where}: {item['pass']}"), id=item.get("id")))
    return built, check_data(spec.get("data") or {}, where)


def check_data(data: Any, where: str) -> dict[str, Any]:
    """A `data:` mapping (pipeline and sweep files): DATA_KEYS only, paths, numbers, a flag."""
    if not isinstance(data, dict) or set(data) - set(DATA_KEYS):
        raise SparseccError(f"{where}: `data:` takes only {', '.join(DATA_KEYS)}")
    for key, value in data.items():
        kind = {"calib": str, "tokenizer": str, "sample_temperature": float, "allow_test_split": bool}.get(key, int)
        ok = isinstance(value, (int, float)) if kind is float else isinstance(value, kind)
        if value is not None and (not ok or (isinstance(value, bool) and kind is not bool)):
            what = {str: "a path", int: "an integer", float: "a number", bool: "true or false"}[kind]
            raise SparseccError(f"{where}: data: {key} must be {what} (got {excerpt(value)})")
    return data


# Bounds on a YAML file (pipeline, sweep, config.yaml): real ones are a few KiB, a few hundred
# values and a few levels deep. Aliases can make a small file expand to billions of values
# ("billion laughs"), and nesting thousands deep overflows the parser's recursion.
MAX_YAML_BYTES = 1 << 20
MAX_YAML_VALUES = 100_000


def read_yaml(path: str | os.PathLike, what: str, fix: str = "fix the file") -> Any:
    """The parsed YAML file at `path` (`what` it is, for the errors; `fix`, what to do about
    a malformed one), refused in one line when it is too large, nested too deep or expands
    (through aliases) to too many values."""
    import yaml   # here, not at the top: the CLI's parser imports this module

    path = Path(path)
    if not path.is_file():
        raise SparseccError(f"{what} not found: {path}; check the path")
    size = path.stat().st_size
    if size > MAX_YAML_BYTES:
        raise SparseccError(f"{what} {path} is {size} bytes, more than the {MAX_YAML_BYTES} a {what} can be; "
                            "check the path (a pipeline or sweep file is a few KiB)")
    loader = None
    try:
        loader = yaml.SafeLoader(path.read_text(encoding="utf-8"))
        node = loader.get_single_node()
        if node is not None and _expanded_size(node) > MAX_YAML_VALUES:
            raise SparseccError(f"{what} {path} expands to more than {MAX_YAML_VALUES} values (through YAML "
                                "aliases, or an alias inside its own anchor); write the values out instead")
        return None if node is None else loader.construct_document(node)
    except RecursionError:
        raise SparseccError(f"{what} {path} is nested too deeply to read; flatten it") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        at = f" at line {line + 1}" if line is not None else ""
        raise SparseccError(f"{path} is not valid YAML{at}; {fix}") from None
    finally:
        if loader is not None:
            loader.dispose()


def _expanded_size(root: Any) -> int:   # a yaml.Node
    """How many values the document of `root` holds with every alias expanded, counted without
    expanding (an alias shares its anchor's node: each node's size is computed once); stops
    early past MAX_YAML_VALUES."""
    import yaml

    sizes: dict[int, int] = {}
    started: set[int] = set()
    stack = [(root, False)]
    while stack:   # iterative post-order: a deep document cannot overflow this
        node, children_done = stack.pop()
        if id(node) in sizes:
            continue
        children = [] if isinstance(node, yaml.ScalarNode) else \
            [c for pair in node.value for c in pair] if isinstance(node, yaml.MappingNode) else list(node.value)
        if children_done:
            sizes[id(node)] = min(1 + sum(sizes[id(c)] for c in children), MAX_YAML_VALUES + 1)
        elif id(node) in started:   # an alias inside its own anchor: it never ends
            return MAX_YAML_VALUES + 1
        else:
            started.add(id(node))
            stack.append((node, True))
            stack.extend((c, False) for c in children if id(c) not in sizes)
    return sizes[id(root)]


def load(path: str | os.PathLike) -> tuple[list[Pass], dict[str, Any]]:
    return from_spec(read_yaml(path, "pipeline file"), str(path))


def to_spec(pipeline: list[Pass], data: dict[str, Any] | None = None) -> dict[str, Any]:
    """The resolved document for `pipeline` (every option spelled out)."""
    items = []
    for p in pipeline:
        item = {"pass": p.name} | ({"id": p.id} if p.id != p.name else {})
        items.append(item | cfg.to_dict(p.config))
    spec: dict[str, Any] = {"schema": SCHEMA, "passes": items}
    if data:
        spec["data"] = data
    return spec


def dump(spec: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(spec, sort_keys=False)
