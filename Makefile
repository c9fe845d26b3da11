# Shortcuts for the README's two quickstart commands (they work without make too).
.PHONY: demo test config-docs

demo:
	./install.sh && .venv/bin/edgeprune demo

test:
	./install.sh --dev && .venv/bin/python -m pytest

# docs/configuration.md is generated from shared/settings.py, the one source of defaults.
config-docs:
	.venv/bin/edgeprune config > docs/configuration.md
