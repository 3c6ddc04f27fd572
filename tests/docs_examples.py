"""Runs the fenced python examples of a markdown page, so the docs cannot rot.

Every ```` ```python ```` block of a page runs, in order, in one namespace per page (a later block
may use what an earlier one defined, as a reader would). A block that cannot run in the default
test suite says why on the line right before it::

    <!-- docs-test: skip (needs a GPU) -->
    ```python
    ...
    ```

Blocks of other languages (bash, yaml, text) are not run here; the set-up commands of README.md
are compared with `.ci/run` by tests/test_docs.py.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
import traceback

_FENCE = re.compile(r"^```(?P<lang>[\w+-]*)[^\n]*\n(?P<body>.*?)^```[ \t]*$", re.M | re.S)
_SKIP = re.compile(r"<!--\s*docs-test:\s*skip\s*\((?P<reason>[^)]+)\)\s*-->\s*$")


class ExampleError(AssertionError):
  """An example block raised; the message names the page, the block's line and the error."""


@dataclasses.dataclass(frozen=True)
class Block:
  page: str
  line: int          # 1-based line of the block's first code line
  language: str
  code: str
  skip_reason: str | None


def blocks(text: str, page: str) -> list[Block]:
  """Every fenced block of ``text``, with the skip reason written right before it."""
  found = []
  for match in _FENCE.finditer(text):
    before = text[:match.start()].rstrip("\n").rsplit("\n", 1)[-1]
    skip = _SKIP.search(before)
    found.append(Block(page=page, line=text.count("\n", 0, match.start("body")) + 1,
                       language=match["lang"], code=match["body"],
                       skip_reason=skip["reason"].strip() if skip else None))
  return found


def python_blocks(path: pathlib.Path, root: pathlib.Path) -> list[Block]:
  page = str(path.relative_to(root))
  return [block for block in blocks(path.read_text(), page) if block.language == "python"]


def run_blocks(page_blocks: list[Block]) -> int:
  """Runs the blocks in order in one namespace; returns how many ran (skips excluded).

  Raises:
    ExampleError: a block raised; names ``page:line`` of the failing line when known.
  """
  namespace: dict = {"__name__": "__docs_example__"}
  ran = 0
  for block in page_blocks:
    if block.skip_reason is not None:
      continue
    # Pad so line numbers in tracebacks are the page's own.
    source = "\n" * (block.line - 1) + block.code
    try:
      exec(compile(source, block.page, "exec"), namespace)  # noqa: S102 (our own docs)
    except Exception as error:  # noqa: BLE001 (re-raised with the location)
      frames = [frame for frame in traceback.extract_tb(error.__traceback__)
                if frame.filename == block.page]
      where = f"{block.page}:{frames[-1].lineno}" if frames else f"{block.page}:{block.line}"
      raise ExampleError(f"the example block at {block.page}:{block.line} failed at {where}: "
                         f"{type(error).__name__}: {error}") from error
    ran += 1
  return ran
