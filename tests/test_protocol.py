"""The consultation protocol: turn kinds, answer extraction in promed.md §1's order, degenerate turns."""

import pytest

from promed_jax.consult import protocol as P
from promed_jax.data.cases import Case

OPTS = {"A": "Gentamicin", "B": "Ciprofloxacin", "C": "Ceftriaxone", "D": "Trimethoprim"}
OPTS5 = {"A": "发热", "B": "咳嗽", "C": "腹泻", "D": "头痛", "E": "乏力"}


def letters(text, options=OPTS):
    return P.extract_answer(text, options)


@pytest.mark.parametrize(
    "text, kind",
    [
        ("question: Do you have a fever?", P.QUESTION),
        ("Question: Do you smoke?", P.QUESTION),
        ("QUESTION：Any rash?", P.QUESTION),
        ("answer: it is C 【answer: C】", P.ANSWER),
        ("  Answer : C", P.ANSWER),
        ("Let me think. question: any travel?", P.QUESTION),  # contains only: still a question
        ("question: is it C? answer: C", P.QUESTION),  # the first marker decides
        ("answer: C. Follow-up question: none", P.ANSWER),
        ("问题：患者发热。answer: 【正确答案是A】", P.ANSWER),  # an echoed problem label is no question
        ("答案：A", P.ANSWER),
        ("I think it is C.", P.INVALID),
        ("", P.INVALID),
        ("The question is hard and the answer unclear", P.INVALID),  # words without colons are not markers
        ("subquestion: x", P.INVALID),
    ],
)
def test_turn_kind_by_first_marker(text, kind):
    assert P.turn_kind(text) == kind
    assert P.parse_doctor_turn(text, OPTS).kind == kind


@pytest.mark.parametrize(
    "text, expected",
    [
        ("answer: gonorrhea, so a cephalosporin. 【answer: C】", ("C",)),
        ("answer: 【answer: c】", ("C",)),  # lower case inside brackets
        ("answer: 【answer：B, D】", ("B", "D")),
        ("answer: 【answer: C. Ceftriaxone】", ("C",)),
        ("answer: 【answer: (D)】", ("D",)),
        ("answer: first 【answer: A】 then on reflection 【answer: B】", ("B",)),  # the last bracket wins
        ("answer: 【answer: B】 though answer: C", ("B",)),  # brackets before bare markers
        ("answer: 【answer: XXX】 I choose Ceftriaxone", ("C",)),  # empty bracket -> option text
        ("answer: 【answer: C3】", ()),
    ],
)
def test_bracketed_marker(text, expected):
    assert letters(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("answer: C", ("C",)),
        ("Answer: C", ("C",)),
        ("answer: c", ("C",)),  # lower case at the end of the turn
        ("answer: c.", ("C",)),
        ("answer: C because it blocks cell wall synthesis", ("C",)),
        ("answer: A and C", ("A", "C")),
        ("answer: the answer is (B)", ("B",)),
        ("answer: I first thought answer: A, but the answer: C.", ("C",)),  # the last marker
        ("answer: it is C 【answer: C", ("C",)),  # missing closing bracket
        ("answer: it is C answer: D】", ("D",)),  # missing opening bracket
        ("answer: B, A, B", ("A", "B")),  # de-duplicated and sorted
        ("answer: A patient with urethritis needs Ceftriaxone", ("C",)),  # `A` as an article -> option text
        ("answer: c is my choice", ()),  # lower-case letter followed by words: not a letter
        ("answer: ACE inhibitors are wrong here", ()),  # a word made of option letters is not an answer
        ("answer: E", ()),  # not an option letter
    ],
)
def test_letters_after_last_answer_marker(text, expected):
    assert letters(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("answer: The drug is Ceftriaxone.", ("C",)),
        ("answer: the drug is ceftriaxone", ("C",)),  # case-insensitive
        ("answer: I can't decide.", ()),
    ],
)
def test_option_text_fallback(text, expected):
    assert letters(text) == expected


def test_option_text_contained_in_another_is_dropped():
    opts = {"A": "Gastroenteritis", "B": "Viral gastroenteritis", "C": "Appendicitis"}
    assert letters("answer: this is viral gastroenteritis", opts) == ("B",)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("answer: 分析如下。【正确答案是A】", ("A",)),
        ("answer: 分析如下。【正确答案是ACD】", ("A", "C", "D")),
        ("answer: 分析如下。【答案：B、E】", ("B", "E")),
        ("answer: 分析。【答案：c】", ("C",)),
        ("answer: 分析如下，正确答案是A、C。", ("A", "C")),  # missing brackets
        ("answer: 答案：BD", ("B", "D")),
        ("answer: 患者主要表现为腹泻", ("C",)),  # option text
    ],
)
def test_chinese_markers(text, expected):
    assert letters(text, OPTS5) == expected


