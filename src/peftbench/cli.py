"""The ``peftbench`` command line."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape

from peftbench import yaml_text
from peftbench.config import RunSpec
from peftbench.errors import PeftbenchError, UsageError
from peftbench.files import require_folder, require_input_folder

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    help="Which parameter-efficient fine-tuning method fits your task and data: measured.",
)
# no emoji codes: ":smile:" in a user's label or path must print as typed
console = Console(emoji=False)
# errors are one line however long, also when piped (a terminal wraps them itself)
err_console = Console(stderr=True, emoji=False, soft_wrap=True)

_FLAG_OF = {"train_size": "--train-size", "max_steps": "--max-steps", "lr": "--lr",
            "epochs": "--epochs", "batch_size": "--batch-size", "grad_accum": "--grad-accum",
            "eval_every": "--eval-every", "max_eval_examples": "--max-eval-examples",
            "seed": "--seed", "precision": "--precision", "device": "--device",
            "compile": "--compile"}


def parse_method_args(pairs: list[str]) -> dict[str, Any]:
    """``["r=16", "target_modules=[q_proj,v_proj]"]`` -> dict, values parsed as YAML scalars
    or lists; text that YAML reads as a mapping stays text (``layers=-6:`` is a range)."""
    parsed: dict[str, Any] = {}
    given: dict[str, str] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--method-arg {pair!r}: expected KEY=VALUE, e.g. --method-arg r=16.")
        try:
            value = yaml_text.load(raw) if raw.strip() else raw
        except yaml.YAMLError:
            value = raw
        if isinstance(value, dict):
            value = raw.strip()
        elif value == "None":  # as `peftbench methods` prints defaults; YAML says null
            value = None
        key = key.strip()
        if key in parsed:
            raise UsageError(f"--method-arg {key}: given twice ({given[key]} and "
                             f"{pair.strip()}); give each argument once.")
        parsed[key], given[key] = value, pair.strip()
    return parsed


def build_spec(**fields: Any) -> RunSpec:
    """A RunSpec from CLI values; pydantic's complaints are named by their flag."""
    try:
        return RunSpec(**{k: v for k, v in fields.items() if v is not None})
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            field = str(error["loc"][0]) if error["loc"] else "?"
            flag = _FLAG_OF.get(field, "--" + field.replace("_", "-"))
            problems.append(f"{flag}: {error['msg']} (got {error.get('input')!r})")
        raise UsageError("; ".join(problems)) from None


def default_out_dir(spec: RunSpec) -> Path:
    task = Path(spec.task).stem if spec.task.endswith((".yaml", ".yml")) else spec.task
    model = Path(spec.model).name
    return Path("runs") / f"{task}-{model}-{spec.method}-{spec.run_hash()}"


def refuse_other_results(out_dir: Path, spec: RunSpec) -> None:
    """A usage error when ``out_dir`` holds another run's ``result.json`` (another run hash,
    or unreadable): a new run would replace it, and a failing one would leave its own
    record beside the other run's adapter. The same run again may replace its results."""
    path = out_dir / "result.json"
    if not path.is_file():
        return
    try:
        earlier = json.loads(path.read_text(encoding="utf-8"))
        run, config = earlier["run"], earlier["run"]["config"]
        if run["hash"] == spec.run_hash():
            return
        what = (f"run {run['hash']}: {config['model']} / {config['task']} / "
                f"{config['method']}, {earlier.get('status')}")
    except (OSError, ValueError, KeyError, TypeError):
        what = "a result.json peftbench cannot read"
    raise UsageError(f"--out {out_dir}: holds the results of another run ({what}); give "
                     "another folder, or --overwrite to replace them.")


@app.command()
def train(
    model: Annotated[str, typer.Option(help="model: built-in name, Hub id or local dir")],
    task: Annotated[str, typer.Option(help="task: built-in name or path to a task YAML")],
    method: Annotated[str, typer.Option(
        help="full | lora | ia3 | prompt_tuning | bitfit | partial (see `peftbench methods`)")],
    method_arg: Annotated[list[str] | None, typer.Option(
        help="method argument KEY=VALUE (repeatable), see `peftbench methods`")] = None,
    train_size: Annotated[int | None, typer.Option(help="examples drawn from train split")] = None,
    seed: Annotated[int, typer.Option(help="seed for data subset, init and order")] = 0,
    max_steps: Annotated[int | None, typer.Option(help="optimizer steps")] = None,
    epochs: Annotated[float | None, typer.Option(help="epochs (default 3) if no max steps")] = None,
    lr: Annotated[float | None, typer.Option(help="learning rate (default: per method)")] = None,
    batch_size: Annotated[int, typer.Option(help="examples per micro-batch")] = 16,
    grad_accum: Annotated[int, typer.Option(help="micro-batches per optimizer step")] = 1,
    eval_every: Annotated[int | None, typer.Option(help="steps between validations")] = None,
    max_eval_examples: Annotated[int | None, typer.Option(
        help="cap on validation/test examples (fixed subset)")] = None,
    precision: Annotated[str, typer.Option(
        help="auto (bf16 where the hardware computes it natively, else fp32), bf16 or fp32"),
    ] = "auto",
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    compile_forward: Annotated[bool, typer.Option(
        "--compile", help="torch.compile the training forward (pays on GPUs; on a 2-core "
        "CPU it compiled for 8 min and gained nothing)")] = False,
    data_dir: Annotated[Path | None, typer.Option(help="folder with the dataset's files")] = None,
    out: Annotated[Path | None, typer.Option(help="output folder (result.json, adapter/)")] = None,
    overwrite: Annotated[bool, typer.Option(
        help="replace the results of another run found in --out")] = False,
    quiet: Annotated[bool, typer.Option(help="no progress display")] = False,
) -> None:
    """Fine-tune one model on one task with one method; write result.json and the adapter."""
    from peftbench.training.progress import RunProgress
    from peftbench.training.runner import execute
    from peftbench.training.summary import print_summary

    spec = build_spec(model=model, task=task, method=method,
                      method_args=parse_method_args(method_arg or []), train_size=train_size,
                      seed=seed, max_steps=max_steps, epochs=epochs, lr=lr,
                      batch_size=batch_size, grad_accum=grad_accum, eval_every=eval_every,
                      max_eval_examples=max_eval_examples, precision=precision, device=device,
                      compile=compile_forward, data_dir=str(data_dir) if data_dir else None)
    if max_steps is not None and epochs is not None:
        raise UsageError(f"--max-steps {max_steps} and --epochs {epochs:g}: give one of them "
                         "(the steps to train, or the epochs over the training examples).")
    if data_dir is not None:
        require_input_folder(data_dir, "--data-dir", "the dataset's files")
        _note_unread_data_dir(task, data_dir)
    out_dir = out or default_out_dir(spec)
    require_folder(Path(out_dir), "--out", "output folder")  # before training, not after
    if not overwrite:
        refuse_other_results(Path(out_dir), spec)
    with RunProgress(console, enabled=not quiet) as progress, warnings.catch_warnings():
        # the run's warnings are in its record: the summary prints them once
        warnings.filterwarnings("ignore", message="precision bf16", category=RuntimeWarning)
        record = execute(spec, out_dir, on_event=progress.update)
    print_summary(console, record, out_dir)
    if record["status"] != "completed":
        raise typer.Exit(1)


