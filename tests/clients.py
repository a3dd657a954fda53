"""What tests that drive llmops through the official clients share."""

from __future__ import annotations

import pytest

from llmops.cli.evals import EVALS_DEPRECATION

# The openai client warns on every Evals call since OpenAI shut its hosted Evals down; llmops
# serves that API itself, so tests that drive it expect exactly this warning and no other.
EVALS_API = pytest.mark.filterwarnings(f"ignore:{EVALS_DEPRECATION}:DeprecationWarning")
