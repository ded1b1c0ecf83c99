"""Argument types and flags shared by several subcommands."""

from __future__ import annotations

import argparse


def positive(name: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {text!r}") from None
        if value < 0:
            raise argparse.ArgumentTypeError(f"{name} must be >= 0, got {value}")
        return value

    return parse


def add_set_flag(p: argparse.ArgumentParser, what: str = "any config key") -> None:
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help=f"override {what}, typed like the YAML (repeatable; e.g. --set model.size=small)")
