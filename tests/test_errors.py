"""errors.library_text: what of a library's error text may reach a user (issue 22.5)."""
from __future__ import annotations

from minserve.errors import MAX_LIBRARY_TEXT, library_text


def test_library_text_is_one_bounded_line_without_internals():
    panic = ("panic: assertion failed: grammar.symbols.len() < u16::MAX as usize - 10\n"
             "<backtrace>\n   0: <unknown>\n   1: /root/.cargo/registry/src/x/lib.rs:12:5")
    assert "panic" not in library_text(panic) and "\n" not in library_text(panic)
    caret = ('at 1(8): invalid regex "(?=a)b" (in regex): regex parse error:\n    (?=a)b\n'
             '    ^^^\nerror: look-around, including look-ahead and look-behind, is not supported')
    assert library_text(caret).startswith("look-around, including look-ahead and look-behind, "
                                          "is not supported; at 1(8): invalid regex")
    assert library_text("failed at /home/ci/build/src/parser.rs:41:7 in here") == \
        "failed at <path> in here"
    long = library_text("x" * 100_000)
    assert len(long) == MAX_LIBRARY_TEXT and long.endswith("…")
    assert library_text(ValueError("  \n first line\nsecond")) == "first line"
    assert library_text("") == "unknown error"