def test_multi_answer_must_match_whole_set():
    assert P.is_correct(("A", "C", "D"), ("A", "C", "D"))
    assert not P.is_correct(("A", "C"), ("A", "C", "D"))
    assert not P.is_correct(("A", "B", "C", "D"), ("A", "C", "D"))
    assert not P.is_correct((), ("A",))
    assert P.is_correct(("C",), ("C",))


def test_question_text_is_first_line_after_marker():
    turn = P.parse_doctor_turn("question:\n  Do you smoke?\nPatient: No, never.", OPTS)
    assert turn == P.DoctorTurn(kind=P.QUESTION, question="Do you smoke?")
    assert P.parse_doctor_turn("Thinking... question: Any fever?", OPTS).question == "Any fever?"
    assert P.parse_doctor_turn("question:", OPTS).question == ""


def test_degenerate_turns():
    assert P.parse_doctor_turn("I am not sure what to do.", OPTS) == P.DoctorTurn(kind=P.INVALID, reason=P.END_NO_MARKER)
    loop = "answer: the bacteria is " + "very very " * 30
    assert P.parse_doctor_turn(loop, OPTS) == P.DoctorTurn(kind=P.INVALID, reason=P.END_RUNAWAY)
    assert P.is_runaway("question: " + "Do you have pain? " * 8)
    zh = "answer: " + "患者发热，" * 20
    assert P.is_runaway(zh)
    # ordinary turns, even with a short repeat, are not runaway
    assert not P.is_runaway("answer: no no no. It is C 【answer: C】")
    assert not P.is_runaway("question: Have you had a fever, chills, or night sweats in the past two weeks?")


@pytest.mark.parametrize(
    "text, score", [("question: x?", 1.0), ("  answer: 【answer: A】", 1.0), ("ok so question: x?", 0.5), ("x", 0.0)]
)
def test_format_score(text, score):
    assert P.format_score(text) == score


def _case(language="en", known=(), answer=("C",)):
    return Case(
        id="t:1",
        source="t",
        language=language,
        initial_info="A 21-year-old man has knee pain." if language == "en" else "患者男，21岁，膝痛。",
        question="Which drug was given?" if language == "en" else "应给予何种药物？",
        options=OPTS,
        answer=answer,
        facts=("He has a fever.", "The culture shows diplococci.") if language == "en" else ("患者发热", "培养见双球菌"),
        known=known,
    )


def test_doctor_first_message_modes():
    case = _case()
    pro = P.doctor_first_message(case, mode="proactive", max_questions=10)
    assert "question:" in pro and "【answer: X】" in pro and "at most 10 questions" in pro
    assert "Problem: A 21-year-old man has knee pain. Which drug was given?" in pro
    assert "A: Gentamicin\nB: Ciprofloxacin\nC: Ceftriaxone\nD: Trimethoprim" in pro
    assert "fever" not in pro
    reactive = P.doctor_first_message(case, mode="reactive")
    assert "question:" not in reactive and "fever" not in reactive
    full = P.doctor_first_message(case, mode="full")
    assert "He has a fever. The culture shows diplococci. Which drug was given?" in full
    with pytest.raises(ValueError, match="unknown consultation mode"):
        P.doctor_first_message(case, mode="psychic")


def test_doctor_first_message_chinese_and_multi_answer():
    case = _case(language="zh", known=(0,), answer=("A", "C"))
    full = P.doctor_first_message(case, mode="full")
    assert "多项选择题" in full and "【正确答案是X】" in full
    # fact 0 is known at the start (already in the initial information); full mode adds the rest
    assert "问题：患者男，21岁，膝痛。培养见双球菌。应给予何种药物？" in full
    pro = P.doctor_first_message(case, mode="proactive", max_questions=3)
    assert "question:" in pro and "最多只能提问3次" in pro


def test_markerless_turn_is_the_answer_only_where_no_question_is_allowed():
    options = {"A": "Gentamicin", "B": "Ciprofloxacin", "C": "Ceftriaxone", "D": "Trimethoprim"}
    text = "The correct answer is C: Ceftriaxone."
    assert P.parse_doctor_turn(text, options).kind == P.INVALID
    turn = P.parse_doctor_turn(text, options, questions_allowed=False)
    assert turn.kind == P.ANSWER and turn.letters == ("C",)


