"""``python -m grpo_fast ...`` runs the ``grpo-fast`` command."""

from .cli import main

raise SystemExit(main())
