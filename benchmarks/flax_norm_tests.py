"""Flax's own normalization tests, run against jaxinit's drop-in modules.

Run: ``python benchmarks/flax_norm_tests.py`` (about four minutes on 2 CPU cores; ``--help`` for
the options). It needs the flax repository as a git directory (``--flax-git``, default
``/work/.mirror/google+flax/repo``, or ``$FLAX_GIT``); nothing is installed or edited.

What it does:

1. Extracts ``tests/linen/linen_test.py`` (class ``NormalizationTest``) and
   ``tests/nnx/nn/normalization_test.py`` (class ``TestLinenConsistency``) from the git directory
   at ``--rev`` (default ``HEAD``) into a temporary directory. It warns when the snapshot's
   ``flax/version.py`` differs from the installed flax.
2. Writes one copy of each file per variant:

   * ``flax``: unmodified, the baseline;
   * ``jaxinit``: every reference ``nn.X`` (linen file) or ``nnx.X`` and ``linen.X`` (nnx file),
     for X in ``BatchNorm, LayerNorm, RMSNorm, GroupNorm, InstanceNorm, WeightNorm,
     SpectralNorm``, becomes ``jaxinit.linen.X`` / ``jaxinit.nnx.X``;
   * ``mixed`` (nnx file only): only ``nnx.X`` becomes ``jaxinit.nnx.X``, so flax's bit-exact
     nnx-against-linen tests compare jaxinit's nnx modules against flax's linen modules.

   The substitution rewrites the source text (Python tokens, so comments and strings are left
   alone) inside the test methods of those classes, decorators included: flax's
   ``test_normalization_equivalence`` builds its modules in a ``parameterized.parameters``
   decorator, at import time, which patching ``nn`` afterwards would miss. Everything else
   (Dense, Linear, Sequential, initializers, ...) stays flax's. Options:

   * ``--skip-spectral-weight``: the behaviour from before jaxinit had WeightNorm and
     SpectralNorm: the test methods whose name mentions them are left on flax's modules, the
     jaxinit variants deselect them and the table shows ``= flax``. (This replaces the former
     ``--include-spectral-weight``, now the default.)
   * ``--flax-defaults``: WeightNorm and SpectralNorm become ``functools.partial``s of
     jaxinit's with the settings that undo the deliberate differences a parameter can undo:
     ``WeightNorm(scale_init=ones)`` and ``SpectralNorm(n_warmup=0, iterate_at_eval=True)``
     (an explicit keyword in the test wins). The wrapped layer's parameters stay raw either way.
3. Runs each variant with pytest, in one process (no xdist), with its own ini file, so neither
   this repository's ``conftest.py`` (strict dtype promotion, 8 host devices) nor its pytest
   options apply: JAX runs with its defaults (standard dtype promotion, one CPU device). No test
   here needs several devices.
4. Prints one row per test: its id, its parameters, and its result under each variant; then,
   for every test that fails under a jaxinit variant, a one-line reason (the exception and the
   mismatch summary), and the counts per file. ``--json PATH`` also saves the full messages.

jaxinit's ``use_fast_variance`` defaults to False where flax's defaults to True; the flax tests
that depend on the formula pass ``use_fast_variance`` explicitly or compare against a two-pass
reference, so the default alone fails nothing.

Results with flax 0.12.8 (tests at the snapshot's HEAD, identical to v0.12.7's): flax passes
all 165.

* Default: jaxinit fails 5 of 165, all in the linen file (52 of 57 pass):
  ``test_batch_norm_complex`` (2): jaxinit's norms reject complex input (TypeError);
  ``test_layer_norm4`` (x + 1e6) and ``test_instance_norm3`` (x + 1e4): flax's float32 one-liner
  reference is itself off (3.7e-2 and 1.0e-3 from float64), and jaxinit is within 2.2e-7 of
  float64; ``test_spectral_norm_sigma3`` (eval): flax stores sigma = 1 at init as a placeholder
  and never updates it at eval, where jaxinit stores the warm-up's estimate (1.667). The other
  22 linen WeightNorm/SpectralNorm tests and all 108 nnx tests (the 28 WeightNorm/SpectralNorm
  nnx-against-linen equivalences included) pass. ``mixed`` (jaxinit's nnx modules against
  flax's linen ones, bit-exact) fails 59 of 108: rounding-level differences (at most 6e-7 on O(1)
  values, 1e-9 in the running mean), features with no kept element under a mask (flax's output
  NaN, jaxinit's finite), and SpectralNorm at eval (jaxinit runs no iteration, and flax's stored
  ``u`` is an unnormalized random vector).
* ``--flax-defaults``: ``test_spectral_norm_sigma3`` still fails (jaxinit stores ``||W u||`` =
  1.081 at init, flax 1); ``mixed``'s SpectralNorm eval cases then pass, apart from rounding.
"""

