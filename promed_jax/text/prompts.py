"""Every prompt of the project, in one module, with versions recorded in the outputs they produce.

Sections (each owned by the code that uses it): the Shapley value prompt (promed.md §2), the
understanding and fact-judge prompts (SIG paper mode), the doctor prompt and turn format (§1), and the
patient simulator prompt.
"""

from __future__ import annotations

# --- Shapley value game (promed.md §2) -------------------------------------------------------------

# --- SIG paper mode: understanding model and fact judge --------------------------------------------

# --- Doctor (promed.md §1) ------------------------------------------------------------------------

# --- Patient simulator -----------------------------------------------------------------------------