PE = {"A": "Pneumonia", "B": "Pneumothorax", "C": "Acute pericarditis", "D": "Pulmonary embolism"}


@pytest.mark.parametrize(
    "text, expected",
    [
        # a restatement that starts with the article `A` is not option A
        ("answer: A 45-year-old man with sudden dyspnea after a long flight most likely has pulmonary embolism", ("D",)),
        ("answer: A 45-year-old man with sudden dyspnea.", ()),
        ("answer: A pneumothorax.", ("B",)),
        ("answer: A. Pneumonia", ("A",)),
        ("answer: A, pneumonia", ("A",)),
        # letters named mid-sentence after the marker
        ("answer: The most likely diagnosis is D", ("D",)),
        ("answer: The answer is not A; it is D.", ("D",)),
        ("answer: I would choose option D, pulmonary embolism.", ("D",)),
        ("answer: Sudden dyspnea after a flight suggests an embolus (D).", ("D",)),
        ("Option (C)", ("C",)),
        ("answer: **D. Pulmonary embolism**", ("D",)),
        # no marker: letters at the start of the turn
        ("D. Pulmonary embolism", ("D",)),
        ("D: Pulmonary embolism", ("D",)),
        ("D: PE\n\nThe answer is: PE.", ("D",)),  # nothing after the marker: the turn's start
        # a letter contradicted by the option text after it commits to neither option
        ("answer: B: Pulmonary embolism", ()),
        ("A: Pulmonary embolism", ()),
        ("A: B: Pneumothorax", ()),
        ("A: Pneumonia\n\nThe correct answer is D: Pulmonary embolism.", ("D",)),  # the last statement is consistent
        ("A: Pneumonia\n\nThe correct answer is C: Pulmonary embolism.", ()),
        # an echoed option list is no answer; a choice after it is
        ("A: Pneumonia\nB: Pneumothorax\nC: Acute pericarditis", ()),
        ("A: Pneumonia\nB: Pneumothorax\nC: Acute pericarditis\n\nA: Pneum", ()),  # the list restarted, cut short
        ("A: Pneumonia\n\nA: Pneumonia\nB: Pneumothorax", ("A",)),  # a choice before the list stands
        ("A: Pneumonia\nB: Pneumothorax\nC: Acute pericarditis\nD: Pulmonary embolism\n\nThe answer is: D", ("D",)),
        ("answer: The options are A: Pneumonia, B: Pneumothorax, C: Acute pericarditis. I need more information.", ()),
        # single-answer option text: the first named after the last `most likely`
        ("answer: Pneumonia is less likely without fever; the most likely diagnosis is pulmonary embolism.", ("D",)),
    ],
)
def test_answer_extraction_beyond_the_marker(text, expected):
    assert letters(text, PE) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("answer: 【答案】E", ("E",)),
        ("answer: 根据病史，答案为E。", ("E",)),
        ("answer: 腹泻最明显，故选C。", ("C",)),
        ("answer: 最佳选项为（B）", ("B",)),
        ("answer: 考虑为腹泻，但需排除发热。", ("C",)),
    ],
)
def test_chinese_letters_named_mid_sentence(text, expected):
    assert letters(text, OPTS5) == expected


def test_option_texts_name_one_option_unless_multi_answer():
    text = "answer: 患者有发热和咳嗽。"
    assert P.extract_answer(text, OPTS5) == ("A",)
    assert P.extract_answer(text, OPTS5, multi_answer=True) == ("A", "B")
    assert P.extract_answer("A: 发热\nB: 咳嗽", OPTS5) == ()  # a single-answer doctor that lists options chose none


def test_option_text_is_a_whole_word_with_either_apostrophe():
    opts = {"A": "Gastrin", "B": "Kaposi’s sarcoma"}
    assert letters("answer: a gastrinoma", opts) == ()
    assert letters("answer: Kaposi's sarcoma", opts) == ("B",)


def test_answer_turn_without_letters_has_none():
    assert P.parse_doctor_turn("answer: I cannot decide.", OPTS) == P.DoctorTurn(kind=P.ANSWER, letters=())
    turn = P.parse_doctor_turn("answer: 患者有发热和咳嗽。", OPTS5, multi_answer=True)
    assert turn.letters == ("A", "B")
