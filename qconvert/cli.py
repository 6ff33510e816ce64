"""The command line: the only module that imports typer/rich and turns errors into exit codes."""
from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from qconvert import __version__, targets
from qconvert.errors import Interrupted, QConvertError, UsageError

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode="rich",
                  context_settings={"help_option_names": ["-h", "--help"]},
                  help=f"Turn a Hugging Face causal-LM checkpoint into quantized files: {targets.summary()}.")
out = Console(soft_wrap=True, highlight=False)  # never wrap a path in two when piped
err = Console(stderr=True, soft_wrap=True)
if not out.is_terminal:
    out.width = 240  # tables for files and pipes: wide rather than truncated

# ---- options, defined once ---------------------------------------------------------------------
Model = Annotated[str, typer.Argument(help="Model directory, or a hub id (resolved through the local cache "
                                           "when HF_HUB_OFFLINE=1).", show_default=False)]
To = Annotated[str, typer.Option("--to", "-t", help=targets.help_line())]
NoCalib = Annotated[bool, typer.Option("--no-calib", help="q4_k_m/iq4_nl: plain round-to-nearest, no importance "
                                                          "matrix (llama-quantize without --imatrix).")]
TensorType = Annotated[Optional[list[str]], typer.Option("--tensor-type", help="q4_k_m/iq4_nl: REGEX=TYPE for the "
                                                         "tensors whose GGUF name matches (repeatable; first wins).")]
OutputType = Annotated[Optional[str], typer.Option("--output-tensor-type", help="q4_k_m/iq4_nl: type of output.weight.")]
EmbedType = Annotated[Optional[str], typer.Option("--token-embedding-type",
                                                  help="q4_k_m/iq4_nl: type of token_embd.weight.")]
ImatrixFile = Annotated[Optional[Path], typer.Option("--imatrix", help="q4_k_m/iq4_nl: use this llama.cpp importance "
                                                                   "matrix (.gguf or legacy .dat) instead of calibrating.")]
Calib = Annotated[Optional[Path], typer.Option("--calib", help="Calibration text: plain text, or JSON Lines with a "
                                                               "\"text\" field. Default: public-domain prose shipped "
                                                               "with qconvert.")]
CalibSamples = Annotated[int, typer.Option("--calib-samples", min=1, help="Calibration samples.")]
CalibSeqLen = Annotated[int, typer.Option("--calib-seq-len", min=16, help="Tokens per calibration sample.")]
ExactCalib = Annotated[bool, typer.Option("--exact-calib", help="Float32 matrix products in the calibration forward: "
                                                                "q4_k_m/iq4_nl and imatrix instead of int8 on CPUs with "
                                                                "int8 dot products (about 1.5x slower; the matrix moves "
                                                                "by about 1%; other CPUs always run float32); gptq instead of "
                                                                "bfloat16 on CPUs that have it (about 1.25x slower).")]
Seed = Annotated[int, typer.Option("--seed", min=0, max=2 ** 63 - 1,
                                   help="Which samples of a long text; same inputs, same file.")]
Pure = Annotated[bool, typer.Option("--pure", help="q4_k_m/iq4_nl: the base type for every quantizable tensor, "
                                                   "no per-tensor mixture.")]
Output = Annotated[Optional[Path], typer.Option("--output", "-o", help="Output directory, or a .gguf file name for "
                                                                        "one target. Default: MODEL-TYPE.gguf here.")]
Revision = Annotated[Optional[str], typer.Option("--revision", help="Hub revision (branch, tag or commit).")]
DryRun = Annotated[bool, typer.Option("--dry-run", help="Print the plan (every tensor, its type and size) and stop.")]
Json = Annotated[bool, typer.Option("--json", help="Print one JSON report on stdout.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing but errors.")]
Force = Annotated[bool, typer.Option("--force", "-f", help="Overwrite existing outputs.")]
Threads = Annotated[int, typer.Option("--threads", "-j", min=0, help="Threads for the kernels; 0 means all cores.")]
Workers = Annotated[int, typer.Option("--workers", min=1, help="Calibration (importance matrix, gptq, awq, w8a8) "
                                      "over this many worker processes, each running its share of the samples (the "
                                      "threads shared among them); the same bytes for any number. With --ray: "
                                      "Ray actors, by default one per node.")]
RayAddress = Annotated[Optional[str], typer.Option("--ray", help="Run the calibration's workers as Ray actors: "
                                                   "'auto' (the cluster this machine is in), an address, or 'local' "
                                                   "(a cluster of this machine, for trying it). Needs "
                                                   "qconvert[ray].", show_default=False)]
Bits = Annotated[int, typer.Option("--bits", help="gptq: bits per weight (2, 4 or 8). hqq: 2, 3, 4 or 8.")]
GroupSize = Annotated[Optional[int], typer.Option("--group-size", show_default=False,
                                                  help="gptq, awq: input columns per scale (default 128); -1: one "
                                                       "per output channel. nf4, fp4: weights per absmax block "
                                                       "(bitsandbytes' blocksize, default 64). hqq: weights per scale and zero (default 64).")]