from __future__ import annotations

import argparse
import ast
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import tokenize
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_GIT = os.environ.get("FLAX_GIT", "/work/.mirror/google+flax/repo")
NORMS = frozenset({"BatchNorm", "LayerNorm", "RMSNorm", "GroupNorm", "InstanceNorm"})
REPARAMS = frozenset({"WeightNorm", "SpectralNorm"})
# The SpectralNorm/WeightNorm tests: with --skip-spectral-weight, left on flax's modules in every
# variant (and not rerun by the jaxinit variants).
UNSUBSTITUTED = re.compile(r"spectral|weight_?norm", re.IGNORECASE)
LINEN, NNX = "_jaxinit_linen", "_jaxinit_nnx"
IMPORTS = {
    LINEN: "import jaxinit.linen as _jaxinit_linen",
    NNX: "import jaxinit.nnx as _jaxinit_nnx",
}
# --flax-defaults: WeightNorm and SpectralNorm become these partials of jaxinit's modules, with
# the settings that remove the deliberate differences that a parameter can remove (an explicit
# keyword argument in the test still wins).
FLAX_SUFFIX = "_flax"
FLAX_SETTINGS = {
    "WeightNorm": "scale_init=_jax.nn.initializers.ones",
    "SpectralNorm": "n_warmup=0, iterate_at_eval=True",
}


def _flax_defaults_shim(module: str) -> str:
    members = "".join(
        f"    {name} = _functools.partial({module}.{name}, {FLAX_SETTINGS[name]})\n"
        for name in sorted(FLAX_SETTINGS)
    )
    return f"class {module}{FLAX_SUFFIX}:  # flax-compatible settings (--flax-defaults)\n{members}"


# file key -> (path in the flax repository, test classes, {variant: {module alias: replacement}})
FILES = {
    "linen": (
        "tests/linen/linen_test.py",
        ("NormalizationTest",),
        {"flax": {}, "jaxinit": {"nn": LINEN}},
    ),
    "nnx": (
        "tests/nnx/nn/normalization_test.py",
        ("TestLinenConsistency",),
        {"flax": {}, "jaxinit": {"nnx": NNX, "linen": LINEN}, "mixed": {"nnx": NNX}},
    ),
}
VARIANTS = ("flax", "jaxinit", "mixed")

# Written next to the test files: records each test's outcome, failure message and absl
# parameters as JSON lines in $FLAX_NORM_RESULTS.
RECORDER = """
import json, os

_PARAMS = {}


def pytest_collection_modifyitems(items):
    for item in items:
        fn = getattr(item, "obj", None)
        _PARAMS[item.nodeid] = getattr(fn, "__x_params_repr__", "") or ""


def pytest_runtest_logreport(report):
    message = ""
    if report.failed:
        crash = getattr(report.longrepr, "reprcrash", None)
        message = crash.message if crash is not None else str(report.longrepr)
    elif report.skipped and isinstance(report.longrepr, tuple):
        message = str(report.longrepr[2])
    row = {"nodeid": report.nodeid, "when": report.when, "outcome": report.outcome,
           "message": message, "params": _PARAMS.get(report.nodeid, "")}
    with open(os.environ["FLAX_NORM_RESULTS"], "a") as f:
        f.write(json.dumps(row) + "\\n")
"""


