"""The `mlx_dsv4` command: generate, chat, convert, serve, bench, perplexity.

Heavy modules (MLX, mlx-lm, the model) are imported inside the commands, so `--help` and flag
errors answer at once. Errors the user can fix are printed as one `error: ...` line (exit 1);
MLX_DSV4_DEBUG=1 shows the traceback instead.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from .cli_options import (DEFAULT_MODEL, ChosenModelOpt, DraftOpt, Effort, EffortOpt, ExpertMemOpt, MaxTokensOpt,
                          MinPOpt, ModelOpt, RepOpt, SeedOpt, ShardingOpt, ShowReasoningOpt, StepOpt, StopOpt,
                          SystemOpt, TempOpt, ThinkingOpt, TopKOpt, TopPOpt, VerboseOpt, YesOpt)

app = typer.Typer(name="mlx_dsv4", help="DeepSeek-V4 on Apple silicon with MLX.", no_args_is_help=True,
                  add_completion=False, pretty_exceptions_enable=False,
                  rich_markup_mode=None)  # plain click help: rich truncates option names at 80 columns


def fail(message: str, code: int = 1):
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def user_errors():
    """The exception types that mean bad input (not a bug): shown as one line."""
    from .checkpoint.errors import CheckpointError
    from .watchdog import DistributedError

    return (ValueError, CheckpointError, FileNotFoundError, NotADirectoryError, PermissionError, DistributedError)


def run_guarded(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except typer.Exit:
        raise
    except KeyboardInterrupt:
        typer.echo("\ninterrupted", err=True)
        raise typer.Exit(130)
    except Exception as e:
        if os.environ.get("MLX_DSV4_DEBUG") or not isinstance(e, user_errors()):
            raise
        fail(str(e))



def sampling(max_tokens, temperature, top_p, top_k, min_p, repetition_penalty, seed, stop, step,
             num_draft_tokens: int = 0) -> dict:
    from .sampling import SamplingError, SamplingParams

    try:
        params = SamplingParams(temperature, top_p, top_k, min_p, repetition_penalty, seed).check()
    except SamplingError as e:
        fail(f"--{e.field.replace('_', '-')}: {e}", 2)
    return {"max_tokens": max_tokens, **params.kwargs(),
            "stop": [unescape(s) for s in stop or []] or None, "prefill_step_size": step,
            "num_draft_tokens": num_draft_tokens}


_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}


def unescape(text: str) -> str:
    """`--stop "\\n\\n"` arrives as backslash-n twice (shells do not interpret it): read the
    escapes \\n \\t \\r \\\\ as the characters they name; other backslashes stay as typed."""
    import re

    return re.sub(r"\\([ntr\\])", lambda m: _ESCAPES[m[1]], text)


def chat_mode(thinking: bool, effort: Effort | None) -> tuple[str, str | None]:
    if effort is not None and not thinking:
        fail("--reasoning-effort needs --thinking (chat mode does not reason)", 2)
    return ("thinking" if thinking else "chat"), (effort.value if effort else None)


# download sizes of the official checkpoints (only the files a conversion needs), for the question
# asked before a download starts
DOWNLOAD_GB = {"deepseek-ai/DeepSeek-V4-Flash": 160, "deepseek-ai/DeepSeek-V4-Flash-0731": 167,
               "deepseek-ai/DeepSeek-V4-Pro": 865}


def _in_hub_cache(repo: str) -> bool:
    """Whether an earlier run fetched this repo (its index or config is in the local Hub cache)."""
    from huggingface_hub import try_to_load_from_cache

    return any(isinstance(try_to_load_from_cache(repo, f), str)
               for f in ("model.safetensors.index.json", "config.json"))


def _interactive() -> bool:
    return sys.stdin.isatty()


def confirm_download(name: str, explicit: bool, yes: bool) -> None:
    """The default model is a large download nobody asked for by name: say its size first, ask on a
    terminal, refuse elsewhere unless --yes. A model named with --model is downloaded as asked."""
    from .checkpoint.hub import REPO_ID

    if name in ("tiny", "tiny-random") or Path(name).expanduser().exists() or not REPO_ID.match(name) or _in_hub_cache(name):
        return  # not a Hub download (a missing directory is reported by load), or fetched before
    size = f"about {DOWNLOAD_GB[name]} GB" if name in DOWNLOAD_GB else "size unknown"
    typer.echo(f"{name} is not downloaded yet: {size} from the Hugging Face Hub, into "
               "~/.cache/huggingface (HF_HOME moves it).", err=True)
    if explicit or yes:
        return
    if not _interactive():
        fail(f"no --model given, and the default {name} is a download of {size}: pass --model {name} "
             "(or --yes) to download it, --model tiny to try the commands, or a local checkpoint directory", 1)
    if not typer.confirm("Download it now?", default=False, err=True):
        fail("not downloading; pass --model with a local checkpoint directory or 'tiny'", 1)


def check_expert_memory(gb: float | None) -> None:
    if gb is not None and not 0 < gb < float("inf"):
        fail(f"--expert-memory-gb must be a positive number of GB, got {gb}", 2)


def load_model(name: str, verbose: bool, explicit: bool = True, yes: bool = False,
               expert_memory_gb: float | None = None, sharding: str = "pipeline"):
    """Started by mlx.launch, every rank loads its share of the model and runs the same steps;
    rank 0 alone prints (the others' stdout goes nowhere: mlx.launch would interleave it)."""
    import time

    from .distributed import check_sharding, world_group
    from .load import load

    check_sharding(sharding)
    group = world_group()
    if group is not None and group.rank() != 0:
        sys.stdout = open(os.devnull, "w")

    if name not in ("tiny", "tiny-random") and not Path(name).expanduser().exists() and "/" not in name:
        fail(f"model {name!r} is neither a directory, a Hugging Face repo id (owner/name), nor 'tiny'")
    confirm_download(name, explicit, yes)
    t = time.perf_counter()
    model, tokenizer = load(name, expert_memory_gb=expert_memory_gb, group=group, sharding=sharding)
    if verbose:
        typer.echo(f"loaded {name} in {time.perf_counter() - t:.1f} s", err=True)
    return model, tokenizer


# -- generate ------------------------------------------------------------------------------------
@app.command()
def generate(
    prompt: Annotated[str | None, typer.Argument(help="the prompt; '-' or none reads stdin")] = None,
    prompt_opt: Annotated[str | None, typer.Option("--prompt", "-p", help="the prompt (instead of the argument)")
                          ] = None,
    model: ChosenModelOpt = None, system: SystemOpt = None, thinking: ThinkingOpt = False,
    reasoning_effort: EffortOpt = None,
    raw: Annotated[bool, typer.Option("--raw", help="no chat template: the prompt as is, after BOS")] = False,
    max_tokens: MaxTokensOpt = 256, temperature: TempOpt = 0.0, top_p: TopPOpt = 1.0, top_k: TopKOpt = 0,
    min_p: MinPOpt = 0.0, repetition_penalty: RepOpt = None, seed: SeedOpt = None, stop: StopOpt = None,
    prompt_cache_file: Annotated[Path | None, typer.Option(
        "--prompt-cache-file", help="a .safetensors file: made from the prompt's reusable prefix (the system "
        "prompt, else all but the last token) on the first run, reused by later runs")] = None,
    prefill_step_size: StepOpt = 512, show_reasoning: ShowReasoningOpt = True, verbose: VerboseOpt = False,
    yes: YesOpt = False, expert_memory_gb: ExpertMemOpt = None, num_draft_tokens: DraftOpt = 0,
    sharding: ShardingOpt = "pipeline",
):
    """Generate a reply to one prompt and print it as it streams."""
    check_expert_memory(expert_memory_gb)
    if prompt_opt is not None:
        if prompt is not None:
            fail("give the prompt once: as the argument or with --prompt, not both", 2)
        prompt = prompt_opt
    if prompt is None or prompt == "-":
        if sys.stdin.isatty():
            fail("no prompt: give it as an argument or pipe it on stdin", 2)
        prompt = sys.stdin.read().rstrip("\r\n")  # the newline that ends a piped line is not part of it
    if not prompt.strip():
        fail("the prompt is empty", 2)
    if raw and (system or thinking or reasoning_effort):
        fail("--raw takes the prompt as is: it cannot be combined with --system, --thinking or --reasoning-effort", 2)
    mode, effort = chat_mode(thinking, reasoning_effort)
    if prompt_cache_file is not None and prompt_cache_file.suffix != ".safetensors":
        fail(f"--prompt-cache-file {prompt_cache_file} must end in .safetensors", 2)
    opts = sampling(max_tokens, temperature, top_p, top_k, min_p, repetition_penalty, seed, stop, prefill_step_size,
                    num_draft_tokens)
    run_guarded(_generate, prompt, model, system, mode, effort, raw, opts, prompt_cache_file, show_reasoning, verbose,
                yes, expert_memory_gb, sharding)


def _generate(prompt, model_name, system, mode, effort, raw, opts, cache_file, show_reasoning, verbose, yes=False,
              expert_memory_gb=None, sharding="pipeline"):
    from .repl import Display, encode_turns, progress_bar

    model, tok = load_model(model_name or DEFAULT_MODEL, verbose, model_name is not None, yes, expert_memory_gb,
                            sharding)
    if cache_file is not None and (model.stage is not None or model.shard is not None):
        fail("--prompt-cache-file cannot be used with a model split across ranks yet")
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    if raw:
        ids = tok.encode(prompt, add_special_tokens=False)
        ids = ids if ids[:1] == [model.args.bos_token_id] else [model.args.bos_token_id] + ids
    else:
        ids = tok.encode(encode_turns(messages, mode, effort), add_special_tokens=False)
    context = model.args.max_position_embeddings
    if len(ids) > context:
        fail(f"the prompt has {len(ids)} tokens, longer than the model's context of {context}")
    cache = None
    if cache_file is not None:
        cache = _prompt_cache(model, tok, ids, messages, mode, effort, raw, cache_file, opts, verbose)
    display = Display(sys.stdout, mode, show_reasoning)
    r = None
    with progress_bar(len(ids) - (cache[0].offset if cache else 0), opts["prefill_step_size"]) as bar:
        from .generate import stream_generate

        for r in stream_generate(model, tok, ids, prompt_cache=cache, progress_callback=bar, **opts):
            display.feed(r.text)
    display.finish()
    if verbose and r is not None:
        from .generate import format_stats

        typer.echo(format_stats(r), err=True)


def _prompt_cache(model, tok, ids, messages, mode, effort, raw, path, opts, verbose):
    from .generate import prefill
    from .prompt_cache import load_prompt_cache, save_prompt_cache
    from .repl import progress_bar, reusable_prefix

    if path.exists():
        cache, _ = load_prompt_cache(path, model=model, prompt=ids)
        if verbose:
            typer.echo(f"prompt cache {path}: {cache[0].offset} of {len(ids)} prompt tokens", err=True)
        return cache
    prefix = ids[:-1] if raw else reusable_prefix(tok, ids, messages, mode, effort)
    cache = model.make_cache()
    with progress_bar(len(prefix), opts["prefill_step_size"]) as bar:
        prefill(model, prefix, cache, opts["prefill_step_size"], bar)
    save_prompt_cache(path, cache, tokens=prefix, model=model)
    if verbose:
        typer.echo(f"prompt cache {path}: saved {len(prefix)} tokens", err=True)
    return cache


# -- chat ----------------------------------------------------------------------------------------
@app.command()
def chat(
    model: ChosenModelOpt = None, system: SystemOpt = None, thinking: ThinkingOpt = False,
    reasoning_effort: EffortOpt = None, max_tokens: MaxTokensOpt = 2048, temperature: TempOpt = 0.0,
    top_p: TopPOpt = 1.0, top_k: TopKOpt = 0, min_p: MinPOpt = 0.0, repetition_penalty: RepOpt = None,
    seed: SeedOpt = None, stop: StopOpt = None, prefill_step_size: StepOpt = 512,
    show_reasoning: ShowReasoningOpt = True, verbose: VerboseOpt = False, yes: YesOpt = False,
    expert_memory_gb: ExpertMemOpt = None, num_draft_tokens: DraftOpt = 0, sharding: ShardingOpt = "pipeline",
):
    """An interactive chat with history. One message per line; /reset clears the history, /exit ends."""
    check_expert_memory(expert_memory_gb)
    mode, effort = chat_mode(thinking, reasoning_effort)
    opts = sampling(max_tokens, temperature, top_p, top_k, min_p, repetition_penalty, seed, stop, prefill_step_size,
                    num_draft_tokens)

    def session():
        from .repl import ChatSession

        # under mlx.launch every rank reads the same lines: mlx.launch copies its stdin to each
        m, tok = load_model(model or DEFAULT_MODEL, verbose, model is not None, yes, expert_memory_gb, sharding)
        ChatSession(m, tok, system, mode, effort, opts, show_reasoning, verbose).run(sys.stdin, sys.stdout)

    run_guarded(session)


# -- convert -------------------------------------------------------------------------------------
@app.command()
def convert(
    hf_path: Annotated[str, typer.Option("--hf-path", help="official checkpoint directory or Hub repo id")],
    mlx_path: Annotated[Path, typer.Option("--mlx-path", help="output directory")],
    quant_mode: Annotated[str, typer.Option("--quant-mode", "-q",
                                            help="lossless | bf16 | fp32 | affine8 | affine4 | q3 | q2 | "
                                            "q2-all")] = "lossless",
    group_size: Annotated[int, typer.Option("--group-size", help="group size of affine formats: 32, 64, 128")] = 64,
    override: Annotated[list[str] | None, typer.Option("--override", metavar="CLASS=FORMAT",
                                                          help="per tensor class format (repeatable)")] = None,
    max_shard_gb: Annotated[float, typer.Option("--max-shard-gb", help="output shard size")] = 5.0,
    revision: Annotated[str | None, typer.Option("--revision", help="Hub branch, tag or commit")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace an existing output directory")] = False,
    progress: Annotated[bool, typer.Option("--progress/--no-progress")] = True,
):
    """Convert an official DeepSeek-V4 checkpoint into an MLX checkpoint (streamed, bounded memory)."""

    def run():
        try:
            from .checkpoint.convert import convert as do_convert
            from .checkpoint.policy import parse_overrides
        except ImportError as e:
            fail(f"the converter is not available in this installation ({e})")
        import logging

        logging.basicConfig(level=logging.INFO, format="%(message)s")
        out = do_convert(hf_path, mlx_path, quant_mode=quant_mode, group_size=group_size,
                         overrides=parse_overrides(override or []), max_shard_gb=max_shard_gb,
                         progress=progress, overwrite=overwrite, revision=revision)
        typer.echo(f"wrote {out}")

    run_guarded(run)


# -- serve ---------------------------------------------------------------------------------------
@app.command()
def serve(
    model: ModelOpt = DEFAULT_MODEL,
    host: Annotated[str, typer.Option("--host", help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535)] = 8080,
    api_key: Annotated[str | None, typer.Option("--api-key", envvar="MLX_DSV4_API_KEY",
                                                help="require this bearer key (or x-api-key)")] = None,
    thinking: Annotated[bool, typer.Option("--thinking/--no-thinking",
                                           help="default reasoning mode of requests that do not say")] = False,
    max_tokens_limit: Annotated[int, typer.Option("--max-tokens-limit", min=1,
                                                  help="most tokens one request may generate")] = 65536,
    max_context: Annotated[int | None, typer.Option("--max-context", min=1,
                                                    help="refuse longer prompts (default: the model's)")] = None,
    prefix_cache_entries: Annotated[int, typer.Option("--prefix-cache-entries", min=0,
                                                      help="prompt caches kept for reuse")] = 8,
    prefix_cache_gb: Annotated[float, typer.Option("--prefix-cache-gb", min=0.0,
                                                   help="memory the kept prompt caches may use")] = 4.0,
    log_level: Annotated[str, typer.Option("--log-level", help="uvicorn log level")] = "info",
    body_timeout: Annotated[float, typer.Option("--body-timeout", min=0.1,
                                                help="seconds a request body may stall before a 408")] = 60.0,
    shutdown_grace: Annotated[float, typer.Option("--shutdown-grace", min=0.0,
                                                  help="seconds running requests get to finish on SIGTERM")] = 10.0,
    special_in_text: Annotated[bool, typer.Option(
        "--special-in-text", help="UNSAFE: read control tokens (<｜User｜>, </think>, EOS, DSML) inside request "
        "text too, as before; a request, or a web page quoted in it, can then fake turns and tool calls")] = False,
    expert_memory_gb: ExpertMemOpt = None, num_draft_tokens: DraftOpt = 0,
    max_batch: Annotated[int, typer.Option("--max-batch", min=1,
                                           help="requests decoded together (the rest wait in order)")] = 8,
    batch_cache_gb: Annotated[float, typer.Option(
        "--batch-cache-gb", min=0.0, help="cache memory the requests in flight may need at their full length "
        "(a request that alone needs more still runs, alone)")] = 8.0,
    sharding: ShardingOpt = "pipeline",
):
    """OpenAI- and Anthropic-compatible HTTP server. Under mlx.launch rank 0 serves, the other ranks
    run the same steps on their share of the model."""
    check_expert_memory(expert_memory_gb)
    if api_key is None and "MLX_DSV4_API_KEY" in os.environ:  # click reads an empty variable as unset
        api_key = os.environ["MLX_DSV4_API_KEY"]
    if api_key is not None and not api_key.strip():
        fail("--api-key (or MLX_DSV4_API_KEY) is empty: give a non-empty key, or leave it out to serve without one",
             2)

    def run():
        try:
            from .server.app import serve as do_serve
        except ImportError as e:
            fail(f"the server is not available in this installation ({e})")
        from .distributed import check_sharding, world_group

        check_sharding(sharding)
        group = world_group()
        if group is not None and num_draft_tokens:
            fail("--num-draft-tokens is not available under mlx.launch: the MTP block sits on the last rank, the "
                 "embedding it shares on the first")
        do_serve(model, host, port, api_key, max_tokens_limit=max_tokens_limit, max_context=max_context,
                 default_thinking=thinking, prefix_cache_entries=prefix_cache_entries,
                 prefix_cache_bytes=int(prefix_cache_gb * 2**30), log_level=log_level, body_timeout_s=body_timeout,
                 shutdown_grace_s=shutdown_grace, special_in_text=special_in_text, expert_memory_gb=expert_memory_gb,
                 num_draft_tokens=num_draft_tokens, max_batch=max_batch,
                 batch_cache_bytes=int(batch_cache_gb * 2**30), group=group, sharding=sharding)

    run_guarded(run)


# -- bench ---------------------------------------------------------------------------------------
@app.command()
def bench(
    model: Annotated[str, typer.Option("--model", "-m", help="'bench' (Flash layout, random weights), "
                                       "'tiny' or a checkpoint")] = "bench",
    contexts: Annotated[str, typer.Option("--contexts", help="comma-separated context lengths")] = "1024,4096,16384",
    gen_tokens: Annotated[int, typer.Option("--gen-tokens", min=1, help="generated tokens per context")] = 16,
    chunk: Annotated[int, typer.Option("--chunk", min=1, help="prefill chunk")] = 2048,
    dtype: Annotated[str | None, typer.Option("--dtype", help="float32 | bfloat16 | float16")] = None,
    json_out: Annotated[str | None, typer.Option("--json", help="write the results as JSON")] = None,
    png_out: Annotated[str | None, typer.Option("--png", help="write a plot")] = None,
    expert_memory_gb: ExpertMemOpt = None,
):
    """Prompt / generation tokens per second, peak memory and cache size at growing contexts."""
    check_expert_memory(expert_memory_gb)
    try:
        ctx = tuple(int(c) for c in contexts.split(",") if c.strip())
    except ValueError:
        fail(f"--contexts must be comma-separated integers, got {contexts!r}", 2)
    if not ctx or min(ctx) < 1:
        fail(f"--contexts must list positive lengths, got {contexts!r}", 2)
    if dtype not in (None, "float32", "bfloat16", "float16"):
        fail(f"--dtype must be float32, bfloat16 or float16, got {dtype!r}", 2)
    if png_out:  # checked now, not after the whole run
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            fail("--png needs matplotlib (pip install matplotlib); nothing was run", 2)

    def run():
        try:
            from . import bench as b
        except ImportError as e:
            fail(f"mlx_dsv4 bench is not available in this installation ({e})")
        if not hasattr(b, "run"):
            fail("mlx_dsv4.bench has no run(); the benchmark is not available in this installation")
        b.run(model=model, contexts=ctx, gen_tokens=gen_tokens, chunk=chunk, dtype=dtype,
              out_json=json_out, out_png=png_out, expert_memory_gb=expert_memory_gb)

    run_guarded(run)


# -- perplexity ----------------------------------------------------------------------------------
@app.command()
def perplexity(
    model: ModelOpt = DEFAULT_MODEL,
    data: Annotated[Path, typer.Option("--data", help="a text file, or a directory (its files matching --glob)")] = ...,
    glob: Annotated[str, typer.Option("--glob", help="with a directory --data: which files")] = "**/*.py",
    num_tokens: Annotated[int | None, typer.Option("--num-tokens", min=1, help="score only the first N tokens")] = None,
    sequence_length: Annotated[int, typer.Option("--sequence-length", min=3, help="tokens per window")] = 512,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="windows per forward")] = 1,
    mtp: Annotated[bool, typer.Option("--mtp", help="also score the MTP block's prediction of token i+2")] = False,
    json_out: Annotated[str | None, typer.Option("--json", help="write the results as JSON")] = None,
):
    """Mean negative log-likelihood and perplexity of a model on text, with a standard error."""

    def run():
        import json

        from tqdm import tqdm

        from .perplexity import perplexity as score, read_text_tokens

        m, tok = load_model(model, False)
        ids = read_text_tokens(tok, data, glob)
        with tqdm(total=None, unit="window", file=sys.stderr, disable=not sys.stderr.isatty()) as bar:
            def progress(done, total):
                bar.total = total
                bar.update(done - bar.n)

            r = score(m, ids, sequence_length, num_tokens, batch_size, mtp, progress)
        typer.echo(f"tokens scored: {r.tokens}")
        typer.echo(f"mean NLL: {r.nll:.4f} +/- {r.stderr:.4f} nats/token, perplexity {r.perplexity:.3f}")
        if r.mtp_nll is not None:
            typer.echo(f"MTP NLL (token i+2): {r.mtp_nll:.4f} +/- {r.mtp_stderr:.4f}")
        typer.echo(f"unigram entropy of the text: {r.unigram_entropy:.4f} nats/token")
        if json_out:
            Path(json_out).write_text(json.dumps(r.to_dict(), indent=1) + "\n")

    run_guarded(run)


def _version(value: bool):
    if value:
        from . import __version__

        typer.echo(__version__)
        raise typer.Exit()


@app.callback()
def main(version: Annotated[bool | None, typer.Option("--version", callback=_version, is_eager=True,
                                                         help="print the version and exit")] = None):
    """DeepSeek-V4 on Apple silicon with MLX."""