DoubleQuant = Annotated[bool, typer.Option("--double-quant/--no-double-quant", help="nf4, fp4: quantize the block "
                                           "scales again, 8-bit per 256 (QLoRA's double quantization).")]
ComputeDtype = Annotated[str, typer.Option("--compute-dtype", help="nf4, fp4: the dtype bitsandbytes computes in "
                                           "(bnb_4bit_compute_dtype): float32, float16 or bfloat16.")]
ActOrder = Annotated[Optional[bool], typer.Option("--act-order/--no-act-order", show_default=False,
                                                  help="gptq: quantize columns by descending activation energy, "
                                                       "with static groups (g_idx stays in order, desc_act false: "
                                                       "every loader accepts it). On by default. --method gptq: "
                                                       "within each block of the GGUF type.")]
Sym = Annotated[bool, typer.Option("--sym/--asym", help="gptq: symmetric (checkpoint_format gptq) or asymmetric "
                                                        "(gptq_v2; vLLM refuses asymmetric GPTQ).")]
ExpertMinTokens = Annotated[int, typer.Option("--expert-min-tokens", min=0, help="gptq, awq of a mixture of experts: "
                                              "an expert routed fewer calibration tokens than this is quantized from "
                                              "every token (one with none always is)")]
Damp = Annotated[Optional[float], typer.Option("--damp", show_default=False,
                                              help="gptq, w8a8, --method gptq: damping, a fraction of the Hessian's "
                                                   "mean diagonal, raised by 0.01 steps if the factorisation fails "
                                                   "(default 0.05 for the checkpoints, 0.01 for the GGUF "
                                                   "mixtures: measured best on each).")]
Method = Annotated[str, typer.Option("--method", help="The GGUF mixtures' rounding: imatrix (llama-quantize's: "
                                     "each weight to the nearest point of its block's grid, the scales chosen "
                                     "with the importance matrix) or gptq (the same scales and types, each "
                                     "rounding error compensated by the weights not yet rounded through the "
                                     "Hessian of the layer's calibration inputs, layer by layer as GPTQ does; "
                                     "--damp and --act-order apply).")]
Clip = Annotated[bool, typer.Option("--clip/--no-clip", help="awq: after the scales, search each linear's "
                                                              "clipping range (AutoAWQ's auto_clip); --no-clip "
                                                              "skips it, as llm-compressor's AWQ does.")]
Smoothing = Annotated[float, typer.Option("--smoothing", help="w8a8: SmoothQuant's migration strength (0..1): how "
                                           "much of the activations' range moves into the weights.")]
UseGPTQ = Annotated[bool, typer.Option("--gptq/--no-gptq", help="w8a8: GPTQ on the smoothed weights (default), or "
                                                                "round to nearest.")]
Format = Annotated[str, typer.Option("--format", help="The checkpoint's layout. gptq, awq: their own (default) or "
                                      "compressed-tensors (pack-quantized, as llm-compressor writes them; vLLM's "
                                      "preferred 4-bit layout). fp8-block: compressed-tensors (default) or hf-fp8 "
                                      "(transformers' own fp8 layout with weight_scale_inv, as DeepSeek-V3 and "
                                      "Qwen3-FP8 ship; every linear must be whole 128 x 128 blocks).")]
MaxShard = Annotated[str, typer.Option("--max-shard-size", help="gptq: largest safetensors shard, e.g. 5GB, "
                                                                "500MB.")]


def parse_size(text: str, option: str = "--max-shard-size") -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", text, re.IGNORECASE)
    if not m:
        raise UsageError(f"{option}: cannot read {text!r}; write e.g. 5GB or 500MB")
    unit = (m.group(2) or "B").upper()
    mult = {"B": 1, "KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "TB": 10 ** 12,
            "KIB": 2 ** 10, "MIB": 2 ** 20, "GIB": 2 ** 30, "TIB": 2 ** 40}[unit]
    n = int(float(m.group(1)) * mult)
    if n < 1:
        raise UsageError(f"{option} must be positive")
    return n


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