def git_show(git_dir: str, rev: str, path: str) -> str:
    return subprocess.run(
        ["git", "-C", git_dir, "show", f"{rev}:{path}"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout


def method_spans(source: str, classes: tuple[str, ...]) -> dict[str, tuple[int, int]]:
    """``Class.method`` -> (first line, last line), decorators included, for the test methods."""
    spans = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.ClassDef) and node.name in classes:
            for fn in node.body:
                if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                    first = min([fn.lineno, *(d.lineno for d in fn.decorator_list)])
                    spans[f"{node.name}.{fn.name}"] = (first, fn.end_lineno)
    missing = set(classes) - {name.split(".")[0] for name in spans}
    if missing:
        raise SystemExit(f"test classes not found: {sorted(missing)}")
    return spans


def substitute(
    source: str,
    classes: tuple[str, ...],
    mapping: dict[str, str],
    aliases: set[str],
    skip_reparam_tests: bool = False,
    flax_defaults: bool = False,
) -> tuple[str, dict[str, int], list[str]]:
    """Rewrite ``alias.Module`` to ``mapping[alias].Module`` inside the test methods.

    ``Module`` is one of ``NORMS`` or ``REPARAMS``. With ``skip_reparam_tests`` the methods whose
    name mentions SpectralNorm or WeightNorm are left alone and ``REPARAMS`` are not rewritten;
    with ``flax_defaults`` the ``REPARAMS`` become the partials of ``_flax_defaults_shim``.

    Returns the new source, the number of substitutions per ``Class.method``, and warnings for
    module names in a substituted method that are neither rewritten nor ``alias.Module`` for one
    of the file's ``aliases`` (a reference of another form, which the rewrite would miss).
    """
    spans = method_spans(source, classes)
    counts = dict.fromkeys(spans, 0)
    if not mapping:
        return source, counts, []
    names = NORMS if skip_reparam_tests else NORMS | REPARAMS

    def method_of(row: int) -> str | None:
        for name, (lo, hi) in spans.items():
            if lo <= row <= hi:
                return name
        return None

    toks = [
        t
        for t in tokenize.generate_tokens(io.StringIO(source).readline)
        if t.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.COMMENT, tokenize.INDENT)
    ]
    edits: list[tuple[int, int, int, str]] = []  # (row, col, length, replacement)
    warnings = []
    shims = set()
    for i, tok in enumerate(toks):
        name = method_of(tok.start[0])
        if name is None or (skip_reparam_tests and UNSUBSTITUTED.search(name)):
            continue
        prev_dot = i > 0 and toks[i - 1].string == "."
        if (
            tok.type == tokenize.NAME
            and tok.string in mapping
            and not prev_dot
            and i + 2 < len(toks)
            and toks[i + 1].string == "."
            and toks[i + 2].string in names
        ):
            repl = mapping[tok.string]
            if flax_defaults and toks[i + 2].string in REPARAMS:
                shims.add(repl)
                repl += FLAX_SUFFIX
            edits.append((*tok.start, len(tok.string), repl))
            counts[name] += 1
        elif tok.type == tokenize.NAME and tok.string in names:
            owner = toks[i - 2] if prev_dot and i >= 2 else None
            if owner is None or owner.string not in aliases:
                warnings.append(f"{name}:{tok.start[0]}: {tok.line.strip()}")

    lines = source.splitlines(keepends=True)
    for row, col, length, repl in sorted(edits, reverse=True):
        line = lines[row - 1]
        lines[row - 1] = line[:col] + repl + line[col + length :]
    # Import the replacements after the last top-level import.
    last_import = max(
        n.end_lineno for n in ast.parse(source).body if isinstance(n, ast.Import | ast.ImportFrom)
    )
    added = [
        f"{IMPORTS[m]}  # added by flax_norm_tests.py\n" for m in sorted(set(mapping.values()))
    ]
    if shims:
        added.append("import functools as _functools, jax as _jax  # added by flax_norm_tests.py\n")
        added += [_flax_defaults_shim(m) for m in sorted(shims)]
    lines[last_import:last_import] = added
    return "".join(lines), counts, warnings


