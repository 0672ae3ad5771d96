"""The CPU miniature of the whole TokLIP pipeline: a teacher, a VQ tokenizer, then TokLIP, on
synthetic scenes, evaluated and reported (what `make demo` / `toklip-demo` run)."""

from .pipeline import run_demo

__all__ = ["run_demo"]
