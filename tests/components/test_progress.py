"""Progress bars draw on a terminal only: in a log or a pipe they print nothing, not blank lines."""

from __future__ import annotations

from components.progress import LOG_WIDTH, make_console, track


def test_without_a_terminal_a_progress_bar_prints_nothing(capsys):
    assert list(track(range(5), description="Working")) == [0, 1, 2, 3, 4]
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


def test_without_a_terminal_the_console_is_wide_enough_for_one_line_summaries(capsys):
    console = make_console()
    assert not console.is_terminal and console.width == LOG_WIDTH
    console.print("x" * 150)
    assert capsys.readouterr().out == "x" * 150 + "\n"
