"""effjax.dispatch: registry, default-order table, fall-through and error reporting."""

import logging
import pathlib

import pytest

from effjax import dispatch


@pytest.fixture
def op(monkeypatch):
  """A throwaway op with three implementations and its own default-order entry."""
  name = "toy_op"
  monkeypatch.setitem(dispatch._REGISTRY, name, {})
  monkeypatch.setitem(dispatch.DEFAULT_ORDER, name,
                      {"cpu": ("fast", "fallback"), "gpu": ("kernel", "fallback"), "tpu": ()})

  def fast(x):
    if x < 0:
      raise NotImplementedError("fast only serves x >= 0")
    return ("fast", x)

  def kernel(x):
    raise NotImplementedError("needs a GPU")

  dispatch.register(name, "fast", fast)
  dispatch.register(name, "kernel", kernel)
  dispatch.register(name, "fallback", lambda x: ("fallback", x))
  return name


def test_default_order_uses_the_platform_row(op):
  assert dispatch.current_platform() == "cpu"
  assert dispatch.default_order(op) == ("fast", "fallback")
  assert dispatch.default_order(op, "gpu") == ("kernel", "fallback")
  assert dispatch.dispatch(op, None, 3) == ("fast", 3)


def test_not_implemented_falls_through_to_the_next(op):
  assert dispatch.dispatch(op, None, -1) == ("fallback", -1)
  assert dispatch.dispatch(op, ("kernel", "fast", "fallback"), 2) == ("fast", 2)


def test_explicit_name_is_used_alone(op):
  assert dispatch.dispatch(op, "fallback", 5) == ("fallback", 5)
  with pytest.raises(dispatch.NoImplementationError, match="fast only serves x >= 0"):
    dispatch.dispatch(op, "fast", -1)


def test_error_lists_every_reason(op):
  with pytest.raises(dispatch.NoImplementationError) as info:
    dispatch.dispatch(op, ["kernel", "fast"], -1)
  message = str(info.value)
  assert "'toy_op'" in message
  assert "kernel: needs a GPU" in message and "fast: fast only serves x >= 0" in message
  assert info.value.reasons == {"kernel": "needs a GPU", "fast": "fast only serves x >= 0"}


def test_empty_default_order_is_a_clear_error(op):
  with pytest.raises(dispatch.NoImplementationError, match="no default order for platform 'tpu'"):
    dispatch.default_order(op, "tpu")
  with pytest.raises(ValueError, match="platform must be one of"):
    dispatch.default_order(op, "quantum")


@pytest.mark.parametrize("bad, error, match", [
    ("slow", ValueError, r"unknown implementation\(s\) \['slow'\] for op 'toy_op'; registered"),
    (("fast", "nope"), ValueError, r"\['nope'\]"),
    ((), TypeError, "non-empty sequence of names"),
    (3, TypeError, "got 3"),
    (("fast", 1), TypeError, "got"),
])
def test_bad_implementation_requests(op, bad, error, match):
  with pytest.raises(error, match=match):
    dispatch.dispatch(op, bad, 1)


def test_unknown_op():
  with pytest.raises(ValueError, match="unknown op 'no_such_op'"):
    dispatch.dispatch("no_such_op", None)


def test_failed_backend_import_is_logged_and_reported(op, caplog):
  dispatch.register(op, "broken", "effjax_no_such_module.kernels:attention")
  with caplog.at_level(logging.WARNING, logger="effjax.dispatch"):
    with pytest.raises(dispatch.NoImplementationError, match="broken: backend .* failed to import"):
      dispatch.dispatch(op, "broken", 1)
  assert "implementation 'broken' of op 'toy_op' is unavailable" in caplog.text
  # Falls through to the next implementation, and keeps the reason on later calls.
  assert dispatch.dispatch(op, ("broken", "fallback"), 1) == ("fallback", 1)
  with pytest.raises(dispatch.NoImplementationError, match="ModuleNotFoundError"):
    dispatch.dispatch(op, "broken", 1)


def test_lazy_string_target_is_imported_on_first_use(op):
  dispatch.register(op, "stdlib", "math:sqrt")
  assert "stdlib" in dispatch.implementations(op)
  assert dispatch.dispatch(op, "stdlib", 16.0) == 4.0


def test_registering_a_different_target_under_a_taken_name_fails(op):
  dispatch.register(op, "fallback", dispatch._REGISTRY[op]["fallback"].target)  # idempotent
  with pytest.raises(ValueError, match="already registered"):
    dispatch.register(op, "fallback", lambda x: x)


def test_kernels_in_default_orders_ran_on_their_hardware():
  """A Pallas kernel enters a default order only with a committed measurement on that hardware."""
  import effjax  # noqa: F401  (registers every op)
  root = pathlib.Path(__file__).resolve().parent.parent
  for op, orders in dispatch.DEFAULT_ORDER.items():
    for platform, order in orders.items():
      for name in order:
        if name in dispatch.KERNEL_NAMES:
          evidence = dispatch.KERNEL_EVIDENCE.get((op, platform, name))
          assert evidence, f"{op} {platform} default {name!r} has no KERNEL_EVIDENCE entry"
          assert (root / evidence).is_file(), evidence
  for (op, platform, name), evidence in dispatch.KERNEL_EVIDENCE.items():
    assert name in dispatch.DEFAULT_ORDER[op][platform] and name in dispatch.implementations(op)