def _note_unread_data_dir(task: str, data_dir: Path) -> None:
    """A note when ``--data-dir`` goes to a built-in task that reads no files."""
    from peftbench.tasks.registry import BUILTINS

    builtin = BUILTINS.get(task)
    if builtin is not None and not builtin.reads_files:
        err_console.print(f"[bold yellow]note:[/] --data-dir {escape(str(data_dir))} is not "
                          f"used: task '{escape(task)}' is generated and reads no files.",
                          highlight=False)


@app.command()
def tasks() -> None:
    """List the built-in tasks (a task YAML of your own works too: see the README)."""
    from rich.table import Table

    from peftbench.tasks import describe_tasks

    table = Table("task", "type", "metric", "labels", "source")
    for info in describe_tasks():
        table.add_row(info["name"], info["type"], info["metric"], info["labels"] or "-",
                      info["source"])
    console.print(table)


@app.command()
def methods() -> None:
    """List the fine-tuning methods, their default learning rate and arguments."""
    from rich.table import Table

    from peftbench.methods import list_methods

    table = Table("method", "default lr", "arguments (--method-arg KEY=VALUE)", "what it trains")
    for m in list_methods():
        args = "\n".join(f"{k}={v!r}" for k, v in m.defaults.items()) or "-"
        table.add_row(m.name, f"{m.default_lr:g}", args, m.description)
    console.print(table)


@app.command()
def models() -> None:
    """List the built-in models (any Hub id or local model directory works too)."""
    from rich.table import Table

    from peftbench.models import list_models

    table = Table("model", "family", "pretrained", "source")
    for info in list_models():
        table.add_row(info["name"], info["family"], "yes" if info["pretrained"] else "no",
                      info["source"])
    console.print(table)


def _print_version(value: bool) -> None:
    if value:
        from peftbench import __version__

        console.print(f"peftbench {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[bool, typer.Option(
        "--version", is_eager=True, callback=_print_version,
        help="print peftbench's version and exit")] = False,
) -> None:
    """Which parameter-efficient fine-tuning method fits your task and data: measured."""


def _register_commands() -> None:
    from peftbench import cli_analysis, cli_sweep

    cli_sweep.register(app)
    cli_analysis.register(app)


_register_commands()


def main() -> None:
    """Entry point: user errors become one clear line and exit code 2, never a traceback."""
    try:
        # outside standalone mode click returns, not raises, a command's typer.Exit code
        # (a failed `train`, Ctrl-C): pass it on
        code = app(standalone_mode=False, prog_name="peftbench")
        if isinstance(code, int) and code:
            if code == 130:  # typer turns Ctrl-C into a silent Exit(130)
                err_console.print("interrupted")
            sys.exit(code)
    except PeftbenchError as exc:
        err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
        sys.exit(exc.exit_code)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        err_console.print("aborted")
        sys.exit(130)
    except Exception as exc:  # click usage errors arrive here in non-standalone mode
        if isinstance(exc, _click_errors()):
            _show_click_error(exc)
            sys.exit(exc.exit_code)
        raise


def _show_click_error(exc: Any) -> None:
    """click's usage errors (a missing option, a wrong type) in peftbench's one-line style,
    naming the command's help; the bare help screen of a command given no arguments stays."""
    if type(exc).__name__ == "NoArgsIsHelpError":
        exc.show()
        return
    message = exc.format_message().strip()
    if not message.endswith((".", "?", "!")):
        message += "."
    ctx = getattr(exc, "ctx", None)
    # an option without its value comes without a context: the command is argv's first word
    command = ctx.command_path if ctx is not None else " ".join(
        ["peftbench", *[word for word in sys.argv[1:2] if not word.startswith("-")]])
    message += f" See `{command} --help`."
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False)


def _click_errors() -> tuple[type[Exception], ...]:
    """click's error class, and the one of the click copy that recent typer ships
    (``typer._click``): unknown options and missing values raise the latter."""
    import importlib

    classes = []
    for module in ("click.exceptions", "typer._click.exceptions"):
        try:
            classes.append(importlib.import_module(module).ClickException)
        except (ImportError, AttributeError):
            continue
    return tuple(classes)


if __name__ == "__main__":
    main()