@app.command("convert")
def convert_cmd(ctx: typer.Context, model: Model, to: To = "q8_0", output: Output = None, revision: Revision = None,
                dry_run: DryRun = False, json_: Json = False, quiet: Quiet = False, force: Force = False,
                threads: Threads = 0, no_calib: NoCalib = False, tensor_type: TensorType = None,
                output_tensor_type: OutputType = None, token_embedding_type: EmbedType = None,
                pure: Pure = False, imatrix: ImatrixFile = None, calib: Calib = None, calib_samples: CalibSamples = 32,
                calib_seq_len: CalibSeqLen = 512, seed: Seed = 0, exact_calib: ExactCalib = False, bits: Bits = 4,
                group_size: GroupSize = None, double_quant: DoubleQuant = True,
                compute_dtype: ComputeDtype = "float32",
                act_order: ActOrder = None, sym: Sym = True, damp: Damp = None, max_shard_size: MaxShard = "5GB",
                clip: Clip = True, fmt: Format = "", smoothing: Smoothing = 0.5, gptq: UseGPTQ = True,
                expert_min_tokens: ExpertMinTokens = 64, workers: Workers = 1, ray: RayAddress = None,
                method: Method = "imatrix") -> None:
    """Convert MODEL to GGUF files and quantized safetensors checkpoints, any mix in one command ([bold]convert[/bold] is the default command).

    [b]Examples[/b]

      qconvert ./SmolLM2-135M --to q8_0                 [dim]# -> SmolLM2-135M-Q8_0.gguf[/dim]

      qconvert Qwen/Qwen2.5-0.5B --to f16,q8_0 -o out/  [dim]# one read, two files[/dim]

      qconvert ./model --to q8_0 --dry-run              [dim]# the plan, no output[/dim]

      qconvert ./model --to q8_0 --json > report.json   [dim]# for CI and scripts[/dim]

      qconvert ./model --to q4_k_m                      [dim]# calibrated Q4_K_M, one step[/dim]

      qconvert ./model --to iq4_nl --calib my.txt       [dim]# calibrated on your own text[/dim]

      qconvert ./model --to q4_k_m --no-calib           [dim]# = llama-quantize without an imatrix[/dim]

      qconvert ./model --to q4_k_m --method gptq        [dim]# same types, error-feedback rounding[/dim]

      qconvert ./model --to gptq -o model-gptq/         [dim]# GPTQ 4-bit, group 128, calibrated[/dim]

      qconvert ./model --to awq -o model-awq/           [dim]# AWQ 4-bit GEMM, calibrated[/dim]

      qconvert ./model --to fp8 -o model-fp8/           [dim]# FP8, no calibration[/dim]

      qconvert ./model --to w8a8 -o model-w8a8/         [dim]# SmoothQuant + GPTQ int8[/dim]

      qconvert ./model --to q4_k_m,iq4_nl,gptq,awq -o out/  [dim]# all four from one command[/dim]

      qconvert ./model --to gptq --workers 4 -j 16      [dim]# calibration over 4 processes, same bytes[/dim]
    """
    from qconvert.calibrate.parallel import Parallel
    from qconvert.checkpoint import CheckpointOptions
    from qconvert.pipeline import CalibrationOptions, Job, convert
    from qconvert.quant.recipes import Overrides, parse_tensor_types, parse_type

    chosen = targets.parse(to)
    given = _given(ctx)
    targets.check_options(chosen, given)
    for param in ("damp", "act_order"):  # the mixtures take them only for --method gptq
        if param in given and method.strip().lower() != "gptq" and \
                not any(t.name in ("gptq", "w8a8") for t in chosen):
            raise UsageError(f"{given[param]} applies to gptq, w8a8 and the GGUF mixtures with --method gptq, not to "
                             f"--to {to} without --method gptq")
    if no_calib and imatrix is not None:
        raise UsageError("--no-calib and --imatrix contradict each other: choose one")
    overrides = Overrides(
        tensor_types=parse_tensor_types(tensor_type or []),
        output=parse_type("--output-tensor-type", output_tensor_type) if output_tensor_type else None,
        token_embedding=parse_type("--token-embedding-type", token_embedding_type) if token_embedding_type else None,
        pure=pure)
    job = Job(model, chosen, output, revision, force, threads or _cores(), dry_run, overrides, imatrix, no_calib,
              CalibrationOptions(calib, calib_samples, calib_seq_len, seed, exact_calib),
              CheckpointOptions("gptq", bits, group_size, act_order is not False, sym,
                                CheckpointOptions.damp if damp is None else damp,
                                parse_size(max_shard_size),
                                clip, fmt=fmt.strip().lower(), smoothing=smoothing, gptq=gptq,
                                expert_min_tokens=expert_min_tokens, double_quant=double_quant,
                                compute_dtype=compute_dtype.strip().lower()), Parallel(workers, ray),
              method.strip().lower(), Job.method_damp if damp is None else damp)
    if any(t.name == "gptq" for t in chosen) and not sym and not quiet:
        _error("warning", "asymmetric GPTQ is written as checkpoint_format gptq_v2; GPTQModel and transformers load "
                          "it, vLLM refuses asymmetric GPTQ", "yellow")
    bars: list[Progress] = []
    show = not (quiet or json_ or dry_run or not err.is_terminal)
    try:
        report = convert(job, _bars(bars) if show else None)
    finally:
        for bar in bars:  # also on errors: give the terminal its cursor back
            bar.stop()
    if json_:
        print(json.dumps(report.as_dict(), indent=2))
    elif quiet:
        pass
    elif dry_run:
        _print_plan(report)
    else:
        _print_done(report)


def _given(ctx: typer.Context) -> dict[str, str]:
    """The options typed on the command line: parameter name -> the flag as typed."""
    out = {}
    for p in ctx.command.params:  # typer carries its own click: its classes, compared by name
        source = ctx.get_parameter_source(p.name)
        if p.param_type_name == "option" and source is not None and source.name == "COMMANDLINE":
            value = ctx.params.get(p.name)
            secondary = p.secondary_opts[0] if p.secondary_opts and value is False else None
            out[p.name] = secondary or max(p.opts, key=len)
    return out