def run_variant(
    variant: str,
    files: dict[str, tuple[str, tuple[str, ...]]],
    root: Path,
    deselect: str | None = None,
) -> tuple[list[dict], float, str]:
    """Write the variant's files into ``root/variant`` and run them with pytest in one process."""
    vdir = root / variant
    vdir.mkdir()
    (vdir / "conftest.py").write_text(RECORDER)
    (vdir / "pytest.ini").write_text("[pytest]\naddopts =\nfilterwarnings =\n")
    targets = []
    for filename, (text, classes) in files.items():
        (vdir / filename).write_text(text)
        targets += [f"{filename}::{c}" for c in classes]
    results = vdir / "results.jsonl"
    env = dict(os.environ)
    env.update(
        FLAX_NORM_RESULTS=str(results),
        PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        JAX_NUMPY_DTYPE_PROMOTION="standard",
        PYTHONDONTWRITEBYTECODE="1",
    )
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:xdist", "-p", "no:cacheprovider"]
    cmd += ["-o", "addopts=", "-c", str(vdir / "pytest.ini"), "--rootdir", str(vdir), "--tb=no"]
    if deselect:
        cmd += ["-k", deselect]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd + targets, cwd=vdir, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - t0
    rows = (
        [json.loads(line) for line in results.read_text().splitlines()] if results.exists() else []
    )
    if not rows:
        raise SystemExit(f"pytest ({variant}) reported nothing:\n{proc.stdout}\n{proc.stderr}")
    tail = (proc.stdout.strip().splitlines() or [""])[-1]
    return rows, elapsed, tail


def outcomes(rows: list[dict]) -> dict[str, dict]:
    """nodeid -> {result, message, params}: failed if any phase failed, else skipped or passed."""
    out: dict[str, dict] = {}
    for r in rows:
        cur = out.setdefault(r["nodeid"], {"result": "passed", "message": "", "params": ""})
        cur["params"] = cur["params"] or r["params"]
        if r["outcome"] == "failed":
            if cur["result"] != "failed":
                cur["message"] = (
                    r["message"] if r["when"] == "call" else f"[{r['when']}] {r['message']}"
                )
            cur["result"] = "failed"
        elif r["outcome"] == "skipped" and cur["result"] == "passed":
            cur.update(result="skipped", message=r["message"])
    return out


def _module_repr(match: re.Match) -> str:
    fields = dict(re.findall(r"^\s+(\w+) = (.*)$", match.group(2), flags=re.MULTILINE))
    shown = ("num_groups", "group_size", "reduction_axes", "feature_axes")
    return match.group(1) + "(" + ", ".join(f"{k}={fields[k]}" for k in shown if k in fields) + ")"


def short_params(params: str) -> str:
    params = re.sub(r"(\w+)\(\n\s*# attributes\n(.*?)\n\)", _module_repr, params, flags=re.DOTALL)
    params = re.sub(r"<class '(?:[\w.]+\.)?(\w+)'>", r"\1", params)
    params = re.sub(
        r"<function (\S+) at 0x[0-9a-f]+>", lambda m: m.group(1).replace(".<locals>", ""), params
    )
    params = re.sub(r"<(flax|jax)[\w.]*\.(\w+) object at 0x\w+>", r"\2(...)", params)
    params = re.sub(r"array\(\[[^\]]*\]\)", "array", params)
    params = re.sub(r"\s+", " ", params)
    return params if len(params) <= 88 else params[:85] + "..."


