"""Mutation testing: how many deliberately broken versions of the code the conformance suite catches.

Run it as ``tox -e mutation [-- FILE ...]`` (see ``tox.ini``). For each FILE
(by default the shared engine with its argument checks, exit waits and
bounds, the output, the reference storage and the freethreaded storage)
cosmic-ray lists every mutant: an operator, comparison, constant or
``True``/``False`` swapped, a decorator removed, an exception type replaced.
Each mutant is written into a copy of the tree (the working tree is never
touched) and the conformance suite runs against it, restricted to the
backend that executes the file (``--backend freethreaded`` for
``backends/aggregator_freethreaded``, ``--backend reference`` otherwise, or
the backends given with ``--backend`` (repeatable): engine code that one backend
reaches, such as ``_pacing.py``'s allowance hook, needs that backend), with
``-x``, a per-test timeout and a per-mutant timeout: a mutant that deadlocks
counts as killed ("timeout").

Two kinds of mutant are skipped, not run, and not counted: those inside
annotations of a module with ``from __future__ import annotations`` (never
evaluated, so they cannot change behaviour), and those that do not compile
(cosmic-ray takes the ``/`` ending positional-only parameters for a division).

Results go to ``.mutation/``: ``summary.txt`` (killed/total per file and every
surviving mutant as a one-line diff) and one cosmic-ray session per file
(``cr-report .mutation/<name>.sqlite`` shows it in cosmic-ray's own format).
"""

from __future__ import annotations

import argparse
import ast
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

DEFAULT_FILES = (
    "aggregator_reference/_arguments.py",
    "aggregator_reference/_engine.py",
    "aggregator_reference/_exit.py",
    "aggregator_reference/_output.py",
    "aggregator_reference/_pacing.py",
    "aggregator_reference/_reference.py",
    "backends/aggregator_freethreaded/__init__.py",
    "backends/aggregator_freethreaded/_parts.py",
    "backends/aggregator_freethreaded/_gathering.py",
    "backends/aggregator_freethreaded/_many.py",
    "aggregator_reference/_writing.py",
)
#: Copied into the scratch tree only if git cannot say which files belong to the checkout.
NOT_COPIED = (
    ".git",
    ".tox",
    ".venv",
    ".mutation",
    ".hypothesis",
    "__pycache__",
    ".mypy_cache",
    ".ruff_cache",
)
STRESS_TEST = "conformance/test_stress.py::test_thousand_writers_thousand_adds_exact_totals"


def backend_for(path: str) -> str:
    """The backend whose conformance run executes ``path``: its own for a backend, else ``reference``."""
    parts = Path(path).parts
    if len(parts) > 1 and parts[0] == "backends" and parts[1].startswith("aggregator_"):
        return parts[1].removeprefix("aggregator_")
    return "reference"


def suite_command(python: str, backend: str, test_timeout: float, skip_stress: bool) -> list[str]:
    """The test command one mutant runs: this script's ``--run-suite`` mode, which execs pytest."""
    command = [
        python,
        str(Path(__file__).resolve()),
        "--run-suite",
        backend,
        "--test-timeout",
        str(test_timeout),
    ]
    return [*command, "--skip-stress"] if skip_stress else command


def suite_env() -> dict[str, str]:
    """The environment of the suite: the tree in the current folder comes first on ``sys.path``.

    The package installed in the environment (a wheel, or an editable install of
    another checkout) supplies the entry points only; the code comes from here.
    """
    here = Path.cwd()
    paths = [str(here), str(here / "backends"), os.environ.get("PYTHONPATH", "")]
    return {"PYTHONPATH": os.pathsep.join(p for p in paths if p), "HYPOTHESIS_PROFILE": "ci"}


