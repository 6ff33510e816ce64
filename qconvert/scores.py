"""`qconvert eval` of several files, to look at: one row per file (type, size, bits per weight,
perplexity, KL divergence, top-1 agreement) as a Markdown section for a model card, and the
picture of the ladder: KL divergence against bits per weight, one labelled point per file."""
from __future__ import annotations

import os
from pathlib import Path

from qconvert.errors import UsageError
from qconvert.evaluate import EvalReport
from qconvert.writers.atomic import output_error, temporary

COLUMNS = ("file", "type", "size", "bits/weight", "perplexity", "KL divergence", "KLD p99", "top-1")


def rows(reports: list[EvalReport]) -> list[tuple[str, ...]]:
    """The table's cells, in COLUMNS order (KL columns "-" without a base)."""
    out = []
    for r in reports:
        kld = r.kl_divergence is not None
        out.append((Path(r.model).name or r.model, r.label or "", f"{(r.file_bytes or 0) / 1e6:.1f} MB",
                    f"{r.bits_per_weight:.2f}" if r.bits_per_weight is not None else "",
                    f"{r.perplexity:.4f}", f"{r.kl_divergence:.5f}" if kld else "-",
                    f"{r.kl_divergence_p99:.4f}" if kld else "-",
                    f"{100 * r.top1_agreement:.1f}%" if kld else "-"))
    return out


def caption(reports: list[EvalReport]) -> str:
    r = reports[0]
    text = f"{r.tokens_scored} tokens of {Path(r.text).name} ({r.chunks} chunks of {r.ctx}, the second half of each scored)"
    if r.base is None:
        return f"Perplexity on {text}."
    return (f"Against {r.base} (perplexity {r.base_perplexity:.4f}) on {text}: KL divergence of the base's next-token "
            "distribution from each file's, mean and 99th percentile, and how often their most likely tokens agree.")


def markdown(reports: list[EvalReport]) -> str:
    """A model card's section: a heading, what was measured, the table."""
    lines = ["## Quantized files", "", caption(reports), "", "| " + " | ".join(COLUMNS) + " |",
             "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows(reports)]
    return "\n".join(lines) + "\n"


def check_plot(path: Path, base: str | None) -> None:
    """--plot's problems, before any compute."""
    if base is None:
        raise UsageError("--plot draws KL divergence against the base: give --base MODEL")
    if path.suffix.lower() not in (".png", ".svg", ".pdf"):
        raise UsageError(f"--plot {path}: name a .png, .svg or .pdf file")
    if path.is_dir():
        raise UsageError(f"--plot {path}: is a directory")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UsageError("--plot needs matplotlib: pip install 'qconvert[plot]'") from None


def plot(reports: list[EvalReport], path: Path) -> None:
    """KL divergence (log scale) against bits per weight, one labelled point per file; the base's
    perplexity in the title. PNG, SVG or PDF by the file name; the file appears whole or not at
    all."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    xs = [r.bits_per_weight for r in reports]
    ys = [max(r.kl_divergence, 1e-7) for r in reports]  # a log axis has no place for 0
    ax.scatter(xs, ys, color="tab:blue", zorder=3)
    for r, x, y in zip(reports, xs, ys):
        ax.annotate(r.label or Path(r.model).name, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight (whole file)")
    ax.set_ylabel("KL divergence from the base (nats per token)")
    r = reports[0]
    ax.set_title(f"{Path(r.base).name}: base perplexity {r.base_perplexity:.3f} on {Path(r.text).name}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    tmp = temporary(path, "partial")
    try:
        fig.savefig(tmp, format=path.suffix.lower()[1:])
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise output_error(path, e) from None
    finally:
        plt.close(fig)
