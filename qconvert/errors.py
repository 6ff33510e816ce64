"""Typed errors. Library code raises these; only cli.py prints them and exits.

Exit codes (DESIGN.md): 0 ok, 1 internal error, 2 usage, 3 input problem, 4 output problem,
5 some jobs of a batch failed (qconvert batch: each job keeps its own code), 6 a calibration
worker was lost, 130 interrupted.
"""
from __future__ import annotations


class QConvertError(Exception):
    """Base of every error qconvert reports to a user; `exit_code` is what the CLI returns."""

    exit_code = 1


class UsageError(QConvertError):
    exit_code = 2


class InputError(QConvertError):
    """The checkpoint, its config, tokenizer or tensors are unreadable, corrupt or unsupported."""

    exit_code = 3


class OutputError(QConvertError):
    """An output exists (without --force), cannot be written, or the disk is full."""

    exit_code = 4


class WorkerLost(QConvertError):
    """A calibration worker process or Ray actor ended before its share was done (killed, out of
    memory, its node gone); another run may succeed."""

    exit_code = 6


class Interrupted(QConvertError):
    exit_code = 130