@app.command("inspect")
def inspect_cmd(file: Annotated[str, typer.Argument(help="A GGUF file, or a safetensors checkpoint directory "
                                                   "(GPTQ, AWQ or float).", show_default=False)],
                json_: Json = False, tensors: Annotated[bool, typer.Option("--tensors", help="List every tensor.")] = False) -> None:
    """Show what a GGUF file or a checkpoint directory holds: quantization, types, sizes, bits per weight.

    [b]Examples[/b]

      qconvert inspect out/SmolLM2-135M-Q8_0.gguf

      qconvert inspect model.gguf --json | jq .types

      qconvert inspect model-gptq/                      [dim]# quantization config, bits and groups per layer[/dim]
    """
    from qconvert.inspect import inspect_checkpoint, inspect_gguf

    path = Path(file).expanduser()
    info = inspect_gguf(path) if path.is_file() or not path.exists() and file.endswith(".gguf") \
        else inspect_checkpoint(file)
    if json_:
        print(json.dumps(info, indent=2, default=str))
        return
    out.print(f"[bold]{escape(info['path'])}[/bold]  {info['bytes'] / 1e6:.1f} MB, {info['n_params'] / 1e6:.1f}M "
              f"params, {info['bits_per_weight']:.2f} bits per weight")
    if info["kind"] == "gguf":
        out.print("types: " + ", ".join(f"{k} x{v}" for k, v in sorted(info["types"].items())))
        meta = Table("key", "value", box=None, show_header=False)
        for k, v in info["metadata"].items():
            meta.add_row(escape(k), escape(str(v)))
        out.print(meta)
        if tensors:
            t = Table("tensor", "type", "shape", "bytes", box=None)
            for x in info["tensors"]:
                t.add_row(escape(x["name"]), x["type"], str(x["shape"]), f"{x['bytes']:,}")
            out.print(t)
        return
    what = info["quant_method"] or "not quantized"
    out.print(f"{escape(info['architecture'])}, {escape(what)}: {info['quantized_linears']} quantized linear layers; "
              "other tensors " + ", ".join(f"{k} x{v}" for k, v in sorted(info["types"].items())))
    if info["quantization_config"]:
        cfg = Table("quantization_config", "", box=None, show_header=False)
        for k, v in info["quantization_config"].items():
            cfg.add_row(escape(str(k)), escape(json.dumps(v)))
        out.print(cfg)
    if info["layers"]:
        t = Table("layer", "linears", "method", "bits", "group size", "bits per weight", box=None)
        for x in info["layers"]:
            t.add_row(str(x["layer"]), str(x["linears"]), ", ".join(x["methods"]), ", ".join(map(str, x["bits"])),
                      ", ".join(map(str, x["group_sizes"])), f"{x['bits_per_weight']:.3f}")
        out.print(t)
    if tensors:
        t = Table("tensor", "dtype / method", "shape", "bytes", box=None)
        for x in info["linears"]:
            t.add_row(escape(x["name"]), f"{x['method']} {x['bits']}-bit g{x['group_size']}", str(x["shape"]),
                      f"{x['bytes']:,}")
        for x in info["tensors"]:
            t.add_row(escape(x["name"]), x["dtype"], str(x["shape"]), f"{x['bytes']:,}")
        out.print(t)


@app.command("imatrix")
def imatrix_cmd(model: Model, output: Annotated[Optional[Path], typer.Option("--output", "-o", help="The .gguf "
                                                "file to write. Default: MODEL.imatrix.gguf here.")] = None,
                revision: Revision = None, calib: Calib = None, calib_samples: CalibSamples = 32,
                calib_seq_len: CalibSeqLen = 512, seed: Seed = 0, exact_calib: ExactCalib = False, json_: Json = False,
                quiet: Quiet = False, force: Force = False, threads: Threads = 0, workers: Workers = 1,
                ray: RayAddress = None) -> None:
    """Compute an importance matrix and write it in llama.cpp's GGUF imatrix format.

    llama-quantize --imatrix accepts the file, and so does qconvert --imatrix.

    [b]Examples[/b]

      qconvert imatrix ./SmolLM2-135M -o smollm2.imatrix.gguf

      qconvert imatrix ./model --calib wiki.txt --calib-samples 64

      qconvert imatrix ./model --calib-samples 256 --ray auto   [dim]# the samples over a Ray cluster[/dim]
    """
    from qconvert.calibrate.parallel import Parallel
    from qconvert.pipeline import CalibrationOptions, make_imatrix

    bars: list[Progress] = []
    show = not (quiet or json_ or not err.is_terminal)
    try:
        report = make_imatrix(model, output, CalibrationOptions(calib, calib_samples, calib_seq_len, seed, exact_calib),
                              threads or _cores(), force, revision, _bars(bars) if show else None,
                              Parallel(workers, ray))
    finally:
        for bar in bars:
            bar.stop()
    if json_:
        print(json.dumps(report, indent=2))
    elif not quiet:
        out.print(f"[green]wrote[/green] {escape(report['path'])}  {report['entries']} entries from {report['samples']} "
                  f"x {report['seq_len']} tokens in {report['seconds']:.1f}s")
        if report.get("experts_unreached"):
            missed = report["experts_unreached"]
            out.print(f"[yellow]{len(missed)} experts received no calibration token[/yellow] (written with count 0, as "
                      f"llama-imatrix writes them): {escape(', '.join(missed[:4]))}{', ...' if len(missed) > 4 else ''}")


