# The two commands of the README, and the host set-up they share.
.PHONY: setup test demo clean-host

PYTHON := .venv/bin/python

setup:
	@bash host/setup.sh

test: setup
	@$(PYTHON) -m pytest -q tests

demo: setup
	@$(PYTHON) demo/run_demo.py

clean-host:
	rm -rf .venv .host
