"""Tables in README.md and docs/*.md generated from the committed benchmark results.

``python -m experiments.doc_tables`` rewrites every generated table from ``benchmarks/*.json``;
``python -m experiments.doc_tables --check`` exits 1 listing the tables that differ from what the
files would give (the test suite runs the check, so a figure in the docs cannot drift from the
file it comes from).

A generated table sits between two HTML comments (invisible on GitHub); the first holds its spec
as a YAML flow mapping::

    <!-- table: {source: benchmarks/attention_memory.json,
                 where: {causal: true, pass: forward+backward},
                 rows: implementation, columns: seq_len, value: temp_bytes, format: bytes,
                 corner: "causal fwd+bwd temp", column_header: "S={}"} -->
    | ... generated ... |
    <!-- /table -->

Two shapes:

* pivot (``rows``, ``columns`` and ``value`` are column names of the JSON rows; ``rows`` may be
  a list of names): one line per distinct ``rows`` value (labelled "a, b" for a list), one
  column per distinct ``columns`` value, the cell is ``value``;
  ``split: {pass: [forward, forward+backward]}`` puts several values in one cell ("a / b");
  ``speedup_vs: {match: {implementation: cuDNN}, same: [seq_len, pass]}`` shows instead the
  baseline row's ``value`` over this row's (a time ratio > 1 = faster than the baseline), the
  baseline being the row that matches ``match`` and agrees on the ``same`` columns.
* select (``columns`` is a list): the matching rows as they are, those columns only.

Shared keys: ``where`` ({column: value or [values]}) keeps matching rows, in the file's order
(pivot lines and columns keep that order, or ``row_order``/``column_order``); ``labels``
({raw value: shown}) renames row labels; ``headers`` ({column: shown}) renames select headers;
``format`` is one format for every cell or {column: format}: ``bytes`` (KiB/MiB/GiB, as the
benchmark files print them), ``ratio`` ("1.05x"), ``percent`` ("23%" of a value in percent), ``fraction`` ("53.1%" of a value in [0, 1]),
``ci`` ("[+0.010, +0.133]" of a [low, high] pair) or a Python format spec (``.3f``, ``+.2f``,
``.3g``); a missing cell is "-".
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import re
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

from effjax.benchmarking import format_bytes

ROOT = pathlib.Path(__file__).resolve().parent.parent
PAGES = ("README.md", "docs/*.md")
_BLOCK = re.compile(r"(<!-- table:(?P<spec>.*?)-->\n)(?P<body>.*?)(<!-- /table -->)", re.DOTALL)


class TableSpecError(ValueError):
  """A table spec that names a missing file, column or value, or an unknown format."""


def format_value(value: Any, fmt: str | None) -> str:
  """One cell: ``value`` in format ``fmt`` (see the module docstring); None is '-'."""
  if value is None:
    return "-"
  try:
    return _FORMATS[fmt](value) if fmt in _FORMATS else format(value, fmt)
  except (ValueError, TypeError) as error:
    raise TableSpecError(f"format {fmt!r} cannot format {value!r}: {error}") from error


def _ci(value: Any) -> str:
  low, high = value
  return f"[{low:+.3f}, {high:+.3f}]"


_FORMATS = {
    None: lambda value: f"{value:.3g}" if isinstance(value, float) else str(value),
    "bytes": format_bytes,
    "ratio": lambda value: f"{value:.2f}x",
    "percent": lambda value: f"{value:.0f}%",
    "fraction": lambda value: f"{value:.1%}",
    "ci": _ci,
}


@dataclasses.dataclass(frozen=True)
class TableSpec:
  source: str
  columns: str | Sequence[str]
  rows: str | Sequence[str] | None = None
  value: str | None = None
  where: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  split: Mapping[str, Sequence[Any]] = dataclasses.field(default_factory=dict)
  format: str | Mapping[str, str] | None = None
  labels: Mapping[Any, str] = dataclasses.field(default_factory=dict)
  headers: Mapping[str, str] = dataclasses.field(default_factory=dict)
  corner: str = ""
  column_header: str = "{}"
  row_order: Sequence[Any] | None = None
  column_order: Sequence[Any] | None = None
  speedup_vs: Mapping[str, Any] | None = None

  @classmethod
  def parse(cls, text: str) -> TableSpec:
    try:
      fields = yaml.safe_load(text)
    except yaml.YAMLError as error:
      raise TableSpecError(f"table spec is not YAML: {error}") from error
    if not isinstance(fields, dict):
      raise TableSpecError(f"table spec must be a mapping, got {text.strip()!r}")
    known = {field.name for field in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - known)
    if unknown:
      raise TableSpecError(f"unknown table spec key(s) {unknown}; known: {sorted(known)}")
    try:
      spec = cls(**fields)
    except TypeError as error:
      raise TableSpecError(f"table spec {fields}: {error}") from error
    pivot = spec.rows is not None or spec.value is not None
    if pivot and not (spec.rows and spec.value and isinstance(spec.columns, str)):
      raise TableSpecError("a pivot table needs 'rows', 'value' and one 'columns' name, got "
                           f"rows={spec.rows!r}, columns={spec.columns!r}, value={spec.value!r}")
    if not pivot and isinstance(spec.columns, str):
      raise TableSpecError(f"a select table needs a list of 'columns', got {spec.columns!r}")
    return spec

  def cell_format(self, column: str) -> str | None:
    if isinstance(self.format, Mapping):
      return self.format.get(column)
    return self.format


def _matches(row: Mapping[str, Any], where: Mapping[str, Any]) -> bool:
  for column, wanted in where.items():
    allowed = wanted if isinstance(wanted, list) else [wanted]
    if row.get(column) not in allowed:
      return False
  return True


def _ordered_unique(values: Sequence[Any]) -> list[Any]:
  return list(dict.fromkeys(values))


def _check_columns(spec: TableSpec, rows: Sequence[Mapping[str, Any]], names: Sequence[str]):
  present = set().union(*(row.keys() for row in rows)) if rows else set()
  missing = [name for name in names if name not in present]
  if missing:
    raise TableSpecError(f"{spec.source} has no column(s) {missing}; it has {sorted(present)}")


def render(spec: TableSpec, root: pathlib.Path = ROOT) -> str:
  """The markdown table ``spec`` describes, from its source file under ``root``."""
  path = root / spec.source
  if not path.is_file():
    raise TableSpecError(f"table source {spec.source!r} does not exist under {root}")
  all_rows = json.loads(path.read_text())["rows"]
  _check_columns(spec, all_rows, [*spec.where, *spec.split])
  rows = [row for row in all_rows if _matches(row, spec.where)]
  if not rows:
    raise TableSpecError(f"no row of {spec.source} matches where={dict(spec.where)}")
  if spec.rows is None:
    return _select(spec, rows)
  if spec.speedup_vs is not None:
    rows = _speedups(spec, rows, all_rows)
  return _pivot(spec, rows)


def _speedups(spec: TableSpec, rows: Sequence[Mapping[str, Any]],
              all_rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
  """``rows`` with ``value`` replaced by baseline value / own value (None where either is)."""
  if set(spec.speedup_vs) != {"match", "same"}:
    raise TableSpecError("speedup_vs needs exactly 'match' and 'same', got "
                         f"{dict(spec.speedup_vs)}")
  match, same = spec.speedup_vs["match"], list(spec.speedup_vs["same"])
  _check_columns(spec, all_rows, [*match, *same])
  baselines = {tuple(row.get(column) for column in same): row.get(spec.value)
               for row in all_rows if _matches(row, match)}
  out = []
  for row in rows:
    own, base = row.get(spec.value), baselines.get(tuple(row.get(column) for column in same))
    out.append({**row, spec.value: base / own if own and base is not None else None})
  return out


def _select(spec: TableSpec, rows: Sequence[Mapping[str, Any]]) -> str:
  _check_columns(spec, rows, spec.columns)
  header = [spec.headers.get(column, column) for column in spec.columns]
  lines = [header] + [
      [format_value(row.get(column), spec.cell_format(column)) for column in spec.columns]
      for row in rows]
  return _markdown(lines)


def _pivot(spec: TableSpec, rows: Sequence[Mapping[str, Any]]) -> str:
  row_columns = [spec.rows] if isinstance(spec.rows, str) else list(spec.rows)
  _check_columns(spec, rows, [*row_columns, spec.columns, spec.value])

  def row_key(row: Mapping[str, Any]) -> Any:
    values = tuple(row[column] for column in row_columns)
    return values[0] if len(values) == 1 else ", ".join(map(str, values))

  row_keys = list(spec.row_order or _ordered_unique([row_key(row) for row in rows]))
  column_keys = list(spec.column_order or _ordered_unique([row[spec.columns] for row in rows]))
  (split_column, split_values), = spec.split.items() if spec.split else ((None, [None]),)
  cells: dict[tuple[Any, Any, Any], Any] = {}
  for row in rows:
    key = (row_key(row), row[spec.columns], row.get(split_column) if split_column else None)
    if key in cells:
      raise TableSpecError(f"{spec.source}: several rows for {spec.rows}={key[0]!r}, "
                           f"{spec.columns}={key[1]!r}; narrow 'where' or add 'split'")
    cells[key] = row.get(spec.value)
  fmt = spec.cell_format(spec.value)
  lines = [[spec.corner] + [spec.column_header.format(key) for key in column_keys]]
  for label_key in row_keys:
    line = [str(spec.labels.get(label_key, label_key))]
    for column_key in column_keys:
      parts = [format_value(cells.get((label_key, column_key, part)), fmt) for part in split_values]
      line.append(" / ".join(parts))
    lines.append(line)
  return _markdown(lines)


def _markdown(lines: Sequence[Sequence[str]]) -> str:
  out = ["| " + " | ".join(lines[0]) + " |", "|" + "---|" * len(lines[0])]
  out += ["| " + " | ".join(cell.replace("|", "\\|") for cell in line) + " |" for line in lines[1:]]
  return "\n".join(out) + "\n"


def regenerate(text: str, root: pathlib.Path = ROOT, where: str = "<text>") -> str:
  """``text`` with every generated table re-rendered from its source."""

  def replace(match: re.Match[str]) -> str:
    try:
      table = render(TableSpec.parse(match["spec"]), root)
    except TableSpecError as error:
      line = text.count("\n", 0, match.start()) + 1
      raise TableSpecError(f"{where}:{line}: {error}") from error
    return match.group(1) + table + match.group(4)

  return _BLOCK.sub(replace, text)


def pages(root: pathlib.Path = ROOT) -> list[pathlib.Path]:
  """README.md and every docs/*.md page."""
  return sorted(path for pattern in PAGES for path in root.glob(pattern))


def stale_tables(root: pathlib.Path = ROOT) -> list[str]:
  """Pages whose generated tables differ from their sources (empty when all are current)."""
  stale = []
  for page in pages(root):
    text = page.read_text()
    if regenerate(text, root, str(page.relative_to(root))) != text:
      stale.append(str(page.relative_to(root)))
  return stale


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m experiments.doc_tables",
                                   description=__doc__.splitlines()[0])
  parser.add_argument("--check", action="store_true",
                      help="change nothing; exit 1 if a generated table is out of date")
  args = parser.parse_args(sys.argv[1:] if argv is None else argv)
  if args.check:
    stale = stale_tables()
    for page in stale:
      print(f"stale generated table(s) in {page}: run python -m experiments.doc_tables")
    return 1 if stale else 0
  for page in pages():
    text = page.read_text()
    new = regenerate(text, ROOT, str(page.relative_to(ROOT)))
    if new != text:
      page.write_text(new)
      print(f"updated {page.relative_to(ROOT)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
