"""Step splitting on hand-written texts: spans are character offsets, worked out in each docstring."""

import pytest

from selfimprove.reward.steps import Step, cap_steps, split_steps


def spans(text, how):
    steps = split_steps(text, how)
    assert all(text[s.start:s.end] == s.text for s in steps)
    return [(s.start, s.end, s.text) for s in steps]


def test_newline_skips_blank_lines_and_strips_each_step():
    """"Mia has 9 shells." is 0-17; two newlines and two spaces put "She ... = 8." (31 chars) at 21-52;
    two spaces and a newline (52-54) put "The answer is 8." (16 chars) at 55-71."""
    text = "Mia has 9 shells.\n\n  She gives 1 away, so 9 - 1 = 8.  \nThe answer is 8.\n"
    assert spans(text, "newline") == [(0, 17, "Mia has 9 shells."), (21, 52, "She gives 1 away, so 9 - 1 = 8."),
                                      (55, 71, "The answer is 8.")]


def test_sentence_cuts_after_end_marks_but_not_inside_numbers():
    """The prompt example: sentences of 30, 21, 43 and 17 chars, each after one space: 0-30, 31-52, 53-96, 97-114.
    "3.5" is not cut: its dot has no space after it."""
    text = ("Maria starts with 12 balloons. 4 pop, so 12 - 4 = 8. Her friend gives her 7 more, so 8 + 7 = 15. "
            "The answer is 15.")
    assert spans(text, "sentence") == [
        (0, 30, "Maria starts with 12 balloons."), (31, 52, "4 pop, so 12 - 4 = 8."),
        (53, 96, "Her friend gives her 7 more, so 8 + 7 = 15."), (97, 114, "The answer is 15.")]
    assert spans("He pays 3.5 dollars. The answer is 3.5.", "sentence") == [
        (0, 20, "He pays 3.5 dollars."), (21, 39, "The answer is 3.5.")]
    assert spans("Two lines.\nSecond one! Third? yes", "sentence") == [
        (0, 10, "Two lines."), (11, 22, "Second one!"), (23, 29, "Third?"), (30, 33, "yes")]


def test_step_markers_with_a_preamble_and_markdown():
    """Preamble "Let's solve it." 0-15; "Step 1: 9 - 1 = 8." (18 chars) at 16-34; "**Step 2:** The answer is 8."
    (28 chars) at 35-63: the marker's asterisks belong to its step."""
    text = "Let's solve it.\nStep 1: 9 - 1 = 8.\n**Step 2:** The answer is 8."
    assert spans(text, "step_marker") == [(0, 15, "Let's solve it."), (16, 34, "Step 1: 9 - 1 = 8."),
                                          (35, 63, "**Step 2:** The answer is 8.")]


def test_step_markers_on_one_line_and_words_that_are_not_markers():
    """"Step 1: 2 + 3 = 5." is 0-18; the second marker starts at 19 and runs to the end (56).
    "step by step" and "in step 2," have no marker punctuation, so they do not cut; "step 3)" does."""
    text = "Step 1: 2 + 3 = 5. Step 2: 5 * 2 = 10. The answer is 10."
    assert spans(text, "step_marker") == [(0, 18, "Step 1: 2 + 3 = 5."),
                                          (19, 56, "Step 2: 5 * 2 = 10. The answer is 10.")]
    assert spans("Go step by step: in step 2, we add. step 3) done", "step_marker") == [
        (0, 35, "Go step by step: in step 2, we add."), (36, 48, "step 3) done")]


@pytest.mark.parametrize("how", ["newline", "sentence", "step_marker"])
def test_blank_text_has_no_step_and_one_line_is_one_step(how):
    assert split_steps("", how) == [] and split_steps("  \n\n \t", how) == []
    assert split_steps("  The answer is 8.", how) == [Step(2, 18, "The answer is 8.")]


def test_text_without_markers_is_one_step():
    assert spans("9 - 1 = 8.\nThe answer is 8.", "step_marker") == [(0, 27, "9 - 1 = 8.\nThe answer is 8.")]


def test_cap_keeps_the_path_whole():
    """Four one-letter lines at 0, 2, 4, 6: max 2 keeps "a" and merges b..d into 2-7; max 1 is the whole text."""
    text = "a\nb\nc\nd"
    steps = split_steps(text, "newline")
    assert cap_steps(text, steps, 4) == steps
    assert cap_steps(text, steps, 2) == [Step(0, 1, "a"), Step(2, 7, "b\nc\nd")]
    assert cap_steps(text, steps, 1) == [Step(0, 7, text)]


def test_unknown_split():
    with pytest.raises(ValueError, match="unknown split 'lines'"):
        split_steps("a", "lines")
