# The two commands of README.md. Both set up .venv/ first (fast when it is current).
.PHONY: setup demo test

setup:
	@bash scripts/setup.sh

demo: setup
	.venv/bin/coldstart export
	.venv/bin/coldstart demo

test: setup
	.venv/bin/coldstart export
	.venv/bin/python -m pytest -q