def module_name(path: str) -> str:
    """``backends/aggregator_x/__init__.py`` -> ``aggregator_x``; ``pkg/_mod.py`` -> ``pkg._mod``."""
    parts = list(Path(path).with_suffix("").parts)
    if parts[0] == "backends":
        parts = parts[1:]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def check_imported_from_here(python: str, path: str) -> None:
    """Fail unless the suite imports ``path`` from the scratch tree (else no mutant would be tested)."""
    found = subprocess.run(
        [python, "-c", f"import {module_name(path)} as m; print(m.__file__)"],
        env={**os.environ, **suite_env()},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    if Path(found).resolve() != (Path.cwd() / path).resolve():
        raise SystemExit(f"{path}: the suite would import {found}, not the mutated copy; aborting")


def run_suite(backend: str, test_timeout: float, skip_stress: bool) -> None:
    """Replace this process by the conformance run against ``backend`` (comma-separated names).

    The example database is removed first, so that every mutant is tried on the same examples.
    """
    shutil.rmtree(".hypothesis", ignore_errors=True)
    os.environ.update(suite_env())
    args = [
        sys.executable,
        "-m",
        "pytest",
        "conformance",
        *(option for name in backend.split(",") for option in ("--backend", name)),
        "-x",
        "-q",
        "--no-header",
        "-p",
        "no:cacheprovider",
        "-p",
        "no:xdist",
        f"--timeout={test_timeout:g}",
        "--hypothesis-seed=0",
    ]
    if skip_stress:
        args += ["--deselect", STRESS_TEST]
    os.execv(sys.executable, args)


def copy_tree(destination: Path) -> None:
    """Copy the checkout as it is on disk (tracked and untracked, not ignored files) to ``destination``."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=False,
    )
    if listed.returncode != 0:  # not a git checkout (an sdist): copy all but caches and environments
        shutil.copytree(ROOT, destination, ignore=shutil.ignore_patterns(*NOT_COPIED, ".venv*"))
        return
    for name in listed.stdout.decode().split("\0"):
        source = ROOT / name
        if name and source.is_file():
            target = destination / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)


def annotation_spans(source: str) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """``(start, end)`` (line, column) of every annotation, if the module never evaluates them."""
    tree = ast.parse(source)
    lazy = any(
        isinstance(node, ast.ImportFrom)
        and node.module == "__future__"
        and any(alias.name == "annotations" for alias in node.names)
        for node in tree.body
    )
    if not lazy:
        return []
    found: list[ast.expr] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.arg) and node.annotation is not None:
            found.append(node.annotation)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.returns is not None:
            found.append(node.returns)
        elif isinstance(node, ast.AnnAssign):
            found.append(node.annotation)
    return [
        ((n.lineno, n.col_offset), (n.end_lineno or n.lineno, n.end_col_offset or n.col_offset))
        for n in found
    ]


@dataclass
class Tally:
    """What happened to one file's mutants."""

    path: str
    backend: str
    mutants: int = 0
    equivalent: int = 0  # inside annotations, not run
    invalid: int = 0  # the mutated module does not compile, not run
    outside: int = 0  # outside the --lines ranges, not run
    killed: int = 0
    timeouts: int = 0  # included in killed
    survived: list[tuple[int, str, list[str]]] = field(default_factory=list)  # (line, operator, diff lines)
    broken: list[tuple[int, str, str]] = field(default_factory=list)  # the mutation itself failed
    seconds: float = 0.0

    @property
    def run(self) -> int:
        return self.mutants - self.equivalent - self.invalid - self.outside

    def score(self) -> str:
        return f"{self.killed}/{self.run - len(self.broken)}"


@contextmanager
def working_directory(path: Path) -> Iterator[None]:
    before = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


def changed_lines(diff: str | None) -> list[str]:
    """The ``-``/``+`` lines of a unified diff, without its headers."""
    lines = (diff or "").splitlines()
    return [
        line
        for line in lines
        if line[:1] in "-+" and not line.startswith(("---", "+++")) and line[1:].strip()
    ]


def mutate_file(
    path: str,
    backend: str,
    session: Path,
    command: list[str],
    timeout: float,
    *,
    lines: list[tuple[int, int]] | None = None,
) -> Tally:
    """Create the cosmic-ray session for ``path`` (cwd: the scratch tree) and run its mutants.

    With ``lines``, only mutants starting on a line within one of those inclusive ranges run.
    """
    import cosmic_ray.commands
    import cosmic_ray.plugins
    from cosmic_ray.mutating import mutate_and_test, mutate_code
    from cosmic_ray.work_db import use_db
    from cosmic_ray.work_item import TestOutcome, WorkerOutcome, WorkResult

    tally = Tally(path, backend)
    source = Path(path).read_text(encoding="utf-8")
    spans = annotation_spans(source)

    def compiles(mutation: Any) -> bool:
        operator = cosmic_ray.plugins.get_operator(mutation.operator_name)(**mutation.operator_args)
        mutated = mutate_code(source, operator, mutation.occurrence)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", SyntaxWarning)  # e.g. ``is`` with a literal: still a mutant
                compile(mutated or source, path, "exec")
        except SyntaxError:
            return False
        return True

    started = time.monotonic()
    with use_db(str(session)) as db:
        cosmic_ray.commands.init([Path(path)], db, {})
        items = sorted(
            db.work_items, key=lambda item: (item.mutations[0].start_pos, item.mutations[0].operator_name)
        )
        tally.mutants = len(items)
        todo = []
        for item in items:
            mutation = item.mutations[0]
            if any(lo <= tuple(mutation.start_pos) and tuple(mutation.end_pos) <= hi for lo, hi in spans):
                db.set_result(
                    item.job_id,
                    WorkResult(
                        worker_outcome=WorkerOutcome.SKIPPED, output="equivalent: inside an annotation"
                    ),
                )
                tally.equivalent += 1
            elif lines and not any(lo <= mutation.start_pos[0] <= hi for lo, hi in lines):
                db.set_result(
                    item.job_id,
                    WorkResult(worker_outcome=WorkerOutcome.SKIPPED, output="outside --lines"),
                )
                tally.outside += 1
            elif not compiles(mutation):  # e.g. the ``/`` that ends positional-only parameters
                db.set_result(
                    item.job_id,
                    WorkResult(worker_outcome=WorkerOutcome.SKIPPED, output="invalid: syntax error"),
                )
                tally.invalid += 1
            else:
                todo.append(item)
        test_command = shlex.join(command)
        for number, item in enumerate(todo, 1):
            mutation = item.mutations[0]
            line, operator = mutation.start_pos[0], mutation.operator_name.removeprefix("core/")
            began = time.monotonic()
            result = mutate_and_test(item.mutations, test_command, timeout)
            db.set_result(item.job_id, result)
            if (
                result.worker_outcome != WorkerOutcome.NORMAL
                or result.test_outcome == TestOutcome.INCOMPETENT
            ):
                outcome = f"not run ({result.worker_outcome})"
                tally.broken.append((line, operator, (result.output or "").strip()))
            elif result.test_outcome == TestOutcome.SURVIVED:
                outcome = "SURVIVED"
                tally.survived.append((line, operator, changed_lines(result.diff)))
            else:
                tally.killed += 1
                outcome = "killed"
                if result.output == "timeout":
                    tally.timeouts += 1
                    outcome = "killed (timeout)"
            took = time.monotonic() - began
            print(f"[{number}/{len(todo)}] {path}:{line} {operator}: {outcome} ({took:.1f}s)", flush=True)
    tally.seconds = time.monotonic() - started
    return tally


def summary(tallies: list[Tally], header: list[str]) -> str:
    out = [*header, ""]
    width = max(len(t.path) for t in tallies)
    out.append(f"{'file'.ljust(width)}  backend       killed/run  score")
    total_killed = total_run = 0
    for t in tallies:
        run = t.run - len(t.broken)
        total_killed += t.killed
        total_run += run
        pct = f"{100 * t.killed / run:5.1f}%" if run else "    -"
        out.append(
            f"{t.path.ljust(width)}  {t.backend:<12}  {t.score():>10}  {pct}  "
            f"({t.timeouts} timeouts, {len(t.survived)} survived; not run: {t.equivalent} in "
            f"annotations, {t.invalid} not compiling"
            + (f", {t.outside} outside --lines" if t.outside else "")
            + f"; {t.seconds / 60:.1f} min)"
        )
    if len(tallies) > 1:
        pct = f"{100 * total_killed / total_run:5.1f}%" if total_run else "    -"
        out.append(f"{'overall'.ljust(width)}  {'':<12}  {f'{total_killed}/{total_run}':>10}  {pct}")
    out += ["", "Surviving mutants (file:line operator, then the line before and after):"]
    for t in tallies:
        for line, operator, diff in t.survived:
            out.append(f"{t.path}:{line}  {operator}")
            out += [f"    {d}" for d in diff]
    if not any(t.survived for t in tallies):
        out.append("    none")
    broken = [(t.path, line, op) for t in tallies for line, op, _ in t.broken]
    if broken:
        out += ["", "Mutants that could not be run (cosmic-ray failed to apply them; not counted):"]
        out += [f"{path}:{line}  {op}" for path, line, op in broken]
    return "\n".join(out) + "\n"


def line_range(text: str) -> tuple[int, int]:
    """``"120-186"`` -> ``(120, 186)``; ``"151"`` -> ``(151, 151)``."""
    first, _, last = text.partition("-")
    try:
        lo, hi = int(first), int(last or first)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected FIRST-LAST line numbers, got {text!r}") from None
    if not 1 <= lo <= hi:
        raise argparse.ArgumentTypeError(f"expected 1 <= FIRST <= LAST, got {text!r}")
    return lo, hi


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "files", nargs="*", metavar="FILE", help=f"files to mutate (default: {' '.join(DEFAULT_FILES)})"
    )
    parser.add_argument(
        "--out", type=Path, default=ROOT / ".mutation", help="results folder (default: .mutation)"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        help="seconds per mutant before it counts as killed (default: 4x the clean run, >= 60)",
    )
    parser.add_argument(
        "--test-timeout", type=float, default=30.0, help="pytest-timeout per test (default: 30)"
    )
    parser.add_argument("--skip-stress", action="store_true", help=f"deselect {STRESS_TEST}")
    parser.add_argument("--test-python", default=sys.executable, help="interpreter that runs the suite")
    parser.add_argument(
        "--backend",
        action="append",
        help="run the suite against this backend (repeatable) for every file (default: the file's own "
        "backend, else reference); e.g. add freethreaded for _pacing.py's allowance hook",
    )
    parser.add_argument(
        "--lines",
        action="append",
        type=line_range,
        metavar="FIRST-LAST",
        help="run only mutants starting on these lines (repeatable), e.g. code that only a "
        "free-threaded build runs, with --test-python python3.13t",
    )
    parser.add_argument("--run-suite", metavar="BACKEND", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run_suite:
        run_suite(args.run_suite, args.test_timeout, args.skip_stress)
    args.out = args.out.resolve()  # before the run moves into the scratch tree
    files = [Path(f).as_posix() for f in args.files] or list(DEFAULT_FILES)
    for name in files:
        if not (ROOT / name).is_file():
            parser.error(f"no such file in the checkout: {name}")
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ["PYTHONDONTWRITEBYTECODE"] = "1"
    started = time.monotonic()
    tallies = []
    with tempfile.TemporaryDirectory(prefix="mutation-tree-") as scratch, working_directory(Path(scratch)):
        copy_tree(Path(scratch))
        for name in files:
            backend = ",".join(args.backend or [backend_for(name)])
            check_imported_from_here(args.test_python, name)
            command = suite_command(args.test_python, backend, args.test_timeout, args.skip_stress)
            clean_start = time.monotonic()
            clean = subprocess.run(command, capture_output=True, text=True, check=False)
            clean_seconds = time.monotonic() - clean_start
            if clean.returncode != 0:
                print(clean.stdout[-4000:], clean.stderr[-4000:], sep="\n")
                print(f"the suite fails on the unmutated tree (--backend {backend}); nothing to measure")
                return 1
            timeout = args.timeout or max(60.0, 4 * clean_seconds)
            print(f"{name}: clean run {clean_seconds:.1f}s, per-mutant timeout {timeout:.0f}s", flush=True)
            session = (args.out / name.replace("/", "_")).with_suffix(".sqlite").resolve()
            session.unlink(missing_ok=True)
            tallies.append(mutate_file(name, backend, session, command, timeout, lines=args.lines))
    header = [
        f"cosmic-ray {version('cosmic-ray')}; each mutant runs: {shlex.quote(args.test_python)} -m pytest "
        f"conformance --backend B -x -p no:xdist --timeout={args.test_timeout:g} --hypothesis-seed=0"
        + (f" --deselect {STRESS_TEST}" if args.skip_stress else ""),
        f"HYPOTHESIS_PROFILE={os.environ.get('HYPOTHESIS_PROFILE', '(unset)')}; "
        f"wall time {(time.monotonic() - started) / 60:.1f} min",
    ]
    text = summary(tallies, header)
    (args.out / "summary.txt").write_text(text, encoding="utf-8")
    print("\n" + text + f"\n(written to {args.out / 'summary.txt'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