@app.command("eval")
def eval_cmd(models: Annotated[list[str], typer.Argument(metavar="MODEL", help="GGUF files, or HF model directories or hub ids; "
                                                         "several are scored in one run.", show_default=False)],
             text: Annotated[Path, typer.Option("--text", help="Text to score: plain text, or JSON Lines with a "
                                                "\"text\" field.", show_default=False)],
             base: Annotated[Optional[str], typer.Option("--base", help="Reference model (HF directory, hub id or "
                                                         "GGUF): adds KL divergence and top-1 agreement.")] = None,
             tokenizer: Annotated[Optional[str], typer.Option("--tokenizer", help="Directory or hub id with the "
                                                              "tokenizer; default: the model's, else the base's.")] = None,
             ctx: Annotated[int, typer.Option("--ctx", help="Tokens per chunk; the second half of each is scored.")] = 512,
             chunks: Annotated[Optional[int], typer.Option("--chunks", help="Score at most this many chunks "
                                                           "(default: the whole text).")] = None,
             activations: Annotated[bool, typer.Option("--activations/--weights-only", help="W8A8 and FP8 "
                                                       "checkpoints: quantize each quantized linear's input at run "
                                                       "time as their loaders do (--weights-only: the dequantized "
                                                       "weights alone).")] = True,
             plot: Annotated[Optional[Path], typer.Option("--plot", help="Draw KL divergence against bits per "
                                                          "weight, one point per file, into this .png/.svg/.pdf "
                                                          "(needs --base and matplotlib).")] = None,
             markdown: Annotated[bool, typer.Option("--markdown", help="Print the table as a Markdown section for a "
                                                    "model card.")] = False,
             revision: Revision = None, json_: Json = False, quiet: Quiet = False, threads: Threads = 0) -> None:
    """Perplexity of each MODEL on a text and, with --base, KL divergence and top-1 agreement against it.

    qconvert's own forward runs on the dequantized weights, with the activation quantization a
    W8A8 or FP8 checkpoint's config asks for; scoring follows llama-perplexity (chunks of --ctx
    tokens, BOS first when the model adds one, second half of each scored). Several files are
    scored in one run, one at a time, against the base's layers run once: one table, and with
    --plot the picture of the ladder.

    [b]Examples[/b]

      qconvert eval SmolLM2-135M-Q4_K_M.gguf --text book.txt --base ./SmolLM2-135M

      qconvert eval out/*.gguf --text book.txt --base ./model --plot ladder.png --markdown

      qconvert eval model-Q8_0.gguf --text book.txt --tokenizer ./model --chunks 20 --json
    """
    from qconvert import scores
    from qconvert.evaluate import evaluate_many

    if plot is not None:
        scores.check_plot(plot, base)
    bars: list[Progress] = []
    show = not (quiet or json_ or not err.is_terminal)
    try:
        reports = evaluate_many(models, text, base, tokenizer, ctx, chunks, threads or _cores(), revision,
                                _bars(bars) if show else None, activations)
    finally:
        for bar in bars:
            bar.stop()
    if plot is not None:
        scores.plot(reports, plot)
    if json_:
        found = [r.as_dict() for r in reports]
        print(json.dumps(found[0] if len(found) == 1 else found, indent=2))
        return
    if markdown:
        print(scores.markdown(reports), end="")
        return
    if quiet:
        return
    if len(reports) > 1:
        t = Table(*scores.COLUMNS, title=escape(scores.caption(reports)), box=None)
        for row in scores.rows(reports):
            t.add_row(*map(escape, row))
        out.print(t)
        out.print(f"{sum(r.seconds for r in reports):.1f}s, peak memory {reports[-1].peak_rss_bytes / 1e9:.2f} GB")
        return
    r = reports[0]
    out.print(f"{escape(r.model)}: {r.chunks} chunks x {r.ctx} tokens of {escape(r.text)}, {r.tokens_scored} tokens "
              "scored")
    if r.activations is not None:
        out.print(f"activations: {r.activations}")
    out.print(f"perplexity {r.perplexity:.4f} ± {r.perplexity_stderr:.4f}")
    if r.base is not None:
        out.print(f"base perplexity {r.base_perplexity:.4f} ({escape(r.base)})")
        out.print(f"KL divergence {r.kl_divergence:.6f} ± {r.kl_divergence_stderr:.6f} (99th percentile "
                  f"{r.kl_divergence_p99:.6f}), top-1 agreement {100 * r.top1_agreement:.2f}%")
    out.print(f"{r.seconds:.1f}s, peak memory {r.peak_rss_bytes / 1e9:.2f} GB")


