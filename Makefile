# The two commands of README.md. Both set up .venv/ and export the encoder and the
# trained towers first (fast when they are current; the first run trains the towers);
# the tests start with the import contracts (pyproject.toml, [tool.importlinter]).
# The demo serves towers of their own, trained on the cold protocol: a fifth of the
# films are never trained on, and the demo uploads those fresh.
.PHONY: setup demo test

DEMO_TOWERS ?= onnx/towers-cold

setup:
	@bash scripts/setup.sh

demo: setup
	.venv/bin/coldstart export
	COLDSTART_TOWERS_DIR=$(DEMO_TOWERS) .venv/bin/coldstart export-towers --protocol cold
	COLDSTART_TOWERS_DIR=$(DEMO_TOWERS) .venv/bin/coldstart demo

test: setup
	.venv/bin/lint-imports
	.venv/bin/coldstart export
	.venv/bin/coldstart export-towers
	.venv/bin/python -m pytest -q
