"""Every prompt of the project, in one module, with versions recorded in the outputs they produce.

Sections (each owned by the code that uses it): the Shapley value prompt (promed.md §2), the
understanding and fact-judge prompts (SIG paper mode), the doctor prompt and turn format (§1), and the
patient simulator prompt.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

# --- Shapley value game (promed.md §2) -------------------------------------------------------------

# Recorded in every Shapley cache line: a change to these pieces changes v, so old caches are not comparable.
SHAPLEY_PROMPT_VERSION = "shapley-v1"

_VALUE_HEADER = {
    "en": "You are a professional doctor with extensive medical knowledge. Please use your professional medical "
    "knowledge to directly give the correct answer:\n\nPatient information:",
    "zh": "你是一名专业的医生，具备丰富的医疗知识。请根据以下患者信息直接给出正确答案：\n\n患者信息：",
}
_VALUE_QUESTION = {"en": "\n\nQuestion: {question}\nanswer:", "zh": "\n\n问题：{question}\n答案："}


def shapley_value_pieces(
    *, language: str, facts: Sequence[str], question: str, answer: str
) -> tuple[str, tuple[str, ...], str, str]:
    """The raw value prompt of promed.md §2 as separately tokenized pieces: (header, facts, question, answer).

    Each fact piece carries its own separator (a leading space in English, a closing "。" in Chinese), so
    that a coalition's prompt is the header, the pieces of its facts in their original order, the question
    and the gold answer text, concatenated; the empty coalition leaves the patient-information field empty.
    """
    if language == "zh":
        fact_pieces = tuple(f.strip().rstrip("。，；;,.") + "。" for f in facts)
        answer_piece = answer
    else:
        fact_pieces = tuple(" " + f.strip() for f in facts)
        answer_piece = " " + answer
    return _VALUE_HEADER[language], fact_pieces, _VALUE_QUESTION[language].format(question=question), answer_piece

# --- SIG paper mode: understanding model and fact judge --------------------------------------------

SIG_PROMPT_VERSION = "sig-v1"

_UNDERSTANDING = {
    "en": """You are a doctor's assistant. Below is what the doctor knew about the patient at the start and \
the consultation so far. Write down everything that is now known about the patient as short factual \
statements, one per line. Include only what is stated; do not guess or add diagnoses.

Known at the start: {initial_info}

Consultation:
{dialogue}""",
    "zh": """你是医生的助手。下面是医生一开始掌握的患者信息以及到目前为止的问诊记录。请把目前已知的患者信息逐条写成简短的事实陈述，\
每行一条。只写明确提到的内容，不要猜测，也不要加入诊断。

一开始已知：{initial_info}

问诊记录：
{dialogue}""",
}
_DIALOGUE_TURN = {"en": "Doctor: {question}\nPatient: {reply}", "zh": "医生：{question}\n患者：{reply}"}
_NO_DIALOGUE = {"en": "(no questions yet)", "zh": "（尚未提问）"}

# The paper's judge query: "Context: {U_t} Input: {fact} True or False?".
_FACT_JUDGE = {
    "en": """Context: {understanding}
Input: {fact}
True or False? Answer True if the context states the input, otherwise False. Reply with one word.""",
    "zh": """Context: {understanding}
Input: {fact}
True or False? 如果上下文明确包含该输入信息，回答 True，否则回答 False。只回答一个词。""",
}


def understanding_prompt(*, language: str, initial_info: str, turns: Sequence[tuple[str, str]]) -> str:
    """The understanding model's prompt U_t: initial information and the (question, reply) pairs so far."""
    dialogue = "\n".join(_DIALOGUE_TURN[language].format(question=q, reply=r) for q, r in turns)
    return _UNDERSTANDING[language].format(initial_info=initial_info, dialogue=dialogue or _NO_DIALOGUE[language])


def fact_judge_prompt(*, language: str, understanding: str, fact: str) -> str:
    """The True/False judge: does the understanding text U_t contain this fact?"""
    return _FACT_JUDGE[language].format(understanding=understanding, fact=fact)

# --- Doctor (promed.md §1) ------------------------------------------------------------------------

DOCTOR_PROMPT_VERSION = "doctor-v1"

_DOCTOR_EN = """You are a professional doctor with excellent clinical reasoning, skilled at diagnosis and at \
questioning patients. Your task is to answer a {question_type} about a patient. The patient information you \
are given may be incomplete: when you are unsure, use your medical knowledge, the patient's current state and \
the question to ask the patient for the information you need.

Problem: {problem}
Options:
{options}

Rules:
1. Every reply must take exactly one of two forms:
   a. "question: <one specific question for the patient>" when you need more information;
   b. "answer: <your reasoning> 【answer: X】" when you are ready, where X is the letter of your choice{multi_hint}.
2. When incomplete information leaves you uncertain, ask a question instead of guessing.
3. Ask one question or give the final answer per reply, never both.
4. You may ask at most {max_questions} questions; after that you must answer."""

_DOCTOR_EN_DIRECT = """You are a professional doctor with excellent clinical reasoning. Answer the \
{question_type} below about a patient from the information given.

Problem: {problem}
Options:
{options}

Reply in the form "answer: <your reasoning> 【answer: X】", where X is the letter of your choice{multi_hint}."""