@app.command("batch")
def batch_cmd(jobs: Annotated[Path, typer.Argument(help="The jobs file: JSON Lines, or YAML (.yaml/.yml), one "
                                                "job per model.", show_default=False)],
              ray: Annotated[Optional[str], typer.Option("--ray", help="Run each job as a Ray task: 'auto' (the "
                                                         "cluster this machine belongs to), an address "
                                                         "(HOST:PORT, ray://HOST:PORT), or 'local' (a cluster of "
                                                         "this machine alone, started for the batch). Needs "
                                                         "qconvert[ray].", show_default=False)] = None,
              parallel: Annotated[int, typer.Option("--parallel", "-p", min=0, help="Jobs side by side on this "
                                                    "machine; 0: one per core, as memory allows.")] = 0,
              threads: Annotated[int, typer.Option("--threads", "-j", min=0, help="Threads per job; 0: the cores "
                                                   "shared among the jobs side by side (Ray: 2).")] = 0,
              memory: Annotated[Optional[str], typer.Option("--memory", help="Memory the jobs side by side may "
                                                            "use together, e.g. 24GB; default: what the machine "
                                                            "has available. Each job's peak is estimated from its "
                                                            "checkpoint.", show_default=False)] = None,
              retries: Annotated[int, typer.Option("--retries", min=0, help="Further attempts for a job whose "
                                                   "process was killed, or whose Ray worker was lost.")] = 2,
              manifest: Annotated[Optional[Path], typer.Option("--manifest", help="Where finished jobs are "
                                                               "recorded with their outputs' sha256. Default: "
                                                               "JOBS.manifest.json beside the jobs file.",
                                                               show_default=False)] = None,
              force: Annotated[bool, typer.Option("--force", "-f", help="Overwrite existing outputs, and make "
                                                  "again a recorded job whose outputs changed.")] = False,
              dry_run: Annotated[bool, typer.Option("--dry-run", help="Say what would run, what is done "
                                                    "(verified) and each job's memory estimate; run nothing.")] = False,
              json_: Json = False, quiet: Quiet = False) -> None:
    """Run many conversions from a jobs file: each job one model to its targets, resumable.

    Each line of JOBS is one job: {"source": "./model", "to": "q4_k_m,gptq", "output": "out/model/",
    "revision": null, "options": {"calib-samples": 64}} (options: the convert command's long option
    names; true/false for switches). Each job is one `qconvert convert` process reading its
    checkpoint once for all its targets (the same bytes as the single command), side by side as
    cores and memory allow, or a Ray task with --ray. Finished jobs are recorded in the manifest
    with their outputs' sha256: a second run skips them, verified. A job whose process was killed
    (or whose Ray worker was lost) is tried again; one that failed on its input or output is
    reported and the others go on. Exit code 0 when every job is done, 5 when some failed.

    [b]Examples[/b]

      qconvert batch jobs.jsonl                         [dim]# on this machine[/dim]

      qconvert batch jobs.yaml --ray auto               [dim]# on the Ray cluster this machine is in[/dim]

      qconvert batch jobs.jsonl --json > summary.json   [dim]# for CI[/dim]
    """
    from qconvert import batch

    flags = _convert_flags()
    parsed = batch.read_jobs(jobs, flags)
    record = batch.Manifest(manifest or jobs.with_name(jobs.name + ".manifest.json"))
    opts = batch.BatchOptions(parallel, threads, parse_size(memory, "--memory") if memory else 0, retries, force, ray)
    outcomes = batch.plan_batch(parsed, record, force)
    start = time.perf_counter()
    if dry_run:
        for o in outcomes:
            if o.status == "pending":
                o.estimate_bytes = batch.estimate_peak_bytes(o.job)
                o.status = "would run"
    else:
        show = not (quiet or json_ or not err.is_terminal)
        display = _BatchDisplay(len(outcomes), sum(o.status == "skipped" for o in outcomes)) if show else None
        try:
            batch.run_batch(outcomes, record, opts, _cores(), display.event if display else None)
        except KeyboardInterrupt:
            raise Interrupted("interrupted; the jobs that were running left no output behind, the finished ones "
                              f"are recorded in {record.path}") from None
        finally:
            if display:
                display.stop()
    code = batch.exit_code(outcomes)
    if json_:
        print(json.dumps({"jobs": [o.as_dict() for o in outcomes], "manifest": str(record.path),
                          **{k: sum(o.status == k for o in outcomes) for k in ("done", "skipped", "failed")},
                          "seconds": round(time.perf_counter() - start, 3), "exit_code": code}, indent=2))
    elif not quiet:
        _print_batch(outcomes, record.path, time.perf_counter() - start)
    if code:
        raise typer.Exit(code)


def _convert_flags():
    """The convert command's long options, as a jobs file's `options` names them."""
    from qconvert.batch import Flag

    import typing

    command = typer.main.get_command(app).commands["convert"]
    hints = typing.get_type_hints(convert_cmd)  # Optional[Path] for the files a job reads
    flags = {}
    for p in command.params:
        if p.param_type_name != "option":
            continue
        name = max((o for o in p.opts if o.startswith("--")), key=len)[2:]
        path = Path in (typing.get_args(hints.get(p.name)) or (hints.get(p.name),))
        flags[name] = Flag(name, not p.is_flag, p.secondary_opts[0] if p.secondary_opts else None, p.multiple,
                           p.name, path)
    return flags


