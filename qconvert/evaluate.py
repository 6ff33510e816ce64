"""`qconvert eval`: perplexity of a model on a text and, against a base model, KL divergence and
top-1 agreement, with qconvert's own forward on the model's (dequantized) weights.

Scoring is llama-perplexity's: the text is tokenized without special tokens and cut into
consecutive chunks of ctx tokens; each chunk starts with BOS when the model adds one (replacing
its first token), and only the second half of each chunk is scored (the prediction of tokens
ctx/2+1 .. ctx-1), so every scored token sees at least ctx/2 tokens of context.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from qconvert.calibrate.driver import run_layers
from qconvert.calibrate.text import read_text, tokenize
from qconvert.errors import InputError, UsageError
from qconvert.model import Model, open_model
from qconvert.read.checkpoint import resolve
from qconvert.report import peak_rss_bytes

Progress = Callable[[str, int, int], None]  # (what, done, total)
ROWS = 64  # scored positions whose vocabulary-wide log-probabilities are held at once


@dataclass
class EvalReport:
    model: str
    text: str
    base: str | None
    ctx: int
    chunks: int
    tokens_scored: int
    perplexity: float
    perplexity_stderr: float
    base_perplexity: float | None = None
    kl_divergence: float | None = None  # mean over scored tokens of KL(base || model), nats
    kl_divergence_stderr: float | None = None
    kl_divergence_p99: float | None = None
    top1_agreement: float | None = None
    activations: str | None = None  # the model's run-time activation quantization as simulated; None: none
    label: str | None = None  # a GGUF file type (Q4_K_M), a checkpoint's method, or "float"
    file_bytes: int | None = None  # on disk (a directory: its files)
    bits_per_weight: float | None = None  # every tensor's bytes over every weight
    seconds: float = 0.0
    peak_rss_bytes: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


def chunk_tokens(ids: list[int], ctx: int, chunks: int | None, bos_id: int | None, name: str) -> np.ndarray:
    if ctx < 8 or ctx % 2:
        raise UsageError(f"--ctx must be an even number >= 8, got {ctx}")
    n = len(ids) // ctx
    if n < 1:
        raise InputError(f"{name}: {len(ids)} tokens, fewer than one chunk of {ctx}")
    if chunks is not None:
        if chunks < 1:
            raise UsageError(f"--chunks must be >= 1, got {chunks}")
        n = min(n, chunks)
    out = np.asarray(ids[: n * ctx], dtype=np.int64).reshape(n, ctx).copy()
    if bos_id is not None:
        out[:, 0] = bos_id
    return out


def _final_hidden(model: Model, tokens: torch.Tensor, progress: Progress | None, what: str,
                  activations: bool = False) -> tuple[object, torch.Tensor]:
    """The last layer's output at the scoring positions [n, ctx/2 - 1, D], and the forward (for its head)."""
    fw = model.forward(activations)
    half = tokens.shape[1] // 2
    h = run_layers(fw, tokens, progress=(lambda d, t: progress(what, d, t)) if progress else None)
    return fw, h[:, half:-1].contiguous()


def evaluate(source: str, text_path: Path, base: str | None = None, tokenizer: str | None = None, ctx: int = 512,
             chunks: int | None = None, threads: int = 1, revision: str | None = None,
             progress: Progress | None = None, activations: bool = True) -> EvalReport:
    """One model's scores (evaluate_many with one source)."""
    return evaluate_many([source], text_path, base, tokenizer, ctx, chunks, threads, revision, progress,
                         activations)[0]


def evaluate_many(sources: list[str], text_path: Path, base: str | None = None, tokenizer: str | None = None,
                  ctx: int = 512, chunks: int | None = None, threads: int = 1, revision: str | None = None,
                  progress: Progress | None = None, activations: bool = True) -> list[EvalReport]:
    """Each model's scores on the same text against the same base, one model open at a time; the
    base's layers run once (its hidden states kept, its head applied beside each model's)."""
    torch.set_num_threads(max(1, threads))
    reports: list[EvalReport] = []
    ref = open_model(base) if base is not None else None
    base_hidden: dict[bytes, tuple[object, torch.Tensor]] = {}  # the chunks' tokens -> the base's states
    try:
        for source in sources:
            start = time.perf_counter()
            model = open_model(source, revision)
            try:
                t, name, n_vocab = _chunks(model, ref, source, tokenizer, text_path, ctx, chunks)
                fw_ref = h_ref = None
                if ref is not None:
                    key = t.numpy().tobytes()
                    if key not in base_hidden:
                        base_hidden.clear()  # models of one base give the same chunks: one entry
                        base_hidden[key] = _final_hidden(ref, t, progress, "base")
                    fw_ref, h_ref = base_hidden[key]
                fw, h = _final_hidden(model, t, progress, "model", activations)
                report = _score(source, name, base, t, n_vocab, fw, h, fw_ref, h_ref, progress)
                if activations and model.acts is not None:
                    report.activations = model.acts.label
                report.label, report.file_bytes, report.bits_per_weight = _describe(model)
            finally:
                model.close()
            report.seconds = round(time.perf_counter() - start, 3)
            report.peak_rss_bytes = peak_rss_bytes()
            reports.append(report)
    finally:
        if ref is not None:
            ref.close()
    return reports


