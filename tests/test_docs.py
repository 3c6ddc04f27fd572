"""The docs cannot rot: examples run, set-up commands are CI's, tables come from the benchmarks."""

import json
import pathlib
import re

import pytest

import docs_examples
from effjax import dispatch
from experiments import doc_tables

ROOT = pathlib.Path(__file__).resolve().parent.parent
PAGES = doc_tables.pages(ROOT)


def test_every_pillar_has_a_page():
  names = {page.name for page in PAGES}
  assert {"README.md", "attention.md", "long_conv.md", "kv_cache.md", "sharded_training.md",
          "models.md", "experiments.md", "compiling.md", "contributing.md",
          "training_state.md", "sequence_parallel.md", "activations.md",
          "privacy.md"} <= names


@pytest.fixture
def restore_dispatch_tables():
  """Examples may register ops and edit default orders (contributing.md does); undo it."""
  orders = {op: dict(rows) for op, rows in dispatch.DEFAULT_ORDER.items()}
  registry = {op: dict(entries) for op, entries in dispatch._REGISTRY.items()}  # noqa: SLF001
  yield
  dispatch.DEFAULT_ORDER.clear()
  dispatch.DEFAULT_ORDER.update(orders)
  dispatch._REGISTRY.clear()  # noqa: SLF001
  dispatch._REGISTRY.update(registry)  # noqa: SLF001


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_examples_run(page, restore_dispatch_tables):
  page_blocks = docs_examples.python_blocks(page, ROOT)
  for block in page_blocks:
    assert block.skip_reason is None or block.skip_reason.strip(), block
  docs_examples.run_blocks(page_blocks)


def test_a_broken_example_fails_naming_its_line(tmp_path):
  page = tmp_path / "page.md"
  page.write_text("# t\n\n```python\nx = 1\n```\n\ntext\n\n```python\ny = x + 1\n"
                  "z = undefined_name\n```\n\n<!-- docs-test: skip (needs a TPU) -->\n"
                  "```python\nraise SystemExit\n```\n")
  page_blocks = docs_examples.python_blocks(page, tmp_path)
  assert [block.skip_reason for block in page_blocks] == [None, None, "needs a TPU"]
  with pytest.raises(docs_examples.ExampleError,
                     match=r"block at page.md:10 failed at page.md:11: NameError"):
    docs_examples.run_blocks(page_blocks)
  assert docs_examples.run_blocks(page_blocks[:1] + page_blocks[2:]) == 1


def _setup_commands(readme: str) -> list[str]:
  section = ("\n" + readme).split("\n## Set up", 1)[1].split("\n## ", 1)[0]
  commands = []
  for block in docs_examples.blocks(section, "README.md"):
    if block.language == "bash":
      commands += [line.strip() for line in block.code.splitlines()
                   if line.strip() and not line.lstrip().startswith("#")]
  return commands


def test_readme_setup_commands_are_what_ci_runs():
  commands = _setup_commands((ROOT / "README.md").read_text())
  ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")]
  assert len(commands) == 2, commands  # quickstart, tests
  missing = [command for command in commands if command not in ci]
  assert not missing, f"README set-up commands that .ci/run does not run: {missing}"
  assert ci[-len(commands):] == commands, "CI must end with README's quickstart and test commands"


def test_setup_comparison_fails_on_drift():
  readme = "## Set up\n\n```bash\npip install x && run-it\n```\n\n## Next\n"
  assert _setup_commands(readme) == ["pip install x && run-it"]
  assert _setup_commands(readme.replace("run-it", "run-other")) != ["pip install x && run-it"]


def test_generated_tables_match_their_benchmark_files():
  assert doc_tables.stale_tables(ROOT) == []
  assert sum(page.read_text().count("<!-- table:") for page in PAGES) >= 20


def _bench(tmp_path, rows):
  (tmp_path / "b.json").write_text(json.dumps({"rows": rows}))


def test_generated_table_drift_is_detected(tmp_path):
  _bench(tmp_path, [{"impl": "a", "n": 1, "ms": 2.0}, {"impl": "b", "n": 1, "ms": 4.0}])
  spec = ("<!-- table: {source: b.json, rows: impl, columns: n, value: ms, format: .1f,\n"
          "             speedup_vs: {match: {impl: b}, same: [n]}} -->\n")
  fresh = doc_tables.regenerate(spec + "<!-- /table -->", tmp_path)
  assert "| a | 2.0 |" in fresh and "| b | 1.0 |" in fresh
  assert doc_tables.regenerate(fresh, tmp_path) == fresh
  edited = fresh.replace("| a | 2.0 |", "| a | 2.5 |")
  assert doc_tables.regenerate(edited, tmp_path) != edited


@pytest.mark.parametrize("spec, words", [
    ("{source: missing.json, columns: [impl]}", "does not exist"),
    ("{source: b.json, columns: [impl, nope]}", r"no column\(s\) \['nope'\]"),
    ("{source: b.json, columns: [impl], where: {impl: z}}", "no row of b.json matches"),
    ("{source: b.json, rows: impl, columns: n, value: ms, colour: red}", "unknown table spec"),
    ("{source: b.json, columns: impl}", "select table needs a list"),
    ("{source: b.json, rows: n, columns: n, value: ms}", "several rows"),
    ("{source: b.json, columns: [ms], format: {ms: ci}}", "cannot format"),
])
def test_bad_table_spec_is_a_clear_error(tmp_path, spec, words):
  _bench(tmp_path, [{"impl": "a", "n": 1, "ms": 2.0}, {"impl": "b", "n": 1, "ms": 4.0}])
  text = f"intro\n\n<!-- table: {spec} -->\n<!-- /table -->\n"
  with pytest.raises(doc_tables.TableSpecError, match=rf"page.md:3: .*{words}"):
    doc_tables.regenerate(text, tmp_path, "page.md")


def test_links_between_pages_resolve():
  broken = []
  for page in PAGES:
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
      if "://" in target:
        continue
      if not (page.parent / target).exists():
        broken.append(f"{page.relative_to(ROOT)} -> {target}")
  assert not broken, broken