class _BatchDisplay:
    """One progress display for the whole batch: the jobs finished, and one line per job running."""

    def __init__(self, total: int, skipped: int):
        from rich.progress import SpinnerColumn

        self.bar = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(),
                            TimeElapsedColumn(), console=err, transient=True)
        self.overall = self.bar.add_task("[bold]batch", total=total, completed=skipped)
        self.running: dict[int, int] = {}
        self.bar.start()

    def event(self, what: str, o) -> None:
        j = o.job
        if what == "start":
            again = f" (attempt {o.attempts})" if o.attempts > 1 else ""
            self.running[j.index] = self.bar.add_task(escape(f"job {j.index}: {j.source} -> {j.to}{again}"), total=None)
            return
        task = self.running.pop(j.index, None)
        if task is not None:
            self.bar.remove_task(task)
        if what == "retry":
            _error("warning", f"job {j.index} ({j.source}): {o.error}; trying again", "yellow")
            return
        self.bar.advance(self.overall)
        if o.status == "failed":
            _error("error", f"job {j.index} ({j.source} -> {j.to}): {o.error}")

    def stop(self) -> None:
        self.bar.stop()


def _print_batch(outcomes, manifest: Path, seconds: float) -> None:
    t = Table("job", "source", "to", "status", "tries", "s", "peak MB", "outputs / error", box=None)
    for o in outcomes:
        peak = f"{o.peak_rss_bytes / 1e6:.0f}" if o.peak_rss_bytes else "-"
        if o.status == "would run":
            peak = f"~{o.estimate_bytes / 1e6:.0f}"
        colour = {"done": "green", "skipped": "dim", "failed": "red"}.get(o.status, "")
        what = o.error if o.status == "failed" else ", ".join(Path(x["path"]).name for x in o.outputs)
        t.add_row(str(o.job.index), escape(o.job.source), o.job.to, f"[{colour}]{o.status}[/{colour}]" if colour
                  else o.status, str(o.attempts or "-"), f"{o.seconds:.1f}" if o.attempts else "-", peak,
                  escape(what or ""))
    out.print(t)
    counts = {k: sum(o.status == k for o in outcomes) for k in ("done", "skipped", "failed", "would run")}
    out.print(", ".join(f"{n} {k}" for k, n in counts.items() if n) + f" in {seconds:.1f}s; manifest "
              f"{escape(str(manifest))}")


def _bars(bars: list[Progress]):
    """A progress callback (what, done, total): one bar per stage, on stderr, gone when done."""
    state: dict[str, tuple] = {}

    def update(what: str, done: int, total: int) -> None:
        if what not in state:
            bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), TaskProgressColumn(),
                           TimeElapsedColumn(), TimeRemainingColumn(), console=err, transient=True)
            bars.append(bar)
            bar.start()
            state[what] = (bar, bar.add_task(escape(what), total=total))
        bar, task = state[what]
        bar.update(task, completed=done)
        if done >= total:
            bar.stop()
    return update


def _print_plan(r) -> None:
    _print_source(r)
    if r.tensors:
        ggufs = [o for o in r.outputs if o["kind"] == "gguf"]
        t = Table(title=f"plan: {escape(r.source)} ({escape(r.architecture)}, {r.n_params / 1e6:.1f}M params)",
                  box=None)
        t.add_column("tensor")
        t.add_column("shape")
        for o in ggufs:
            t.add_column(o["target"])
        for x in r.tensors:
            t.add_row(escape(x["name"]), str(x["shape"]),
                      *[f"{ty} {b / 1e6:.2f}MB" for ty, b in zip(x["types"], x["bytes"])])
        out.print(t)
    for o in r.outputs:
        if o["kind"] == "checkpoint":
            scheme = o["scales"] or f"{o['bits']}-bit, group {o['group_size']}"
            t = Table(title=f"{escape(o['path'])} ({o['method'].upper()} {scheme})", box=None)
            for col in ("tensor", "dtype", "shape"):
                t.add_column(col)
            for e in o["tensors"]:
                t.add_row(escape(e["name"]), e["dtype"], str(e["shape"]))
            out.print(t)
    for o in r.outputs:
        if o["kind"] == "gguf":
            out.print(f"{escape(o['path'])}: {o['bytes'] / 1e6:.1f} MB, {o['bits_per_weight']:.2f} bits per weight")
        else:
            out.print(f"{escape(o['path'])}: {o['n_linears']} linear layers quantized, {o['bytes'] / 1e6:.1f} MB of "
                      "tensors")


def _print_source(r) -> None:
    q = r.source_quantization
    if q:
        fmt = f" {q['format']}" if q["format"] else ""
        out.print(f"source: {q['quant_method']}{fmt} checkpoint; its {q['linears']} quantized linears are "
                  "dequantized (float32) as they are read")


