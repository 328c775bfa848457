# The two commands of README.md. Both set up .venv/ and export the encoder and the
# trained towers first (fast when they are current; the first run trains the towers);
# the tests start with the import contracts (pyproject.toml, [tool.importlinter]).
.PHONY: setup demo test

setup:
	@bash scripts/setup.sh

demo: setup
	.venv/bin/coldstart export
	.venv/bin/coldstart export-towers
	.venv/bin/coldstart demo

test: setup
	.venv/bin/lint-imports
	.venv/bin/coldstart export
	.venv/bin/coldstart export-towers
	.venv/bin/python -m pytest -q
