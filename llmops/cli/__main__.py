"""`python -m llmops.cli`, as the `llmops` command."""

import sys

from llmops.cli import main

sys.exit(main())