def _chunks(model: Model, ref: Model | None, source: str, tokenizer: str | None, text_path: Path, ctx: int,
            chunks: int | None) -> tuple[torch.Tensor, str, int]:
    """The text as the model's chunks (its tokenizer, its BOS rule), its name, and the vocabulary
    size scored."""
    tok_dir = resolve(tokenizer) if tokenizer is not None else model.tokenizer_dir or (ref and ref.tokenizer_dir)
    if tok_dir is None:
        raise UsageError(f"{source}: no tokenizer comes with it; give --tokenizer DIR (or an HF --base model) to "
                         "tokenize the text with the model's own tokenizer")
    if not (tok_dir / "tokenizer.json").is_file() and not (tok_dir / "tokenizer.model").is_file():
        raise InputError(f"{tok_dir}: no tokenizer (tokenizer.json or tokenizer.model)")
    bos_id = model.bos
    if not model.bos_known:  # whether the tokenizer adds a BOS: ask the model it came with
        if ref is not None:
            bos_id = ref.bos
        elif (tok_dir / "config.json").is_file():
            tok_model = open_model(str(tok_dir))
            bos_id = tok_model.bos
            tok_model.close()
        else:
            raise UsageError(f"{source}: the checkpoint has no tokenizer; give --base MODEL, or --tokenizer "
                             "with a model directory")
    text, name = read_text(text_path)
    tokens = chunk_tokens(tokenize(tok_dir, text), ctx, chunks, bos_id, name)
    n_vocab = model.n_vocab if ref is None else min(model.n_vocab, ref.n_vocab)
    if int(tokens.max()) >= n_vocab:
        raise InputError(f"{tok_dir}: the tokenizer gives id {int(tokens.max())}, beyond the model's "
                         f"{n_vocab} tokens; is it the model's own tokenizer?")
    return torch.from_numpy(tokens), name, n_vocab


def _score(source: str, name: str, base: str | None, t: torch.Tensor, n_vocab: int, fw, h: torch.Tensor, fw_ref,
           h_ref: torch.Tensor | None, progress: Progress | None) -> EvalReport:
    """Perplexity, and against the base KL divergence and top-1 agreement, a few scored positions
    at a time (logits are vocabulary wide)."""
    ctx = t.shape[1]
    half = ctx // 2
    targets = t[:, half + 1:]
    nll = torch.empty(targets.shape, dtype=torch.float64)
    ref_nll = torch.empty_like(nll)
    kld = torch.empty_like(nll)
    same = torch.empty(targets.shape, dtype=torch.bool)
    with torch.inference_mode():
        for c in range(len(t)):
            for a in range(0, targets.shape[1], ROWS):
                b = min(a + ROWS, targets.shape[1])
                tgt = targets[c, a:b, None]
                lq = torch.log_softmax(fw.head(h[c, a:b])[:, :n_vocab].double(), -1)
                nll[c, a:b] = -lq.gather(1, tgt)[:, 0]
                if fw_ref is not None:
                    lp = torch.log_softmax(fw_ref.head(h_ref[c, a:b])[:, :n_vocab].double(), -1)
                    ref_nll[c, a:b] = -lp.gather(1, tgt)[:, 0]
                    same[c, a:b] = lq.argmax(-1) == lp.argmax(-1)
                    lq.sub_(lp).neg_()  # in place: lp - lq
                    kld[c, a:b] = (lp.exp_() * lq).sum(-1)
            if progress:
                progress("scoring", c + 1, len(t))
    n = nll.numel()
    ppl = math.exp(float(nll.mean()))
    report = EvalReport(source, name, base, ctx, len(t), n, ppl,
                        ppl * float(nll.std()) / math.sqrt(n) if n > 1 else 0.0)
    if fw_ref is not None:
        report.base_perplexity = math.exp(float(ref_nll.mean()))
        report.kl_divergence = float(kld.mean())
        report.kl_divergence_stderr = float(kld.std()) / math.sqrt(n) if n > 1 else 0.0
        report.kl_divergence_p99 = float(torch.quantile(kld.flatten(), 0.99))
        report.top1_agreement = float(same.double().mean())
    return report


def _describe(model: Model) -> tuple[str, int, float]:
    """(what it is: a GGUF file type as llama.cpp names it, a checkpoint's method, or "float";
    its bytes on disk; bits per weight over every tensor)."""
    from gguf import LlamaFileType

    from qconvert.inspect import inspect_checkpoint, inspect_gguf

    if model.kind == "gguf":
        info = inspect_gguf(Path(model.source))
        ft = info["metadata"].get("general.file_type")
        try:
            label = LlamaFileType(int(ft)).name.removeprefix("MOSTLY_").removeprefix("ALL_")
        except (TypeError, ValueError):
            label = "GGUF"
        return label, info["bytes"], info["bits_per_weight"]
    info = inspect_checkpoint(model.source)
    return model.label, info["bytes"], info["bits_per_weight"]