def reason(message: str) -> str:
    """One line: the exception and, for numpy assertions, the mismatch and the largest error."""
    lines = [ln.strip() for ln in message.splitlines() if ln.strip().strip("-")]
    if not lines:
        return "?"
    keep = [lines[0]]
    for ln in lines[1:]:
        if ln.startswith(
            ("Not equal", "Arrays are", "Mismatched", "Max absolute", "nan location", "x and y")
        ):
            keep.append(ln)
    if len(keep) == 1 and len(lines) > 1:
        keep.append(lines[1])
    text = " | ".join(keep)
    return text if len(text) <= 240 else text[:237] + "..."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--flax-git", default=DEFAULT_GIT, help="flax's git directory (bare is fine)"
    )
    parser.add_argument("--rev", default="HEAD", help="revision of the flax tests (default HEAD)")
    parser.add_argument("--only", choices=sorted(FILES), help="run one test file only")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    parser.add_argument("--keep", action="store_true", help="keep (and print) the temp directory")
    parser.add_argument(
        "--skip-spectral-weight",
        action="store_true",
        help="leave the SpectralNorm/WeightNorm tests on flax's modules and do not rerun them "
        "(the behaviour before jaxinit had these modules)",
    )
    parser.add_argument(
        "--flax-defaults",
        action="store_true",
        help="substitute jaxinit's WeightNorm/SpectralNorm with flax's settings: "
        + "; ".join(f"{k}({v})" for k, v in sorted(FLAX_SETTINGS.items())),
    )
    args = parser.parse_args()

    import flax  # only for its version; the tests run in subprocesses

    try:
        version_py = git_show(args.flax_git, args.rev, "flax/version.py")
    except subprocess.CalledProcessError as e:
        raise SystemExit(
            f"cannot read flax at {args.flax_git}@{args.rev}: {e.stderr.strip()}"
        ) from e
    match = re.search(r"__version__ = ['\"]([^'\"]+)", version_py)
    snapshot_version = match.group(1) if match else "?"
    print(f"flax tests from {args.flax_git} @ {args.rev} (version {snapshot_version});")
    print(f"installed flax {flax.__version__}, python {sys.version.split()[0]}")
    if args.flax_defaults and not args.skip_spectral_weight:
        settings = "; ".join(f"{k}({v})" for k, v in sorted(FLAX_SETTINGS.items()))
        print(f"--flax-defaults: jaxinit's modules substituted as {settings}")
    if snapshot_version != flax.__version__:
        print(
            f"WARNING: the tests are from flax {snapshot_version}, the installed flax is "
            f"{flax.__version__}; pass --rev v{flax.__version__} if they use a missing API."
        )

    keys = [args.only] if args.only else list(FILES)
    per_variant: dict[str, dict[str, tuple[str, tuple[str, ...]]]] = {v: {} for v in VARIANTS}
    subs: dict[str, dict[str, dict[str, int]]] = {}
    for key in keys:
        path, classes, variants = FILES[key]
        source = git_show(args.flax_git, args.rev, path)
        filename = Path(path).name
        aliases = {alias for mapping in variants.values() for alias in mapping}
        for variant, mapping in variants.items():
            text, counts, warnings = substitute(
                source, classes, mapping, aliases, args.skip_spectral_weight, args.flax_defaults
            )
            per_variant[variant][filename] = (text, classes)
            subs.setdefault(variant, {})[filename] = counts
            for w in warnings:
                print(f"WARNING ({variant}) norm reference not substituted: {filename}:{w}")

    # The jaxinit variants leave the SpectralNorm/WeightNorm tests unchanged: do not rerun them.
    deselect = (
        "not spectral and not weight_norm and not weightnorm" if args.skip_spectral_weight else None
    )
    t_start = time.perf_counter()
    results: dict[str, dict[str, dict]] = {}
    with tempfile.TemporaryDirectory(prefix="flax_norm_tests_") as tmp:
        for variant in VARIANTS:
            if not per_variant[variant]:
                continue
            rows, elapsed, tail = run_variant(
                variant, per_variant[variant], Path(tmp), None if variant == "flax" else deselect
            )
            results[variant] = outcomes(rows)
            print(f"pytest [{variant}]: {tail} ({elapsed:.0f} s)", flush=True)
        if args.keep:
            keep_dir = Path(tempfile.mkdtemp(prefix="flax_norm_tests_kept_"))
            subprocess.run(["cp", "-r", f"{tmp}/.", str(keep_dir)], check=True)
            print(f"test files kept in {keep_dir}")
    total = time.perf_counter() - t_start

    def sub_count(variant: str, nodeid: str) -> int | None:
        filename, cls, test = nodeid.split("::")
        by_method = subs.get(variant, {}).get(filename)
        if by_method is None:
            return None
        # absl's parameterized names are the method name plus an index suffix.
        bases = [
            m for m in by_method if m.startswith(cls + ".") and test.startswith(m.split(".")[1])
        ]
        return by_method[max(bases, key=len)] if bases else 0

    def cell(variant: str, nodeid: str) -> str:
        res = results[variant].get(nodeid)
        if res is None:
            if sub_count(variant, nodeid) is not None and UNSUBSTITUTED.search(nodeid):
                return "= flax (not rerun)"
            return "-"
        if variant != "flax" and sub_count(variant, nodeid) == 0:
            return res["result"] + " (no substitution)"
        return res["result"]

    abbrev = {"linen_test.py": "linen", "normalization_test.py": "nnx"}

    def short_id(nodeid: str) -> str:
        filename, _, test = nodeid.split("::")
        return f"{abbrev.get(filename, filename)}::{test}"

    ids = list(results["flax"])
    shown = [v for v in VARIANTS if v in results]
    width = max(len(short_id(i)) for i in ids) + 2
    print(
        "\nVariants: flax = flax's modules (baseline); jaxinit = jaxinit's linen and nnx modules; "
        "mixed = jaxinit's nnx modules against flax's linen ones (nnx file only)."
    )
    classes = ", ".join(f"{abbrev[Path(p).name]}: {'/'.join(c)}" for p, c, _ in FILES.values())
    print(f"Test classes: {classes}.\n")
    header = f"{'test':<{width}}{'params':<90}" + "".join(f"{v:<26}" for v in shown)
    print(header)
    print("-" * len(header))
    for nodeid in ids:
        params = short_params(results["flax"][nodeid]["params"])
        row = "".join(f"{cell(v, nodeid):<26}" for v in shown)
        print(f"{short_id(nodeid):<{width}}{params:<90}{row}".rstrip())

    print("\nFailures under jaxinit (variant: test (params) [flax's result]: reason):")
    any_failure = False
    for variant in shown[1:]:
        for nodeid, res in results[variant].items():
            if res["result"] == "failed":
                any_failure = True
                params = short_params(res["params"])
                flax_res = results["flax"].get(nodeid, {}).get("result", "-")
                print(
                    f"  {variant}: {short_id(nodeid)} {params} [flax: {flax_res}]: {reason(res['message'])}"
                )
    if not any_failure:
        print("  none")

    print("\nCounts (passed/failed/skipped; = flax: SpectralNorm/WeightNorm tests not rerun):")
    for filename in {i.split("::")[0]: None for i in ids}:
        parts = []
        for variant in shown:
            tally = dict.fromkeys(("passed", "failed", "skipped", "= flax"), 0)
            for nodeid in ids:
                if nodeid.startswith(filename + "::"):
                    res = results[variant].get(nodeid)
                    if res is not None:
                        tally[res["result"]] += 1
                    elif cell(variant, nodeid).startswith("= flax"):
                        tally["= flax"] += 1
            if sum(tally.values()):
                text = f"{variant} {tally['passed']}/{tally['failed']}/{tally['skipped']}"
                if tally["= flax"]:
                    text += f" (+{tally['= flax']} = flax)"
                parts.append(text)
        print(f"  {abbrev.get(filename, filename)} ({filename}): " + ", ".join(parts))
    print(f"\nTotal pytest time: {total:.0f} s")

    if args.json:
        args.json.write_text(json.dumps({"results": results, "substitutions": subs}, indent=1))
        print(f"results written to {args.json}")


if __name__ == "__main__":
    main()
