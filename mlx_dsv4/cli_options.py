"""The flags the `mlx_dsv4` commands share (mlx-lm's names where it has one), declared once."""

from __future__ import annotations

from enum import Enum
from typing import Annotated

import typer

DEFAULT_MODEL = "deepseek-ai/DeepSeek-V4-Flash"


class Effort(str, Enum):
    high = "high"
    max = "max"


ModelOpt = Annotated[str, typer.Option("--model", "-m", help="Hugging Face repo id, checkpoint directory, "
                                       "'tiny' (a small trained model: Python code) or 'tiny-random'")]
# generate / chat: None means not named, so the default model's download is asked for first
ChosenModelOpt = Annotated[str | None, typer.Option(
    "--model", "-m", show_default=DEFAULT_MODEL, help="Hugging Face repo id, checkpoint directory, 'tiny' "
    "(a small trained model: Python code) or 'tiny-random'")]
YesOpt = Annotated[bool, typer.Option("--yes", "-y", help="download the default model without asking")]
SystemOpt = Annotated[str | None, typer.Option("--system", "-s", help="system prompt")]
ThinkingOpt = Annotated[bool, typer.Option("--thinking/--no-thinking", help="reasoning before the answer")]
EffortOpt = Annotated[Effort | None, typer.Option("--reasoning-effort", help="with --thinking: high or max")]
MaxTokensOpt = Annotated[int, typer.Option("--max-tokens", "-n", min=0, help="most tokens to generate")]
TempOpt = Annotated[float, typer.Option("--temperature", "--temp", min=0.0, help="0 = greedy")]
TopPOpt = Annotated[float, typer.Option("--top-p", help="nucleus sampling: 0 < top_p <= 1")]
TopKOpt = Annotated[int, typer.Option("--top-k", min=0, help="sample among the k best tokens (0 = all)")]
MinPOpt = Annotated[float, typer.Option("--min-p", min=0.0, max=1.0, help="drop tokens below min_p x the best")]
RepOpt = Annotated[float | None, typer.Option("--repetition-penalty", help="> 1 discourages repeats")]
SeedOpt = Annotated[int | None, typer.Option("--seed", help="random seed for sampling")]
StopOpt = Annotated[list[str] | None, typer.Option(
    "--stop", help="stop string (repeatable); the escapes \\n \\t \\r \\\\ stand for a newline, tab, "
    "carriage return and backslash, as a shell passes them literally")]
DraftOpt = Annotated[int, typer.Option("--num-draft-tokens", min=0, max=16, help="draft up to K tokens per step "
                                      "with the model's MTP layer, verified in one pass (0 = off)")]
StepOpt = Annotated[int, typer.Option("--prefill-step-size", min=1, help="prompt tokens per prefill chunk")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="print load time and token/s statistics")]
ExpertMemOpt = Annotated[float | None, typer.Option(
    "--expert-memory-gb", help="stream the routed experts from the checkpoint files, holding at most this many "
    "GB of them in memory (same output; slower when they miss)")]
ShardingOpt = Annotated[str, typer.Option("--sharding", help="under mlx.launch: how the model is split "
                                          "across the ranks (pipeline: contiguous layer stages; tensor: "
                                          "every layer's heads and experts, two all_sums per layer)")]
ShowReasoningOpt = Annotated[bool, typer.Option("--show-reasoning/--hide-reasoning",
                                                help="print the reasoning of --thinking (apart from the answer)")]