def _print_done(r) -> None:
    _print_source(r)
    for o in r.outputs:
        if o["kind"] == "gguf":
            line = (f"[green]wrote[/green] {escape(o['path'])}  {o['bytes'] / 1e6:.1f} MB, {o['bits_per_weight']:.2f} "
                    f"bpw, sha256 {o['sha256'][:16]}…")
            fed = [x for x in o.get("layers", []) if "error" in x]
            if fed:
                ratio = sum(x["error"] for x in fed) / sum(x["rtn_error"] for x in fed)
                line += f"; error feedback: output error {ratio:.3f}x rounding to nearest's"
            out.print(line)
            continue
        scheme = o["scales"] or f"{o['bits']}-bit group {o['group_size']}"
        line = (f"[green]wrote[/green] {escape(o['path'])}  {o['bytes'] / 1e6:.1f} MB, {o['method'].upper()} "
                f"{scheme}, {o['n_linears']} linears")
        if o["method"] in ("fp8", "fp8-block", "nf4", "fp4", "int8", "hqq", "quanto-int4", "quanto-int8"):
            es = [e["error"] for x in o["layers"] for e in x["linears"]]
            line += f"; relative weight error {sum(es) / max(len(es), 1):.2e} on average"
        if o["method"] == "gptq" or (o["method"] == "w8a8" and o["layers"] and "gptq_error" in o["layers"][0]):
            g = sum(x["gptq_error"] for x in o["layers"])
            rtn = sum(x["rtn_error"] for x in o["layers"])
            line += f"; output error {g / rtn:.3f}x round-to-nearest's"
        out.print(line)
        few = [f"layer {x['layer']} expert {e['expert']} ({e['routed_tokens']})" for x in o.get("layers", [])
               for e in x.get("experts_from_all_tokens", [])]
        if few:
            out.print(f"[yellow]{len(few)} experts were routed fewer than {o['expert_min_tokens']} tokens[/yellow] "
                      f"and were quantized from every calibration token (routed tokens in brackets): "
                      f"{escape(', '.join(few[:4]))}{', ...' if len(few) > 4 else ''}")
    if r.calibration:
        c = r.calibration
        out.print(f"calibrated on {c['samples']} x {c['seq_len']} tokens of {escape(c['dataset'])}: " + ", ".join(
            f"{p['method']} ({', '.join(p['targets'])}) {p['seconds']:.1f}s" for p in c["passes"]))
        for p in c["passes"]:
            if p.get("experts_unreached"):
                missed = p["experts_unreached"]
                out.print(f"[yellow]{len(missed)} experts received no calibration token[/yellow] (importance 1 for "
                          f"every column, as llama-quantize gives them): {escape(', '.join(missed[:4]))}"
                          f"{', ...' if len(missed) > 4 else ''}")
    out.print(f"{r.n_params / 1e6:.1f}M params in {r.seconds:.1f}s, peak memory {r.peak_rss_bytes / 1e9:.2f} GB")


def _on_sigterm(signum, frame):  # noqa: ARG001
    raise KeyboardInterrupt


COMMANDS = {"batch", "convert", "eval", "imatrix", "inspect"}


def main(argv: list[str] | None = None) -> None:
    """Entry point: `qconvert MODEL ...` means `qconvert convert MODEL ...`."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("--version", "-V"):
        from qconvert.quant.blocks import backend_description

        print(f"qconvert {__version__} (kernels: {backend_description()})")
        raise SystemExit(0)
    if args and args[0] not in COMMANDS and args[0] not in ("-h", "--help"):
        args.insert(0, "convert")
    for sig in (signal.SIGTERM, signal.SIGHUP):  # a closed terminal stops a run as Ctrl-C does
        signal.signal(sig, _on_sigterm)
    try:
        rc = app(args, prog_name="qconvert", standalone_mode=False)
        if rc == 130:  # click turns a KeyboardInterrupt it sees into this return value
            raise KeyboardInterrupt
        if isinstance(rc, int) and rc:
            raise SystemExit(rc)
    except QConvertError as e:
        _error("error", str(e))
        raise SystemExit(e.exit_code) from None
    except KeyboardInterrupt:
        _error("error", str(Interrupted("interrupted; no output was left behind")))
        raise SystemExit(130) from None
    except typer.Exit as e:
        raise SystemExit(e.exit_code) from None
    except typer.Abort:
        _error("error", "interrupted")
        raise SystemExit(130) from None
    except typer.TyperException as e:  # bad flags or arguments: click's message, on one line
        hint = f" (see {e.ctx.command_path} --help)" if getattr(e, "ctx", None) is not None else ""
        _error("error", e.format_message() + hint)
        raise SystemExit(UsageError.exit_code) from None
    except Exception as e:
        if os.environ.get("QCONVERT_DEBUG"):
            traceback.print_exc()
        _error("internal error", f"{type(e).__name__}: {e} (set QCONVERT_DEBUG=1 for a traceback)")
        raise SystemExit(1) from None


_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[@-_]")


def one_line(text: str) -> str:
    """An error message as one line of plain text: terminal colour codes (torch puts them in its
    messages) removed, and line breaks (a YAML error's, a tokenizer's) folded into spaces."""
    return " ".join(_ANSI.sub("", text).split())


def _error(kind: str, message: str, colour: str = "red") -> None:
    # escaped: a path such as "[v2]model", or "[begin, end]", is text, not rich markup
    err.print(f"[{colour}]{kind}:[/{colour}] {escape(one_line(message))}", highlight=False, soft_wrap=True)


if __name__ == "__main__":
    main()