_DOCTOR_ZH = """你是一名专业的医生，具备出色的临床推理、诊断和问诊能力。你的任务是回答一道关于患者的{question_type}。你得到的患者信息可能不完整：\
当你不确定时，请结合医学知识、患者的当前情况和题目，向患者提问以获得必要的信息。

问题：{problem}
选项：
{options}

请注意：
1. 每次回复只能采用以下两种格式之一：
   a. 需要更多信息时："question: <向患者提出的一个具体问题>"；
   b. 准备作答时："answer: <你的分析> 【正确答案是X】"，X 为所选选项的字母{multi_hint}。
2. 当信息不完整使你无法确定答案时，请先提问，不要猜测。
3. 每次回复只能提一个问题或给出最终答案。
4. 你最多只能提问{max_questions}次，之后必须给出答案。"""

_DOCTOR_ZH_DIRECT = """你是一名专业的医生，具备出色的临床推理能力。请根据给出的患者信息回答下面这道{question_type}。

问题：{problem}
选项：
{options}

请按以下格式回复："answer: <你的分析> 【正确答案是X】"，X 为所选选项的字母{multi_hint}。"""

_QUESTION_TYPE = {
    ("en", False): "multiple-choice question (one correct option)",
    ("en", True): "multiple-choice question (several correct options)",
    ("zh", False): "单项选择题",
    ("zh", True): "多项选择题",
}
_MULTI_HINT = {"en": " (give every correct letter, e.g. 【answer: AC】)", "zh": "（写出全部正确选项，如【正确答案是AC】）"}


def doctor_prompt(
    *,
    language: str,
    problem: str,
    options: Mapping[str, str],
    multi_answer: bool,
    max_questions: int,
    interactive: bool,
) -> str:
    """The doctor's first message (promed.md §1): instruction, question type, `Problem:` and `Options:`.

    `interactive=False` is the answer-at-once variant used by the reactive and full-information modes.
    """
    if language not in ("en", "zh"):
        raise ValueError(f"doctor prompt: unsupported language {language!r} (expected 'en' or 'zh')")
    if interactive:
        template = _DOCTOR_ZH if language == "zh" else _DOCTOR_EN
    else:
        template = _DOCTOR_ZH_DIRECT if language == "zh" else _DOCTOR_EN_DIRECT
    return template.format(
        question_type=_QUESTION_TYPE[(language, multi_answer)],
        problem=problem,
        options="\n".join(f"{letter}: {text}" for letter, text in options.items()),
        multi_hint=_MULTI_HINT[language] if multi_answer else "",
        max_questions=max_questions,
    )


def doctor_problem(*, language: str, initial_info: str, question: str, facts: Sequence[str] = ()) -> str:
    """The `Problem:` text: initial information, any extra facts the doctor is given, then the atomic question.

    Chinese facts are joined with "，" and closed with "。", as the CMB cases' initial information is.
    """
    facts = [f.strip() for f in facts if f.strip()]
    if language == "zh":
        fact_text = "，".join(f.rstrip("。，") for f in facts) + "。" if facts else ""
        return "".join(part.strip() for part in (initial_info, fact_text, question) if part.strip())
    return " ".join(part.strip() for part in (initial_info, *facts, question) if part.strip())


# --- Patient simulator -----------------------------------------------------------------------------

PATIENT_PROMPT_VERSION = "patient-v1"

# The fixed reply of the fact_select patient when no fact answers the question.
PATIENT_CANNOT_ANSWER = {
    "en": "Sorry, I don't know the answer to that question.",
    "zh": "抱歉，这个问题我不清楚。",
}

_PATIENT_EN = """You are a patient in a medical consultation. Your health is exactly what the facts below say; \
answer the doctor's questions from them only.

Your facts:
{facts}

Rules:
1. Answer strictly from these facts. Never add, assume or invent anything beyond them.
2. If the facts do not answer a question, say "I don't know".
3. Speak naturally, as someone living with these symptoms; never mention records, facts or that you are \
simulating a patient.
4. Answer only what was asked, in one or two sentences."""

_PATIENT_ZH = """你是一名正在就诊的患者。你的健康状况完全由下面的事实决定，只能依据这些事实回答医生的问题。

你的情况：
{facts}

请注意：
1. 回答必须严格基于这些事实，不得添加、推测或编造任何内容。
2. 如果这些事实无法回答某个问题，请回答“我不知道”。
3. 请自然地表达，像真正经历这些症状的人一样，不要提及记录、事实或你在扮演患者。
4. 只回答所问的问题，一两句话即可。"""


def patient_system_prompt(*, language: str, facts: Sequence[str]) -> str:
    """The system prompt of the LLM patient: every atomic fact of the case, then how to answer."""
    if language not in ("en", "zh"):
        raise ValueError(f"patient prompt: unsupported language {language!r} (expected 'en' or 'zh')")
    template = _PATIENT_ZH if language == "zh" else _PATIENT_EN
    return template.format(facts="\n".join(f"- {fact}" for fact in facts))
